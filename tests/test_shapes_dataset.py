"""Tests of the synthetic ``shapes`` panoptic dataset (``data/datasets/shapes.py``) and its
Detectron2 registration (``data/datasets/register_shapes.py``)."""

import filecmp
import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from detectron2.data import DatasetCatalog, MetadataCatalog
from panopticapi.evaluation import pq_compute
from panopticapi.utils import id2rgb, rgb2id

from panoptic_segformer.data.datasets.register_shapes import (
    SHAPES_SPLITS,
    register_all_shapes,
    register_shapes_panoptic,
)
from panoptic_segformer.data.datasets.shapes import (
    SHAPES_CATEGORIES,
    default_shapes_root,
    generate_shapes_panoptic,
    is_shapes_split_complete,
    render_shapes_sample,
    shapes_dataset_dir,
)

CATS = {c["id"]: c for c in SHAPES_CATEGORIES}
SIZE = 160
NUM = 24


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("PANOPTIC_SEGFORMER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    paths = generate_shapes_panoptic(
        root, "train", num_images=NUM, image_size=SIZE, seed=0, workers=1
    )
    with open(paths["panoptic_json"]) as f:
        data = json.load(f)
    return paths, data


def _read_pan(paths, ann):
    return rgb2id(np.array(Image.open(os.path.join(paths["panoptic_root"], ann["file_name"]))))


def _all_files(folder):
    out = []
    for d, _, files in os.walk(folder):
        out += [os.path.relpath(os.path.join(d, f), folder) for f in files]
    return sorted(out)


def test_categories_are_coco_style_with_noncontiguous_ids():
    ids = [c["id"] for c in SHAPES_CATEGORIES]
    assert len(set(ids)) == len(ids)
    assert ids != list(range(len(ids))) and ids != list(range(1, len(ids) + 1))
    things = [c for c in SHAPES_CATEGORIES if c["isthing"] == 1]
    stuff = [c for c in SHAPES_CATEGORIES if c["isthing"] == 0]
    assert len(things) >= 3 and len(stuff) >= 2 and len(things) + len(stuff) == len(ids)
    for c in SHAPES_CATEGORIES:
        assert isinstance(c["name"], str) and len(c["color"]) == 3
        assert all(0 <= v <= 255 for v in c["color"])


def test_png_and_json_are_consistent(split):
    paths, data = split
    assert [c["id"] for c in data["categories"]] == list(CATS)
    assert len(data["images"]) == len(data["annotations"]) == NUM
    images = {im["id"]: im for im in data["images"]}
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        assert os.path.splitext(im["file_name"])[0] == os.path.splitext(ann["file_name"])[0]
        with Image.open(os.path.join(paths["image_root"], im["file_name"])) as img:
            assert img.size == (im["width"], im["height"]) == (SIZE, SIZE) and img.mode == "RGB"
        pan = _read_pan(paths, ann)
        assert pan.shape == (SIZE, SIZE)
        png_ids = set(np.unique(pan).tolist()) - {0}
        json_ids = [s["id"] for s in ann["segments_info"]]
        assert len(json_ids) == len(set(json_ids)) and 0 not in json_ids
        assert png_ids == set(json_ids)
        stuff_seen = []
        for s in ann["segments_info"]:
            assert s["category_id"] in CATS and s["iscrowd"] in (0, 1)
            mask = pan == s["id"]
            ys, xs = np.nonzero(mask)
            assert s["area"] == int(mask.sum())
            assert s["bbox"] == [
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            ]
            if CATS[s["category_id"]]["isthing"]:
                assert ndimage.label(mask)[1] == 1, "a thing segment must be one connected region"
            else:
                assert s["iscrowd"] == 0
                stuff_seen.append(s["category_id"])
        assert len(stuff_seen) == len(set(stuff_seen)), "at most one segment per stuff class"
        assert len(stuff_seen) >= 2


