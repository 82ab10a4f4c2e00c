"""Multi-process training, evaluation and resume on the CPU: 2 real processes on the gloo backend.

What only a multi-process run exercises: the criterion's normalisers all-reduced across ranks, DDP
with every paper variant (an unused parameter fails the second iteration), evaluation gathered across
ranks, BatchNorm statistics shared by the ranks, checkpoints and metrics written by rank 0 only, and
``--resume`` after a killed run. The processes are started by tests/gloo_workers.py (as Detectron2's
``launch`` starts them; v0.6's ``launch`` cannot start CPU processes) and run train_net's ``main`` (the
function ``launch`` runs) or its ``Trainer``. The last test runs ``train_net.py --num-gpus 2`` itself
where the installed ``launch`` can start CPU processes (upstream main).
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser

import train_net
from panoptic_segformer.engine import Trainer
from conftest import REPO_ROOT, small_cfg
from gloo_workers import GlooWorkers

SHAPES = os.path.join(REPO_ROOT, "configs/shapes/panoptic_segformer_shapes.yaml")
# The shapes config at 96-128 px (as conftest.small_cfg) as train_net command-line overrides.
TINY = ["DATASETS.TRAIN", "('shapes_panoptic_train_tiny',)", "DATASETS.TEST", "('shapes_panoptic_val_tiny',)",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "128", "INPUT.RANDOM_FLIP", "none", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.STEPS", "()", "SEED", "1",
        # every query may form a segment: a model trained a few iterations has low class scores
        "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_THING", "0.0",
        "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_STUFF", "0.0"]
FOUR_IMAGES = ("shapes_ddp_four", "train", 4, 64, 3)  # register_shapes_panoptic arguments


def _register_four_images():
    from panoptic_segformer.data.datasets.register_shapes import register_shapes_panoptic

    return register_shapes_panoptic(*FOUR_IMAGES)


def _main(argv):
    """train_net.py's main (what Detectron2's launch runs in every process) on a command line."""
    _register_four_images()
    return train_net.main(default_argument_parser().parse_args(argv))


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _generate_datasets():
    """Generate the images once, before two processes read them."""
    for name in ("shapes_panoptic_train_tiny", "shapes_panoptic_val_tiny", _register_four_images()):
        DatasetCatalog.get(name)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Two gloo processes shared by the tests of this module (restarted if a test killed them)."""
    _generate_datasets()
    state = {"pool": None, "n": 0}

    def get():
        if state["pool"] is None or not state["pool"].alive():
            state["n"] += 1
            state["pool"] = GlooWorkers(2, str(tmp_path_factory.mktemp(f"gloo{state['n']}")))
        return state["pool"]

    yield get
    if state["pool"] is not None:
        state["pool"].close()


# ---------------------------------------------------------------------------------------------
# The same global batch gives the same losses with 1 and 2 processes.

def test_same_global_batch_gives_same_first_losses_on_one_and_two_processes(workers, tmp_path):
    """1 process x 4 images and 2 processes x 2 images (SOLVER.IMS_PER_BATCH is the global batch):
    equal first-iteration losses, which holds only if the criterion's normalisers (numbers of
    matched things, stuff, masks) are all-reduced across the processes."""
    dataset = _register_four_images()  # 4 images: the first batch of 4 is all of them in any order
    opts = TINY + ["DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "4",
                   "SOLVER.MAX_ITER", "1"]
    workers().run(_main, ["--config-file", SHAPES] + opts + ["OUTPUT_DIR", str(tmp_path / "two")])
    two = _metrics(tmp_path / "two")[-1]  # rank 0 logs the mean over the ranks

    from detectron2.utils.env import seed_all_rng

    cfg = small_cfg(*opts, "OUTPUT_DIR", str(tmp_path / "one"))
    seed_all_rng(cfg.SEED)  # as default_setup does for rank 0 (seed + rank)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    one = _metrics(tmp_path / "one")[-1]
    losses = sorted(k for k in one if k.startswith("loss_"))
    assert len(losses) > 10 and sorted(k for k in two if k.startswith("loss_")) == losses
    # float32 forward of batches of 2 vs 4 (other GEMM / conv blockings, synchronised BN statistics as a
    # mean over ranks), losses averaged over the ranks: rounding ~1e-6 relative, so rel 1e-4
    for k in losses + ["total_loss"]:
        assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-6), k


