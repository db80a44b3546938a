"""Pure-PyTorch reference implementation of stream v1 and the kernel ops.

Readable and slow on purpose: it states docs/perturbation-stream.md and
docs/kernel-ops.md in plain tensor code, is the oracle of every backend test, and is
the explicit ``backend="torch"`` (it runs on any device torch supports). It allocates
temporaries (z, masks, Philox words) of 68-159 bytes per element of a span of ``SPAN`` elements
(measured, tests/test_memory_contract.py): never use it for speed.

Integer math is done in int64 with 16-bit splits so that no product overflows. Every
float step is a single fp32 operation in the order the spec writes it (docs/kernel-ops.md,
"Arithmetic"): separate multiplies and adds (never ``alpha=`` / ``addcmul`` forms, which may
fuse), the Gaussian's polynomial log and sincos (§5) instead of ``torch.log``/``sin``/``cos``,
and correctly rounded sqrt and division (computed in float64 and rounded once to fp32,
which is exact for these two operations; ``torch.sqrt`` on fp32 CPU tensors is not always
correctly rounded). That is what makes the results equal, bit for bit, to every kernel.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import stream as S
from ._overlap import check_no_overlap
from .opspec import check_adam_scalars, check_betas, check_scalars, check_writable

_C = S.f32_from_bits  # §5 constants: exact fp32 values from their bit patterns
_PI_F32 = _C(S.PI_F32_BITS)  # 3.14159274
_TWO_M24 = _C(S.TWO_M24_BITS)
_LOW = 0xFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a*b, a a 32-bit constant, b < 2^32."""
    bh, bl = b >> 16, b & _LOW
    low = a * bl                         # < 2^48
    mid = a * bh                         # < 2^48; product = mid * 2^16 + low
    t = ((mid & _LOW) << 16) + low       # < 2^49
    lo = t & S.MASK32
    hi = (mid >> 16) + (t >> 32)
    return hi & S.MASK32, lo


def philox4x32_10(counters: torch.Tensor, key0: int, key1: int) -> torch.Tensor:
    """Philox4x32-10 (§1). ``counters``: int64 ``[N, 4]`` with values in [0, 2^32); keys in
    [0, 2^32). A value outside that range is refused, as the compiled and Triton ops refuse it,
    never reduced modulo 2^32."""
    # the messages are the compiled ops' (csrc/ops_common.h check_counters, check_key)
    if counters.layout != torch.strided:    # a sparse one failed in aten::min without a word of counters
        raise ValueError(f"zfkernels: counters must be a dense tensor; {COUNTERS_DENSE_FIX}")
    if counters.dtype not in (torch.int64, torch.int32, torch.uint32):
        raise ValueError(f"zfkernels: counters has dtype {counters.dtype}; {COUNTERS_DTYPE_FIX}")
    if counters.dim() != 2 or counters.shape[1] != 4:
        raise ValueError(f"zfkernels: counters must have shape [N, 4], got {list(counters.shape)}; "
                         f"{COUNTERS_SHAPE_FIX}")
    for name, k in (("key0", key0), ("key1", key1)):
        if not 0 <= int(k) <= S.MASK32:
            raise ValueError(f"zfkernels: {name}={k} must be a 32-bit unsigned integer in [0, 2**32); {KEY_FIX}")
    c = counters.to(torch.int64)
    # a meta tensor has no values (the compiled Meta kernel checks none): its call gives the shape
    if c.numel() and not c.is_meta:
        lo, hi = int(c.min()), int(c.max())
        if not (lo >= 0 and hi <= S.MASK32):
            raise ValueError(counter_values_refused(lo, hi))
    return _philox(c, int(key0), int(key1))


# What the philox op's refusals tell the caller to give, the same on every backend (the
# compiled ops spell it in csrc/ops_common.h; zfkernels/triton/philox.py imports these).
COUNTERS_DTYPE_FIX = "use an int64 tensor (values in [0, 2**32)), e.g. counters.to(torch.int64)"
COUNTERS_SHAPE_FIX = "give one row of four 32-bit counter words (c0, c1, c2, c3) per output row"
COUNTERS_DENSE_FIX = "give a strided one (counters.to_dense())"
KEY_FIX = "give one 32-bit word of the key, e.g. key0 = seed & 0xFFFFFFFF and key1 = seed >> 32 for a 64-bit seed"


