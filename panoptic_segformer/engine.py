"""Training and evaluation with Detectron2: the project's ``Trainer`` and what it is built from.

``Trainer`` is Detectron2's ``DefaultTrainer`` with this project's dataset mapper, evaluators
(:func:`build_evaluator`: PQ, plus thing-mask AP, Table 4), optimizer (:func:`build_optimizer`: AdamW,
backbone LR multiplier, Appendix A.1; full-model gradient clipping), checkpointer
(:class:`~panoptic_segformer.checkpoint.PanopticSegFormerCheckpointer`) and a DistributedDataParallel
model that also runs on the CPU (:func:`build_ddp_model`; gloo) with synchronised BatchNorm
statistics (:func:`check_batch_norm_synchronised`). The Trainer also installs
:class:`CPUThreadsHook` (``SOLVER.CPU_THREADS``), which picks the training process's intra-op thread count
on the CPU. For preemptible clusters it trains on a :class:`~panoptic_segformer.data.resumable_loader.
ResumableTrainLoader` (data order and augmentations continue exactly on ``--resume``), keeps the random
generators and logged scalars in every checkpoint (:class:`~panoptic_segformer.resume.TrainingStateHook`),
stops all processes with a checkpoint on SOLVER.PREEMPTION_SIGNALS
(:class:`~panoptic_segformer.resume.PreemptionHook`) and makes every rank resume from rank 0's checkpoint
(:meth:`Trainer.resume_or_load`). ``train_net.py`` parses the command line, sets up the config and launches
the processes; tools under ``projects/`` import from here.
"""
import itertools
import logging
import os
import statistics
import time
import weakref
from typing import Optional

import torch
import detectron2.utils.comm as comm
from detectron2.data import (MetadataCatalog, build_detection_test_loader, build_detection_train_loader,
                             get_detection_dataset_dicts)
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer, create_ddp_model
from detectron2.evaluation import COCOPanopticEvaluator, DatasetEvaluators
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils.logger import setup_logger

from .checkpoint import PanopticSegFormerCheckpointer
from .data import PanopticSegFormerDatasetMapper
from .data.resumable_loader import ResumableTrainLoader
from .evaluation import ThingMaskAPEvaluator
from .resume import PreemptionHook, TrainingStateHook, agree_on_resume_checkpoint, parse_preemption_signals

__all__ = ["Trainer", "CPUThreadsHook", "available_core_seconds", "build_optimizer", "build_optimizer_params",
           "param_lr_factor",
           "build_evaluator", "build_ddp_model", "check_batch_norm_synchronised"]

_NORM_TYPES = (
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
    torch.nn.GroupNorm, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d,
    torch.nn.LayerNorm, torch.nn.LocalResponseNorm,
)


def param_lr_factor(cfg):
    """``name -> LR factor`` of a parameter's full name (Detectron2's ``lr_factor_func`` convention of
    ``get_default_optimizer_params``): SOLVER.BACKBONE_MULTIPLIER for ``backbone.*`` (Appendix A.1), else
    the factor of the first SOLVER.PARAM_LR_MULTIPLIERS entry ``[substring, factor]`` whose substring the
    name contains (the official config's ``paramwise_cfg.custom_keys``: ``sampling_offsets`` and
    ``reference_points`` x 0.1, as mmcv's ``DefaultOptimizerConstructor`` applies them by substring), else 1.
    A malformed entry is a ValueError naming the key."""
    entries = []
    for entry in cfg.SOLVER.PARAM_LR_MULTIPLIERS:
        ok = (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str) and entry[0]
              and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool) and entry[1] >= 0)
        if not ok:
            raise ValueError(f"SOLVER.PARAM_LR_MULTIPLIERS entries must be [name substring, factor >= 0], got "
                             f"{entry!r} in {cfg.SOLVER.PARAM_LR_MULTIPLIERS!r}")
        entries.append((entry[0], float(entry[1])))
    backbone = cfg.SOLVER.BACKBONE_MULTIPLIER

    def factor(name: str) -> float:
        if name.startswith("backbone."):
            return backbone
        return next((f for sub, f in entries if sub in name), 1.0)

    return factor


