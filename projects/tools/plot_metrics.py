#!/usr/bin/env python
"""Plot training curves from Detectron2's ``metrics.json`` files (one or several runs overlaid).

    python -m projects.tools.plot_metrics output/shapes/metrics.json -o curves.png
    python -m projects.tools.plot_metrics run_a/metrics.json run_b/metrics.json -o curves.png \
        --keys total_loss loss_stuff_mask_5 panoptic_seg/PQ panoptic_seg/PQ_th panoptic_seg/PQ_st

``metrics.json`` is written by Detectron2's ``JSONWriter``: one JSON dict per line, each with an
``"iteration"``; training lines hold the losses (``total_loss``, ``loss_*``), ``lr`` and timings,
evaluation lines the evaluator's results (``panoptic_seg/PQ``, ``segm/AP``, ...). Every key gets its
own subplot (value vs iteration) with one line per run; evaluation metrics are drawn with markers.
Without ``--keys``: ``total_loss`` and whichever of ``panoptic_seg/PQ``, ``panoptic_seg/PQ_th``,
``panoptic_seg/PQ_st`` and ``segm/AP`` the runs contain. A resumed run that logged an iteration twice
keeps the later value. A missing file, a malformed line or a key that no run has is an error naming
the file / key (and, for a key, listing the keys that exist).
"""
import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["load_metrics", "series", "default_keys", "plot_metrics", "main"]

DEFAULT_KEYS = ("total_loss", "panoptic_seg/PQ", "panoptic_seg/PQ_th", "panoptic_seg/PQ_st", "segm/AP")


def load_metrics(path: str) -> List[Dict]:
    """The records of one ``metrics.json`` (JSON lines; blank lines skipped).

    Raises FileNotFoundError if `path` does not exist, ValueError naming ``path:line`` for a line that
    is not a JSON object with a numeric ``"iteration"``, and ValueError if the file has no record.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: metrics file does not exist (Detectron2 writes "
                                "OUTPUT_DIR/metrics.json during training)")
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from e
            if not isinstance(record, dict) or not isinstance(record.get("iteration"), (int, float)):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a numeric 'iteration', "
                                 f"got {line[:120]!r}")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no metrics records (empty file)")
    return records


def series(records: Sequence[Dict], key: str):
    """(iterations, values) of `key`, sorted by iteration; for a repeated iteration the last record
    wins; non-numeric and non-finite values are skipped."""
    by_iter = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            by_iter[r["iteration"]] = float(v)
    its = sorted(by_iter)
    return its, [by_iter[i] for i in its]


def available_keys(runs: Sequence[Sequence[Dict]]) -> List[str]:
    """Sorted numeric keys (other than ``iteration``) present in any run."""
    keys = set()
    for records in runs:
        for r in records:
            keys.update(k for k, v in r.items()
                        if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool))
    return sorted(keys)


def default_keys(runs: Sequence[Sequence[Dict]]) -> List[str]:
    """``total_loss`` and the panoptic / mask AP metrics that exist in the runs (else every loss)."""
    present = set(available_keys(runs))
    keys = [k for k in DEFAULT_KEYS if k in present]
    if not keys:
        keys = sorted(k for k in present if "loss" in k)
    if not keys:
        raise ValueError(f"no loss or evaluation metric in the runs; available keys: {sorted(present)}")
    return keys


def _is_eval_key(key: str) -> bool:
    return "/" in key  # Detectron2 evaluators' results are "<task>/<metric>"


def plot_metrics(paths: Sequence[str], output: str, keys: Optional[Sequence[str]] = None,
                 labels: Optional[Sequence[str]] = None, columns: int = 2) -> List[str]:
    """Plot `keys` of the ``metrics.json`` files `paths` into the image `output`; returns the keys.

    Raises ValueError for a key that none of the runs has (listing the available keys), or when
    `labels` does not give one label per path.
    """
    if not paths:
        raise ValueError("no metrics.json given")
    runs = [load_metrics(p) for p in paths]
    if labels is None:
        labels = [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in paths]
        if len(set(labels)) < len(labels):
            labels = list(paths)
    elif len(labels) != len(paths):
        raise ValueError(f"--labels: {len(labels)} labels for {len(paths)} metrics files")
    available = available_keys(runs)
    keys = list(keys) if keys else default_keys(runs)
    missing = [k for k in keys if k not in available]
    if missing:
        raise ValueError(f"key(s) {missing} not found in {list(paths)}; available keys: {available}")

    columns = max(1, min(columns, len(keys)))
    rows = -(-len(keys) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for records, label in zip(runs, labels):
            its, values = series(records, key)
            if its:
                ax.plot(its, values, marker="o" if _is_eval_key(key) else None, markersize=3,
                        linewidth=1.2, label=label)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        if "loss" in key and all(v > 0 for r in runs for v in series(r, key)[1]):
            ax.set_yscale("log")
        if len(runs) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return keys


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", help="metrics.json files (one per run)")
    parser.add_argument("-o", "--output", default="curves.png", help="image to write (default: curves.png)")
    parser.add_argument("--keys", nargs="+", default=None,
                        help="keys to plot, e.g. total_loss panoptic_seg/PQ (default: total_loss and PQ)")
    parser.add_argument("--labels", nargs="+", default=None, help="legend label of each run")
    parser.add_argument("--columns", type=int, default=2, help="subplots per row")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    keys = plot_metrics(args.metrics, args.output, args.keys, args.labels, args.columns)
    print(f"wrote {args.output} ({', '.join(keys)})")
    return args.output


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"plot_metrics: error: {e}")
