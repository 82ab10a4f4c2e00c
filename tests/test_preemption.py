"""Preemption-safe training: real signals stop training at an iteration boundary with a checkpoint, and
``--resume`` ends with the weights, optimizer state, LR schedule, metrics and evaluation of the
uninterrupted run, bit for bit (same processes, same thread count: 1), with 1 and with 2 gloo processes.

One run per process count is interrupted again and again, each time resumed with ``--resume``: SIGTERM
in the middle of an iteration (on one rank only with 2 processes) and again while the checkpoint is
written, SIGTERM during the evaluation, SIGTERM while the periodic checkpoint is written, a full disk
(ENOSPC from the checkpoint writer) and SIGKILL while the final checkpoint is written, SIGKILL in the middle
of an iteration (2 processes), and a resume where rank 1 has no copy of the checkpoints (no shared
OUTPUT_DIR). The signals are sent by the processes to themselves from inside the code they interrupt (a
forward pre-hook, the checkpoint writer), so that each lands at a known point. The data: two shapes splits
of different aspect ratios (aspect-ratio grouping keeps partly filled buckets across checkpoints),
multi-scale resize and flip, dropout 0.1, and one DataLoader worker in one segment of the one-process run,
none in the others (changing the number of workers at resume is exact too). ``train_net.py`` itself is run once and sent SIGTERM from
outside: it exits with code 75.
"""
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO_ROOT
from gloo_workers import GlooWorkers

SHAPES = os.path.join(REPO_ROOT, "configs/shapes/panoptic_segformer_shapes.yaml")
DATASETS = [("shapes_preempt_square", "train", 4, 64, 11), ("shapes_preempt_wide", "train", 4, (48, 80), 12),
            ("shapes_preempt_val", "val", 2, 64, 13)]
MAX_ITER, CHECKPOINT_PERIOD, EVAL_PERIOD = 7, 3, 4  # checkpoints after 2, 5 and 6 (final); evaluation after 3 and 6
OPTS = ["DATASETS.TRAIN", "('shapes_preempt_square', 'shapes_preempt_wide')", "DATASETS.TEST", "('shapes_preempt_val',)",
        "INPUT.MIN_SIZE_TRAIN", "(48, 64)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "96", "INPUT.RANDOM_FLIP", "horizontal", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.STEPS", "()", "SEED", "7", "SOLVER.CPU_THREADS", "1", "SOLVER.MAX_ITER", str(MAX_ITER),
        "SOLVER.CHECKPOINT_PERIOD", str(CHECKPOINT_PERIOD), "TEST.EVAL_PERIOD", str(EVAL_PERIOD),
        "MODEL.PANOPTIC_SEGFORMER.DROPOUT", "0.1", "MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM", "32",
        "MODEL.PANOPTIC_SEGFORMER.NHEADS", "2", "MODEL.PANOPTIC_SEGFORMER.DIM_FEEDFORWARD", "64",
        "MODEL.PANOPTIC_SEGFORMER.ENC_LAYERS", "1", "MODEL.PANOPTIC_SEGFORMER.LOCATION_DECODER_LAYERS", "1",
        "MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_LAYERS", "1", "MODEL.BACKBONE.FREEZE_AT", "5",
        "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_THING", "0.0",
        "MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_STUFF", "0.0", "MODEL.PANOPTIC_SEGFORMER.TEST.INSTANCE_ON", "False"]


def _register():
    from panoptic_segformer.data.datasets.register_shapes import register_shapes_panoptic

    for spec in DATASETS:
        register_shapes_panoptic(*spec)