def test_split_has_the_hard_cases(split):
    paths, data = split
    void_pixels = same_class_pairs = touching_same_class = crowd = 0
    thing_sizes = []
    for ann in data["annotations"]:
        pan = _read_pan(paths, ann)
        void_pixels += int((pan == 0).sum())
        things = [s for s in ann["segments_info"] if CATS[s["category_id"]]["isthing"]]
        crowd += sum(s["iscrowd"] for s in things)
        thing_sizes += [max(s["bbox"][2:]) for s in things if not s["iscrowd"]]
        for i, a in enumerate(things):
            grown = ndimage.binary_dilation(pan == a["id"])  # 4-neighbourhood
            for b in things[i + 1 :]:
                if a["category_id"] == b["category_id"]:
                    same_class_pairs += 1
                    touching_same_class += bool((grown & (pan == b["id"])).any())
    assert void_pixels > 0
    assert same_class_pairs > 0 and touching_same_class > 0
    assert crowd > 0
    assert min(thing_sizes) <= 0.1 * SIZE and max(thing_sizes) >= 0.35 * SIZE
    n_things = [
        sum(CATS[s["category_id"]]["isthing"] for s in a["segments_info"])
        for a in data["annotations"]
    ]
    assert np.mean(n_things) >= 2.5 and max(n_things) >= 5


def test_same_seed_identical_bytes_and_workers_do_not_matter(tmp_path):
    a = generate_shapes_panoptic(str(tmp_path / "a"), "val", 16, 64, seed=3, workers=1)
    b = generate_shapes_panoptic(str(tmp_path / "b"), "val", 16, 64, seed=3, workers=2)
    c = generate_shapes_panoptic(str(tmp_path / "c"), "val", 16, 64, seed=4, workers=1)
    files = _all_files(a["split_dir"])
    assert files == _all_files(b["split_dir"]) == _all_files(c["split_dir"])
    assert len(files) == 2 * 16 + 2
    _, mismatch, errors = filecmp.cmpfiles(a["split_dir"], b["split_dir"], files, shallow=False)
    assert mismatch == [] and errors == []
    _, mismatch, _ = filecmp.cmpfiles(a["split_dir"], c["split_dir"], files, shallow=False)
    assert "panoptic.json" in mismatch and sum(f.startswith("panoptic/") for f in mismatch) == 16
    # an image depends only on (seed, split, index): same pixels when rendered alone
    image, pan, _ = render_shapes_sample(3, "val", 5, 64)
    stored = rgb2id(np.array(Image.open(os.path.join(a["panoptic_root"], "000005.png"))))
    np.testing.assert_array_equal(pan, stored)
    other, _, _ = render_shapes_sample(3, "train", 5, 64)
    assert not np.array_equal(image, other)


