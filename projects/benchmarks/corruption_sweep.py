#!/usr/bin/env python
"""Robustness to natural corruptions (paper Sec. 4.4, Table 11) for one checkpoint, as one command.

    python -m projects.benchmarks.corruption_sweep --config-file configs/shapes/panoptic_segformer_shapes.yaml \
        --dataset shapes_panoptic_val --output-dir output/corruption_sweep MODEL.WEIGHTS output/shapes/model_final.pth
    python -m projects.benchmarks.corruption_sweep --config-file configs/coco/panoptic_segformer_R50_24ep.yaml \
        --dataset coco_2017_val_panoptic --max-images 2000 --output-dir out/coco_c MODEL.WEIGHTS model_final.pth

Evaluates the clean images and every (corruption, severity) cell: by default the 16 corruptions of
Table 11 at severities 1-5 (81 cells). Each cell is an evaluation with ``TEST.CORRUPTION.NAME`` /
``SEVERITY`` set, i.e. the test-time mapper corrupts each image right after reading it, seeded by its
image id (``panoptic_segformer/data/corruptions.py``). Within a cell the network runs ONCE per image and
its predictions feed every post-processor of ``--postprocessors`` (default: mask-wise merging and DETR's
pixel-wise argmax) through ``compare_postprocessors``, each scored by its own COCOPanopticEvaluator.

Thresholds: as in ``compare_postprocessors``' fair comparison, each post-processor's thresholds are chosen
ONCE, by PQ on the clean tuning split (``--tune-dataset``; default the held-out split of the evaluation set,
e.g. ``shapes_panoptic_heldout``), and kept for every cell: the model is evaluated zero-shot on corruptions
it was neither trained nor tuned on (Sec. 4.4). The chosen values are stored in the JSON (a resumed sweep
reuses them) and printed with the table. ``--original-paper-thresholds`` uses the original papers'
defaults instead (DETR 0.85, MaskFormer 0.8, the heuristic's 0.5; the config's values for the model's own).

Writes into ``--output-dir``:
- ``corruption_sweep.json``: the setup, every cell (PQ, SQ, RQ, PQ_th, PQ_st per post-processor, seconds),
  the skipped corruptions with their reason, and the summary. Saved after each cell: running the same
  command again resumes, computing only the missing cells (a JSON from another setup is an error);
- ``corruption_sweep.md``: a Table-11-style table (clean PQ, mean PQ over all corruptions and severities,
  PQ per corruption averaged over severities; one row per post-processor) and per-severity tables;
- ``corruption_sweep.png``: PQ against severity (0 = clean) per corruption, one line per post-processor.

A corruption that cannot run on this machine (see ``unavailable_reason``) is skipped with a message
naming it and the reason, recorded in the JSON and shown as "skipped" in the table.
"""
import argparse
import hashlib
import json
import logging
import math
import os
import re
import sys
import textwrap
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from panoptic_segformer.data.corruptions import (  # noqa: E402
    CORRUPTION_NAMES,
    SEVERITIES,
    TABLE11_CORRUPTIONS,
    check_corruption,
    unavailable_reason,
)
from panoptic_segformer.postprocessing import registered_postprocessors  # noqa: E402

from .bench_utils import json_default, machine, markdown_table  # noqa: E402
from .compare_postprocessors import (  # noqa: E402
    METRICS,
    add_threshold_arguments,
    comparison_cfg,
    confidence_threshold_of,
    format_thresholds,
    load_model,
    make_grids,
    original_paper_rows,
    score_postprocessors,
    tune_thresholds,
    tuned_rows,
    tuning_split,
)

__all__ = ["CLEAN", "cell_key", "plan_cells", "run_sweep", "summarize", "format_markdown", "plot_sweep", "main"]

logger = logging.getLogger("panoptic_segformer_benchmarks")

CLEAN = "clean"
DEFAULT_POSTPROCESSORS = ("mask_wise", "pixel_argmax")
RESULTS_JSON, TABLE_MD, PLOT_PNG = "corruption_sweep.json", "corruption_sweep.md", "corruption_sweep.png"
# Table 11's short column names.
SHORT_NAMES = {
    "motion_blur": "Motion", "defocus_blur": "Defoc", "glass_blur": "Glass", "gaussian_blur": "Gauss blur",
    "gaussian_noise": "Gauss noise", "impulse_noise": "Impul", "shot_noise": "Shot", "speckle_noise": "Speck",
    "brightness": "Bright", "contrast": "Contr", "saturate": "Satur", "jpeg_compression": "JPEG",
    "snow": "Snow", "spatter": "Spatt", "fog": "Fog", "frost": "Frost", "zoom_blur": "Zoom",
    "elastic_transform": "Elastic", "pixelate": "Pixel",
}