def _train(output_dir, resume, workers, inject=None, rank_output_dirs=None):
    """train_net.main's training (setup, Trainer, resume_or_load, train) in a gloo worker, with `inject`:
    ``{rank: [(where, what, when), ...]}``: ``where`` "forward" (a training forward of iteration ``when``), "eval"
    (the first evaluation forward) or "write" (the ``when``-th checkpoint write of this segment, once half
    written); ``what`` a signal number, or "ENOSPC". Returns ``{"preempted": (code, iteration) or None}``.
    `rank_output_dirs`: an OUTPUT_DIR per rank (no shared filesystem)."""
    from detectron2.engine import default_argument_parser
    from detectron2.utils import comm

    import panoptic_segformer.checkpoint as ckpt
    import train_net
    from panoptic_segformer.resume import TrainingPreempted

    _register()
    rank = comm.get_rank()
    out = rank_output_dirs[rank] if rank_output_dirs else output_dir
    argv = ["--config-file", SHAPES] + (["--resume"] if resume else []) + OPTS + [
        "DATALOADER.NUM_WORKERS", str(workers), "OUTPUT_DIR", str(out)]
    cfg = train_net.setup(default_argument_parser().parse_args(argv))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    actions = (inject or {}).get(rank, [])

    def fire(what):
        if what == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        os.kill(os.getpid(), what)

    def pre_hook(module, args):
        for action in [a for a in actions if a[0] in ("forward", "eval")]:
            where, what, when = action
            if (where == "eval") == (not module.training) and (where == "eval" or trainer.iter == when):
                actions.remove(action)
                fire(what)

    trainer.model.register_forward_pre_hook(pre_hook)
    original_write, writes = ckpt.write_checkpoint_data, []

    def write(data, f):  # the checkpoint writer, with the signal half-way through the file
        writes.append(1)
        buffer = io.BytesIO()
        original_write(data, buffer)
        content = buffer.getvalue()
        f.write(content[:len(content) // 2])
        f.flush()
        for what in [what for where, what, when in actions if where == "write" and when == len(writes)]:
            fire(what)
        f.write(content[len(content) // 2:])

    ckpt.write_checkpoint_data = write
    try:
        trainer.train()
    except TrainingPreempted as e:
        return {"preempted": (e.code, e.iteration)}
    finally:
        ckpt.write_checkpoint_data = original_write
    return {"preempted": None}


def _final(output_dir):
    """Everything the run ends with: weights, optimizer, LR schedule, iteration, data position, and the
    metrics (losses and LR of the last iteration, smoothed over Detectron2's window, and evaluations)."""
    ck = torch.load(os.path.join(output_dir, "model_final.pth"), map_location="cpu", weights_only=False)
    with open(os.path.join(output_dir, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    last = [r for r in rows if r.get("iteration") == MAX_ITER - 1 and "total_loss" in r][-1]
    metrics = {k: v for k, v in last.items() if k.startswith("loss") or k in ("total_loss", "lr")}
    evals = {r["iteration"]: {k: v for k, v in r.items() if k.startswith("panoptic_seg/")} for r in rows
             if any(k.startswith("panoptic_seg/") for k in r)}
    trainer = ck["trainer"]
    return {"model": ck["model"], "optimizer": trainer["_trainer"]["optimizer"],
            "scheduler": trainer["hooks"]["LRScheduler"], "iteration": trainer["iteration"],
            "data_loader": trainer["data_loader"], "metrics": metrics, "evaluations": evals}


def _max_abs_difference(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _assert_identical(resumed, reference):
    assert resumed["model"].keys() == reference["model"].keys()
    assert _max_abs_difference(resumed["model"], reference["model"]) == 0.0
    torch.testing.assert_close(resumed["optimizer"], reference["optimizer"], rtol=0, atol=0)
    for key in ("scheduler", "iteration", "data_loader", "metrics", "evaluations"):
        assert resumed[key] == reference[key], key
    assert len(reference["evaluations"]) == 2 and len(reference["metrics"]) > 5


def _last_checkpoint(output_dir):
    with open(os.path.join(output_dir, "last_checkpoint")) as f:
        return f.read().strip()


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    """Gloo worker pools of 1 and 2 processes (replaced when a test killed one)."""
    _register()
    from detectron2.data import DatasetCatalog

    for name, *_ in DATASETS:
        DatasetCatalog.get(name)  # generate the images before several processes read them
    state = {}

    def get(world_size):
        pool = state.get(world_size)
        if pool is None or not pool.alive():
            if pool is not None:
                pool.kill()
            pool = state[world_size] = GlooWorkers(world_size, str(tmp_path_factory.mktemp(f"gloo{world_size}_")))
        return pool

    yield get
    for pool in state.values():
        pool.close()


@pytest.fixture(scope="module")
def reference(pools, tmp_path_factory):
    """The uninterrupted runs with 1 and 2 processes."""
    out = {}
    for world_size in (1, 2):
        folder = tmp_path_factory.mktemp(f"uninterrupted{world_size}_")
        results = pools(world_size).run(_train, str(folder), False, 0)
        assert all(r == {"preempted": None} for r, _ in results)
        out[world_size] = _final(folder)
    return out


def _run(pool, *args, **kwargs):
    return [r for r, _ in pool.run(_train, *args, **kwargs)]


def _run_killed(pool, *args, **kwargs):
    """A segment in which a process SIGKILLs itself: the pool reports a dead worker and kills the others."""
    with pytest.raises(RuntimeError, match="a worker died"):
        pool.run(_train, *args, **kwargs)
    assert not pool.alive()


def test_one_process_interrupted_five_times_resumes_exactly(pools, reference, tmp_path):
    out = str(tmp_path)
    # SIGTERM in the middle of iteration 1, then again while its checkpoint is written: stops after 1.
    [r] = _run(pools(1), out, False, 0, {0: [("forward", signal.SIGTERM, 1), ("write", signal.SIGTERM, 1)]})
    assert r["preempted"] == (75, 1) and _last_checkpoint(out) == "model_0000001.pth"
    # With a DataLoader worker (the others have none): the periodic checkpoint of iteration 2.
    [r] = _run(pools(1), out, True, 1, {0: [("write", signal.SIGTERM, 1)]})
    assert r["preempted"] == (75, 2) and _last_checkpoint(out) == "model_0000002.pth"
    # SIGTERM during the evaluation after iteration 3: stops after 3, with a checkpoint of 3.
    [r] = _run(pools(1), out, True, 0, {0: [("eval", signal.SIGTERM, None)]})
    assert r["preempted"] == (75, 3) and _last_checkpoint(out) == "model_0000003.pth"
    # The disk is full when the checkpoint of iteration 5 is written: a clear error, checkpoint 3 stays.
    with pytest.raises(RuntimeError, match=r"could not write .*model_0000005.pth \(the disk is full\)"):
        _run(pools(1), out, True, 0, {0: [("write", "ENOSPC", 1)]})
    assert _last_checkpoint(out) == "model_0000003.pth" and not os.path.exists(os.path.join(out, "model_0000005.pth"))
    assert not [n for n in os.listdir(out) if n.endswith(".incomplete")]
    # SIGKILL half-way through writing the final checkpoint: checkpoint 5 stays the last one.
    _run_killed(pools(1), out, True, 0, {0: [("write", signal.SIGKILL, 2)]})
    assert _last_checkpoint(out) == "model_0000005.pth" and not os.path.exists(os.path.join(out, "model_final.pth"))
    assert os.path.exists(os.path.join(out, ".model_final.pth.incomplete"))
    [r] = _run(pools(1), out, True, 0)
    assert r["preempted"] is None and not os.path.exists(os.path.join(out, ".model_final.pth.incomplete"))
    _assert_identical(_final(out), reference[1])


def test_two_processes_interrupted_and_resumed_without_shared_output_dir_end_exactly(pools, reference, tmp_path):
    out, rank1_dir = str(tmp_path / "out"), str(tmp_path / "rank1_own")
    # Only rank 1 gets SIGTERM (mid-iteration 1); rank 0 gets one while writing that checkpoint: both stop after 1.
    inject = {1: [("forward", signal.SIGTERM, 1)], 0: [("write", signal.SIGTERM, 1)]}
    assert _run(pools(2), out, False, 0, inject) == [{"preempted": (75, 1)}] * 2
    assert _last_checkpoint(out) == "model_0000001.pth"
    # SIGTERM on rank 0 during the evaluation after iteration 3.
    assert _run(pools(2), out, True, 0, {0: [("eval", signal.SIGTERM, None)]}) == [{"preempted": (75, 3)}] * 2
    # SIGTERM on rank 0 while the periodic checkpoint of iteration 5 is written.
    assert _run(pools(2), out, True, 0, {0: [("write", signal.SIGTERM, 1)]}) == [{"preempted": (75, 5)}] * 2
    assert _last_checkpoint(out) == "model_0000005.pth"
    # SIGKILL of rank 1 in the middle of iteration 6, then of rank 0 while it writes the final checkpoint.
    _run_killed(pools(2), out, True, 0, {1: [("forward", signal.SIGKILL, 6)]})
    _run_killed(pools(2), out, True, 0, {0: [("write", signal.SIGKILL, 1)]})
    assert _last_checkpoint(out) == "model_0000005.pth"
    # Rank 1 now runs in a folder of its own without checkpoints: it resumes from rank 0's (sent by rank 0).
    results = _run(pools(2), out, True, 0, None, [out, rank1_dir])
    assert results == [{"preempted": None}] * 2
    assert not [n for n in os.listdir(rank1_dir) if n.endswith(".pth") or n == "last_checkpoint"]
    _assert_identical(_final(out), reference[2])


def test_train_net_exits_with_code_75_after_sigterm_with_a_checkpoint(tmp_path):
    """The command line as a cluster job runs it: SIGTERM from outside during training."""
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train_net.py"), "--config-file", SHAPES, *OPTS,
           "SOLVER.MAX_ITER", "1000", "DATASETS.TRAIN", "('shapes_panoptic_train_tiny',)", "DATASETS.TEST", "()",
           "DATALOADER.NUM_WORKERS", "1", "OUTPUT_DIR", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        log.append(line)
        if "Starting training from iteration" in line or time.monotonic() > deadline:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    log = "".join(log) + rest
    assert proc.returncode == 75, log[-3000:]
    name = _last_checkpoint(tmp_path)
    iteration = int(name[len("model_"):-len(".pth")])
    assert f"training stopped by SIGTERM after iteration {iteration}" in log
    ck = torch.load(tmp_path / name, map_location="cpu", weights_only=False)
    assert ck["trainer"]["iteration"] == iteration and ck["trainer"]["data_loader"]["position"] >= 2 * (iteration + 1)


def test_launch_without_cuda_support_is_explained_before_detectron2_asserts():
    from panoptic_segformer.launch import check_launch, launch_starts_cpu_processes

    if torch.cuda.is_available() or launch_starts_cpu_processes():
        pytest.skip("the installed launch() starts these processes")
    with pytest.raises(SystemExit, match=r"2 processes .* without CUDA.*--num-gpus 1.*upstream Detectron2"):
        check_launch(2)
    check_launch(1)  # one process needs no launch support


def _draw(dataset_dict):
    """A mapper whose output depends on the random generators, as augmentations do."""
    import random

    import numpy as np

    return {"id": dataset_dict["id"], "draws": (float(np.random.rand()), random.random(), float(torch.rand(1)))}


def test_data_order_resumes_exactly_and_warns_when_the_processes_change(caplog):
    """The loader's state after 2 batches continues the uninterrupted sequence (images and random draws);
    a state saved with 2 processes continues the same global batches here (1 process) with a warning that
    says what changes, and so does another batch size."""
    import logging

    from panoptic_segformer.data.resumable_loader import ResumableTrainLoader

    dicts = [{"id": i, "width": 80 if i % 3 else 48, "height": 48 if i % 3 else 80} for i in range(7)]

    def loader(batch_size=2):
        return ResumableTrainLoader(dicts, _draw, batch_size, seed=5)

    def take(it, n):
        return [next(it) for _ in range(n)]

    # The handler on the module's logger itself: another test's setup_logger may stop propagation.
    logger = logging.getLogger("panoptic_segformer.data.resumable_loader")
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    try:
        _check_resumed_orders(loader, take, caplog)
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(logging.NOTSET)


def _check_resumed_orders(loader, take, caplog):
    reference = take(iter(loader()), 6)
    interrupted = loader()
    assert take(iter(interrupted), 2) == reference[:2]
    state = interrupted.state_dict()
    assert state["position"] >= 4 and sum(map(len, state["buckets"])) == state["position"] - 4
    resumed = loader()
    resumed.load_state_dict(state)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert take(iter(resumed), 4) == reference[2:]

    other = loader()
    other.load_state_dict(dict(state, world_size=2))
    assert "2 -> 1 processes: each iteration trains on the same images" in caplog.text
    assert take(iter(other), 4) == reference[2:]
    caplog.clear()
    loader(batch_size=3).load_state_dict(state)
    assert "SOLVER.IMS_PER_BATCH 2 -> 3" in caplog.text


def _handler_names(*_):
    return [str(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGUSR1)]


def _worker_handlers(record):
    return _handler_names()


def test_forked_children_get_the_previous_handlers_and_loader_workers_ignore_the_signals():
    """While the hook's handlers are installed, a forked process (panopticapi's evaluation pool) gets the
    previous handlers back at the fork -- not a flag-setting handler whose restarted system calls would
    keep a pool worker alive through Pool.terminate()'s SIGTERM -- and the training loader's DataLoader
    workers ignore the preemption signals."""
    import multiprocessing

    from panoptic_segformer.data.resumable_loader import ResumableTrainLoader
    from panoptic_segformer.resume import PreemptionHook

    hook = PreemptionHook([signal.SIGTERM, signal.SIGUSR1], checkpointer=None, checkpoint_period=0)
    hook.before_train()
    try:
        assert signal.getsignal(signal.SIGTERM) == hook._handle
        with multiprocessing.get_context("fork").Pool(1) as pool:
            assert pool.apply(_handler_names) == [str(signal.SIG_DFL)] * 2
        signals = (int(signal.SIGTERM), int(signal.SIGUSR1))
        loader = ResumableTrainLoader([{"id": 0, "width": 8, "height": 8}], _worker_handlers, 1, seed=0,
                                      num_workers=1, ignore_signals=signals)
        assert next(iter(loader)) == [[str(signal.SIG_IGN)] * 2]
    finally:
        hook.after_train()
    assert signal.getsignal(signal.SIGTERM) != hook._handle
