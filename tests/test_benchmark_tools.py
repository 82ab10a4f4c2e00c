"""The measurement tools of projects/benchmarks: model_stats.py (parameters, GFLOPs,
FPS per stage, host syncs) and train_memory.py (training step memory and time), on a tiny config.

The flop handles are checked against the closed-form counts of multi-scale deformable attention
([12] Eq. 3: 4 bilinear MACs + 1 weighted-sum MAC per sampled value) and of the mask decoder's
cross-attention (projections, q.k^T for the maps, and the fused attention's q.k^T and A.v).
"""
import json
import os

import numpy as np
import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from conftest import REPO_ROOT
from panoptic_segformer.modeling.mask_decoder import MultiHeadCrossAttentionWithMaps
from panoptic_segformer.modeling.levels import LevelLayout
from panoptic_segformer.modeling.ms_deform_attn import MSDeformAttn
from projects.benchmarks import model_stats, train_memory

SHAPES_YAML = os.path.join(REPO_ROOT, "configs/shapes/panoptic_segformer_shapes.yaml")
TINY = ["MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM", "32", "MODEL.PANOPTIC_SEGFORMER.DIM_FEEDFORWARD", "64",
        "MODEL.PANOPTIC_SEGFORMER.NUM_THING_QUERIES", "12", "MODEL.PANOPTIC_SEGFORMER.QUERY_FILTER.NUM_QUERIES", "8",
        "DATASETS.TRAIN", "('shapes_panoptic_train_tiny',)", "DATASETS.TEST", "('shapes_panoptic_val_tiny',)"]


