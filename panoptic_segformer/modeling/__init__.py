"""Pure-PyTorch model pieces of Panoptic SegFormer (no Detectron2 imports)."""
from .criterion import PanopticSegFormerCriterion
from .encoder import DeformableTransformerEncoder, EncoderOutput, PositionEmbeddingSine
from .levels import LevelLayout
from .location_decoder import LocationDecoder
from .mask_decoder import AttentionMaskHead, MaskDecoder
from .official_mask_decoder import OfficialMaskDecoder
from .matcher import HungarianMatcher, select_thing_queries
from .ms_deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_core

__all__ = [
    "AttentionMaskHead",
    "DeformableTransformerEncoder",
    "EncoderOutput",
    "HungarianMatcher",
    "LevelLayout",
    "LocationDecoder",
    "MSDeformAttn",
    "MaskDecoder",
    "OfficialMaskDecoder",
    "PanopticSegFormerCriterion",
    "PositionEmbeddingSine",
    "ms_deform_attn",
    "ms_deform_attn_core",
    "select_thing_queries",
]
