#!/usr/bin/env python
"""Speed of the panoptic post-processors (paper Sec. 3.5 / Table 7: "mask-wise merging is 20%
less time-consuming than DETR's pixel-wise argmax").

Times, on synthetic predictions of one image (default 300 thing + 53 stuff queries = 353 masks at
800x1333, like Panoptic SegFormer on COCO):

* ``mask_wise`` -- this repo's vectorized mask-wise merging (Algorithm 1),
* a per-mask numpy loop like the official code's (a straightforward port of Algorithm 1),
* ``pixel_argmax`` (DETR), ``pixel_argmax_prob`` (MaskFormer p*) and ``heuristic``,

checks that the vectorized and loop mask-wise results are identical, and prints a markdown table
of medians (ms) on CPU and, when available, CUDA.

    python -m projects.benchmarks.merge_speed --repeats 5 --loop-repeats 2
"""

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from panoptic_segformer.postprocessing import build_postprocessor


def synthetic_predictions(num_things, num_stuff, height, width, seed=0):
    """Masks (N, H, W) float32 probabilities and logits, class probabilities, labels, is_thing.

    Things are soft ellipses, stuff are smooth random fields; both are made at 1/8 resolution and
    upsampled bilinearly, as the model's masks are. Most queries have a low class probability.
    """
    torch.manual_seed(seed)  # for the Beta sample below
    g = torch.Generator().manual_seed(seed)
    h8, w8 = height // 8, width // 8
    ys = torch.arange(h8).view(1, -1, 1).float()
    xs = torch.arange(w8).view(1, 1, -1).float()
    cy, cx = torch.rand(num_things, 1, 1, generator=g) * h8, torch.rand(num_things, 1, 1, generator=g) * w8
    ry = 2 + torch.rand(num_things, 1, 1, generator=g) * h8 / 4
    rx = 2 + torch.rand(num_things, 1, 1, generator=g) * w8 / 4
    things = 6 * (1 - ((ys - cy) / ry) ** 2 - ((xs - cx) / rx) ** 2)
    coarse = torch.randn(num_stuff, max(2, h8 // 16), max(2, w8 // 16), generator=g) * 4 - 2
    stuff = F.interpolate(coarse[None], size=(h8, w8), mode="bicubic", align_corners=False)[0]
    low = torch.cat([things, stuff]) + 0.5 * torch.randn(num_things + num_stuff, h8, w8, generator=g)
    logits = F.interpolate(low[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    class_probs = torch.distributions.Beta(0.4, 1.5).sample((num_things + num_stuff,))
    class_probs[: max(1, num_things // 30)] = 0.86 + 0.13 * torch.rand(max(1, num_things // 30), generator=g)
    labels = torch.cat([torch.randint(0, 80, (num_things,), generator=g),
                        torch.arange(80, 80 + num_stuff)])
    is_thing = labels < 80
    return logits.sigmoid(), logits, class_probs, labels, is_thing


def mask_wise_loop_numpy(masks, class_probs, labels, is_thing, alpha=1.0, beta=2.0, mask_threshold=0.5,
                         conf_threshold=0.25, keep_threshold=0.6):
    """Per-mask numpy port of Algorithm 1 (as the official code loops over masks).

    Same semantics as :func:`mask_wise_merge` with scalar thresholds; float64 score accumulation.
    """
    n, h, w = masks.shape
    scores, areas = np.zeros(n), np.zeros(n, dtype=np.int64)
    for i in range(n):  # Eq. (6), one mask at a time
        binary = masks[i] > mask_threshold
        areas[i] = binary.sum()
        if areas[i]:
            scores[i] = class_probs[i] ** alpha * masks[i][binary].mean(dtype=np.float64) ** beta
    pan = np.zeros((h, w), dtype=np.int32)
    segments, stuff_id = [], {}
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] < conf_threshold or areas[i] == 0:
            continue
        kept = (masks[i] > mask_threshold) & (pan == 0)
        n_kept = int(kept.sum())
        if n_kept == 0 or n_kept / areas[i] < keep_threshold:
            continue
        label = int(labels[i])
        if not is_thing[i] and label in stuff_id:
            pan[kept] = stuff_id[label]
            continue
        pan[kept] = len(segments) + 1
        if not is_thing[i]:
            stuff_id[label] = len(segments) + 1
        segments.append({"id": len(segments) + 1, "category_id": label, "isthing": bool(is_thing[i]),
                         "score": float(scores[i])})
    return pan, segments


def timed(fn, repeats, device):
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--num-things", type=int, default=300)
    parser.add_argument("--num-stuff", type=int, default=53)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-repeats", type=int, default=2, help="repeats of the slow numpy loop")
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the times (ms) to this JSON file")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    masks, logits, class_probs, labels, is_thing = synthetic_predictions(
        args.num_things, args.num_stuff, args.height, args.width)
    n = masks.shape[0]
    devices = [torch.device(d) for d in args.devices.split(",")
               if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    rows = {}
    info = {}
    identity = "not checked (no CPU run)"
    for device in devices:
        m, lg, p, lb, th = (t.to(device) for t in (masks, logits, class_probs, labels, is_thing))
        postprocessors = {name: build_postprocessor(name) for name in
                          ("mask_wise", "pixel_argmax", "pixel_argmax_prob", "heuristic")}
        for name, pp in postprocessors.items():
            pp(m, p, lb, th, mask_logits=lg)  # warm-up
            ms, (pan, seg) = timed(lambda: pp(m, p, lb, th, mask_logits=lg), args.repeats, device)
            rows.setdefault(f"`{name}`", {})[device.type] = ms
            info[name] = len(seg)
            if name == "mask_wise":
                vec_pan, vec_seg = pan.cpu().numpy(), seg
        if device.type == "cpu":
            np_args = (masks.numpy(), class_probs.numpy().astype(np.float64), labels.numpy(),
                       is_thing.numpy())
            loop_ms, (loop_pan, loop_seg) = timed(lambda: mask_wise_loop_numpy(*np_args),
                                                  args.loop_repeats, device)
            rows["mask-wise, per-mask numpy loop (official-style)"] = {"cpu": loop_ms}
            identical = (np.array_equal(loop_pan, vec_pan)
                         and [(s["id"], s["category_id"], s["isthing"]) for s in loop_seg]
                         == [(s["id"], s["category_id"], s["isthing"]) for s in vec_seg])
            # Scores: float32 row sums (vectorized) vs float64 accumulation (loop).
            score_diff = max((abs(a["score"] - b["score"]) / b["score"] for a, b in zip(vec_seg, loop_seg)),
                             default=0.0)
            if not identical or score_diff > 1e-6:
                raise SystemExit(
                    f"vectorized and loop mask-wise merging differ (score diff {score_diff:.1e})")
            identity = f"identical panoptic_seg and segments (scores to {score_diff:.1e} relative)"

    cpu_name = platform.processor() or platform.machine()
    print(f"{n} masks at {args.height}x{args.width}; CPU: {torch.get_num_threads()} torch threads "
          f"({cpu_name}); CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'n/a'}; "
          f"median of {args.repeats} (numpy loop: {args.loop_repeats}) run(s); torch {torch.__version__}")
    print("segments: " + ", ".join(f"{k} {v}" for k, v in info.items())
          + f"; vectorized == loop mask-wise result: {identity}")
    print()
    header = "| method | " + " | ".join(f"{d.type.upper()} ms" for d in devices) + " |"
    print(header)
    print("|" + " --- |" * (1 + len(devices)))
    for name, times in rows.items():
        cells = " | ".join(f"{times[d.type]:.1f}" if d.type in times else "-" for d in devices)
        print(f"| {name} | {cells} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"masks": n, "height": args.height, "width": args.width, "repeats": args.repeats,
                       "segments": info, "vectorized_vs_loop": identity, "median_ms": rows,
                       "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
