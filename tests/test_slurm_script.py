"""projects/slurm/train_preemptible.sh, the documented SLURM batch script, run by bash with real signals.

SLURM itself is not here: ``scontrol`` is a recording script on PATH, and ``train_net.py`` (run from the
working directory, as the batch script does) is a small program that behaves as the real one does on a
preemption signal -- it exits with code 75 -- which tests/test_preemption.py checks for the real one."""
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "projects", "slurm", "train_preemptible.sh")

TRAIN_NET = """import os, signal, sys, time
def stop(signum, frame):
    with open("got", "w") as f:
        f.write(signal.Signals(signum).name + " " + " ".join(sys.argv[1:]))
    sys.exit(75)
signal.signal(signal.SIGUSR1, stop)
signal.signal(signal.SIGTERM, stop)
open("ready", "w").close()
if os.environ.get("FINISH"):
    sys.exit(0)
time.sleep(60)
sys.exit(1)
"""


def _run(tmp_path, send=None, finish=False):
    (tmp_path / "train_net.py").write_text(TRAIN_NET)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" > "$SCONTROL_LOG"\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = dict(os.environ, PYTHON=sys.executable, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SCONTROL_LOG=str(tmp_path / "scontrol.log"))
    if finish:
        env["FINISH"] = "1"
    proc = subprocess.Popen(["bash", SCRIPT, "--config-file", "C.yaml", "--resume", "OUTPUT_DIR", "out"],
                            cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None or finish, proc.communicate()[0]
        assert time.time() < deadline, "train_net.py did not start"
        time.sleep(0.05)
    if send is not None:
        proc.send_signal(send)
    out, _ = proc.communicate(timeout=30)
    log = tmp_path / "scontrol.log"
    return proc.returncode, out, log.read_text().strip() if log.exists() else None


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_is_passed_on_and_a_preempted_run_is_requeued(tmp_path, sig):
    rc, out, requeue = _run(tmp_path, send=sig)
    assert rc == 75, out
    assert (tmp_path / "got").read_text() == f"{sig.name} --config-file C.yaml --resume OUTPUT_DIR out"
    assert requeue == "requeue 4242", out
    assert "requeueing job 4242" in out


def test_a_finished_run_is_not_requeued(tmp_path):
    rc, out, requeue = _run(tmp_path, finish=True)
    assert rc == 0 and requeue is None, out