def _flops(module, inputs):
    analysis = FlopCountAnalysis(module, inputs)
    analysis.set_op_handle(**model_stats.EXTRA_FLOP_HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return analysis.total()


def test_msda_flops_count_sampling_and_weighted_sum():
    n, q, c, m, levels, p = 2, 7, 32, 4, 3, 2
    sizes = [(6, 8), (3, 4), (2, 2)]
    s = sum(h * w for h, w in sizes)
    attn = MSDeformAttn(c, levels, m, p).eval()

    class WithLayout(torch.nn.Module):  # the tracer takes tensors; the layout is built inside, as in the model
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, query, ref, x):
            return self.attn(query, ref, x, LevelLayout.from_sizes(sizes, query.shape[0]))

    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(n, q, c, generator=g), torch.rand(n, q, levels, 2, generator=g),
              torch.randn(n, s, c, generator=g))
    linear = n * s * c * c + n * q * c * (m * levels * p * 2) + n * q * c * (m * levels * p) + n * q * c * c
    core = 5 * n * m * (c // m) * q * levels * p  # per sampled value and channel: 4 bilinear + 1 weighted sum
    assert _flops(WithLayout().eval(), inputs) == linear + core


def test_cross_attention_flops_include_the_fused_attention():
    n, q, s, c, h = 1, 5, 40, 32, 4
    attn = MultiHeadCrossAttentionWithMaps(c, h, dropout=0.0).eval()
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(n, q, c, generator=g), torch.randn(n, s, c, generator=g))
    projections = n * (q * c * c + 2 * s * c * c + q * c * c)
    maps = n * h * q * s * (c // h)  # the returned pre-softmax maps
    fused = n * h * q * s * 2 * (c // h)  # scaled_dot_product_attention: q k^T and A v
    assert _flops(attn, inputs) == projections + maps + fused


def test_native_multi_head_attention_flops():
    b, length, e, heads = 2, 6, 32, 4
    mha = torch.nn.MultiheadAttention(e, heads, batch_first=True).eval()
    x = torch.randn(b, length, e)

    class SelfAttention(torch.nn.Module):  # q = k = v: nn.MultiheadAttention's fused inference path
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    with torch.no_grad():
        analysis = FlopCountAnalysis(SelfAttention(), (x,))
        analysis.set_op_handle(**model_stats.EXTRA_FLOP_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        total = analysis.total()
        assert set(analysis.by_operator()) == {"_native_multi_head_attention"}  # the fused op was traced
    assert total == b * (4 * length * e * e + 2 * length * length * e)


def test_model_stats_reports_params_flops_stages_and_syncs(tmp_path):
    out = tmp_path / "stats.json"
    report = model_stats.main([
        "--config-file", SHAPES_YAML, "--device", "cpu", "--image-size", "64x96", "--num-images", "1",
        "--per-stage", "--count-syncs", "--iters", "1", "--warmup", "0", "--mask-layers", "2,1",
        "--json", str(out), *TINY])
    assert json.loads(out.read_text())["params"]["total"] == report["params"]["total"]
    cfg = model_stats.bench_utils.random_init_cfg(SHAPES_YAML, TINY, "cpu")
    model = model_stats.bench_utils.build_model(cfg)
    assert report["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert sum(report["params"]["by_component"].values()) == report["params"]["total"]
    six, one = report["variants"]
    assert (six["mask_layers"], one["mask_layers"]) == (2, 1)
    for variant in (six, one):
        gflops = variant["gflops"]["per_image"][0]
        assert gflops["size"] == (64, 96)
        # float64 counts / 1e9, "other" = total - the rest: a few-term sum, far inside approx's rel 1e-6
        assert gflops["gflops"] == pytest.approx(sum(gflops["by_component"].values()))
        assert all(gflops["by_component"][k] > 0 for k in ("backbone", "encoder", "location_decoder",
                                                            "mask_decoder"))
        timing = variant["timing"][0]
        stages = timing["stages_ms"]
        assert list(stages)[:6] == list(model_stats.STAGES) and all(v >= 0 for v in stages.values())
        assert stages["of which panoptic merging"] <= stages["post-processing"]
        assert timing["fps"] == pytest.approx(1e3 / timing["mean_ms"])  # the tool's own float64 expression
        syncs = variant["host_syncs"]
        assert syncs["per_stage"]["channel mapper + encoder"] == 0 and syncs["per_stage"]["backbone"] == 0
        assert sum(v for k, v in syncs["per_stage"].items() if k in model_stats.STAGES) == syncs["total"]
    # One mask-decoder layer fewer: fewer mask-decoder flops, the rest unchanged.
    by6, by1 = six["gflops"]["per_image"][0]["by_component"], one["gflops"]["per_image"][0]["by_component"]
    assert by1["mask_decoder"] < by6["mask_decoder"] and by1["encoder"] == by6["encoder"]


def test_model_stats_rejects_bad_arguments():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        model_stats.main(["--config-file", "nope.yaml"])
    with pytest.raises(SystemExit):
        model_stats.parse_args(["--config-file", SHAPES_YAML, "--dtype", "fp8"])
    with pytest.raises(ValueError, match="KEY VALUE"):
        model_stats.main(["--config-file", SHAPES_YAML, "--no-flops", "MODEL.DEVICE"])
    with pytest.raises(FileNotFoundError, match="detectron2://"):
        model_stats.main(["--config-file", SHAPES_YAML, "--weights", "detectron2://ImageNetPretrained/x.pkl"])


def test_model_stats_loads_local_weights(tmp_path):
    cfg = model_stats.bench_utils.random_init_cfg(SHAPES_YAML, TINY, "cpu")
    model = model_stats.bench_utils.build_model(cfg, seed=3)
    torch.save({"model": model.state_dict()}, tmp_path / "w.pth")
    loaded = model_stats._build(cfg, str(tmp_path / "w.pth"))
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)  # saved, loaded: bits
    assert not torch.equal(model_stats._build(cfg, None).encoder.level_embed, model.encoder.level_embed)


def test_synthetic_batch_is_a_valid_panoptic_target():
    batch = train_memory.synthetic_batch(60, 90, thing_ids=[0, 1, 2], stuff_ids=[3, 4, 5, 6], num_things=6,
                                         num_stuff=3)
    things, stuff = batch["instances"], batch["stuff"]
    masks = torch.cat([things.gt_masks.tensor, stuff.gt_masks.tensor])
    assert batch["image"].shape == (3, 60, 90) and batch["image"].dtype == torch.uint8
    assert masks.sum(0).max() == 1 and masks.sum(0).min() == 1  # a partition of the image
    assert set(things.gt_classes.tolist()) <= {0, 1, 2} and len(things) >= 1
    assert stuff.gt_classes.tolist() == sorted(set(stuff.gt_classes.tolist())) and set(
        stuff.gt_classes.tolist()) <= {3, 4, 5, 6}
    boxes = things.gt_boxes.tensor
    for mask, box in zip(things.gt_masks.tensor, boxes):
        ys, xs = np.nonzero(mask.numpy())
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    with pytest.raises(ValueError, match="stuff"):
        train_memory.synthetic_batch(60, 90, [0], [3], num_things=1, num_stuff=2)


@pytest.mark.parametrize("query_filter", ["on", "off"])
def test_train_memory_step_runs_and_reports(query_filter):
    args = train_memory.parse_args(["--config-file", SHAPES_YAML, "--device", "cpu", "--image-size", "64x96",
                                    "--things", "3", "--stuff", "2", "--query-filter", query_filter, *TINY])
    args.steps, args.warmup, args.dtype = 1, 0, "fp32"
    result = train_memory.measure(args)
    assert np.isfinite(result["loss"]) and result["step_ms_mean"] > 0
    assert result["mask_decoder_thing_queries"] == (8 if query_filter == "on" else 12)
    assert 1 <= result["things"] <= 3 and result["stuff"] == 2
    assert result["peak_rss_gib"] >= result["peak_rss_growth_gib"] >= 0


def test_profile_inference_attributes_every_stage_and_operator(tmp_path):
    """profile_inference: every stage of model_stats has a profiler range with a time, its
    operators' self times fit inside it, and the heavy operators land in their stage."""
    from projects.benchmarks import profile_inference

    report = profile_inference.main(["--config-file", SHAPES_YAML, "--image-size", "96x128",
                                     "--json", str(tmp_path / "p.json")] + TINY)
    assert list(report["stages"]) == list(model_stats.STAGES)
    for name, stage in report["stages"].items():
        assert stage["ms"] > 0, name
        assert sum(op["self_ms"] for op in stage["ops"].values()) <= stage["ms"] * 1.01 + 0.5, name
    assert "aten::_embedding_bag_forward_only" in report["stages"]["channel mapper + encoder"]["ops"]  # MSDA core
    assert any("conv" in op for op in report["stages"]["backbone"]["ops"])
    assert json.load(open(tmp_path / "p.json"))["stages"].keys() == report["stages"].keys()


def test_inference_memory_reports_peak_outputs_and_read_masks(tmp_path):
    """inference_memory through DefaultPredictor: peak RSS at least the post-build RSS, outputs at
    the array's size, and the masks the post-processor read (all queries at t_cnf 0, none at 1)."""
    from projects.benchmarks import inference_memory

    out = str(tmp_path / "m.json")
    for conf in ("0.0", "1.0"):
        inference_memory.main(["--config-file", SHAPES_YAML, "--predictor", "--image-size", "60x90",
                               "--label", conf, "--json-append", out] + TINY
                              + ["MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_THING", conf,
                                 "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_STUFF", conf])
    runs = json.load(open(out))
    assert [r["label"] for r in runs] == ["0.0", "1.0"]
    for r in runs:
        assert r["peak_rss_gib"] >= r["rss_after_build_gib"] > 0
        assert r["outputs"]["sem_seg"][1:] == [60, 90]
    assert runs[0]["read_masks"] > 0 and runs[1]["read_masks"] == 0
    inference_memory.main(["--plot", out, "--out", str(tmp_path / "m.png")])
    assert os.path.getsize(tmp_path / "m.png") > 0


def test_overfit_benchmark_runs_and_reports(tmp_path):
    """`python -m projects.benchmarks.overfit` (the long learning checks, docs/INSTALL.md "Portability"), shortened to 2
    iterations: it trains, evaluates and reports each check, and fails on a missed target unless told not to."""
    from projects.benchmarks import overfit

    out = tmp_path / "overfit.json"
    argv = ["--checks", "coco2", "--max-iter", "2", "--output", str(tmp_path / "runs"), "--json", str(out)]
    # 2 iterations cannot halve the loss: the target is missed, and the command says so by its exit code.
    assert overfit.main(argv) == 1
    (row,) = json.loads(out.read_text())
    assert row["check"] == "coco2" and 0.0 <= row["PQ"] <= 100.0 and row["loss_first"] > 0
    assert row["passed"] is False
