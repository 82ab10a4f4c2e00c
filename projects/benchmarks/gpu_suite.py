#!/usr/bin/env python
"""Everything that needs a GPU, in one call: the driver of ``projects/benchmarks/gpu_suite.sh``.

Runs the parts below one after the other, each as subprocesses of this project's own entry points
(pytest, the ``projects.benchmarks`` tools, ``train_net.py``) under a time budget of its own, so that the
whole suite ends in under 8 minutes on one H200 and a failing or slow part never stops the next one:

0. ``env``: versions, the CUDA device, Triton, and which multi-scale deformable attention kernel the
   model picks on the device (``MSDA_IMPL auto``);
1. ``tests``: ``pytest -m cuda`` -- the tests that need a GPU (tests/test_cuda.py: the Triton kernels
   against the PyTorch path at the 800x1333 encoder shape in fp32/bf16, forward and backward; the
   model on Triton vs PyTorch; Detectron2's AMP training);
2. ``msda``: MSDeformAttn forward+backward time, Triton vs PyTorch (``ms_deform_attn_speed``; goal >= 5x);
3. ``inference``: R50 at 800x1333, batch 1, fp32 / TF32 / bf16, 6 and 2 mask-decoder layers, whole model
   and per stage (``model_stats``; goal >= 30 FPS in bf16);
4. ``train_memory``: peak training memory and step time at batch 1 and 800x1333, with and without query
   filtering, fp32 and AMP (``train_memory``; the paper: < 12 GB with filtering);
5. ``shapes_amp``: a few hundred AMP iterations of the shapes config through ``train_net.py``
   (``SOLVER.AMP.ENABLED``), then its evaluation: the final PQ;
6. ``merge``: mask-wise merging of 353 masks at 800x1333 on the GPU (``merge_speed``).

It writes ``gpu_suite.json`` (everything, including each tool's own JSON), ``gpu_suite.md`` (the tables)
and ``gpu_suite.log`` (every command's output) to the output folder, rewriting the first two after
each part. Each part reports ``passed``, ``failed``, ``timeout`` or ``skipped``; goals are reported
next to it (met or not) and do not fail a part. The exit status is 0 only if no part failed.

``--dry-run`` runs the same parts with the same entry points on the CPU at tiny sizes (the shapes
config instead of R50, a few pixels, one iteration; no TF32 or AMP, which need CUDA): the test suite
runs it (tests/test_gpu_suite.py) so that the GPU run cannot rot.

    python -m projects.benchmarks.gpu_suite --out OUT [--dry-run] [--parts tests,msda]
"""
import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
R50 = "configs/coco/panoptic_segformer_R50_24ep.yaml"
SHAPES = "configs/shapes/panoptic_segformer_shapes.yaml"
STATUSES = ("passed", "failed", "timeout", "skipped")
TOTAL_BUDGET_S = 480  # the suite, install included, must end within this on the GPU
INSTALL_BUDGET_S = 30  # what gpu_suite.sh's offline install may take, counted against the total
DRY_BUDGET_S = 240  # per part in --dry-run (a timeout only; the dry run itself takes seconds per part)
GOAL_MSDA_SPEEDUP = 5.0
GOAL_BF16_FPS = 30.0
PAPER_TRAIN_MEMORY_GB = 12.0
SHAPES_AMP_ITERS = 400


# ------------------------------------------------------------------------------------------- parts
class Step:
    """One command of a part: ``argv`` runs with ``python`` = this interpreter, in the repository."""

    def __init__(self, name, argv, json_path=None, env=None):
        self.name, self.argv, self.json_path, self.env = name, argv, json_path, env or {}


def _py(*args):
    return [sys.executable, *args]


def env_steps(ctx):
    return [Step("probe", _py("-m", "projects.benchmarks.gpu_suite", "--probe", ctx.path("env.json")),
                 ctx.path("env.json"))]


def summarize_env(results, ctx):
    probe = results.get("probe") or {}
    rows = [(k, probe[k]) for k in ("python", "torch", "device", "triton", "msda_impl_on_device", "detectron2",
                                    "pillow", "numpy") if k in probe]
    errors = []
    if not ctx.dry_run:
        if not probe.get("cuda"):
            errors.append("CUDA is not available")
        if probe.get("msda_impl_on_device") != "triton":
            errors.append(f"MSDA_IMPL auto picks {probe.get('msda_impl_on_device')!r} on the GPU, not 'triton'")
    return {"rows": rows, "header": ("item", "value")}, [], errors


