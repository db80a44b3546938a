"""Triton kernels (zfkernels.triton) against the spec (docs/perturbation-stream.md,
docs/kernel-ops.md), Triton's own Philox, the pure-PyTorch reference and torch.optim.

Runs on CPU tensors in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before any @triton.jit is defined), or on a GPU when one is present. Blocks are large
because each interpreted program instance costs ~10 ms.
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from zfkernels import reference as ref  # noqa: E402
from zfkernels import triton as zt  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERP and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
DEV = "cpu" if INTERP else "cuda"
BIG = 8192          # block_size used unless a test varies it
BOUND = 2.0 ** -18  # §5 Gaussian bound
GAUSS, RADE = 0, 1


def z_of(numel, seed, dist, tid=0, mask_seed=0, T=0, block=BIG, dtype=torch.float32):
    out = torch.zeros(numel, dtype=dtype, device=DEV)
    zt.perturb_([out], [tid], seed, 1.0, dist, mask_seed, T, block_size=block)
    return out


# ----------------------------------------------------------------------------- §1 Philox
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,out", KAT)
def test_philox_kat(ctr, key, out):
    got = zt.philox4x32_10(torch.tensor([ctr], dtype=torch.int64, device=DEV), *key)
    assert got.dtype == torch.int64 and tuple(got.shape) == (1, 4)
    assert tuple(got[0].tolist()) == out


@triton.jit
def _oracle_philox(cnt_ptr, out_ptr, n, seed, BLOCK: tl.constexpr):
    """Triton's own triton.language.random.philox on explicit counters."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n
    c0 = tl.load(cnt_ptr + rows * 4 + 0, mask=ok, other=0).to(tl.uint32)
    c1 = tl.load(cnt_ptr + rows * 4 + 1, mask=ok, other=0).to(tl.uint32)
    c2 = tl.load(cnt_ptr + rows * 4 + 2, mask=ok, other=0).to(tl.uint32)
    c3 = tl.load(cnt_ptr + rows * 4 + 3, mask=ok, other=0).to(tl.uint32)
    x0, x1, x2, x3 = tl.random.philox(seed, c0, c1, c2, c3)
    tl.store(out_ptr + rows * 4 + 0, x0.to(tl.int64), mask=ok)
    tl.store(out_ptr + rows * 4 + 1, x1.to(tl.int64), mask=ok)
    tl.store(out_ptr + rows * 4 + 2, x2.to(tl.int64), mask=ok)
    tl.store(out_ptr + rows * 4 + 3, x3.to(tl.int64), mask=ok)


