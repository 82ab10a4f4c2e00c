"""Tests for the mask decoder (paper Sec. 3.3.3, Eq. 1-2, App. B.3, Fig. B.4/B.5)."""

import pytest
import torch
import torch.nn.functional as F

from panoptic_segformer.modeling.mask_decoder import (
    AttentionMaskHead,
    MaskDecoder,
    MultiHeadCrossAttentionWithMaps,
)
from panoptic_segformer.modeling.levels import LevelLayout

D_MODEL, HEADS, FFN = 32, 2, 64
SHAPES = [(8, 12), (4, 6), (2, 3)]
BIG_SHAPES = [(16, 24), (8, 12), (4, 6)]  # partner image twice as large: exact 1/8, 1/16, 1/32 grids
NUM_THING_CLASSES = 4


def layout(shapes, pad=None, n=2):
    """LevelLayout of ``shapes`` with the (N, S) token padding mask ``pad`` (default: none)."""
    base = LevelLayout.from_sizes(shapes, n if pad is None else pad.shape[0])
    if pad is None:
        return base
    return LevelLayout(base.sizes, base.spatial_shapes, base.level_start_index, pad, base.valid_ratios)


def build(num_layers=3, self_attn=False, seed=0):
    torch.manual_seed(seed)
    dec = MaskDecoder(
        NUM_THING_CLASSES,
        d_model=D_MODEL,
        num_layers=num_layers,
        n_heads=HEADS,
        n_levels=3,
        d_ffn=FFN,
        dropout=0.0,
        self_attn=self_attn,
    )
    return dec.eval()


def run(dec, queries, pos, n_th, memory, memory_pos, pad, shapes, **kw):
    return dec(queries, pos, n_th, memory, memory_pos, layout(shapes, pad, memory.shape[0]), **kw)


# ----------------------------------------------------------------------------- AttentionMaskHead


def test_mask_head_parameter_count_matches_formula():
    head = AttentionMaskHead(n_heads=8, n_levels=3, hidden=8)
    count = sum(p.numel() for p in head.parameters())
    assert count == AttentionMaskHead.num_parameters_formula(8, 3, 8) == 8 * (24 + 2) + 1 == 209
    small = AttentionMaskHead(n_heads=2, n_levels=3, hidden=4)
    assert sum(p.numel() for p in small.parameters()) == 4 * (6 + 2) + 1


def random_attention(n=2, q=3, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, HEADS, q, sum(h * w for h, w in shapes), generator=g)


def test_eq1_split_matches_manual_slices():
    head = AttentionMaskHead(HEADS, 3, 4)
    attn = random_attention()
    starts = torch.tensor(layout(SHAPES).starts)
    levels = head.split(attn, layout(SHAPES))
    assert [tuple(x.shape) for x in levels] == [(6, HEADS, h, w) for h, w in SHAPES]
    for n, q, hd in [(0, 0, 0), (1, 2, 1), (1, 0, 1)]:
        for lvl, ((h, w), s) in enumerate(zip(SHAPES, starts.tolist())):
            manual = attn[n, hd, q, s : s + h * w].view(h, w)
            # views of the same tensor, no arithmetic: bit-equal
            torch.testing.assert_close(levels[lvl][n * 3 + q, hd], manual, rtol=0, atol=0)


def test_eq2_fused_maps_are_bilinear_upsampled_manual_slices():
    head = AttentionMaskHead(HEADS, 3, 4)
    attn = random_attention()
    starts = torch.tensor(layout(SHAPES).starts)
    fused = head.fuse(attn, layout(SHAPES))
    assert fused.shape == (6, HEADS * 3, 8, 12)
    n, q, hd = 1, 2, 1
    for lvl, ((h, w), s) in enumerate(zip(SHAPES, starts.tolist())):
        manual = attn[n, hd, q, s : s + h * w].view(1, 1, h, w)
        if lvl > 0:
            manual = F.interpolate(manual, size=(8, 12), mode="bilinear", align_corners=False)
        # channels are level-major: Concat(A_1, Up(A_2), Up(A_3)), each with h heads (the same per-pixel
        # bilinear sums of the same values: default float32 tolerance)
        torch.testing.assert_close(fused[n * 3 + q, lvl * HEADS + hd], manual[0, 0])


