#!/usr/bin/env python
"""Convert the released Panoptic SegFormer checkpoints (mmdet 2.12 format) into this project's format.

Usage::

    python -m projects.convert.convert_official panoptic_segformer_r50_2x.pth r50_2x_d2.pth \\
        --config-file configs/coco/official/official_r50_2x.yaml
    python train_net.py --eval-only --config-file configs/coco/official/official_r50_2x.yaml \\
        MODEL.WEIGHTS r50_2x_d2.pth

Releases (zhiqi-li/Panoptic-SegFormer, v1.0) and their configs under ``configs/coco/official/``:
``panoptic_segformer_r50_1x.pth`` -> ``official_r50_1x.yaml``, ``_r50_2x`` -> ``official_r50_2x.yaml``,
``_r101_2x`` -> ``official_r101_2x.yaml``, ``_pvtv2b5_2x`` -> ``official_pvtv2b5_2x.yaml``,
``_swinl_2x`` -> ``official_swinl_2x.yaml``.

The input is what mmcv's ``save_checkpoint`` writes, ``{"meta": ..., "state_dict": {name: tensor}}``.
The model is built from the config on the CPU (random init) to get the target names and shapes; every
official key goes through one explicit rule of :func:`official_rules`:

* neck and head: one rule per module type (``neck.convs.i.conv`` -> ``channel_mapper.i.0``, mmcv's
  ``attentions/norms/ffns`` -> our layer names, ``MaskHead`` -> ``mask_decoder.{thing,stuff}_branch``, ...);
  ``bbox_head.stuff_query`` has its halves swapped (official rows are ``[query | pos]``, ours
  ``[pos | query]``); ``bbox_head.query_embedding`` is ``[pos | query]`` in both.
* ResNet backbones: mmdet's ResNet has torchvision's names, renamed by
  ``convert_torchvision_to_d2.torchvision_resnet_key_to_d2``.
* PVTv2 / Swin backbones: the release uses the original (whai362 / Microsoft detection) code, whose
  names timm's own ``checkpoint_filter_fn`` converts (``block1.0`` -> ``stages.0.blocks.0``; Swin's
  ``PatchMerging`` moved from the end of stage i to the start of stage i+1). Swin's per-output
  LayerNorms ``norm1..norm3`` become ``backbone.out_norms.res3..res5``.
* DROPPED (listed with the reason): ``bbox_head.reg_branches2`` (box branch of the thing mask decoder,
  trained with loss weight 0 and never used at inference), BatchNorm ``num_batches_tracked``, Swin's
  ``relative_position_index`` buffers (constants that timm recomputes).
* ZERO-FILLED (listed): the biases of our channel-mapper convolutions (mmcv's ``ConvModule`` has no conv
  bias before a norm layer; a zero bias is the same function).

Any official key that no rule maps, any model key that nothing produces, two keys mapped to one name,
and every shape mismatch raise one ``ValueError`` listing all of them (official key, our key, shapes).
The output ``{"model": state_dict, "__author__": ...}`` loads with ``MODEL.WEIGHTS`` /
``DetectionCheckpointer`` with no missing or unexpected keys.
"""
import argparse
import os
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from detectron2.config import CfgNode
from torch import Tensor, nn

from projects.convert.convert_torchvision_to_d2 import torchvision_resnet_key_to_d2

__all__ = [
    "Rule",
    "ConversionReport",
    "official_rules",
    "backbone_kind",
    "convert_official_state_dict",
    "load_official_checkpoint",
    "main",
]

AUTHOR = "official Panoptic SegFormer (converted)"

# Special rule targets: the backbone sub-dict is renamed by an existing converter.
TORCHVISION_RESNET = "<torchvision_resnet_key_to_d2>"
TIMM_FILTER = "<timm checkpoint_filter_fn>"


