"""Small shared helpers."""
from .mask_ops import masks_to_boxes

__all__ = ["masks_to_boxes"]
