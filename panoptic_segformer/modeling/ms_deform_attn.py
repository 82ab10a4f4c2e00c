"""Multi-scale deformable attention (Deformable DETR [12]), used by the transformer encoder
(paper Sec. 3.2) and the location decoder (Sec. 3.3.2) of Panoptic SegFormer.

For a query ``q`` with reference point ``p_q`` (normalized to ``[0, 1]``), head ``m``, level ``l`` and
sampling point ``k``, multi-scale deformable attention computes ([12], Eq. 3)::

    MSDeformAttn(z_q, p_q, {x^l}) = sum_m W_m [ sum_l sum_k A_mlqk * W'_m x^l(phi_l(p_q) + Δp_mlqk) ]

where ``x^l(.)`` is bilinear sampling of level ``l`` and the attention weights ``A_mlqk`` are normalized
(softmax) over all ``L * K`` points of a head.

``ms_deform_attn_core`` is the pure-PyTorch implementation of the sampling + weighted sum (one weighted
gather over all levels; written with ``grid_sample`` per level while ``torch.export`` traces, for ONNX)
(everything inside the brackets except ``W'_m``); ``MSDeformAttn`` is the full module with its
projections. ``ms_deform_attn`` dispatches between the core and the fused Triton kernel of
:mod:`.ms_deform_attn_triton` (same semantics). The implementation is chosen per module
(``MSDeformAttn(impl=...)``, set from ``MODEL.PANOPTIC_SEGFORMER.MSDA_IMPL``): ``"auto"`` (Triton on
CUDA tensors when it is installed, the core otherwise), ``"pytorch"`` or ``"triton"``.
The level metadata of the tokens travels as one :class:`~.levels.LevelLayout`.
"""

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ms_deform_attn_triton as triton_kernels
from .levels import LevelLayout, as_level_sizes, check_sampling_shapes

__all__ = [
    "MSDA_IMPLS",
    "ms_deform_attn_core",
    "ms_deform_attn_grid_sample",
    "ms_deform_attn",
    "resolve_ms_deform_attn_impl",
    "MSDeformAttn",
]

MSDA_IMPLS = ("auto", "pytorch", "triton")