class Rule(NamedTuple):
    """One row of the mapping table.

    pattern: regular expression that must match the whole official key; named groups feed ``target``.
    target: our key as a ``str.format`` template over the groups (values translated by
        ``_GROUP_VALUES``), None for a dropped key, or TORCHVISION_RESNET / TIMM_FILTER (group ``key``).
    reason: why a key is dropped or transformed (printed in the report).
    transform: name of a value transform in ``_TRANSFORMS`` (None: copied as is).
    """

    pattern: str
    target: Optional[str]
    reason: str = ""
    transform: Optional[str] = None


def _swap_halves(w: Tensor) -> Tensor:
    """(K, 2C) official ``[query | pos]`` rows -> our ``[pos | query]`` rows."""
    c = w.shape[1] // 2
    return torch.cat([w[:, c:], w[:, :c]], dim=1)


_TRANSFORMS: Dict[str, Callable[[Tensor], Tensor]] = {"swap_halves": _swap_halves}

# Translation of named-group values into our names; functions of (value, context).
_GROUP_VALUES: Dict[str, Callable[[str, dict], str]] = {
    "extra": lambda v, ctx: str(ctx["num_in_levels"] + int(v)),  # extra_convs.i after the backbone levels
    "branch": lambda v, ctx: {"things": "thing_branch", "stuff": "stuff_branch"}[v],
    "proj": lambda v, ctx: {"q": "q_proj", "k": "k_proj", "v": "v_proj", "proj": "out_proj"}[v],
    "lvl": lambda v, ctx: str(int(v) - 1),  # linear_l1..3 -> level_fcs.0..2
    "fc": lambda v, ctx: str(int(v) // 2),  # reg branch Sequential(Linear, ReLU, Linear, ReLU, Linear) 0/2/4
    "res": lambda v, ctx: str(int(v) + 2),  # Swin out index i (norm{i}) -> res{i+2}
}

_P = r"(?P<p>weight|bias)"
_MSDA = r"(?P<m>sampling_offsets|attention_weights|value_proj|output_proj)"
_ENC = r"bbox_head\.transformer\.encoder\.layers\.(?P<i>\d+)\."
_DEC = r"bbox_head\.transformer\.decoder\.layers\.(?P<i>\d+)\."
_MASK = r"bbox_head\.(?P<branch>things|stuff)_mask_head\."
_BLOCK = _MASK + r"blocks\.(?P<i>\d+)\."
_OURS_BLOCK = "mask_decoder.{branch}.layers.{i}."
_OURS_TAIL = "mask_decoder.{branch}.tail."

REG_BRANCHES2_REASON = ("box branch of the thing mask decoder: trained with loss weight 0 "
                        "(PanformerHead.loss_single_panoptic multiplies its L1/GIoU losses by 0), "
                        "never used at inference")

# Neck and head (mmdet ChannelMapper, Deformable_Transformer with mmcv 1.3.4 layers, PanformerHead).
NECK_HEAD_RULES: List[Rule] = [
    # ChannelMapper: ConvModule(conv without bias, GroupNorm named "gn"); extra level on the last input.
    Rule(r"neck\.convs\.(?P<i>\d+)\.conv\.weight", "channel_mapper.{i}.0.weight"),
    Rule(r"neck\.convs\.(?P<i>\d+)\.gn\." + _P, "channel_mapper.{i}.1.{p}"),
    Rule(r"neck\.extra_convs\.(?P<extra>\d+)\.conv\.weight", "channel_mapper.{extra}.0.weight"),
    Rule(r"neck\.extra_convs\.(?P<extra>\d+)\.gn\." + _P, "channel_mapper.{extra}.1.{p}"),
    # Deformable_Transformer
    Rule(r"bbox_head\.transformer\.level_embeds", "encoder.level_embed"),
    Rule(r"bbox_head\.transformer\.reference_points\." + _P, "location_decoder.reference_points.{p}"),
    # encoder layer: operation_order (self_attn, norm, ffn, norm)
    Rule(_ENC + r"attentions\.0\." + _MSDA + r"\." + _P, "encoder.layers.{i}.self_attn.{m}.{p}"),
    Rule(_ENC + r"norms\.0\." + _P, "encoder.layers.{i}.norm1.{p}"),
    Rule(_ENC + r"norms\.1\." + _P, "encoder.layers.{i}.norm2.{p}"),
    Rule(_ENC + r"ffns\.0\.layers\.0\.0\." + _P, "encoder.layers.{i}.linear1.{p}"),
    Rule(_ENC + r"ffns\.0\.layers\.1\." + _P, "encoder.layers.{i}.linear2.{p}"),
    # decoder layer: (self_attn, norm, cross_attn, norm, ffn, norm); mmcv MultiheadAttention wraps
    # nn.MultiheadAttention as `attn`
    Rule(_DEC + r"attentions\.0\.attn\.(?P<a>in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
         "location_decoder.layers.{i}.self_attn.{a}"),
    Rule(_DEC + r"attentions\.1\." + _MSDA + r"\." + _P, "location_decoder.layers.{i}.cross_attn.{m}.{p}"),
    Rule(_DEC + r"norms\.0\." + _P, "location_decoder.layers.{i}.norm_sa.{p}"),
    Rule(_DEC + r"norms\.1\." + _P, "location_decoder.layers.{i}.norm_ca.{p}"),
    Rule(_DEC + r"norms\.2\." + _P, "location_decoder.layers.{i}.norm_ffn.{p}"),
    Rule(_DEC + r"ffns\.0\.layers\.0\.0\." + _P, "location_decoder.layers.{i}.linear1.{p}"),
    Rule(_DEC + r"ffns\.0\.layers\.1\." + _P, "location_decoder.layers.{i}.linear2.{p}"),
    # detection head of the location decoder and the queries
    Rule(r"bbox_head\.cls_branches\.(?P<i>\d+)\." + _P, "location_decoder.class_embed.{i}.{p}"),
    Rule(r"bbox_head\.reg_branches\.(?P<i>\d+)\.(?P<fc>[024])\." + _P,
         "location_decoder.bbox_embed.{i}.layers.{fc}.{p}"),
    Rule(r"bbox_head\.query_embedding\.weight", "location_decoder.query_embed.weight"),  # [pos | query] both
    Rule(r"bbox_head\.stuff_query\.weight", "stuff_query_embed.weight",
         reason="official rows are [query | pos] (split as stuff_query, stuff_query_pos), ours [pos | query]",
         transform="swap_halves"),
    # class FCs of the mask decoders; the box branch of the thing decoder is unused
    Rule(r"bbox_head\.cls_thing_branches\.(?P<i>\d+)\." + _P, "mask_decoder.thing_class_embed.{i}.{p}"),
    Rule(r"bbox_head\.cls_stuff_branches\.(?P<i>\d+)\." + _P, "mask_decoder.stuff_class_embed.{i}.{p}"),
    Rule(r"bbox_head\.reg_branches2\.\d+\.[024]\.(weight|bias)", None, reason=REG_BRANCHES2_REASON),
    # MaskHead blocks: [self_attention, norm3] -> attn (cross-attention + mask head) -> head_norm1 -> mlp
    # -> head_norm2
    Rule(_BLOCK + r"attn\.(?P<proj>q|k|v|proj)\." + _P, _OURS_BLOCK + "cross_attn.{proj}.{p}"),
    Rule(_BLOCK + r"attn\.linear_l(?P<lvl>[1-9])\.0\." + _P, _OURS_BLOCK + "mask_head.level_fcs.{lvl}.{p}"),
    Rule(_BLOCK + r"attn\.linear\.0\." + _P, _OURS_BLOCK + "mask_head.fc.{p}"),
    Rule(_BLOCK + r"head_norm1\." + _P, _OURS_BLOCK + "norm_ca.{p}"),
    Rule(_BLOCK + r"head_norm2\." + _P, _OURS_BLOCK + "norm_ffn.{p}"),
    Rule(_BLOCK + r"mlp\.fc1\." + _P, _OURS_BLOCK + "linear1.{p}"),
    Rule(_BLOCK + r"mlp\.fc2\." + _P, _OURS_BLOCK + "linear2.{p}"),
    # SelfAttention.qkv is one Linear(C, 3C) with rows [q; k; v], as nn.MultiheadAttention's in_proj
    Rule(_BLOCK + r"self_attention\.qkv\." + _P, _OURS_BLOCK + "self_attn.in_proj_{p}"),
    Rule(_BLOCK + r"self_attention\.proj\." + _P, _OURS_BLOCK + "self_attn.out_proj.{p}"),
    Rule(_BLOCK + r"norm3\." + _P, _OURS_BLOCK + "norm_sa.{p}"),
    # AttentionTail (`attnen`): q, k and the mask head
    Rule(_MASK + r"attnen\.(?P<proj>q|k)\." + _P, _OURS_TAIL + "cross_attn.{proj}.{p}"),
    Rule(_MASK + r"attnen\.linear_l(?P<lvl>[1-9])\.0\." + _P, _OURS_TAIL + "mask_head.level_fcs.{lvl}.{p}"),
    Rule(_MASK + r"attnen\.linear\.0\." + _P, _OURS_TAIL + "mask_head.fc.{p}"),
]

BACKBONE_RULES: Dict[str, List[Rule]] = {
    # mmdet ResNet (style "pytorch") = torchvision names; FrozenBN keeps the four tensors of BatchNorm.
    "resnet": [
        Rule(r"backbone\..+\.num_batches_tracked", None,
             reason="BatchNorm's update counter; Detectron2's FrozenBatchNorm2d has none"),
        Rule(r"backbone\.(?P<key>.+)", TORCHVISION_RESNET),
    ],
    # whai362's PVTv2 (patch_embed1-4, block1-4, norm1-4): timm.models.pvt_v2.checkpoint_filter_fn.
    "pvt_v2": [
        Rule(r"backbone\.(?P<key>.+)", TIMM_FILTER),
    ],
    # Swin detection backbone: per-output LayerNorms norm1-3 (out_indices 1, 2, 3) -> out_norms;
    # the rest: timm.models.swin_transformer.checkpoint_filter_fn.
    "swin": [
        Rule(r"backbone\.norm(?P<res>[1-3])\." + _P, "backbone.out_norms.res{res}.{p}"),
        Rule(r"backbone\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index", None,
             reason="constant index buffer; timm recomputes it (non-persistent there)"),
        Rule(r"backbone\.(?P<key>.+)", TIMM_FILTER),
    ],
}

# Model keys no official key produces, filled with zeros (same function as the official model).
ZERO_FILLED_RULES: List[Tuple[str, str]] = [
    (r"channel_mapper\.\d+\.0\.bias",
     "mmcv ConvModule before a norm layer has no conv bias (bias='auto'); a zero bias is the same map"),
]

_TIMM_BACKBONES = {"timm.models.pvt_v2": "pvt_v2", "timm.models.swin_transformer": "swin"}


def official_rules(kind: str) -> List[Rule]:
    """The mapping table for a backbone kind ("resnet", "pvt_v2", "swin"): backbone rules first."""
    if kind not in BACKBONE_RULES:
        raise ValueError(f"no official-checkpoint rules for backbone kind {kind!r} "
                         f"(supported: {sorted(BACKBONE_RULES)})")
    return BACKBONE_RULES[kind] + NECK_HEAD_RULES


def backbone_kind(model: nn.Module) -> str:
    """"resnet" (Detectron2 ResNet), "pvt_v2" or "swin" (TimmBackbone) for a PanopticSegFormer."""
    from detectron2.modeling.backbone import ResNet

    from panoptic_segformer.modeling.backbone import TimmBackbone

    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, ResNet):
        return "resnet"
    if isinstance(backbone, TimmBackbone):
        module = type(backbone.model).__module__
        if module in _TIMM_BACKBONES:
            return _TIMM_BACKBONES[module]
        raise ValueError(f"timm backbone {type(backbone.model).__name__} ({module}) has no official release; "
                         f"supported: {sorted(_TIMM_BACKBONES)}")
    raise ValueError(f"backbone {type(backbone).__name__} has no official release (ResNet, PVTv2, Swin)")


