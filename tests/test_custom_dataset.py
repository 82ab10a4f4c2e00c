"""A user's own clone and a user's own dataset.

- The COCO sample ships inside the package (also in a built wheel) and nothing reads a folder outside
  the repository.
- ``register_panoptic_dataset`` on a user-style dataset: PNG photos named only by the JSON's
  ``images`` list, categories with things and stuff interleaved.
- Both metadata conventions users bring (Detectron2's builtin standard one and Mask2Former's, each
  registered with Detectron2's own ``register_coco_panoptic``) train and evaluate end to end.
- Ground truth that training rejects is rejected by ``train_net.py --eval-only`` too.
"""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_panoptic
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json
from detectron2.engine import default_argument_parser
from detectron2.evaluation import COCOPanopticEvaluator
from PIL import Image

import train_net
from conftest import REPO_ROOT, small_cfg
from panoptic_segformer import register_panoptic_dataset
from panoptic_segformer.data import DatasetError
from panoptic_segformer.data.io import read_panoptic_png
from panoptic_segformer.data.datasets.builtin import coco_sample_root, register_coco_sample
from panoptic_segformer.data.datasets.instances_json import panoptic_to_instances_json
from panoptic_segformer.data.datasets.shapes import generate_shapes_panoptic
from panoptic_segformer.engine import Trainer

SHAPES_YAML = os.path.join(REPO_ROOT, "configs/shapes/panoptic_segformer_shapes.yaml")
# The shapes categories reordered so that thing and stuff contiguous ids interleave.
CATEGORY_ORDER = [10, 1, 11, 2, 3, 12, 4]
THING_IDS, STUFF_IDS = [1, 3, 4, 6], [0, 2, 5]
SAMPLE_FILES = ["LICENSE-panopticapi.txt", "README.md", "images/000000142238.jpg", "images/000000439180.jpg",
                "panoptic/000000142238.png", "panoptic/000000439180.png", "panoptic_sample.json"]


# ---------------------------------------------------------------------------------------------
# The repository carries what it needs
# ---------------------------------------------------------------------------------------------
def test_no_file_of_the_repository_reads_a_folder_beside_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    pattern = re.compile(r"(\.\./|/work/)" + "shared")
    offenders = []
    for path in tracked.stdout.split():
        if path.endswith((".py", ".md", ".yaml", ".cfg", ".toml", ".txt", ".sh")) or path in ("Makefile", ".ci/run"):
            with open(os.path.join(REPO_ROOT, path), errors="replace") as f:
                offenders += [f"{path}:{i + 1}" for i, line in enumerate(f) if pattern.search(line)]
    assert offenders == []


def test_coco_sample_ships_in_the_package(monkeypatch):
    monkeypatch.delenv("PANOPTIC_SEGFORMER_COCO_SAMPLE", raising=False)
    root = coco_sample_root()
    package = os.path.dirname(os.path.abspath(__import__("panoptic_segformer").__file__))
    assert root == os.path.join(package, "data", "coco_panoptic_sample")
    for name in SAMPLE_FILES:
        assert os.path.isfile(os.path.join(root, name)), name
    assert [os.path.dirname(d["file_name"]) for d in DatasetCatalog.get("coco_panoptic_sample")] == \
        [os.path.join(root, "images")] * 2


def test_sample_variable_must_be_the_sample_folder_itself(tmp_path, monkeypatch):
    # the mistake the old hint invited: the folder that holds the sample
    copy = tmp_path / "datasets" / "coco_panoptic_sample"
    shutil.copytree(coco_sample_root(), copy)
    try:
        monkeypatch.setenv("PANOPTIC_SEGFORMER_COCO_SAMPLE", str(tmp_path / "datasets"))
        register_coco_sample()
        with pytest.raises(DatasetError, match=r"datasets/images: image folder does not exist "
                           r"\(\$PANOPTIC_SEGFORMER_COCO_SAMPLE must be the sample folder itself"):
            DatasetCatalog.get("coco_panoptic_sample")
        monkeypatch.setenv("PANOPTIC_SEGFORMER_COCO_SAMPLE", str(copy))
        register_coco_sample()
        assert DatasetCatalog.get("coco_panoptic_sample")[0]["file_name"].startswith(str(copy))
    finally:
        monkeypatch.delenv("PANOPTIC_SEGFORMER_COCO_SAMPLE")
        register_coco_sample()


