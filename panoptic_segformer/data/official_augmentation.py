"""The authors' data pipeline as Detectron2 augmentations (``INPUT.AUGMENTATION: "official"``).

What zhiqi-li/Panoptic-SegFormer (commit cdb9b68) trains and evaluates with, read from its config
``configs/panformer/base.py:117-181`` and the mmdet 2.12.0 / mmcv 1.3.4 classes it names
(``mmdet/datasets/pipelines/transforms.py``, ``auto_augment.py``, ``mmcv/image/geometric.py``):

Training (in this order, each random draw made with numpy's global RNG exactly as mmdet makes it, so
the same seed gives the same choices as their pipeline: tests/test_official_data_pipeline.py):

1. ``RandomFlip(flip_ratio=0.5)``: ``np.random.choice(["horizontal", None], p=[0.5, 0.5])``, **before** any
   resize. Boxes ``x1' = w - x2``, ``x2' = w - x1`` in float32 (transforms.py:399-400).
2. ``AutoAugment`` (auto_augment.py:104): one of two policies, ``np.random.choice`` (uniform):
   (a) ``Resize(img_scale=[(s, 1333) for s in 480..800 step 32], multiscale_mode='value', keep_ratio=True)``;
   (b) ``Resize([(400, 4200), (500, 4200), (600, 4200)])`` -> ``RandomCrop(crop_type='absolute_range',
   crop_size=(384, 600), allow_negative_crop=True)`` -> ``Resize(policy (a)'s scales, override=True)``.
3. ``Normalize(mean, std, to_rgb=True)``: ``mmcv.imnormalize`` computes ``cv2.multiply(x - mean, 1/std)`` with a
   float64 scalar; for uint8 inputs it gives exactly the float32 ``(x - mean) / std`` the model computes
   (checked on all 256 values of each channel, tests/test_official_data_pipeline.py), so normalisation stays
   in the model. ``Pad(size_divisor=1)``: ``INPUT.SIZE_DIVISIBILITY: 1`` (configs/coco/official/Base-Official.yaml).

Resize (``mmcv.imrescale``): ``scale_factor = min(long / max(h, w), short / min(h, w))`` with (long, short) the
max and min of the scale tuple, new size ``(int(w * s + 0.5), int(h * s + 0.5))`` (geometric.py:15-26,
``rescale_size``); image ``cv2.resize(INTER_LINEAR)``; masks ``cv2.resize(INTER_NEAREST)`` (``BitmapMasks.rescale``;
here on the segment-id map, which selects the same source pixels); boxes ``* [new_w / w, new_h / h] (float32)``
and clipped to the image (transforms.py:213-242).

RandomCrop (transforms.py:741-835): ``crop_h = randint(min(h, lo), min(h, hi) + 1)``, ``crop_w`` likewise, then
``offset_h = randint(0, h - crop_h + 1)``, ``offset_w``; boxes shifted by the offset in float32 and clipped to
the crop; a ground truth survives iff its clipped box has positive width and height (not iff its mask does:
a segment whose box overlaps the crop but whose mask does not is kept with an empty mask). With
``allow_negative_crop=True`` a crop without any surviving box is kept.

Test (base.py:167-181): ``Resize((1333, 800), keep_ratio=True)`` with the same rounding and cv2 bilinear.

Which ground truths enter and their boxes (the dataset mapper, ``official_targets=True``): the annotation boxes
``[x, y, x + w, y + h]`` (float32), never recomputed from the masks; a segment is dropped when it is a crowd,
its area is <= 0, ``w < 1`` or ``h < 1``, or its box does not intersect the image
(easymd/datasets/coco_panoptic.py:154-172).
"""
from typing import List, Sequence, Tuple

import cv2
import numpy as np
from detectron2.data import transforms as T

__all__ = [
    "mmcv_rescale_size",
    "MmcvResizeTransform",
    "MmdetHFlipTransform",
    "MmdetCropTransform",
    "MmdetRandomFlip",
    "MmcvRandomRescale",
    "MmdetRandomCrop",
    "MmdetAutoAugment",
    "AUGMENTATIONS",
    "check_augmentation_config",
    "build_official_train_augmentation",
    "build_official_test_augmentation",
]

AUGMENTATIONS = ("paper", "official")


