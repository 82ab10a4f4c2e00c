"""Mask-wise merging inference (paper Sec. 3.5, Eq. 6, Algorithm 1, Appendix B.1).

Instead of resolving overlaps pixel by pixel (pixel-wise argmax), masks are ranked by a
confidence score that combines classification probability and mask quality,

    s_i = p_i^alpha * average(1{m_i > 0.5} m_i)^beta,                      (Eq. 6)

and painted in that order: each mask keeps only the pixels no higher-ranked mask took, and is
dropped when its confidence is below t_cnf or when the kept part is less than t_keep of the mask.
Defaults follow Appendix A.1: t_cnf 0.25, t_keep 0.6, alpha 1, beta 2.
"""

from typing import Optional, Tuple

import torch

from .common import (
    PanopticPostProcessor,
    SegmentsInfo,
    ThresholdArg,
    as_thing_stuff_pair,
    binary_mask_stats,
    check_inputs,
    check_unit_interval,
    greedy_fill,
    paint_segments,
    raise_on_bad_values,
    value_ranges,
)
from .registry import register_postprocessor

__all__ = ["MaskWiseMerging", "mask_wise_merge", "mask_confidence_scores"]


def mask_confidence_scores(
    class_probs: torch.Tensor,
    areas: torch.Tensor,
    prob_sums: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 2.0,
) -> torch.Tensor:
    """Confidence score s_i of Eq. (6), in float64.

    Args:
        class_probs: (N,) p_i, probability of the most likely class.
        areas: (N,) int64 ``|1{m_i > t}|``.
        prob_sums: (N,) float64 ``sum(1{m_i > t} m_i)``.

    Returns:
        (N,) float64 ``p_i^alpha * (prob_sums / areas)^beta``, and 0 where the binary mask is
        empty. The average is clamped to 1 (its true bound, against float32 rounding), so that
        ``s_i <= p_i^alpha`` holds exactly in floating point.
    """
    mean = (prob_sums / areas.clamp(min=1).double()).clamp(max=1.0)
    scores = class_probs.double().pow(alpha) * mean.pow(beta)
    return torch.where(areas > 0, scores, torch.zeros_like(scores))


def _check_params(alpha, beta, mask_threshold, conf_threshold, keep_threshold):
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    mask_threshold = check_unit_interval(mask_threshold, "mask_threshold", high_open=True)
    return (float(alpha), float(beta), mask_threshold,
            as_thing_stuff_pair(conf_threshold, "conf_threshold"),
            as_thing_stuff_pair(keep_threshold, "keep_threshold"))


def _may_pass(class_probs, conf, alpha, max_mask_value) -> torch.Tensor:
    """(N,) bool: masks that can reach their confidence threshold ``conf`` (N,) float64.

    Exact pruning: the mask average is <= 1, so s_i <= p_i^alpha, and a mask with p_i^alpha < t_cnf is
    skipped whatever it holds -- it is never read (like DETR's and MaskFormer's class-probability
    filters, but without changing the result). Masks that may exceed 1 have no such bound: every mask
    may pass.
    """
    if max_mask_value <= 1.0:
        return class_probs.double().pow(alpha) >= conf
    return torch.ones(class_probs.shape, dtype=torch.bool, device=class_probs.device)


def _per_query(is_thing, pair) -> torch.Tensor:
    """(N,) float64: ``pair[0]`` for things, ``pair[1]`` for stuff."""
    return torch.full(is_thing.shape, pair[1], dtype=torch.float64, device=is_thing.device).masked_fill_(
        is_thing, pair[0])


def _mask_wise_merge(mask_probs, class_probs, labels, is_thing, alpha, beta, mask_threshold,
                     conf_threshold, keep_threshold, score_fn=mask_confidence_scores,
                     max_mask_value=1.0) -> Tuple[torch.Tensor, SegmentsInfo]:
    """Algorithm 1 on inputs of checked shapes/dtypes and N >= 1; value ranges are checked here
    on everything read. Thresholds are already normalized to (thing, stuff) pairs.

    ``score_fn(class_probs, areas, prob_sums, alpha, beta)`` ranks the masks (Eq. 6 by default;
    the "official" method passes its own score and ``max_mask_value`` inf for unclamped masks)."""
    n, h, w = mask_probs.shape
    device = mask_probs.device
    # Per-mask (thing, stuff) thresholds, float64 so that e.g. 0.3 is compared exactly as given.
    conf, keep = _per_query(is_thing, conf_threshold), _per_query(is_thing, keep_threshold)
    maybe = _may_pass(class_probs, conf, alpha, max_mask_value)
    host = torch.cat([value_ranges(None, class_probs, labels), maybe.double()]).tolist()  # sync 1
    raise_on_bad_values(host[:5])
    read = [q for q in range(n) if host[5 + q]]
    if not read:
        return torch.zeros((h, w), dtype=torch.int32, device=device), []
    read_t = torch.as_tensor(read, dtype=torch.long, device=device)

    areas, prob_sums, bands, mask_range = binary_mask_stats(mask_probs, mask_threshold, read)
    scores = score_fn(class_probs[read_t], areas, prob_sums, alpha, beta)
    # Descending confidence; stable, and `read` is in query order, so ties keep query order.
    order = torch.sort(scores, descending=True, stable=True).indices
    valid = (scores >= conf[read_t]) & (areas > 0)
    rows = torch.stack([read_t[order].double(), valid[order].double(), areas[order].double(),
                        keep[read_t][order], bands[order, 0].double(), bands[order, 1].double()], dim=1)
    host = torch.cat([value_ranges(mask_range, class_probs, labels), rows.flatten()]).tolist()  # sync 2
    raise_on_bad_values(host[:5], max_mask_value)
    rows = [host[5 + 6 * i: 11 + 6 * i] for i in range(len(read))]
    rows = [r for r in rows if r[1] > 0]
    candidates = [int(r[0]) for r in rows]
    owner = torch.zeros((h, w), dtype=torch.int32, device=device)
    greedy_fill(
        mask_probs, candidates,
        bands=[(int(r[4]), int(r[5])) for r in rows],
        areas=[int(r[2]) for r in rows],
        keep_fractions=[r[3] for r in rows],
        mask_threshold=mask_threshold,
        owner=owner,
    )
    all_scores = torch.zeros(n, dtype=torch.float64, device=device).index_copy_(0, read_t, scores)
    return paint_segments(owner, candidates, labels, is_thing, all_scores)  # sync 3


