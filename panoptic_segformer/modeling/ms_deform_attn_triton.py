"""Triton kernels for multi-scale deformable attention (Deformable DETR [12], used by the encoder,
paper Sec. 3.2, and the location decoder, Sec. 3.3.2).

Same maths as the pure-PyTorch reference :func:`~panoptic_segformer.modeling.ms_deform_attn.ms_deform_attn_core`
([12], Eq. 3, the part inside the brackets)::

    out[n, q, m, :] = sum_l sum_p A[n, q, m, l, p] * bilinear(x^l[n, :, :, m, :], loc[n, q, m, l, p])

with ``align_corners=False`` (pixel ``x = loc_x * W - 0.5``) and zeros outside each map, but one fused
kernel instead of one ``grid_sample`` per level plus a stack and a weighted sum. The backward kernel
recomputes the bilinear corners and produces the gradients w.r.t. ``value`` (scattered with fp32
atomic adds), ``sampling_locations`` and ``attention_weights`` in one pass.

Each program handles ``BLOCK_Q`` queries of one (image ``n``, head ``m``) pair over all ``L`` levels and
``P`` points, with the ``D`` channels of the head as the fast (vector) axis; all arithmetic is in fp32
whatever the input dtypes (fp32, fp16 or bf16 ``value``; any float locations / weights).

Triton is optional: this module always imports; :func:`triton_available` says whether the kernels
exist and :data:`TRITON_IMPORT_ERROR` why not. On CPU tensors they run only in Triton's interpreter,
which must be switched on (``TRITON_INTERPRET=1``) before ``triton`` is first imported, in practice at
process start; :func:`triton_interpreter_mode` reports it.
"""

import os
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .levels import check_sampling_shapes

__all__ = [
    "MSDeformAttnFunction",
    "ms_deform_attn_triton",
    "triton_available",
    "triton_interpreter_mode",
    "TRITON_IMPORT_ERROR",
    "SUPPORTED_VALUE_DTYPES",
]

SUPPORTED_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = SUPPORTED_VALUE_DTYPES + (torch.float64,)

TRITON_IMPORT_ERROR: Optional[str] = None
try:  # Triton is optional
    import triton
    import triton.language as tl
except Exception as exc:  # ImportError, or a broken installation
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


