"""One parity suite for every backend: z, masks, ops and optimizer trajectories are equal,
bit for bit, to the pure-PyTorch reference on the CPU (zfkernels/reference.py), which states
docs/perturbation-stream.md and docs/kernel-ops.md ("Arithmetic") in plain tensor code.

The backends under test are the ones present (as bitsandbytes and torchao parametrize over
devices): on a CPU machine ``cpu`` (compiled) and ``triton`` (the interpreter on CPU
tensors); with a GPU also ``cuda`` (compiled), ``triton`` natively and ``torch`` (the
reference itself running on the GPU). Every case lives in one table below and runs on each
backend; results are compared as raw bits (``-0.0 != +0.0``, no tolerance anywhere).

Native Triton compiles once per storage dtypes and compile-time options (the update kernels'
DIST, RESTORE, SPARSE, ONE_QUERY: zfkernels/triton/_update.py; every other option is a runtime
scalar): the triton cases of this file, test_optim_layout, test_stochastic_rounding and
test_triton_dist_contracts launch 71 distinct kernels (58 of them update kernels; 25 and 12 while
those four were runtime scalars), 0.3-0.7 s each on an H200, so the suite fits a GPU lease; in the
interpreter each program instance costs ~10 ms, hence large blocks and small tensors here.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
import pytest
import torch

import zfkernels as zk
from zfkernels import _compiled, opspec
from conftest import backend_params
from zfkernels import reference as R
from zfkernels import stream as S

GAUSS, RADE = "gaussian", "rademacher"
HALF = 0.5                       # sparsity: half the coordinates zeroed
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
GPU = torch.cuda.is_available()


BACKENDS = backend_params(reference_on_cpu=False)
COMPILED = [p for p in BACKENDS if p.values[0][0] in ("cpu", "cuda")]
NEEDS_TRITON = pytest.mark.skipif(not any(p.values[0][0] == "triton" and not p.marks for p in BACKENDS),
                                  reason="no Triton backend here (or it cannot run: see the triton-interp skips)")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _kw(backend_device, **kw):
    """Keyword arguments for the zfkernels face; block_size for the interpreter."""
    return dict(kw, backend=backend_device[0])


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw IEEE bits of a float tensor (so -0.0 != +0.0 and NaN payloads count)."""
    t = t.detach().cpu().contiguous()
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bits_equal(got, want, what=""):
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape)
    gb, wb = bits(got), bits(want)
    if not torch.equal(gb, wb):
        bad = (gb != wb).reshape(-1)
        k = int(bad.nonzero()[0])
        g, w = got.detach().cpu().reshape(-1).float(), want.detach().cpu().reshape(-1).float()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ in their bits; "
                             f"first at {k}: got {g[k].item()!r}, want {w[k].item()!r}; "
                             f"max |diff| {(g - w).abs().nan_to_num().max().item():.3g}")


def assert_all_bits_equal(got_lists, want_lists, what):
    for li, (gl, wl) in enumerate(zip(got_lists, want_lists)):
        assert len(gl) == len(wl)
        for k, (g, w) in enumerate(zip(gl, wl)):
            assert_bits_equal(g, w, f"{what} list {li} tensor {k}")


