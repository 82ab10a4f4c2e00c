"""Print the versions that matter for this project: `python -m panoptic_segformer.collect_env`."""
import importlib
import importlib.metadata
import platform
import sys


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def detectron2_build():
    """Describe the installed Detectron2: version, location and whether its C++ ops are built."""
    try:
        import detectron2
    except ImportError as e:
        return f"not importable ({e})"
    from detectron2 import _C

    try:
        placeholder = _C.IS_PLACEHOLDER  # only the registry fallback's placeholder defines it
    except (AttributeError, ImportError):
        placeholder = False
    ops = "pure Python, C++ ops not built (registry fallback)" if placeholder else "C++ ops built"
    return f"{detectron2.__version__} at {detectron2.__path__[0]} ({ops})"


def collect_env_info():
    import torch

    rows = [
        ("Python", sys.version.split()[0] + " " + platform.platform()),
        ("detectron2", detectron2_build()),
        ("torch", f"{torch.__version__} (CUDA available: {torch.cuda.is_available()})"),
    ]
    for dist in ("torchvision", "numpy", "fvcore", "pycocotools", "panopticapi-lite", "timm",
                 "opencv-python-headless", "Pillow", "scipy", "imagecorruptions-imaug", "scikit-image", "numba",
                 "onnx", "onnxscript", "onnxruntime"):
        rows.append((dist, _version(dist)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


if __name__ == "__main__":
    print(collect_env_info())