@triton.jit
def _oracle_randint4x(off_ptr, out_ptr, n, seed, BLOCK: tl.constexpr):
    """tl.randint4x(seed, b): our stream words for tensor_id 0, tag 0 (§2)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n
    b = tl.load(off_ptr + rows, mask=ok, other=0)
    x0, x1, x2, x3 = tl.randint4x(seed, b)
    tl.store(out_ptr + rows * 4 + 0, x0.to(tl.uint32, bitcast=True).to(tl.int64), mask=ok)
    tl.store(out_ptr + rows * 4 + 1, x1.to(tl.uint32, bitcast=True).to(tl.int64), mask=ok)
    tl.store(out_ptr + rows * 4 + 2, x2.to(tl.uint32, bitcast=True).to(tl.int64), mask=ok)
    tl.store(out_ptr + rows * 4 + 3, x3.to(tl.uint32, bitcast=True).to(tl.int64), mask=ok)


def _rand_u32(*shape):
    return torch.randint(0, 2**32, shape, dtype=torch.int64)


@pytest.mark.parametrize("seed", [0, 1, 0xFFFFFFFF, 0x123456789ABCDEF, 2**63 - 1])
def test_philox_matches_triton_philox(seed):
    n = 1000
    cnt = _rand_u32(n, 4).to(DEV)
    cnt[0] = torch.tensor([0xFFFFFFFF, 0, 0xFFFFFFFF, 0x80000000])
    want = torch.empty_like(cnt)
    _oracle_philox[(triton.cdiv(n, 1024),)](cnt, want, n, seed, BLOCK=1024)
    got = zt.philox4x32_10(cnt, seed & 0xFFFFFFFF, seed >> 32)
    assert torch.equal(got, want)
    # and the pure-PyTorch reference
    assert torch.equal(got.cpu(), ref.philox4x32_10(cnt.cpu(), seed & 0xFFFFFFFF, seed >> 32))


@pytest.mark.parametrize("seed", [7, 2**40 + 3])
def test_stream_words_equal_randint4x(seed):
    """§2: with tensor_id 0, tag 0 the stream words are tl.randint4x(seed, b), b 64-bit."""
    b = torch.cat([torch.arange(300), torch.tensor([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40 + 5])])
    n = b.numel()
    want = torch.empty(n, 4, dtype=torch.int64, device=DEV)
    _oracle_randint4x[(1,)](b.to(DEV), want, n, seed, BLOCK=512)
    cnt = torch.stack([b & 0xFFFFFFFF, b >> 32, torch.zeros_like(b), torch.zeros_like(b)], 1).to(DEV)
    assert torch.equal(zt.philox4x32_10(cnt, seed & 0xFFFFFFFF, seed >> 32), want)


def test_philox_op_errors():
    with pytest.raises(ValueError, match="counters"):
        zt.philox4x32_10(torch.zeros(3, 3, dtype=torch.int64, device=DEV), 0, 0)
    with pytest.raises(ValueError, match="key1"):
        zt.philox4x32_10(torch.zeros(3, 4, dtype=torch.int64, device=DEV), 0, 2**32)
    assert zt.philox4x32_10(torch.zeros(0, 4, dtype=torch.int64, device=DEV), 0, 0).shape == (0, 4)


# ----------------------------------------------------------------------- §4–§6 z and m
SEEDS = [0, 12345, 2**63 - 1]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tid", [0, 3, 2**32 - 1])
def test_rademacher_bit_exact(seed, tid):
    n = 4097
    z = z_of(n, seed, RADE, tid)
    assert torch.equal(z.cpu(), ref.rademacher(seed, n, tid))


@pytest.mark.parametrize("seed", SEEDS)
def test_gaussian_bound(seed):
    n = 8200
    z = z_of(n, seed, GAUSS, tid=5).cpu()
    z64 = ref.gaussian_float64(seed, n, 5)
    err = (z.double() - z64).abs().max().item()
    assert err <= BOUND, err
    assert (z - ref.gaussian(seed, n, 5)).abs().max().item() <= BOUND
    assert 0.95 < z.std().item() < 1.05 and z.abs().max().item() <= 5.8


@pytest.mark.parametrize("T", [1, 2**23, 2**24 - 1, 2**24])
def test_mask_bit_exact(T):
    n = 4097
    z = z_of(n, 99, RADE, tid=2, mask_seed=2**62 + 11, T=T)
    keep = ref.keep_mask(2**62 + 11, n, 2, T)
    assert torch.equal((z != 0).cpu(), keep)
    assert torch.equal(z.cpu(), ref.rademacher(99, n, 2) * keep.float())


@pytest.mark.parametrize("dist", [GAUSS, RADE])
def test_independent_of_block_size(dist):
    a = z_of(4097, 77, dist, tid=1, mask_seed=5, T=2**22, block=128)
    b = z_of(4097, 77, dist, tid=1, mask_seed=5, T=2**22, block=16384)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dist", [GAUSS, RADE])
def test_independent_of_order_count_and_slicing(dist):
    seed = 31337
    a = torch.zeros(4097, device=DEV)
    b = torch.zeros(3, 43, device=DEV)
    c = torch.zeros(1, device=DEV)
    e = torch.zeros(0, device=DEV)
    zt.perturb_([a, b, e, c], [0, 1, 7, 2], seed, 1.0, dist, 4, 2**21, block_size=BIG)
    a2, b2, c2 = torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(c)
    zt.perturb_([c2, b2, a2], [2, 1, 0], seed, 1.0, dist, 4, 2**21, block_size=BIG)
    assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(c, c2)
    # a tensor alone, and a shorter tensor with the same id, see prefixes of the same stream
    assert torch.equal(z_of(129, seed, dist, tid=1, mask_seed=4, T=2**21), b.reshape(-1)[:129])
    assert torch.equal(z_of(1, seed, dist, tid=0, mask_seed=4, T=2**21), a[:1])
    # a contiguous slice of a bigger tensor is a prefix of the same stream as well
    big = torch.zeros(2, 4097, device=DEV)
    zt.perturb_([big[0]], [0], seed, 1.0, dist, 4, 2**21, block_size=BIG)
    assert torch.equal(big[0], a) and not big[1].any()


@pytest.mark.parametrize("numel", [1, 129, 4097])
def test_perturb_fp32_vs_reference(numel):
    g = torch.Generator().manual_seed(numel)
    p0 = torch.randn(numel, generator=g)
    for dist in (RADE, GAUSS):
        mine, theirs = p0.clone().to(DEV), p0.clone()
        zt.perturb_([mine], [4], 2**33 + 1, -1e-3, dist, 17, 2**22, block_size=BIG)
        ref.perturb_([theirs], [4], 2**33 + 1, -1e-3, dist, 17, 2**22)
        if dist == RADE:
            assert torch.equal(mine.cpu(), theirs)
        else:
            assert (mine.cpu() - theirs).abs().max().item() <= 1e-3 * BOUND + 1e-7


def test_perturb_empty_and_roundtrip():
    zt.perturb_([], [], 1, 1.0, 0, 0, 0)
    p = torch.randn(4097, device=DEV)
    q = p.clone()
    zt.perturb_([q], [0], 9, 0.5, RADE, 0, 0, block_size=BIG)
    zt.perturb_([q], [0], 9, -0.5, RADE, 0, 0, block_size=BIG)
    assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dist", [GAUSS, RADE])
def test_low_precision_rne(dtype, dist):
    """§7: fp32 math, one round-to-nearest-even store == torch's .to(dtype) of the fp32 result."""
    p32 = torch.randn(4097, device=DEV) * 3
    p32[:6] = torch.tensor([0.0, -0.0, 1e-30, 65000.0, 1.0, float("inf")])
    p32[6:8] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8])  # exact bf16 ties after +z*scale=0? kept
    p_lo = p32.to(dtype)
    ref32 = p_lo.float()
    zt.perturb_([ref32], [3], 55, 1e-2, dist, 8, 2**20, block_size=BIG)
    zt.perturb_([p_lo], [3], 55, 1e-2, dist, 8, 2**20, block_size=BIG)
    assert torch.equal(p_lo, ref32.to(dtype))
    # ties: a perturbation of 0 leaves the exactly representable values unchanged, while
    # values sitting exactly half-way round to even
    x = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-11, 1.0 + 3 * 2**-11], device=DEV)
    want = x.to(dtype)
    y = x.to(dtype)
    zt.perturb_([y], [0], 1, 0.0, RADE, 0, 0, block_size=BIG)
    assert torch.equal(y, want)