# ======================================================================================
# The cases (one table for every backend)
# ======================================================================================
SHAPES = [(4097,), (3, 43), (1,), (129,)]        # odd sizes: partial quads, rows, tiles
IDS = [0, 7, 9, 2**32 - 1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

Z_CASES = [(dist, dt, sp) for dist in (GAUSS, RADE) for dt in DTYPES for sp in (0.0, HALF)]

# name -> (param dtype, buffer dtype, q, steps, options). Buffers are momentum/history (SGD)
# or m/v/history (Adam). "restore" = the optimizer's fused restore of the last query;
# "restore_other" = a restore whose seed is none of the queries (conserve's moves).
SGD_CASES = {
    "plain":            ("fp32", "fp32", 1, dict()),
    "plain_q3":         ("fp32", "fp32", 3, dict()),
    "weight_decay":     ("fp32", "fp32", 1, dict(weight_decay=0.1)),
    "momentum":         ("fp32", "fp32", 1, dict(momentum=0.9, dampening=0.1)),
    "momentum_init":    ("fp32", "fp32", 2, dict(momentum=0.9, init_first=True)),
    "nesterov_wd":      ("fp32", "fp32", 1, dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sign":             ("fp32", "fp32", 1, dict(sign=True, sparsity=HALF)),
    "history":          ("fp32", "fp32", 2, dict(history_alpha=0.7, init_first=True)),
    "sparse_restore":   ("fp32", "fp32", 2, dict(sparsity=HALF, restore=True, momentum=0.5)),
    "restore_other":    ("fp32", "fp32", 1, dict(restore_other=True, weight_decay=0.05)),
    "everything":       ("fp32", "fp32", 3, dict(sparsity=0.25, restore=True, momentum=0.9, nesterov=True,
                                                 weight_decay=0.05, sign=True, history_alpha=0.3)),
    "bf16_everything":  ("bf16", "bf16", 2, dict(sparsity=0.25, restore=True, momentum=0.9, nesterov=True,
                                                 weight_decay=0.05, history_alpha=0.3)),
    "bf16_fp32_bufs":   ("bf16", "fp32", 1, dict(restore=True, momentum=0.9, history_alpha=0.5)),
    "fp16_everything":  ("fp16", "fp16", 2, dict(sparsity=HALF, restore=True, momentum=0.9, weight_decay=0.01,
                                                 sign=True, history_alpha=0.3)),
    # §9 stochastic rounding of the parameter stores; fp16 parameters down in the subnormal
    # range (below 2^-14) and up at the overflow threshold (65504) as well
    "bf16_sr":          ("bf16", "bf16", 2, dict(sr=True, restore=True, momentum=0.9, weight_decay=0.01)),
    "fp16_sr_tiny":     ("fp16", "fp32", 1, dict(sr=True, param_scale=2e-5, sparsity=0.25)),
    "fp16_sr_huge":     ("fp16", "fp16", 1, dict(sr=True, param_scale=3e4, restore=True)),
    "fp32_sr":          ("fp32", "fp32", 1, dict(sr=True)),            # no effect on fp32
}
ADAM_CASES = {
    "adam":             ("fp32", "fp32", 1, dict()),
    "adam_q3":          ("fp32", "fp32", 3, dict(restore=True)),
    "adam_l2":          ("fp32", "fp32", 1, dict(weight_decay=0.1)),
    "adamw":            ("fp32", "fp32", 1, dict(weight_decay=0.1, decoupled=True)),
    "sign":             ("fp32", "fp32", 1, dict(sign=True, restore=True)),
    "history":          ("fp32", "fp32", 2, dict(history_alpha=0.9, init_first=True, weight_decay=0.01)),
    "sparse_adamw":     ("fp32", "fp32", 2, dict(sparsity=HALF, restore=True, weight_decay=0.01, decoupled=True)),
    "restore_other":    ("fp32", "fp32", 1, dict(restore_other=True)),
    "bf16_fp32_moments": ("bf16", "fp32", 2, dict(restore=True, weight_decay=0.1, decoupled=True)),
    "fp16_everything":  ("fp16", "fp16", 2, dict(sparsity=0.25, restore=True, weight_decay=0.01, sign=True,
                                                 history_alpha=0.5)),
    "bf16_sr_adamw":    ("bf16", "fp32", 2, dict(sr=True, restore=True, weight_decay=0.1, decoupled=True)),
    "fp16_sr_tiny":     ("fp16", "fp16", 1, dict(sr=True, param_scale=2e-5, sign=True)),
}
STEPS = 3
EPS = 1e-3
COEFFS = [0.37, -1.25, 2.5e-3]


def _start(pdt, bdt, nbuf, seed, param_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = [(torch.randn(s, generator=g) * param_scale).to(DTYPES[pdt]) for s in SHAPES]
    bufs = [[(torch.randn(s, generator=g) * 0.1).to(DTYPES[bdt]) for s in SHAPES] for _ in range(nbuf)]
    return params, bufs


def _rounding(o, step):
    if not o.get("sr"):
        return {}
    return dict(stochastic_rounding=True, round_seed=S.derive_seed(12345, step, S.QUERY_ROUNDING))


def _queries(step, q):
    return [S.derive_seed(12345, step, j) for j in range(q)], COEFFS[:q]


def _perturb_queries(params, seeds, dist, mask_seed, sparsity, kw):
    """The two-sided query protocol of the optimizer: +eps, -2eps, and +eps back for all but
    the last query, whose restore the update fuses (restore_seed = seeds[-1])."""
    for j, s in enumerate(seeds):
        zk.perturb_(params, s, EPS, dist, tensor_ids=IDS, mask_seed=mask_seed, sparsity=sparsity, **kw)
        zk.perturb_(params, s, -2 * EPS, dist, tensor_ids=IDS, mask_seed=mask_seed, sparsity=sparsity, **kw)
        if j < len(seeds) - 1:
            zk.perturb_(params, s, EPS, dist, tensor_ids=IDS, mask_seed=mask_seed, sparsity=sparsity, **kw)


def _restore(o, seeds, params, dist, mask_seed, sparsity, kw):
    if o.get("restore"):
        return dict(restore_seed=seeds[-1], restore_scale=EPS)
    if o.get("restore_other"):
        zk.perturb_(params, 999, -0.5 * EPS, dist, tensor_ids=IDS, mask_seed=mask_seed, sparsity=sparsity, **kw)
        return dict(restore_seed=999, restore_scale=0.5 * EPS)
    return {}


def sgd_trajectory(case, dist, kw, device):
    pdt, bdt, q, o = SGD_CASES[case]
    params, (mom, hist) = _start(pdt, bdt, 2, seed=len(case), param_scale=o.get("param_scale", 1.0))
    params, mom, hist = ([t.to(device) for t in lst] for lst in (params, mom, hist))
    mom = mom if o.get("momentum") else []
    hist = hist if "history_alpha" in o else []
    sp = o.get("sparsity", 0.0)
    for step in range(STEPS):
        seeds, coeffs = _queries(step, q)
        mask_seed = S.derive_seed(12345, step, S.QUERY_MASK_PER_STEP)
        if o.get("restore"):
            _perturb_queries(params, seeds, dist, mask_seed, sp, kw)
        restore = _restore(o, seeds, params, dist, mask_seed, sp, kw)
        first = o.get("init_first", False) and step == 0
        zk.zo_sgd_update_(params, seeds, coeffs, lr=0.05, dist=dist, tensor_ids=IDS, momentum_buffers=mom,
                          history_buffers=hist, mask_seed=mask_seed, sparsity=sp,
                          weight_decay=o.get("weight_decay", 0.0), momentum=o.get("momentum", 0.0),
                          dampening=o.get("dampening", 0.0), nesterov=o.get("nesterov", False),
                          momentum_init=first and bool(mom), sign=o.get("sign", False),
                          history_alpha=o.get("history_alpha", 0.0), history_init=first and bool(hist),
                          **_rounding(o, step), **restore, **kw)
    return [params, mom, hist]


def adam_trajectory(case, dist, kw, device):
    pdt, bdt, q, o = ADAM_CASES[case]
    params, (m, v, hist) = _start(pdt, bdt, 3, seed=len(case) + 100, param_scale=o.get("param_scale", 1.0))
    v = [t.abs() for t in v]
    params, m, v, hist = ([t.to(device) for t in lst] for lst in (params, m, v, hist))
    hist = hist if "history_alpha" in o else []
    sp = o.get("sparsity", 0.0)
    for step in range(1, STEPS + 1):
        seeds, coeffs = _queries(step, q)
        mask_seed = S.derive_seed(12345, step, S.QUERY_MASK_PER_STEP)
        if o.get("restore"):
            _perturb_queries(params, seeds, dist, mask_seed, sp, kw)
        restore = _restore(o, seeds, params, dist, mask_seed, sp, kw)
        zk.zo_adam_update_(params, m, v, seeds, coeffs, lr=1e-2, step=step, betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=o.get("weight_decay", 0.0),
                           decoupled_weight_decay=o.get("decoupled", False), dist=dist, tensor_ids=IDS,
                           history_buffers=hist, mask_seed=mask_seed, sparsity=sp, sign=o.get("sign", False),
                           history_alpha=o.get("history_alpha", 0.0),
                           history_init=o.get("init_first", False) and step == 1, **_rounding(o, step),
                           **restore, **kw)
    return [params, m, v, hist]


@functools.lru_cache(maxsize=None)
def _reference(kind, case, dist):
    run = sgd_trajectory if kind == "sgd" else adam_trajectory
    return run(case, dist, dict(backend="torch"), "cpu")


# ======================================================================================
# §1-§6: Philox, z and the mask
# ======================================================================================
KAT = [  # Random123 kat_vectors, philox4x32 10: counter, key, expected output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_philox_known_answers_and_random_counters(backend):
    be, dev = backend
    for ctr, key, want in KAT:
        out = zk.philox4x32_10(torch.tensor([ctr], dtype=torch.int64, device=dev), key, backend=be)
        assert out.dtype == torch.int64 and tuple(out[0].tolist()) == want
    g = torch.Generator().manual_seed(1)
    c = torch.randint(0, 2**32, (3000, 4), generator=g, dtype=torch.int64)
    c[0] = torch.tensor([0xFFFFFFFF, 0, 0xFFFFFFFF, 0x80000000])
    for key in ((0, 0), (0x9E3779B9, 0xDEADBEEF)):
        assert torch.equal(zk.philox4x32_10(c.to(dev), key, backend=be).cpu(), R.philox4x32_10(c, *key))
    assert zk.philox4x32_10(torch.zeros(0, 4, dtype=torch.int64, device=dev), (1, 2), backend=be).shape == (0, 4)


@pytest.mark.parametrize("dist,dtype,sparsity", Z_CASES)
def test_z_bit_identical(backend, dist, dtype, sparsity):
    """perturb_ on a multi-tensor list (odd sizes, ids up to 2^32-1, a 63-bit seed) equals the
    reference bit for bit: Gaussian and Rademacher, fp32/bf16/fp16 storage, with and without
    the mask."""
    be, dev = backend
    g = torch.Generator().manual_seed(7)
    base = [(torch.randn(s, generator=g) * 2).to(DTYPES[dtype]) for s in SHAPES]
    got = [t.to(dev, copy=True) for t in base]
    zk.perturb_(got, 2**63 - 25, 0.37, dist, tensor_ids=IDS, mask_seed=99, sparsity=sparsity, backend=be)
    want = [t.clone() for t in base]
    zk.perturb_(want, 2**63 - 25, 0.37, dist, tensor_ids=IDS, mask_seed=99, sparsity=sparsity, backend="torch")
    assert_all_bits_equal([got], [want], f"perturb_ {dist} {dtype} sparsity={sparsity}")
    z = zk.perturbation(2**40 + 11, 70001, dist, tensor_id=5, device=dev, backend=be, mask_seed=3, sparsity=sparsity)
    want_z = zk.perturbation(2**40 + 11, 70001, dist, tensor_id=5, backend="torch", mask_seed=3, sparsity=sparsity)
    assert_bits_equal(z, want_z, "perturbation() 70001 elements")


def test_z_independent_of_list_order_count_and_slicing(backend):
    be, dev = backend
    for dist in (GAUSS, RADE):
        kw = dict(mask_seed=4, sparsity=0.125, backend=be)
        a, b, c, e = (torch.zeros(s, device=dev) for s in ((4097,), (3, 43), (1,), (0,)))
        zk.perturb_([a, b, e, c], 31337, 1.0, dist, tensor_ids=[0, 1, 7, 2], **kw)
        a2, b2, c2 = torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(c)
        zk.perturb_([c2, b2, a2], 31337, 1.0, dist, tensor_ids=[2, 1, 0], **kw)
        for x, y in ((a, a2), (b, b2), (c, c2)):
            assert_bits_equal(x, y, "reordered list")
        short = zk.perturbation(31337, 129, dist, tensor_id=1, device=dev, **kw)
        assert_bits_equal(short, b.reshape(-1)[:129], "prefix of the same stream")
        big = torch.zeros(2, 4097, device=dev)
        zk.perturb_([big[0]], 31337, 1.0, dist, tensor_ids=[0], **kw)        # a contiguous slice
        assert_bits_equal(big[0], a, "slice")
        assert not big[1].any()


def test_many_tensors_in_one_launch(backend):
    """120 tensors of odd shapes in one call: each equals the tensor perturbed alone."""
    be, dev = backend
    g = torch.Generator().manual_seed(1)
    shapes = [(1,), (3, 5), (129,), (7, 1, 9), (2, 65)] * 24
    ids = list(range(0, 2 * len(shapes), 2))
    base = [torch.randn(s, generator=g) for s in shapes]
    got = [t.to(dev, copy=True) for t in base]
    zk.perturb_(got, 5, 1e-2, GAUSS, tensor_ids=ids, mask_seed=5, sparsity=HALF, backend=be)
    want = [t.clone() for t in base]
    zk.perturb_(want, 5, 1e-2, GAUSS, tensor_ids=ids, mask_seed=5, sparsity=HALF, backend="torch")
    assert_all_bits_equal([got], [want], "120-tensor list")


def test_low_precision_stores_round_to_nearest_even(backend):
    """§7: fp32 arithmetic, one round-to-nearest-even store; exact ties go to even."""
    be, dev = backend
    x = torch.tensor([1.0, 1.0 + 2**-7, 2.0, -1.0, 3.0e38, 1e-30, 0.0, -0.0] * 4 + [float("nan")])
    z = R.rademacher(0, x.numel(), 0)                    # +-1, exact
    for dtype, half_ulp in ((torch.bfloat16, 2**-8), (torch.float16, 2**-11)):
        p = x.to(dtype).to(dev)
        zk.perturb_([p], 0, half_ulp, RADE, backend=be)    # 1 + 2^-8 (bf16) / 1 + 2^-11 (fp16): ties
        want = (x.to(dtype).float() + z * half_ulp).to(dtype)
        assert_bits_equal(p[:-1], want[:-1], f"{dtype} ties")
        assert p[-1].isnan(), "a NaN stays NaN through the rounded store"


def test_low_precision_subnormals_load_and_store_exactly(backend):
    """bf16 / fp16 subnormal parameters and buffers are loaded exactly (a subnormal is a
    normal fp32 value) and results that round into the subnormal range are stored as
    subnormals: every backend equals the reference. Triton's interpreter flushed bf16
    subnormals to zero in its conversion (its _convert_float; found by a differential fuzz):
    the Triton kernels load bf16 by its bits (zfkernels/triton/_update.py load_f32), so the
    interpreter runs this case too."""
    be, dev = backend
    for dtype in (torch.bfloat16, torch.float16):
        tiny = torch.finfo(dtype).smallest_normal
        x = torch.tensor([tiny / 2, -tiny / 4, tiny / 128, tiny * 0.75, tiny, -tiny, 0.0, 1.0] * 16).to(dtype)
        assert (x.float().abs() < tiny).sum() > 0 and (x != 0).sum() > 0
        for scale in (tiny / 8, 0.0):
            got, want = x.clone().to(dev), x.clone()
            zk.perturb_([got], 5, scale, RADE, backend=be)
            zk.perturb_([want], 5, scale, RADE, backend="torch")
            assert ((want.float().abs() < tiny) & (want != 0)).sum() >= 64     # subnormals stored, not flushed
            assert_bits_equal(got, want, f"{dtype} perturb_ scale {scale}")
        p, buf = x.clone().to(dev), x.flip(0).clone().to(dev)
        pr, bufr = x.clone(), x.flip(0).clone()
        kw = dict(lr=tiny / 4, momentum=0.5, dist=RADE)
        zk.zo_sgd_update_([p], [3], [0.75], momentum_buffers=[buf], backend=be, **kw)
        zk.zo_sgd_update_([pr], [3], [0.75], momentum_buffers=[bufr], backend="torch", **kw)
        assert_bits_equal(p, pr, f"{dtype} zo_sgd_update_ params")
        assert_bits_equal(buf, bufr, f"{dtype} zo_sgd_update_ momentum")


def test_mask_keeps_the_element_at_the_threshold(backend):
    """docs/perturbation-stream.md §6: m_i = 0 iff (x >> 8) < T. With T equal to an element's
    24-bit value (taken from the spec's Philox words), perturb_ on every backend perturbs that
    element and leaves exactly the elements below T at 0; a kernel comparing '>' instead of
    '>=' leaves it at 0 too (and so would the reference, which the bits are compared with)."""
    be, dev = backend
    n, tid, ms = 16, 3, 7
    key = S.split_seed(ms)
    vals = [S.philox4x32_10_scalar((i >> 2, 0, tid, S.TAG_MASK), key)[i & 3] >> 8 for i in range(n)]
    for k in (0, 5, 13):
        T = vals[k]
        got = torch.zeros(n, device=dev)
        _op(be, "perturb_")(**_perturb([got], ids=[tid], seed=11, dist=1, mask_seed=ms, T=T))   # Rademacher: +-1
        assert (got != 0).cpu().tolist() == [v >= T for v in vals] and got[k].item() != 0
        want = torch.zeros(n)
        R.perturb_(**_perturb([want], ids=[tid], seed=11, dist=1, mask_seed=ms, T=T))
        assert_bits_equal(got, want, f"perturb_ mask_threshold = element {k}'s value")


def test_empty_lists_tensors_and_q0(backend):
    be, dev = backend
    zk.perturb_([], 1, 1.0, backend=be)
    e = torch.empty(0, device=dev)
    zk.perturb_([e], 1, 1.0, backend=be)
    p = torch.randn(129, device=dev)
    p0 = p.clone()
    zk.zo_sgd_update_([p], [], [], lr=0.1, backend=be)                      # q = 0: g = 0
    assert_bits_equal(p, p0, "q=0")
    zk.zo_sgd_update_([], [1], [0.5], lr=0.1, backend=be)
    zk.zo_adam_update_([], [], [], [], [], lr=0.1, step=1, backend=be)


# ======================================================================================
# Fused updates: N-step trajectories, every variant, bit-identical
# ======================================================================================
@pytest.mark.parametrize("dist", [GAUSS, RADE])
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_trajectory_bit_identical(backend, case, dist):
    be, dev = backend
    got = sgd_trajectory(case, dist, dict(backend=be), dev)
    assert_all_bits_equal(got, _reference("sgd", case, dist), f"zo_sgd_update_ {case} {dist}")


@pytest.mark.parametrize("dist", [GAUSS, RADE])
@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam_trajectory_bit_identical(backend, case, dist):
    be, dev = backend
    got = adam_trajectory(case, dist, dict(backend=be), dev)
    assert_all_bits_equal(got, _reference("adam", case, dist), f"zo_adam_update_ {case} {dist}")


def test_adam_bias_correction_sqrt_is_correctly_rounded(backend):
    """sqrt(bc2) is the correctly rounded float64 sqrt on every backend (kernel-ops.md, step
    7): the reference and Triton computed bc2 ** 0.5 (libm pow), one fp32 ulp off sqrt for
    this beta2, and their weight came out 0x3fffffff against the compiled ops' 0x40000000
    (a differential fuzz's find). The expected value is the spec in numpy float32 arithmetic."""
    be, dev = backend
    beta1, beta2, n = 0.9, 0.0018232491262385464, 64
    f = np.float32
    g = R.rademacher(123, n, 0).numpy()                                  # coeff 1: g = z
    m_want = f(0.0) + (g - f(0.0)) * f(1.0 - beta1)
    v_want = f(0.0) * f(beta2) + (g * g) * f(1.0 - beta2)
    denom = np.sqrt(v_want) / f(math.sqrt(1.0 - beta2)) + f(0.0)
    want = f(1.0) - (m_want / denom) * f(1.0 / (1.0 - beta1))
    for b in (be, "torch"):             # the reference too (no backend of its own in this table)
        p = torch.ones(n, device=dev)
        m, v = torch.zeros_like(p), torch.zeros_like(p)
        zk.zo_adam_update_([p], [m], [v], [123], [1.0], lr=1.0, step=1, betas=(beta1, beta2), eps=0.0, dist=RADE,
                           backend=b)
        assert_bits_equal(p, torch.from_numpy(want), f"{b} theta")
        assert_bits_equal(v, torch.from_numpy(v_want), f"{b} v")


def test_stochastic_rounding_keeps_updates_below_half_an_ulp(backend):
    """An update far below half a bf16 ulp: round-to-nearest drops all of it, stochastic
    rounding (§9) keeps it in expectation: the mean change over 2^16 weights matches the fp32
    update within a few standard errors, and no weight moves by more than one ulp."""
    be, dev = backend
    n = 1 << 16
    p0 = torch.full((n,), 1.0, dtype=torch.bfloat16)          # ulp 2^-7 above 1.0, 2^-8 below
    lr = 2.0**-12                                             # |update| = lr * |z| = lr: 1/32 ulp
    kw = dict(lr=lr, dist=RADE, backend=be)
    rne = p0.clone().to(dev)
    zk.zo_sgd_update_([rne], [5], [1.0], **kw)
    assert torch.equal(rne.cpu(), p0), "round-to-nearest keeps no part of the update"
    sr = p0.clone().to(dev)
    zk.zo_sgd_update_([sr], [5], [1.0], stochastic_rounding=True, round_seed=77, **kw)
    want = p0.float() - lr * R.rademacher(5, n, 0)
    got = sr.cpu().float()
    step = (want - p0.float()).abs()
    assert ((got - p0.float()).abs() <= 2.0**-7).all()
    moved = got != p0.float()
    assert 0.0 < moved.float().mean().item() < 0.1            # ~1/16 of the weights move (1/32 up, 1/16 down)
    err = (got - want).mean().item()
    assert abs(err) < 4 * 2.0**-8 / n ** 0.5, err
    assert step.mean().item() == lr


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param(("torch", "cpu"), id="torch-cpu")])
def test_fp16_stochastic_rounding_of_2_pow_16_or_more_is_inf(backend):
    """§9: an fp16 result of 2^16 or more becomes inf, as round-to-nearest makes it. The parity
    trajectories never push a finite weight that far: a Triton kernel that stored NaN bits for
    |x| >= 2^16 (its overflow test off by one binade) passed them. Here x = p -+ 10^4 from
    p = +-60000 and +-65504: inf where |x| >= 2^16, finite elsewhere, with and without §9."""
    be, dev = backend
    start = torch.tensor([60000.0, -60000.0, 65504.0, -65504.0, 1.0] * 60).half()
    n = start.numel()
    want = start.float() - R.rademacher(5, n, 0) * 1e4
    over = want.abs() >= 2.0**16
    assert over.any() and (~over).any()
    for sr in (False, True):
        p = start.clone().to(dev)
        zk.zo_sgd_update_([p], [5], [1.0], lr=1e4, dist=RADE, stochastic_rounding=sr, round_seed=77, backend=be)
        got = p.cpu().float()
        assert torch.equal(got[over], torch.where(want[over] > 0, float("inf"), -float("inf"))), (sr, got[over][:8])
        assert torch.isfinite(got[~over]).all(), sr


def test_restore_reuse_equals_unfused_sequence(backend):
    """The kernels reuse the restore's z for the query with the same seed: the fused call must
    equal perturb_ (restore) followed by an update without restore, bit for bit."""
    be, dev = backend
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(s, generator=g) for s in SHAPES]
    mom = [torch.randn(s, generator=g) for s in SHAPES]
    seeds, coeffs = [41, 42, 43], [0.5, -0.25, 1.5]
    for dist in (GAUSS, RADE):
        for rseed in (seeds[-1], seeds[0]):
            kw = dict(lr=0.05, dist=dist, tensor_ids=IDS, mask_seed=31, sparsity=HALF, weight_decay=0.01,
                      momentum=0.9, backend=be)
            fused = [[t.to(dev, copy=True) for t in lst] for lst in (base, mom)]
            zk.zo_sgd_update_(fused[0], seeds, coeffs, momentum_buffers=fused[1], restore_seed=rseed,
                              restore_scale=1e-3, **kw)
            unfused = [[t.to(dev, copy=True) for t in lst] for lst in (base, mom)]
            zk.perturb_(unfused[0], rseed, 1e-3, dist, tensor_ids=IDS, mask_seed=31, sparsity=HALF, backend=be)
            zk.zo_sgd_update_(unfused[0], seeds, coeffs, momentum_buffers=unfused[1], **kw)
            assert_all_bits_equal(fused, unfused, f"fused restore {dist} seed {rseed}")


LAYOUT_SHAPES = [(1600,), (0,), (3, 43), (1,), (1031,), (129,), (700,)]
LAYOUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16,
                 torch.float32]
