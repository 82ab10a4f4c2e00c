"""The installed environment: the real Detectron2 (upstream build or the registry fallback), listed by
pip, with a clear error for any C++ op when the fallback's placeholder is in use."""
import importlib.metadata
import subprocess
import sys

import pytest

import detectron2
from detectron2 import _C


def _is_placeholder():
    try:
        return bool(_C.IS_PLACEHOLDER)
    except (AttributeError, ImportError):
        return False


def test_detectron2_is_an_installed_distribution():
    assert importlib.metadata.version("detectron2") == detectron2.__version__
    out = subprocess.run([sys.executable, "-m", "pip", "show", "detectron2"], capture_output=True, text=True)
    assert out.returncode == 0 and "Name: detectron2" in out.stdout


@pytest.mark.skipif(not _is_placeholder(), reason="Detectron2 was built from source: its C++ ops exist")
def test_fallback_c_ops_raise_a_clear_import_error():
    with pytest.raises(ImportError, match=r"detectron2\._C\.ROIAlign_forward: Detectron2's C\+\+ ops are not built"):
        _C.ROIAlign_forward
    assert _C.has_cuda() is False and "not built" in _C.get_compiler_version()


def test_collect_env_reports_detectron2_and_versions():
    out = subprocess.run([sys.executable, "-m", "panoptic_segformer.collect_env"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"detectron2              {detectron2.__version__}" in out.stdout or "detectron2" in out.stdout
    assert ("C++ ops not built" in out.stdout) == _is_placeholder()
    for name in ("torch", "torchvision", "panopticapi-lite", "fvcore"):
        assert name in out.stdout


def test_detectron2_collect_env_works():
    """Detectron2's own collect_env (called by default_setup in train_net.py) must not crash."""
    from detectron2.utils.collect_env import collect_env_info

    assert "detectron2" in collect_env_info()
