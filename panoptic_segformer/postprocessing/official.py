"""The official code's panoptic inference, to reproduce converted official checkpoints exactly.

The official implementation (zhiqi-li/Panoptic-SegFormer, mmdet 2.12) merges masks in
``PanformerHead.get_bboxes`` (``easymd/models/panformer/panformer_head.py``). Its procedure is mask-wise
merging (Algorithm 1), but it differs from the paper's Eq. (6) and from :mod:`.mask_wise` in ways that
change the output of a converted checkpoint:

1. **Resize**: the (Q, H/8, W/8) masks go to the original image size in ONE bilinear resize
   (``align_corners=False``) -- :func:`~panoptic_segformer.utils.resize_masks_to_image`, not the
   generic upsample-crop-resize.
2. **Masks as they are**: the official masks are ReLU outputs used as probabilities; values above 1
   are not clamped (``max_mask_value = inf``).
3. **Score**: ``s_i = p_i * (sum(1{m_i > 0.5} m_i) / (|1{m_i > 0.5}| + 1))^2`` -- one extra pixel in the
   denominator, no clamp (:func:`official_mask_scores`; ``alpha``/``beta`` generalize the exponents
   1 and 2). ``p_i`` of a thing is the location decoder's score of its (query, class) pair
   (``TEST.THING_CLASS_SOURCE: "location_decoder"``), of a stuff query the sigmoid of its class FC.
4. **Thresholds and overlap rule**: masks by descending ``s_i``; one is skipped when
   ``s_i < quality_threshold`` (things 0.25, stuff 0.25), when its binary mask is empty, or when
   ``|binary & taken| / |binary| > overlap_threshold`` (things 0.4, stuff 0.2); otherwise it takes its
   untaken pixels. Here the overlap rule is the shared keep rule ``|kept| / |binary| >= t_keep`` with
   ``t_keep = 1 - overlap_threshold`` given as a number (0.6, 0.8: ``KEEP_THRESHOLD_THING/STUFF``):
   both keep a mask whose overlap is exactly the threshold, and no binary mask of fewer than 2^40
   pixels has an overlap ratio between the two rounded thresholds, so the decisions are identical.
5. **Instances**: the official ``segm`` results are all thing masks ``m_i > 0.5`` ranked by the same
   ``s_i`` (:meth:`OfficialMerging.instance_scores`), with the location decoder's boxes (the
   meta-architecture reports those boxes whenever thing classes come from the location decoder).

Ties of ``s_i`` go in query order (a stable sort); the official ``torch.sort`` leaves their order to
the sort implementation (torch 1.8's CPU sort is not stable), so exact ties -- never met with real
masks except at ``s_i = 0``, which no threshold above 0 keeps -- may be ordered differently there.
Stuff of one class forms one segment (one stuff query per class in the official model). Segment ids
are numbered in painting order, so the official instance ids are the order of the thing segments.
"""
from typing import Optional

import torch

from ..utils import resize_masks_to_image
from .common import ThresholdArg
from .mask_wise import MaskWiseMerging, _mask_wise_merge
from .registry import register_postprocessor

__all__ = ["OfficialMerging", "official_mask_scores", "official_maps"]


def official_mask_scores(class_probs: torch.Tensor, areas: torch.Tensor, prob_sums: torch.Tensor,
                         alpha: float = 1.0, beta: float = 2.0) -> torch.Tensor:
    """The official mask-wise merging score, in float64.

    Args:
        class_probs: (N,) p_i; areas: (N,) int64 ``|1{m_i > t}|``; prob_sums: (N,) float64
            ``sum(1{m_i > t} m_i)`` (:func:`.common.binary_mask_stats`).

    Returns:
        (N,) ``p_i^alpha * (prob_sums / (areas + 1))^beta`` (the official code: alpha 1, beta 2). The
        average may exceed 1 (the official masks are not clamped); an empty mask scores 0 (for beta > 0).
    """
    mean = prob_sums.double() / (areas.double() + 1.0)
    return class_probs.double().pow(alpha) * mean.pow(beta)


@register_postprocessor("official")
class OfficialMerging(MaskWiseMerging):
    """Registered as "official": the official code's inference (module docstring), selected by the
    ``configs/coco/official/`` configs to run converted official checkpoints.

    Same constructor as :class:`~.mask_wise.MaskWiseMerging` (the official defaults):
    ``conf_threshold`` is the official ``quality_threshold_things/stuff`` (0.25, 0.25), and
    ``keep_threshold`` is ``1 - overlap_threshold_things/stuff`` (0.6, 0.8). Inputs: the common
    signature, with ``mask_probs`` >= 0 and possibly above 1. ``mask_logits`` and
    ``class_distribution`` are ignored.
    """

    masks_to_image = staticmethod(resize_masks_to_image)
    max_mask_value = float("inf")

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 2.0,
        mask_threshold: float = 0.5,
        conf_threshold: ThresholdArg = (0.25, 0.25),
        keep_threshold: ThresholdArg = (0.6, 0.8),
    ):
        super().__init__(alpha, beta, mask_threshold, conf_threshold, keep_threshold)

    def merge(self, mask_probs, class_probs, labels, is_thing, mask_logits=None,
              class_distribution: Optional[torch.Tensor] = None):
        return _mask_wise_merge(mask_probs, class_probs, labels, is_thing, self.alpha, self.beta,
                                self.mask_threshold, self.conf_threshold, self.keep_threshold,
                                score_fn=official_mask_scores, max_mask_value=self.max_mask_value)

    def instance_scores(self, class_probs: torch.Tensor, areas: torch.Tensor,
                        prob_sums: torch.Tensor) -> torch.Tensor:
        """(M,) float64 :func:`official_mask_scores` from the binary masks' areas and probability sums
        (:func:`.common.binary_mask_stats`): the official code ranks its thing results by the panoptic
        score."""
        return official_mask_scores(class_probs, areas, prob_sums, self.alpha, self.beta)


def official_maps(panoptic_seg: torch.Tensor, segments_info, category_ids=None) -> torch.Tensor:
    """Detectron2's ``(panoptic_seg, segments_info)`` -> the official code's (2, H, W) int64 output
    ``results``: channel 0 the category of each pixel (0 = void), channel 1 the instance id of thing
    pixels (1, 2, ... in painting order, 0 for stuff and void).

    ``category_ids`` maps a segment's ``category_id`` (contiguous) to the category written, e.g. the
    dataset ids (the official ``cat_dict``) from the metadata's ``thing_dataset_id_to_contiguous_id``
    and ``stuff_dataset_id_to_contiguous_id`` inverted; by default the contiguous id + 1. Segment ids must be in painting
    order, as every post-processor here numbers them.
    """
    lut = torch.zeros((2, 1 + max([s["id"] for s in segments_info], default=0)), dtype=torch.int64)
    instance = 0
    for s in sorted(segments_info, key=lambda s: s["id"]):
        c = s["category_id"]
        lut[0, s["id"]] = category_ids[c] if category_ids is not None else c + 1
        if s["isthing"]:
            instance += 1
            lut[1, s["id"]] = instance
    return lut.to(panoptic_seg.device)[:, panoptic_seg.long()]
