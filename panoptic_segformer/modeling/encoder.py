"""Transformer encoder of Panoptic SegFormer (paper Sec. 3.2).

The encoder refines the concatenated multi-scale feature tokens ``C'_3, C'_4, C'_5`` (Sec. 3.1) with
deformable self-attention [12], so that it can afford high-resolution, multi-scale maps. Positions are
encoded with DETR's fixed sine encoding (App. A.1) plus a learned per-level embedding, as in
Deformable DETR [12].
"""

import math
from typing import List, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .levels import LevelLayout
from .ms_deform_attn import MSDeformAttn

__all__ = [
    "PositionEmbeddingSine",
    "get_reference_points",
    "DeformableTransformerEncoderLayer",
    "DeformableTransformerEncoder",
    "EncoderOutput",
]


class PositionEmbeddingSine(nn.Module):
    """Fixed absolute sine positional encoding of DETR (paper App. A.1: "the same as DETR").

    With ``normalize=True`` the cumulative row/column index of each valid pixel is divided by the number of
    valid rows/columns, so valid positions lie in ``(0, scale]`` whatever the padding.
    Channels: the first ``num_pos_feats`` encode y, the last ``num_pos_feats`` encode x, each interleaving
    sin (even channels) and cos (odd channels) of ``pos / temperature ** (2 * (i // 2) / num_pos_feats)``.

    Args:
        num_pos_feats: channels per axis (output has ``2 * num_pos_feats`` channels); must be even.
        temperature: frequency base.
        normalize: normalize positions over the valid region to ``[0, scale]``.
        scale: range of normalized positions (used with ``normalize=True``).
        offset: added to the 1-based cumulative positions before normalizing. DETR uses 0; Deformable DETR
            and the official Panoptic SegFormer code use -0.5 (pixel centres).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = 0.0,
    ):
        super().__init__()
        if num_pos_feats <= 0 or num_pos_feats % 2 != 0:
            raise ValueError(f"num_pos_feats must be a positive even number, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset

    def forward(self, mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """
        Args:
            mask: (N, H, W) bool, True at padding.
            dtype: float dtype of the result.

        Returns:
            (N, 2 * num_pos_feats, H, W) positional encoding (y channels first, then x).
        """
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape (N, H, W), got {mask.dtype} {tuple(mask.shape)}")
        not_mask = (~mask).to(dtype)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=dtype, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t  # (N, H, W, F)
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def get_reference_points(levels: LevelLayout) -> Tensor:
    """Encoder reference points of Deformable DETR [12]: every token's own pixel centre, normalized by
    its image's valid size, then expressed on every level of the padded maps.

    Args:
        levels: the tokens' layout (sizes, and ``valid_ratios`` (N, L, 2) as (w_ratio, h_ratio)).

    Returns:
        (N, S, L, 2) normalized (x, y) reference points in ``valid_ratios``' dtype and device.
    """
    valid_ratios = levels.valid_ratios
    device, dtype = valid_ratios.device, valid_ratios.dtype
    reference_points_list = []
    for lvl, (H, W) in enumerate(levels.sizes):
        # Pixel centres 0.5, 1.5, ..., H - 0.5 (= linspace(0.5, H - 0.5, H), exactly): arange keeps a
        # symbolic H symbolic under torch.export (linspace's step count would fix the image size).
        ref_y, ref_x = torch.meshgrid(
            (torch.arange(H, dtype=torch.float32, device=device) + 0.5).to(dtype),
            (torch.arange(W, dtype=torch.float32, device=device) + 0.5).to(dtype),
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H)  # (N, H*W)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W)
        reference_points_list.append(torch.stack((ref_x, ref_y), -1))
    reference_points = torch.cat(reference_points_list, 1)  # (N, S, 2)
    return reference_points[:, :, None] * valid_ratios[:, None]  # (N, S, L, 2)


class DeformableTransformerEncoderLayer(nn.Module):
    """One encoder layer (paper Sec. 3.2, [12]): deformable self-attention over all levels, then an FFN
    with ReLU; residual connections with post-norm.

    Args:
        d_model: channels C.
        d_ffn: hidden channels of the FFN.
        dropout: dropout rate.
        n_levels, n_heads, n_points: see :class:`MSDeformAttn`.
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
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, msda_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, levels: LevelLayout) -> Tensor:
        """
        Args:
            src: (N, S, C) tokens; pos: (N, S, C) positional (+ level) embedding, added to the queries only.
            reference_points: (N, S, L, 2) normalized (x, y); levels: the tokens' layout.

        Returns:
            (N, S, C)
        """
        src2 = self.self_attn(src + pos, reference_points, src, levels)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src), inplace=True)))
        return self.norm2(src + self.dropout3(src2))


