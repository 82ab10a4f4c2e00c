"""State dicts with the names and shapes of the released Panoptic SegFormer checkpoints (mmdet 2.12).

Written from the official code and configs (zhiqi-li/Panoptic-SegFormer: ``configs/panformer/*.py``,
``easymd/models/panformer/{panformer_head,mask_head,deformable_detr}.py``, ``easymd/models/backbones/
{pvt_v2,swin}.py``) and the mmcv 1.3.4 / mmdet 2.12 module layout they build on -- never from this
project's model code, so a test that converts one of these and loads it strictly into our model checks
the converter's table against an independent description of the official checkpoints.

Structure of ``PanSeg`` (every key below is under one of these prefixes):

* ``backbone.``: mmdet ``ResNet`` (torchvision names: ``conv1``, ``bn1``, ``layer{1-4}.N.{conv,bn}{1-3}``,
  ``layer{1-4}.0.downsample.{0,1}``, BatchNorm ``num_batches_tracked`` included), whai362's
  ``PyramidVisionTransformerImpr`` (``patch_embed{1-4}``, ``block{1-4}.N``, ``norm{1-4}``), or the Swin
  detection backbone (``patch_embed``, ``layers.N`` with ``downsample`` at the *end* of stages 0-2,
  ``norm{i}`` for each out index i in (1, 2, 3), ``relative_position_index`` buffers).
* ``neck.``: mmdet ``ChannelMapper``: ``convs.i`` / ``extra_convs.0`` are mmcv ``ConvModule``s with a
  GroupNorm, so ``conv`` has no bias and the norm is named ``gn``.
* ``bbox_head.transformer.``: ``Deformable_Transformer`` (``level_embeds``, ``reference_points``), encoder
  and decoder layers built by mmcv's ``BaseTransformerLayer``: ``attentions.k`` (mmcv
  ``MultiScaleDeformableAttention``; ``MultiheadAttention`` wrapping ``nn.MultiheadAttention`` as ``attn``),
  ``norms.k``, ``ffns.0.layers.{0.0,1}`` (mmcv ``FFN``: ``Sequential(Sequential(Linear, act, Dropout),
  Linear)``).
* ``bbox_head.``: ``cls_branches``/``reg_branches`` (one per decoder layer), ``query_embedding`` (300, 2C),
  ``stuff_query`` (K_st, 2C), ``reg_branches2``/``cls_thing_branches`` (one per thing mask-decoder layer),
  ``cls_stuff_branches`` (one per stuff layer), ``things_mask_head``/``stuff_mask_head`` (``MaskHead``:
  ``blocks.N`` and the ``attnen`` tail).
"""
from collections import OrderedDict
from typing import Dict, Sequence

import torch
import torchvision

__all__ = ["PVT_V2", "SWIN", "official_state_dict", "official_checkpoint", "swin_relative_position_index"]

# PyramidVisionTransformerImpr hyper-parameters of easymd/models/backbones/pvt_v2.py (num_heads do not
# change any shape; qkv_bias=True everywhere).
PVT_V2 = {
    "pvt_v2_b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), mlp_ratios=(8, 8, 4, 4),
                      sr_ratios=(8, 4, 2, 1)),
    "pvt_v2_b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), mlp_ratios=(8, 8, 4, 4),
                      sr_ratios=(8, 4, 2, 1)),
    "pvt_v2_b5": dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4),
                      sr_ratios=(8, 4, 2, 1)),
}
# SwinTransformer hyper-parameters: configs/panformer/panformer_swinl_24e_coco_panoptic.py (Swin-L) and
# the Swin paper's Swin-T, for fast tests; patch 4, mlp_ratio 4, qkv_bias, patch_norm, no ape.
SWIN = {
    "swin_l": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=7),
    "swin_t": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
}


def swin_relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) int64 index into the (2w-1)^2 bias table, the buffer the Swin code registers."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def _resnet_shapes(depth: int) -> Dict[str, tuple]:
    """mmdet ResNet-{50,101} (style 'pytorch') has torchvision's names and shapes, without ``fc``."""
    with torch.device("meta"):
        net = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth](weights=None)
    return OrderedDict((k, tuple(v.shape)) for k, v in net.state_dict().items() if not k.startswith("fc."))


