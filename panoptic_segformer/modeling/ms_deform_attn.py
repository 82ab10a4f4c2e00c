"""Multi-scale deformable attention (Deformable DETR [12]), used by the transformer encoder
(paper Sec. 3.2) and the location decoder (Sec. 3.3.2) of Panoptic SegFormer.

For a query ``q`` with reference point ``p_q`` (normalized to ``[0, 1]``), head ``m``, level ``l`` and
sampling point ``k``, multi-scale deformable attention computes ([12], Eq. 3)::

    MSDeformAttn(z_q, p_q, {x^l}) = sum_m W_m [ sum_l sum_k A_mlqk * W'_m x^l(phi_l(p_q) + Δp_mlqk) ]

where ``x^l(.)`` is bilinear sampling of level ``l`` and the attention weights ``A_mlqk`` are normalized
(softmax) over all ``L * K`` points of a head.

``ms_deform_attn_core`` is the single pure-PyTorch implementation of the sampling + weighted sum
(everything inside the brackets except ``W'_m``); ``MSDeformAttn`` is the full module with its
projections. ``ms_deform_attn`` dispatches between the core and the fused Triton kernel of
:mod:`.ms_deform_attn_triton` (same semantics): Triton on CUDA tensors when it is installed, the core
otherwise. Force either with :func:`set_ms_deform_attn_impl` or the environment variable
``PANOPTIC_SEGFORMER_MSDA_IMPL`` (``auto`` | ``pytorch`` | ``triton``).
"""

import math
import numbers
import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "check_level_tensors",
    "level_start_offsets",
    "ms_deform_attn_core",
    "ms_deform_attn",
    "set_ms_deform_attn_impl",
    "get_ms_deform_attn_impl",
    "resolve_ms_deform_attn_impl",
    "MSDeformAttn",
]


def _level_sizes(spatial_shapes, arg_name: str = "spatial_shapes") -> List[List[int]]:
    """Validate ``spatial_shapes`` (L, 2) integer (H, W) and return it as a Python list.

    ``spatial_shapes`` is an integer tensor, or a sequence of Python ``(H, W)`` pairs. Reading a CUDA
    tensor's values is a host-device sync; the modules of this package pass the Python sizes
    (``spatial_sizes``) along with the tensor, so their forward passes never read the tensor.
    """
    if not isinstance(spatial_shapes, Tensor):
        try:
            pairs = [tuple(pair) for pair in spatial_shapes]
        except TypeError:
            pairs = None
        if pairs is None or any(
            len(pair) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in pair)
            for pair in pairs
        ):
            raise ValueError(
                f"{arg_name} must be an (L, 2) integer tensor or a sequence of (H, W) integer pairs, "
                f"got {spatial_shapes!r}"
            )
        sizes = [[int(h), int(w)] for h, w in pairs]
    else:
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(
                f"{arg_name} must have shape (L, 2) holding (H, W) per level, got {tuple(spatial_shapes.shape)}"
            )
        if spatial_shapes.is_floating_point() or spatial_shapes.is_complex() or spatial_shapes.dtype == torch.bool:
            raise ValueError(f"{arg_name} must be an integer tensor, got dtype {spatial_shapes.dtype}")
        sizes = spatial_shapes.tolist()  # host-device sync for a CUDA tensor
    if any(h <= 0 or w <= 0 for h, w in sizes):
        raise ValueError(f"{arg_name} must hold positive (H, W) sizes, got {sizes}")
    return sizes


def level_start_offsets(sizes: Sequence[Sequence[int]]) -> List[int]:
    """Start offset of each level in the flattened tokens: ``[0, H_1 W_1, H_1 W_1 + H_2 W_2, ...]``."""
    starts = [0]
    for h, w in list(sizes)[:-1]:
        starts.append(starts[-1] + h * w)
    return starts


