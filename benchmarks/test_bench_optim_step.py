"""Optimizer-step suite: the optimizer's own cost per step, with a trivial closure (ZO: one
scalar read, forwards cost ~0; FO: one element of every tensor so backward fills every
.grad), for a ViT-B-sized parameter list (86M in 152 tensors) and an EASE adapter-sized
list (1.2M in 192 tensors), q in {1, 4, 16}:

* ``zeroflow``  - ``zeroflow.optim.create("zo_sgd"|"zo_adam", ...)`` + ``train_step``
                  (fused kernels: z regenerated in-kernel, restore fused into the update);
* ``mezo``      - the MeZO reference loop: per query perturb +eps, -2eps, +eps (restore) and
                  one update pass, z regenerated each time with manual_seed + normal/randint
                  (4 passes per query); ZO-Adam: the estimate materialised in ``.grad`` then
                  ``torch.optim.Adam``;
* ``fo``        - ``loss.backward()`` (grads of every parameter) + ``torch.optim.Adam`` / SGD.

Peak extra memory per step (beyond params and optimizer state, measured at step 2): on CPU
a TorchDispatchMode allocation counter (plus the RSS high-water delta), on CUDA
``max_memory_allocated``. It does not depend on q; it is measured at q = 1.

On this 2-core CPU the 86M list runs one timed round per case and, by default, the subset in
``_CPU_86M_DEFAULT`` (MeZO-style steps take 5-30 s there); ``BENCH_LONG=1`` runs every q.
"""
from __future__ import annotations

import random

import pytest
import torch
import zfkernels
from zeroflow.optim import create, train_step

from benchmarks import _common as C

LR = 1e-6
EPS = 1e-3


def _qs():
    return [1, 2] if C.FAST else [1, 4, 16]


def _big_cpu(pset: str) -> bool:
    return not C.FAST and not C.ON_GPU and pset == "vit_b_86m"


def _rounds(pset: str):
    """Fixed round counts for the slow CPU cases (86M): one timed round."""
    return 1 if _big_cpu(pset) else None


def _warmup(pset: str, q: int, opt_kind: str) -> bool:
    """An untimed first step is needed where state is allocated lazily (Adam moments) or
    memory is measured (q = 1); the stateless SGD steps on the 86M CPU list skip it."""
    return not (_big_cpu(pset) and opt_kind == "sgd" and q > 1)


# The 86M list on this 2-core CPU: MeZO-style steps take 5-30 s each (4 regenerations of z per
# query), so `make bench` measures this subset and BENCH_LONG=1 the rest.
_CPU_86M_DEFAULT = {("sgd", "zeroflow"): (1, 4, 16), ("sgd", "mezo"): (1, 4),
                    ("adam", "zeroflow"): (1, 4), ("adam", "mezo"): (1,)}


def _skip_slow(pset: str, q: int, impl: str, opt_kind: str = "sgd"):
    if _big_cpu(pset) and not C.LONG and q not in _CPU_86M_DEFAULT[(opt_kind, impl)]:
        pytest.skip(f"86M list on CPU, {impl} zo_{opt_kind} q={q}: minutes per step on 2 cores; "
                    "BENCH_LONG=1 runs it")


def _mezo_estimate(params, closure, q, dist, rng):
    """MeZO's zo_step per query: the two losses stay on the device until both forwards are
    issued and are read back once, ``((l1 - l2) / (2 eps)).item()`` (a read after each forward
    would wait for the first perturbation before issuing the second's launches)."""
    seeds, gs = [], []
    for _ in range(q):
        s = rng.randrange(1_000_000_000)
        C.mezo_perturb(params, s, EPS, dist)
        l1 = closure()
        C.mezo_perturb(params, s, -2 * EPS, dist)
        l2 = closure()
        gs.append(((l1 - l2) / (2 * EPS)).item())
        C.mezo_perturb(params, s, EPS, dist)
        seeds.append(s)
    return seeds, gs