def mask_wise_merge(
    mask_probs: torch.Tensor,
    class_probs: torch.Tensor,
    labels: torch.Tensor,
    is_thing: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 2.0,
    mask_threshold: float = 0.5,
    conf_threshold: ThresholdArg = 0.25,
    keep_threshold: ThresholdArg = 0.6,
) -> Tuple[torch.Tensor, SegmentsInfo]:
    """Mask-wise merging (Sec. 3.5, Algorithm 1) of one image's predictions.

    With ``binary_i = m_i > mask_threshold`` and s_i from Eq. (6) (0 for an empty binary mask),
    masks are visited by descending s_i (stable: ties in query order). Mask i is skipped when
    ``s_i < conf_threshold`` or ``binary_i`` is empty; otherwise ``kept_i = binary_i & unassigned``
    and it is skipped when ``kept_i`` is empty or ``|kept_i| / |binary_i| < keep_threshold``.
    Accepted kept pixels get the next segment id (1, 2, ...; 0 = void), except that a stuff mask
    whose class already has a segment joins that segment. (The empty-``kept_i`` rule only matters
    for ``keep_threshold == 0``; it prevents segments without pixels.)

    Args:
        mask_probs: (N, H, W) mask probabilities m_i in [0, 1] (the paper's "mask logits" m[h, w]
            are compared with 0.5, i.e. they are probabilities).
        class_probs: (N,) p_i, probability of the most likely class.
        labels: (N,) int64 contiguous class ids.
        is_thing: (N,) bool, whether ``labels[i]`` is a thing class.
        alpha, beta: exponents of Eq. (6) (paper: 1 and 2; Table B.3).
        mask_threshold: binarization threshold (paper: 0.5).
        conf_threshold: t_cnf, a float or a (thing, stuff) pair (paper: 0.25).
        keep_threshold: t_keep, a float or a (thing, stuff) pair (paper: 0.6).

    Returns:
        panoptic_seg: (H, W) int32 on the input's device, 0 = void.
        segments_info: ``[{"id", "category_id" (the contiguous label), "isthing", "score" (s_i)}]``
            in id order.

    Masks with ``p_i^alpha < conf_threshold`` cannot reach the threshold (the average is <= 1)
    and are never read; value ranges are checked on ``class_probs``, ``labels`` and every mask
    read. The loop runs over masks only: scores, areas and row bands are computed first, each
    step is vectorized over its mask's rows, and there is no host sync inside the loop (three in
    total: the class-probability filter, the candidate list, the segment table). CPU and CUDA.
    """
    alpha, beta, mask_threshold, conf_threshold, keep_threshold = _check_params(
        alpha, beta, mask_threshold, conf_threshold, keep_threshold)
    with torch.no_grad():
        mask_probs, class_probs, labels, is_thing = check_inputs(
            mask_probs, class_probs, labels, is_thing, check_values=False)  # values: in the merge
        if mask_probs.shape[0] == 0:
            return torch.zeros(mask_probs.shape[1:], dtype=torch.int32, device=mask_probs.device), []
        return _mask_wise_merge(mask_probs, class_probs, labels, is_thing, alpha, beta, mask_threshold,
                                conf_threshold, keep_threshold)


@register_postprocessor("mask_wise")
class MaskWiseMerging(PanopticPostProcessor):
    """Registered as "mask_wise": :func:`mask_wise_merge` with fixed thresholds (Sec. 3.5).

    ``mask_logits`` and ``class_distribution`` are accepted and ignored.
    """

    checks_values_in_merge = True  # value ranges are checked on the masks read

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 2.0,
        mask_threshold: float = 0.5,
        conf_threshold: ThresholdArg = 0.25,
        keep_threshold: ThresholdArg = 0.6,
    ):
        (self.alpha, self.beta, self.mask_threshold, self.conf_threshold,
         self.keep_threshold) = _check_params(alpha, beta, mask_threshold, conf_threshold, keep_threshold)

    def read_queries(self, class_probs, labels, is_thing):
        """Masks that can reach t_cnf (the exact pruning of :func:`_may_pass`)."""
        return _may_pass(class_probs, _per_query(is_thing, self.conf_threshold), self.alpha, self.max_mask_value)

    def merge(self, mask_probs, class_probs, labels, is_thing, mask_logits=None,
              class_distribution: Optional[torch.Tensor] = None):
        return _mask_wise_merge(mask_probs, class_probs, labels, is_thing, self.alpha, self.beta,
                                self.mask_threshold, self.conf_threshold, self.keep_threshold)