if triton is not None:

    @triton.jit
    def _bilinear_corner(value_head_ptr, start, H, W, cx, cy, token_stride, offs_d, valid_q, mask_d):
        """Load the (BLOCK_Q, BLOCK_D) values at integer pixel (cx, cy) of one level, zero outside.

        Returns the values in fp32, the token index of the corner (int64) and its in-bounds mask.
        """
        inside = valid_q & (cx >= 0) & (cx < W) & (cy >= 0) & (cy < H)
        token = start + cy.to(tl.int64) * W + cx.to(tl.int64)
        token = tl.where(inside, token, 0)
        mask = inside[:, None] & mask_d[None, :]
        ptrs = value_head_ptr + token[:, None] * token_stride + offs_d[None, :]
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        return v, token, inside

    @triton.jit
    def _pixel_coords(loc_ptr, loc_idx, mask_q, Wf, Hf):
        """Normalized (x, y) -> pixel coordinates (align_corners=False), floor corner and fractions."""
        lx = tl.load(loc_ptr + loc_idx * 2, mask=mask_q, other=0.0).to(tl.float32)
        ly = tl.load(loc_ptr + loc_idx * 2 + 1, mask=mask_q, other=0.0).to(tl.float32)
        # Clamp far-away points to just outside the map (all four corners still outside, so the
        # result and gradients stay zero) so the float -> int conversion cannot overflow.
        x = tl.minimum(tl.maximum(lx * Wf - 0.5, -2.0), Wf + 1.0)
        y = tl.minimum(tl.maximum(ly * Hf - 0.5, -2.0), Hf + 1.0)
        x0f = tl.floor(x)
        y0f = tl.floor(y)
        return x0f.to(tl.int32), y0f.to(tl.int32), x - x0f, y - y0f

    @triton.jit
    def _msda_fwd_kernel(
        value_ptr,  # (N, S, M, D)
        shapes_ptr,  # (L, 2) (H, W)
        start_ptr,  # (L,)
        loc_ptr,  # (N, Q, M, L, P, 2)
        attn_ptr,  # (N, Q, M, L, P)
        out_ptr,  # (N, Q, M, D)
        S,
        Q,
        M,
        D: tl.constexpr,
        L: tl.constexpr,
        P: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        pid_nm = tl.program_id(1)
        n = pid_nm // M
        m = pid_nm % M
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        mask_q = offs_q < Q
        mask_d = offs_d < D
        token_stride = M * D
        # flat (n, q, m) row of the (N, Q, M, ...) layouts
        nqm = (n.to(tl.int64) * Q + offs_q) * M + m
        value_head_ptr = value_ptr + n.to(tl.int64) * S * token_stride + m * D
        acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
        for lvl in tl.static_range(L):
            H = tl.load(shapes_ptr + 2 * lvl)
            W = tl.load(shapes_ptr + 2 * lvl + 1)
            start = tl.load(start_ptr + lvl)
            Hf = H.to(tl.float32)
            Wf = W.to(tl.float32)
            for p in tl.static_range(P):
                idx = nqm * (L * P) + (lvl * P + p)
                a = tl.load(attn_ptr + idx, mask=mask_q, other=0.0).to(tl.float32)
                x0, y0, fx, fy = _pixel_coords(loc_ptr, idx, mask_q, Wf, Hf)
                v00, t00, i00 = _bilinear_corner(
                    value_head_ptr, start, H, W, x0, y0, token_stride, offs_d, mask_q, mask_d
                )
                v01, t01, i01 = _bilinear_corner(
                    value_head_ptr, start, H, W, x0 + 1, y0, token_stride, offs_d, mask_q, mask_d
                )
                v10, t10, i10 = _bilinear_corner(
                    value_head_ptr, start, H, W, x0, y0 + 1, token_stride, offs_d, mask_q, mask_d
                )
                v11, t11, i11 = _bilinear_corner(
                    value_head_ptr, start, H, W, x0 + 1, y0 + 1, token_stride, offs_d, mask_q, mask_d
                )
                top = v00 * (1.0 - fx)[:, None] + v01 * fx[:, None]
                bottom = v10 * (1.0 - fx)[:, None] + v11 * fx[:, None]
                sampled = top * (1.0 - fy)[:, None] + bottom * fy[:, None]
                acc += a[:, None] * sampled
        out_ptrs = out_ptr + nqm[:, None] * D + offs_d[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_q[:, None] & mask_d[None, :])

    @triton.jit
    def _msda_bwd_kernel(
        value_ptr,  # (N, S, M, D)
        shapes_ptr,  # (L, 2) (H, W)
        start_ptr,  # (L,)
        loc_ptr,  # (N, Q, M, L, P, 2)
        attn_ptr,  # (N, Q, M, L, P)
        grad_out_ptr,  # (N, Q, M, D)
        grad_value_ptr,  # (N, S, M, D) fp32, zero-initialized, atomically accumulated
        grad_loc_ptr,  # (N, Q, M, L, P, 2)
        grad_attn_ptr,  # (N, Q, M, L, P)
        S,
        Q,
        M,
        D: tl.constexpr,
        L: tl.constexpr,
        P: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_D: tl.constexpr,
        NEED_GRAD_VALUE: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        pid_nm = tl.program_id(1)
        n = pid_nm // M
        m = pid_nm % M
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        mask_q = offs_q < Q
        mask_d = offs_d < D
        token_stride = M * D
        nqm = (n.to(tl.int64) * Q + offs_q) * M + m
        head_offset = n.to(tl.int64) * S * token_stride + m * D
        value_head_ptr = value_ptr + head_offset
        grad_value_head_ptr = grad_value_ptr + head_offset
        go = tl.load(
            grad_out_ptr + nqm[:, None] * D + offs_d[None, :],
            mask=mask_q[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        for lvl in tl.static_range(L):
            H = tl.load(shapes_ptr + 2 * lvl)
            W = tl.load(shapes_ptr + 2 * lvl + 1)
            start = tl.load(start_ptr + lvl)
            Hf = H.to(tl.float32)
            Wf = W.to(tl.float32)
            for p in tl.static_range(P):
                idx = nqm * (L * P) + (lvl * P + p)
                a = tl.load(attn_ptr + idx, mask=mask_q, other=0.0).to(tl.float32)
                x0, y0, fx, fy = _pixel_coords(loc_ptr, idx, mask_q, Wf, Hf)
                v00, t00, i00 = _bilinear_corner(
                    value_head_ptr, start, H, W, x0, y0, token_stride, offs_d, mask_q, mask_d
                )
                v01, t01, i01 = _bilinear_corner(
                    value_head_ptr, start, H, W, x0 + 1, y0, token_stride, offs_d, mask_q, mask_d
                )
                v10, t10, i10 = _bilinear_corner(
                    value_head_ptr, start, H, W, x0, y0 + 1, token_stride, offs_d, mask_q, mask_d
                )
                v11, t11, i11 = _bilinear_corner(
                    value_head_ptr, start, H, W, x0 + 1, y0 + 1, token_stride, offs_d, mask_q, mask_d
                )
                w00 = (1.0 - fx) * (1.0 - fy)
                w01 = fx * (1.0 - fy)
                w10 = (1.0 - fx) * fy
                w11 = fx * fy
                sampled = v00 * w00[:, None] + v01 * w01[:, None] + v10 * w10[:, None] + v11 * w11[:, None]
                # d out / d A = <grad_out, sampled>
                grad_a = tl.sum(go * sampled, axis=1)
                tl.store(grad_attn_ptr + idx, grad_a.to(grad_attn_ptr.dtype.element_ty), mask=mask_q)
                # d sampled / d x_pix and d y_pix; x_pix = loc_x * W - 0.5 so d/d loc_x = W * d/d x_pix
                dsx = (v01 - v00) * (1.0 - fy)[:, None] + (v11 - v10) * fy[:, None]
                dsy = (v10 - v00) * (1.0 - fx)[:, None] + (v11 - v01) * fx[:, None]
                grad_x = a * Wf * tl.sum(go * dsx, axis=1)
                grad_y = a * Hf * tl.sum(go * dsy, axis=1)
                tl.store(grad_loc_ptr + idx * 2, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=mask_q)
                tl.store(grad_loc_ptr + idx * 2 + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=mask_q)
                if NEED_GRAD_VALUE:
                    # d out / d value[corner] = A * w_corner * grad_out, scattered (corners are shared)
                    ga = go * a[:, None]
                    col = offs_d[None, :]
                    md = mask_d[None, :]
                    tl.atomic_add(
                        grad_value_head_ptr + t00[:, None] * token_stride + col,
                        ga * w00[:, None],
                        mask=i00[:, None] & md,
                    )
                    tl.atomic_add(
                        grad_value_head_ptr + t01[:, None] * token_stride + col,
                        ga * w01[:, None],
                        mask=i01[:, None] & md,
                    )
                    tl.atomic_add(
                        grad_value_head_ptr + t10[:, None] * token_stride + col,
                        ga * w10[:, None],
                        mask=i10[:, None] & md,
                    )
                    tl.atomic_add(
                        grad_value_head_ptr + t11[:, None] * token_stride + col,
                        ga * w11[:, None],
                        mask=i11[:, None] & md,
                    )


def triton_available() -> bool:
    """True when Triton imported (the kernels exist); see :data:`TRITON_IMPORT_ERROR` otherwise.

    Whether they run on GPU or through the interpreter is :func:`triton_interpreter_mode`.
    """
    return triton is not None


def triton_interpreter_mode() -> bool:
    """True when the kernels run in Triton's interpreter (on CPU tensors, slowly).

    That needs ``TRITON_INTERPRET=1`` in the environment before ``triton`` is first imported (Triton
    decides per ``@triton.jit`` function, its own ``tl.zeros``/``tl.sum`` included, and torchvision
    already imports it), i.e. in practice at process start, and still set when a kernel runs.
    """
    if triton is None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:
        return False
    return (
        isinstance(_msda_fwd_kernel, InterpretedFunction)
        and isinstance(tl.zeros, InterpretedFunction)  # Triton's own jit library, built at its import
        and _interpret_flag_set()
    )


def _interpret_flag_set() -> bool:
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Shape / dtype / device checks from tensor metadata only (no host-device synchronization).

    The *values* of ``spatial_shapes`` / ``level_start_index`` are trusted (checking them would need a
    sync); :class:`MSDeformAttn` validates them once per call before dispatching.
    """
    if value.dim() != 4:
        raise ValueError(f"value must have shape (N, S, M, D), got {tuple(value.shape)}")
    if value.dtype not in SUPPORTED_VALUE_DTYPES:
        raise ValueError(
            f"value must be float32, float16 or bfloat16 for the Triton kernel, got dtype {value.dtype}"
        )
    N, S, M, D = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"spatial_shapes must have shape (L, 2) holding (H, W) per level, got {tuple(spatial_shapes.shape)}"
        )
    if spatial_shapes.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"spatial_shapes must be an int32/int64 tensor, got dtype {spatial_shapes.dtype}")
    L = spatial_shapes.shape[0]
    if tuple(level_start_index.shape) != (L,) or level_start_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"level_start_index must be an int32/int64 tensor of shape (L,) = ({L},), got "
            f"{level_start_index.dtype} {tuple(level_start_index.shape)}"
        )
    Q, P = check_sampling_shapes(N, M, L, sampling_locations, attention_weights)
    if sampling_locations.dtype not in _FLOAT_DTYPES or attention_weights.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            "sampling_locations and attention_weights must be floating point, got "
            f"{sampling_locations.dtype} and {attention_weights.dtype}"
        )
    for name, t in (
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if t.device != value.device:
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}")


def _launch_config(Q: int, D: int, backward: bool):
    """(BLOCK_Q, BLOCK_D, num_warps). Untuned defaults: the channel axis is the vector axis."""
    block_d = triton.next_power_of_2(D)
    cap = 32 if backward else 64
    block_q = max(1, min(cap, triton.next_power_of_2(Q), max(1, 4096 // block_d)))
    return block_q, block_d, 4


class MSDeformAttnFunction(torch.autograd.Function):
    """Autograd wrapper of the fused Triton forward / backward kernels.

    ``forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)``
    with the shapes of :func:`ms_deform_attn_triton`; gradients flow to ``value``,
    ``sampling_locations`` and ``attention_weights`` (each in its own dtype).
    """

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        value = value.contiguous()
        spatial_shapes = spatial_shapes.to(value.device).contiguous()
        level_start_index = level_start_index.to(value.device).contiguous()
        sampling_locations = sampling_locations.contiguous()
        attention_weights = attention_weights.contiguous()
        N, S, M, D = value.shape
        _, Q, _, L, P, _ = sampling_locations.shape
        out = torch.empty(N, Q, M, D, device=value.device, dtype=value.dtype)
        if out.numel() > 0:
            block_q, block_d, num_warps = _launch_config(Q, D, backward=False)
            grid = (triton.cdiv(Q, block_q), N * M)
            _msda_fwd_kernel[grid](
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out,
                S, Q, M, D=D, L=L, P=P, BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=num_warps,
            )
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return out.view(N, Q, M * D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        N, S, M, D = value.shape
        _, Q, _, L, P, _ = sampling_locations.shape
        need_value = ctx.needs_input_grad[0]
        grad_output = grad_output.contiguous()
        grad_value = torch.zeros(N, S, M, D, device=value.device, dtype=torch.float32) if need_value else None
        grad_loc = torch.empty_like(sampling_locations)
        grad_attn = torch.empty_like(attention_weights)
        if grad_loc.numel() > 0 and D > 0:
            block_q, block_d, num_warps = _launch_config(Q, D, backward=True)
            grid = (triton.cdiv(Q, block_q), N * M)
            _msda_bwd_kernel[grid](
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                grad_output, grad_value if need_value else grad_loc, grad_loc, grad_attn,
                S, Q, M, D=D, L=L, P=P, BLOCK_Q=block_q, BLOCK_D=block_d,
                NEED_GRAD_VALUE=need_value, num_warps=num_warps,
            )
        else:
            grad_loc.zero_()
            grad_attn.zero_()
        if need_value:
            grad_value = grad_value.to(value.dtype)
        return (
            grad_value,
            None,
            None,
            grad_loc if ctx.needs_input_grad[3] else None,
            grad_attn if ctx.needs_input_grad[4] else None,
        )


def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Fused Triton multi-scale deformable attention ([12], Eq. 3), same semantics as
    :func:`~panoptic_segformer.modeling.ms_deform_attn.ms_deform_attn_core`.

    Differences from the reference: ``level_start_index`` is passed in (no host sync to compute it),
    and ``sampling_locations`` / ``attention_weights`` are read in their own dtype and used in fp32
    (the reference casts them to ``value.dtype`` first, which for bf16 values rounds locations).

    Args:
        value: (N, S, M, D) float32 / float16 / bfloat16, levels flattened row-major and concatenated.
        spatial_shapes: (L, 2) int64/int32 (H_l, W_l) per level (same device as ``value``).
        level_start_index: (L,) int64/int32 start token of each level in ``S``.
        sampling_locations: (N, Q, M, L, P, 2) normalized (x, y), any float dtype.
        attention_weights: (N, Q, M, L, P), any float dtype.

    Returns:
        (N, Q, M * D) in ``value.dtype``, heads concatenated head-major.
    """
    if triton is None:
        raise RuntimeError(f"Triton is not available: {TRITON_IMPORT_ERROR}")
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if not value.is_cuda and not triton_interpreter_mode():
        raise RuntimeError(
            "the Triton multi-scale deformable attention kernel needs CUDA tensors, or Triton's interpreter "
            "for CPU tensors (TRITON_INTERPRET=1 set before triton is first imported, e.g. at process start); "
            f"got value on {value.device}"
        )
    return MSDeformAttnFunction.apply(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
