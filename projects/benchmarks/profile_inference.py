#!/usr/bin/env python
"""Where inference time goes: ``torch.profiler`` of one ``model([input])`` call, top operators per stage.

    python -m projects.benchmarks.profile_inference --config-file configs/coco/panoptic_segformer_R50_24ep.yaml \\
        --image-size 800x1333 --threads 2 [--top 8] [--json out.json] [KEY VALUE ...]

The model is built at random initialisation as in model_stats.py (``bench_utils``), on the CPU unless
--device is given. After --warmup untimed calls, one call runs under the profiler. The stages are those of
``model_stats --per-stage`` (preprocess, backbone, channel mapper + encoder, location decoder, mask decoder,
post-processing), delimited by the same forward hooks (:class:`model_stats.StageTimer`), each recorded as
a profiler range; every operator event is attributed to the stage range that encloses it. For each stage
the tool prints its time in the profiled call and its top operators by self CPU time (the time spent in
the operator itself, not in the operators it calls), with call counts and their share of the stage, and
the stage time spent outside any operator (Python between operators, profiler overhead).
Profiling adds a little overhead per operator call, so stage times are a little above model_stats'.
"""
import argparse
import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from projects.benchmarks import bench_utils
from projects.benchmarks.bench_utils import autocast, markdown_table
from projects.benchmarks.model_stats import STAGES, StageTimer

_PREFIX = "stage: "


class _StageRanges:
    """``StageTimer`` ``on_mark`` callback: one profiler range per stage, from its opening mark to the next."""

    def __init__(self):
        self.opens = dict(zip(StageTimer.MARKS, STAGES))  # mark -> the stage it opens ("end" opens none)
        self.current = None

    def __call__(self, mark):
        if self.current is not None:
            self.current.__exit__(None, None, None)
            self.current = None
        if mark in self.opens:
            self.current = record_function(_PREFIX + self.opens[mark])
            self.current.__enter__()


def stage_operator_times(events):
    """{stage: {"ms": stage time, "ops": {op: [self ms, calls]}}} from profiler ``events``."""
    result = collections.OrderedDict((s, {"ms": 0.0, "ops": collections.Counter(), "calls": collections.Counter()})
                                     for s in STAGES)
    for e in events:
        if e.name.startswith(_PREFIX):
            result[e.name[len(_PREFIX):]]["ms"] += e.cpu_time_total / 1e3
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith(_PREFIX):
            parent = parent.cpu_parent
        if parent is None:
            continue
        stage = result[parent.name[len(_PREFIX):]]
        stage["ops"][e.name] += e.self_cpu_time_total / 1e3
        stage["calls"][e.name] += 1
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--device", default="cpu", help="cpu (default) / cuda: CPU-side operator times only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--image-size", default=(800, 1333), type=bench_utils.image_size_arg,
                        help="HxW of the random test image (default 800x1333)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(bench_utils.DTYPES))
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before the profiled one")
    parser.add_argument("--top", type=int, default=8, help="operators listed per stage")
    parser.add_argument("--json", default=None, help="also write the per-stage operator times to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = bench_utils.random_init_cfg(args.config_file, args.opts, args.device)
    device = torch.device(cfg.MODEL.DEVICE)
    model = bench_utils.build_model(cfg).eval()
    x = bench_utils.load_test_inputs(cfg, 1, image_size=args.image_size)[0]
    print(f"Config: {args.config_file} {' '.join(args.opts)}".rstrip())
    print(f"Machine: {bench_utils.machine(device)}; torch threads {torch.get_num_threads()}; "
          f"random {args.image_size[0]}x{args.image_size[1]} image, {args.dtype}\n")
    with torch.no_grad(), autocast(device, args.dtype):
        for _ in range(args.warmup):
            model([x])
        ranges = _StageRanges()
        timer = StageTimer(model, device, on_mark=ranges)
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model([x])
        finally:
            timer.remove()
    stages = stage_operator_times(prof.events())
    report = {"config": args.config_file, "opts": args.opts, "image_size": args.image_size, "dtype": args.dtype,
              "threads": torch.get_num_threads(), "machine": bench_utils.machine(device),
              "wall_stages_s": dict(timer.stages()), "stages": {}}
    total = sum(s["ms"] for s in stages.values())
    print(f"Profiled call: {total / 1e3:.2f} s over the stages\n")
    for name, s in stages.items():
        top = s["ops"].most_common(args.top)
        report["stages"][name] = {"ms": s["ms"], "ops": {op: {"self_ms": ms, "calls": s["calls"][op]}
                                                         for op, ms in s["ops"].most_common()}}
        print(f"### {name}: {s['ms']:.0f} ms")
        rows = [(op, s["calls"][op], f"{ms:.1f}", f"{100 * ms / max(s['ms'], 1e-9):.0f}%") for op, ms in top]
        outside = s["ms"] - sum(s["ops"].values())  # Python between operators, profiler overhead
        rows.append(("(outside operators)", "", f"{outside:.1f}", f"{100 * outside / max(s['ms'], 1e-9):.0f}%"))
        report["stages"][name]["outside_ops_ms"] = outside
        print(markdown_table(("operator", "calls", "self ms", "of stage"), rows, "lrrr") + "\n")
    if args.json:
        bench_utils.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
