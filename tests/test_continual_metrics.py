"""Metric formulas on hand-computed accuracy matrices; split logic."""
import os

import pytest

from zeroflow.continual import metrics as M
from zeroflow.continual.data import class_order, task_classes, task_sizes


def test_avg_last_fgt_hand_computed():
    # A[g][s]: accuracy on task g after stage s
    A = [[90.0, 80.0, 70.0],
         [None, 60.0, 50.0],
         [None, None, 40.0]]
    curve = [90.0, 75.0, 55.0]
    assert M.avg_accuracy(curve) == pytest.approx((90 + 75 + 55) / 3)
    assert M.last_accuracy(curve) == 55.0
    # task0: max(90, 80) - 70 = 20; task1: max(60) - 50 = 10 -> 15
    assert M.forgetting(A) == pytest.approx(15.0)
    s = M.summarize(curve, A)
    assert s == {"avg": pytest.approx(73.3333333), "last": 55.0, "fgt": pytest.approx(15.0)}


def test_fgt_uses_best_earlier_not_first():
    A = [[50.0, 90.0, 85.0, 60.0],
         [None, 40.0, 70.0, 70.0],
         [None, None, 30.0, 10.0],
         [None, None, None, 99.0]]
    # task0: 90-60=30, task1: 70-70=0, task2: 30-10=20 -> 50/3
    assert M.forgetting(A) == pytest.approx(50.0 / 3)


def test_fgt_is_pilots_a_task_ending_at_its_best_counts_zero_and_single_task():
    """The best accuracy includes the last stage (PILOT's Fgt, the study's numbers): backward
    transfer counts 0, not negative (it used to give -5 here, and 7.5 for PILOT's 10 below)."""
    assert M.forgetting([[80.0, 85.0], [None, 70.0]]) == 0.0
    assert M.forgetting([[90.0, 70.0, 95.0], [None, 80.0, 60.0], [None, None, 75.0]]) == pytest.approx(10.0)
    assert M.forgetting([[80.0]]) == 0.0
    with pytest.raises(ValueError):
        M.forgetting([[80.0, None], [None, 70.0]])


def test_fgt_matches_pilots_numpy_formula_on_random_matrices():
    """PILOT's trainer: np.mean((np.max(acctable, axis=1) - acctable[:, T-1])[:T-1]), with the
    stages before a task was learned left out (NaN here, None in our matrix)."""
    import numpy as np
    rng = np.random.default_rng(0)
    for T in range(2, 9):
        A = rng.uniform(0, 100, (T, T)).round(2)
        A[np.tril_indices(T, -1)] = np.nan                     # A[g][s] exists for s >= g only
        ours = M.forgetting([[None if np.isnan(v) else float(v) for v in row] for row in A])
        pilot = float(np.mean((np.nanmax(A, axis=1) - A[:, T - 1])[:T - 1]))
        assert ours == pytest.approx(pilot, abs=1e-9), T


def test_accuracy_from_predictions_per_task():
    import torch
    pred = torch.tensor([0, 1, 1, 2, 3, 0])
    tgt = torch.tensor([0, 1, 0, 2, 2, 3])
    overall, per = M.accuracy_from_predictions(pred, tgt, [[0, 1], [2, 3]])
    assert overall == pytest.approx(100 * 3 / 6)
    assert per == [pytest.approx(100 * 2 / 3), pytest.approx(100 * 1 / 3)]


def test_accuracy_from_predictions_is_exact_from_counts():
    """100 * correct / n in double, exactly as the counts give it (a float32 mean stored 86 of
    89 as 96.6292142868, off in the 8th digit, and Avg / Last / Fgt with it)."""
    import torch
    tgt = torch.tensor([0] * 89 + [1] * 7)
    pred = tgt.clone()
    pred[:3] = 1                                  # 86 of task 0's 89 right, all 7 of task 1's
    overall, per = M.accuracy_from_predictions(pred, tgt, [[0], [1]])
    assert per == [100.0 * 86 / 89, 100.0]
    assert overall == 100.0 * 93 / 96


def test_the_overall_accuracy_is_exact_from_counts_too():
    """The overall accuracy (the 'Last' of a run's final task, every column's input) is 100 *
    correct / n in double as the per-task ones are: a float32 mean stored 86 of 89 as
    96.6292142868, where the counts give 96.6292134831."""
    import torch
    tgt = torch.tensor([0] * 50 + [1] * 39)
    pred = tgt.clone()
    pred[:3] = 1                                  # 86 of 89 right in all
    overall, _ = M.accuracy_from_predictions(pred, tgt, [[0], [1]])
    assert overall == 100.0 * 86 / 89