@dataclass
class ConversionReport:
    """What the conversion did; ``str(report)`` is the printed summary."""

    backbone: str
    num_rules: int
    mapped: List[Tuple[str, str]] = field(default_factory=list)  # (official key, our key)
    dropped: List[Tuple[str, str]] = field(default_factory=list)  # (official key, reason)
    zero_filled: List[Tuple[str, str]] = field(default_factory=list)  # (our key, reason)
    transformed: List[Tuple[str, str, str]] = field(default_factory=list)  # (official, ours, reason)

    def __str__(self) -> str:
        lines = [f"Mapped {len(self.mapped)} official tensors to model tensors "
                 f"(backbone {self.backbone!r}, {self.num_rules} rules)."]
        for title, items in (("TRANSFORMED", [(f"{o} -> {n}", r) for o, n, r in self.transformed]),
                             ("DROPPED official tensors", self.dropped),
                             ("ZERO-FILLED model tensors", self.zero_filled)):
            by_reason: Dict[str, List[str]] = OrderedDict()
            for key, reason in items:
                by_reason.setdefault(reason, []).append(key)
            lines.append(f"{title}: {len(items)}")
            for reason, keys in by_reason.items():
                lines.append(f"  {len(keys)} x ({reason}):")
                lines.extend(f"    {k}" for k in keys)
        return "\n".join(lines)