def _pvt_v2_shapes(embed_dims, depths, mlp_ratios, sr_ratios) -> Dict[str, tuple]:
    s = OrderedDict()

    def linear(name, d_out, d_in, bias=True):
        s[f"{name}.weight"] = (d_out, d_in)
        if bias:
            s[f"{name}.bias"] = (d_out,)

    def norm(name, d):
        s[f"{name}.weight"] = (d,)
        s[f"{name}.bias"] = (d,)

    for i in range(4):  # module registration order: patch_embed1-4, then block1/norm1, ..., block4/norm4
        c_in, c = (3 if i == 0 else embed_dims[i - 1]), embed_dims[i]
        k = 7 if i == 0 else 3
        s[f"patch_embed{i + 1}.proj.weight"] = (c, c_in, k, k)
        s[f"patch_embed{i + 1}.proj.bias"] = (c,)
        norm(f"patch_embed{i + 1}.norm", c)
    for i in range(4):
        c, hidden, sr = embed_dims[i], embed_dims[i] * mlp_ratios[i], sr_ratios[i]
        for j in range(depths[i]):
            b = f"block{i + 1}.{j}"
            norm(f"{b}.norm1", c)
            linear(f"{b}.attn.q", c, c)
            linear(f"{b}.attn.kv", 2 * c, c)
            linear(f"{b}.attn.proj", c, c)
            if sr > 1:
                s[f"{b}.attn.sr.weight"] = (c, c, sr, sr)
                s[f"{b}.attn.sr.bias"] = (c,)
                norm(f"{b}.attn.norm", c)
            norm(f"{b}.norm2", c)
            linear(f"{b}.mlp.fc1", hidden, c)
            s[f"{b}.mlp.dwconv.dwconv.weight"] = (hidden, 1, 3, 3)
            s[f"{b}.mlp.dwconv.dwconv.bias"] = (hidden,)
            linear(f"{b}.mlp.fc2", c, hidden)
        norm(f"norm{i + 1}", c)
    return s


def _swin_shapes(embed_dim, depths, num_heads, window_size, out_indices=(1, 2, 3)) -> Dict[str, tuple]:
    s = OrderedDict()
    s["patch_embed.proj.weight"] = (embed_dim, 3, 4, 4)
    s["patch_embed.proj.bias"] = (embed_dim,)
    s["patch_embed.norm.weight"] = s["patch_embed.norm.bias"] = (embed_dim,)
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        c = embed_dim * 2 ** i
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}"
            s[f"{b}.norm1.weight"] = s[f"{b}.norm1.bias"] = (c,)
            s[f"{b}.attn.relative_position_bias_table"] = ((2 * window_size - 1) ** 2, heads)
            s[f"{b}.attn.relative_position_index"] = (window_size ** 2, window_size ** 2)
            s[f"{b}.attn.qkv.weight"], s[f"{b}.attn.qkv.bias"] = (3 * c, c), (3 * c,)
            s[f"{b}.attn.proj.weight"], s[f"{b}.attn.proj.bias"] = (c, c), (c,)
            s[f"{b}.norm2.weight"] = s[f"{b}.norm2.bias"] = (c,)
            s[f"{b}.mlp.fc1.weight"], s[f"{b}.mlp.fc1.bias"] = (4 * c, c), (4 * c,)
            s[f"{b}.mlp.fc2.weight"], s[f"{b}.mlp.fc2.bias"] = (c, 4 * c), (c,)
        if i < len(depths) - 1:  # PatchMerging at the end of the stage: Linear(4C -> 2C, no bias) + LN(4C)
            s[f"layers.{i}.downsample.reduction.weight"] = (2 * c, 4 * c)
            s[f"layers.{i}.downsample.norm.weight"] = s[f"layers.{i}.downsample.norm.bias"] = (4 * c,)
    for i in out_indices:
        s[f"norm{i}.weight"] = s[f"norm{i}.bias"] = (embed_dim * 2 ** i,)
    return s


