"""Hungarian matching for Panoptic SegFormer (Sec. 3.4, Eq. 4; App. A.1; App. B.2 query filtering).

Things are assigned to queries by bipartite matching ("Hungarian algorithm [31]") whose cost is the sum of
the classification, detection and segmentation costs (Sec. 3.4):

* classification: Deformable DETR's focal cost on sigmoid class probabilities,
  ``C_cls[q, j] = a (1-p)^g (-log p) - (1-a) p^g (-log(1-p))`` with ``p = sigmoid(logit[q, label_j])``;
* detection: L1 on normalized ``(cx, cy, w, h)`` boxes + (negative) generalized IoU; in the box-free variant
  (Sec. 3.3.2, App. A.1) L1 on the normalized mass centres ``(x, y)`` only;
* segmentation: Dice cost between predicted mask probabilities and the ground-truth masks area-downsampled
  to the prediction size (soft targets), ``1 - 2 sum(p t) / (sum(p^2) + sum(t^2) + eps)`` (V-Net form [32]).

Any of the three parts may be absent (the location decoder has no masks; a model without location-decoder
layers has no boxes). Query filtering (App. B.2) runs several rounds of this matching on the location
decoder's final outputs; see :func:`multi_round_match` and :func:`select_thing_queries`.

Host-device syncs: scipy's Hungarian solver runs on the host, so the cost matrices must be copied there.
:meth:`HungarianMatcher.match_many`, :meth:`HungarianMatcher.forward` and :func:`multi_round_match` copy all
cost matrices of a call (every image, every matching, and the label ranges that validate the targets) in ONE
device-to-host transfer, solve, and send all assignments back in one non-blocking host-to-device copy.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

__all__ = [
    "DICE_EPS",
    "HungarianMatcher",
    "dice_terms",
    "downsample_masks",
    "focal_class_cost",
    "mask_mass_centers",
    "multi_round_match",
    "pairwise_dice_cost",
    "select_thing_queries",
]

#: Smoothing term of the Dice cost/loss denominator (keeps ``0/0`` out; negligible for real masks).
DICE_EPS = 1e-3
# Non-finite costs are replaced by this value before scipy sees them (scipy rejects NaN/inf).
_COST_LIMIT = 1e8


def _no_autocast(device: torch.device):
    """Context that turns autocast off so costs/losses are computed in float32."""
    return torch.autocast(device_type=device.type, enabled=False)


def mask_mass_centers(masks: Tensor, image_size: Sequence[int]) -> Tensor:
    """Mass centres of binary masks, normalized like the boxes (Sec. 3.3.2 box-free variant, App. A.1).

    Pixel ``(i, j)`` has centre ``(j + 0.5, i + 0.5)``; the centre is divided by the *unpadded* image size,
    so it lives in the same ``[0, 1]`` frame as the normalized ``(cx, cy)`` of the boxes. An empty mask gets
    the image centre ``(0.5, 0.5)``.

    Args:
        masks: (M, Hp, Wp) bool or float masks at the padded input size (Hp >= H, Wp >= W).
        image_size: (H, W) of the unpadded image.
    Returns:
        (M, 2) float32 tensor of normalized ``(x, y)`` centres.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (M, H, W), got shape {tuple(masks.shape)}")
    height, width = int(image_size[0]), int(image_size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be positive (H, W), got {tuple(image_size)}")
    m = masks.float()
    ys = torch.arange(m.shape[-2], device=m.device, dtype=torch.float32) + 0.5
    xs = torch.arange(m.shape[-1], device=m.device, dtype=torch.float32) + 0.5
    area = m.sum(dim=(1, 2))
    cx = (m.sum(dim=1) * xs).sum(dim=1) / area.clamp(min=1e-6) / width
    cy = (m.sum(dim=2) * ys).sum(dim=1) / area.clamp(min=1e-6) / height
    centers = torch.stack([cx, cy], dim=-1)
    return torch.where((area > 0)[:, None], centers, torch.full_like(centers, 0.5))


def downsample_masks(masks: Tensor, size: Sequence[int], mode: str = "area") -> Tensor:
    """Downsample masks to the mask-prediction size (soft targets in ``[0, 1]``).

    Args:
        masks: (M, H', W') bool or float masks (e.g. at the padded input size, H' = 8h).
        size: (h, w) target size.
        mode: "area" (this project): each value is the fraction of the covered input pixels (adaptive
            average pooling, exact box averaging when H'/h and W'/w are integers); "bilinear" (the official
            code: ``F.interpolate(..., mode='bilinear')``, align_corners False, no antialiasing -- a point
            sample of the 2x2 pixels around each cell centre, panformer_head.py:900-903 and
            easymd/core/bbox/match_costs/match_cost.py:81-82).
    Returns:
        (M, h, w) float32.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (M, H, W), got shape {tuple(masks.shape)}")
    if mode not in ("area", "bilinear"):
        raise ValueError(f"mode must be 'area' or 'bilinear', got {mode!r}")
    size = (int(size[0]), int(size[1]))
    if tuple(masks.shape[-2:]) == size:
        return masks.float()
    if masks.shape[0] == 0:
        return torch.zeros((0, *size), device=masks.device)
    # Chunks bound the float copy of full-resolution masks (~100 masks of 1344x1344 would need ~0.7 GB).
    if mode == "bilinear":
        return torch.cat([F.interpolate(c.float()[None], size=size, mode="bilinear", align_corners=False)[0]
                          for c in masks.split(16)])
    return torch.cat([F.adaptive_avg_pool2d(c.float()[:, None], size)[:, 0] for c in masks.split(16)])


def dice_terms(probs: Tensor, targets: Tensor, eps: float, eps_each: bool, pairwise: bool) -> Tensor:
    """``1 - 2 sum(p t) / denominator`` of flattened probabilities (P, D) and targets (P|M, D): the Dice
    cost/loss of this project (``sum(p^2) + sum(t^2) + eps``) or, with ``eps_each``, of the official code
    (``(sum(p^2) + eps) + (sum(t^2) + eps)``, easymd/models/losses/dice_loss.py:42-45 and
    match_costs/match_cost.py:87-90). ``pairwise``: (P, M) for every pair, else (P,) for paired rows."""
    if pairwise:
        inter = probs @ targets.T
        p2, t2 = probs.pow(2).sum(-1)[:, None], targets.pow(2).sum(-1)[None, :]
    else:
        inter = (probs * targets).sum(-1)
        p2, t2 = probs.pow(2).sum(-1), targets.pow(2).sum(-1)
    denom = (p2 + eps) + (t2 + eps) if eps_each else p2 + t2 + eps
    return 1 - 2 * inter / denom


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Deformable DETR's focal classification cost.

    ``cost[q, j] = alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` with
    ``p = sigmoid(logits[q, labels[j]])``
    (``-log p`` and ``-log(1-p)`` computed stably as ``softplus(-x)`` and ``softplus(x)``).

    Args:
        logits: (Q, K) class logits.
        labels: (M,) long class ids in ``[0, K)``.
    Returns:
        (Q, M) float32 cost.
    """
    x = logits.float()[:, labels]
    p = x.sigmoid()
    pos = alpha * (1 - p).pow(gamma) * F.softplus(-x)
    neg = (1 - alpha) * p.pow(gamma) * F.softplus(x)
    return pos - neg


def pairwise_dice_cost(mask_logits: Tensor, target_masks: Tensor, eps: float = DICE_EPS, sigmoid: bool = True,
                       eps_each: bool = False) -> Tensor:
    """Dice cost between every predicted mask and every ground-truth mask (V-Net form [32]).

    ``cost[q, j] = 1 - 2 <p_q, t_j> / (|p_q|^2 + |t_j|^2 + eps)`` with ``p = sigmoid(mask_logits)``; computed
    with one matmul. ``sigmoid=False``: the predictions are already probabilities (the official ReLU masks,
    used as they are); ``eps_each``: eps on each sum (the official ``DiceCost``, :func:`dice_terms`).

    Args:
        mask_logits: (Q, h, w) mask logits (probabilities with ``sigmoid=False``).
        target_masks: (M, h, w) soft targets in ``[0, 1]`` (same size as the predictions).
    Returns:
        (Q, M) float32 cost.
    """
    p = mask_logits.float().flatten(1)
    p = p.sigmoid() if sigmoid else p
    return dice_terms(p, target_masks.float().flatten(1), eps, eps_each, pairwise=True)


def _sanitize(cost: Tensor) -> Tensor:
    return torch.nan_to_num(cost, nan=_COST_LIMIT, posinf=_COST_LIMIT, neginf=-_COST_LIMIT)


def _to_host(tensors: Sequence[Tensor]) -> List[np.ndarray]:
    """float64 numpy copies of several tensors in ONE device-to-host transfer per device (nothing is
    transferred when they are all empty)."""
    out: List[Optional[np.ndarray]] = [None] * len(tensors)
    groups: Dict[torch.device, List[int]] = {}
    for k, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(k)
    for ks in groups.values():
        parts = [tensors[k].detach().reshape(-1).double() for k in ks]
        if sum(p.numel() for p in parts):
            flat = torch.cat(parts).cpu().numpy()  # the transfer (a no-op copy on the CPU)
        else:
            flat = np.zeros(0)
        start = 0
        for k, p in zip(ks, parts):
            out[k] = flat[start:start + p.numel()].reshape(tuple(tensors[k].shape))
            start += p.numel()
    return out


def _to_device(arrays: Sequence[np.ndarray], device: torch.device) -> List[Tensor]:
    """int64 tensors on ``device`` from host arrays in one non-blocking host-to-device copy (from pageable
    memory it is staged at once and does not wait for the device)."""
    if not arrays:
        return []
    flat = torch.as_tensor(np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays]))
    return list(flat.to(device, non_blocking=True).split([int(np.size(a)) for a in arrays]))