def mmcv_rescale_size(height: int, width: int, scale: Tuple[float, float]) -> Tuple[int, int]:
    """(new_h, new_w) of ``mmcv.imrescale(img, scale)`` (keep_ratio) for an image of ``height`` x ``width``:
    ``s = min(max(scale) / max(h, w), min(scale) / min(h, w))``, ``int(x * s + 0.5)`` per side
    (mmcv/image/geometric.py ``rescale_size`` / ``_scale_size``). A scale (0, short) means no cap on
    the long side (only the short side counts)."""
    long_edge, short_edge = max(scale), min(scale)
    if short_edge == 0:  # (0, short): no cap on the long side
        factor = long_edge / min(height, width)
    else:
        factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


class MmcvResizeTransform(T.Transform):
    """Resize (h, w) -> (new_h, new_w) as mmdet's ``Resize`` does: images ``cv2.resize(INTER_LINEAR)``,
    segmentation maps ``cv2.resize(INTER_NEAREST)``, boxes scaled in float32 and clipped to the image."""

    def __init__(self, h: int, w: int, new_h: int, new_w: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray, interp=None) -> np.ndarray:
        assert img.shape[:2] == (self.h, self.w), f"image {img.shape[:2]} != transform input {(self.h, self.w)}"
        out = cv2.resize(np.ascontiguousarray(img), (self.new_w, self.new_h),
                         interpolation=cv2.INTER_NEAREST if interp == "nearest" else cv2.INTER_LINEAR)
        return out[:, :, None] if img.ndim == 3 and out.ndim == 2 else out

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        """Nearest neighbour; bool, int64 and float64 maps go through int32/float32 (OpenCV's types), values
        kept (an int64 map must fit in int32: COCO panoptic ids are < 2^24)."""
        seg = np.asarray(segmentation)
        if seg.dtype == np.bool_:
            return self.apply_image(seg.astype(np.uint8), interp="nearest").astype(bool)
        if seg.dtype in (np.int64, np.uint32, np.uint64):
            if seg.size and (seg.min() < np.iinfo(np.int32).min or seg.max() > np.iinfo(np.int32).max):
                raise ValueError("MmcvResizeTransform: segmentation values do not fit in int32")
            return self.apply_image(seg.astype(np.int32), interp="nearest").astype(seg.dtype)
        return self.apply_image(seg, interp="nearest")

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        coords = np.array(coords, dtype=np.float64 if coords.dtype == np.float64 else np.float32)
        coords[:, 0] = coords[:, 0] * (self.new_w / self.w)
        coords[:, 1] = coords[:, 1] * (self.new_h / self.h)
        return coords

    def apply_box(self, box: np.ndarray) -> np.ndarray:
        """mmdet ``Resize._resize_bboxes``: ``boxes * float32([sx, sy, sx, sy])``, clipped to [0, new size]."""
        factor = np.array([self.new_w / self.w, self.new_h / self.h] * 2, dtype=np.float32)
        boxes = np.asarray(box, dtype=np.float32).reshape(-1, 4) * factor
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, self.new_w)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, self.new_h)
        return boxes


class MmdetHFlipTransform(T.Transform):
    """Horizontal flip of an image of width ``width`` as mmdet's ``RandomFlip`` (``mmcv.imflip``)."""

    def __init__(self, width: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.flip(img, axis=1))

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        coords = np.array(coords)
        coords[:, 0] = self.width - coords[:, 0]
        return coords

    def apply_box(self, box: np.ndarray) -> np.ndarray:
        """``bbox_flip`` (transforms.py:399-400): ``x1' = w - x2``, ``x2' = w - x1`` in float32."""
        boxes = np.asarray(box, dtype=np.float32).reshape(-1, 4)
        flipped = boxes.copy()
        flipped[:, 0] = self.width - boxes[:, 2]
        flipped[:, 2] = self.width - boxes[:, 0]
        return flipped


class MmdetCropTransform(T.Transform):
    """Crop ``[y0, y0 + h) x [x0, x0 + w)`` as mmdet's ``RandomCrop._crop_data``; boxes shifted in float32 and
    clipped to the crop. :meth:`valid_boxes` is mmdet's survivor test (positive width and height)."""

    def __init__(self, x0: int, y0: int, w: int, h: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return img[self.y0:self.y0 + self.h, self.x0:self.x0 + self.w]

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        coords = np.array(coords)
        coords[:, 0] -= self.x0
        coords[:, 1] -= self.y0
        return coords

    def apply_box(self, box: np.ndarray) -> np.ndarray:
        offset = np.array([self.x0, self.y0, self.x0, self.y0], dtype=np.float32)
        boxes = np.asarray(box, dtype=np.float32).reshape(-1, 4) - offset
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, self.w)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, self.h)
        return boxes

    @staticmethod
    def valid_boxes(boxes: np.ndarray) -> np.ndarray:
        """Boxes that survive the crop (transforms.py:780-781)."""
        return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


