"""Small shared helpers."""
from .mask_ops import ScratchBuffers, image_cells, masks_to_boxes, resize_masks_to_image, upsample_masks_to_image

__all__ = ["ScratchBuffers", "image_cells", "masks_to_boxes", "resize_masks_to_image", "upsample_masks_to_image"]
