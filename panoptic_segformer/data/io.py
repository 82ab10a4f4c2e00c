"""Reading dataset files: images and COCO panoptic PNGs, with errors that name the file (:class:`DatasetError`).

Used by dataset registration (``datasets/``), the dataset mapper, evaluation and the demo. A COCO panoptic
PNG encodes segment ids as ``id = R + 256 G + 256^2 B``; id 0 is void.
"""
import os

import numpy as np
from detectron2.data import detection_utils as utils
from PIL import Image, ImageOps

__all__ = ["DatasetError", "read_image_rgb", "read_panoptic_png", "check_segments"]


class DatasetError(ValueError):
    """Bad input data; the message names the file and the problem."""


def read_image_rgb(file_name, image_format="RGB", min_size=32):
    """Read an image file as an (H, W, 3) uint8 array in `image_format` ("RGB" or "BGR").

    Grayscale, palette, RGBA, CMYK and 16-bit images are converted to RGB (16-bit values are
    rescaled to 8 bits). Raises DatasetError naming the file if it is missing, unreadable,
    truncated or smaller than `min_size` pixels on either side.
    """
    if not os.path.isfile(file_name):
        raise DatasetError(f"{file_name}: image file does not exist")
    try:
        with Image.open(file_name) as pil:
            pil.load()
            if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(pil, dtype=np.float64)
                scale = 255.0 / 65535.0 if arr.max() > 255 else 1.0
                pil = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8))
            pil = ImageOps.exif_transpose(pil)
            image = utils.convert_PIL_to_numpy(pil, image_format)
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{file_name}: cannot read image ({type(e).__name__}: {e})") from e
    if image.ndim != 3 or image.shape[2] != 3:
        raise DatasetError(f"{file_name}: expected a 3-channel image after conversion, got {image.shape}")
    if min(image.shape[:2]) < min_size:
        raise DatasetError(
            f"{file_name}: image is {image.shape[1]}x{image.shape[0]} px, smaller than the minimum "
            f"{min_size} px (INPUT.MIN_IMAGE_SIZE)"
        )
    return image


def read_panoptic_png(file_name):
    """Read a COCO panoptic PNG as an (H, W) int64 segment-id map (id = R + 256 G + 256^2 B)."""
    if not os.path.isfile(file_name):
        raise DatasetError(f"{file_name}: panoptic PNG does not exist")
    try:
        with Image.open(file_name) as pil:
            rgb = np.asarray(pil.convert("RGB"), dtype=np.int64)
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{file_name}: cannot read panoptic PNG ({type(e).__name__}: {e})") from e
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def check_segments(pan_seg, segments_info, png_file):
    """JSON segments and PNG ids must agree (0 is void)."""
    png_ids = set(np.unique(pan_seg).tolist()) - {0}
    json_ids = [s["id"] for s in segments_info]
    if len(set(json_ids)) != len(json_ids):
        raise DatasetError(f"{png_file}: duplicate segment ids in the JSON: {sorted(json_ids)}")
    missing_in_png = sorted(set(json_ids) - png_ids)
    if missing_in_png:
        raise DatasetError(f"{png_file}: JSON segment id(s) {missing_in_png} absent from the PNG")
    missing_in_json = sorted(png_ids - set(json_ids))
    if missing_in_json:
        raise DatasetError(f"{png_file}: PNG segment id(s) {missing_in_json} absent from the JSON")