def _label_range(labels: Tensor) -> Tensor:
    """(2,) float64 (min, max) of a non-empty label vector, on its device (read later in one transfer)."""
    lo, hi = torch.aminmax(labels)
    return torch.stack([lo, hi]).double()


def _raise_on_bad_labels(checks: Sequence[Tuple[int, int]], ranges: Sequence[np.ndarray]) -> None:
    """``checks[k] = (image index, number of classes)`` of the host ``ranges[k] = (min, max)``."""
    for (image, num_classes), (lo, hi) in zip(checks, ranges):
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"targets[{image}]['labels'] must lie in [0, {num_classes}), got [{int(lo)}, {int(hi)}]"
            )


def _solve(cost) -> Tuple[np.ndarray, np.ndarray]:
    """Minimum-cost bipartite assignment of a (Q, M) host cost matrix (scipy ``linear_sum_assignment``)."""
    if isinstance(cost, Tensor):
        cost = _sanitize(cost).detach().cpu().double().numpy()
    return linear_sum_assignment(cost)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of ground-truth things to queries (Sec. 3.4, Eq. 4).

    Cost = ``cost_class * C_focal + cost_bbox * C_L1 + cost_giou * C_GIoU + cost_mask * C_dice``; the
    detection part is ``cost_bbox * L1(centres)`` when ``box_free``. A part is used iff its prediction is
    given (and its weight is non-zero). The defaults follow Deformable DETR (2, 5, 2) and ``lambda_seg = 1``.

    Args:
        cost_class, cost_bbox, cost_giou, cost_mask: weights of the cost parts.
        focal_alpha, focal_gamma: focal-cost parameters.
        box_free: predictions/targets are ``(x, y)`` mass centres instead of ``(cx, cy, w, h)`` boxes.
        mask_sigmoid, mask_resize, dice_eps, dice_eps_each: the Dice part (:func:`pairwise_dice_cost`,
            :func:`downsample_masks`): this project's defaults (sigmoid of mask logits, area-downsampled
            targets, eps 1e-3 once); the official mask-decoder matcher uses the ReLU masks as they are,
            bilinear targets and eps 1e-3 on each sum (``DiceCost``, easymd/core/bbox/match_costs/match_cost.py:48-90).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        cost_mask: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_free: bool = False,
        mask_sigmoid: bool = True,
        mask_resize: str = "area",
        dice_eps: float = DICE_EPS,
        dice_eps_each: bool = False,
    ):
        super().__init__()
        if mask_resize not in ("area", "bilinear"):
            raise ValueError(f"mask_resize must be 'area' or 'bilinear', got {mask_resize!r}")
        weights = dict(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou, cost_mask=cost_mask)
        for name, value in weights.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if all(v == 0 for v in weights.values()):
            raise ValueError("all cost weights are 0: the matching would be arbitrary")
        self.cost_class = float(cost_class)
        self.cost_bbox = float(cost_bbox)
        self.cost_giou = float(cost_giou)
        self.cost_mask = float(cost_mask)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.box_free = bool(box_free)
        self.mask_sigmoid = bool(mask_sigmoid)
        self.mask_resize = mask_resize
        self.dice_eps = float(dice_eps)
        self.dice_eps_each = bool(dice_eps_each)

    @property
    def loc_dim(self) -> int:
        """Last dimension of a location prediction: 2 (mass centre) if box-free, else 4 (box)."""
        return 2 if self.box_free else 4

    def target_locations(self, target: Dict[str, Tensor]) -> Tensor:
        """Ground-truth locations of one image: (M, 4) ``"boxes"``, or (M, 2) mass centres when box-free
        (``target["centers"]`` if present, else :func:`mask_mass_centers` of ``"masks"``)."""
        if not self.box_free:
            return target["boxes"]
        if "centers" in target:
            return target["centers"]
        return mask_mass_centers(target["masks"], target["image_size"])

    @torch.no_grad()
    def cost_matrix(
        self,
        target: Dict[str, Tensor],
        pred_logits: Optional[Tensor] = None,
        pred_boxes: Optional[Tensor] = None,
        pred_masks: Optional[Tensor] = None,
        check_labels: bool = True,
    ) -> Tensor:
        """Matching cost of one image.

        Args:
            target: dict with ``"labels"`` (M,) long; ``"boxes"`` (M, 4) normalized cxcywh (or ``"centers"``
                (M, 2) / ``"masks"`` + ``"image_size"`` when box-free) if ``pred_boxes`` is given; ``"masks"``
                (M, H', W') if ``pred_masks`` is given (area-downsampled to (h, w) here when sizes differ).
            pred_logits: (Q, K) class logits, or None.
            pred_boxes: (Q, 4) normalized cxcywh boxes, or (Q, 2) centres when box-free, or None.
            pred_masks: (Q, h, w) mask logits, or None.
            check_labels: check that the labels lie in ``[0, K)`` (one host-device sync). With False the
                caller checks them (:meth:`match_many` folds the check into its single transfer); labels
                out of range are clamped for indexing and give a meaningless cost.
        Returns:
            (Q, M) float32 cost (detached).
        """
        preds = [t for t in (pred_logits, pred_boxes, pred_masks) if t is not None]
        if not preds:
            raise ValueError("cost_matrix needs at least one of pred_logits, pred_boxes, pred_masks")
        num_queries = preds[0].shape[0]
        for t in preds:
            if t.shape[0] != num_queries:
                raise ValueError(
                    f"predictions disagree on the number of queries: " f"{[tuple(p.shape) for p in preds]}"
                )
        labels = target["labels"]
        if labels.dim() != 1:
            raise ValueError(f"target['labels'] must be (M,), got shape {tuple(labels.shape)}")
        num_gt = labels.shape[0]
        device = preds[0].device
        cost = torch.zeros(num_queries, num_gt, device=device, dtype=torch.float32)
        if num_queries == 0 or num_gt == 0:
            return cost
        with _no_autocast(device):
            if pred_logits is not None and self.cost_class != 0:
                if pred_logits.dim() != 2:
                    raise ValueError(f"pred_logits must be (Q, K), got shape {tuple(pred_logits.shape)}")
                if check_labels:
                    lo, hi = _label_range(labels).tolist()
                    if lo < 0 or hi >= pred_logits.shape[1]:
                        raise ValueError(
                            f"target['labels'] must lie in [0, {pred_logits.shape[1]}), got [{int(lo)}, {int(hi)}]"
                        )
                    safe_labels = labels.to(device)
                else:
                    safe_labels = labels.to(device).clamp(0, max(pred_logits.shape[1] - 1, 0))
                cost += self.cost_class * focal_class_cost(
                    pred_logits, safe_labels, self.focal_alpha, self.focal_gamma
                )
            if pred_boxes is not None:
                if pred_boxes.dim() != 2 or pred_boxes.shape[1] != self.loc_dim:
                    raise ValueError(
                        f"pred_boxes must be (Q, {self.loc_dim}) (box_free={self.box_free}), "
                        f"got shape {tuple(pred_boxes.shape)}"
                    )
                tgt_loc = self.target_locations(target).to(device).float()
                if tgt_loc.shape != (num_gt, self.loc_dim):
                    raise ValueError(
                        f"target locations must be ({num_gt}, {self.loc_dim}), "
                        f"got shape {tuple(tgt_loc.shape)}"
                    )
                src_loc = pred_boxes.float()
                if self.cost_bbox != 0:
                    cost += self.cost_bbox * torch.cdist(src_loc, tgt_loc, p=1)
                if not self.box_free and self.cost_giou != 0:
                    giou = generalized_box_iou(
                        box_convert(src_loc, "cxcywh", "xyxy"), box_convert(tgt_loc, "cxcywh", "xyxy")
                    )
                    cost += -self.cost_giou * giou
            if pred_masks is not None and self.cost_mask != 0:
                if pred_masks.dim() != 3:
                    raise ValueError(f"pred_masks must be (Q, h, w), got shape {tuple(pred_masks.shape)}")
                tgt_masks = target["masks"]
                if tgt_masks.dim() != 3 or tgt_masks.shape[0] != num_gt:
                    raise ValueError(
                        f"target['masks'] must be ({num_gt}, H, W), got shape {tuple(tgt_masks.shape)}"
                    )
                tgt_masks = downsample_masks(tgt_masks.to(device), pred_masks.shape[-2:], self.mask_resize)
                cost += self.cost_mask * pairwise_dice_cost(pred_masks, tgt_masks, self.dice_eps, self.mask_sigmoid,
                                                            self.dice_eps_each)
        return _sanitize(cost)

    def _predictions(self, outputs: Dict[str, Tensor], batch: Optional[int]) -> Dict[str, Optional[Tensor]]:
        preds = {k: outputs.get(k) for k in ("pred_logits", "pred_boxes", "pred_masks")}
        present = {k: v for k, v in preds.items() if v is not None}
        if not present:
            raise ValueError("outputs must hold at least one of 'pred_logits', 'pred_boxes', 'pred_masks'")
        size = next(iter(present.values())).shape[0]
        for k, v in present.items():
            if v.shape[0] != size:
                raise ValueError(f"outputs['{k}'] has batch {v.shape[0]}, expected {size}")
        if batch is not None and size != batch:
            raise ValueError(f"got {batch} targets for a batch of {size} predictions")
        return preds

    @torch.no_grad()
    def match_many(
        self, outputs_list: Sequence[Dict[str, Tensor]], targets: List[Dict[str, Tensor]]
    ) -> List[List[Tuple[Tensor, Tensor]]]:
        """Several matchings of the same targets (e.g. one per decoder layer) with one host-device sync.

        All cost matrices, and the label ranges that validate ``targets``, are copied to the host in one
        transfer; the assignments come back in one non-blocking copy.

        Args:
            outputs_list: dicts as in :meth:`forward`, each with batch ``len(targets)``.
            targets: list of N dicts as in :meth:`cost_matrix`.
        Returns:
            per entry of ``outputs_list``, the result of :meth:`forward`.
        """
        costs, checks, ranges, device = [], [], [], None
        for outputs in outputs_list:
            preds = self._predictions(outputs, len(targets))
            for i, target in enumerate(targets):
                cost = self.cost_matrix(
                    target, **{k: (v[i] if v is not None else None) for k, v in preds.items()}, check_labels=False
                )
                costs.append(cost)
                device = cost.device
                logits = preds["pred_logits"]
                if logits is not None and self.cost_class != 0 and cost.numel():
                    checks.append((i, logits.shape[-1]))
                    ranges.append(_label_range(target["labels"]).to(device))
        if not costs:
            return [[] for _ in outputs_list]
        host = _to_host(costs + ranges)  # the one device-to-host transfer
        _raise_on_bad_labels(checks, host[len(costs):])
        assignments = []
        for cost in host[: len(costs)]:
            assignments.extend(_solve(cost))
        back = _to_device(assignments, device)
        pairs = [(back[2 * k], back[2 * k + 1]) for k in range(len(costs))]
        n = len(targets)
        return [pairs[j * n:(j + 1) * n] for j in range(len(outputs_list))]

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]
    ) -> List[Tuple[Tensor, Tensor]]:
        """Match a batch (one host-device sync, see :meth:`match_many`).

        Args:
            outputs: dict with any of ``"pred_logits"`` (N, Q, K), ``"pred_boxes"`` (N, Q, 4|2),
                ``"pred_masks"`` (N, Q, h, w); missing or None entries are left out of the cost.
            targets: list of N dicts as in :meth:`cost_matrix`.
        Returns:
            list of N ``(pred_idx, gt_idx)`` long tensors of equal length ``min(Q, M_i)``, ``pred_idx``
            sorted.
        """
        self._predictions(outputs, len(targets))
        return self.match_many([outputs], targets)[0]

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
            f"cost_mask={self.cost_mask}, focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}, "
            f"box_free={self.box_free}"
            + ("" if (self.mask_sigmoid, self.mask_resize, self.dice_eps, self.dice_eps_each)
               == (True, "area", DICE_EPS, False) else
               f", mask_sigmoid={self.mask_sigmoid}, mask_resize={self.mask_resize!r}, dice_eps={self.dice_eps}, "
               f"dice_eps_each={self.dice_eps_each}")
        )


