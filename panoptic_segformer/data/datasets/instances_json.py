"""COCO *instances* annotations derived from COCO *panoptic* annotations.

Detectron2's COCOEvaluator (mask AP of the model's top-100 thing results, Table 4) needs an instances
JSON. COCO ships one; datasets that only have panoptic PNG + JSON (the synthetic `shapes`, the
2-image COCO sample) get theirs from this converter: one annotation per thing segment (crowd ones
with ``iscrowd=1``), its mask as COCO RLE, its area and box computed from the PNG.
"""
import json
import os

import numpy as np
from pycocotools import mask as mask_utils

from ..io import DatasetError, read_panoptic_png

__all__ = ["panoptic_to_instances_json"]


def panoptic_to_instances_json(panoptic_json, panoptic_root, output_json):
    """Write `output_json` (COCO instances format, thing categories only) from a panoptic dataset.

    Rewritten only when missing or older than `panoptic_json`. Returns `output_json`.
    """
    if os.path.isfile(output_json) and os.path.getmtime(output_json) >= os.path.getmtime(panoptic_json):
        return output_json
    with open(panoptic_json) as f:
        data = json.load(f)
    things = {c["id"] for c in data["categories"] if c.get("isthing")}
    annotations = []
    for ann in data["annotations"]:
        png = os.path.join(panoptic_root, ann["file_name"])
        ids = read_panoptic_png(png)
        for seg in ann["segments_info"]:
            if seg["category_id"] not in things:
                continue
            mask = ids == seg["id"]
            area = int(mask.sum())
            if area == 0:
                raise DatasetError(f"{png}: JSON segment id {seg['id']} absent from the PNG")
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": ann["image_id"],
                "category_id": seg["category_id"],
                "segmentation": rle,
                "area": area,
                "bbox": [x, y, w, h],
                "iscrowd": int(seg.get("iscrowd", 0)),
            })
    out = {
        "images": data["images"],
        "annotations": annotations,
        "categories": [c for c in data["categories"] if c.get("isthing")],
    }
    os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
    tmp = output_json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, output_json)
    return output_json