LAYOUT_MISALIGNED = (4, 6)   # views one element into a larger buffer: not 16-byte aligned


def _placed(t, device, misaligned):
    if not misaligned:
        return t.to(device, copy=True)
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def test_layouts_mixed_dtypes_misaligned_views_and_many_queries(backend):
    """A list that exercises the multi-tensor launch layout — mixed parameter dtypes in one call
    (one launch per dtype on CUDA), an empty tensor between others, tensors whose data pointer is
    not 16-byte aligned, sizes that end inside a quad, a 128-element row and a warp task — run
    through every op with q = 17 queries (more than the CUDA kernels pass in their parameters)
    and a restore whose seed is the 8th query's: equal to the reference bit for bit."""
    be, dev = backend
    g = torch.Generator().manual_seed(11)
    base = [torch.randn(s, generator=g).to(dt) for s, dt in zip(LAYOUT_SHAPES, LAYOUT_DTYPES)]
    ids = [3 * k + 1 for k in range(len(base))]
    mom = [torch.randn(p.shape, generator=g) for p in base]          # fp32 buffers for every dtype
    exp_avg = [torch.randn(p.shape, generator=g) for p in base]
    exp_avg_sq = [torch.rand(p.shape, generator=g) for p in base]
    q = 17
    seeds = [S.derive_seed(777, 0, j) for j in range(q)]
    coeffs = [((-1) ** j) * (0.25 + j / 16) for j in range(q)]

    def run(backend_name, device):
        ps = [_placed(t, device, k in LAYOUT_MISALIGNED) for k, t in enumerate(base)]
        ms, ea, eq = ([t.to(device, copy=True) for t in lst] for lst in (mom, exp_avg, exp_avg_sq))
        for dist in (GAUSS, RADE):
            zk.perturb_(ps, seeds[7], 1e-3, dist, tensor_ids=ids, mask_seed=5, sparsity=0.25, backend=backend_name)
            zk.zo_sgd_update_(ps, seeds, coeffs, lr=0.01, dist=dist, tensor_ids=ids, momentum_buffers=ms,
                              momentum=0.9, restore_seed=seeds[7], restore_scale=-1e-3, mask_seed=5, sparsity=0.25,
                              backend=backend_name)
            zk.zo_adam_update_(ps, ea, eq, seeds, coeffs, lr=1e-3, step=3, dist=dist, tensor_ids=ids,
                               backend=backend_name)
        return [ps, ms, ea, eq]

    got = run(be, dev)
    want = run("torch", "cpu")
    assert_all_bits_equal(got, want, f"layout list on {be}")


