"""Mask helpers shared by the mapper-side targets and the model's outputs."""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["ScratchBuffers", "image_cells", "masks_to_boxes", "resize_masks_to_image", "upsample_masks_to_image"]


class ScratchBuffers:
    """Named output buffers reused across the iterations of a loop that makes same-sized large temporaries
    (the query chunks of full-resolution post-processing).

    On the CPU a fresh tensor of more than 32 MiB is a fresh ``mmap`` whose first write page-faults on
    every 4 KiB page: measured here, a sigmoid of 31 masks of 800x1333 (132 MB) took 0.28 s into a fresh
    tensor and 0.08 s into a reused one. ``get`` returns a view of the buffer ``name`` (grown when a
    larger one is asked for), so what it returned before is overwritten: use each result before the
    next ``get`` of the same name.
    """

    def __init__(self):
        self._buffers: Dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        """A (uninitialised) tensor of ``shape`` with ``like``'s dtype and device, a view of buffer ``name``."""
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            self._buffers.pop(name, None)  # free the old one first
            buf = self._buffers[name] = like.new_empty(numel)
        return buf[:numel].view(shape)


def _bilinear(masks: torch.Tensor, size, buffers: Optional[ScratchBuffers], name: str) -> torch.Tensor:
    """``F.interpolate(masks[None], size, mode="bilinear", align_corners=False)[0]`` for (Q, h, w) masks,
    written into ``buffers``' buffer ``name`` when given (the same kernel with the same arguments:
    bit-identical)."""
    size = [int(s) for s in size]
    if buffers is None:
        return F.interpolate(masks[None], size=size, mode="bilinear", align_corners=False)[0]
    out = buffers.get(name, (1, masks.shape[0], *size), masks)
    return torch.ops.aten.upsample_bilinear2d.out(masks[None], size, False, None, None, out=out)[0]


def image_cells(masks: torch.Tensor, image_size: Tuple[int, int], stride: int) -> torch.Tensor:
    """The cells of a (Q, h, w) map at ``1/stride`` of the padded input that cover one image.

    The map's grid is aligned with the padded input's top-left corner, cell (i, j) covering input
    pixels ``[stride*i, stride*(i+1)) x [stride*j, stride*(j+1))``; an image of H x W pixels is
    covered by its first ``ceil(H / stride) x ceil(W / stride)`` cells (all of them without
    padding: a stride-2 convolution with "same" padding outputs ``ceil(size / 2)``).
    Returns a view (Q, ceil(H / stride), ceil(W / stride)); raises ValueError if the map is smaller.
    """
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
    stride = int(stride)
    vh, vw = -(-int(image_size[0]) // stride), -(-int(image_size[1]) // stride)
    if vh > masks.shape[-2] or vw > masks.shape[-1]:
        raise ValueError(f"a {tuple(masks.shape[-2:])} map at 1/{stride} cannot cover an image of "
                         f"{tuple(image_size)} pixels (needs {vh}x{vw} cells)")
    return masks[..., :vh, :vw]


def upsample_masks_to_image(masks: torch.Tensor, image_size: Tuple[int, int], stride: int,
                            output_size: Tuple[int, int], buffers: Optional[ScratchBuffers] = None) -> torch.Tensor:
    """(Q, h, w) masks at ``1/stride`` of the padded input -> (Q, H_out, W_out), Detectron2's way.

    Only the image's own cells (:func:`image_cells`) are upsampled by ``stride`` (bilinear,
    ``align_corners=False``) to the input resolution, so neither padding nor a larger batch partner
    leaks into the image's border; the result is then cropped to the image's ``image_size`` pixels and
    resized to ``output_size`` as Detectron2's ``sem_seg_postprocess`` does (bit-identical to it,
    tests/test_model.py).
    Right for any ``INPUT.SIZE_DIVISIBILITY``: the geometry comes from ``stride``, not from the
    ratio of the padded size to the map size. With ``buffers`` (:class:`ScratchBuffers`) the result is
    written into its buffers (a view of them; the same values).
    """
    cells = image_cells(masks, image_size, stride)
    vh, vw = cells.shape[-2:]
    up = _bilinear(cells, (vh * stride, vw * stride), buffers, "upsampled")
    crop = up[:, : int(image_size[0]), : int(image_size[1])]
    if tuple(int(s) for s in output_size) == tuple(int(s) for s in image_size):
        # sem_seg_postprocess would crop, then resize to the same size: a bilinear resize by a factor
        # of exactly 1 samples every pixel at its own centre (weights 1 and 0), an identity that costs a
        # full-resolution pass. The crop alone gives the same values (a view; tests/test_model.py).
        return crop
    return _bilinear(crop, output_size, buffers, "resized")  # sem_seg_postprocess's crop + resize


def resize_masks_to_image(masks: torch.Tensor, image_size: Tuple[int, int], stride: int,
                          output_size: Tuple[int, int], buffers: Optional[ScratchBuffers] = None) -> torch.Tensor:
    """(Q, h, w) masks at ``1/stride`` of the padded input -> (Q, H_out, W_out), the official code's way.

    The image's own cells (:func:`image_cells`; without padding, the whole map) are resized in ONE
    bilinear step (``align_corners=False``) straight to ``output_size``, as the official head's
    ``F.interpolate(mask_pred, size=ori_shape[:2], mode='bilinear')`` (zhiqi-li/Panoptic-SegFormer,
    ``easymd/models/panformer/panformer_head.py``, ``get_bboxes``). Unlike
    :func:`upsample_masks_to_image`, the map's last cells are stretched over the image when its size
    is not a multiple of ``stride`` (the official geometry). ``buffers``: as in
    :func:`upsample_masks_to_image`.
    """
    return _bilinear(image_cells(masks, image_size, stride), output_size, buffers, "resized")


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
