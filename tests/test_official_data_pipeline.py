"""INPUT.AUGMENTATION "official" against the authors' data pipeline, frozen in tests/data/official_data_pipeline.npz.

The fixture was written by projects/parity/official_data_parity.py from their code (mmdet 2.12.0, mmcv 1.3.4,
opencv-python 4.5.1.48; their config's train/test pipelines as they are) on the 2 COCO sample images: for 6
cases of fixed draws (flip, policy, scales, crop box) the sha256 of the uint8 image that reaches their
Normalize and of the normalised float32 tensor, the masks (one label map: they are disjoint), boxes and
labels; the ranges each draw was taken from; the draws of 100 seeded runs per image; their test resize; and
``mmcv.imnormalize`` of every uint8 value.

Everything is compared exactly. Their image is ``cv2.resize(INTER_LINEAR)`` of the JPEG as ``cv2.imread`` decodes
it, ours the same call on the JPEG as PIL decodes it: both decoders give the same bytes for these files, and
OpenCV's 8-bit bilinear resize is fixed-point integer arithmetic, so the pixels are equal across OpenCV
versions and CPUs (measured equal between opencv 4.5.1 and 5.0). Should an OpenCV build ever round differently,
the image assertion reports how many subsampled pixels differ and by how much. Masks are cv2 nearest resizes
(index selection), boxes float32 products/differences done in the same order, normalisation float32 (see
``test_normalisation_equals_mmcv_imnormalize_for_every_uint8_value``).
"""
import hashlib
import json
import os
import types

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T

from panoptic_segformer import PanopticSegFormerDatasetMapper
from panoptic_segformer.config import setup_cfg
from panoptic_segformer.data.official_augmentation import (MmcvResizeTransform, MmcvRandomRescale,
                                                           MmdetAutoAugment, MmdetRandomCrop, MmdetRandomFlip,
                                                           mmcv_rescale_size)
from panoptic_segformer.panoptic_segformer import PanopticSegFormer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "data", "official_data_pipeline.npz")
CONFIG = os.path.join(REPO, "configs", "coco", "official", "official_r50_2x.yaml")
SAMPLE_OPTS = ["DATASETS.TRAIN", "('coco_panoptic_sample',)", "DATASETS.TEST", "('coco_panoptic_sample',)"]


@pytest.fixture(scope="module")
def fixture():
    return dict(np.load(FIXTURE))


@pytest.fixture(scope="module")
def setup(coco_sample_root):
    cfg = setup_cfg(CONFIG, SAMPLE_OPTS)
    dicts = {os.path.basename(d["file_name"]): d for d in DatasetCatalog.get("coco_panoptic_sample")}
    return (cfg, PanopticSegFormerDatasetMapper(cfg, is_train=True),
            PanopticSegFormerDatasetMapper(cfg, is_train=False), dicts)


class Draws:
    """numpy.random.choice / randint replaced: fixed values (checked against the range asked), or numpy's
    own draws (``values=None``); every call recorded as [name, low, high, p, value], as the fixture has them."""

    def __init__(self, values=None):
        self.values = None if values is None else list(values)
        self.calls = []
        self._choice, self._randint = np.random.choice, np.random.randint

    def choice(self, a, p=None):
        assert isinstance(a, int), "the official augmentations draw np.random.choice(n)"
        index = int(self._choice(a, p=p)) if self.values is None else self._pop(0, a)
        self.calls.append(["choice", 0, a, None if p is None else [float(v) for v in p], index])
        return index

    def randint(self, low, high=None):
        low, high = (0, low) if high is None else (low, high)
        value = int(self._randint(low, high)) if self.values is None else self._pop(low, high)
        self.calls.append(["randint", int(low), int(high), None, value])
        return value

    def _pop(self, low, high):
        value = self.values.pop(0)
        assert low <= value < high, f"fixed draw {value} outside [{low}, {high})"
        return value

    def __enter__(self):
        np.random.choice, np.random.randint = self.choice, self.randint
        return self

    def __exit__(self, *exc):
        np.random.choice, np.random.randint = self._choice, self._randint
        assert exc[0] is not None or not self.values, f"draws not consumed: {self.values}"