def test_sign_keeps_signed_zeros_and_nan(backend):
    """Step 4: sign(+0) = +0, sign(-0) = -0, sign(NaN) = NaN (a NaN estimate stays visible).
    Seen through p = -0: with every coordinate masked (sparsity 1), g = (z * c) * 0 is +0
    where z * c > 0 and -0 where z * c < 0, and p - sign(g) * lr is -0 for g = +0, +0 for
    g = -0; with a NaN coefficient p becomes NaN."""
    be, dev = backend
    one, minus_one = bits(torch.tensor([1.0])).item(), bits(torch.tensor([-1.0])).item()
    assert bits(R.sign_f32(torch.tensor([0.0, -0.0, 2.0, -3.0, 1e-40]))).tolist() == [0, -2**31, one, minus_one, one]
    assert R.sign_f32(torch.tensor([float("nan")])).isnan().all()
    n = 300
    z = R.rademacher(8, n, 0)
    p = torch.full((n,), -0.0, device=dev)
    zk.zo_sgd_update_([p], [8], [0.5], lr=1.0, dist=RADE, sign=True, sparsity=1.0, backend=be)
    assert_bits_equal(p, torch.where(z > 0, -0.0, 0.0), "sign of signed zeros")
    p = torch.full((n,), -0.0, device=dev)
    zk.zo_sgd_update_([p], [8], [float("nan")], lr=1.0, dist=RADE, sign=True, backend=be)
    assert p.isnan().all()


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param(("torch", "cpu"), id="torch-cpu")])
def test_zero_weight_decay_and_zero_restore_scale_are_skipped_not_applied(backend):
    """Steps 1 and 5 are skipped when fp32(restore_scale) / fp32(weight_decay) is 0 (-0.0 and
    1e-46 included), not applied with a zero factor: an inf or NaN weight times 0 would turn g
    (and so the momentum buffer, m and v) into NaN, and a -0 weight plus z * 0 would become +0
    where z * 0 is +0. The buffers are compared with a run from zero weights, where g is the
    same; the -0 weights must stay -0 (q = 0: g = 0, x - g * lr = -0 - +0)."""
    be, dev = backend
    n = 300
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 1.5] * (n // 5), device=dev)
    for wd in (0.0, -0.0, 1e-46):
        p, buf, p0, buf0 = special.clone(), *(torch.zeros(n, device=dev) for _ in range(3))
        for theta, b in ((p, buf), (p0, buf0)):
            zk.zo_sgd_update_([theta], [8], [0.5], lr=0.1, weight_decay=wd, momentum=0.9, momentum_buffers=[b],
                              dist=RADE, backend=be)
        assert_bits_equal(buf, buf0, f"zo_sgd_update_ momentum buffer, weight_decay={wd!r}")
        p, (m, v), p0, (m0, v0) = special.clone(), _zeros2(n, dev), torch.zeros(n, device=dev), _zeros2(n, dev)
        for theta, a, b in ((p, m, v), (p0, m0, v0)):
            zk.zo_adam_update_([theta], [a], [b], [8], [0.5], lr=0.1, step=1, weight_decay=wd, dist=RADE, backend=be)
        assert_bits_equal(m, m0, f"zo_adam_update_ m, weight_decay={wd!r}")
        assert_bits_equal(v, v0, f"zo_adam_update_ v, weight_decay={wd!r}")
    minus_zero = torch.full((n,), -0.0)
    for rs in (0.0, -0.0, 1e-46):
        p = minus_zero.clone().to(dev)
        zk.zo_sgd_update_([p], [], [], lr=1.0, restore_seed=8, restore_scale=rs, dist=RADE, backend=be)
        assert_bits_equal(p, minus_zero, f"zo_sgd_update_ restore_scale={rs!r}")
        p, (m, v) = minus_zero.clone().to(dev), _zeros2(n, dev)
        zk.zo_adam_update_([p], [m], [v], [], [], lr=1.0, step=1, restore_seed=8, restore_scale=rs, dist=RADE,
                           backend=be)
        assert_bits_equal(p, minus_zero, f"zo_adam_update_ restore_scale={rs!r}")


def _zeros2(n, dev):
    return torch.zeros(n, device=dev), torch.zeros(n, device=dev)


def test_negative_zero_scalars_keep_their_sign(backend):
    """perturb_ is never skipped, not even for scale = -0.0 (docs/kernel-ops.md): a -0.0
    weight becomes +0.0 where z * scale is +0.0 and stays -0.0 where it is -0.0. Triton's
    interpreter took every float argument equal to 0 as +0.0 (scale, lr, momentum, ...), so
    there the -0.0 weights flipped the other way. lr = -0.0 likewise."""
    be, dev = backend
    n = 300
    z = R.rademacher(9, n, 0)
    p = torch.full((n,), -0.0, device=dev)
    zk.perturb_([p], 9, -0.0, RADE, backend=be)
    assert_bits_equal(p, torch.where(z > 0, -0.0, 0.0), "perturb_ with scale=-0.0")
    p = torch.full((n,), -0.0, device=dev)            # -0 - (g * -0): +0 where g > 0, -0 where g < 0
    zk.zo_sgd_update_([p], [9], [0.5], lr=-0.0, dist=RADE, backend=be)
    assert_bits_equal(p, torch.where(z > 0, 0.0, -0.0), "zo_sgd_update_ with lr=-0.0")
    p, m, v = torch.full((n,), -0.0, device=dev), torch.zeros(n, device=dev), torch.zeros(n, device=dev)
    zk.zo_adam_update_([p], [m], [v], [9], [0.5], lr=-0.0, step=1, dist=RADE, backend=be)
    assert_bits_equal(p, torch.where(z > 0, 0.0, -0.0), "zo_adam_update_ with lr=-0.0")


def test_bf16_subnormals_are_loaded_exactly(backend):
    """bf16 values below 2^-126 are subnormal in bf16 and fp32 alike: loaded exactly, a
    scale-0 perturb_ leaves them as they are. Triton's interpreter converted them to 0, so
    there the weights and the bf16 Adam moments of such values came out different."""
    be, dev = backend
    vals = torch.tensor([2.0**-133, -2.0**-133, 2.0**-127, 1e-39, -3e-39, 1.5], dtype=torch.bfloat16).repeat(50)
    p = vals.to(dev).clone()
    zk.perturb_([p], 3, 0.0, RADE, backend=be)
    assert_bits_equal(p, vals.to(dev), "bf16 subnormal weights after a perturb_ of scale 0")
    got = [vals.to(dev).clone(), vals.to(dev).clone(), vals.abs().to(dev)]
    want = [vals.clone(), vals.clone(), vals.abs()]
    for ts, b in ((got, be), (want, "torch")):
        zk.zo_adam_update_([ts[0]], [ts[1]], [ts[2]], [4], [1e-38], lr=1e-3, step=2, dist=RADE, backend=b)
    for g, w, what in zip(got, want, ("param", "exp_avg", "exp_avg_sq")):
        assert_bits_equal(g, w.to(dev), f"bf16 subnormal {what} after zo_adam_update_")


# ======================================================================================
# Optimizers: the same closure values give the same parameters and state everywhere
# ======================================================================================
OPT_CASES = {
    "zo_sgd_momentum_nesterov_wd": ("zo_sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "zo_sgd_sign_sparse_q2": ("zo_sgd_sign", dict(lr=0.01, sparsity=0.3, q=2)),
    "zo_sgd_history_rademacher": ("zo_sgd", dict(lr=0.05, history=0.5, perturbation="rademacher", momentum=0.5)),
    "zo_sgd_conserve": ("zo_sgd_conserve", dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "zo_adam_q3": ("zo_adam", dict(lr=1e-2, q=3)),
    "zo_adamw_sparse": ("zo_adam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, sparsity=0.5)),
    "zo_adam_sign": ("zo_adam_sign", dict(lr=1e-2)),
    "zo_adam_conserve_history": ("zo_adam_conserve", dict(lr=1e-2, history=0.3, weight_decay=0.01)),
}


def _closure_of(params):
    """A loss that every device computes identically: float64 on the CPU from the (bit-equal)
    parameters, so the projected-gradient scalars are the same on every backend."""
    w = [torch.linspace(-1, 1, p.numel(), dtype=torch.float64).reshape(p.shape) for p in params]

    def closure():
        return sum(((p.detach().cpu().double() - 0.1) ** 2 * wi).sum() for p, wi in zip(params, w))
    return closure


def _opt_run(name, kw, be, dev, steps=6):
    from zeroflow.optim import create

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dev)) for s in SHAPES]
    opt = create(name, params, seed=2024, backend=be, **kw)
    closure = _closure_of(params)
    for _ in range(steps):
        opt.step(closure)
    state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor) and t.numel() > 1]
    return [list(params), state]


@pytest.mark.parametrize("case", list(OPT_CASES))
def test_optimizer_trajectory_bit_identical(backend, case):
    be, dev = backend
    name, kw = OPT_CASES[case]
    assert_all_bits_equal(_opt_run(name, kw, be, dev), _opt_run(name, kw, "torch", "cpu"), f"optimizer {case}")


# ======================================================================================
# Bad input: every op and backend raises ValueError/TypeError naming the argument
# ======================================================================================
def _op(be, name):
    """The op as each backend exposes it: the compiled TORCH_LIBRARY op (the path that
    crashed the process on the GPU image), the Triton function, or the reference."""
    if be in ("cpu", "cuda"):
        return getattr(torch.ops.zfkernels, name)
    if be == "triton":
        from zfkernels import triton as zt
        return getattr(zt, name)
    return getattr(R, name)


def _sgd(p, **over):
    """zo_sgd_update_'s arguments (zfkernels/opspec.py: its defaults unless given)."""
    return opspec.bind("zo_sgd_update_", **{"params": p, "tensor_ids": list(range(len(p))), "seeds": [1],
                                            "coeffs": [0.5], "lr": 0.1, **over})


def _adam(p, m, v, **over):
    return opspec.bind("zo_adam_update_", **{"params": p, "exp_avgs": m, "exp_avg_sqs": v,
                                             "tensor_ids": list(range(len(p))), "seeds": [1], "coeffs": [0.5],
                                             "lr": 1e-3, "step": 1, **over})


def _perturb(p, ids=None, seed=1, dist=0, mask_seed=0, T=0):
    return opspec.bind("perturb_", params=p, tensor_ids=list(range(len(p))) if ids is None else ids, seed=seed,
                       scale=1.0, dist=dist, mask_seed=mask_seed, mask_threshold=T)


def _philox(counters):
    return opspec.bind("philox4x32_10", counters=counters, key0=0, key1=0)


