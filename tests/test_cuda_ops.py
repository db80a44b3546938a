"""The compiled CUDA kernels (zfkernels._C_cuda) against the pure-PyTorch reference on the CPU
(docs/perturbation-stream.md, docs/kernel-ops.md), and against the compiled CPU kernels.

Runs where a GPU is present (benchmarks/gpu_check.sh runs it with the other parity tests);
skipped elsewhere. ``ZEROFLOW_TEST_DEVICE=cpu`` runs the same checks on the compiled CPU
kernels instead (a dry run of this module's logic on a machine without a GPU).

What must hold on the GPU, as on the CPU: Philox words, uniforms, Rademacher values and masks
bit-exact; Gaussians within 2^-18 of the reference (§5: CUDA's logf/sincosf differ from
libm); fp32 SGD-family updates with Rademacher z bit-exact; Adam within the reference's sqrt
rounding; bf16/fp16 storage rounded to nearest-even like the reference; one launch serving
lists of many tensors of odd sizes; the extra memory of a ZO step O(1).
"""
from __future__ import annotations

import os

import pytest
import torch

from zfkernels import _compiled
from tests.op_cases import GAUSS, RADE, T_HALF, assert_adam_matches, assert_sgd_matches
from tests.op_cases import adam_args as _adam_args
from tests.op_cases import sgd_args as _sgd_args
from zfkernels import reference as R

DEV = os.environ.get("ZEROFLOW_TEST_DEVICE", "cuda")
if DEV == "cuda":
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here (benchmarks/gpu_check.sh runs this on a GPU)", allow_module_level=True)
    if not _compiled.cuda_built():
        pytest.fail(f"a GPU is present but {_compiled.missing_reason('cuda')}", pytrace=False)
elif not _compiled.cpu_available():
    pytest.skip(_compiled.missing_reason("cpu"), allow_module_level=True)

ops = torch.ops.zfkernels
BOUND = 2.0 ** -18
ODD = [1, 3, 127, 128, 129, 4097, 65537]


def _on(ts):
    return [t.to(DEV, copy=True) for t in ts]   # a copy even when DEV is the cpu


def _cpu(ts):
    return [t.detach().cpu() for t in ts]


def _z(seed, n, dist, tid=0, mask_seed=0, T=0, dtype=torch.float32):
    out = torch.zeros(n, dtype=dtype, device=DEV)
    ops.perturb_([out], [tid], seed, 1.0, dist, mask_seed, T)
    return out.cpu()


# ----------------------------------------------------------------------------- stream
def test_philox_random_counters():
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 2**32, (5000, 4), generator=g, dtype=torch.int64)
    got = ops.philox4x32_10(c.to(DEV), 0x9E3779B9, 0xDEADBEEF)
    assert got.device.type == torch.device(DEV).type
    assert torch.equal(got.cpu(), R.philox4x32_10(c, 0x9E3779B9, 0xDEADBEEF))


@pytest.mark.parametrize("n", ODD)
@pytest.mark.parametrize("T", [0, T_HALF])
def test_rademacher_and_mask_bit_exact(n, T):
    want = R.perturbation(2**40 + 11, n, RADE, tensor_id=7)
    if T:
        want = want * R.keep_mask(99, n, 7, T).to(want.dtype)
    assert torch.equal(_z(2**40 + 11, n, RADE, tid=7, mask_seed=99, T=T), want)


@pytest.mark.parametrize("n", ODD)
def test_gaussian_within_bound(n):
    err = (_z(5, n, GAUSS, tid=3).double() - R.gaussian_float64(5, n, tensor_id=3)).abs().max().item()
    assert err <= BOUND, err


def test_gaussian_large_sample_and_same_as_cpu_kernel_within_bound():
    n = 1 << 20
    z = _z(12345, n, GAUSS, tid=1)
    assert (z.double() - R.gaussian_float64(12345, n, tensor_id=1)).abs().max().item() <= BOUND
    cpu = torch.zeros(n)
    ops.perturb_([cpu], [1], 12345, 1.0, GAUSS, 0, 0)
    assert (z - cpu).abs().max().item() <= 2 * BOUND
    assert abs(z.mean().item()) < 5 / n ** 0.5 and abs(z.std().item() - 1) < 5e-3


def test_large_tensor_64bit_offsets_match_cpu_kernel():
    """Past 2^24 elements (and across many launch blocks): the same bits as the CPU kernel."""
    n = (1 << 25) + 3
    a = torch.zeros(n, device=DEV)
    ops.perturb_([a], [2], 77, 0.5, RADE, 3, T_HALF)
    b = torch.zeros(n)
    ops.perturb_([b], [2], 77, 0.5, RADE, 3, T_HALF)
    assert torch.equal(a.cpu(), b)


