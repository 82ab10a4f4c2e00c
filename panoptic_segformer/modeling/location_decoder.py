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
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mask_decoder import check_multiscale_inputs, focal_prior_bias
from .ms_deform_attn import MSDeformAttn, check_level_tensors

__all__ = [
    "MLP",
    "inverse_sigmoid",
    "LocationDecoderLayer",
    "LocationDecoder",
]


class MLP(nn.Module):
    """DETR's feed-forward network: ``num_layers`` Linear layers with ReLU between them.

    Args:
        input_dim, hidden_dim, output_dim: feature sizes.
        num_layers: number of Linear layers (>= 1).
    Shapes: ``(..., input_dim) -> (..., output_dim)``.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs num_layers >= 1, got {num_layers}")
        self.num_layers = num_layers
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Inverse of the sigmoid, ``log(x / (1 - x))``, with ``x`` clamped to [0, 1] and both terms to >= eps."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


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
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout_sa = nn.Dropout(dropout)
        self.norm_sa = nn.LayerNorm(d_model)

        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
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

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Optional[Tensor] = None,
        spatial_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> Tensor:
        """
        Args:
            tgt: (N, Q, C) thing queries; query_pos: (N, Q, C).
            reference_points: (N, Q, L, 2) or (N, Q, L, 4), normalized and already scaled by valid ratios.
            memory: (N, S, C); spatial_shapes: (L, 2); level_start_index: (L,); padding_mask: (N, S) or None.
            spatial_sizes: optional Python (H_l, W_l) per level, the values of ``spatial_shapes`` (then
                no host-device sync, see :class:`MSDeformAttn`).
        Returns:
            (N, Q, C) refined thing queries.
        """
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm_sa(tgt + self.dropout_sa(tgt2))

        tgt2 = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask,
            spatial_sizes=spatial_sizes,
        )
        tgt = self.norm_ca(tgt + self.dropout_ca(tgt2))

        tgt2 = self.linear2(self.dropout_ffn1(F.relu(self.linear1(tgt))))
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
        self.reference_points = nn.Linear(d_model, 2)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)

        layer = LocationDecoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, n_points)
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

    def forward(
        self,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        padding_mask: Optional[Tensor] = None,
        spatial_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> Dict[str, object]:
        """
        Args:
            memory: (N, S, C) encoder tokens F.
            spatial_shapes: (L, 2) int64 (H_l, W_l); level_start_index: (L,).
            valid_ratios: (N, L, 2) (w, h) fraction of each level that is not padding.
            padding_mask: (N, S) bool, True = padding, or None.
            spatial_sizes: optional Python (H_l, W_l) per level, the values of ``spatial_shapes``
                (``EncoderOutput.spatial_sizes``). Given, the forward pass makes no host-device sync
                (the tensors' values are trusted); otherwise ``spatial_shapes`` and
                ``level_start_index`` are read and checked once per forward (two syncs on a GPU,
                whatever the number of layers).
        Returns a dict:
            "queries": (N, Q, C) location-aware thing queries of the last layer (tgt if num_layers == 0).
            "query_pos": (N, Q, C) their positional queries.
            "pred_logits": list over layers of (N, Q, num_thing_classes).
            "pred_boxes": list over layers of (N, Q, 4) normalized (cx, cy, w, h) in (0, 1), relative to
                the valid (unpadded) image; (N, Q, 2) mass centres (cx, cy) when box_free.
            "reference_points": list of num_layers + 1 tensors, the reference points fed to each layer
                (unscaled, (N, Q, 2) then (N, Q, box_dim)) followed by the final refined ones; all but the
                first are detached.
        """
        if spatial_sizes is None:
            spatial_sizes = check_multiscale_inputs(
                memory, spatial_shapes, level_start_index, padding_mask, self.d_model, self.n_levels
            )
        else:
            self._check_inputs_with_sizes(memory, spatial_shapes, level_start_index, padding_mask, spatial_sizes)
        n = memory.shape[0]
        if valid_ratios.shape != (n, self.n_levels, 2):
            raise ValueError(
                f"valid_ratios must be (N, L, 2)=({n}, {self.n_levels}, 2), got {tuple(valid_ratios.shape)}"
            )
        query_pos, tgt = torch.split(self.query_embed.weight, self.d_model, dim=1)
        query_pos = query_pos.unsqueeze(0).expand(n, -1, -1)
        tgt = tgt.unsqueeze(0).expand(n, -1, -1)
        reference = self.reference_points(query_pos).sigmoid()  # (N, Q, 2)

        pred_logits: List[Tensor] = []
        pred_boxes: List[Tensor] = []
        references: List[Tensor] = [reference]
        output = tgt
        for lid, layer in enumerate(self.layers):
            if reference.shape[-1] == 4:
                ratios = torch.cat([valid_ratios, valid_ratios], dim=-1)
            else:
                ratios = valid_ratios
            reference_input = reference[:, :, None] * ratios[:, None]  # (N, Q, L, 2|4)
            output = layer(
                output, query_pos, reference_input, memory, spatial_shapes, level_start_index, padding_mask,
                spatial_sizes=spatial_sizes,
            )
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

    def _check_inputs_with_sizes(self, memory, spatial_shapes, level_start_index, padding_mask, spatial_sizes):
        """Shape checks against Python level sizes: metadata only, no host-device sync."""
        if memory.dim() != 3 or memory.shape[-1] != self.d_model:
            raise ValueError(f"memory must be (N, S, {self.d_model}), got {tuple(memory.shape)}")
        check_level_tensors(spatial_shapes, level_start_index, self.n_levels)
        if len(spatial_sizes) != self.n_levels:
            raise ValueError(f"spatial_sizes must hold {self.n_levels} (H, W) pairs, got {spatial_sizes}")
        total = sum(int(h) * int(w) for h, w in spatial_sizes)
        if total != memory.shape[1]:
            raise ValueError(
                f"memory has S={memory.shape[1]} tokens but spatial_sizes {list(spatial_sizes)} sum to {total}"
            )
        if padding_mask is not None and (padding_mask.shape != memory.shape[:2] or padding_mask.dtype != torch.bool):
            raise ValueError(
                f"padding_mask must be bool (N, S)={tuple(memory.shape[:2])}, "
                f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
