"""What the Python face of zfkernels promises besides the bits of the kernels: which backend
"auto" and the other names pick and when they refuse (README, zfkernels/__init__.py), what
the loader reports (zfkernels/_compiled.py), that every keyword of the face reaches its own
argument of the op, the face's own argument checks (docs/kernel-ops.md "Errors"), and the
host-side stream helpers (docs/perturbation-stream.md §2, §8).

Found by mutation testing of zfkernels/{__init__,opspec,_compiled,stream}.py: each test here
fails on a one-line change of those files that the rest of the suite let through. Fast and
device-independent: the reference and the compiled CPU op run the kernels, the rest is
monkeypatched (no GPU, no Triton kernel launched).
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys
import types
import warnings

import numpy as np
import pytest
import torch

import zfkernels as zk
from zfkernels import _compiled, opspec, reference
from zfkernels import stream as S
from zfkernels._sources import digest

# The backends that run the kernels here quickly: the reference, and the compiled CPU op.
RUNNING = [pytest.param("torch", id="torch"),
           pytest.param("cpu", id="cpu", marks=() if _compiled.cpu_available() else pytest.mark.skip(
               reason=f"the compiled CPU kernels do not load: {_compiled._errors.get('cpu')}"))]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _assert_same_bits(got, want, what):
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and torch.equal(_bits(g), _bits(w)), f"{what}: tensor {k} differs"


@pytest.fixture
def fresh_warnings(monkeypatch):
    """An empty record of the face's warn-once keys (a warning given by an earlier test stays
    given for the process)."""
    monkeypatch.setattr(zk, "_warned", set())


# ======================================================================================
# Backend selection: "auto", the explicit names, available_backends()
# ======================================================================================
CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")   # devices, no tensors


def test_auto_picks_the_compiled_op_of_the_tensors_device(monkeypatch, fresh_warnings):
    monkeypatch.setattr(_compiled, "cpu_available", lambda: True)
    monkeypatch.setattr(_compiled, "cuda_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert zk.resolve_backend("auto", CPU) == "cpu"
        assert zk.resolve_backend("auto", CUDA) == "cuda"


def test_auto_without_the_compiled_cpu_op_runs_the_reference_and_warns_once(monkeypatch, fresh_warnings):
    """README: a missing compiled backend is reported once, with the build command. On CPU
    tensors the fallback is the reference, never Triton's interpreter (even where Triton
    would run there)."""
    monkeypatch.setattr(_compiled, "cpu_available", lambda: False)
    monkeypatch.setattr(zk, "_triton_usable_on", lambda device_type: True)
    with pytest.warns(RuntimeWarning, match="the compiled cpu backend is missing") as record:
        assert zk.resolve_backend("auto", CPU) == "torch"
    (w,) = [x for x in record if "zfkernels" in str(x.message)]
    assert "using backend='torch' instead" in str(w.message) and _compiled.BUILD_COMMAND in str(w.message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # the second call: no warning
        assert zk.resolve_backend("auto", CPU) == "torch"


@pytest.mark.parametrize("triton_usable,fallback", [(True, "triton"), (False, "torch")])
def test_auto_without_the_compiled_cuda_op_runs_triton_else_the_reference(monkeypatch, fresh_warnings,
                                                                          triton_usable, fallback):
    monkeypatch.setattr(_compiled, "cuda_available", lambda: False)
    monkeypatch.setattr(zk, "_triton_usable_on", lambda device_type: triton_usable and device_type == "cuda")
    with pytest.warns(RuntimeWarning, match=f"compiled cuda backend is missing .*using backend='{fallback}'"):
        assert zk.resolve_backend("auto", CUDA) == fallback


def test_auto_on_a_device_without_compiled_ops_runs_the_reference_silently(fresh_warnings):
    """An MPS (or XPU, ...) tensor: no compiled op is built for it; the reference runs on any
    device torch supports. Nothing is missing, so nothing to warn about."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert zk.resolve_backend("auto", MPS) == "torch"
        assert zk.resolve_backend("auto", torch.device("xpu")) == "torch"


def test_an_explicit_compiled_backend_refuses_another_device_type_first():
    """The device mismatch is named (with the fix), whether or not that backend was built."""
    for backend, device in (("cuda", CPU), ("cpu", MPS), ("cpu", CUDA)):
        with pytest.raises(ValueError, match=f"backend='{backend}' cannot run tensors on device {device.type}"):
            zk.resolve_backend(backend, device)
    # through the face, with a single tensor as with several
    with pytest.raises(ValueError, match="cannot run tensors on device cpu"):
        zk.perturb_([torch.zeros(3)], 1, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="cannot run tensors on device cpu"):
        zk.perturbation(1, 8, backend="cuda")
    with pytest.raises(ValueError, match="backend='bogus'"):
        zk.perturbation(1, 8, backend="bogus")


