"""Baseline post-processors compared with mask-wise merging (paper Table 7, Table B.2, App. B.1).

* "pixel_argmax" -- DETR's panoptic post-processing ("(p)" in Table 7): each pixel goes to the
  confident query with the largest mask logit.
* "pixel_argmax_prob" -- MaskFormer's "(p*)": each pixel goes to the query maximizing class
  probability x mask probability, with an overlap check.
* "heuristic" -- the heuristic procedure of Kirillov et al. (Panoptic Segmentation, Sec. 7):
  things first by score with overlap removal, then stuff by pixel-wise argmax on the rest.

All three share the common signature and output of :mod:`.common`; stuff predictions of one
class are merged into one segment by :func:`.common.merge_stuff_of_same_class` in each of them,
and the pixel-wise argmax is :func:`.common.running_argmax`. Value ranges are checked on
``class_probs``, ``labels`` and the masks each method reads (the kept queries' masks).
"""

from typing import List, Optional

import torch

from .common import (
    PanopticPostProcessor,
    binary_mask_stats,
    check_unit_interval,
    check_values_of,
    greedy_fill,
    merge_stuff_of_same_class,
    paint_segments,
    raise_on_bad_values,
    running_argmax,
    value_ranges,
)
from .registry import register_postprocessor

__all__ = ["PixelArgmax", "PixelArgmaxProb", "HeuristicMerging"]


def _indices(mask: torch.Tensor) -> List[int]:
    """Indices of the True entries of a (N,) bool tensor, as a list (one host sync)."""
    return torch.nonzero(mask).flatten().tolist()


@register_postprocessor("pixel_argmax")
class PixelArgmax(PanopticPostProcessor):
    """DETR's pixel-wise argmax panoptic post-processing (``PostProcessPanoptic``; Table 7 "(p)").

    1. Keep queries with ``class_probs > threshold`` (DETR: 0.85; DETR also drops queries whose
       most likely class is "no object", which the caller's ``class_probs`` -- the most likely
       real class -- already implies for any threshold >= 0.5).
    2. Each pixel goes to the kept query with the largest mask logit (``mask_logits`` if given,
       else ``mask_probs``; the sigmoid is monotonic, but saturated float probabilities can tie,
       and ties go to the lowest query index). There is no void pixel while a query is kept.
    3. Stuff queries of one class form one segment; segments with at most ``area_threshold``
       pixels (DETR: 4) are removed and step 2 is repeated without them, until none is removed.

    Deviation from DETR's code: DETR's loop drops the non-first queries of a repeated stuff class
    (their pixels were relabelled, so their own area is 0) and re-runs the argmax without them;
    here they stay and are merged, as the paper describes DETR ("merging stuff with the same
    category"). The area test is on the merged segment. ``class_distribution`` is ignored.
    """

    def __init__(self, threshold: float = 0.85, area_threshold: int = 4):
        self.threshold = check_unit_interval(threshold, "threshold")
        if int(area_threshold) != area_threshold or area_threshold < 0:
            raise ValueError(f"area_threshold must be an integer >= 0, got {area_threshold!r}")
        self.area_threshold = int(area_threshold)

    checks_values_in_merge = True  # only the kept queries' masks are read and checked
    reads_mask_logits = True

    def read_queries(self, class_probs, labels, is_thing):
        return class_probs > self.threshold

    def merge(self, mask_probs, class_probs, labels, is_thing, mask_logits=None,
              class_distribution: Optional[torch.Tensor] = None):
        maps = mask_logits if mask_logits is not None else mask_probs
        h, w = mask_probs.shape[1:]
        candidates = _indices(self.read_queries(class_probs, labels, is_thing))
        check_values_of(mask_probs, candidates, class_probs, labels)
        # One host read of the classes (for grouping).
        host = torch.stack([labels, is_thing.long()]).tolist()
        while candidates:
            winner, _ = running_argmax(maps, candidates)  # (H, W), first candidate on ties
            area = torch.bincount(winner.flatten(), minlength=len(candidates)).tolist()
            groups = merge_stuff_of_same_class([host[0][q] for q in candidates],
                                               [bool(host[1][q]) for q in candidates])
            group_area = {}
            for g, a in zip(groups, area):
                group_area[g] = group_area.get(g, 0) + a
            small = [group_area[g] <= self.area_threshold for g in groups]
            if not any(small):
                return paint_segments(winner + 1, candidates, labels, is_thing, class_probs)
            candidates = [q for q, s in zip(candidates, small) if not s]
        return torch.zeros((h, w), dtype=torch.int32, device=mask_probs.device), []


