#!/usr/bin/env python
"""Parameters, GFLOPs and inference speed of a Panoptic SegFormer config (paper Table 1 #P / #F, Table 5 FPS, Table 10).

    python -m projects.benchmarks.model_stats --config-file configs/coco/panoptic_segformer_R50_24ep.yaml
    python -m projects.benchmarks.model_stats --config-file CFG --fps --per-stage --dtype fp32,bf16 \\
        --mask-layers 6,2 [--device cuda] [--json out.json] [KEY VALUE ...]

The model is built at random initialisation: MODEL.WEIGHTS is cleared and nothing is downloaded
(sizes and speed do not depend on the weights -- except panoptic merging, which reads only the masks
whose class probability can pass t_cnf: a random model has almost none, so its merge time is a lower
bound; --weights loads a local trained checkpoint for realistic merge times, and merge_speed.py times
merging alone). The device is MODEL.DEVICE unless --device is given.

* **Parameters**: exact counts, total and per component (every parameter counted once).
* **GFLOPs** (skip with --no-flops): fvcore's ``FlopCountAnalysis`` of the network in eval mode --
  preprocessing, backbone, channel mapper, encoder, location decoder and the mask decoder layers used
  at test time -- on each test image (default: the 2 real COCO images of ``coco_panoptic_sample``,
  resized by the config's test mapper, ResizeShortestEdge to INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST),
  averaged over the images as the paper and Detectron2's ``analyze_model.py`` do. Conventions: one
  fused multiply-add counts as one flop (fvcore, Detectron2 and the paper's table); element-wise ops
  (add, mul, softmax, sigmoid, activations, ...) are not counted; post-processing (mask upsampling
  and merging) is not counted. Handles added to fvcore's defaults, so that no heavy op is missed:
  ``aten::scaled_dot_product_attention`` (the value path of the mask decoder's cross-attention and
  of ``nn.MultiheadAttention``: ``N*h*Lq*S*(E + Ev)``), ``aten::_native_multi_head_attention``
  (``nn.MultiheadAttention``'s inference fast path: projections + attention) and
  ``aten::embedding_bag`` / ``aten::grid_sampler`` (the multi-scale deformable attention core's
  weighted gather, or its ``grid_sample`` formulation: 4 MACs of bilinear interpolation + 1 MAC of the
  attention-weighted sum per sampled value and channel; fvcore's default counts 4 for grid_sampler and
  skips embedding_bag). The script lists every op fvcore
  skipped. --fvcore-default-handles counts with fvcore's defaults only, for comparison with numbers
  made that way. The MSDeformAttn kernel is forced to the PyTorch path while counting (Triton calls
  cannot be traced).
* **FPS** (--fps): whole-model inference ``model([input])`` (preprocessing to the Detectron2 outputs,
  panoptic + instance + semantic as the config enables) on the same inputs, batch 1, under
  ``torch.no_grad`` and the chosen autocast dtype, --warmup untimed then --iters timed iterations
  cycling over the images; ``torch.cuda.synchronize`` around each timed call on CUDA.
* **Per stage** (--per-stage): forward hooks on the model's own modules time preprocessing, backbone,
  channel mapper + encoder, location decoder, mask decoder and post-processing (of which panoptic
  merging, timed by wrapping the post-processor). On CUDA each stage boundary synchronizes, so the
  stage sum exceeds the plain whole-model time a little.
* **Host-device syncs** (--count-syncs): one inference forward under
  ``host_sync.HostSyncCounter`` (counts .item()/.tolist()/bool(t)/nonzero/... per stage, any device),
  plus ``torch.cuda.set_sync_debug_mode("warn")`` warnings on CUDA.

--mask-layers K (Table 10: 6 vs 2) sets MODEL.PANOPTIC_SEGFORMER.TEST.NUM_MASK_DECODER_LAYERS; --dtype
takes fp32, tf32 (CUDA), bf16, fp16; both accept comma-separated lists and every combination is run.
"""
import argparse
import collections
import os
import statistics
import sys
import time
import warnings
from collections import OrderedDict

