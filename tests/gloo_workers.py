"""CPU worker processes on the gloo backend, set up the way Detectron2's ``launch()`` sets up its
workers, for tests of multi-process training and evaluation.

Detectron2 v0.6's ``launch()`` asserts CUDA for more than one process (upstream main falls back to
gloo), so the tests start the processes themselves: ``torch.multiprocessing`` (forkserver: a fresh
interpreter that has imported torch, Detectron2 and the project once),
``init_process_group("gloo")`` and Detectron2's ``comm`` state (its local process group, created as
``launch()`` creates it), then run the project's own ``train_net.main`` / ``Trainer`` in each.

The workers stay alive between tasks, so several tests share one process group: ``run(fn, *args)``
runs ``fn(*args)`` on every rank and returns each rank's return value and output. ``fn`` must be a
module-level function (pickled by name). Each rank writes its stdout/stderr to ``rank<r>.log`` and the
files it opens for writing (Python's ``open`` audit event) to ``writes_rank<r>.txt`` in ``log_dir``.
"""
import atexit
import glob
import logging
import os
import queue
import sys
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

from panoptic_segformer.launch import launch_starts_cpu_processes  # noqa: F401  (the tests' import)

# What every worker imports anyway, imported once by the fork server the workers start from.
PRELOAD = ("torch", "detectron2.engine", "detectron2.evaluation", "panoptic_segformer.engine")


def _create_local_process_group(world_size):
    """Detectron2's local process group (ranks on this machine), as its ``launch()`` creates it:
    ``comm.create_local_process_group`` on upstream main, ``comm._LOCAL_PROCESS_GROUP`` on v0.6."""
    import torch.distributed as dist
    from detectron2.utils import comm

    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(world_size)
    else:
        comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(world_size)))


def _reset_logging():
    """Forget the log handlers of the previous task, as a fresh process would have none
    (Detectron2's setup_logger is cached per argument set and adds handlers each time)."""
    from detectron2.utils.logger import setup_logger

    for name in ("detectron2", "fvcore", "d2", "panoptic_segformer"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
    setup_logger.cache_clear()


def _worker(rank, world_size, port, log_dir, tasks, results):
    log = open(os.path.join(log_dir, f"rank{rank}.log"), "a+")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    writes = open(os.path.join(log_dir, f"writes_rank{rank}.txt"), "a", buffering=1)

    def audit(event, args):
        if event == "open" and isinstance(args[0], str) and isinstance(args[1], str) and set("wax+") & set(args[1]):
            writes.write(os.path.abspath(args[0]) + "\n")

    sys.addaudithook(audit)
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    torch.set_num_threads(1)  # the processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=world_size,
                            rank=rank, timeout=timedelta(minutes=10))
    _create_local_process_group(world_size)
    comm.synchronize()
    parent = os.getppid()  # the fork server, which exits with the test process
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the test process is gone
                break
            continue
        if task is None:
            break
        fn, args = task
        _reset_logging()
        sys.stdout.flush()
        start = log.seek(0, os.SEEK_END)
        try:
            ok, value = True, fn(*args)
        except BaseException:  # reported to the test process, which raises it
            ok, value = False, traceback.format_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        log.seek(start)
        results.put((rank, ok, value, log.read()))
    dist.destroy_process_group()


class GlooWorkers:
    """``world_size`` spawned CPU processes in one gloo process group (see the module docstring)."""

    def __init__(self, world_size, log_dir, preload=PRELOAD):
        from detectron2.engine.launch import _find_free_port  # in v0.6 and upstream main

        self.world_size, self.log_dir = world_size, log_dir
        os.makedirs(log_dir, exist_ok=True)
        # A fresh interpreter per worker as with spawn, but forked from multiprocessing's fork server,
        # which has imported `preload` once (and run nothing): a worker starts in well under a second
        # instead of importing torch, Detectron2 and the project again (~15 s for 2 workers on 2 cores).
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))  # no effect once the fork server runs
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        port = _find_free_port()
        # Not daemonic, as in Detectron2's launch: evaluation starts processes of its own (panopticapi's
        # pq_compute). Killed when the test process exits.
        self._procs = [ctx.Process(target=_worker, daemon=False,
                                   args=(r, world_size, port, log_dir, self._tasks[r], self._results))
                       for r in range(world_size)]
        for p in self._procs:
            p.start()
        atexit.register(self.kill)

    def alive(self):
        return all(p.is_alive() for p in self._procs)

    def submit(self, fn, *args):
        """Start ``fn(*args)`` on every rank; ``collect()`` waits for the results."""
        for q in self._tasks:
            q.put((fn, args))

    def collect(self, timeout=600):
        """``[(value, output)]`` per rank; raises if a rank failed, died or timed out."""
        got, deadline = {}, time.monotonic() + timeout
        while len(got) < self.world_size:
            try:
                rank, ok, value, output = self._results.get(timeout=1.0)
                got[rank] = (ok, value, output)
                continue
            except queue.Empty:
                pass
            if not self.alive() or time.monotonic() > deadline:
                why = "a worker died" if not self.alive() else f"timed out after {timeout}s"
                self.kill()
                raise RuntimeError(f"gloo workers: {why}; results from ranks {sorted(got)}\n" + self.logs())
        failed = {r: v for r, (ok, v, _) in got.items() if not ok}
        if failed:
            raise RuntimeError("gloo workers failed:\n" + "\n".join(f"rank {r}:\n{tb}" for r, tb in failed.items()))
        return [(got[r][1], got[r][2]) for r in range(self.world_size)]

    def run(self, fn, *args, timeout=600):
        self.submit(fn, *args)
        return self.collect(timeout)

    def files_written(self, rank):
        """Absolute paths rank ``rank`` opened for writing so far."""
        with open(os.path.join(self.log_dir, f"writes_rank{rank}.txt")) as f:
            return f.read().splitlines()

    def logs(self):
        out = []
        for path in sorted(glob.glob(os.path.join(self.log_dir, "rank*.log"))):
            with open(path, errors="replace") as f:
                out.append(f"--- {os.path.basename(path)} (last 3000 chars) ---\n{f.read()[-3000:]}")
        return "\n".join(out)

    def kill(self):
        """SIGKILL every worker (as a killed job would be)."""
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=10)

    def close(self):
        if self.alive():
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=30)
        self.kill()