def _match(rules: List[Rule], key: str):
    for rule in rules:
        m = re.fullmatch(rule.pattern, key)
        if m:
            return rule, m
    return None, None


def _format_target(rule: Rule, m: "re.Match", ctx: dict) -> str:
    groups = {k: (_GROUP_VALUES[k](v, ctx) if k in _GROUP_VALUES else v)
              for k, v in m.groupdict().items() if v is not None}
    return rule.target.format(**groups)


def _timm_filter(sub: "OrderedDict[str, Tuple[str, Tensor]]", timm_model: nn.Module, errors: Dict[str, list]):
    """Rename a backbone sub-dict with the timm model module's own ``checkpoint_filter_fn``.

    ``sub`` maps the key without ``backbone.`` to (official key, tensor). The filter's outputs are traced
    back to official keys by tensor identity; a tensor it creates (a resized patch embedding or
    relative-position table: the release's hyper-parameters differ from the model's) or an official key
    it discards is an error. Yields (official key, our key, tensor).
    """
    module = sys.modules[type(timm_model).__module__]
    values = OrderedDict((k, v) for k, (_, v) in sub.items())
    try:
        out = module.checkpoint_filter_fn(OrderedDict(values), timm_model)
    except Exception as e:  # e.g. get_submodule of a block the model does not have
        errors["timm"].append(f"{module.__name__}.checkpoint_filter_fn failed on the backbone tensors: {e!r} "
                              "(does MODEL.TIMM.NAME match the checkpoint's backbone?)")
        return
    source = {id(v): k for k, v in values.items()}
    used = set()
    for new_key, v in out.items():
        k = source.get(id(v))
        if k is None:
            errors["timm"].append(f"{module.__name__}.checkpoint_filter_fn created backbone.model.{new_key} "
                                  f"{tuple(v.shape)} by resizing an official tensor: the release's backbone "
                                  "hyper-parameters differ from MODEL.TIMM.NAME")
            continue
        used.add(k)
        yield sub[k][0], "backbone.model." + new_key, v
    for k, (official, _) in sub.items():
        if k not in used:
            errors["timm"].append(f"{module.__name__}.checkpoint_filter_fn did not pass {official} through "
                                  "unchanged (dropped or resized it)")


