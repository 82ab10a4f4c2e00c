"""Inference end to end (paper Sec. 3.5, Table 7): Detectron2's COCOPanopticEvaluator against
panopticapi, DefaultPredictor on the meta-architecture, empty results, the demo
(projects/demo/demo.py) and the post-processor comparison (projects/benchmarks/compare_postprocessors.py).

Models are the small CPU `shapes` model at random initialisation (class heads sized for COCO's 133
classes where the COCO sample is used)."""
import contextlib
import copy
import io
import json
import logging
import math
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.evaluation import COCOPanopticEvaluator
from panopticapi.evaluation import pq_compute
from panopticapi.utils import id2rgb
from PIL import Image
from scipy import ndimage

from conftest import REPO_ROOT, small_cfg
from panoptic_segformer.data.io import read_image_rgb, read_panoptic_png
from panoptic_segformer.postprocessing import (
    OfficialMerging,
    build_postprocessor,
    mask_confidence_scores,
    registered_postprocessors,
)
from projects.benchmarks import compare_postprocessors as compare
from projects.demo import demo

COCO_CLASSES = ("MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES", "80",
                "MODEL.PANOPTIC_SEGFORMER.NUM_STUFF_CLASSES", "53")
NO_THRESHOLD = ("MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_THING", "0.0",
                "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_STUFF", "0.0")
# small_cfg's test-time settings, as command-line overrides for the scripts.
SCRIPT_OPTS = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "256", "DATALOADER.NUM_WORKERS", "0",
               "MODEL.DEVICE", "cpu"]
SHAPES_YAML = os.path.join(REPO_ROOT, "configs/shapes/panoptic_segformer_shapes.yaml")


def coco_cfg(*opts):
    """The small shapes model with COCO's 80 + 53 classes, testing on coco_panoptic_sample."""
    return small_cfg("MODEL.DEVICE", "cpu", *COCO_CLASSES, *opts, train=(), test=("coco_panoptic_sample",))


@pytest.fixture(scope="module")
def coco_dicts(coco_sample_root):
    return DatasetCatalog.get("coco_panoptic_sample")


@pytest.fixture(scope="module")
def predictor(coco_sample_root):
    """DefaultPredictor of a random small model with t_cnf = 0, so that segments exist."""
    torch.manual_seed(0)
    return DefaultPredictor(coco_cfg(*NO_THRESHOLD))


# ---------------------------------------------------------------------------------------------
# COCOPanopticEvaluator vs panopticapi on the COCO sample
# ---------------------------------------------------------------------------------------------
def _ground_truth_outputs(root):
    """{image_id: (file_name, pan (H, W) int64, segments_info with contiguous ids + isthing)} from
    the sample's panoptic PNGs and JSON, mapped to contiguous ids through the dataset metadata."""
    meta = MetadataCatalog.get("coco_panoptic_sample")
    with open(meta.panoptic_json) as f:
        gt = json.load(f)
    out = {}
    for ann in gt["annotations"]:
        pan = read_panoptic_png(os.path.join(meta.panoptic_root, ann["file_name"]))
        segments = []
        for s in ann["segments_info"]:
            isthing = s["category_id"] in meta.thing_dataset_id_to_contiguous_id
            table = meta.thing_dataset_id_to_contiguous_id if isthing else meta.stuff_dataset_id_to_contiguous_id
            segments.append({"id": s["id"], "category_id": table[s["category_id"]], "isthing": isthing})
        image = next(i for i in gt["images"] if i["id"] == ann["image_id"])
        out[ann["image_id"]] = (os.path.join(root, "images", image["file_name"]), pan, segments)
    return out


def _evaluate(predictions):
    evaluator = COCOPanopticEvaluator("coco_panoptic_sample")
    evaluator.reset()
    for image_id, (file_name, pan, segments) in predictions.items():
        output = {"panoptic_seg": (torch.from_numpy(pan.astype(np.int32)), copy.deepcopy(segments))}
        evaluator.process([{"file_name": file_name, "image_id": image_id}], [output])
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluator.evaluate()["panoptic_seg"]


def test_evaluator_scores_ground_truth_as_predictions_pq_100(coco_sample_root):
    res = _evaluate(_ground_truth_outputs(coco_sample_root))
    for key in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"):
        assert res[key] == pytest.approx(100.0, abs=1e-9), key  # every IoU exactly 1: float64 means of 1s


