"""Pieces shared by every panoptic post-processor (paper Sec. 3.5 and Appendix B.1).

Every post-processor here takes the per-query predictions of ONE image and returns Detectron2's
panoptic format. Things and stuff share one output format after the mask decoder (Sec. 3.3.1), so
the inputs carry no notion of "thing query" or "stuff query": a query is described only by its
mask, its most likely class, that class's probability and whether that class is a thing class.

The common call signature (:class:`PanopticPostProcessor.__call__`)::

    panoptic_seg, segments_info = postprocessor(
        mask_probs,               # (N, H, W) float in [0, 1]: sigmoid of the mask logits, at output size
        class_probs,              # (N,) float in [0, 1]: probability p_i of the most likely class
        labels,                   # (N,) integer >= 0: that class, as a contiguous id
        is_thing,                 # (N,) bool: whether that class is a thing class
        mask_logits=None,         # (N, H, W) float, optional: the logits behind mask_probs
        class_distribution=None,  # (N, K) float, optional: the full per-query class distribution
    )
    # panoptic_seg: (H, W) int32 on the input's device, 0 = void, 1..S = segment ids
    # segments_info: [{"id": int, "category_id": int, "isthing": bool, "score": float}, ...]

The caller turns raw classifier outputs into ``class_probs``/``labels`` (softmax without the
"no object" column, or sigmoid for focal-loss heads) and resizes masks to the output size first.
Methods that do not need ``mask_logits`` or ``class_distribution`` accept and ignore them, so one
call site can run any registered method.

Three optional members tell the meta-architecture how to prepare those inputs and how to rank its
``instances`` output (:class:`PanopticPostProcessor` has the defaults; a plain callable without them
gets the defaults too, and a wrapper must forward them, e.g. with ``__getattr__``):

* ``masks_to_image(masks, image_size, stride, output_size[, buffers])`` -- how the mask decoder's
  (Q, h, w) maps at ``1/stride`` of the padded input reach the output size: by default
  :func:`~panoptic_segformer.utils.upsample_masks_to_image` (Detectron2's upsample-crop-resize);
  the "official" method uses the official code's single resize. When it takes ``buffers``, the
  meta-architecture passes a :class:`~panoptic_segformer.utils.ScratchBuffers` reused across query
  chunks (the result may be a view of it, used before the next chunk).
* ``max_mask_value`` -- the largest mask value ``merge`` accepts: 1.0 (probabilities; the official
  decoder's ReLU masks are clamped to [0, 1] for such methods) or ``inf`` (masks as they are).
* ``instance_scores(class_probs, areas, prob_sums)`` -- the score that ranks the top thing results
  of ``instances`` from each binary mask's area and probability sum (:func:`binary_mask_stats`;
  default :func:`mean_mask_instance_scores`).

Shared helpers defined here and used by every method:

* :func:`check_inputs` -- shapes and dtypes, and value ranges with one host sync (the
  built-in methods check value ranges on the data they actually read instead).
* :func:`binary_mask_stats` -- area, probability sum and row band of each binary mask, vectorized.
* :func:`greedy_fill` -- the priority-ordered "claim the unassigned pixels" loop shared by
  mask-wise merging (Algorithm 1) and the thing pass of the heuristic procedure.
* :func:`running_argmax` -- the pixel-wise argmax of DETR, MaskFormer and the heuristic.
* :func:`merge_stuff_of_same_class` -- the one rule that stuff predictions of a class form one
  segment.
* :func:`paint_segments` -- turns a per-pixel owner map into ``(panoptic_seg, segments_info)``.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..utils import upsample_masks_to_image

__all__ = [
    "PanopticPostProcessor",
    "SegmentsInfo",
    "as_thing_stuff_pair",
    "binary_mask_stats",
    "check_inputs",
    "check_values_of",
    "check_unit_interval",
    "greedy_fill",
    "mean_mask_instance_scores",
    "merge_stuff_of_same_class",
    "paint_segments",
    "raise_on_bad_values",
    "running_argmax",
    "value_ranges",
]

SegmentsInfo = List[Dict[str, Union[int, bool, float]]]
ThresholdArg = Union[float, Tuple[float, float]]

# Masks are reduced in chunks of about this many elements (CPU; x64 on GPU).
_CHUNK_ELEMENTS = 1 << 20


def check_unit_interval(value: float, name: str, *, low_open: bool = False, high_open: bool = False) -> float:
    """Return ``float(value)`` after checking it lies in [0, 1] (ends optionally open)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    too_low = value <= 0.0 if low_open else value < 0.0
    too_high = value >= 1.0 if high_open else value > 1.0
    if too_low or too_high or value != value:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must lie in {lo}0, 1{hi}, got {value}")
    return value


