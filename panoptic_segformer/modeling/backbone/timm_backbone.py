"""timm backbones (Swin, PVTv2, ...) as Detectron2 ``Backbone``s (paper App. D, Table D.1).

Panoptic SegFormer uses the backbone's C3-C5 maps (strides 8/16/32, Sec. 3.1); the paper's
transformer backbones are Swin-L with window size 7 (App. A.1) and PVTv2-B0/B2/B5 (Table D.1).
:class:`TimmBackbone` wraps the plain timm classification model (``self.model``, so checkpoint keys
read ``backbone.model.<timm names>``) and takes its stage outputs with timm's
``forward_intermediates``; stages after the last requested one, the final norm and the classifier
are pruned, so every parameter is used (DDP needs that).

Behaviour worth knowing:

* Any input size: the image is zero-padded at the bottom/right to a multiple of
  :attr:`size_divisibility` (32, as Detectron2 / mmdet pad batches anyway) and each output is
  cropped to ``ceil(H / stride) x ceil(W / stride)``. The crop hides the padded *positions*; the
  values near the border still depend on the padding, since attention (Swin windows, PVTv2's
  spatial-reduction attention) mixes positions.
* Swin is built with ``strict_img_size=False`` (any input size, attention masks computed per
  forward) and ``always_partition=True``: every stage keeps the 7x7 window and shifts by 3 whatever
  the feature size, as the official Swin detection backbone (and Panoptic SegFormer's copy of it)
  does; timm's default would shrink windows and drop shifts for feature maps smaller than the
  construction-time ``img_size``. When a stage's feature map is not a multiple of 7, timm rolls
  (cyclic shift) before padding to whole windows while Swin's detection code pads before rolling;
  :func:`swin_pad_then_shift_attention` replaces timm's window attention of every Swin block with the
  detection code's order, so converted Swin checkpoints see the windows they were trained with.
* ``freeze_at`` follows Detectron2's ResNet meaning: 0 freezes nothing, 1 the patch embedding (all
  parameters outside the stages), k >= 2 also stages res2..res_k (timm's ``layers.0..k-2`` /
  ``stages.0..k-2``; in timm each stage starts with its own downsampling, as ResNet's res3 does).
  Frozen parts get ``requires_grad=False`` and stay in eval mode in :meth:`TimmBackbone.train`, as
  the official Swin code does (``_freeze_stages``): LayerNorm has no running statistics, but eval mode
  turns off stochastic depth and dropout in frozen blocks.
"""

import logging
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import Tensor, nn

__all__ = ["TimmBackbone", "build_timm_backbone", "load_timm_weights", "RES_LEVELS"]

logger = logging.getLogger(__name__)

RES_LEVELS = ("res2", "res3", "res4", "res5")

# Extra timm constructor kwargs per model module, so the models accept any input size.
_MODULE_KWARGS = {
    # strict_img_size=False: any input size (attention masks built per forward);
    # always_partition=True: 7x7 windows and shift 3 in every stage, as Swin's detection backbone.
    "timm.models.swin_transformer": dict(strict_img_size=False, always_partition=True),
}


def _timm_module(model_name: str):
    """The Python module defining a timm architecture (for its ``checkpoint_filter_fn``)."""
    arch, _ = timm.models.split_model_name_tag(model_name)
    return sys.modules[timm.models.model_entrypoint(arch).__module__]