def test_an_explicit_compiled_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.setattr(_compiled, "cpu_available", lambda: False)
    monkeypatch.setattr(_compiled, "missing_reason", lambda backend: f"<why {backend}>")
    with pytest.raises(RuntimeError, match="zfkernels backend 'cpu' is not available: <why cpu>"):
        zk.resolve_backend("cpu", CPU)
    # built, but no GPU: cuda_built() is not enough
    monkeypatch.setattr(_compiled, "cuda_built", lambda: True)
    monkeypatch.setattr(_compiled, "cuda_available", lambda: False)
    with pytest.raises(RuntimeError, match="zfkernels backend 'cuda' is not available: <why cuda>"):
        zk.resolve_backend("cuda", CUDA)


def test_backend_triton_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(zk, "_triton_module", lambda: (None, "Triton kernels unavailable (X); pip install triton"))
    with pytest.raises(RuntimeError, match=r"Triton kernels unavailable \(X\); pip install triton"):
        zk.resolve_backend("triton", CUDA)
    monkeypatch.undo()
    if zk._triton_module()[0] is None:
        pytest.skip(zk._triton_module()[1])
    monkeypatch.setattr(zk, "_triton_interprets", lambda: False)    # CPU tensors need the interpreter
    for device in (CPU, MPS):
        with pytest.raises(RuntimeError, match=f"backend='triton' needs CUDA tensors .*got device {device.type}"):
            zk.resolve_backend("triton", device)


def test_triton_under_the_interpreter_is_not_picked_for_cuda_tensors(monkeypatch, fresh_warnings):
    """Triton's interpreter copies a launch's tensor arguments to the host, not the tensors the
    kernels reach through the pointer table: on CUDA tensors it read device addresses on the
    host. Under TRITON_INTERPRET=1, "auto" without the compiled cuda op runs the reference on
    CUDA tensors, and backend="triton" refuses them, saying what to change."""
    if zk._triton_module()[0] is None:
        pytest.skip(zk._triton_module()[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_compiled, "cuda_available", lambda: False)
    monkeypatch.setattr(zk, "_triton_interprets", lambda: True)
    assert not zk._triton_usable_on("cuda") and zk._triton_usable_on("cpu")
    assert "triton" not in zk.available_backends("cuda")
    with pytest.warns(RuntimeWarning, match="compiled cuda backend is missing .*using backend='torch'"):
        assert zk.resolve_backend("auto", CUDA) == "torch"
    with pytest.raises(RuntimeError, match="cannot run CUDA tensors under TRITON_INTERPRET=1.*unset TRITON_INTERPRET"):
        zk.resolve_backend("triton", CUDA)
    monkeypatch.setattr(zk, "_triton_interprets", lambda: False)      # compiled Triton: CUDA tensors are its own
    assert zk._triton_usable_on("cuda") and zk.resolve_backend("triton", CUDA) == "triton"


@pytest.mark.parametrize("name", ["auto", "Torch", "trition", ""])
def test_call_op_refuses_a_name_that_is_no_concrete_backend(name):
    """call_op takes what resolve_backend returns: "auto" or a misspelt name ran the slow
    reference without a word. Refused before anything is written."""
    p = torch.zeros(4)
    with pytest.raises(ValueError, match=rf"call_op: backend={name!r} is not one of .*resolve_backend"):
        zk.call_op(name, "perturb_", params=[p], tensor_ids=[0], seed=1, scale=1.0)
    assert torch.equal(p, torch.zeros(4))


_TRITON_ON_CPU = """
import os, sys, torch
{before}
import zfkernels as zk
{after}
p = torch.zeros(5)
zk.perturb_([p], 1, 1.0, backend="triton")
q = torch.zeros(5)
zk.perturb_([q], 1, 1.0, backend="torch")
assert "triton" in zk.available_backends("cpu") and torch.equal(p, q), (zk.available_backends("cpu"), p, q)
"""


@pytest.mark.parametrize("before, after", [
    # Triton reads TRITON_INTERPRET as a bool ("true", "on", "yes" too): the face took only "1"
    ('os.environ["TRITON_INTERPRET"] = "true"', ""),
    # the interpreter is chosen when zfkernels.triton is imported: unset later, it still runs
    ('os.environ["TRITON_INTERPRET"] = "1"', 'import zfkernels.triton\ndel os.environ["TRITON_INTERPRET"]'),
], ids=["true", "unset-after-import"])
def test_backend_triton_on_cpu_follows_the_interpreter_triton_chose(before, after):
    if zk._triton_module()[0] is None:
        pytest.skip(zk._triton_module()[1])
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "python"), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _TRITON_ON_CPU.format(before=before, after=after)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_philox_face_names_counters_that_are_no_tensor():
    # a list of rows raised AttributeError: 'list' object has no attribute 'dtype'
    with pytest.raises(TypeError, match="counters must be an integer tensor of shape \\[N, 4\\], got list"):
        zk.philox4x32_10([[1, 2, 3, 4]], (0, 0))