def make_mezo_sgd(params, closure, q, dist):
    rng = random.Random(0)

    @torch.no_grad()
    def step():
        seeds, gs = _mezo_estimate(params, closure, q, dist, rng)
        for s, g in zip(seeds, gs):  # MeZO zo_update, per query: theta -= lr * g * z
            torch.manual_seed(s)
            for p in params:
                p.data.add_(C.mezo_z(p, dist), alpha=-LR * g / q)

    return step


def make_mezo_adam(params, closure, q, dist):
    rng = random.Random(0)
    opt = torch.optim.Adam(params, lr=LR)

    def step():
        with torch.no_grad():
            seeds, gs = _mezo_estimate(params, closure, q, dist, rng)
            # .grad = g z from the first query's z, += for the others (the MeZO-family trainers'
            # param.grad = projected_grad * z): no zero-filled .grad, a pass MeZO does not make
            for j, (s, g) in enumerate(zip(seeds, gs)):
                torch.manual_seed(s)
                for p in params:
                    if j == 0:
                        p.grad = C.mezo_z(p, dist).mul_(g / q)
                    else:
                        p.grad.add_(C.mezo_z(p, dist), alpha=g / q)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_zeroflow(name, params, closure, q, dist):
    opt = create(name, params, lr=LR, q=q, perturbation=dist, zo_eps=EPS, backend="auto", seed=1234)

    def step():
        train_step(opt, closure)

    return step


