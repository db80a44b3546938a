"""The compiled CPU kernels of every CPU capability (csrc/ops.cpp, "CPU capabilities";
docs/kernel-ops.md): baseline x86-64, AVX2 and AVX-512 variants in one binary, the one in force
chosen per op call (the best of this CPU, or ``ZEROFLOW_CPU_CAPABILITY`` /
``zfkernels.set_cpu_capability``). The rest of the suite runs the best one; here each lower one
runs the parity suite in a child pytest, and all of them are compared with the reference in
this process, on layouts whose tails reach every Philox path (the AVX-512 groups of 64 blocks,
the AVX2 groups of 32, scalar code)."""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, child_env

import zfkernels as zk
from zfkernels import _compiled
from zfkernels import reference as R

pytestmark = pytest.mark.skipif(not _compiled.cpu_available(),
                                reason="the compiled CPU extension is missing")

CAPS = zk.cpu_capabilities() if _compiled.cpu_available() else ()


@pytest.fixture(autouse=True)
def _restore_capability():
    before = zk.cpu_capability() if CAPS else None
    yield
    if before:
        zk.set_cpu_capability(before)


# Elements per tensor: tiles of 1024 with tails of 100 Philox blocks (AVX-512 64 + AVX2 32 +
# 4 scalar), 50 (AVX2 32 + 18) and 20 (scalar only); more than one 64K chunk, so the
# parallel path runs too.
SIZES = (68 * 1024 + 400, 200, 77)


def _params(dtype):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(n, generator=g) * 0.5).to(dtype) for n in SIZES]


def _run(backend, op, dtype, dist, sparse, extra):
    p = _params(dtype)
    kw = dict(dist=dist, backend=backend, **({"mask_seed": 5, "sparsity": 0.5} if sparse else {}))
    if op == "perturb":
        zk.perturb_(p, seed=11, scale=2 ** -6, **kw)
        return p
    low = dtype != torch.float32
    if op == "sgd":
        buf = [torch.full_like(t, 0.25) for t in p]
        hist = {"history_buffers": [torch.full_like(t, -0.5) for t in p], "history_alpha": 0.8} if extra else {}
        zk.zo_sgd_update_(p, seeds=[3, 11], coeffs=[0.3, -0.7], lr=1e-2, restore_seed=11, restore_scale=-2 ** -6,
                          momentum_buffers=buf, momentum=0.9, nesterov=extra, sign=extra, weight_decay=0.01,
                          stochastic_rounding=low, round_seed=9, **hist, **kw)
        return p + buf + hist.get("history_buffers", [])
    m = [torch.full_like(t, 0.1) for t in p]
    v = [torch.full_like(t, 0.2) for t in p]
    zk.zo_adam_update_(p, m, v, seeds=[11], coeffs=[0.3], lr=1e-2, step=3, restore_seed=11,
                       restore_scale=-2 ** -6, weight_decay=0.01, decoupled_weight_decay=extra,
                       stochastic_rounding=low, round_seed=9, **kw)
    return p + m + v


@functools.lru_cache(maxsize=None)
def _reference(*case):
    return _run("torch", *case)


CASES = [(op, dtype, dist, sparse, extra)
         for op in ("perturb", "sgd", "adam")
         for dtype in (torch.float32, torch.bfloat16, torch.float16)
         for dist in ("gaussian", "rademacher")
         for sparse, extra in ((False, False), (True, True))]


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("op,dtype,dist,sparse,extra", CASES,
                         ids=[f"{o}-{str(d)[6:]}-{di}-{'sparse+opts' if s else 'plain'}" for o, d, di, s, _ in CASES])
def test_every_capability_equals_the_reference(cap, op, dtype, dist, sparse, extra):
    zk.set_cpu_capability(cap)
    assert zk.cpu_capability() == cap
    got = _run("cpu", op, dtype, dist, sparse, extra)
    want = _reference(op, dtype, dist, sparse, extra)
    for k, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                           b.view(torch.int16 if b.element_size() == 2 else torch.int32)), (cap, k)


# The suites of the "cpu" backend rerun under each lower capability (the best one runs them in
# this process), and how many of their tests must pass there.
SUITES = ["tests/test_parity.py", "tests/test_optim_layout.py", "tests/test_stochastic_rounding.py"]
SELECT = "cpu or not test_parity"
MIN_PASSED = 110


