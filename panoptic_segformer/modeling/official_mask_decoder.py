"""The released code's mask decoder, to run checkpoints converted from the official implementation.

The paper (Sec. 3.3.3) describes one mask decoder shared by thing and stuff queries; the official code
(zhiqi-li/Panoptic-SegFormer, mmdet 2.12, ``PanformerHead`` + ``MaskHead``) differs, and converted
weights only reproduce its results with its structure. ``MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_TYPE:
"official"`` selects this module; :class:`~.mask_decoder.MaskDecoder` stays the paper's version.

Differences from :class:`~.mask_decoder.MaskDecoder`, all reproduced here:

* **Two decoders**: a thing branch (4 layers, no self-attention in the COCO checkpoints) and a stuff
  branch (6 layers, with self-attention among stuff queries), each followed by a *tail*: an
  attention-maps-only layer (query/key projections and a mask head, no value path) whose masks are the
  final masks -- "a cheap implementation that makes the mask decoder one layer deeper".
* **Positional query added to the residual stream**: each layer takes ``query + query_pos`` as its
  input and its residual (the thing branch gets no positional query; stuff queries carry their own);
  the encoder tokens get no positional encoding.
* **Layer**: [self-attention -> Add & LayerNorm] -> cross-attention -> Add & LayerNorm -> FFN with GELU
  -> Add & LayerNorm; LayerNorm eps 1e-6; FFN width 4 C.
* **Mask head** (Eq. 1-2 in the official form): on the pre-softmax maps of each level a per-level
  ``Linear(h -> h) + ReLU`` over the head axis, levels 2..L bilinearly upsampled to level 1, concatenated
  and ``Linear(L*h -> 1) + ReLU``. The result is used **as a mask probability** (no sigmoid; the official
  dice loss is applied to it directly and inference thresholds it at 0.5), values above 1 included: the
  "official" post-processor reads it as it is; :meth:`OfficialMaskDecoder.mask_probabilities` clamps it
  to [0, 1] only for post-processors that need probabilities (``max_mask_value`` 1).
* Class FCs per layer as in the paper's decoder (thing: ``Linear(C, K_th)``, stuff: ``Linear(C, 1)``);
  the official inference classifies things with the location decoder instead
  (``MODEL.PANOPTIC_SEGFORMER.TEST.THING_CLASS_SOURCE: "location_decoder"``).

Deliberate deviation: padded keys are excluded from the softmax (the official code has no key padding
mask; it trains and tests one image per GPU without padding, where both are identical).

Training: with ``masks_of="all"`` (the meta-architecture in training) the output also holds
"official_layers", every block's masks and class logits and the tails' masks, which
:class:`~.official_criterion.OfficialCriterion` (``MODEL.PANOPTIC_SEGFORMER.CRITERION: "official"``)
supervises as the official ``PanformerHead.loss_single_panoptic`` does (panformer_head.py:689-1002). The
paper-text criterion cannot train this decoder (:meth:`OfficialMaskDecoder.check_trainable`).

Shapes: ``N`` batch, ``Q`` queries (thing then stuff), ``C`` channels, ``h`` heads, ``S`` tokens.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import focal_prior_bias
from .levels import LevelLayout
from .mask_decoder import MultiHeadCrossAttentionWithMaps, check_decoder_inputs, fill_padding

__all__ = ["OfficialMaskHead", "OfficialMaskDecoderLayer", "OfficialMaskBranch", "OfficialMaskDecoder"]


class OfficialMaskHead(nn.Module):
    """Attention maps (N, h, Q, S) -> masks (N, Q, H_1, W_1) in [0, inf), the official head.

    Per level l: ``relu(Linear_l(A_l))`` over the head axis at the level's own resolution; levels
    2..L are bilinearly upsampled (``align_corners=False``) to level 1; the L*h channels are concatenated
    level-major and ``relu(Linear(L*h -> 1))`` gives the mask. Parameters: ``L*(h*h + h) + L*h + 1``
    (241 for 8 heads x 3 levels).
    """

    def __init__(self, n_heads: int = 8, n_levels: int = 3):
        super().__init__()
        self.n_heads = n_heads
        self.n_levels = n_levels
        self.level_fcs = nn.ModuleList(nn.Linear(n_heads, n_heads) for _ in range(n_levels))
        self.fc = nn.Linear(n_heads * n_levels, 1)

    def forward(self, attn: Tensor, levels: LevelLayout) -> Tensor:
        """attn (N, h, Q, S) over the levels of ``levels`` -> masks (N, Q, H_1, W_1)."""
        n, h, q, s = attn.shape
        if h != self.n_heads or levels.num_levels != self.n_levels or s != levels.num_tokens:
            raise ValueError(f"attn {tuple(attn.shape)} does not match {self.n_heads} heads and "
                             f"{self.n_levels} levels of {levels}")
        size1 = levels.sizes[0]
        maps = []
        for lvl, (a, (hl, wl)) in enumerate(zip(levels.split(attn, dim=-1), levels.sizes)):
            a = a.permute(0, 2, 3, 1)  # (N, Q, H_l*W_l, h)
            a = F.relu(self.level_fcs[lvl](a))
            if lvl > 0:
                a = a.permute(0, 1, 3, 2).reshape(n * q, h, hl, wl)
                a = F.interpolate(a, size=size1, mode="bilinear", align_corners=False)
                a = a.reshape(n, q, h, -1).permute(0, 1, 3, 2)
            maps.append(a)
        mask = F.relu(self.fc(torch.cat(maps, dim=-1)))  # (N, Q, H_1*W_1, 1)
        return mask.view(n, q, *size1)


class OfficialMaskDecoderLayer(nn.Module):
    """One official mask-decoder layer (``Block``), or its attention-only ``tail``.

    ``x = query + query_pos``; [``x = LN(x + SelfAttn(x))``]; ``x = LN(x + CrossAttn(x, F))``;
    ``x = LN(x + FFN_GELU(x))``. The tail computes only the cross-attention maps of ``x`` and their mask.
    """

    def __init__(self, d_model: int = 256, n_heads: int = 8, d_ffn: int = 1024, n_levels: int = 3,
                 self_attn: bool = False, tail: bool = False):
        super().__init__()
        self.tail = tail
        self.use_self_attn = self_attn and not tail
        self.cross_attn = MultiHeadCrossAttentionWithMaps(d_model, n_heads, dropout=0.0)
        if tail:  # attention maps only: the value path does not exist in the official tail
            del self.cross_attn.v_proj, self.cross_attn.out_proj
        self.mask_head = OfficialMaskHead(n_heads, n_levels)
        if tail:
            return
        if self.use_self_attn:
            self.self_attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
            self.norm_sa = nn.LayerNorm(d_model, eps=1e-6)
        self.norm_ca = nn.LayerNorm(d_model, eps=1e-6)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm_ffn = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, x: Tensor, memory: Tensor, levels: LevelLayout,
                need_masks: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """
        Args:
            x: (N, Q, C) query + query_pos; memory: (N, S, C); levels: the layout of S.
            need_masks: compute this layer's masks (the official inference reads only the tail's).
        Returns:
            (N, Q, C) refined queries (None for the tail) and (N, Q, H_1, W_1) masks (None unless
            ``need_masks``).
        """
        if self.tail:
            _, _, attn = self.cross_attn.attention_maps(x, memory)
            return None, self.mask_head(attn, levels)
        if self.use_self_attn:
            x = self.norm_sa(x + self.self_attn(x, x, x, need_weights=False)[0])
        out, attn = self.cross_attn(x, memory, None, None, levels.padding_mask, need_maps=need_masks)
        x = self.norm_ca(x + out)
        x = self.norm_ffn(x + self.linear2(F.gelu(self.linear1(x))))
        return x, self.mask_head(attn, levels) if need_masks else None


class OfficialMaskBranch(nn.Module):
    """``num_layers`` official layers and a tail (``MaskHead`` of the official code)."""

    def __init__(self, d_model: int, num_layers: int, n_heads: int, d_ffn: int, n_levels: int,
                 self_attn: bool):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layer = OfficialMaskDecoderLayer(d_model, n_heads, d_ffn, n_levels, self_attn)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.tail = OfficialMaskDecoderLayer(d_model, n_heads, d_ffn, n_levels, tail=True)

    def forward(self, queries: Tensor, query_pos: Optional[Tensor], memory: Tensor, levels: LevelLayout,
                layer_masks: bool = False):
        """Returns the refined queries of every layer [(N, Q, C)], the tail's masks (N, Q, H_1, W_1) and,
        with ``layer_masks``, every layer's masks [(N, Q, H_1, W_1)] (the official ``MaskHead`` returns
        them for deep supervision, mask_head.py:431-452), else an empty list."""
        x, refined, masks_per_layer = queries, [], []
        for layer in self.layers:
            x, m = layer(x if query_pos is None else x + query_pos, memory, levels, need_masks=layer_masks)
            refined.append(x)
            if layer_masks:
                masks_per_layer.append(m)
        _, masks = self.tail(x if query_pos is None else x + query_pos, memory, levels)
        return refined, masks, masks_per_layer


class OfficialMaskDecoder(nn.Module):
    """Thing and stuff mask decoders of the official code, with the output format of ``MaskDecoder``.

    Args:
        num_thing_classes: outputs of the thing class FCs.
        d_model, n_heads, d_ffn: layer sizes (official: 256, 8, 4 * 256).
        num_thing_layers / num_stuff_layers: layers before each tail (official COCO: 4 / 6).
        thing_self_attn / stuff_self_attn: self-attention among queries (official COCO: False / True).
        n_levels: levels of F the masks are built from (the backbone levels; official: 3).
    """

    padding_value = 0.0  # "pred_masks" of padding cells: probability 0

    def __init__(self, num_thing_classes: int, d_model: int = 256, n_heads: int = 8, d_ffn: int = 1024,
                 num_thing_layers: int = 4, num_stuff_layers: int = 6, thing_self_attn: bool = False,
                 stuff_self_attn: bool = True, n_levels: int = 3):
        super().__init__()
        self.d_model = d_model
        self.n_levels = n_levels
        self.num_layers = max(num_thing_layers, num_stuff_layers)
        self.thing_branch = OfficialMaskBranch(d_model, num_thing_layers, n_heads, d_ffn, n_levels,
                                               thing_self_attn)
        self.stuff_branch = OfficialMaskBranch(d_model, num_stuff_layers, n_heads, d_ffn, n_levels,
                                               stuff_self_attn)
        self.thing_class_embed = nn.ModuleList(
            nn.Linear(d_model, num_thing_classes) for _ in range(num_thing_layers))
        self.stuff_class_embed = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(num_stuff_layers))
        bias = focal_prior_bias(0.01)
        for fc in list(self.thing_class_embed) + list(self.stuff_class_embed):
            nn.init.constant_(fc.bias, bias)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    @staticmethod
    def mask_probabilities(masks: Tensor, max_value: float = 1.0, buffers=None) -> Tensor:
        """The official masks are the probabilities (ReLU outputs, >= 0, unbounded): returned as they
        are when ``max_value`` is ``inf``, else clamped to [0, ``max_value``] (into the buffer "probs"
        of ``buffers``, :class:`~panoptic_segformer.utils.ScratchBuffers`, when given)."""
        if max_value == float("inf"):
            return masks
        if buffers is None:
            return masks.clamp(0.0, max_value)
        return torch.clamp(masks, 0.0, max_value, out=buffers.get("probs", masks.shape, masks))

    @staticmethod
    def mask_logits(masks: Tensor) -> Optional[Tensor]:
        """None: the official masks are probabilities, there are no logits."""
        return None

    def check_trainable(self) -> None:
        """Raise: called by the meta-architecture in training unless the criterion is the official one
        (the paper-text criterion's sigmoid Dice and per-layer format do not apply to these ReLU masks)."""
        raise RuntimeError("MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_TYPE 'official' runs at inference only with "
                           "MODEL.PANOPTIC_SEGFORMER.CRITERION 'paper'; set CRITERION 'official' to train it "
                           "with the official objective (configs/coco/official/)")

    def forward(self, queries: Tensor, query_pos: Optional[Tensor], num_thing_queries: int, memory: Tensor,
                memory_pos: Optional[Tensor], levels: LevelLayout, num_layers: Optional[int] = None,
                return_attention: bool = False, masks_of: str = "last") -> List[Dict[str, Tensor]]:
        """Same arguments as :meth:`MaskDecoder.forward`; ``memory_pos`` and the thing queries'
        ``query_pos`` are not used (the official code passes none), and there is only the last layer
        (``masks_of`` is accepted for the common signature).

        Returns a one-element list (the official inference uses only the final prediction):
        "thing_logits" (N, Q_th, K_th) and "stuff_logits" (N, Q_st) from each branch's last layer,
        "pred_masks" (N, Q, H_1, W_1) the tails' masks, probabilities in [0, inf). With ``masks_of="all"``
        (training) also "official_layers": "thing_masks" / "stuff_masks", each layer's masks and then the
        tail's ([(N, Q_th|Q_st, H_1, W_1)] * (layers + 1)), and "thing_logits" [(N, Q_th, K_th)] /
        "stuff_logits" [(N, Q_st)] of each layer (the official head's ``cls_thing_branches`` /
        ``cls_stuff_branches``, panformer_head.py:766-801; the tail has none).
        """
        if num_layers not in (None, self.num_layers) or return_attention:
            raise ValueError("MASK_DECODER_TYPE 'official' supports neither TEST.NUM_MASK_DECODER_LAYERS "
                             "nor returning attention maps")
        if masks_of not in ("last", "all"):
            raise ValueError(f"masks_of must be 'last' or 'all', got {masks_of!r}")
        check_decoder_inputs(self, queries, query_pos, num_thing_queries, memory, memory_pos, levels, None)
        things, stuff = queries[:, :num_thing_queries], queries[:, num_thing_queries:]
        stuff_pos = None if query_pos is None else query_pos[:, num_thing_queries:]
        every = masks_of == "all"
        thing_q, thing_masks, thing_layers = self.thing_branch(things, None, memory, levels, layer_masks=every)
        stuff_q, stuff_masks, stuff_layers = self.stuff_branch(stuff, stuff_pos, memory, levels, layer_masks=every)
        out = {
            "thing_logits": self.thing_class_embed[-1](thing_q[-1]),
            "stuff_logits": self.stuff_class_embed[-1](stuff_q[-1]).squeeze(-1),
            "pred_masks": fill_padding(torch.cat([thing_masks, stuff_masks], dim=1), levels, self.padding_value),
        }
        if every:
            out["official_layers"] = {
                "thing_masks": [fill_padding(m, levels, self.padding_value) for m in thing_layers + [thing_masks]],
                "stuff_masks": [fill_padding(m, levels, self.padding_value) for m in stuff_layers + [stuff_masks]],
                "thing_logits": [fc(q) for fc, q in zip(self.thing_class_embed, thing_q)],
                "stuff_logits": [fc(q).squeeze(-1) for fc, q in zip(self.stuff_class_embed, stuff_q)],
            }
        return [out]
