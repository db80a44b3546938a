"""The compiled CPU ops (csrc/ops.cpp) against the pure-PyTorch reference.

Spec: docs/perturbation-stream.md (stream v1) and docs/kernel-ops.md. Rademacher z, the
mask and all fp32 update arithmetic are bit-exact vs zfkernels.reference (same fp32 op
order, no contraction); the Gaussian differs only by log/sin/cos (bound 2^-18, §5).
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from zfkernels import _compiled
from tests.op_cases import GAUSS, RADE, T_HALF, assert_adam_matches, assert_sgd_matches
from tests.op_cases import adam_args as _adam_args
from tests.op_cases import sgd_args as _sgd_args
from zfkernels import reference as R

pytestmark = pytest.mark.skipif(
    not _compiled.cpu_available(), reason=f"compiled CPU ops missing: {_compiled.missing_reason('cpu')}"
)

ops = torch.ops.zfkernels if _compiled.cpu_available() else None
BOUND = 2.0**-18


def _perturb(params, ids, seed, scale, dist, mask_seed=0, T=0):
    ops.perturb_(params, ids, seed, scale, dist, mask_seed, T)


def _z(seed, n, dist, tid=0, mask_seed=0, T=0):
    out = torch.zeros(n)
    _perturb([out], [tid], seed, 1.0, dist, mask_seed, T)
    return out


# --------------------------------------------------------------------------------------
# §1 Philox
# --------------------------------------------------------------------------------------
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_kat(counter, key, expected):
    out = ops.philox4x32_10(torch.tensor([counter], dtype=torch.int64), *key)
    assert out.dtype == torch.int64 and out.shape == (1, 4)
    assert tuple(out[0].tolist()) == expected


def test_philox_matches_reference_random_counters():
    g = torch.Generator().manual_seed(1)
    c = torch.randint(0, 2**32, (1000, 4), generator=g, dtype=torch.int64)
    for key in ((0, 0), (12345, 2**32 - 1)):
        assert torch.equal(ops.philox4x32_10(c, *key), R.philox4x32_10(c, *key))
    assert ops.philox4x32_10(torch.empty(0, 4, dtype=torch.int64), 1, 2).shape == (0, 4)


# --------------------------------------------------------------------------------------
# §4-§6 perturb_: Rademacher / mask bit-exact, Gaussian within the bound
# --------------------------------------------------------------------------------------
ODD_NUMELS = [1, 3, 6, 127, 128, 129, 1023, 4097, 70001]


@pytest.mark.parametrize("n", ODD_NUMELS)
@pytest.mark.parametrize("T", [0, T_HALF])
def test_rademacher_bit_exact(n, T):
    p = torch.randn(n)
    q = p.clone()
    _perturb([p], [7], 2**40 + 5, 0.37, RADE, 99, T)
    R.perturb_([q], [7], 2**40 + 5, 0.37, RADE, 99, T)
    assert torch.equal(p, q)


@pytest.mark.parametrize("n", ODD_NUMELS)
def test_gaussian_within_bound(n):
    z = _z(2**62 + 3, n, GAUSS, tid=4)
    z64 = R.gaussian_float64(2**62 + 3, n, 4)
    err = (z.double() - z64).abs().max().item()
    assert err <= BOUND, err
    assert torch.allclose(z, R.gaussian(2**62 + 3, n, 4), rtol=0, atol=BOUND)


def test_gaussian_error_large_sample():
    n = 1 << 20
    z = _z(11, n, GAUSS)
    err = (z.double() - R.gaussian_float64(11, n, 0)).abs().max().item()
    assert err <= BOUND
    assert err < 2e-6  # measured ~7e-7
    assert abs(z.mean().item()) < 5e-3 and abs(z.var().item() - 1) < 5e-3


@pytest.mark.parametrize("T", [1, 12345, T_HALF, (1 << 24) - 1])
def test_mask_matches_reference(T):
    n = 5003
    z = _z(3, n, RADE, tid=2, mask_seed=17, T=T)
    keep = R.keep_mask(17, n, 2, T)
    assert torch.equal(z != 0, keep)
    assert torch.equal(z, R.rademacher(3, n, 2) * keep.float())


def test_mask_extremes_and_gaussian_mask():
    n = 4097
    assert (_z(3, n, RADE, T=0) != 0).all()
    assert (_z(3, n, RADE, mask_seed=5, T=1 << 24) == 0).all()
    zg = _z(3, n, GAUSS, tid=1, mask_seed=8, T=T_HALF)
    keep = R.keep_mask(8, n, 1, T_HALF)
    assert torch.equal(zg != 0, keep)
    frac = 1 - keep.float().mean().item()
    assert abs(frac - 0.5) < 0.05


def test_multidim_and_scale():
    p = torch.randn(3, 5, 7)
    q = p.clone()
    _perturb([p], [0], 9, -2.5, RADE)
    R.perturb_([q], [0], 9, -2.5, RADE, 0, 0)
    assert torch.equal(p, q)


def test_empty_lists_and_empty_tensors_are_noops():
    _perturb([], [], 1, 1.0, GAUSS)
    e = torch.empty(0)
    _perturb([e], [0], 1, 1.0, GAUSS)
    ops.zo_sgd_update_([], [], [], [], [1], [0.5], 0, 0, 0, 0, 0.0, 0.1, 0.0, 0.0, 0.0, False, False, False, 0.0, False)
    ops.zo_adam_update_([], [], [], [], [], [], [], 0, 0, 0, 0, 0.0, 0.1, 0.9, 0.999, 1e-8, 0.0, False, 1, False, 0.0, False)


def test_many_tensors_independent_of_list():
    g = torch.Generator().manual_seed(0)
    sizes = [int(s) for s in torch.randint(1, 3000, (50,), generator=g)]
    ids = [1000 + 3 * k for k in range(50)]
    ps = [torch.randn(s, generator=g) for s in sizes]
    for dist in (GAUSS, RADE):
        a = [p.clone() for p in ps]
        _perturb(a, ids, 77, 0.5, dist, 4, T_HALF)
        for k in (0, 17, 49):  # same result when the tensor is perturbed alone
            alone = ps[k].clone()
            _perturb([alone], [ids[k]], 77, 0.5, dist, 4, T_HALF)
            assert torch.equal(alone, a[k])
        if dist == RADE:
            b = [p.clone() for p in ps]
            R.perturb_(b, ids, 77, 0.5, dist, 4, T_HALF)
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_thread_count_invariance():
    n = 300_001
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = _z(5, n, GAUSS, mask_seed=3, T=T_HALF)
        torch.set_num_threads(max(2, old))
        b = _z(5, n, GAUSS, mask_seed=3, T=T_HALF)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a, b)
    # and slicing: element i of a long tensor == element i of a short one
    assert torch.equal(_z(5, 1000, GAUSS, mask_seed=3, T=T_HALF), a[:1000])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dist", [GAUSS, RADE])
def test_low_precision_round_trip(dtype, dist):
    p = torch.randn(4099).to(dtype)
    q = p.clone()
    _perturb([p], [3], 21, 0.01, dist, 6, T_HALF)
    R.perturb_([q], [3], 21, 0.01, dist, 6, T_HALF)
    assert p.dtype == dtype
    if dist == RADE:
        assert torch.equal(p, q)
    else:  # z differs by < 2^-18: at most one storage ulp apart, almost always equal
        ulp = torch.finfo(dtype).eps * q.float().abs().clamp_min(1e-3)
        assert ((p.float() - q.float()).abs() <= ulp).all()
        assert (p != q).float().mean().item() < 0.01


# --------------------------------------------------------------------------------------
# Fused updates vs reference
# --------------------------------------------------------------------------------------
SGD_CASES = [
    dict(),
    dict(weight_decay=0.01),
    dict(momentum=0.9, dampening=0.1, momentum_buf=True),
    dict(momentum=0.9, nesterov=True, momentum_buf=True, momentum_init=True),
    dict(momentum=0.5, nesterov=True, momentum_buf=True, weight_decay=0.1),
    dict(sign=True),
    dict(history=True, history_alpha=0.7),
    dict(history=True, history_alpha=0.7, history_init=True, sign=True),
    dict(restore_seed=123, restore_scale=-1e-3),
    dict(restore_seed=123, restore_scale=-1e-3, momentum=0.9, momentum_buf=True, history=True, history_alpha=0.3,
         weight_decay=0.01),
]


def _make(shape_list, dtype, g, buf_dtype=None):
    return [torch.randn(s, generator=g).to(buf_dtype or dtype) for s in shape_list]


@pytest.mark.parametrize("cfg", SGD_CASES, ids=lambda c: "-".join(f"{k}" for k in c) or "plain")
@pytest.mark.parametrize("dist", [GAUSS, RADE])
@pytest.mark.parametrize("q", [1, 4])
@pytest.mark.parametrize("T", [0, T_HALF])
def test_zo_sgd_update_matches_reference(cfg, dist, q, T):
    g = torch.Generator().manual_seed(q * 10 + dist)
    shapes = [(129,), (7, 9), (1,), (4097,)]
    ids = [0, 5, 9, 2**32 - 1]
    seeds = [1000 + j for j in range(q)]
    coeffs = [0.3 * (j + 1) * (-1) ** j for j in range(q)]
    base = _make(shapes, torch.float32, g)
    mom = _make(shapes, torch.float32, g) if cfg.get("momentum_buf") else []
    hist = _make(shapes, torch.float32, g) if cfg.get("history") else []
    state = [[t.clone() for t in lst] for lst in (base, mom, hist)]
    ref = [[t.clone() for t in lst] for lst in (base, mom, hist)]
    ops.zo_sgd_update_(*_sgd_args(*state, ids, seeds, coeffs, dist, T, cfg))
    R.zo_sgd_update_(*_sgd_args(*ref, ids, seeds, coeffs, dist, T, cfg))
    assert_sgd_matches(state, ref, dist, cfg)


@pytest.mark.parametrize("which", ["last", "first"])
@pytest.mark.parametrize("dist", [GAUSS, RADE])
@pytest.mark.parametrize("T", [0, T_HALF])
def test_restore_seed_equal_to_a_query_seed(which, dist, T):
    """The optimizer's usual call (restore_seed == seeds[q-1]): the kernel reuses the
    restore's z for that query. It must equal, bit for bit, the unfused sequence perturb_
    (restore) + update without restore, and the reference within the Gaussian bound."""
    g = torch.Generator().manual_seed(3 + dist)
    shapes = [(1000,), (33, 65), (1,)]
    ids = [0, 1, 7]
    seeds = [41, 42, 43, 44]
    rseed = seeds[-1] if which == "last" else seeds[0]
    coeffs = [0.5, -0.25, 1.5, -2.0]
    cfg = dict(restore_seed=rseed, restore_scale=1e-3, momentum=0.9, weight_decay=0.01)
    base = _make(shapes, torch.float32, g)
    mom = _make(shapes, torch.float32, g)
    fused = [[t.clone() for t in lst] for lst in (base, mom)]
    ops.zo_sgd_update_(*_sgd_args(fused[0], fused[1], [], ids, seeds, coeffs, dist, T, cfg))
    unfused = [[t.clone() for t in lst] for lst in (base, mom)]
    ops.perturb_(unfused[0], ids, rseed, 1e-3, dist, 31, T)
    ops.zo_sgd_update_(*_sgd_args(unfused[0], unfused[1], [], ids, seeds, coeffs, dist, T,
                                  dict(cfg, restore_seed=0, restore_scale=0.0)))
    ref = [[t.clone() for t in lst] for lst in (base, mom)]
    R.zo_sgd_update_(*_sgd_args(ref[0], ref[1], [], ids, seeds, coeffs, dist, T, cfg))
    for a_list, b_list, r_list in zip(fused, unfused, ref):
        for a, b, r in zip(a_list, b_list, r_list):
            assert torch.equal(a, b)
            if dist == RADE:
                assert torch.equal(a, r)
            else:
                torch.testing.assert_close(a, r, rtol=0, atol=1e-5)


ADAM_CASES = [
    dict(),
    dict(weight_decay=0.1),
    dict(weight_decay=0.1, decoupled=True),
    dict(sign=True, step=3),
    dict(history=True, history_alpha=0.9, step=7),
    dict(restore_seed=5, restore_scale=2e-3, weight_decay=0.01, decoupled=True, step=2),
]


@pytest.mark.parametrize("cfg", ADAM_CASES, ids=lambda c: "-".join(f"{k}" for k in c) or "plain")
@pytest.mark.parametrize("dist", [GAUSS, RADE])
@pytest.mark.parametrize("q", [1, 4])
@pytest.mark.parametrize("T", [0, T_HALF])
def test_zo_adam_update_matches_reference(cfg, dist, q, T):
    g = torch.Generator().manual_seed(q)
    shapes = [(3, 43), (1,), (4097,)]
    ids = [3, 1, 4]
    seeds = [77 + j for j in range(q)]
    coeffs = [0.1 * (j + 1) for j in range(q)]
    base = _make(shapes, torch.float32, g)
    m = _make(shapes, torch.float32, g)
    v = [t.abs() for t in _make(shapes, torch.float32, g)]
    hist = _make(shapes, torch.float32, g) if cfg.get("history") else []
    state = [[t.clone() for t in lst] for lst in (base, m, v, hist)]
    ref = [[t.clone() for t in lst] for lst in (base, m, v, hist)]
    ops.zo_adam_update_(*_adam_args(*state, ids, seeds, coeffs, dist, T, cfg))
    R.zo_adam_update_(*_adam_args(*ref, ids, seeds, coeffs, dist, T, cfg))
    assert_adam_matches(state, ref, dist, cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("buf_f32", [False, True])
def test_updates_low_precision_bit_exact_rademacher(dtype, buf_f32):
    g = torch.Generator().manual_seed(3)
    shapes = [(1000,), (33,)]
    bd = torch.float32 if buf_f32 else dtype
    p, mb, hb = _make(shapes, dtype, g), _make(shapes, dtype, g, bd), _make(shapes, dtype, g, bd)
    sgd_cfg = dict(momentum=0.9, momentum_buf=True, history=True, history_alpha=0.5, weight_decay=0.01,
                   restore_seed=9, restore_scale=-0.01)
    a = [[t.clone() for t in lst] for lst in (p, mb, hb)]
    b = [[t.clone() for t in lst] for lst in (p, mb, hb)]
    ops.zo_sgd_update_(*_sgd_args(*a, [0, 1], [4, 5], [0.5, -0.25], RADE, T_HALF, sgd_cfg))
    R.zo_sgd_update_(*_sgd_args(*b, [0, 1], [4, 5], [0.5, -0.25], RADE, T_HALF, sgd_cfg))
    for x, y in zip(sum(a, []), sum(b, [])):
        assert x.dtype == y.dtype and torch.equal(x, y)
    vb = [t.abs() for t in _make(shapes, dtype, g, bd)]
    a = [[t.clone() for t in lst] for lst in (p, mb, vb, hb)]
    b = [[t.clone() for t in lst] for lst in (p, mb, vb, hb)]
    cfg = dict(history=True, history_alpha=0.5, weight_decay=0.1, decoupled=True, step=4)
    ops.zo_adam_update_(*_adam_args(*a, [0, 1], [4], [0.5], RADE, 0, cfg))
    R.zo_adam_update_(*_adam_args(*b, [0, 1], [4], [0.5], RADE, 0, cfg))
    for x, y in zip(sum(a[1:], []), sum(b[1:], [])):  # m, v, h: bit-exact
        assert x.dtype == y.dtype and torch.equal(x, y)
    for x, y in zip(a[0], b[0]):  # params: reference sqrt is +-1 ulp (see above)
        ulp = torch.finfo(dtype).eps * y.float().abs()
        assert ((x.float() - y.float()).abs() <= ulp).all()
        assert (x != y).float().mean().item() < 0.01


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------
def _bad_perturb(params, ids=None, seed=1, dist=0, mask_seed=0, T=0):
    ops.perturb_(params, list(range(len(params))) if ids is None else ids, seed, 1.0, dist, mask_seed, T)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: _bad_perturb([torch.randn(4, 4).t()]), r"params\[0\] is not contiguous.*\.contiguous\(\)"),
        (lambda: _bad_perturb([torch.zeros(4, dtype=torch.int64)]), r"params\[0\] has dtype Long.*float32, bfloat16 or float16"),
        (lambda: _bad_perturb([torch.zeros(4), torch.zeros(4, dtype=torch.float64)]), r"params\[1\] has dtype Double"),
        (lambda: _bad_perturb([torch.zeros(4, dtype=torch.complex64)]), r"has dtype ComplexFloat"),
        (lambda: _bad_perturb([torch.eye(3).to_sparse()]), r"params\[0\] has layout Sparse.*dense"),
        (lambda: _bad_perturb([torch.zeros(4)], ids=[0, 1]), r"tensor_ids has 2 entries but params has 1"),
        (lambda: _bad_perturb([torch.zeros(4)], dist=2), r"dist=2 must be 0 \(gaussian\) or 1 \(rademacher\)"),
        (lambda: _bad_perturb([torch.zeros(4)], T=-1), r"mask_threshold=-1 is outside \[0, 2\*\*24\]"),
        (lambda: _bad_perturb([torch.zeros(4)], T=(1 << 24) + 1), r"mask_threshold=16777217"),
        (lambda: _bad_perturb([torch.zeros(4)], seed=-1), r"seed=-1 is negative"),
        (lambda: _bad_perturb([torch.zeros(4)], mask_seed=-5), r"mask_seed=-5 is negative"),
        (lambda: _bad_perturb([torch.zeros(4)], ids=[2**32]), r"tensor_ids\[0\]=4294967296 is outside \[0, 2\*\*32\)"),
        (lambda: _bad_perturb([torch.zeros(4)], ids=[-1]), r"tensor_ids\[0\]=-1"),
        (lambda: _bad_perturb([torch.zeros(4), torch.zeros(4, device="meta")]), r"must be on one device"),
        (lambda: ops.philox4x32_10(torch.zeros(2, 3, dtype=torch.int64), 0, 0), r"shape \[N, 4\]"),
        (lambda: ops.philox4x32_10(torch.zeros(2, 4), 0, 0), r"counters has dtype Float.*int64"),
        (lambda: ops.philox4x32_10(torch.full((1, 4), 2**32), 0, 0), r"\[0, 2\*\*32\)"),
        (lambda: ops.philox4x32_10(torch.zeros(1, 4, dtype=torch.int64), -1, 0), r"key0=-1"),
    ],
)
def test_bad_inputs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_update_inputs_raise():
    p = [torch.zeros(8)]
    with pytest.raises(ValueError, match=r"seeds has 2 entries but coeffs has 1"):
        ops.zo_sgd_update_(*_sgd_args(p, [], [], [0], [1, 2], [0.5], 0, 0, {}))
    with pytest.raises(ValueError, match=r"seeds\[0\]=-3 is negative"):
        ops.zo_sgd_update_(*_sgd_args(p, [], [], [0], [-3], [0.5], 0, 0, {}))
    with pytest.raises(ValueError, match=r"momentum_buffers has 2 tensors but params has 1"):
        ops.zo_sgd_update_(*_sgd_args(p, [torch.zeros(8)] * 2, [], [0], [1], [0.5], 0, 0, {}))
    with pytest.raises(ValueError, match=r"history_buffers\[0\] has shape \[4\] but params\[0\] has shape \[8\]"):
        ops.zo_sgd_update_(*_sgd_args(p, [], [torch.zeros(4)], [0], [1], [0.5], 0, 0, {}))
    bf = [torch.zeros(8, dtype=torch.bfloat16)]
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\] has dtype Half.*param's dtype or float32"):
        ops.zo_sgd_update_(*_sgd_args(bf, [torch.zeros(8, dtype=torch.float16)], [], [0], [1], [0.5], 0, 0, {}))
    with pytest.raises(ValueError, match=r"restore_seed=-1 is negative"):
        ops.zo_sgd_update_(*_sgd_args(p, [], [], [0], [1], [0.5], 0, 0, dict(restore_seed=-1)))
    with pytest.raises(ValueError, match=r"step=0 must be >= 1"):
        ops.zo_adam_update_(*_adam_args(p, [torch.zeros(8)], [torch.zeros(8)], [], [0], [1], [0.5], 0, 0, dict(step=0)))
    with pytest.raises(ValueError, match=r"exp_avgs has 0 tensors but params has 1"):
        ops.zo_adam_update_(*_adam_args(p, [], [torch.zeros(8)], [], [0], [1], [0.5], 0, 0, {}))


# --------------------------------------------------------------------------------------
# torch.library.opcheck (schema, fake/meta kernels, functionalization)
# --------------------------------------------------------------------------------------
def test_opcheck_philox():
    c = torch.randint(0, 2**32, (8, 4), dtype=torch.int64)
    torch.library.opcheck(ops.philox4x32_10.default, (c, 3, 4))


def test_opcheck_perturb():
    args = ([torch.randn(5), torch.randn(2, 3, dtype=torch.bfloat16)], [0, 1], 7, 0.1, 0, 3, T_HALF)
    torch.library.opcheck(ops.perturb_.default, args)


def test_opcheck_sgd():
    p = [torch.randn(5), torch.randn(3)]
    args = _sgd_args(p, [torch.randn(5), torch.randn(3)], [torch.randn(5), torch.randn(3)], [0, 1], [1, 2],
                     [0.5, -0.5], RADE, T_HALF, dict(momentum=0.9, history_alpha=0.5))
    torch.library.opcheck(ops.zo_sgd_update_.default, args)


def test_opcheck_adam():
    p = [torch.randn(5), torch.randn(3)]
    args = _adam_args(p, [torch.randn(5), torch.randn(3)], [torch.rand(5), torch.rand(3)], [], [0, 1], [1],
                      [0.5], GAUSS, 0, dict(step=2, weight_decay=0.1))
    torch.library.opcheck(ops.zo_adam_update_.default, args)


# --------------------------------------------------------------------------------------
# The CUDA extension is built wherever nvcc exists
# --------------------------------------------------------------------------------------
def _nvcc_present() -> bool:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return (os.path.exists(os.path.join(home, "bin", "nvcc")) or shutil.which("nvcc") is not None) and bool(
        torch.version.cuda
    )


@pytest.mark.skipif(not _nvcc_present(), reason="no nvcc / CPU-only torch: the CUDA extension is not built here")
@pytest.mark.skipif(os.environ.get("ZEROFLOW_BUILD_CUDA") == "0", reason="ZEROFLOW_BUILD_CUDA=0")
def test_cuda_extension_built_and_registered():
    assert _compiled.cuda_built(), _compiled.missing_reason("cuda")
    import zfkernels._C_cuda  # noqa: F401

    for name in ("philox4x32_10", "perturb_", "zo_sgd_update_", "zo_adam_update_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"zfkernels::{name}", "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"zfkernels::{name}", "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"zfkernels::{name}", "Meta"), name


def test_loader_reports_build_command():
    assert "pip install --no-build-isolation -e ." in _compiled.missing_reason("cuda")
    assert _compiled.cpu_available()
