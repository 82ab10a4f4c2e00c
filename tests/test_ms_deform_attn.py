"""Tests of multi-scale deformable attention (paper Sec. 3.2, Deformable DETR [12])."""

import math

import pytest
import torch

from panoptic_segformer.modeling.levels import LevelLayout
from panoptic_segformer.modeling.ms_deform_attn import MSDeformAttn, ms_deform_attn_core, ms_deform_attn_grid_sample

SHAPES = [(5, 7), (3, 2), (1, 4)]  # ragged (H, W) per level


def reference_core(value, spatial_shapes, sampling_locations, attention_weights):
    """Explicit per-(n, q, m, l, p) bilinear interpolation, straight from the formula.

    Column j's centre is at x = (j + 0.5) / W, so x_pix = x * W - 0.5; corners outside the map read 0.
    """
    N, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    out = torch.zeros(N, Q, M, D, dtype=value.dtype)
    starts = [0]
    for H, W in spatial_shapes:
        starts.append(starts[-1] + H * W)
    for n in range(N):
        for q in range(Q):
            for m in range(M):
                for lvl, (H, W) in enumerate(spatial_shapes):
                    for p in range(P):
                        x = sampling_locations[n, q, m, lvl, p, 0].item() * W - 0.5
                        y = sampling_locations[n, q, m, lvl, p, 1].item() * H - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        acc = torch.zeros(D, dtype=value.dtype)
                        for cy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                            for cx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                                if 0 <= cx < W and 0 <= cy < H:
                                    acc = acc + wx * wy * value[n, starts[lvl] + cy * W + cx, m]
                        out[n, q, m] += attention_weights[n, q, m, lvl, p] * acc
    return out.reshape(N, Q, M * D)


def _spatial_shapes():
    return list(SHAPES)


def _layout(mask):
    """LevelLayout of SHAPES for the (N, S) token padding mask ``mask``."""
    return LevelLayout.from_padding_masks([m.reshape(mask.shape[0], h, w) for m, (h, w)
                                           in zip(mask.split([h * w for h, w in SHAPES], 1), SHAPES)])


def test_core_matches_explicit_bilinear_float64():
    g = torch.Generator().manual_seed(0)
    N, Q, M, D, L, P = 2, 3, 2, 3, len(SHAPES), 4
    S = sum(h * w for h, w in SHAPES)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    loc = torch.rand(N, Q, M, L, P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2  # some outside [0, 1]
    # exact borders, exact pixel centres and far outside
    loc[0, 0, 0, :, 0] = torch.tensor([0.0, 0.0], dtype=torch.float64)
    loc[0, 0, 0, :, 1] = torch.tensor([1.0, 1.0], dtype=torch.float64)
    loc[0, 0, 1, 0, 2] = torch.tensor([(3 + 0.5) / 7, (2 + 0.5) / 5], dtype=torch.float64)
    loc[1, 1, 0, :, 3] = torch.tensor([-0.5, 1.7], dtype=torch.float64)
    loc[1, 2, 1, 2, 0] = torch.tensor([1.0 + 0.1 / 4, 0.5], dtype=torch.float64)  # just past the right edge
    weights = torch.rand(N, Q, M, L, P, generator=g, dtype=torch.float64)

    out = ms_deform_attn_core(value, _spatial_shapes(), loc, weights)
    ref = reference_core(value, _spatial_shapes(), loc, weights)
    assert out.shape == (N, Q, M * D)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)  # float64, 4-corner sums: rounding ~1e-15
    # a point exactly on a pixel centre reads that pixel (float64: (3.5 / 7) * 7 - 0.5 is 3 within ~1e-15)
    one_hot = torch.zeros_like(weights)
    one_hot[0, 0, 1, 0, 2] = 1.0
    out1 = ms_deform_attn_core(value, _spatial_shapes(), loc, one_hot)
    torch.testing.assert_close(out1[0, 0, D:], value[0, 2 * 7 + 3, 1], atol=1e-12, rtol=0)
    # far outside reads zeros
    one_hot.zero_()
    one_hot[1, 1, 0, :, 3] = 1.0
    assert ms_deform_attn_core(value, _spatial_shapes(), loc, one_hot)[1, 1].abs().max() == 0