def test_resolve_backend_takes_a_device_name_as_available_backends_does():
    # resolve_backend("auto", "cpu") raised AttributeError: 'str' object has no attribute 'type'
    assert zk.resolve_backend("auto", "cpu") == zk.resolve_backend("auto", CPU)
    assert zk.resolve_backend("torch", "meta") == "torch"
    with pytest.raises(ValueError, match="cannot run tensors on device cpu"):
        zk.resolve_backend("cuda", "cpu")


def test_available_backends_lists_what_runs_here(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_compiled, "cpu_available", lambda: True)
    monkeypatch.setattr(_compiled, "cuda_built", lambda: True)        # built, but no GPU
    monkeypatch.setattr(_compiled, "cuda_available", lambda: False)
    monkeypatch.setattr(zk, "_triton_interprets", lambda: False)
    assert zk.available_backends("cuda") == ["torch"]
    assert zk.available_backends("cpu") == ["cpu", "torch"]
    assert zk.available_backends() == ["cpu", "torch"]
    assert zk.available_backends("mps") == ["torch"]
    if zk._triton_module()[0] is not None:            # Triton on CPU tensors: its interpreter only
        monkeypatch.setattr(zk, "_triton_interprets", lambda: True)
        assert zk.available_backends("cpu") == ["cpu", "triton", "torch"]
        assert zk.available_backends() == ["cpu", "triton", "torch"]
        assert zk.available_backends("mps") == ["torch"]
    monkeypatch.setattr(_compiled, "cpu_available", lambda: False)
    monkeypatch.setattr(_compiled, "cuda_available", lambda: True)
    assert zk.available_backends("cpu")[0] != "cpu" and zk.available_backends("cpu")[-1] == "torch"
    assert "cuda" in zk.available_backends() and zk.available_backends("cuda")[0] == "cuda"
    assert "cuda" not in zk.available_backends("cpu")


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton", "torch"])
def test_call_op_runs_the_named_backends_own_function(monkeypatch, backend):
    """call_op("cuda", ...) is the registered op (its CUDA kernel), call_op("triton", ...) the
    Triton function: routed to the reference instead, every parity test of that backend would
    compare the reference with itself and pass."""
    calls = []

    def spy(name):
        return lambda *args: calls.append(name) or name

    monkeypatch.setattr(torch.ops, "zfkernels", types.SimpleNamespace(philox4x32_10=spy("registered op")))
    monkeypatch.setattr(zk, "_triton_module", lambda: (types.SimpleNamespace(philox4x32_10=spy("triton")), ""))
    monkeypatch.setattr(reference, "philox4x32_10", spy("reference"))
    got = zk.call_op(backend, "philox4x32_10", counters=torch.zeros(1, 4, dtype=torch.int64), key0=1, key1=2)
    want = {"cpu": "registered op", "cuda": "registered op", "triton": "triton", "torch": "reference"}[backend]
    assert got == want and calls == [want]


# ======================================================================================
# The loader: what is missing, and builds older than their sources
# ======================================================================================
def test_loader_reasons_name_the_error_and_the_fix(monkeypatch):
    monkeypatch.setitem(_compiled._errors, "cpu", "ImportError: no _C here")
    assert not _compiled.cpu_available()
    reason = _compiled.missing_reason("cpu")
    assert "zfkernels compiled cpu extension not importable (ImportError: no _C here)" in reason
    assert reason.endswith(f"build it with: {_compiled.BUILD_COMMAND}")
    assert "ZEROFLOW_BUILD_CUDA" not in reason and "undefined symbol" not in reason

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(_compiled._errors, "cuda", "ImportError: undefined symbol: _ZN3c10")
    assert not _compiled.cuda_built() and not _compiled.cuda_available()
    reason = _compiled.missing_reason("cuda")
    assert "ZEROFLOW_BUILD_CUDA=1 makes its absence a build error" in reason
    assert f"built against another torch than the running {torch.__version__}" in reason
    # the fix is the build command (an editable install rebuilds in place): a non-editable
    # reinstall left the checkout's old binaries, which a run from the checkout imports first
    assert reason.endswith(f"build it with: {_compiled.BUILD_COMMAND}") and "--force-reinstall" not in reason

    monkeypatch.delitem(_compiled._errors, "cpu")
    monkeypatch.delitem(_compiled._errors, "cuda")
    assert _compiled.cpu_available() and _compiled.cuda_built() and _compiled.cuda_available()
    assert _compiled.missing_reason("cuda").startswith("available")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)         # built, no GPU
    assert _compiled.cuda_built() and not _compiled.cuda_available()
    assert "built but torch.cuda.is_available() is False" in _compiled.missing_reason("cuda")


