"""The multi-scale contract: one description of the flattened feature levels (paper Sec. 3.1-3.2).

The channel-mapped backbone levels C'_3, C'_4, C'_5 (plus any extra stride-2 levels) are flattened
row-major and concatenated level-major into ``S = sum_l H_l W_l`` tokens, as Deformable DETR [12] does.
Every module that reads such tokens -- :class:`~.ms_deform_attn.MSDeformAttn`, the transformer encoder
(Sec. 3.2), the location decoder (Sec. 3.3.2), the mask decoders and their attention-map mask heads
(Sec. 3.3.3, Eq. 1-2) -- takes this ONE argument, a :class:`LevelLayout`, instead of loose level tensors.

A layout is built once per batch from the per-level padding masks (:meth:`LevelLayout.from_padding_masks`)
using only tensor *shapes*: the level sizes are Python ints, so no module ever reads level metadata back
from the device (no host-device sync), and it is validated once, when it is built. Under ``torch.export``
with a dynamic image size the shapes are symbolic (``torch.SymInt``): the sizes stay symbolic (never
``int(...)``, which would specialise the export to one image size), so the exported graph computes every
level's size, start offset and token count from the input's height and width.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["LevelLayout", "as_level_sizes", "check_sampling_shapes", "get_valid_ratio", "level_start_offsets"]


def level_start_offsets(sizes: Sequence[Sequence[int]]) -> List[int]:
    """Start offset of each level in the flattened tokens: ``[0, H_1 W_1, H_1 W_1 + H_2 W_2, ...]``."""
    starts = [0]
    for h, w in list(sizes)[:-1]:
        starts.append(starts[-1] + h * w)
    return starts


def get_valid_ratio(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Fraction of a padded map covered by the image, as Deformable DETR [12].

    Args:
        mask: (N, H, W) bool, True at padding (the image occupies the top-left corner).

    Returns:
        (N, 2) as (w_ratio, h_ratio) = (valid width / W, valid height / H).
    """
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape (N, H, W), got {mask.dtype} {tuple(mask.shape)}")
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.to(dtype) / w, valid_h.to(dtype) / h], -1)


def _is_size(v) -> bool:
    """A positive Python int, or a symbolic size (``torch.SymInt`` under ``torch.export``)."""
    return isinstance(v, torch.SymInt) or (isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0)


def _as_size(v):
    """``v`` as a Python int; a ``torch.SymInt`` stays symbolic (``int()`` would specialise an export)."""
    return v if isinstance(v, torch.SymInt) else int(v)


def _shape_size(v):
    """One entry of a tensor's shape: an int, a ``torch.SymInt`` (``torch.export``) or, under
    ``torch.jit.trace`` (fvcore's FLOP count), a 0-dim tensor, read as an int as the tracer does."""
    return int(v) if isinstance(v, Tensor) else v


def as_level_sizes(sizes) -> Tuple[Tuple[int, int], ...]:
    """``sizes`` as a tuple of positive Python ``(H, W)`` int pairs (symbolic ``torch.SymInt`` sizes of
    ``torch.export`` are kept as they are); ValueError otherwise (no tensors)."""
    try:
        pairs = [tuple(pair) for pair in sizes]
    except TypeError:
        pairs = None
    if not pairs or any(len(p) != 2 or not all(_is_size(v) for v in p) for p in pairs):
        raise ValueError(f"level sizes must be a non-empty sequence of positive (H, W) integer pairs, got {sizes!r}")
    return tuple((_as_size(h), _as_size(w)) for h, w in pairs)