def load_timm_weights(model: nn.Module, path: str, filter_fn=None) -> Tuple[List[str], List[str]]:
    """Load a local ImageNet checkpoint into a timm model, as timm's ``load_checkpoint`` does.

    The file is read with ``timm.models.load_state_dict`` (``.pth`` or ``.safetensors``; a state dict
    nested under ``"state_dict"``/``"model"`` (or EMA weights) is unwrapped, ``module.`` prefixes are
    removed). Keys under ``backbone.model.`` / ``backbone.`` (detection checkpoints) are taken from
    that prefix. ``filter_fn`` (the model module's ``checkpoint_filter_fn``) then converts original
    release formats to timm names: Microsoft's Swin (downsampling moved to the next stage,
    relative-position tables resized) and whai362's PVTv2 (``block1.0`` -> ``stages.0.blocks.0``).

    Returns:
        ``(loaded, unexpected)``: model keys that were loaded and checkpoint keys the model lacks.
    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, tensors whose shape does not fit, or no tensor matched.
    """
    where = f"backbone weights {path!r} (MODEL.TIMM.PRETRAINED_WEIGHTS)"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: file not found")
    try:
        state_dict = timm.models.load_state_dict(path, use_ema=True)
    except Exception as e:  # pickle/zip/safetensors errors of all kinds
        raise ValueError(f"{where}: cannot read it as a PyTorch/safetensors checkpoint: {e}") from e
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(f"{where}: expected a state dict of tensors (optionally under 'model' or 'state_dict')")
    for prefix in ("backbone.model.", "backbone."):
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            break
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except (AttributeError, KeyError, RuntimeError, ValueError) as e:
            raise ValueError(f"{where}: does not fit timm model {type(model).__name__}: {e!r}") from e
    own = model.state_dict()
    loadable = {k: v for k, v in state_dict.items() if k in own}
    bad_shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in loadable.items()
                  if v.shape != own[k].shape]
    if bad_shapes:
        raise ValueError(f"{where}: {len(bad_shapes)} tensors have the wrong shape for the model "
                         f"(checkpoint vs model), e.g. {bad_shapes[:5]}")
    if not loadable:
        raise ValueError(f"{where}: none of its {len(state_dict)} tensors matches the model's parameter "
                         f"names (checkpoint keys e.g. {sorted(state_dict)[:5]}; model keys e.g. "
                         f"{sorted(own)[:5]}); is MODEL.TIMM.NAME the right architecture?")
    model.load_state_dict(loadable, strict=False)
    return sorted(loadable), sorted(k for k in state_dict if k not in own)


def swin_pad_then_shift_attention(block: nn.Module, x: Tensor) -> Tensor:
    """(Shifted-)window attention of a timm ``SwinTransformerBlock`` in the order of Swin's detection
    backbone: zero-pad (B, H, W, C) to whole windows, then roll, partition, attend with the shift mask of
    the padded size, merge, roll back and crop. timm's own ``_attn`` rolls before padding."""
    from timm.models.swin_transformer import window_partition, window_reverse

    b, h, w, c = x.shape
    wh, ww = block.window_size
    x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
    hp, wp = x.shape[1:3]
    shift = tuple(block.shift_size)
    has_shift = any(shift)
    if has_shift:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = window_partition(x, block.window_size).view(-1, block.window_area, c)
    mask = block.get_attn_mask(x) if has_shift else None
    windows = block.attn(windows, mask=mask).view(-1, wh, ww, c)
    x = window_reverse(windows, block.window_size, hp, wp)
    if has_shift:
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


