"""The installed environment: the real Detectron2 (upstream build or the registry fallback), listed by
pip, with a clear error for any C++ op when the fallback's placeholder is in use."""
import importlib.metadata
import re
import subprocess
import sys

import pytest

import detectron2
from detectron2 import _C
from projects.setup import install_detectron2 as installer


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


def _pip_freeze_detectron2():
    out = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
    return next(line for line in out.stdout.splitlines() if line.split(" @ ")[0].lower() == "detectron2")


def test_collect_env_says_which_detectron2_is_installed():
    """"v0.6 registry fallback", or the upstream commit pip built (as `pip freeze` reports it)."""
    out = subprocess.run([sys.executable, "-m", "panoptic_segformer.collect_env"], capture_output=True, text=True)
    line = next(line for line in out.stdout.splitlines() if line.startswith("detectron2 "))
    if _is_placeholder():
        assert "v0.6 registry fallback" in line
    else:
        freeze = _pip_freeze_detectron2()  # e.g. "detectron2 @ git+https://...@<commit>"
        assert "v0.6 registry fallback" not in line
        if " @ git+" in freeze:
            assert f"upstream commit {freeze.rsplit('@', 1)[1]}" in line


def test_installer_checks_that_the_installed_detectron2_is_the_one_it_installed():
    """The installer's final check, on the real installed Detectron2: it passes for what is installed
    and fails for the other kind (the bug it prevents: keeping v0.6 and reporting upstream)."""
    info = installer.installed_info()
    assert info["placeholder"] == _is_placeholder() and info["version"] == detectron2.__version__
    installer.check_installed(info, upstream=not _is_placeholder())
    wrong = "upstream (compiled ops)" if _is_placeholder() else "the v0.6 registry fallback (placeholder _C)"
    with pytest.raises(SystemExit, match=rf"expected {re.escape(wrong)}, but `import detectron2` finds"):
        installer.check_installed(info, upstream=_is_placeholder())


def test_installer_upstream_source_option(tmp_path):
    url = "https://example.org/mirror/detectron2.git"
    assert installer.upstream_requirement(url, "v0.6") == f"git+{url}@v0.6"
    assert installer.upstream_requirement("git+" + url, "main") == f"git+{url}@main"
    with pytest.raises(SystemExit, match="neither a local directory nor a Git URL"):
        installer.upstream_requirement(str(tmp_path / "missing"), "main")
    with pytest.raises(SystemExit, match="not a Detectron2 source tree"):
        installer.upstream_requirement(str(tmp_path), "main")
    with pytest.raises(SystemExit) as e:  # argparse: --upstream-src is an upstream source
        installer.main(["--source", "fallback", "--upstream-src", url])
    assert e.value.code == 2
