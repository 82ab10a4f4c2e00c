"""Training losses of Panoptic SegFormer (Sec. 3.4, Eq. 3-5; App. A.1).

``L = sum_n lambda_things[n] L_things[n] + lambda_stuff[n] L_stuff[n]`` (Eq. 3, per image n) with

* ``L_things = lambda_det L_det + sum_i (lambda_cls L_cls^i + lambda_seg L_seg^i)`` (Eq. 4): ``L_det`` is
  Deformable DETR's loss on every location-decoder layer (each layer matched with its own detection cost;
  focal + L1 + GIoU, or L1 on mass centres when box-free); the mask-decoder terms use ONE Hungarian
  assignment (cost = classification + detection + segmentation, from the last mask-decoder layer and the
  final location-decoder boxes of the queries fed to it) shared by all mask-decoder layers (deep supervision);
* ``L_stuff = sum_i (lambda_cls L_cls^i + lambda_seg L_seg^i)`` (Eq. 5) with the class-fixed assignment
  stuff query k <-> stuff class k.

``L_cls`` is the sigmoid focal loss (fvcore), ``L_seg`` the Dice loss (V-Net form, see :func:`dice_loss`)
on masks at the prediction resolution (h, w) against area-downsampled ground truth (soft targets); queries
assigned to the empty set and absent stuff classes get classification loss only (App. A.1).

Normalization: classification/detection terms of things are divided by the number of ground-truth things,
thing Dice by the number of matched (query, thing) pairs, stuff terms by the number of present stuff classes,
all summed over the batch, averaged over processes (``torch.distributed``) and clamped to >= 1 (DETR).

Host-device syncs per call of :meth:`PanopticSegFormerCriterion.forward`: two, whatever the batch size and
the number of layers -- one transfer that validates the targets (labels, stuff labels and the thing query
index; the present stuff classes are found on the host from it), and one for all Hungarian matchings
(:meth:`HungarianMatcher.match_many`). Everything else (normalizers, pairs, one-hot targets) stays on the
device; small host-built tensors are copied without blocking.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from fvcore.nn import sigmoid_focal_loss
from torch import Tensor, nn
from torchvision.ops import box_convert

from .matcher import (DICE_EPS, HungarianMatcher, _to_device, _to_host, dice_terms, downsample_masks,
                      mask_mass_centers)

__all__ = ["PanopticSegFormerCriterion", "dice_loss", "mask_mass_centers", "paired_giou_loss"]


def dice_loss(mask_logits: Tensor, targets: Tensor, eps: float = DICE_EPS, sigmoid: bool = True,
              eps_each: bool = False) -> Tensor:
    """Dice loss of paired masks (V-Net form [32]), float32.

    ``1 - 2 sum(p t) / (sum(p^2) + sum(t^2) + eps)`` with ``p = sigmoid(mask_logits)``; the same formula as
    :func:`~panoptic_segformer.modeling.matcher.pairwise_dice_cost`. ``sigmoid=False``: the inputs are
    already probabilities (the official ReLU masks); ``eps_each``: eps on each sum (the official
    ``DiceLoss``, :func:`~panoptic_segformer.modeling.matcher.dice_terms`).

    Args:
        mask_logits: (P, h, w) mask logits (probabilities with ``sigmoid=False``).
        targets: (P, h, w) soft targets in ``[0, 1]``.
    Returns:
        (P,) per-mask loss.
    """
    p = mask_logits.float().flatten(1)
    p = p.sigmoid() if sigmoid else p
    return dice_terms(p, targets.float().flatten(1), eps, eps_each, pairwise=False)


def paired_giou_loss(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """``1 - GIoU`` of paired boxes, the GIoU term of L_det (Deformable DETR).

    Same values as ``torchvision.ops.generalized_box_iou_loss(..., reduction="none")``, computed with a
    clamp instead of boolean-mask indexing: torchvision (and fvcore's ``giou_loss``) index with a mask,
    which on a GPU is a host-device sync per call.

    Args:
        boxes1, boxes2: (P, 4) boxes (x0, y0, x1, y1).
    Returns:
        (P,) loss.
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area1 + area2 - inter
    iou = inter / (union + eps)
    enclosing = torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])
    area_c = enclosing[:, 0] * enclosing[:, 1]
    return 1 - (iou - (area_c - union) / (area_c + eps))