def test_bf16_ties_round_to_even():
    """Manual RNE in the kernel: exact ties go to the even neighbour, NaN stays NaN."""
    base = torch.tensor([1.0, 1.0 + 2**-7, 2.0, -1.0, float("nan"), 3.0e38], device=DEV)
    z = z_of(6, 0, RADE).cpu()            # +-1 per element, exact
    want32 = base.cpu() + z * 2**-8     # 1 + 2^-8 is a bf16 tie
    p = base.to(torch.bfloat16)
    zt.perturb_([p], [0], 0, 2**-8, RADE, 0, 0, block_size=BIG)
    torch.testing.assert_close(p.cpu(), want32.to(torch.bfloat16), equal_nan=True, rtol=0, atol=0)


# ------------------------------------------------------------------ fused update ops
SHAPES = [(4097,), (3, 43), (1,)]


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def _both(ts):
    return [t.clone().to(DEV) for t in ts], [t.clone() for t in ts]


def _assert_match(mine, theirs, exact, ulps=0):
    for a, b in zip(mine, theirs):
        a = a.cpu()
        if ulps:
            # within `ulps` units in the last place of the storage dtype
            up = torch.nextafter(b, torch.full_like(b, float("inf"))) - b
            dn = b - torch.nextafter(b, torch.full_like(b, float("-inf")))
            tol = torch.maximum(up, dn).float() * ulps
            assert ((a.float() - b.float()).abs() <= tol).all(), (a.float() - b.float()).abs().max()
        elif exact:
            assert torch.equal(a, b), (a - b).abs().max()
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)


