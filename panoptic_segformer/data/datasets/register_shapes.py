"""Detectron2 glue for the synthetic ``shapes`` panoptic dataset (see :mod:`.shapes`).

Registered names (by :func:`register_all_shapes`, which the package calls on import):

=============================  ======  ======  ====
name                           images  pixels  seed
=============================  ======  ======  ====
``shapes_panoptic_train``      500     256     0
``shapes_panoptic_val``        100     256     1
``shapes_panoptic_heldout``    50      256     2
``shapes_panoptic_train_tiny`` 8       128     0
``shapes_panoptic_val_tiny``   8       128     1
=============================  ======  ======  ====

Registration is cheap: the images are generated on the first ``DatasetCatalog.get(name)`` (and
reused from the cache afterwards), then loaded with Detectron2's ``load_coco_panoptic_json``.
Metadata follows Detectron2's "standard" panoptic convention (as ``coco_panoptic_standard``):
contiguous ids over all categories in order, ``thing_classes``/``stuff_classes`` both list every
name, things in ``thing_dataset_id_to_contiguous_id``, stuff in
``stuff_dataset_id_to_contiguous_id``.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json

from .instances_json import panoptic_to_instances_json
from .shapes import (
    SHAPES_CATEGORIES,
    generate_shapes_panoptic,
    shapes_dataset_dir,
    shapes_split_paths,
)

__all__ = ["shapes_metadata", "register_shapes_panoptic", "register_all_shapes", "SHAPES_SPLITS"]

#: name -> (split, num_images, image_size, seed) of the built-in registrations.
SHAPES_SPLITS: Dict[str, tuple] = {
    "shapes_panoptic_train": ("train", 500, 256, 0),
    "shapes_panoptic_val": ("val", 100, 256, 1),
    # Held out from training and validation: post-processor thresholds are chosen on it
    # (projects/benchmarks/compare_postprocessors.py), so the validation score stays unbiased.
    "shapes_panoptic_heldout": ("heldout", 50, 256, 2),
    "shapes_panoptic_train_tiny": ("train", 8, 128, 0),
    "shapes_panoptic_val_tiny": ("val", 8, 128, 1),
}


def shapes_metadata() -> Dict:
    """Standard panoptic metadata of the shapes categories (contiguous id = index in the list)."""
    names = [c["name"] for c in SHAPES_CATEGORIES]
    colors = [list(c["color"]) for c in SHAPES_CATEGORIES]
    return {
        "thing_classes": list(names),
        "thing_colors": [list(c) for c in colors],
        "stuff_classes": list(names),
        "stuff_colors": [list(c) for c in colors],
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(SHAPES_CATEGORIES) if c["isthing"]
        },
        "stuff_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(SHAPES_CATEGORIES) if not c["isthing"]
        },
    }


def register_shapes_panoptic(
    name: str,
    split: str,
    num_images: int,
    image_size: Union[int, Sequence[int]],
    seed: int,
    root: Optional[str] = None,
) -> str:
    """Register ``name`` as a shapes split generated on first use; returns ``name``.

    Args:
        name: Detectron2 dataset name.
        split: split folder name (part of the per-image seed), e.g. ``"train"``.
        num_images, image_size, seed: see :func:`.shapes.generate_shapes_panoptic`.
        root: base folder; default :func:`.shapes.default_shapes_root` (read now, at
            registration). Data goes to ``shapes_dataset_dir(num_images, image_size, seed, root)``.

    Registering a name again with the same parameters is a no-op; with different parameters (for
    example another ``root``) the old registration and metadata are replaced.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    data_root = shapes_dataset_dir(num_images, image_size, seed, root)  # validates the arguments
    paths = shapes_split_paths(data_root, split)
    base_meta = shapes_metadata()
    fields = dict(
        base_meta,
        panoptic_root=paths["panoptic_root"],
        panoptic_json=paths["panoptic_json"],
        image_root=paths["image_root"],
        evaluator_type="coco_panoptic_seg",
        ignore_label=255,
        label_divisor=1000,
        # instances JSON (for COCOEvaluator's mask AP), derived from the panoptic one on load
        json_file=os.path.join(paths["split_dir"], "instances.json"),
    )

    if name in DatasetCatalog.list():
        current = MetadataCatalog.get(name).as_dict()
        if all(k in current and current[k] == v for k, v in fields.items()):
            return name  # already registered identically
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)

    def _load() -> List[Dict]:
        generate_shapes_panoptic(data_root, split, num_images, image_size, seed)
        panoptic_to_instances_json(paths["panoptic_json"], paths["panoptic_root"], fields["json_file"])
        return load_coco_panoptic_json(
            paths["panoptic_json"], paths["image_root"], paths["panoptic_root"], base_meta
        )

    DatasetCatalog.register(name, _load)
    MetadataCatalog.get(name).set(**fields)
    return name


def register_all_shapes(root: Optional[str] = None) -> List[str]:
    """Register the built-in shapes splits (see the module docstring); returns their names."""
    return [
        register_shapes_panoptic(name, split, n, size, seed, root=root)
        for name, (split, n, size, seed) in SHAPES_SPLITS.items()
    ]