# ---------------------------------------------------------------------------------------------
# Every paper variant trains under DDP.

VARIANTS = ["panoptic_segformer_R50_box_free", "panoptic_segformer_R50_joint_matching",
            "panoptic_segformer_R50_no_deep_supervision", "panoptic_segformer_R50_locdec0",
            "panoptic_segformer_pvtv2_b0_24ep",
            # the official (released) architecture and objective; 2 images per process: the padded batch
            # with thing_query_valid and the things/stuff ratios all-reduced over the processes
            "official/official_r50_2x"]


def _tiny_variant_cfg(name, output_dir):
    """The COCO config `name` at shapes size (as tests/test_configs_build.py loads configs): its
    switches (box-free, joint matching, deep supervision, location-decoder depth, backbone family)
    unchanged; widths, depths, classes, data and schedule tiny; no pretrained weights."""
    from detectron2.config import get_cfg

    from panoptic_segformer import add_panoptic_segformer_config

    cfg = get_cfg()
    add_panoptic_segformer_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs/coco", name + ".yaml"))
    psf = cfg.MODEL.PANOPTIC_SEGFORMER
    cfg.merge_from_list(TINY + [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.TIMM.PRETRAINED_WEIGHTS", "",
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES", "4", "MODEL.PANOPTIC_SEGFORMER.NUM_STUFF_CLASSES", "3",
        "MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM", "32", "MODEL.PANOPTIC_SEGFORMER.NHEADS", "2",
        "MODEL.PANOPTIC_SEGFORMER.DIM_FEEDFORWARD", "64", "MODEL.PANOPTIC_SEGFORMER.ENC_LAYERS", "1",
        "MODEL.PANOPTIC_SEGFORMER.LOCATION_DECODER_LAYERS", str(min(psf.LOCATION_DECODER_LAYERS, 2)),
        "MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_LAYERS", str(min(psf.MASK_DECODER_LAYERS, 2)),
        "MODEL.PANOPTIC_SEGFORMER.STUFF_MASK_DECODER_LAYERS", str(min(psf.STUFF_MASK_DECODER_LAYERS, 2)),
        "SOLVER.IMS_PER_BATCH", "4" if name.startswith("official/") else "2",
        "MODEL.PANOPTIC_SEGFORMER.NUM_THING_QUERIES", "20", "MODEL.PANOPTIC_SEGFORMER.QUERY_FILTER.NUM_QUERIES", "15",
        "INPUT.CROP.ENABLED", "False", "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "2",
        "SOLVER.CHECKPOINT_PERIOD", "100000", "OUTPUT_DIR", output_dir,
    ])
    return cfg


def _train_variants(names, output_dir):
    """Train each variant 2 iterations with the project's Trainer (DDP); DDP without
    find_unused_parameters fails the 2nd iteration if a parameter got no gradient in the 1st."""
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng
    from torch.nn.parallel import DistributedDataParallel

    done = {}
    for name in names:
        cfg = _tiny_variant_cfg(name, os.path.join(output_dir, name))
        seed_all_rng(cfg.SEED + comm.get_rank())
        trainer = Trainer(cfg)
        assert isinstance(trainer.model, DistributedDataParallel), type(trainer.model)
        trainer.resume_or_load(resume=False)
        trainer.train()
        psf = cfg.MODEL.PANOPTIC_SEGFORMER
        done[name] = {"iter": trainer.iter, "box_free": psf.BOX_FREE, "decoupling": psf.QUERY_DECOUPLING,
                      "deep_supervision": psf.DEEP_SUPERVISION, "loc_layers": psf.LOCATION_DECODER_LAYERS,
                      "backbone": cfg.MODEL.BACKBONE.NAME, "criterion": type(trainer.model.module.criterion).__name__,
                      "images_per_process": cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()}
    return done


