"""The pure-PyTorch reference against the spec (docs/perturbation-stream.md) and against
independent oracles: Random123 known-answer vectors, Triton's own Philox, float64
Box–Muller, binomial statistics, and torch.optim fed the same estimate."""
import math

import pytest
import torch

import zfkernels as zk
from zfkernels import reference as R
from zfkernels import stream as S

KAT = [  # Random123 kat_vectors, philox4x32 10: counter, key, expected output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    assert S.philox4x32_10_scalar(ctr, key) == expected
    out = zk.philox4x32_10(torch.tensor([ctr], dtype=torch.int64), key, backend="torch")
    assert tuple(out[0].tolist()) == expected


try:
    import triton
    import triton.language as tl
    from triton.language.random import philox as _triton_philox
except ImportError:  # Triton is optional; the test below is skipped without it
    triton = None

if triton is not None:

    @triton.jit
    def _triton_philox_oracle(c_ptr, out_ptr, k0, k1, N: tl.constexpr):
        i = tl.arange(0, N)
        c0 = tl.load(c_ptr + i * 4 + 0).to(tl.uint32)
        c1 = tl.load(c_ptr + i * 4 + 1).to(tl.uint32)
        c2 = tl.load(c_ptr + i * 4 + 2).to(tl.uint32)
        c3 = tl.load(c_ptr + i * 4 + 3).to(tl.uint32)
        seed = (k1.to(tl.uint64) << 32) | k0.to(tl.uint64)
        x0, x1, x2, x3 = _triton_philox(seed, c0, c1, c2, c3)
        tl.store(out_ptr + i * 4 + 0, x0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + i * 4 + 1, x1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + i * 4 + 2, x2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + i * 4 + 3, x3.to(tl.int64) & 0xFFFFFFFF)


@pytest.mark.skipif(triton is None, reason="triton not installed")
def test_reference_philox_matches_triton_philox():
    """Triton's built-in Philox (the core of tl.randint4x) as an independent oracle."""
    g = torch.Generator().manual_seed(1)
    n = 64
    ctr = torch.randint(0, 2**32, (n, 4), generator=g, dtype=torch.int64)
    k0, k1 = 0x12345678, 0x0ABCDEF0
    out = torch.empty_like(ctr)
    _triton_philox_oracle[(1,)](ctr, out, k0, k1, N=n)
    assert torch.equal(R.philox4x32_10(ctr, k0, k1), out)


def test_stream_mapping_counter_layout():
    """§2: element words come from counter (b lo, b hi, tensor_id, tag), key (seed lo, hi)."""
    seed, tid = (7 << 32) | 11, 5
    b = torch.tensor([0, 1, 2**32 + 3], dtype=torch.int64)
    words = R.stream_words(seed, tid, S.TAG_MASK, b)
    for row, bb in zip(words.tolist(), b.tolist()):
        assert tuple(row) == S.philox4x32_10_scalar((bb & S.MASK32, bb >> 32, tid, 1), (11, 7))


def test_rademacher_bit_layout_and_balance():
    seed, n = 99, 1000
    z = R.rademacher(seed, n, tensor_id=3)
    words = [S.philox4x32_10_scalar((b, 0, 3, 0), S.split_seed(seed)) for b in range((n + 127) // 128)]
    for i in (0, 1, 31, 32, 127, 128, 999):
        bit = (words[i >> 7][(i & 127) >> 5] >> (i & 31)) & 1
        assert z[i].item() == (1.0 if bit else -1.0)
    big = R.rademacher(1, 1 << 18)
    assert set(big.unique().tolist()) == {-1.0, 1.0}
    assert abs(big.mean().item()) < 5 / math.sqrt(big.numel())  # 5 sigma


def test_gaussian_within_bound_and_moments():
    z = R.gaussian(2024, 1 << 18, tensor_id=1)
    err = (z.double() - R.gaussian_float64(2024, 1 << 18, tensor_id=1)).abs().max().item()
    assert err <= R.GAUSSIAN_BOUND
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert z.abs().max().item() <= math.sqrt(48 * math.log(2)) + 1e-6


def test_uniform_edges():
    x = torch.tensor([0, 0xFF, 0x100, 0xFFFFFFFF], dtype=torch.int64)
    assert R.u_open(x).tolist() == [2**-24, 2**-24, 2 * 2**-24, 1.0]
    assert R.u_closed(x).tolist() == [0.0, 0.0, 2**-24, 1 - 2**-24]


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_mask_zeroes_the_stated_fraction(sparsity):
    n = 1 << 18
    keep = zk.sparse_mask(5, n, sparsity)
    p = S.mask_threshold(sparsity) / 2**24
    zeroed = (~keep).float().mean().item()
    assert abs(zeroed - p) < 5 * math.sqrt(p * (1 - p) / n)
    # The public code's defect (Gaussian compared to the ratio) would zero Phi(s):
    assert abs(zeroed - 0.5 * (1 + math.erf(sparsity / math.sqrt(2)))) > 0.05


def test_mask_extremes_and_threshold_validation():
    assert zk.sparse_mask(1, 1000, 0.0).all()
    assert not zk.sparse_mask(1, 1000, 1.0).any()
    with pytest.raises(ValueError, match="sparsity"):
        S.mask_threshold(1.5)


def test_reference_ops_take_sparsity_one():
    # docs/kernel-ops.md: mask_threshold is in [0, 2^24]; its top, sparsity 1, masks every
    # coordinate (stream §6): the reference ops run it as a no-op, not refuse it as the top of a
    # half-open range
    p = torch.ones(300)
    zk.perturb_([p], 8, 1.0, "gaussian", sparsity=1.0, backend="torch")
    zk.zo_sgd_update_([p], [8], [0.5], lr=1.0, sparsity=1.0, backend="torch")
    assert torch.equal(p, torch.ones(300))


def _mask_values(mask_seed, tensor_id, n):
    """§6 from the spec's words: element i's 24-bit mask value, word x_(i & 3) of the Philox call
    with counter (i >> 2, 0, tensor_id, tag 1) and the mask seed's key, shifted right by 8."""
    key = S.split_seed(mask_seed)
    return [S.philox4x32_10_scalar((i >> 2, 0, tensor_id, S.TAG_MASK), key)[i & 3] >> 8 for i in range(n)]


def test_mask_keeps_the_element_at_the_threshold():
    """§6: m_i = 0 iff (x >> 8) < T, so an element whose value equals T is kept and
    P(m_i = 0) = T / 2^24 exactly. Keeping only values above T would zero it too: T + 1 of
    the 2^24 values zeroed."""
    vals = _mask_values(7, 3, 16)
    for k in (0, 5, 13):
        T = vals[k]
        keep = R.keep_mask(7, 16, 3, T)
        assert keep.tolist() == [v >= T for v in vals] and keep[k].item()
        assert not R.keep_mask(7, 16, 3, T + 1)[k].item()


def test_mask_threshold_rounds_to_nearest_ties_to_even():
    """§6: T = round(sparsity * 2^24), ties to even as Python's round. Truncation would give
    1677721 for 0.1 (0.1 * 2^24 = 1677721.6) and zero a fraction 6e-8 short; half-up rounding
    would give 3 for 2.5 * 2^-24."""
    assert S.mask_threshold(0.1) == 1677722          # 1677721.6
    assert S.mask_threshold(0.3) == 5033165          # 5033164.8
    assert S.mask_threshold(0.2) == 3355443          # 3355443.2: down
    assert S.mask_threshold(1.5 * 2**-24) == 2       # exact ties: to even
    assert S.mask_threshold(2.5 * 2**-24) == 2
    assert S.mask_threshold(2**-25) == 0             # "a sparsity of at most 2^-25 gives T = 0"
    assert S.mask_threshold(1.0) == 1 << 24


def test_z_depends_only_on_seed_tensor_id_and_index():
    sizes = [1, 127, 129, 4097, 300]
    ts = [torch.zeros(n) for n in sizes]
    zk.perturb_(ts, 17, 1.0, "gaussian", backend="torch")
    for k, (t, n) in enumerate(zip(ts, sizes)):
        assert torch.equal(t, R.gaussian(17, n, tensor_id=k))
    # Reordering the list with the same ids changes nothing; prefixes agree (slicing).
    rev = [torch.zeros(n) for n in reversed(sizes)]
    zk.perturb_(rev, 17, 1.0, "gaussian", tensor_ids=list(reversed(range(len(sizes)))), backend="torch")
    for a, b in zip(ts, reversed(rev)):
        assert torch.equal(a, b)
    assert torch.equal(R.rademacher(3, 4097)[:130], R.rademacher(3, 130))
    assert torch.equal(R.gaussian(3, 4097)[:130], R.gaussian(3, 130))
    assert not torch.equal(R.gaussian(3, 64, tensor_id=0), R.gaussian(3, 64, tensor_id=1))


def test_seed_schedule():
    seeds = {S.derive_seed(123, step, q) for step in range(50) for q in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert S.derive_seed(123, 7, 2) == S.derive_seed(123, 7, 2)
    x0, x1, _, _ = S.philox4x32_10_scalar((7, 0, 2, 2), (123, 0))
    assert S.derive_seed(123, 7, 2) == (x0 | (x1 << 32)) & (2**63 - 1)


def test_seed_schedule_takes_the_high_words_of_step_and_seed():
    # stream §8: counter (n mod 2^32, n >> 32, j, 2), key (S mod 2^32, S >> 32). A schedule that
    # dropped n >> 32 gave step n + 2^32 the seeds of step n; both words are 0 in the test above
    step, seed = 2**32 + 7, 2**40 + 123
    x0, x1, _, _ = S.philox4x32_10_scalar((7, 1, 2, 2), (123, 2**8))
    assert S.derive_seed(seed, step, 2) == (x0 | (x1 << 32)) & (2**63 - 1)
    assert S.derive_seed(seed, step, 2) != S.derive_seed(seed, 7, 2)
    # §2: seeds are in [0, 2^63): the largest is accepted, 2^63 refused (not wrapped)
    assert 0 <= S.derive_seed(2**63 - 1, 2**64 - 1, 2**32 - 1) < 2**63
    for bad in (2**63, -1):
        with pytest.raises(ValueError, match="outside"):
            S.derive_seed(bad, 0, 0)
    with pytest.raises(ValueError, match="step"):
        S.derive_seed(1, 2**64, 0)


def test_distribution_names_ignore_case():
    # stream.dist_code lower-cases the name: "Gaussian" is the gaussian stream (dist 0,
    # docs/kernel-ops.md), not an error and not the other distribution
    assert [S.dist_code(n) for n in ("Gaussian", "GAUSSIAN", "Rademacher", "RADEMACHER")] == [0, 0, 1, 1]
    a, b = torch.zeros(300), torch.zeros(300)
    zk.perturb_([a], 8, 1.0, "Rademacher", backend="torch")
    zk.perturb_([b], 8, 1.0, "rademacher", backend="torch")
    assert torch.equal(a, b) and set(a.tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_perturb_plus_minus_restores(dtype):
    theta = torch.randn(5000).to(dtype)
    orig = theta.clone()
    eps = 1e-3
    zk.perturb_([theta], 8, eps, "gaussian", backend="torch")
    assert not torch.equal(theta, orig)
    zk.perturb_([theta], 8, -eps, "gaussian", backend="torch")
    ulp = torch.finfo(dtype).eps * orig.float().abs().clamp_min(eps * 6)
    assert ((theta.float() - orig.float()).abs() <= ulp).all()


def _estimate(params, seeds, coeffs, dist, sparsity=0.0, mask_seed=0):
    out = []
    for k, p in enumerate(params):
        g = torch.zeros(p.numel())
        for s, c in zip(seeds, coeffs):
            g += c * zk.perturbation(s, p.numel(), dist, tensor_id=k, backend="torch", mask_seed=mask_seed,
                                     sparsity=sparsity)
        out.append(g.view_as(p))
    return out


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 5e-4), (0.9, True, 1e-2)])
def test_reference_sgd_equals_torch_sgd_fed_the_estimate(momentum, nesterov, wd):
    torch.manual_seed(0)
    params = [torch.randn(37), torch.randn(4, 33)]
    ref = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.SGD(ref, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    bufs = [torch.zeros_like(p) for p in params] if momentum else []
    for step in range(3):
        seeds, coeffs = [100 + step, 200 + step], [0.3, -0.7]
        for p, g in zip(ref, _estimate(params, seeds, coeffs, "rademacher", 0.25, 9)):
            p.grad = g
        opt.step()
        zk.zo_sgd_update_(params, seeds, coeffs, lr=0.1, dist="rademacher", momentum_buffers=bufs,
                          momentum=momentum, nesterov=nesterov, weight_decay=wd, momentum_init=step == 0,
                          sparsity=0.25, mask_seed=9, backend="torch")
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("decoupled", [False, True])
def test_reference_adam_equals_torch_adam_fed_the_estimate(decoupled):
    torch.manual_seed(0)
    params = [torch.randn(50), torch.randn(3, 7)]
    ref = [p.clone().requires_grad_(True) for p in params]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls(ref, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step in range(1, 5):
        seeds, coeffs = [step], [0.5 * step]
        for p, g in zip(ref, _estimate(params, seeds, coeffs, "gaussian")):
            p.grad = g
        opt.step()
        zk.zo_adam_update_(params, m, v, seeds, coeffs, lr=1e-2, step=step, betas=(0.9, 0.99), eps=1e-8,
                           weight_decay=0.05, decoupled_weight_decay=decoupled, backend="torch")
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r.detach(), rtol=1e-5, atol=1e-6)


def test_reference_restore_and_history_and_sign():
    theta = torch.randn(300)
    start = theta.clone()
    eps, seed = 1e-3, 41
    zk.perturb_([theta], seed, -eps, "gaussian", backend="torch")  # left at theta - eps z
    h = torch.zeros(300)
    zk.zo_sgd_update_([theta], [seed], [2.0], lr=0.01, history_buffers=[h], history_alpha=0.8,
                      history_init=True, sign=True, restore_seed=seed, restore_scale=eps, backend="torch")
    z = R.gaussian(seed, 300)
    torch.testing.assert_close(h, 2.0 * z)
    torch.testing.assert_close(theta, start - 0.01 * torch.sign(z), atol=2e-6, rtol=0)
    zk.zo_sgd_update_([theta], [seed + 1], [1.0], lr=0.0, history_buffers=[h], history_alpha=0.8,
                      backend="torch")
    torch.testing.assert_close(h, 0.8 * 2.0 * z + 0.2 * R.gaussian(seed + 1, 300))


def test_face_rejects_bad_input():
    with pytest.raises(ValueError, match="backend"):
        zk.perturb_([torch.zeros(3)], 1, 1.0, backend="bogus")
    with pytest.raises(ValueError, match="dist"):
        zk.perturb_([torch.zeros(3)], 1, 1.0, dist="uniform", backend="torch")
    with pytest.raises(ValueError, match="seed"):
        zk.perturb_([torch.zeros(3)], -1, 1.0, backend="torch")
    with pytest.raises(TypeError, match="list"):
        zk.perturb_(torch.zeros(3), 1, 1.0, backend="torch")
    with pytest.raises(ValueError, match="contiguous"):
        zk.perturb_([torch.zeros(4, 4).t()], 1, 1.0, backend="torch")
    with pytest.raises(ValueError, match="dtype"):
        zk.perturb_([torch.zeros(4, dtype=torch.int32)], 1, 1.0, backend="torch")
    with pytest.raises(ValueError, match="coeff"):
        zk.zo_sgd_update_([torch.zeros(3)], [1, 2], [0.1], lr=0.1, backend="torch")
    zk.perturb_([], 1, 1.0, backend="torch")  # empty list: no-op


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_ops_update_leaf_parameters_outside_autograd(backend):
    """The ops mutate nn.Parameters (leaves requiring grad) even in grad mode, like torch.optim:
    not recorded by autograd, no 'leaf variable used in an in-place operation' error."""
    if backend not in zk.available_backends():
        pytest.skip(f"backend {backend} not built here")
    p = torch.nn.Parameter(torch.zeros(300))
    assert torch.is_grad_enabled()
    zk.perturb_([p], seed=5, scale=1.0, dist="rademacher", backend=backend)
    assert torch.equal(p.detach().abs(), torch.ones(300)) and p.grad_fn is None and p.requires_grad
    zk.zo_sgd_update_([p], seeds=[5], coeffs=[1.0], lr=0.5, dist="rademacher", backend=backend)
    assert torch.equal(p.detach(), 0.5 * zk.perturbation(5, 300, "rademacher"))
    assert p.grad_fn is None and torch.is_grad_enabled()


def _span_case(dtype, backend, dist, variant):
    """Two tensors (one spanning several reference spans at a small SPAN, sizes not multiples
    of 4 or 128), run through perturb_ then one update op with every feature of ``variant``."""
    g = torch.Generator().manual_seed(5)
    params = [(torch.randn(n, generator=g) * 0.5).to(dtype) for n in (1000, 77)]
    kw = dict(dist=dist, tensor_ids=[3, 2**32 - 1], backend=backend, sparsity=0.3 if "mask" in variant else 0.0,
              mask_seed=11, stochastic_rounding="sr" in variant, round_seed=13)
    zk.perturb_(params, 7, 1e-2, dist, tensor_ids=kw["tensor_ids"], mask_seed=11, sparsity=kw["sparsity"],
                backend=backend)
    if variant.startswith("sgd"):
        mom = [torch.zeros_like(p) for p in params]
        hist = [torch.zeros_like(p) for p in params] if "hist" in variant else []
        for step in range(2):
            zk.zo_sgd_update_(params, [7, 8], [0.3, -0.2], lr=0.05, momentum_buffers=mom, momentum=0.9,
                              nesterov=True, momentum_init=step == 0, weight_decay=1e-2, history_buffers=hist,
                              history_alpha=0.5 if hist else 0.0, history_init=step == 0, sign="sign" in variant,
                              restore_seed=7, restore_scale=-1e-2 if step == 0 else 0.0, **kw)
        return params + mom + hist
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for step in (1, 2):
        zk.zo_adam_update_(params, m, v, [7], [0.4], lr=1e-2, step=step, weight_decay=1e-2,
                           decoupled_weight_decay=True, restore_seed=7, restore_scale=-1e-2 if step == 1 else 0.0,
                           **kw)
    return params + m + v


@pytest.mark.parametrize("variant", ["sgd", "sgd-mask-hist-sign", "sgd-sr", "adam", "adam-mask-sr"])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_reference_in_spans_gives_the_compiled_ops_bits(monkeypatch, dtype, dist, variant):
    """The reference runs a tensor in spans of R.SPAN elements (its temporaries took ~100 bytes
    per element: a 2e8-element tensor ran out of 24 GB). At SPAN = 256 the 1000-element tensor
    takes 4 spans; every stream (z, mask, rounding words) must continue across them."""
    monkeypatch.setattr(R, "SPAN", 256)
    assert all(torch.equal(a.view(torch.int16) if a.dtype != torch.float32 else a.view(torch.int32),
                           b.view(torch.int16) if b.dtype != torch.float32 else b.view(torch.int32))
               for a, b in zip(_span_case(dtype, "torch", dist, variant), _span_case(dtype, "cpu", dist, variant)))