@register_postprocessor("pixel_argmax_prob")
class PixelArgmaxProb(PanopticPostProcessor):
    """MaskFormer's pixel-wise argmax over ``p_i * m_i`` (Table 7 "(p*)"; Mask2Former's
    ``panoptic_inference``).

    1. Keep queries with ``class_probs > object_mask_threshold`` (Mask2Former: 0.8).
    2. Each pixel goes to the kept query maximizing ``class_probs[i] * mask_probs[i]`` (ties to
       the lowest query index).
    3. Query i (in query order) keeps the pixels it won where ``mask_probs[i] >= mask_threshold``;
       it is dropped if it won no pixel, its binary mask ``mask_probs[i] >= mask_threshold`` is
       empty, the kept part is empty, or ``won / |binary| < overlap_threshold`` (0.8).
    4. Stuff queries of one class form one segment. Other pixels are void.

    ``mask_logits`` and ``class_distribution`` are ignored. Note the inclusive ``>=`` of
    Mask2Former here, where mask-wise merging binarizes with a strict ``>``.
    """

    def __init__(self, object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8,
                 mask_threshold: float = 0.5):
        self.object_mask_threshold = check_unit_interval(object_mask_threshold, "object_mask_threshold")
        self.overlap_threshold = check_unit_interval(overlap_threshold, "overlap_threshold")
        self.mask_threshold = check_unit_interval(mask_threshold, "mask_threshold")

    checks_values_in_merge = True  # only the kept queries' masks are read and checked

    def read_queries(self, class_probs, labels, is_thing):
        return class_probs > self.object_mask_threshold

    def merge(self, mask_probs, class_probs, labels, is_thing, mask_logits=None,
              class_distribution: Optional[torch.Tensor] = None):
        candidates = _indices(self.read_queries(class_probs, labels, is_thing))
        check_values_of(mask_probs, candidates, class_probs, labels)
        h, w = mask_probs.shape[1:]
        if not candidates:
            return torch.zeros((h, w), dtype=torch.int32, device=mask_probs.device), []
        m = len(candidates)
        index = torch.as_tensor(candidates, dtype=torch.long, device=mask_probs.device)
        winner, won_prob = running_argmax(mask_probs, candidates, weights=class_probs[index],
                                          track=mask_probs)  # (H, W) each
        won_binary = won_prob >= self.mask_threshold
        won_area = torch.bincount(winner.flatten(), minlength=m)
        kept_area = torch.bincount(winner[won_binary], minlength=m)
        binary_area = torch.stack([(mask_probs[q] >= self.mask_threshold).sum() for q in candidates])
        ratio = won_area.double() / binary_area.clamp(min=1).double()
        valid = (won_area > 0) & (binary_area > 0) & (kept_area > 0) & (ratio >= self.overlap_threshold)
        owner = torch.where(won_binary & valid[winner], winner + 1, torch.zeros_like(winner))
        return paint_segments(owner, candidates, labels, is_thing, class_probs)