def test_every_paper_variant_trains_two_iterations_under_ddp(workers, tmp_path):
    (rank0, _), (rank1, _) = workers().run(_train_variants, VARIANTS, str(tmp_path))
    assert rank0 == rank1 and sorted(rank0) == sorted(VARIANTS)
    assert all(v["iter"] == 2 for v in rank0.values())  # iterations 0 and 1 done (TrainerBase ends at max_iter)
    # the variants differ from the paper's default in what they say they do
    assert rank0["panoptic_segformer_R50_box_free"]["box_free"]
    assert not rank0["panoptic_segformer_R50_joint_matching"]["decoupling"]
    assert not rank0["panoptic_segformer_R50_no_deep_supervision"]["deep_supervision"]
    assert rank0["panoptic_segformer_R50_locdec0"]["loc_layers"] == 0
    assert rank0["panoptic_segformer_pvtv2_b0_24ep"]["backbone"] == "build_timm_backbone"
    official = rank0["official/official_r50_2x"]
    assert official["criterion"] == "OfficialCriterion" and official["images_per_process"] == 2


# ---------------------------------------------------------------------------------------------
# A 2-process run killed after its first checkpoint, resumed with --resume, then evaluated.

MAX_ITER, CHECKPOINT_PERIOD = 5, 2  # checkpoints after iterations 1 and 3, model_final after 4
PQ_LINE = "copypaste: PQ,SQ,RQ"


def _run_opts(output_dir):
    return TINY + ["SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", str(CHECKPOINT_PERIOD),
                   "OUTPUT_DIR", str(output_dir)]