def test_loader_without_any_built_extension(tmp_path, monkeypatch):
    """zfkernels/_compiled.py imported where no extension was built (a package of its own,
    here without the .so files): nothing fails at import, both backends say why, and the CUDA
    one names the missing op schema of _C as its cause."""
    pkg = tmp_path / "zf_nobuild"
    pkg.mkdir()
    for name in ("_compiled.py", "_sources.py"):
        shutil.copy(os.path.join(os.path.dirname(_compiled.__file__), name), pkg / name)
    fake = types.ModuleType("zf_nobuild")
    fake.__path__ = [str(pkg)]
    monkeypatch.setitem(sys.modules, "zf_nobuild", fake)
    try:
        loader = importlib.import_module("zf_nobuild._compiled")
    finally:
        for name in ("zf_nobuild._compiled", "zf_nobuild._sources"):
            sys.modules.pop(name, None)
    assert not loader.cpu_available() and not loader.cuda_built() and not loader.cuda_available()
    assert loader._errors["cpu"].startswith("ModuleNotFoundError: ")
    assert loader._errors["cuda"] == f"zfkernels._C (the op schema) is missing: {loader._errors['cpu']}"
    assert loader.stale() == {}                      # no csrc/ beside this package


def test_stale_judges_only_the_extensions_that_are_loaded(tmp_path, monkeypatch):
    """A CPU-only build (no _C_cuda loaded) is judged by _C alone; an extension that carries
    no digest (built before digests existed) is stale, not fresh."""
    copy = tmp_path / "csrc"
    shutil.copytree(_compiled.CSRC, copy)
    header = copy / "philox.h"
    header.write_bytes(header.read_bytes() + b"\n")
    monkeypatch.delitem(sys.modules, "zfkernels._C_cuda", raising=False)
    assert sorted(_compiled.stale(str(copy))) == (["_C"] if "zfkernels._C" in sys.modules else [])
    assert "_C_cuda" not in _compiled.stale()
    monkeypatch.setitem(sys.modules, "zfkernels._C_cuda", types.ModuleType("zfkernels._C_cuda"))
    assert _compiled.stale()["_C_cuda"] == ("None", digest(_compiled.CSRC))


# ======================================================================================
# Every keyword of the face reaches its own argument of the op
# ======================================================================================
def _tensors(n_lists, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(64, generator=g).to(torch.bfloat16), torch.randn(4, 16, generator=g).to(torch.bfloat16)]
    rest = [[(torch.randn(p.shape, generator=g).abs() * 0.1).to(dtype) for p in params] for _ in range(n_lists)]
    return params, rest


def _copies(lists):
    return [[t.clone() for t in ts] for ts in lists]


STREAM_FACE = dict(dist="rademacher", tensor_ids=[5, 9], mask_seed=13, sparsity=0.25)
STREAM_OP = dict(dist=1, tensor_ids=[5, 9], mask_seed=13, mask_threshold=1 << 22)
ESTIMATE = dict(restore_seed=11, restore_scale=0.25, history_alpha=0.5, stochastic_rounding=True, round_seed=17)


@pytest.mark.parametrize("first", [True, False])
def test_face_passes_every_sgd_keyword_to_its_argument(first):
    """zo_sgd_update_ equals the op called with each argument spelled out; the two variants
    make every keyword matter (the first-step flags hide dampening and the history weight)."""
    kw = dict(lr=0.1, weight_decay=0.05, momentum=0.9, dampening=0.3, nesterov=first, momentum_init=first,
              sign=not first, history_init=first, **ESTIMATE)
    params, (mom, hist) = _tensors(2)
    face = _copies([params, mom, hist])
    zk.zo_sgd_update_(face[0], [3, 4], [0.5, -0.25], momentum_buffers=face[1], history_buffers=face[2],
                      backend="torch", **STREAM_FACE, **kw)
    op = _copies([params, mom, hist])
    zk.call_op("torch", "zo_sgd_update_", params=op[0], momentum_buffers=op[1], history_buffers=op[2], seeds=[3, 4],
               coeffs=[0.5, -0.25], **STREAM_OP, **kw)
    for a, b in zip(face, op):
        _assert_same_bits(a, b, "zo_sgd_update_")


@pytest.mark.parametrize("first", [True, False])
def test_face_passes_every_adam_keyword_to_its_argument(first):
    kw = dict(lr=0.01, eps=1e-3, weight_decay=0.05, decoupled_weight_decay=first, sign=not first,
              history_init=first, **ESTIMATE)
    params, (m, v, hist) = _tensors(3)
    face = _copies([params, m, v, hist])
    zk.zo_adam_update_(face[0], face[1], face[2], [3, 4], [0.5, -0.25], step=3, betas=(0.8, 0.95),
                       history_buffers=face[3], backend="torch", **STREAM_FACE, **kw)
    op = _copies([params, m, v, hist])
    zk.call_op("torch", "zo_adam_update_", params=op[0], exp_avgs=op[1], exp_avg_sqs=op[2], history_buffers=op[3],
               seeds=[3, 4], coeffs=[0.5, -0.25], step=3, beta1=0.8, beta2=0.95, **STREAM_OP, **kw)
    for a, b in zip(face, op):
        _assert_same_bits(a, b, "zo_adam_update_")