def build_optimizer_params(cfg, model):
    """Parameter groups: base LR (x SOLVER.BACKBONE_MULTIPLIER for the backbone, Appendix A.1; x the
    SOLVER.PARAM_LR_MULTIPLIERS factor of other names, :func:`param_lr_factor`; x SOLVER.BIAS_LR_FACTOR for
    biases), weight decay SOLVER.WEIGHT_DECAY (WEIGHT_DECAY_NORM for normalisation layers,
    WEIGHT_DECAY_BIAS for biases when set)."""
    from detectron2.layers import FrozenBatchNorm2d

    norm_types = _NORM_TYPES + (FrozenBatchNorm2d,)
    lr_factor = param_lr_factor(cfg)
    params, seen = [], set()
    for module_name, module in model.named_modules():
        for name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in seen:
                continue
            seen.add(value)
            lr = cfg.SOLVER.BASE_LR
            weight_decay = cfg.SOLVER.WEIGHT_DECAY
            lr *= lr_factor(f"{module_name}.{name}" if module_name else name)
            if isinstance(module, norm_types):
                weight_decay = cfg.SOLVER.WEIGHT_DECAY_NORM
            elif name == "bias":
                lr *= cfg.SOLVER.BIAS_LR_FACTOR
                if cfg.SOLVER.WEIGHT_DECAY_BIAS is not None:
                    weight_decay = cfg.SOLVER.WEIGHT_DECAY_BIAS
            params.append({"params": [value], "lr": lr, "weight_decay": weight_decay})
    return params


def _full_model_clipping(optim_class, max_norm, norm_type):
    """An optimizer class whose step() first clips the global gradient norm of all parameters
    together (DETR / Deformable DETR style)."""

    class FullModelGradientClippingOptimizer(optim_class):
        def step(self, closure=None):
            all_params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(all_params, max_norm, norm_type)
            return super().step(closure=closure)

    FullModelGradientClippingOptimizer.__name__ = f"FullModelGradientClipping{optim_class.__name__}"
    return FullModelGradientClippingOptimizer


def build_optimizer(cfg, model):
    params = build_optimizer_params(cfg, model)
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optim_class, kwargs = torch.optim.AdamW, {}
    elif name == "SGD":
        optim_class, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER: unknown optimizer {cfg.SOLVER.OPTIMIZER!r} (use ADAMW or SGD)")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        return _full_model_clipping(optim_class, clip.CLIP_VALUE, clip.NORM_TYPE)(
            params, cfg.SOLVER.BASE_LR, **kwargs)
    if clip.ENABLED and clip.CLIP_TYPE not in ("value", "norm"):
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE: unknown value {clip.CLIP_TYPE!r} "
                         "(use full_model, norm or value)")
    return maybe_add_gradient_clipping(cfg, optim_class)(params, cfg.SOLVER.BASE_LR, **kwargs)