def backbone_shapes(backbone: str):
    """(names -> shapes of ``backbone.*`` without the prefix, channels of out_indices (1, 2, 3))."""
    if backbone in ("r50", "r101"):
        return _resnet_shapes(int(backbone[1:])), [512, 1024, 2048]
    if backbone in PVT_V2:
        a = PVT_V2[backbone]
        return _pvt_v2_shapes(**a), list(a["embed_dims"][1:])
    if backbone in SWIN:
        a = SWIN[backbone]
        return _swin_shapes(**a), [a["embed_dim"] * 2 ** i for i in (1, 2, 3)]
    raise ValueError(f"unknown backbone {backbone!r}: r50, r101, {sorted(PVT_V2)} or {sorted(SWIN)}")


def _mask_head_shapes(prefix: str, d: int, heads: int, num_layers: int, self_attn: bool, levels: int = 3):
    s = OrderedDict()

    def linear(name, d_out, d_in):
        s[f"{prefix}.{name}.weight"], s[f"{prefix}.{name}.bias"] = (d_out, d_in), (d_out,)

    def attention_maps(a):
        for lvl in range(1, levels + 1):
            linear(f"{a}.linear_l{lvl}.0", heads, heads)
        linear(f"{a}.linear.0", 1, levels * heads)

    for j in range(num_layers):  # Block: head_norm1, attn, head_norm2, mlp, [self_attention, norm3]
        b = f"blocks.{j}"
        s[f"{prefix}.{b}.head_norm1.weight"] = s[f"{prefix}.{b}.head_norm1.bias"] = (d,)
        for p in ("q", "k", "v"):
            linear(f"{b}.attn.{p}", d, d)
        linear(f"{b}.attn.proj", d, d)
        attention_maps(f"{b}.attn")
        s[f"{prefix}.{b}.head_norm2.weight"] = s[f"{prefix}.{b}.head_norm2.bias"] = (d,)
        linear(f"{b}.mlp.fc1", 4 * d, d)
        linear(f"{b}.mlp.fc2", d, 4 * d)
        if self_attn:
            linear(f"{b}.self_attention.qkv", 3 * d, d)
            linear(f"{b}.self_attention.proj", d, d)
            s[f"{prefix}.{b}.norm3.weight"] = s[f"{prefix}.{b}.norm3.bias"] = (d,)
    linear("attnen.q", d, d)  # AttentionTail: q, k and the mask head only
    linear("attnen.k", d, d)
    attention_maps("attnen")
    return s


