"""projects/convert/convert_official.py: released Panoptic SegFormer checkpoints (mmdet) -> this project.

The official state dicts come from tests/official_checkpoint.py, written from the official code and
configs, not from our model. Each is converted and loaded with ``strict=True`` into the model of the
matching ``configs/coco/official/*.yaml``: R-50 with values and inference, the small PVTv2-B0 / Swin-T
variants of the same backbone code with values and inference, and R-101 / PVTv2-B5 / Swin-L (the
released backbones) with names and shapes only (``meta`` tensors and a ``meta`` model, no memory).
Bad inputs (unknown, unused, missing, colliding or mis-shaped keys, a backbone of another size, files
that are missing or not mmdet checkpoints) raise errors that name them.
"""
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from conftest import REPO_ROOT
from official_checkpoint import official_checkpoint, official_state_dict
from panoptic_segformer import add_panoptic_segformer_config
from panoptic_segformer.panoptic_segformer import dataset_class_ids
from projects.convert.convert_official import AUTHOR, convert_official_state_dict, load_official_checkpoint, main

OFFICIAL = os.path.join(REPO_ROOT, "configs", "coco", "official")
D = 256  # HIDDEN_DIM of the official models


def _cfg(name, *opts):
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_file(os.path.join(OFFICIAL, name))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.TIMM.PRETRAINED_WEIGHTS", "", *opts])
    return cfg


def _model(cfg, meta=False):
    cfg = cfg.clone()
    cfg.MODEL.DEVICE = "meta" if meta else "cpu"
    torch.manual_seed(0)
    with torch.device(cfg.MODEL.DEVICE):
        return build_model(cfg).eval()


@pytest.fixture(scope="module")
def r50():
    """(config, CPU model, official state dict with random values) for official_r50_2x."""
    cfg = _cfg("official_r50_2x.yaml")
    return cfg, _model(cfg), official_state_dict("r50", seed=1)


@pytest.fixture(scope="module")
def r50_meta():
    """(meta model, meta official state dict): names and shapes only."""
    return _model(_cfg("official_r50_2x.yaml"), meta=True), official_state_dict("r50", device="meta")


def _set_tail_bias(sd, things: float, stuff: float):
    """Official tails output relu(Linear(24 -> 1)): zero weights and a bias give constant masks."""
    for branch, bias in (("things", things), ("stuff", stuff)):
        sd[f"bbox_head.{branch}_mask_head.attnen.linear.0.weight"].zero_()
        sd[f"bbox_head.{branch}_mask_head.attnen.linear.0.bias"].fill_(bias)


def _panoptic(model, h=64, w=96):
    torch.manual_seed(0)
    with torch.no_grad():
        out = model([{"image": torch.rand(3, h, w) * 255, "height": h, "width": w}])[0]
    seg, segments = out["panoptic_seg"]
    assert seg.shape == (h, w)
    assert set(seg.unique().tolist()) - {0} == {s["id"] for s in segments}
    return seg, segments


def _check_only(cfg, segments, seg, isthing: bool):
    """Constant full masks for one kind only: the best-scored query of that kind covers the image."""
    things, stuff = dataset_class_ids(cfg.DATASETS.TRAIN)
    assert len(segments) >= 1 and all(s["isthing"] == isthing for s in segments), segments
    assert all(s["category_id"] in (things if isthing else stuff) for s in segments)
    assert (seg > 0).all()


