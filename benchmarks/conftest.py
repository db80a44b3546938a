"""pytest configuration of the benchmark suites (benchmarks/test_bench_*.py).

Modes (see benchmarks/_common.py): BENCH_FAST=1 tiny sizes / one round (CI smoke mode),
BENCH_DEVICE=cuda the GPU subset. Every measurement stores in ``extra_info`` what the report
needs: ``key`` (stable id), ``bytes`` and ``elements`` per call, and the keys of the
baselines measured in the same run (``copy_ref``, ``mezo_ref``, ``fo_ref``).
"""
from __future__ import annotations

import functools
import os
import subprocess
import time

import pytest
import torch

from benchmarks import _common as C


def pytest_configure(config):
    for line in (
        "slow: longer end-to-end tests (still run in CI)",
        "gpu: needs a CUDA device (skipped without one)",
    ):
        config.addinivalue_line("markers", line)


def _git_commit() -> str:
    if os.environ.get("ZEROFLOW_COMMIT"):     # a device lease's copy of the tree carries a stale .git
        return os.environ["ZEROFLOW_COMMIT"]
    try:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    """Versions and the device, so the report can say where the numbers come from."""
    info = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "bench_device": C.DEVICE,
        "bench_fast": C.FAST,
        "zeroflow_commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    try:
        import zfkernels as zk

        info["zfkernels_backends"] = zk.available_backends(C.DEVICE)
        info["stream_version"] = zk.STREAM_VERSION
    except Exception as exc:  # noqa: BLE001
        info["zfkernels_backends"] = f"import failed: {exc}"
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
        props = torch.cuda.get_device_properties(0)
        info["cuda_memory_gib"] = round(props.total_memory / 2**30, 1)
    try:
        with open("/proc/loadavg") as f:
            info["loadavg_at_start"] = f.read().split()[:3]
    except OSError:
        pass
    machine_info["zeroflow"] = info


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


def run_bench_with(benchmark, fn, extra: dict, budget_s: float = 1.5, max_rounds: int = 20, mem: bool = False,
                   rounds: int | None = None, warmup: bool = True, back_to_back: int = 1):
    """The ``run_bench`` fixture's call, ``benchmark`` given: ``rounds`` fixes the round count
    (no probe call: for the slowest CPU cases); ``warmup`` runs one untimed call first (lazy
    state, Triton compilation, first-launch uploads); ``back_to_back``: calls of ``fn`` per
    timed round, with one sync after them, so that on a GPU each call's host work overlaps the
    kernel before it (the kernel suite: its rows are device bandwidth). The JSON's times are per
    round; ``calls_per_round`` in the record tells the report (benchmarks/report.py ``load``)
    what to divide them by. Returns the probe call's seconds (None without one)."""

    def call():
        for _ in range(back_to_back):
            fn()
        C.sync()

    if C.ON_GPU:  # GPU calls take milliseconds: keep the whole GPU subset within minutes
        budget_s = min(budget_s, 0.5)
    if warmup:
        call()
    probe = None
    if rounds is None:
        # A warm call sizes the rounds: one timed with the warm-up's compilation (a Triton
        # kernel's first call, seconds) read as a slow op and left one timed round, no warm-up.
        t0 = time.perf_counter()
        call()
        probe = time.perf_counter() - t0
    if mem:
        extra = {**extra, **C.measure_peak_extra(call)}
    if rounds is None:
        r = C.rounds_for(probe, budget_s=budget_s, max_rounds=max_rounds)
        n_rounds, n_warm = r.rounds, (r.warmup_rounds if probe < 0.2 else 0)
    else:
        n_rounds, n_warm = (1 if C.FAST else rounds), 0
    extra = {"device": C.DEVICE, "device_name": _device_name(), "fast": C.FAST, **extra}
    if back_to_back != 1:
        extra["calls_per_round"] = back_to_back
    benchmark.extra_info.update(extra)
    benchmark.pedantic(call, rounds=n_rounds, iterations=1, warmup_rounds=n_warm)
    return probe


@pytest.fixture
def run_bench(benchmark):
    """``run_bench(fn, extra, ...)``: time ``fn`` (synchronised on GPU) with a round count
    picked from one warm probe call, optionally measure its peak extra memory (``mem=True``,
    one extra untimed call), and attach ``extra`` to the record (see :func:`run_bench_with`)."""
    return functools.partial(run_bench_with, benchmark)


@functools.lru_cache(maxsize=None)
def _device_name() -> str:
    if C.ON_GPU and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        import cpuinfo  # py-cpuinfo, a pytest-benchmark dependency

        return cpuinfo.get_cpu_info().get("brand_raw", "cpu")
    except Exception:  # noqa: BLE001
        import platform

        return platform.processor() or "cpu"