SGD_CASES = {
    "plain":           dict(),
    "wd":              dict(weight_decay=0.1),
    "momentum":        dict(momentum=0.9, dampening=0.1, mom=True),
    "momentum_init":   dict(momentum=0.9, mom=True, momentum_init=True),
    "nesterov_wd":     dict(momentum=0.9, nesterov=True, weight_decay=0.01, mom=True),
    "sign":            dict(sign=True),
    "history":         dict(hist=True, history_alpha=0.7),
    "history_init":    dict(hist=True, history_alpha=0.7, history_init=True),
    "mask_restore":    dict(T=2**23, restore_scale=-1e-3, momentum=0.5, mom=True),
    "everything":      dict(T=2**22, restore_scale=2e-3, momentum=0.9, nesterov=True, mom=True,
                            weight_decay=0.05, sign=True, hist=True, history_alpha=0.3),
}


def _run_sgd(fn, params, bufs, hists, q, dist, c, **kw):
    seeds = [2**40 + 7 * j for j in range(q)]
    coeffs = [0.37 - 0.21 * j for j in range(q)]
    fn(params, bufs, hists, list(range(10, 10 + len(params))), seeds, coeffs, dist,
       kw.get("mask_seed", 2**61 + 3), c.get("T", 0), 424242, c.get("restore_scale", 0.0),
       0.05, c.get("weight_decay", 0.0), c.get("momentum", 0.0), c.get("dampening", 0.0),
       c.get("nesterov", False), c.get("momentum_init", False), c.get("sign", False),
       c.get("history_alpha", 0.0), c.get("history_init", False), **kw.get("extra", {}))


@pytest.mark.parametrize("case", list(SGD_CASES))
@pytest.mark.parametrize("q", [1, 4])
@pytest.mark.parametrize("dist", [RADE, GAUSS])
def test_sgd_vs_reference(case, q, dist):
    c = SGD_CASES[case]
    (p_m, p_r) = _both(_params())
    (b_m, b_r) = _both([torch.randn(s) * 0.1 for s in SHAPES]) if c.get("mom") else ([], [])
    (h_m, h_r) = _both([torch.randn(s) * 0.1 for s in SHAPES]) if c.get("hist") else ([], [])
    for _ in range(2):  # two steps: buffers are read back
        _run_sgd(zt.zo_sgd_update_, p_m, b_m, h_m, q, dist, c, extra={"block_size": BIG})
        _run_sgd(ref.zo_sgd_update_, p_r, b_r, h_r, q, dist, c)
    exact = dist == RADE
    _assert_match(p_m, p_r, exact)
    _assert_match(b_m, b_r, exact)
    _assert_match(h_m, h_r, exact)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sgd_low_precision_vs_reference(dtype):
    c = SGD_CASES["everything"]
    (p_m, p_r) = _both(_params(dtype))
    (b_m, b_r) = _both([torch.randn(s).to(dtype) * 0.1 for s in SHAPES])
    (h_m, h_r) = _both([torch.randn(s) * 0.1 for s in SHAPES])   # fp32 history with low-precision params
    for _ in range(2):
        _run_sgd(zt.zo_sgd_update_, p_m, b_m, h_m, 4, RADE, c, extra={"block_size": BIG})
        _run_sgd(ref.zo_sgd_update_, p_r, b_r, h_r, 4, RADE, c)
    _assert_match(p_m, p_r, True)
    _assert_match(b_m, b_r, True)
    _assert_match(h_m, h_r, True)


def test_sgd_q0_and_empty():
    p = torch.randn(129, device=DEV)
    p0 = p.clone()
    zt.zo_sgd_update_([p], [], [], [0], [], [], 0, 0, 0, 0, 0.0, 0.1, 0.0, 0.0, 0.0,
                      False, False, False, 0.0, False, block_size=BIG)
    assert torch.equal(p, p0)
    zt.zo_sgd_update_([], [], [], [], [1], [1.0], 0, 0, 0, 0, 0.0, 0.1, 0.0, 0.0, 0.0,
                      False, False, False, 0.0, False)


def _run_adam(fn, params, ms, vs, hs, q, dist, step, c, **extra):
    seeds = [2**50 + 11 * j for j in range(q)]
    coeffs = [0.5 / q * (j + 1) * (-1) ** j for j in range(q)]
    fn(params, ms, vs, hs, list(range(len(params))), seeds, coeffs, dist, 77, c.get("T", 0),
       9, c.get("restore_scale", 0.0), 1e-2, 0.9, 0.999, 1e-8, c.get("weight_decay", 0.0),
       c.get("decoupled", False), step, c.get("sign", False), c.get("history_alpha", 0.0),
       c.get("history_init", False), **extra)


