"""Kernel suite: perturb_ and the fused updates per backend x dtype x dist x size, with the
``copy_`` bandwidth and the MeZO-style PyTorch recipe measured in the same run.

Bytes counted per call (read + written once, the minimum any implementation must move):
  perturb_                 2 * N * s                      (theta read + write)
  zo_sgd_update_           2 * N * s  (+ 2 * N * s per momentum / history buffer)
  zo_adam_update_          2 * N * s + 4 * N * s_state  (+ 2 * N * s for history)
  copy_                    2 * N * s
with s = bytes per element of the stored dtype. z and the mask are regenerated in registers
and cost no bytes. The MeZO-style recipes (``torch.manual_seed`` + ``torch.normal`` /
``torch.randint``-based Rademacher + ``add_`` per tensor) do the same math eagerly.
"""
from __future__ import annotations

import pytest
import torch

import zfkernels as zk
from benchmarks import _common as C
from benchmarks import kernel_cases

SEED = 0x5EED_1234
EPS = 1e-3
LR = 1e-6


def _matrix():
    assert tuple(C.DTYPES) == kernel_cases.DTYPES, "benchmarks/kernel_cases.py lists the dtypes of _common.DTYPES"
    for backend in C.kernel_backends():
        for op, variant, dname, dist in kernel_cases.rows():     # the report lists the same rows
            for n in kernel_cases.sizes(dname, C.kernel_sizes()):
                yield pytest.param(backend, op, variant, dname, dist, n,
                                   id=f"{op}-{variant}-{backend}-{dname}-{dist}-{C.fmt_numel(n)}")


def _sized():
    """``(n, dname)`` of each dtype at its sizes (kernel_cases.sizes): the baselines' cases, with
    the ids they had as two parametrizations ("64M-fp32")."""
    return [pytest.param(n, dname, id=f"{C.fmt_numel(n)}-{dname}")
            for dname in C.DTYPES for n in kernel_cases.sizes(dname, C.kernel_sizes())]


def _bytes(op: str, variant: str, n: int, s: int) -> int:
    b = 2 * n * s
    if op == "adam":
        b += 4 * n * s
    if variant in ("history", "momentum"):
        b += 2 * n * s
    return b


def _group(op, dname, n):
    return f"kernels {op} {dname} {C.fmt_numel(n)} {C.DEVICE}"


def _copy_key(dname, n):
    return C.key("kernels", "copy", C.DEVICE, dname, n)


def _mezo_key(op, dname, dist, n):
    return C.key("kernels", "mezo", op, C.DEVICE, dname, dist, n)


def _need_device():
    if C.ON_GPU and not torch.cuda.is_available():
        pytest.skip(C.NO_CUDA)


@pytest.mark.parametrize("n,dname", _sized())
def test_copy(run_bench, benchmark, dname, n):
    """``dst.copy_(src)``: the bandwidth bound every one-pass kernel is compared with."""
    _need_device()
    dtype = C.DTYPES[dname]
    benchmark.group = f"kernels copy {dname} {C.fmt_numel(n)} {C.DEVICE}"
    src = torch.randn(n, device=C.device()).to(dtype)
    dst = torch.empty_like(src)
    s = C.bytes_of(dtype)
    run_bench(lambda: dst.copy_(src), {
        "suite": "kernels", "key": _copy_key(dname, n), "kind": "copy", "op": "copy", "variant": "copy_",
        "backend": "torch", "dtype": dname, "dist": "-", "numel": n, "elements": n, "bytes": 2 * n * s,
    }, budget_s=1.0, max_rounds=15, back_to_back=C.KERNEL_BACK_TO_BACK)


def _mezo_sgd(p, dist):
    """MeZO's restore then update, per tensor: two regenerations of z."""
    C.mezo_perturb([p], SEED, EPS, dist)           # restore of the pending -eps perturbation
    C.mezo_perturb([p], SEED, -LR * 0.37, dist)    # zo_update: theta -= lr * g * z


@pytest.mark.parametrize("op", ["perturb", "sgd", "adam"])
@pytest.mark.parametrize("dist", C.DISTS)
@pytest.mark.parametrize("n,dname", _sized())
def test_mezo(run_bench, benchmark, op, dist, dname, n):
    """The MeZO-style PyTorch recipe of the same op: manual_seed + normal / randint + add_
    (Adam: z materialised into ``.grad``, then ``torch.optim.Adam``, single-tensor path)."""
    _need_device()
    dtype = C.DTYPES[dname]
    benchmark.group = _group(op, dname, n)
    p = torch.randn(n, device=C.device()).mul_(0.02).to(dtype)
    if op == "perturb":
        def fn():
            C.mezo_perturb([p], SEED, EPS, dist)
    elif op == "sgd":
        def fn():
            _mezo_sgd(p, dist)
    else:
        opt = torch.optim.Adam([p], lr=LR, foreach=False)

        def fn():
            C.mezo_perturb([p], SEED, EPS, dist)
            torch.manual_seed(SEED)
            p.grad = C.mezo_z(p, dist).mul_(0.37)
            opt.step()
            p.grad = None
    s = C.bytes_of(dtype)
    run_bench(fn, {
        "suite": "kernels", "key": _mezo_key(op, dname, dist, n), "kind": "mezo", "op": op, "variant": "mezo",
        "backend": "torch", "dtype": dname, "dist": dist, "numel": n, "elements": n,
        "bytes": _bytes(op, "plain", n, s), "copy_ref": _copy_key(dname, n),
    }, budget_s=1.0, max_rounds=15, back_to_back=C.KERNEL_BACK_TO_BACK)


