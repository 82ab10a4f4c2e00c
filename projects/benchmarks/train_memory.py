#!/usr/bin/env python
"""Peak training memory and step time of a Panoptic SegFormer config at batch 1 (App. B.2: query filtering and memory).

    python -m projects.benchmarks.train_memory --config-file configs/coco/panoptic_segformer_R50_24ep.yaml \\
        --device cuda [--image-size 800x1333] [--query-filter on,off] [--dtype fp32,fp16] [--json out.json]

One training step = the model's training forward (losses) + backward + the config's optimizer step
(``panoptic_segformer.engine.build_optimizer``: AdamW, backbone LR multiplier, full-model gradient clipping). The model
is at random initialisation (MODEL.WEIGHTS cleared, nothing downloaded). The batch is one synthetic
image of --image-size (random pixels) with a synthetic panoptic annotation -- --things thing segments
(random ellipses of random thing classes, later ones on top) over --stuff horizontal stuff bands of
distinct random stuff classes -- turned into the mapper's "instances" / "stuff" targets, so the
matcher, query filtering and losses see a realistic number of segments.

Each variant (query filtering on/off x dtype) runs in a fresh subprocess so that peaks do not mix:

* CUDA: ``torch.cuda.max_memory_allocated`` (tensors) and ``max_memory_reserved`` (the caching
  allocator's footprint, closer to what nvidia-smi shows) over the warm-up and timed steps, after
  ``reset_peak_memory_stats`` once the model, optimizer and batch exist.
* CPU: torch has no peak counter for CPU tensors; reported is the growth of the process's peak
  resident set size (``getrusage`` ru_maxrss) over the steps, relative to the resident size just
  before the first step (model, optimizer and batch loaded). It includes allocator caching and
  fragmentation, so it is an upper bound on the tensors' peak.

--dtype fp16 is Detectron2's AMP (SOLVER.AMP.ENABLED: autocast fp16 + GradScaler); bf16 is autocast
bf16 without a scaler; fp32 is plain (TF32 off).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from projects.benchmarks import bench_utils
from projects.benchmarks.bench_utils import autocast, markdown_table, sync


def synthetic_batch(height, width, thing_ids, stuff_ids, num_things, num_stuff, seed=0):
    """One training input as PanopticSegFormerDatasetMapper makes it: {"image" (3, H, W) uint8,
    "height", "width", "instances" (thing classes, BitMasks, Boxes), "stuff" (one per stuff class)}."""
    from panoptic_segformer.data.dataset_mapper import target_instances

    if num_stuff > len(stuff_ids):
        raise ValueError(f"--stuff {num_stuff} exceeds the {len(stuff_ids)} stuff classes of the config")
    rng = np.random.default_rng(seed)
    pan = np.zeros((height, width), dtype=np.int64)
    segments = []  # (id, category, isthing)
    bands = np.linspace(0, height, num_stuff + 1).round().astype(int)
    for k, cat in enumerate(rng.choice(stuff_ids, size=num_stuff, replace=False)):
        pan[bands[k]:bands[k + 1]] = len(segments) + 1
        segments.append((len(segments) + 1, int(cat), False))
    ys, xs = np.ogrid[:height, :width]
    for _ in range(num_things):
        cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
        ry, rx = rng.uniform(0.03, 0.2) * height, rng.uniform(0.03, 0.2) * width
        pan[((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1] = len(segments) + 1
        segments.append((len(segments) + 1, int(rng.choice(thing_ids)), True))
    thing_classes, thing_masks, stuff_classes, stuff_masks = [], [], [], []
    for seg_id, cat, isthing in segments:
        mask = pan == seg_id
        if not mask.any():
            continue  # covered by later things
        (thing_classes if isthing else stuff_classes).append(cat)
        (thing_masks if isthing else stuff_masks).append(mask)
    order = np.argsort(stuff_classes, kind="stable")
    image = torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8))
    return {
        "image": image, "height": height, "width": width,
        "instances": target_instances((height, width), thing_classes, thing_masks, with_boxes=True),
        "stuff": target_instances((height, width), [stuff_classes[i] for i in order],
                            [stuff_masks[i] for i in order], with_boxes=False),
    }


def _current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args):
    """One variant in this process: returns a dict of results."""
    from detectron2.utils.events import EventStorage

    from panoptic_segformer.engine import build_optimizer

    opts = list(args.opts) + ["MODEL.PANOPTIC_SEGFORMER.QUERY_FILTER.ENABLED", str(args.query_filter == "on")]
    cfg = bench_utils.random_init_cfg(args.config_file, opts, args.device, quiet=True)
    device = torch.device(cfg.MODEL.DEVICE)
    model = bench_utils.build_model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)
    batch = synthetic_batch(args.image_size[0], args.image_size[1], model.thing_ids, model.stuff_ids,
                            args.things, args.stuff)
    scaler = None
    if args.dtype == "fp16" and device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
    times = []
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_allocated = torch.cuda.memory_allocated(device)
    rss_before = _current_rss_bytes()
    with EventStorage():
        for step in range(args.warmup + args.steps):
            sync(device)
            start = time.perf_counter()
            with autocast(device, args.dtype):
                losses = model([batch])
            total = sum(losses.values())
            if not torch.isfinite(total):
                raise FloatingPointError(f"non-finite loss at step {step}: {total.item()}")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(total).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                total.backward()
                optimizer.step()
            sync(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
    result = {
        "query_filter": args.query_filter, "dtype": args.dtype, "device": str(device),
        "image_size": list(args.image_size), "things": len(batch["instances"]), "stuff": len(batch["stuff"]),
        "mask_decoder_thing_queries": (cfg.MODEL.PANOPTIC_SEGFORMER.QUERY_FILTER.NUM_QUERIES
                                       if args.query_filter == "on" else cfg.MODEL.PANOPTIC_SEGFORMER.NUM_THING_QUERIES),
        "step_ms_mean": 1e3 * statistics.mean(times), "step_ms_median": 1e3 * statistics.median(times),
        "steps": args.steps, "warmup": args.warmup, "loss": float(total.detach()),
        "machine": bench_utils.machine(device),
    }
    if device.type == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        result["before_steps_allocated_gib"] = base_allocated / 2**30
    else:
        peak = bench_utils.peak_rss_bytes()
        result["peak_rss_gib"] = peak / 2**30
        result["rss_before_steps_gib"] = rss_before / 2**30
        result["peak_rss_growth_gib"] = max(peak - rss_before, 0) / 2**30
    return result


def _list(text):
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--device", default=None, help="cpu / cuda (default: MODEL.DEVICE)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--image-size", default="800x1333", help="HxW of the synthetic image")
    parser.add_argument("--things", type=int, default=10, help="thing segments in the synthetic target")
    parser.add_argument("--stuff", type=int, default=5, help="stuff segments (distinct classes)")
    parser.add_argument("--query-filter", default="on,off", help="on / off / on,off (QUERY_FILTER.ENABLED)")
    parser.add_argument("--dtype", default="fp32", help="comma-separated fp32, bf16, fp16 (fp16 = AMP)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 CUDA, 2 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3 CUDA, 1 CPU)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    try:
        args.image_size = tuple(int(v) for v in args.image_size.lower().split("x"))
        assert len(args.image_size) == 2 and min(args.image_size) >= 32
    except (ValueError, AssertionError):
        parser.error(f"--image-size must be HxW with sides >= 32, e.g. 800x1333, got {args.image_size!r}")
    for v in _list(args.query_filter):
        if v not in ("on", "off"):
            parser.error(f"--query-filter takes on, off or on,off, got {args.query_filter!r}")
    for d in _list(args.dtype):
        if d not in ("fp32", "bf16", "fp16"):
            parser.error(f"--dtype takes fp32, bf16, fp16, got {d!r}")
    if args.things < 0 or args.stuff < 0:
        parser.error("--things and --stuff must be >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_json:  # one variant, in this process
        args.steps = args.steps or 1
        args.warmup = args.warmup if args.warmup is not None else 0
        with open(args.child_json, "w") as f:
            json.dump(measure(args), f)
        return 0
    on_cuda = (args.device or bench_utils.random_init_cfg(args.config_file, args.opts, quiet=True).MODEL.DEVICE).startswith("cuda")
    steps = args.steps or (10 if on_cuda else 2)
    warmup = args.warmup if args.warmup is not None else (3 if on_cuda else 1)
    results = []
    for qf in _list(args.query_filter):
        for dtype in _list(args.dtype):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "result.json")
                cmd = [sys.executable, "-m", __spec__.name if __spec__ else "projects.benchmarks.train_memory", "--config-file", args.config_file,
                       "--image-size", "x".join(map(str, args.image_size)), "--things", str(args.things),
                       "--stuff", str(args.stuff), "--query-filter", qf, "--dtype", dtype,
                       "--steps", str(steps), "--warmup", str(warmup), "--child-json", out]
                if args.device:
                    cmd += ["--device", args.device]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                subprocess.run(cmd + list(args.opts), check=True)
                with open(out) as f:
                    results.append(json.load(f))
    first = results[0]
    print(f"Config: {args.config_file} {' '.join(args.opts)}".rstrip())
    print(f"Machine: {first['machine']}")
    print(f"Batch 1, synthetic {first['image_size'][0]}x{first['image_size'][1]} image with "
          f"{first['things']} things + {first['stuff']} stuff segments; {warmup} warm-up + {steps} timed "
          f"step(s) (forward + backward + optimizer step), each variant in a fresh process.\n")
    if on_cuda:
        header = ("query filtering", "dtype", "thing queries in mask decoder", "step ms (mean)",
                  "step ms (median)", "peak allocated (GiB)", "peak reserved (GiB)")
        rows = [(r["query_filter"], r["dtype"], r["mask_decoder_thing_queries"], f"{r['step_ms_mean']:.0f}",
                 f"{r['step_ms_median']:.0f}", f"{r['peak_allocated_gib']:.2f}", f"{r['peak_reserved_gib']:.2f}")
                for r in results]
    else:
        header = ("query filtering", "dtype", "thing queries in mask decoder", "step ms (mean)",
                  "step ms (median)", "peak RSS growth (GiB)", "peak RSS (GiB)")
        rows = [(r["query_filter"], r["dtype"], r["mask_decoder_thing_queries"], f"{r['step_ms_mean']:.0f}",
                 f"{r['step_ms_median']:.0f}", f"{r['peak_rss_growth_gib']:.2f}", f"{r['peak_rss_gib']:.2f}")
                for r in results]
    print(markdown_table(header, rows, "l" * 2 + "r" * (len(header) - 2)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config_file, "opts": args.opts, "results": results}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
