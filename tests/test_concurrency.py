"""Two optimizers (or two op callers) in two Python threads of one process: every backend
gives each the bits it gives alone (concurrency audit). Triton's interpreter patched
triton.language module-wide per launch, so a launch in one thread broke the other's."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

import zfkernels as zk
from conftest import backend_params, triton_package_or_skip
from zeroflow.optim import ZOFusedAdam, ZOFusedSGD

warnings.filterwarnings("ignore", message="zfkernels: the compiled")


def _run_in_threads(fns):
    errors, threads = [], []

    def wrap(fn):
        try:
            fn()
        except BaseException as e:     # noqa: BLE001 - reported by the test
            errors.append(e)
    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.mark.parametrize("backend_device", backend_params(reference_on_cpu=True))
def test_two_optimizers_stepped_in_two_threads_give_their_single_thread_bits(backend_device):
    backend, device = backend_device
    steps = 2 if backend == "triton" else 6

    def make(i):
        g = torch.Generator().manual_seed(i)
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model = model.to(device)
        x, y = torch.randn(32, 16, generator=g).to(device), torch.randint(0, 3, (32,), generator=g).to(device)
        cls = (ZOFusedAdam, ZOFusedSGD)[i]
        opt = cls(model.parameters(), lr=1e-2, zo_eps=1e-3, q=2, sparsity=0.3, history=0.2, seed=10 + i,
                  backend=backend)
        return model, lambda: [opt.step(lambda: F.cross_entropy(model(x), y)) for _ in range(steps)]

    alone = []
    for i in range(2):
        model, train = make(i)
        train()
        alone.append([p.detach().clone() for p in model.parameters()])
    pairs = [make(i) for i in range(2)]
    assert _run_in_threads([train for _, train in pairs]) == []
    for (model, _), ref in zip(pairs, alone):
        assert all(torch.equal(p, r) for p, r in zip(model.parameters(), ref))


def test_triton_interpreter_launches_from_two_threads():
    if not zk._triton_usable_on("cpu"):
        pytest.skip(zk._triton_module()[1] or "needs Triton's interpreter (TRITON_INTERPRET=1)")
    n = 40_000
    want = [torch.zeros(n) for _ in range(2)]
    for k, t in enumerate(want):
        for s in range(4):
            zk.perturb_([t], 100 * k + s, 1.0, backend="cpu")
    got = [torch.zeros(n) for _ in range(2)]

    def work(k):
        return lambda: [zk.perturb_([got[k]], 100 * k + s, 1.0, backend="triton") for s in range(4)]
    errors = _run_in_threads([work(0), work(1)])
    assert errors == []       # was InterpreterError("... Did you forget to add @triton.jit ? ...")
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_launch_scope_leaves_the_interpreter_lock_free_when_entering_the_device_fails(monkeypatch):
    """Interpreted launches on CUDA tensors take the lock, then enter the device: a device that
    cannot be entered must not leave the lock held (every later launch of every thread would
    wait forever)."""
    _common = triton_package_or_skip()._common

    def no_device(d):
        raise RuntimeError("no such device")

    monkeypatch.setattr(torch.cuda, "device", no_device)
    with pytest.raises(RuntimeError, match="no such device"):
        _common.launch_scope(torch.device("cuda", 1), True)
    assert _lock_free_in_another_thread()


def _lock_free_in_another_thread() -> bool:
    from zfkernels.triton import _common

    got = []

    def take():
        got.append(_common._INTERPRETER_LOCK.acquire(timeout=0.2))
        if got[-1]:
            _common._INTERPRETER_LOCK.release()
    t = threading.Thread(target=take)
    t.start()
    t.join()
    return got == [True]


@pytest.mark.parametrize("interp", [False, True])
def test_launch_scope_enters_the_tensors_cuda_device_and_holds_the_lock_when_interpreted(monkeypatch, interp):
    """A native launch (a GPU) enters the tensors' device; an interpreted one on CUDA tensors
    enters it too and holds the process-wide interpreter lock for its length; a CPU launch
    holds the lock when interpreted. Emulated: torch.cuda.device recorded."""
    import contextlib

    _common = triton_package_or_skip()._common

    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(torch.device(d))
        yield
    monkeypatch.setattr(torch.cuda, "device", device)
    with _common.launch_scope(torch.device("cuda", 1), interp):
        assert entered == [torch.device("cuda", 1)]
        assert _lock_free_in_another_thread() is (not interp)
    assert _lock_free_in_another_thread()
    with _common.launch_scope(torch.device("cpu"), interp):
        assert _lock_free_in_another_thread() is (not interp)
    with _common.launch_scope(None, interp):
        assert _lock_free_in_another_thread() is (not interp)
    assert entered == [torch.device("cuda", 1)]