def cell_key(name: str, severity: int) -> str:
    """JSON key of a cell: "clean" or "<corruption>/<severity>"."""
    return CLEAN if name == CLEAN else f"{name}/{severity}"


def plan_cells(corruptions: Sequence[str], severities: Sequence[int]) -> List[tuple]:
    """[(name, severity)]: the clean images first (severity 0), then every corruption x severity."""
    for name in corruptions:
        for severity in severities:
            check_corruption(name, severity, key="--corruptions/--severities")
    if len(set(corruptions)) != len(corruptions) or len(set(severities)) != len(severities):
        raise ValueError(f"duplicate corruption or severity in {list(corruptions)} / {list(severities)}")
    return [(CLEAN, 0)] + [(name, s) for name in corruptions for s in severities]


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def threshold_setting(cfg, args, postprocessors: Sequence[str]):
    """How the thresholds are set: "original paper", or the tuning split, its image limit and the grids."""
    if args.original_paper_thresholds:
        return "original paper"
    tune_dataset, tune_images = tuning_split(cfg, cfg.DATASETS.TEST[0], args.tune_dataset, args.tune_images)
    return {"tune_dataset": tune_dataset, "tune_images": tune_images,
            "grids": make_grids(postprocessors, args.conf_grid, args.conf_only)}


def setup_signature(cfg, args, postprocessors: Sequence[str]) -> Dict:
    """What a resumed sweep must share with the one that wrote the JSON (the cells may differ)."""
    weights = cfg.MODEL.WEIGHTS
    signature = {
        "config_file": os.path.abspath(args.config_file),
        "opts": list(args.opts),
        "dataset": cfg.DATASETS.TEST[0],
        "postprocessors": list(postprocessors),
        "max_images": args.max_images,
        "weights": weights,
        "weights_sha256": _file_sha256(weights) if weights and os.path.isfile(weights) else None,
        "thresholds": threshold_setting(cfg, args, postprocessors),
    }
    return json.loads(json.dumps(signature))  # as read back from the JSON (tuples become lists)


def load_results(path: str, signature: Dict) -> Dict:
    """The results of a previous run of the same setup at ``path`` (a fresh record if none)."""
    if not os.path.isfile(path):
        return {"setup": signature, "cells": {}}
    try:
        with open(path) as f:
            results = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not a JSON file of a corruption sweep ({e}); remove it or use another "
                         "--output-dir") from e
    if not isinstance(results, dict) or "cells" not in results or "setup" not in results:
        raise ValueError(f"{path}: not a corruption sweep's JSON (no 'setup'/'cells'); use another --output-dir")
    if results["setup"] != signature:
        diff = {k: (results["setup"].get(k), v) for k, v in signature.items() if results["setup"].get(k) != v}
        raise ValueError(f"{path}: written by a sweep with another setup (previous, now: {diff}); use another "
                         "--output-dir, or --restart to discard it")
    return results


def _save_json(path: str, data: Dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=json_default)
    os.replace(tmp, path)


def choose_thresholds(cfg, model, setting, postprocessors: Sequence[str], progress: bool = True) -> Dict:
    """{name: {argument: value}}: each post-processor's thresholds chosen by PQ on the (clean) tuning split
    of ``setting`` (:func:`threshold_setting`) with ``compare_postprocessors.tune_thresholds``."""
    tuning = tune_thresholds(cfg, model, setting["tune_dataset"], postprocessors, setting["tune_images"],
                             {n: [tuple(step) for step in g] for n, g in setting["grids"].items()},
                             progress=progress)
    return OrderedDict((n, tuning[n]["chosen"]) for n in postprocessors)


