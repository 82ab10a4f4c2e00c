"""panoptic_segformer/modeling/backbone: timm Swin / PVTv2 as Detectron2 backbones (App. D)."""
import logging
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone
from timm.layers import DropPath

from panoptic_segformer import add_panoptic_segformer_config
from panoptic_segformer.modeling.backbone import TimmBackbone

SWIN_T = "swin_tiny_patch4_window7_224"
PVT_B0 = "pvt_v2_b0"
ALL = ["res2", "res3", "res4", "res5"]
# timm module path of res_k's stage, per family (stage k-2).
STAGES = {SWIN_T: "model.layers.{}.", PVT_B0: "model.stages.{}."}


def _cfg(name, *opts):
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_timm_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.TIMM.NAME = name
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.0
    cfg.merge_from_list(list(opts))
    return cfg


def _build(name, *opts, seed=0):
    torch.manual_seed(seed)
    return build_backbone(_cfg(name, *opts))


@pytest.mark.parametrize("name", [SWIN_T, PVT_B0])
def test_odd_input_sizes_give_ceil_sized_outputs_matching_output_shape(name):
    b = _build(name, "MODEL.TIMM.OUT_FEATURES", str(ALL)).eval()
    assert isinstance(b, TimmBackbone) and b.size_divisibility == 32
    shapes = b.output_shape()
    assert [shapes[f].stride for f in ALL] == [4, 8, 16, 32]
    ref = timm.create_model(name, pretrained=False, num_classes=0)
    assert [shapes[f].channels for f in ALL] == [i["num_chs"] for i in ref.feature_info]
    for h, w in [(67, 131), (32, 33), (29, 17)]:
        with torch.no_grad():
            out = b(torch.randn(2, 3, h, w))
        assert list(out) == ALL
        for f, t in out.items():
            s = shapes[f].stride
            assert t.shape == (2, shapes[f].channels, math.ceil(h / s), math.ceil(w / s)), (f, h, w)
            assert torch.isfinite(t).all()


@pytest.mark.parametrize("name", [SWIN_T, PVT_B0])
def test_features_are_timm_intermediates_of_the_32_padded_image(name):
    """Internal padding = what Detectron2's ImageList does (zeros to a multiple of 32), then a crop."""
    b = _build(name, "MODEL.TIMM.OUT_FEATURES", str(ALL)).eval()
    x = torch.randn(1, 3, 67, 131)
    padded = F.pad(x, (0, 160 - 131, 0, 96 - 67))
    with torch.no_grad():
        out = b(x)
        whole = b(padded)
        ref = b.model.forward_intermediates(padded, intermediates_only=True)
    for f, r in zip(ALL, ref):
        s = b.output_shape()[f].stride
        crop = r[..., : math.ceil(67 / s), : math.ceil(131 / s)]
        # same padded input through the same timm ops: equal up to the default float32 tolerance
        torch.testing.assert_close(out[f], crop)
        torch.testing.assert_close(whole[f], r)  # divisible input: no padding, no crop


def test_swin_keeps_7x7_shifted_windows_at_any_size():
    """Window 7 (App. A.1) with shift 3 in every stage, as Swin's detection backbone, for any input."""
    b = _build(SWIN_T, "MODEL.TIMM.OUT_FEATURES", str(ALL))
    blocks = [blk for stage in b.model.layers for blk in stage.blocks]
    assert all(tuple(blk.window_size) == (7, 7) for blk in blocks)
    assert [tuple(blk.shift_size) for blk in blocks[:2]] == [(0, 0), (3, 3)]
    assert tuple(b.model.layers[3].blocks[1].shift_size) == (3, 3)  # timm's default drops it at 224 px