import torch
from torch import nn

from projects.benchmarks import bench_utils
from projects.benchmarks.bench_utils import autocast, markdown_table, sync
from projects.benchmarks.host_sync import HostSyncCounter

# Paper component -> attribute prefixes of PanopticSegFormer.
COMPONENTS = OrderedDict([
    ("backbone", ("backbone.",)),
    ("channel mapper", ("channel_mapper.",)),
    ("transformer encoder", ("encoder.",)),
    ("location decoder (incl. auxiliary heads)", ("location_decoder.",)),
    ("stuff queries", ("stuff_query_embed.",)),
    ("mask decoder (incl. class FCs and mask heads)", ("mask_decoder.",)),
])
STAGES = ("preprocess", "backbone", "channel mapper + encoder", "location decoder", "mask decoder",
          "post-processing")
MSDA_CORE_MACS_PER_SAMPLE = 5  # 4 bilinear-interpolation MACs + 1 attention-weighted-sum MAC


def parameter_table(model):
    """OrderedDict component -> number of parameters (every parameter counted exactly once)."""
    counts = OrderedDict((name, 0) for name in COMPONENTS)
    counts["other"] = 0
    for pname, p in model.named_parameters():
        for comp, prefixes in COMPONENTS.items():
            if pname.startswith(prefixes):
                counts[comp] += p.numel()
                break
        else:
            counts["other"] += p.numel()
    if not counts["other"]:
        del counts["other"]
    return counts


# ------------------------------------------------------------------------------------------ GFLOPs
def _shape(value):
    return value.type().sizes()


