"""Mask decoder of Panoptic SegFormer (Sec. 3.3.3, Eq. 1-2, Appendix B.3, Fig. B.4/B.5).

Queries (location-aware thing queries from the location decoder, then class-fixed stuff queries) attend
to the encoder tokens F with plain multi-head cross-attention. Every layer

* classifies its refined queries with an FC layer: thing queries over all thing classes, each stuff
  query with ONE logit for its own stuff class (class-fixed assignment, Sec. 3.3.1);
* turns its multi-head, multi-scale attention maps A (N, h, Q, L1+L2+L3) into mask logits with a tiny
  head (Eq. 1 split/reshape per level, Eq. 2 upsample to 1/8 and concatenate, then a 1x1-conv head,
  Fig. B.5), so the ground-truth masks supervise where each layer attends (deep supervision).

Design decisions (documented here once):

* **Attention maps are the pre-softmax scaled dot products** ``q.k / sqrt(d_head)``. The official code
  (zhiqi-li/Panoptic-SegFormer, ``easymd/models/panformer/mask_head.py``, class ``Attention``) splits the
  ``attn = (q @ k^T) * scale`` tensor into levels *before* ``attn.softmax(-1)``; softmax weights would
  also be ~1/S small and coupled across all levels and positions.
* **Padding never leaks into masks.** Padding keys are excluded from the softmax (key padding mask), and
  before Eq. 2's upsampling every level map is edge-replicated from its valid (top-left) region into the
  padded region, so bilinear interpolation near the valid border sees the same values as for the image
  alone. Mask logits inside the padded region are therefore edge extensions, never padded-token scores.
  Exact invariance needs per-level valid sizes that halve exactly (as with size-divisible padding);
  otherwise ``size=`` upsampling of different-sized maps differs by construction.
* **One mask head per layer** (not shared), as the official code (each decoder ``Block`` owns its head);
  it costs ~200 parameters per layer.
* The first 1x1 convolution of the head is applied to each level *before* upsampling (a per-pixel
  channel mix commutes exactly with bilinear interpolation), so the (N*Q, h*L, H_1, W_1) tensor of Eq. 2
  is never materialised in ``forward``; ``AttentionMaskHead.fuse`` builds it explicitly.

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

__all__ = [
    "MultiHeadCrossAttentionWithMaps",
    "AttentionMaskHead",
    "MaskDecoderLayer",
    "MaskDecoder",
    "check_decoder_inputs",
    "fill_padding",
]

def _replicate_index(level_padding_mask: Tensor) -> Tensor:
    """Flat source index that edge-replicates each image's valid (top-left) region over its padding.

    Args:
        level_padding_mask: (N, H, W) bool, True = padding.
    Returns:
        (N, H*W) int64: position ``(r, c)`` reads ``(min(r, h_valid-1), min(c, w_valid-1))``.
    """
    n, h, w = level_padding_mask.shape
    valid = ~level_padding_mask
    valid_h = valid.any(dim=2).sum(dim=1).clamp(min=1)  # (N,)
    valid_w = valid.any(dim=1).sum(dim=1).clamp(min=1)
    device = level_padding_mask.device
    rows = torch.minimum(torch.arange(h, device=device)[None], valid_h[:, None] - 1)  # (N, H)
    cols = torch.minimum(torch.arange(w, device=device)[None], valid_w[:, None] - 1)  # (N, W)
    return (rows[:, :, None] * w + cols[:, None, :]).reshape(n, h * w)


class MultiHeadCrossAttentionWithMaps(nn.Module):
    """Multi-head cross-attention (Vaswani et al.) that also returns its attention maps A (Sec. 3.3.3).

    q = W_q (query + query_pos), k = W_k (memory + memory_pos), v = W_v memory. The value path is
    ``softmax(A, masked over padding keys) v``; the maps returned for Eq. 1 are the pre-softmax scaled
    dot products ``A = q k^T / sqrt(C / h)`` (see the module docstring). Padding columns of A hold
    meaningless scores; use the padding mask to ignore them.
    """

    def __init__(self, d_model: int = 256, n_heads: int = 8, dropout: float = 0.1):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.scale = self.head_dim**-0.5
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def queries_and_keys(self, query: Tensor, memory: Tensor, query_pos: Optional[Tensor] = None,
                         memory_pos: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Per-head q (N, h, Q, d) = W_q (query + query_pos) and k (N, h, S, d) = W_k (memory + memory_pos)."""
        n, q_len, _ = query.shape
        q_in = query if query_pos is None else query + query_pos
        k_in = memory if memory_pos is None else memory + memory_pos
        q = self.q_proj(q_in).view(n, q_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(k_in).view(n, memory.shape[1], self.n_heads, self.head_dim).transpose(1, 2)
        return q, k

    def attention_maps(
        self,
        query: Tensor,
        memory: Tensor,
        query_pos: Optional[Tensor] = None,
        memory_pos: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Per-head q (N, h, Q, d), k (N, h, S, d) and the pre-softmax maps A = q k^T / sqrt(d) (N, h, Q, S)."""
        q, k = self.queries_and_keys(query, memory, query_pos, memory_pos)
        return q, k, torch.matmul(q * self.scale, k.transpose(-2, -1))

    def forward(
        self,
        query: Tensor,
        memory: Tensor,
        query_pos: Optional[Tensor] = None,
        memory_pos: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        need_maps: bool = True,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """
        Args:
            query: (N, Q, C); query_pos: (N, Q, C) or None.
            memory: (N, S, C); memory_pos: (N, S, C) or None.
            key_padding_mask: (N, S) bool, True = padding, or None.
            need_maps: compute the maps A (False: only the attended values, e.g. for a layer whose
                masks nobody reads at inference).
        Returns:
            out: (N, Q, C) attended values after the output projection.
            attn: (N, h, Q, S) pre-softmax scaled attention logits A (None unless ``need_maps``).
        """
        n, q_len, c = query.shape
        s_len = memory.shape[1]
        if need_maps:
            q, k, attn = self.attention_maps(query, memory, query_pos, memory_pos)
        else:
            (q, k), attn = self.queries_and_keys(query, memory, query_pos, memory_pos), None
        v = self.v_proj(memory).view(n, s_len, self.n_heads, self.head_dim).transpose(1, 2)
        attend = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        # Same q, k and scale as `attn`; the fused kernel avoids storing softmax weights for backward.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attend, dropout_p=self.dropout if self.training else 0.0, scale=self.scale
        )
        out = out.transpose(1, 2).reshape(n, q_len, c)
        return self.out_proj(out), attn


class AttentionMaskHead(nn.Module):
    """Attention maps -> mask logits (Eq. 1-2, Fig. B.5).

    Eq. 1 splits A (N, h, Q, S) per level and reshapes to (N*Q, h, H_l, W_l); Eq. 2 bilinearly upsamples
    levels 2..L to the level-1 (1/8) size (``size=`` of level 1, so odd sizes work) and concatenates
    level-major over (level, head) -> (N*Q, h*L, H_1, W_1); then
    Conv1x1(h*L -> hidden), ReLU, Conv1x1(hidden -> 1) gives the mask logits.

    Parameter count: ``hidden * (h*L + 2) + 1`` = 209 for 8 heads x 3 levels, hidden 8.
    """

    def __init__(self, n_heads: int = 8, n_levels: int = 3, hidden: int = 8):
        super().__init__()
        self.n_heads = n_heads
        self.n_levels = n_levels
        self.hidden = hidden
        self.conv1 = nn.Conv2d(n_heads * n_levels, hidden, kernel_size=1)
        self.conv2 = nn.Conv2d(hidden, 1, kernel_size=1)

    @staticmethod
    def num_parameters_formula(n_heads: int, n_levels: int, hidden: int) -> int:
        """``hidden*(h*L) + hidden`` (first conv) ``+ hidden + 1`` (second conv)."""
        return hidden * (n_heads * n_levels + 2) + 1

    def _check(self, attn: Tensor, levels: LevelLayout) -> None:
        if attn.dim() != 4 or attn.shape[1] != self.n_heads or levels.num_levels != self.n_levels \
                or attn.shape[-1] != levels.num_tokens or attn.shape[0] != levels.batch_size:
            raise ValueError(f"attn must be (N, h={self.n_heads}, Q, S) over {self.n_levels} levels, got "
                             f"{tuple(attn.shape)} for {levels}")

    def split(self, attn: Tensor, levels: LevelLayout) -> List[Tensor]:
        """Eq. 1: (N, h, Q, S) -> [(N*Q, h, H_l, W_l) for each level l]."""
        self._check(attn, levels)
        n, h, q, _ = attn.shape
        return [a.permute(0, 2, 1, 3).reshape(n * q, h, hl, wl)  # (N, Q, h, H_l*W_l) -> maps
                for a, (hl, wl) in zip(levels.split(attn, dim=-1), levels.sizes)]

    def _level_maps(self, attn: Tensor, levels: LevelLayout, weight: Optional[Tensor] = None):
        """Yield per level l the (N*Q, c, H_l, W_l) maps of ``A_l`` -- the h head maps, or with ``weight``
        (c, L, h) their mix ``weight[:, l] A_l`` (the head's first 1x1 conv) -- edge-replicated over each
        image's padding (module docstring)."""
        n, h, q, _ = attn.shape
        pads = levels.split(levels.padding_mask, dim=1)
        for lvl, (a, pad, (hl, wl)) in enumerate(zip(levels.split(attn, dim=-1), pads, levels.sizes)):
            if weight is None:
                a = a.permute(0, 2, 1, 3)  # (N, Q, h, H_l*W_l)
            else:
                a = torch.einsum("nhqs,ch->nqcs", a, weight[:, lvl])  # (N, Q, c, H_l*W_l)
            idx = _replicate_index(pad.view(n, hl, wl))
            a = a.gather(-1, idx[:, None, None, :].expand(a.shape))
            yield a.reshape(n * q, a.shape[2], hl, wl)

    def fuse(self, attn: Tensor, levels: LevelLayout) -> Tensor:
        """Eq. 1 + Eq. 2: A_fused = Concat(A_1, Up(A_2), Up(A_3)) of shape (N*Q, h*L, H_1, W_1), each level
        edge-replicated over its padding before upsampling."""
        self._check(attn, levels)
        size1 = levels.sizes[0]
        return torch.cat([a if lvl == 0 else F.interpolate(a, size=size1, mode="bilinear", align_corners=False)
                          for lvl, a in enumerate(self._level_maps(attn, levels))], dim=1)

    def forward(self, attn: Tensor, levels: LevelLayout) -> Tensor:
        """
        Args:
            attn: (N, h, Q, S) attention maps A of one decoder layer; levels: the layout of S.
        Returns:
            (N, Q, H_1, W_1) mask logits at the level-1 (1/8) resolution of the padded batch.
            Equal to ``conv2(relu(conv1(fuse(attn))))``, computed without materialising ``fuse``.
        """
        self._check(attn, levels)
        n, h, q, _ = attn.shape
        size1 = levels.sizes[0]
        if q == 0:
            return attn.new_zeros((n, 0) + size1)
        weight = self.conv1.weight.view(self.hidden, self.n_levels, h)  # channel index = level*h + head
        fused = None
        for lvl, p in enumerate(self._level_maps(attn, levels, weight)):
            if lvl > 0:
                p = F.interpolate(p, size=size1, mode="bilinear", align_corners=False)
            fused = p if fused is None else fused + p
        x = F.relu(fused + self.conv1.bias.view(1, -1, 1, 1))
        return self.conv2(x).view(n, q, *size1)


class MaskDecoderLayer(nn.Module):
    """One mask-decoder layer (Fig. B.4), post-norm.

    [optional self-attention among queries -> Add & LayerNorm] -> cross-attention to F that also returns
    its attention maps -> Add & LayerNorm -> FFN (Linear, ReLU, Linear) -> Add & LayerNorm.
    Self-attention is off by default: App. B.3 found discarding it does not hurt; ``self_attn=True``
    adds it (the official COCO checkpoints use it in the stuff branch).
    """

    def __init__(
        self,
        d_model: int = 256,
        n_heads: int = 8,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        self_attn: bool = False,
    ):
        super().__init__()
        self.use_self_attn = self_attn
        if self_attn:
            self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
            self.dropout_sa = nn.Dropout(dropout)
            self.norm_sa = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadCrossAttentionWithMaps(d_model, n_heads, dropout)
        self.dropout_ca = nn.Dropout(dropout)
        self.norm_ca = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout_ffn1 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout_ffn2 = nn.Dropout(dropout)
        self.norm_ffn = nn.LayerNorm(d_model)
        for lin in (self.linear1, self.linear2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Optional[Tensor],
        memory: Tensor,
        memory_pos: Optional[Tensor],
        padding_mask: Optional[Tensor],
        need_maps: bool = True,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """
        Args:
            tgt: (N, Q, C) queries; query_pos: (N, Q, C) or None.
            memory: (N, S, C); memory_pos: (N, S, C) or None; padding_mask: (N, S) bool or None.
            need_maps: compute the attention maps (see :class:`MultiHeadCrossAttentionWithMaps`).
        Returns:
            (N, Q, C) refined queries Q_refine and (N, h, Q, S) attention maps A (None unless ``need_maps``).
        """
        if self.use_self_attn:
            q = k = tgt if query_pos is None else tgt + query_pos
            tgt2 = self.self_attn(q, k, tgt, need_weights=False)[0]
            tgt = self.norm_sa(tgt + self.dropout_sa(tgt2))
        tgt2, attn = self.cross_attn(tgt, memory, query_pos, memory_pos, padding_mask, need_maps)
        tgt = self.norm_ca(tgt + self.dropout_ca(tgt2))
        tgt2 = self.linear2(self.dropout_ffn1(F.relu(self.linear1(tgt), inplace=True)))
        tgt = self.norm_ffn(tgt + self.dropout_ffn2(tgt2))
        return tgt, attn


def fill_padding(masks: Tensor, levels: LevelLayout, value: float) -> Tensor:
    """``masks`` (N, Q, H_1, W_1) at level 1 with its padding cells set to ``value``, so that the mask
    losses and the post-processors never see values the attention maps copied into padding."""
    n, _, h1, w1 = masks.shape
    pad = levels.padding_mask[:, :h1 * w1].view(n, 1, h1, w1)
    return masks.masked_fill(pad, value)


def check_decoder_inputs(decoder: nn.Module, queries: Tensor, query_pos: Optional[Tensor], num_thing_queries: int,
                         memory: Tensor, memory_pos: Optional[Tensor], levels: LevelLayout,
                         num_layers: Optional[int]) -> int:
    """Shape checks shared by the mask decoders (``decoder.d_model``, ``.n_levels``, ``.num_layers``);
    returns the number of layers to run (``num_layers``, default all). Raises ValueError naming the
    argument."""
    levels.check_tokens(memory, "memory", decoder.d_model)
    if levels.num_levels != decoder.n_levels:
        raise ValueError(f"{type(decoder).__name__}(n_levels={decoder.n_levels}) got {levels}")
    if queries.dim() != 3 or queries.shape[0] != memory.shape[0] or queries.shape[-1] != decoder.d_model:
        raise ValueError(f"queries must be (N={memory.shape[0]}, Q, {decoder.d_model}), got {tuple(queries.shape)}")
    for name, t, like in (("query_pos", query_pos, queries), ("memory_pos", memory_pos, memory)):
        if t is not None and t.shape != like.shape:
            raise ValueError(f"{name} must match {tuple(like.shape)}, got {tuple(t.shape)}")
    if not 0 <= num_thing_queries <= queries.shape[1]:
        raise ValueError(f"num_thing_queries must be in [0, Q={queries.shape[1]}], got {num_thing_queries}")
    num_layers = decoder.num_layers if num_layers is None else num_layers
    if not 0 <= num_layers <= decoder.num_layers:
        raise ValueError(f"num_layers must be in [0, {decoder.num_layers}], got {num_layers}")
    return num_layers


class MaskDecoder(nn.Module):
    """Mask decoder (Sec. 3.3.3): classes and masks for thing and stuff queries from every layer.

    Args:
        num_thing_classes: classes of the thing-query FC (all classes in the joint-matching baseline,
            which passes no stuff queries).
        d_model, n_heads, d_ffn, dropout: layer hyper-parameters (App. A.1: 6 layers, 8 heads).
        num_layers: D_m, number of layers (deep supervision over all of them, Eq. 4-5).
        n_levels: L levels of F the attention maps are split into (Eq. 1).
        self_attn: add self-attention to every layer (App. B.3 drops it by default).
        mask_hidden: hidden channels of the mask head (8 -> 209 parameters for 8 heads x 3 levels).
    Per layer: ``thing_class_embed`` Linear(C, num_thing_classes), ``stuff_class_embed`` Linear(C, 1)
    (class-fixed: each stuff query scores only its own class), ``mask_heads`` AttentionMaskHead; class
    biases use the focal-loss prior -log((1-0.01)/0.01).
    """

    # "pred_masks" value of padding cells: a logit meaning "background" for every loss and post-processor.
    padding_value = -1e4

    @staticmethod
    def mask_probabilities(mask_logits: Tensor, max_value: float = 1.0, buffers=None) -> Tensor:
        """Mask probabilities from the "pred_masks" logits (a sigmoid: within any ``max_value`` >= 1,
        the largest value the post-processor accepts), written into the buffer "probs" of ``buffers``
        (:class:`~panoptic_segformer.utils.ScratchBuffers`) when given."""
        if buffers is None:
            return mask_logits.sigmoid()
        return torch.sigmoid(mask_logits, out=buffers.get("probs", mask_logits.shape, mask_logits))

    @staticmethod
    def mask_logits(masks: Tensor) -> Optional[Tensor]:
        """The logits behind :meth:`mask_probabilities`: "pred_masks" are logits."""
        return masks

    def check_trainable(self) -> None:
        """The paper's decoder trains (Sec. 3.4)."""

    def __init__(
        self,
        num_thing_classes: int,
        d_model: int = 256,
        num_layers: int = 6,
        n_heads: int = 8,
        n_levels: int = 3,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        self_attn: bool = False,
        mask_hidden: int = 8,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.d_model = d_model
        self.num_layers = num_layers
        self.n_heads = n_heads
        self.n_levels = n_levels
        layer = MaskDecoderLayer(d_model, n_heads, d_ffn, dropout, self_attn)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.thing_class_embed = nn.ModuleList(
            nn.Linear(d_model, num_thing_classes) for _ in range(num_layers)
        )
        self.stuff_class_embed = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(num_layers))
        self.mask_heads = nn.ModuleList(
            AttentionMaskHead(n_heads, n_levels, mask_hidden) for _ in range(num_layers)
        )
        bias = focal_prior_bias(0.01)
        for fc in list(self.thing_class_embed) + list(self.stuff_class_embed):
            nn.init.constant_(fc.bias, bias)

    def forward(self, queries: Tensor, query_pos: Optional[Tensor], num_thing_queries: int, memory: Tensor,
                memory_pos: Optional[Tensor], levels: LevelLayout, num_layers: Optional[int] = None,
                return_attention: bool = False, masks_of: str = "all") -> List[Dict[str, Tensor]]:
        """
        Args:
            queries: (N, Q, C), the first ``num_thing_queries`` are thing queries, the rest stuff queries
                (stuff query i belongs to stuff class i).
            query_pos: (N, Q, C) or None.
            memory: (N, S, C) encoder tokens F; memory_pos: (N, S, C) or None.
            levels: the layout of S (padding keys are excluded from the softmax).
            num_layers: run only the first ``num_layers`` layers (Table 10); default all.
            return_attention: also return each layer's attention maps.
            masks_of: "all" layers (training: deep supervision, Eq. 4-5) or only the "last" one
                (inference reads only the last layer's masks: the other layers then compute neither
                attention maps nor masks, and their dicts have no "pred_masks").
        Returns:
            list over the layers run of dicts with
            "thing_logits": (N, Q_th, num_thing_classes); "stuff_logits": (N, Q_st) ((N, 0) if none);
            "pred_masks": (N, Q, H_1, W_1) mask logits at 1/8 of the padded batch;
            "attention": (N, h, Q, S) pre-softmax attention maps, only if return_attention.
        """
        num_layers = check_decoder_inputs(self, queries, query_pos, num_thing_queries, memory, memory_pos,
                                          levels, num_layers)
        if masks_of not in ("all", "last"):
            raise ValueError(f"masks_of must be 'all' or 'last', got {masks_of!r}")
        outputs: List[Dict[str, Tensor]] = []
        tgt = queries
        for lid in range(num_layers):
            masks = return_attention or masks_of == "all" or lid == num_layers - 1
            tgt, attn = self.layers[lid](tgt, query_pos, memory, memory_pos, levels.padding_mask, need_maps=masks)
            out = {
                "thing_logits": self.thing_class_embed[lid](tgt[:, :num_thing_queries]),
                "stuff_logits": self.stuff_class_embed[lid](tgt[:, num_thing_queries:]).squeeze(-1),
            }
            if masks:
                out["pred_masks"] = fill_padding(self.mask_heads[lid](attn, levels), levels, self.padding_value)
            if return_attention:
                out["attention"] = attn
            outputs.append(out)
        return outputs