@pytest.mark.parametrize("name", [SWIN_T, PVT_B0])
def test_only_needed_stages_are_kept_and_all_parameters_get_gradients(name):
    """Pruned later stages/final norm/head: no unused parameters (DDP's find_unused_parameters=False)."""
    b = _build(name, "MODEL.TIMM.OUT_FEATURES", "['res2', 'res4']").train()
    assert list(b.output_shape()) == ["res2", "res4"]
    names = [n for n, _ in b.named_parameters()]
    assert any(n.startswith(STAGES[name].format(2)) for n in names)
    assert not any(n.startswith(STAGES[name].format(3)) for n in names)
    assert not any(n.startswith(("model.head", "model.norm.")) for n in names)
    assert all(n.startswith("model.") for n in names)  # checkpoint keys: backbone.model.<timm name>
    out = b(torch.randn(1, 3, 40, 56))
    sum(t.square().mean() for t in out.values()).backward()
    assert [n for n, p in b.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", [SWIN_T, PVT_B0])
def test_drop_path_rate_reaches_the_blocks(name):
    b = _build(name, "MODEL.TIMM.DROP_PATH_RATE", "0.3")
    rates = [m.drop_prob for m in b.modules() if isinstance(m, DropPath)]
    # approx rel 1e-6: timm's linspace(0, 0.3) ends at 0.3 up to float32 rounding (~1e-8)
    assert rates and max(rates) == pytest.approx(0.3) and min(rates) >= 0.0
    x = torch.randn(1, 3, 32, 32)
    torch.manual_seed(1)
    b.train()
    a, c = b(x)["res5"], b(x)["res5"]
    assert not torch.allclose(a, c)  # stochastic depth active in training: other branches dropped
    b.eval()
    torch.testing.assert_close(b(x)["res5"], b(x)["res5"])  # same input, same path: default float32 tolerance
    assert not any(isinstance(m, DropPath) for m in _build(name).modules())  # rate 0: no DropPath


@pytest.mark.parametrize("name", [SWIN_T, PVT_B0])
@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
def test_freeze_at_has_resnet_semantics(name, freeze_at):
    b = _build(name, "MODEL.BACKBONE.FREEZE_AT", str(freeze_at), "MODEL.TIMM.OUT_NORM", "True",
               "MODEL.TIMM.DROP_PATH_RATE", "0.2")
    frozen_prefixes = (["model.patch_embed."] if freeze_at >= 1 else []) + [
        STAGES[name].format(k - 2) for k in range(2, freeze_at + 1)]
    for n, p in b.named_parameters():
        assert p.requires_grad == (not n.startswith(tuple(frozen_prefixes))), n
    assert all(p.requires_grad for p in b.out_norms.parameters())
    b.train()
    stage = lambda k: b.model.get_submodule(STAGES[name].format(k - 2)[len("model."):-1])  # noqa: E731
    assert b.model.patch_embed.training == (freeze_at == 0)
    assert [stage(k).training for k in range(2, 6)] == [k > freeze_at for k in range(2, 6)]


def test_out_norm_adds_a_layernorm_per_output():
    b = _build(SWIN_T, "MODEL.TIMM.OUT_NORM", "True").eval()
    assert sorted(b.out_norms) == ["res3", "res4", "res5"]
    for f, shape in b.output_shape().items():
        assert isinstance(b.out_norms[f], torch.nn.LayerNorm)
        assert b.out_norms[f].normalized_shape == (shape.channels,)
    with torch.no_grad():
        out = b(torch.randn(1, 3, 67, 45))
    # fresh LayerNorm: zero mean, unit variance over channels at each position. Mean: float32 rounding of a
    # <=768-term sum (~1e-6); variance is v / (v + eps=1e-5): atol 1e-2 allows channel variances down to 1e-3
    for t in out.values():
        torch.testing.assert_close(t.mean(1), torch.zeros_like(t[:, 0]), atol=1e-4, rtol=0)
        torch.testing.assert_close(t.var(1, unbiased=False), torch.ones_like(t[:, 0]), atol=1e-2, rtol=0)
    assert len(_build(SWIN_T).out_norms) == 0


def test_paper_backbones_channels_and_sizes():
    """Swin-L (window 7) and PVTv2-B0/B2/B5 of Table D.1, built on the meta device (no compute)."""
    expected = {
        "swin_large_patch4_window7_224": [192, 384, 768, 1536],
        "pvt_v2_b0": [32, 64, 160, 256],
        "pvt_v2_b2": [64, 128, 320, 512],
        "pvt_v2_b5": [64, 128, 320, 512],
    }
    counts = {}
    for name, channels in expected.items():
        with torch.device("meta"):
            b = build_backbone(_cfg(name, "MODEL.TIMM.OUT_FEATURES", str(ALL)))
        assert [b.output_shape()[f].channels for f in ALL] == channels
        ref = timm.create_model(name, pretrained=False, num_classes=0, device="meta")
        # Only the final norm (Swin) and the classifier are removed when res5 is an output.
        pruned = sum(p.numel() for n, p in ref.named_parameters() if n.startswith(("norm.", "head")))
        counts[name] = sum(p.numel() for p in b.parameters())
        assert counts[name] == sum(p.numel() for p in ref.parameters()) - pruned
    assert 190e6 < counts["swin_large_patch4_window7_224"] < 200e6  # Swin-L: 197M with its classifier
    assert counts["pvt_v2_b0"] < counts["pvt_v2_b2"] < counts["pvt_v2_b5"]


def _original_pvt_names(sd):
    """timm PVTv2 names -> whai362's release names (inverse of timm's checkpoint_filter_fn)."""
    import re

    out = {}
    for k, v in sd.items():
        k = k.replace("patch_embed.", "patch_embed1.")
        k = re.sub(r"stages\.(\d)\.downsample\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", k)
        k = re.sub(r"stages\.(\d)\.blocks\.", lambda m: f"block{int(m.group(1)) + 1}.", k)
        k = re.sub(r"stages\.(\d)\.norm\.", lambda m: f"norm{int(m.group(1)) + 1}.", k)
        out[k.replace("dwconv.", "dwconv.dwconv.")] = v
    return out


def _original_swin_names(sd):
    """timm Swin names -> Microsoft's release names (downsampling at the end of the previous stage)."""
    import re

    out = {}
    for k, v in sd.items():
        k = re.sub(r"layers\.(\d)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
    return out


@pytest.mark.parametrize("name,fmt", [(PVT_B0, "timm"), (PVT_B0, "original"), (SWIN_T, "original")])
def test_pretrained_weights_round_trip(name, fmt, tmp_path, caplog):
    from panoptic_segformer.modeling.backbone.timm_backbone import swin_pad_then_shift_attention

    torch.manual_seed(123)
    kwargs = dict(strict_img_size=False, always_partition=True) if "swin" in name else {}
    src = timm.create_model(name, pretrained=False, **kwargs)  # with its ImageNet classifier
    for m in src.modules():  # the same window order as the backbone (see the pad-before-shift test)
        if type(m).__name__ == "SwinTransformerBlock":
            m._attn = swin_pad_then_shift_attention.__get__(m)
    sd = src.state_dict()
    if fmt == "original":
        sd = {"model": _original_swin_names(sd)} if "swin" in name else {"state_dict": _original_pvt_names(sd)}
    path = tmp_path / "weights.pth"
    torch.save(sd, path)
    with caplog.at_level(logging.INFO, logger="panoptic_segformer.modeling.backbone.timm_backbone"):
        b = _build(name, "MODEL.TIMM.PRETRAINED_WEIGHTS", str(path), "MODEL.TIMM.OUT_FEATURES", str(ALL),
                   seed=7)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # nothing missing or unknown
    assert "classifier keys not used" in caplog.text  # the ImageNet head is reported, not loaded
    ref = src.state_dict()
    own = b.model.state_dict()
    assert own and all(k in ref for k in own)
    for k, v in own.items():
        assert torch.equal(v, ref[k]), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref_res5 = src.eval().forward_intermediates(x, intermediates_only=True)[-1]
        # same weights and ops on a 64x64 input (no padding): equal up to the default float32 tolerance
        torch.testing.assert_close(b.eval()(x)["res5"], ref_res5)


def test_pretrained_weights_errors_and_missing_keys(tmp_path, caplog):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"nope\.pth.*MODEL\.TIMM\.PRETRAINED_WEIGHTS"):
        _build(PVT_B0, "MODEL.TIMM.PRETRAINED_WEIGHTS", str(missing))

    unrelated = tmp_path / "unrelated.pth"
    torch.save({"foo.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(ValueError, match=r"unrelated\.pth.*none of its 1 tensors"):
        _build(PVT_B0, "MODEL.TIMM.PRETRAINED_WEIGHTS", str(unrelated))

    wrong_arch = tmp_path / "b2.pth"  # same names, other widths
    torch.save(timm.create_model("pvt_v2_b2", pretrained=False, num_classes=0).state_dict(), wrong_arch)
    with pytest.raises(ValueError, match="wrong shape"):
        _build(PVT_B0, "MODEL.TIMM.PRETRAINED_WEIGHTS", str(wrong_arch))

    partial = tmp_path / "partial.pth"
    sd = timm.create_model(PVT_B0, pretrained=False, num_classes=0).state_dict()
    sd.pop("stages.3.norm.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, partial)
    with caplog.at_level(logging.WARNING, logger="panoptic_segformer.modeling.backbone.timm_backbone"):
        _build(PVT_B0, "MODEL.TIMM.PRETRAINED_WEIGHTS", str(partial))
    assert "stages.3.norm.weight" in caplog.text and "extra.weight" in caplog.text


def test_bad_config_values_are_clear_errors():
    with pytest.raises(ValueError, match="MODEL.TIMM.NAME.*not_a_model"):
        _build("not_a_model")
    with pytest.raises(ValueError, match="MODEL.TIMM.OUT_FEATURES"):
        _build(PVT_B0, "MODEL.TIMM.OUT_FEATURES", "['res3', 'res6']")
    with pytest.raises(ValueError, match="MODEL.BACKBONE.FREEZE_AT"):
        _build(PVT_B0, "MODEL.BACKBONE.FREEZE_AT", "6")
    with pytest.raises(ValueError, match="MODEL.TIMM.NAME.*vit_tiny_patch16_224.*no stage with stride"):
        TimmBackbone("vit_tiny_patch16_224")  # plain ViT: one stride (16), no pyramid


def test_swin_blocks_pad_before_shifting_as_the_detection_backbone():
    """Swin's detection code zero-pads a block's (normalised) input to whole windows *before* the
    cyclic shift, so attention on an 11x9 map equals attention on that map zero-padded to 14x14,
    cropped. timm's own order (roll, then pad) does not have this property."""
    from panoptic_segformer.modeling.backbone.timm_backbone import TimmBackbone

    torch.manual_seed(0)
    backbone = TimmBackbone("swin_tiny_patch4_window7_224", drop_path_rate=0.0).eval()
    block = backbone.model.layers[0].blocks[1]
    assert tuple(block.shift_size) == (3, 3)
    x = torch.randn(2, 11, 9, block.norm1.normalized_shape[0])
    padded = torch.nn.functional.pad(x, (0, 0, 0, 5, 0, 3))
    with torch.no_grad():
        out, out_padded = block._attn(x), block._attn(padded)[:, :11, :9]
        timm_order = type(block)._attn(block, x)
    # both attend over the same zero-padded 14x14 tensor with the same ops: float32 rounding at most (1e-5)
    torch.testing.assert_close(out, out_padded, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(timm_order, out_padded, atol=1e-4)  # other tokens share windows: far apart