def _kernel_call(backend, op, variant, dtype, dist, n):
    """One call of ``op`` in ``variant`` on a fresh parameter of ``n`` elements, as a closure."""
    p = torch.randn(n, device=C.device()).mul_(0.02).to(dtype)
    kw = {"dist": dist, "backend": backend}
    if variant == "sparse":
        kw.update(mask_seed=77, sparsity=0.5)
    if variant == "sign":
        kw["sign"] = True
    if variant == "history":
        kw.update(history_buffers=[torch.zeros_like(p)], history_alpha=0.9)
    if op == "perturb":
        def fn():
            zk.perturb_([p], SEED, EPS, **kw)
    elif op == "sgd":
        if variant == "momentum":
            kw.update(momentum_buffers=[torch.zeros_like(p)], momentum=0.9)

        def fn():
            zk.zo_sgd_update_([p], [SEED], [0.37], lr=LR, restore_seed=SEED, restore_scale=-EPS, **kw)
    else:
        m, v = torch.zeros_like(p), torch.zeros_like(p)

        def fn():
            zk.zo_adam_update_([p], [m], [v], [SEED], [0.37], lr=LR, step=10, restore_seed=SEED,
                               restore_scale=-EPS, **kw)
    return fn


# Collected after the baselines (pytest runs a file in definition order): a kernel phase that
# its time share cuts (gpu_check.sh) still has the copy_ and MeZO rows every target is a
# fraction of, which the 112 kernel cases, measured first, used to leave unmeasured.
@pytest.mark.parametrize("backend,op,variant,dname,dist,n", list(_matrix()))
def test_kernel(run_bench, benchmark, backend, op, variant, dname, dist, n):
    why = C.backend_skip_reason(backend)
    if why:
        pytest.skip(why)
    dtype = C.DTYPES[dname]
    benchmark.group = _group(op, dname, n)
    fn = _kernel_call(backend, op, variant, dtype, dist, n)
    s = C.bytes_of(dtype)
    extra = {
        "suite": "kernels", "key": C.key("kernels", op, variant, backend, C.DEVICE, dname, dist, n),
        "kind": "zeroflow", "op": op, "variant": variant, "backend": backend, "dtype": dname, "dist": dist,
        "numel": n, "elements": n, "bytes": _bytes(op, variant, n, s), "copy_ref": _copy_key(dname, n),
    }
    if variant == "plain":
        extra["mezo_ref"] = _mezo_key(op, dname, dist, n)
    if backend == "triton" and not C.ON_GPU:
        extra["note"] = "Triton interpreter (not a performance path)"
        extra["backend_label"] = "triton (interpreter)"
    if backend == "torch":
        extra["note"] = "pure-PyTorch reference (not a performance path)"
        extra["backend_label"] = "torch (reference)"
    run_bench(fn, extra, budget_s=1.0, max_rounds=15, back_to_back=C.KERNEL_BACK_TO_BACK)


# The compiled CPU kernels of each CPU capability (csrc/ops.cpp, "CPU capabilities"): the same
# bits from other instructions, so what each instruction set buys is measured here, against
# copy_ in the same run (the kernel rows above run the best capability only).
CAPABILITY_CASES = [("perturb", "fp32", "gaussian"), ("sgd", "fp32", "gaussian"), ("adam", "fp32", "gaussian"),
                    ("sgd", "fp32", "rademacher"), ("sgd", "bf16", "gaussian")]


def _cpu_capabilities() -> list[str]:
    from zfkernels import _compiled

    return [] if C.ON_GPU or not _compiled.cpu_available() else list(zk.cpu_capabilities())


@pytest.mark.parametrize("cap", _cpu_capabilities())
@pytest.mark.parametrize("op,dname,dist", CAPABILITY_CASES, ids=["-".join(c) for c in CAPABILITY_CASES])
def test_cpu_capability(run_bench, benchmark, cap, op, dname, dist):
    n = C.kernel_sizes()[-1]
    benchmark.group = f"kernels cpu capabilities {op} {dname} {dist} {C.fmt_numel(n)}"
    fn = _kernel_call("cpu", op, "plain", C.DTYPES[dname], dist, n)
    before = zk.set_cpu_capability(cap)
    try:
        run_bench(fn, {
            "suite": "kernels", "key": C.key("kernels", "capability", cap, op, C.DEVICE, dname, dist, n),
            "kind": "capability", "capability": cap, "op": op, "variant": "plain", "backend": "cpu",
            "dtype": dname, "dist": dist, "numel": n, "elements": n,
            "bytes": _bytes(op, "plain", n, C.bytes_of(C.DTYPES[dname])), "copy_ref": _copy_key(dname, n),
        }, budget_s=1.0, max_rounds=15, back_to_back=C.KERNEL_BACK_TO_BACK)
    finally:
        zk.set_cpu_capability(before)
