"""Preemption-safe training: a signal stops every process at the same iteration with a checkpoint, and
``--resume`` continues exactly where the interrupted run was.

- :class:`PreemptionHook`: the signals of ``SOLVER.PREEMPTION_SIGNALS`` (SIGTERM and SIGUSR1 by default;
  SLURM sends one before it kills a preempted or timed-out job) only set a flag. After every iteration
  (after that iteration's evaluation and periodic checkpoint) the processes combine their flags
  (an all-reduce of one integer over gloo); when any was set, all of them stop at that iteration, rank 0
  writes ``model_<iteration>.pth`` (unless the periodic checkpoint of that iteration was just written) and
  the process exits with :data:`PREEMPTION_EXIT_CODE` (75, ``EX_TEMPFAIL``: "try again"), which a requeue
  script can test. A second signal while saving is logged and changes nothing; checkpoints are written
  atomically (``panoptic_segformer.checkpoint.atomic_write``), so even SIGKILL leaves the previous one.
- :class:`TrainingStateHook`: the random generators each process trains with (torch, CUDA, numpy, Python),
  captured after every iteration and restored before the next, so that what runs between iterations
  (evaluation, which creates DataLoaders and may run dropout-free forwards that still draw) does not
  change training; every checkpoint holds every rank's state (gathered to rank 0), and the recent history
  of the logged scalars, so that the smoothed metrics (medians over Detectron2's 20-iteration windows)
  continue too (Detectron2's PeriodicCheckpointer hook runs on rank 0 only, so the hook gathers the ranks'
  states itself after the iterations that are checkpointed).
- :func:`agree_on_resume_checkpoint`: rank 0's ``last_checkpoint`` decides where every rank resumes;
  a rank that has no identical copy of that file (no shared OUTPUT_DIR) receives rank 0's bytes.
  Together with the resumable data order (``panoptic_segformer.data.resumable_loader``) an interrupted and
  resumed run ends with the weights, optimizer state, LR and metrics of an uninterrupted one, bit for bit,
  on the same machine, thread count (``SOLVER.CPU_THREADS`` fixed) and number of processes.
"""
import hashlib
import logging
import os
import random
import signal
import threading
from typing import Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm
from fvcore.common.history_buffer import HistoryBuffer

__all__ = ["PREEMPTION_EXIT_CODE", "TrainingPreempted", "PreemptionHook", "TrainingStateHook",
           "parse_preemption_signals", "ignore_signals", "agree_on_resume_checkpoint", "rng_state", "set_rng_state"]

logger = logging.getLogger(__name__)

#: Exit code of a process whose training was stopped by a preemption signal after writing its checkpoint
#: (sysexits.h ``EX_TEMPFAIL``): requeue the job and run the same command with ``--resume``.
PREEMPTION_EXIT_CODE = 75

# Scalars of the event storage kept in checkpoints: Detectron2's writers smooth over the last 20 values.
HISTORY_KEPT = 100


class TrainingPreempted(SystemExit):
    """Raised out of the training loop after a preemption signal, once the checkpoint of `iteration` is
    written; a ``SystemExit`` with code :data:`PREEMPTION_EXIT_CODE` (Detectron2's loop catches only
    ``Exception`` and still runs the hooks' ``after_train``)."""

    def __init__(self, iteration: int, checkpoint: str, signal_name: str):
        super().__init__(PREEMPTION_EXIT_CODE)
        self.iteration, self.checkpoint, self.signal_name = iteration, checkpoint, signal_name

    def __str__(self):
        return (f"training stopped by {self.signal_name} after iteration {self.iteration}; checkpoint "
                f"{self.checkpoint}; run the same command with --resume to continue (exit code "
                f"{PREEMPTION_EXIT_CODE})")


def parse_preemption_signals(names) -> Tuple[int, ...]:
    """``SOLVER.PREEMPTION_SIGNALS`` (names such as "SIGTERM", "SIGUSR1") as signal numbers; a ValueError
    naming the key for an unknown name or one that cannot be handled (SIGKILL, SIGSTOP)."""
    out = []
    for name in names:
        num = getattr(signal, str(name), None) if str(name).startswith("SIG") else None
        if not isinstance(num, signal.Signals) or num in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"SOLVER.PREEMPTION_SIGNALS: {name!r} is not a signal that can be handled "
                             f"(use names such as 'SIGTERM', 'SIGUSR1'), in {list(names)!r}")
        out.append(num)
    return tuple(dict.fromkeys(out))