def _check_location_outputs(pred_logits: Tensor, pred_boxes: Tensor, matcher: HungarianMatcher) -> None:
    if pred_logits.dim() != 3:
        raise ValueError(f"pred_logits must be (N, Q, K), got shape {tuple(pred_logits.shape)}")
    if (
        pred_boxes.dim() != 3
        or pred_boxes.shape[:2] != pred_logits.shape[:2]
        or pred_boxes.shape[-1] != matcher.loc_dim
    ):
        raise ValueError(
            f"pred_boxes must be (N, Q, {matcher.loc_dim}) matching pred_logits {tuple(pred_logits.shape)}, "
            f"got shape {tuple(pred_boxes.shape)}"
        )


@torch.no_grad()
def multi_round_match(
    pred_logits: Tensor,
    pred_boxes: Tensor,
    targets: List[Dict[str, Tensor]],
    num_rounds: int,
    matcher: Optional[HungarianMatcher] = None,
) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """Multi-round bipartite matching for query filtering (App. B.2).

    Round ``r`` solves the Hungarian matching between the ground truths and the queries *not matched in
    rounds < r* (same detection cost as :class:`HungarianMatcher`, computed once from the location decoder's
    final class logits and boxes). Each round therefore selects ``min(M, remaining queries)`` new queries;
    rounds stop early when no query is left or the image has no ground truth.

    Args:
        pred_logits: (N, Q, K) final location-decoder class logits.
        pred_boxes: (N, Q, 4) normalized cxcywh boxes, or (N, Q, 2) centres when box-free.
        targets: N dicts with ``"labels"`` and ``"boxes"`` (or what the box-free matcher needs).
        num_rounds: number of rounds (>= 0).
        matcher: cost definition; default ``HungarianMatcher(box_free=pred_boxes.shape[-1] == 2)``.
    Returns:
        per image ``(query_idx, gt_idx, round_idx)``, three (P,) long tensors ordered by round (query index
        ascending within a round); ``query_idx`` has no repeats.
    """
    if matcher is None:
        matcher = HungarianMatcher(box_free=pred_boxes.shape[-1] == 2)
    _check_location_outputs(pred_logits, pred_boxes, matcher)
    if num_rounds < 0:
        raise ValueError(f"num_rounds must be >= 0, got {num_rounds}")
    if len(targets) != pred_logits.shape[0]:
        raise ValueError(f"got {len(targets)} targets for a batch of {pred_logits.shape[0]}")
    device = pred_logits.device
    costs, checks, ranges = [], [], []
    for i, target in enumerate(targets):
        cost = matcher.cost_matrix(target, pred_logits=pred_logits[i], pred_boxes=pred_boxes[i], check_labels=False)
        costs.append(cost)
        if matcher.cost_class != 0 and cost.numel():
            checks.append((i, pred_logits.shape[-1]))
            ranges.append(_label_range(target["labels"]).to(device))
    host = _to_host(costs + ranges)  # the one device-to-host transfer
    _raise_on_bad_labels(checks, host[len(costs):])
    per_image = []
    for cost in host[: len(costs)]:
        num_queries, num_gt = cost.shape
        used = np.zeros(num_queries, dtype=bool)
        q_all, g_all, r_all = [], [], []
        for r in range(num_rounds):
            available = np.flatnonzero(~used)
            if num_gt == 0 or available.size == 0:
                break
            rows, cols = _solve(cost[available])
            q = available[rows]
            used[q] = True
            q_all.append(q)
            g_all.append(cols)
            r_all.append(np.full_like(q, r))
        per_image.extend(np.concatenate(x) if x else np.zeros(0, dtype=np.int64) for x in (q_all, g_all, r_all))
    back = _to_device(per_image, device)
    return [tuple(back[3 * i:3 * i + 3]) for i in range(len(targets))]