def _as_model(cfg_or_model) -> nn.Module:
    """The model itself, or the model of a config built for its names and shapes only: on the ``meta``
    device (no memory, no random init; Swin-L takes 0.3 s instead of 5 s), on the CPU if that fails."""
    if isinstance(cfg_or_model, nn.Module):
        return cfg_or_model
    from detectron2.modeling import build_model

    cfg = cfg_or_model.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""
    if "TIMM" in cfg.MODEL:
        cfg.MODEL.TIMM.PRETRAINED_WEIGHTS = ""
    try:
        cfg.MODEL.DEVICE = "meta"
        with torch.device("meta"):
            return build_model(cfg).eval()
    except (RuntimeError, NotImplementedError):  # a constructor that reads tensor values
        cfg.MODEL.DEVICE = "cpu"
        return build_model(cfg).eval()


def convert_official_state_dict(
    official_sd: Dict[str, Tensor], cfg_or_model: Union[nn.Module, CfgNode], source: str = "state dict",
) -> Tuple["OrderedDict[str, Tensor]", ConversionReport]:
    """Official ``PanSeg`` state dict -> (our state dict, report).

    Args:
        official_sd: the checkpoint's ``"state_dict"`` (official names, see the module docs).
        cfg_or_model: our ``PanopticSegFormer`` (its ``state_dict()`` gives the target names and shapes,
            its timm backbone the module timm's filters inspect), or a config to build it from on CPU.
        source: name of the checkpoint in error messages.
    Returns:
        ``new_sd`` with exactly the model's keys, in its order, and a :class:`ConversionReport`.
    Raises:
        ValueError: naming every official key no rule maps, every model key nothing produces, every pair
            of official keys mapped to one name, every shape mismatch (official key, our key, shapes),
            and every tensor timm's filter resized or discarded.
    """
    model = _as_model(cfg_or_model)
    target = model.state_dict()
    kind = backbone_kind(model)
    rules = official_rules(kind)
    ctx = {"num_in_levels": len(getattr(model, "in_features", []))}
    report = ConversionReport(backbone=kind, num_rules=len(rules) + len(ZERO_FILLED_RULES))
    errors: Dict[str, list] = {k: [] for k in ("unmapped", "timm", "duplicate", "unused", "shape", "missing")}
    produced: Dict[str, Tuple[str, Tensor]] = {}

    def add(official: str, ours: str, value: Tensor):
        if ours in produced:
            errors["duplicate"].append(f"{produced[ours][0]} and {official} both map to {ours}")
        else:
            produced[ours] = (official, value)

    timm_sub: "OrderedDict[str, Tuple[str, Tensor]]" = OrderedDict()
    for key, value in official_sd.items():
        if not torch.is_tensor(value):
            errors["unmapped"].append(f"{key} (a {type(value).__name__}, not a tensor)")
            continue
        rule, m = _match(rules, key)
        if rule is None:
            errors["unmapped"].append(key)
        elif rule.target is None:
            report.dropped.append((key, rule.reason))
        elif rule.target == TIMM_FILTER:
            timm_sub[m["key"]] = (key, value)
        elif rule.target == TORCHVISION_RESNET:
            try:
                add(key, "backbone." + torchvision_resnet_key_to_d2(m["key"]), value)
            except ValueError:
                errors["unmapped"].append(f"{key} (not a torchvision ResNet name)")
        else:
            ours = _format_target(rule, m, ctx)
            if rule.transform:
                value = _TRANSFORMS[rule.transform](value)
                report.transformed.append((key, ours, rule.reason))
            add(key, ours, value)
    if timm_sub:
        for official, ours, value in _timm_filter(timm_sub, model.backbone.model, errors):
            add(official, ours, value)

    for ours, (official, value) in produced.items():
        if ours not in target:
            errors["unused"].append(f"{official} -> {ours}")
        elif tuple(value.shape) != tuple(target[ours].shape):
            errors["shape"].append(f"{official} {tuple(value.shape)} -> {ours} {tuple(target[ours].shape)}")
    for ours, t in target.items():
        if ours in produced:
            continue
        reason = next((r for p, r in ZERO_FILLED_RULES if re.fullmatch(p, ours)), None)
        if reason is None:
            errors["missing"].append(ours)
        else:
            produced[ours] = ("", torch.zeros_like(t, device="cpu"))
            report.zero_filled.append((ours, reason))

    titles = {
        "unmapped": "official keys that no rule maps",
        "timm": "backbone tensors timm's checkpoint_filter_fn could not convert one-to-one",
        "duplicate": "model keys produced twice",
        "unused": "official keys mapped to names the model does not have (official -> ours)",
        "shape": "shape mismatches (official key shape -> our key shape)",
        "missing": "model keys that no official key produces",
    }
    if any(errors.values()):
        parts = [f"Cannot convert {source} into the {type(model).__name__} with backbone {kind!r}:"]
        for k, items in errors.items():
            if items:
                parts.append(f"{len(items)} {titles[k]}:")
                parts.extend(f"  {item}" for item in items)
        raise ValueError("\n".join(parts))
    report.mapped = [(official, ours) for ours, (official, _) in produced.items() if official]
    new_sd = OrderedDict((k, produced[k][1]) for k in target)
    return new_sd, report


