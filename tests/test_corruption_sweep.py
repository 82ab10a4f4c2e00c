"""The corruption sweep (projects/benchmarks/corruption_sweep.py, paper Table 11) on the tiny `shapes`
split with a small saved model: every cell of its table, one forward pass for both post-processors,
resuming, the Table 11 layout, and its argument errors."""
import json
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import REPO_ROOT, small_cfg
from panoptic_segformer.data.corruptions import CORRUPTION_NAMES, SEVERITIES, TABLE11_CORRUPTIONS, TABLE11_GROUPS
from projects.benchmarks import compare_postprocessors as compare
from projects.benchmarks import corruption_sweep as sweep

SHAPES_YAML = os.path.join(REPO_ROOT, "configs/shapes/panoptic_segformer_shapes.yaml")
# small_cfg's test-time settings; confidence thresholds at 0 so that the random model outputs segments.
OPTS = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "256", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('shapes_panoptic_train_tiny',)",
        "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_THING", "0.0",
        "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_STUFF", "0.0"]
CORRUPTIONS, SEVS = ["gaussian_noise", "fog"], [1, 5]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A saved small model (random initialisation, seeded): the checkpoint the sweep loads."""
    torch.manual_seed(0)
    model = build_model(small_cfg("MODEL.DEVICE", "cpu"))
    folder = tmp_path_factory.mktemp("weights")
    DetectionCheckpointer(model, save_dir=str(folder)).save("model")
    return str(folder / "model.pth")


# Thresholds chosen on the first 2 images of DATASETS.TRAIN[0] (the tiny split has no registered held-out
# split), over a 2-value confidence grid: one tuning pass.
TUNE = ["--tune-images", "2", "--conf-grid", "0.0", "0.3", "--conf-only"]


def _argv(out_dir, weights, *extra):
    return ["--config-file", SHAPES_YAML, "--dataset", "shapes_panoptic_val_tiny", "--output-dir", str(out_dir),
            "--corruptions", *CORRUPTIONS, "--severities", *map(str, SEVS), "--max-images", "3", "--no-progress",
            *TUNE, *extra, *OPTS, "MODEL.WEIGHTS", weights]


def test_sweep_fills_every_cell_and_resumes(tmp_path, weights, capsys):
    summary = sweep.main(_argv(tmp_path, weights))
    with open(tmp_path / sweep.RESULTS_JSON) as f:
        results = json.load(f)
    keys = {"clean"} | {f"{n}/{s}" for n in CORRUPTIONS for s in SEVS}
    assert set(results["cells"]) == keys and results["runtime"]["computed_this_run"] == len(keys)
    assert results["skipped"] == {}
    # One set of thresholds, chosen on the clean tuning split and used in every cell.
    assert results["setup"]["thresholds"]["tune_dataset"] == "shapes_panoptic_train_tiny"
    chosen = results["thresholds"]
    assert set(chosen) == {"mask_wise", "pixel_argmax"}
    assert chosen["mask_wise"]["conf_threshold"] in (0.0, 0.3) and chosen["pixel_argmax"]["threshold"] in (0.0, 0.3)
    cfg = compare.comparison_cfg(sweep.parse_args(_argv(tmp_path, weights)))
    clean = compare.score_postprocessors(cfg, compare.load_model(cfg), "shapes_panoptic_val_tiny",
                                         compare.tuned_rows(cfg, chosen), max_images=3, progress=False)
    for pp, row in clean.items():
        assert results["cells"]["clean"]["results"][pp]["PQ"] == row["PQ"]  # same process and code path
    for cell in results["cells"].values():
        assert cell["images"] == 3 and set(cell["results"]) == {"mask_wise", "pixel_argmax"}
        for row in cell["results"].values():
            assert all(0.0 <= row[m] <= 100.0 for m in compare.METRICS)
    # The table: one row per post-processor, a number in every cell (Clean, Mean, each corruption).
    table = (tmp_path / sweep.TABLE_MD).read_text()
    assert "| post-processing | Clean | Mean | Gauss noise | Fog |" in table
    for pp in ("mask_wise", "pixel_argmax"):
        row = next(l for l in table.splitlines() if l.startswith(f"| {pp} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert len(cells) == 2 + len(CORRUPTIONS) and all(float(c) >= 0 for c in cells)
        s = summary[pp]
        pq = {k: c["results"][pp]["PQ"] for k, c in results["cells"].items()}
        assert s["clean"] == pq["clean"]
        # approx rel 1e-6: float64 means of 2 and 4 PQ values, summed in another order at most (~1e-16)
        assert s["corruptions"]["fog"]["mean"] == pytest.approx((pq["fog/1"] + pq["fog/5"]) / 2)
        assert s["mean"] == pytest.approx(sum(v for k, v in pq.items() if k != "clean") / 4)
    assert os.path.getsize(tmp_path / sweep.PLOT_PNG) > 10_000
    assert ("Thresholds, chosen by PQ on the clean shapes_panoptic_train_tiny (first 2 images) and used in every "
            f"cell: mask_wise: conf_threshold={chosen['mask_wise']['conf_threshold']:g}; pixel_argmax: ") in table
    # Running again computes nothing; dropping a cell recomputes only that cell, to the same numbers.
    sweep.main(_argv(tmp_path, weights))
    with open(tmp_path / sweep.RESULTS_JSON) as f:
        again = json.load(f)
    assert again["runtime"]["computed_this_run"] == 0 and again["cells"] == results["cells"]
    del again["cells"]["fog/5"]
    with open(tmp_path / sweep.RESULTS_JSON, "w") as f:
        json.dump(again, f)
    sweep.main(_argv(tmp_path, weights))
    with open(tmp_path / sweep.RESULTS_JSON) as f:
        resumed = json.load(f)
    assert resumed["runtime"]["computed_this_run"] == 1
    assert resumed["cells"]["fog/5"]["results"] == results["cells"]["fog/5"]["results"]
    assert resumed["cells"]["fog/1"] == results["cells"]["fog/1"]

    # Another setup in the same folder is an error, not a silent mix.
    with pytest.raises(ValueError, match=r"corruption_sweep.json: written by a sweep with another setup.*postprocessors"):
        sweep.main(_argv(tmp_path, weights, "--postprocessors", "mask_wise"))
    with pytest.raises(ValueError, match=r"another setup.*'thresholds'.*'original paper'"):
        sweep.main(_argv(tmp_path, weights, "--original-paper-thresholds"))


def test_one_forward_pass_per_image_feeds_both_postprocessors_with_the_corrupted_images(tmp_path, weights):
    """Per cell, the network runs once per image whatever the number of post-processors, on the
    corrupted images; the same cell run again sees the same pixels."""
    cfg = compare.comparison_cfg(sweep.parse_args(_argv(tmp_path, weights)))
    model = compare.load_model(cfg)
    seen = []  # per forward_outputs call: the batch's image tensor
    full_forward = []
    handle = model.register_forward_pre_hook(lambda *args: full_forward.append(1))
    original = model.forward_outputs
    model.forward_outputs = lambda images, **k: (seen.append(images.tensor.clone()), original(images, **k))[1]
    try:
        for _ in range(2):
            results = {"cells": {}}
            sweep.run_sweep(cfg, model, [("clean", 0), ("fog", 5)], ["mask_wise", "pixel_argmax"], results,
                            max_images=3, progress=False)
    finally:
        handle.remove()
        del model.forward_outputs
    assert len(seen) == 2 * 2 * 3 and not full_forward
    assert set(results["cells"]) == {"clean", "fog/5"}
    clean, fog = seen[0:3], seen[3:6]
    for a, b in zip(clean, fog):
        assert a.shape == b.shape and (a != b).float().mean() > 0.5
    for first, second in zip(seen[:6], seen[6:]):
        assert torch.equal(first, second)


def test_default_sweep_is_table11_and_the_table_has_its_columns():
    cells = sweep.plan_cells(TABLE11_CORRUPTIONS, SEVERITIES)
    assert len(cells) == 1 + 16 * 5 and cells[0] == ("clean", 0)
    assert set(TABLE11_CORRUPTIONS) <= set(CORRUPTION_NAMES)
    # Means of a sweep with every cell: PQ = 10 * severity + column index, known in closed form.
    pq = {name: {s: 10.0 * s + i for s in SEVERITIES} for i, name in enumerate(TABLE11_CORRUPTIONS)}
    results = {"cells": {"clean": {"results": {"mask_wise": {"PQ": 90.0}}}}}
    for name, by_sev in pq.items():
        for s, v in by_sev.items():
            results["cells"][f"{name}/{s}"] = {"results": {"mask_wise": {"PQ": v}}}
    skipped = {"frost": "FileNotFoundError: frost image missing"}
    summary = sweep.summarize(results, TABLE11_CORRUPTIONS, SEVERITIES, ["mask_wise"], skipped)
    used = [i for i, n in enumerate(TABLE11_CORRUPTIONS) if n != "frost"]
    # approx rel 1e-6: float64 means of small exact integers (<= 80 terms), closed form up to rounding
    assert summary["mask_wise"]["mean"] == pytest.approx(30.0 + sum(used) / len(used))
    assert summary["mask_wise"]["corruptions"]["fog"]["mean"] == pytest.approx(30.0 + TABLE11_CORRUPTIONS.index("fog"))
    table = sweep.format_markdown(summary, TABLE11_CORRUPTIONS, SEVERITIES, skipped)
    header = table.splitlines()[0]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:3] == ["post-processing", "Clean", "Mean"]
    assert columns[3:] == [sweep.SHORT_NAMES[n] for group in TABLE11_GROUPS.values() for n in group]
    row = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    assert row[1] == "90.0" and row[3 + TABLE11_CORRUPTIONS.index("frost")] == "skipped"
    assert "Skipped frost: FileNotFoundError: frost image missing" in table
    # A missing cell is an error, never a table with a hole.
    del results["cells"]["fog/3"]
    with pytest.raises(ValueError, match=r"lacks the cells \['fog/3'\]"):
        sweep.summarize(results, TABLE11_CORRUPTIONS, SEVERITIES, ["mask_wise"], skipped)


@pytest.mark.parametrize("extra, match", [
    (["--corruptions", "fogg"], r"unknown corruption 'fogg'"),
    (["--severities", "0"], r"must be an integer in 1-5, got 0"),
    (["--severities", "6"], r"must be an integer in 1-5, got 6"),
    (["--postprocessors", "argmax"], r"unknown post-processor\(s\) \['argmax'\]"),
    (["--max-images", "0"], r"--max-images must be >= 1"),
    (["TEST.CORRUPTION.NAME", "fog"], r"sets TEST.CORRUPTION for each cell itself"),
])
def test_bad_sweep_arguments_are_clear_errors(tmp_path, extra, match):
    argv = ["--config-file", SHAPES_YAML, "--output-dir", str(tmp_path), "--no-progress"]
    with pytest.raises(SystemExit, match=match):
        sweep.main(argv + extra)
