#!/usr/bin/env python
"""onnxruntime against PyTorch on the CPU, side by side in one run.

    python -m projects.benchmarks.onnx_speed --config-file configs/coco/panoptic_segformer_R50_24ep.yaml \\
        [--image-size 800x1333] [--iters 5] [--json out.json] [KEY VALUE ...]

The config's model at random initialisation (MODEL.WEIGHTS cleared, nothing downloaded) is exported with
:func:`panoptic_segformer.deploy.export_onnx` (timed: the export time) into a temporary folder. One BGR
image of exactly ``--image-size`` (the first COCO sample image, resized) then goes through
``PanopticSegFormerPredictor`` and ``OnnxPredictor`` -- the same pre- and post-processing, the network in
PyTorch or in onnxruntime -- alternately, one untimed call each, then ``--iters`` timed calls each
(PyTorch, onnxruntime, PyTorch, ...), so that load from other processes hits both alike. Reported: each
backend's per-image times (median, min, mean), with --network-times the network alone (the exported part,
same alternation), the largest difference of the per-query outputs and whether the panoptic segmentations are identical, the
load average before and after. CPU only; torch and onnxruntime use their default thread counts.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import cv2
import torch

from projects.benchmarks import bench_utils
from projects.deploy.export import parse_image_size

__all__ = ["get_parser", "main"]


def get_parser():
    parser = argparse.ArgumentParser(description="onnxruntime vs PyTorch CPU time per image")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--image-size", type=parse_image_size, default=(800, 1333), metavar="HxW",
                        help="size of the input image (default 800x1333, the R50 test size)")
    parser.add_argument("--trace-size", type=parse_image_size, default=(512, 512), metavar="HxW",
                        help="example input of the export")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per backend (alternated)")
    parser.add_argument("--network-times", action="store_true",
                        help="also time the exported network alone in both backends (same alternation)")
    parser.add_argument("--onnx-model", metavar="FILE",
                        help="reuse this export of the same config (random init, seed 0) instead of exporting")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def _stats(times):
    return {"median_s": statistics.median(times), "min_s": min(times), "mean_s": statistics.mean(times),
            "times_s": times}


def main(argv=None) -> int:
    from detectron2.data import DatasetCatalog

    from panoptic_segformer import OnnxPredictor, PanopticSegFormerPredictor
    from panoptic_segformer.deploy import PER_QUERY_OUTPUTS, ExportedNetwork, export_onnx
    from projects.demo.demo import predictor_inputs

    args = get_parser().parse_args(argv)
    if args.iters < 1:
        raise ValueError(f"--iters must be >= 1, got {args.iters}")
    load_before = os.getloadavg()
    cfg = bench_utils.random_init_cfg(args.config_file, list(args.opts) + ["MODEL.DEVICE", "cpu"])
    model = bench_utils.build_model(cfg).eval()
    if args.onnx_model:
        path, export_s = args.onnx_model, None
    else:
        path = os.path.join(tempfile.mkdtemp(prefix="psf-onnx-"), "model.onnx")
        export_s, _ = _timed(export_onnx, model, path, args.trace_size)
        print(f"export: {export_s:.1f} s -> {path} ({os.path.getsize(path) / 2**20:.1f} MiB)", flush=True)

    h, w = args.image_size
    bgr = cv2.resize(cv2.imread(DatasetCatalog.get("coco_panoptic_sample")[0]["file_name"]), (w, h))
    pytorch = PanopticSegFormerPredictor(cfg)
    pytorch.model = model
    onnx = OnnxPredictor(cfg, path)
    network = ExportedNetwork(model)
    with torch.no_grad():
        images = model.preprocess_image([predictor_inputs(pytorch, bgr)])
    sizes = torch.tensor([images.image_sizes[0]])

    def torch_network():
        with torch.no_grad():
            return network(images.tensor, sizes)

    # Untimed first calls (allocations, onnxruntime's arena); they also give the parity check.
    a, b = pytorch(bgr), onnx(bgr)
    want, got = torch_network(), onnx.model.run(images)
    diffs = {k: float((got[k].double() - v.double()).abs().max()) for k, v in zip(PER_QUERY_OUTPUTS, want)}
    same_panoptic = bool(torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
                         and a["panoptic_seg"][1] == b["panoptic_seg"][1])
    print(f"per-query max abs difference {diffs}, panoptic_seg identical: {same_panoptic}", flush=True)
    times = {"pytorch": [], "onnxruntime": []}
    if args.network_times:
        times.update(pytorch_network=[], onnxruntime_network=[])
    for i in range(args.iters):
        times["pytorch"].append(_timed(pytorch, bgr)[0])
        times["onnxruntime"].append(_timed(onnx, bgr)[0])
        if args.network_times:
            times["pytorch_network"].append(_timed(torch_network)[0])
            times["onnxruntime_network"].append(_timed(onnx.model.run, images)[0])
        print(f"iter {i}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    result = {
        "config": args.config_file, "opts": list(args.opts), "image_size": [h, w],
        "network_input": list(images.tensor.shape), "trace_size": list(args.trace_size), "iters": args.iters,
        "export_s": export_s, "onnx_mib": os.path.getsize(path) / 2**20,
        "per_query_max_abs_diff": diffs, "panoptic_seg_identical": same_panoptic,
        "segments": len(a["panoptic_seg"][1]),
        "machine": bench_utils.machine(torch.device("cpu")),
        "onnxruntime": __import__("onnxruntime").__version__,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        **{k: _stats(v) for k, v in times.items()},
    }
    rows = [[k, f"{result[k]['median_s']:.2f}", f"{result[k]['min_s']:.2f}", f"{result[k]['mean_s']:.2f}"]
            for k in times]
    print(bench_utils.markdown_table(["backend (per image)", "median s", "min s", "mean s"], rows))
    print(json.dumps({k: result[k] for k in ("export_s", "per_query_max_abs_diff", "panoptic_seg_identical",
                                             "segments", "load_average_before", "load_average_after",
                                             "machine")}, default=bench_utils.json_default))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=bench_utils.json_default)
    return 0


if __name__ == "__main__":
    sys.exit(main())