def _bad_cases(dev):
    z = lambda *s, **k: torch.zeros(*s, device=dev, **k)  # noqa: E731
    other = "meta" if dev == "cpu" else "cpu"
    return [
        ("perturb_", lambda: _perturb([z(4, 4).t()]), r"params\[0\].*contiguous"),
        ("perturb_", lambda: _perturb([z(4, dtype=torch.int64)]), r"params\[0\].*dtype"),
        ("perturb_", lambda: _perturb([z(4), z(4, dtype=torch.float64)]), r"params\[1\].*dtype"),
        ("perturb_", lambda: _perturb([z(4, dtype=torch.complex64)]), r"dtype"),
        # the message formats integers: what crashed the process on the GPU image (issue 9)
        ("perturb_", lambda: _perturb([z(4)], ids=[0, 1]), r"tensor_ids has 2 entries but params has 1"),
        ("perturb_", lambda: _perturb([z(4)], ids=[2**32]), r"tensor_ids|tensor id"),
        ("perturb_", lambda: _perturb([z(4)], dist=2), r"dist"),
        ("perturb_", lambda: _perturb([z(4)], T=(1 << 24) + 1), r"mask_threshold|16777217"),
        ("perturb_", lambda: _perturb([z(4)], seed=-1), r"seed"),
        ("perturb_", lambda: _perturb([z(4)], mask_seed=-5), r"mask_seed"),
        ("perturb_", lambda: _perturb([z(4), torch.zeros(4, device=other)]), r"device"),
        ("zo_sgd_update_", lambda: _sgd([z(8)], seeds=[1, 2]), r"seeds.*coeffs|coeffs"),
        ("zo_sgd_update_", lambda: _sgd([z(8)], seeds=[-3]), r"seeds"),
        ("zo_sgd_update_", lambda: _sgd([z(8)], momentum_buffers=[z(8), z(8)]), r"momentum_buffers"),
        ("zo_sgd_update_", lambda: _sgd([z(8)], history_buffers=[z(4)]), r"history_buffers"),
        ("zo_sgd_update_", lambda: _sgd([z(8, dtype=torch.bfloat16)], momentum_buffers=[z(8, dtype=torch.float16)]),
         r"momentum_buffers"),
        ("zo_sgd_update_", lambda: _sgd([z(8)], momentum_buffers=[torch.zeros(8, device=other)]),
         r"device|is on"),
        ("zo_sgd_update_", lambda: _sgd([z(8)], restore_seed=-1), r"restore_seed"),
        ("zo_adam_update_", lambda: _adam([z(8)], [z(8)], [z(8)], step=0), r"step"),
        ("zo_adam_update_", lambda: _adam([z(8)], [z(8)], [z(8)], beta1=1.0), r"beta1.*\[0, 1\)"),
        ("zo_adam_update_", lambda: _adam([z(8)], [z(8)], [z(8)], beta2=float("nan")), r"beta2.*\[0, 1\)"),
        ("zo_adam_update_", lambda: _adam([z(8)], [], [z(8)]), r"exp_avgs"),
        # written tensors sharing memory (docs/kernel-ops.md "Errors"; every case: tests/test_op_faces.py)
        ("perturb_", lambda: (lambda t: _perturb([t, z(4), t]))(z(4)), r"params\[2\] overlaps params\[0\]"),
        ("zo_sgd_update_", lambda: (lambda t: _sgd([t], momentum_buffers=[t], momentum=0.9))(z(8)),
         r"momentum_buffers\[0\] overlaps params\[0\]"),
        ("zo_adam_update_", lambda: (lambda m: _adam([z(8)], [m], [m]))(z(8)),
         r"exp_avg_sqs\[0\] overlaps exp_avgs\[0\]"),
        ("zo_adam_update_", lambda: (lambda p: _adam([p], [p], [z(8)]))(z(8)), r"exp_avgs\[0\] overlaps params\[0\]"),
        ("philox4x32_10", lambda: _philox(torch.zeros(2, 3, dtype=torch.int64, device=dev)), r"\[N, 4\]|shape"),
        ("philox4x32_10", lambda: _philox(torch.zeros(2, 4, device=dev)), r"int64|dtype|integer"),
    ]


BAD_INPUT_BACKENDS = BACKENDS + [pytest.param(("torch", "cpu"), id="torch-cpu")]


@pytest.mark.parametrize("backend", BAD_INPUT_BACKENDS)
def test_bad_inputs_raise_on_every_op(backend):
    """Every bad call raises a clear ValueError/TypeError (never a crash), and changes nothing."""
    be, dev = backend
    for k, (name, make, match) in enumerate(_bad_cases(dev)):
        args = make()
        params = args.get("params")
        before = [t.clone() for t in params] if params is not None else None
        try:
            with pytest.raises((ValueError, TypeError), match=match):
                _op(be, name)(**args)
        except pytest.fail.Exception as exc:
            raise AssertionError(f"bad-input case {k} ({name}, expecting /{match}/): {exc}") from None
        if before is not None:
            for t, b in zip(params, before):
                if t.device.type != "meta" and t.dtype == b.dtype:
                    assert torch.equal(t, b), f"{name} changed its input before failing"


# Options each finite in float32 whose derived float32 scalar is not (docs/kernel-ops.md "Scalars"):
# Adam's step size lr / (1 - beta1**step), AdamW's decay factor 1 - lr * weight_decay.
OVERFLOWING_ADAM = {
    "step_size_at_step_1": dict(lr=3e38),                                 # 3e39
    "negative_step_size": dict(lr=-3e38),
    "step_size_at_step_3": dict(lr=1e38, beta1=0.99, step=3),           # 1 - 0.99**3 = 0.0297: 3.4e39
    "adamw_decay_factor": dict(lr=1e20, weight_decay=1e19, decoupled_weight_decay=True),
}
_PREFIX = {"cpu": "zfkernels: ", "cuda": "zfkernels: ", "triton": "zo_adam_update_: ", "torch": ""}


@pytest.mark.parametrize("backend", BAD_INPUT_BACKENDS)
@pytest.mark.parametrize("case", list(OVERFLOWING_ADAM))
def test_adam_op_refuses_an_overflowing_step_size_or_decay_factor_before_writing(backend, case):
    """Every backend's op called directly (torch.ops.zfkernels, the Triton function, the
    reference) refuses, before writing anything, the Adam scalars the face and the optimizers
    refuse (opspec.adam_scalars_refusal): they took them and wrote inf / nan into params, m and
    v. The same words after each backend's prefix, also with an empty tensor list (the compiled
    ops' composite kernel) and on meta tensors (the compiled meta kernel)."""
    be, dev = backend
    over = OVERFLOWING_ADAM[case]
    want = opspec.adam_scalars_refusal(over["lr"], over.get("beta1", 0.9), over.get("step", 1),
                                       over.get("weight_decay", 0.0), over.get("decoupled_weight_decay", False))
    assert want is not None
    gen = torch.Generator().manual_seed(5)
    p = [torch.randn(300, generator=gen).to(dev), torch.randn(70, generator=gen).to(dev, torch.bfloat16)]
    m = [torch.randn(t.shape, generator=gen).to(dev, t.dtype) for t in p]
    v = [torch.rand(t.shape, generator=gen).to(dev) for t in p]
    h = [torch.randn(t.shape, generator=gen).to(dev) for t in p]
    before = [t.clone() for t in p + m + v + h]
    args = _adam(p, m, v, history_buffers=h, history_alpha=0.5, restore_seed=2, restore_scale=1e-3, **over)
    with pytest.raises(ValueError) as err:
        _op(be, "zo_adam_update_")(**args)
    assert str(err.value) == _PREFIX[be] + want
    for t, b in zip(p + m + v + h, before):
        assert torch.equal(t, b), "a refused call wrote a tensor"
    with pytest.raises(ValueError) as empty:
        _op(be, "zo_adam_update_")(**_adam([], [], [], **over))
    assert str(empty.value) == str(err.value)
    if be in ("cpu", "cuda"):
        meta = [torch.empty(8, device="meta")]
        with pytest.raises(ValueError) as on_meta:
            _op(be, "zo_adam_update_")(**_adam(meta, [torch.empty(8, device="meta")],
                                               [torch.empty(8, device="meta")], **over))
        assert str(on_meta.value) == str(err.value)


@pytest.mark.parametrize("backend", BAD_INPUT_BACKENDS)
def test_adam_op_takes_the_largest_lr_its_refusal_names(backend):
    """The bound is float32's range, nothing tighter: lr = FLT_MAX * (1 - beta1**step), the
    largest the refusal names, runs on every backend and gives the reference's bits."""
    be, dev = backend
    bc1 = 1.0 - 0.9 ** 2
    lr = opspec.F32_MAX * bc1
    assert opspec.adam_scalars_refusal(lr, 0.9, 2) is None
    results = {}
    for b, d in ((be, dev), ("torch", "cpu")):
        p, m, v = [torch.linspace(-1, 1, 200, device=d)], [torch.zeros(200, device=d)], [torch.zeros(200, device=d)]
        _op(b, "zo_adam_update_")(**_adam(p, m, v, lr=lr, step=2))
        results[b] = [t.cpu() for t in p + m + v]
    assert torch.isfinite(results["torch"][0]).all()
    assert_all_bits_equal([results[be]], [results["torch"]], "largest lr")


@pytest.mark.parametrize("backend", BAD_INPUT_BACKENDS)
def test_adam_op_refuses_exactly_where_opspec_does(backend):
    """Each backend's refusal (csrc/ops_common.h check_adam_scalars for the compiled ops,
    opspec.check_adam_scalars for the others) sits exactly at opspec's bound, the least float64
    that float32 rounds to inf: the step size or AdamW's decay factor there is refused in
    opspec's words, one float64 below is taken (with the reference's bits). beta1 = 0.5 and
    weight_decay = 4 keep both exact."""
    be, dev = backend
    at = opspec.F32_OVERFLOW
    below = math.nextafter(at, 0.0)
    cases = [(dict(lr=at * 0.5, beta1=0.5), dict(lr=below * 0.5, beta1=0.5)),
             (dict(lr=at / 4, beta1=0.0, weight_decay=4.0, decoupled_weight_decay=True),
              dict(lr=below / 4, beta1=0.0, weight_decay=4.0, decoupled_weight_decay=True))]
    for refused, taken in cases:
        want = opspec.adam_scalars_refusal(refused["lr"], refused["beta1"], 1, refused.get("weight_decay", 0.0),
                                           refused.get("decoupled_weight_decay", False))
        assert want is not None and opspec.adam_scalars_refusal(
            taken["lr"], taken["beta1"], 1, taken.get("weight_decay", 0.0),
            taken.get("decoupled_weight_decay", False)) is None
        p, m, v = [torch.ones(4, device=dev)], [torch.zeros(4, device=dev)], [torch.zeros(4, device=dev)]
        with pytest.raises(ValueError) as err:
            _op(be, "zo_adam_update_")(**_adam(p, m, v, coeffs=[0.0], **refused))
        assert str(err.value) == _PREFIX[be] + want
        results = {}
        for b, d in ((be, dev), ("torch", "cpu")):
            p, m, v = [torch.ones(4, device=d)], [torch.zeros(4, device=d)], [torch.zeros(4, device=d)]
            _op(b, "zo_adam_update_")(**_adam(p, m, v, coeffs=[0.0], **taken))
            results[b] = [t.cpu() for t in p + m + v]
        assert_all_bits_equal([results[be]], [results["torch"]], "one float64 below the bound")