# ------------------------------------------------------------------------------------------------
# Augmentations: the random draws, in mmdet's order and with mmdet's numpy calls.
# ------------------------------------------------------------------------------------------------
class MmdetRandomFlip(T.Augmentation):
    """``RandomFlip(flip_ratio=prob, direction='horizontal')``: one ``np.random.choice`` with
    ``p=[prob, 1 - prob]`` (index 0 = flip), as transforms.py:446 draws it."""

    def __init__(self, prob: float = 0.5):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        if np.random.choice(2, p=[self.prob, 1 - self.prob]) == 0:
            return MmdetHFlipTransform(image.shape[1])
        return T.NoOpTransform()


class MmcvRandomRescale(T.Augmentation):
    """``Resize(img_scale=scales, multiscale_mode='value', keep_ratio=True)``: ``np.random.randint(len(scales))``
    picks a scale (no draw for a single scale, as ``Resize._random_scale``), then ``mmcv.imrescale``."""

    def __init__(self, scales: Sequence[Tuple[int, int]]):
        super().__init__()
        scales = [tuple(int(v) for v in s) for s in scales]
        self._init(locals())

    def get_transform(self, image):
        scale = self.scales[0] if len(self.scales) == 1 else self.scales[np.random.randint(len(self.scales))]
        h, w = image.shape[:2]
        new_h, new_w = mmcv_rescale_size(h, w, scale)
        return MmcvResizeTransform(h, w, new_h, new_w)