def test_perturbation_honours_dtype_and_each_keyword():
    z = zk.perturbation(7, 100, "gaussian", tensor_id=3, dtype=torch.bfloat16, backend="torch", mask_seed=5,
                        sparsity=0.5)
    assert z.dtype == torch.bfloat16 and z.shape == (100,)
    want = torch.zeros(100, dtype=torch.bfloat16)
    zk.call_op("torch", "perturb_", params=[want], tensor_ids=[3], seed=7, scale=1.0, dist=0, mask_seed=5,
               mask_threshold=1 << 23)
    _assert_same_bits([z], [want], "perturbation(dtype=bfloat16)")
    with pytest.raises(ValueError, match="numel=-1 must be >= 0"):
        zk.perturbation(7, -1)


# ======================================================================================
# The face's own checks: named, before anything is written
# ======================================================================================
def test_a_non_tensor_in_a_list_is_named():
    p = [torch.ones(3), torch.ones(3)]
    with pytest.raises(TypeError, match=r"^tensors\[1\] is a float, not a torch.Tensor$"):
        zk.perturb_([p[0], 1.5], 1, 1.0, backend="torch")
    with pytest.raises(TypeError, match=r"^momentum_buffers\[1\] is a NoneType, not a torch.Tensor$"):
        zk.zo_sgd_update_(p, [1], [0.5], lr=0.1, momentum=0.9, momentum_buffers=[torch.zeros(3), None],
                          backend="torch")
    assert all(torch.equal(t, torch.ones(3)) for t in p)


@pytest.mark.parametrize("call,error,needle", [
    # float() took the string "0.1" as 0.1 and named nothing for None; bool() turned "False" into
    # True (sign, nesterov, decoupled_weight_decay on); betas=0.9 raised "has no len()"
    (lambda p: zk.perturb_(p, 1, "1.0", backend="torch"), TypeError, "scale='1.0' is not a real number"),
    (lambda p: zk.zo_sgd_update_(p, [1], [0.5], lr="0.1", backend="torch"), TypeError, "lr='0.1' is not a real number"),
    (lambda p: zk.zo_sgd_update_(p, [1], [0.5], lr=None, backend="torch"), TypeError, "lr=None is not a real number"),
    (lambda p: zk.zo_sgd_update_(p, [1], ["x"], lr=0.1, backend="torch"), TypeError, r"coeffs\[0\]='x' is not a real"),
    (lambda p: zk.zo_sgd_update_(p, [1], [0.5], lr=0.1, sign="False", backend="torch"), TypeError,
     "sign='False' must be True or False"),
    (lambda p: zk.zo_sgd_update_(p, [1], [0.5], lr=0.1, momentum=0.9, nesterov="no", momentum_buffers=[torch.zeros(4)],
                                 backend="torch"), TypeError, "nesterov='no' must be True or False"),
    (lambda p: zk.zo_adam_update_(p, [torch.zeros(4)], [torch.zeros(4)], [1], [0.5], lr=0.1, step=1,
                                  decoupled_weight_decay="False", weight_decay=0.1, backend="torch"), TypeError,
     "decoupled_weight_decay='False' must be True or False"),
    (lambda p: zk.zo_adam_update_(p, [torch.zeros(4)], [torch.zeros(4)], [1], [0.5], lr=0.1, step=1, betas=0.9,
                                  backend="torch"), ValueError, r"betas=0.9 must be two numbers"),
    (lambda p: zk.zo_adam_update_(p, [torch.zeros(4)], [torch.zeros(4)], [1], [0.5], lr=0.1, step=1,
                                  betas=("a", 0.9), backend="torch"), TypeError, r"betas\[0\]='a' is not a real"),
    (lambda p: zk.perturb_(p, 1, 1.0, sparsity="x", backend="torch"), ValueError, "sparsity='x' must be a number"),
    (lambda p: zk.perturb_(p, 1, 1.0, sparsity="0.5", backend="torch"), ValueError, "sparsity='0.5' must be a number"),
    (lambda p: zk.philox4x32_10(torch.zeros(1, 4, dtype=torch.int64), 5), TypeError, "key=5 must be a pair"),
    (lambda p: zk.sparse_mask(1, -4, 0.5), ValueError, "numel=-4 must be >= 0"),
    (lambda p: zk.perturbation(1, 4, dtype=torch.float64), ValueError, "dtype=torch.float64 must be"),
    (lambda p: zk.derive_seed(1, "3", 0), TypeError, "step='3' must be an integer"),
    (lambda p: zk.derive_seed(1, 3, 1.5), TypeError, "query=1.5 must be an integer"),
    # bools are no numbers here (True is no lr, no sparsity, no step), every list entry is named
    # by its own index, and a key is exactly a pair
    (lambda p: zk.zo_sgd_update_(p, [1], [0.5], lr=True, backend="torch"), TypeError, "lr=True is not a real number"),
    (lambda p: zk.zo_sgd_update_(p, [1], [0.5], lr=torch.tensor(True), backend="torch"), TypeError,
     r"lr=tensor\(True\) is not a real number"),
    (lambda p: zk.zo_sgd_update_(p, [1, 2], [0.5, "x"], lr=0.1, backend="torch"), TypeError,
     r"coeffs\[1\]='x' is not a real number"),
    (lambda p: zk.zo_adam_update_(p, [torch.zeros(4)], [torch.zeros(4)], [1], [0.5], lr=0.1, step=1,
                                  betas=(0.9, "b"), backend="torch"), TypeError, r"betas\[1\]='b' is not a real"),
    (lambda p: zk.perturb_(p, 1, 1.0, sparsity=True, backend="torch"), ValueError, "sparsity=True must be a number"),
    (lambda p: zk.perturb_(p, 1, 1.0, sparsity=torch.tensor([0.1, 0.2]), backend="torch"), ValueError,
     r"sparsity=tensor\(\[0.1000, 0.2000\]\) must be a number"),     # torch's "only one element tensors"
    (lambda p: zk.philox4x32_10(torch.zeros(1, 4, dtype=torch.int64), (1, 2, 3)), TypeError,
     r"key=\(1, 2, 3\) must be a pair"),
    (lambda p: zk.derive_seed(1, True, 0), TypeError, "step=True must be an integer")])
