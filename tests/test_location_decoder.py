"""Tests for the location decoder (paper Sec. 3.3.2, App. B.2)."""

import math

import pytest
import torch
import torch.nn.functional as F

from panoptic_segformer.modeling.layers import MLP, inverse_sigmoid
from panoptic_segformer.modeling.levels import LevelLayout
from panoptic_segformer.modeling.location_decoder import LocationDecoder, LocationDecoderLayer

D_MODEL, HEADS, LEVELS, POINTS, FFN = 32, 2, 3, 2, 64
SHAPES = [(8, 12), (4, 6), (2, 3)]
NUM_CLASSES, NUM_QUERIES = 5, 7


def make_inputs(n=2, seed=0):
    """Random tokens F of a padded batch: image 0 fills the maps, image 1 only the top-left part."""
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    memory = torch.randn(n, s, D_MODEL, generator=g)
    masks = []
    for h, w in SHAPES:
        m = torch.zeros(n, h, w, dtype=torch.bool)
        if n > 1:
            m[1, h // 2 :, :] = True  # image 1 covers the top half ...
            m[1, :, (2 * w) // 3 :] = True  # ... and two thirds of the width
        masks.append(m)
    return memory, LevelLayout.from_padding_masks(masks)


def build(num_layers=3, box_free=False, seed=0):
    torch.manual_seed(seed)
    dec = LocationDecoder(
        NUM_CLASSES,
        d_model=D_MODEL,
        num_layers=num_layers,
        num_queries=NUM_QUERIES,
        n_heads=HEADS,
        n_levels=LEVELS,
        n_points=POINTS,
        d_ffn=FFN,
        dropout=0.0,
        box_free=box_free,
    )
    return dec.eval()


def randomize_box_heads(dec, scale=0.5):
    """Zero-initialised box heads refine nothing; give them weights so refinement is visible."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for mlp in dec.bbox_embed:
            last = mlp.layers[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=g) * scale)
            last.bias.copy_(torch.randn(last.bias.shape, generator=g) * scale)


def test_mlp_is_linear_relu_stack():
    torch.manual_seed(0)
    mlp = MLP(6, 10, 3, 3)
    assert [tuple(layer.weight.shape) for layer in mlp.layers] == [(10, 6), (10, 10), (3, 10)]
    x = torch.randn(4, 6)
    expected = mlp.layers[2](F.relu(mlp.layers[1](F.relu(mlp.layers[0](x)))))
    torch.testing.assert_close(mlp(x), expected)  # the same layers in the same order: default float32 tol
    with pytest.raises(ValueError):
        MLP(6, 10, 3, 0)


def test_inverse_sigmoid_inverts_sigmoid_and_is_finite_at_bounds():
    x = torch.linspace(-6, 6, 25)
    # float32: 1 - sigmoid(6) ~ 2.5e-3 keeps ~6e-8 absolute, ~3e-5 relative, which log passes on: atol 1e-3
    torch.testing.assert_close(inverse_sigmoid(torch.sigmoid(x)), x, atol=1e-3, rtol=1e-4)
    edge = inverse_sigmoid(torch.tensor([0.0, 1.0, -0.5, 1.5]))
    assert torch.isfinite(edge).all()
    # float32 log(1e-5) vs float64: one rounding (~1e-7 relative), inside approx's rel 1e-6
    assert edge[0] == pytest.approx(math.log(1e-5)) and edge[1] == pytest.approx(-math.log(1e-5))


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("box_free", [False, True])
def test_output_shapes_and_box_range(num_layers, box_free):
    dec = build(num_layers, box_free)
    randomize_box_heads(dec, scale=3.0)  # push boxes far from 0.5: sigmoid must still bound them
    memory, levels = make_inputs()
    ratios = levels.valid_ratios
    out = dec(memory, levels)
    box_dim = 2 if box_free else 4
    assert out["queries"].shape == (2, NUM_QUERIES, D_MODEL)
    assert out["query_pos"].shape == (2, NUM_QUERIES, D_MODEL)
    assert len(out["pred_logits"]) == len(out["pred_boxes"]) == num_layers
    assert len(out["reference_points"]) == num_layers + 1
    for logits, boxes in zip(out["pred_logits"], out["pred_boxes"]):
        assert logits.shape == (2, NUM_QUERIES, NUM_CLASSES)
        assert boxes.shape == (2, NUM_QUERIES, box_dim)
        assert (boxes > 0).all() and (boxes < 1).all()
    assert out["reference_points"][0].shape[-1] == 2
    assert out["reference_points"][-1].shape[-1] == box_dim


def test_zero_layers_returns_thing_queries_unchanged():
    dec = build(num_layers=0)
    assert len(dec.layers) == 0 and len(dec.class_embed) == 0 and len(dec.bbox_embed) == 0
    memory, levels = make_inputs()
    ratios = levels.valid_ratios
    out = dec(memory, levels)
    pos, tgt = dec.query_embed.weight.split(D_MODEL, dim=1)
    assert out["queries"].shape == (2, NUM_QUERIES, D_MODEL)
    # copies of the embedding, no arithmetic: equal (default float32 tolerance, both)
    torch.testing.assert_close(out["queries"], tgt.expand(2, -1, -1))
    torch.testing.assert_close(out["query_pos"], pos.expand(2, -1, -1))
    assert out["pred_logits"] == [] and out["pred_boxes"] == []


def test_initialisation_matches_deformable_detr():
    dec = build(num_layers=2)
    for fc in dec.class_embed:  # float32 sigmoid(-log(99)): a few ulps of 0.01, default float32 tolerance
        torch.testing.assert_close(torch.sigmoid(fc.bias), torch.full((NUM_CLASSES,), 0.01))
    memory, levels = make_inputs()
    ratios = levels.valid_ratios
    out = dec(memory, levels)
    # zero-initialised last box layer: layer 0 keeps the initial centres, and w = h = sigmoid(-2).
    boxes0 = out["pred_boxes"][0]
    # float32 sigmoid(inverse_sigmoid(r)): the 1 - r rounding (~6e-8) comes back scaled by the slope <= 1/4;
    # w, h: the same float32 sigmoid(-2) (default tolerance)
    torch.testing.assert_close(boxes0[..., :2], out["reference_points"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        boxes0[..., 2:], torch.full_like(boxes0[..., 2:], torch.sigmoid(torch.tensor(-2.0)).item())
    )


def test_iterative_refinement_changes_and_detaches_reference_points():
    dec = build(num_layers=3)
    randomize_box_heads(dec)
    memory, levels = make_inputs()
    ratios = levels.valid_ratios
    out = dec(memory, levels)
    refs, boxes = out["reference_points"], out["pred_boxes"]
    for k in range(3):
        # the refined box of layer k is the next reference point, detached (the same values: default tol)
        torch.testing.assert_close(refs[k + 1], boxes[k].detach())
        assert not refs[k + 1].requires_grad and boxes[k].requires_grad
        # and it really moved the centres
        assert (boxes[k][..., :2] - refs[k][..., :2]).abs().max() > 1e-3  # a real move, not float32 rounding
    # refinement is in inverse-sigmoid space relative to the layer's input reference
    expected_last = (dec.bbox_embed[2](out["queries"]) + inverse_sigmoid(refs[2])).sigmoid()
    torch.testing.assert_close(boxes[2], expected_last)  # the decoder's own float32 ops: default tolerance

    # gradient of layer-1 boxes does not reach layer-0's box head (its output was detached) ...
    boxes[1].sum().backward(retain_graph=True)
    assert all(p.grad is None for p in dec.bbox_embed[0].parameters())
    assert dec.bbox_embed[1].layers[-1].weight.grad.abs().sum() > 0
    # ... while layer-0 boxes do train it, and the initial reference points get gradients.
    dec.zero_grad(set_to_none=True)
    boxes[0].sum().backward()
    assert dec.bbox_embed[0].layers[-1].weight.grad.abs().sum() > 0
    assert dec.reference_points.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("box_free", [False, True])
def test_reference_points_given_to_deformable_attention_are_scaled_by_valid_ratios(box_free):
    dec = build(num_layers=3, box_free=box_free)
    randomize_box_heads(dec)
    memory, levels = make_inputs()
    ratios = levels.valid_ratios
    seen = []
    hooks = [
        layer.cross_attn.register_forward_pre_hook(lambda mod, args: seen.append(args[1].detach().clone()))
        for layer in dec.layers
    ]
    out = dec(memory, levels)
    for h in hooks:
        h.remove()
    assert len(seen) == 3
    for k, ref_input in enumerate(seen):
        ref = out["reference_points"][k].detach()
        scale = ratios if ref.shape[-1] == 2 else torch.cat([ratios, ratios], -1)
        assert ref_input.shape == (2, NUM_QUERIES, LEVELS, ref.shape[-1])
        torch.testing.assert_close(ref_input, ref[:, :, None] * scale[:, None])  # the same one product
    assert seen[0].shape[-1] == 2
    assert seen[2].shape[-1] == (2 if box_free else 4)
    assert (ratios[1] < 1).all()  # the padded image really is rescaled


def test_layer_is_post_norm_and_uses_self_attention():
    torch.manual_seed(0)
    layer = LocationDecoderLayer(D_MODEL, FFN, 0.0, LEVELS, HEADS, POINTS).eval()
    memory, levels = make_inputs()
    ratios = levels.valid_ratios
    tgt = torch.randn(2, 4, D_MODEL)
    pos = torch.randn(2, 4, D_MODEL)
    ref = torch.rand(2, 4, LEVELS, 2)
    out = layer(tgt, pos, ref, memory, levels)
    assert out.shape == tgt.shape
    # post-norm: every output token is layer-normalised (float32 mean of 32 O(1) values: ~1e-7, so 1e-5)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    # self-attention: a query's output depends on the other queries
    tgt2 = tgt.clone()
    tgt2[:, 1:] += 1.0
    # other queries moved by 1: query 0 moves far beyond float32 rounding (~1e-6)
    assert (layer(tgt2, pos, ref, memory, levels)[:, 0] - out[:, 0]).abs().max() > 1e-4


def test_bad_inputs_raise_value_error():
    dec = build(num_layers=1)
    memory, levels = make_inputs()
    ratios = levels.valid_ratios
    pad = levels.padding_mask
    with pytest.raises(ValueError, match="valid_ratios"):
        LevelLayout(levels.sizes, levels.spatial_shapes, levels.level_start_index, pad, ratios[:, :2])
    with pytest.raises(ValueError, match="memory"):
        dec(memory[..., :-1], levels)
    with pytest.raises(ValueError, match="n_levels=3"):
        dec(memory[:, :levels.first(2).num_tokens], levels.first(2))
    with pytest.raises(ValueError, match="padding_mask"):
        LevelLayout(levels.sizes, levels.spatial_shapes, levels.level_start_index, pad.float(), ratios)