def run_sweep(cfg, model, cells: Sequence[tuple], postprocessors: Sequence[str], results: Dict,
              results_path: Optional[str] = None, max_images: Optional[int] = None, progress: bool = True,
              thresholds: Optional[Dict[str, Dict]] = None) -> Dict:
    """Evaluate the cells missing from ``results["cells"]`` (saved to ``results_path`` after each).

    Args:
        cfg: the frozen comparison config (its TEST.CORRUPTION is set per cell).
        model: the PanopticSegFormer in eval mode.
        cells: [(corruption name or CLEAN, severity)] from :func:`plan_cells`.
        postprocessors: registered names, all fed from one forward pass per image.
        results: {"cells": {key: cell}} of a previous run (updated in place and returned).
        thresholds: {name: {argument: value}} (:func:`choose_thresholds`), the same in every cell; None:
            the original papers' defaults.
    """
    dataset = cfg.DATASETS.TEST[0]
    if thresholds is None:
        rows = original_paper_rows(cfg, model, postprocessors)
    else:
        rows = tuned_rows(cfg, OrderedDict((n, thresholds[n]) for n in postprocessors))
    pending = [c for c in cells if cell_key(*c) not in results["cells"]]
    with tqdm(total=len(pending), unit="cell", desc="corruption sweep", disable=not progress) as bar:
        for name, severity in pending:
            key = cell_key(name, severity)
            bar.set_description(f"corruption sweep: {key}")
            cell_cfg = cfg.clone()
            cell_cfg.defrost()
            cell_cfg.TEST.CORRUPTION.NAME = "" if name == CLEAN else name
            cell_cfg.TEST.CORRUPTION.SEVERITY = max(severity, 1)
            cell_cfg.freeze()
            start = time.perf_counter()
            table = score_postprocessors(cell_cfg, model, dataset, rows, max_images, progress=False)
            seconds = time.perf_counter() - start
            results["cells"][key] = {
                "corruption": name, "severity": severity, "seconds": seconds,
                "images": next(iter(table.values()))["images"],
                "results": {pp: {m: row[m] for m in METRICS} for pp, row in table.items()},
            }
            if results_path:
                _save_json(results_path, results)
            bar.set_postfix_str(" ".join(f"{pp} PQ {row['PQ']:.1f}" for pp, row in table.items()))
            bar.update(1)
    return results


def summarize(results: Dict, corruptions: Sequence[str], severities: Sequence[int],
              postprocessors: Sequence[str], skipped: Optional[Dict[str, str]] = None) -> Dict:
    """Per post-processor: clean PQ, PQ per corruption (per severity and their mean), the mean over
    corruptions at each severity, and the mean over all cells (Table 11's "Mean"). Skipped corruptions
    are left out of the means; every other cell must be in ``results``."""
    skipped = skipped or {}
    cells = results["cells"]
    used = [n for n in corruptions if n not in skipped]
    missing = [cell_key(*c) for c in plan_cells(used, severities) if cell_key(*c) not in cells]
    if missing:
        raise ValueError(f"the sweep lacks the cells {missing}")
    summary = OrderedDict()
    for pp in postprocessors:
        def pq(name, severity):
            return cells[cell_key(name, severity)]["results"][pp]["PQ"]

        per_corruption = OrderedDict()
        for name in used:
            by_severity = OrderedDict((s, pq(name, s)) for s in severities)
            per_corruption[name] = {"severities": by_severity, "mean": _mean(by_severity.values())}
        summary[pp] = {
            "clean": pq(CLEAN, 0),
            "mean": _mean([pq(n, s) for n in used for s in severities]) if used else float("nan"),
            "per_severity": OrderedDict((s, _mean([pq(n, s) for n in used])) for s in severities) if used else {},
            "corruptions": per_corruption,
        }
    return summary


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def format_markdown(summary: Dict, corruptions: Sequence[str], severities: Sequence[int],
                    skipped: Optional[Dict[str, str]] = None, title: str = "") -> str:
    """Table 11 layout (post-processing | Clean | Mean | one column per corruption, mean over severities),
    then one table per post-processor with PQ per corruption and severity."""
    skipped = skipped or {}
    lines = [title, ""] if title else []
    header = ["post-processing", "Clean", "Mean"] + [SHORT_NAMES.get(n, n) for n in corruptions]
    rows = []
    for pp, s in summary.items():
        rows.append([pp, _fmt(s["clean"]), _fmt(s["mean"])]
                    + ["skipped" if n in skipped else _fmt(s["corruptions"][n]["mean"]) for n in corruptions])
    lines.append(markdown_table(header, rows))
    lines.append("")
    at = f"severity {severities[0]}" if len(severities) == 1 else f"severities {', '.join(map(str, severities))}"
    lines.append(f"PQ (%). Clean: no corruption. Mean: over the {len(corruptions) - len(skipped)} corruptions at "
                 f"{at}. Corruption columns: mean over the severities.")
    for name, reason in skipped.items():
        lines.append(f"Skipped {name}: {reason}")
    for pp, s in summary.items():
        lines += ["", f"PQ of `{pp}` per severity:", ""]
        detail_rows = [[name] + [_fmt(c["severities"][sev]) for sev in severities] + [_fmt(c["mean"])]
                       for name, c in s["corruptions"].items()]
        detail_rows.append(["mean"] + [_fmt(s["per_severity"].get(sev)) for sev in severities] + [_fmt(s["mean"])])
        lines.append(markdown_table(["corruption"] + [f"sev {sev}" for sev in severities] + ["mean"], detail_rows))
    return "\n".join(lines) + "\n"