def test_scalar_arguments_of_the_wrong_type_are_named_before_anything_is_written(call, error, needle):
    p = [torch.ones(4)]
    with pytest.raises(error, match=needle):
        call(p)
    assert torch.equal(p[0], torch.ones(4))


def test_numpy_and_tensor_scalars_still_reach_the_ops_as_their_values():
    a, b = [torch.zeros(6)], [torch.zeros(6)]
    zk.zo_sgd_update_(a, [3], [np.float32(0.5)], lr=torch.tensor(0.1), sign=np.bool_(True), backend="torch")
    zk.zo_sgd_update_(b, [3], [float(np.float32(0.5))], lr=float(torch.tensor(0.1)), sign=True, backend="torch")
    assert torch.equal(a[0], b[0]) and a[0].any()


def test_history_weight_without_history_buffers_is_refused_by_sgd_too():
    p = [torch.ones(4)]
    with pytest.raises(ValueError, match="history_alpha=0.5 without history_buffers"):
        zk.zo_sgd_update_(p, [3], [0.5], lr=0.1, history_alpha=0.5, backend="torch")
    assert torch.equal(p[0], torch.ones(4))


@pytest.mark.parametrize("backend", RUNNING)
def test_seeds_are_python_or_numpy_ints_in_range(backend):
    """§2: seeds in [0, 2^63); a bool is not a seed, a numpy integer is (as an int)."""
    p = [torch.ones(5)]
    for call, needle in (
        (lambda: zk.perturb_(p, 2**63, 1.0, backend=backend), r"seed=9223372036854775808 is outside \[0, 2\*\*63\)"),
        (lambda: zk.perturb_(p, 1, 1.0, mask_seed=2**63, backend=backend), r"mask_seed=9223372036854775808"),
        (lambda: zk.zo_sgd_update_(p, [2**63], [0.5], lr=0.1, backend=backend), r"seeds.*=9223372036854775808"),
        (lambda: zk.zo_sgd_update_(p, [-3], [0.5], lr=0.1, backend=backend), r"seeds.*=-3 is outside"),
    ):
        with pytest.raises(ValueError, match=needle):
            call()
    for call in (lambda: zk.perturb_(p, True, 1.0, backend=backend),
                 lambda: zk.zo_sgd_update_(p, [False], [0.5], lr=0.1, backend=backend)):
        with pytest.raises(TypeError, match="must be a Python int"):
            call()
    assert torch.equal(p[0], torch.ones(5))
    a, b = torch.zeros(9), torch.zeros(9)
    zk.perturb_([a], np.int64(2**40 + 5), 1.0, mask_seed=np.uint32(3), sparsity=0.5, backend=backend)
    zk.perturb_([b], 2**40 + 5, 1.0, mask_seed=3, sparsity=0.5, backend=backend)
    assert torch.equal(a, b) and a.any()


@pytest.mark.parametrize("backend", RUNNING)
def test_philox_face_checks_keys_and_takes_any_integer_counters(backend):
    c = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 2**31 - 1]], dtype=torch.int64)
    want = reference.philox4x32_10(c, 9, 10)
    assert torch.equal(zk.philox4x32_10(c, (9, 10), backend=backend), want)
    assert torch.equal(zk.philox4x32_10(c.to(torch.int32), (9, 10), backend=backend), want)   # converted to int64
    for key, name in (((2**32, 0), r"key\[0\]=4294967296"), ((0, -1), r"key\[1\]=-1")):
        with pytest.raises(ValueError, match=f"{name} must be a 32-bit unsigned integer"):
            zk.philox4x32_10(c, key, backend=backend)
    with pytest.raises(TypeError, match="counters must be an integer tensor"):
        zk.philox4x32_10(torch.ones(1, 4, dtype=torch.bool), (1, 2), backend=backend)


