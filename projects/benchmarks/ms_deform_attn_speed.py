#!/usr/bin/env python
"""Speed of multi-scale deformable attention (Deformable DETR [12]; the encoder of paper Sec. 3.2):
the fused Triton kernel vs the pure-PyTorch ``ms_deform_attn_core`` (one weighted gather over all levels)
and its ``grid_sample`` formulation (one per level; the one ONNX export uses).

Times forward and forward+backward (gradients w.r.t. values, sampling locations and attention
weights) at the encoder shape of an 800x1333 image: levels (100,167), (50,84), (25,42) (strides
8/16/32), Q = S = 21950 queries (one per token), 8 heads, D = 32 channels per head, 4 points, batch 1;
checks both against a float64 reference and prints a markdown table of medians (ms) and peak memory.

* ``fp32``: values, locations and weights in float32;
* ``bf16``: as under autocast: values in bfloat16, locations and attention weights in float32.

    python -m projects.benchmarks.ms_deform_attn_speed                # CUDA, fp32 and bf16
    python -m projects.benchmarks.ms_deform_attn_speed --device cpu   # PyTorch path only, small shape

Without a CUDA device the default mode prints that it needs a GPU and exits 0.
"""

import argparse
import json
import math
import platform
import statistics
import sys
import time

import torch

from panoptic_segformer.modeling.levels import LevelLayout
from panoptic_segformer.modeling.ms_deform_attn import (ms_deform_attn, ms_deform_attn_grid_sample,
                                                         resolve_ms_deform_attn_impl)

ENCODER_LEVELS_800x1333 = ((100, 167), (50, 84), (25, 42))
SMALL_CPU_LEVELS = ((25, 42), (13, 21), (7, 11))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def encoder_inputs(levels, batch, heads, dim, points, dtype, device, seed=0):
    """Encoder-like inputs: every token queries its own position on all levels.

    Returns value (N, S, M, D) in ``dtype``, the tokens' LevelLayout,
    sampling_locations (N, S, M, L, P, 2) float32 (reference point + offsets of a few pixels, some
    outside the map) and attention_weights (N, S, M, L, P) float32 (softmax over the L * P points).
    """
    g = torch.Generator().manual_seed(seed)
    L = len(levels)
    S = sum(h * w for h, w in levels)
    refs = []
    for h, w in levels:  # normalized pixel centres of each level's tokens, (H*W, 2) as (x, y)
        ys, xs = torch.meshgrid(
            (torch.arange(h, dtype=torch.float32) + 0.5) / h,
            (torch.arange(w, dtype=torch.float32) + 0.5) / w,
            indexing="ij",
        )
        refs.append(torch.stack([xs.flatten(), ys.flatten()], -1))
    ref = torch.cat(refs)  # (S, 2)
    normalizer = torch.tensor([[w, h] for h, w in levels], dtype=torch.float32)  # (L, 2)
    offsets = torch.randn(batch, S, heads, L, points, 2, generator=g) * 2.0  # pixels
    loc = ref[None, :, None, None, None, :] + offsets / normalizer[None, None, None, :, None, :]
    logits = torch.randn(batch, S, heads, L * points, generator=g)
    weights = logits.softmax(-1).view(batch, S, heads, L, points)
    value = torch.randn(batch, S, heads, dim, generator=g)
    return (
        value.to(device=device, dtype=dtype),
        LevelLayout.from_sizes(levels, batch, device),
        loc.to(device),
        weights.to(device),
    )


GRID_SAMPLE = "grid_sample"  # the core's export formulation, timed beside the implementations


def _attend(impl, value, layout, loc, weights):
    """``ms_deform_attn`` with ``impl``, or the core's ``grid_sample`` formulation for GRID_SAMPLE."""
    if impl == GRID_SAMPLE:
        return ms_deform_attn_grid_sample(value, layout.sizes, loc, weights)
    return ms_deform_attn(value, layout, loc, weights, impl=impl)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_impl(impl, inputs, grad_out, repeats, warmup, device):
    """Median forward and forward+backward time (ms) and peak memory (MiB, CUDA only)."""
    value, layout, loc, weights = inputs
    leaves = [t.detach().requires_grad_(True) for t in (value, loc, weights)]

    def forward():
        return _attend(impl, leaves[0], layout, leaves[1], leaves[2])

    def forward_backward():
        out = forward()
        torch.autograd.backward(out, grad_out)
        for t in leaves:
            t.grad = None

    def measure(fn):
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    with torch.no_grad():
        fwd_ms = measure(forward)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    fwd_bwd_ms = measure(forward_backward)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else float("nan")
    return fwd_ms, fwd_bwd_ms, peak