def test_r50_convert_load_values_and_inference(r50):
    cfg, model, official = r50
    official = {k: v.clone() for k, v in official.items()}
    _set_tail_bias(official, things=5.0, stuff=-5.0)
    new_sd, report = convert_official_state_dict(official, model)
    result = model.load_state_dict(new_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ours = model.state_dict()

    # Explicit lists: BatchNorm counters and the unused box branch dropped; channel-mapper biases zero.
    dropped = dict(report.dropped)
    assert sum(k.endswith("num_batches_tracked") for k in dropped) == 53  # R-50 has 53 BatchNorms
    assert sorted(k for k in dropped if "reg_branches2" in k) == sorted(
        k for k in official if k.startswith("bbox_head.reg_branches2."))
    assert len(dropped) == 53 + 24
    assert [k for k, _ in report.zero_filled] == [f"channel_mapper.{i}.0.bias" for i in range(4)]
    for i in range(4):
        assert (ours[f"channel_mapper.{i}.0.bias"] == 0).all()
    assert len(report.mapped) + len(report.dropped) == len(official)

    # Values where they belong (independent expectations, one per kind of rule).
    expect = {
        "backbone.conv1.weight": "backbone.stem.conv1.weight",
        "backbone.layer1.0.bn1.running_var": "backbone.res2.0.conv1.norm.running_var",
        "backbone.layer4.0.downsample.1.weight": "backbone.res5.0.shortcut.norm.weight",
        "neck.convs.2.conv.weight": "channel_mapper.2.0.weight",
        "neck.convs.0.gn.bias": "channel_mapper.0.1.bias",
        "neck.extra_convs.0.conv.weight": "channel_mapper.3.0.weight",
        "neck.extra_convs.0.gn.weight": "channel_mapper.3.1.weight",
        "bbox_head.transformer.level_embeds": "encoder.level_embed",
        "bbox_head.transformer.reference_points.weight": "location_decoder.reference_points.weight",
        "bbox_head.transformer.encoder.layers.5.attentions.0.sampling_offsets.bias":
            "encoder.layers.5.self_attn.sampling_offsets.bias",
        "bbox_head.transformer.encoder.layers.0.norms.1.weight": "encoder.layers.0.norm2.weight",
        "bbox_head.transformer.encoder.layers.2.ffns.0.layers.0.0.weight": "encoder.layers.2.linear1.weight",
        "bbox_head.transformer.encoder.layers.2.ffns.0.layers.1.bias": "encoder.layers.2.linear2.bias",
        "bbox_head.transformer.decoder.layers.3.attentions.0.attn.in_proj_weight":
            "location_decoder.layers.3.self_attn.in_proj_weight",
        "bbox_head.transformer.decoder.layers.3.attentions.0.attn.out_proj.bias":
            "location_decoder.layers.3.self_attn.out_proj.bias",
        "bbox_head.transformer.decoder.layers.1.attentions.1.value_proj.weight":
            "location_decoder.layers.1.cross_attn.value_proj.weight",
        "bbox_head.transformer.decoder.layers.4.norms.0.bias": "location_decoder.layers.4.norm_sa.bias",
        "bbox_head.transformer.decoder.layers.4.norms.1.bias": "location_decoder.layers.4.norm_ca.bias",
        "bbox_head.transformer.decoder.layers.4.norms.2.bias": "location_decoder.layers.4.norm_ffn.bias",
        "bbox_head.cls_branches.5.weight": "location_decoder.class_embed.5.weight",
        "bbox_head.reg_branches.2.4.weight": "location_decoder.bbox_embed.2.layers.2.weight",
        "bbox_head.reg_branches.2.2.bias": "location_decoder.bbox_embed.2.layers.1.bias",
        "bbox_head.query_embedding.weight": "location_decoder.query_embed.weight",  # [pos | query] in both
        "bbox_head.cls_thing_branches.3.bias": "mask_decoder.thing_class_embed.3.bias",
        "bbox_head.cls_stuff_branches.5.weight": "mask_decoder.stuff_class_embed.5.weight",
        "bbox_head.things_mask_head.blocks.0.attn.q.weight":
            "mask_decoder.thing_branch.layers.0.cross_attn.q_proj.weight",
        "bbox_head.things_mask_head.blocks.3.attn.proj.bias":
            "mask_decoder.thing_branch.layers.3.cross_attn.out_proj.bias",
        "bbox_head.things_mask_head.blocks.1.attn.linear_l2.0.weight":
            "mask_decoder.thing_branch.layers.1.mask_head.level_fcs.1.weight",
        "bbox_head.things_mask_head.blocks.1.attn.linear.0.weight":
            "mask_decoder.thing_branch.layers.1.mask_head.fc.weight",
        "bbox_head.things_mask_head.blocks.2.head_norm1.weight": "mask_decoder.thing_branch.layers.2.norm_ca.weight",
        "bbox_head.things_mask_head.blocks.2.head_norm2.weight": "mask_decoder.thing_branch.layers.2.norm_ffn.weight",
        "bbox_head.things_mask_head.blocks.2.mlp.fc2.weight": "mask_decoder.thing_branch.layers.2.linear2.weight",
        "bbox_head.stuff_mask_head.blocks.4.attn.v.bias": "mask_decoder.stuff_branch.layers.4.cross_attn.v_proj.bias",
        "bbox_head.stuff_mask_head.blocks.4.self_attention.qkv.weight":
            "mask_decoder.stuff_branch.layers.4.self_attn.in_proj_weight",
        "bbox_head.stuff_mask_head.blocks.4.self_attention.qkv.bias":
            "mask_decoder.stuff_branch.layers.4.self_attn.in_proj_bias",
        "bbox_head.stuff_mask_head.blocks.4.self_attention.proj.weight":
            "mask_decoder.stuff_branch.layers.4.self_attn.out_proj.weight",
        "bbox_head.stuff_mask_head.blocks.5.norm3.bias": "mask_decoder.stuff_branch.layers.5.norm_sa.bias",
        "bbox_head.stuff_mask_head.attnen.k.weight": "mask_decoder.stuff_branch.tail.cross_attn.k_proj.weight",
        "bbox_head.stuff_mask_head.attnen.linear_l3.0.bias":
            "mask_decoder.stuff_branch.tail.mask_head.level_fcs.2.bias",
        "bbox_head.things_mask_head.attnen.linear.0.bias": "mask_decoder.thing_branch.tail.mask_head.fc.bias",
    }
    for theirs, mine in expect.items():
        assert torch.equal(ours[mine], official[theirs]), (theirs, mine)
    # Stuff queries: official rows [query | pos], ours [pos | query].
    stuff = official["bbox_head.stuff_query.weight"]
    assert torch.equal(ours["stuff_query_embed.weight"][:, :D], stuff[:, D:])
    assert torch.equal(ours["stuff_query_embed.weight"][:, D:], stuff[:, :D])
    assert [(o, n) for o, n, _ in report.transformed] == [("bbox_head.stuff_query.weight", "stuff_query_embed.weight")]

    # Inference: the thing tails give full masks and the stuff tails none -> only thing segments; swapped
    # -> only stuff segments (each tail bias reached its own branch).
    seg, segments = _panoptic(model)
    _check_only(cfg, segments, seg, isthing=True)
    model.mask_decoder.thing_branch.tail.mask_head.fc.bias.data.fill_(-5.0)
    model.mask_decoder.stuff_branch.tail.mask_head.fc.bias.data.fill_(5.0)
    seg, segments = _panoptic(model)
    _check_only(cfg, segments, seg, isthing=False)


def test_cli_writes_a_checkpoint_for_model_weights(r50, tmp_path, capsys):
    cfg, model, official = r50
    src, dst = tmp_path / "panoptic_segformer_r50_2x.pth", tmp_path / "out" / "r50_2x_d2.pth"
    ckpt = official_checkpoint("r50", seed=2)
    torch.save(ckpt, src)
    main([str(src), str(dst), "--config-file", os.path.join(OFFICIAL, "official_r50_2x.yaml")])
    printed = capsys.readouterr().out
    assert "DROPPED official tensors: 77" in printed and "ZERO-FILLED model tensors: 4" in printed
    assert "bbox_head.reg_branches2.3.4.bias" in printed and "channel_mapper.3.0.bias" in printed

    saved = torch.load(dst, map_location="cpu", weights_only=True)
    assert saved["__author__"] == AUTHOR and set(saved["model"]) == set(model.state_dict())
    DetectionCheckpointer(model).load(str(dst))  # what MODEL.WEIGHTS does
    for k, v in model.state_dict().items():  # nothing kept its old value
        assert torch.equal(v, saved["model"][k]), k
    sd = ckpt["state_dict"]
    assert torch.equal(model.state_dict()["mask_decoder.stuff_branch.layers.0.cross_attn.q_proj.weight"],
                       sd["bbox_head.stuff_mask_head.blocks.0.attn.q.weight"])


def test_cli_rejects_missing_and_foreign_files(tmp_path):
    config = os.path.join(OFFICIAL, "official_r50_2x.yaml")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        main([str(tmp_path / "nope.pth"), str(tmp_path / "o.pth"), "--config-file", config])
    converted = tmp_path / "converted.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "__author__": AUTHOR}, converted)
    with pytest.raises(ValueError, match="not an mmdet checkpoint.*already converted"):
        load_official_checkpoint(str(converted))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth.*cannot be read"):
        main([str(junk), str(tmp_path / "o.pth"), "--config-file", config])
    assert not (tmp_path / "o.pth").exists()


@pytest.mark.parametrize("config, backbone, timm_name", [
    ("official_pvtv2b5_2x.yaml", "pvt_v2_b0", "pvt_v2_b0"),
    ("official_swinl_2x.yaml", "swin_t", "swin_tiny_patch4_window7_224"),
])
def test_small_timm_variants_convert_load_and_infer(config, backbone, timm_name):
    """The released PVTv2 / Swin backbone code with small hyper-parameters: values and inference."""
    cfg = _cfg(config, "MODEL.TIMM.NAME", timm_name)
    model = _model(cfg)
    official = official_state_dict(backbone, seed=3)
    _set_tail_bias(official, things=-5.0, stuff=5.0)
    new_sd, report = convert_official_state_dict(official, model)
    model.load_state_dict(new_sd, strict=True)
    ours = model.state_dict()
    if backbone == "swin_t":
        expect = {
            "backbone.patch_embed.proj.weight": "backbone.model.patch_embed.proj.weight",
            "backbone.layers.2.blocks.5.attn.qkv.weight": "backbone.model.layers.2.blocks.5.attn.qkv.weight",
            "backbone.layers.1.blocks.1.attn.relative_position_bias_table":
                "backbone.model.layers.1.blocks.1.attn.relative_position_bias_table",
            # Microsoft's PatchMerging ends stage i, timm's starts stage i + 1
            "backbone.layers.0.downsample.reduction.weight": "backbone.model.layers.1.downsample.reduction.weight",
            "backbone.layers.2.downsample.norm.bias": "backbone.model.layers.3.downsample.norm.bias",
            "backbone.norm1.weight": "backbone.out_norms.res3.weight",
            "backbone.norm3.bias": "backbone.out_norms.res5.bias",
        }
        assert sum("relative_position_index" in k for k, _ in report.dropped) == 2 + 2 + 6 + 2
    else:
        expect = {
            "backbone.patch_embed1.proj.weight": "backbone.model.patch_embed.proj.weight",
            "backbone.patch_embed3.norm.bias": "backbone.model.stages.2.downsample.norm.bias",
            "backbone.block2.1.attn.kv.weight": "backbone.model.stages.1.blocks.1.attn.kv.weight",
            "backbone.block1.0.attn.sr.weight": "backbone.model.stages.0.blocks.0.attn.sr.weight",
            "backbone.block4.1.mlp.dwconv.dwconv.weight": "backbone.model.stages.3.blocks.1.mlp.dwconv.weight",
            "backbone.norm4.weight": "backbone.model.stages.3.norm.weight",
        }
    for theirs, mine in expect.items():
        assert torch.equal(ours[mine], official[theirs]), (theirs, mine)
    seg, segments = _panoptic(model, 64, 96)
    _check_only(cfg, segments, seg, isthing=False)


@pytest.mark.parametrize("config, backbone, n_dropped", [
    ("official_r101_2x.yaml", "r101", 104 + 24),  # 104 BatchNorms in R-101
    ("official_pvtv2b5_2x.yaml", "pvt_v2_b5", 24),
    ("official_swinl_2x.yaml", "swin_l", 24 + 24),  # 24 Swin-L blocks' relative_position_index
])
def test_released_backbones_names_and_shapes(config, backbone, n_dropped):
    """The released R-101 / PVTv2-B5 / Swin-L checkpoints' names and shapes map one-to-one."""
    model = _model(_cfg(config), meta=True)
    official = official_state_dict(backbone, device="meta")
    new_sd, report = convert_official_state_dict(official, model)
    result = model.load_state_dict(new_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert len(report.dropped) == n_dropped and len(report.zero_filled) == 4
    assert len(report.mapped) + n_dropped == len(official)
    # tensors are passed through: identity shows where each went
    if backbone == "swin_l":
        assert new_sd["backbone.model.layers.3.downsample.reduction.weight"] is \
            official["backbone.layers.2.downsample.reduction.weight"]
        assert new_sd["backbone.out_norms.res4.weight"] is official["backbone.norm2.weight"]
    if backbone == "pvt_v2_b5":
        assert new_sd["backbone.model.stages.2.blocks.39.attn.norm.bias"] is \
            official["backbone.block3.39.attn.norm.bias"]
    if backbone == "r101":
        assert new_sd["backbone.res4.22.conv3.norm.running_mean"] is official["backbone.layer3.22.bn3.running_mean"]


def test_every_problem_is_named_in_one_error(r50_meta):
    model, official = r50_meta
    bad = dict(official)
    bad["bbox_head.unknown.weight"] = torch.empty(3, device="meta")  # no rule
    bad["bbox_head.cls_branches.6.weight"] = torch.empty(80, D, device="meta")  # a 7th decoder layer
    del bad["bbox_head.stuff_mask_head.blocks.5.norm3.bias"]  # missing
    bad["bbox_head.cls_thing_branches.0.weight"] = torch.empty(81, D, device="meta")  # wrong shape
    bad["backbone.layer5.0.conv1.weight"] = torch.empty(3, device="meta")  # not a ResNet name
    with pytest.raises(ValueError) as e:
        convert_official_state_dict(bad, model, source="bad.pth")
    msg = str(e.value)
    assert "bad.pth" in msg
    assert "official keys that no rule maps:\n  bbox_head.unknown.weight\n  backbone.layer5.0.conv1.weight" in msg
    assert "bbox_head.cls_branches.6.weight -> location_decoder.class_embed.6.weight" in msg
    assert "model keys that no official key produces:\n  mask_decoder.stuff_branch.layers.5.norm_sa.bias" in msg
    assert "bbox_head.cls_thing_branches.0.weight (81, 256) -> mask_decoder.thing_class_embed.0.weight (80, 256)" in msg


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.update({"neck.convs.3.conv.weight": torch.empty(D, 4096, 1, 1, device="meta")}),
     "neck.extra_convs.0.conv.weight and neck.convs.3.conv.weight both map to channel_mapper.3.0.weight"),
    (lambda sd: sd.pop("bbox_head.transformer.level_embeds"),
     "model keys that no official key produces:\n  encoder.level_embed"),
    (lambda sd: sd.update({"bbox_head.stuff_query.weight": torch.empty(53, 2 * D + 2, device="meta")}),
     "bbox_head.stuff_query.weight (53, 514) -> stuff_query_embed.weight (53, 512)"),
])
def test_single_problems_raise(r50_meta, edit, message):
    model, official = r50_meta
    bad = dict(official)
    edit(bad)
    with pytest.raises(ValueError, match="Cannot convert") as e:
        convert_official_state_dict(bad, model)
    assert message in str(e.value)