# Every float option opspec.FINITE_SCALARS lists, per op (docs/kernel-ops.md "Errors"): NaN, +-inf,
# and the least float64 that float32 rounds to inf (F32_OVERFLOW) and its negation.
FINITE_SCALAR_CASES = [(op, s) for op, scalars in opspec.FINITE_SCALARS.items() for s in scalars]
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "f32_overflow": opspec.F32_OVERFLOW,
              "-f32_overflow": -opspec.F32_OVERFLOW}


def _scalar_call(op, dev, features=True, **over):
    """``op``'s arguments over small tensors on ``dev`` (params and every buffer list: each
    feature on unless ``features`` is False), Rademacher z, a pending restore; ``over``
    replaces any argument. Returns the arguments and every tensor they hold."""
    gen = torch.Generator().manual_seed(11)
    p = [torch.randn(300, generator=gen).to(dev), torch.randn(70, generator=gen).to(dev, torch.bfloat16)]
    like = lambda: [torch.randn(t.shape, generator=gen).to(dev, t.dtype) for t in p]  # noqa: E731
    if op == "perturb_":
        args = opspec.bind(op, params=p, tensor_ids=[0, 1], seed=3, scale=1e-3, dist=1)
    elif op == "zo_sgd_update_":
        args = _sgd(p, momentum_buffers=like() if features else [], history_buffers=like() if features else [],
                    momentum=0.9 if features else 0.0, history_alpha=0.5 if features else 0.0, dist=1,
                    restore_seed=2, restore_scale=1e-3)
    else:
        args = _adam(p, like(), [t.abs() for t in like()], history_buffers=like() if features else [],
                     history_alpha=0.5 if features else 0.0, dist=1, restore_seed=2, restore_scale=1e-3)
    args.update(over)
    tensors = [t for v in args.values() if isinstance(v, list) for t in v if isinstance(t, torch.Tensor)]
    return args, tensors


def _scalar_want(op, name, value, **args):
    """The refusal every backend gives (after its prefix) for option ``name`` = ``value``:
    zo_adam_update_'s step size and decay factor checks come first (check_adam_scalars)."""
    s = next(s for s in opspec.FINITE_SCALARS[op] if s.name == name)
    if op == "zo_adam_update_":
        adam = dict(dict(lr=1e-3, weight_decay=0.0, decoupled_weight_decay=False), **args)
        adam[name] = value
        first = opspec.adam_scalars_refusal(adam["lr"], 0.9, 1, adam["weight_decay"], adam["decoupled_weight_decay"])
        if first is not None:
            return first
    return opspec.scalar_refusal(name, value, s.inf_ok)


def _scalar_prefix(be, op):
    return {"cpu": "zfkernels: ", "cuda": "zfkernels: ", "triton": f"{op}: ", "torch": ""}[be]


@pytest.mark.parametrize("backend", BAD_INPUT_BACKENDS)
@pytest.mark.parametrize("op,scalar", FINITE_SCALAR_CASES, ids=[f"{op}-{s.name}" for op, s in FINITE_SCALAR_CASES])
def test_a_nan_or_infinite_scalar_option_is_refused_before_writing(backend, op, scalar):
    """Every backend's op called directly (torch.ops.zfkernels, the Triton function, the
    reference) took a NaN option, or one infinite in float32, and wrote inf / nan into the
    parameters; each now refuses it before writing anything, in opspec.scalar_refusal's words
    after its prefix, as the face does without one (the same words on every backend). Also
    with an empty tensor list (the compiled composite kernel) and on meta tensors (the compiled
    meta kernel); an option of a feature is checked while its buffer list turns it on.
    zo_adam_update_'s eps takes +-inf (a zero update) and refuses NaN only."""
    be, dev = backend
    name = scalar.name
    values = ["nan"] if scalar.inf_ok else list(NON_FINITE)
    decoupled = (False, True) if (op, name) == ("zo_adam_update_", "weight_decay") else (False,)
    for key in values:
        for dwd in decoupled:                       # AdamW with lr = 0: 1 - 0 * inf is nan
            extra = dict(lr=0.0, decoupled_weight_decay=True) if dwd else {}
            args, tensors = _scalar_call(op, dev, **extra, **{name: NON_FINITE[key]})
            want = _scalar_want(op, name, NON_FINITE[key], **extra)
            assert want is not None
            before = [t.clone() for t in tensors]
            with pytest.raises(ValueError) as err:
                _op(be, op)(**args)
            assert str(err.value) == _scalar_prefix(be, op) + want, (key, dwd)
            for t, b in zip(tensors, before):
                assert torch.equal(t, b), f"{name}={key}: a refused call wrote a tensor"
            if scalar.feature is None:              # no feature to turn on: an empty call checks it too
                empty = {k: ([] if isinstance(v, list) and k not in ("seeds", "coeffs") else v)
                         for k, v in args.items()}
                empty["tensor_ids"] = []
                with pytest.raises(ValueError) as on_empty:
                    _op(be, op)(**empty)
                assert str(on_empty.value) == str(err.value)
            if be in ("cpu", "cuda"):
                meta, _ = _scalar_call(op, "meta", **extra, **{name: NON_FINITE[key]})
                with pytest.raises(ValueError) as on_meta:
                    _op(be, op)(**meta)
                assert str(on_meta.value) == str(err.value)
            face_args, face_tensors = _scalar_call(op, dev, **extra, **{name: NON_FINITE[key]})
            with pytest.raises(ValueError) as on_face:
                _face(op, face_args, be)
            assert str(on_face.value) == want
            for t, b in zip(face_tensors, before):
                assert torch.equal(t, b), f"{name}={key}: the face wrote a tensor before refusing"
                # the face refuses before the op is dispatched: no version counter moves (a compiled
                # op called directly bumps them in its ADInplaceOrView kernel, docs/kernel-ops.md)
                assert t._version == 0, f"{name}={key}: the face's refusal bumped a version counter"


def _face(op, a, be):
    """zfkernels' face of ``op`` called with the op arguments ``a``."""
    common = dict(tensor_ids=a["tensor_ids"], backend=be, dist="rademacher")
    if op == "perturb_":
        return zk.perturb_(a["params"], a["seed"], a["scale"], **common)
    q = dict(restore_seed=a["restore_seed"], restore_scale=a["restore_scale"], lr=a["lr"],
             weight_decay=a["weight_decay"], history_buffers=a["history_buffers"], history_alpha=a["history_alpha"])
    if op == "zo_sgd_update_":
        return zk.zo_sgd_update_(a["params"], a["seeds"], a["coeffs"], momentum_buffers=a["momentum_buffers"],
                                 momentum=a["momentum"], dampening=a["dampening"], **q, **common)
    return zk.zo_adam_update_(a["params"], a["exp_avgs"], a["exp_avg_sqs"], a["seeds"], a["coeffs"], step=a["step"],
                              betas=(a["beta1"], a["beta2"]), eps=a["eps"],
                              decoupled_weight_decay=a["decoupled_weight_decay"], **q, **common)


@pytest.mark.parametrize("backend", BAD_INPUT_BACKENDS)
def test_scalar_options_the_refusal_leaves_are_taken_with_the_reference_s_bits(backend):
    """What the rule does not refuse runs on every backend with the reference's bits: each
    option one float64 below the bound (float32 rounds it to its largest finite number, +-), a
    NaN option of a feature that is off (momentum and dampening without momentum_buffers,
    history_alpha without history_buffers: the call does not use it), and Adam's eps = +-inf
    (denom infinite, m / denom = +-0: the update moves no parameter). Zero parameters and
    buffers, Rademacher z and a zero coefficient keep every result finite; beta1 = 0 keeps
    Adam's step size lr / (1 - beta1) = lr within its own bound."""
    be, dev = backend
    below = math.nextafter(opspec.F32_OVERFLOW, 0.0)
    cases = [(op, {s.name: sign * below}) for op, s in FINITE_SCALAR_CASES for sign in (1.0, -1.0)]
    cases += [("zo_sgd_update_", dict(momentum=math.nan, dampening=math.nan, history_alpha=math.nan, features=False)),
              ("zo_adam_update_", dict(history_alpha=math.nan, features=False)),
              ("zo_adam_update_", dict(eps=math.inf)), ("zo_adam_update_", dict(eps=-math.inf)),
              ("zo_adam_update_", dict(eps=opspec.F32_OVERFLOW, decoupled_weight_decay=True, weight_decay=0.5))]
    for op, over in cases:
        results = []
        for b, d in ((be, dev), ("torch", "cpu")):
            features = over.get("features", True)
            args, tensors = _scalar_call(op, d, features=features, **{k: v for k, v in over.items() if k != "features"})
            for t in tensors:
                t.zero_()
            if op != "perturb_":
                args.update(coeffs=[0.0])
                if "restore_scale" not in over:
                    args.update(restore_scale=0.0)
            if op == "zo_adam_update_":
                args.update(beta1=0.0)
            _op(b, op)(**args)
            results.append([t.cpu() for t in tensors])
        # (a bf16 parameter restored or perturbed by float32's largest number stores inf: its own range)
        assert all(torch.isfinite(t).all() for t in results[1] if t.dtype == torch.float32), (op, over)
        assert_all_bits_equal([results[0]], [results[1]], f"{op} {over}")


