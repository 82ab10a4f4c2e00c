"""The float-sensitive tests pass on another instruction-set path and thread count than the suite's own.

The suite runs at the machine's best ISA (AVX2, AVX-512 or AMX, whatever the CPU has) and the process's
thread count. This test runs the tests whose results depend on float rounding order -- the golden
fixture (tests/test_golden_outputs.py) and the sum that sem_seg takes in two ways
(tests/test_model.py) -- once more in a fresh process with the paths that every x86-64 CPU has and that
differ from the machine's best: ATen's generic (non-vectorised) kernels (``ATEN_CPU_CAPABILITY=default``),
oneDNN limited to SSE4.1 (``ONEDNN_MAX_CPU_ISA``), MKL limited to SSE4.2 (``MKL_ENABLE_INSTRUCTIONS``),
and 1 thread. Together with the in-process run they cover two ISA paths and two thread counts on any
machine with 2 or more cores; the same command by hand is in docs/BENCHMARKS.md.
"""
import os
import re
import subprocess
import sys

import torch

from conftest import REPO_ROOT

GENERIC_PATH = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FLOAT_SENSITIVE = ["tests/test_golden_outputs.py::test_outputs_meet_the_float64_fixture",
                   "tests/test_model.py::test_sem_seg_equals_the_dense_semantic_inference"]


def test_generic_isa_path_changes_float_rounding(tmp_path):
    """The variables do select other kernels: a float32 product and a convolution round differently
    (so the run below is not the suite's own run again)."""
    code = ("import torch\n"
            "g = torch.Generator().manual_seed(0)\n"
            "a, b = torch.randn(257, 1031, generator=g), torch.randn(1031, 263, generator=g)\n"
            "x, w = torch.randn(1, 64, 40, 40, generator=g), torch.randn(64, 64, 3, 3, generator=g)\n"
            "y = torch.cat([(a @ b).flatten(), torch.nn.functional.conv2d(x, w).flatten(), a.sum(1)])\n"
            "print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())\n"
            "torch.save(y, __import__('sys').argv[1])\n")
    outs = []
    best = {k: v for k, v in os.environ.items() if k not in GENERIC_PATH}  # the machine's own paths
    for i, env in enumerate((best, dict(best, **GENERIC_PATH))):
        path = str(tmp_path / f"y{i}.pt")
        proc = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120,
                              env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append((proc.stdout.split(), torch.load(path)))
    (isa, _), y = outs[0]
    (generic, threads), y_generic = outs[1]
    assert generic == "DEFAULT" and threads == "1" and isa != "DEFAULT"
    # Equal to float32 rounding (1031-term sums of unit normals: |error| << 1e-3), yet not bit-identical.
    torch.testing.assert_close(y_generic, y, rtol=0, atol=1e-3)
    assert not torch.equal(y_generic, y)


def test_float_sensitive_tests_pass_on_the_generic_isa_path_with_one_thread():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *FLOAT_SENSITIVE],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, **GENERIC_PATH))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    # The golden test printed the path it ran on, once per model.
    assert len(re.findall(r"threads 1 ISA DEFAULT", log)) == 3, log[-3000:]
    assert re.search(r"\b5 passed\b", log), log[-3000:]
    print(torch.backends.cpu.get_cpu_capability(), "here;", "\n".join(
        line for line in log.splitlines() if "float32 - float64" in line))
