"""The GPU suite (projects/benchmarks/gpu_suite.sh) and its wheelhouse (projects/setup/gpu_wheels.py).

``gpu_suite.sh --dry-run`` runs every part with the same entry points on the CPU at tiny sizes, so the
one-call GPU run cannot rot: every part must pass and be reported in the JSON and the Markdown.
"""
import json
import os
import subprocess
import sys
import time
import zipfile

from conftest import REPO_ROOT
from projects.benchmarks import gpu_suite
from projects.setup import gpu_wheels

PART_KEYS = ["install", "env", "tests", "msda", "inference", "train_memory", "shapes_amp", "merge"]


# The dry run's parts in two concurrent runs (each part is a few subprocesses that spend most of their time
# importing torch and Detectron2, on 1 thread each here): every part once, in about half the wall time of
# one sequential run on 2 cores. `bash projects/benchmarks/gpu_suite.sh --dry-run OUT` runs them in sequence.
GROUPS = (["env", "tests", "msda", "merge"], ["inference", "train_memory", "shapes_amp"])


def test_dry_run_runs_every_part_and_reports_it(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    runs = []
    for i, group in enumerate(GROUPS):
        out = tmp_path / f"out{i}"
        runs.append((out, subprocess.Popen(
            ["bash", os.path.join(REPO_ROOT, "projects/benchmarks/gpu_suite.sh"), "--dry-run", "--wheels", "none",
             "--parts", ",".join(group), str(out)], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)))
    reports = []
    for (out, proc), group in zip(runs, GROUPS):
        stdout, stderr = proc.communicate(timeout=900)
        log = (out / "gpu_suite.log").read_text() if (out / "gpu_suite.log").exists() else ""
        assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:] + log[-6000:]
        report = json.loads((out / "gpu_suite.json").read_text())
        assert report["dry_run"] is True and report["overall"] == "passed"
        assert [p["key"] for p in report["parts"]] == ["install"] + [k for k in PART_KEYS if k in group]
        markdown = (out / "gpu_suite.md").read_text()
        for part in report["parts"]:
            assert f"| {part['title']} | {part['status']} |" in markdown
        reports.append(report)
    parts = {}
    for report in reports:
        for p in report["parts"]:
            parts.setdefault(p["key"], p)
    assert sorted(parts) == sorted(PART_KEYS)
    assert parts["install"]["status"] == "skipped"
    for key in PART_KEYS[1:]:
        assert parts[key]["status"] == "passed", (key, parts[key]["errors"])
        assert parts[key]["steps"] and all(s["returncode"] == 0 for s in parts[key]["steps"])

    # each part carries its tool's real results
    assert parts["env"]["results"]["probe"]["msda_impl_on_device"] == "pytorch"  # CPU
    counts = parts["tests"]["results"]["counts"]
    assert counts["tests"] >= 4 and counts["failures"] == counts["errors"] == 0
    timing = parts["msda"]["results"]["ms_deform_attn_speed"]["timings"]
    assert [t["impl"] for t in timing] == ["pytorch", "grid_sample"] and all(t["fwd_bwd_ms"] > 0 for t in timing)
    rows = parts["inference"]["table"]["rows"]
    assert sorted((r[0], r[1]) for r in rows) == [("bf16", 1), ("bf16", 2), ("fp32", 1), ("fp32", 2)]
    assert len(parts["inference"]["goals"]) == 2  # bf16 FPS goal, per mask-layer count
    memory = [r for data in parts["train_memory"]["results"].values() for r in data["results"]]
    assert sorted(r["query_filter"] for r in memory) == ["off", "on"] and all(r["step_ms_median"] > 0 for r in memory)
    summary = parts["shapes_amp"]["results"]["summary"]
    assert summary["iterations"] == 2 and 0.0 <= summary["PQ"] <= 100.0
    merge = parts["merge"]["results"]["merge_speed"]
    assert merge["median_ms"]["`mask_wise`"]["cpu"] > 0 and merge["vectorized_vs_loop"].startswith("identical")