@register_postprocessor("heuristic")
class HeuristicMerging(PanopticPostProcessor):
    """Heuristic procedure of Kirillov et al. (Panoptic Segmentation, Sec. 7; Table B.2), with
    the defaults of panopticapi's ``combine_semantic_and_instance_predictions.py``.

    1. Things: thing queries with ``class_probs >= thing_threshold`` (0.5), by descending class
       probability (stable), with binary masks ``mask_probs > mask_threshold``. A thing whose
       overlap with already placed things exceeds ``overlap_threshold`` (0.5) of its area is
       dropped; otherwise it takes its unassigned pixels (shared :func:`.common.greedy_fill`
       with keep fraction ``1 - overlap_threshold``).
    2. Stuff: on the still unassigned pixels, pixel-wise argmax over the stuff queries with
       ``class_probs >= stuff_threshold`` (0.0) of ``class_probs * mask_probs``; a pixel is filled
       only where the winner's ``mask_probs > mask_threshold`` (the stand-in for the semantic
       segmentation's thing pixels; otherwise void). Stuff of one class forms one segment, and
       stuff segments smaller than ``stuff_area_limit`` (64 * 64) pixels are removed.

    Things are always preferred over stuff, which is why its PQ^St is lowest in Table B.2.
    ``mask_logits`` and ``class_distribution`` are ignored.
    """

    checks_values_in_merge = True  # value ranges are checked on the masks read

    def __init__(self, thing_threshold: float = 0.5, overlap_threshold: float = 0.5,
                 stuff_threshold: float = 0.0, stuff_area_limit: int = 64 * 64,
                 mask_threshold: float = 0.5):
        self.thing_threshold = check_unit_interval(thing_threshold, "thing_threshold")
        self.overlap_threshold = check_unit_interval(overlap_threshold, "overlap_threshold")
        self.stuff_threshold = check_unit_interval(stuff_threshold, "stuff_threshold")
        self.mask_threshold = check_unit_interval(mask_threshold, "mask_threshold", high_open=True)
        if int(stuff_area_limit) != stuff_area_limit or stuff_area_limit < 0:
            raise ValueError(f"stuff_area_limit must be an integer >= 0, got {stuff_area_limit!r}")
        self.stuff_area_limit = int(stuff_area_limit)

    def read_queries(self, class_probs, labels, is_thing):
        return torch.where(is_thing, class_probs >= self.thing_threshold, class_probs >= self.stuff_threshold)

    def merge(self, mask_probs, class_probs, labels, is_thing, mask_logits=None,
              class_distribution: Optional[torch.Tensor] = None):
        h, w = mask_probs.shape[1:]
        device = mask_probs.device
        order = torch.sort(class_probs, descending=True, stable=True).indices
        read = self.read_queries(class_probs, labels, is_thing)[order]
        thing_o, stuff_o = is_thing[order] & read, ~is_thing[order] & read
        host = torch.stack([order, thing_o.long(), stuff_o.long()], dim=1).tolist()  # sync
        things = [q for q, t, _ in host if t]  # by descending class probability
        stuff = [q for q, _, st in host if st]
        # Only these masks are read; their value ranges are checked (with class_probs, labels).
        check_values_of(mask_probs, stuff, class_probs, labels)
        areas, _, bands, mask_range = binary_mask_stats(mask_probs, self.mask_threshold, things)
        host = torch.cat([value_ranges(mask_range, class_probs, labels),
                          torch.cat([areas, bands.flatten()]).double()]).tolist()  # sync
        raise_on_bad_values(host[:5])
        m = len(things)
        things = [(q, int(host[5 + k]), (int(host[5 + m + 2 * k]), int(host[6 + m + 2 * k])))
                  for k, q in enumerate(things) if host[5 + k] > 0]  # (query, area, band), non-empty
        owner = torch.zeros((h, w), dtype=torch.int32, device=device)
        greedy_fill(
            mask_probs, [t[0] for t in things],
            bands=[t[2] for t in things],
            areas=[t[1] for t in things],
            keep_fractions=[1.0 - self.overlap_threshold] * len(things),
            mask_threshold=self.mask_threshold,
            owner=owner,
        )
        if stuff:
            index = torch.as_tensor(stuff, dtype=torch.long, device=device)
            winner, won_prob = running_argmax(mask_probs, stuff, weights=class_probs[index], track=mask_probs)
            fill = (owner == 0) & (won_prob > self.mask_threshold)
            owner = torch.where(fill, (winner + len(things) + 1).to(owner.dtype), owner)
        return paint_segments(owner, [t[0] for t in things] + stuff, labels, is_thing, class_probs,
                              min_stuff_area=self.stuff_area_limit)