def make_fo(name, params, closure):
    opt = torch.optim.Adam(params, lr=LR) if name == "fo_adam" else torch.optim.SGD(params, lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = closure()
        loss.backward()
        opt.step()

    return step


def _state_bytes(opt_kind: str, n: int, s: int) -> int:
    return 2 * n * s if opt_kind == "adam" else 0


def _fo_key(pset, opt_kind):
    return C.key("optim", "fo", "fo_" + opt_kind, C.DEVICE, pset)


def _mezo_key(pset, opt_kind, dist, q):
    return C.key("optim", "mezo", opt_kind, C.DEVICE, pset, dist, q)


def _params(pset):
    if C.ON_GPU and not torch.cuda.is_available():
        pytest.skip(C.NO_CUDA)
    return C.make_params(C.param_sets()[pset](), requires_grad=True)


def _cases():
    for pset in C.param_sets():
        for opt_kind in ("sgd", "adam"):
            for dist in C.DISTS:
                for q in _qs():
                    for impl in ("zeroflow", "mezo"):
                        yield pytest.param(pset, opt_kind, dist, q, impl,
                                           id=f"{pset}-zo_{opt_kind}-{dist}-q{q}-{impl}")


@pytest.mark.parametrize("pset,opt_kind,dist,q,impl", list(_cases()))
def test_zo_step(run_bench, benchmark, pset, opt_kind, dist, q, impl):
    _skip_slow(pset, q, impl, opt_kind)
    params = _params(pset)
    closure = C.trivial_closure(params, grad=False)
    if impl == "zeroflow":
        step = make_zeroflow("zo_" + opt_kind, params, closure, q, dist)
    elif opt_kind == "sgd":
        step = make_mezo_sgd(params, closure, q, dist)
    else:
        step = make_mezo_adam(params, closure, q, dist)
    n = C.numel_of(params)
    s = params[0].element_size()
    benchmark.group = f"optim {pset} zo_{opt_kind} {dist} q={q} {C.DEVICE}"
    extra = {
        "suite": "optim", "key": C.key("optim", impl, opt_kind, C.DEVICE, pset, dist, q), "kind": impl,
        "impl": impl, "opt": "zo_" + opt_kind, "param_set": pset, "dist": dist, "q": q, "numel": n,
        "n_tensors": len(params), "elements": n, "params_bytes": n * s,
        "state_bytes": _state_bytes(opt_kind, n, s), "fo_ref": _fo_key(pset, "adam"),
    }
    if impl == "zeroflow":
        extra["mezo_ref"] = _mezo_key(pset, opt_kind, dist, q)
        extra["backend"] = zfkernels.resolve_backend("auto", C.device())
    run_bench(step, extra, budget_s=1.5, max_rounds=5, mem=(q == _qs()[0]), rounds=_rounds(pset),
              warmup=_warmup(pset, q, opt_kind))


@pytest.mark.parametrize("pset", list(C.param_sets()))
@pytest.mark.parametrize("name", ["fo_sgd", "fo_adam"])
def test_fo_step(run_bench, benchmark, pset, name):
    params = _params(pset)
    closure = C.trivial_closure(params, grad=True)
    step = make_fo(name, params, closure)
    n = C.numel_of(params)
    s = params[0].element_size()
    kind = name[3:]
    benchmark.group = f"optim {pset} fo {C.DEVICE}"
    extra = {
        "suite": "optim", "key": _fo_key(pset, kind), "kind": "fo", "impl": "fo", "opt": name,
        "param_set": pset, "dist": "-", "q": 0, "numel": n, "n_tensors": len(params), "elements": n,
        "params_bytes": n * s, "state_bytes": _state_bytes(kind, n, s),
    }
    run_bench(step, extra, budget_s=3.0, max_rounds=10, mem=True, rounds=_rounds(pset))


# ---------------------------------------------------------------------------- host work per step
# The ViT-B list's layout (152 tensors, the order and count of vit_b_shapes) with 1-4 elements
# per tensor: the kernels cost ~nothing, so a step's time is its host work (Python, the ops'
# argument handling, launches) plus the two .item() synchronisations of the closure. The
# baseline, in the same run, is one minimal multi-tensor op over the same list
# (torch._foreach_add_: one launch on CUDA, a per-tensor loop on CPU). Issue 13 item 2.
def _host_params():
    shapes = C.vit_b_layout_tiny_shapes()[:2 if C.FAST else None]
    if C.ON_GPU and not torch.cuda.is_available():
        pytest.skip(C.NO_CUDA)
    return [torch.full(s, 0.01 * k, device=C.device()).requires_grad_() for k, s in enumerate(shapes)]


_HOST_SET = "vit_b_86m_layout_tiny"     # gpu_check.sh selects these tests with -k "... or host"


def _host_key(what):
    return C.key("optim_host", what, C.DEVICE, _HOST_SET)


def test_host_foreach_baseline(run_bench, benchmark):
    params = [p.detach() for p in _host_params()]
    benchmark.group = f"optim host {C.DEVICE}"
    run_bench(lambda: torch._foreach_add_(params, 1e-30),
              {"suite": "optim_host", "key": _host_key("foreach_add_"), "kind": "foreach", "impl": "foreach_add_",
               "param_set": _HOST_SET, "n_tensors": len(params)}, budget_s=1.5, max_rounds=200)


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize("dist", C.DISTS)
def test_host_zo_step(run_bench, benchmark, opt_kind, dist):
    """One ZO step (q = 1, the suite's trivial closure) on the tiny ViT-B-layout list; the
    report's ratio: ``t / t(host_ref)``, how many minimal multi-tensor ops a step costs."""
    params = _host_params()
    closure = C.trivial_closure(params, grad=False)
    opt = create("zo_" + opt_kind, params, lr=LR, q=1, perturbation=dist, zo_eps=EPS, backend="auto", seed=1234)
    benchmark.group = f"optim host {C.DEVICE}"
    extra = {"suite": "optim_host", "key": _host_key(f"zo_{opt_kind}|{dist}"), "kind": "zeroflow", "impl": "zeroflow",
             "opt": "zo_" + opt_kind, "param_set": _HOST_SET, "dist": dist, "q": 1, "n_tensors": len(params),
             "host_ref": _host_key("foreach_add_"), "backend": zfkernels.resolve_backend("auto", C.device())}
    run_bench(lambda: opt.step(closure), extra, budget_s=1.5, max_rounds=200)