@pytest.mark.parametrize("backend", RUNNING)
def test_adam_betas_of_zero_are_accepted(backend):
    """[0, 1) is closed at 0 (torch.optim.Adam takes beta 0): the update is then the plain
    sign-like step m / sqrt(v) of the current estimate, on every backend."""
    p, m, v = [torch.randn(6)], [torch.zeros(6)], [torch.zeros(6)]
    want = [p[0].clone()], [torch.zeros(6)], [torch.zeros(6)]
    zk.zo_adam_update_(p, m, v, [1], [0.5], lr=0.1, step=1, betas=(0.0, 0.0), eps=0.0, backend=backend)
    zk.zo_adam_update_(*want, [1], [0.5], lr=0.1, step=1, betas=(0.0, 0.0), eps=0.0, backend="torch")
    _assert_same_bits(p + m + v, [t[0] for t in want], "betas=(0, 0)")
    assert torch.isfinite(p[0]).all()


@pytest.mark.parametrize("backend", RUNNING)
def test_an_inference_param_first_in_the_list_is_refused_before_anything_is_written(backend):
    """opspec.check_writable looks at every written tensor, the first of a list included: an
    inference params[0] is refused before momentum_buffers[0] (stored before it) moves."""
    with torch.inference_mode():
        inference = torch.ones(4)
    mom = [torch.zeros(4)]
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
        zk.zo_sgd_update_([inference], [1], [0.5], lr=0.1, momentum=0.9, momentum_buffers=mom, backend=backend)
    assert torch.equal(mom[0], torch.zeros(4)) and torch.equal(inference, torch.ones(4))


@pytest.mark.parametrize("backend", RUNNING)
def test_ids_and_step_beyond_int64_are_the_same_value_error_on_every_backend(backend):
    """The compiled op takes int64: a tensor id or step of 2**64 (2**63) reached it as a
    RuntimeError "Expected a value of type 'List[int]' ... found type 'list'" naming no id,
    where the reference refused it with the ValueError of any id outside [0, 2**32)."""
    p = torch.ones(3)
    for bad in (2**32, 2**64):
        with pytest.raises(ValueError, match=rf"tensor_ids\[1\]={bad} is outside \[0, 2\*\*32\)"):
            zk.perturb_([torch.ones(2), p], 1, 1.0, tensor_ids=[0, bad], backend=backend)
    m, v = torch.zeros(3), torch.zeros(3)
    with pytest.raises(ValueError, match=r"step=9223372036854775808 must be >= 1"):
        zk.zo_adam_update_([p], [m], [v], [1], [1.0], lr=0.1, step=2**63, backend=backend)
    assert torch.equal(p, torch.ones(3)) and not m.any() and not v.any()


@pytest.mark.parametrize("backend", RUNNING)
def test_buffer_lists_may_be_any_iterable_as_params_may(backend):
    """params may be a generator (model.parameters()); a generator or map of buffers raised
    "object of type 'generator' has no len()" from the face's feature check."""
    def run(lazy):
        wrap = iter if lazy else list
        p, q = [torch.ones(4)], [torch.ones(4)]
        m, h, v, hv = ([torch.zeros(4)] for _ in range(4))
        zk.zo_sgd_update_(wrap(p), [1], [0.5], lr=0.1, momentum_buffers=wrap(m), momentum=0.9,
                          history_buffers=wrap(h), history_alpha=0.5, backend=backend)
        zk.zo_adam_update_(wrap(q), wrap([torch.zeros(4)]), wrap(v), [1], [0.5], lr=0.1, step=1,
                           history_buffers=wrap(hv), history_alpha=0.5, backend=backend)
        return p + m + h + q + v + hv
    _assert_same_bits(run(True), run(False), "buffers given as iterators")


@pytest.mark.parametrize("backend", RUNNING)
def test_bools_of_numpy_and_torch_are_no_integers_distributions_or_fractions(backend):
    """A bool is never an integer (docs/kernel-ops.md "Errors"): operator.index took
    torch.tensor(True) as the tensor id / step 1, dist=True (== 1) ran Rademacher and
    sparsity=np.True_ zeroed every coordinate."""
    p, m, v = torch.ones(4), torch.zeros(4), torch.zeros(4)
    calls = [
        (TypeError, "tensor_ids", lambda: zk.perturb_([p], 1, 1.0, tensor_ids=[torch.tensor(True)], backend=backend)),
        (TypeError, "step", lambda: zk.zo_adam_update_([p], [m], [v], [1], [1.0], lr=0.1, step=torch.tensor(True),
                                                       backend=backend)),
        (TypeError, "key", lambda: zk.philox4x32_10(torch.zeros(1, 4, dtype=torch.int64), (torch.tensor(True), 0),
                                                     backend=backend)),
        (ValueError, "dist=True", lambda: zk.perturb_([p], 1, 1.0, True, backend=backend)),
        (ValueError, "dist=np.True_", lambda: zk.perturb_([p], 1, 1.0, np.True_, backend=backend)),
        (ValueError, "sparsity=", lambda: zk.perturb_([p], 1, 1.0, sparsity=np.True_, backend=backend)),
    ]
    for error, needle, call in calls:
        with pytest.raises(error, match=needle):
            call()
    assert torch.equal(p, torch.ones(4)) and not m.any() and not v.any()