def counter_values_refused(lo: int, hi: int, prefix: str = "zfkernels") -> str:
    """The refusal of counters whose values run from ``lo`` to ``hi``, outside [0, 2^32)."""
    return (f"{prefix}: counters values must lie in [0, 2**32), got values from {lo} to {hi}; each value is one "
            "32-bit word of a counter: split a wider counter n over the words, e.g. (n & 0xFFFFFFFF, n >> 32, 0, 0)")


def _philox(c: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """The ten rounds of :func:`philox4x32_10` on counters and keys already in range."""
    c0, c1, c2, c3 = c.unbind(1)
    for _ in range(10):
        hi0, lo0 = _mulhilo(S.PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(S.PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + S.PHILOX_W0) & S.MASK32
        k1 = (k1 + S.PHILOX_W1) & S.MASK32
    return torch.stack([c0, c1, c2, c3], dim=1)


def stream_words(seed: int, tensor_id: int, tag: int, blocks: torch.Tensor) -> torch.Tensor:
    """The Philox words of §2 for block indices ``blocks`` (int64): ``[len(blocks), 4]``."""
    k0, k1 = S.split_seed(S.check_seed(seed))
    _check_tensor_id(tensor_id)
    counters = torch.stack(
        [blocks & S.MASK32, blocks >> 32, torch.full_like(blocks, tensor_id), torch.full_like(blocks, tag)],
        dim=1,
    )
    return _philox(counters, k0, k1)


def _check_tensor_id(tensor_id: int) -> None:
    """Tensor ids are counter words (§2): refused outside [0, 2^32), never wrapped."""
    if not 0 <= int(tensor_id) < S.TENSOR_ID_LIMIT:
        raise ValueError(f"zfkernels: tensor_id={tensor_id} is outside [0, 2**32); use a 32-bit unsigned id")


def u_open(x: torch.Tensor) -> torch.Tensor:
    """§3: ((x >> 8) + 1) * 2^-24 in (0, 1], exact in fp32."""
    return ((x >> 8) + 1).to(torch.float32) * _TWO_M24


def u_closed(x: torch.Tensor) -> torch.Tensor:
    """§3: (x >> 8) * 2^-24 in [0, 1), exact in fp32."""
    return (x >> 8).to(torch.float32) * _TWO_M24


def _words_of(seed: int, tensor_id: int, tag: int, start: int, numel: int, shift: int,
              device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(i, row, words)``: elements ``i = start .. start + numel - 1`` (int64), the Philox
    words of their blocks (block ``i >> shift``) and each element's row in them."""
    i = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    first = start >> shift
    end = ((start + numel - 1) >> shift) + 1 if numel else first
    words = stream_words(seed, tensor_id, tag, torch.arange(first, end, dtype=torch.int64, device=device))
    return i, (i >> shift) - first, words


def rademacher(seed: int, numel: int, tensor_id: int = 0, device="cpu", start: int = 0) -> torch.Tensor:
    """§4: fp32 ±1, one bit per element, 128 elements per Philox call (elements ``start ..
    start + numel - 1`` of the tensor's stream)."""
    i, row, words = _words_of(seed, tensor_id, S.TAG_PERTURBATION, start, numel, 7, device)
    j = i & 127
    w = words[row, j >> 5]
    bit = (w >> (j & 31)) & 1
    return bit.to(torch.float32) * 2 - 1


def box_muller_inputs(seed: int, numel: int, tensor_id: int = 0, device="cpu",
                      start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """§5: per element, the pair's (u, s) and whether it is the sine (odd) lane."""
    i, row, words = _words_of(seed, tensor_id, S.TAG_PERTURBATION, start, numel, 2, device)
    lane = i & 3
    pair = lane >> 1
    x_even = words[row, pair * 2]
    x_odd = words[row, pair * 2 + 1]
    u = u_open(x_even)
    s = u_closed(x_odd) * 2 - 1
    return u, s, (lane & 1).bool()


def _nearest_neighbours(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``r``'s neighbours below/above and the exact float64 midpoints to them."""
    dn = torch.nextafter(r, torch.full_like(r, float("-inf")))
    up = torch.nextafter(r, torch.full_like(r, float("inf")))
    return dn, up, (r.double() + dn.double()) * 0.5, (r.double() + up.double()) * 0.5


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt. ``torch.sqrt`` is not (fp32 or float64 alike, on the CPU
    it is a SLEEF-style approximation), so: a float64 sqrt rounded to fp32, then one exact
    correction step -- ``r`` is the correctly rounded root iff ``lo^2 <= x <= hi^2`` for the
    midpoints ``lo``/``hi`` to its neighbours (25-bit midpoints: their squares are exact in
    float64, and no fp32 ``x`` lies exactly on one)."""
    r = torch.sqrt(x.double()).float()
    dn, up, lo, hi = _nearest_neighbours(r)
    xd = x.double()
    ok = torch.isfinite(r) & (r > 0)
    r = torch.where(ok & (hi * hi < xd), up, r)
    return torch.where(ok & (lo * lo > xd), dn, r)


def div_rn(a: torch.Tensor, b) -> torch.Tensor:
    """Correctly rounded fp32 ``a / b`` (same scheme as :func:`sqrt_rn`: a float64 quotient
    rounded to fp32, corrected by exact float64 products ``midpoint * b``)."""
    b = b.double() if isinstance(b, torch.Tensor) else torch.tensor(float(b), dtype=torch.float64, device=a.device)
    ad = a.double()
    r = (ad / b).float()
    dn, up, lo, hi = _nearest_neighbours(r)
    ok = torch.isfinite(r) & (r != 0) & torch.isfinite(b) & (b != 0)
    flip = b < 0      # the quotient decreases in the midpoint's direction: compare reversed
    above = torch.where(flip, hi * b > ad, hi * b < ad)    # a/b > hi
    below = torch.where(flip, lo * b < ad, lo * b > ad)    # a/b < lo
    r = torch.where(ok & above, up, r)
    return torch.where(ok & below, dn, r)


def log_f32(x: torch.Tensor) -> torch.Tensor:
    """§5 natural log of fp32 ``x`` in (0, 1] (positive normal), as csrc/philox.h log_f32:
    ``x = 2^e * m``, ``m`` in ``[sqrt(1/2), sqrt(2))``, ``f = m - 1``,
    ``log x = f - f^2/2 + f^3 P(f) + e ln2`` with ln2 in two parts."""
    ix = x.contiguous().view(torch.int32).to(torch.int64) & S.MASK32
    t = (ix - S.LOG_SQRT_HALF_BITS) & S.MASK32
    e = torch.where(t >= 1 << 31, t - (1 << 32), t) >> 23          # int32(t) >> 23, arithmetic
    m = ((t & 0x007FFFFF) + S.LOG_SQRT_HALF_BITS).to(torch.int32).view(torch.float32)
    f = m - 1.0
    ef = e.to(torch.float32)
    z = f * f
    y = torch.full_like(f, _C(S.LOG_POLY_BITS[0]))
    for bits in S.LOG_POLY_BITS[1:]:
        y = y * f + _C(bits)
    y = y * f * z
    y = y + ef * _C(S.LN2_LO_BITS)
    y = y - z * 0.5
    r = f + y
    return r + ef * _C(S.LN2_HI_BITS)


def sincos_f32(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """§5 ``(sin a, cos a)`` for fp32 ``a`` in [-4, 4], as csrc/philox.h sincos_f32: reduce
    by ``k * pi/2`` (k = a * 2/pi rounded half away from zero, pi/2 in three parts), then the
    sine and cosine polynomials on [-pi/4, pi/4] and the quadrant ``k mod 4``."""
    q = a * _C(S.TWO_OVER_PI_BITS)
    k = (q + torch.where(q >= 0, 0.5, -0.5)).to(torch.int32)          # truncation toward 0
    kf = k.to(torch.float32)
    y = a
    for bits in S.PIO2_PARTS_BITS:
        y = y - kf * _C(bits)
    z = y * y
    ps = torch.full_like(z, _C(S.SIN_POLY_BITS[0]))
    for bits in S.SIN_POLY_BITS[1:]:
        ps = ps * z + _C(bits)
    sy = y + ps * z * y
    pc = torch.full_like(z, _C(S.COS_POLY_BITS[0]))
    for bits in S.COS_POLY_BITS[1:]:
        pc = pc * z + _C(bits)
    cy = (1.0 - z * 0.5) + pc * z * z
    quadrant = k.to(torch.int64) & 3
    swap = (quadrant & 1) != 0
    s0, c0 = torch.where(swap, cy, sy), torch.where(swap, sy, cy)
    sin = torch.where((quadrant & 2) != 0, -s0, s0)                      # quadrants 2, 3
    cos = torch.where(((quadrant + 1) & 2) != 0, -c0, c0)                # quadrants 1, 2
    return sin, cos


def gaussian(seed: int, numel: int, tensor_id: int = 0, device="cpu", start: int = 0) -> torch.Tensor:
    """§5: fp32 standard normals, four per Philox call (Box–Muller with the spec's
    polynomial log and sincos)."""
    u, s, odd = box_muller_inputs(seed, numel, tensor_id, device, start)
    r = sqrt_rn(log_f32(u) * -2.0)
    sin, cos = sincos_f32(s * _PI_F32)
    return torch.where(odd, r * sin, r * cos)


def gaussian_float64(seed: int, numel: int, tensor_id: int = 0, device="cpu") -> torch.Tensor:
    """§5 in float64 from the same uniforms: the yardstick of the Gaussian bound."""
    u, s, odd = box_muller_inputs(seed, numel, tensor_id, device)
    u, s = u.double(), s.double()
    r = torch.sqrt(torch.log(u) * -2.0)
    a = s * float(_PI_F32)
    return torch.where(odd, r * torch.sin(a), r * torch.cos(a))


GAUSSIAN_BOUND = 2.0 ** -18  # §5 absolute bound of any backend vs gaussian_float64


def keep_mask(mask_seed: int, numel: int, tensor_id: int, mask_threshold: int, device="cpu",
              start: int = 0) -> torch.Tensor:
    """§6: bool keep-mask (False = coordinate zeroed). All True when threshold is 0 (the
    seed and id are checked all the same)."""
    S.check_seed(mask_seed, "mask_seed")
    _check_tensor_id(tensor_id)
    if mask_threshold == 0:
        return torch.ones(numel, dtype=torch.bool, device=device)
    i, row, words = _words_of(mask_seed, tensor_id, S.TAG_MASK, start, numel, 2, device)
    x = words[row, i & 3]
    return (x >> 8) >= mask_threshold


def perturbation(seed: int, numel: int, dist: int, tensor_id: int = 0, device="cpu", start: int = 0) -> torch.Tensor:
    """z of §4/§5 as fp32, flat (elements ``start .. start + numel - 1``)."""
    d = S.dist_code(dist)
    gen = gaussian if d == 0 else rademacher
    return gen(seed, numel, tensor_id, device, start)


# The ops below run each tensor in spans of this many elements: their temporaries (z, masks,
# int64 words and indices, float64 corrections) take 81-117 bytes per element. Measured here
# (2 cores, 2026-12-02), a masked ZO-Adam update with restore of a 2^26-element fp32 tensor:
# peak RSS +7.4 GiB in one piece, +0.75 GiB in spans (0.5 GiB of it the m and v buffers), and
# 382 s -> 268 s. Every step is element-wise and the stream is indexed by the element, so
# the bits do not depend on the span (tests/test_stream_reference.py checks it at SPAN = 256).
SPAN = 1 << 20


def _spans(n: int):
    """``(start, end)`` of consecutive spans covering ``0 .. n - 1``."""
    return ((a, min(n, a + SPAN)) for a in range(0, n, SPAN))


def _masked_z(seed, numel, dist, tensor_id, mask_seed, mask_threshold, device, start=0) -> torch.Tensor:
    z = perturbation(seed, numel, dist, tensor_id, device, start)
    if mask_threshold:
        z = z * keep_mask(mask_seed, numel, tensor_id, mask_threshold, device, start).to(torch.float32)
    return z


def _check_params(params: Sequence[torch.Tensor], tensor_ids: Sequence[int], name: str = "params") -> None:
    if len(params) != len(tensor_ids):
        raise ValueError(f"tensor_ids has {len(tensor_ids)} entries but {name} has {len(params)}")
    for k, p in enumerate(params):      # None raised AttributeError: 'NoneType' object has no attribute 'device'
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"{name}[{k}] must be a torch.Tensor, got {type(p).__name__}")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"all {name} must be on one device, got {sorted(map(str, devices))}")
    for k, p in enumerate(params):
        if p.layout != torch.strided:
            raise ValueError(f"{name}[{k}] has layout {p.layout}; zeroflow kernels need dense tensors")
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name}[{k}] has dtype {p.dtype}; use float32, bfloat16 or float16")
        if not p.is_contiguous():
            raise ValueError(f"{name}[{k}] is not contiguous; call .contiguous() on it first")
    for k, t in enumerate(tensor_ids):
        t = S.integer_arg(t, f"tensor_ids[{k}]")      # int() made the id 1.5 tensor 1's stream
        if not 0 <= t < S.TENSOR_ID_LIMIT:
            raise ValueError(f"tensor_ids[{k}]={t} is outside [0, 2**32); use a 32-bit unsigned id")


def _store(dst: torch.Tensor, value_f32: torch.Tensor) -> None:
    # One rounding (fp32 -> storage dtype, round-to-nearest-even) per stored value (§7).
    dst.copy_(value_f32.view_as(dst).to(dst.dtype))


def _store_param(p: torch.Tensor, value_f32: torch.Tensor, tid: int, stochastic_rounding: bool,
                 round_seed: int, start: int = 0) -> None:
    """The update's parameter store: §7 round-to-nearest, or §9 stochastic rounding of a
    bf16/fp16 parameter (fp32 parameters are stored as they are either way). ``p``: the
    span of the parameter that begins at element ``start``."""
    if stochastic_rounding and p.dtype in (torch.bfloat16, torch.float16):
        words = rounding_words(round_seed, p.numel(), tid, p.device, start)
        p.copy_(stochastic_round(value_f32, words, p.dtype).view_as(p))
    else:
        _store(p, value_f32)


def perturb_(params, tensor_ids, seed, scale, dist, mask_seed, mask_threshold) -> None:
    """θ_k += scale · m ⊙ z(seed) for each tensor (docs/kernel-ops.md)."""
    _check_params(params, tensor_ids)
    check_no_overlap([("params", params)])
    check_writable("perturb_", [("params", params)])
    S.check_seed(seed, "seed")
    _check_stream(dist, mask_seed, mask_threshold)
    check_scalars("perturb_", {"scale": scale})
    scale_f = torch.tensor(scale, dtype=torch.float32).item()
    for p, tid in zip(params, tensor_ids):
        flat = p.view(-1)
        for a, b in _spans(p.numel()):
            z = _masked_z(seed, b - a, dist, int(tid), mask_seed, mask_threshold, p.device, a)
            _store(flat[a:b], flat[a:b].float() + z * scale_f)


def _estimate(p, tid, seeds, coeffs, dist, mask_seed, mask_threshold, restore_seed, restore_scale, start=0):
    """Steps 1-2 of the update ops on the span ``p`` (a flat slice of the parameter that
    begins at element ``start``): the restored fp32 params ``x`` and the raw estimate ``g``:
    ``x = x + (z_r * m) * restore_scale``; ``g = (sum_j z_j * c_j) * m``."""
    n = p.numel()
    dev = p.device
    keep = keep_mask(mask_seed, n, tid, mask_threshold, dev, start).to(torch.float32) if mask_threshold else None
    x = p.reshape(-1).float()
    if _f32(restore_scale) != 0.0:
        z = perturbation(restore_seed, n, dist, tid, dev, start)
        zm = z * keep if keep is not None else z
        x = x + zm * _f32(restore_scale)
    g = torch.zeros(n, dtype=torch.float32, device=dev)
    for s, c in zip(seeds, coeffs):
        g = g + perturbation(s, n, dist, tid, dev, start) * _f32(c)
    if keep is not None:
        g = g * keep
    return x, g


def sign_f32(g: torch.Tensor) -> torch.Tensor:
    """Step 4: +1 where g > 0, -1 where g < 0; +0, -0 and NaN unchanged."""
    return torch.where(g > 0, 1.0, torch.where(g < 0, -1.0, g))


def _history_sign(g, h_buf, history_alpha, history_init, sign):
    """Step 3 (history: mix, store rounded, continue with the stored value) and step 4."""
    if h_buf is not None:
        h = g if history_init else h_buf.reshape(-1).float() * _f32(history_alpha) + g * _f32(1.0 - history_alpha)
        _store(h_buf, h)
        g = h_buf.reshape(-1).float()
    if sign:
        g = sign_f32(g)
    return g


def _f32(v: float) -> float:
    return torch.tensor(v, dtype=torch.float32).item()


def _estimated_spans(params, history_buffers, tensor_ids, seeds, coeffs, dist, mask_seed, mask_threshold,
                     restore_seed, restore_scale, history_alpha, history_init, sign):
    """Steps 1-4 of both update ops, span by span: ``(k, start, end, span, tensor_id, x, g)``
    with ``span`` the flat slice ``start:end`` of ``params[k]``, ``x`` its restored fp32
    values and ``g`` the estimate after history (stored) and sign."""
    for k, (p, tid) in enumerate(zip(params, tensor_ids)):
        for a, e in _spans(p.numel()):
            span = p.view(-1)[a:e]
            x, g = _estimate(span, int(tid), seeds, coeffs, dist, mask_seed, mask_threshold, restore_seed,
                             restore_scale, a)
            h_buf = history_buffers[k].view(-1)[a:e] if history_buffers else None
            yield k, a, e, span, int(tid), x, _history_sign(g, h_buf, history_alpha, history_init, sign)


def zo_sgd_update_(params, momentum_buffers, history_buffers, tensor_ids, seeds, coeffs, dist,
                   mask_seed, mask_threshold, restore_seed, restore_scale, lr, weight_decay,
                   momentum, dampening, nesterov, momentum_init, sign, history_alpha,
                   history_init, stochastic_rounding, round_seed) -> None:
    """Fused ZO SGD-family update, spelled out (docs/kernel-ops.md § zo_sgd_update_)."""
    _check_params(params, tensor_ids)
    _check_buffers(params, momentum_buffers, "momentum_buffers")
    _check_buffers(params, history_buffers, "history_buffers")
    written = [("params", params), ("momentum_buffers", momentum_buffers), ("history_buffers", history_buffers)]
    check_no_overlap(written)
    check_writable("zo_sgd_update_", written)
    _check_q(seeds, coeffs)
    _check_stream(dist, mask_seed, mask_threshold)
    S.check_seed(restore_seed, "restore_seed")
    S.check_seed(round_seed, "round_seed")
    check_scalars("zo_sgd_update_", dict(restore_scale=restore_scale, lr=lr, weight_decay=weight_decay,
                                         momentum=momentum, dampening=dampening, history_alpha=history_alpha,
                                         momentum_buffers=momentum_buffers, history_buffers=history_buffers))
    lr_f, wd, mu = _f32(lr), _f32(weight_decay), _f32(momentum)
    for k, a, e, span, tid, x, g in _estimated_spans(
            params, history_buffers, tensor_ids, seeds, coeffs, dist, mask_seed, mask_threshold, restore_seed,
            restore_scale, history_alpha, history_init, sign):
        if wd != 0.0:
            g = g + x * wd
        if momentum_buffers:
            buf = momentum_buffers[k].view(-1)[a:e]
            b = g if momentum_init else buf.float() * mu + g * _f32(1.0 - dampening)
            _store(buf, b)
            b = buf.float()
            g = g + b * mu if nesterov else b
        _store_param(span, x - g * lr_f, tid, stochastic_rounding, round_seed, a)


def zo_adam_update_(params, exp_avgs, exp_avg_sqs, history_buffers, tensor_ids, seeds, coeffs,
                    dist, mask_seed, mask_threshold, restore_seed, restore_scale, lr, beta1,
                    beta2, eps, weight_decay, decoupled_weight_decay, step, sign,
                    history_alpha, history_init, stochastic_rounding, round_seed) -> None:
    """Fused ZO Adam/AdamW update, spelled out (docs/kernel-ops.md § zo_adam_update_)."""
    _check_params(params, tensor_ids)
    if len(exp_avgs) != len(params) or len(exp_avg_sqs) != len(params):
        raise ValueError("exp_avgs and exp_avg_sqs must have one buffer per param")
    _check_buffers(params, exp_avgs, "exp_avgs")
    _check_buffers(params, exp_avg_sqs, "exp_avg_sqs")
    _check_buffers(params, history_buffers, "history_buffers")
    written = [("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
               ("history_buffers", history_buffers)]
    check_no_overlap(written)
    check_writable("zo_adam_update_", written)
    _check_q(seeds, coeffs)
    _check_stream(dist, mask_seed, mask_threshold)
    S.check_seed(restore_seed, "restore_seed")
    S.check_seed(round_seed, "round_seed")
    S.check_adam_step(step)
    check_betas(beta1, beta2)
    check_adam_scalars(lr, beta1, step, weight_decay, decoupled_weight_decay)
    check_scalars("zo_adam_update_", dict(restore_scale=restore_scale, lr=lr, eps=eps, weight_decay=weight_decay,
                                          history_alpha=history_alpha, history_buffers=history_buffers))
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    step_size = _f32(lr / bc1)
    bc2_sqrt = _f32(math.sqrt(bc2))     # correctly rounded, as C's sqrt: pow(bc2, 0.5) is not
    wd, b2, eps_f = _f32(weight_decay), _f32(beta2), _f32(eps)
    for k, a, e, span, tid, x, g in _estimated_spans(
            params, history_buffers, tensor_ids, seeds, coeffs, dist, mask_seed, mask_threshold, restore_seed,
            restore_scale, history_alpha, history_init, sign):
        if decoupled_weight_decay:
            x = x * _f32(1.0 - lr * weight_decay)
        elif wd != 0.0:
            g = g + x * wd
        m_buf, v_buf = exp_avgs[k].view(-1)[a:e], exp_avg_sqs[k].view(-1)[a:e]
        m = m_buf.float()
        m = m + (g - m) * _f32(1.0 - beta1)
        v = v_buf.float() * b2 + (g * g) * _f32(1.0 - beta2)
        _store(m_buf, m)
        _store(v_buf, v)
        m = m_buf.float()
        v = v_buf.float()
        denom = div_rn(sqrt_rn(v), bc2_sqrt) + eps_f
        _store_param(span, x - div_rn(m, denom) * step_size, tid, stochastic_rounding, round_seed, a)


def _check_buffers(params, buffers, name) -> None:
    if not buffers:
        return
    if len(buffers) != len(params):
        raise ValueError(f"{name} has {len(buffers)} tensors but params has {len(params)}; pass one per param or none")
    for k, (p, b) in enumerate(zip(params, buffers)):
        if not isinstance(b, torch.Tensor):
            raise ValueError(f"{name}[{k}] must be a torch.Tensor, got {type(b).__name__}")
        if b.layout != torch.strided:       # was reported as "is not contiguous"
            raise ValueError(f"{name}[{k}] has layout {b.layout}; zeroflow kernels need dense tensors")
        if b.shape != p.shape or b.device != p.device:
            raise ValueError(f"{name}[{k}] must match params[{k}] in shape and device")
        if b.dtype not in (p.dtype, torch.float32):
            raise ValueError(f"{name}[{k}] has dtype {b.dtype}; use the param's dtype or float32")
        if not b.is_contiguous():
            raise ValueError(f"{name}[{k}] is not contiguous")


def _check_stream(dist, mask_seed, mask_threshold) -> None:
    """The stream arguments every op takes (same rules as csrc/ops_common.h)."""
    S.dist_code(dist)
    S.check_seed(mask_seed, "mask_seed")
    if isinstance(mask_threshold, bool) or not 0 <= int(mask_threshold) <= S.MASK_ONE:
        raise ValueError(f"mask_threshold={mask_threshold} is outside [0, 2**24]; it is round(sparsity * 2**24) "
                         "with sparsity in [0, 1]")


def _check_q(seeds, coeffs) -> None:
    if len(seeds) != len(coeffs):
        raise ValueError(f"seeds has {len(seeds)} entries but coeffs has {len(coeffs)}; one coefficient per seed")
    for j, s in enumerate(seeds):
        S.check_seed(int(s), f"seeds[{j}]")


# --------------------------------------------------------------------------------------
# §9 stochastic rounding of low-precision stores
# --------------------------------------------------------------------------------------
def rounding_words(round_seed: int, numel: int, tensor_id: int = 0, device="cpu", start: int = 0) -> torch.Tensor:
    """§9: one uint32 word per element (int64 tensor): word ``i & 3`` of the Philox call with
    counter ``(i >> 2, tensor_id, tag 3)`` and the rounding seed's key."""
    i, row, words = _words_of(round_seed, tensor_id, S.TAG_ROUNDING, start, numel, 2, device)
    return words[row, i & 3]


def stochastic_round(x: torch.Tensor, words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """§9: fp32 ``x`` rounded to ``dtype`` (bf16 / fp16) up or down at random, with the
    probability of rounding away from zero equal to the distance to the lower neighbour in
    units of the target's spacing (so ``E[result] = x``), from the uint32 ``words``. Integer
    operations only: bit-identical on every backend. Infinities keep their bits; a NaN
    becomes a quiet NaN (bf16: its top 16 bits with the quiet bit set; fp16: 0x7E00)."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & S.MASK32
    sign, mag = bits & 0x80000000, bits & 0x7FFFFFFF
    special = mag >= 0x7F800000                               # inf / NaN: to nearest
    if dtype == torch.bfloat16:
        out = (sign | ((mag + (words >> 16)) & 0x7FFF0000)) >> 16
        out = torch.where(special, torch.where(mag > 0x7F800000, (bits >> 16) | 0x40, bits >> 16), out)
    elif dtype == torch.float16:
        out = _sr_fp16_magnitude(mag, words)
        out = (sign >> 16) | torch.where(special, torch.where(mag > 0x7F800000, 0x7E00, 0x7C00), out)
    else:
        raise ValueError(f"stochastic rounding is for bfloat16 / float16 storage, not {dtype}")
    return torch.where(out >= 1 << 15, out - (1 << 16), out).to(torch.int16).view(dtype)


def _sr_fp16_magnitude(mag: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """fp16 bits (no sign) of the magnitude ``mag`` (fp32 bits) rounded stochastically."""
    exp = mag >> 23
    # fp16 normal range (|x| >= 2^-14, biased fp32 exponent >= 113): keep 10 of the 23 mantissa
    # bits; the sum stays on the fp16 grid of its own binade (a carry moves to the next one).
    on_grid = (mag + (words >> 19)) & 0x7FFFE000
    normal16 = on_grid.to(torch.int32).view(torch.float32).to(torch.float16).view(torch.int16).to(torch.int64)
    # below: fp16 subnormals, multiples of 2^-24. |x| = m * 2^-s units of 2^-24 (m the 24-bit
    # significand, s = 126 - exp; 125 for fp32 subnormals). Like above, random bits are added
    # below the kept ones and the sum truncated: units = q + carry(rem + r_s), q = m >> s,
    # rem = m mod 2^s, r_s the top s bits of the word (s > 32: the word plus rem >> (s - 32)).
    m = torch.where(exp > 0, (mag & 0x7FFFFF) | (1 << 23), mag & 0x7FFFFF)
    s = torch.where(exp > 0, 126 - exp, torch.full_like(exp, 125)).clamp(min=1)
    q = torch.where(s < 24, m >> s.clamp(max=23), torch.zeros_like(m))
    rem = m - (q << s.clamp(max=23))
    narrow = s <= 32
    r = torch.where(narrow, words >> (32 - s).clamp(min=0), words)
    add = torch.where(narrow, rem, rem >> (s - 32).clamp(min=0, max=63))
    width = torch.where(narrow, s, torch.full_like(s, 32))
    sub16 = q + ((r + add) >> width)                  # 1024 = 0x0400 = 2^-14, the smallest normal
    return torch.where(exp >= 113, normal16, sub16)