ADAM_CASES = {
    "adam":        dict(),
    "adam_l2":     dict(weight_decay=0.1),
    "adamw":       dict(weight_decay=0.1, decoupled=True),
    "mask_restore_sign": dict(T=2**23, restore_scale=1e-3, sign=True, weight_decay=0.01, decoupled=True),
    "history":     dict(hist=True, history_alpha=0.9, weight_decay=0.01),
}


@pytest.mark.parametrize("case", list(ADAM_CASES))
@pytest.mark.parametrize("q", [1, 4])
@pytest.mark.parametrize("dist", [RADE, GAUSS])
def test_adam_vs_reference(case, q, dist):
    c = ADAM_CASES[case]
    (p_m, p_r) = _both(_params())
    (m_m, m_r) = _both([torch.zeros(s) for s in SHAPES])
    (v_m, v_r) = _both([torch.zeros(s) for s in SHAPES])
    (h_m, h_r) = _both([torch.zeros(s) for s in SHAPES]) if c.get("hist") else ([], [])
    for step in (1, 2, 3):
        _run_adam(zt.zo_adam_update_, p_m, m_m, v_m, h_m, q, dist, step, c, block_size=BIG)
        _run_adam(ref.zo_adam_update_, p_r, m_r, v_r, h_r, q, dist, step, c)
    # Not bit-exact: on CPU torch.sqrt(float32) is not always correctly rounded (1 ulp
    # off, e.g. sqrt(0.00074924063f)), while the kernels use sqrt_rn; the difference then
    # propagates through p (and, with L2 weight decay, through g, m, v).
    # Gaussian: log/sin/cos of numpy (interpreter) vs torch differ by an ulp or so.
    for mine, theirs in ((p_m, p_r), (m_m, m_r), (v_m, v_r), (h_m, h_r)):
        for a, b in zip(mine, theirs):
            if dist == RADE:   # a few ulp, or 1e-5 of the lr-sized step near 0
                torch.testing.assert_close(a.cpu(), b, rtol=5e-7, atol=1e-7)
            else:
                torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adam_low_precision_vs_reference(dtype):
    c = ADAM_CASES["adamw"]
    (p_m, p_r) = _both(_params(dtype))
    (m_m, m_r) = _both([torch.zeros(s) for s in SHAPES])                  # fp32 moments
    (v_m, v_r) = _both([torch.zeros(s, dtype=dtype) for s in SHAPES])     # low-precision v
    for step in (1, 2):
        _run_adam(zt.zo_adam_update_, p_m, m_m, v_m, [], 2, RADE, step, c, block_size=BIG)
        _run_adam(ref.zo_adam_update_, p_r, m_r, v_r, [], 2, RADE, step, c)
    _assert_match(p_m, p_r, False, ulps=1)     # torch's CPU sqrt, see above
    _assert_match(m_m, m_r, True)              # AdamW: g does not depend on p
    _assert_match(v_m, v_r, True)