def _jittered_locations(g, N, Q, M, P):
    """Locations whose pixel coordinates are at least 0.1 px away from integer (kink) positions."""
    L = len(SHAPES)
    loc = torch.empty(N, Q, M, L, P, 2, dtype=torch.float64)
    for lvl, (H, W) in enumerate(SHAPES):
        for axis, size in ((0, W), (1, H)):
            base = torch.randint(-1, size, (N, Q, M, P), generator=g).double()
            frac = 0.1 + 0.8 * torch.rand(N, Q, M, P, generator=g, dtype=torch.float64)
            loc[:, :, :, lvl, :, axis] = (base + frac + 0.5) / size
    return loc


def test_core_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    N, Q, M, D, P = 1, 2, 2, 2, 2
    S = sum(h * w for h, w in SHAPES)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64, requires_grad=True)
    loc = _jittered_locations(g, N, Q, M, P).requires_grad_(True)
    weights = torch.rand(N, Q, M, len(SHAPES), P, generator=g, dtype=torch.float64, requires_grad=True)
    shapes = _spatial_shapes()
    # float64; each input enters linearly between kinks (>= 0.1 px > eps away): central differences are
    # exact up to rounding (~1e-16 / 1e-6 = 1e-10), so atol 1e-7
    assert torch.autograd.gradcheck(
        lambda v, s, a: ms_deform_attn_core(v, shapes, s, a), (value, loc, weights), eps=1e-6, atol=1e-7
    )


def test_core_dtypes_and_location_cast():
    g = torch.Generator().manual_seed(2)
    S = sum(h * w for h, w in SHAPES)
    value = torch.randn(1, S, 2, 4, generator=g)
    loc = torch.rand(1, 3, 2, 3, 2, 2, generator=g)
    w = torch.rand(1, 3, 2, 3, 2, generator=g)
    ref = ms_deform_attn_core(value.double(), _spatial_shapes(), loc.double(), w.double())
    out32 = ms_deform_attn_core(value, _spatial_shapes(), loc, w)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, atol=1e-5, rtol=1e-5)  # float32 6-point sum: ~1e-7
    out_bf16 = ms_deform_attn_core(value.bfloat16(), _spatial_shapes(), loc, w)  # float32 locs cast
    assert out_bf16.dtype == torch.bfloat16
    # bf16 values and output, 8 mantissa bits (~4e-3 relative a rounding) over a few roundings: 5% / 0.1
    torch.testing.assert_close(out_bf16.double(), ref, atol=0.1, rtol=0.05)


def test_core_half_precision_on_cpu_has_no_nan():
    """8 heads x 32 channels over three 800x1333-like levels (scaled down) in bf16 / fp16: PyTorch's CPU
    grid_sample returned NaN for some bf16 values in the strided (permuted) layout; the core samples a
    contiguous copy. Reference: the same (rounded) inputs in float64."""
    from projects.benchmarks.ms_deform_attn_speed import encoder_inputs

    levels = ((20, 33), (10, 17), (5, 9))
    for dtype in (torch.bfloat16, torch.float16):
        value, layout, loc, weights = encoder_inputs(levels, 1, 8, 32, 4, dtype, torch.device("cpu"), seed=3)
        out = ms_deform_attn_core(value, levels, loc, weights)
        ref = ms_deform_attn_core(value.double(), levels, loc.to(dtype).double(), weights.to(dtype).double())
        assert not out.isnan().any(), dtype
        # the core forms pixel coordinates x W - 0.5 in bf16 (~0.1 px off at W = 33): 10% relative L2
        assert ((out.double() - ref).norm() / ref.norm()).item() < 0.1, dtype  # bf16 pixel coordinates