def tests_steps(ctx):
    target = "tests/test_cuda.py" if ctx.dry_run else "tests"
    return [Step("pytest -m cuda", _py("-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                                       "--junitxml", ctx.path("junit.xml"), target))]


def summarize_tests(results, ctx):
    path = ctx.path("junit.xml")
    if not os.path.isfile(path):
        return None, [], ["pytest wrote no junit XML"]
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    rows = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = tag if tag != "skipped" else "skipped: " + (case.find(tag).get("message") or "")
        rows.append((f"{case.get('classname')}::{case.get('name')}", outcome, f"{float(case.get('time', 0)):.1f}"))
    errors = []
    if counts["tests"] == 0:
        errors.append("no test carries the cuda marker")
    if counts["failures"] or counts["errors"]:
        errors.append(f"{counts['failures']} failed, {counts['errors']} errors")
    if not ctx.dry_run and counts["skipped"]:
        errors.append(f"{counts['skipped']} CUDA tests skipped on the GPU machine")
    results["counts"] = counts
    return {"rows": rows, "header": ("test", "outcome", "s")}, [], errors


def msda_steps(ctx):
    args = ["--json", ctx.path("msda.json")]
    args += ["--device", "cpu", "--levels", "8x12,4x6,2x3", "--repeats", "1", "--warmup", "0"] if ctx.dry_run else \
        ["--device", "cuda", "--dtypes", "fp32,bf16"]
    return [Step("ms_deform_attn_speed", _py("-m", "projects.benchmarks.ms_deform_attn_speed", *args),
                 ctx.path("msda.json"))]


def summarize_msda(results, ctx):
    data = results.get("ms_deform_attn_speed")
    if not data:
        return None, [], ["no result"]
    rows = [(t["dtype"], t["impl"], f"{t['fwd_ms']:.2f}", f"{t['fwd_bwd_ms']:.2f}", f"{t['speedup_fwd_bwd']:.2f}x",
             "-" if t["peak_mib"] is None else f"{t['peak_mib']:.0f}") for t in data["timings"]]
    goals, errors = [], []
    for t in data["timings"]:
        if t["impl"] == "triton":
            goals.append(_goal(f"MSDeformAttn fwd+bwd speed-up, {t['dtype']}", t["speedup_fwd_bwd"], ">=",
                               GOAL_MSDA_SPEEDUP, "x"))
    if not ctx.dry_run and not goals:
        errors.append("the Triton kernel was not timed (unavailable on this GPU?)")
    return {"rows": rows, "header": ("dtype", "impl", "fwd ms", "fwd+bwd ms", "speed-up fwd+bwd", "peak MiB")}, \
        goals, errors


def _calls(ctx, gpu_variants, dry_variants):
    """Variants per process: on the GPU one process each (a crash or a timeout loses only that one);
    in the dry run all in one process (each process spends seconds importing torch and Detectron2)."""
    return [[v] for v in gpu_variants] if not ctx.dry_run else [list(dry_variants)]


def inference_steps(ctx):
    steps = []
    for dtypes in _calls(ctx, ("fp32", "tf32", "bf16"), ("fp32", "bf16")):  # TF32 needs CUDA
        dtype = ",".join(dtypes)
        out = ctx.path(f"inference_{dtype}.json")
        if ctx.dry_run:
            args = ["--config-file", SHAPES, "--device", "cpu", "--image-size", "64x96", "--mask-layers", "2,1",
                    "--iters", "1", "--warmup", "0"]
        else:
            args = ["--config-file", R50, "--device", "cuda", "--image-size", "800x1333", "--mask-layers", "6,2",
                    "--iters", "30", "--warmup", "5"]
        args += ["--num-images", "1", "--no-flops", "--per-stage", "--dtype", dtype, "--json", out]
        if "bf16" in dtypes:
            args.append("--count-syncs")
        steps.append(Step(f"model_stats {dtype}", _py("-m", "projects.benchmarks.model_stats", *args), out))
    return steps


def summarize_inference(results, ctx):
    rows, goals, stage_names = [], [], None
    for name, data in results.items():
        if not isinstance(data, dict) or "variants" not in data:
            continue
        for variant in data["variants"]:
            for t in variant.get("timing", []):
                stages = t.get("stages_ms", {})
                stage_names = stage_names or list(stages)
                syncs = variant.get("host_syncs", {}).get("total", "")
                rows.append([t["dtype"], variant["mask_layers"], f"{t['mean_ms']:.1f}", f"{t['fps']:.1f}"]
                            + [f"{v:.1f}" for v in stages.values()] + [syncs])
                if t["dtype"] == "bf16":
                    goals.append(_goal(f"R50 inference FPS, bf16, {variant['mask_layers']} mask-decoder layers",
                                       t["fps"], ">=", GOAL_BF16_FPS, " FPS"))
    if not rows:
        return None, [], ["no result"]
    header = ["dtype", "mask layers", "ms/img", "FPS"] + [f"{s} ms" for s in stage_names or []] + ["host syncs"]
    return {"rows": rows, "header": header}, goals, []


def train_memory_steps(ctx):
    steps = []
    for qfs in _calls(ctx, ("on", "off"), ("on", "off")):
        qf = ",".join(qfs)
        out = ctx.path(f"train_memory_{qf}.json")
        if ctx.dry_run:  # the shapes config has 3 stuff classes; fp16 is AMP, CUDA-only
            args = ["--config-file", SHAPES, "--device", "cpu", "--image-size", "64x96", "--things", "3",
                    "--stuff", "2", "--dtype", "fp32", "--steps", "1", "--warmup", "0"]
        else:
            args = ["--config-file", R50, "--device", "cuda", "--image-size", "800x1333", "--dtype", "fp32,fp16",
                    "--steps", "5", "--warmup", "2"]
        args += ["--query-filter", qf, "--json", out]
        steps.append(Step(f"train_memory query filter {qf}", _py("-m", "projects.benchmarks.train_memory", *args), out))
    return steps


def summarize_train_memory(results, ctx):
    rows, goals = [], []
    for data in results.values():
        for r in (data or {}).get("results", []):
            dtype = "fp16 AMP" if r["dtype"] == "fp16" else r["dtype"]
            if "peak_allocated_gib" in r:
                mem = (f"{r['peak_allocated_gib'] * 2**30 / 1e9:.2f}", f"{r['peak_reserved_gib'] * 2**30 / 1e9:.2f}")
                if r["query_filter"] == "on":
                    goals.append(_goal(f"peak training memory (reserved), query filtering, {dtype}",
                                       r["peak_reserved_gib"] * 2**30 / 1e9, "<", PAPER_TRAIN_MEMORY_GB, " GB"))
            else:
                mem = (f"{r['peak_rss_growth_gib'] * 2**30 / 1e9:.2f} (RSS growth)", "-")
            rows.append((r["query_filter"], dtype, r["mask_decoder_thing_queries"], f"{r['step_ms_median']:.0f}", *mem))
    if not rows:
        return None, [], ["no result"]
    return {"rows": rows, "header": ("query filtering", "dtype", "thing queries in mask decoder", "step ms (median)",
                                     "peak allocated GB", "peak reserved GB")}, goals, []


def shapes_amp_steps(ctx):
    out = ctx.path("shapes_amp")
    opts = ["OUTPUT_DIR", out, "SEED", "0", "TEST.EVAL_PERIOD", "0"]
    if ctx.dry_run:  # Detectron2 v0.6's AMPTrainer needs CUDA: the CPU dry run trains in fp32
        opts += ["MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "False", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()",
                 "SOLVER.IMS_PER_BATCH", "2", "DATASETS.TRAIN", "('shapes_panoptic_train_tiny',)",
                 "DATASETS.TEST", "('shapes_panoptic_val_tiny',)", "INPUT.MIN_SIZE_TRAIN", "(128,)",
                 "INPUT.MAX_SIZE_TRAIN", "256", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "256",
                 "DATALOADER.NUM_WORKERS", "0"]
    else:
        opts += ["MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", str(SHAPES_AMP_ITERS),
                 "SOLVER.STEPS", f"({SHAPES_AMP_ITERS * 1100 // 1350},)", "DATALOADER.NUM_WORKERS", "8"]
    return [Step("train_net shapes", _py("train_net.py", "--config-file", SHAPES, *opts))]


def summarize_shapes_amp(results, ctx):
    path = os.path.join(ctx.path("shapes_amp"), "metrics.json")
    if not os.path.isfile(path):
        return None, [], [f"no {os.path.basename(path)} written"]
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    losses = [r for r in lines if "total_loss" in r]
    evals = [r for r in lines if "panoptic_seg/PQ" in r]
    if not evals:
        return None, [], ["training wrote no panoptic_seg/PQ (the final evaluation did not run)"]
    final = evals[-1]
    times = sorted(r["time"] for r in lines if "time" in r)
    summary = {"iterations": losses[-1]["iteration"] + 1 if losses else 0,
               "first_total_loss": losses[0]["total_loss"] if losses else None,
               "last_total_loss": losses[-1]["total_loss"] if losses else None,
               "median_s_per_iter": times[len(times) // 2] if times else None,
               "PQ": final["panoptic_seg/PQ"], "PQ_th": final.get("panoptic_seg/PQ_th"),
               "PQ_st": final.get("panoptic_seg/PQ_st")}
    results["summary"] = summary
    rows = [(k, "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else v)) for k, v in summary.items()]
    return {"rows": rows, "header": ("item", "value")}, [], []


def merge_steps(ctx):
    args = ["--devices", "cpu", "--height", "64", "--width", "96", "--num-things", "20", "--num-stuff", "5",
            "--repeats", "1", "--loop-repeats", "1"] if ctx.dry_run else \
        ["--devices", "cpu,cuda", "--repeats", "10", "--loop-repeats", "1"]
    return [Step("merge_speed", _py("-m", "projects.benchmarks.merge_speed", *args, "--json", ctx.path("merge.json")),
                 ctx.path("merge.json"))]


def summarize_merge(results, ctx):
    data = results.get("merge_speed")
    if not data:
        return None, [], ["no result"]
    devices = sorted({d for times in data["median_ms"].values() for d in times})
    rows = [(name, *(f"{times[d]:.2f}" if d in times else "-" for d in devices))
            for name, times in data["median_ms"].items()]
    errors = [] if ctx.dry_run or "cuda" in devices else ["no CUDA timing"]
    return {"rows": rows, "header": ("method", *(f"{d} ms" for d in devices))}, [], errors


# key, title, GPU budget (s), steps, summarize
PARTS = [
    ("env", "environment: CUDA device, Triton, versions", 15, env_steps, summarize_env),
    ("tests", "1. tests that need CUDA (pytest -m cuda)", 55, tests_steps, summarize_tests),
    ("msda", "2. MSDeformAttn fwd+bwd, Triton vs PyTorch, 800x1333 encoder shape", 40, msda_steps, summarize_msda),
    ("inference", "3. R50 inference at 800x1333, batch 1, per stage", 95, inference_steps, summarize_inference),
    ("train_memory", "4. training memory and step time, batch 1, 800x1333", 80, train_memory_steps,
     summarize_train_memory),
    ("shapes_amp", f"5. AMP training of the shapes config ({SHAPES_AMP_ITERS} iterations) and its PQ", 105,
     shapes_amp_steps, summarize_shapes_amp),
    ("merge", "6. mask-wise merging of 353 masks at 800x1333", 30, merge_steps, summarize_merge),
]
assert INSTALL_BUDGET_S + sum(p[2] for p in PARTS) <= TOTAL_BUDGET_S - 20, "the GPU budgets exceed 8 minutes"


def _goal(what, value, op, target, unit=""):
    met = value >= target if op == ">=" else value < target
    return {"goal": f"{what} {op} {target:g}{unit}", "value": value, "met": bool(met),
            "text": f"{value:.2f}{unit} ({'met' if met else 'NOT met'})"}


# ------------------------------------------------------------------------------------------ runner
class Context:
    def __init__(self, out, work, dry_run, log):
        self.out, self.work, self.dry_run, self.log = out, work, dry_run, log

    def path(self, name):
        return os.path.join(self.work, name)


def run_step(step, timeout, ctx):
    """Run one step (its own process group, killed at ``timeout``); output appended to the log."""
    with open(ctx.log, "a") as log:
        log.write(f"\n===== {step.name}: {' '.join(step.argv)}\n")
        log.flush()
        start = time.perf_counter()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.Popen(step.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", **step.env), start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            status = "timeout"
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
        log.write(f"===== {step.name}: {status} (exit {rc}) in {seconds:.1f} s ({cpu:.1f} s CPU)\n")
    return {"name": step.name, "command": step.argv, "returncode": rc, "status": status, "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu, 1)}


def run_part(key, title, budget, make_steps, summarize, ctx):
    start = time.perf_counter()
    part = {"key": key, "title": title, "budget_s": budget, "steps": [], "results": {}, "goals": [], "errors": []}
    try:
        steps = make_steps(ctx)
        for step in steps:
            left = budget - (time.perf_counter() - start)
            if left < 1:
                part["steps"].append({"name": step.name, "status": "timeout", "seconds": 0,
                                      "note": "part budget spent before it started"})
                continue
            record = run_step(step, left, ctx)
            part["steps"].append(record)
            if step.json_path and os.path.isfile(step.json_path):
                with open(step.json_path) as f:
                    part["results"][step.name] = json.load(f)
        table, part["goals"], part["errors"] = summarize(part["results"], ctx)
        part["table"] = table
    except Exception as exc:  # a bug in this driver must not stop the other parts
        part["errors"].append(f"{type(exc).__name__}: {exc}")
    step_status = [s["status"] for s in part["steps"]]
    if "timeout" in step_status:
        part["status"] = "timeout"
    elif "failed" in step_status or part["errors"]:
        part["status"] = "failed"
    else:
        part["status"] = "passed"
    for s in part["steps"]:
        if s["status"] != "passed":
            part["errors"].append(f"step {s['name']!r}: {s['status']}"
                                  + (f" (exit {s['returncode']})" if s.get("returncode") is not None else ""))
    part["seconds"] = round(time.perf_counter() - start, 1)
    return part


def _cell(v):
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown(report):
    lines = [f"# GPU suite ({'dry run on the CPU' if report['dry_run'] else 'GPU'})", "",
             f"- Machine: {report.get('machine', '?')}", f"- Started: {report['started']}; "
             f"total {report.get('seconds', 0):.0f} s; overall: **{report['overall']}**"]
    if report["dry_run"]:
        lines.append("- Dry run: the same entry points at tiny sizes on the CPU (the shapes config for R50, a few "
                     "pixels, one iteration, no TF32/AMP): it checks that the suite runs, its figures mean nothing")
    lines += ["",
             "| part | status | s (budget) | goals | errors |", "| --- | --- | ---: | --- | --- |"]
    for p in report["parts"]:
        goals = "; ".join(f"{g['goal']}: {g['text']}" for g in p.get("goals", []))
        budget = p.get("budget_s", "-")
        lines.append(f"| {_cell(p['title'])} | {p['status']} | {p.get('seconds', 0):.0f} ({budget}) | "
                     f"{_cell(goals) or '-'} | {_cell('; '.join(p.get('errors', []))) or '-'} |")
    for p in report["parts"]:
        table = p.get("table")
        if not table:
            continue
        lines += ["", f"## {p['title']}", "", "| " + " | ".join(_cell(h) for h in table["header"]) + " |",
                  "|" + " --- |" * len(table["header"])]
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table["rows"]]
    lines += ["", "## Commands (run from the repository root)", ""]
    for p in report["parts"]:
        for s in p.get("steps", []):
            cmd = shlex.join(["python"] + list(s.get("command", []))[1:])
            lines.append(f"- {p['key']} / {s['name']}: {s['status']} in {s['seconds']:.0f} s: `{cmd}`")
    return "\n".join(lines) + "\n"


def write_report(report, out):
    with open(os.path.join(out, "gpu_suite.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(out, "gpu_suite.md"), "w") as f:
        f.write(markdown(report))


# ------------------------------------------------------------------------------------------- probe
def probe(path):
    """The environment as the suite's processes see it (runs in its own process)."""
    info = {"python": f"{platform.python_version()} ({sys.executable})"}
    import numpy
    import PIL
    import torch

    from panoptic_segformer.collect_env import collect_env_info, detectron2_build
    from panoptic_segformer.modeling import ms_deform_attn_triton
    from panoptic_segformer.modeling.ms_deform_attn import resolve_ms_deform_attn_impl

    print(collect_env_info(), flush=True)
    info.update(torch=torch.__version__, numpy=numpy.__version__, pillow=PIL.__version__, detectron2=detectron2_build(),
                cuda=torch.cuda.is_available())
    device = torch.device("cuda" if info["cuda"] else "cpu")
    info["device"] = (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, "
                      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)") if info["cuda"] else \
        f"CPU ({os.cpu_count()} cores)"
    if ms_deform_attn_triton.triton_available():
        import triton

        info["triton"] = triton.__version__
    else:
        info["triton"] = f"unavailable: {ms_deform_attn_triton.TRITON_IMPORT_ERROR}"
    info["msda_impl_on_device"] = resolve_ms_deform_attn_impl(torch.zeros(1, 1, 1, 1, device=device), "auto")
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))


# -------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for gpu_suite.json / .md / .log")
    parser.add_argument("--dry-run", action="store_true", help="the same parts on the CPU at tiny sizes")
    parser.add_argument("--parts", default=",".join(p[0] for p in PARTS),
                        help=f"comma-separated subset of {','.join(p[0] for p in PARTS)}")
    parser.add_argument("--install", nargs=3, metavar=("STATUS", "SECONDS", "NOTE"), default=None,
                        help="the offline install's outcome, as gpu_suite.sh reports it")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        probe(args.probe)
        return 0
    if not args.out:
        parser.error("--out is required")
    keys = [k.strip() for k in args.parts.split(",") if k.strip()]
    unknown = sorted(set(keys) - {p[0] for p in PARTS})
    if unknown:
        parser.error(f"--parts: unknown {unknown} (known: {[p[0] for p in PARTS]})")
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "gpu_suite.log")
    work = tempfile.mkdtemp(prefix="gpu-suite-")
    os.environ.setdefault("PANOPTIC_SEGFORMER_CACHE", os.path.join(tempfile.gettempdir(), "psf-gpu-suite-cache"))
    ctx = Context(args.out, work, args.dry_run, log)
    report = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "repo": REPO,
              "parts": [], "overall": "running"}
    if args.install:
        status, seconds, note = args.install
        if status not in STATUSES:
            parser.error(f"--install: status must be one of {STATUSES}, got {status!r}")
        report["parts"].append({"key": "install", "title": "offline install from the wheelhouse", "status": status,
                                "seconds": float(seconds), "budget_s": INSTALL_BUDGET_S,
                                "errors": [] if status in ("passed", "skipped") else [note], "note": note,
                                "table": {"header": ("install",), "rows": [(note,)]}})
    start = time.perf_counter()
    try:
        for key, title, budget, make_steps, summarize in PARTS:
            if key not in keys:
                continue
            print(f"[gpu_suite] {title} ...", flush=True)
            part = run_part(key, title, DRY_BUDGET_S if args.dry_run else budget, make_steps, summarize, ctx)
            report["parts"].append(part)
            if key == "env" and "probe" in part["results"]:
                probe_info = part["results"]["probe"]
                report["machine"] = f"{probe_info.get('device')}; torch {probe_info.get('torch')}; " \
                                    f"Triton {probe_info.get('triton')}; Python {probe_info.get('python')}"
            print(f"[gpu_suite] {key}: {part['status']} in {part['seconds']:.0f} s"
                  + "".join(f"\n    goal {g['goal']}: {g['text']}" for g in part["goals"])
                  + "".join(f"\n    error: {e}" for e in part["errors"]), flush=True)
            report["seconds"] = time.perf_counter() - start
            write_report(report, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bad = [p["key"] for p in report["parts"] if p["status"] in ("failed", "timeout")]
    report["overall"] = f"failed: {', '.join(bad)}" if bad else "passed"
    report["seconds"] = time.perf_counter() - start
    write_report(report, args.out)
    print(markdown(report))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