def _sha256(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _model_normalisation(cfg, image):
    """The model's own code (PanopticSegFormer.preprocess_image) on a stand-in holding its buffers."""
    model = types.SimpleNamespace(
        pixel_mean=torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1),
        pixel_std=torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), device=torch.device("cpu"),
        size_divisibility=cfg.INPUT.SIZE_DIVISIBILITY, check_input_image=lambda x, i: x)
    return PanopticSegFormer.preprocess_image(model, [{"image": image}]).tensor[0]


def _assert_image(ours_u8, fixture, prefix):
    shape = tuple(int(v) for v in fixture[prefix + "img_shape"])
    assert ours_u8.shape == shape, f"{prefix}: image {ours_u8.shape}, theirs {shape}"
    if _sha256(ours_u8) != str(fixture[prefix + "img_u8_sha256"]):
        sub = ours_u8[::8, ::8].astype(int) - fixture[prefix + "img_u8_sub"].astype(int)
        pytest.fail(f"{prefix}: uint8 image differs from theirs ({int((sub != 0).sum())} of {sub.size} "
                    f"subsampled values, max |diff| {int(np.abs(sub).max())}; an OpenCV build whose bilinear "
                    "resize rounds differently would show as 1-level differences)")


def _cases(fixture):
    n = len({k.split("/")[0] for k in fixture if k.startswith("case")})
    assert n == 6
    return [(k, json.loads(str(fixture[f"case{k}/meta"]))) for k in range(n)]


def test_fixed_draws_give_their_image_tensor_and_targets(fixture, setup):
    cfg, mapper, _, dicts = setup
    empty_seen = 0
    for k, meta in _cases(fixture):
        p = f"case{k}/"
        with Draws(meta["draws"]) as draws:
            out = mapper(dicts[meta["name"]])
        # The same draws from the same ranges (crop ranges depend on the resized size).
        assert draws.calls == json.loads(str(fixture[p + "calls"])), p
        image = out["image"]
        _assert_image(image.permute(1, 2, 0).numpy(), fixture, p)
        assert _sha256(_model_normalisation(cfg, image).numpy()) == str(fixture[p + "img_sha256"]), p
        labels = fixture[p + "gt_labels"]
        thing = labels < 80
        order = np.concatenate([np.nonzero(thing)[0], np.nonzero(~thing)[0]])  # theirs: annotation order
        inst, stuff = out["instances"], out["stuff"]
        assert inst.gt_classes.tolist() == labels[thing].tolist(), p
        assert stuff.gt_classes.tolist() == labels[~thing].tolist(), p
        boxes = torch.cat([inst.gt_boxes.tensor, stuff.gt_boxes.tensor]).numpy()
        assert boxes.dtype == np.float32 and np.array_equal(boxes, fixture[p + "gt_bboxes"][order]), p
        masks = torch.cat([inst.gt_masks.tensor, stuff.gt_masks.tensor]).numpy()
        label_map, area = fixture[p + "mask_map"], fixture[p + "mask_area"]
        assert masks.shape == (len(labels),) + label_map.shape, p
        for i, j in enumerate(order):
            assert np.array_equal(masks[i], label_map == j + 1), f"{p} mask {j}"
        assert masks.reshape(len(masks), -1).sum(1).tolist() == area[order].tolist(), p
        empty_seen += int((area == 0).sum())
    assert empty_seen == 1  # case 4: a thing whose box survives the crop but whose mask does not


def test_seeded_draws_equal_theirs(fixture, setup):
    """With np.random.seed(s) the official augmentation list draws what their pipeline draws (same numpy
    calls, ranges and values): 100 seeds per image, so the flip/policy/scale/crop choices are theirs."""
    _, mapper, _, dicts = setup
    seeded = json.loads(str(fixture["seeded_calls"]))
    shapes = {"000000142238.jpg": (427, 640), "000000439180.jpg": (360, 640)}
    assert sorted(seeded) == sorted(dicts)
    policies_seen, flips = set(), 0
    for name, logs in seeded.items():
        assert len(logs) == 100
        for seed, theirs in enumerate(logs):
            np.random.seed(seed)
            with Draws() as draws:
                mapper.augmentations(T.AugInput(np.zeros(shapes[name] + (3,), np.uint8)))
            assert draws.calls == theirs, (name, seed)
            flips += theirs[0][4] == 0
            policies_seen.add(theirs[1][4])
    assert policies_seen == {0, 1} and 50 < flips < 150


