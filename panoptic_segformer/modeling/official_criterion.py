"""The released code's training objective (``MODEL.PANOPTIC_SEGFORMER.CRITERION: "official"``).

What ``PanformerHead.loss`` / ``loss_single_panoptic`` of zhiqi-li/Panoptic-SegFormer (commit cdb9b68,
``easymd/models/panformer/panformer_head.py``, "head" below; ``tools.py``; ``configs/panformer/base.py``,
"cfg") compute, on the outputs of :class:`~.official_mask_decoder.OfficialMaskDecoder`. The paper-text
objective stays :class:`~.criterion.PanopticSegFormerCriterion`; this class reuses its target checks,
its location-decoder terms (:meth:`~.criterion.PanopticSegFormerCriterion._det_losses`), the Hungarian
matcher (:class:`~.matcher.HungarianMatcher`, scipy), fvcore's sigmoid focal loss and the Dice helpers
(:func:`~.criterion.dice_loss`, :func:`~.matcher.downsample_masks`) with the official options.

Terms (names: ours <- theirs), ``r_th`` / ``r_st`` the things / stuff ratios below:

* ``loss_det_{cls,bbox,giou}_{l}``, l = 0..L-1 <- ``d{l}.loss_{cls,bbox,iou}`` and, for the last layer,
  ``loss_{cls,bbox,iou}``: focal (x DET_CLASS_WEIGHT 2) over all queries, L1 (x 5) and GIoU (x 2) of the
  matched queries, each layer with its own Hungarian match (cfg:96-101; the last layer's is the query
  filter's first round, tools.py:281-293, the same plain match), normalised by the batch's matched count
  averaged over processes and clamped to >= 1 (detr_head.py:381-393, head:614-634), x ``r_th`` (head:390-414).
* ``loss_things_mask_{j}``, j = 0..D_th (D_th = the tail) <- ``d{j}.loss_mask_things_f`` / ``loss_mask_things``:
  Dice (x MASK_WEIGHT 2, eps 1e-6 on each sum, the ReLU masks as they are, easymd/models/losses/dice_loss.py:35-49)
  of the masks of the filtered queries matched by the mask-decoder matcher, upsampled x2 bilinearly to 1/4,
  against the ground truth bilinearly resampled to that size (head:891-903, 925-938), / n_th, x ``r_th``.
* ``loss_stuff_mask_{j}``, j = 0..D_st (D_st = the tail) <- ``d{j}.loss_mask_stuff_f`` / ``loss_mask_stuff``:
  the same for the stuff queries of the stuff classes present (``mask_weight_stuff``, head:864-873, 904-918,
  959-968), / n_st, x ``r_st``.
* ``loss_stuff_cls_{j}``, j = 0..D_st-1 <- ``d{j}.loss_cls_stuff_f``: focal of each stuff query's logit
  (present class = positive) x CLASS_WEIGHT x 2 (the loss_weight 2 of cfg:82-87 and the extra ``* 2`` of
  head:991-994), / n_st, x ``r_st``. The blocks only: the tail has no class FC.
* ``loss_things_cls_{j}``, j = 0..D_th-1 <- ``d{j}.loss_cls_f``: x 0 (head:972-984), kept in the graph so
  the thing class FCs get (zero) gradients as theirs do. Their ``d{j}.loss_{bbox,iou}_f`` (x 0, head:944-957)
  supervise ``reg_branches2``, which this model does not have (the converter drops it): no term.

Counts and ratios (head:632-634, 888-890, 998-1000): ``n_th`` = the number of queries the query filter
keeps in the batch (``min(M_th, Q)`` per image with one round), ``n_st`` = the number of stuff ground
truths of the batch, each averaged over processes (``reduce_mean``, here an all-reduce, as
:func:`~.criterion._reduce_normalizers`) and clamped to >= 1; ``r_th = n_th / (n_th + n_st)``,
``r_st = n_st / (n_th + n_st)``: one pair for the whole (multi-process) batch, 1 / (1 + n_st) for things in
a batch without things. ``dynamic_things_stuff_weight=False`` sets both to 1.

Mask-decoder matching (``HungarianAssigner_multi_info``, tools.py:304-446): among each image's filtered
queries, cost = focal class cost x 2 x COST_CLASS (its constructor doubles the configured weight,
tools.py:339) on the LOCATION decoder's last-layer logits of those queries (head:816-818) + L1 x COST_BBOX +
GIoU x COST_GIOU on their last-layer boxes + Dice x COST_MASK between the thing tail's masks at 1/8 and the
ground truth bilinearly resampled to 1/8 (eps 1e-3 on each sum, ``DiceCost``); one match for every layer.

Zero terms (released behaviour): without a filtered thing query in the (per-process) batch the thing Dice
terms are 0 (head:891-892, 925-926) and so is every ``loss_stuff_cls_{j}``: head:988 tests ``cls_scores``,
the variable of the thing loop (the last thing block's logits of the filtered queries), instead of the
stuff logits. ``stuff_class_loss_without_things=True`` (``OFFICIAL_LOSS.STUFF_CLASS_LOSS_WITHOUT_THINGS``)
gives the intended behaviour: the stuff class loss in every batch. Without stuff the stuff Dice terms are 0.

Differences kept (numerically below 1e-6 relative on real data): GIoU in normalised instead of pixel
coordinates (eps 1e-7 instead of 1e-6), focal costs with exact logs (``softplus``) instead of
``log(p + 1e-12)``; stuff segments of one class are merged (the dataset mapper merges them; the official
head would keep the last one, head:864-873), which COCO panoptic never exercises (one segment per class).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .criterion import PanopticSegFormerCriterion, _host_values, _reduce_normalizers, _zero_graph, dice_loss
from .matcher import HungarianMatcher, _solve, _to_device, _to_host, downsample_masks

__all__ = ["OfficialCriterion", "OFFICIAL_DICE_EPS", "OFFICIAL_DICE_COST_EPS"]

#: eps of the official ``DiceLoss`` (its default; cfg:90 sets only the weight), added to each sum.
OFFICIAL_DICE_EPS = 1e-6
#: eps of the official ``DiceCost`` (match_cost.py:88-89), added to each sum.
OFFICIAL_DICE_COST_EPS = 1e-3


class OfficialCriterion(PanopticSegFormerCriterion):
    """The official training objective (module docstring) with this project's output format.

    Args:
        num_thing_classes, num_stuff_classes: K_th, K_st (query decoupling).
        matcher: the location decoder's matcher (cfg:96-101: focal 2, L1 5, GIoU 2).
        mask_matcher: the mask decoder's matcher (:meth:`official_mask_matcher`).
        loss_weight_det, det_weight_class, det_weight_bbox, det_weight_giou: location-decoder terms.
        loss_weight_seg: Dice weight of every mask term (official 2).
        loss_weight_cls: the stuff class loss weight before the official extra x 2 (official 2 -> 4).
        focal_alpha, focal_gamma: focal-loss parameters (official 0.25, 2).
        dynamic_things_stuff_weight: the r_th / r_st ratios (official True); False: 1 and 1.
        stuff_class_loss_without_things: False = the released behaviour (head:988, no stuff class loss in a
            batch without filtered thing queries); True = the intended one.
    """

    official = True

    def __init__(self, num_thing_classes: int, num_stuff_classes: int, matcher: HungarianMatcher,
                 mask_matcher: HungarianMatcher, loss_weight_cls: float = 2.0, loss_weight_seg: float = 2.0,
                 loss_weight_det: float = 1.0, det_weight_class: float = 2.0, det_weight_bbox: float = 5.0,
                 det_weight_giou: float = 2.0, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 dynamic_things_stuff_weight: bool = True, stuff_class_loss_without_things: bool = False):
        super().__init__(num_thing_classes, num_stuff_classes, matcher, loss_weight_cls=loss_weight_cls,
                         loss_weight_seg=loss_weight_seg, loss_weight_det=loss_weight_det,
                         det_weight_class=det_weight_class, det_weight_bbox=det_weight_bbox,
                         det_weight_giou=det_weight_giou, focal_alpha=focal_alpha, focal_gamma=focal_gamma,
                         deep_supervision=True, box_free=False,
                         dynamic_things_stuff_weight=dynamic_things_stuff_weight)
        if num_stuff_classes < 1:
            raise ValueError("the official criterion needs stuff queries (query decoupling), got 0 stuff classes")
        if not isinstance(mask_matcher, HungarianMatcher) or mask_matcher.box_free:
            raise ValueError("mask_matcher must be a box-based HungarianMatcher")
        self.mask_matcher = mask_matcher
        self.stuff_class_loss_without_things = bool(stuff_class_loss_without_things)
        self.last_matches: Dict = {}

    @staticmethod
    def official_mask_matcher(cost_class: float, cost_bbox: float, cost_giou: float, cost_mask: float,
                              focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> HungarianMatcher:
        """``HungarianAssigner_multi_info`` with the configured weights: class weight doubled (tools.py:339),
        Dice on the masks as they are, targets resampled bilinearly, eps 1e-3 on each sum (``DiceCost``)."""
        return HungarianMatcher(cost_class=2.0 * cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou,
                                cost_mask=cost_mask, focal_alpha=focal_alpha, focal_gamma=focal_gamma,
                                mask_sigmoid=False, mask_resize="bilinear", dice_eps=OFFICIAL_DICE_COST_EPS,
                                dice_eps_each=True)

    # ------------------------------------------------------------------ outputs
    def _official_outputs(self, outputs: Dict, batch: int):
        logits_list, boxes_list, mask_layers = self._check_outputs(outputs, batch)
        layers = mask_layers[-1].get("official_layers")
        if layers is None:
            raise ValueError("outputs['mask'][-1] lacks 'official_layers': the official criterion trains "
                             "MASK_DECODER_TYPE 'official' (run in training mode)")
        if not logits_list:
            raise ValueError("the official criterion needs location-decoder layers (query filter)")
        index = outputs.get("thing_query_index")
        q_th = layers["thing_masks"][-1].shape[1]
        if index is None or index.shape != (batch, q_th):
            raise ValueError(f"thing_query_index must be ({batch}, {q_th}) (the filtered queries), got "
                             f"{None if index is None else tuple(index.shape)}")
        valid = outputs.get("thing_query_valid")
        if valid is None:
            valid = torch.ones_like(index, dtype=torch.bool)
        return logits_list, boxes_list, layers, index, valid

    # ------------------------------------------------------------------ matching
    @torch.no_grad()
    def _match_mask_decoder(self, logits_last: Tensor, boxes_last: Tensor, thing_tail: Tensor, index: Tensor,
                            valid: Tensor, prepared: List[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """``HungarianAssigner_multi_info`` per image among its filtered queries: (position in the Q' axis,
        gt index) pairs, positions ascending. One device-to-host transfer for the batch."""
        device = thing_tail.device
        costs, rows_of = [], []
        for i, target in enumerate(prepared):
            pos = valid[i].nonzero().squeeze(1)
            q = index[i, pos]
            costs.append(self.mask_matcher.cost_matrix(
                target, pred_logits=logits_last[i, q], pred_boxes=boxes_last[i, q],
                pred_masks=thing_tail[i, pos], check_labels=False))
            rows_of.append(pos)
        host = _to_host(costs)
        pairs = []
        for cost in host:
            if cost.size:
                r, c = _solve(cost)
            else:
                r = c = np.zeros(0, dtype=np.int64)
            pairs.extend((r, c))
        back = _to_device(pairs, device)
        return [(rows_of[i][back[2 * i]], back[2 * i + 1]) for i in range(len(prepared))]

    # ------------------------------------------------------------------ losses
    def _dice_terms(self, masks: Tensor, targets: Tensor) -> Tensor:
        """Official Dice of paired 1/8 masks (P, h, w), upsampled x2 bilinearly, against (P, 2h, 2w)
        targets (head:893-903): (P,) per-mask loss."""
        if masks.shape[0] == 0:
            return masks.new_zeros((0,), dtype=torch.float32)
        up = F.interpolate(masks.float()[None], scale_factor=2.0, mode="bilinear", align_corners=False)[0]
        return dice_loss(up, targets, OFFICIAL_DICE_EPS, sigmoid=False, eps_each=True)

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """All weighted loss terms (module docstring). ``outputs``: as for the paper criterion plus
        "thing_query_valid" (N, Q') (False at padding) and the last mask layer's "official_layers"
        (:meth:`OfficialMaskDecoder.forward`); ``targets``: as for the paper criterion (full-resolution
        masks). Also leaves the matches in ``self.last_matches`` ("location": per layer, per image
        (query, gt); "mask_decoder": per image (position among the filtered queries, gt) and
        "mask_decoder_query": (query index, gt))."""
        batch = len(targets)
        logits_list, boxes_list, layers, index, valid = self._official_outputs(outputs, batch)
        thing_tail = layers["thing_masks"][-1]
        device = thing_tail.device
        losses: Dict[str, Tensor] = {}
        with torch.autocast(device_type=device.type, enabled=False):
            full_size = targets[0]["masks"].shape[-2:]
            # Full-resolution float targets (no resampling: mask_size = their own size); host sync 1.
            prepared = self.prepare_targets(targets, full_size, device)
            h, w = thing_tail.shape[-2:]
            det_layers = range(len(logits_list))
            matches = self.matcher.match_many(
                [{"pred_logits": logits_list[l].detach(), "pred_boxes": boxes_list[l].detach()} for l in det_layers],
                prepared)  # host sync 2
            mask_pairs = self._match_mask_decoder(logits_list[-1].detach(), boxes_list[-1].detach(),
                                                  thing_tail.detach(), index, valid, prepared)  # host sync 3
            self.last_matches = {
                "location": [[(q.cpu(), g.cpu()) for q, g in m] for m in matches],
                "mask_decoder": [(p.cpu(), g.cpu()) for p, g in mask_pairs],
                "mask_decoder_query": [(index[i, p].cpu(), g.cpu()) for i, (p, g) in enumerate(mask_pairs)],
            }
            # n_th: the queries of the filter's first round (= the last layer's plain match, head:632-634;
            # with more rounds the later ones reach the mask decoder but do not count), n_st: stuff gts.
            counts = _host_values([float(sum(q.numel() for q, _ in matches[-1])),
                                   float(sum(t["stuff_labels"].numel() for t in targets if "stuff_labels" in t))],
                                  device)
            n_th, n_st = _reduce_normalizers(counts).unbind()
            if self.dynamic_things_stuff_weight:
                r_th, r_st = n_th / (n_th + n_st), n_st / (n_th + n_st)
            else:
                r_th = r_st = torch.ones((), device=device)
            lam_th = r_th.expand(batch)
            # Location decoder: every layer, normalised by its matched count (= n_th: each plain Hungarian
            # match pairs min(M_th, Q) queries per image, as the filter's first round does).
            for l in det_layers:
                losses.update(self._det_losses(l, logits_list[l], boxes_list[l], matches[l], prepared, lam_th, n_th))

            # Thing masks: the filtered queries matched by the mask-decoder matcher, every block + tail.
            b = torch.cat([torch.full_like(p, i) for i, (p, _) in enumerate(mask_pairs)])
            p = torch.cat([pp for pp, _ in mask_pairs])
            thing_tgt = torch.cat([downsample_masks(prep["masks"][g], (2 * h, 2 * w), "bilinear")
                                   for prep, (_, g) in zip(prepared, mask_pairs)])
            for j, masks in enumerate(layers["thing_masks"]):
                seg = self._dice_terms(masks[b, p], thing_tgt).sum() / n_th
                losses[f"loss_things_mask_{j}"] = self.loss_weight_seg * seg * r_th + _zero_graph(masks)
            for j, logits in enumerate(layers["thing_logits"]):  # x 0 (head:972-984)
                losses[f"loss_things_cls_{j}"] = _zero_graph(logits)

            # Stuff masks (present classes) and stuff class logits (blocks only).
            sb = torch.cat([torch.full_like(prep["stuff_classes"], i) for i, prep in enumerate(prepared)])
            sk = torch.cat([prep["stuff_classes"] for prep in prepared])
            stuff_tgt = torch.cat([downsample_masks(prep["stuff_masks"], (2 * h, 2 * w), "bilinear")
                                   for prep in prepared])
            for j, masks in enumerate(layers["stuff_masks"]):
                seg = self._dice_terms(masks[sb, sk], stuff_tgt).sum() / n_st
                losses[f"loss_stuff_mask_{j}"] = self.loss_weight_seg * seg * r_st + _zero_graph(masks)
            # head:988 reads the thing loop's logits: no stuff class loss without a filtered thing query.
            stuff_cls_on = self.stuff_class_loss_without_things or index.shape[1] > 0
            for j, logits in enumerate(layers["stuff_logits"]):
                if stuff_cls_on:
                    present = torch.zeros(logits.shape, device=device)
                    present[sb, sk] = 1.0
                    cls = self._focal_per_image(logits, present).sum() / n_st
                    losses[f"loss_stuff_cls_{j}"] = self.loss_weight_cls * 2.0 * cls * r_st
                else:
                    losses[f"loss_stuff_cls_{j}"] = _zero_graph(logits)
            # The inference-format outputs of the last layer join with weight 0 (DDP: every output in the graph).
            last = outputs["mask"][-1]
            losses["loss_stuff_mask_0"] = losses["loss_stuff_mask_0"] + _zero_graph(
                last["thing_logits"], last["stuff_logits"], last["pred_masks"])
        return losses