def test_wrong_backbone_size_is_refused():
    """A Swin-L checkpoint with a Swin-T config: timm's filter cannot place the extra blocks."""
    model = _model(_cfg("official_swinl_2x.yaml", "MODEL.TIMM.NAME", "swin_tiny_patch4_window7_224"), meta=True)
    with pytest.raises(ValueError, match="checkpoint_filter_fn"):
        convert_official_state_dict(official_state_dict("swin_l", device="meta"), model)


def test_resized_backbone_tensors_are_refused(monkeypatch):
    """timm's Swin filter would silently resize a window-12 relative-position table for a window-7 model;
    the converter refuses (the release's backbone must be the config's)."""
    import official_checkpoint

    swin_t_w12 = dict(official_checkpoint.SWIN["swin_t"], window_size=12)
    monkeypatch.setitem(official_checkpoint.SWIN, "swin_t_w12", swin_t_w12)
    model = _model(_cfg("official_swinl_2x.yaml", "MODEL.TIMM.NAME", "swin_tiny_patch4_window7_224"), meta=True)
    with pytest.raises(ValueError, match="created backbone.model.layers.0.blocks.0.attn.relative_position_bias_table"
                                         r" \(169, 3\) by resizing"):
        convert_official_state_dict(official_state_dict("swin_t_w12"), model)
