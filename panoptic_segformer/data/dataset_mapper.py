"""Dataset mapper of Panoptic SegFormer: a Detectron2 dataset dict in the COCO panoptic format
(`load_coco_panoptic_json`) -> model inputs.

Training targets:
- ``instances``: one entry per *thing* segment (``gt_classes`` contiguous ids, ``gt_masks``
  BitMasks, ``gt_boxes`` from the masks after augmentation);
- ``stuff``: one entry per *stuff class* present (all segments of a stuff class merged, the
  class-fixed assignment of Sec. 3.3.1), with ``gt_classes`` and ``gt_masks``.
Crowd segments (``iscrowd=1``) and void pixels (id 0) are in neither: as in COCO's evaluation they
are ignored, i.e. they only act as background for the masks. Segments emptied by a crop are dropped.

Augmentations (Sec. 4.1 / Appendix A.1; ``INPUT.AUGMENTATION: "paper"``): random horizontal flip;
multi-scale resize (short side 480-800, long side <= 1333); with probability ``INPUT.DETR_CROP_PROB`` a
DETR-style crop (short side to 400/500/600, random crop 384-600, then the multi-scale resize). Test: resize
to 800/1333, after an optional corruption of the image as read (``TEST.CORRUPTION``, Table 11; see
``.corruptions``).

``INPUT.AUGMENTATION: "official"``: the authors' released pipeline (``.official_augmentation``: mmdet's flip,
AutoAugment of the two policies, mmcv's cv2 resize and rounding, their crop; test: ``mmcv.imrescale`` to
1333 x 800) and their targets: boxes are the annotation boxes transformed with the image (not the masks'
tight boxes), a segment survives a crop iff its box does (possibly with an empty mask), crowd segments and
segments with a degenerate box are dropped, and stuff segments stay one target each (not merged per class).
"""
import copy
import logging

import cv2
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances

from ..utils import masks_to_boxes
from .corruptions import build_test_corruption
from .official_augmentation import (MmdetCropTransform, build_official_test_augmentation,
                                    build_official_train_augmentation, check_augmentation_config)
from .io import DatasetError, check_segments, read_image_rgb, read_panoptic_png

__all__ = ["PanopticSegFormerDatasetMapper", "target_instances"]

logger = logging.getLogger(__name__)


def one_opencv_thread_for_workers() -> None:
    """One OpenCV thread in this process and in the DataLoader workers it forks from now on.

    PyTorch gives its workers one torch thread, but OpenCV's resize/warp keep a pool as large as the
    machine's core count in every worker, on top of the training process's own threads: on a small or
    busy machine the oversubscribed pools made training several times slower than with
    ``OMP_NUM_THREADS=1`` (docs/BENCHMARKS.md). It must be called in the parent, *before* the workers are
    forked, which inherit the setting: ``cv2.setNumThreads`` inside a forked worker deadlocks once the
    parent's OpenCV pool has started (fork copies the idle pool's condition variable, and resizing the
    pool waits on it forever; tests/test_dataloader_threads.py reproduces it). The parent's torch threads
    are left alone; its own OpenCV work (none while workers map the data) becomes single-threaded.
    """
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