def max_errors(inputs, grad_out, impl):
    """Max |impl - float64 reference| of the output and of the gradients w.r.t. value, sampling
    locations and attention weights (the reference is the PyTorch core in float64 on the same inputs),
    plus the 99.9th percentile of the location-gradient error: the location gradient jumps where a
    pixel coordinate crosses an integer, so the few points that round to the other side in fp32 make
    its max large whatever the implementation."""
    results = []
    for name, cast in ((impl, lambda t: t), ("pytorch", lambda t: t.double())):
        value, layout, loc, weights = inputs
        leaves = [cast(t).detach().requires_grad_(True) for t in (value, loc, weights)]
        out = _attend(name, leaves[0], layout, leaves[1], leaves[2])
        grads = torch.autograd.grad(out, leaves, cast(grad_out))
        results.append([out.double()] + [g.double() for g in grads])
    errors = [(a - b).abs().flatten() for a, b in zip(*results)]
    loc_err = errors[2]
    loc_p999 = loc_err.kthvalue(max(1, math.ceil(0.999 * loc_err.numel()))).values.item() if loc_err.numel() else 0.0
    return [e.max().item() if e.numel() else 0.0 for e in errors] + [loc_p999]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtypes", default=None, help="comma-separated of fp32,bf16,fp16 (default: fp32,bf16 "
                        "on CUDA, fp32 on CPU)")
    parser.add_argument("--levels", default=None,
                        help="H1xW1,H2xW2,... (default: 800x1333 encoder on CUDA, a small shape on CPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=32, help="channels per head D")
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 20 CUDA, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs (default 5 CUDA, 1 CPU)")
    parser.add_argument("--json", default=None, help="also write the timings and errors to this JSON file")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("ms_deform_attn_speed: the Triton vs PyTorch comparison needs a CUDA GPU (none found); "
              "use --device cpu to time the PyTorch path on CPU.")
        return 0
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if args.levels:
        levels = tuple(tuple(int(v) for v in lvl.lower().split("x")) for lvl in args.levels.split(","))
    else:
        levels = ENCODER_LEVELS_800x1333 if on_cuda else SMALL_CPU_LEVELS
    dtype_names = (args.dtypes or ("fp32,bf16" if on_cuda else "fp32")).split(",")
    repeats = args.repeats or (20 if on_cuda else 5)
    warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)

    S = sum(h * w for h, w in levels)
    print(f"# Multi-scale deformable attention, fwd / fwd+bwd medians over {repeats} runs")
    print(f"levels {list(levels)}, N={args.batch}, Q=S={S}, M={args.heads}, D={args.dim}, "
          f"L={len(levels)}, P={args.points}")
    dev_name = torch.cuda.get_device_name(device) if on_cuda else platform.processor() or platform.machine()
    print(f"device: {device.type} ({dev_name}), torch {torch.__version__}")
    print()
    print("| dtype | impl | fwd (ms) | fwd+bwd (ms) | speed-up fwd+bwd | peak mem fwd+bwd (MiB) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    checks, rows = [], []
    for name in dtype_names:
        dtype = DTYPES[name.strip()]
        inputs = encoder_inputs(levels, args.batch, args.heads, args.dim, args.points, dtype, device)
        grad_out = torch.randn(args.batch, S, args.heads * args.dim, generator=torch.Generator().manual_seed(1))
        grad_out = grad_out.to(device=device, dtype=dtype)
        impls = ["pytorch", GRID_SAMPLE]
        if on_cuda and resolve_ms_deform_attn_impl(inputs[0], "auto") == "triton":
            impls.append("triton")
        timings = {impl: time_impl(impl, inputs, grad_out, repeats, warmup, device) for impl in impls}
        base = timings["pytorch"][1]
        label = name if name != "bf16" else "bf16 (locs/weights fp32)"
        for impl, (fwd, fwd_bwd, peak) in timings.items():
            mem = "-" if math.isnan(peak) else f"{peak:.0f}"
            print(f"| {label} | {impl} | {fwd:.2f} | {fwd_bwd:.2f} | {base / fwd_bwd:.2f}x | {mem} |")
            rows.append({"dtype": name, "impl": impl, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd,
                         "speedup_fwd_bwd": base / fwd_bwd, "peak_mib": None if math.isnan(peak) else peak})
        for impl in impls:
            checks.append((label, impl, max_errors(inputs, grad_out, impl)))
        del inputs, grad_out
    if on_cuda and not any(impl == "triton" for _, impl, _ in checks):
        print("\nTriton is unavailable here: only the PyTorch path was timed.")
    print("\nAbs error vs a float64 PyTorch reference on the same inputs, max (p99.9 for d locations, "
          "see max_errors); the grid_sample formulation casts locations to the value dtype, so in bf16 its "
          "location gradients are much coarser:\n")
    print("| dtype | impl | out | d value | d locations (max) | d locations (p99.9) | d weights |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label, impl, errs in checks:
        out_err, value_err, loc_err, weight_err, loc_p999 = errs
        print(f"| {label} | {impl} | {out_err:.2g} | {value_err:.2g} | {loc_err:.2g} | {loc_p999:.2g} | "
              f"{weight_err:.2g} |")
    if args.json:
        keys = ("out", "d_value", "d_locations_max", "d_weights", "d_locations_p999")
        with open(args.json, "w") as f:
            json.dump({"levels": levels, "device": f"{device.type} ({dev_name})", "torch": torch.__version__,
                       "repeats": repeats, "warmup": warmup, "timings": rows,
                       "max_abs_errors": [{"dtype": label, "impl": impl, **dict(zip(keys, errs))}
                                          for label, impl, errs in checks]}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