def _index_tensor(values, device) -> Tensor:
    """int64 tensor of ``values`` (sizes, or a list of size pairs) on ``device``. From Python ints it is
    built on the host and copied without blocking (from pageable memory the copy is staged at once: no
    host-device sync); with symbolic sizes (``torch.export``) it is stacked from scalar tensors, so the
    exported graph computes it from the input's shape (``torch.as_tensor`` would specialise it)."""
    def flat(v):
        return [x for item in v for x in flat(item)] if isinstance(v, (tuple, list)) else [v]

    def stacked(v):
        if isinstance(v, (tuple, list)):
            return torch.stack([stacked(item) for item in v])
        return torch.scalar_tensor(v, dtype=torch.long, device=device)

    if any(isinstance(v, torch.SymInt) for v in flat(values)):
        return stacked(values)
    return torch.as_tensor(values, dtype=torch.long).to(device, non_blocking=True)


def check_sampling_shapes(N: int, M: int, L: int, sampling_locations: Tensor, attention_weights: Tensor):
    """Shape checks of deformable-attention sampling inputs over L levels ([12], Eq. 3), shared by the
    PyTorch core and the Triton kernel.

    Raises ValueError naming the argument unless sampling_locations is floating (N, Q, M, L, P, 2) and
    attention_weights floating (N, Q, M, L, P); returns (Q, P).
    """
    loc, weights = sampling_locations, attention_weights
    if loc.dim() != 6 or (loc.shape[0], loc.shape[2], loc.shape[3], loc.shape[5]) != (N, M, L, 2) \
            or not loc.is_floating_point():
        raise ValueError(f"sampling_locations must be a floating (N, Q, M, L, P, 2) = ({N}, Q, {M}, {L}, P, 2) "
                         f"tensor, got {loc.dtype} {tuple(loc.shape)}")
    Q, P = loc.shape[1], loc.shape[4]
    if tuple(weights.shape) != (N, Q, M, L, P) or not weights.is_floating_point():
        raise ValueError(f"attention_weights must be a floating (N, Q, M, L, P) = {(N, Q, M, L, P)} tensor, "
                         f"got {weights.dtype} {tuple(weights.shape)}")
    return Q, P