def plot_sweep(summary: Dict, path: str, title: str = "") -> None:
    """PQ vs severity (0 = clean) per corruption, one line per post-processor, plus the mean panel."""
    first = next(iter(summary.values()))
    panels = list(first["corruptions"]) + ["mean"]
    ncols = min(6, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.2 * nrows), squeeze=False, sharey=True)
    for ax, panel in zip(axes.flat, panels):
        for pp, s in summary.items():
            by_severity = s["per_severity"] if panel == "mean" else s["corruptions"][panel]["severities"]
            xs = [0] + [int(k) for k in by_severity]
            ax.plot(xs, [s["clean"]] + list(by_severity.values()), marker="o", markersize=3, label=pp)
        ax.set_title(panel if panel == "mean" else SHORT_NAMES.get(panel, panel), fontsize=9)
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("PQ")
    for ax in axes[-1, :]:
        ax.set_xlabel("severity (0: clean)")
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(textwrap.fill(title, width=int(11 * 2.6 * ncols)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--dataset", default=None, help="registered panoptic dataset (default: DATASETS.TEST[0])")
    parser.add_argument("--output-dir", required=True, help="where the JSON, table and plot go (resumed if present)")
    parser.add_argument("--corruptions", nargs="+", default=None, metavar="NAME",
                        help="corruptions to sweep (default: Table 11's 16; 'all': all of imagecorruptions' "
                             f"{len(CORRUPTION_NAMES)})")
    parser.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES))
    parser.add_argument("--postprocessors", nargs="+", default=list(DEFAULT_POSTPROCESSORS), metavar="NAME",
                        help="registered post-processors fed from the same forward pass")
    parser.add_argument("--max-images", type=int, default=None, help="first N images of the dataset")
    add_threshold_arguments(parser)
    parser.add_argument("--restart", action="store_true", help="discard a previous sweep's JSON in --output-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides KEY VALUE ..., e.g. MODEL.WEIGHTS model.pth")
    return parser


