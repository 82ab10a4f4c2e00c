"""The official-code mask decoder (MASK_DECODER_TYPE "official") and the meta-architecture switches used
to run converted official checkpoints: 4 feature levels, positional-encoding offset, thing classes from
the location decoder."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from panoptic_segformer.modeling.levels import LevelLayout
from panoptic_segformer.modeling.official_mask_decoder import (
    OfficialMaskDecoder,
    OfficialMaskHead,
)

from conftest import small_cfg

SHAPES = [(6, 8), (3, 4), (2, 2)]
STARTS = [0, 48, 60]
S = 64


def _layout(n):
    return LevelLayout.from_sizes(SHAPES, n)


def _decoder(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(num_thing_classes=5, d_model=32, n_heads=4, d_ffn=64, num_thing_layers=2,
                num_stuff_layers=3, thing_self_attn=False, stuff_self_attn=True, n_levels=3)
    args.update(kw)
    dec = OfficialMaskDecoder(**args).eval()
    for p in dec.parameters():  # ReLU heads at init are mostly 0; spread values so outputs are informative
        torch.nn.init.normal_(p, std=0.3)
    return dec


def _run(dec, queries, num_things, query_pos=None):
    memory = torch.randn(queries.shape[0], S, queries.shape[-1], generator=torch.Generator().manual_seed(3))
    return dec(queries, query_pos, num_things, memory, None, _layout(queries.shape[0]))


def test_official_mask_head_formula_and_size():
    torch.manual_seed(0)
    head = OfficialMaskHead(n_heads=8, n_levels=3)
    assert sum(p.numel() for p in head.parameters()) == 3 * (8 * 8 + 8) + 24 + 1  # 241
    attn = torch.randn(2, 8, 5, S)
    out = head(attn, _layout(2))
    assert out.shape == (2, 5, 6, 8) and (out >= 0).all()
    # Independent computation with convolutions on (N*Q, h, H, W) maps.
    maps = []
    for lvl, ((h, w), s) in enumerate(zip(SHAPES, STARTS)):
        a = attn[..., s:s + h * w].permute(0, 2, 1, 3).reshape(10, 8, h, w)
        fc = head.level_fcs[lvl]
        a = F.relu(F.conv2d(a, fc.weight[:, :, None, None], fc.bias))
        maps.append(F.interpolate(a, size=SHAPES[0], mode="bilinear", align_corners=False))
    ref = F.relu(F.conv2d(torch.cat(maps, 1), head.fc.weight[:, :, None, None], head.fc.bias))
    # Linear layers vs 1x1 convolutions (other float32 kernels, 8- and 24-term sums): ~1e-7, so 1e-5
    torch.testing.assert_close(out, ref.view(2, 5, 6, 8), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        head(attn[..., :-1], _layout(2))


def test_official_decoder_outputs_and_query_independence():
    dec = _decoder()
    q = torch.randn(1, 4 + 6, 32)
    pos = torch.randn(1, 10, 32)
    out = _run(dec, q, 4, pos)
    assert len(out) == 1
    o = out[0]
    assert o["thing_logits"].shape == (1, 4, 5) and o["stuff_logits"].shape == (1, 6)
    assert o["pred_masks"].shape == (1, 10, 6, 8) and (o["pred_masks"] >= 0).all()
    assert o["pred_masks"].max() > 0
    # Thing branch: no self-attention and no positional query -> each thing query is independent of
    # the others and of query_pos; dropping thing query 0 leaves the others unchanged.
    out2 = _run(dec, torch.cat([q[:, 1:4], q[:, 4:]], 1), 3, torch.cat([pos[:, 1:4], pos[:, 4:]], 1))[0]
    # 9 queries instead of 10: other matmul shapes, float32 rounding ~1e-7 over 2 layers, so 1e-5
    torch.testing.assert_close(out2["thing_logits"], o["thing_logits"][:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out2["pred_masks"], o["pred_masks"][:, 1:], rtol=1e-5, atol=1e-5)
    pos_other = pos.clone()
    pos_other[:, :4] = torch.randn(1, 4, 32)
    # query_pos is never read by the thing branch: the same ops and shapes (default float32 tolerance)
    torch.testing.assert_close(_run(dec, q, 4, pos_other)[0]["thing_logits"], o["thing_logits"])
    # Stuff branch: self-attention couples stuff queries (dropping one changes the others), and it is
    # permutation-equivariant; its positional queries matter.
    perm = torch.tensor([0, 1, 2, 3, 9, 8, 7, 6, 5, 4])
    out3 = _run(dec, q[:, perm], 4, pos[:, perm])[0]
    # permuted keys: self-attention sums in another order through 3 layers (~1e-6 relative), so rtol 1e-4;
    # dropping a stuff query or changing the positions moves the others far beyond atol 1e-4 (below)
    torch.testing.assert_close(out3["stuff_logits"], o["stuff_logits"][:, perm[4:] - 4], rtol=1e-4, atol=1e-5)
    out4 = _run(dec, q[:, :9], 4, pos[:, :9])[0]
    assert not torch.allclose(out4["stuff_logits"], o["stuff_logits"][:, :5], atol=1e-4)
    pos_other = pos.clone()
    pos_other[:, 4:] = torch.randn(1, 6, 32)
    assert not torch.allclose(_run(dec, q, 4, pos_other)[0]["stuff_logits"], o["stuff_logits"], atol=1e-4)


def test_official_decoder_rejects_unsupported_options():
    dec = _decoder()
    q = torch.randn(1, 5, 32)
    with pytest.raises(ValueError, match="NUM_MASK_DECODER_LAYERS"):
        dec(q, None, 2, torch.randn(1, S, 32), None, _layout(1), num_layers=1)
    with pytest.raises(ValueError, match="num_thing_queries"):
        _run(dec, q, 6)


OFFICIAL = ("MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_TYPE", "official",
            "MODEL.PANOPTIC_SEGFORMER.NUM_FEATURE_LEVELS", "4",
            "MODEL.PANOPTIC_SEGFORMER.POSITION_ENCODING_OFFSET", "-0.5",
            "MODEL.PANOPTIC_SEGFORMER.STUFF_MASK_DECODER_LAYERS", "2",
            "MODEL.PANOPTIC_SEGFORMER.TEST.THING_CLASS_SOURCE", "location_decoder",
            "MODEL.PANOPTIC_SEGFORMER.TEST.DETECTIONS_PER_IMAGE", "7")


def test_meta_architecture_in_official_mode():
    torch.manual_seed(0)
    model = build_model(small_cfg(*OFFICIAL)).eval()
    assert isinstance(model.mask_decoder, OfficialMaskDecoder)
    assert len(model.channel_mapper) == 4 and model.channel_mapper[3][0].stride == (2, 2)
    assert model.position_encoding.offset == -0.5
    image = torch.rand(3, 96, 128) * 255
    images = model.preprocess_image([{"image": image}])
    with torch.no_grad():
        out = model.forward_outputs(images)
        srcs, _, _ = model._multi_scale_inputs(images)
    # Four encoder levels, the fourth at half the resolution of the third.
    assert [tuple(s.shape[-2:]) for s in srcs][2:] == [(3, 4), (2, 2)]
    assert len(srcs) == 4 and out["levels"].num_levels == 3  # the mask decoder reads the backbone levels
    # Thing predictions are the top (query, class) pairs of the last location-decoder layer.
    loc = out["location"]["pred_logits"][-1][0]
    top = loc.flatten().topk(7)
    assert torch.equal(out["thing_query_index"][0], top.indices // loc.shape[1])
    thing_logits = out["mask"][-1]["thing_logits"][0]
    assert thing_logits.shape == (7, loc.shape[1])
    torch.testing.assert_close(thing_logits.max(-1).values, top.values)  # copies of the top values
    assert torch.equal(thing_logits.argmax(-1), top.indices % loc.shape[1])
    assert torch.isinf(thing_logits).sum() == 7 * (loc.shape[1] - 1)
    # Masks at 1/8 from the three backbone levels; end-to-end Detectron2 outputs.
    assert out["mask"][-1]["pred_masks"].shape[-2:] == (12, 16)
    with torch.no_grad():
        result = model([{"image": image, "height": 48, "width": 64}])[0]
    assert result["panoptic_seg"][0].shape == (48, 64)
    assert len(result["instances"]) <= 7 and result["sem_seg"].shape[-2:] == (48, 64)


def test_official_mode_is_inference_only_and_checked():
    model = build_model(small_cfg(*OFFICIAL)).train()
    with pytest.raises(RuntimeError, match="inference only"):
        model([{"image": torch.rand(3, 64, 64) * 255}])
    for opts, message in [
        (("MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_TYPE", "mmdet"), "MASK_DECODER_TYPE"),
        (OFFICIAL + ("MODEL.PANOPTIC_SEGFORMER.QUERY_DECOUPLING", "False"), "QUERY_DECOUPLING"),
        (OFFICIAL + ("MODEL.PANOPTIC_SEGFORMER.TEST.NUM_MASK_DECODER_LAYERS", "1"), "NUM_MASK_DECODER_LAYERS"),
        (("MODEL.PANOPTIC_SEGFORMER.NUM_FEATURE_LEVELS", "2"), "NUM_FEATURE_LEVELS"),
        (("MODEL.PANOPTIC_SEGFORMER.TEST.THING_CLASS_SOURCE", "box_head"), "THING_CLASS_SOURCE"),
        (("MODEL.PANOPTIC_SEGFORMER.TEST.THING_CLASS_SOURCE", "location_decoder",
          "MODEL.PANOPTIC_SEGFORMER.LOCATION_DECODER_LAYERS", "0"), "LOCATION_DECODER_LAYERS"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_model(small_cfg(*opts))