def test_built_wheel_holds_the_sample_where_the_package_looks(tmp_path, monkeypatch):
    """Package data: a wheel built from setup.py (what `pip install .` installs) holds every file of the
    sample at the path coco_sample_root() uses inside the installed package."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(os.path.join(REPO_ROOT, "setup.py"), src)
    shutil.copytree(os.path.join(REPO_ROOT, "panoptic_segformer"), src / "panoptic_segformer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", "wheel", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    monkeypatch.delenv("PANOPTIC_SEGFORMER_COCO_SAMPLE", raising=False)
    package = os.path.dirname(os.path.abspath(__import__("panoptic_segformer").__file__))
    in_package = os.path.relpath(coco_sample_root(), os.path.dirname(package)).replace(os.sep, "/")
    assert in_package == "panoptic_segformer/data/coco_panoptic_sample"
    assert sorted(n for n in names if n.startswith(in_package + "/")) == \
        sorted(f"{in_package}/{f}" for f in SAMPLE_FILES)


# ---------------------------------------------------------------------------------------------
# A user's dataset
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """2 shapes images at 96 px in a user's layout: PNG photos named `photo_<id>.png` (unlike the
    label PNGs `000000.png`), categories with things and stuff interleaved. The generator's JPEGs
    (`000000.jpg`, the only names Detectron2's loader finds) are kept for its registrations."""
    root = tmp_path_factory.mktemp("user_data")
    paths = generate_shapes_panoptic(str(root / "generated"), "train", num_images=2, image_size=96, seed=3,
                                     workers=0)
    with open(paths["panoptic_json"]) as f:
        data = json.load(f)
    by_id = {c["id"]: c for c in data["categories"]}
    data["categories"] = [by_id[i] for i in CATEGORY_ORDER]
    (root / "photos").mkdir()
    for image in data["images"]:
        name = f"photo_{image['id']}.png"
        Image.open(os.path.join(paths["image_root"], image["file_name"])).save(root / "photos" / name)
        image["file_name"] = name
    (root / "panoptic.json").write_text(json.dumps(data))
    return {"root": root, "photos": str(root / "photos"), "jpg": paths["image_root"],
            "labels": paths["panoptic_root"], "json": str(root / "panoptic.json"), "data": data}


def test_png_photos_are_found_through_the_images_list(user_data):
    name = register_panoptic_dataset("user_png_names", user_data["photos"], user_data["labels"], user_data["json"])
    dicts = DatasetCatalog.get(name)
    assert [os.path.basename(d["file_name"]) for d in dicts] == ["photo_0.png", "photo_1.png"]
    # Detectron2's own loader guesses a .jpg named like the label PNG, a file the JSON never mentions
    meta = MetadataCatalog.get(name).as_dict()
    with pytest.raises(AssertionError, match=r"photos/000000\.jpg"):
        load_coco_panoptic_json(user_data["json"], user_data["photos"], user_data["labels"], meta)
    # given such .jpg files, it makes the same dicts (contiguous ids from the JSON's category order)
    theirs = load_coco_panoptic_json(user_data["json"], user_data["jpg"], user_data["labels"], meta)
    for ours, theirs in zip(dicts, theirs):
        assert ours["pan_seg_file_name"] == theirs["pan_seg_file_name"]
        assert ours["image_id"] == theirs["image_id"] and ours["segments_info"] == theirs["segments_info"]
    assert sorted(meta["thing_dataset_id_to_contiguous_id"].values()) == THING_IDS
    assert [meta["stuff_classes"][i] for i in STUFF_IDS] == ["grass", "water", "wall"]


def test_annotation_with_unknown_image_id_names_it(user_data, tmp_path):
    data = json.loads(json.dumps(user_data["data"]))
    data["annotations"][1]["image_id"] = 77
    bad = tmp_path / "panoptic.json"
    bad.write_text(json.dumps(data))
    name = register_panoptic_dataset("user_bad_image_id", user_data["photos"], user_data["labels"], str(bad))
    with pytest.raises(DatasetError, match=r"panoptic.json: annotation 000001.png has image_id 77, which is not "
                                           r"in the JSON's 'images' list"):
        DatasetCatalog.get(name)


def test_bad_categories_name_the_source(user_data, tmp_path):
    with pytest.raises(DatasetError, match=r"categories: category id 1 appears twice"):
        register_panoptic_dataset("user_dup", user_data["photos"], user_data["labels"], user_data["json"],
                                  categories=[{"id": 1, "name": "a", "isthing": 1}, {"id": 1, "name": "b", "isthing": 0}])
    data = dict(user_data["data"], categories=[{"id": 1, "name": "a"}])
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"p.json: 'categories': a category lacks 'id', 'name' or 'isthing'"):
        register_panoptic_dataset("user_no_isthing", user_data["photos"], user_data["labels"], str(tmp_path / "p.json"))