@pytest.mark.parametrize(
    "value_shape,shapes,loc_shape,w_shape,match",
    [
        ((1, 35 + 6 + 4, 2), SHAPES, (1, 3, 2, 3, 2, 2), (1, 3, 2, 3, 2), "value"),
        ((1, 44, 2, 4), SHAPES, (1, 3, 2, 3, 2, 2), (1, 3, 2, 3, 2), "level sizes"),
        ((1, 45, 2, 4), [(5, 7, 1)], (1, 3, 2, 3, 2, 2), (1, 3, 2, 3, 2), "level sizes"),
        ((1, 45, 2, 4), SHAPES, (1, 3, 2, 2, 2, 2), (1, 3, 2, 3, 2), "sampling_locations"),
        ((1, 45, 2, 4), SHAPES, (1, 3, 2, 3, 2, 3), (1, 3, 2, 3, 2), "sampling_locations"),
        ((1, 45, 2, 4), SHAPES, (1, 3, 2, 3, 2, 2), (1, 3, 2, 3, 1), "attention_weights"),
    ],
)
def test_core_shape_validation(value_shape, shapes, loc_shape, w_shape, match):
    with pytest.raises(ValueError, match=match):
        ms_deform_attn_core(torch.zeros(value_shape), shapes, torch.zeros(loc_shape), torch.zeros(w_shape))


def test_core_rejects_non_integer_or_tensor_sizes():
    for sizes in ([(5.0, 7), (3, 2), (1, 4)], torch.tensor(SHAPES)):
        with pytest.raises(ValueError, match="integer"):
            ms_deform_attn_core(torch.zeros(1, 45, 2, 4), sizes, torch.zeros(1, 3, 2, 3, 2, 2),
                                torch.zeros(1, 3, 2, 3, 2))


def _flat_inputs(g, N=2, C=16, Lq=5, ref_dim=2):
    S = sum(h * w for h, w in SHAPES)
    query = torch.randn(N, Lq, C, generator=g)
    ref = torch.rand(N, Lq, len(SHAPES), ref_dim, generator=g)
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:] * 0.5 + 0.1
    x = torch.randn(N, S, C, generator=g)
    return query, ref, x, LevelLayout.from_sizes(SHAPES, N)


def _randomize(module, g):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_module_init_validation():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)


def test_init_offsets_on_circle_of_directions():
    M, L, P = 8, 3, 4
    attn = MSDeformAttn(d_model=32, n_levels=L, n_heads=M, n_points=P)
    assert attn.sampling_offsets.weight.abs().max() == 0
    assert attn.attention_weights.weight.abs().max() == 0 and attn.attention_weights.bias.abs().max() == 0
    bias = attn.sampling_offsets.bias.view(M, L, P, 2)
    angles = torch.atan2(bias[..., 1], bias[..., 0])  # (M, L, P)
    expected = torch.arange(M, dtype=torch.float32) * 2 * math.pi / M
    expected = torch.atan2(expected.sin(), expected.cos())  # wrap to (-pi, pi]
    # float32 atan2 of float32 cos / sin: ~1e-7 rad
    torch.testing.assert_close(angles, expected.view(M, 1, 1).expand(M, L, P), atol=1e-5, rtol=0)
    # point k (1-based) lies k times as far as the first point, whose largest coordinate is 1 (the same
    # float32 divisions and products as the init: default tolerance, here and for the uniform softmax)
    torch.testing.assert_close(bias[:, :, 0].abs().amax(-1), torch.ones(M, L))
    for k in range(P):
        torch.testing.assert_close(bias[:, :, k], (k + 1) * bias[:, :, 0])
    # uniform attention at init
    q = torch.randn(1, 2, 32)
    w = attn.attention_weights(q).view(1, 2, M, L * P).softmax(-1)
    torch.testing.assert_close(w, torch.full_like(w, 1.0 / (L * P)))


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_matches_explicit_computation(ref_dim):
    """Forward = projections + sampling at reference + offset (normalized per level / per box)."""
    g = torch.Generator().manual_seed(3)
    M, L, P, C = 2, 3, 2, 8
    attn = MSDeformAttn(d_model=C, n_levels=L, n_heads=M, n_points=P).double()
    _randomize(attn, g)
    query, ref, x, levels = _flat_inputs(g, N=1, C=C, Lq=2, ref_dim=ref_dim)
    query, ref, x = query.double(), ref.double(), x.double()
    out = attn(query, ref, x, levels)
    assert out.shape == (1, 2, C)

    N, Lq = 1, 2
    with torch.no_grad():
        off = attn.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        w = attn.attention_weights(query).view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
        value = attn.value_proj(x).view(N, -1, M, C // M)
        loc = torch.empty_like(off)
        for lvl, (H, W) in enumerate(SHAPES):
            for p in range(P):
                if ref_dim == 2:
                    loc[:, :, :, lvl, p, 0] = ref[:, :, None, lvl, 0] + off[:, :, :, lvl, p, 0] / W
                    loc[:, :, :, lvl, p, 1] = ref[:, :, None, lvl, 1] + off[:, :, :, lvl, p, 1] / H
                else:
                    loc[:, :, :, lvl, p, :] = ref[:, :, None, lvl, :2] + off[:, :, :, lvl, p, :] * (
                        ref[:, :, None, lvl, 2:] * 0.5 / P
                    )
        expected = attn.output_proj(reference_core(value, SHAPES, loc, w))
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)  # float64 throughout: rounding ~1e-15


