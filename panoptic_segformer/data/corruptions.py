"""Common image corruptions at test time: robustness to natural corruptions (paper Sec. 4.4, Table 11).

The paper evaluates on COCO-C: the validation images under the corruptions of the ``imagecorruptions``
package (Michaelis et al., "Benchmarking Robustness in Object Detection", the paper's [42]) at severities
1-5. Here a corruption is applied on the fly by the test-time dataset mapper, to the image as read from
disk (before the test resize), configured by ``TEST.CORRUPTION.NAME`` / ``TEST.CORRUPTION.SEVERITY``.

Determinism: the corruptions draw from NumPy's global random state (and two of them take an explicit
seed). Each image is corrupted under a seed derived from its ``image_id`` (a stable hash, independent
of the process, of the order of the images and of ``PYTHONHASHSEED``), with the caller's global random
state saved and restored around the call; so two runs, any number of data-loader workers and
multi-process evaluation see the same pixels.

The package: ``imagecorruptions-imaug`` (import name ``imagecorruptions``), the maintained fork of
``imagecorruptions`` 1.1.2 with the same 19 corruptions and parameters, fixed for NumPy 2 and recent
scikit-image (see docs/ROBUSTNESS.md, "The corruption package", for why not 1.1.2 and how it is installed).
"""
import hashlib
import inspect
from collections import OrderedDict
from typing import Dict, Optional, Sequence

import numpy as np

__all__ = [
    "CORRUPTION_NAMES",
    "TABLE11_CORRUPTIONS",
    "TABLE11_GROUPS",
    "SEVERITIES",
    "CorruptionError",
    "check_corruption",
    "image_seed",
    "corrupt_image",
    "unavailable_reason",
    "ImageCorruption",
    "build_test_corruption",
]

#: Every corruption of ``imagecorruptions`` (its ``get_corruption_names("all")``, in its order): 15
#: "common" ones and 4 "validation" ones (speckle_noise, gaussian_blur, spatter, saturate).
CORRUPTION_NAMES = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate",
)

#: The 16 corruptions of the paper's Table 11, grouped and ordered as its columns (zoom blur, elastic
#: transform and pixelate are not in the table).
TABLE11_GROUPS = OrderedDict([
    ("blur", ("motion_blur", "defocus_blur", "glass_blur", "gaussian_blur")),
    ("noise", ("gaussian_noise", "impulse_noise", "shot_noise", "speckle_noise")),
    ("digital", ("brightness", "contrast", "saturate", "jpeg_compression")),
    ("weather", ("snow", "spatter", "fog", "frost")),
])
TABLE11_CORRUPTIONS = tuple(name for names in TABLE11_GROUPS.values() for name in names)

SEVERITIES = (1, 2, 3, 4, 5)

_INSTALL_HINT = ("`make setup` installs it (pip install --no-deps imagecorruptions-imaug==1.1.5, with its "
                 "runtime needs pinned in requirements.txt)")


class CorruptionError(ValueError):
    """A corruption that is unknown, has a bad severity, or cannot run on this machine."""


def check_corruption(name: str, severity, key: str = "TEST.CORRUPTION") -> None:
    """Raise CorruptionError naming ``key`` if ``name`` is not a corruption of ``imagecorruptions``
    or ``severity`` is not an integer in 1-5."""
    if name not in CORRUPTION_NAMES:
        raise CorruptionError(f"{key}.NAME: unknown corruption {name!r}; choose one of "
                              f"{', '.join(CORRUPTION_NAMES)} (or '' for none)")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise CorruptionError(f"{key}.SEVERITY: must be an integer in 1-5, got {severity!r}")


