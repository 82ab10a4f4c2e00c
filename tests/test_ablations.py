"""The fair post-processor comparison (thresholds chosen on a held-out split) and the ablation command
(projects/benchmarks/ablations.py), on tiny images and schedules."""
import json
import os

import pytest
import torch
from detectron2.engine import DefaultPredictor

from conftest import small_cfg
from projects.benchmarks import ablations
from projects.benchmarks import compare_postprocessors as compare

TINY_OPTS = ["DATASETS.TRAIN", "('shapes_panoptic_train_tiny',)", "INPUT.MIN_SIZE_TRAIN", "(128,)",
             "INPUT.MAX_SIZE_TRAIN", "256", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "256",
             "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "MODEL.DEVICE", "cpu"]


@pytest.fixture(scope="module")
def model_and_cfg():
    torch.manual_seed(0)
    cfg = small_cfg()
    cfg.defrost()
    cfg.MODEL.PANOPTIC_SEGFORMER.TEST.INSTANCE_ON = False
    cfg.MODEL.PANOPTIC_SEGFORMER.TEST.SEMANTIC_ON = False
    cfg.freeze()
    return DefaultPredictor(cfg).model.eval(), cfg


def test_threshold_sweep_picks_the_best_setting_of_the_tuning_split(model_and_cfg):
    model, cfg = model_and_cfg
    # The heuristic's stuff threshold: 1.0 drops every stuff query (no probability reaches it), 0.0 keeps
    # them; the better value is listed second, so a picker that kept the first value would fail.
    grids = {"heuristic": [("stuff_threshold", (1.0, 0.0))], "pixel_argmax": [("threshold", (0.3,))]}
    table, tuning = compare.fair_comparison(cfg, model, "shapes_panoptic_val_tiny", ["heuristic", "pixel_argmax"],
                                            "shapes_panoptic_train_tiny", max_images=3, tune_images=3,
                                            grids=grids, progress=False)
    sweep = {s["value"]: s["PQ"] for s in tuning["heuristic"]["sweep"]}
    assert sweep[0.0] != sweep[1.0]  # the candidates differ on the tuning split
    best = max(sweep, key=sweep.get)
    assert tuning["heuristic"]["chosen"] == {"stuff_threshold": best}
    assert tuning["heuristic"]["tuned_PQ"] == sweep[best]
    # The sweep's score is the tuning split's own PQ at that setting (scored again, independently).
    again_pp = compare.build_postprocessor("heuristic", stuff_threshold=best)
    again = compare.score_postprocessors(cfg, model, "shapes_panoptic_train_tiny", {"h": again_pp},
                                         max_images=3, progress=False)["h"]
    assert again["PQ"] == sweep[best]  # same process, model and code path: bit-identical
    # Evaluation rows: the chosen values (scored on the evaluation split), and the shared t_cnf on each
    # confidence threshold.
    assert table["heuristic (tuned)"]["thresholds"] == {"stuff_threshold": best}
    on_eval = compare.score_postprocessors(cfg, model, "shapes_panoptic_val_tiny", {"h": again_pp},
                                           max_images=3, progress=False)["h"]
    assert table["heuristic (tuned)"]["PQ"] == on_eval["PQ"]
    assert table["pixel_argmax (shared t_cnf)"]["thresholds"] == {"threshold": 0.25}
    assert list(table) == ["heuristic (tuned)", "pixel_argmax (tuned)", "heuristic (shared t_cnf)",
                           "pixel_argmax (shared t_cnf)"]
    text = compare.format_table(table)
    assert f"| heuristic (tuned) | stuff_threshold={best:g} |" in text and "| threshold=0.3 |" in text
    with pytest.raises(ValueError, match="conf-grid"):
        compare.make_grids(["mask_wise"], conf_grid=[1.5])
    assert compare.make_grids(["mask_wise"], [0.1], conf_only=True) == {"mask_wise": [("conf_threshold", (0.1,))]}


def test_variant_plan_trains_the_base_depth_once():
    plan = ablations.plan_runs(["full", "loc0", "loc2", "box_free"], [1, 2], ["full"], base_location_layers=2)
    assert plan == {"full": {"trains": "full", "seeds": [1, 2]}, "loc0": {"trains": "loc0", "seeds": [1]},
                    "loc2": {"trains": "full", "seeds": [1, 2]}, "box_free": {"trains": "box_free", "seeds": [1]}}
    assert ablations.plan_runs(["loc6"], [1, 2], None, base_location_layers=2)["loc6"]["seeds"] == [1, 2]
    with pytest.raises(ValueError, match="unknown variant 'loc3'"):
        ablations.plan_runs(["loc3"], [1], None, base_location_layers=2)
    with pytest.raises(ValueError, match="distinct"):
        ablations.plan_runs(["full"], [1, 1], None, base_location_layers=2)


def test_ablations_run_end_to_end_and_resume_without_retraining(tmp_path):
    out = tmp_path / "abl"
    # Two variants of one trained model (loc2 is the shapes config's own depth) keep the test short;
    # which variants train is plan_runs' (tested above).
    argv = ["--output-dir", str(out), "--variants", "full", "loc2", "--seeds", "3", "--max-iter", "2",
            "--curve-points", "2", "--dataset", "shapes_panoptic_val_tiny", "--tune-dataset",
            "shapes_panoptic_train_tiny", "--tune-images", "2", "--max-images", "2",
            "--postprocessors", "mask_wise", "--conf-grid", "0.2", "--conf-only", "--opts", *TINY_OPTS]
    summary = ablations.main(argv)
    # loc2 is the shapes config's own depth: the full model, trained once.
    assert sorted(os.listdir(out)) == ["ablations.json", "ablations.md", "ablations.png", "full_seed3", "log.txt"]
    assert summary["loc2"]["trains"] == "full"
    data = json.loads((out / "ablations.json").read_text())
    full = data["runs"]["full"]["3"]
    assert [p["iteration"] for p in full["curve"]] == [1, 2]  # one point during training, the final one
    assert full["curve"][-1]["PQ"] == full["postprocessors"]["mask_wise (shared t_cnf)"]["PQ"]
    assert full["trained_mask_layers"] == 2
    assert full["mask_layers"]["1"] is not None and full["mask_layers"]["3"] is None
    assert full["postprocessors"]["mask_wise (tuned)"]["thresholds"] == {"conf_threshold": 0.2}
    md = (out / "ablations.md").read_text()
    for title in ("Table 6", "Table 7 / B.2", "Table 10"):
        assert title in md
    assert "| loc2 | 1 | 48.1 | 51.8 | 42.5 |" in md  # the paper's numbers beside these
    assert "n/a: more layers than the trained mask decoder has." in md
    weights, result = out / "full_seed3" / "model_final.pth", out / "full_seed3" / "result.json"
    stamps = weights.stat().st_mtime_ns, result.stat().st_mtime_ns
    again = ablations.main(argv)
    assert (weights.stat().st_mtime_ns, result.stat().st_mtime_ns) == stamps  # neither retrained nor rescored
    assert again == summary  # a resumed run reads as a fresh one (same keys and types)
    # Another setup in the same folder is an error naming the file.
    with pytest.raises(ValueError, match="result.json"):
        ablations.main([a if a != "0.2" else "0.3" for a in argv])
