"""Panoptic post-processors: mask-wise merging (paper Sec. 3.5), the baselines of Table 7/B.2 and the
official code's inference (for converted official checkpoints).

Every post-processor is built by name from :data:`POSTPROCESSOR_REGISTRY` and called with the
common signature documented in :mod:`.common`::

    postprocessor = build_postprocessor("mask_wise", conf_threshold=(0.25, 0.25))
    panoptic_seg, segments_info = postprocessor(mask_probs, class_probs, labels, is_thing,
                                                mask_logits=None, class_distribution=None)
"""

from .common import (
    PanopticPostProcessor,
    SegmentsInfo,
    binary_mask_stats,
    mean_mask_instance_scores,
    merge_stuff_of_same_class,
    paint_segments,
)
from .mask_wise import MaskWiseMerging, mask_confidence_scores, mask_wise_merge
from .official import OfficialMerging, official_maps, official_mask_scores
from .pixel_argmax import HeuristicMerging, PixelArgmax, PixelArgmaxProb
from .registry import (
    POSTPROCESSOR_REGISTRY,
    UnknownPostProcessorError,
    build_postprocessor,
    register_postprocessor,
    registered_postprocessors,
)

__all__ = [
    "POSTPROCESSOR_REGISTRY",
    "HeuristicMerging",
    "MaskWiseMerging",
    "OfficialMerging",
    "PanopticPostProcessor",
    "PixelArgmax",
    "PixelArgmaxProb",
    "SegmentsInfo",
    "UnknownPostProcessorError",
    "binary_mask_stats",
    "build_postprocessor",
    "mask_confidence_scores",
    "mask_wise_merge",
    "mean_mask_instance_scores",
    "merge_stuff_of_same_class",
    "official_maps",
    "official_mask_scores",
    "paint_segments",
    "register_postprocessor",
    "registered_postprocessors",
]
