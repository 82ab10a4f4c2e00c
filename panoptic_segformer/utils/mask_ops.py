"""Mask helpers shared by the mapper-side targets and the model's outputs."""
import torch

__all__ = ["masks_to_boxes"]


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of binary masks, vectorized, with Detectron2's convention.

    Args:
        masks: (N, H, W) bool (or 0/1) tensor, on any device.
    Returns:
        (N, 4) float32 boxes (x0, y0, x1, y1) with exclusive x1/y1 (x1 = last column + 1, as
        Detectron2's BitMasks.get_bounding_boxes); all zeros for an empty mask.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (N, H, W), got {tuple(masks.shape)}")
    masks = masks.bool()
    n, h, w = masks.shape
    cols = masks.any(dim=1)  # (N, W)
    rows = masks.any(dim=2)  # (N, H)
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    big = torch.iinfo(torch.int64).max
    x0 = torch.where(cols, xs, big).amin(dim=1) if w else torch.zeros(n, dtype=torch.long)
    x1 = torch.where(cols, xs, -1).amax(dim=1) + 1 if w else torch.zeros(n, dtype=torch.long)
    y0 = torch.where(rows, ys, big).amin(dim=1) if h else torch.zeros(n, dtype=torch.long)
    y1 = torch.where(rows, ys, -1).amax(dim=1) + 1 if h else torch.zeros(n, dtype=torch.long)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    empty = ~cols.any(dim=1) if w else torch.ones(n, dtype=torch.bool, device=masks.device)
    return torch.where(empty[:, None], torch.zeros_like(boxes), boxes)