def test_evaluator_equals_pq_compute_on_perturbed_predictions(coco_sample_root, tmp_path):
    meta = MetadataCatalog.get("coco_panoptic_sample")
    predictions = _ground_truth_outputs(coco_sample_root)
    (a_id, (a_file, a_pan, a_segs)), (b_id, (b_file, b_pan, b_segs)) = sorted(predictions.items())
    # Image A: one thing removed (void), one thing relabelled to another thing class.
    removed = next(s for s in a_segs if s["isthing"])
    a_pan[a_pan == removed["id"]] = 0
    a_segs.remove(removed)
    relabelled = next(s for s in a_segs if s["isthing"] and s["category_id"] != removed["category_id"])
    relabelled["category_id"] = next(c for c in meta.thing_dataset_id_to_contiguous_id.values()
                                     if c != relabelled["category_id"])
    # Image B: the largest stuff segment eroded (border pixels become void), one stuff removed.
    stuff = sorted((s for s in b_segs if not s["isthing"]), key=lambda s: -(b_pan == s["id"]).sum())
    mask = b_pan == stuff[0]["id"]
    b_pan[mask & ~ndimage.binary_erosion(mask, iterations=6)] = 0
    b_pan[b_pan == stuff[-1]["id"]] = 0
    b_segs.remove(stuff[-1])

    res = _evaluate(predictions)

    # The same predictions as files, scored by panopticapi directly.
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    contiguous_to_dataset = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    stuff_to_dataset = {v: k for k, v in meta.stuff_dataset_id_to_contiguous_id.items()}
    annotations = []
    for image_id, (file_name, pan, segments) in predictions.items():
        png = os.path.splitext(os.path.basename(file_name))[0] + ".png"
        Image.fromarray(id2rgb(pan)).save(pred_dir / png)
        annotations.append({"image_id": image_id, "file_name": png, "segments_info": [
            {"id": s["id"], "category_id": (contiguous_to_dataset if s["isthing"] else stuff_to_dataset)[
                s["category_id"]]} for s in segments]})
    pred_json = tmp_path / "pred.json"
    pred_json.write_text(json.dumps({"annotations": annotations}))
    with contextlib.redirect_stdout(io.StringIO()):
        ref = pq_compute(meta.panoptic_json, str(pred_json), gt_folder=meta.panoptic_root,
                         pred_folder=str(pred_dir))
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for metric in ("pq", "sq", "rq"):
            # Detectron2's evaluator runs the same float64 pq_compute on the same segments: rounding only
            assert res[metric.upper() + suffix] == pytest.approx(100 * ref[group][metric], rel=1e-9)
    assert res["PQ_th"] < 100 and res["PQ_st"] < 100 and res["RQ_th"] < 100 and res["SQ_st"] < 100


# ---------------------------------------------------------------------------------------------
# DefaultPredictor and batched forward
# ---------------------------------------------------------------------------------------------
def _check_output(out, height, width, num_classes):
    pan, segments = out["panoptic_seg"]
    assert pan.shape == (height, width) and pan.dtype == torch.int32
    assert sorted(set(pan.unique().tolist()) - {0}) == [s["id"] for s in segments]
    assert out["instances"].image_size == (height, width)
    assert out["instances"].pred_masks.shape[1:] == (height, width)
    assert out["sem_seg"].shape == (num_classes, height, width)


def test_default_predictor_unchanged_on_bgr_image(predictor, coco_dicts):
    bgr = cv2.imread(coco_dicts[0]["file_name"])
    h, w = bgr.shape[:2]
    out = predictor(bgr)  # resized to 128 px inside, results at the original size
    _check_output(out, h, w, 133)
    assert len(out["panoptic_seg"][1]) > 0  # t_cnf = 0: the random model's masks do show


def test_batch_of_two_different_size_images(predictor, coco_dicts):
    model = predictor.model
    inputs = []
    for d, size in zip(coco_dicts, ((128, 192), (96, 160))):
        bgr = read_image_rgb(d["file_name"], "BGR")
        small = cv2.resize(bgr, size[::-1], interpolation=cv2.INTER_AREA)
        inputs.append({"image": torch.as_tensor(small[:, :, ::-1].transpose(2, 0, 1).copy()).float(),
                       "height": size[0] + 7, "width": size[1] - 5})  # outputs resized to these
    with torch.no_grad():
        batched = model(inputs)
        alone = model(inputs[:1])  # the first image sets the padded size of the batch
    assert len(batched) == 2
    for x, out in zip(inputs, batched):
        _check_output(out, x["height"], x["width"], 133)
    # float32, batch of 2 vs 1 at the same padded size: other GEMM blockings, ~1e-6 rounding carried through
    # the layers into probabilities in [0, 1]: 1e-4
    torch.testing.assert_close(batched[0]["sem_seg"], alone[0]["sem_seg"], atol=1e-4, rtol=1e-4)


