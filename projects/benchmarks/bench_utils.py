"""Helpers shared by the benchmark scripts of this folder (model_stats.py, train_memory.py).

Config setup at random initialisation (nothing is downloaded), test inputs from the registered
2-image COCO sample resized as the config's test mapper does, autocast contexts, device syncs, the
machine description and markdown tables.
"""
import contextlib
import copy
import json
import os
import platform
import resource
import tempfile
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_init_cfg(config_file: str, opts: Sequence[str], device: Optional[str] = None, quiet: bool = False):
    """Frozen config of ``config_file`` + ``opts`` (:func:`panoptic_segformer.config.setup_cfg`), at
    random initialisation.

    ``MODEL.WEIGHTS`` (e.g. a ``detectron2://`` ImageNet checkpoint) and ``MODEL.TIMM.PRETRAINED_WEIGHTS``
    are cleared: the benchmarks measure size and speed, which do not depend on the weights, and never
    download anything. ``device`` (if given) overrides ``MODEL.DEVICE``; without it, a CUDA
    ``MODEL.DEVICE`` falls back to the CPU when CUDA is unavailable (with a note unless ``quiet``).
    """
    from panoptic_segformer.config import setup_cfg

    cfg = setup_cfg(config_file, opts, freeze=False)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.TIMM.PRETRAINED_WEIGHTS = ""
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device!r} but CUDA is not available (use --device cpu)")
        cfg.MODEL.DEVICE = device
    elif cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        if not quiet:
            print(f"note: MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but CUDA is not available: using the CPU")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def build_model(cfg, seed: int = 0):
    """The config's model at random initialisation (seeded), on ``cfg.MODEL.DEVICE``."""
    from detectron2.modeling import build_model as d2_build_model

    torch.manual_seed(seed)
    return d2_build_model(cfg)


def load_test_inputs(cfg, num_images: int = 2, dataset: str = "coco_panoptic_sample",
                image_size: Optional[Sequence[int]] = None) -> List[Dict]:
    """Model inputs ({"image" (3, H, W) uint8, "height", "width"}) at the config's test size.

    Default: the first ``num_images`` images of the registered ``dataset`` (the 2 real COCO images of
    the sample), read and resized by the test-mode :class:`PanopticSegFormerDatasetMapper`
    (ResizeShortestEdge to ``INPUT.MIN_SIZE_TEST`` / ``INPUT.MAX_SIZE_TEST``). With ``image_size``
    (H, W): ``num_images`` random images of exactly that size, for synthetic runs.
    """
    if image_size is not None:
        g = torch.Generator().manual_seed(0)
        h, w = image_size
        return [{"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), "height": h,
                 "width": w} for _ in range(num_images)]
    from detectron2.data import DatasetCatalog

    from panoptic_segformer import PanopticSegFormerDatasetMapper

    if dataset not in DatasetCatalog.list():
        raise ValueError(f"--dataset {dataset!r} is not registered (registered: {sorted(DatasetCatalog.list())})")
    dicts = DatasetCatalog.get(dataset)
    if not dicts:
        raise ValueError(f"dataset {dataset!r} is empty")
    if num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images}")
    mapper = PanopticSegFormerDatasetMapper(cfg, is_train=False)
    return [mapper(d) for d in dicts[:num_images]]


def first_images_dataset(name: str, num_images: int) -> str:
    """A registered panoptic dataset of the first ``num_images`` images of ``name``: same metadata, with
    a ground-truth JSON of just those images (in a temporary folder), so that Detectron2's
    COCOPanopticEvaluator scores exactly them. Returns its name, or ``name`` if it has no more images.
    Registered once per process and reused."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    subset = f"{name}_first{num_images}"
    if subset in DatasetCatalog.list():
        return subset
    dicts = DatasetCatalog.get(name)
    if num_images >= len(dicts):
        return name
    meta = MetadataCatalog.get(name)
    if not hasattr(meta, "panoptic_json"):
        raise ValueError(f"dataset {name!r} has no panoptic_json metadata: cannot take its first {num_images} images")
    with open(meta.panoptic_json) as f:
        gt = json.load(f)
    dicts = dicts[:num_images]
    keep = {str(d["image_id"]) for d in dicts}
    gt["images"] = [im for im in gt["images"] if str(im["id"]) in keep]
    gt["annotations"] = [a for a in gt["annotations"] if str(a["image_id"]) in keep]
    path = os.path.join(tempfile.mkdtemp(prefix="psf-subset-"), f"{subset}.json")
    with open(path, "w") as f:
        json.dump(gt, f)
    DatasetCatalog.register(subset, lambda: copy.deepcopy(dicts))
    fields = {k: v for k, v in meta.as_dict().items() if k != "name"}
    fields["panoptic_json"] = path
    MetadataCatalog.get(subset).set(**fields)
    return subset


def autocast(device: torch.device, dtype_name: str):
    """Autocast context for ``dtype_name`` (fp32 / tf32: none), and the TF32 switches on CUDA."""
    if dtype_name not in DTYPES:
        raise ValueError(f"--dtype must be among {sorted(DTYPES)}, got {dtype_name!r}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tf32"
        torch.backends.cudnn.allow_tf32 = dtype_name == "tf32"
    elif dtype_name == "tf32":
        raise ValueError("--dtype tf32 needs a CUDA device (TF32 is a tensor-core mode)")
    if dtype_name in ("fp32", "tf32"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype_name])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> str:
    """One line: device, CPU threads and versions."""
    import detectron2

    if device.type == "cuda":
        dev = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        dev = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return (f"{dev}; torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
            f"detectron2 {detectron2.__version__}; Python {platform.python_version()}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], align: Optional[str] = None) -> str:
    """Markdown table; ``align`` holds one of l/r per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(str(h) for h in header) + " |",
             "| " + " | ".join("---" if a == "l" else "---:" for a in align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def image_size_arg(text: str):
    """argparse ``type`` for ``HxW`` (e.g. ``800x1333``): (H, W) positive ints."""
    import argparse

    try:
        size = tuple(int(v) for v in str(text).lower().split("x"))
        if len(size) == 2 and min(size) > 0:
            return size
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"must be HxW, e.g. 800x1333, got {text!r}")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_json(path: str, report) -> None:
    """Write ``report`` to ``path`` (numpy / torch scalars as numbers) and say so."""
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=json_default)
    print(f"wrote {path}")


def json_default(obj):
    """``json.dump(default=...)`` for numpy / torch scalars."""
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    return str(obj)