class MmdetRandomCrop(T.Augmentation):
    """``RandomCrop(crop_type='absolute_range', crop_size=(min_size, max_size))``: crop height then width
    ``randint(min(side, min_size), min(side, max_size) + 1)``, then the offsets ``randint(0, margin + 1)``."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        crop_h = int(np.random.randint(min(h, self.min_size), min(h, self.max_size) + 1))
        crop_w = int(np.random.randint(min(w, self.min_size), min(w, self.max_size) + 1))
        offset_h = int(np.random.randint(0, max(h - crop_h, 0) + 1))
        offset_w = int(np.random.randint(0, max(w - crop_w, 0) + 1))
        return MmdetCropTransform(offset_w, offset_h, crop_w, crop_h)


class MmdetAutoAugment(T.Augmentation):
    """``AutoAugment(policies)``: ``np.random.choice`` among the policies (uniform, auto_augment.py:104), then
    every augmentation of the chosen one."""

    def __init__(self, policies: Sequence[Sequence[T.Augmentation]]):
        super().__init__()
        self.policies = [T.AugmentationList(list(p)) for p in policies]

    def __call__(self, aug_input):
        # np.random.choice(list of n) draws randint(0, n), as np.random.choice(n) does.
        return self.policies[int(np.random.choice(len(self.policies)))](aug_input)

    def get_transform(self, *args):
        raise NotImplementedError("MmdetAutoAugment is applied with __call__(aug_input)")

    def __repr__(self):
        return "MmdetAutoAugment(policies=[{}])".format(", ".join(repr(p) for p in self.policies))

    __str__ = __repr__


# ------------------------------------------------------------------------------------------------
# From the config.
# ------------------------------------------------------------------------------------------------
def _positive_ints(value, key: str, count=None) -> List[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or (count is not None and len(values) != count) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        what = f"{count} positive integers" if count else "a non-empty list of positive integers"
        raise ValueError(f"{key} must be {what}, got {value!r}")
    return values


def check_augmentation_config(cfg) -> str:
    """``cfg.INPUT.AUGMENTATION`` checked ("paper" or "official"), and with "official" every key its pipeline
    reads; ValueError naming the key otherwise. Returns the mode."""
    mode = cfg.INPUT.AUGMENTATION
    if mode not in AUGMENTATIONS:
        raise ValueError(f"INPUT.AUGMENTATION must be one of {list(AUGMENTATIONS)}, got {mode!r}")
    cap = cfg.INPUT.CROP_RESIZE_MAX_SIZE
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
        raise ValueError(f"INPUT.CROP_RESIZE_MAX_SIZE must be an integer >= 0 (0 = no cap), got {cap!r}")
    if mode != "official":
        return mode
    if cfg.INPUT.RANDOM_FLIP not in ("horizontal", "none"):
        raise ValueError("INPUT.RANDOM_FLIP must be 'horizontal' or 'none' with INPUT.AUGMENTATION 'official' "
                         f"(their RandomFlip is horizontal), got {cfg.INPUT.RANDOM_FLIP!r}")
    if cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING != "choice":
        raise ValueError("INPUT.MIN_SIZE_TRAIN_SAMPLING must be 'choice' with INPUT.AUGMENTATION 'official' "
                         f"(multiscale_mode='value'), got {cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING!r}")
    _positive_ints(cfg.INPUT.MIN_SIZE_TRAIN, "INPUT.MIN_SIZE_TRAIN")
    _positive_ints(cfg.INPUT.MAX_SIZE_TRAIN, "INPUT.MAX_SIZE_TRAIN", 1)
    _positive_ints(cfg.INPUT.MIN_SIZE_TEST, "INPUT.MIN_SIZE_TEST", 1)
    _positive_ints(cfg.INPUT.MAX_SIZE_TEST, "INPUT.MAX_SIZE_TEST", 1)
    if cfg.INPUT.CROP.ENABLED:
        if cfg.INPUT.CROP.TYPE != "absolute_range":
            raise ValueError("INPUT.CROP.TYPE must be 'absolute_range' with INPUT.AUGMENTATION 'official' (their "
                             f"RandomCrop), got {cfg.INPUT.CROP.TYPE!r}")
        lo, hi = _positive_ints(cfg.INPUT.CROP.SIZE, "INPUT.CROP.SIZE", 2)
        if lo > hi:
            raise ValueError(f"INPUT.CROP.SIZE must be (min, max) with min <= max, got {cfg.INPUT.CROP.SIZE!r}")
        _positive_ints(cfg.INPUT.CROP_RESIZE_SHORT, "INPUT.CROP_RESIZE_SHORT")
        if cfg.INPUT.DETR_CROP_PROB != 0.5:
            raise ValueError("INPUT.DETR_CROP_PROB must be 0.5 with INPUT.AUGMENTATION 'official' and "
                             "INPUT.CROP.ENABLED (AutoAugment picks one of its two policies uniformly), got "
                             f"{cfg.INPUT.DETR_CROP_PROB!r}")
    return mode


def build_official_train_augmentation(cfg) -> List[T.Augmentation]:
    """Their training pipeline from the config: flip (``INPUT.RANDOM_FLIP``), then AutoAugment between the
    multi-scale resize (``INPUT.MIN_SIZE_TRAIN`` x ``MAX_SIZE_TRAIN``) and, with ``INPUT.CROP.ENABLED``,
    resize (``INPUT.CROP_RESIZE_SHORT`` x ``CROP_RESIZE_MAX_SIZE``) -> crop (``INPUT.CROP.SIZE``) -> the
    multi-scale resize. Without the crop there is one policy (mmdet still draws ``choice(1)``)."""
    check_augmentation_config(cfg)
    scales = [(int(cfg.INPUT.MAX_SIZE_TRAIN), int(s)) for s in cfg.INPUT.MIN_SIZE_TRAIN]
    policies = [[MmcvRandomRescale(scales)]]
    if cfg.INPUT.CROP.ENABLED:
        pre = [(int(cfg.INPUT.CROP_RESIZE_MAX_SIZE), int(s)) for s in cfg.INPUT.CROP_RESIZE_SHORT]
        lo, hi = (int(v) for v in cfg.INPUT.CROP.SIZE)
        policies.append([MmcvRandomRescale(pre), MmdetRandomCrop(lo, hi), MmcvRandomRescale(scales)])
    flip = [MmdetRandomFlip(0.5)] if cfg.INPUT.RANDOM_FLIP == "horizontal" else []
    return flip + [MmdetAutoAugment(policies)]


def build_official_test_augmentation(cfg) -> List[T.Augmentation]:
    """Their test resize: ``mmcv.imrescale`` to (``INPUT.MAX_SIZE_TEST``, ``INPUT.MIN_SIZE_TEST``), cv2 bilinear."""
    check_augmentation_config(cfg)
    return [MmcvRandomRescale([(int(cfg.INPUT.MAX_SIZE_TEST), int(cfg.INPUT.MIN_SIZE_TEST))])]