def official_shapes(backbone: str = "r50", num_things: int = 80, num_stuff: int = 53, num_query: int = 300,
                    embed_dims: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                    ffn_dim: int = 1024, enc_layers: int = 6, dec_layers: int = 6, thing_layers: int = 4,
                    stuff_layers: int = 6) -> Dict[str, tuple]:
    """Key -> shape of a PanSeg checkpoint (configs/panformer/base.py defaults)."""
    d = embed_dims
    bb, channels = backbone_shapes(backbone)
    s = OrderedDict((f"backbone.{k}", v) for k, v in bb.items())
    for i, c in enumerate(channels):  # ChannelMapper(kernel_size=1, norm GN(32), act None, num_outs=4)
        s[f"neck.convs.{i}.conv.weight"] = (d, c, 1, 1)
        s[f"neck.convs.{i}.gn.weight"] = s[f"neck.convs.{i}.gn.bias"] = (d,)
    for i in range(num_levels - len(channels)):
        s[f"neck.extra_convs.{i}.conv.weight"] = (d, channels[-1] if i == 0 else d, 3, 3)
        s[f"neck.extra_convs.{i}.gn.weight"] = s[f"neck.extra_convs.{i}.gn.bias"] = (d,)

    h = "bbox_head"

    def linear(name, d_out, d_in):
        s[f"{name}.weight"], s[f"{name}.bias"] = (d_out, d_in), (d_out,)

    def msda(name):
        linear(f"{name}.sampling_offsets", num_heads * num_levels * num_points * 2, d)
        linear(f"{name}.attention_weights", num_heads * num_levels * num_points, d)
        linear(f"{name}.value_proj", d, d)
        linear(f"{name}.output_proj", d, d)

    def layer_tail(name, num_norms):
        linear(f"{name}.ffns.0.layers.0.0", ffn_dim, d)
        linear(f"{name}.ffns.0.layers.1", d, ffn_dim)
        for k in range(num_norms):
            s[f"{name}.norms.{k}.weight"] = s[f"{name}.norms.{k}.bias"] = (d,)

    t = f"{h}.transformer"
    for i in range(enc_layers):  # attentions, ffns, norms (BaseTransformerLayer registration order)
        msda(f"{t}.encoder.layers.{i}.attentions.0")
        layer_tail(f"{t}.encoder.layers.{i}", 2)
    for i in range(dec_layers):
        a = f"{t}.decoder.layers.{i}.attentions"
        s[f"{a}.0.attn.in_proj_weight"], s[f"{a}.0.attn.in_proj_bias"] = (3 * d, d), (3 * d,)
        linear(f"{a}.0.attn.out_proj", d, d)
        msda(f"{a}.1")
        layer_tail(f"{t}.decoder.layers.{i}", 3)
    s[f"{t}.level_embeds"] = (num_levels, d)
    linear(f"{t}.reference_points", 2, d)

    def reg_branch(name):
        linear(f"{name}.0", d, d)
        linear(f"{name}.2", d, d)
        linear(f"{name}.4", 4, d)

    for i in range(dec_layers):
        linear(f"{h}.cls_branches.{i}", num_things, d)
    for i in range(dec_layers):
        reg_branch(f"{h}.reg_branches.{i}")
    s[f"{h}.query_embedding.weight"] = (num_query, 2 * d)
    s[f"{h}.stuff_query.weight"] = (num_stuff, 2 * d)
    for i in range(thing_layers):
        reg_branch(f"{h}.reg_branches2.{i}")
    for i in range(thing_layers):
        linear(f"{h}.cls_thing_branches.{i}", num_things, d)
    for i in range(stuff_layers):
        linear(f"{h}.cls_stuff_branches.{i}", 1, d)
    s.update(_mask_head_shapes(f"{h}.things_mask_head", d, num_heads, thing_layers, self_attn=False))
    s.update(_mask_head_shapes(f"{h}.stuff_mask_head", d, num_heads, stuff_layers, self_attn=True))
    return s


def official_state_dict(backbone: str = "r50", seed: int = 0, device: str = "cpu",
                        **kwargs) -> "OrderedDict[str, torch.Tensor]":
    """A PanSeg state dict. On ``device="meta"`` only names, shapes and dtypes (fast, no memory); else
    random values (float32; ``num_batches_tracked`` int64 scalars, running variances in [0.5, 1.5),
    Swin's ``relative_position_index`` the true index). ``kwargs``: see :func:`official_shapes`."""
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for k, shape in official_shapes(backbone, **kwargs).items():
        integer = k.endswith(("num_batches_tracked", "relative_position_index"))
        if device == "meta":
            out[k] = torch.empty(shape, dtype=torch.long if integer else torch.float32, device="meta")
        elif k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(1000, dtype=torch.long)
        elif k.endswith("relative_position_index"):
            out[k] = swin_relative_position_index(int(round(shape[0] ** 0.5)))
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(shape, generator=g)
        else:
            out[k] = 0.1 * torch.randn(shape, generator=g)
    return out


def official_checkpoint(backbone: str = "r50", seed: int = 0, **kwargs) -> dict:
    """The dict mmcv's ``save_checkpoint`` writes: ``{"meta": ..., "state_dict": ...}``."""
    return {"meta": {"mmcv_version": "1.3.4", "epoch": 24, "CLASSES": ("person",)},
            "state_dict": official_state_dict(backbone, seed, **kwargs)}