@dataclass(frozen=True, eq=False)
class LevelLayout:
    """Level metadata of a padded batch of flattened multi-scale tokens (validated once, immutable).

    Attributes:
        sizes: ``((H_1, W_1), ..., (H_L, W_L))`` as Python ints.
        spatial_shapes: (L, 2) int64 on the tokens' device, the same sizes (for device kernels).
        level_start_index: (L,) int64 on the tokens' device, :attr:`starts`.
        padding_mask: (N, S) bool, True at padding tokens.
        valid_ratios: (N, L, 2) float, (w, h) fraction of each level covered by each image.
    """

    sizes: Tuple[Tuple[int, int], ...]
    spatial_shapes: Tensor
    level_start_index: Tensor
    padding_mask: Tensor
    valid_ratios: Tensor

    def __post_init__(self):
        object.__setattr__(self, "sizes", as_level_sizes(self.sizes))
        num_levels, s = len(self.sizes), self.num_tokens
        for name, shape in (("spatial_shapes", (num_levels, 2)), ("level_start_index", (num_levels,))):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.is_floating_point() or t.dtype == torch.bool:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"LevelLayout.{name} must be an integer tensor of shape {shape}, got {got}")
        pad = self.padding_mask
        if not isinstance(pad, Tensor) or pad.dtype != torch.bool or pad.dim() != 2 or pad.shape[1] != s:
            got = f"{pad.dtype} {tuple(pad.shape)}" if isinstance(pad, Tensor) else type(pad).__name__
            raise ValueError(f"LevelLayout.padding_mask must be bool (N, S={s}) for sizes {list(self.sizes)}, got {got}")
        ratios = self.valid_ratios
        if not isinstance(ratios, Tensor) or tuple(ratios.shape) != (pad.shape[0], num_levels, 2):
            got = tuple(ratios.shape) if isinstance(ratios, Tensor) else type(ratios).__name__
            raise ValueError(f"LevelLayout.valid_ratios must be (N, L, 2) = {(pad.shape[0], num_levels, 2)}, got {got}")

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_padding_masks(cls, masks: Sequence[Tensor], dtype: torch.dtype = torch.float32) -> "LevelLayout":
        """The layout of L levels given their padding masks (N, H_l, W_l) bool, True at padding.

        Sizes come from the masks' shapes; the (L, 2) / (L,) index tensors are copied to the masks'
        device without blocking (from pageable host memory the copy is staged at once), so building a
        layout makes no host-device sync. ``valid_ratios`` are in ``dtype``.
        """
        if not masks:
            raise ValueError("LevelLayout.from_padding_masks needs at least one level mask")
        n = masks[0].shape[0]
        for lvl, m in enumerate(masks):
            if not isinstance(m, Tensor) or m.dim() != 3 or m.dtype != torch.bool or m.shape[0] != n:
                got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, Tensor) else type(m).__name__
                raise ValueError(f"level mask {lvl} must be a bool tensor (N={n}, H, W), got {got}")
        sizes = as_level_sizes(tuple(map(_shape_size, m.shape[1:])) for m in masks)
        device = masks[0].device
        return cls(
            sizes=sizes,
            spatial_shapes=_index_tensor(sizes, device),
            level_start_index=_index_tensor(level_start_offsets(sizes), device),
            padding_mask=torch.cat([m.flatten(1) for m in masks], 1),
            valid_ratios=torch.stack([get_valid_ratio(m, dtype) for m in masks], 1),
        )

    @classmethod
    def from_sizes(cls, sizes: Sequence[Sequence[int]], batch_size: int, device=None,
                   dtype: torch.dtype = torch.float32) -> "LevelLayout":
        """The layout of an unpadded batch of ``batch_size`` maps of the given (H_l, W_l) sizes."""
        sizes = as_level_sizes(sizes)
        return cls.from_padding_masks(
            [torch.zeros((batch_size, h, w), dtype=torch.bool, device=device) for h, w in sizes], dtype)

    # ------------------------------------------------------------------------------------ queries
    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        """S, the number of tokens over all levels."""
        return sum(h * w for h, w in self.sizes)

    @property
    def starts(self) -> Tuple[int, ...]:
        """Start offset of each level in S (Python ints)."""
        return tuple(level_start_offsets(self.sizes))

    @property
    def batch_size(self) -> int:
        return self.padding_mask.shape[0]

    def first(self, k: int) -> "LevelLayout":
        """The layout of the first ``k`` levels (their tokens are the first ones of S); views, no copy."""
        if not 1 <= k <= self.num_levels:
            raise ValueError(f"LevelLayout.first: k must be in [1, {self.num_levels}], got {k}")
        s_k = sum(h * w for h, w in self.sizes[:k])
        return LevelLayout(self.sizes[:k], self.spatial_shapes[:k], self.level_start_index[:k],
                           self.padding_mask[:, :s_k], self.valid_ratios[:, :k])

    def split(self, t: Tensor, dim: int = 1) -> List[Tensor]:
        """Split ``t`` along its token dimension ``dim`` (of size S) into the L levels' flat tokens."""
        if t.shape[dim] != self.num_tokens:
            raise ValueError(f"cannot split dim {dim} of {tuple(t.shape)} into levels {list(self.sizes)} "
                             f"(S={self.num_tokens})")
        return list(t.split([h * w for h, w in self.sizes], dim=dim))

    def check_tokens(self, tokens: Tensor, name: str = "memory", channels: Optional[int] = None) -> None:
        """Raise ValueError naming ``name`` unless ``tokens`` is (N, S[, C]) for this layout's N and S."""
        n, s = self.batch_size, self.num_tokens
        ok = tokens.dim() in (2, 3) and tuple(tokens.shape[:2]) == (n, s)
        if channels is not None:
            ok = ok and tokens.dim() == 3 and tokens.shape[2] == channels
        if not ok:
            want = f"({n}, {s}" + (f", {channels})" if channels is not None else ", ...)")
            raise ValueError(f"{name} must be {want} for levels {list(self.sizes)}, got {tuple(tokens.shape)}")

    def __repr__(self) -> str:
        return f"LevelLayout(sizes={list(self.sizes)}, batch_size={self.batch_size})"