def check_level_tensors(spatial_shapes: Tensor, level_start_index: Tensor, n_levels: int, prefix: str = "") -> None:
    """Metadata-only checks (no host-device sync) of the level tensors: ``spatial_shapes`` an (L, 2)
    integer tensor and ``level_start_index`` an (L,) tensor, ``L = n_levels``. Raises ValueError
    naming ``{prefix}spatial_shapes`` / ``{prefix}level_start_index``."""
    if (
        not isinstance(spatial_shapes, Tensor)
        or tuple(spatial_shapes.shape) != (n_levels, 2)
        or spatial_shapes.is_floating_point()
        or spatial_shapes.is_complex()
        or spatial_shapes.dtype == torch.bool
    ):
        desc = (f"{spatial_shapes.dtype} {tuple(spatial_shapes.shape)}" if isinstance(spatial_shapes, Tensor)
                else type(spatial_shapes).__name__)
        raise ValueError(f"{prefix}spatial_shapes must be an integer tensor of shape ({n_levels}, 2), got {desc}")
    if not isinstance(level_start_index, Tensor) or tuple(level_start_index.shape) != (n_levels,):
        desc = (tuple(level_start_index.shape) if isinstance(level_start_index, Tensor)
                else type(level_start_index).__name__)
        raise ValueError(f"{prefix}level_start_index must be a tensor of shape ({n_levels},), got {desc}")


def check_sampling_shapes(N: int, M: int, L: int, sampling_locations: Tensor, attention_weights: Tensor):
    """Shape checks of the sampling inputs, shared by the PyTorch core and the Triton path.

    Raises ValueError naming the argument unless sampling_locations is (N, Q, M, L, P, 2) and
    attention_weights is (N, Q, M, L, P); returns (Q, P).
    """
    if (
        sampling_locations.dim() != 6
        or sampling_locations.shape[0] != N
        or sampling_locations.shape[2] != M
        or sampling_locations.shape[3] != L
        or sampling_locations.shape[5] != 2
    ):
        raise ValueError(
            f"sampling_locations must have shape (N, Q, M, L, P, 2) = ({N}, Q, {M}, {L}, P, 2), "
            f"got {tuple(sampling_locations.shape)}"
        )
    Q, P = sampling_locations.shape[1], sampling_locations.shape[4]
    if tuple(attention_weights.shape) != (N, Q, M, L, P):
        raise ValueError(
            f"attention_weights must have shape (N, Q, M, L, P) = {(N, Q, M, L, P)}, "
            f"got {tuple(attention_weights.shape)}"
        )
    return Q, P