class TimmBackbone(Backbone):
    """A timm hierarchical model as a Detectron2 backbone with outputs ``res2``..``res5``.

    Args:
        model_name: timm model name (``MODEL.TIMM.NAME``), e.g. ``"swin_large_patch4_window7_224"``,
            ``"pvt_v2_b5"``; any timm model whose ``feature_info`` has strides 4/8/16/32 and that
            implements ``forward_intermediates``.
        out_features: subset of ``("res2", "res3", "res4", "res5")`` to return.
        drop_path_rate: stochastic-depth rate of the last block (timm's linear rule).
        freeze_at: 0 nothing, 1 patch embedding, k >= 2 patch embedding + res2..res_k (module docs).
        out_norm: add a LayerNorm per output (``out_norms[name]``), as Swin's detection backbone.
        pretrained_weights: local ImageNet checkpoint (timm or original release format), "" = none.
        in_chans: input channels.
        size_divisibility: inputs are padded internally to a multiple of this (then cropped back).

    ``forward(x)``: ``x`` is ``(N, in_chans, H, W)`` (any H, W); returns ``{name: (N, C_name,
    ceil(H / s), ceil(W / s))}`` with ``s`` the stride of ``name`` (4, 8, 16, 32).
    """

    def __init__(
        self,
        model_name: str,
        out_features: Sequence[str] = ("res3", "res4", "res5"),
        drop_path_rate: float = 0.0,
        freeze_at: int = 0,
        out_norm: bool = False,
        pretrained_weights: str = "",
        in_chans: int = 3,
        size_divisibility: int = 32,
    ):
        super().__init__()
        if not isinstance(model_name, str) or not timm.is_model(model_name):
            raise ValueError(f"MODEL.TIMM.NAME = {model_name!r} is not a timm model name "
                             f"(see timm.list_models(), e.g. 'swin_large_patch4_window7_224', 'pvt_v2_b5')")
        out_features = list(out_features)
        bad = [f for f in out_features if f not in RES_LEVELS]
        if not out_features or bad or len(set(out_features)) != len(out_features):
            raise ValueError(f"MODEL.TIMM.OUT_FEATURES = {out_features}: must be distinct names from {RES_LEVELS}")
        if not isinstance(freeze_at, int) or not 0 <= freeze_at <= 5:
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT = {freeze_at!r}: must be an integer in 0..5")
        if not 0.0 <= float(drop_path_rate) < 1.0:
            raise ValueError(f"MODEL.TIMM.DROP_PATH_RATE = {drop_path_rate!r}: must be in [0, 1)")
        if size_divisibility < 1:
            raise ValueError(f"size_divisibility = {size_divisibility!r}: must be >= 1")

        module = _timm_module(model_name)
        self.timm_kwargs = dict(num_classes=0, drop_path_rate=float(drop_path_rate), in_chans=in_chans,
                                **_MODULE_KWARGS.get(module.__name__, {}))
        self.model = timm.create_model(model_name, pretrained=False, **self.timm_kwargs)
        for m in self.model.modules():
            if type(m).__name__ == "SwinTransformerBlock" and hasattr(m, "_attn"):
                m._attn = swin_pad_then_shift_attention.__get__(m)
        if not hasattr(self.model, "forward_intermediates") or not hasattr(self.model, "prune_intermediate_layers"):
            raise ValueError(f"MODEL.TIMM.NAME = {model_name!r}: this timm model has no forward_intermediates")

        # res_k <-> the feature_info entry with reduction 2**k (the last one if several).
        info = list(self.model.feature_info)
        level_index = {}
        for i, f in enumerate(info):
            for k in range(2, 6):
                if f["reduction"] == 2 ** k:
                    level_index[f"res{k}"] = i
        missing_levels = [r for r in RES_LEVELS if r not in level_index]
        if missing_levels:
            raise ValueError(f"MODEL.TIMM.NAME = {model_name!r}: no stage with stride "
                             f"{[2 ** int(r[3:]) for r in missing_levels]} (feature_info: {info})")

        if pretrained_weights:
            # Before pruning: the filters (e.g. Swin's) look up modules of the full model.
            loaded, unexpected = load_timm_weights(
                self.model, pretrained_weights, getattr(module, "checkpoint_filter_fn", None))
        self._out_features = sorted(out_features, key=RES_LEVELS.index)
        self._take_indices = [level_index[f] for f in self._out_features]
        self.model.prune_intermediate_layers(self._take_indices, prune_norm=True, prune_head=True)
        if pretrained_weights:
            kept, loaded_set = self.model.state_dict(), set(loaded)
            missing = [k for k in kept if k not in loaded_set]
            pruned = [k for k in loaded if k not in kept]
            logger.info(f"Loaded {len(loaded)} tensors of {model_name} from {pretrained_weights}"
                        f" ({len(pruned)} of them belong to pruned layers).")
            if missing:
                logger.warning(f"Backbone weights {pretrained_weights}: {len(missing)} parameters of "
                               f"{model_name} were not in the file and keep their random init: {missing}")
            head = [k for k in unexpected if k.startswith(("head.", "fc.", "classifier."))]
            other = [k for k in unexpected if k not in head]
            if head:
                logger.info(f"Backbone weights {pretrained_weights}: classifier keys not used: {head}")
            if other:
                logger.warning(f"Backbone weights {pretrained_weights}: {len(other)} keys do not belong to "
                               f"{model_name} and were ignored: {other}")

        self._out_feature_strides = {f: int(info[level_index[f]]["reduction"]) for f in self._out_features}
        self._out_feature_channels = {f: int(info[level_index[f]]["num_chs"]) for f in self._out_features}
        self._size_divisibility = int(size_divisibility)
        self.out_norms = nn.ModuleDict(
            {f: nn.LayerNorm(self._out_feature_channels[f]) for f in self._out_features} if out_norm else {})
        self._stage_modules = {r: info[level_index[r]]["module"] for r in RES_LEVELS}
        self._freeze(freeze_at)

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def _frozen_modules(self) -> List[nn.Module]:
        """Modules frozen by ``freeze_at``: the stem (everything outside the stages), then res2..res_k."""
        if self._freeze_at == 0:
            return []
        names = [self._stage_modules[f"res{k}"] for k in range(2, self._freeze_at + 1)]
        stage_paths = set(self._stage_modules.values())
        modules = [m for n, m in self.model.named_children()
                   if not any(p == n or p.startswith(n + ".") for p in stage_paths)]
        for name in names:
            try:
                modules.append(self.model.get_submodule(name))
            except AttributeError:  # stage pruned because no output needs it
                pass
        return modules

    def _freeze(self, freeze_at: int) -> None:
        """Freeze the stem (``freeze_at >= 1``) and stages res2..res_{freeze_at} (ResNet semantics)."""
        self._freeze_at = int(freeze_at)
        if self._freeze_at >= 1:
            for p in self.model.parameters(recurse=False):  # e.g. position embeddings on the model
                p.requires_grad_(False)
        for m in self._frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "TimmBackbone":
        """Set the mode; frozen parts stay in eval mode (no stochastic depth / dropout there)."""
        super().train(mode)
        if mode:
            for m in self._frozen_modules():
                m.eval()
        return self

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """``(N, C_in, H, W)`` -> ``{name: (N, C_name, ceil(H / s), ceil(W / s))}`` for ``out_features``."""
        if x.dim() != 4:
            raise ValueError(f"TimmBackbone expects (N, C, H, W) images, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        d = self._size_divisibility
        pad_h, pad_w = (-h) % d, (-w) % d
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = self.model.forward_intermediates(x, indices=self._take_indices, intermediates_only=True)
        out = {}
        for name, f in zip(self._out_features, feats):
            s = self._out_feature_strides[name]
            f = f[..., : math.ceil(h / s), : math.ceil(w / s)]
            if name in self.out_norms:
                f = self.out_norms[name](f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            out[name] = f.contiguous()
        return out

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
                for f in self._out_features}


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape: Optional[ShapeSpec] = None) -> TimmBackbone:
    """Detectron2 builder (``MODEL.BACKBONE.NAME: "build_timm_backbone"``) reading ``MODEL.TIMM.*``
    and ``MODEL.BACKBONE.FREEZE_AT``."""
    in_chans = input_shape.channels if input_shape is not None and input_shape.channels else 3
    return TimmBackbone(
        model_name=cfg.MODEL.TIMM.NAME,
        out_features=cfg.MODEL.TIMM.OUT_FEATURES,
        drop_path_rate=cfg.MODEL.TIMM.DROP_PATH_RATE,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        out_norm=cfg.MODEL.TIMM.OUT_NORM,
        pretrained_weights=cfg.MODEL.TIMM.PRETRAINED_WEIGHTS,
        in_chans=in_chans,
    )
