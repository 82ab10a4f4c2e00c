"""Dataset mapper of Panoptic SegFormer: a Detectron2 dataset dict in the COCO panoptic format
(`load_coco_panoptic_json`) -> model inputs.

Training targets:
- ``instances``: one entry per *thing* segment (``gt_classes`` contiguous ids, ``gt_masks``
  BitMasks, ``gt_boxes`` from the masks after augmentation);
- ``stuff``: one entry per *stuff class* present (all segments of a stuff class merged, the
  class-fixed assignment of Sec. 3.3.1), with ``gt_classes`` and ``gt_masks``.
Crowd segments (``iscrowd=1``) and void pixels (id 0) are in neither: as in COCO's evaluation they
are ignored, i.e. they only act as background for the masks. Segments emptied by a crop are dropped.

Augmentations (Sec. 4.1 / Appendix A.1): random horizontal flip; multi-scale resize (short side
480-800, long side <= 1333); with probability ``INPUT.DETR_CROP_PROB`` a DETR-style crop (short side
to 400/500/600, random crop 384-600, then the multi-scale resize). Test: resize to 800/1333, after
an optional corruption of the image as read (``TEST.CORRUPTION``, Table 11; see ``.corruptions``).
"""
import copy
import logging
import os

import cv2
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances
from PIL import Image, ImageOps

from ..utils import masks_to_boxes
from .corruptions import build_test_corruption

__all__ = ["PanopticSegFormerDatasetMapper", "read_image_rgb", "read_panoptic_png", "DatasetError"]

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """Bad input data; the message names the file and the problem."""


def one_thread_in_workers() -> None:
    """In a DataLoader worker process, use one intra-op thread in OpenCV (and torch).

    PyTorch gives its workers one torch thread, but OpenCV's resize/warp keep a pool as large as the
    machine's core count in every worker, on top of the training process's own threads: on a small or
    busy machine the oversubscribed pools made training several times slower than with
    ``OMP_NUM_THREADS=1`` (docs/BENCHMARKS.md). The training process keeps its threads. Works with every
    Detectron2 loader (no worker_init_fn needed).
    """
    if torch.utils.data.get_worker_info() is not None and cv2.getNumThreads() != 1:
        torch.set_num_threads(1)
        cv2.setNumThreads(1)


def read_image_rgb(file_name, image_format="RGB", min_size=32):
    """Read an image file as an (H, W, 3) uint8 array in `image_format` ("RGB" or "BGR").

    Grayscale, palette, RGBA, CMYK and 16-bit images are converted to RGB (16-bit values are
    rescaled to 8 bits). Raises DatasetError naming the file if it is missing, unreadable,
    truncated or smaller than `min_size` pixels on either side.
    """
    if not os.path.isfile(file_name):
        raise DatasetError(f"{file_name}: image file does not exist")
    try:
        with Image.open(file_name) as pil:
            pil.load()
            if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(pil, dtype=np.float64)
                scale = 255.0 / 65535.0 if arr.max() > 255 else 1.0
                pil = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8))
            pil = ImageOps.exif_transpose(pil)
            image = utils.convert_PIL_to_numpy(pil, image_format)
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{file_name}: cannot read image ({type(e).__name__}: {e})") from e
    if image.ndim != 3 or image.shape[2] != 3:
        raise DatasetError(f"{file_name}: expected a 3-channel image after conversion, got {image.shape}")
    if min(image.shape[:2]) < min_size:
        raise DatasetError(
            f"{file_name}: image is {image.shape[1]}x{image.shape[0]} px, smaller than the minimum "
            f"{min_size} px (INPUT.MIN_IMAGE_SIZE)"
        )
    return image


def read_panoptic_png(file_name):
    """Read a COCO panoptic PNG as an (H, W) int64 segment-id map (id = R + 256 G + 256^2 B)."""
    if not os.path.isfile(file_name):
        raise DatasetError(f"{file_name}: panoptic PNG does not exist")
    try:
        with Image.open(file_name) as pil:
            rgb = np.asarray(pil.convert("RGB"), dtype=np.int64)
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{file_name}: cannot read panoptic PNG ({type(e).__name__}: {e})") from e
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _check_segments(pan_seg, segments_info, png_file):
    """JSON segments and PNG ids must agree (0 is void)."""
    png_ids = set(np.unique(pan_seg).tolist()) - {0}
    json_ids = [s["id"] for s in segments_info]
    if len(set(json_ids)) != len(json_ids):
        raise DatasetError(f"{png_file}: duplicate segment ids in the JSON: {sorted(json_ids)}")
    missing_in_png = sorted(set(json_ids) - png_ids)
    if missing_in_png:
        raise DatasetError(f"{png_file}: JSON segment id(s) {missing_in_png} absent from the PNG")
    missing_in_json = sorted(png_ids - set(json_ids))
    if missing_in_json:
        raise DatasetError(f"{png_file}: PNG segment id(s) {missing_in_json} absent from the JSON")


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
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.crop_augmentations = T.AugmentationList(crop_augmentations) if crop_augmentations else None
        self.crop_prob = crop_prob
        self.image_format = image_format
        self.thing_ids = set(thing_ids)
        self.min_image_size = min_image_size
        self.corruption = corruption
        logger.info(f"[PanopticSegFormerDatasetMapper] augmentations: {augmentations}; with "
                    f"probability {crop_prob}: {crop_augmentations}; corruption: {corruption}")

    @classmethod
    def from_config(cls, cfg, is_train=True):
        if is_train:
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
                    T.ResizeShortestEdge(cfg.INPUT.CROP_RESIZE_SHORT, sample_style="choice"),
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
        _check_segments(pan_seg, dataset_dict["segments_info"], dataset_dict["pan_seg_file_name"])
        return pan_seg

    def __call__(self, dataset_dict):
        one_thread_in_workers()
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
        dataset_dict["instances"] = _instances(image_shape, thing_classes, thing_masks, with_boxes=True)
        stuff_classes = sorted(stuff_masks)
        dataset_dict["stuff"] = _instances(
            image_shape, stuff_classes, [stuff_masks[c] for c in stuff_classes], with_boxes=False
        )
        return dataset_dict


def _instances(image_shape, classes, masks, with_boxes):
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
