"""Tests of the transformer encoder (paper Sec. 3.2) and its positional encoding (App. A.1)."""

import math

import pytest
import torch

from panoptic_segformer.modeling.encoder import (
    DeformableTransformerEncoder,
    EncoderOutput,
    PositionEmbeddingSine,
    get_reference_points,
)
from panoptic_segformer.modeling.levels import LevelLayout, get_valid_ratio

C = 16
# valid (h, w) per level of two images; the batch pads each level to the larger one
SIZES_A = [(6, 8), (3, 4), (2, 2)]
SIZES_B = [(4, 5), (2, 3), (1, 2)]


def _pad_batch(feats_per_image, sizes_per_image):
    """Pad per-image level features (1, C, h, w) into (N, C, H, W) + masks (True = padding)."""
    srcs, masks = [], []
    for lvl in range(len(sizes_per_image[0])):
        H = max(s[lvl][0] for s in sizes_per_image)
        W = max(s[lvl][1] for s in sizes_per_image)
        src = torch.randn(len(feats_per_image), C, H, W, dtype=torch.float64) * 100  # garbage in padding
        mask = torch.ones(len(feats_per_image), H, W, dtype=torch.bool)
        for i, (feats, sizes) in enumerate(zip(feats_per_image, sizes_per_image)):
            h, w = sizes[lvl]
            src[i, :, :h, :w] = feats[lvl][0]
            mask[i, :h, :w] = False
        srcs.append(src)
        masks.append(mask)
    return srcs, masks


def _encoder(seed=0):
    torch.manual_seed(seed)
    enc = DeformableTransformerEncoder(d_model=C, num_layers=2, n_heads=4, n_levels=3, n_points=2, d_ffn=32)
    return enc.double().eval()


def _run(enc, srcs, masks):
    pe = PositionEmbeddingSine(num_pos_feats=C // 2)
    pos = [pe(m, dtype=torch.float64) for m in masks]
    return enc(srcs, masks, pos)


def _features(sizes, g):
    return [torch.randn(1, C, h, w, generator=g, dtype=torch.float64) for h, w in sizes]


def test_encoder_shapes_and_metadata_on_padded_batch():
    g = torch.Generator().manual_seed(0)
    srcs, masks = _pad_batch([_features(SIZES_A, g), _features(SIZES_B, g)], [SIZES_A, SIZES_B])
    out = _run(_encoder(), srcs, masks)
    assert isinstance(out, EncoderOutput)
    S = sum(h * w for h, w in SIZES_A)  # A is the larger image on every level
    assert out.memory.shape == (2, S, C) and out.pos.shape == (2, S, C)
    levels = out.levels
    assert levels.sizes == tuple(SIZES_A) and levels.starts == (0, 48, 60)
    assert levels.spatial_shapes.dtype == torch.long and levels.spatial_shapes.tolist() == [list(s) for s in SIZES_A]
    assert levels.level_start_index.dtype == torch.long and levels.level_start_index.tolist() == [0, 48, 60]
    assert levels.padding_mask.shape == (2, S) and levels.padding_mask.dtype == torch.bool
    assert not levels.padding_mask[0].any()
    assert int(levels.padding_mask[1].sum()) == S - sum(h * w for h, w in SIZES_B)
    # valid ratios (w_ratio, h_ratio) per level
    expected = torch.tensor(
        [[[1.0, 1.0]] * 3, [[wb / wa, hb / ha] for (ha, wa), (hb, wb) in zip(SIZES_A, SIZES_B)]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(levels.valid_ratios, expected)  # float64 ratios of counts: one rounding
    assert torch.isfinite(out.memory).all()


def test_get_valid_ratio():
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[0, :3, :2] = False
    mask[1] = False
    # float32 ratios of small counts, correctly rounded like the literals: default float32 tolerance
    torch.testing.assert_close(get_valid_ratio(mask), torch.tensor([[2 / 5, 3 / 4], [1.0, 1.0]]))


def test_reference_points_are_pixel_centres_in_valid_region():
    valid_ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.75], [0.5, 1.0]]], dtype=torch.float64)
    levels = LevelLayout.from_sizes([(4, 4), (2, 2)], 2)
    levels = LevelLayout(levels.sizes, levels.spatial_shapes, levels.level_start_index, levels.padding_mask,
                         valid_ratios)
    ref = get_reference_points(levels)
    assert ref.shape == (2, 16 + 4, 2, 2)
    # image 0, unpadded: token (i, j) of level 0 points at ((j + .5) / 4, (i + .5) / 4) on every level
    i, j = 2, 3
    # float64, a few ops per coordinate (here and below): rounding ~1e-16, default float64 tolerance 1e-7
    torch.testing.assert_close(ref[0, i * 4 + j, 0], torch.tensor([3.5 / 4, 2.5 / 4], dtype=torch.float64))
    torch.testing.assert_close(ref[0, i * 4 + j, 1], torch.tensor([3.5 / 4, 2.5 / 4], dtype=torch.float64))
    # image 1, level 0 valid 3x2: token (1, 1) normalized within the valid 2 cols x 3 rows, then
    # rescaled by each level's valid ratio into padded-map coordinates
    i, j = 1, 1
    rel = torch.tensor([1.5 / 2, 1.5 / 3], dtype=torch.float64)
    torch.testing.assert_close(ref[1, i * 4 + j, 0], rel * valid_ratios[1, 0])
    torch.testing.assert_close(ref[1, i * 4 + j, 1], rel * valid_ratios[1, 1])