@pytest.mark.slow
@pytest.mark.parametrize("cap", CAPS[:-1])
def test_parity_suite_on_each_lower_capability(tmp_path, cap):
    report = tmp_path / "capability"
    env = child_env(ZEROFLOW_CPU_CAPABILITY=cap, ZF_CPU_CAPABILITY_REPORT=str(report))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "-k", SELECT,
                          *SUITES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    passed = int(re.search(r"(\d+) passed", out).group(1))
    assert passed >= MIN_PASSED, f"only {passed} tests ran under {cap}:\n{out[-3000:]}"
    assert report.read_text() == cap, "the child pytest ran another capability than ZEROFLOW_CPU_CAPABILITY"


def _import_with(value: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import zfkernels as z; print(z.cpu_capability())"], cwd=ROOT,
                          env=child_env(ZEROFLOW_CPU_CAPABILITY=value), capture_output=True, text=True, timeout=300)


def test_the_environment_variable_selects_and_a_bad_value_fails_the_import():
    run = _import_with(f" {CAPS[0].upper()} ")        # case and blanks as a shell may leave them
    assert run.returncode == 0 and run.stdout.split()[-1] == CAPS[0], run.stderr[-2000:]
    run = _import_with("avx1024")
    assert run.returncode != 0
    assert "ZEROFLOW_CPU_CAPABILITY='avx1024'" in run.stderr and "default, avx2, avx512" in run.stderr, run.stderr
    assert "unset ZEROFLOW_CPU_CAPABILITY" in run.stderr


def test_set_cpu_capability_checks_before_it_changes_anything(monkeypatch):
    best, before = CAPS[-1], zk.cpu_capability()
    assert zk.set_cpu_capability("default") == before and zk.cpu_capability() == "default"
    with pytest.raises(ValueError, match="unknown CPU capability 'sse4'; use one of default, avx2, avx512"):
        zk.set_cpu_capability("sse4")
    monkeypatch.setattr(_compiled, "cpu_capabilities", lambda: ("default",))
    with pytest.raises(ValueError, match=r"'avx2' is not available on this machine \(it has default\)"):
        zk.set_cpu_capability("avx2")
    assert zk.cpu_capability() == "default"
    # the extension's own checks, for callers that reach it directly
    from zfkernels import _C
    with pytest.raises(ValueError, match="unknown CPU capability 'avx1024'"):
        _C.set_cpu_capability("avx1024")
    with pytest.raises(TypeError, match="must be a str"):
        _C.set_cpu_capability(2)
    if best != "avx512":
        with pytest.raises(ValueError, match="not available on this machine or in this build"):
            _C.set_cpu_capability("avx512")
    assert zk.cpu_capability() == "default"


def test_the_capabilities_are_ordered_and_this_machine_gets_its_best():
    assert CAPS[0] == "default" and list(CAPS) == [c for c in _compiled.CPU_CAPABILITIES if c in CAPS]
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
        want = ("avx512" if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
                else "avx2" if "avx2" in flags else "default")
        assert CAPS[-1] == want


def test_the_capability_in_force_is_the_variant_that_runs():
    """The variants give the same bits, so the reference comparisons above pass whichever one
    runs: a dispatch that ignored the capability (the best one always, or the avx512 wrapper
    sending to the avx2 one) went unnoticed. The extension counts the chunks each ran."""
    from zfkernels import _C

    for cap in CAPS:
        zk.set_cpu_capability(cap)
        before = _C._chunks_run()
        zk.perturb_([torch.zeros(3 * 65536 + 5), torch.zeros(77)], seed=1, scale=1.0)   # serial and parallel
        ran = [a - b for a, b in zip(_C._chunks_run(), before)]
        want = [0, 0, 0]
        want[_compiled.CPU_CAPABILITIES.index(cap)] = 5
        assert ran == want, (cap, ran)


def _disassembly() -> dict[str, list[str]]:
    """``{function: [instruction, ...]}`` of the compiled CPU extension (objdump -d -C)."""
    from zfkernels import _C

    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__], capture_output=True,
                          text=True, check=True, timeout=120).stdout
    funcs, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
        elif cur is not None and "\t" in line:
            cur.append(line.split("\t")[-1].strip())
    return funcs


@pytest.mark.skipif(shutil.which("objdump") is None or os.uname().machine != "x86_64" or len(CAPS) < 3,
                    reason="needs objdump and a GCC x86-64 build on an AVX-512 machine")