def load_official_checkpoint(path: str, allow_pickle: bool = False) -> Dict[str, Tensor]:
    """The ``"state_dict"`` of an mmcv checkpoint file (FileNotFoundError / ValueError naming ``path``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"official checkpoint {path!r}: file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:
        hint = "" if allow_pickle else " (if you trust the file and it holds other Python objects, add --allow-pickle)"
        raise ValueError(f"official checkpoint {path!r}: cannot be read by torch.load: {e}{hint}") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        found = sorted(map(str, ckpt))[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        extra = " (it looks like an already converted Detectron2 checkpoint)" if (
            isinstance(ckpt, dict) and "model" in ckpt) else ""
        raise ValueError(f"official checkpoint {path!r}: not an mmdet checkpoint; expected a dict with a "
                         f"'state_dict' entry as mmcv's save_checkpoint writes, found {found}{extra}")
    return ckpt["state_dict"]


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="official checkpoint, e.g. panoptic_segformer_r50_2x.pth")
    parser.add_argument("output", help="converted checkpoint to write (.pth)")
    parser.add_argument("--config-file", required=True,
                        help="matching config, e.g. configs/coco/official/official_r50_2x.yaml")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="torch.load with weights_only=False (only for files you trust)")
    parser.add_argument("opts", nargs="*", help="config overrides KEY VALUE ... (e.g. MODEL.TIMM.NAME ...)")
    args = parser.parse_intermixed_args(argv)

    from panoptic_segformer.config import setup_cfg

    cfg = setup_cfg(args.config_file, args.opts, freeze=False)
    official_sd = load_official_checkpoint(args.input, args.allow_pickle)
    model = _as_model(cfg)
    new_sd, report = convert_official_state_dict(official_sd, model, source=args.input)
    meta = any(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(new_sd, strict=True, assign=meta)  # the final check: no missing/unexpected key
    print(report)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"model": new_sd, "__author__": AUTHOR}, args.output)
    n = sum(v.numel() for v in new_sd.values())
    print(f"Wrote {len(new_sd)} tensors ({n} values) to {args.output}; use it with "
          f"--config-file {args.config_file} MODEL.WEIGHTS {args.output}")
    return args.output


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"convert_official.py: error: {e}")