def build_evaluator(cfg, dataset_name, output_folder=None):
    """COCOPanopticEvaluator for panoptic datasets, plus COCOEvaluator (mask AP) when the dataset has
    instance annotations (metadata `json_file`) and the model outputs instances."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    meta = MetadataCatalog.get(dataset_name)
    evaluators = []
    if getattr(meta, "evaluator_type", None) == "coco_panoptic_seg" and cfg.MODEL.PANOPTIC_SEGFORMER.TEST.PANOPTIC_ON:
        evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
    if getattr(meta, "json_file", None) and cfg.MODEL.PANOPTIC_SEGFORMER.TEST.INSTANCE_ON:
        evaluators.append(ThingMaskAPEvaluator(dataset_name, output_dir=output_folder))
    if not evaluators:
        raise ValueError(f"no evaluator for dataset {dataset_name!r} "
                         f"(evaluator_type={getattr(meta, 'evaluator_type', None)!r})")
    return DatasetEvaluators(evaluators) if len(evaluators) > 1 else evaluators[0]


def check_batch_norm_synchronised(model, world_size):
    """With more than one process, refuse BatchNorm layers that keep per-process running statistics.

    Plain ``BatchNorm`` under DDP normalises each process's own images and updates each process's own
    running statistics (DDP runs with ``broadcast_buffers=False``, as in Detectron2). The end-of-training
    evaluation then runs every process with its own statistics, while the checkpoint holds rank 0's:
    the reported PQ is not the PQ of the saved weights. Synchronised BatchNorm (``naiveSyncBN``: all
    processes share the batch statistics, so every process holds the same running statistics) or a
    normalisation without running statistics (FrozenBN, GN, LayerNorm) has no such gap."""
    if world_size <= 1:
        return
    from detectron2.layers import NaiveSyncBatchNorm

    per_process = [name for name, m in model.named_modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                   and not isinstance(m, (torch.nn.SyncBatchNorm, NaiveSyncBatchNorm))]
    if per_process:
        raise ValueError(
            f"{len(per_process)} BatchNorm layers keep per-process running statistics under {world_size} "
            f"processes (e.g. {', '.join(per_process[:3])}): each process would evaluate with its own "
            "statistics and the checkpoint would hold rank 0's. Set MODEL.RESNETS.NORM to \"naiveSyncBN\" "
            "(synchronised BatchNorm that works on CPU/gloo and CUDA), \"SyncBN\" (CUDA only), "
            "\"FrozenBN\" or \"GN\", or train with one process.")


def build_ddp_model(model):
    """``DistributedDataParallel`` around `model` when more than one process runs, else `model`.

    As DefaultTrainer (``broadcast_buffers=False``), with ``device_ids`` the model's own CUDA device
    (the local rank's, as Detectron2's launch sets it) and none for a CPU model: Detectron2's
    ``create_ddp_model`` always passes ``device_ids=[local_rank]``, which DDP rejects for a CPU model."""
    if comm.get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    return create_ddp_model(model, broadcast_buffers=False,
                            device_ids=[device.index] if device.type == "cuda" else None)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def available_core_seconds() -> Optional[float]:
    """A running count of the CPU seconds this process could have used: the idle time (``/proc/stat``
    idle + iowait) of the CPUs it may run on (``os.sched_getaffinity``), plus its own CPU time (all its
    threads, ``time.process_time``). Over a window, the increase divided by the wall time is the number of
    cores available to the process: the ones it used plus the ones nobody used. None where ``/proc/stat``
    or the affinity cannot be read (not Linux)."""
    try:
        allowed = os.sched_getaffinity(0)
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        ticks_per_second = os.sysconf("SC_CLK_TCK")
    except (AttributeError, OSError, ValueError):
        return None
    ticks = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in allowed and len(fields) >= 5:
            ticks += int(fields[3]) + int(fields[4])
    return ticks / ticks_per_second + time.process_time()


class CPUThreadsHook(HookBase):
    """Sets the training process's intra-op thread count (``torch.set_num_threads``); with ``threads=0``
    ("auto") on a CPU device, trains with one thread unless more cores are free and measured faster.

    Why: on a 2-core CPU that other processes kept busy, torch's default (one OpenMP thread per core) made
    an iteration 1.5-5x slower than one thread, because the process's own threads wait on each other
    at every operator; on the idle machine the default was 1.5-1.7x faster (docs/BENCHMARKS.md, "Threads in CPU
    training"). No fixed count is right for both, and
    the load changes while a run trains, so "auto":

    1. trains its first `warmup_iters` iterations with 1 thread (the count that is never much slower) and
       measures over them how many cores are available to the process (`core_seconds`, by default
       :func:`available_core_seconds`: the cores it used plus the idle ones);
    2. if that rounds to at most 1 core (another job keeps the machine busy), keeps 1 thread without
       trying more: no iteration pays for oversubscribed cores;
    3. otherwise runs `probe_iters` iterations with 1 thread and as many with k threads, k = the available
       cores (at most the count the process started with, ``torch.get_num_threads()`` before training),
       in ABBA order so that a steady drift of iteration times favours neither, and keeps the count with
       the lower median cost (1 on a tie);
    4. repeats this every `probe_period` iterations (0: once), measuring the cores over the `warmup_iters`
       iterations before each probe.

    Without a core measure (not Linux, `warmup_iters` 0, `core_seconds` returning None) step 3 runs with k =
    the starting count. An iteration is timed with `clock` from this hook's ``before_step`` to its
    ``after_step``; the Trainer installs the hook first, so that covers data loading, forward, backward and
    the optimizer step, and not the other hooks' periodic work (evaluation, checkpoints, writers). The
    cores are measured over the same spans. An iteration's cost is its time divided by `work()`, its amount
    of work (the Trainer passes the batch's padded pixel count: multi-scale training changed it 2.3x
    between iterations, as much as the thread count or more); without `work`, or when it returns None, the
    cost is the time. Each decision is appended to ``self.probes`` (``{"iter", "cores", "times", "work",
    "medians", "chosen"}``: the measured available cores or None, then times in seconds, work and medians
    of time / work per count tried, empty when nothing was tried) and logged. The count an iteration ran
    with goes to the event storage as ``cpu_threads``.

    The thread count changes only the order of floating-point reductions, not what training computes
    (seeded runs that must match bit for bit need a fixed count: two "auto" runs may choose differently).
    A process that starts with one thread (one core, or ``OMP_NUM_THREADS=1``) has nothing to compare
    and keeps it. On a CUDA device "auto" does nothing (the GPU does the work); a fixed count
    `threads` >= 1 is set on any device. ``after_train`` restores the count the process started with,
    so the final evaluation (Detectron2's ``EvalHook.after_train``, which runs after this hook's) uses it.
    """

    def __init__(self, threads=0, probe_period=1000, device="cpu", warmup_iters=3, probe_iters=3,
                 clock=time.perf_counter, work=None, core_seconds=available_core_seconds):
        _check_int("SOLVER.CPU_THREADS", threads, 0)
        _check_int("SOLVER.CPU_THREADS_PROBE_PERIOD", probe_period, 0)
        _check_int("warmup_iters", warmup_iters, 0)
        _check_int("probe_iters", probe_iters, 1)
        if 0 < probe_period < 2 * probe_iters:
            raise ValueError(f"SOLVER.CPU_THREADS_PROBE_PERIOD: expected 0 or >= {2 * probe_iters} (the probe's "
                             f"own {2 * probe_iters} iterations), got {probe_period}")
        self.threads, self.probe_period = threads, probe_period
        self.warmup_iters, self.probe_iters, self._clock, self._work = warmup_iters, probe_iters, clock, work
        self._core_seconds = core_seconds
        self.auto = threads == 0 and torch.device(device).type == "cpu"
        self.probes = []

    @classmethod
    def from_config(cls, cfg, **kwargs):
        return cls(cfg.SOLVER.CPU_THREADS, cfg.SOLVER.CPU_THREADS_PROBE_PERIOD, cfg.MODEL.DEVICE, **kwargs)

    def before_train(self):
        self._initial = torch.get_num_threads()
        self._schedule, self._probe, self._next_probe, self._window = [], None, None, None
        if self.threads:
            torch.set_num_threads(self.threads)
        elif self.auto and self._initial > 1:
            torch.set_num_threads(1)
            self._next_probe = self.trainer.iter + self.warmup_iters
        elif self.auto:
            logging.getLogger(__name__).info("CPU threads: the process starts with 1 thread; nothing to probe")

    def _available_cores(self) -> Optional[float]:
        """Cores available over the measured window (None without a complete measure)."""
        window, self._window = self._window, None
        if not window or window["missing"] or window["seconds"] <= 0:
            return None
        return window["core_seconds"] / window["seconds"]

    def before_step(self):
        it = self.trainer.iter
        if self._next_probe is not None and self.warmup_iters and it == self._next_probe - self.warmup_iters:
            self._window = {"seconds": 0.0, "core_seconds": 0.0, "missing": False}
        if it == self._next_probe:
            cores = self._available_cores()
            k = self._initial if cores is None else min(self._initial, max(1, int(cores + 0.5)))
            tried = (1, k) if k > 1 else ()
            self._probe = {"iter": it, "cores": cores, "times": {c: [] for c in tried}, "work": {c: [] for c in tried}}
            self._next_probe = it + self.probe_period if self.probe_period else None
            self._schedule = [c for j in range(self.probe_iters) for c in (tried, tried[::-1])[j % 2]]
            if not tried:
                self._finish_probe()
        if self._schedule:
            torch.set_num_threads(self._schedule.pop(0))
        self._count = torch.get_num_threads()
        self._start = self._clock()
        self._start_cores = self._core_seconds() if self._window is not None else None

    def after_step(self):
        elapsed, count = self._clock() - self._start, self._count
        if self.threads or self.auto:
            self.trainer.storage.put_scalar("cpu_threads", count, smoothing_hint=False)
        if self._window is not None:
            end = self._core_seconds()
            if end is None or self._start_cores is None:
                self._window["missing"] = True
            else:
                self._window["seconds"] += elapsed
                self._window["core_seconds"] += end - self._start_cores
        if self._probe is None:
            return
        work = self._work() if self._work is not None else None
        self._probe["times"][count].append(elapsed)
        self._probe["work"][count].append(work or 1)
        if not self._schedule:
            self._finish_probe()

    def _finish_probe(self):
        probe, self._probe = self._probe, None
        probe["medians"] = {c: statistics.median(t / w for t, w in zip(probe["times"][c], probe["work"][c]))
                            for c in probe["times"]}
        probe["chosen"] = min(sorted(probe["medians"]), key=probe["medians"].get) if probe["medians"] else 1
        torch.set_num_threads(probe["chosen"])
        self.probes.append(probe)
        unit = "s / pixel" if self._work is not None else "s"
        cores = "not measured" if probe["cores"] is None else f"{probe['cores']:.2f}"
        tried = ", ".join(f"{t:.4g} {unit} with {c}" for c, t in sorted(probe["medians"].items()))
        logging.getLogger(__name__).info(
            "CPU threads: %s core(s) available; %s; training with %d thread(s)%s", cores,
            f"median iteration cost {tried}" if tried else "too few to try more than 1 thread",
            probe["chosen"],
            f" until the next probe at iteration {self._next_probe}" if self._next_probe is not None else "")

    def after_train(self):
        if self.threads or self.auto:
            torch.set_num_threads(self._initial)


class _BatchPixels:
    """Iterates `loader` (batches: lists of dicts with "image", C x H x W), keeping the number of pixels
    the model computes on for the batch last yielded: images padded to the largest height and width."""

    def __init__(self, loader):
        self.loader, self.last = loader, None

    def __iter__(self):
        for batch in self.loader:
            shapes = [d["image"].shape[-2:] for d in batch if isinstance(d, dict) and "image" in d]
            self.last = len(shapes) * max(h for h, _ in shapes) * max(w for _, w in shapes) if shapes else None
            yield batch

    def __call__(self):
        return self.last


class Trainer(DefaultTrainer):
    """DefaultTrainer with Panoptic SegFormer's mapper, evaluators, optimizer and checkpointer, a DDP
    model that also runs on the CPU (gloo) with synchronised BatchNorm statistics, the CPU thread
    count of SOLVER.CPU_THREADS (:class:`CPUThreadsHook`), and exact resume after a preemption (the
    module docstring)."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__ (identical in Detectron2 v0.6 and upstream main) with the model
        # wrapped by build_ddp_model instead of create_ddp_model(model, broadcast_buffers=False), the
        # data loader wrapped by _BatchPixels (CPUThreadsHook compares thread counts by iteration time
        # per pixel of the batch) and a PanopticSegFormerCheckpointer instead of a DetectionCheckpointer.
        super(DefaultTrainer, self).__init__()
        self._preemption_signals = parse_preemption_signals(cfg.SOLVER.PREEMPTION_SIGNALS)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):  # setup_logger not called
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        check_batch_norm_synchronised(model, comm.get_world_size())
        optimizer = self.build_optimizer(cfg, model)
        self._train_loader = self.build_train_loader(cfg)
        data_loader = self._train_batch_pixels = _BatchPixels(self._train_loader)
        model = build_ddp_model(model)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # PanopticSegFormerCheckpointer: MODEL.WEIGHTS with class heads of another dataset is an error
        # unless SKIP_MISMATCHED_CLASS_HEADS.
        self.checkpointer = PanopticSegFormerCheckpointer.from_config(
            model, cfg, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self._state_hook = TrainingStateHook(cfg.SOLVER.CHECKPOINT_PERIOD)
        self.register_hooks(self.build_hooks())

    # Checkpoints hold the optimizer state too, so --resume continues the optimizer (Adam moments and
    # step counts) where it stopped. Upstream main's DefaultTrainer does this; v0.6's saves only the
    # iteration and the LR scheduler. And the training data's position (ResumableTrainLoader), so that
    # the data order continues. Checkpoints written without them still load.
    def state_dict(self):
        ret = super(DefaultTrainer, self).state_dict()  # TrainerBase's: iteration and hooks
        ret["_trainer"] = self._trainer.state_dict()
        if isinstance(self._train_loader, ResumableTrainLoader):
            ret["data_loader"] = self._train_loader.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super(DefaultTrainer, self).load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        if "data_loader" in state_dict and isinstance(self._train_loader, ResumableTrainLoader):
            self._train_loader.load_state_dict(state_dict["data_loader"])
        elif self.iter > 0:
            logging.getLogger(__name__).warning(
                "The checkpoint holds no training data position (or DATALOADER.SAMPLER_TRAIN is not "
                "TrainingSampler): the data order restarts from its beginning")

    def resume_or_load(self, resume=True):
        """As DefaultTrainer's, with every rank resuming from the checkpoint rank 0's ``last_checkpoint``
        names, read from rank 0 by the ranks without an identical copy (no shared OUTPUT_DIR); incomplete
        writes of a killed run are removed first. Without ``resume`` (or without a checkpoint), MODEL.WEIGHTS
        is loaded as Detectron2 does. Ranks that end at different iterations are a RuntimeError naming them."""
        if not resume:
            return super().resume_or_load(resume=False)
        self.checkpointer.remove_incomplete()
        path, data = agree_on_resume_checkpoint(self.checkpointer)
        if not path:
            return super().resume_or_load(resume=False)
        self.checkpointer.load_agreed(path, data)
        self.start_iter = self.iter + 1
        if comm.get_world_size() > 1:
            starts = comm.all_gather(self.start_iter)
            if len(set(starts)) > 1:
                raise RuntimeError("ranks would resume at different iterations ("
                                   + ", ".join(f"rank {r}: {s}" for r, s in enumerate(starts)) + f") from {path}")

    def build_hooks(self):
        # CPUThreadsHook first, so that its iteration times exclude the other hooks' periodic work (see
        # CPUThreadsHook); TrainingStateHook next, so that it captures the random generators right after the
        # training step; PreemptionHook last, after the iteration's evaluation and periodic checkpoint.
        return ([self.build_cpu_threads_hook(self.cfg), self._state_hook] + super().build_hooks()
                + [PreemptionHook(self._preemption_signals, self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD,
                                  before_save=self._state_hook.gather)])

    def build_cpu_threads_hook(self, cfg, **kwargs):
        return CPUThreadsHook.from_config(cfg, work=self._train_batch_pixels, **kwargs)

    @classmethod
    def build_train_loader(cls, cfg):
        """A :class:`ResumableTrainLoader` (data seed SEED, or one shared random seed when SEED < 0) for
        DATALOADER.SAMPLER_TRAIN "TrainingSampler"; Detectron2's loader for its other samplers, whose
        order a resumed run does not continue (logged as a warning)."""
        mapper = PanopticSegFormerDatasetMapper(cfg, is_train=True)
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            logging.getLogger(__name__).warning(
                f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN}: Detectron2's training loader, whose "
                "data order and augmentations restart on --resume (TrainingSampler continues them exactly)")
            return build_detection_train_loader(cfg, mapper=mapper)
        dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        return ResumableTrainLoader(dataset, mapper, cfg.SOLVER.IMS_PER_BATCH, seed=cfg.SEED if cfg.SEED >= 0 else None,
                                    aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
                                    num_workers=cfg.DATALOADER.NUM_WORKERS,
                                    ignore_signals=parse_preemption_signals(cfg.SOLVER.PREEMPTION_SIGNALS))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=PanopticSegFormerDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)
