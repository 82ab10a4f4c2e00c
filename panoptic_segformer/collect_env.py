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


def detectron2_source():
    """Which Detectron2 is installed: ``"v0.6 registry fallback"``, ``"upstream commit <sha> (<url>)"``,
    ``"upstream from <url>"`` (a source tree without Git), or None when pip recorded no source.

    Read from the installed distribution: the registry fallback's ``_C`` placeholder, and pip's
    ``direct_url.json`` (PEP 610), where pip records the commit it built from a Git source."""
    import json

    from detectron2 import _C

    try:
        if _C.IS_PLACEHOLDER:  # only the registry fallback's placeholder defines it
            return "v0.6 registry fallback"
    except (AttributeError, ImportError):
        pass
    try:
        direct = json.loads(importlib.metadata.distribution("detectron2").read_text("direct_url.json") or "{}")
    except importlib.metadata.PackageNotFoundError:
        return None
    commit = direct.get("vcs_info", {}).get("commit_id")
    if commit:
        return f"upstream commit {commit} ({direct['url']})"
    return f"upstream from {direct['url']}" if direct.get("url") else None


def detectron2_build():
    """Describe the installed Detectron2: version, location, which one (fallback or upstream commit)
    and whether its C++ ops are built."""
    try:
        import detectron2
    except ImportError as e:
        return f"not importable ({e})"
    source = detectron2_source()
    ops = "pure Python, C++ ops not built" if source == "v0.6 registry fallback" else "C++ ops built"
    return f"{detectron2.__version__} at {detectron2.__path__[0]} ({source or 'source not recorded'}; {ops})"


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