def test_encoder_padding_invariance():
    """An image's tokens are the same whether it is encoded alone or padded next to a larger image."""
    g = torch.Generator().manual_seed(1)
    enc = _encoder(seed=3)
    feats_a, feats_b = _features(SIZES_A, g), _features(SIZES_B, g)
    alone_srcs, alone_masks = _pad_batch([feats_b], [SIZES_B])
    assert not any(m.any() for m in alone_masks)
    alone = _run(enc, alone_srcs, alone_masks)
    srcs, masks = _pad_batch([feats_a, feats_b], [SIZES_A, SIZES_B])
    batched = _run(enc, srcs, masks)
    valid_b = ~batched.levels.padding_mask[1]
    assert int(valid_b.sum()) == alone.memory.shape[1]
    # float64 throughout: padded batch vs alone differ by rounding only (~1e-15 through 2 layers), so 1e-10
    torch.testing.assert_close(batched.memory[1, valid_b], alone.memory[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(batched.pos[1, valid_b], alone.pos[0], atol=1e-10, rtol=1e-10)
    # and the partner does influence nothing: a different partner gives the same tokens
    srcs2, masks2 = _pad_batch([_features(SIZES_A, g), feats_b], [SIZES_A, SIZES_B])
    batched2 = _run(enc, srcs2, masks2)
    torch.testing.assert_close(batched2.memory[1, valid_b], alone.memory[0], atol=1e-10, rtol=1e-10)
    # the encoder is not the identity: tokens change through the layers
    flat_b = torch.cat([f.flatten(2).transpose(1, 2) for f in feats_b], 1)[0]
    assert (alone.memory[0] - flat_b).abs().max() > 1e-3  # LayerNorm-ed outputs vs raw inputs: O(1) apart


def test_encoder_backward_reaches_all_parameters():
    g = torch.Generator().manual_seed(2)
    enc = _encoder(seed=4).train()
    # at init the queries (and so the level embedding) do not move sampling points or attention weights
    # (zero weights, [12]); perturb them as training would
    with torch.no_grad():
        for layer in enc.layers:
            layer.self_attn.sampling_offsets.weight.normal_(0.0, 0.1, generator=g)
            layer.self_attn.attention_weights.weight.normal_(0.0, 0.1, generator=g)
    srcs, masks = _pad_batch([_features(SIZES_A, g), _features(SIZES_B, g)], [SIZES_A, SIZES_B])
    out = _run(enc, srcs, masks)
    (out.memory * torch.randn(out.memory.shape, generator=g, dtype=torch.float64)).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert enc.level_embed.grad.abs().sum() > 0
    assert enc.layers[0].self_attn.sampling_offsets.weight.grad.abs().sum() > 0
    assert enc.layers[0].self_attn.attention_weights.weight.grad.abs().sum() > 0


def test_encoder_input_validation():
    g = torch.Generator().manual_seed(3)
    enc = _encoder()
    srcs, masks = _pad_batch([_features(SIZES_A, g)], [SIZES_A])
    pos = [torch.zeros_like(s) for s in srcs]
    with pytest.raises(ValueError, match="n_levels"):
        enc(srcs[:2], masks[:2], pos[:2])
    with pytest.raises(ValueError, match=r"srcs\[1\]"):
        enc([srcs[0], srcs[1][:, :8], srcs[2]], masks, pos)
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        enc(srcs, [masks[0][:, :-1], masks[1], masks[2]], pos)
    with pytest.raises(ValueError, match=r"pos_embeds\[2\]"):
        enc(srcs, masks, [pos[0], pos[1], pos[2][:, :4]])
    with pytest.raises(ValueError, match="mask"):
        PositionEmbeddingSine()(torch.zeros(1, 3, 3))


def _sine_reference(mask, num_pos_feats, temperature, scale, offset=0.0):
    """Per-pixel, per-channel DETR sine encoding written from the formula with Python math."""
    N, H, W = mask.shape
    out = torch.zeros(N, 2 * num_pos_feats, H, W, dtype=torch.float64)
    for n in range(N):
        valid_h = sum(1 for i in range(H) if not mask[n, i, 0])
        valid_w = sum(1 for j in range(W) if not mask[n, 0, j])
        for i in range(H):
            for j in range(W):
                y_count = sum(1 for r in range(i + 1) if not mask[n, r, j])
                x_count = sum(1 for c in range(j + 1) if not mask[n, i, c])
                col_h = sum(1 for r in range(H) if not mask[n, r, j])
                row_w = sum(1 for c in range(W) if not mask[n, i, c])
                y = (y_count + offset) / (col_h + 1e-6) * scale
                x = (x_count + offset) / (row_w + 1e-6) * scale
                for k in range(num_pos_feats):
                    freq = temperature ** (2 * (k // 2) / num_pos_feats)
                    trig = math.sin if k % 2 == 0 else math.cos
                    out[n, k, i, j] = trig(y / freq)
                    out[n, num_pos_feats + k, i, j] = trig(x / freq)
        assert valid_h > 0 and valid_w > 0
    return out


@pytest.mark.parametrize("offset", [0.0, -0.5])
def test_position_embedding_sine_known_case(offset):
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, :, 3] = True  # image 1 is 2x3 valid
    mask[1, 2, :] = True
    pe = PositionEmbeddingSine(num_pos_feats=6, temperature=20, normalize=True, scale=2 * math.pi, offset=offset)
    out = pe(mask, dtype=torch.float64)
    assert out.shape == (2, 12, 3, 4)
    # float64 sin/cos of arguments <= 2 pi, other op order than Python math: rounding ~1e-15, so atol 1e-12
    torch.testing.assert_close(out, _sine_reference(mask, 6, 20, 2 * math.pi, offset), atol=1e-12, rtol=0)
    # normalized: the last valid row/column sits at (almost) `scale` regardless of padding (offset 0)
    if offset == 0.0:
        # y channels at the last valid row / x channels at the last valid column; the normalizer's eps:
        # 3 / (3 + 1e-6) vs 2 / (2 + 1e-6) is ~1.7e-7 apart, x 2 pi ~1e-6 in the argument, so atol 1e-5
        torch.testing.assert_close(out[0, :6, 2, 0], out[1, :6, 1, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[0, 6:, 0, 3], out[1, 6:, 0, 2], atol=1e-5, rtol=0)
    # a hand-computed value: image 1, pixel (1, 2), x channel 0 is sin(3/3 * 2pi / 1) (offset 0)
    if offset == 0.0:  # float64, the same formula: rounding only (~1e-16)
        assert abs(out[1, 6, 1, 2].item() - math.sin(3 / (3 + 1e-6) * 2 * math.pi)) < 1e-12


def test_position_embedding_sine_unnormalized():
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    out = PositionEmbeddingSine(num_pos_feats=4, temperature=100, normalize=False)(mask)
    # float32 sin/cos of the same arguments up to an ulp: the default float32 tolerance (here and below)
    # x channel 1 = cos(x / 100 ** (2 * (1 // 2) / 4)) = cos(x), x = j + 1
    torch.testing.assert_close(out[0, 5, 0], torch.cos(torch.tensor([1.0, 2.0, 3.0])))
    # y channel 2 = sin(y / 100 ** (2 / 4)) = sin(y / 10), y = i + 1
    torch.testing.assert_close(out[0, 2, :, 0], torch.sin(torch.tensor([0.1, 0.2])))