# ======================================================================================
# Compiled ops: schema checks (torch.library.opcheck) and the build
# ======================================================================================
@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck_every_op(backend):
    _, dev = backend
    ops = torch.ops.zfkernels
    c = torch.randint(0, 2**32, (8, 4), dtype=torch.int64).to(dev)
    torch.library.opcheck(ops.philox4x32_10.default, (c, 3, 4))
    ps = [torch.randn(5, device=dev), torch.randn(2, 3, dtype=torch.bfloat16, device=dev)]
    torch.library.opcheck(ops.perturb_.default, (ps, [0, 1], 7, 0.1, 0, 3, 1 << 23))
    p = [torch.randn(5, device=dev), torch.randn(3, device=dev)]
    b = [torch.randn(5, device=dev), torch.randn(3, device=dev)]
    torch.library.opcheck(ops.zo_sgd_update_.default,
                          tuple(_sgd(p, momentum_buffers=b, seeds=[1, 2], coeffs=[0.5, -0.5], dist=1,
                                     mask_threshold=1 << 23, momentum=0.9).values()))
    m = [torch.randn(5, device=dev), torch.randn(3, device=dev)]
    v = [torch.rand(5, device=dev), torch.rand(3, device=dev)]
    torch.library.opcheck(ops.zo_adam_update_.default, tuple(_adam(p, m, v, step=2, weight_decay=0.1).values()))


def _opcheck_variants(dev):
    """(op, args) of the variants test_opcheck_every_op leaves out: each written list the
    schema annotates (history_buffers: (c!) / (d!)), mixed storage dtypes with fp32 buffers,
    stochastic rounding, sign, a zero-element tensor, and empty lists (the Composite kernel)."""
    ops = torch.ops.zfkernels
    g = torch.Generator().manual_seed(3)

    def r(*s, dtype=torch.float32):
        return torch.randn(*s, generator=g).to(dtype=dtype, device=dev)

    p = lambda: [r(5, dtype=torch.bfloat16), r(3, dtype=torch.float16), r(0), r(2, 2)]  # noqa: E731
    like = lambda ps, f32=False: [r(*t.shape, dtype=torch.float32 if f32 else t.dtype) for t in ps]  # noqa: E731
    ps = p()
    sgd = _sgd(ps, momentum_buffers=like(ps, f32=True), history_buffers=like(ps), seeds=[1, 2, 1],
               coeffs=[0.5, -0.5, 0.25], restore_seed=1, restore_scale=-0.1, momentum=0.9, dampening=0.1,
               nesterov=True, sign=True, history_alpha=0.5, mask_threshold=1 << 22, stochastic_rounding=True,
               round_seed=9)
    ps = p()
    adam = _adam(ps, like(ps, f32=True), [t.abs() for t in like(ps)], history_buffers=like(ps, f32=True),
                 seeds=[4], coeffs=[0.5], dist=1, restore_seed=4, restore_scale=-0.1, weight_decay=0.1,
                 decoupled_weight_decay=True, step=3, history_init=True, stochastic_rounding=True, round_seed=2)
    return [
        ("zo_sgd_update_ with history", ops.zo_sgd_update_.default, sgd),
        ("zo_adam_update_ with history", ops.zo_adam_update_.default, adam),
        ("perturb_ fp16, rademacher", ops.perturb_.default, _perturb([r(7, dtype=torch.float16), r(0)], dist=1)),
        ("perturb_ empty", ops.perturb_.default, _perturb([])),
        ("zo_sgd_update_ empty", ops.zo_sgd_update_.default, _sgd([], seeds=[], coeffs=[])),
        ("zo_adam_update_ empty", ops.zo_adam_update_.default, _adam([], [], [])),
        ("philox4x32_10 no rows", ops.philox4x32_10.default,
         _philox(torch.zeros(0, 4, dtype=torch.int64, device=dev))),
    ]


@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck_every_variant(backend):
    """torch.library.opcheck (schema, fake tensors, autograd registration, aot dispatch) over
    the variants that write every annotated list, and the empty calls."""
    _, dev = backend
    for name, op, args in _opcheck_variants(dev):
        res = torch.library.opcheck(op, tuple(args.values()), raise_exception=False)
        assert all(v == "SUCCESS" for v in res.values()), f"{name}: {res}"


# ======================================================================================
# Backend-specific properties
# ======================================================================================
def test_constants_of_the_c_header_are_the_spec_bits():
    """csrc/philox.h spells the §5 constants as decimal literals; each must round to exactly
    the bit pattern of the table in zfkernels/stream.py that Triton and the reference use."""
    import re
    import struct

    with open(os.path.join(os.path.dirname(__file__), "..", "csrc", "philox.h")) as f:
        src = f.read()
    body = src[src.index("ZF_HD float log_f32"):src.index("ZF_HD void box_muller")]
    lits = [float(x) for x in re.findall(r"(-?\d+\.\d+(?:e[-+]?\d+)?)f", body)]

    def b32(x):
        return struct.unpack("<I", struct.pack("<f", x))[0]

    want = (list(S.LOG_POLY_BITS) + [S.LN2_LO_BITS, S.LN2_HI_BITS, S.TWO_OVER_PI_BITS] + list(S.PIO2_PARTS_BITS)
            + list(S.SIN_POLY_BITS) + list(S.COS_POLY_BITS))
    got = [b32(x) for x in lits if abs(x) not in (0.0, 0.5, 1.0)]    # exact small constants
    assert got == want, [hex(x) for x in got]
    assert "0x3f3504f3" in body.lower() and S.LOG_SQRT_HALF_BITS == 0x3F3504F3


def test_gaussian_within_bound_of_float64():
    """§5 accuracy of the one Gaussian every backend computes (all equal the reference)."""
    n = 1 << 20
    z = R.gaussian(11, n, 0)
    err = (z.double() - R.gaussian_float64(11, n, 0)).abs().max().item()
    assert err <= R.GAUSSIAN_BOUND and err < 2e-6, err     # measured ~7e-7
    assert abs(z.mean().item()) < 5e-3 and abs(z.var().item() - 1) < 5e-3


@pytest.mark.skipif(not _compiled.cpu_available(), reason="compiled CPU ops missing")
def test_cpu_kernel_independent_of_thread_count():
    n = 300_001
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = zk.perturbation(5, n, GAUSS, mask_seed=3, sparsity=HALF, backend="cpu")
        torch.set_num_threads(max(2, old))
        b = zk.perturbation(5, n, GAUSS, mask_seed=3, sparsity=HALF, backend="cpu")
    finally:
        torch.set_num_threads(old)
    assert_bits_equal(a, b, "threads")


@pytest.mark.skipif(not _compiled.cpu_available(), reason="compiled CPU ops missing")
def test_cpu_updates_independent_of_thread_count():
    """The updates' chunks (each tensor cut at 64Ki elements, run by at::parallel_for) write
    the same bits on one thread and on several: mixed dtypes, every buffer, the mask, history,
    momentum and stochastic rounding, tensors of several chunks with ragged tails."""
    ops = torch.ops.zfkernels

    def run(threads):
        torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(0)
        p = [torch.randn(200_003, generator=g).bfloat16(), torch.randn(70_001, generator=g), torch.zeros(0),
             torch.randn(131_072, generator=g).half()]
        m, v = [torch.randn(t.shape, generator=g) for t in p], [torch.rand(t.shape, generator=g) for t in p]
        h = [torch.randn(t.shape, generator=g).to(t.dtype) for t in p]
        mom = [torch.randn(t.shape, generator=g).to(t.dtype) for t in p]
        ids = [0, 1, 2, 3]
        ops.perturb_(p, ids, 5, 1e-3, 0, 9, 1 << 22)
        ops.zo_adam_update_(p, m, v, h, ids, [5, 6, 7], [0.1, -0.2, 0.3], 0, 9, 1 << 22, 5, -1e-3, 1e-3, 0.9, 0.999,
                            1e-8, 0.01, True, 3, False, 0.9, False, True, 11)
        ops.zo_sgd_update_(p, mom, [], ids, [5], [0.1], 1, 9, 0, 5, -1e-3, 1e-3, 0.01, 0.9, 0.1, True, False, True,
                           0.0, False, True, 12)
        return p + m + v + h + mom

    old = torch.get_num_threads()
    try:
        one, several = run(1), run(max(2, old))
    finally:
        torch.set_num_threads(old)
    for k, (a, b) in enumerate(zip(one, several)):
        assert_bits_equal(a, b, f"threads, tensor {k}")


@NEEDS_TRITON
def test_triton_independent_of_block_size():
    from zfkernels import triton as zt

    dev = "cuda" if GPU and not INTERP else "cpu"
    for dist in (0, 1):
        a, b = torch.zeros(4097, device=dev), torch.zeros(4097, device=dev)
        zt.perturb_([a], [1], 77, 1.0, dist, 5, 1 << 22, block_size=128)
        zt.perturb_([b], [1], 77, 1.0, dist, 5, 1 << 22, block_size=16384)
        assert_bits_equal(a, b, "block size")