def test_sets_of_choices_are_their_config(fixture, setup):
    cfg, mapper, test_mapper, _ = setup
    conf = json.loads(str(fixture["config"]))
    train = {t["type"]: t for t in conf["train_pipeline"]}
    flip, auto = mapper.augmentations.augs
    assert isinstance(flip, MmdetRandomFlip) and flip.prob == train["RandomFlip"]["flip_ratio"] == 0.5
    assert isinstance(auto, MmdetAutoAugment)
    theirs = train["AutoAugment"]["policies"]
    ours = [p.augs for p in auto.policies]
    assert [[t["type"] for t in p] for p in theirs] == [["Resize"], ["Resize", "RandomCrop", "Resize"]]
    assert [[type(a) for a in p] for p in ours] == [[MmcvRandomRescale], [MmcvRandomRescale, MmdetRandomCrop,
                                                                            MmcvRandomRescale]]
    for p_ours, p_theirs in zip(ours, theirs):
        for a, t in zip(p_ours, p_theirs):
            if t["type"] == "Resize":
                assert t["keep_ratio"] and t["multiscale_mode"] == "value"
                assert [tuple(sorted(s)) for s in a.scales] == [tuple(sorted(s)) for s in t["img_scale"]]
            else:
                assert t["crop_type"] == "absolute_range" and t["allow_negative_crop"]
                assert (a.min_size, a.max_size) == tuple(t["crop_size"]) == (384, 600)
    assert theirs[1][2]["override"]
    norm = conf["img_norm_cfg"]
    assert norm["to_rgb"] and cfg.INPUT.FORMAT == "RGB"
    assert np.array_equal(np.float32(cfg.MODEL.PIXEL_MEAN), np.float32(norm["mean"]))
    assert np.array_equal(np.float32(cfg.MODEL.PIXEL_STD), np.float32(norm["std"]))
    assert train["Pad"]["size_divisor"] == cfg.INPUT.SIZE_DIVISIBILITY == 1
    assert conf["filter_empty_gt"] is False  # ours: panoptic dicts have no "annotations", none is filtered
    msfa = conf["test_pipeline"][1]
    assert msfa["type"] == "MultiScaleFlipAug" and not msfa["flip"]
    (test_resize,) = test_mapper.augmentations.augs
    assert test_resize.scales == [tuple(msfa["img_scale"])] == [(1333, 800)]
    assert {t["type"]: t for t in msfa["transforms"]}["Pad"]["size_divisor"] == 1


def test_test_mapper_gives_mmcv_imrescale(fixture, setup):
    cfg, _, test_mapper, dicts = setup
    for name, d in sorted(dicts.items()):
        p = f"test/{name}/"
        out = test_mapper(d)
        _assert_image(out["image"].permute(1, 2, 0).numpy(), fixture, p)
        assert _sha256(_model_normalisation(cfg, out["image"]).numpy()) == str(fixture[p + "img_sha256"])
    assert mmcv_rescale_size(427, 640, (1333, 800)) == (800, 1199)
    assert mmcv_rescale_size(360, 640, (1333, 800)) == (750, 1333)
    assert mmcv_rescale_size(100, 2000, (4200, 400)) == (210, 4200)  # long side capped
    assert mmcv_rescale_size(100, 2000, (0, 400)) == (400, 8000)  # CROP_RESIZE_MAX_SIZE 0: no cap


def test_normalisation_equals_mmcv_imnormalize_for_every_uint8_value(fixture, setup):
    """mmcv.imnormalize computes cv2.multiply(x - mean, 1/std) with a float64 scalar; on uint8 inputs that
    equals the model's float32 (x - mean) / std for all 256 values of each channel (so the model keeps it)."""
    cfg = setup[0]
    ramp = torch.arange(256, dtype=torch.uint8)[None, :, None].expand(3, 256, 1).contiguous()
    ours = _model_normalisation(cfg, ramp)[:, :, 0].T.numpy()
    assert np.array_equal(ours, fixture["norm_table"])


