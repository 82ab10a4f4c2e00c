"""Test-time corruptions (paper Sec. 4.4, Table 11): every corruption of the real `imagecorruptions`
package on a real `shapes` image, its determinism (per image id, across processes), the mapper's
TEST.CORRUPTION keys and their errors, and the environment it needs."""
import hashlib
import importlib.metadata
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog

from conftest import REPO_ROOT, small_cfg
from panoptic_segformer import PanopticSegFormerDatasetMapper
from panoptic_segformer.data.corruptions import (
    CORRUPTION_NAMES,
    TABLE11_CORRUPTIONS,
    CorruptionError,
    corrupt_image,
    image_seed,
    unavailable_reason,
)
from panoptic_segformer.data.dataset_mapper import read_image_rgb

# Corruptions without random draws: the seed does not change their output.
DETERMINISTIC = {"defocus_blur", "gaussian_blur", "brightness", "contrast", "saturate", "jpeg_compression",
                 "pixelate", "zoom_blur"}


@pytest.fixture(scope="module")
def shapes_image():
    """A real 128x128 `shapes` validation image (RGB uint8)."""
    return read_image_rgb(DatasetCatalog.get("shapes_panoptic_val_tiny")[0]["file_name"])


def test_names_are_imagecorruptions_and_table11_is_its_16_corruptions():
    import imagecorruptions

    assert CORRUPTION_NAMES == tuple(imagecorruptions.get_corruption_names("all"))
    assert len(TABLE11_CORRUPTIONS) == 16 and len(set(TABLE11_CORRUPTIONS)) == 16
    assert set(CORRUPTION_NAMES) - set(TABLE11_CORRUPTIONS) == {"zoom_blur", "elastic_transform", "pixelate"}


@pytest.mark.parametrize("name", CORRUPTION_NAMES)
def test_every_corruption_changes_the_image_deterministically_keeping_size_and_dtype(shapes_image, name):
    assert unavailable_reason(name) is None
    state = np.random.get_state()
    first = corrupt_image(shapes_image, name, 3, seed=image_seed(7))
    np.random.rand(5)  # another global random state must not matter
    second = corrupt_image(shapes_image, name, 3, seed=image_seed(7))
    assert first.shape == shapes_image.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, second)
    assert (first != shapes_image).mean() > 0.05, f"{name} barely changed the image"
    # The caller's global random state is restored (apart from the draw above).
    np.random.set_state(state)
    corrupt_image(shapes_image, name, 3, seed=1)
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2] == state[2]
    # BGR in, BGR out: the same corruption of the same picture.
    bgr = corrupt_image(np.ascontiguousarray(shapes_image[:, :, ::-1]), name, 3, image_seed(7), "BGR")
    np.testing.assert_array_equal(bgr[:, :, ::-1], first)
    other_seed = corrupt_image(shapes_image, name, 3, seed=image_seed(8))
    assert np.array_equal(other_seed, first) == (name in DETERMINISTIC)
    if name not in ("spatter", "saturate"):  # their severities 1-3 and 4-5 are two different effects
        # Severity 5 moves the image further from the original than severity 1.
        err = {s: np.abs(corrupt_image(shapes_image, name, s, image_seed(7)).astype(int) - shapes_image).mean()
               for s in (1, 5)}
        assert err[5] > err[1], err


