#!/usr/bin/env python
"""The paper's ablations in miniature, as one command: train each variant, compare post-processors fairly,
evaluate 1/2/3/6 mask-decoder layers, and write a table in the paper's layout (Tables 6, 7/B.2, 8, 10, Fig. 5).

    python -m projects.benchmarks.ablations --output-dir output/ablations
    python -m projects.benchmarks.ablations --output-dir out/abl --max-iter 400 --seeds 1 2 \
        --opts INPUT.MIN_SIZE_TRAIN "(128,)" INPUT.MIN_SIZE_TEST 128
    python -m projects.benchmarks.ablations --config-file my.yaml --dataset my_val --tune-dataset my_heldout \
        --opts DATASETS.TRAIN "('my_train',)"

Variants (:data:`VARIANTS`; each is the base config plus the config keys of that ablation):

- ``full``: the config as it is (query decoupling, deep supervision, the config's location-decoder depth);
- ``joint_matching``: ``QUERY_DECOUPLING False`` (Table 8);
- ``loc0`` / ``loc2`` / ``loc6``: ``LOCATION_DECODER_LAYERS`` 0 / 2 / 6 (Table 6); the one equal to the
  config's depth IS the full model and is not trained twice;
- ``no_deep_supervision``: ``DEEP_SUPERVISION False`` (Fig. 5, "w/o ds");
- ``box_free``: ``BOX_FREE True`` (Table 6, row 6*).

Each variant is trained with the project's Trainer (``panoptic_segformer.engine``) for ``--max-iter``
iterations (LR decay at 80%), evaluated with mask-wise merging every ``max_iter / --curve-points``
iterations (the learning curve, Fig. 5), then scored with:

- the fair post-processor comparison (``compare_postprocessors.fair_comparison``: each post-processor's
  thresholds chosen by PQ on the tuning split, plus each at the shared t_cnf; Table 7 / B.2);
- mask-wise merging (at its chosen thresholds) with the first 1 / 2 / 3 / 6 mask-decoder layers at
  inference (Table 10; a depth beyond the trained one is "n/a").

Seeds: every variant runs with the first of ``--seeds``; the variants of ``--multi-seed`` (default: all)
run with every seed, and the tables show the mean and the spread (min-max) over seeds.

Writes into ``--output-dir``: ``<variant>_seed<s>/`` (the run: checkpoint, ``metrics.json``,
``result.json``), ``ablations.json`` (setup, every run's results, the summary), ``ablations.md`` (the
tables, the paper's numbers beside these), ``ablations.png`` (learning curves, one line per run). A run
whose ``result.json`` exists is not trained or scored again (resume by re-running the command; a run with
``model_final.pth`` but no result is only scored); a ``result.json`` from another setup is an error.
"""
import argparse
import json
import logging
import math
import os
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.engine import hooks  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from panoptic_segformer.config import setup_cfg  # noqa: E402
from panoptic_segformer.engine import Trainer  # noqa: E402
from panoptic_segformer.postprocessing import POSTPROCESSOR_REGISTRY  # noqa: E402

from .bench_utils import json_default, machine  # noqa: E402
from .compare_postprocessors import (  # noqa: E402
    METRICS,
    add_threshold_arguments,
    build_postprocessor,
    fair_comparison,
    format_thresholds,
    load_model,
    make_grids,
    score_postprocessors,
    tuning_split,
)
from .shapes_curve import CurveHook  # noqa: E402

__all__ = ["VARIANTS", "PAPER", "plan_runs", "run_variant", "summarize", "format_markdown", "plot_curves", "main"]

logger = logging.getLogger("panoptic_segformer_benchmarks")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES_YAML = os.path.join(REPO, "configs", "shapes", "panoptic_segformer_shapes.yaml")
PSF = "MODEL.PANOPTIC_SEGFORMER."