class EncoderOutput(NamedTuple):
    """Output of :class:`DeformableTransformerEncoder`: the tokens F of paper Sec. 3.2 and their layout.

    memory: (N, S, C) refined tokens; pos: (N, S, C) sine positional + level embedding (for keys in
    later decoders); levels: the :class:`~.levels.LevelLayout` of the tokens (sizes as Python ints, so
    later modules never read level metadata back from the device).
    """

    memory: Tensor
    pos: Tensor
    levels: LevelLayout


class DeformableTransformerEncoder(nn.Module):
    """Transformer encoder of Panoptic SegFormer (paper Sec. 3.2): ``num_layers`` deformable encoder
    layers over the flattened, concatenated multi-scale tokens, with a learned level embedding added to
    the sine positional encoding ([12]).

    Args:
        d_model: channels C.
        num_layers: number of encoder layers (6 in the paper).
        n_heads, n_levels, n_points: see :class:`MSDeformAttn`.
        d_ffn: FFN hidden channels.
        dropout: dropout rate.
        msda_impl: deformable-attention implementation of every layer (see :class:`MSDeformAttn`).
    """

    def __init__(
        self,
        d_model: int = 256,
        num_layers: int = 6,
        n_heads: int = 8,
        n_levels: int = 3,
        n_points: int = 4,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        msda_impl: str = "auto",
    ):
        super().__init__()
        self.d_model = d_model
        self.n_levels = n_levels
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            [
                DeformableTransformerEncoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, n_points, msda_impl)
                for _ in range(num_layers)
            ]
        )
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """As Deformable DETR: xavier for all matrices, then MSDeformAttn's own init, level embed normal."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: List[Tensor], masks: List[Tensor], pos_embeds: List[Tensor]) -> EncoderOutput:
        """
        Args:
            srcs: L tensors (N, C, H_l, W_l), the mapped backbone features (C'_3, C'_4, C'_5).
            masks: L bool tensors (N, H_l, W_l), True at padding.
            pos_embeds: L tensors (N, C, H_l, W_l) positional encodings (e.g. PositionEmbeddingSine).

        Returns:
            EncoderOutput with memory (N, S, C), ``S = sum_l H_l * W_l``, and the tokens' LevelLayout,
            built here once from the masks' shapes (the forward pass makes no host-device sync).
        """
        L = self.n_levels
        if not (len(srcs) == len(masks) == len(pos_embeds) == L):
            raise ValueError(
                f"srcs, masks, pos_embeds must each hold n_levels={L} tensors, got "
                f"{len(srcs)}, {len(masks)}, {len(pos_embeds)}"
            )
        N = srcs[0].shape[0]
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            if src.dim() != 4 or src.shape[0] != N or src.shape[1] != self.d_model:
                raise ValueError(f"srcs[{lvl}] must have shape ({N}, {self.d_model}, H, W), got {tuple(src.shape)}")
            if mask.shape != (N,) + src.shape[2:] or mask.dtype != torch.bool:
                raise ValueError(f"masks[{lvl}] must be a bool tensor of shape {(N,) + tuple(src.shape[2:])}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
            if pos.shape != src.shape:
                raise ValueError(f"pos_embeds[{lvl}] must have shape {tuple(src.shape)}, got {tuple(pos.shape)}")
        levels = LevelLayout.from_padding_masks(masks, dtype=srcs[0].dtype)
        memory = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)  # (N, S, C)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1).to(p.dtype)
                         for lvl, p in enumerate(pos_embeds)], 1)
        reference_points = get_reference_points(levels)
        for layer in self.layers:
            memory = layer(memory, pos, reference_points, levels)
        return EncoderOutput(memory, pos, levels)
