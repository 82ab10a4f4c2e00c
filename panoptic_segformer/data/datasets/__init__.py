"""Datasets: COCO panoptic, ADE20K panoptic, the 2-image COCO sample and the synthetic shapes set."""
from .builtin import (
    coco_sample_root,
    load_panoptic_json_checked,
    panoptic_metadata,
    register_all,
    register_panoptic_dataset,
)