def rng_state():
    """This process's random generator states (torch CPU, CUDA when initialised, numpy, Python), as
    tensors and Python numbers (loadable by ``torch.load(weights_only=True)``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state) -> None:
    """Restore an :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gloo_group():
    # Detectron2's gloo group (the world group under gloo; a gloo group beside NCCL), in v0.6 and main.
    return comm._get_global_gloo_group()


class TrainingStateHook(HookBase):
    """Keeps training's random generators and the logged scalars' recent history across interruptions
    (module docstring). With several processes, every rank's state is gathered to rank 0 after the
    iterations that the periodic checkpointer saves (every `checkpoint_period`-th and the last), and by
    :class:`PreemptionHook` before its checkpoint (:meth:`gather`, a collective)."""

    def __init__(self, checkpoint_period: int = 0):
        self.period = int(checkpoint_period)
        self._snapshot, self._gathered, self._pending = None, None, None

    def before_train(self):
        pending, self._pending = self._pending, None
        if not pending:
            return
        states, rank, world = pending.get("rng") or [], comm.get_rank(), comm.get_world_size()
        if len(states) != world:
            logger.warning(f"The checkpoint holds the random generator states of {len(states)} processes, "
                           f"{world} run now: "
                           + (f"ranks {len(states)}-{world - 1} keep their seeded generators; " if world > len(states)
                              else "") + "randomness in the model (dropout) differs from the interrupted run")
        if rank < len(states):
            self._snapshot = states[rank]
        storage = self.trainer.storage
        for key, h in pending.get("history", {}).items():
            buf = HistoryBuffer()
            buf._data = [(float(v), float(it)) for v, it in h["data"]]
            buf._count, buf._global_avg = int(h["count"]), float(h["global_avg"])
            storage._history[key] = buf
            storage._smoothing_hints[key] = bool(h["smoothing_hint"])

    def before_step(self):
        if self._snapshot is not None:
            set_rng_state(self._snapshot)

    def after_step(self):
        self._snapshot = rng_state()
        it = self.trainer.iter
        if comm.get_world_size() == 1:
            self._gathered = [self._snapshot]
        elif (self.period > 0 and (it + 1) % self.period == 0) or it + 1 >= self.trainer.max_iter:
            self.gather()

    def gather(self):
        """Collect every rank's generator state on rank 0 (a collective: call it on every process)."""
        if comm.get_world_size() == 1:
            self._gathered = [self._snapshot]
        else:
            self._gathered = comm.gather(self._snapshot, dst=0)

    def state_dict(self):
        storage = getattr(self.trainer, "storage", None)
        if storage is None or self._gathered is None or any(s is None for s in self._gathered):
            return {}
        history = {k: {"data": [list(e) for e in h._data[-HISTORY_KEPT:]], "count": h._count,
                       "global_avg": h._global_avg, "smoothing_hint": storage._smoothing_hints.get(k, True)}
                   for k, h in storage.histories().items()}
        return {"rng": self._gathered, "history": history}

    def load_state_dict(self, state_dict):
        self._pending = state_dict