# ----------------------------------------------------------------------------- perturb_
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dist", [GAUSS, RADE])
def test_perturb_many_tensors_matches_reference(dtype, dist):
    g = torch.Generator().manual_seed(1)
    shapes = [(1,), (3, 5), (129,), (4097,), (64, 65), (7, 1, 9)] * 20      # 120 tensors, one call
    base = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    ids = list(range(0, 2 * len(shapes), 2))
    got = _on(base)
    ops.perturb_(got, ids, 31337, 1e-2, dist, 5, T_HALF)
    want = [t.clone() for t in base]
    R.perturb_(want, ids, 31337, 1e-2, dist, 5, T_HALF)
    for a, b in zip(_cpu(got), want):
        assert a.dtype == b.dtype
        if dist == RADE:
            assert torch.equal(a, b)
        else:   # one rounding of x + scale*z, z within BOUND: at most one ulp of the storage dtype
            ulp = torch.finfo(dtype).eps * b.float().abs().clamp_min(1e-2)
            assert ((a.float() - b.float()).abs() <= ulp + 1e-2 * BOUND).all()


def test_perturb_plus_minus_restores_fp32():
    p = torch.randn(100_003, device=DEV)
    p0 = p.clone()
    ops.perturb_([p], [0], 9, 1e-3, GAUSS, 0, 0)
    ops.perturb_([p], [0], 9, -1e-3, GAUSS, 0, 0)
    assert ((p - p0).abs() <= 2 * torch.finfo(torch.float32).eps * p0.abs().clamp_min(1e-3)).all()


# ----------------------------------------------------------------------------- updates
SGD_CASES = [
    dict(),
    dict(weight_decay=0.01, momentum=0.9, momentum_buf=True),
    dict(momentum=0.9, momentum_buf=True, nesterov=True, momentum_init=True),
    dict(history=True, history_alpha=0.7, restore_seed=1003, restore_scale=1e-3),
    dict(sign=True, restore_seed=5, restore_scale=-2e-3),
]
SHAPES = [(129,), (7, 9), (1,), (4097,), (300, 301)]


@pytest.mark.parametrize("cfg", SGD_CASES, ids=lambda c: "-".join(c) or "plain")
@pytest.mark.parametrize("dist", [GAUSS, RADE])
@pytest.mark.parametrize("q", [1, 4])
@pytest.mark.parametrize("T", [0, T_HALF])
def test_sgd_update_matches_reference(cfg, dist, q, T):
    g = torch.Generator().manual_seed(q * 10 + dist)
    ids = [0, 5, 9, 2**32 - 1, 11]
    seeds = [1000 + j for j in range(q)]
    coeffs = [0.3 * (j + 1) * (-1) ** j for j in range(q)]
    lists = [[torch.randn(s, generator=g) for s in SHAPES]]
    lists.append([torch.randn(s, generator=g) for s in SHAPES] if cfg.get("momentum_buf") else [])
    lists.append([torch.randn(s, generator=g) for s in SHAPES] if cfg.get("history") else [])
    got = [_on(lst) for lst in lists]
    want = [[t.clone() for t in lst] for lst in lists]
    ops.zo_sgd_update_(*_sgd_args(*got, ids, seeds, coeffs, dist, T, cfg))
    R.zo_sgd_update_(*_sgd_args(*want, ids, seeds, coeffs, dist, T, cfg))
    assert_sgd_matches(got, want, dist, cfg)


ADAM_CASES = [dict(), dict(weight_decay=0.1, decoupled=True, step=3),
              dict(history=True, history_alpha=0.9, step=7, restore_seed=77, restore_scale=1e-3),
              dict(sign=True, step=2)]