def test_corruption_pixels_are_the_same_in_another_process(shapes_image):
    """Seeds come from the image id only (no hash randomisation, no process state)."""
    names = [n for n in CORRUPTION_NAMES if n not in DETERMINISTIC]
    script = (
        "import hashlib, sys, numpy as np\n"
        "from panoptic_segformer.data.corruptions import corrupt_image, image_seed\n"
        "from panoptic_segformer.data.dataset_mapper import read_image_rgb\n"
        "np.random.seed(12345)\n"
        "image = read_image_rgb(sys.argv[1])\n"
        "for name in sys.argv[2:]:\n"
        "    print(name, hashlib.sha256(corrupt_image(image, name, 2, image_seed(42)).tobytes()).hexdigest())\n")
    file_name = DatasetCatalog.get("shapes_panoptic_val_tiny")[0]["file_name"]
    env = dict(os.environ, PYTHONHASHSEED="987", PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", script, file_name, *names], capture_output=True, text=True,
                         env=env, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    theirs = dict(line.split() for line in out.stdout.splitlines())
    for name in names:
        ours = hashlib.sha256(corrupt_image(shapes_image, name, 2, image_seed(42)).tobytes()).hexdigest()
        assert theirs[name] == ours, name


def test_test_mapper_corrupts_each_image_seeded_by_its_id():
    dicts = DatasetCatalog.get("shapes_panoptic_val_tiny")[:3]
    cfg = small_cfg("TEST.CORRUPTION.NAME", "gaussian_noise", "TEST.CORRUPTION.SEVERITY", 4)
    mapper = PanopticSegFormerDatasetMapper(cfg, is_train=False)
    clean = PanopticSegFormerDatasetMapper(small_cfg(), is_train=False)
    forward = [mapper(d)["image"] for d in dicts]
    backward = [mapper(d)["image"] for d in reversed(dicts)][::-1]
    for d, a, b in zip(dicts, forward, backward):
        assert torch.equal(a, b)
        assert a.shape == clean(d)["image"].shape and a.dtype == torch.uint8
        assert not torch.equal(a, clean(d)["image"])
        # 128 px images at a 128 px test size: the mapper's image is the corrupted file itself.
        expected = corrupt_image(read_image_rgb(d["file_name"]), "gaussian_noise", 4, image_seed(d["image_id"]))
        assert torch.equal(a, torch.from_numpy(expected).permute(2, 0, 1))
    assert not torch.equal(forward[0], forward[1])
    # Training never corrupts.
    assert PanopticSegFormerDatasetMapper(cfg, is_train=True).corruption is None


@pytest.mark.parametrize("is_train", [False, True])
@pytest.mark.parametrize("opts, match", [
    (("TEST.CORRUPTION.NAME", "gaussian_nois"), r"TEST\.CORRUPTION\.NAME: unknown corruption 'gaussian_nois'; choose one of gaussian_noise, "),
    (("TEST.CORRUPTION.NAME", "fog", "TEST.CORRUPTION.SEVERITY", 0), r"TEST\.CORRUPTION\.SEVERITY: must be an integer in 1-5, got 0"),
    (("TEST.CORRUPTION.NAME", "fog", "TEST.CORRUPTION.SEVERITY", 6), r"TEST\.CORRUPTION\.SEVERITY: must be an integer in 1-5, got 6"),
    (("TEST.CORRUPTION.SEVERITY", 9), r"TEST\.CORRUPTION\.SEVERITY: must be an integer in 1-5, got 9"),
])
def test_bad_corruption_config_is_a_clear_error(opts, match, is_train):
    with pytest.raises(CorruptionError, match=match):
        PanopticSegFormerDatasetMapper(small_cfg(*opts), is_train=is_train)


def test_imagecorruptions_is_installed_without_breaking_the_pins():
    """imagecorruptions' own requirements would pull opencv-python and Pillow>=10: make setup installs it
    without them, and the pinned OpenCV (headless) and Pillow stay the only ones."""
    pins = {}
    with open(os.path.join(REPO_ROOT, "requirements.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if "==" in line:
                name, version = line.split("==")
                pins[name.lower()] = version
    for name in ("pillow", "opencv-python-headless", "numpy", "scipy", "scikit-image", "numba"):
        assert importlib.metadata.version(name) == pins[name], name
    with open(os.path.join(REPO_ROOT, "Makefile")) as f:
        assert f"imagecorruptions-imaug=={importlib.metadata.version('imagecorruptions-imaug')}" in f.read()
    for absent in ("opencv-python", "imagecorruptions"):
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version(absent)
    import cv2
    import numba  # noqa: F401 - imported by the corruptions
    import skimage  # noqa: F401

    cv2_init = [str(p) for p in importlib.metadata.files("opencv-python-headless") if str(p) == "cv2/__init__.py"]
    assert cv2_init and cv2.__file__.endswith(cv2_init[0]), cv2.__file__
