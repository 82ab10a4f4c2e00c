#!/usr/bin/env python
"""The long learning checks: the model overfits a few images (CPU, about 8 minutes on 2 cores).

    python -m projects.benchmarks.overfit [--checks shapes4 coco2] [--json out.json]

- ``shapes4``: 4 `shapes` images rendered at 64 px and fed at 256 px (every thing spans >= 4 cells of
  the 1/8 mask grid, Eq. 2: what is checked is learning, not the resolution limit of 1/8-scale masks),
  300 iterations of batch 4: PQ on the same 4 images must reach 90.
- ``coco2``: the 2 real COCO sample images at 192 px, 120 iterations of batch 2: the total loss (Detectron2's
  20-iteration median) must at least halve between its first and last logged values.

Each check trains with the project's Trainer (as ``train_net.py``) and evaluates with
COCOPanopticEvaluator; the command prints one line per check and exits 1 if any target is missed.
``--max-iter N`` (and ``--no-targets``) shorten the runs for a smoke test (tests/test_benchmark_tools.py).
They take about 8 minutes on 2 cores, too long for ``make test``, which runs this command for 2 iterations
(tests/test_benchmark_tools.py) so that it cannot rot.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from panoptic_segformer.config import setup_cfg
from panoptic_segformer.data.datasets.register_shapes import register_shapes_panoptic
from panoptic_segformer.engine import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES_YAML = os.path.join(REPO, "configs", "shapes", "panoptic_segformer_shapes.yaml")
# The CPU shapes config at a tiny schedule (as tests/conftest.small_cfg).
SMALL = ["INPUT.MAX_SIZE_TRAIN", "256", "INPUT.MAX_SIZE_TEST", "256", "DATALOADER.NUM_WORKERS", "0",
         "SOLVER.CHECKPOINT_PERIOD", "100000", "SEED", "1", "INPUT.RANDOM_FLIP", "none"]


def _shapes4():
    name = register_shapes_panoptic("shapes_overfit4", "overfit", 4, 64, 7)
    return name, [
        "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", f"('{name}',)",
        "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MIN_SIZE_TEST", "256",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "300", "SOLVER.STEPS", "(250,)",
        "SOLVER.BASE_LR", "0.001", "TEST.EVAL_PERIOD", "0"]


def _coco2():
    return "coco_panoptic_sample", [
        "DATASETS.TRAIN", "('coco_panoptic_sample',)", "DATASETS.TEST", "('coco_panoptic_sample',)",
        "MODEL.PANOPTIC_SEGFORMER.NUM_THING_CLASSES", "80", "MODEL.PANOPTIC_SEGFORMER.NUM_STUFF_CLASSES", "53",
        "INPUT.MIN_SIZE_TRAIN", "(192,)", "INPUT.MIN_SIZE_TEST", "192",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "120", "SOLVER.BASE_LR", "0.0005", "SOLVER.STEPS", "()",
        "MODEL.PANOPTIC_SEGFORMER.TEST.INSTANCE_ON", "False"]


CHECKS = {"shapes4": _shapes4, "coco2": _coco2}


def train(opts, output_dir, max_iter=None):
    """Train with the project's Trainer; returns (final panoptic results, logged total losses)."""
    opts = SMALL + list(opts) + ["OUTPUT_DIR", output_dir]
    if max_iter is not None:
        opts += ["SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", "()"]
    cfg = setup_cfg(SHAPES_YAML, opts)
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    latest = trainer.storage.latest()
    results = {k.split("/", 1)[1]: v[0] for k, v in latest.items() if k.startswith("panoptic_seg/")}
    with open(os.path.join(output_dir, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return results, [r["total_loss"] for r in rows if "total_loss" in r]


def run_check(name, output_dir, max_iter=None):
    """{"check", "PQ", "PQ_th", "PQ_st", "loss_first", "loss_last", "target", "passed"}."""
    _, opts = CHECKS[name]()
    pq, losses = train(opts, output_dir, max_iter)
    row = {"check": name, **{k: round(pq[k], 2) for k in ("PQ", "PQ_th", "PQ_st")},
           "loss_first": round(float(np.mean(losses[:1])), 3) if losses else None,
           "loss_last": round(float(np.mean(losses[-1:])), 3) if losses else None}
    if name == "shapes4":
        row["target"], row["passed"] = "PQ >= 90", pq["PQ"] >= 90.0
    else:
        row["target"] = "last logged loss <= 0.5 x first"
        row["passed"] = bool(losses) and row["loss_last"] <= 0.5 * row["loss_first"]
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks", nargs="+", choices=sorted(CHECKS), default=["shapes4", "coco2"])
    parser.add_argument("--output", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--max-iter", type=int, default=None, help="shorter runs (smoke test)")
    parser.add_argument("--no-targets", action="store_true", help="report without failing on missed targets")
    args = parser.parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger()
    output = args.output or tempfile.mkdtemp(prefix="psf-overfit-")
    rows = []
    for name in args.checks:
        row = run_check(name, os.path.join(output, name), args.max_iter)
        rows.append(row)
        print(f"{name}: PQ {row['PQ']:.1f} (PQ_th {row['PQ_th']:.1f}, PQ_st {row['PQ_st']:.1f}); total loss "
              f"{row['loss_first']} -> {row['loss_last']}; target {row['target']}: "
              f"{'passed' if row['passed'] else 'MISSED'}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if args.no_targets or all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