def test_each_variant_holds_the_instructions_of_its_capability():
    """What the bits cannot show (csrc/ops.cpp, "CPU capabilities"): the baseline variant runs on
    any x86-64 (no VEX / EVEX), the AVX2 one on any AVX2 CPU (no AVX-512), the AVX-512 one uses
    it; no FMA anywhere (no contraction); the tile code inlined into each wrapper, which calls its
    own SIMD Philox."""
    funcs = _disassembly()
    allowed_calls = re.compile(r"<(zf_cpu::TileIO::bind|zf_cpu::philox_batch_avx(2|512)\(|memcpy@plt|memset@plt)")
    for cap in _compiled.CPU_CAPABILITIES:
        bodies = {f: ins for f, ins in funcs.items() if f.startswith(f"void zf_cpu::chunk_{cap}<")}
        assert len(bodies) == 3, (cap, list(bodies))        # perturb_, zo_sgd_update_, zo_adam_update_
        for f, ins in bodies.items():
            mnemonics = [i.split()[0] for i in ins if i.split()]
            simd = [i for i in ins if i.startswith("v") or "%ymm" in i or "%zmm" in i]
            avx512 = [i for i in ins if "%zmm" in i or re.search(r"%k[0-7]|%[xy]mm(1[6-9]|2\d|3[01])\b", i)]
            assert not [m for m in mnemonics if re.match(r"vf(n)?m(add|sub)", m)], (cap, f[:60])
            calls = [i for i in ins if i.startswith("call")]
            assert all(allowed_calls.search(i) for i in calls), (cap, [i for i in calls if not allowed_calls.search(i)])
            if cap == "default":
                assert simd == [], (f[:60], simd[:5])
            elif cap == "avx2":
                assert avx512 == [] and any("%ymm" in i for i in ins), (f[:60], avx512[:5])
                assert any("philox_batch_avx2(" in i for i in calls), f[:60]
            else:
                assert avx512, f[:60]
                assert any("philox_batch_avx512(" in i for i in calls), f[:60]


def test_a_build_older_than_the_capabilities_is_named(monkeypatch):
    """An extension built before this API (the stale-build warning's case) has none of its
    functions: the error says to rebuild, not an AttributeError."""
    import types

    monkeypatch.setitem(sys.modules, "zfkernels._C", types.ModuleType("zfkernels._C"))
    with pytest.raises(RuntimeError, match="built before CPU capabilities existed; rebuild it with: .*pip install"):
        zk.cpu_capability()


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("op", ["perturb_", "zo_adam_update_"])
def test_flush_denormal_mode_changes_no_bit(cap, op):
    """torch.set_flush_denormal(True) sets the thread's flush-to-zero / denormals-are-zero
    mode, and with it every CPU variant flushed subnormal values: a perturb_ of subnormal
    weights, or Adam's m and v decaying through the subnormals (masked coordinates), wrote
    other bits than the reference (and the CUDA kernels, built -ftz=false). The op keeps IEEE
    subnormals on every thread it runs on, serial (one small tensor) and parallel (several
    64K chunks), and leaves the caller's mode as it found it."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-denormal mode")
    zk.set_cpu_capability(cap)
    g = torch.Generator().manual_seed(3)

    def layout():
        return [torch.randn(n, generator=g) * 1e-39 for n in (1000, 3 * 65536 + 77)]   # fp32 subnormals

    params, ms, vs = layout(), layout(), [t.abs() for t in layout()]
    args = {"perturb_": lambda p, m, v: ([p], [0], 7, 1e-40, 1, 0, 0),
            "zo_adam_update_": lambda p, m, v: ([p], [m], [v], [], [0], [5], [1e-20], 1, 0, 0, 0, 0.0, 1e-3, 0.9,
                                                0.999, 1e-8, 0.0, False, 3, False, 0.0, False, False, 0)}[op]
    for p, m, v in zip(params, ms, vs):
        want = [t.clone() for t in (p, m, v)]
        getattr(R, op)(*args(*want))                 # the spec's bits, IEEE mode
        got = [t.clone() for t in (p, m, v)]
        assert torch.set_flush_denormal(True)
        try:
            getattr(torch.ops.zfkernels, op)(*args(*got))
            assert torch.tensor([1e-39]).mul(1.0).item() == 0.0, "the op changed the caller's flush mode"
        finally:
            torch.set_flush_denormal(False)
        for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), got, want):
            diff = (a.view(torch.int32) != b.view(torch.int32)).sum().item()
            assert diff == 0, f"{op} numel={p.numel()}: {diff} {name} elements differ from the reference"