class PreemptionHook(HookBase):
    """Stops all processes at the same iteration boundary after a preemption signal, with a checkpoint
    (module docstring). Register it last, so that an iteration's evaluation and periodic checkpoint run
    before the check. The handlers are installed in ``before_train`` (main thread only) and the previous
    ones restored in ``after_train``."""

    def __init__(self, signals, checkpointer, checkpoint_period: int, before_save=None):
        self.signals, self.checkpointer, self.period = tuple(signals), checkpointer, int(checkpoint_period)
        self.before_save = before_save  # run on every process before the checkpoint (a collective)
        self._received, self._previous = None, {}

    def before_train(self):
        self._received = None
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Training runs outside the main thread: no preemption signal handlers installed")
            return
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
            signal.siginterrupt(s, False)  # restart interrupted system calls (gloo, file I/O)
        _RESTORE_IN_FORKED_CHILD.update(self._previous)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self._received is None:
            self._received = name
            logger.warning(f"{name} received at iteration {self.trainer.iter}: stopping after this iteration "
                           "with a checkpoint")
        else:
            logger.warning(f"{name} received again: already stopping (writing the checkpoint); ignored")

    def _any_rank_received(self) -> bool:
        flag = torch.tensor([self._received is not None], dtype=torch.int32)
        if comm.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_gloo_group())
        return bool(flag.item())

    def after_step(self):
        if not self._any_rank_received():
            return
        it = self.trainer.iter
        if it + 1 >= self.trainer.max_iter:
            logger.warning("Preemption signal at the last iteration: its checkpoint is written and training "
                           "ends normally")
            return
        name = f"model_{it:07d}"
        if self.period <= 0 or (it + 1) % self.period:  # else the periodic checkpoint of `it` was just written
            if self.before_save is not None:
                self.before_save()
            self.checkpointer.save(name, iteration=it)
        comm.synchronize()  # no process exits before rank 0 has written the checkpoint
        stop = TrainingPreempted(it, os.path.join(self.checkpointer.save_dir, name + ".pth"),
                                 self._received or "a signal on another rank")
        logger.warning(str(stop))
        raise stop

    def after_train(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
            _RESTORE_IN_FORKED_CHILD.pop(s, None)
        self._previous = {}


# A process forked while the handlers are installed (panopticapi's evaluation pool, DataLoader workers) gets
# the previous handlers back at once: it must not inherit a handler that only sets a flag, with restarted
# system calls (siginterrupt False), or a pool worker blocked on its task queue would never end on the
# SIGTERM of Pool.terminate() and the pool's clean-up would wait forever. DataLoader workers of the
# training loader then ignore the signals (``ignore_signals`` below): the trainer stops them.
_RESTORE_IN_FORKED_CHILD = {}


def _restore_signal_handlers_in_forked_child():
    for s, handler in _RESTORE_IN_FORKED_CHILD.items():
        signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    _RESTORE_IN_FORKED_CHILD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_restore_signal_handlers_in_forked_child)


def ignore_signals(signums, worker_id=None) -> None:
    """``worker_init_fn`` of the training loader's workers: ignore the preemption signals ``signums`` (a
    cluster signals every process of a job; the trainer stops its DataLoader workers itself)."""
    for s in signums:
        signal.signal(s, signal.SIG_IGN)


def _digest(path) -> Optional[str]:
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def agree_on_resume_checkpoint(checkpointer) -> Tuple[str, Optional[bytes]]:
    """``(path, data)``: the checkpoint every rank resumes from ("" for none) -- the file rank 0's
    ``last_checkpoint`` names -- and, on a rank without an identical copy of it, rank 0's bytes of it
    (None elsewhere). A collective: call it on every process. A ``last_checkpoint`` naming a missing file
    on rank 0 is a FileNotFoundError naming both."""
    mine = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else ""
    rank, world = comm.get_rank(), comm.get_world_size()
    missing = rank == 0 and mine and not os.path.isfile(mine)
    if world == 1:
        if missing:
            raise FileNotFoundError(f"{os.path.join(checkpointer.save_dir, 'last_checkpoint')} names {mine}, which "
                                    "does not exist: remove last_checkpoint to start over, or restore the file")
        return mine, None
    views = comm.all_gather((mine, bool(missing)), group=_gloo_group())
    chosen, rank0_missing = views[0]
    if rank0_missing:
        raise FileNotFoundError(f"rank 0: {os.path.join(checkpointer.save_dir, 'last_checkpoint')} names "
                                f"{chosen}, which does not exist: remove last_checkpoint to start over")
    others = {r: v for r, (v, _) in enumerate(views) if v != chosen}
    if others:
        logger.warning("Ranks see other last checkpoints than rank 0 ("
                       + "; ".join(f"rank {r}: {v or 'none'}" for r, v in sorted(others.items()))
                       + f"): every rank resumes from rank 0's, {chosen or 'none (MODEL.WEIGHTS, iteration 0)'}")
    if not chosen:
        return "", None
    digests = comm.all_gather(_digest(chosen), group=_gloo_group())
    lacking = [r for r, d in enumerate(digests) if d != digests[0]]
    if not lacking:
        return chosen, None
    logger.warning(f"Ranks {lacking} have no identical copy of {chosen} (no shared OUTPUT_DIR?): rank 0 sends "
                   "its copy")
    if rank == 0:
        with open(chosen, "rb") as f:
            payload = [f.read()]
    else:
        payload = [None]
    dist.broadcast_object_list(payload, src=0, group=_gloo_group())
    return chosen, payload[0] if rank in lacking else None