class PanopticSegFormerDatasetMapper:
    """Callable: dataset dict -> dict with "image" (3, H, W) uint8 tensor in INPUT.FORMAT, "height",
    "width", and in training "instances" (things) and "stuff" (per stuff class) Instances."""

    @configurable
    def __init__(
        self,
        is_train,
        *,
        augmentations,
        crop_augmentations,
        crop_prob,
        image_format,
        thing_ids,
        min_image_size=32,
        corruption=None,
        dataloader_workers=0,
        official_targets=False,
    ):
        """
        Args:
            is_train: produce training targets (and use training augmentations).
            augmentations: list of Augmentation applied when no crop is drawn.
            crop_augmentations: list of Augmentation applied with probability `crop_prob`.
            image_format: "RGB" or "BGR".
            thing_ids: set of contiguous category ids that are things (the rest are stuff).
            min_image_size: images smaller than this on either side are rejected.
            corruption: optional callable (image, dataset_dict, image_format) -> image applied to the
                image right after it is read (TEST.CORRUPTION, Table 11; see `.corruptions`).
            dataloader_workers: DATALOADER.NUM_WORKERS; with workers, building the mapper sets one OpenCV
                thread before they are forked (:func:`one_opencv_thread_for_workers`).
            official_targets: the authors' training targets (``INPUT.AUGMENTATION: "official"``, see
                :meth:`_official_targets`) instead of the paper-text ones.
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.crop_augmentations = T.AugmentationList(crop_augmentations) if crop_augmentations else None
        self.crop_prob = crop_prob
        self.image_format = image_format
        self.thing_ids = set(thing_ids)
        self.min_image_size = min_image_size
        self.corruption = corruption
        self.official_targets = bool(official_targets)
        if dataloader_workers > 0:
            one_opencv_thread_for_workers()
        logger.info(f"[PanopticSegFormerDatasetMapper] augmentations: {augmentations}; with "
                    f"probability {crop_prob}: {crop_augmentations}; corruption: {corruption}")

    @classmethod
    def from_config(cls, cfg, is_train=True):
        official = check_augmentation_config(cfg) == "official"
        if official:
            augs = (build_official_train_augmentation if is_train else build_official_test_augmentation)(cfg)
            crop_augs, crop_prob = [], 0.0
            dataset_names = cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST
        elif is_train:
            resize = T.ResizeShortestEdge(
                cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
            )
            flip = [T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                 vertical=cfg.INPUT.RANDOM_FLIP == "vertical")] \
                if cfg.INPUT.RANDOM_FLIP != "none" else []
            augs = flip + [resize]
            crop_augs = []
            if cfg.INPUT.CROP.ENABLED:
                crop_augs = flip + [
                    T.ResizeShortestEdge(cfg.INPUT.CROP_RESIZE_SHORT, sample_style="choice",
                                         **({"max_size": cfg.INPUT.CROP_RESIZE_MAX_SIZE}
                                            if cfg.INPUT.CROP_RESIZE_MAX_SIZE > 0 else {})),
                    T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE),
                    resize,
                ]
            crop_prob = cfg.INPUT.DETR_CROP_PROB if cfg.INPUT.CROP.ENABLED else 0.0
            dataset_names = cfg.DATASETS.TRAIN
        else:
            augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
            crop_augs, crop_prob = [], 0.0
            dataset_names = cfg.DATASETS.TEST
        corruption = build_test_corruption(cfg)
        thing_ids = set()
        for name in dataset_names:
            meta = MetadataCatalog.get(name)
            thing_ids |= set(getattr(meta, "thing_dataset_id_to_contiguous_id", {}).values())
        return {
            "is_train": is_train,
            "augmentations": augs,
            "crop_augmentations": crop_augs,
            "crop_prob": crop_prob,
            "image_format": cfg.INPUT.FORMAT,
            "thing_ids": thing_ids,
            "min_image_size": cfg.INPUT.MIN_IMAGE_SIZE,
            # Checked in training too, so that a bad TEST.CORRUPTION fails before training starts.
            "corruption": None if is_train else corruption,
            "dataloader_workers": cfg.DATALOADER.NUM_WORKERS,
            "official_targets": official and is_train,
        }

    def _read_ground_truth(self, dataset_dict, image):
        """The panoptic PNG as an (H, W) segment-id map, checked against the image size and the JSON
        segments. Checked in training AND at test time: the evaluator scores this ground truth, so
        it must be what training accepts. None at test time for a dict without annotation."""
        if "pan_seg_file_name" not in dataset_dict or "segments_info" not in dataset_dict:
            if self.is_train:
                raise DatasetError(f"{dataset_dict['file_name']}: no panoptic annotation "
                                   "('pan_seg_file_name', 'segments_info') in the dataset dict")
            return None
        pan_seg = read_panoptic_png(dataset_dict["pan_seg_file_name"])
        if pan_seg.shape != image.shape[:2]:
            raise DatasetError(
                f"{dataset_dict['pan_seg_file_name']}: panoptic PNG is {pan_seg.shape[::-1]} but "
                f"image {dataset_dict['file_name']} is {image.shape[1::-1]}"
            )
        check_segments(pan_seg, dataset_dict["segments_info"], dataset_dict["pan_seg_file_name"])
        return pan_seg

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_rgb(dataset_dict["file_name"], self.image_format, self.min_image_size)
        if self.corruption is not None:
            image = self.corruption(image, dataset_dict, self.image_format)
        utils.check_image_size(dataset_dict, image)
        pan_seg = self._read_ground_truth(dataset_dict, image)

        augs = self.augmentations
        if self.crop_augmentations is not None and np.random.rand() < self.crop_prob:
            augs = self.crop_augmentations
        aug_input = T.AugInput(image)
        transforms = augs(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("segments_info", None)
            dataset_dict.pop("pan_seg_file_name", None)
            return dataset_dict

        if self.official_targets:
            dataset_dict["instances"], dataset_dict["stuff"] = self._official_targets(
                dataset_dict.pop("segments_info"), pan_seg, transforms, image_shape)
            return dataset_dict
        # float64 holds every id exactly; Detectron2 resizes non-uint8 maps with torch (nearest).
        pan_seg = transforms.apply_segmentation(pan_seg.astype(np.float64)).astype(np.int64)
        thing_classes, thing_masks, stuff_masks = [], [], {}
        for seg in dataset_dict.pop("segments_info"):
            if seg.get("iscrowd", 0):
                continue
            mask = pan_seg == seg["id"]
            if not mask.any():
                continue  # cropped away
            category = seg["category_id"]
            if category in self.thing_ids:
                thing_classes.append(category)
                thing_masks.append(mask)
            elif category in stuff_masks:
                stuff_masks[category] |= mask
            else:
                stuff_masks[category] = mask
        dataset_dict["instances"] = target_instances(image_shape, thing_classes, thing_masks, with_boxes=True)
        stuff_classes = sorted(stuff_masks)
        dataset_dict["stuff"] = target_instances(
            image_shape, stuff_classes, [stuff_masks[c] for c in stuff_classes], with_boxes=False
        )
        return dataset_dict

    def _official_targets(self, segments_info, pan_seg, transforms, image_shape):
        """The authors' targets (easymd/datasets/coco_panoptic.py:154-172 and mmdet's transforms): one per
        segment in annotation order, things in "instances" and stuff in "stuff", each with ``gt_classes``,
        ``gt_masks`` and ``gt_boxes``.

        A segment enters unless it is a crowd, its area is <= 0, its box has ``w < 1`` or ``h < 1`` or does
        not intersect the image. Its box is the annotation box ``[x, y, x + w, y + h]`` (float32; computed
        from the mask, as COCO does, when the dict has no "bbox") transformed with the image by each
        transform's ``apply_box`` (mmdet's float32 arithmetic, clipped); after a crop it survives iff its
        box has positive width and height (``MmdetCropTransform.valid_boxes``), even if its mask is empty.
        Masks: the segment-id map through the transforms (nearest), compared with the segment's id.
        """
        height, width = pan_seg.shape
        kept, boxes = [], []
        for seg in segments_info:
            if seg.get("iscrowd", 0):
                continue
            if "bbox" in seg:
                x, y, w, h = seg["bbox"]
                area = seg.get("area", 1)
            else:
                ys, xs = np.nonzero(pan_seg == seg["id"])
                if xs.size == 0:
                    continue
                x, y = int(xs.min()), int(ys.min())
                w, h, area = int(xs.max()) - x + 1, int(ys.max()) - y + 1, int(xs.size)
            inter_w = max(0, min(x + w, width) - max(x, 0))
            inter_h = max(0, min(y + h, height) - max(y, 0))
            if inter_w * inter_h == 0 or area <= 0 or w < 1 or h < 1:
                continue
            kept.append(seg)
            boxes.append([x, y, x + w, y + h])
        boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        valid = np.ones(len(kept), dtype=bool)
        for t in getattr(transforms, "transforms", [transforms]):
            boxes = t.apply_box(boxes)
            if isinstance(t, MmdetCropTransform):
                valid &= MmdetCropTransform.valid_boxes(boxes)
        seg_map = transforms.apply_segmentation(pan_seg.astype(np.int32))
        targets = {True: ([], [], []), False: ([], [], [])}  # is thing -> (classes, masks, boxes)
        for seg, box, ok in zip(kept, boxes, valid):
            if ok:
                classes, masks, boxes_out = targets[seg["category_id"] in self.thing_ids]
                classes.append(seg["category_id"])
                masks.append(seg_map == seg["id"])
                boxes_out.append(box)
        out = []
        for is_thing in (True, False):
            classes, masks, boxes_out = targets[is_thing]
            inst = target_instances(image_shape, classes, masks, with_boxes=False)
            inst.gt_boxes = Boxes(torch.from_numpy(np.array(boxes_out, dtype=np.float32).reshape(-1, 4)))
            out.append(inst)
        return tuple(out)


def target_instances(image_shape, classes, masks, with_boxes: bool) -> Instances:
    """Training targets of one image as the mapper makes them: ``Instances`` of ``image_shape`` (H, W) with
    ``gt_classes`` (int64 contiguous ids), ``gt_masks`` (BitMasks of the (H, W) bool ``masks``) and, with
    ``with_boxes``, ``gt_boxes`` (the masks' tight boxes)."""
    inst = Instances(image_shape)
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    if masks:
        tensor = torch.from_numpy(np.ascontiguousarray(np.stack(masks)))
    else:
        tensor = torch.zeros((0,) + tuple(image_shape), dtype=torch.bool)
    inst.gt_masks = BitMasks(tensor)
    if with_boxes:
        inst.gt_boxes = Boxes(masks_to_boxes(tensor))
    return inst