def sdpa_flop_jit(inputs, outputs):
    """aten::scaled_dot_product_attention(q (.., Lq, E), k (.., S, E), v (.., S, Ev)): q k^T and A v."""
    q, k, v = (_shape(x) for x in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= d
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def grid_sampler_flop_jit(inputs, outputs):
    """aten::grid_sampler output (N, C, Hout, Wout) -- in this model only the MSDeformAttn core, where
    every sampled value costs 4 bilinear MACs and 1 MAC of the attention-weighted sum."""
    numel = 1
    for d in _shape(outputs[0]):
        numel *= d
    return MSDA_CORE_MACS_PER_SAMPLE * numel


def embedding_bag_flop_jit(inputs, outputs):
    """aten::embedding_bag over a (R, D) table -- in this model only the MSDeformAttn core's weighted
    gather, one bag entry per bilinear corner (4 per sampled value): counted as grid_sampler is, 4
    bilinear MACs + 1 MAC of the attention-weighted sum per sampled value and channel."""
    entries = 1
    for d in _shape(inputs[1]):
        entries *= d
    return MSDA_CORE_MACS_PER_SAMPLE * (entries // 4) * _shape(inputs[0])[-1]


def native_mha_flop_jit(inputs, outputs):
    """aten::_native_multi_head_attention (nn.MultiheadAttention's inference fast path, batch-first
    query (B, L, E), key/value (B, S, E)): in-projections of q, k, v, q k^T, A v and the out-projection."""
    (b, length, e), (_, s, _) = _shape(inputs[0]), _shape(inputs[1])
    return b * (2 * length * e * e + 2 * s * e * e + 2 * length * s * e)


EXTRA_FLOP_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::grid_sampler": grid_sampler_flop_jit,
    "aten::embedding_bag": embedding_bag_flop_jit,
    "aten::_native_multi_head_attention": native_mha_flop_jit,
}


class _Network(nn.Module):
    """The network of one image for flop counting: preprocessing -> the mask decoder's test layers.
    Returns the last mask-decoder layer's tensors (so nothing is dead code to the tracer)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        images = self.model.preprocess_image([{"image": image}])
        outputs = self.model.forward_outputs(images, num_mask_layers=self.model.test_mask_decoder_layers)
        last = outputs["mask"][-1]
        return tuple(last[k] for k in sorted(last) if isinstance(last[k], torch.Tensor))


def count_flops(model, inputs, extra_handles=True):
    """Per-image fvcore counts. Returns a list of {"size", "total", "by_component", "skipped"}.
    ``extra_handles=False`` counts with fvcore's default handles only (scaled_dot_product_attention
    skipped, grid_sampler at 4 per output element, embedding_bag skipped)."""
    from fvcore.nn import FlopCountAnalysis

    from panoptic_segformer.modeling.ms_deform_attn import MSDeformAttn

    net = _Network(model).eval()
    children = [name for name, _ in model.named_children()]
    msda = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    previous = [m.impl for m in msda]
    for m in msda:  # Triton calls cannot be traced: count the PyTorch path
        m.impl = "pytorch"
    results = []
    try:
        for x in inputs:
            image = x["image"].to(model.device)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about Python values in checks
                analysis = FlopCountAnalysis(net, (image,))
                if extra_handles:
                    analysis.set_op_handle(**EXTRA_FLOP_HANDLES)
                analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
                total = analysis.total()
                by_module = analysis.by_module()
            by_component = OrderedDict()
            for name in children:
                flops = by_module.get(f"model.{name}", 0)
                if flops:
                    by_component[name] = flops
            by_component["other (outside submodules)"] = total - sum(by_component.values())
            results.append({"size": tuple(image.shape[-2:]), "total": total, "by_component": by_component,
                            "skipped": dict(analysis.unsupported_ops())})
    finally:
        for m, impl in zip(msda, previous):
            m.impl = impl
    return results


# ------------------------------------------------------------------------------------------ timing
class StageTimer:
    """Stage boundaries of one ``model(batched_inputs)`` call from forward hooks on the model's own
    modules (no model logic is duplicated). On CUDA every boundary synchronizes.

    Marks: start, backbone_in, backbone_out, encoder_out, location_out, mask_out, end; the
    post-processor is wrapped to accumulate panoptic-merge time. ``probe()`` (optional) is sampled at
    each mark, e.g. the number of host syncs counted so far; ``on_mark(name)`` (optional) is called at
    each mark, e.g. to open a profiler range per stage (profile_inference.py).
    """

    def __init__(self, model, device, probe=None, synchronize=True, on_mark=None):
        self.model, self.probe, self.on_mark = model, probe, on_mark
        self.device = device if synchronize else torch.device("cpu")  # sync() is a no-op on the CPU
        device = self.device
        self.marks, self.probes, self.merge_s, self.handles = {}, {}, 0.0, []
        self._merge_probe = 0
        children = dict(model.named_children())

        def mark(name, last=True):
            def hook(*_):
                sync(device)
                if last or name not in self.marks:
                    if on_mark is not None:
                        on_mark(name)
                    self.marks[name] = time.perf_counter()
                    if probe is not None:
                        self.probes[name] = probe()
            return hook

        self.handles.append(model.register_forward_pre_hook(self._start))
        self.handles.append(model.register_forward_hook(mark("end")))
        self.handles.append(children["backbone"].register_forward_pre_hook(mark("backbone_in", last=False)))
        self.handles.append(children["backbone"].register_forward_hook(mark("backbone_out")))
        self.handles.append(children["encoder"].register_forward_hook(mark("encoder_out")))
        self.handles.append(children["location_decoder"].register_forward_hook(mark("location_out")))
        for name, module in children.items():
            if "mask_decoder" in name and module is not None:
                self.handles.append(module.register_forward_hook(mark("mask_out")))
        self._postprocessor = model.postprocessor
        timer = self

        def merge_begin(*_):
            sync(device)
            timer._merge_start = time.perf_counter()
            timer._merge_before = probe() if probe is not None else 0

        def merge_end(*_):
            sync(device)
            timer.merge_s += time.perf_counter() - timer._merge_start
            if probe is not None:
                timer._merge_probe += probe() - timer._merge_before

        if isinstance(self._postprocessor, nn.Module):
            self.handles.append(self._postprocessor.register_forward_pre_hook(merge_begin))
            self.handles.append(self._postprocessor.register_forward_hook(merge_end))
        else:
            def timed_postprocessor(*args, **kwargs):
                merge_begin()
                out = timer._postprocessor(*args, **kwargs)
                merge_end()
                return out

            model.postprocessor = timed_postprocessor

    def _start(self, *_):
        sync(self.device)
        self.marks, self.probes, self.merge_s, self._merge_probe = {}, {}, 0.0, 0
        if self.on_mark is not None:
            self.on_mark("start")
        self.marks["start"] = time.perf_counter()
        if self.probe is not None:
            self.probes["start"] = self.probe()

    # Marks in call order; stage STAGES[i] runs from MARKS[i] to MARKS[i + 1].
    MARKS = ("start", "backbone_in", "backbone_out", "encoder_out", "location_out", "mask_out", "end")

    def _split(self, values, merge):
        order = self.MARKS
        missing = [m for m in order if m not in values]
        if missing:
            raise RuntimeError(f"stage hooks did not fire for {missing}: the model's structure changed")
        out = OrderedDict((stage, values[b] - values[a]) for stage, a, b in zip(STAGES, order, order[1:]))
        out["of which panoptic merging"] = merge
        return out

    def stages(self):
        """OrderedDict stage -> seconds of the last call."""
        return self._split(self.marks, self.merge_s)

    def stage_probes(self):
        """OrderedDict stage -> probe increase during the last call."""
        return self._split(self.probes, self._merge_probe)

    def remove(self):
        for h in self.handles:
            h.remove()
        if not isinstance(self._postprocessor, nn.Module):
            self.model.postprocessor = self._postprocessor


def time_inference(model, inputs, device, dtype_name, iters, warmup, per_stage):
    """Mean/median whole-model ms per image (and mean ms per stage if ``per_stage``)."""
    model.eval()
    times, stage_times = [], collections.defaultdict(list)
    with torch.no_grad(), autocast(device, dtype_name):
        for i in range(warmup):
            model([inputs[i % len(inputs)]])
        for i in range(iters):
            x = inputs[i % len(inputs)]
            sync(device)
            start = time.perf_counter()
            model([x])
            sync(device)
            times.append(time.perf_counter() - start)
        if per_stage:
            timer = StageTimer(model, device)
            try:
                for i in range(iters):
                    model([inputs[i % len(inputs)]])
                    for stage, seconds in timer.stages().items():
                        stage_times[stage].append(seconds)
            finally:
                timer.remove()
    result = {"dtype": dtype_name, "mean_ms": 1e3 * statistics.mean(times),
              "median_ms": 1e3 * statistics.median(times), "iters": iters, "warmup": warmup}
    result["fps"] = 1e3 / result["mean_ms"]
    if per_stage:
        result["stages_ms"] = OrderedDict((k, 1e3 * statistics.mean(v)) for k, v in stage_times.items())
    return result


def count_syncs(model, x, device, dtype_name):
    """Host-device syncs of one inference forward: per stage (HostSyncCounter), by location, and on
    CUDA the number of ``set_sync_debug_mode("warn")`` warnings."""
    model.eval()
    counter = HostSyncCounter()
    timer = StageTimer(model, device, probe=lambda: counter.total, synchronize=False)
    cuda_warnings = None
    try:
        with torch.no_grad(), autocast(device, dtype_name), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with counter:
                    model([x])
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
            if device.type == "cuda":
                cuda_warnings = sum("synchronizing" in str(w.message) for w in caught)
        per_stage = timer.stage_probes()
    finally:
        timer.remove()
    return {"total": counter.total, "per_stage": per_stage, "by_location": counter.by_location(),
            "cuda_sync_debug_warnings": cuda_warnings}


# ------------------------------------------------------------------------------------------ main
def _list(text, cast=str):
    return [cast(v.strip()) for v in str(text).split(",") if v.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--device", default=None, help="cpu / cuda (default: MODEL.DEVICE)")
    parser.add_argument("--weights", default=None,
                        help="local checkpoint to load (default: random initialisation; never downloads)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--dataset", default="coco_panoptic_sample", help="registered dataset of test images")
    parser.add_argument("--num-images", type=int, default=2, help="test images (GFLOPs averaged over them)")
    parser.add_argument("--image-size", default=None, type=bench_utils.image_size_arg,
                        help="HxW: use random images of this size instead of the dataset's (synthetic)")
    parser.add_argument("--no-flops", action="store_true", help="skip the GFLOPs count")
    parser.add_argument("--fvcore-default-handles", action="store_true",
                        help="count with fvcore's default op handles only (skips scaled_dot_product_attention; "
                             "grid_sampler = 4 per output), e.g. to compare with counts made that way")
    parser.add_argument("--fps", action="store_true", help="time whole-model inference")
    parser.add_argument("--per-stage", action="store_true", help="also time each stage (implies --fps)")
    parser.add_argument("--count-syncs", action="store_true", help="count host-device syncs of one forward")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 50 CUDA, 4 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 10 CUDA, 1 CPU)")
    parser.add_argument("--dtype", default="fp32", help="comma-separated fp32,tf32,bf16,fp16 (autocast)")
    parser.add_argument("--tf32", action="store_true", help="on CUDA, run fp32 rows with TF32 (= --dtype tf32)")
    parser.add_argument("--mask-layers", default=None,
                        help="comma-separated K: MODEL.PANOPTIC_SEGFORMER.TEST.NUM_MASK_DECODER_LAYERS")
    parser.add_argument("--json", default=None, help="also write all results to this JSON file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.weights is not None and not os.path.isfile(args.weights):
        raise FileNotFoundError(f"--weights {args.weights!r} is not a local file (nothing is downloaded)")
    args.fps = args.fps or args.per_stage
    args.dtypes = ["tf32" if (d == "fp32" and args.tf32) else d for d in _list(args.dtype)]
    for d in args.dtypes:
        if d not in bench_utils.DTYPES:
            parser.error(f"--dtype: unknown {d!r} (use {', '.join(bench_utils.DTYPES)})")
    try:
        args.mask_layers = _list(args.mask_layers, int) if args.mask_layers else [None]
    except ValueError:
        parser.error(f"--mask-layers must be comma-separated integers, got {args.mask_layers!r}")
    if args.num_images < 1:
        parser.error(f"--num-images must be >= 1, got {args.num_images}")
    return args


def _build(cfg, weights):
    model = bench_utils.build_model(cfg)
    if weights:
        from panoptic_segformer.checkpoint import PanopticSegFormerCheckpointer

        PanopticSegFormerCheckpointer.from_config(model, cfg).load(weights)
    return model


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base_cfg = bench_utils.random_init_cfg(args.config_file, args.opts, args.device)
    device = torch.device(base_cfg.MODEL.DEVICE)
    iters = args.iters or (50 if device.type == "cuda" else 4)
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 1)
    report = {"config": args.config_file, "opts": args.opts, "machine": bench_utils.machine(device),
              "weights": args.weights or "random initialisation"}
    print(f"Config: {args.config_file} {' '.join(args.opts)}".rstrip())
    print(f"Machine: {report['machine']}\n")

    model = _build(base_cfg, args.weights)
    counts = parameter_table(model)
    total = sum(counts.values())
    rows = [(name, f"{n / 1e6:.3f}") for name, n in counts.items()] + [("**total**", f"**{total / 1e6:.3f}**")]
    print(markdown_table(("component", "parameters (M)"), rows))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable: {trainable / 1e6:.3f} M\n")
    report["params"] = {"total": total, "trainable": trainable, "by_component": counts}

    needs_inputs = not args.no_flops or args.fps or args.count_syncs
    inputs = bench_utils.load_test_inputs(base_cfg, args.num_images, args.dataset, args.image_size) \
        if needs_inputs else []
    sizes = [tuple(x["image"].shape[-2:]) for x in inputs]
    source = f"random {args.image_size[0]}x{args.image_size[1]}" if args.image_size else args.dataset
    if inputs:
        print(f"Test inputs: {len(inputs)} image(s) from {source}, sizes (H, W) {sizes} "
              f"(INPUT.MIN_SIZE_TEST {base_cfg.INPUT.MIN_SIZE_TEST}, MAX_SIZE_TEST {base_cfg.INPUT.MAX_SIZE_TEST})\n")
        report["inputs"] = {"source": source, "sizes": sizes}

    report["variants"] = []
    for k in args.mask_layers:
        if k is None:
            cfg, model_k = base_cfg, model
            k_used = base_cfg.MODEL.PANOPTIC_SEGFORMER.TEST.NUM_MASK_DECODER_LAYERS or \
                base_cfg.MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_LAYERS
        else:
            cfg = bench_utils.random_init_cfg(args.config_file,
                                        list(args.opts) + ["MODEL.PANOPTIC_SEGFORMER.TEST.NUM_MASK_DECODER_LAYERS",
                                                           str(k)], args.device, quiet=True)
            model_k = _build(cfg, args.weights)
            k_used = k
        model_k.eval()
        variant = {"mask_layers": k_used}
        print(f"## {k_used} mask-decoder layer(s) at inference\n")
        if not args.no_flops:
            per_image = count_flops(model_k, inputs, extra_handles=not args.fvcore_default_handles)
            mean = sum(r["total"] for r in per_image) / len(per_image)
            names = list(per_image[0]["by_component"])
            rows = [(name, f"{sum(r['by_component'].get(name, 0) for r in per_image) / len(per_image) / 1e9:.2f}")
                    for name in names]
            rows.append(("**total**", f"**{mean / 1e9:.2f}**"))
            handles = "fvcore default handles" if args.fvcore_default_handles else "fvcore + SDPA/MSDA handles"
            print(f"GFLOPs ({handles}, 1 MAC = 1 flop; mean over {len(per_image)} image(s): "
                  + ", ".join(f"{r['size'][0]}x{r['size'][1]}: {r['total'] / 1e9:.2f}" for r in per_image) + ")")
            print(markdown_table(("module", "GFLOPs"), rows))
            skipped = collections.Counter()
            for r in per_image:
                skipped.update(r["skipped"])
            print("ops fvcore skipped (not counted; element-wise and data movement), calls per image: "
                  + ", ".join(f"{op.replace('aten::', '')} {n / len(per_image):g}"
                              for op, n in sorted(skipped.items())) + "\n")
            variant["gflops"] = {"mean": mean / 1e9, "per_image": [
                {"size": r["size"], "gflops": r["total"] / 1e9,
                 "by_component": {n: v / 1e9 for n, v in r["by_component"].items()}} for r in per_image],
                "skipped_ops": dict(skipped), "handles": handles}
        if args.fps:
            variant["timing"] = []
            for d in args.dtypes:
                variant["timing"].append(
                    time_inference(model_k, inputs, device, d, iters, warmup, args.per_stage))
            print(f"Inference, batch 1, {warmup} warm-up + {iters} timed iteration(s) cycling over the images:")
            header = ["dtype", "ms/img (mean)", "ms/img (median)", "FPS"]
            if args.per_stage:
                header += [f"{s} (ms)" for s in variant["timing"][0]["stages_ms"]]
            rows = []
            for t in variant["timing"]:
                row = [t["dtype"], f"{t['mean_ms']:.1f}", f"{t['median_ms']:.1f}", f"{t['fps']:.2f}"]
                if args.per_stage:
                    row += [f"{v:.1f}" for v in t["stages_ms"].values()]
                rows.append(row)
            print(markdown_table(header, rows) + "\n")
        if args.count_syncs:
            syncs = count_syncs(model_k, inputs[0], device, args.dtypes[0])
            variant["host_syncs"] = syncs
            print(f"Host-device syncs of one inference forward ({args.dtypes[0]}): {syncs['total']}"
                  + (f"; CUDA sync-debug warnings: {syncs['cuda_sync_debug_warnings']}"
                     if syncs["cuda_sync_debug_warnings"] is not None else ""))
            print(markdown_table(("stage", "syncs"), list(syncs["per_stage"].items())))
            print("by location: " + "; ".join(f"{k}: {v}" for k, v in syncs["by_location"].items()) + "\n")
        report["variants"].append(variant)
        if model_k is not model:
            del model_k
    if args.json:
        bench_utils.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