def _standard_metadata(categories):
    """Detectron2's builtin "standard" panoptic metadata (builtin_meta, "coco_panoptic_standard")."""
    names, colors = [c["name"] for c in categories], [c["color"] for c in categories]
    return {"thing_classes": names, "thing_colors": colors, "stuff_classes": names, "stuff_colors": colors,
            "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories) if c["isthing"]},
            "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories) if not c["isthing"]}}


def _mask2former_metadata(categories):
    """Mask2Former's `register_coco_panoptic_annos_semseg.get_metadata()`: thing_classes lists the things
    only, stuff_dataset_id_to_contiguous_id every category ("to use the sem_seg evaluator")."""
    things = [c for c in categories if c["isthing"]]
    return {"thing_classes": [c["name"] for c in things], "thing_colors": [c["color"] for c in things],
            "stuff_classes": [c["name"] for c in categories], "stuff_colors": [c["color"] for c in categories],
            "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories) if c["isthing"]},
            "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)}}


def _register(convention, data, tmp_path):
    name = f"user_{convention}"
    if convention == "register_panoptic_dataset":
        return register_panoptic_dataset(name, data["photos"], data["labels"], data["json"],
                                         derive_instances_json=True)
    # Detectron2's registration function (Mask2Former's loader makes the same dicts), .jpg images
    metadata = (_standard_metadata if convention == "detectron2_standard" else _mask2former_metadata)(
        data["data"]["categories"])
    instances = panoptic_to_instances_json(data["json"], data["labels"], str(tmp_path / "instances.json"))
    register_coco_panoptic(name, metadata, data["jpg"], data["labels"], data["json"], instances)
    return name


def _ground_truth_pq(name):
    """COCOPanopticEvaluator (Detectron2) on the dataset's ground truth given as predictions."""
    evaluator = COCOPanopticEvaluator(name)
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        segments = [{"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]}
                    for s in d["segments_info"]]
        pan = torch.from_numpy(read_panoptic_png(d["pan_seg_file_name"]).astype(np.int32))
        evaluator.process([d], [{"panoptic_seg": (pan, segments)}])
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluator.evaluate()["panoptic_seg"]


@pytest.mark.parametrize("convention", ["register_panoptic_dataset", "detectron2_standard", "mask2former"])
def test_metadata_convention_trains_and_evaluates(convention, user_data, tmp_path):
    name = _register(convention, user_data, tmp_path)
    assert _ground_truth_pq(name)["PQ"] == pytest.approx(100.0)  # every IoU exactly 1: a float64 mean of 1s
    cfg = small_cfg("SOLVER.MAX_ITER", "1", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MIN_SIZE_TEST", "96",
                    "OUTPUT_DIR", str(tmp_path / "out"), train=(name,), test=(name,))
    trainer = Trainer(cfg)
    assert (trainer.model.thing_ids, trainer.model.stuff_ids) == (THING_IDS, STUFF_IDS)
    trainer.resume_or_load(resume=False)
    trainer.train()  # 1 iteration, then DefaultTrainer's final evaluation
    results = trainer._last_eval_results
    assert 0.0 <= results["panoptic_seg"]["PQ"] <= 100.0
    assert 0.0 <= results["segm"]["AP"] <= 100.0
    assert sorted(k for k in results["segm"] if k.startswith("AP-")) == \
        ["AP-circle", "AP-square", "AP-star", "AP-triangle"]


# ---------------------------------------------------------------------------------------------
# --eval-only checks the ground truth as training does
# ---------------------------------------------------------------------------------------------
def test_eval_only_rejects_a_png_segment_missing_from_the_json(user_data, tmp_path):
    data = json.loads(json.dumps(user_data["data"]))
    dropped = data["annotations"][0]["segments_info"].pop(0)["id"]
    bad = tmp_path / "panoptic.json"
    bad.write_text(json.dumps(data))
    name = register_panoptic_dataset("user_bad_gt", user_data["photos"], user_data["labels"], str(bad))
    args = default_argument_parser().parse_args([
        "--config-file", SHAPES_YAML, "--eval-only", "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", f"('{name}',)",
        "INPUT.MIN_SIZE_TEST", "128", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "out")])
    with pytest.raises(DatasetError, match=rf"000000.png: PNG segment id\(s\) \[{dropped}\] absent from the JSON"):
        train_net.main(args)