def test_resize_transform_types_and_layouts():
    t = MmcvResizeTransform(4, 6, 8, 12)
    seg = np.arange(24, dtype=np.int64).reshape(4, 6) * 1000003
    out = t.apply_segmentation(seg)
    assert out.dtype == np.int64 and out.shape == (8, 12) and set(np.unique(out)) == set(np.unique(seg))
    assert t.apply_segmentation(seg > 10 ** 7).dtype == bool
    img = np.random.RandomState(0).randint(0, 256, (4, 6, 3)).astype(np.uint8)
    assert np.array_equal(t.apply_image(img[:, :, ::-1]), t.apply_image(img)[:, :, ::-1])  # BGR view (predictor)
    with pytest.raises(ValueError, match="int32"):
        t.apply_segmentation(np.full((4, 6), 2 ** 40, dtype=np.int64))


@pytest.mark.parametrize("key,value,match", [
    ("INPUT.AUGMENTATION", "mmdet", "INPUT.AUGMENTATION"),
    ("INPUT.RANDOM_FLIP", "vertical", "INPUT.RANDOM_FLIP"),
    ("INPUT.MIN_SIZE_TRAIN_SAMPLING", "range", "INPUT.MIN_SIZE_TRAIN_SAMPLING"),
    ("INPUT.MIN_SIZE_TRAIN", "(0, 512)", "INPUT.MIN_SIZE_TRAIN"),
    ("INPUT.MAX_SIZE_TRAIN", "-1", "INPUT.MAX_SIZE_TRAIN"),
    ("INPUT.CROP.TYPE", "relative_range", "INPUT.CROP.TYPE"),
    ("INPUT.CROP.SIZE", "(600, 384)", "INPUT.CROP.SIZE"),
    ("INPUT.CROP.SIZE", "(384, 500, 600)", "INPUT.CROP.SIZE"),
    ("INPUT.CROP_RESIZE_SHORT", "[]", "INPUT.CROP_RESIZE_SHORT"),
    ("INPUT.CROP_RESIZE_MAX_SIZE", "-5", "INPUT.CROP_RESIZE_MAX_SIZE"),
    ("INPUT.DETR_CROP_PROB", "0.3", "INPUT.DETR_CROP_PROB"),
    ("INPUT.MIN_SIZE_TEST", "0", "INPUT.MIN_SIZE_TEST"),
])
def test_bad_official_values_name_the_key(coco_sample_root, key, value, match):
    cfg = setup_cfg(CONFIG, SAMPLE_OPTS + [key, value])
    for is_train in (True, False):
        with pytest.raises(ValueError, match=match.replace(".", r"\.")):
            PanopticSegFormerDatasetMapper(cfg, is_train=is_train)


def test_paper_configs_keep_their_pipeline(coco_sample_root):
    """The paper-text configs: AUGMENTATION "paper", Detectron2's augmentations as before (no cap on the
    pre-crop resize), tight boxes and merged stuff (tests/test_data.py checks the targets)."""
    import sys

    cfg = setup_cfg(os.path.join(REPO, "configs", "coco", "panoptic_segformer_R50_24ep.yaml"), SAMPLE_OPTS)
    assert cfg.INPUT.AUGMENTATION == "paper" and cfg.INPUT.CROP_RESIZE_MAX_SIZE == 0
    mapper = PanopticSegFormerDatasetMapper(cfg, is_train=True)
    assert not mapper.official_targets
    assert [type(a) for a in mapper.augmentations.augs] == [T.RandomFlip, T.ResizeShortestEdge]
    crop = mapper.crop_augmentations.augs
    assert [type(a) for a in crop] == [T.RandomFlip, T.ResizeShortestEdge, T.RandomCrop, T.ResizeShortestEdge]
    assert crop[1].max_size == sys.maxsize and mapper.crop_prob == 0.5
    test = PanopticSegFormerDatasetMapper(cfg, is_train=False)
    assert [type(a) for a in test.augmentations.augs] == [T.ResizeShortestEdge]
    # Paper mode with a cap: the key is honoured there too.
    cfg = setup_cfg(os.path.join(REPO, "configs", "coco", "panoptic_segformer_R50_24ep.yaml"),
                    SAMPLE_OPTS + ["INPUT.CROP_RESIZE_MAX_SIZE", "4200"])
    assert PanopticSegFormerDatasetMapper(cfg, is_train=True).crop_augmentations.augs[1].max_size == 4200