def image_seed(image_key) -> int:
    """A 32-bit seed from an image id (or any key): the same in every process and run."""
    digest = hashlib.sha256(str(image_key).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little")


def _imagecorruptions():
    try:
        import imagecorruptions
    except ImportError as e:
        raise CorruptionError(f"the image corruptions need the package imagecorruptions ({e}); "
                              + _INSTALL_HINT) from e
    return imagecorruptions


def _accepts_seed(function) -> bool:
    return "seed" in inspect.signature(function).parameters


def corrupt_image(image: np.ndarray, name: str, severity: int, seed: int, image_format: str = "RGB") -> np.ndarray:
    """``image`` under corruption ``name`` at ``severity`` with random draws seeded by ``seed``.

    Args:
        image: (H, W, 3) uint8 array in ``image_format`` ("RGB" or "BGR"), at least 32 px a side.
        name, severity: a corruption of :data:`CORRUPTION_NAMES` and 1-5.
        seed: seeds NumPy's global state for the call (restored afterwards), and the corruptions
            that take an explicit ``seed``.

    Returns:
        (H, W, 3) uint8 array in ``image_format``: same size and dtype as ``image``.
    """
    check_corruption(name, severity, key="corruption")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CorruptionError(f"corruption {name!r} expects an (H, W, 3) uint8 image, got "
                              f"{image.dtype} {image.shape}")
    if image_format not in ("RGB", "BGR"):
        raise CorruptionError(f"corruption {name!r}: image format must be RGB or BGR, got {image_format!r}")
    ic = _imagecorruptions()
    function = ic.corruption_dict[name]
    kwargs = {"seed": seed} if _accepts_seed(function) else {}
    rgb = image if image_format == "RGB" else image[:, :, ::-1]
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        out = ic.corrupt(np.ascontiguousarray(rgb), severity=int(severity), corruption_name=name, **kwargs)
    finally:
        np.random.set_state(state)
    out = np.asarray(out)
    if out.shape != image.shape or out.dtype != np.uint8:
        raise CorruptionError(f"corruption {name!r} (severity {severity}) returned {out.dtype} {out.shape} "
                              f"for a uint8 {image.shape} image")
    return np.ascontiguousarray(out if image_format == "RGB" else out[:, :, ::-1])


def unavailable_reason(name: str, severity: int = 1) -> Optional[str]:
    """None if corruption ``name`` runs here (tried on a 64x64 image), else why not (the package is
    missing, or the corruption needs something this machine lacks, e.g. a data file)."""
    check_corruption(name, severity, key="corruption")
    probe = np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    try:
        corrupt_image(probe, name, severity, seed=0)
    except Exception as e:  # noqa: BLE001 - any failure makes the corruption unavailable; the reason says which
        return f"{type(e).__name__}: {e}"
    return None


class ImageCorruption:
    """Callable used by the test-time dataset mapper: corrupts an image as read from disk, seeded by
    the image's ``image_id`` (its ``file_name`` when the dataset dict has no id)."""

    def __init__(self, name: str, severity: int, key: str = "TEST.CORRUPTION"):
        check_corruption(name, severity, key)
        reason = unavailable_reason(name, severity)
        if reason is not None:
            raise CorruptionError(f"{key}.NAME: corruption {name!r} cannot run on this machine ({reason})")
        self.name, self.severity = name, int(severity)

    def __call__(self, image: np.ndarray, dataset_dict: Dict, image_format: str = "RGB") -> np.ndarray:
        key = dataset_dict.get("image_id", dataset_dict.get("file_name"))
        try:
            return corrupt_image(image, self.name, self.severity, image_seed(key), image_format)
        except Exception as e:
            raise CorruptionError(f"{dataset_dict.get('file_name')}: corruption {self.name!r} (severity "
                                  f"{self.severity}) failed ({type(e).__name__}: {e})") from e

    def __repr__(self):
        return f"ImageCorruption(name={self.name!r}, severity={self.severity})"


def build_test_corruption(cfg) -> Optional[ImageCorruption]:
    """The corruption of ``cfg.TEST.CORRUPTION`` (None when NAME is ""); a bad NAME or SEVERITY is a
    CorruptionError naming the key."""
    c = cfg.TEST.CORRUPTION
    if c.NAME == "":
        if isinstance(c.SEVERITY, bool) or c.SEVERITY not in SEVERITIES:
            raise CorruptionError(f"TEST.CORRUPTION.SEVERITY: must be an integer in 1-5, got {c.SEVERITY!r}")
        return None
    return ImageCorruption(c.NAME, c.SEVERITY)

