"""Datasets and the dataset mapper, on the real 2-image COCO panoptic sample, plus bad input."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from PIL import Image

from panoptic_segformer import PanopticSegFormerDatasetMapper, add_panoptic_segformer_config
from panoptic_segformer.data import DatasetError, read_image_rgb
from panoptic_segformer.data.datasets import register_panoptic_dataset


def _identity_mapper(dataset_name="coco_panoptic_sample"):
    meta = MetadataCatalog.get(dataset_name)
    return PanopticSegFormerDatasetMapper(
        True, augmentations=[], crop_augmentations=[], crop_prob=0.0, image_format="RGB",
        thing_ids=meta.thing_dataset_id_to_contiguous_id.values())


def _png_ids(path):
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def test_mapper_matches_the_real_coco_png_and_json(coco_sample_root):
    meta = MetadataCatalog.get("coco_panoptic_sample")
    with open(os.path.join(coco_sample_root, "panoptic_sample.json")) as f:
        raw = json.load(f)
    raw_by_file = {a["file_name"]: a for a in raw["annotations"]}
    dicts = DatasetCatalog.get("coco_panoptic_sample")
    assert len(dicts) == 2
    mapper = _identity_mapper()
    thing_map, stuff_map = meta.thing_dataset_id_to_contiguous_id, meta.stuff_dataset_id_to_contiguous_id
    for d in dicts:
        out = mapper(d)
        ann = raw_by_file[os.path.basename(d["pan_seg_file_name"])]
        pan = _png_ids(d["pan_seg_file_name"])
        image = np.asarray(Image.open(d["file_name"]).convert("RGB"))
        assert out["image"].shape == (3,) + image.shape[:2]
        assert torch.equal(out["image"], torch.from_numpy(image).permute(2, 0, 1))
        things = [s for s in ann["segments_info"] if s["category_id"] in thing_map and not s["iscrowd"]]
        stuff_classes = sorted({stuff_map[s["category_id"]] for s in ann["segments_info"] if s["category_id"] in stuff_map})
        inst, stuff = out["instances"], out["stuff"]
        assert len(inst) == len(things) > 0
        assert inst.gt_classes.tolist() == [thing_map[s["category_id"]] for s in things]
        for k, s in enumerate(things):
            expected = pan == s["id"]
            assert torch.equal(inst.gt_masks.tensor[k], torch.from_numpy(expected))
            assert inst.gt_masks.tensor[k].sum().item() == s["area"]
            x, y, w, h = s["bbox"]
            assert inst.gt_boxes.tensor[k].tolist() == [x, y, x + w, y + h]
        assert stuff.gt_classes.tolist() == stuff_classes
        for k, c in enumerate(stuff_classes):
            ids = [s["id"] for s in ann["segments_info"] if s["category_id"] in stuff_map and stuff_map[s["category_id"]] == c]
            assert torch.equal(stuff.gt_masks.tensor[k], torch.from_numpy(np.isin(pan, ids)))
        # every non-crowd, non-void pixel belongs to exactly one target
        covered = inst.gt_masks.tensor.sum(0) + stuff.gt_masks.tensor.sum(0)
        crowd = np.isin(pan, [s["id"] for s in ann["segments_info"] if s["iscrowd"]])
        assert torch.equal(covered, torch.from_numpy(((pan != 0) & ~crowd).astype(np.int64)))


def test_training_augmentations_keep_masks_and_boxes_consistent(coco_sample_root):
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_file(os.path.join(os.path.dirname(__file__), "..", "configs/coco/Base-PanopticSegFormer.yaml"))
    cfg.DATASETS.TRAIN = ("coco_panoptic_sample",)
    cfg.INPUT.DETR_CROP_PROB = 1.0  # always the DETR-style crop path
    mapper = PanopticSegFormerDatasetMapper(cfg, is_train=True)
    np.random.seed(0)
    for d in DatasetCatalog.get("coco_panoptic_sample") * 3:
        out = mapper(d)
        h, w = out["image"].shape[1:]
        assert 480 <= min(h, w) <= 800 and max(h, w) <= 1333
        inst = out["instances"]
        assert inst.gt_masks.tensor.shape[1:] == (h, w)
        assert (inst.gt_masks.tensor.flatten(1).sum(1) > 0).all()
        from panoptic_segformer.utils import masks_to_boxes
        assert torch.equal(inst.gt_boxes.tensor, masks_to_boxes(inst.gt_masks.tensor))


def test_test_mapper_resizes_and_drops_annotations(coco_sample_root):
    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.DATASETS.TEST = ("coco_panoptic_sample",)
    mapper = PanopticSegFormerDatasetMapper(cfg, is_train=False)
    out = mapper(DatasetCatalog.get("coco_panoptic_sample")[0])
    assert min(out["image"].shape[1:]) == 800 and "instances" not in out and "segments_info" not in out
    assert (out["height"], out["width"]) == (427, 640)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_any_image_mode_reads_as_rgb(tmp_path, mode):
    rgb = (np.random.RandomState(0).rand(40, 50, 3) * 255).astype(np.uint8)
    pil = Image.fromarray(rgb)
    if mode == "I;16":
        pil = Image.fromarray((rgb[..., 0].astype(np.uint16) * 257))
        pil = pil.convert("I;16") if pil.mode != "I;16" else pil
    else:
        pil = pil.convert(mode)
    path = str(tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png"))
    pil.save(path)
    image = read_image_rgb(path)
    assert image.shape == (40, 50, 3) and image.dtype == np.uint8
    if mode == "L":
        assert (image[..., 0] == image[..., 1]).all()
    if mode == "I;16":
        np.testing.assert_array_equal(image[..., 0], rgb[..., 0])


# ---------------------------------------------------------------------------------------------
# Bad input: each gives a clear error naming the file (or path and variable) and the problem.

@pytest.fixture
def sample_copy(tmp_path, coco_sample_root):
    root = tmp_path / "sample"
    shutil.copytree(coco_sample_root, root)
    return root


def _register(root, name="bad_sample"):
    # categories given, so that registering needs no JSON (some tests remove it)
    return register_panoptic_dataset(name, str(root / "images"), str(root / "panoptic"),
                                     str(root / "panoptic_sample.json"), categories=COCO_CATEGORIES)


def _edit_json(root, fn):
    path = root / "panoptic_sample.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_missing_dataset_folder_names_path(tmp_path):
    name = _register(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"nowhere/images: image folder does not exist"):
        DatasetCatalog.get(name)


def test_coco_builtin_missing_folder_names_path_and_variable(monkeypatch):
    with pytest.raises(DatasetError, match=r"coco.*does not exist.*DETECTRON2_DATASETS"):
        DatasetCatalog.get("coco_2017_val_panoptic")


def test_missing_json(sample_copy):
    os.remove(sample_copy / "panoptic_sample.json")
    with pytest.raises(DatasetError, match=r"panoptic_sample.json: panoptic JSON does not exist"):
        DatasetCatalog.get(_register(sample_copy))


def test_malformed_json(sample_copy):
    (sample_copy / "panoptic_sample.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"panoptic_sample.json: cannot parse"):
        DatasetCatalog.get(_register(sample_copy))


def test_empty_annotation_list(sample_copy):
    _edit_json(sample_copy, lambda d: d.update(annotations=[]))
    with pytest.raises(DatasetError, match=r"panoptic_sample.json: the annotation list is empty"):
        DatasetCatalog.get(_register(sample_copy))


def test_unknown_category_id(sample_copy):
    _edit_json(sample_copy, lambda d: d["annotations"][1]["segments_info"][0].update(category_id=9999))
    with pytest.raises(DatasetError, match=r"panoptic_sample.json: image 439180 .* unknown category id 9999"):
        DatasetCatalog.get(_register(sample_copy))


def test_json_segment_absent_from_png(sample_copy):
    def add(d):
        d["annotations"][0]["segments_info"].append(
            {"id": 123456, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1})
    _edit_json(sample_copy, add)
    dicts = DatasetCatalog.get(_register(sample_copy))
    with pytest.raises(DatasetError, match=r"000000142238.png: JSON segment id\(s\) \[123456\] absent from the PNG"):
        _identity_mapper()(dicts[0])


def test_png_segment_absent_from_json(sample_copy):
    removed = {}

    def drop(d):
        removed["id"] = d["annotations"][0]["segments_info"].pop(0)["id"]
    _edit_json(sample_copy, drop)
    dicts = DatasetCatalog.get(_register(sample_copy))
    with pytest.raises(DatasetError, match=rf"000000142238.png: PNG segment id\(s\) \[{removed['id']}\] absent from the JSON"):
        _identity_mapper()(dicts[0])


def test_truncated_image(sample_copy):
    path = sample_copy / "images" / "000000142238.jpg"
    path.write_bytes(path.read_bytes()[:2000])
    dicts = DatasetCatalog.get(_register(sample_copy))
    with pytest.raises(DatasetError, match=r"000000142238.jpg: cannot read image"):
        _identity_mapper()(dicts[0])


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image")
    with pytest.raises(DatasetError, match=r"notes.jpg: cannot read image"):
        read_image_rgb(str(path))


def test_missing_image_file(tmp_path):
    with pytest.raises(DatasetError, match=r"absent.jpg: image file does not exist"):
        read_image_rgb(str(tmp_path / "absent.jpg"))


def test_image_smaller_than_32px(tmp_path):
    path = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((20, 64, 3), np.uint8)).save(path)
    with pytest.raises(DatasetError, match=r"tiny.png: image is 64x20 px, smaller than the minimum 32 px"):
        read_image_rgb(str(path))


def _gt_mask_ap(dataset_name, tmp_path):
    """Mask AP of the dataset's ground-truth thing masks fed back as predictions."""
    from detectron2.structures import Boxes, Instances

    from panoptic_segformer.evaluation import ThingMaskAPEvaluator
    from panoptic_segformer.utils import masks_to_boxes

    dicts = DatasetCatalog.get(dataset_name)
    evaluator = ThingMaskAPEvaluator(dataset_name, output_dir=str(tmp_path))
    evaluator.reset()
    for d in dicts:
        ids = _png_ids(d["pan_seg_file_name"])
        segs = [s for s in d["segments_info"] if s["isthing"] and not s["iscrowd"]]
        pred = Instances(ids.shape)
        pred.pred_masks = torch.from_numpy(np.stack([ids == s["id"] for s in segs]))
        pred.pred_boxes = Boxes(masks_to_boxes(pred.pred_masks))
        pred.scores = torch.ones(len(segs))
        pred.pred_classes = torch.tensor([s["category_id"] for s in segs])
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": pred}])
    return evaluator.evaluate()["segm"]["AP"]