_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def parse_args(argv=None):
    """The parsed arguments; config overrides start at the first KEY (e.g. ``MODEL.WEIGHTS``), so that they
    may follow a list option such as ``--severities 1 2`` directly."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = next((i for i, a in enumerate(argv) if _CONFIG_KEY.match(a)), len(argv))
    args = get_parser().parse_args(argv[:split])
    args.opts = list(args.opts) + argv[split:]
    return args


def main(argv=None):
    """Run (or resume) the sweep; write the JSON, Markdown table and plot; returns the summary."""
    args = parse_args(argv)
    if any(str(o).startswith("TEST.CORRUPTION") for o in args.opts[::2]):
        raise SystemExit("the sweep sets TEST.CORRUPTION for each cell itself: do not pass it")
    unknown = [n for n in args.postprocessors if n not in registered_postprocessors()]
    if unknown:
        raise SystemExit(f"unknown post-processor(s) {unknown}; registered: {registered_postprocessors()}")
    if args.corruptions == ["all"]:
        corruptions = CORRUPTION_NAMES
    else:
        corruptions = tuple(args.corruptions or TABLE11_CORRUPTIONS)
    try:
        plan_cells(corruptions, args.severities)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    if args.max_images is not None and args.max_images < 1:
        raise SystemExit(f"--max-images must be >= 1, got {args.max_images}")

    skipped = OrderedDict()
    for name in corruptions:
        reason = unavailable_reason(name)
        if reason is not None:
            skipped[name] = reason
            logger.warning(f"skipping corruption {name}: it cannot run on this machine ({reason})")
    if len(skipped) == len(corruptions):
        raise SystemExit(f"no corruption can run on this machine: {dict(skipped)}")
    cells = plan_cells([n for n in corruptions if n not in skipped], args.severities)

    cfg = comparison_cfg(args)
    os.makedirs(args.output_dir, exist_ok=True)
    results_path = os.path.join(args.output_dir, RESULTS_JSON)
    if args.restart and os.path.exists(results_path):
        os.remove(results_path)
    signature = setup_signature(cfg, args, args.postprocessors)
    results = load_results(results_path, signature)
    model = load_model(cfg)
    device = model.device
    setting = signature["thresholds"]
    if setting == "original paper":
        thresholds = OrderedDict((n, confidence_threshold_of(n, pp))
                                 for n, pp in original_paper_rows(cfg, model, args.postprocessors).items())
    elif "thresholds" in results:  # chosen by the sweep being resumed
        thresholds = results["thresholds"]
    else:
        start = time.perf_counter()
        thresholds = choose_thresholds(cfg, model, setting, args.postprocessors, progress=not args.no_progress)
        results["thresholds"] = thresholds
        results["tuning_seconds"] = time.perf_counter() - start
        _save_json(results_path, results)
    results["thresholds"] = thresholds
    done_before = sum(cell_key(*c) in results["cells"] for c in cells)
    if done_before:
        logger.info(f"resuming: {done_before} of {len(cells)} cells already in {results_path}")
    start = time.perf_counter()
    run_sweep(cfg, model, cells, args.postprocessors, results, results_path, args.max_images,
              progress=not args.no_progress, thresholds=None if setting == "original paper" else thresholds)
    wall = time.perf_counter() - start
    computed = len(cells) - done_before

    summary = summarize(results, corruptions, args.severities, args.postprocessors, skipped)
    images = results["cells"][CLEAN]["images"]
    cell_seconds = sum(results["cells"][cell_key(*c)]["seconds"] for c in cells)
    results.update({
        "skipped": skipped, "summary": summary, "machine": machine(device),
        "runtime": {"cells": len(cells), "images_per_cell": images, "cell_seconds_total": cell_seconds,
                    "computed_this_run": computed, "wall_seconds_this_run": wall},
    })
    _save_json(results_path, results)
    weights = cfg.MODEL.WEIGHTS or "random init"
    title = (f"Corruption sweep of {weights} on {cfg.DATASETS.TEST[0]} ({images} images per cell, "
             f"{len(cells)} cells)")
    markdown = format_markdown(summary, corruptions, args.severities, skipped, title)
    chosen = "; ".join(f"{n}: {format_thresholds(t)}" for n, t in thresholds.items())
    if setting == "original paper":
        markdown += f"\nThresholds: the original papers' defaults ({chosen}).\n"
    else:
        markdown += (f"\nThresholds, chosen by PQ on the clean {setting['tune_dataset']}"
                     + (f" (first {setting['tune_images']} images)" if setting["tune_images"] else "")
                     + f" and used in every cell: {chosen}.\n")
    markdown += (f"\nMachine: {machine(device)}. Evaluation time: {cell_seconds / 60:.1f} min for the "
                 f"{len(cells)} cells ({cell_seconds / len(cells):.1f} s per cell, one forward pass per image "
                 f"for {len(args.postprocessors)} post-processors).\n")
    with open(os.path.join(args.output_dir, TABLE_MD), "w") as f:
        f.write(markdown)
    plot_sweep(summary, os.path.join(args.output_dir, PLOT_PNG),
               f"PQ under corruption: {os.path.basename(weights)} on {cfg.DATASETS.TEST[0]} ({images} images)")
    print(markdown)
    print(f"{computed} cells computed now, {done_before} resumed; wrote {args.output_dir}/"
          f"{{{RESULTS_JSON}, {TABLE_MD}, {PLOT_PNG}}}")
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s]: %(message)s", datefmt="%H:%M:%S")
    # One evaluation per cell: keep Detectron2's per-evaluation logs out of the progress bar.
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    logging.getLogger("panoptic_segformer").setLevel(logging.WARNING)
    main()
    sys.exit(0)