#: variant -> config overrides on top of the base config.
VARIANTS: "OrderedDict[str, List[str]]" = OrderedDict([
    ("full", []),
    ("joint_matching", [PSF + "QUERY_DECOUPLING", "False"]),
    ("loc0", [PSF + "LOCATION_DECODER_LAYERS", "0"]),
    ("loc2", [PSF + "LOCATION_DECODER_LAYERS", "2"]),
    ("loc6", [PSF + "LOCATION_DECODER_LAYERS", "6"]),
    ("no_deep_supervision", [PSF + "DEEP_SUPERVISION", "False"]),
    ("box_free", [PSF + "BOX_FREE", "True"]),
])
#: Post-processors compared (Table 7 / B.2); "official" is for converted official checkpoints only.
POSTPROCESSORS = ("mask_wise", "pixel_argmax", "pixel_argmax_prob", "heuristic")
MASK_LAYERS = (1, 2, 3, 6)
#: The paper's numbers (COCO val2017, R50): (PQ, PQ^th, PQ^st); None where the paper gives none.
PAPER = {
    "table6": {"loc0": (47.0, 50.0, 42.5), "loc2": (48.1, 51.8, 42.5), "box_free": (49.2, 53.5, 42.6),
               "loc6": (49.6, 54.4, 42.4)},
    "table7": {"mask_wise": (49.6, 54.4, 42.4), "pixel_argmax": (48.4, 53.2, 41.3),
               "pixel_argmax_prob": None, "heuristic": (48.4, 54.3, 39.4)},
    "table8": {"joint_matching": (48.5, 54.5, 39.5), "full": (49.6, 54.4, 42.4)},
    "table10": {1: (48.8, 54.3, 40.5), 2: (49.5, 54.5, 42.0), 3: (49.6, 54.5, 42.3), 6: (49.6, 54.4, 42.4)},
    "fig5": {"full": None, "no_deep_supervision": None},
}
KEYS = ("PQ", "PQ_th", "PQ_st")


def variant_opts(variant: str) -> List[str]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {list(VARIANTS)}")
    return list(VARIANTS[variant])