def test_mask_ap_with_things_interleaved_among_stuff_ids(coco_sample_root, tmp_path):
    """ADE20K-style metadata (thing contiguous ids interleaved with stuff ids) still evaluates."""
    from panoptic_segformer.data.datasets import panoptic_metadata

    with open(os.path.join(coco_sample_root, "panoptic_sample.json")) as f:
        categories = sorted(json.load(f)["categories"], key=lambda c: c["name"])  # interleaves
    meta = panoptic_metadata(categories)
    thing_ids = sorted(meta["thing_dataset_id_to_contiguous_id"].values())
    assert thing_ids != list(range(len(thing_ids)))
    register_panoptic_dataset(
        "sample_interleaved", os.path.join(coco_sample_root, "images"),
        os.path.join(coco_sample_root, "panoptic"), os.path.join(coco_sample_root, "panoptic_sample.json"),
        categories=categories, instances_json=str(tmp_path / "inst.json"), derive_instances_json=True)
    assert MetadataCatalog.get("sample_interleaved").thing_dataset_id_to_contiguous_id == \
        meta["thing_dataset_id_to_contiguous_id"]
    assert _gt_mask_ap("sample_interleaved", tmp_path) == pytest.approx(100.0)  # precision 1 at every recall


def test_instances_json_derived_from_panoptic_gives_mask_ap_100(coco_sample_root, tmp_path):
    """The COCO instances JSON written from the panoptic PNG/JSON (for COCOEvaluator's mask AP) holds
    every thing segment; the ground-truth masks fed back as predictions score mask AP 100."""
    from panoptic_segformer.data.datasets.instances_json import panoptic_to_instances_json

    out = panoptic_to_instances_json(os.path.join(coco_sample_root, "panoptic_sample.json"),
                                     os.path.join(coco_sample_root, "panoptic"), str(tmp_path / "inst.json"))
    with open(out) as f:
        inst = json.load(f)
    with open(os.path.join(coco_sample_root, "panoptic_sample.json")) as f:
        pan = json.load(f)
    thing_ids = {c["id"] for c in pan["categories"] if c["isthing"]}
    expected = [(a["image_id"], s["category_id"], s["area"], s["iscrowd"]) for a in pan["annotations"]
                for s in a["segments_info"] if s["category_id"] in thing_ids]
    assert sorted((a["image_id"], a["category_id"], a["area"], a["iscrowd"]) for a in inst["annotations"]) == sorted(expected)

    # the registered sample points its metadata json_file at the derived file
    DatasetCatalog.get("coco_panoptic_sample")
    assert os.path.isfile(MetadataCatalog.get("coco_panoptic_sample").json_file)
    # ground truth as predictions: precision 1 at every recall, a float64 mean of 1s x 100 (approx rel 1e-6)
    assert _gt_mask_ap("coco_panoptic_sample", tmp_path) == pytest.approx(100.0)
