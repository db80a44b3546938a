"""The measurement code of the benchmark suites (benchmarks/test_bench_*.py, conftest.py) on
the CPU: each suite times what its name and the report claim (the baselines as faithful as
the recipes they stand for, warm-ups untimed and not counted into the round budget)."""
from __future__ import annotations

import pytest
import torch

from conftest import logged_loss_class


@pytest.mark.parametrize("maker", ["make_mezo_sgd", "make_mezo_adam"])
def test_mezo_style_step_reads_each_query_back_once(maker):
    """The optimizer-step suite's MeZO-style loop reads a query's two losses back once, after
    both forwards (MeZO's ``((loss1 - loss2) / (2 eps)).item()``), not once per forward."""
    from benchmarks import test_bench_optim_step as S

    log = []
    loss_cls = logged_loss_class(log)
    params = [torch.randn(8, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    first = params[0].reshape(-1)

    def closure():
        log.append("forward")
        return (first[0] * 0.5 + first[1] ** 2).as_subclass(loss_cls)

    before = [p.detach().clone() for p in params]
    step = getattr(S, maker)(params, closure, 2, "gaussian")
    step()
    assert log == ["forward", "forward", "read"] * 2
    assert any(not torch.equal(p.detach(), b) for p, b in zip(params, before))   # it did update


class _FakeBenchmark:
    """pytest-benchmark's fixture as run_bench uses it: extra_info, and pedantic's arguments."""

    def __init__(self):
        self.extra_info, self.pedantic_args = {}, None

    def pedantic(self, fn, rounds, iterations, warmup_rounds):
        self.pedantic_args = {"rounds": rounds, "iterations": iterations, "warmup_rounds": warmup_rounds}


@pytest.fixture
def fake_clock(monkeypatch):
    """benchmarks/conftest.py's time.perf_counter on a clock that only the calls advance."""
    import types

    from benchmarks import _common as C
    from benchmarks import conftest as BC

    now = [0.0]
    monkeypatch.setattr(BC, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(C, "FAST", False)
    monkeypatch.setattr(C, "ON_GPU", False)
    return now


def test_run_bench_sizes_its_rounds_on_a_warm_call(fake_clock):
    """A first call that compiles (5 s, a Triton kernel's first launch) and warm calls of 1 ms:
    the rounds are those of a 1 ms op (the budget's 15 and a warm-up round), not the one timed
    round of a 5 s op that sizing them on the compiling call gave."""
    from benchmarks import conftest as BC

    calls = []

    def fn():
        fake_clock[0] += 5.0 if not calls else 1e-3
        calls.append(1)

    bench = _FakeBenchmark()
    probe = BC.run_bench_with(bench, fn, {"key": "k"}, budget_s=1.0, max_rounds=15)
    assert probe == pytest.approx(1e-3)
    assert bench.pedantic_args == {"rounds": 15, "iterations": 1, "warmup_rounds": 1}
    assert len(calls) == 2 and bench.extra_info["key"] == "k"


def test_run_bench_fixed_rounds_make_no_probe_call(fake_clock):
    """Fixed rounds: the warm-up call only (warmup=False: none, as the distributed suite's
    step count with its rank-1 helper needs)."""
    from benchmarks import conftest as BC

    for warmup, n_calls in ((True, 1), (False, 0)):
        calls = []
        bench = _FakeBenchmark()
        probe = BC.run_bench_with(bench, lambda: calls.append(1), {}, rounds=3, warmup=warmup)
        assert probe is None and len(calls) == n_calls
        assert bench.pedantic_args == {"rounds": 3, "iterations": 1, "warmup_rounds": 0}


def test_run_bench_without_warmup_probes_once(fake_clock):
    """warmup=False with rounds sized by the probe: the probe call is the only call before the
    timed rounds (no untimed warm-up call added), and its time sizes them."""
    from benchmarks import conftest as BC

    calls = []

    def fn():
        fake_clock[0] += 0.1
        calls.append(1)

    bench = _FakeBenchmark()
    probe = BC.run_bench_with(bench, fn, {}, budget_s=1.0, max_rounds=15, warmup=False)
    assert probe == pytest.approx(0.1) and len(calls) == 1
    assert bench.pedantic_args == {"rounds": 10, "iterations": 1, "warmup_rounds": 1}


def test_run_bench_slow_warm_probe_gets_no_warmup_round(fake_clock):
    """A warm call of 0.5 s (at or over 0.2 s): two rounds in a 1 s budget and no warm-up round
    (the untimed warm-up call already ran)."""
    from benchmarks import conftest as BC

    def fn():
        fake_clock[0] += 0.5

    bench = _FakeBenchmark()
    BC.run_bench_with(bench, fn, {}, budget_s=1.0, max_rounds=15)
    assert bench.pedantic_args == {"rounds": 2, "iterations": 1, "warmup_rounds": 0}


def test_run_bench_fixed_rounds_in_fast_mode_run_one(fake_clock, monkeypatch):
    from benchmarks import _common as C
    from benchmarks import conftest as BC

    monkeypatch.setattr(C, "FAST", True)
    bench = _FakeBenchmark()
    BC.run_bench_with(bench, lambda: None, {}, rounds=3)
    assert bench.pedantic_args == {"rounds": 1, "iterations": 1, "warmup_rounds": 0}


def test_run_bench_back_to_back_calls_and_calls_per_round(fake_clock):
    """back_to_back=2: each call of the round runs fn twice and the record says
    calls_per_round=2 (the report divides by it); back_to_back=1 leaves the key out."""
    from benchmarks import conftest as BC

    for b2b, n_calls in ((2, 4), (1, 2)):
        calls = []

        def fn(calls=calls):
            fake_clock[0] += 1e-3
            calls.append(1)

        bench = _FakeBenchmark()
        BC.run_bench_with(bench, fn, {}, budget_s=1.0, max_rounds=15, back_to_back=b2b)
        assert len(calls) == n_calls               # the warm-up call and the probe call
        assert bench.extra_info.get("calls_per_round") == (b2b if b2b != 1 else None)


def test_run_bench_on_a_gpu_caps_the_budget_at_half_a_second(fake_clock, monkeypatch):
    from benchmarks import _common as C
    from benchmarks import conftest as BC

    monkeypatch.setattr(C, "ON_GPU", True)
    monkeypatch.setattr(C, "sync", lambda: None)
    monkeypatch.setattr(BC, "_device_name", lambda: "gpu")

    def fn():
        fake_clock[0] += 1e-3

    bench = _FakeBenchmark()
    BC.run_bench_with(bench, fn, {}, budget_s=1.5, max_rounds=10**6)
    assert bench.pedantic_args["rounds"] == 500


def test_run_bench_fixture_measures_no_memory_unless_asked(fake_clock):
    """The fixture is run_bench_with bound to the benchmark, defaults unchanged: a warm-up and a
    probe call, no memory-measuring call and no peak_extra_bytes in the record."""
    from benchmarks import conftest as BC

    calls = []
    bench = _FakeBenchmark()
    BC.run_bench.__wrapped__(bench)(lambda: calls.append(1), {"key": "k"})
    assert len(calls) == 2 and "peak_extra_bytes" not in bench.extra_info


def test_e2e_iteration_sizes_its_rounds_on_a_warm_step(fake_clock, monkeypatch):
    """The end-to-end suite sized its rounds on its first iteration (lazy state, and on a GPU
    cuBLAS / SDPA set-up: a second or more), leaving one timed round of an iteration that takes
    10 ms warm; the rounds now come from a warm iteration, and the record keeps its memory,
    state and forwards."""
    import functools
    import types

    pytest.importorskip("timm", reason="the end-to-end suite builds a timm ViT")
    from benchmarks import conftest as BC
    from benchmarks import test_bench_end_to_end as E

    for k, v in (("BENCH_E2E_MODEL", "tiny-test"), ("BENCH_E2E_BATCH", "2"), ("BENCH_E2E_IMG", "16")):
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(E, "time", types.SimpleNamespace(perf_counter=lambda: fake_clock[0]), raising=False)
    real, steps = E.train_step, []

    def train_step(opt, closure):
        fake_clock[0] += 5.0 if not steps else 0.01      # a cold first iteration, then 10 ms
        steps.append(1)
        return real(opt, closure)

    monkeypatch.setattr(E, "train_step", train_step)
    bench = _FakeBenchmark()
    E.test_e2e_iteration(functools.partial(BC.run_bench_with, bench), bench, "zo_sgd")
    assert bench.pedantic_args == {"rounds": 10, "iterations": 1, "warmup_rounds": 1}
    x = bench.extra_info
    assert x["forwards_per_step"] == 2 and x["state_bytes"] == 0
    assert x["peak_total_bytes"] == x["params_bytes"] + x["peak_extra_bytes"] and x["peak_extra_bytes"] > 0
    # a method with state (ZO-Adam: m and v): the state is counted once the iteration ran
    steps.clear()
    bench = _FakeBenchmark()
    E.test_e2e_iteration(functools.partial(BC.run_bench_with, bench), bench, "zo_adam")
    x = bench.extra_info
    assert x["state_bytes"] >= 2 * x["params_bytes"]
    assert x["peak_total_bytes"] == x["params_bytes"] + x["state_bytes"] + x["peak_extra_bytes"]


def test_llm_copy_runs_its_calls_back_to_back(monkeypatch):
    """The LLM suite's copy_ (the bandwidth of every roofline there) runs as the kernel suite's
    does on a GPU: KERNEL_BACK_TO_BACK calls per round, said in calls_per_round so the report
    divides by it; one call per round timed its launch and the sync's wake-up too."""
    import functools

    from benchmarks import _common as C
    from benchmarks import conftest as BC
    from benchmarks import test_bench_llm as L

    monkeypatch.setattr(C, "KERNEL_BACK_TO_BACK", 10)
    monkeypatch.setattr(L, "COPY_NUMEL", 1024)
    bench = _FakeBenchmark()
    calls = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, *a, **k: (calls.append(1),
                                                                           real_copy(self, src, *a, **k))[1])
    L.test_llm_copy_bandwidth(functools.partial(BC.run_bench_with, bench), bench, {"info": {"suite": "llm"}})
    assert bench.extra_info["calls_per_round"] == 10 and bench.extra_info["bytes"] == 2 * 1024 * 2
    assert len(calls) == 10          # the warm-up round (the fake benchmark times none)


def test_mezo_style_adam_writes_the_estimate_into_grad_without_a_zero_pass():
    """The MeZO-style ZO-Adam sets ``.grad = g z`` from the first query's z and adds the later
    queries' (the MeZO-family trainers' ``param.grad = projected_grad * z``, ``+=`` after): a
    zero-filled ``.grad`` first was one more pass over every parameter per step, charged to
    the baseline. The estimate is the same: the step moves theta as before."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from benchmarks import _common as C
    from benchmarks import test_bench_optim_step as S

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    def params():
        g = torch.Generator().manual_seed(3)
        return [torch.randn(8, 4, generator=g).requires_grad_(), torch.randn(5, generator=g).requires_grad_()]

    for q in (1, 3):
        ps = params()
        closure = C.trivial_closure(ps, grad=False)
        step = S.make_mezo_adam(ps, closure, q, "gaussian")
        step()                                   # Adam's lazy state (zero-filled m, v) first
        with Ops() as ops:
            step()
        zero_fills = [n for n in ops.names if n.split(".")[0] in ("zeros_like", "zeros", "zero_", "fill_")]
        assert not zero_fills, (q, zero_fills)
        # the same estimate as a zero-filled .grad plus every query's g z
        ref = params()
        rng, opt = __import__("random").Random(0), torch.optim.Adam(ref, lr=S.LR)
        ref_closure = C.trivial_closure(ref, grad=False)
        for _ in range(2):
            with torch.no_grad():
                seeds, gs = S._mezo_estimate(ref, ref_closure, q, "gaussian", rng)
                for p in ref:
                    p.grad = torch.zeros_like(p)
                for s, g in zip(seeds, gs):
                    torch.manual_seed(s)
                    for p in ref:
                        p.grad.add_(C.mezo_z(p, "gaussian"), alpha=g / q)
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(ps, ref)), q


def test_mezo_style_estimate_is_the_directional_derivative_along_z():
    """The optimizer-step suite's MeZO-style g is (L(theta + eps z) - L(theta - eps z)) / (2 eps):
    for a linear loss w . theta exactly w . z (Rademacher z, float64, so the difference is
    exact up to rounding), with its sign: a flipped g trains the baseline uphill."""
    import random

    from benchmarks import _common as C
    from benchmarks import test_bench_optim_step as S

    g0 = torch.Generator().manual_seed(5)
    params = [torch.randn(8, 4, generator=g0, dtype=torch.float64), torch.randn(5, generator=g0, dtype=torch.float64)]
    ws = [torch.randn(p.shape, generator=g0, dtype=torch.float64) for p in params]

    def closure():
        return sum((w * p).sum() for w, p in zip(ws, params))

    seeds, gs = S._mezo_estimate(params, closure, 2, "rademacher", random.Random(0))
    for s, g in zip(seeds, gs):
        torch.manual_seed(s)
        want = sum((w * C.mezo_z(p, "rademacher")).sum().item() for w, p in zip(ws, params))
        assert g == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_stop_signals_lets_an_error_through_and_puts_the_old_handler_back():
    """StopSignals turns a SIGTERM into a KeyboardInterrupt within it and names it; it swallows
    nothing (an error inside still raises) and puts the previous handler back on exit."""
    import signal

    from benchmarks._common import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError, match="inside"):
        with StopSignals():
            raise ValueError("inside")
    assert signal.getsignal(signal.SIGTERM) == before
    with pytest.raises(KeyboardInterrupt):
        with StopSignals() as s:
            assert s.exit_status == 130
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    assert (s.name, s.exit_status) == ("SIGTERM", 143) and signal.getsignal(signal.SIGTERM) == before
