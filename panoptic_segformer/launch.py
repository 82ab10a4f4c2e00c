"""Starting ``train_net.py``'s processes: what the installed Detectron2's ``launch()`` can start, and
passing a preemption signal on to the processes it started.

Detectron2 v0.6's ``launch()`` asserts CUDA for more than one process (NCCL only); upstream main falls back
to gloo on the CPU. :func:`check_launch` says so, and what to do, before Detectron2's assertion.
"""
import multiprocessing
import os
import signal

import torch

__all__ = ["launch_starts_cpu_processes", "check_launch", "forward_signals_to_children"]


def _nothing():
    pass


def launch_starts_cpu_processes() -> bool:
    """Whether the installed Detectron2's ``launch()`` starts processes without CUDA (upstream main:
    gloo; v0.6 asserts CUDA). Found by running the worker that ``launch()`` starts in each process,
    in this process, with a rendezvous URL no backend accepts: v0.6's worker fails its CUDA assertion
    before the rendezvous, upstream main's gets to the rendezvous (with its gloo backend) and fails
    there. No process group is created either way. Without that private worker, ``launch()`` itself
    starts 2 processes (seconds)."""
    import importlib

    launch_module = importlib.import_module("detectron2.engine.launch")  # the module, not the function
    try:
        worker = launch_module._distributed_worker
    except AttributeError:
        worker = None
    try:
        if worker is None:
            launch_module.launch(_nothing, 2, dist_url="auto")
        else:
            worker(0, _nothing, 2, 2, 0, "no-such-rendezvous://", ())
    except Exception as e:
        if not torch.cuda.is_available() and "cuda is not available" in str(e):
            return False
        if worker is None:
            raise
        return True  # got past any CUDA requirement to the rendezvous
    return worker is None


def check_launch(num_processes: int) -> None:
    """SystemExit with what to do when `num_processes` (> 1) processes are to be launched on a machine
    without CUDA by a Detectron2 whose ``launch()`` needs CUDA (v0.6)."""
    if num_processes <= 1 or torch.cuda.is_available() or launch_starts_cpu_processes():
        return
    import detectron2

    raise SystemExit(
        f"train_net.py: {num_processes} processes (--num-gpus x --num-machines) on a machine without CUDA: the "
        f"installed Detectron2 {detectron2.__version__}'s launch() starts several processes only with CUDA "
        "(NCCL) and would stop at its `assert torch.cuda.is_available()`. Train with one process "
        "(--num-gpus 1 --num-machines 1), or install upstream Detectron2 (`pip install "
        "'git+https://github.com/facebookresearch/detectron2.git'`), whose launch() runs CPU processes on "
        "gloo.")


def forward_signals_to_children(signums) -> None:
    """In the launching process: pass each of `signums` on to the worker processes ``launch()`` started
    (``multiprocessing.active_children()``), which stop gracefully (``PreemptionHook``); with no worker
    started yet, the signal's default action applies (the process ends)."""

    def forward(signum, frame):
        children = multiprocessing.active_children()
        if not children:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        for child in children:
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass

    for s in signums:
        signal.signal(s, forward)
        signal.siginterrupt(s, False)