def test_the_table_requires_what_the_schema_requires():
    """lr and step have no default (the compiled schema has none): bind and call name them."""
    with pytest.raises(TypeError, match="zo_sgd_update_\\(\\) needs lr"):
        opspec.bind("zo_sgd_update_", params=[], tensor_ids=[], seeds=[], coeffs=[])
    adam = dict(params=[], exp_avgs=[], exp_avg_sqs=[], tensor_ids=[], seeds=[], coeffs=[], lr=0.1)
    with pytest.raises(TypeError, match="zo_adam_update_\\(\\) needs step"):
        opspec.bind("zo_adam_update_", **adam)
    with pytest.raises(TypeError, match="needs step"):
        zk.call_op("torch", "zo_adam_update_", **adam)


# ======================================================================================
# Host-side stream helpers
# ======================================================================================
def test_seed_schedule_refuses_negative_steps_and_queries():
    """§8: step in [0, 2^64), query in [0, 2^32): -1 would alias step 2^32 - 1's low word or
    the reserved query 2^32 - 1 (the per-step mask seed)."""
    with pytest.raises(ValueError, match="step=-1"):
        S.derive_seed(1, -1, 0)
    with pytest.raises(ValueError, match="query=-1"):
        S.derive_seed(1, 0, -1)
    with pytest.raises(ValueError, match="query=4294967296"):
        S.derive_seed(1, 0, 2**32)
    with pytest.raises(TypeError, match="base_seed must be a Python int"):
        S.derive_seed(True, 0, 0)
    assert S.derive_seed(np.int64(5), 3, 1) == S.derive_seed(5, 3, 1)


def test_reserved_query_slots_are_the_specs():
    """§8: the per-step mask seed is query 2^32 - 1, the per-task one 2^32 - 2, the k-th
    stochastic-rounding store 2^32 - 3 - k."""
    assert (S.QUERY_MASK_PER_STEP, S.QUERY_MASK_PER_TASK, S.QUERY_ROUNDING) == (2**32 - 1, 2**32 - 2, 2**32 - 3)


def test_sparse_mask_and_perturbation_take_integers_only():
    # docs/kernel-ops.md "Errors": integers are never truncated. sparse_mask(tensor_id=1.9)
    # (or True) returned tensor 1's mask, and numel=2.7 gave two elements (the audit's find).
    for bad in (1.9, True):
        with pytest.raises(TypeError, match=r"tensor_id=.* must be an integer"):
            zk.sparse_mask(1, 64, 0.5, tensor_id=bad)
    with pytest.raises(TypeError, match=r"numel=2\.7 must be an integer"):
        zk.sparse_mask(1, 2.7, 0.5)
    with pytest.raises(TypeError, match=r"numel=2\.7 must be an integer"):
        zk.perturbation(1, 2.7)
    assert torch.equal(zk.sparse_mask(1, np.int64(64), 0.5, tensor_id=np.int32(1)), zk.sparse_mask(1, 64, 0.5, 1))
    # the bounds are inclusive: no elements is a mask of none, and every dtype the kernels perturb
    assert zk.sparse_mask(1, 0, 0.5).shape == (0,) and zk.perturbation(1, 0).shape == (0,)
    for dt in (torch.float16, torch.bfloat16):
        z = zk.perturbation(1, 64, dtype=dt)
        assert z.dtype == dt and torch.equal(z, zk.perturbation(1, 64).to(dt))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_bad_seed_is_named_by_its_index(backend):
    if backend == "cpu" and not _compiled.cpu_available():
        pytest.skip("the compiled CPU op is not built")
    p = [torch.zeros(8)]
    with pytest.raises((ValueError, TypeError), match=r"seeds\[1\]"):
        zk.zo_sgd_update_(p, seeds=[1, -3], coeffs=[0.1, 0.1], lr=0.1, backend=backend)
    with pytest.raises((ValueError, RuntimeError), match=r"seeds\[1\]"):     # the op itself, past the face
        zk.call_op(backend, "zo_sgd_update_", params=p, momentum_buffers=[], history_buffers=[], tensor_ids=[0],
                   seeds=[1, -3], coeffs=[0.1, 0.1], lr=0.1)