def plan_runs(variants: Sequence[str], seeds: Sequence[int], multi_seed: Optional[Sequence[str]],
              base_location_layers: int) -> "OrderedDict[str, Dict]":
    """{variant: {"trains": variant it reuses (itself, or "full" for the loc-N equal to the base depth),
    "seeds": [...]}} in ``variants`` order."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct integers, got {list(seeds)}")
    for v in variants:
        variant_opts(v)
    for v in multi_seed or ():
        variant_opts(v)
    plan = OrderedDict()
    for v in variants:
        trains = v
        if v.startswith("loc") and int(v[3:]) == base_location_layers:
            trains = "full"
        many = multi_seed is None or v in multi_seed or trains in (multi_seed or ())
        plan[v] = {"trains": trains, "seeds": list(seeds) if many else [seeds[0]]}
    return plan


def run_cfg(args, variant: str, seed: int, out: str):
    opts = ["OUTPUT_DIR", out, "SEED", str(seed), "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "1000000",
            "SOLVER.MAX_ITER", str(args.max_iter), "SOLVER.STEPS", f"({max(1, int(args.max_iter * 0.8))},)"]
    opts += list(args.opts) + variant_opts(variant)
    if args.dataset:
        opts += ["DATASETS.TEST", f"('{args.dataset}',)"]
    cfg = setup_cfg(args.config_file, opts, freeze=False)
    t = cfg.MODEL.PANOPTIC_SEGFORMER.TEST
    t.PANOPTIC_ON, t.INSTANCE_ON, t.SEMANTIC_ON = True, False, False
    cfg.freeze()
    return cfg


def _setup(args, variant, seed) -> Dict:
    """What a resumed run must share with the one that wrote its result.json."""
    setup = {"config_file": os.path.relpath(os.path.abspath(args.config_file), REPO), "opts": list(args.opts),
            "variant_opts": variant_opts(variant), "seed": seed, "max_iter": args.max_iter,
            "dataset": args.dataset, "tune_dataset": args.tune_dataset, "tune_images": args.tune_images,
            "postprocessors": list(args.postprocessors), "mask_layers": list(MASK_LAYERS)}
    if args.conf_grid is not None or args.conf_only:  # the default grids are implied
        setup["grids"] = make_grids(args.postprocessors, args.conf_grid, args.conf_only)
    return json.loads(json.dumps(setup))  # as read back from result.json


class _IntermediateCurveHook(CurveHook):
    """:class:`CurveHook` without the evaluation at the last iteration: the final point is the fair
    comparison's "mask_wise (shared t_cnf)" row (the config's thresholds), computed once."""

    def after_step(self):
        if self.trainer.iter + 1 < self.trainer.max_iter:
            super().after_step()


class _Trainer(Trainer):
    """The project's Trainer without Detectron2's evaluation after training (``EvalHook``): the trained
    variant is scored once, by :func:`evaluate_variant`."""

    def build_hooks(self):
        return [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]


def train_variant(cfg, curve_points: int) -> Dict:
    """Train with the project's Trainer, evaluating (mask-wise, config thresholds) ``curve_points - 1``
    times during training (the last point is added from the final evaluation)."""
    seed_all_rng(cfg.SEED)
    trainer = _Trainer(cfg)
    trainer.resume_or_load(resume=False)
    period = max(1, math.ceil(cfg.SOLVER.MAX_ITER / max(1, curve_points)))
    hook = _IntermediateCurveHook(period, float("inf"), cfg)
    trainer.register_hooks([hook])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    DetectionCheckpointer(trainer.model, save_dir=cfg.OUTPUT_DIR).save("model_final")
    return {"curve": hook.points, "train_seconds": hook.train_s, "curve_eval_seconds": hook.eval_s,
            "wall_seconds": wall}


def evaluate_variant(cfg, args) -> Dict:
    """Fair post-processor comparison and mask-decoder depths at inference for the trained run."""
    ecfg = cfg.clone()
    ecfg.defrost()
    ecfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    ecfg.freeze()
    model = load_model(ecfg)
    dataset = ecfg.DATASETS.TEST[0]
    tune_dataset, tune_images = tuning_split(ecfg, dataset, args.tune_dataset, args.tune_images)
    start = time.perf_counter()
    grids = make_grids(args.postprocessors, args.conf_grid, args.conf_only)
    table, tuning = fair_comparison(ecfg, model, dataset, args.postprocessors, tune_dataset,
                                    args.max_images, tune_images, grids, progress=False)
    layers = OrderedDict()
    trained = model.mask_decoder.num_layers
    own = table.get("mask_wise (tuned)")
    kwargs = dict(own["thresholds"]) if own else {}
    for n in MASK_LAYERS:
        if n > trained:
            layers[n] = None
            continue
        if n == trained and own:  # the model's own depth: the comparison's row
            layers[n] = {k: own[k] for k in METRICS}
            continue
        row = score_postprocessors(ecfg, model, dataset, {"mask_wise": build_postprocessor("mask_wise", **kwargs)},
                                   args.max_images, num_mask_layers=n, progress=False)["mask_wise"]
        layers[n] = {k: row[k] for k in METRICS}
    return {"postprocessors": table, "tuning": tuning, "tune_dataset": tune_dataset, "mask_layers": layers,
            "trained_mask_layers": trained, "eval_seconds": time.perf_counter() - start}


def run_variant(args, variant: str, seed: int) -> Dict:
    """Train (unless ``model_final.pth`` exists) and score one run; cached in ``result.json``."""
    out = os.path.join(args.output_dir, f"{variant}_seed{seed}")
    path = os.path.join(out, "result.json")
    setup = _setup(args, variant, seed)
    if os.path.isfile(path):
        with open(path) as f:
            result = json.load(f)
        if result.get("setup") != setup:
            diff = {k: (result.get("setup", {}).get(k), v) for k, v in setup.items()
                    if result.get("setup", {}).get(k) != v}
            raise ValueError(f"{path}: written with another setup (previous, now: {diff}); use another "
                             "--output-dir or remove it")
        logger.info("%s seed %d: finished before (%s), not retrained", variant, seed, path)
        return result
    os.makedirs(out, exist_ok=True)
    cfg = run_cfg(args, variant, seed, out)
    result = {"setup": setup, "variant": variant, "seed": seed}
    if os.path.isfile(os.path.join(out, "model_final.pth")) and os.path.isfile(os.path.join(out, "training.json")):
        with open(os.path.join(out, "training.json")) as f:
            result.update(json.load(f))
    else:
        training = train_variant(cfg, args.curve_points)
        with open(os.path.join(out, "training.json"), "w") as f:
            json.dump(training, f, indent=1, default=json_default)
        result.update(training)
    result.update(evaluate_variant(cfg, args))
    final = result["postprocessors"].get("mask_wise (shared t_cnf)")
    if final:  # the learning curve's last point: mask-wise merging at the config's thresholds
        result["curve"] = [p for p in result["curve"] if p["iteration"] < args.max_iter] + [
            {"iteration": args.max_iter, "train_seconds": round(result["train_seconds"], 1),
             **{k: final[k] for k in METRICS}}]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=json_default)
    os.replace(tmp, path)
    with open(path) as f:  # as a resumed run reads it (string keys), so that both kinds summarize alike
        return json.load(f)


def _stats(values: Sequence[float]) -> Dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(plan: Dict, runs: Dict[str, Dict[int, Dict]]) -> Dict:
    """Per variant, over its seeds: mean/min/max of PQ, PQ_th, PQ_st for every post-processor row and
    every mask-decoder depth; the chosen thresholds per seed."""
    summary = OrderedDict()
    for v, p in plan.items():
        results = [runs[p["trains"]][s] for s in p["seeds"]]
        pp = OrderedDict()
        for label in results[0]["postprocessors"]:
            pp[label] = {k: _stats([r["postprocessors"][label][k] for r in results]) for k in KEYS}
            pp[label]["thresholds"] = [r["postprocessors"][label]["thresholds"] for r in results]
        layers = OrderedDict()
        for n in results[0]["mask_layers"]:
            rows = [r["mask_layers"][n] for r in results]
            layers[n] = None if any(x is None for x in rows) else {k: _stats([x[k] for x in rows]) for k in KEYS}
        summary[v] = {"trains": p["trains"], "seeds": p["seeds"], "postprocessors": pp, "mask_layers": layers}
    return summary


def _cell(stats: Optional[Dict]) -> str:
    if stats is None:
        return "n/a"
    if stats["n"] == 1:
        return f"{stats['mean']:.1f}"
    return f"{stats['mean']:.1f} ({stats['min']:.1f}–{stats['max']:.1f})"


def _paper(triple) -> List[str]:
    return ["—"] * 3 if triple is None else [f"{x:.1f}" for x in triple]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


HEAD = ["paper PQ", "paper PQ^th", "paper PQ^st", "PQ", "PQ^th", "PQ^st"]


def format_markdown(summary: Dict, title: str = "") -> str:
    """The paper's ablation tables with its numbers (COCO, R50) beside these (mean (min–max) over seeds;
    mask-wise merging at its tuned thresholds unless the row says otherwise)."""
    lines = [title, ""] if title else []

    def mw(v, label="mask_wise (tuned)"):
        s = summary[v]["postprocessors"].get(label)
        return [_cell(s[k]) if s else "n/a" for k in KEYS]

    def seeds(v):
        return str(len(summary[v]["seeds"]))

    def table(name, first, rows):
        lines.extend([f"**{name}**", "", _row([first, "seeds"] + HEAD), _row(["---"] * 2 + ["---:"] * 6)])
        lines.extend(_row(r) for r in rows)
        lines.append("")

    if any(v in summary for v in ("loc0", "loc2", "loc6", "box_free")):
        table("Table 6 — location decoder layers", "variant",
              [[v, seeds(v)] + _paper(PAPER["table6"].get(v)) + mw(v)
               for v in ("loc0", "loc2", "loc6", "box_free") if v in summary])
    if "full" in summary:
        pp = summary["full"]["postprocessors"]
        rows = []
        for label, s in pp.items():
            name = label.split(" ")[0]
            thr = "; ".join(format_thresholds(t) for t in s["thresholds"])
            paper = _paper(PAPER["table7"].get(name)) if label.endswith("(tuned)") else ["—"] * 3
            rows.append([f"{label} [{thr}]", seeds("full")] + paper + [_cell(s[k]) for k in KEYS])
        table("Table 7 / B.2 — post-processing on the full model (thresholds chosen per seed in brackets)",
              "post-processing", rows)
    if "joint_matching" in summary and "full" in summary:
        table("Table 8 — query decoupling vs joint matching", "variant",
              [[v, seeds(v)] + _paper(PAPER["table8"][v]) + mw(v) for v in ("joint_matching", "full")])
    if "no_deep_supervision" in summary and "full" in summary:
        table("Fig. 5 — deep supervision (the paper gives curves only; see the plot)", "variant",
              [[v, seeds(v)] + _paper(None) + mw(v) for v in ("full", "no_deep_supervision")])
    if "full" in summary:
        layers = summary["full"]["mask_layers"]
        table("Table 10 — mask-decoder layers used at inference (full model)", "layers",
              [[str(n), seeds("full")] + _paper(PAPER["table10"].get(int(n)))
               + ([_cell(layers[n][k]) for k in KEYS] if layers[n] else ["n/a"] * 3) for n in layers])
        if any(x is None for x in layers.values()):
            lines[-1:] = ["n/a: more layers than the trained mask decoder has.", ""]
    rows = []
    for v, s in summary.items():
        for label, r in s["postprocessors"].items():
            if label.endswith("(tuned)"):
                rows.append([v, label.split(" ")[0], seeds(v)] + [_cell(r[k]) for k in KEYS])
    lines.extend(["**Every variant with every post-processor (tuned thresholds)**", "",
                  _row(["variant", "post-processing", "seeds", "PQ", "PQ^th", "PQ^st"]),
                  _row(["---"] * 3 + ["---:"] * 3)])
    lines.extend(_row(r) for r in rows)
    return "\n".join(lines) + "\n"


def plot_curves(runs: Dict[str, Dict[int, Dict]], path: str, title: str = "") -> None:
    """PQ (mask-wise, config thresholds) against iteration, one line per run (one colour per variant)."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (variant, by_seed) in enumerate(runs.items()):
        for j, (seed, r) in enumerate(sorted(by_seed.items())):
            pts = r.get("curve", [])
            ax.plot([p["iteration"] for p in pts], [p["PQ"] for p in pts], marker="o", ms=3,
                    color=colors[i % len(colors)], linestyle="-" if j == 0 else "--",
                    label=f"{variant} (seed {seed})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("PQ (mask-wise, config thresholds)")
    ax.set_title(title or "Learning curves of the ablation variants")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default=SHAPES_YAML, metavar="FILE", help="base config (default: shapes)")
    parser.add_argument("--dataset", default=None, help="evaluation split (default: the config's DATASETS.TEST[0])")
    add_threshold_arguments(parser, original_paper=False)
    parser.add_argument("--max-images", type=int, default=None, help="first N images of the evaluation split")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME",
                        help=f"default: all ({' '.join(VARIANTS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--multi-seed", nargs="+", default=None, metavar="VARIANT",
                        help="variants run with every seed (default: all)")
    parser.add_argument("--max-iter", type=int, default=1350, help="training iterations per run")
    parser.add_argument("--curve-points", type=int, default=4, help="evaluations during training (learning curve)")
    parser.add_argument("--postprocessors", nargs="+", default=list(POSTPROCESSORS), metavar="NAME")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides KEY VALUE ... for every variant (must come last)")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_parser().parse_args(argv)
    unknown = [n for n in args.postprocessors if n not in POSTPROCESSOR_REGISTRY]
    if unknown:
        raise SystemExit(f"unknown post-processor(s) {unknown}")
    if args.max_iter < 1 or args.curve_points < 1:
        raise SystemExit(f"--max-iter and --curve-points must be >= 1, got {args.max_iter}, {args.curve_points}")
    os.makedirs(args.output_dir, exist_ok=True)
    setup_logger(output=os.path.join(args.output_dir, "log.txt"), name="panoptic_segformer_benchmarks")
    setup_logger(output=os.path.join(args.output_dir, "log.txt"))
    base = setup_cfg(args.config_file, list(args.opts), freeze=True)
    plan = plan_runs(args.variants, args.seeds, args.multi_seed,
                     base.MODEL.PANOPTIC_SEGFORMER.LOCATION_DECODER_LAYERS)
    runs: Dict[str, Dict[int, Dict]] = OrderedDict()
    start = time.perf_counter()
    for seed in args.seeds:  # every variant at the first seed before any second seed
        for v, p in plan.items():
            if seed not in p["seeds"] or seed in runs.get(p["trains"], {}):
                continue
            print(f"[ablations] {p['trains']} seed {seed}", flush=True)
            runs.setdefault(p["trains"], {})[seed] = run_variant(args, p["trains"], seed)
    summary = summarize(plan, runs)
    dataset = args.dataset or base.DATASETS.TEST[0]
    title = (f"Ablations on {dataset}: {args.max_iter} iterations per run"
             + (f" (config overrides: {' '.join(args.opts)})" if args.opts else "")
             + f", {machine(torch.device(base.MODEL.DEVICE))}; paper: COCO val2017, R50, 50 epochs. "
             "Cells: mean (min–max) over the seeds.")
    tune_dataset, tune_images = tuning_split(base, dataset, args.tune_dataset, args.tune_images)
    same = [v for v, p in plan.items() if p["trains"] != v]
    notes = [f"Rows without a post-processor: mask-wise merging at the thresholds chosen by PQ on {tune_dataset}"
             + (f" (first {tune_images} images)" if tune_images else "") + ", per run."]
    if same:
        notes.append(f"{', '.join(same)}: the config's own location-decoder depth, i.e. the full model's runs.")
    md = "# The paper's ablations in miniature\n\n" + format_markdown(summary, title) + "\n" + "\n".join(notes) + "\n"
    with open(os.path.join(args.output_dir, "ablations.md"), "w") as f:
        f.write(md)
    plot_curves(runs, os.path.join(args.output_dir, "ablations.png"), f"Ablation variants on {dataset}")
    with open(os.path.join(args.output_dir, "ablations.json"), "w") as f:
        json.dump({"setup": {"command": ["python", "-m", "projects.benchmarks.ablations", *argv],
                             "machine": machine(torch.device(base.MODEL.DEVICE)), "variants": VARIANTS,
                             "plan": plan, "seconds_this_invocation": time.perf_counter() - start,
                             "run_seconds_total": sum(r.get("wall_seconds", 0.0) + r.get("eval_seconds", 0.0)
                                                      for by_seed in runs.values() for r in by_seed.values())},
                   "runs": runs, "summary": summary, "paper": PAPER}, f, indent=1, default=json_default)
    print(md)
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s]: %(message)s", datefmt="%H:%M:%S")
    main()