def ms_deform_attn_core(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Sample every level bilinearly at the given locations and sum with attention weights ([12], Eq. 3).

    Pure PyTorch (one ``F.grid_sample`` per level), differentiable w.r.t. ``value``,
    ``sampling_locations`` and ``attention_weights``; runs on any device and float dtype
    (``sampling_locations`` / ``attention_weights`` are cast to ``value.dtype``).

    Sampling follows ``align_corners=False``: the centre of column ``j`` of a level of width ``W`` is at
    ``x = (j + 0.5) / W`` (rows likewise); points falling (partly) outside a map read zeros there.

    Args:
        value: (N, S, M, D) per-head values of all levels flattened row-major and concatenated,
            ``S = sum_l H_l * W_l``.
        spatial_shapes: (L, 2) integer, (H_l, W_l) per level: a tensor, or a sequence of Python
            ``(H_l, W_l)`` pairs (no host-device sync to read them).
        sampling_locations: (N, Q, M, L, P, 2) normalized (x, y) in [0, 1] (values outside allowed).
        attention_weights: (N, Q, M, L, P).

    Returns:
        (N, Q, M * D), heads concatenated head-major (head ``m`` occupies channels ``m*D:(m+1)*D``).
    """
    if value.dim() != 4:
        raise ValueError(f"value must have shape (N, S, M, D), got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"value must be a floating point tensor, got dtype {value.dtype}")
    sizes = _level_sizes(spatial_shapes)
    N, S, M, D = value.shape
    L = len(sizes)
    if sum(h * w for h, w in sizes) != S:
        raise ValueError(
            f"value has S={S} tokens (shape {tuple(value.shape)}) but spatial_shapes {sizes} "
            f"sum to {sum(h * w for h, w in sizes)}"
        )
    Q, P = check_sampling_shapes(N, M, L, sampling_locations, attention_weights)
    if not sampling_locations.is_floating_point() or not attention_weights.is_floating_point():
        raise ValueError(
            "sampling_locations and attention_weights must be floating point, got "
            f"{sampling_locations.dtype} and {attention_weights.dtype}"
        )
    sampling_locations = sampling_locations.to(value.dtype)
    attention_weights = attention_weights.to(value.dtype)

    value_list = value.split([h * w for h, w in sizes], dim=1)
    # grid_sample wants coordinates in [-1, 1]; with align_corners=False, -1/1 are the outer map edges.
    sampling_grids = 2 * sampling_locations - 1
    sampled_per_level = []
    for lvl, (h, w) in enumerate(sizes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_l = value_list[lvl].permute(0, 2, 3, 1).reshape(N * M, D, h, w)
        # (N, Q, M, P, 2) -> (N*M, Q, P, 2)
        grid_l = sampling_grids[:, :, :, lvl].transpose(1, 2).reshape(N * M, Q, P, 2)
        # (N*M, D, Q, P)
        sampled_per_level.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (N, Q, M, L, P) -> (N*M, 1, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Q, L * P)
    # (N*M, D, Q, L*P) weighted sum -> (N*M, D, Q)
    output = (torch.stack(sampled_per_level, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(N, M * D, Q).transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------
# Dispatch between the pure-PyTorch core and the Triton kernel
# ---------------------------------------------------------------------------------------------------
MSDA_IMPL_ENV = "PANOPTIC_SEGFORMER_MSDA_IMPL"
MSDA_IMPLS = ("auto", "pytorch", "triton")
_impl_override: Optional[str] = None


def _check_impl_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in MSDA_IMPLS:
        raise ValueError(f"{source} must be one of {MSDA_IMPLS}, got {name!r}")
    return name


def set_ms_deform_attn_impl(name: Optional[str]) -> None:
    """Choose the multi-scale deformable attention implementation for the whole process.

    ``"pytorch"`` (:func:`ms_deform_attn_core`) or ``"triton"`` (fused kernel) force one;
    ``"auto"`` or ``None`` clear the choice, leaving it to ``$PANOPTIC_SEGFORMER_MSDA_IMPL`` (default
    ``auto``: Triton on CUDA tensors when available, PyTorch otherwise).
    """
    global _impl_override
    _impl_override = None if name is None else _check_impl_name(name, "set_ms_deform_attn_impl name")


def get_ms_deform_attn_impl() -> str:
    """The requested implementation: the :func:`set_ms_deform_attn_impl` choice if it forces one,
    else ``$PANOPTIC_SEGFORMER_MSDA_IMPL``, else ``"auto"``."""
    if _impl_override is not None and _impl_override != "auto":
        return _impl_override
    return _check_impl_name(os.environ.get(MSDA_IMPL_ENV, "auto") or "auto", f"${MSDA_IMPL_ENV}")


def _triton_module():
    """The Triton kernel module, imported on first use (importing it never fails)."""
    from . import ms_deform_attn_triton

    return ms_deform_attn_triton


def resolve_ms_deform_attn_impl(value: Tensor, impl: Optional[str] = None) -> str:
    """Which implementation (``"pytorch"`` or ``"triton"``) runs for ``value``.

    Args:
        value: (N, S, M, D) the values to attend over (only device and dtype are read).
        impl: per-call request overriding :func:`get_ms_deform_attn_impl`.

    Raises:
        RuntimeError: ``"triton"`` is forced but Triton is missing, or ``value`` is on the CPU and
            Triton's interpreter is off (``TRITON_INTERPRET=1`` must be set before triton is imported).
        ValueError: ``"triton"`` is forced with a dtype the kernel does not take (float64).
    """
    requested = get_ms_deform_attn_impl() if impl is None else _check_impl_name(impl, "impl")
    if requested == "pytorch":
        return "pytorch"
    if requested == "auto":
        if not value.is_cuda:
            return "pytorch"
        kernels = _triton_module()
        if kernels.triton_available() and value.dtype in kernels.SUPPORTED_VALUE_DTYPES:
            return "triton"
        return "pytorch"
    kernels = _triton_module()
    if not kernels.triton_available():
        raise RuntimeError(
            f"ms_deform_attn implementation 'triton' was forced but Triton is unavailable "
            f"({kernels.TRITON_IMPORT_ERROR})"
        )
    if not value.is_cuda and not kernels.triton_interpreter_mode():
        raise RuntimeError(
            f"ms_deform_attn implementation 'triton' was forced for tensors on {value.device}: the Triton "
            "kernel runs on CUDA tensors, or on CPU tensors only in Triton's interpreter mode "
            "(TRITON_INTERPRET=1 set before triton is first imported, e.g. at process start). "
            "Use 'auto' or 'pytorch' on CPU."
        )
    if value.dtype not in kernels.SUPPORTED_VALUE_DTYPES:
        raise ValueError(
            f"ms_deform_attn implementation 'triton' supports value dtypes "
            f"{kernels.SUPPORTED_VALUE_DTYPES}, got {value.dtype}"
        )
    return "triton"


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    impl: Optional[str] = None,
    spatial_sizes: Optional[Sequence[Tuple[int, int]]] = None,
) -> Tensor:
    """Multi-scale deformable sampling + weighted sum ([12], Eq. 3), dispatched to
    :func:`ms_deform_attn_core` or the Triton kernel (see :func:`resolve_ms_deform_attn_impl`).

    Args:
        value: (N, S, M, D).
        spatial_shapes: (L, 2) int64 (H_l, W_l).
        level_start_index: (L,) int64 start of each level in ``S`` (used by the Triton kernel).
        sampling_locations: (N, Q, M, L, P, 2) normalized (x, y).
        attention_weights: (N, Q, M, L, P).
        impl: optional per-call ``"auto"`` / ``"pytorch"`` / ``"triton"``.
        spatial_sizes: optional Python ``[(H_l, W_l), ...]`` equal to ``spatial_shapes``' values; the
            PyTorch core then reads these instead of the tensor (no host-device sync). The Triton
            kernel reads the tensors on the device either way.

    Returns:
        (N, Q, M * D) in ``value.dtype``.
    """
    if resolve_ms_deform_attn_impl(value, impl) == "triton":
        return _triton_module().ms_deform_attn_triton(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    sizes = spatial_shapes if spatial_sizes is None else spatial_sizes
    return ms_deform_attn_core(value, sizes, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module of Deformable DETR [12] (paper Sec. 3.2 / 3.3.2).

    Each query predicts, from its own embedding, ``n_points`` sampling offsets and attention weights per
    head and level around its reference point; values are projected, sampled with
    :func:`ms_deform_attn_core` and projected back.

    Args:
        d_model: channels C of queries and values.
        n_levels: number of feature levels L.
        n_heads: number of attention heads M (must divide ``d_model``).
        n_points: sampling points P per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4):
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

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Optional[Tensor] = None,
        spatial_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> Tensor:
        """
        Args:
            query: (N, Lq, C) query embeddings (positional embedding already added by the caller).
            reference_points: (N, Lq, L, 2) normalized (x, y) per level, offsets are normalized by
                (W_l, H_l) i.e. predicted in pixels; or (N, Lq, L, 4) boxes (cx, cy, w, h), offsets are
                scaled by ``0.5 * (w, h) / P``.
            input_flatten: (N, S, C) values of all levels flattened, ``S = sum_l H_l * W_l``.
            input_spatial_shapes: (L, 2) int64 (H_l, W_l).
            input_level_start_index: (L,) int64 start of each level in ``S`` (checked against
                ``input_spatial_shapes``; used by the Triton kernel, unused by the pure-PyTorch core).
            input_padding_mask: optional (N, S) bool, True at padding; those values are zeroed.
            spatial_sizes: optional Python ``[(H_l, W_l), ...]``, the values of
                ``input_spatial_shapes`` (as :class:`DeformableTransformerEncoder` and the location
                decoder pass them). Given, the tensors' values are trusted and never read on the host,
                so the call makes no host-device sync; otherwise both tensors are read and checked
                (two syncs on a GPU).

        Returns:
            (N, Lq, C)
        """
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f"query must have shape (N, Lq, {self.d_model}), got {tuple(query.shape)}")
        N, Lq, _ = query.shape
        if input_flatten.dim() != 3 or input_flatten.shape[0] != N or input_flatten.shape[-1] != self.d_model:
            raise ValueError(
                f"input_flatten must have shape ({N}, S, {self.d_model}), got {tuple(input_flatten.shape)}"
            )
        S = input_flatten.shape[1]
        if spatial_sizes is not None:
            check_level_tensors(input_spatial_shapes, input_level_start_index, self.n_levels, "input_")
        sizes = _level_sizes(input_spatial_shapes if spatial_sizes is None else spatial_sizes,
                             "input_spatial_shapes" if spatial_sizes is None else "spatial_sizes")
        if len(sizes) != self.n_levels:
            raise ValueError(
                f"input_spatial_shapes has {len(sizes)} levels, module was built with n_levels={self.n_levels}"
            )
        if sum(h * w for h, w in sizes) != S:
            raise ValueError(
                f"input_flatten has S={S} tokens but input_spatial_shapes {sizes} sum to "
                f"{sum(h * w for h, w in sizes)}"
            )
        if spatial_sizes is None:
            starts = level_start_offsets(sizes)
            if input_level_start_index.shape != (self.n_levels,) or input_level_start_index.tolist() != starts:
                raise ValueError(
                    f"input_level_start_index must be the (L,) = ({self.n_levels},) level offsets {starts}, "
                    f"got {input_level_start_index.tolist()}"
                )
        if (
            reference_points.dim() != 4
            or tuple(reference_points.shape[:3]) != (N, Lq, self.n_levels)
            or (reference_points.shape[-1] not in (2, 4))
        ):
            raise ValueError(
                f"reference_points must have shape ({N}, {Lq}, {self.n_levels}, 2 or 4), "
                f"got {tuple(reference_points.shape)}"
            )
        if input_padding_mask is not None and (
            input_padding_mask.shape != (N, S) or input_padding_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"input_padding_mask must be a bool tensor of shape ({N}, {S}), got "
                f"{input_padding_mask.dtype} {tuple(input_padding_mask.shape)}"
            )

        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)

        sampling_offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        attention_weights = self.attention_weights(query).view(N, Lq, M, L * P)
        attention_weights = attention_weights.softmax(-1).view(N, Lq, M, L, P)

        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalize by (W_l, H_l)
            shapes = input_spatial_shapes.to(device=query.device, dtype=sampling_offsets.dtype)
            offset_normalizer = torch.stack([shapes[:, 1], shapes[:, 0]], -1)  # (L, 2) as (W, H)
            sampling_locations = (
                reference_points[:, :, None, :, None, :]
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
            )
        else:
            # offsets relative to the reference box: half its size spread over P points
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        output = ms_deform_attn(
            value, input_spatial_shapes, input_level_start_index, sampling_locations, attention_weights,
            spatial_sizes=sizes,
        )
        return self.output_proj(output)
