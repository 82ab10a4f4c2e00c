"""Panoptic post-processors: mask-wise merging (paper Sec. 3.5) and the baselines of Table 7/B.2.

Every post-processor is built by name from :data:`POSTPROCESSOR_REGISTRY` and called with the
common signature documented in :mod:`.common`::

    postprocessor = build_postprocessor("mask_wise", conf_threshold=(0.25, 0.25))
    panoptic_seg, segments_info = postprocessor(mask_probs, class_probs, labels, is_thing,
                                                mask_logits=None, class_distribution=None)
"""

from .common import PanopticPostProcessor, SegmentsInfo, paint_segments, merge_stuff_of_same_class
from .mask_wise import MaskWiseMerging, mask_confidence_scores, mask_wise_merge
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
    "PanopticPostProcessor",
    "PixelArgmax",
    "PixelArgmaxProb",
    "SegmentsInfo",
    "UnknownPostProcessorError",
    "build_postprocessor",
    "mask_confidence_scores",
    "mask_wise_merge",
    "merge_stuff_of_same_class",
    "paint_segments",
    "register_postprocessor",
    "registered_postprocessors",
]