def _reduce_normalizers(values: Tensor) -> Tensor:
    """Average counts over processes (when distributed is initialized) and clamp to >= 1."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values = values / dist.get_world_size()
    return values.clamp(min=1.0)


def _host_values(values, device: torch.device) -> Tensor:
    """float32 tensor of Python numbers on ``device``, copied without blocking (no host-device sync)."""
    return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)


def _zero_graph(*tensors: Tensor) -> Tensor:
    """``0 * sum(tensors)``: a zero that keeps every given output in the autograd graph (DDP-safe)."""
    total = None
    for t in tensors:
        term = t.float().sum() * 0.0
        total = term if total is None else total + term
    return total


class PanopticSegFormerCriterion(nn.Module):
    """Loss of Panoptic SegFormer (Sec. 3.4, Eq. 3-5, App. A.1); returns already-weighted scalar terms.

    Args:
        num_thing_classes: K_th (all classes in the joint-matching baseline).
        num_stuff_classes: K_st = number of stuff queries Q_st (0 in the joint-matching baseline).
        matcher: :class:`HungarianMatcher` used for every matching (its ``box_free`` must equal ``box_free``).
        loss_weight_cls, loss_weight_seg, loss_weight_det: lambda_cls, lambda_seg, lambda_det of Eq. 4
            (App. A.1: 2, 1, 1).
        det_weight_class, det_weight_bbox, det_weight_giou: Deformable DETR's weights inside L_det; in the
            box-free variant the centre L1 uses ``det_weight_bbox``.
        focal_alpha, focal_gamma: focal-loss parameters.
        deep_supervision: supervise every decoder layer (location and mask decoder); if False, only the last
            layer of each decoder is supervised (names keep that layer's index).
        box_free: the location decoder predicts (x, y) mass centres instead of boxes (Sec. 3.3.2).
        dynamic_things_stuff_weight: per-image lambda_things/lambda_stuff of Eq. 3 from the thing/stuff
            proportion (see :meth:`things_stuff_weights`); if False both are 1.
    """

    def __init__(
        self,
        num_thing_classes: int,
        num_stuff_classes: int,
        matcher: HungarianMatcher,
        loss_weight_cls: float = 2.0,
        loss_weight_seg: float = 1.0,
        loss_weight_det: float = 1.0,
        det_weight_class: float = 2.0,
        det_weight_bbox: float = 5.0,
        det_weight_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        deep_supervision: bool = True,
        box_free: bool = False,
        dynamic_things_stuff_weight: bool = True,
    ):
        super().__init__()
        if num_thing_classes < 1:
            raise ValueError(f"num_thing_classes must be >= 1, got {num_thing_classes}")
        if num_stuff_classes < 0:
            raise ValueError(f"num_stuff_classes must be >= 0, got {num_stuff_classes}")
        if not isinstance(matcher, HungarianMatcher):
            raise ValueError(f"matcher must be a HungarianMatcher, got {type(matcher).__name__}")
        if matcher.box_free != bool(box_free):
            raise ValueError(f"matcher.box_free={matcher.box_free} disagrees with box_free={box_free}")
        self.num_thing_classes = int(num_thing_classes)
        self.num_stuff_classes = int(num_stuff_classes)
        self.matcher = matcher
        self.loss_weight_cls = float(loss_weight_cls)
        self.loss_weight_seg = float(loss_weight_seg)
        self.loss_weight_det = float(loss_weight_det)
        self.det_weight_class = float(det_weight_class)
        self.det_weight_bbox = float(det_weight_bbox)
        self.det_weight_giou = float(det_weight_giou)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.deep_supervision = bool(deep_supervision)
        self.box_free = bool(box_free)
        self.dynamic_things_stuff_weight = bool(dynamic_things_stuff_weight)

    # ------------------------------------------------------------------ targets
    def things_stuff_weights(
        self, targets: List[Dict[str, Tensor]], num_stuff_present: Sequence[int] = None
    ) -> Tuple[Tensor, Tensor]:
        """Per-image lambda_things and lambda_stuff of Eq. 3 (App. A.1: set from the relative proportion of
        things and stuff in each image, summing to 1).

        With ``n_th`` = number of thing segments (``len(labels)``) and ``n_st`` = number of distinct stuff
        classes present (``len(unique(stuff_labels))``, one segment per class in COCO panoptic):
        ``lambda_things = n_th / (n_th + n_st)``, ``lambda_stuff = n_st / (n_th + n_st)``. An image with no
        annotated segment gets 1/2 and 1/2, so it still trains every thing query towards "no object" and every
        stuff query as a negative (a zero weight would make such images no-ops). With ``dynamic_things_stuff_weight=False`` both are 1 for every image.

        Args:
            targets: as in :meth:`forward`.
            num_stuff_present: optional per-image ``n_st`` when the caller knows it (no host-device sync);
                otherwise it is counted with ``torch.unique`` (one sync per image on a GPU).

        Returns:
            two (N,) float32 tensors (on the device of ``targets[0]["labels"]``, CPU for an empty batch).
        """
        device = targets[0]["labels"].device if targets else torch.device("cpu")
        n = len(targets)
        if not self.dynamic_things_stuff_weight:
            return torch.ones(n, device=device), torch.ones(n, device=device)
        n_th = _host_values([float(t["labels"].numel()) for t in targets], device)
        if num_stuff_present is None:
            num_stuff_present = [
                torch.unique(t["stuff_labels"]).numel() if "stuff_labels" in t else 0 for t in targets
            ]
        n_st = _host_values([float(c) for c in num_stuff_present], device)
        total = n_th + n_st
        safe = total.clamp(min=1.0)
        return torch.where(total > 0, n_th / safe, 0.5), torch.where(total > 0, n_st / safe, 0.5)

    def prepare_targets(
        self,
        targets: List[Dict[str, Tensor]],
        mask_size: Sequence[int],
        device: torch.device,
        thing_query_index: Tensor = None,
        num_queries: int = 0,
    ) -> List[Dict[str, Tensor]]:
        """Validate targets and bring them to the prediction resolution.

        Returns per image: ``"labels"`` (M,) long; ``"boxes"`` (M, 4) float (box-based) or ``"centers"``
        (M, 2) mass centres (box-free, from the full-resolution masks); ``"masks"`` (M, h, w) area-downsampled
        soft masks; ``"stuff_classes"`` (S,) sorted distinct present stuff classes and ``"stuff_masks"``
        (S, h, w) their soft masks (segments of one class are merged). One host-device sync in all.

        With ``thing_query_index``, also checks that it lies in ``[0, num_queries)`` in the same single host
        transfer.
        """
        stuff = []
        for i, t in enumerate(targets):
            for key in ("labels", "masks", "image_size"):
                if key not in t:
                    raise ValueError(f"targets[{i}] lacks '{key}'")
            labels, masks = t["labels"], t["masks"]
            if labels.dim() != 1 or labels.dtype != torch.long:
                raise ValueError(
                    f"targets[{i}]['labels'] must be (M,) long, got {tuple(labels.shape)} {labels.dtype}"
                )
            num = labels.numel()
            if masks.dim() != 3 or masks.shape[0] != num:
                raise ValueError(f"targets[{i}]['masks'] must be ({num}, Hp, Wp), got {tuple(masks.shape)}")
            if not self.box_free:
                boxes = t.get("boxes")
                if boxes is None or boxes.shape != (num, 4):
                    raise ValueError(
                        f"targets[{i}]['boxes'] must be ({num}, 4), got "
                        f"{None if boxes is None else tuple(boxes.shape)}"
                    )
            stuff_labels = t.get("stuff_labels", labels.new_zeros(0))
            stuff_masks = t.get("stuff_masks", masks.new_zeros((0, *masks.shape[-2:])))
            if stuff_labels.dim() != 1 or stuff_labels.dtype != torch.long:
                raise ValueError(
                    f"targets[{i}]['stuff_labels'] must be (M_s,) long, got "
                    f"{tuple(stuff_labels.shape)} {stuff_labels.dtype}"
                )
            if stuff_masks.dim() != 3 or stuff_masks.shape[0] != stuff_labels.numel():
                raise ValueError(
                    f"targets[{i}]['stuff_masks'] must be ({stuff_labels.numel()}, Hp, Wp), got "
                    f"{tuple(stuff_masks.shape)}"
                )
            stuff.append((stuff_labels, stuff_masks))

        # The one host transfer: the (small) label vectors of every image and the query-index range.
        extra = []
        if thing_query_index is not None and thing_query_index.numel():
            extra = [torch.stack(torch.aminmax(thing_query_index))]
        host = _to_host([t["labels"] for t in targets] + [sl for sl, _ in stuff] + extra)
        n = len(targets)
        if extra:
            lo, hi = host[-1]
            if lo < 0 or hi >= num_queries:
                raise ValueError(f"thing_query_index must lie in [0, {num_queries}), got [{int(lo)}, {int(hi)}]")
        classes_host, inverse_host = [], []
        for i in range(n):
            labels_h, stuff_h = host[i], host[n + i]
            if labels_h.size and (labels_h.min() < 0 or labels_h.max() >= self.num_thing_classes):
                raise ValueError(
                    f"targets[{i}]['labels'] must lie in [0, {self.num_thing_classes}), got "
                    f"[{int(labels_h.min())}, {int(labels_h.max())}]"
                )
            if stuff_h.size and (stuff_h.min() < 0 or stuff_h.max() >= self.num_stuff_classes):
                raise ValueError(
                    f"targets[{i}]['stuff_labels'] must lie in [0, {self.num_stuff_classes}), got "
                    f"[{int(stuff_h.min())}, {int(stuff_h.max())}]"
                )
            classes, inverse = np.unique(stuff_h.astype(np.int64), return_inverse=True)
            classes_host.append(classes)
            inverse_host.append(inverse.reshape(-1))
        on_device = _to_device(classes_host + inverse_host, device)

        prepared = []
        for i, t in enumerate(targets):
            labels, masks = t["labels"], t["masks"]
            out = {"labels": labels.to(device), "masks": downsample_masks(masks.to(device), mask_size)}
            if self.box_free:
                out["centers"] = mask_mass_centers(masks.to(device), t["image_size"])
            else:
                out["boxes"] = t["boxes"].to(device).float()
            classes, inverse = on_device[i], on_device[n + i]
            small = downsample_masks(stuff[i][1].to(device), mask_size)
            merged = small.new_zeros((classes.numel(), *small.shape[-2:]))
            merged.index_add_(0, inverse, small)
            out["stuff_classes"] = classes
            out["stuff_masks"] = merged.clamp_(max=1.0)
            prepared.append(out)
        return prepared

    # ------------------------------------------------------------------ outputs
    def _check_outputs(self, outputs: Dict, batch: int) -> Tuple[List[Tensor], List[Tensor], List[Dict]]:
        if batch < 1:
            raise ValueError("targets must hold at least one image")
        location = outputs.get("location")
        location = {} if location is None else location
        logits_list = [] if location.get("pred_logits") is None else list(location["pred_logits"])
        boxes_list = [] if location.get("pred_boxes") is None else list(location["pred_boxes"])
        if len(logits_list) != len(boxes_list):
            raise ValueError(
                f"location pred_logits and pred_boxes have {len(logits_list)} and {len(boxes_list)} layers"
            )
        loc_dim = 2 if self.box_free else 4
        for l, (lg, bx) in enumerate(zip(logits_list, boxes_list)):
            if lg.dim() != 3 or lg.shape[0] != batch or lg.shape[2] != self.num_thing_classes:
                raise ValueError(
                    f"location pred_logits[{l}] must be ({batch}, Q_all, {self.num_thing_classes}), "
                    f"got {tuple(lg.shape)}"
                )
            if bx.shape != (*lg.shape[:2], loc_dim):
                raise ValueError(
                    f"location pred_boxes[{l}] must be {(*lg.shape[:2], loc_dim)} "
                    f"(box_free={self.box_free}), "
                    f"got {tuple(bx.shape)}"
                )
        mask_layers = [] if outputs.get("mask") is None else list(outputs["mask"])
        if not mask_layers:
            raise ValueError("outputs['mask'] must hold at least one mask-decoder layer")
        for i, layer in enumerate(mask_layers):
            tl, sl, pm = layer["thing_logits"], layer["stuff_logits"], layer["pred_masks"]
            if tl.dim() != 3 or tl.shape[0] != batch or tl.shape[2] != self.num_thing_classes:
                raise ValueError(
                    f"mask[{i}]['thing_logits'] must be ({batch}, Q_th, {self.num_thing_classes}), "
                    f"got {tuple(tl.shape)}"
                )
            if sl.shape != (batch, self.num_stuff_classes):
                raise ValueError(
                    f"mask[{i}]['stuff_logits'] must be ({batch}, {self.num_stuff_classes}), "
                    f"got {tuple(sl.shape)}"
                )
            q_total = tl.shape[1] + self.num_stuff_classes
            if pm.dim() != 4 or pm.shape[:2] != (batch, q_total):
                raise ValueError(
                    f"mask[{i}]['pred_masks'] must be ({batch}, Q_th + Q_st = {q_total}, h, w), "
                    f"got {tuple(pm.shape)}"
                )
            if (
                tl.shape[1] != mask_layers[-1]["thing_logits"].shape[1]
                or pm.shape[-2:] != mask_layers[-1]["pred_masks"].shape[-2:]
            ):
                raise ValueError("all mask-decoder layers must share Q_th and the mask size (h, w)")
        return logits_list, boxes_list, mask_layers

    def _thing_query_boxes(self, outputs: Dict, boxes_last: Tensor, num_thing_queries: int) -> Tensor:
        """Final location-decoder boxes of the queries fed to the mask decoder: (N, Q_th, 4|2)."""
        index = outputs.get("thing_query_index")
        batch, q_all = boxes_last.shape[:2]
        if index is None:
            if num_thing_queries != q_all:
                raise ValueError(
                    f"outputs lacks 'thing_query_index' but Q_th={num_thing_queries} != Q_all={q_all}"
                )
            return boxes_last
        if index.shape != (batch, num_thing_queries) or index.dtype != torch.long:
            raise ValueError(
                f"thing_query_index must be ({batch}, {num_thing_queries}) long, "
                f"got {tuple(index.shape)} {index.dtype}"
            )
        # Its value range was checked by prepare_targets (in the transfer that validates the targets).
        return torch.gather(boxes_last, 1, index[..., None].expand(-1, -1, boxes_last.shape[-1]))

    # ------------------------------------------------------------------ matching
    def _thing_match_inputs(self, outputs: Dict, boxes_list: List[Tensor], mask_layers: List[Dict]) -> Dict:
        """Matcher inputs of the single thing assignment of Eq. 4: the last mask-decoder layer's classes and
        masks, and the final location-decoder boxes of the queries fed to the mask decoder."""
        last = mask_layers[-1]
        num_thing_queries = last["thing_logits"].shape[1]
        match_inputs = {
            "pred_logits": last["thing_logits"].detach(),
            "pred_masks": last["pred_masks"][:, :num_thing_queries].detach(),
        }
        if boxes_list:
            match_inputs["pred_boxes"] = self._thing_query_boxes(
                outputs, boxes_list[-1].detach(), num_thing_queries
            )
        return match_inputs

    def match_things(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """The single thing assignment of Eq. 4 used by every mask-decoder layer.

        Returns:
            per image ``(query_idx, gt_idx)``: indices into the Q_th mask-decoder thing queries and into
            ``targets[n]["labels"]``.
        """
        logits_list, boxes_list, mask_layers = self._check_outputs(outputs, len(targets))
        pm = mask_layers[-1]["pred_masks"]
        prepared = self.prepare_targets(targets, pm.shape[-2:], pm.device, *self._index_check(outputs, boxes_list))
        return self.matcher.match_many([self._thing_match_inputs(outputs, boxes_list, mask_layers)], prepared)[0]

    @staticmethod
    def _index_check(outputs: Dict, boxes_list: List[Tensor]) -> Tuple:
        """(thing_query_index, Q_all) to validate in :meth:`prepare_targets`, or () without an index."""
        index = outputs.get("thing_query_index")
        if index is None or not boxes_list:
            return ()
        return index, boxes_list[-1].shape[1]

    # ------------------------------------------------------------------ losses
    def _focal_per_image(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Sigmoid focal loss summed over all but the batch dimension: (N, ...) -> (N,)."""
        loss = sigmoid_focal_loss(logits.float(), targets.float(), self.focal_alpha, self.focal_gamma, "none")
        return loss.flatten(1).sum(-1)

    @staticmethod
    def _pairs(
        indices: List[Tuple[Tensor, Tensor]], prepared: List[Dict[str, Tensor]], device: torch.device
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Matched pairs of the batch: (P,) image, query and ground-truth indices and the (P,) thing labels."""
        batch_idx = torch.cat([torch.full_like(q, n) for n, (q, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([q for q, _ in indices]).to(device)
        gt_idx = torch.cat([g for _, g in indices]).to(device)
        labels = torch.cat([p["labels"][g.to(device)] for p, (_, g) in zip(prepared, indices)])
        return batch_idx, query_idx, gt_idx, labels

    @staticmethod
    def _one_hot_targets(shape: Tuple[int, ...], batch_idx, query_idx, labels, device) -> Tensor:
        target = torch.zeros(shape, device=device)
        if batch_idx.numel():
            target[batch_idx, query_idx, labels] = 1.0
        return target

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """Compute all weighted loss terms.

        Args:
            outputs: ``{"location": {"pred_logits": [(N, Q_all, K_th)] * L,
                "pred_boxes": [(N, Q_all, 4|2)] * L},
                "thing_query_index": (N, Q_th) long, "mask": [{"thing_logits": (N, Q_th, K_th),
                "stuff_logits": (N, Q_st), "pred_masks": (N, Q_th + Q_st, h, w)}] * D_m}``.
            targets: N dicts: ``"labels"`` (M,) long, ``"boxes"`` (M, 4) normalized cxcywh, ``"masks"``
                (M, Hp, Wp) bool, ``"stuff_labels"`` (M_s,) long, ``"stuff_masks"`` (M_s, Hp, Wp) bool,
                ``"image_size"`` (H, W).
        Returns:
            dict of scalar float32 tensors: ``loss_det_{cls,bbox,giou}_{l}`` (``loss_det_{cls,center}_{l}``
            when box-free) per location layer l, and ``loss_{things,stuff}_{cls,mask}_{i}`` per mask layer i
            (only the last layer of each decoder without deep supervision). Their sum is Eq. 3.
        """
        batch = len(targets)
        logits_list, boxes_list, mask_layers = self._check_outputs(outputs, batch)
        last_masks = mask_layers[-1]["pred_masks"]
        device = last_masks.device
        num_thing_queries = mask_layers[-1]["thing_logits"].shape[1]
        losses: Dict[str, Tensor] = {}
        with torch.autocast(device_type=device.type, enabled=False):
            prepared = self.prepare_targets(
                targets, last_masks.shape[-2:], device, *self._index_check(outputs, boxes_list)
            )  # host-device sync 1 of 2
            lam_things, lam_stuff = (
                w.to(device)
                for w in self.things_stuff_weights(targets, [p["stuff_classes"].numel() for p in prepared])
            )

            det_layers = range(len(logits_list)) if self.deep_supervision else range(len(logits_list))[-1:]
            # Every matching of the step (each supervised location-decoder layer, then the thing assignment
            # of Eq. 4) in one call: host-device sync 2 of 2.
            matches = self.matcher.match_many(
                [{"pred_logits": logits_list[l].detach(), "pred_boxes": boxes_list[l].detach()} for l in det_layers]
                + [self._thing_match_inputs(outputs, boxes_list, mask_layers)],
                prepared,
            )
            det_indices = dict(zip(det_layers, matches[:-1]))
            thing_indices = matches[-1]
            counts = _host_values(
                [
                    float(sum(p["labels"].numel() for p in prepared)),
                    float(sum(p["stuff_classes"].numel() for p in prepared)),
                    float(sum(q.numel() for q, _ in thing_indices)),
                ],
                device,
            )
            num_things, num_stuff, num_matched = _reduce_normalizers(counts).unbind()

            # L_det (Eq. 4): Deformable DETR loss on each location-decoder layer.
            for l in det_layers:
                losses.update(
                    self._det_losses(
                        l, logits_list[l], boxes_list[l], det_indices[l], prepared, lam_things, num_things
                    )
                )

            # Mask-decoder things (Eq. 4) and stuff (Eq. 5) with deep supervision.
            thing_pairs = self._pairs(thing_indices, prepared, device)
            # Ground-truth masks of the matched pairs: the same for every mask-decoder layer.
            thing_targets = torch.cat([p["masks"][g.to(device)] for p, (_, g) in zip(prepared, thing_indices)])
            mask_ids = range(len(mask_layers)) if self.deep_supervision else range(len(mask_layers))[-1:]
            for i in mask_ids:
                layer = mask_layers[i]
                losses.update(
                    self._thing_losses(
                        i,
                        layer,
                        thing_pairs,
                        thing_targets,
                        lam_things,
                        num_things,
                        num_matched,
                        num_thing_queries,
                    )
                )
                if self.num_stuff_classes:  # no stuff queries in the joint-matching baseline
                    losses.update(self._stuff_losses(i, layer, prepared, lam_stuff, num_stuff, num_thing_queries))
            # Outputs no term supervises (the layers before the last without deep supervision; stuff
            # logits without stuff queries) join the last term with weight 0: every parameter gets a
            # gradient, as DistributedDataParallel (without find_unused_parameters) requires.
            unsupervised = [t for l in range(len(logits_list)) if l not in det_indices
                            for t in (logits_list[l], boxes_list[l])]
            unsupervised += [layer[k] for i, layer in enumerate(mask_layers) if i not in mask_ids
                             for k in ("thing_logits", "stuff_logits", "pred_masks")]
            if not self.num_stuff_classes:
                unsupervised += [layer["stuff_logits"] for i, layer in enumerate(mask_layers) if i in mask_ids]
            if unsupervised:
                last = f"loss_things_mask_{mask_ids[-1]}"
                losses[last] = losses[last] + _zero_graph(*unsupervised)
        return losses

    def _det_losses(self, l, logits, boxes, indices, prepared, lam_things, num_things) -> Dict[str, Tensor]:
        device = logits.device
        b, q, _, labels = self._pairs(indices, prepared, device)
        target = self._one_hot_targets(tuple(logits.shape), b, q, labels, device)
        cls = (self._focal_per_image(logits, target) * lam_things).sum() / num_things
        w = self.loss_weight_det
        out = {f"loss_det_cls_{l}": w * self.det_weight_class * cls}
        src = boxes[b, q].float()
        pair_w = lam_things[b]
        keep = _zero_graph(boxes)
        if self.box_free:
            tgt = torch.cat([p["centers"][gt_idx] for p, (_, gt_idx) in zip(prepared, indices)]).to(device)
            center = ((src - tgt).abs().sum(-1) * pair_w).sum() / num_things
            out[f"loss_det_center_{l}"] = w * self.det_weight_bbox * center + keep
        else:
            tgt = torch.cat([p["boxes"][gt_idx] for p, (_, gt_idx) in zip(prepared, indices)]).to(device)
            l1 = ((src - tgt).abs().sum(-1) * pair_w).sum() / num_things
            giou = paired_giou_loss(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))
            giou = (giou * pair_w).sum() / num_things
            out[f"loss_det_bbox_{l}"] = w * self.det_weight_bbox * l1 + keep
            out[f"loss_det_giou_{l}"] = w * self.det_weight_giou * giou + keep
        return out

    def _thing_losses(
        self, i, layer, pairs, target_masks, lam_things, num_things, num_matched, num_thing_queries
    ) -> Dict[str, Tensor]:
        b, q, _, labels = pairs
        logits = layer["thing_logits"]
        target = self._one_hot_targets(tuple(logits.shape), b, q, labels, logits.device)
        cls = (self._focal_per_image(logits, target) * lam_things).sum() / num_things
        thing_masks = layer["pred_masks"][:, :num_thing_queries]
        if b.numel():
            seg = (dice_loss(thing_masks[b, q], target_masks) * lam_things[b]).sum() / num_matched
        else:
            seg = thing_masks.new_zeros((), dtype=torch.float32)
        return {
            f"loss_things_cls_{i}": self.loss_weight_cls * cls,
            f"loss_things_mask_{i}": self.loss_weight_seg * seg + _zero_graph(thing_masks),
        }

    def _stuff_losses(self, i, layer, prepared, lam_stuff, num_stuff, num_thing_queries) -> Dict[str, Tensor]:
        logits = layer["stuff_logits"]
        device = logits.device
        present = torch.zeros(logits.shape, device=device)
        b = torch.cat([torch.full_like(p["stuff_classes"], n) for n, p in enumerate(prepared)])
        k = torch.cat([p["stuff_classes"] for p in prepared])
        present[b, k] = 1.0
        cls = (self._focal_per_image(logits, present) * lam_stuff).sum() / num_stuff
        stuff_masks = layer["pred_masks"][:, num_thing_queries:]
        if b.numel():
            tgt = torch.cat([p["stuff_masks"] for p in prepared])
            seg = (dice_loss(stuff_masks[b, k], tgt) * lam_stuff[b]).sum() / num_stuff
        else:
            seg = stuff_masks.new_zeros((), dtype=torch.float32)
        return {
            f"loss_stuff_cls_{i}": self.loss_weight_cls * cls,
            f"loss_stuff_mask_{i}": self.loss_weight_seg * seg + _zero_graph(stuff_masks),
        }