def test_padding_mask_removes_padded_values():
    g = torch.Generator().manual_seed(4)
    C = 16
    attn = MSDeformAttn(d_model=C, n_levels=3, n_heads=4, n_points=3)
    _randomize(attn, g)
    query, ref, x, unpadded = _flat_inputs(g, C=C)
    mask = torch.zeros(x.shape[:2], dtype=torch.bool)
    # pad the last two columns of level 0 of image 1, and the whole last level of image 0
    padded0 = torch.zeros(5, 7, dtype=torch.bool)
    padded0[:, 5:] = True
    mask[1, :35] = padded0.flatten()
    mask[0, 41:] = True
    x_changed = x.clone()
    x_changed[mask] = torch.randn(int(mask.sum()), C, generator=g) * 10
    out = attn(query, ref, x, _layout(mask))
    out_changed = attn(query, ref, x_changed, _layout(mask))
    torch.testing.assert_close(out, out_changed, atol=1e-6, rtol=0)  # padded values zeroed: the same sums
    # without the mask those values (x 10) do contribute, far beyond allclose's tolerance
    assert not torch.allclose(attn(query, ref, x, unpadded), attn(query, ref, x_changed, unpadded))


def test_module_input_validation():
    g = torch.Generator().manual_seed(5)
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=2)
    query, ref, x, levels = _flat_inputs(g, C=16)
    with pytest.raises(ValueError, match="query"):
        attn(query[..., :8], ref, x, levels)
    with pytest.raises(ValueError, match="reference_points"):
        attn(query, ref[:, :, :2], x, levels)
    with pytest.raises(ValueError, match="reference_points"):
        attn(query, torch.zeros(*ref.shape[:3], 3), x, levels)
    with pytest.raises(ValueError, match="input_flatten"):
        attn(query, ref, x[:, :-1], levels)
    with pytest.raises(ValueError, match="L=3"):  # a layout of 2 levels for a 3-level module
        attn(query, ref, x[:, :41], levels.first(2))
    with pytest.raises(ValueError, match="padding_mask"):  # the layout itself is validated once
        LevelLayout(levels.sizes, levels.spatial_shapes, levels.level_start_index,
                    torch.zeros(x.shape[:2]), levels.valid_ratios)


def _previous_core(value, sizes, loc, weights):
    """The per-level formulation of the core: one grid_sample per level on a (Q, P) grid,
    all levels stacked, then one weighted sum. Kept here as the reference the faster formulations (the
    weighted gather of ``ms_deform_attn_core``, and ``ms_deform_attn_grid_sample`` that ONNX export
    uses) must equal."""
    N, S, M, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    grids = 2 * loc - 1
    sampled = []
    for lvl, (v, (h, w)) in enumerate(zip(value.split([h * w for h, w in sizes], dim=1), sizes)):
        v = v.permute(0, 2, 3, 1).reshape(N * M, D, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(N * M, Q, P, 2)
        sampled.append(torch.nn.functional.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                                       align_corners=False))
    w = weights.transpose(1, 2).reshape(N * M, 1, Q, L * P)
    return (torch.stack(sampled, dim=-2).flatten(-2) * w).sum(-1).view(N, M * D, Q).transpose(1, 2)