def ms_deform_attn_core(
    value: Tensor,
    sizes: Sequence[Tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Sample every level bilinearly at the given locations and sum with attention weights ([12], Eq. 3).

    Pure PyTorch, differentiable w.r.t. ``value``, ``sampling_locations`` and ``attention_weights``; runs on
    any device and float dtype. Sampling follows ``align_corners=False``: the centre of column ``j`` of a
    level of width ``W`` is at ``x = (j + 0.5) / W`` (rows likewise); points falling (partly) outside a map
    read zeros there.

    All levels are sampled at once as one weighted gather (:func:`_ms_deform_attn_gather`): each
    (query, head) sums ``L * P * 4`` bilinear corners, each weighted by its bilinear weight times the
    point's attention weight, in one ``F.embedding_bag`` over a zero-bordered table of all levels' values.
    While ``torch.export`` traces the model (ONNX export, :mod:`panoptic_segformer.deploy`), the same sum
    is written with one ``F.grid_sample`` per level (:func:`ms_deform_attn_grid_sample`), because ONNX has
    a ``GridSample`` operator and no weighted bag sum (``embedding_bag`` exports as a loop over bags). Both
    compute the same function (equal in float64, outputs and gradients: tests/test_ms_deform_attn.py).

    Args:
        value: (N, S, M, D) per-head values of all levels flattened row-major and concatenated,
            ``S = sum_l H_l * W_l``.
        sizes: the L Python ``(H_l, W_l)`` pairs (``LevelLayout.sizes``).
        sampling_locations: (N, Q, M, L, P, 2) normalized (x, y) in [0, 1] (values outside allowed).
        attention_weights: (N, Q, M, L, P).

    Returns:
        (N, Q, M * D) in ``value.dtype``, heads concatenated head-major (head ``m`` occupies channels
        ``m*D:(m+1)*D``).
    """
    if torch.compiler.is_exporting():
        return ms_deform_attn_grid_sample(value, sizes, sampling_locations, attention_weights)
    sizes = _checked_sizes(value, sizes, sampling_locations, attention_weights)
    return _ms_deform_attn_gather(value, sizes, sampling_locations, attention_weights)


def _checked_sizes(value: Tensor, sizes, sampling_locations: Tensor, attention_weights: Tensor):
    """The level sizes as Python pairs (:func:`~.levels.as_level_sizes`) after checking the shapes of
    both formulations' inputs; ValueError naming the argument otherwise."""
    if value.dim() != 4 or not value.is_floating_point():
        raise ValueError(f"value must be a floating point (N, S, M, D) tensor, got {value.dtype} {tuple(value.shape)}")
    sizes = as_level_sizes(sizes)
    N, S, M, D = value.shape
    if sum(h * w for h, w in sizes) != S:
        raise ValueError(f"value has S={S} tokens (shape {tuple(value.shape)}) but level sizes {list(sizes)} "
                         f"sum to {sum(h * w for h, w in sizes)}")
    check_sampling_shapes(N, M, len(sizes), sampling_locations, attention_weights)
    return sizes


def _ms_deform_attn_gather(value: Tensor, sizes: Tuple[Tuple[int, int], ...], sampling_locations: Tensor,
                           attention_weights: Tensor) -> Tensor:
    """:func:`ms_deform_attn_core` as one weighted gather over all levels (inputs already checked).

    Each level is copied into a table with one zero row and column before it and two after, so that every
    corner of every (clamped) point has a row to read and no validity mask is needed: a pixel coordinate
    ``x = loc_x * W - 0.5`` clamped to ``[-1, W]`` has corners ``floor(x)`` and ``floor(x) + 1`` in
    ``[-1, W + 1]``, and clamping moves only points whose corners all read zeros (their gradient is zero
    either way, as with ``grid_sample``; an infinite location reads zeros, a NaN one gives NaN).
    Coordinates and bilinear weights are computed in float32 at least (float64 for float64 values), then
    the weights are cast to ``value.dtype``.
    """
    N, S, M, D = value.shape
    Q, P = sampling_locations.shape[1], sampling_locations.shape[4]
    L = len(sizes)
    device = value.device
    coord_dtype = torch.promote_types(value.dtype, torch.float32)
    padded = [(h + 3) * (w + 3) for h, w in sizes]
    rows = sum(padded)
    # (N, M, rows, D): per image and head, the zero-bordered levels one after the other
    table = value.new_zeros(N, M, rows, D)
    starts, start = [], 0
    for (h, w), value_l, size_l in zip(sizes, value.split([h * w for h, w in sizes], dim=1), padded):
        starts.append(start)
        table[:, :, start:start + size_l].view(N, M, h + 3, w + 3, D)[:, :, 1:h + 1, 1:w + 1] = \
            value_l.view(N, h, w, M, D).permute(0, 3, 1, 2, 4)
        start += size_l
    index_dtype = torch.int32 if N * M * rows < 2 ** 31 else torch.int64
    level_wh = torch.tensor([[w, h] for h, w in sizes], dtype=coord_dtype, device=device)[:, None]  # (L, 1, 2)
    xy = (sampling_locations.to(coord_dtype) * level_wh - 0.5).clamp_(min=-1.0)
    xy = torch.minimum(xy, level_wh)  # (N, Q, M, L, P, 2) pixel coordinates in [-1, W] x [-1, H]
    xy0 = xy.floor()
    frac = xy - xy0
    xy0 = xy0.to(index_dtype)
    row_len = torch.tensor([w + 3 for _, w in sizes], dtype=index_dtype, device=device)  # (L,)
    level_base = torch.tensor(starts, dtype=index_dtype, device=device) + row_len + 1  # the (0, 0) pixel
    head_base = (torch.arange(N * M, dtype=index_dtype, device=device) * rows).view(N, 1, M, 1, 1)
    top_left = xy0[..., 1] * row_len[:, None] + xy0[..., 0] + (level_base[:, None] + head_base)  # (N, Q, M, L, P)
    corners = torch.stack([torch.zeros_like(row_len), torch.ones_like(row_len), row_len, row_len + 1], -1)
    index = top_left[..., None] + corners[:, None]  # (N, Q, M, L, P, 4): corners (y0,x0) (y0,x1) (y1,x0) (y1,x1)
    index.clamp_(0, N * M * rows - 1)  # only a NaN location leaves the table; its NaN weights propagate
    fx, fy = frac.unbind(-1)
    attention_weights = attention_weights.to(coord_dtype)
    below = attention_weights * fy  # attention times the bilinear row weights
    above = attention_weights - below
    above_right, below_right = above * fx, below * fx
    weights = torch.stack([above - above_right, above_right, below - below_right, below_right], -1)
    out = F.embedding_bag(index.view(N * Q * M, L * P * 4), table.view(N * M * rows, D),
                          per_sample_weights=weights.to(value.dtype).view(N * Q * M, L * P * 4), mode="sum")
    return out.view(N, Q, M * D)


def ms_deform_attn_grid_sample(value: Tensor, sizes: Sequence[Tuple[int, int]], sampling_locations: Tensor,
                               attention_weights: Tensor) -> Tensor:
    """:func:`ms_deform_attn_core` written with one ``F.grid_sample`` per level: the formulation ONNX can
    express (its ``GridSample`` operator), used while ``torch.export`` traces; same arguments and result.

    Sampling locations and attention weights are cast to ``value.dtype``.
    """
    sizes = _checked_sizes(value, sizes, sampling_locations, attention_weights)
    N, S, M, D = value.shape
    Q, P = sampling_locations.shape[1], sampling_locations.shape[4]
    sampling_locations = sampling_locations.to(value.dtype)
    attention_weights = attention_weights.to(value.dtype)

    # grid_sample wants coordinates in [-1, 1]; with align_corners=False, -1/1 are the outer map edges.
    grids = (2 * sampling_locations - 1).transpose(1, 2)  # (N, M, Q, L, P, 2)
    weights = attention_weights.transpose(1, 2)  # (N, M, Q, L, P)
    output = None
    for lvl, (value_l, (h, w)) in enumerate(zip(value.split([h * w for h, w in sizes], dim=1), sizes)):
        # (N, H*W, M, D) -> (N*M, D, H, W); contiguous: PyTorch's CPU grid_sample returns NaN for some
        # bf16 inputs in the strided layout (seen with torch 2.11 and 2.14)
        value_l = value_l.permute(0, 2, 3, 1).reshape(N * M, D, h, w).contiguous()
        # All Q*P points of a head as ONE row of the output grid (same values and memory layout as a
        # (Q, P) grid): (N*M, D, 1, Q*P) viewed as (N*M, D, Q, P).
        grid_l = grids[:, :, :, lvl].reshape(N * M, 1, Q * P, 2)
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                align_corners=False).view(N * M, D, Q, P)
        weights_l = weights[:, :, :, lvl].reshape(N * M, 1, Q, P)
        # Weighted sum over the levels accumulated in place (no stack of all levels' samples).
        output = sampled * weights_l if output is None else output.addcmul_(sampled, weights_l)
    return output.sum(-1).view(N, M * D, Q).transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------
# Dispatch between the pure-PyTorch core and the Triton kernel
# ---------------------------------------------------------------------------------------------------
def check_impl_name(impl: str, source: str = "impl") -> str:
    """``impl`` normalised to one of :data:`MSDA_IMPLS`; ValueError naming ``source`` otherwise."""
    name = impl.strip().lower() if isinstance(impl, str) else impl
    if name not in MSDA_IMPLS:
        raise ValueError(f"{source} must be one of {MSDA_IMPLS}, got {impl!r}")
    return name


def resolve_ms_deform_attn_impl(value: Tensor, impl: str = "auto") -> str:
    """Which implementation (``"pytorch"`` or ``"triton"``) runs for ``value`` when ``impl`` is requested.

    ``"auto"``: Triton for CUDA tensors of a dtype the kernel takes when Triton is installed, PyTorch
    otherwise. Only metadata of ``value`` (N, S, M, D) is read.

    Raises:
        RuntimeError: ``"triton"`` is forced but Triton is missing, or ``value`` is on the CPU and
            Triton's interpreter is off (``TRITON_INTERPRET=1`` must be set before triton is imported).
        ValueError: an unknown ``impl``, or ``"triton"`` forced with a dtype the kernel does not take.
    """
    requested = check_impl_name(impl)
    if requested == "pytorch":
        return "pytorch"
    usable = triton_kernels.triton_available() and value.dtype in triton_kernels.SUPPORTED_VALUE_DTYPES
    if requested == "auto":
        return "triton" if value.is_cuda and usable else "pytorch"
    if not triton_kernels.triton_available():
        raise RuntimeError(f"ms_deform_attn implementation 'triton' was forced but Triton is unavailable "
                           f"({triton_kernels.TRITON_IMPORT_ERROR})")
    if not value.is_cuda and not triton_kernels.triton_interpreter_mode():
        raise RuntimeError(
            f"ms_deform_attn implementation 'triton' was forced for tensors on {value.device}: the Triton "
            "kernel runs on CUDA tensors, or on CPU tensors only in Triton's interpreter mode "
            "(TRITON_INTERPRET=1 set before triton is first imported, e.g. at process start). "
            "Use 'auto' or 'pytorch' on CPU.")
    if not usable:
        raise ValueError(f"ms_deform_attn implementation 'triton' supports value dtypes "
                         f"{triton_kernels.SUPPORTED_VALUE_DTYPES}, got {value.dtype}")
    return "triton"


def ms_deform_attn(value: Tensor, levels: LevelLayout, sampling_locations: Tensor, attention_weights: Tensor,
                   impl: str = "auto") -> Tensor:
    """Multi-scale deformable sampling + weighted sum ([12], Eq. 3) with the implementation ``impl``
    resolves to (:func:`resolve_ms_deform_attn_impl`).

    Args:
        value: (N, S, M, D); levels: the tokens' :class:`~.levels.LevelLayout`.
        sampling_locations: (N, Q, M, L, P, 2) normalized (x, y); attention_weights: (N, Q, M, L, P).

    Returns:
        (N, Q, M * D) in ``value.dtype``.
    """
    if resolve_ms_deform_attn_impl(value, impl) == "triton":
        return triton_kernels.ms_deform_attn_triton(
            value, levels.spatial_shapes, levels.level_start_index, sampling_locations, attention_weights)
    return ms_deform_attn_core(value, levels.sizes, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module of Deformable DETR [12] (paper Sec. 3.2 / 3.3.2).

    Each query predicts, from its own embedding, ``n_points`` sampling offsets and attention weights per
    head and level around its reference point; values are projected, sampled with
    :func:`ms_deform_attn` and projected back.

    Args:
        d_model: channels C of queries and values.
        n_levels: number of feature levels L.
        n_heads: number of attention heads M (must divide ``d_model``).
        n_points: sampling points P per head and level.
        impl: ``"auto"`` | ``"pytorch"`` | ``"triton"``, this module's sampling implementation.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4,
                 impl: str = "auto"):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if min(d_model, n_levels, n_heads, n_points) <= 0:
            raise ValueError(
                f"d_model, n_levels, n_heads, n_points must be positive, got "
                f"{d_model}, {n_levels}, {n_heads}, {n_points}"
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.impl = check_impl_name(impl, "MSDeformAttn impl")

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Deformable DETR initialization: at start, head ``m`` samples point ``k`` (1-based) at
        ``k`` times a unit direction of angle ``2*pi*m/M`` (scaled so its largest coordinate is 1, i.e. on
        a square), in pixels of each level; attention is uniform over the points."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)  # (M, 2)
        grid_init = grid_init / grid_init.abs().max(-1, keepdim=True)[0]
        grid_init = grid_init.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid_init = grid_init * scale  # (M, L, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid_init.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor,
                levels: LevelLayout) -> Tensor:
        """
        Args:
            query: (N, Lq, C) query embeddings (positional embedding already added by the caller).
            reference_points: (N, Lq, L, 2) normalized (x, y) per level (offsets are in pixels of each
                level), or (N, Lq, L, 4) boxes (cx, cy, w, h) (offsets scaled by ``0.5 * (w, h) / P``).
            input_flatten: (N, S, C) values of all levels; ``levels`` their layout (padding tokens zeroed).
        Returns:
            (N, Lq, C)
        """
        N, Lq, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        levels.check_tokens(input_flatten, "input_flatten", self.d_model)
        if levels.num_levels != L or tuple(reference_points.shape[:3]) != (N, Lq, L) or \
                reference_points.shape[-1] not in (2, 4) or query.shape[-1] != self.d_model:
            raise ValueError(f"MSDeformAttn(C={self.d_model}, L={L}): query {tuple(query.shape)}, reference_points "
                             f"{tuple(reference_points.shape)} (N, Lq, L, 2|4) and {levels} do not match")
        value = self.value_proj(input_flatten).masked_fill_(levels.padding_mask[..., None], 0.0)
        value = value.view(N, -1, M, self.d_model // M)
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:  # offsets in pixels of each level: normalize by (W_l, H_l)
            normalizer = levels.spatial_shapes.flip(-1).to(offsets.dtype)  # (L, 2) as (W, H)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        else:  # offsets relative to the reference box: half its size spread over P points
            ref = reference_points[:, :, None, :, None]
            locations = ref[..., :2] + offsets / P * ref[..., 2:] * 0.5
        return self.output_proj(ms_deform_attn(value, levels, locations, weights, self.impl))
