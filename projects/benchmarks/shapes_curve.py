#!/usr/bin/env python
"""Train Panoptic SegFormer on `shapes` within a wall-clock budget and record the PQ curve.

    python -m projects.benchmarks.shapes_curve --minutes 15 --eval-every 150 --output output/shapes_curve \
        [KEY VALUE ...]

Trains with the project's Trainer (``panoptic_segformer.engine``) on `configs/shapes/panoptic_segformer_shapes.yaml`; every
`--eval-every` iterations it evaluates on `shapes_panoptic_val` (COCOPanopticEvaluator) and records
(training seconds, iteration, PQ, PQ_th, PQ_st). Evaluation time is not counted as training time.
Training stops at the first evaluation after the budget is spent (or at SOLVER.MAX_ITER). Writes
`curve.json`, `curve.png` (matplotlib), `model_final.pth`, and prints a markdown table.
"""
import argparse
import json
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.engine import HookBase  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from panoptic_segformer.config import setup_cfg  # noqa: E402
from panoptic_segformer.engine import Trainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _BudgetSpent(Exception):
    pass


class CurveHook(HookBase):
    """Evaluates every `period` iterations, records the curve, stops after `budget_s` of training."""

    def __init__(self, period, budget_s, cfg):
        self.period, self.budget_s, self.cfg = period, budget_s, cfg
        self.points, self.train_s, self._t0, self.eval_s = [], 0.0, None, 0.0

    def before_step(self):
        self._t0 = time.perf_counter()

    def after_step(self):
        self.train_s += time.perf_counter() - self._t0
        it = self.trainer.iter + 1
        if it % self.period == 0 or it == self.trainer.max_iter:
            self.evaluate(it)
            if self.train_s >= self.budget_s:
                raise _BudgetSpent()

    def evaluate(self, it):
        t = time.perf_counter()
        res = Trainer.test(self.cfg, self.trainer.model)["panoptic_seg"]
        self.trainer.model.train()
        self.eval_s += time.perf_counter() - t
        point = {"iteration": it, "train_seconds": round(self.train_s, 1),
                 "PQ": res["PQ"], "PQ_th": res["PQ_th"], "PQ_st": res["PQ_st"], "SQ": res["SQ"], "RQ": res["RQ"]}
        self.points.append(point)
        print(f"[curve] iter {it} train {self.train_s / 60:.1f} min: PQ {res['PQ']:.1f} "
              f"PQ_th {res['PQ_th']:.1f} PQ_st {res['PQ_st']:.1f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default=os.path.join(REPO, "configs/shapes/panoptic_segformer_shapes.yaml"))
    parser.add_argument("--minutes", type=float, default=15.0, help="training-time budget")
    parser.add_argument("--eval-every", type=int, default=150)
    parser.add_argument("--output", default="output/shapes_curve")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    cfg = setup_cfg(args.config_file, ["OUTPUT_DIR", args.output, "TEST.EVAL_PERIOD", "0"] + args.opts)
    os.makedirs(args.output, exist_ok=True)
    setup_logger(output=args.output)
    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else None)

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    hook = CurveHook(args.eval_every, args.minutes * 60, cfg)
    trainer.register_hooks([hook])
    wall = time.perf_counter()
    try:
        trainer.train()
    except _BudgetSpent:
        pass
    wall = time.perf_counter() - wall
    DetectionCheckpointer(trainer.model, save_dir=args.output).save("model_final")

    with open(os.path.join(args.output, "curve.json"), "w") as f:
        json.dump({"config": args.config_file, "opts": args.opts, "points": hook.points,
                   "train_seconds": hook.train_s, "eval_seconds": hook.eval_s, "wall_seconds": wall,
                   "cpu_count": os.cpu_count()}, f, indent=1)
    minutes = [p["train_seconds"] / 60 for p in hook.points]
    plt.figure(figsize=(6, 4))
    for key in ("PQ", "PQ_th", "PQ_st"):
        plt.plot(minutes, [p[key] for p in hook.points], marker="o", label=key)
    plt.xlabel("training time (minutes, evaluation excluded)")
    plt.ylabel("shapes_panoptic_val")
    plt.title("Panoptic SegFormer (shapes config) on a CPU")
    plt.grid(alpha=0.3)
    plt.legend()
    plt.tight_layout()
    plt.savefig(os.path.join(args.output, "curve.png"), dpi=100)
    print("| iteration | training min | PQ | PQ_th | PQ_st |\n| ---: | ---: | ---: | ---: | ---: |")
    for p, m in zip(hook.points, minutes):
        print(f"| {p['iteration']} | {m:.1f} | {p['PQ']:.1f} | {p['PQ_th']:.1f} | {p['PQ_st']:.1f} |")
    print(f"training {hook.train_s / 60:.1f} min, evaluation {hook.eval_s / 60:.1f} min, wall {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