@torch.no_grad()
def select_thing_queries(
    pred_logits: Tensor,
    pred_boxes: Tensor,
    targets: Optional[List[Dict[str, Tensor]]],
    num_rounds: int,
    num_queries: int,
    matcher: Optional[HungarianMatcher] = None,
    top_up: bool = True,
) -> Tensor:
    """Choose the thing queries fed to the mask decoder (query filtering, App. B.2).

    Per image, the queries matched by :func:`multi_round_match` come first (round 1 first; if they do not
    all fit, the later ones are cut), then the remaining queries with the highest score ``max_k
    sigmoid(logit_k)`` fill up to ``num_queries`` (ties broken by lower query index). Every image gets the
    same count, so the result is a dense index tensor. With ``targets=None`` (inference) or
    ``num_rounds=0`` this is plain top-``num_queries`` by score.

    ``top_up=False`` (the official code, ``filter_query``, panformer_head.py:422-488 and
    ``HungarianAssigner_filter``, tools.py:205-299): only the matched queries (at most ``num_queries``,
    later rounds cut first), in ascending query index (their ``pos_ind``, head:713-725); images with fewer
    are padded with -1 to the batch's largest count (the official head pads with zero queries, head:711-725).

    Args:
        pred_logits: (N, Q, K) final location-decoder class logits.
        pred_boxes: (N, Q, 4) normalized cxcywh boxes, or (N, Q, 2) centres when box-free.
        targets: N target dicts (see :class:`HungarianMatcher`), or None.
        num_rounds: rounds of matching (App. B.2).
        num_queries: number of queries kept per image, ``1 <= num_queries <= Q``.
        matcher: cost definition; default ``HungarianMatcher(box_free=pred_boxes.shape[-1] == 2)``.
    Returns:
        (N, num_queries) long indices into the Q location-decoder queries, no repeats within an image
        ((N, max matched) with -1 padding when ``top_up`` is False).
    """
    if matcher is None:
        matcher = HungarianMatcher(box_free=pred_boxes.shape[-1] == 2)
    _check_location_outputs(pred_logits, pred_boxes, matcher)
    batch, total = pred_logits.shape[:2]
    if not 1 <= num_queries <= total:
        raise ValueError(f"num_queries must be in [1, Q={total}], got {num_queries}")
    if pred_logits.shape[-1] > 0:
        scores = torch.nan_to_num(pred_logits.detach().float().sigmoid().amax(dim=-1), nan=0.0)
    else:
        scores = pred_logits.new_zeros(batch, total, dtype=torch.float32)
    if targets is not None and num_rounds > 0:
        matched = [m[0] for m in multi_round_match(pred_logits, pred_boxes, targets, num_rounds, matcher)]
    else:
        matched = [torch.zeros(0, dtype=torch.long, device=pred_logits.device)] * batch
    if not top_up:
        kept = [torch.sort(m[:num_queries]).values for m in matched]
        width = max(k.numel() for k in kept) if kept else 0
        out = torch.full((batch, width), -1, dtype=torch.long, device=pred_logits.device)
        for i, k in enumerate(kept):
            out[i, : k.numel()] = k
        return out
    selected = []
    for i in range(batch):
        first = matched[i][:num_queries]
        rest_scores = scores[i].clone()
        rest_scores[first] = -float("inf")
        order = torch.sort(rest_scores, descending=True, stable=True).indices
        selected.append(torch.cat([first, order[: num_queries - first.numel()]]))
    return torch.stack(selected)