def test_completion_marker(tmp_path):
    root = str(tmp_path)
    # an interrupted run (no marker) is redone from scratch
    os.makedirs(tmp_path / "train" / "images")
    (tmp_path / "train" / "images" / "junk.jpg").write_bytes(b"partial")
    assert not is_shapes_split_complete(root, "train", 4, 48, 0)
    paths = generate_shapes_panoptic(root, "train", 4, 48, seed=0)
    assert is_shapes_split_complete(root, "train", 4, 48, 0)
    assert sorted(os.listdir(paths["image_root"])) == [f"{i:06d}.jpg" for i in range(4)]
    assert sorted(os.listdir(tmp_path)) == ["train"]  # no temporary folder left behind
    # a complete split is reused as is
    (tmp_path / "train" / "extra").write_text("kept")
    generate_shapes_panoptic(root, "train", 4, 48, seed=0)
    assert (tmp_path / "train" / "extra").exists()
    # other parameters in the same folder: regenerated
    generate_shapes_panoptic(root, "train", 5, 48, seed=0)
    assert not (tmp_path / "train" / "extra").exists()
    assert len(os.listdir(paths["panoptic_root"])) == 5
    assert not is_shapes_split_complete(root, "train", 4, 48, 0)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(num_images=0), "num_images"),
        (dict(num_images=2.5), "num_images"),
        (dict(image_size=31), "image_size"),
        (dict(image_size=(64, 16)), "image_size"),
        (dict(image_size="64"), "image_size"),
        (dict(seed=-1), "seed"),
        (dict(split="a/b"), "split"),
        (dict(workers=-1), "workers"),
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs, word):
    args = dict(root=str(tmp_path), split="train", num_images=2, image_size=64, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        generate_shapes_panoptic(**args)
    assert not os.listdir(tmp_path)


def test_non_square_images(tmp_path):
    paths = generate_shapes_panoptic(str(tmp_path), "train", 2, (48, 96), seed=0)
    with open(paths["panoptic_json"]) as f:
        data = json.load(f)
    assert all((im["height"], im["width"]) == (48, 96) for im in data["images"])
    assert _read_pan(paths, data["annotations"][0]).shape == (48, 96)


def test_pq_of_dataset_against_itself_is_100(split, tmp_path):
    paths, data = split
    pred_dir = tmp_path / "pred"
    shutil.copytree(paths["panoptic_root"], pred_dir)
    pred_json = tmp_path / "pred.json"
    pred_json.write_text(json.dumps(data))
    res = pq_compute(paths["panoptic_json"], str(pred_json), paths["panoptic_root"], str(pred_dir))
    for key in ("All", "Things", "Stuff"):  # every IoU exactly 1: float64 means of 1s (approx's rel 1e-6)
        assert res[key]["pq"] == pytest.approx(1.0) and res[key]["n"] > 0
    assert res["Things"]["n"] == sum(c["isthing"] for c in SHAPES_CATEGORIES)

    # sanity: removing one thing segment from the prediction lowers Things PQ only
    ann = next(
        a for a in data["annotations"] if sum(s["iscrowd"] == 0 for s in a["segments_info"]) > 3
    )
    victim = next(
        s for s in ann["segments_info"] if CATS[s["category_id"]]["isthing"] and not s["iscrowd"]
    )
    pan = _read_pan(paths, ann)
    pan[pan == victim["id"]] = 0
    Image.fromarray(id2rgb(pan)).save(pred_dir / ann["file_name"])
    ann["segments_info"] = [s for s in ann["segments_info"] if s["id"] != victim["id"]]
    pred_json.write_text(json.dumps(data))
    res = pq_compute(paths["panoptic_json"], str(pred_json), paths["panoptic_root"], str(pred_dir))
    assert res["Things"]["pq"] < 1.0 and res["Stuff"]["pq"] == pytest.approx(1.0)  # stuff IoUs still 1


def _check_metadata(meta, n_cats):
    assert meta.thing_classes == meta.stuff_classes == [c["name"] for c in SHAPES_CATEGORIES]
    assert meta.thing_colors == meta.stuff_colors == [c["color"] for c in SHAPES_CATEGORIES]
    contiguous = {
        **meta.thing_dataset_id_to_contiguous_id,
        **meta.stuff_dataset_id_to_contiguous_id,
    }
    assert sorted(contiguous.values()) == list(range(n_cats))
    assert set(meta.thing_dataset_id_to_contiguous_id) == {
        c["id"] for c in SHAPES_CATEGORIES if c["isthing"]
    }
    assert set(meta.stuff_dataset_id_to_contiguous_id) == {
        c["id"] for c in SHAPES_CATEGORIES if not c["isthing"]
    }
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert meta.ignore_label == 255 and meta.label_divisor == 1000
    for key in ("panoptic_root", "panoptic_json", "image_root"):
        assert isinstance(getattr(meta, key), str)


def test_registered_tiny_split_loads_with_contiguous_ids(tmp_path):
    name = "shapes_panoptic_test_tiny_registration"
    try:
        register_shapes_panoptic(name, "train", 6, 64, 0, root=str(tmp_path))
        register_shapes_panoptic(name, "train", 6, 64, 0, root=str(tmp_path))  # identical: no-op
        meta = MetadataCatalog.get(name)
        _check_metadata(meta, len(SHAPES_CATEGORIES))
        assert meta.image_root.startswith(shapes_dataset_dir(6, 64, 0, str(tmp_path)))
        assert not os.path.exists(meta.panoptic_json)  # generated lazily
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == 6 and os.path.isfile(meta.panoptic_json)
        with open(meta.panoptic_json) as f:
            raw = {a["image_id"]: a for a in json.load(f)["annotations"]}
        to_dataset = {
            v: k
            for m in (
                meta.thing_dataset_id_to_contiguous_id,
                meta.stuff_dataset_id_to_contiguous_id,
            )
            for k, v in m.items()
        }
        for d in dicts:
            assert os.path.isfile(d["file_name"]) and os.path.isfile(d["pan_seg_file_name"])
            assert d["file_name"].startswith(meta.image_root)
            assert d["pan_seg_file_name"].startswith(meta.panoptic_root)
            segs = d["segments_info"]
            assert [s["id"] for s in segs] == [s["id"] for s in raw[d["image_id"]]["segments_info"]]
            for s, r in zip(segs, raw[d["image_id"]]["segments_info"]):
                assert 0 <= s["category_id"] < len(meta.thing_classes)
                assert to_dataset[s["category_id"]] == r["category_id"]
                assert s["isthing"] == bool(CATS[r["category_id"]]["isthing"])
                assert meta.thing_classes[s["category_id"]] == CATS[r["category_id"]]["name"]
        # different parameters replace the registration
        register_shapes_panoptic(name, "train", 3, 64, 0, root=str(tmp_path))
        assert len(DatasetCatalog.get(name)) == 3
        assert MetadataCatalog.get(name).image_root.startswith(
            shapes_dataset_dir(3, 64, 0, str(tmp_path))
        )
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_register_all_shapes_uses_the_cache_env(tmp_path, monkeypatch):
    cache = tmp_path / "cache_env"
    monkeypatch.setenv("PANOPTIC_SEGFORMER_CACHE", str(cache))
    assert default_shapes_root() == str(cache / "shapes")
    assert shapes_dataset_dir(500, 256, 0) == str(cache / "shapes" / "n500_px256_seed0")
    monkeypatch.delenv("PANOPTIC_SEGFORMER_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_shapes_root() == str(
        tmp_path / "home" / ".cache" / "panoptic_segformer" / "shapes"
    )

    monkeypatch.setenv("PANOPTIC_SEGFORMER_CACHE", str(cache))
    before = {
        n: MetadataCatalog.get(n).as_dict() for n in SHAPES_SPLITS if n in DatasetCatalog.list()
    }
    try:
        names = register_all_shapes()
        assert names == list(SHAPES_SPLITS) and set(names) <= set(DatasetCatalog.list())
        assert register_all_shapes() == names  # idempotent
        for n in names:
            _check_metadata(MetadataCatalog.get(n), len(SHAPES_CATEGORIES))
            assert MetadataCatalog.get(n).panoptic_json.startswith(str(cache / "shapes"))
        dicts = DatasetCatalog.get("shapes_panoptic_val_tiny")
        assert len(dicts) == SHAPES_SPLITS["shapes_panoptic_val_tiny"][1]
        assert Image.open(dicts[0]["file_name"]).size == (128, 128)
    finally:  # restore the registrations made at import time
        for n, meta in before.items():
            split_name, num, size, seed = SHAPES_SPLITS[n]
            root = os.path.dirname(os.path.dirname(os.path.dirname(meta["image_root"])))
            register_shapes_panoptic(n, split_name, num, size, seed, root=root)


def test_generation_speed_500_images_256px(tmp_path):
    """Speed budget: 500 training images at 256 px in <= 30 s on a 2-core machine, i.e. <= 60 CPU seconds
    (this process and its pool workers): CPU time, not wall time, so that a machine busy with other work
    (which stretches wall time, not work) does not fail it."""
    def cpu_seconds():
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    start, cpu = time.perf_counter(), cpu_seconds()
    paths = generate_shapes_panoptic(str(tmp_path), "train", num_images=500, image_size=256, seed=0)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    print(f"\nshapes: generated 500 images at 256 px in {elapsed:.2f} s ({cpu:.1f} CPU seconds)")
    assert len(os.listdir(paths["panoptic_root"])) == 500
    assert 0 < cpu <= 60.0
