#!/usr/bin/env python
"""Training speed with the resumable data order against Detectron2's training loader.

    python -m projects.benchmarks.data_order_overhead --config-file configs/shapes/panoptic_segformer_shapes.yaml \\
        [--iters 20] [--warmup 3] [--repeats 3] [KEY VALUE ...]

``panoptic_segformer.data.resumable_loader.ResumableTrainLoader`` (what the Trainer trains on) keeps the
data stream's position for the checkpoint and maps every sample with random generators seeded from (seed,
position, index); Detectron2's ``build_detection_train_loader`` (same mapper, same batch size, workers and
aspect-ratio grouping) does neither. The two train the config's model from the same initialisation in one
process without evaluation or checkpoints, alternating (A, B, A, B, ...) so that a shared machine's load changes hit both alike; reported is
each run's mean seconds per iteration after `--warmup` iterations (Detectron2's IterationTimer: the
training step including loading the batch), and the relative difference of the medians.

The bookkeeping itself is also timed alone: choosing a global batch (``global_batches``) and seeding and
restoring the random generators around one sample's mapping, per iteration, without the mapping.
"""
import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch

from projects.benchmarks import bench_utils


def _trainers():
    from detectron2.data import build_detection_train_loader

    from panoptic_segformer.data import PanopticSegFormerDatasetMapper
    from panoptic_segformer.engine import Trainer

    class Detectron2LoaderTrainer(Trainer):
        @classmethod
        def build_train_loader(cls, cfg):
            return build_detection_train_loader(cfg, mapper=PanopticSegFormerDatasetMapper(cfg, is_train=True))

    return {"resumable": Trainer, "detectron2": Detectron2LoaderTrainer}


def seconds_per_iter(trainer_cls, cfg, warmup: int) -> float:
    """Mean training-step seconds of iterations `warmup`.. of a run of cfg.SOLVER.MAX_ITER iterations."""
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    times = [t for t, it in trainer.storage.history("time").values() if it >= warmup]
    return float(np.mean(times))


def bookkeeping_seconds(cfg, iterations: int = 200) -> float:
    """Seconds per iteration spent choosing the batch and seeding the samples' random generators."""
    import random

    from panoptic_segformer.data.resumable_loader import global_batches, sample_seed

    size, batch = 500, cfg.SOLVER.IMS_PER_BATCH
    group_ids = np.random.RandomState(0).randint(0, 2, size).astype(np.uint8)
    stream = global_batches(cfg.SEED if cfg.SEED >= 0 else 0, size, batch, group_ids=group_ids)
    start = time.perf_counter()
    for _ in range(iterations):
        samples, _state = next(stream)
        for position, index in samples:  # what _SeededMapDataset does around the mapper
            seq = sample_seed(7, position, index)
            np_state, py_state = np.random.get_state(), random.getstate()
            with torch.random.fork_rng(devices=[]):
                np.random.seed(seq.generate_state(4))
                random.seed(int(seq.generate_state(2, np.uint64)[0]))
                torch.manual_seed(int(seq.generate_state(1, np.uint64)[0] >> 1))
            np.random.set_state(np_state)
            random.setstate(py_state)
    return (time.perf_counter() - start) / iterations


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--iters", type=int, default=20, help="iterations per run, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loader, alternating")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    args = parser.parse_args(argv)
    from detectron2.utils.logger import setup_logger

    from panoptic_segformer.config import setup_cfg

    setup_logger(name="fvcore")  # quiet otherwise; Detectron2's own loggers stay at WARNING
    runs = {name: [] for name in _trainers()}
    with tempfile.TemporaryDirectory() as out:  # metrics.json of the runs; no checkpoints
        cfg = setup_cfg(args.config_file, list(args.opts) + [
            "SOLVER.MAX_ITER", str(args.iters + args.warmup), "SOLVER.CHECKPOINT_PERIOD", "1000000",
            "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "SOLVER.CPU_THREADS", str(torch.get_num_threads()),
            "OUTPUT_DIR", out])
        for _ in range(args.repeats):
            for name, trainer_cls in _trainers().items():
                torch.manual_seed(0)
                runs[name].append(seconds_per_iter(trainer_cls, cfg, args.warmup))
                print(f"{name}: {runs[name][-1]:.4f} s/iter", flush=True)
    med = {name: statistics.median(v) for name, v in runs.items()}
    book = bookkeeping_seconds(cfg)
    report = {"machine": bench_utils.machine(torch.device("cpu")), "threads": torch.get_num_threads(),
              "config": args.config_file, "opts": list(args.opts), "iters": args.iters, "warmup": args.warmup,
              "runs_s_per_iter": runs, "median_s_per_iter": med,
              "relative_difference": med["resumable"] / med["detectron2"] - 1.0,
              "bookkeeping_s_per_iter": book, "bookkeeping_fraction": book / med["resumable"]}
    print(json.dumps(report, indent=1))
    if args.json:
        bench_utils.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