def test_class_order_seed_1993_known_prefixes():
    assert class_order(100)[:5] == [68, 56, 78, 8, 23]
    assert class_order(200)[:4] == [168, 136, 51, 9]
    assert class_order(300)[:4] == [169, 221, 146, 296]
    assert class_order(100) == class_order(100)
    assert sorted(class_order(100)) == list(range(100))


@pytest.mark.parametrize("n,init,inc,sizes", [(100, 10, 10, [10] * 10), (200, 20, 20, [20] * 10),
                                              (10, 4, 2, [4, 2, 2, 2]), (10, 4, 4, [4, 4, 2])])
def test_tasks_disjoint_and_covering(n, init, inc, sizes):
    assert task_sizes(n, init, inc) == sizes
    tasks = task_classes(n, init, inc)
    flat = [c for t in tasks for c in t]
    assert sorted(flat) == list(range(n)) and len(flat) == len(set(flat))
    assert [len(t) for t in tasks] == sizes


def test_bad_split_raises():
    from zeroflow.continual.errors import ZeroflowError
    with pytest.raises(ZeroflowError):
        task_sizes(10, 11, 1)
    with pytest.raises(ZeroflowError):
        task_sizes(10, 0, 2)


class _FakeCudaPeak:
    """torch.cuda's peak counter: ``alloc(n)`` reaches n bytes in use (then frees them)."""

    def __init__(self):
        self.peak = 0

    def alloc(self, n):
        self.peak = max(self.peak, n)

    def reset(self, device=None):
        self.peak = 0


def test_the_training_section_peak_excludes_what_comes_after_and_the_stage_peak_keeps_all(monkeypatch):
    """metrics.json's Table 2 memory was the peak of the whole task (training, then the
    prototype and test passes at eval_batch_size, which set it for ZO runs): the training
    loop now has its own section, and the task's peak still covers what came before it."""
    import torch

    from zeroflow.continual.metrics import MemoryMeter

    fake = _FakeCudaPeak()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: fake.peak)
    mem = MemoryMeter(torch.device("cuda", 0))
    mem.reset()
    fake.alloc(700)                  # building the task's adapters and data, before training
    with mem.section() as training:
        fake.alloc(300)              # the ZO steps
    fake.alloc(900)                  # prototypes and tests at eval_batch_size
    assert training["peak"] == 300
    assert mem.peak() == 900
    mem.reset()
    fake.alloc(500)
    with mem.section() as training:
        fake.alloc(200)
    assert (training["peak"], mem.peak()) == (200, 500)      # the spike before the section is kept


def test_seconds_per_iteration_is_the_time_in_the_optimizer_steps_only():
    """docs/continual.md: seconds_per_iteration = wall time inside optimizer steps / steps
    (Table 2's s/iter). Dividing the tasks' whole time (prototypes and tests included) by the
    steps gives 10 s / 4 here instead of 2 s / 4."""
    from types import SimpleNamespace

    from zeroflow.continual import runner
    from zeroflow.continual.learners import Counters
    counters = Counters(train_forward_passes=8, iterations=4, train_seconds=2.0)
    results = runner._Results(matrix=[[50.0]], counters=counters, curve=[50.0], completed=1, peak=5,
                              task_stats=[{"seconds": 10.0, "train_peak_memory_bytes": 1}])
    data = SimpleNamespace(tasks=[[0, 1]], order=[0, 1], class_names=["a", "b"])
    m = runner._metrics(results, data, {"precision": "fp32"}, run_dir="r", world=1, device="cpu",
                        mem=SimpleNamespace(kind="cpu_peak_rss"), setup_seconds=0.0, record_dir=None)
    assert m["seconds_per_iteration"] == pytest.approx(2.0 / 4)
    assert m["seconds"] == 10.0


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc")
def test_cpu_peak_memory_is_in_bytes():
    """ru_maxrss is in KiB on Linux: read as bytes, CPU runs reported a 1024 times smaller peak
    (docs/continual.md: peak_memory_bytes on CPU is the process's peak RSS)."""
    with open("/proc/self/status") as f:
        hwm_kib = int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
    assert M.peak_rss_bytes() == pytest.approx(hwm_kib * 1024, rel=0.05)


@pytest.mark.parametrize("device", ["cuda:1", "cuda"])
def test_timer_and_memory_meter_synchronize_the_runs_cuda_device(monkeypatch, device):
    """--device cuda:1 in a single process never makes cuda:1 the current device (only
    torchrun's set_device does): the Timer's synchronize() without a device waited for cuda:0,
    so the runtime column timed kernel launches, not kernels. Both meters synchronize the run's
    device (emulated: torch.cuda's calls recorded)."""
    import torch

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    M.Timer(torch.device(device)).now()
    M.MemoryMeter(torch.device(device)).peak()
    assert synced == [torch.device(device)] * 2