@pytest.mark.parametrize("betas,tight", [((0.875, 0.9990234375), True), ((0.9, 0.999), False)])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("dist", [RADE, GAUSS])
def test_adam_vs_torch_optim(decoupled, dist, betas, tight):
    """zo_adam_update_ == torch.optim.Adam/AdamW fed .grad = sum_j c_j z_j.

    With betas exact in fp32 the only differences are torch's CPU kernels (fused lerp,
    sqrt not always correctly rounded): a few ulp. With (0.9, 0.999) the kernels (like
    zfkernels.reference) use 1 - float32(beta2) = 0.00099998713 where torch uses
    float32(1 - beta2) = 0.001: v differs by 1.3e-5 relative."""
    b1, b2 = betas
    params = _params(seed=3)
    mine = [p.clone().to(DEV) for p in params]
    ms = [torch.zeros_like(p) for p in mine]
    vs = [torch.zeros_like(p) for p in mine]
    leaves = [torch.nn.Parameter(p.clone()) for p in params]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls(leaves, lr=1e-2, betas=betas, eps=1e-8, weight_decay=0.1, foreach=False)
    seeds, coeffs = [5, 6], [0.25, -0.75]
    for step in (1, 2, 3):
        zt.zo_adam_update_(mine, ms, vs, [], [0, 1, 2], seeds, coeffs, dist, 0, 0, 0, 0.0,
                           1e-2, b1, b2, 1e-8, 0.1, decoupled, step, False, 0.0, False,
                           block_size=BIG)
        for k, leaf in enumerate(leaves):
            n = leaf.numel()
            g = sum(ref.perturbation(s, n, dist, k) * torch.tensor(c, dtype=torch.float32).item()
                    for s, c in zip(seeds, coeffs))
            leaf.grad = g.view_as(leaf)
        opt.step()
    rtol = 2e-6 if tight else 3e-5
    for a, leaf, m, v in zip(mine, leaves, ms, vs):
        st = opt.state[leaf]
        torch.testing.assert_close(a.cpu(), leaf.detach(), rtol=rtol, atol=1e-6 if tight else 1e-5)
        torch.testing.assert_close(m.cpu(), st["exp_avg"], rtol=rtol, atol=1e-7)
        torch.testing.assert_close(v.cpu(), st["exp_avg_sq"], rtol=rtol, atol=1e-9)


# ------------------------------------------------------------------------- errors
def _perturb_args(params, **over):
    a = dict(params=params, tensor_ids=list(range(len(params))), seed=1, scale=1.0, dist=0,
             mask_seed=0, mask_threshold=0)
    a.update(over)
    return a


@pytest.mark.parametrize("bad,match", [
    (lambda: dict(params=[torch.zeros(4, 4, device=DEV).t()]), "contiguous"),
    (lambda: dict(params=[torch.zeros(4, dtype=torch.int32, device=DEV)]), "dtype"),
    (lambda: dict(params=[torch.zeros(4, dtype=torch.float64, device=DEV)]), "dtype"),
    (lambda: dict(tensor_ids=[0, 1]), "tensor_ids"),
    (lambda: dict(tensor_ids=[2**32]), "tensor_ids"),
    (lambda: dict(seed=2**63), "seed"),
    (lambda: dict(mask_seed=-1), "mask_seed"),
    (lambda: dict(dist=2), "dist"),
    (lambda: dict(mask_threshold=2**24 + 1), "mask_threshold"),
])
def test_perturb_errors(bad, match):
    a = _perturb_args([torch.zeros(4, device=DEV)])
    a.update(bad())
    if "tensor_ids" not in bad():
        a["tensor_ids"] = list(range(len(a["params"])))
    with pytest.raises(ValueError, match=match):
        zt.perturb_(**a)


def test_update_errors():
    p = [torch.zeros(4, device=DEV)]
    base = dict(params=p, momentum_buffers=[], history_buffers=[], tensor_ids=[0], seeds=[1],
                coeffs=[1.0], dist=0, mask_seed=0, mask_threshold=0, restore_seed=0,
                restore_scale=0.0, lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0,
                nesterov=False, momentum_init=False, sign=False, history_alpha=0.0,
                history_init=False)
    for over, match in [
        (dict(coeffs=[1.0, 2.0]), "coeffs"),
        (dict(momentum_buffers=[torch.zeros(5, device=DEV)]), "momentum_buffers"),
        (dict(momentum_buffers=[torch.zeros(4, dtype=torch.float16, device=DEV)]), "momentum_buffers"),
        (dict(history_buffers=[torch.zeros(4, device=DEV), torch.zeros(4, device=DEV)]), "history_buffers"),
        (dict(restore_seed=2**63), "restore_seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            zt.zo_sgd_update_(**{**base, **over})
    with pytest.raises(ValueError, match="exp_avgs"):
        zt.zo_adam_update_(p, [], [], [], [0], [1], [1.0], 0, 0, 0, 0, 0.0, 1e-3, 0.9, 0.999,
                           1e-8, 0.0, False, 1, False, 0.0, False)
    with pytest.raises(ValueError, match="step"):
        zt.zo_adam_update_(p, [torch.zeros(4, device=DEV)], [torch.zeros(4, device=DEV)], [], [0], [1],
                           [1.0], 0, 0, 0, 0, 0.0, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 0, False, 0.0, False)