@NEEDS_TRITON
def test_triton_philox_equals_tritons_own_randint4x():
    """§2: with tensor_id 0, tag 0 the stream words are tl.randint4x(seed, b): Triton's own
    Philox as an independent oracle of ours."""
    import triton
    import triton.language as tl

    from zfkernels import triton as zt

    @triton.jit
    def oracle(off_ptr, out_ptr, n, seed, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < n
        b = tl.load(off_ptr + rows, mask=ok, other=0)
        x0, x1, x2, x3 = tl.randint4x(seed, b)
        tl.store(out_ptr + rows * 4 + 0, x0.to(tl.uint32, bitcast=True).to(tl.int64), mask=ok)
        tl.store(out_ptr + rows * 4 + 1, x1.to(tl.uint32, bitcast=True).to(tl.int64), mask=ok)
        tl.store(out_ptr + rows * 4 + 2, x2.to(tl.uint32, bitcast=True).to(tl.int64), mask=ok)
        tl.store(out_ptr + rows * 4 + 3, x3.to(tl.uint32, bitcast=True).to(tl.int64), mask=ok)

    dev = "cuda" if GPU and not INTERP else "cpu"
    for seed in (7, 2**40 + 3):
        b = torch.cat([torch.arange(300), torch.tensor([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40 + 5])])
        n = b.numel()
        want = torch.empty(n, 4, dtype=torch.int64, device=dev)
        oracle[(1,)](b.to(dev), want, n, seed, BLOCK=512)
        cnt = torch.stack([b & 0xFFFFFFFF, b >> 32, torch.zeros_like(b), torch.zeros_like(b)], 1).to(dev)
        assert torch.equal(zt.philox4x32_10(cnt, seed & 0xFFFFFFFF, seed >> 32), want)


@pytest.mark.skipif(not INTERP, reason="checks the Triton interpreter (TRITON_INTERPRET=1)")
def test_triton_interpreter_runs_the_kernels_here():
    """Where Triton is installed, the interpreter must run our kernels, or every triton-interp
    case above is skipped (each with the reason): fails with that reason (zfkernels.triton's
    import check) where it cannot, e.g. Triton 3.6 with numpy >= 2.4."""
    pytest.importorskip("triton")
    zt, why = zk._triton_module()
    assert zt is not None, why


@pytest.mark.skipif(not INTERP, reason="checks the Triton interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("op", list(opspec.OPS))
def test_triton_interpreter_refuses_tensors_off_the_cpu(op):
    """The interpreter copies a launch's tensor arguments to the host, but perturb_ and the
    updates reach their tensors through the pointer table's raw addresses: CUDA tensors were
    read at device addresses on the host (a crash), meta ones failed inside Triton with a
    NotImplementedError. Refused with a ValueError that names the tensor and the fix, before
    anything is written (here: a meta tensor, the off-CPU device every machine has)."""
    zt, why = zk._triton_module()
    if zt is None:
        pytest.skip(why)
    meta = lambda: torch.zeros(8, device="meta")  # noqa: E731
    args = {"philox4x32_10": lambda: _philox(torch.zeros(2, 4, dtype=torch.int64, device="meta")),
            "perturb_": lambda: _perturb([meta()]),
            "zo_sgd_update_": lambda: _sgd([meta()]),
            "zo_adam_update_": lambda: _adam([meta()], [meta()], [meta()])}[op]()
    name = "counters" if op == "philox4x32_10" else r"params\[0\]"
    with pytest.raises(ValueError, match=rf"{name} is on meta; Triton's interpreter .* CPU tensors only"):
        getattr(zt, op)(**args)


class _FakeLaunch:
    """Stands in for an interpreted kernel: ``probe[grid](out, n)`` writes ``count`` or raises."""

    def __init__(self, count=None, error=None):
        self.count, self.error = count, error

    def __getitem__(self, grid):
        def launch(out, n):
            if self.error is not None:
                raise self.error
            out[0] = self.count
        return launch


@pytest.mark.parametrize("probe,needle", [
    (_FakeLaunch(error=TypeError("only 0-dimensional arrays can be converted to Python scalars")), "0-dimensional"),
    (_FakeLaunch(count=1), "counted 1"),
])
def test_triton_interpreter_check_names_the_fix(monkeypatch, probe, needle):
    zt, why = zk._triton_module()
    if zt is None:
        pytest.skip(why)
    from zfkernels.triton import _common

    monkeypatch.setattr(_common, "interpreted", lambda kernel: True)
    with pytest.raises(RuntimeError, match=r"cannot loop over a runtime integer") as info:
        _common.check_interpreter(probe)
    assert needle in str(info.value) and "numpy<2.4" in str(info.value) and "backend='cpu'" in str(info.value)


@pytest.mark.skipif(not GPU, reason="needs a GPU")
@pytest.mark.parametrize("be", ["cuda", "triton"])
def test_gpu_large_tensor_64bit_offsets(be):
    """Past 2^25 elements, across many launch blocks: equal to the reference run on the GPU
    (itself checked against the CPU reference by every test above)."""
    if be not in zk.available_backends("cuda"):
        pytest.skip(f"{be} not available")
    n = (1 << 25) + 3
    for dist in (GAUSS, RADE):
        a = torch.zeros(n, device="cuda")
        zk.perturb_([a], 77, 0.5, dist, tensor_ids=[2], mask_seed=3, sparsity=HALF, backend=be)
        b = torch.zeros(n, device="cuda")
        zk.perturb_([b], 77, 0.5, dist, tensor_ids=[2], mask_seed=3, sparsity=HALF, backend="torch")
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), dist


@pytest.mark.skipif(not (GPU and _compiled.cuda_available()), reason="CUDA memory accounting")
def test_zo_step_extra_memory_is_constant():
    """ZOFusedSGD without momentum allocates nothing parameter-sized during a step."""
    from zeroflow.optim import ZOFusedSGD

    params = [torch.zeros(1 << 22, device="cuda", requires_grad=True) for _ in range(4)]   # 64 MiB
    opt = ZOFusedSGD(params, lr=1e-3, perturbation="gaussian")
    first = params[0]
    opt.step(lambda: first[0] * 2.0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    opt.step(lambda: first[0] * 2.0)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < (1 << 20)


PYTHON_ON_CPU = [p for p in backend_params(reference_on_cpu=True)
                 if p.values[0][0] in ("torch", "triton") and p.values[0][1] == "cpu"]


@pytest.mark.parametrize("backend_device", PYTHON_ON_CPU)
@pytest.mark.parametrize("op", ["perturb_", "zo_adam_update_"])
def test_python_backends_keep_subnormals_under_flush_denormal_mode(backend_device, op):
    """torch.set_flush_denormal(True) made the reference's torch ops and Triton's interpreter
    flush subnormal inputs and results to zero: a perturb_ of subnormal weights, and Adam's m
    and v decaying through the subnormals, wrote other bits than the compiled cpu op (which
    keeps IEEE subnormals in that mode, tests/test_cpu_capability.py) and the CUDA kernels.
    Every backend now gives the bits of IEEE mode, and the caller's mode is left as found."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-denormal mode")
    g = torch.Generator().manual_seed(5)

    def fresh():
        return [torch.randn(640, generator=g) * 1e-39 for _ in range(3)]     # fp32 subnormals

    def run(p, m, v):
        if op == "perturb_":
            zk.perturb_([p], 7, 1e-40, RADE, backend=backend_device[0])
        else:
            zk.zo_adam_update_([p], [m], [v.abs_()], [5], [1e-20], lr=1e-3, step=3, dist=RADE, sparsity=HALF,
                               mask_seed=9, backend=backend_device[0])

    want = fresh()
    got = [t.clone() for t in want]
    run(*want)                                       # IEEE mode: the spec's bits
    assert torch.set_flush_denormal(True)
    try:
        run(*got)
        assert torch.tensor([1e-39]).mul(1.0).item() == 0.0, "the op changed the caller's flush mode"
    finally:
        torch.set_flush_denormal(False)
    assert (bits(want[0]) != 0).any()
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), got, want):
        assert_bits_equal(a, b, name)


def test_a_direct_reference_call_follows_the_flush_mode_and_the_documented_ways_give_the_spec_s_bits():
    """docs/kernel-ops.md, "Arithmetic": zfkernels.reference's functions, called directly, follow
    torch.set_flush_denormal as any torch op on CPU tensors (the reference stays plain torch);
    call_op("torch", ...), the face with backend="torch", or the mode cleared around the call
    give the spec's bits (those of IEEE mode, which the compiled cpu op keeps in either mode)."""
    from zfkernels import reference as R
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-denormal mode")
    g = torch.Generator().manual_seed(6)
    start = [torch.randn(640, generator=g) * 1e-39 for _ in range(3)]        # fp32 subnormals
    kw = dict(tensor_ids=[0], seeds=[5], coeffs=[0.0], dist=zk.dist_code(RADE), mask_seed=0, mask_threshold=0,
              restore_seed=0, restore_scale=0.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              decoupled_weight_decay=False, step=3, sign=False, history_alpha=0.0, history_init=False,
              stochastic_rounding=False, round_seed=0)

    def run(call):
        p, m, v = [t.clone() for t in start]
        call([p], [m], [v.abs_()])
        return p, m, v

    def direct(p, m, v):
        R.zo_adam_update_(p, m, v, [], **kw)

    def via_call_op(p, m, v):
        zk.call_op("torch", "zo_adam_update_", params=p, exp_avgs=m, exp_avg_sqs=v, history_buffers=[], **kw)

    def via_face(p, m, v):
        zk.zo_adam_update_(p, m, v, [5], [0.0], lr=1e-3, step=3, dist=RADE, backend="torch")

    def cleared(p, m, v):
        torch.set_flush_denormal(False)
        try:
            direct(p, m, v)
        finally:
            torch.set_flush_denormal(True)

    spec = run(direct)                                          # IEEE mode
    assert torch.set_flush_denormal(True)
    try:
        flushed = run(direct)
        ways = [run(via_call_op), run(via_face), run(cleared), run(lambda p, m, v: zk.call_op(
            "cpu", "zo_adam_update_", params=p, exp_avgs=m, exp_avg_sqs=v, history_buffers=[], **kw))]
        sign = R.sign_f32(start[0][:4])
    finally:
        torch.set_flush_denormal(False)
    assert not torch.equal(bits(flushed[1]), bits(spec[1])), "the direct call kept the subnormals under flush mode"
    assert torch.equal(sign, start[0][:4]) and R.sign_f32(start[0][:4]).abs().eq(1).all()  # a zero: kept as is
    for way in ways:
        for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), way, spec):
            assert_bits_equal(a, b, name)


@pytest.mark.parametrize("backend_device", PYTHON_ON_CPU)
def test_python_backends_leave_the_flush_mode_as_found_when_they_refuse_or_get_no_tensors(backend_device):
    """A Python backend's call clears the flush mode for its arithmetic: a refusal (an exception
    out of the call) sets it again as a return does, and a call whose lists are all empty (its
    first tensor list decides the device) is a no-op, not an IndexError."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-denormal mode")
    be = backend_device[0]
    assert torch.set_flush_denormal(True)
    try:
        with pytest.raises(ValueError, match=r"counters must have shape \[N, 4\]"):
            zk.call_op(be, "philox4x32_10", counters=torch.zeros(2, 3, dtype=torch.int64), key0=1, key1=2)
        assert torch.tensor([1e-39]).mul(1.0).item() == 0.0, "a refused call left the flush mode off"
        assert zk.call_op(be, "perturb_", params=[], tensor_ids=[], seed=1, scale=1.0, dist=0, mask_seed=0,
                          mask_threshold=0) is None
        assert torch.tensor([1e-39]).mul(1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)


# imports zfkernels under flush mode, then turns the mode off: a reference call must leave it off
_IMPORTED_UNDER_FLUSH = """
import torch
torch.set_flush_denormal(True)
import zfkernels as zk
torch.set_flush_denormal(False)
p = torch.full((8,), 2.0 ** -140)
zk.call_op("torch", "perturb_", params=[p], tensor_ids=[0], seed=1, scale=2.0 ** -20, dist=0, mask_seed=0,
           mask_threshold=0)
print(torch.tensor([1e-39]).mul(1.0).item() != 0.0)
"""


def test_a_reference_call_leaves_ieee_mode_on_when_zfkernels_was_imported_under_flush_mode():
    """The probe that tells whether the thread flushes is a subnormal made from its bits: one
    converted from the float 2^-140 at an import under flush mode would be 0, every later call
    would take the thread for flushing and set the mode again after itself, turning flushing on
    in a process that had turned it off."""
    import subprocess
    import sys
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-denormal mode")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "python")]))
    out = subprocess.run([sys.executable, "-c", _IMPORTED_UNDER_FLUSH], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "True\n", out.stderr