def test_core_equals_the_previous_implementation_float64():
    """Outputs and all three gradients equal the replaced per-level-stack implementation in float64."""
    g = torch.Generator().manual_seed(11)
    sizes = [(13, 17), (7, 9), (4, 5), (2, 3)]
    N, Q, M, D, P = 2, 23, 4, 8, 3
    S = sum(h * w for h, w in sizes)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64, requires_grad=True)
    loc = (torch.rand(N, Q, M, len(sizes), P, 2, generator=g, dtype=torch.float64) * 1.3 - 0.15).requires_grad_(True)
    weights = torch.rand(N, Q, M, len(sizes), P, generator=g, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(N, Q, M * D, generator=g, dtype=torch.float64)
    old = _previous_core(value, sizes, loc, weights)
    old_grads = torch.autograd.grad(old, (value, loc, weights), grad_out)
    for formulation in (ms_deform_attn_core, ms_deform_attn_grid_sample):
        new = formulation(value, sizes, loc, weights)
        # float64, other summation orders: ~1e-15 on O(1) outputs; gradients (x level size <= 17): 1e-11
        torch.testing.assert_close(new, old, atol=1e-12, rtol=0)
        for a, b in zip(torch.autograd.grad(new, (value, loc, weights), grad_out), old_grads):
            torch.testing.assert_close(a, b, atol=1e-11, rtol=0)


def test_core_propagates_nan_and_reads_zeros_far_outside():
    """A NaN location or attention weight gives NaN for its (query, head), as grid_sample does, instead of
    an index error or a silent number; an infinite location reads zeros (its corners are all outside)."""
    g = torch.Generator().manual_seed(12)
    N, Q, M, D, P = 1, 4, 2, 3, 2
    S = sum(h * w for h, w in SHAPES)
    value = torch.randn(N, S, M, D, generator=g)
    loc = torch.rand(N, Q, M, len(SHAPES), P, 2, generator=g)
    weights = torch.rand(N, Q, M, len(SHAPES), P, generator=g)
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    weights[0, 1, 1, 2, 1] = float("nan")
    out = ms_deform_attn_core(value, _spatial_shapes(), loc, weights).view(N, Q, M, D)
    nan = out.isnan().any(-1)[0]
    assert nan[0, 0] and nan[1, 1] and nan.sum() == 2
    only_inf = torch.zeros_like(weights)
    only_inf[0, 2, 0, 1, 0] = 1.0
    loc[0, 2, 0, 1, 0] = torch.tensor([float("inf"), -float("inf")])
    assert ms_deform_attn_core(value, _spatial_shapes(), loc, only_inf)[0, 2].abs().max() == 0


def test_export_traces_the_grid_sample_formulation():
    """While torch.export traces (ONNX export), the core is written with grid_sample (ONNX GridSample);
    in eager mode it is the weighted gather (embedding_bag exports as a loop over bags)."""
    sizes = _spatial_shapes()

    class Core(torch.nn.Module):
        def forward(self, value, loc, weights):
            return ms_deform_attn_core(value, sizes, loc, weights)

    S = sum(h * w for h, w in sizes)
    args = (torch.randn(1, S, 2, 3), torch.rand(1, 4, 2, len(sizes), 2, 2), torch.rand(1, 4, 2, len(sizes), 2))
    ops = {str(n.target) for n in torch.export.export(Core(), args).graph.nodes if n.op == "call_function"}
    assert "aten.grid_sampler.default" in ops and not any("embedding_bag" in op for op in ops)
    with torch.profiler.profile() as prof:
        Core()(*args)
    assert any("embedding_bag" in e.key for e in prof.key_averages())