@pytest.mark.parametrize("shapes", [SHAPES, [(7, 9), (4, 5), (2, 3)]])
def test_mask_head_forward_equals_convs_on_fused_maps(shapes):
    torch.manual_seed(0)
    head = AttentionMaskHead(HEADS, 3, 4)
    attn = random_attention(shapes=shapes)
    masks = head(attn, layout(shapes))
    assert masks.shape == (2, 3) + shapes[0]  # odd level-1 sizes work: size= of level 1
    reference = head.conv2(F.relu(head.conv1(head.fuse(attn, layout(shapes)))))
    # the head mixes the 6 channels before upsampling, the reference after: float32 sums in another order
    # (~1e-7 on O(1) logits), so 1e-5 (both checks)
    torch.testing.assert_close(masks, reference.view(2, 3, *shapes[0]), atol=1e-5, rtol=1e-5)
    # the same holds with a padding mask (edge replication before upsampling)
    pad = torch.zeros(2, attn.shape[-1], dtype=torch.bool)
    s = 0
    for h, w in shapes:
        m = torch.zeros(h, w, dtype=torch.bool)
        m[(h + 1) // 2 :, :] = True
        pad[1, s : s + h * w] = m.flatten()
        s += h * w
    masks = head(attn, layout(shapes, pad))
    reference = head.conv2(F.relu(head.conv1(head.fuse(attn, layout(shapes, pad)))))
    torch.testing.assert_close(masks, reference.view(2, 3, *shapes[0]), atol=1e-5, rtol=1e-5)


def test_mask_head_rejects_mismatched_attention():
    head = AttentionMaskHead(HEADS, 3, 4)
    with pytest.raises(ValueError, match="attn"):
        head(random_attention()[..., :-1], layout(SHAPES))
    with pytest.raises(ValueError, match="levels"):
        head(random_attention(), layout(SHAPES[:2]))


# ----------------------------------------------------------------------------- cross-attention


def test_cross_attention_returns_pre_softmax_maps_and_ignores_padding():
    torch.manual_seed(0)
    attn_mod = MultiHeadCrossAttentionWithMaps(D_MODEL, HEADS, dropout=0.0).eval()
    query, qpos = torch.randn(2, 5, D_MODEL), torch.randn(2, 5, D_MODEL)
    memory, mpos = torch.randn(2, 20, D_MODEL), torch.randn(2, 20, D_MODEL)
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[1, 12:] = True
    out, attn = attn_mod(query, memory, qpos, mpos, pad)
    assert out.shape == (2, 5, D_MODEL) and attn.shape == (2, HEADS, 5, 20)
    d = D_MODEL // HEADS
    q = attn_mod.q_proj(query + qpos).view(2, 5, HEADS, d).transpose(1, 2)
    k = attn_mod.k_proj(memory + mpos).view(2, 20, HEADS, d).transpose(1, 2)
    torch.testing.assert_close(attn, q @ k.transpose(-1, -2) / d**0.5)  # scale 1/4 exact: the same products
    # value path = softmax over the non-padding keys of the same logits
    v = attn_mod.v_proj(memory).view(2, 20, HEADS, d).transpose(1, 2)
    weights = attn.masked_fill(pad[:, None, None, :], float("-inf")).softmax(-1)
    expected = attn_mod.out_proj((weights @ v).transpose(1, 2).reshape(2, 5, D_MODEL))
    # fused SDPA vs explicit softmax over 20 keys: float32 rounding (~1e-7 on O(1) values), so 1e-5
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # changing padded tokens changes nothing in the output
    memory2 = memory.clone()
    memory2[1, 12:] += 5.0
    out2, _ = attn_mod(query, memory2, qpos, mpos, pad)
    torch.testing.assert_close(out2, out)  # padded keys weigh exactly 0: the same sums (default float32 tol)


# ----------------------------------------------------------------------------- MaskDecoder


def random_decoder_inputs(n=2, q=6, shapes=SHAPES, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    return (
        torch.randn(n, q, D_MODEL, generator=g),
        torch.randn(n, q, D_MODEL, generator=g),
        torch.randn(n, s, D_MODEL, generator=g),
        torch.randn(n, s, D_MODEL, generator=g),
    )


def test_output_format_for_every_layer():
    dec = build(num_layers=3)
    queries, pos, memory, mpos = random_decoder_inputs()
    outs = run(dec, queries, pos, 4, memory, mpos, None, SHAPES)
    assert len(outs) == 3
    for out in outs:
        assert set(out) == {"thing_logits", "stuff_logits", "pred_masks"}
        assert out["thing_logits"].shape == (2, 4, NUM_THING_CLASSES)
        assert out["stuff_logits"].shape == (2, 2)
        assert out["pred_masks"].shape == (2, 6, 8, 12)
    # layers really refine: different layers give different masks
    assert (outs[0]["pred_masks"] - outs[2]["pred_masks"]).abs().max() > 1e-4  # far above float32 rounding
    # class-fixed stuff FC: one logit per stuff query; focal prior on all class FCs
    for fc in list(dec.stuff_class_embed) + list(dec.thing_class_embed):  # float32 sigmoid(-log 99): few ulps
        torch.testing.assert_close(torch.sigmoid(fc.bias), torch.full_like(fc.bias, 0.01))
    assert all(fc.out_features == 1 for fc in dec.stuff_class_embed)
    # one mask head per layer
    assert len(dec.mask_heads) == 3 and dec.mask_heads[0] is not dec.mask_heads[1]


def test_joint_matching_and_stuff_only_query_sets():
    dec = build(num_layers=2)
    queries, pos, memory, mpos = random_decoder_inputs()
    only_things = run(dec, queries, pos, 6, memory, mpos, None, SHAPES)
    assert only_things[-1]["stuff_logits"].shape == (2, 0)
    assert only_things[-1]["thing_logits"].shape == (2, 6, NUM_THING_CLASSES)
    only_stuff = run(dec, queries, pos, 0, memory, mpos, None, SHAPES)
    assert only_stuff[-1]["thing_logits"].shape == (2, 0, NUM_THING_CLASSES)
    assert only_stuff[-1]["stuff_logits"].shape == (2, 6)
    # no self-attention by default: queries do not interact, the split point only changes the heads (the same
    # mask ops on the same tensors: default float32 tolerance)
    torch.testing.assert_close(only_things[-1]["pred_masks"], only_stuff[-1]["pred_masks"])


def test_num_layers_and_return_attention():
    dec = build(num_layers=3)
    queries, pos, memory, mpos = random_decoder_inputs()
    full = run(dec, queries, pos, 4, memory, mpos, None, SHAPES, return_attention=True)
    first = run(dec, queries, pos, 4, memory, mpos, None, SHAPES, num_layers=1)
    assert len(first) == 1 and "attention" not in first[0]
    for key in ("thing_logits", "stuff_logits", "pred_masks"):  # the same layer-0 ops: default float32 tol
        torch.testing.assert_close(first[0][key], full[0][key])
    s = sum(h * w for h, w in SHAPES)
    assert all(out["attention"].shape == (2, HEADS, 6, s) for out in full)
    # the returned maps are the ones the masks are built from (the same head on them: default tolerance)
    torch.testing.assert_close(dec.mask_heads[1](full[1]["attention"], layout(SHAPES)), full[1]["pred_masks"])
    with pytest.raises(ValueError, match="num_layers"):
        run(dec, queries, pos, 4, memory, mpos, None, SHAPES, num_layers=4)


def test_self_attention_switch():
    plain, with_sa = build(self_attn=False), build(self_attn=True)
    names_plain = {n for n, _ in plain.named_parameters()}
    names_sa = {n for n, _ in with_sa.named_parameters()}
    assert names_plain < names_sa
    extra = names_sa - names_plain
    assert {n.split(".")[2] for n in extra} == {"self_attn", "norm_sa"}
    assert any(n.startswith("layers.0.self_attn.") for n in extra)
    # with self-attention, queries interact: perturbing query 5 changes the mask of query 0; without, query
    # 0's rows go through the same ops (difference 0), with it they move far beyond 1e-5
    queries, pos, memory, mpos = random_decoder_inputs()
    q2 = queries.clone()
    q2[:, 5] += 1.0
    for dec, interacts in ((plain, False), (with_sa, True)):
        a = run(dec, queries, pos, 4, memory, mpos, None, SHAPES)[-1]["pred_masks"][:, 0]
        b = run(dec, q2, pos, 4, memory, mpos, None, SHAPES)[-1]["pred_masks"][:, 0]
        assert ((a - b).abs().max() > 1e-5) == interacts


def test_padding_invariance_alone_vs_batched():
    dec = build(num_layers=2)
    q_alone, pos_alone, mem_alone, mpos_alone = random_decoder_inputs(n=1, seed=3)
    alone = run(dec, q_alone, pos_alone, 4, mem_alone, mpos_alone, None, SHAPES, return_attention=True)

    # batch it (as image 0) with a twice-as-large partner; padded tokens hold junk
    g = torch.Generator().manual_seed(7)
    s_big = sum(h * w for h, w in BIG_SHAPES)
    memory = torch.randn(2, s_big, D_MODEL, generator=g) * 10
    mpos = torch.randn(2, s_big, D_MODEL, generator=g) * 10
    pad = torch.zeros(2, s_big, dtype=torch.bool)
    valid_cols = []
    s_small = s_bigp = 0
    for (h, w), (H, W) in zip(SHAPES, BIG_SHAPES):
        m = torch.ones(H, W, dtype=torch.bool)
        m[:h, :w] = False
        pad[0, s_bigp : s_bigp + H * W] = m.flatten()
        idx = s_bigp + (torch.arange(h)[:, None] * W + torch.arange(w)[None]).flatten()
        memory[0, idx] = mem_alone[0, s_small : s_small + h * w]
        mpos[0, idx] = mpos_alone[0, s_small : s_small + h * w]
        valid_cols.append(idx)
        s_small += h * w
        s_bigp += H * W
    queries = torch.cat([q_alone, torch.randn(1, 6, D_MODEL, generator=g)])
    pos = torch.cat([pos_alone, torch.randn(1, 6, D_MODEL, generator=g)])
    batched = run(dec, queries, pos, 4, memory, mpos, pad, BIG_SHAPES, return_attention=True)

    # float32, alone vs batched with a padded partner: other matmul / softmax lengths and blockings (~1e-7
    # each) through 2 layers; the bilinear weights are the same (scale 2 on both grids): atol 1e-5, rtol 1e-4
    for a, b in zip(alone, batched):
        torch.testing.assert_close(b["thing_logits"][0], a["thing_logits"][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b["stuff_logits"][0], a["stuff_logits"][0], atol=1e-5, rtol=1e-4)
        assert b["pred_masks"].shape == (2, 6, 16, 24)
        torch.testing.assert_close(b["pred_masks"][0, :, :8, :12], a["pred_masks"][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            b["attention"][0][..., torch.cat(valid_cols)], a["attention"][0], atol=1e-5, rtol=1e-4
        )

    # the junk in padded tokens reaches no output of image 0, not even the padded part of its masks
    memory2, mpos2 = memory.clone(), mpos.clone()
    memory2[0, pad[0]] = -memory2[0, pad[0]] + 3.0
    mpos2[0, pad[0]] = 0.0
    again = run(dec, queries, pos, 4, memory2, mpos2, pad, BIG_SHAPES)
    # padded keys weigh exactly 0 and padded map cells are overwritten (edge replication, fill): the same
    # values; tolerances as above
    for b, c in zip(batched, again):
        torch.testing.assert_close(c["pred_masks"][0], b["pred_masks"][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(c["thing_logits"][0], b["thing_logits"][0], atol=1e-5, rtol=1e-4)


def test_gradients_reach_queries_through_attention_masks():
    dec = build(num_layers=2)
    dec.train()
    queries, pos, memory, mpos = random_decoder_inputs()
    queries.requires_grad_(True)
    memory.requires_grad_(True)
    out = run(dec, queries, pos, 4, memory, mpos, None, SHAPES, num_layers=1)
    # layer-1 masks depend on the queries only through the attention logits q.k (Sec. 3.3.3)
    (out[0]["pred_masks"] ** 2).mean().backward()
    assert queries.grad.abs().sum() > 0 and memory.grad.abs().sum() > 0
    cross = dec.layers[0].cross_attn
    assert cross.q_proj.weight.grad.abs().sum() > 0 and cross.k_proj.weight.grad.abs().sum() > 0
    assert cross.v_proj.weight.grad is None and cross.out_proj.weight.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.mask_heads[0].parameters())
    assert all(p.grad is None for p in dec.thing_class_embed[0].parameters())


def test_bad_inputs_raise_value_error():
    dec = build(num_layers=1)
    queries, pos, memory, mpos = random_decoder_inputs()
    with pytest.raises(ValueError, match="queries"):
        run(dec, queries[..., :-1], None, 4, memory, mpos, None, SHAPES)
    with pytest.raises(ValueError, match="num_thing_queries"):
        run(dec, queries, pos, 7, memory, mpos, None, SHAPES)
    with pytest.raises(ValueError, match="memory"):
        run(dec, queries, pos, 4, memory[:, :-1], mpos[:, :-1], None, SHAPES)
    with pytest.raises(ValueError, match="query_pos"):
        run(dec, queries, pos[:, :3], 4, memory, mpos, None, SHAPES)
    with pytest.raises(ValueError, match="padding_mask"):
        run(dec, queries, pos, 4, memory, mpos, torch.zeros(2, 5, dtype=torch.bool), SHAPES)


def test_masks_of_last_skips_the_maps_and_masks_of_earlier_layers():
    """Inference reads only the last layer's masks (only they feed the outputs, Sec. 3.3.3): with masks_of="last" the other layers
    compute neither attention maps nor masks, and everything that is returned is unchanged."""
    dec = build(num_layers=3)
    queries, pos, memory, mpos = random_decoder_inputs()
    full = run(dec, queries, pos, 4, memory, mpos, None, SHAPES)
    calls = []
    hooks = [layer.cross_attn.register_forward_hook(lambda mod, args, out: calls.append(out[1] is not None))
             for layer in dec.layers]
    last = run(dec, queries, pos, 4, memory, mpos, None, SHAPES, masks_of="last")
    for h in hooks:
        h.remove()
    assert calls == [False, False, True]
    assert [sorted(o) for o in last] == [["stuff_logits", "thing_logits"]] * 2 + [sorted(full[-1])]
    for a, b in zip(full, last):
        for key in b:
            assert torch.equal(a[key], b[key]), key
    with pytest.raises(ValueError, match="masks_of"):
        run(dec, queries, pos, 4, memory, mpos, None, SHAPES, masks_of="first")