def test_no_confident_segment_gives_an_empty_valid_result(predictor, coco_dicts):
    strict = DefaultPredictor(coco_cfg("MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_THING", "1.0",
                                       "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_STUFF", "1.0"))
    strict.model.load_state_dict(predictor.model.state_dict())  # same weights as `predictor`
    bgr = cv2.imread(coco_dicts[1]["file_name"])
    h, w = bgr.shape[:2]
    assert len(predictor(bgr)["panoptic_seg"][1]) > 0
    out = strict(bgr)
    pan, segments = out["panoptic_seg"]
    assert segments == [] and pan.shape == (h, w) and pan.dtype == torch.int32
    assert not pan.any()
    _check_output(out, h, w, 133)


# ---------------------------------------------------------------------------------------------
# Demo
# ---------------------------------------------------------------------------------------------
def _synthetic_predictions(seed, num_things=12, num_stuff=3, size=(40, 56), things=4):
    """Per-query predictions shaped like the model's (decoupled: one stuff query per class):
    thing masks are soft discs, stuff masks smooth random fields."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    ys, xs = torch.arange(h).view(1, -1, 1).float(), torch.arange(w).view(1, 1, -1).float()
    cy, cx = torch.rand(num_things, 1, 1, generator=g) * h, torch.rand(num_things, 1, 1, generator=g) * w
    radius = 3 + torch.rand(num_things, 1, 1, generator=g) * h / 4
    thing_logits = 6 * (1 - ((ys - cy) ** 2 + (xs - cx) ** 2) / radius ** 2)
    coarse = torch.randn(1, num_stuff, 3, 4, generator=g) * 4
    stuff_logits = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]
    logits = torch.cat([thing_logits, stuff_logits])
    class_probs = 0.2 + 0.8 * torch.rand(num_things + num_stuff, generator=g)
    labels = torch.cat([torch.randint(0, things, (num_things,), generator=g),
                        torch.arange(things, things + num_stuff)])
    return logits.sigmoid(), class_probs, labels, labels < things, logits


@pytest.mark.parametrize("name", registered_postprocessors())
def test_trace_segment_queries_finds_the_query_of_each_segment(name):
    lower = {"pixel_argmax": {"threshold": 0.3}, "pixel_argmax_prob": {"object_mask_threshold": 0.3}}
    postprocessor = build_postprocessor(name, **lower.get(name, {}))
    checked = 0
    for seed in range(4):
        probs, class_probs, labels, is_thing, logits = _synthetic_predictions(seed)
        pan, segments = postprocessor(probs, class_probs, labels, is_thing, mask_logits=logits)
        traced = demo.trace_segment_queries(postprocessor, pan, segments, probs, class_probs, labels,
                                            is_thing, mask_logits=logits)
        assert sorted(traced) == [s["id"] for s in segments]
        queries = [q for s in segments for q in traced[s["id"]]]
        assert len(queries) == len(set(queries))  # no query in two segments
        for s in segments:
            (q,) = traced[s["id"]]  # decoupled: one query per segment
            assert int(labels[q]) == s["category_id"] and bool(is_thing[q]) == s["isthing"]
            inside = pan == s["id"]
            if name == "mask_wise":  # kept pixels lie in the query's binary mask; score = Eq. (6)
                assert bool((probs[q][inside] > 0.5).all())
                binary = probs[q] > 0.5
                s_q = mask_confidence_scores(class_probs[q:q + 1], binary.sum().view(1),
                                             (probs[q] * binary).sum().double().view(1))
                # float32 sums of <= 2240 probabilities (row sums vs one sum, ~1e-7), squared by Eq. 6: rel 1e-6
                assert s["score"] == pytest.approx(float(s_q), rel=1e-6)
            elif name == "pixel_argmax_prob":
                assert bool((probs[q][inside] >= 0.5).all())
            checked += 1
    assert checked >= 8


def test_trace_lists_every_stuff_query_of_a_merged_stuff_segment():
    """Joint matching: two queries predicting one stuff class form one segment; both are listed,
    best (class probability x mean mask probability over the segment) first."""
    probs, class_probs, labels, is_thing, _ = _synthetic_predictions(0)
    stuff = (~is_thing).nonzero().flatten()
    labels[stuff[1]] = labels[stuff[0]]  # two queries now predict the first stuff class
    class_probs[stuff[:2]] = torch.tensor([0.9, 0.95])
    postprocessor = build_postprocessor("mask_wise")
    pan, segments = postprocessor(probs, class_probs, labels, is_thing)
    traced = demo.trace_segment_queries(postprocessor, pan, segments, probs, class_probs, labels, is_thing)
    (merged,) = [s for s in segments if s["category_id"] == int(labels[stuff[0]])]
    inside = pan == merged["id"]
    rank = [float(class_probs[q] * probs[q][inside].mean()) for q in stuff[:2]]
    expected = [int(q) for _, q in sorted(zip(rank, stuff[:2].tolist()), reverse=True)]
    assert traced[merged["id"]] == expected


def test_predict_with_attention_reproduces_the_predictor_and_reshapes_level_1(predictor, coco_dicts):
    bgr = read_image_rgb(coco_dicts[0]["file_name"], "BGR")
    run = demo.predict_with_attention(predictor, bgr)
    expected = predictor(bgr)["panoptic_seg"]
    assert torch.equal(run["predictions"]["panoptic_seg"][0], expected[0])
    assert run["predictions"]["panoptic_seg"][1] == expected[1]
    seg = expected[1][0]
    (query,) = run["segment_queries"][seg["id"]]
    maps = demo.query_attention_maps(run["outputs"], run["images"], query)
    h, w = run["images"].image_sizes[0]  # 128 x 192 after the predictor's resize
    psf = predictor.cfg.MODEL.PANOPTIC_SEGFORMER
    assert maps.shape == (psf.MASK_DECODER_LAYERS, psf.NHEADS, math.ceil(h / 8), math.ceil(w / 8))
    last = run["outputs"]["mask"][-1]
    w1 = last["pred_masks"].shape[-1]
    np.testing.assert_array_equal(maps[-1, 1, 2, :5], last["attention"][0, 1, query, 2 * w1:2 * w1 + 5].numpy())


def _write_odd_images(folder):
    """Grayscale, RGBA, 16-bit, very wide and too-small images, from a shapes image."""
    base = np.asarray(Image.open(DatasetCatalog.get("shapes_panoptic_val_tiny")[0]["file_name"]).convert("RGB"))
    paths = {
        "gray": folder / "gray.png", "rgba": folder / "rgba.png", "sixteen": folder / "sixteen.png",
        "wide": folder / "wide.png", "tiny": folder / "tiny.png",
    }
    Image.fromarray(base).convert("L").save(paths["gray"])
    Image.fromarray(np.dstack([base, np.full(base.shape[:2], 200, np.uint8)])).save(paths["rgba"])
    Image.fromarray((base[..., 0].astype(np.uint16) * 257)).save(paths["sixteen"])
    Image.fromarray(np.tile(base, (1, 33, 1))[:, :4100]).save(paths["wide"])  # 128 x 4100
    Image.fromarray(base[:20, :20]).save(paths["tiny"])
    return paths


def test_demo_writes_drawn_images_attention_grids_and_reports_bad_files(coco_dicts, tmp_path, caplog):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    out_dir = tmp_path / "out"
    argv = ["--config-file", SHAPES_YAML, "--input", os.path.join(os.path.dirname(coco_dicts[0]["file_name"]), "*.jpg"),
            str(bad), "--output", str(out_dir), "--confidence-threshold", "0", "--show-attention",
            "--attention-segments", "2", "--opts", *SCRIPT_OPTS, *COCO_CLASSES,
            "DATASETS.TRAIN", "()", "DATASETS.TEST", "('coco_panoptic_sample',)"]
    with caplog.at_level(logging.ERROR, logger=demo.logger.name):
        assert demo.main(argv) == 1  # the bad file fails the run, after the others are written
    assert str(bad) in caplog.text and "cannot read image" in caplog.text
    for d in coco_dicts:
        stem = os.path.splitext(os.path.basename(d["file_name"]))[0]
        drawn = cv2.imread(str(out_dir / f"{stem}.png"))
        assert drawn.shape == cv2.imread(d["file_name"]).shape
        grids = sorted((out_dir / f"{stem}_attention").glob("segment*_query*.png"))
        assert 1 <= len(grids) <= 2
        assert cv2.imread(str(grids[0])) is not None
    assert sorted(p.name for p in out_dir.glob("*.png")) == sorted(
        os.path.splitext(os.path.basename(d["file_name"]))[0] + ".png" for d in coco_dicts)


def test_demo_reads_unusual_images_and_rejects_too_small_ones(tmp_path, caplog):
    paths = _write_odd_images(tmp_path)
    out_dir = tmp_path / "out"
    argv = ["--config-file", SHAPES_YAML, "--input", *map(str, paths.values()), "--output", str(out_dir),
            "--opts", *SCRIPT_OPTS, "DATASETS.TRAIN", "()", "DATASETS.TEST", "('shapes_panoptic_val_tiny',)"]
    with caplog.at_level(logging.ERROR, logger=demo.logger.name):
        assert demo.main(argv) == 1
    assert str(paths["tiny"]) in caplog.text and "smaller than the minimum" in caplog.text
    for name in ("gray", "rgba", "sixteen", "wide"):
        drawn = cv2.imread(str(out_dir / f"{name}.png"))
        assert drawn.shape[:2] == cv2.imread(str(paths[name]), cv2.IMREAD_UNCHANGED).shape[:2], name
    assert not (out_dir / "tiny.png").exists()


def test_demo_writes_an_mp4_of_drawn_frames(tmp_path):
    frames = [np.asarray(Image.open(d["file_name"]).convert("RGB"))[:, :, ::-1]
              for d in DatasetCatalog.get("shapes_panoptic_val_tiny")[:3]]
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, frames[0].shape[1::-1])
    for f in frames:
        writer.write(np.ascontiguousarray(f))
    writer.release()
    argv = ["--config-file", SHAPES_YAML, "--video-input", str(video), "--output", str(tmp_path / "out"),
            "--opts", *SCRIPT_OPTS, "DATASETS.TRAIN", "()", "DATASETS.TEST", "('shapes_panoptic_val_tiny',)"]
    assert demo.main(argv) == 0
    result = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    assert int(result.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    ok, frame = result.read()
    result.release()
    assert ok and frame.shape == frames[0].shape


# ---------------------------------------------------------------------------------------------
# Post-processor comparison
# ---------------------------------------------------------------------------------------------
def test_one_forward_pass_per_postprocessor_matches_the_models_own_inference(coco_dicts):
    torch.manual_seed(0)
    cfg = small_cfg(*NO_THRESHOLD)
    model = DefaultPredictor(cfg).model
    d = DatasetCatalog.get("shapes_panoptic_val_tiny")[0]
    image = read_image_rgb(d["file_name"], "RGB")
    inputs = [{"image": torch.as_tensor(image.transpose(2, 0, 1).copy()), "height": 100, "width": 90}]
    names = registered_postprocessors()
    timed = {n: compare.TimedPostProcessor(model.postprocessor if n == "mask_wise" else build_postprocessor(n))
             for n in names}
    results = compare.predict_with_postprocessors(model, inputs, timed)
    with torch.no_grad():
        reference = model(inputs)[0]
    own = results["mask_wise"][0]["panoptic_seg"]
    assert torch.equal(own[0], reference["panoptic_seg"][0]) and own[1] == reference["panoptic_seg"][1]
    assert len(own[1]) > 0
    assert model.postprocessor is timed["mask_wise"].postprocessor  # restored
    for n in names:
        assert len(timed[n].times_ms) == 1
        assert results[n][0]["panoptic_seg"][0].shape == (100, 90)
    # The wrapper forwards the post-processor's members: "official" keeps its own resize and masks.
    assert timed["official"].masks_to_image is OfficialMerging.masks_to_image
    plain = compare.predict_with_postprocessors(model, inputs, {"official": OfficialMerging()})["official"][0]
    assert torch.equal(plain["panoptic_seg"][0], results["official"][0]["panoptic_seg"][0])
    assert torch.equal(plain["instances"].scores, results["official"][0]["instances"].scores)


def test_compare_postprocessors_prints_a_row_per_postprocessor(capsys):
    # The original papers' thresholds (no tuning; the fair comparison is tested in test_ablations.py).
    argv = ["--config-file", SHAPES_YAML, "--dataset", "shapes_panoptic_val_tiny", "--original-paper-thresholds",
            *SCRIPT_OPTS, "DATASETS.TRAIN", "('shapes_panoptic_train_tiny',)", "SEED", "1"]
    table = compare.main(argv)
    captured = capsys.readouterr()
    printed = captured.out
    assert "shapes_panoptic_val_tiny: 100%" in captured.err and "8/8" in captured.err  # tqdm progress
    assert list(table) == registered_postprocessors()
    for name, row in table.items():
        assert row["images"] == 8 and row["merge_ms"] > 0
        for key in compare.METRICS:
            assert 0.0 <= row[key] <= 100.0
        line = next(l for l in printed.splitlines() if l.startswith(f"| {name} |"))
        assert len(line.strip("|").split("|")) == 8
    assert "| post-processing | thresholds | PQ | SQ | RQ | PQ^th | PQ^st |" in printed
    assert "| pixel_argmax | threshold=0.85 |" in printed and "| pixel_argmax_prob | object_mask_threshold=0.8 |" in printed
    assert "original papers' thresholds" in printed
    assert all(row["setting"] == "original paper" for row in table.values())
