"""SOLVER.CPU_THREADS: the Trainer's CPUThreadsHook probes 1 thread against the default on the CPU, keeps the
faster, re-probes, honours a fixed count, restores the count after training and rejects bad values."""
import statistics

import pytest
import torch
from detectron2.engine import TrainerBase

from conftest import small_cfg
from panoptic_segformer.engine import CPUThreadsHook, Trainer


@pytest.fixture
def two_threads():
    """Start with 2 torch threads (whatever this machine's default), restore the count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class _StepTrainer(TrainerBase):
    """Detectron2's training loop around a trivial step."""

    def run_step(self):
        self.storage.put_scalar("threads_in_step", torch.get_num_threads())


class _QuickProbeTrainer(Trainer):
    """The project's Trainer with a probe short enough for a test: 1 warm-up iteration, then 1 iteration
    with each count."""

    def build_cpu_threads_hook(self, cfg):
        return super().build_cpu_threads_hook(cfg, warmup_iters=1, probe_iters=1)


def _train(trainer_class, tmp_path, *opts):
    cfg = small_cfg("DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path), *opts)
    trainer = trainer_class(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    hook = next(h for h in trainer._hooks if isinstance(h, CPUThreadsHook))
    used = {it: int(v) for v, it in trainer.storage.history("cpu_threads").values()}
    return hook, used


def test_auto_training_keeps_the_count_with_the_lower_measured_median(two_threads, tmp_path):
    hook, used = _train(_QuickProbeTrainer, tmp_path, "SOLVER.MAX_ITER", "4")
    assert torch.get_num_threads() == 2  # restored
    (probe,) = hook.probes
    assert probe["iter"] == 1 and sorted(probe["times"]) == [1, 2]
    assert all(len(t) == 1 and t[0] > 0 for t in probe["times"].values())
    # the cost is time per pixel: 2 images of the tiny shapes set at 128 x 128 per batch
    assert probe["work"] == {1: [2 * 128 * 128], 2: [2 * 128 * 128]}
    medians = {c: statistics.median(t / w for t, w in zip(probe["times"][c], probe["work"][c])) for c in (1, 2)}
    chosen = 1 if medians[1] <= medians[2] else 2
    assert probe["chosen"] == chosen
    # Iteration 0 warms up with the default count, 1-2 probe (1 thread first), 3 trains with the choice.
    assert used == {0: 2, 1: 1, 2: 2, 3: chosen}
    print(f"probe medians {medians}, chose {chosen}")


def test_fixed_count_trains_with_it_then_restores(two_threads, tmp_path):
    hook, used = _train(Trainer, tmp_path, "SOLVER.MAX_ITER", "2", "SOLVER.CPU_THREADS", "1")
    assert used == {0: 1, 1: 1} and hook.probes == []
    assert torch.get_num_threads() == 2


def test_one_thread_at_start_skips_the_probe(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hook, used = _train(_QuickProbeTrainer, tmp_path, "SOLVER.MAX_ITER", "4")
        assert hook.probes == [] and used == {0: 1, 1: 1, 2: 1, 3: 1}
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_on_cuda_auto_leaves_the_count_alone_and_a_fixed_count_is_set(two_threads):
    for threads, expected in ((0, 2), (1, 1)):
        trainer = _StepTrainer()
        hook = CPUThreadsHook(threads, 2, "cuda", warmup_iters=1, probe_iters=1)
        trainer.register_hooks([hook])
        trainer.train(0, 4)
        in_step = [int(v) for v, _ in trainer.storage.history("threads_in_step").values()]
        assert in_step == [expected] * 4 and hook.probes == [] and torch.get_num_threads() == 2


@pytest.mark.parametrize("value", [-2, "fast", 2.5, True])
def test_bad_thread_counts_are_errors_naming_the_key(value, tmp_path):
    cfg = small_cfg("OUTPUT_DIR", str(tmp_path))
    cfg.SOLVER.CPU_THREADS = value
    with pytest.raises(ValueError, match=rf"SOLVER\.CPU_THREADS: .*{value!r}"):
        Trainer(cfg)


def test_bad_values_from_the_command_line_and_period_are_errors_naming_the_key():
    with pytest.raises(ValueError, match=r"SOLVER\.CPU_THREADS"):  # yacs: an int key, "fast" is a type mismatch
        small_cfg("SOLVER.CPU_THREADS", "fast")
    with pytest.raises(ValueError, match=r"SOLVER\.CPU_THREADS: .*-2"):
        CPUThreadsHook.from_config(small_cfg("SOLVER.CPU_THREADS", "-2"))
    with pytest.raises(ValueError, match=r"SOLVER\.CPU_THREADS_PROBE_PERIOD: .*-1"):
        CPUThreadsHook.from_config(small_cfg("SOLVER.CPU_THREADS_PROBE_PERIOD", "-1"))
    with pytest.raises(ValueError, match=r"SOLVER\.CPU_THREADS_PROBE_PERIOD: expected 0 or >= 6.*got 5"):
        CPUThreadsHook.from_config(small_cfg("SOLVER.CPU_THREADS_PROBE_PERIOD", "5"))


def test_probe_follows_a_changing_load(two_threads):
    """Deterministic iteration times from a fake clock: idle at first (2 threads 0.5 s, 1 thread 1 s), then
    busy from iteration 7 (2 threads 2 s): the first probe keeps 2 threads, the re-probe switches to 1."""
    trainer = _StepTrainer()
    calls = []

    def clock():  # an iteration's time is what the clock adds at its second call (after_step)
        idle = trainer.iter < 7
        calls.append({1: 1.0, 2: 0.5 if idle else 2.0}[torch.get_num_threads()])
        return sum(calls)

    hook = CPUThreadsHook(0, 6, "cpu", warmup_iters=1, probe_iters=2, clock=clock)
    trainer.register_hooks([hook])
    trainer.train(0, 14)
    assert [(p["iter"], p["times"], p["chosen"]) for p in hook.probes] == [
        (1, {1: [1.0, 1.0], 2: [0.5, 0.5]}, 2), (7, {1: [1.0, 1.0], 2: [2.0, 2.0]}, 1)]
    used = [int(v) for v, _ in trainer.storage.history("cpu_threads").values()]
    # warm-up, ABBA probe, 2 threads, ABBA probe, 1 thread, unfinished probe at 13 (1 thread first)
    assert used == [2, 1, 2, 2, 1, 2, 2, 1, 2, 2, 1, 1, 1, 1]
    assert torch.get_num_threads() == 2


def test_probe_compares_time_per_unit_of_work(two_threads):
    """Multi-scale batches: the 2-thread probe iterations get 4x the pixels. Per pixel 2 threads are
    twice as fast (0.5 vs 1 s), so they win, although their iterations take longer (2 s vs 1 s)."""
    trainer = _StepTrainer()
    pixels = {1: 1.0, 2: 4.0, 3: 4.0, 4: 1.0}  # probe iterations 1-4 run 1, 2, 2, 1 threads
    calls = []

    def clock():
        calls.append({1: 1.0, 2: 0.5}[torch.get_num_threads()] * pixels.get(trainer.iter, 1.0))
        return sum(calls)

    hook = CPUThreadsHook(0, 0, "cpu", warmup_iters=1, probe_iters=2, clock=clock,
                          work=lambda: pixels.get(trainer.iter, 1.0))
    trainer.register_hooks([hook])
    trainer.train(0, 6)
    (probe,) = hook.probes
    assert probe["times"] == {1: [1.0, 1.0], 2: [2.0, 2.0]} and probe["work"] == {1: [1.0, 1.0], 2: [4.0, 4.0]}
    assert probe["medians"] == {1: 1.0, 2: 0.5} and probe["chosen"] == 2
