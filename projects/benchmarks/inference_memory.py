#!/usr/bin/env python
"""Peak memory (resident set size) of inference on one image, in a fresh process.

    # the model on an input already at its test size (build + one forward):
    python -m projects.benchmarks.inference_memory --config-file configs/coco/panoptic_segformer_R50_24ep.yaml \\
        --image-size 800x1333 --threads 2 [--json-append results.json] [KEY VALUE ...]
    # DefaultPredictor (PanopticSegFormerPredictor) on a large photo: resized to the test size, outputs at HxW:
    python -m projects.benchmarks.inference_memory --config-file CFG --predictor --image-size 4000x6000 \\
        MODEL.PANOPTIC_SEGFORMER.TEST.SEMANTIC_ON False
    # plot peak RSS against image size and against read masks from the appended results:
    python -m projects.benchmarks.inference_memory --plot results.json --out memory.png

The model is built at random initialisation (seed 0, nothing downloaded; ``bench_utils``); the image is
random (seed 0): an (3, H, W) uint8 tensor given to ``model([...])``, or with --predictor an (H, W, 3)
BGR array given to :class:`panoptic_segformer.predictor.PanopticSegFormerPredictor`, which resizes it to
INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST and returns outputs at H x W. Peak memory is the process's
``getrusage`` ``ru_maxrss`` (everything the process ever held resident: Python, libraries, weights, the
image, activations and outputs), read after the model is built and after the calls. One process measures
one setting: run the tool once per setting for clean peaks. Each call's wall time and process CPU time
(all threads) are reported too; on a shared machine the CPU time is the steadier of the two.

Random weights keep almost no segment at the paper's thresholds (every class probability is near the
same small value), so to exercise memory as a trained model would, lower
MODEL.PANOPTIC_SEGFORMER.TEST.CONF_THRESHOLD_THING / _STUFF (and KEEP_THRESHOLD_*) with config overrides.
The tool reports how many masks the post-processor read at full resolution (its ``read_queries``,
observed without changing it) and how many segments it kept.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from projects.benchmarks import bench_utils


def peak_rss_gib() -> float:
    """This process's peak resident set size so far, GiB (Linux ru_maxrss is in KiB)."""
    return bench_utils.peak_rss_bytes() / 2 ** 30


def _count_read_masks(postprocessor, counts):
    """Observe the post-processor's ``read_queries`` (the masks it reads at full resolution) without
    changing its result: each call appends the number of queries read to ``counts``."""
    read_queries = getattr(postprocessor, "read_queries", None)
    if read_queries is None:
        return

    def counted(*args, **kwargs):
        read = read_queries(*args, **kwargs)
        counts.append(int(read.sum()))
        return read

    postprocessor.read_queries = counted


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file")
    parser.add_argument("--image-size", default=(800, 1333), type=bench_utils.image_size_arg,
                        help="HxW of the random image (default 800x1333)")
    parser.add_argument("--predictor", action="store_true",
                        help="run PanopticSegFormerPredictor (DefaultPredictor) on an HxW BGR array")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--iters", type=int, default=1, help="inference calls (peak over all of them)")
    parser.add_argument("--json-append", default=None, help="append this run's result to a JSON list file")
    parser.add_argument("--label", default="", help="series name stored with the result; --plot draws a series "
                        "of one image size against read masks, of several sizes against image size")
    parser.add_argument("--plot", nargs="+", default=None, metavar="JSON",
                        help="plot the results in these JSON files (no measurement)")
    parser.add_argument("--out", default="inference_memory.png", help="--plot: output image")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.plot is None and not args.config_file:
        parser.error("--config-file is required (unless --plot)")
    return args


def measure(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    start_rss = peak_rss_gib()
    cfg = bench_utils.random_init_cfg(args.config_file, args.opts, "cpu", quiet=True)
    h, w = args.image_size
    if args.predictor:
        from panoptic_segformer.predictor import PanopticSegFormerPredictor

        torch.manual_seed(0)
        predictor = PanopticSegFormerPredictor(cfg)
        model = predictor.model
        image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)

        def call():
            return predictor(image)
    else:
        model = bench_utils.build_model(cfg).eval()
        x = bench_utils.load_test_inputs(cfg, 1, image_size=(h, w))[0]

        def call():
            with torch.no_grad():
                return model([x])[0]
    built_rss = peak_rss_gib()
    read = []
    _count_read_masks(model.postprocessor, read)
    times, cpu_times = [], []
    for _ in range(args.iters):
        t0, c0 = time.perf_counter(), time.process_time()
        out = call()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    result = {
        "label": args.label, "config": args.config_file, "opts": args.opts, "predictor": args.predictor,
        "image_size": [h, w], "threads": torch.get_num_threads(), "iters": args.iters,
        "peak_rss_gib": peak_rss_gib(), "rss_before_build_gib": start_rss, "rss_after_build_gib": built_rss,
        "seconds": times, "cpu_seconds": cpu_times, "read_masks": read[-1] if read else None,
        "segments": len(out["panoptic_seg"][1]) if "panoptic_seg" in out else None,
        "outputs": {k: list(v.shape) if hasattr(v, "shape") else type(v).__name__ for k, v in out.items()
                    if k != "panoptic_seg"},
        "machine": bench_utils.machine(torch.device("cpu")), "loadavg": os.getloadavg(),
    }
    return result


def plot(files, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = [json.load(open(f)) for f in files]  # lists of runs, or dicts with "predictor_runs"
    runs = [r for d in loaded for r in (d["predictor_runs"] if isinstance(d, dict) else d) if r.get("predictor")]
    series = {}
    for r in runs:
        series.setdefault(r["label"], []).append(r)
    # a series of one image size is drawn against the masks read, one of several sizes against size
    by_reads = {k: v for k, v in series.items() if len({tuple(r["image_size"]) for r in v}) == 1}
    by_size = {k: v for k, v in series.items() if k not in by_reads}
    panels = [(p, xlabel) for p, xlabel in ((by_size, "output image size (megapixels)"),
                                           (by_reads, "masks read at full resolution")) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (panel, xlabel) in zip(axes[0], panels):
        for name, rs in sorted(panel.items()):
            xs = [r["read_masks"] if panel is by_reads else r["image_size"][0] * r["image_size"][1] / 1e6
                  for r in rs]
            order = np.argsort(xs)
            ys = np.asarray([r["peak_rss_gib"] for r in rs])[order]
            ax.plot(np.asarray(xs)[order], ys, "o-", label=name)
            for r, x, y in zip(np.asarray(rs)[order], np.asarray(xs)[order], ys):
                ax.annotate(f"{r['image_size'][0]}x{r['image_size'][1]}", (x, y), textcoords="offset points",
                            xytext=(4, -10), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("peak RSS (GiB)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("DefaultPredictor peak memory (fresh process per point)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None):
    args = parse_args(argv)
    if args.plot is not None:
        return plot(args.plot, args.out)
    result = measure(args)
    print(json.dumps(result, indent=1, default=bench_utils.json_default))
    if args.json_append:
        runs = json.load(open(args.json_append)) if os.path.exists(args.json_append) else []
        runs.append(result)
        bench_utils.write_json(args.json_append, runs)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