@pytest.mark.parametrize("cfg", ADAM_CASES, ids=lambda c: "-".join(c) or "plain")
@pytest.mark.parametrize("dist", [GAUSS, RADE])
@pytest.mark.parametrize("q", [1, 4])
@pytest.mark.parametrize("T", [0, T_HALF])
def test_adam_update_matches_reference(cfg, dist, q, T):
    g = torch.Generator().manual_seed(q)
    ids = [3, 1, 4, 0, 2]
    seeds = [77 + j for j in range(q)]
    coeffs = [0.1 * (j + 1) for j in range(q)]
    lists = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(2)]
    lists.append([torch.randn(s, generator=g).abs() for s in SHAPES])
    lists.append([torch.randn(s, generator=g) for s in SHAPES] if cfg.get("history") else [])
    got = [_on(lst) for lst in lists]
    want = [[t.clone() for t in lst] for lst in lists]
    ops.zo_adam_update_(*_adam_args(*got, ids, seeds, coeffs, dist, T, cfg))
    R.zo_adam_update_(*_adam_args(*want, ids, seeds, coeffs, dist, T, cfg))
    assert_adam_matches(got, want, dist, cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_updates_round_to_nearest_even(dtype):
    g = torch.Generator().manual_seed(3)
    shapes = [(1000,), (33,), (4097,)]
    lists = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(3)]
    cfg = dict(momentum=0.9, history_alpha=0.5, weight_decay=0.01, restore_seed=9, restore_scale=-0.01)
    got = [_on(lst) for lst in lists]
    want = [[t.clone() for t in lst] for lst in lists]
    ops.zo_sgd_update_(*_sgd_args(*got, [0, 1, 2], [4, 9], [0.5, -0.25], RADE, T_HALF, cfg))
    R.zo_sgd_update_(*_sgd_args(*want, [0, 1, 2], [4, 9], [0.5, -0.25], RADE, T_HALF, cfg))
    for a, b in zip(_cpu(sum(got, [])), sum(want, [])):
        assert a.dtype == dtype and torch.equal(a, b)


# ----------------------------------------------------------------------------- errors, opcheck
def test_mixed_devices_and_bad_inputs_raise():
    p = torch.zeros(8, device=DEV)
    other = "cpu" if DEV != "cpu" else "meta"
    with pytest.raises(ValueError, match=r"one device|is on (cpu|meta) but params\[0\] is on"):
        ops.zo_sgd_update_(*_sgd_args([p], [torch.zeros(8, device=other)], [], [0], [1], [0.5], RADE, 0,
                                      dict(momentum=0.9)))
    with pytest.raises(ValueError, match="contiguous"):
        ops.perturb_([torch.zeros(4, 4, device=DEV).t()], [0], 1, 1.0, RADE, 0, 0)
    with pytest.raises(ValueError, match="dtype"):
        ops.perturb_([torch.zeros(4, dtype=torch.float64, device=DEV)], [0], 1, 1.0, RADE, 0, 0)


def test_opcheck_every_op():
    c = torch.randint(0, 2**32, (8, 4), dtype=torch.int64, device=DEV)
    torch.library.opcheck(ops.philox4x32_10.default, (c, 3, 4))
    ps = [torch.randn(5, device=DEV), torch.randn(2, 3, dtype=torch.bfloat16, device=DEV)]
    torch.library.opcheck(ops.perturb_.default, (ps, [0, 1], 7, 0.1, 0, 3, T_HALF))
    p = [torch.randn(5, device=DEV), torch.randn(3, device=DEV)]
    b = [torch.randn(5, device=DEV), torch.randn(3, device=DEV)]
    torch.library.opcheck(ops.zo_sgd_update_.default,
                          _sgd_args(p, b, [], [0, 1], [1, 2], [0.5, -0.5], RADE, T_HALF, dict(momentum=0.9)))
    m = [torch.randn(5, device=DEV), torch.randn(3, device=DEV)]
    v = [torch.rand(5, device=DEV), torch.rand(3, device=DEV)]
    torch.library.opcheck(ops.zo_adam_update_.default,
                          _adam_args(p, m, v, [], [0, 1], [1], [0.5], GAUSS, 0, dict(step=2)))


# ----------------------------------------------------------------------------- optimizer on the device
def test_optimizer_on_device_equals_reference_backend():
    """ZOFusedSGD (momentum, wd, sparsity, history) with the compiled kernels vs the same
    optimizer on the pure-PyTorch backend, same device, same closure: bit-exact (Rademacher)."""
    from zeroflow.optim import ZOFusedSGD

    def run(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(DEV)
        x = torch.randn(64, 16, device=DEV)
        y = torch.randn(64, 1, device=DEV)
        opt = ZOFusedSGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-3, perturbation="rademacher",
                         sparsity=0.3, history=0.5, q=2, seed=11, backend=backend)
        for _ in range(10):
            opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        return [p.detach().cpu() for p in model.parameters()]

    compiled = "cuda" if DEV == "cuda" else "cpu"
    for a, b in zip(run(compiled), run("torch")):
        assert torch.equal(a, b)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA memory accounting")
def test_zo_step_extra_memory_is_constant():
    """ZOFusedSGD without momentum allocates nothing parameter-sized during a step."""
    from zeroflow.optim import ZOFusedSGD

    params = [torch.zeros(1 << 22, device=DEV, requires_grad=True) for _ in range(4)]   # 64 MiB
    opt = ZOFusedSGD(params, lr=1e-3, perturbation="gaussian")
    first = params[0]
    opt.step(lambda: first[0] * 2.0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    opt.step(lambda: first[0] * 2.0)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < (1 << 20)