def _last_checkpoint(output_dir):
    try:
        with open(os.path.join(output_dir, "last_checkpoint")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


@pytest.fixture(scope="module")
def resumed_run(workers, tmp_path_factory):
    """Train with 2 processes, SIGKILL both once the first checkpoint is written, then resume with
    2 new processes (`train_net.py --resume`) to the end, which evaluates."""
    out = tmp_path_factory.mktemp("resumed")
    argv = ["--config-file", SHAPES] + _run_opts(out)
    pool = workers()
    pool.submit(_main, argv)
    deadline = time.monotonic() + 600
    while not _last_checkpoint(out) and pool.alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    pool.kill()
    killed_at = _last_checkpoint(out)
    assert killed_at, "no checkpoint before the kill:\n" + pool.logs()
    killed = {"checkpoint": killed_at, "final_exists": os.path.exists(out / "model_final.pth"),
              "writes": [pool.files_written(r) for r in range(2)]}

    pool = workers()  # the killed processes are replaced by 2 new ones
    (_, log0), (_, log1) = pool.run(_main, ["--resume"] + argv)
    return {"out": out, "killed": killed, "logs": (log0, log1), "writes": [pool.files_written(r) for r in range(2)]}


def _flat(results):
    """Evaluation results as Detectron2's EvalHook logs them ("panoptic_seg/PQ", ...); NaN -> None."""
    from detectron2.evaluation.testing import flatten_results_dict

    return {k: None if v != v else v for k, v in flatten_results_dict(results).items()}


def _end_of_training_results(output_dir):
    """The evaluation after the last iteration, from metrics.json (rank 0's EvalHook)."""
    last = _metrics(output_dir)[-1]
    return {k: None if v != v else v for k, v in last.items() if k.split("/")[0] in ("panoptic_seg", "segm")}


def test_killed_two_process_training_resumes_from_its_last_checkpoint(resumed_run):
    killed = resumed_run["killed"]
    assert killed["checkpoint"] == "model_0000001.pth" and not killed["final_exists"]  # killed mid-way
    log0, _ = resumed_run["logs"]
    # The checkpoint of iteration 1 is loaded and training continues with iteration 2 ...
    assert "Starting training from iteration 2" in log0, log0[-3000:]
    out = resumed_run["out"]
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == MAX_ITER - 1
    # ... with the LR schedule and the optimizer where they stopped: AdamW counted all 5 steps.
    assert final["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == MAX_ITER
    steps = {int(s["step"]) for s in final["trainer"]["_trainer"]["optimizer"]["state"].values()}
    assert steps == {MAX_ITER}
    rows = [r for r in _metrics(out) if "total_loss" in r]
    assert rows and max(r["iteration"] for r in rows) == MAX_ITER - 1
    assert "panoptic_seg/PQ" in _end_of_training_results(out)  # then it evaluated


def test_only_rank_0_writes_checkpoints_and_metrics(resumed_run):
    out = str(resumed_run["out"])
    killed, resumed = resumed_run["killed"]["writes"], resumed_run["writes"]
    # Checkpoints are written as ".<name>.incomplete" and renamed (panoptic_segformer.checkpoint.atomic_write).
    from panoptic_segformer.checkpoint import TEMP_SUFFIX

    def final_name(path):
        name = os.path.relpath(path, out)
        return name[1:-len(TEMP_SUFFIX)] if name.startswith(".") and name.endswith(TEMP_SUFFIX) else name

    names = [{final_name(p) for p in killed[r] + resumed[r] if p.startswith(out + os.sep)} for r in range(2)]
    rank0, rank1 = names
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth", "last_checkpoint", "metrics.json"} <= rank0
    assert not {n for n in rank1 if n.endswith(".pth") or n in ("last_checkpoint", "metrics.json", "config.yaml")
                or "tfevents" in n or "predictions" in n}, rank1
    # the end-of-training evaluation is printed once, by rank 0
    log0, log1 = resumed_run["logs"]
    assert log0.count(PQ_LINE) == 1 and PQ_LINE not in log1


def _predictions(output_dir, dataset="shapes_panoptic_val_tiny"):
    """Per image: the panoptic segments (ids, classes, scores) and the thing masks (RLE) with scores
    that the evaluators wrote (PQ is 0 after a few iterations; these are not)."""
    folder = os.path.join(output_dir, "inference", dataset)
    with open(os.path.join(folder, "predictions.json")) as f:
        panoptic = sorted(json.load(f)["annotations"], key=lambda a: a["image_id"])
    with open(os.path.join(folder, "coco_instances_results.json")) as f:
        things = sorted(json.load(f), key=lambda a: a["image_id"])  # stable: keeps each image's order
    assert sum(len(a["segments_info"]) for a in panoptic) > 0 and len(things) > 0
    return panoptic, things


def test_end_of_training_evaluation_equals_evaluation_of_the_saved_weights(workers, resumed_run, tmp_path):
    """Synchronised BatchNorm (the shapes config's naiveSyncBN): both processes hold the running
    statistics that model_final.pth holds, so evaluating model_final.pth with 2 processes gives
    exactly the end-of-training results and predictions."""
    out = resumed_run["out"]
    argv = ["--config-file", SHAPES, "--eval-only"] + _run_opts(tmp_path) + [
        "MODEL.WEIGHTS", str(out / "model_final.pth")]
    (results, log0), (_, log1) = workers().run(_main, argv)
    assert _flat(results) == _end_of_training_results(out)
    assert _predictions(tmp_path) == _predictions(out)
    assert log0.count(PQ_LINE) == 1 and PQ_LINE not in log1  # printed once


def test_two_process_evaluation_equals_one_process_evaluation(workers, resumed_run, tmp_path):
    """The same weights evaluated by 2 processes (each half of the images, gathered on rank 0) and
    by 1: the same PQ and the same predictions.

    The single process evaluates with 1 intra-op thread, like each of the 2 workers: every image then
    takes the same code path and summation order in both runs, so the discrete predictions (segment
    ids, classes, areas, boxes, mask RLEs) and hence PQ (a function of them alone) are equal by
    construction and are compared exactly. The float scores are compared within 1e-6 relative (float32
    rounding of Eq. 6's inputs, ~1e-7): equal here too, but exact float equality is not what evaluation
    promises across processes."""
    from detectron2.checkpoint import DetectionCheckpointer

    weights = str(resumed_run["out"] / "model_final.pth")
    (two, _), _ = workers().run(_main, ["--config-file", SHAPES, "--eval-only"] + _run_opts(tmp_path / "two")
                                + ["MODEL.WEIGHTS", weights])
    cfg = small_cfg(*_run_opts(tmp_path / "one"), "MODEL.WEIGHTS", weights)
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = Trainer.test(cfg, model)
    finally:
        torch.set_num_threads(threads)
    print("PQ with 1 and 2 processes:", one["panoptic_seg"]["PQ"], two["panoptic_seg"]["PQ"])
    assert two["panoptic_seg"] == one["panoptic_seg"]
    (pan_two, things_two), (pan_one, things_one) = _predictions(tmp_path / "two"), _predictions(tmp_path / "one")
    scores_two, scores_one = _pop_scores(pan_two, things_two), _pop_scores(pan_one, things_one)
    assert (pan_two, things_two) == (pan_one, things_one)
    # float32 rounding of Eq. 6's inputs (~1e-7 relative, see the docstring): rtol 1e-6
    torch.testing.assert_close(torch.tensor(scores_two, dtype=torch.float64),
                               torch.tensor(scores_one, dtype=torch.float64), rtol=1e-6, atol=0)


def _pop_scores(panoptic, things):
    """Removes the float "score" of every panoptic segment and thing result; returns them in order."""
    scores = [s.pop("score") for a in panoptic for s in a["segments_info"]]
    return scores + [r.pop("score") for r in things]


def _build_trainer_error(opts):
    try:
        Trainer(small_cfg(*opts))
    except ValueError as e:
        return str(e)
    return None


def test_plain_batch_norm_is_refused_with_two_processes(workers, tmp_path):
    """Plain BatchNorm keeps per-process statistics: with 2 processes the Trainer refuses it and
    names the fix (with 1 process it is plain BatchNorm, allowed)."""
    (err0, _), (err1, _) = workers().run(_build_trainer_error, ["MODEL.RESNETS.NORM", "BN",
                                                                "OUTPUT_DIR", str(tmp_path)])
    assert err0 == err1 and "BatchNorm layers keep per-process running statistics" in err0
    assert "MODEL.RESNETS.NORM" in err0 and "naiveSyncBN" in err0
    assert _build_trainer_error(["MODEL.RESNETS.NORM", "BN", "OUTPUT_DIR", str(tmp_path)]) is None


# ---------------------------------------------------------------------------------------------
# `train_net.py --num-gpus 2` as users run it, through Detectron2's launch.

def test_train_net_with_num_gpus_2_trains_and_evaluates_on_cpu(tmp_path):
    """Where the installed launch() starts CPU processes (upstream main: gloo); v0.6's launch asserts
    CUDA, and the tests above run the same main() in 2 gloo processes started by gloo_workers."""
    from gloo_workers import launch_starts_cpu_processes

    if not launch_starts_cpu_processes():
        pytest.skip("the installed Detectron2's launch() cannot start processes without CUDA (v0.6)")
    _generate_datasets()
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train_net.py"), "--num-gpus", "2", "--dist-url", "auto",
           "--config-file", SHAPES,
           *TINY, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count(PQ_LINE) == 1  # rank 0 prints the evaluation, once
    assert os.path.isfile(tmp_path / "model_final.pth") and "panoptic_seg/PQ" in _metrics(tmp_path)[-1]