def _ctx(tmp_path):
    return gpu_suite.Context(str(tmp_path), str(tmp_path), True, str(tmp_path / "log"))


def test_a_failing_or_slow_step_is_reported_and_does_not_stop_the_part(tmp_path):
    steps = [gpu_suite.Step("fails", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]),
             gpu_suite.Step("works", [sys.executable, "-c", "print('fine')"])]
    part = gpu_suite.run_part("x", "x", 60, lambda ctx: steps, lambda results, ctx: (None, [], []), _ctx(tmp_path))
    assert part["status"] == "failed" and [s["status"] for s in part["steps"]] == ["failed", "passed"]
    assert part["steps"][0]["returncode"] == 3 and "exit 3" in part["errors"][0]
    assert "boom" in (tmp_path / "log").read_text() and "fine" in (tmp_path / "log").read_text()

    start = time.perf_counter()
    slow = [gpu_suite.Step("sleeps", [sys.executable, "-c", "import time; time.sleep(60)"]),
            gpu_suite.Step("never", [sys.executable, "-c", "pass"])]
    part = gpu_suite.run_part("y", "y", 2, lambda ctx: slow, lambda results, ctx: (None, [], []), _ctx(tmp_path))
    assert time.perf_counter() - start < 30
    assert part["status"] == "timeout" and [s["status"] for s in part["steps"]] == ["timeout", "timeout"]


def test_gpu_budgets_fit_in_eight_minutes():
    assert gpu_suite.INSTALL_BUDGET_S + sum(p[2] for p in gpu_suite.PARTS) <= 8 * 60 - 20
    assert [p[0] for p in gpu_suite.PARTS] == PART_KEYS[1:]


def _wheel(folder, filename, requires=()):
    """A minimal wheel file (METADATA only) named ``filename``."""
    name, version = filename.split("-")[:2]
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(os.path.join(folder, filename), "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA", meta)


def test_wheelhouse_check_catches_what_would_break_the_offline_install(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    _wheel(good, "yacs-0.1.8-py3-none-any.whl", ["PyYAML"])
    _wheel(good, "fvcore-0.1.5-py3-none-any.whl", ["yacs>=0.1.6", "numpy", "pywin32; sys_platform == 'win32'",
                                                   "black; extra == 'dev'"])
    _wheel(good, "pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.whl", ["numpy"])
    assert gpu_wheels.check_wheelhouse(str(good)) == []

    bad = tmp_path / "bad"
    bad.mkdir()
    _wheel(bad, "yacs-0.1.7-py3-none-any.whl")
    _wheel(bad, "yacs-0.1.8-py3-none-any.whl")  # two versions
    _wheel(bad, "fvcore-0.1.5-py3-none-any.whl", ["yacs>=0.2", "iopath"])  # wrong version, missing
    _wheel(bad, "pycocotools-2.0.11-cp311-cp311-manylinux2014_x86_64.whl")  # other Python
    _wheel(bad, "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl")  # the target has it
    errors = "\n".join(gpu_wheels.check_wheelhouse(str(bad)))
    for needle in ("two versions of yacs", "requires iopath", "requires yacs>=0.2", "cp311", "torch is carried"):
        assert needle in errors, errors


def test_wheelhouse_pins_are_the_projects():
    pins = gpu_wheels.pins_from_requirements(gpu_wheels.FROM_REQUIREMENTS + gpu_wheels.BINARY)
    with open(os.path.join(REPO_ROOT, "requirements.txt")) as f:
        requirements = f.read()
    assert all(pin in requirements for pin in pins)
    with open(os.path.join(REPO_ROOT, "Makefile")) as f:
        assert "panopticapi-lite==0.2.0" in f.read() and "panopticapi-lite==0.2.0" in gpu_wheels.EXTRA_PURE
