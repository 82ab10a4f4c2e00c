"""Location decoder of Panoptic SegFormer (Sec. 3.3.2, Appendix B.2).

The location decoder follows Deformable DETR's decoder with iterative bounding-box refinement: thing
queries attend to the multi-scale encoder tokens F with multi-scale deformable attention and become
*location-aware* thing queries, which are then fed to the mask decoder (Sec. 3.3.3). An auxiliary head
per layer predicts thing classes and boxes (cx, cy, w, h), supervised with the detection loss L_det
(Eq. 4); with ``box_free=True`` it predicts mask mass centres (cx, cy) instead (Table 6, "6*").

Shapes: ``N`` batch, ``Q`` thing queries, ``C`` channels (d_model), ``S`` tokens over all ``L`` levels.
"""

from __future__ import annotations

import copy
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import MLP, focal_prior_bias, inverse_sigmoid
from .levels import LevelLayout
from .ms_deform_attn import MSDeformAttn

__all__ = [
    "LocationDecoderLayer",
    "LocationDecoder",
]


class LocationDecoderLayer(nn.Module):
    """One location-decoder layer (Sec. 3.3.2): Deformable DETR's decoder layer, post-norm.

    self-attention among thing queries (q = k = tgt + query_pos, v = tgt) -> Add & LayerNorm
    -> multi-scale deformable cross-attention to F (query = tgt + query_pos) -> Add & LayerNorm
    -> FFN (Linear, ReLU, Linear) -> Add & LayerNorm.
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 3,
        n_heads: int = 8,
        n_points: int = 4,
        msda_impl: str = "auto",
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout_sa = nn.Dropout(dropout)
        self.norm_sa = nn.LayerNorm(d_model)

        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, msda_impl)
        self.dropout_ca = nn.Dropout(dropout)
        self.norm_ca = nn.LayerNorm(d_model)

        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout_ffn1 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout_ffn2 = nn.Dropout(dropout)
        self.norm_ffn = nn.LayerNorm(d_model)

        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)
        nn.init.zeros_(self.linear1.bias)
        nn.init.zeros_(self.linear2.bias)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                levels: LevelLayout) -> Tensor:
        """
        Args:
            tgt: (N, Q, C) thing queries; query_pos: (N, Q, C).
            reference_points: (N, Q, L, 2) or (N, Q, L, 4), normalized and already scaled by valid ratios.
            memory: (N, S, C) encoder tokens; levels: their layout.
        Returns:
            (N, Q, C) refined thing queries.
        """
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm_sa(tgt + self.dropout_sa(tgt2))

        tgt2 = self.cross_attn(tgt + query_pos, reference_points, memory, levels)
        tgt = self.norm_ca(tgt + self.dropout_ca(tgt2))

        tgt2 = self.linear2(self.dropout_ffn1(F.relu(self.linear1(tgt), inplace=True)))
        tgt = self.norm_ffn(tgt + self.dropout_ffn2(tgt2))
        return tgt


class LocationDecoder(nn.Module):
    """Location decoder (Sec. 3.3.2, App. B.2): turns N_th learnable thing queries into location-aware ones.

    Deformable DETR decoder with iterative bounding-box refinement: layer ``k`` predicts a box offset
    in inverse-sigmoid space relative to its input reference points; the refined box, detached, is the
    next layer's reference point. The per-layer auxiliary head (class FC + box MLP) is only needed for
    the detection loss L_det during training (and for query filtering, App. B.2).

    Args:
        num_thing_classes: classes of the auxiliary detection head (all classes in the joint-matching
            baseline of Table 8).
        d_model, n_heads, n_levels, n_points, d_ffn, dropout: layer hyper-parameters (App. A.1).
        num_layers: 0..N layers (Table 6 ablates 1, 2, 6). With 0 layers the thing queries are returned
            unchanged and there are no auxiliary predictions.
        num_queries: N_th thing queries (300, App. A.1).
        box_free: predict mask mass centres (cx, cy) instead of boxes (Table 6 "6*"); reference points
            then stay 2-D.
        msda_impl: deformable-attention implementation of every layer (see :class:`MSDeformAttn`).
    """

    def __init__(
        self,
        num_thing_classes: int,
        d_model: int = 256,
        num_layers: int = 6,
        num_queries: int = 300,
        n_heads: int = 8,
        n_levels: int = 3,
        n_points: int = 4,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        box_free: bool = False,
        msda_impl: str = "auto",
    ):
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        self.d_model = d_model
        self.num_layers = num_layers
        self.num_queries = num_queries
        self.n_levels = n_levels
        self.box_free = box_free
        self.box_dim = 2 if box_free else 4

        # First half of each row is query_pos, second half the query content tgt (Deformable DETR).
        self.query_embed = nn.Embedding(num_queries, 2 * d_model)
        # Reference points are read by the layers only: none without layers (a parameter that never
        # gets a gradient would also stop DistributedDataParallel).
        self.reference_points = nn.Linear(d_model, 2) if num_layers > 0 else None
        if self.reference_points is not None:
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)

        layer = LocationDecoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, n_points, msda_impl)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

        self.class_embed = nn.ModuleList(nn.Linear(d_model, num_thing_classes) for _ in range(num_layers))
        self.bbox_embed = nn.ModuleList(MLP(d_model, d_model, self.box_dim, 3) for _ in range(num_layers))
        bias = focal_prior_bias(0.01)
        for fc in self.class_embed:
            nn.init.constant_(fc.bias, bias)
        for mlp in self.bbox_embed:
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        if num_layers > 0 and not box_free:
            # The first layer starts from 2-D reference points: its (w, h) come from the bias alone.
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)

    def forward(self, memory: Tensor, levels: LevelLayout) -> Dict[str, object]:
        """
        Args:
            memory: (N, S, C) encoder tokens F; levels: their layout (its ``valid_ratios`` (N, L, 2)
                scale the reference points; its padding tokens are not attended to).
        Returns a dict:
            "queries": (N, Q, C) location-aware thing queries of the last layer (tgt if num_layers == 0).
            "query_pos": (N, Q, C) their positional queries.
            "pred_logits": list over layers of (N, Q, num_thing_classes).
            "pred_boxes": list over layers of (N, Q, 4) normalized (cx, cy, w, h) in (0, 1), relative to
                the valid (unpadded) image; (N, Q, 2) mass centres (cx, cy) when box_free.
            "reference_points": list of num_layers + 1 tensors, the reference points fed to each layer
                (unscaled, (N, Q, 2) then (N, Q, box_dim)) followed by the final refined ones; all but the
                first are detached. Empty when num_layers == 0.
        """
        levels.check_tokens(memory, "memory", self.d_model)
        if levels.num_levels != self.n_levels:
            raise ValueError(f"LocationDecoder(n_levels={self.n_levels}) got {levels}")
        n, valid_ratios = memory.shape[0], levels.valid_ratios
        query_pos, tgt = torch.split(self.query_embed.weight, self.d_model, dim=1)
        query_pos = query_pos.unsqueeze(0).expand(n, -1, -1)
        tgt = tgt.unsqueeze(0).expand(n, -1, -1)
        pred_logits: List[Tensor] = []
        pred_boxes: List[Tensor] = []
        references: List[Tensor] = []
        if self.num_layers > 0:
            reference = self.reference_points(query_pos).sigmoid()  # (N, Q, 2)
            references.append(reference)
        output = tgt
        for lid, layer in enumerate(self.layers):
            if reference.shape[-1] == 4:
                ratios = torch.cat([valid_ratios, valid_ratios], dim=-1)
            else:
                ratios = valid_ratios
            reference_input = reference[:, :, None] * ratios[:, None]  # (N, Q, L, 2|4)
            output = layer(output, query_pos, reference_input, memory, levels)
            delta = self.bbox_embed[lid](output)
            if delta.shape[-1] == reference.shape[-1]:  # (cx,cy,w,h) after layer 0, or box-free centres
                boxes = (delta + inverse_sigmoid(reference)).sigmoid()
            else:  # layer 0 of the box head: 2-D reference, (w, h) from the head alone
                boxes = torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()
            pred_logits.append(self.class_embed[lid](output))
            pred_boxes.append(boxes)
            reference = boxes.detach()
            references.append(reference)
        return {
            "queries": output,
            "query_pos": query_pos,
            "pred_logits": pred_logits,
            "pred_boxes": pred_boxes,
            "reference_points": references,
        }