def as_thing_stuff_pair(value: ThresholdArg, name: str) -> Tuple[float, float]:
    """Normalize a threshold given as one float or a ``(thing, stuff)`` pair to a pair in [0, 1].

    The official Panoptic SegFormer code uses separate thresholds for thing and stuff
    predictions; a single float applies to both.
    """
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a float or a (thing, stuff) pair, got {value!r}")
        return (check_unit_interval(value[0], f"{name}[0] (thing)"),
                check_unit_interval(value[1], f"{name}[1] (stuff)"))
    value = check_unit_interval(value, name)
    return (value, value)


def value_ranges(mask_range: Optional[Tuple[torch.Tensor, torch.Tensor]], class_probs: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
    """(5,) float64 device tensor: mask min/max (0, 0 if ``mask_range`` is None), class_probs
    min/max, labels min (N >= 1)."""
    if mask_range is None:
        zero = class_probs.new_zeros((), dtype=torch.float64)
        mask_range = (zero, zero)
    return torch.stack([mask_range[0].double(), mask_range[1].double(), class_probs.min().double(),
                        class_probs.max().double(), labels.min().double()])


def check_values_of(mask_probs: torch.Tensor, candidates: Sequence[int], class_probs: torch.Tensor,
                    labels: torch.Tensor) -> None:
    """Value-range check (one sync) of ``class_probs``, ``labels`` and only the masks a method
    reads, ``mask_probs[candidates]`` -- for methods that never touch the other masks."""
    mask_range = None
    if len(candidates):
        ranges = torch.stack([torch.stack(torch.aminmax(mask_probs[q])) for q in candidates])
        mask_range = (ranges[:, 0].min(), ranges[:, 1].max())
    raise_on_bad_values(value_ranges(mask_range, class_probs, labels).tolist())


def raise_on_bad_values(ranges: Sequence[float], max_mask_value: float = 1.0) -> None:
    """Raise ValueError unless the host values of :func:`value_ranges` are valid: masks in
    ``[0, max_mask_value]`` (finite when ``max_mask_value`` is ``inf``), class_probs in [0, 1],
    labels >= 0.

    NaN fails every comparison here, so it is reported as out of range.
    """
    if not (ranges[0] >= 0.0 and ranges[1] <= max_mask_value and math.isfinite(ranges[1])):
        if max_mask_value == 1.0:
            raise ValueError(
                f"mask_probs must be probabilities in [0, 1] (apply sigmoid to logits), got values in "
                f"[{ranges[0]}, {ranges[1]}]")
        raise ValueError(f"mask_probs must be finite and lie in [0, {max_mask_value}], got values in "
                         f"[{ranges[0]}, {ranges[1]}]")
    if not (ranges[2] >= 0.0 and ranges[3] <= 1.0):
        raise ValueError(f"class_probs must lie in [0, 1], got values in [{ranges[2]}, {ranges[3]}]")
    if ranges[4] < 0:
        raise ValueError(f"labels must be contiguous ids >= 0, got minimum {int(ranges[4])}")


def check_inputs(
    mask_probs: torch.Tensor,
    class_probs: torch.Tensor,
    labels: torch.Tensor,
    is_thing: torch.Tensor,
    mask_logits: Optional[torch.Tensor] = None,
    class_distribution: Optional[torch.Tensor] = None,
    check_values: bool = True,
    max_mask_value: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the common post-processor inputs; return them with ``labels`` as int64.

    Args:
        mask_probs: (N, H, W) floating, values in [0, ``max_mask_value``].
        class_probs: (N,) floating, values in [0, 1].
        labels: (N,) integer (not bool), values >= 0.
        is_thing: (N,) bool.
        mask_logits: optional (N, H, W) floating.
        class_distribution: optional (N, K) floating.

    All tensors must be on ``mask_probs``'s device. Value ranges are checked with a single
    host sync unless ``check_values`` is False (a caller that reads the masks anyway can fold the
    range into its own pass: :func:`value_ranges` / :func:`raise_on_bad_values`). Raises
    ValueError naming the offending argument and its shape/dtype.
    """
    if not isinstance(mask_probs, torch.Tensor) or mask_probs.dim() != 3:
        shape = tuple(mask_probs.shape) if isinstance(mask_probs, torch.Tensor) else type(mask_probs).__name__
        raise ValueError(f"mask_probs must be a (N, H, W) tensor, got {shape}")
    if not mask_probs.is_floating_point():
        raise ValueError(f"mask_probs must be floating point, got dtype {mask_probs.dtype}")
    n = mask_probs.shape[0]
    device = mask_probs.device

    def _vector(t, name):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor of shape ({n},), got {type(t).__name__}")
        if t.shape != (n,):
            raise ValueError(
                f"{name} must have shape (N,) = ({n},) to match mask_probs {tuple(mask_probs.shape)}, "
                f"got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but mask_probs is on {device}")

    _vector(class_probs, "class_probs")
    _vector(labels, "labels")
    _vector(is_thing, "is_thing")
    if not class_probs.is_floating_point():
        raise ValueError(f"class_probs must be floating point, got dtype {class_probs.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor (int64), got dtype {labels.dtype}")
    if is_thing.dtype != torch.bool:
        raise ValueError(f"is_thing must be a bool tensor, got dtype {is_thing.dtype}")
    if mask_logits is not None:
        if not isinstance(mask_logits, torch.Tensor) or mask_logits.shape != mask_probs.shape:
            shape = (tuple(mask_logits.shape) if isinstance(mask_logits, torch.Tensor)
                     else type(mask_logits).__name__)
            raise ValueError(
                f"mask_logits must have the shape of mask_probs {tuple(mask_probs.shape)}, got {shape}")
        if not mask_logits.is_floating_point() or mask_logits.device != device:
            raise ValueError(
                f"mask_logits must be floating point on {device}, "
                f"got {mask_logits.dtype} on {mask_logits.device}")
    if class_distribution is not None:
        if (not isinstance(class_distribution, torch.Tensor) or class_distribution.dim() != 2
                or class_distribution.shape[0] != n):
            shape = (tuple(class_distribution.shape) if isinstance(class_distribution, torch.Tensor)
                     else type(class_distribution).__name__)
            raise ValueError(f"class_distribution must have shape (N, K) with N = {n}, got {shape}")
        if not class_distribution.is_floating_point() or class_distribution.device != device:
            raise ValueError(
                f"class_distribution must be floating point on {device}, "
                f"got {class_distribution.dtype} on {class_distribution.device}")

    labels = labels.long()
    if check_values and n > 0:
        raise_on_bad_values(value_ranges(torch.aminmax(mask_probs), class_probs, labels).tolist(),
                            max_mask_value)
    return mask_probs, class_probs, labels, is_thing


def binary_mask_stats(
    mask_probs: torch.Tensor, mask_threshold: float, indices: Optional[Sequence[int]] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Area, probability sum and row band of the binary masks ``m_q > mask_threshold``.

    Reads only the masks listed in ``indices`` (default: all), in blocks of about a megapixel
    through one reused, cache-resident buffer (one big batched reduction is several times slower
    on CPU); no host sync. Sums are accumulated along rows in the input dtype (float32 row sums
    are accurate to ~1e-7; a float64 accumulation costs a third more time on CPU) and across rows
    in float64.

    Args:
        mask_probs: (N, H, W) mask probabilities, >= 0 (above 1 allowed: the official masks).
        mask_threshold: binarization threshold in [0, 1) (strict ``>``).
        indices: M query indices to read (default: ``range(N)``).

    Returns:
        areas: (M,) int64, ``|1{m_q > t}|``.
        prob_sums: (M,) float64, ``sum(1{m_q > t} * m_q)``; the numerator of Eq. (6)'s average.
        bands: (M, 2) int64 ``(y0, y1)``, the half-open range of rows holding the binary mask
            ((0, 0) for an empty mask).
        value_range: 0-d ``(min, max)`` over the masks read (for :func:`value_ranges`), or
            None when M == 0.
    """
    n, h, w = mask_probs.shape
    device = mask_probs.device
    indices = range(n) if indices is None else indices
    m = len(indices)
    if m == 0 or h == 0 or w == 0:
        return (torch.zeros(m, dtype=torch.int64, device=device),
                torch.zeros(m, dtype=torch.float64, device=device),
                torch.zeros((m, 2), dtype=torch.int64, device=device), None)
    chunk_elements = _CHUNK_ELEMENTS if device.type == "cpu" else 64 * _CHUNK_ELEMENTS
    per_block = max(1, chunk_elements // w)
    row_sums, row_counts, mins, maxs = [], [], [], []
    # A reused output buffer: fresh multi-megabyte temporaries cost page faults on every block.
    buf = torch.empty((min(per_block, h), w), dtype=mask_probs.dtype, device=device)
    for q in indices:
        for block in mask_probs[q].split(per_block):
            lo, hi = torch.aminmax(block)  # for input validation, in the same pass over the mask
            mins.append(lo)
            maxs.append(hi)
            # m * 1{m > t} in one op; since m >= 0 and t >= 0, it is > 0 exactly on the binary mask.
            masked = torch.threshold(block, mask_threshold, 0.0, out=buf[:block.shape[0]])
            row_sums.append(masked.sum(dim=1))
            row_counts.append(masked.sign_().sum(dim=1))  # 1{m > t} counted per row
    sums = torch.cat(row_sums).view(m, h).double().sum(dim=1)
    counts = torch.cat(row_counts).view(m, h)
    areas = counts.double().sum(dim=1).round().long()
    occupied = (counts > 0).to(torch.uint8)
    # argmax returns the first maximal index: first / last occupied row.
    bands = torch.stack([occupied.argmax(dim=1), h - occupied.flip(1).argmax(dim=1)], dim=1)
    bands = torch.where((areas > 0)[:, None], bands, torch.zeros_like(bands))
    value_range = (torch.stack(mins).min(), torch.stack(maxs).max())
    return areas, sums, bands, value_range


def greedy_fill(
    mask_probs: torch.Tensor,
    candidates: Sequence[int],
    bands: Sequence[Sequence[int]],
    areas: Sequence[int],
    keep_fractions: Sequence[float],
    mask_threshold: float,
    owner: torch.Tensor,
    first_value: int = 1,
) -> torch.Tensor:
    """Let candidates claim unassigned pixels in priority order (Algorithm 1's loop).

    For the k-th candidate ``q = candidates[k]``: ``kept = 1{m_q > mask_threshold} & (owner == 0)``;
    it is rejected if ``kept`` is empty or ``|kept| / areas[k] < keep_fractions[k]``, otherwise its
    kept pixels get ``owner = first_value + k``. Used by mask-wise merging (keep fraction t_keep)
    and by the heuristic procedure (keep fraction 1 - overlap threshold).

    The loop runs over masks only; each step works on the rows holding the mask and is
    vectorized, and the accept decision stays on the device (no host sync inside the loop).

    Args:
        mask_probs: (N, H, W) mask probabilities.
        candidates: M query indices in priority order; each must have a non-empty binary mask.
        bands: M ``(y0, y1)`` row ranges of the binary masks (see :func:`binary_mask_stats`).
        areas: M binary-mask areas (> 0).
        keep_fractions: M keep thresholds in [0, 1].
        mask_threshold: binarization threshold (strict ``>``).
        owner: (H, W) integer tensor, modified in place; 0 marks an unassigned pixel.
        first_value: owner value written for candidate 0.

    Returns:
        ``owner``.
    """
    for k, q in enumerate(candidates):
        y0, y1 = bands[k]
        band = owner[y0:y1]  # a view: updates land in `owner`
        kept = ((mask_probs[q, y0:y1] > mask_threshold) & (band == 0)).to(owner.dtype)
        kept_area = kept.sum()
        # Skip when |kept| / |binary| < t_keep (same float64 division as a host-side check).
        accept = (kept_area > 0) & (kept_area.double() / areas[k] >= keep_fractions[k])
        # Kept pixels hold 0, so adding kept * value writes value there -- value is 0 for a
        # rejected candidate: no branch on `accept` and no host sync. (Branch-free arithmetic
        # is several times faster than masked_fill_ on CPU.)
        band.addcmul_(kept, accept.to(owner.dtype) * (first_value + k))
    return owner


def running_argmax(
    maps: torch.Tensor,
    candidates: Sequence[int],
    weights: Optional[torch.Tensor] = None,
    track: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Pixel-wise argmax over ``weights[k] * maps[candidates[k]]`` -- the pixel-wise argmax of
    DETR, MaskFormer (p*) and the heuristic's stuff pass, in one place.

    Streams one map at a time (a loop over masks, each step vectorized over pixels), which on CPU
    is several times faster than stacking the candidates and reducing over them. Ties go to the
    first candidate, like ``torch.argmax``.

    Args:
        maps: (N, H, W) per-query maps (mask logits or probabilities).
        candidates: M >= 1 query indices.
        weights: optional (M,) per-candidate factors (e.g. class probabilities).
        track: optional (N, H, W); the winner's value of it is returned per pixel.

    Returns:
        winner: (H, W) int64 in [0, M), the position in ``candidates`` of each pixel's maximum.
        tracked: (H, W) ``track[candidates[winner]]``, or None.
    """
    def value(k, q):
        return maps[q] * weights[k] if weights is not None else maps[q]

    best = value(0, candidates[0]).clone()
    winner = torch.zeros(best.shape, dtype=torch.int64, device=best.device)
    tracked = track[candidates[0]].clone() if track is not None else None
    for k in range(1, len(candidates)):
        q = candidates[k]
        v = value(k, q)
        better = v > best  # strict: ties keep the earlier candidate
        best = torch.where(better, v, best)
        winner.masked_fill_(better, k)
        if tracked is not None:
            tracked = torch.where(better, track[q], tracked)
    return winner, tracked


def merge_stuff_of_same_class(labels: Sequence[int], is_thing: Sequence[bool]) -> List[int]:
    """Group predictions into segments: each thing alone, all stuff of one class together.

    Panoptic segmentation has one segment per stuff class (Kirillov et al.), so a stuff prediction
    whose class already has a segment joins it. This is the single home of that rule for every
    post-processor (DETR's "merge stuff of the same category", Mask2Former's stuff memory, the
    join in mask-wise merging).

    Args:
        labels: M class ids, in priority order.
        is_thing: M flags.

    Returns:
        M group indices, numbered 0, 1, ... in order of first appearance.
    """
    groups, stuff_group, count = [], {}, 0
    for label, thing in zip(labels, is_thing):
        if not thing and label in stuff_group:
            groups.append(stuff_group[label])
            continue
        if not thing:
            stuff_group[label] = count
        groups.append(count)
        count += 1
    return groups


def paint_segments(
    owner: torch.Tensor,
    candidates: Sequence[int],
    labels: torch.Tensor,
    is_thing: torch.Tensor,
    scores: torch.Tensor,
    min_stuff_area: int = 0,
) -> Tuple[torch.Tensor, SegmentsInfo]:
    """Turn a per-pixel owner map into Detectron2's ``(panoptic_seg, segments_info)``.

    Candidates that own no pixel are dropped; the remaining ones are grouped with
    :func:`merge_stuff_of_same_class` (in candidate order) and each group gets the next id
    1, 2, ...; a group's ``score`` is its first member's. Stuff groups with fewer than
    ``min_stuff_area`` pixels become void. One host sync.

    Args:
        owner: (H, W) integer tensor; 0 = void, ``k + 1`` = pixel of ``candidates[k]``.
        candidates: M query indices in priority order.
        labels: (N,) int64 class ids of all queries.
        is_thing: (N,) bool of all queries.
        scores: (N,) float score of all queries, reported as ``"score"``.
        min_stuff_area: stuff segments smaller than this are removed (set to void).

    Returns:
        panoptic_seg: (H, W) int32 on ``owner``'s device.
        segments_info: list of ``{"id", "category_id", "isthing", "score"}`` ordered by id.
    """
    device = owner.device
    m = len(candidates)
    if m == 0:
        return torch.zeros(owner.shape, dtype=torch.int32, device=device), []
    owner = owner.long()
    index = torch.as_tensor(list(candidates), dtype=torch.long, device=device)
    counts = torch.bincount(owner.flatten(), minlength=m + 1)[1:m + 1]
    host = torch.stack([counts.double(), labels[index].double(), is_thing[index].double(),
                        scores[index].double()]).tolist()
    present = [k for k in range(m) if host[0][k] > 0]
    present_labels = [int(host[1][k]) for k in present]
    present_things = [bool(host[2][k]) for k in present]
    groups = merge_stuff_of_same_class(present_labels, present_things)
    group_area: Dict[int, float] = {}
    for k, g in zip(present, groups):
        group_area[g] = group_area.get(g, 0.0) + host[0][k]

    lut = [0] * (m + 1)
    group_id: Dict[int, int] = {}
    segments_info: SegmentsInfo = []
    for k, g, label, thing in zip(present, groups, present_labels, present_things):
        if g not in group_id:
            if not thing and group_area[g] < min_stuff_area:
                group_id[g] = 0
            else:
                group_id[g] = len(segments_info) + 1
                segments_info.append({"id": group_id[g], "category_id": label, "isthing": thing,
                                      "score": float(host[3][k])})
        lut[k + 1] = group_id[g]
    lut_t = torch.tensor(lut, dtype=torch.int32, device=device)
    return lut_t[owner], segments_info


def mean_mask_instance_scores(class_probs: torch.Tensor, areas: torch.Tensor,
                              prob_sums: torch.Tensor) -> torch.Tensor:
    """Default score of the ``instances`` output: class probability x mean mask probability inside
    the binary mask (0 for an empty mask).

    Args:
        class_probs: (M,); areas: (M,) int64 ``|1{m > t}|``; prob_sums: (M,) float64
            ``sum(1{m > t} m)`` (:func:`binary_mask_stats`).
    Returns:
        (M,) float64 scores.
    """
    return class_probs.double() * prob_sums.double() / areas.clamp(min=1).double()


class PanopticPostProcessor:
    """Base class: validates the common inputs, then calls :meth:`merge`.

    Subclasses have plain constructors of their thresholds and implement :meth:`merge` with the
    validated tensors. Anything callable with the common signature (module docstring) can be
    registered; subclassing is a convenience. Shapes and dtypes are always checked here; value
    ranges too, unless the subclass sets ``checks_values_in_merge = True`` and checks them itself
    on the data it reads (:func:`value_ranges`, :func:`raise_on_bad_values`,
    :func:`check_values_of`) -- all built-ins do, to avoid an extra pass over N full-size masks
    of which most are never used.
    """

    checks_values_in_merge = False
    #: How the meta-architecture brings the decoder's masks to the output size (module docstring).
    masks_to_image = staticmethod(upsample_masks_to_image)
    #: Largest mask value :meth:`merge` accepts (module docstring).
    max_mask_value = 1.0
    #: Score ranking the thing results of the meta-architecture's ``instances`` output.
    instance_scores = staticmethod(mean_mask_instance_scores)
    #: Whether :meth:`merge` reads ``mask_logits``; when False the caller may pass None (it then keeps no
    #: second full-resolution copy of the masks).
    reads_mask_logits = False

    def read_queries(self, class_probs: torch.Tensor, labels: torch.Tensor, is_thing: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the queries whose masks :meth:`merge` may read, from their class predictions alone.

        Calling the post-processor with only these queries (in query order) gives the same
        ``(panoptic_seg, segments_info)``, so the caller need not bring the other masks to full
        resolution (inference memory grows with the masks read, not with queries x image size).
        Default: every query.
        """
        return torch.ones_like(is_thing)

    def __call__(
        self,
        mask_probs: torch.Tensor,
        class_probs: torch.Tensor,
        labels: torch.Tensor,
        is_thing: torch.Tensor,
        mask_logits: Optional[torch.Tensor] = None,
        class_distribution: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, SegmentsInfo]:
        """See the module docstring for shapes; returns ``(panoptic_seg (H, W) int32, segments_info)``."""
        with torch.no_grad():
            mask_probs, class_probs, labels, is_thing = check_inputs(
                mask_probs, class_probs, labels, is_thing, mask_logits, class_distribution,
                check_values=not self.checks_values_in_merge, max_mask_value=self.max_mask_value)
            h, w = mask_probs.shape[1:]
            if mask_probs.shape[0] == 0:
                return torch.zeros((h, w), dtype=torch.int32, device=mask_probs.device), []
            return self.merge(mask_probs, class_probs, labels, is_thing, mask_logits, class_distribution)

    def merge(
        self,
        mask_probs: torch.Tensor,
        class_probs: torch.Tensor,
        labels: torch.Tensor,
        is_thing: torch.Tensor,
        mask_logits: Optional[torch.Tensor],
        class_distribution: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, SegmentsInfo]:
        """Method body, called with validated inputs and N >= 1."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"
