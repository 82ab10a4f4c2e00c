"""SOLVER.CPU_THREADS: the Trainer's CPUThreadsHook warms up with 1 thread, keeps it when no other core is
free, else probes 1 thread against the free cores on the CPU and keeps the faster, re-probes, honours a fixed
count, restores the count after training and rejects bad values; available_core_seconds measures free cores."""
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
from detectron2.engine import TrainerBase

from conftest import small_cfg
from panoptic_segformer.engine import CPUThreadsHook, Trainer, available_core_seconds


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
    with each count. The cores it sees as available are `cores` (a real measure would depend on what else
    runs on the test machine: available_core_seconds has its own test)."""

    cores = 2.0

    def build_cpu_threads_hook(self, cfg):
        return super().build_cpu_threads_hook(cfg, warmup_iters=1, probe_iters=1,
                                              core_seconds=lambda: self.cores * time.perf_counter())


class _BusyMachineTrainer(_QuickProbeTrainer):
    cores = 1.2  # rounds to 1: another job takes the other core


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
    # cores = 2 x a perf_counter delta / one read microseconds apart, over a training iteration: rel 0.05
    assert probe["iter"] == 1 and sorted(probe["times"]) == [1, 2] and probe["cores"] == pytest.approx(2.0, rel=0.05)
    assert all(len(t) == 1 and t[0] > 0 for t in probe["times"].values())
    # the cost is time per pixel: 2 images of the tiny shapes set at 128 x 128 per batch
    assert probe["work"] == {1: [2 * 128 * 128], 2: [2 * 128 * 128]}
    medians = {c: statistics.median(t / w for t, w in zip(probe["times"][c], probe["work"][c])) for c in (1, 2)}
    chosen = 1 if medians[1] <= medians[2] else 2
    assert probe["chosen"] == chosen
    # Iteration 0 warms up with 1 thread, 1-2 probe (1 thread first), 3 trains with the choice.
    assert used == {0: 1, 1: 1, 2: 2, 3: chosen}
    print(f"probe medians {medians}, chose {chosen}")


def test_auto_on_a_busy_machine_trains_with_one_thread_without_trying_more(two_threads, tmp_path):
    hook, used = _train(_BusyMachineTrainer, tmp_path, "SOLVER.MAX_ITER", "4")
    (probe,) = hook.probes
    # 1.2 x a perf_counter delta / one read microseconds apart: rel 0.05 (as above)
    assert probe["iter"] == 1 and probe["cores"] == pytest.approx(1.2, rel=0.05) and probe["chosen"] == 1
    assert probe["times"] == {} and probe["medians"] == {}
    assert used == {0: 1, 1: 1, 2: 1, 3: 1}
    assert torch.get_num_threads() == 2  # restored


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
    """Deterministic iteration times from a fake clock and core measure: idle at first (2 cores free;
    2 threads 0.5 s, 1 thread 1 s), then from iteration 6 another job takes one core (1 core free): the
    first probe keeps 2 threads, the next decision measures 1 core and returns to 1 thread without trying
    2; from iteration 12 the machine is idle again and the third probe goes back to 2 threads."""
    trainer = _StepTrainer()
    calls, cores = [], []

    def busy():
        return 6 <= trainer.iter < 12

    def clock():  # an iteration's time is what the clock adds at its second call (after_step)
        calls.append({1: 1.0, 2: 2.0 if busy() else 0.5}[torch.get_num_threads()])
        return sum(calls)

    def core_seconds():  # cores available x the time the iteration took, likewise at the second call
        cores.append((1.0 if busy() else 2.0) * calls[-1] if calls else 0.0)
        return sum(cores)

    hook = CPUThreadsHook(0, 6, "cpu", warmup_iters=1, probe_iters=2, clock=clock, core_seconds=core_seconds)
    trainer.register_hooks([hook])
    trainer.train(0, 18)
    assert [(p["iter"], p["cores"], p["times"], p["chosen"]) for p in hook.probes] == [
        (1, 2.0, {1: [1.0, 1.0], 2: [0.5, 0.5]}, 2), (7, 1.0, {}, 1), (13, 2.0, {1: [1.0, 1.0], 2: [0.5, 0.5]}, 2)]
    used = [int(v) for v, _ in trainer.storage.history("cpu_threads").values()]
    # warm-up (1), ABBA probe, 2 threads; busy: 1 thread from the decision at 7 on; idle again at 12
    # (measured by the window at 12), ABBA probe at 13-16, then 2 threads
    assert used == [1, 1, 2, 2, 1, 2, 2, 1, 1, 1, 1, 1, 1, 1, 2, 2, 1, 2]
    assert torch.get_num_threads() == 2


def test_probe_tries_the_available_cores_not_more_than_the_starting_count():
    """A process that starts with 4 threads and measures 2.6 free cores probes 1 against 3 threads; with
    6.3 free cores, against its 4."""
    before = torch.get_num_threads()
    try:
        for cores, k in ((2.6, 3), (6.3, 4)):
            torch.set_num_threads(4)
            trainer, calls = _StepTrainer(), []

            def clock():
                calls.append(1.0 / torch.get_num_threads())
                return sum(calls)

            hook = CPUThreadsHook(0, 0, "cpu", warmup_iters=1, probe_iters=1, clock=clock,
                                  core_seconds=lambda: cores * sum(calls))
            trainer.register_hooks([hook])
            trainer.train(0, 4)
            (probe,) = hook.probes
            # fake clock: cores x delta / delta in float64, approx's rel 1e-6 covers the rounding
            assert probe["cores"] == pytest.approx(cores) and sorted(probe["times"]) == [1, k]
            assert probe["chosen"] == k and torch.get_num_threads() == 4
            assert [int(v) for v, _ in trainer.storage.history("cpu_threads").values()] == [1, 1, k, k]
    finally:
        torch.set_num_threads(before)


def test_without_a_core_measure_auto_probes_the_starting_count(two_threads):
    """Where /proc/stat cannot be read (core_seconds None), the probe runs with the starting count."""
    trainer = _StepTrainer()
    hook = CPUThreadsHook(0, 0, "cpu", warmup_iters=1, probe_iters=1, core_seconds=lambda: None)
    trainer.register_hooks([hook])
    trainer.train(0, 4)
    (probe,) = hook.probes
    assert probe["cores"] is None and sorted(probe["times"]) == [1, 2]
    used = [int(v) for v, _ in trainer.storage.history("cpu_threads").values()]
    assert used[:3] == [1, 1, 2] and used[3] == probe["chosen"]


def test_available_core_seconds_counts_idle_and_own_cores():
    """The real measure: while this process sleeps, its rate is the idle cores (at most the CPUs this
    process may use); with a spinning process on every allowed CPU it falls below half a core."""
    if available_core_seconds() is None:
        assert not os.path.exists("/proc/stat") or not hasattr(os, "sched_getaffinity")
        pytest.skip("no /proc/stat or CPU affinity here")
    allowed = len(os.sched_getaffinity(0))
    if allowed > 8:
        pytest.skip(f"{allowed} CPUs: the busy-machine check spawns one spinning process per CPU")

    def rate(sleep_seconds):
        start, before = time.perf_counter(), available_core_seconds()
        time.sleep(sleep_seconds)
        return (available_core_seconds() - before) / (time.perf_counter() - start)

    assert 0.0 <= rate(0.5) <= allowed + 0.1
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(allowed)]
    try:
        time.sleep(0.3)
        busy = rate(1.0)  # we sleep: only idle time counts, and the hogs leave none
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert busy < 0.5, busy


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
                          work=lambda: pixels.get(trainer.iter, 1.0), core_seconds=lambda: 2 * sum(calls))
    trainer.register_hooks([hook])
    trainer.train(0, 6)
    (probe,) = hook.probes
    assert probe["times"] == {1: [1.0, 1.0], 2: [2.0, 2.0]} and probe["work"] == {1: [1.0, 1.0], 2: [4.0, 4.0]}
    assert probe["medians"] == {1: 1.0, 2: 0.5} and probe["chosen"] == 2
