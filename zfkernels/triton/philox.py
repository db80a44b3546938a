"""Shared Triton ``@jit`` helpers of the perturbation stream (docs/perturbation-stream.md,
``stream v1``) and the ``philox4x32_10`` op.

Layout of one program tile: ``BLOCK`` consecutive elements (``BLOCK`` a power of two,
``>= 128``) starting at a multiple of ``BLOCK`` are viewed as a ``[R, 32, 4]`` block with
``R = BLOCK // 128``; element ``(r, q, l)`` is ``i = base + 128 * r + 4 * q + l``. This puts
the 4 lanes of one Philox call (Gaussian §5, mask §6) on the last axis and the 128
elements of one Rademacher call (§4) on one ``r`` row, so each Philox call is evaluated
exactly once per tile and no cross-lane shuffles are needed. ``z`` therefore depends only
on ``(seed, tensor_id, i)``, never on ``BLOCK``.

Our own Philox (§1) is written with ``tl.umulhi``; Triton's ``tl.randint4x`` is only used
as an independent oracle in tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference as R
from .. import stream as S
from ..stream import MASK32
from ._common import check_block, device_ok, interpreted, launch_scope, to_i32

__all__ = ["philox4x32_10"]

# §1 constants (Random123).
PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
PHILOX_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
PHILOX_W1: tl.constexpr = tl.constexpr(0xBB67AE85)
# §3 / §5 fp32 constants, exact values from the bit patterns in zfkernels.stream (the table
# the reference reads too). Python floats that are exact fp32 values: Triton types them fp32.
_C = S.f32_from_bits
TWO_M24: tl.constexpr = tl.constexpr(_C(S.TWO_M24_BITS))
PI_F32: tl.constexpr = tl.constexpr(_C(S.PI_F32_BITS))
LOG_SQRT_HALF: tl.constexpr = tl.constexpr(S.LOG_SQRT_HALF_BITS)
LOG_P0: tl.constexpr = tl.constexpr(_C(S.LOG_POLY_BITS[0]))
LOG_P1: tl.constexpr = tl.constexpr(_C(S.LOG_POLY_BITS[1]))
LOG_P2: tl.constexpr = tl.constexpr(_C(S.LOG_POLY_BITS[2]))
LOG_P3: tl.constexpr = tl.constexpr(_C(S.LOG_POLY_BITS[3]))
LOG_P4: tl.constexpr = tl.constexpr(_C(S.LOG_POLY_BITS[4]))
LOG_P5: tl.constexpr = tl.constexpr(_C(S.LOG_POLY_BITS[5]))
LOG_P6: tl.constexpr = tl.constexpr(_C(S.LOG_POLY_BITS[6]))
LOG_P7: tl.constexpr = tl.constexpr(_C(S.LOG_POLY_BITS[7]))
LOG_P8: tl.constexpr = tl.constexpr(_C(S.LOG_POLY_BITS[8]))
LN2_HI: tl.constexpr = tl.constexpr(_C(S.LN2_HI_BITS))
LN2_LO: tl.constexpr = tl.constexpr(_C(S.LN2_LO_BITS))
TWO_OVER_PI: tl.constexpr = tl.constexpr(_C(S.TWO_OVER_PI_BITS))
PIO2_1: tl.constexpr = tl.constexpr(_C(S.PIO2_PARTS_BITS[0]))
PIO2_2: tl.constexpr = tl.constexpr(_C(S.PIO2_PARTS_BITS[1]))
PIO2_3: tl.constexpr = tl.constexpr(_C(S.PIO2_PARTS_BITS[2]))
SIN_P0: tl.constexpr = tl.constexpr(_C(S.SIN_POLY_BITS[0]))
SIN_P1: tl.constexpr = tl.constexpr(_C(S.SIN_POLY_BITS[1]))
SIN_P2: tl.constexpr = tl.constexpr(_C(S.SIN_POLY_BITS[2]))
COS_P0: tl.constexpr = tl.constexpr(_C(S.COS_POLY_BITS[0]))
COS_P1: tl.constexpr = tl.constexpr(_C(S.COS_POLY_BITS[1]))
COS_P2: tl.constexpr = tl.constexpr(_C(S.COS_POLY_BITS[2]))


@triton.jit
def philox4x32_10_rounds(c0, c1, c2, c3, k0, k1):
    """Ten Philox4x32 rounds (§1) on uint32 blocks ``c0..c3`` with uint32 key ``k0, k1``.

    ``hi:lo = M * c`` via ``tl.umulhi`` / wrapping uint32 multiply."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def stream_words(b, tid, TAG: tl.constexpr, k0, k1):
    """Philox words for block indices ``b`` (int64 block) of the stream (§2):
    counter ``(b mod 2^32, b >> 32, tid, TAG)``, key ``(k0, k1)`` (uint32 scalars)."""
    c0 = b.to(tl.uint32)
    c1 = (b >> 32).to(tl.uint32)
    zero = c0 * 0
    c2 = zero + tid
    c3 = zero + TAG
    return philox4x32_10_rounds(c0, c1, c2, c3, k0, k1)


@triton.jit
def _lane_select(lane, y0, y1, y2, y3):
    return tl.where(lane == 0, y0, tl.where(lane == 1, y1, tl.where(lane == 2, y2, y3)))


@triton.jit
def log_f32(x):
    """§5 natural log of fp32 ``x`` in (0, 1], as csrc/philox.h ``log_f32`` (every fp32 op
    one IEEE op; launches pass ``enable_fp_fusion=False`` so none is contracted)."""
    t = x.to(tl.uint32, bitcast=True) - LOG_SQRT_HALF       # mantissa into [sqrt(1/2), sqrt(2))
    e = t.to(tl.int32, bitcast=True) >> 23                  # arithmetic shift
    m = ((t & 0x007FFFFF) + LOG_SQRT_HALF).to(tl.float32, bitcast=True)
    f = m - 1.0
    ef = e.to(tl.float32)
    z = f * f
    y = LOG_P0 * f + LOG_P1
    y = y * f + LOG_P2
    y = y * f + LOG_P3
    y = y * f + LOG_P4
    y = y * f + LOG_P5
    y = y * f + LOG_P6
    y = y * f + LOG_P7
    y = y * f + LOG_P8
    y = y * f * z
    y = y + ef * LN2_LO
    y = y - 0.5 * z
    r = f + y
    return r + ef * LN2_HI


@triton.jit
def sincos_f32(a):
    """§5 ``(sin a, cos a)`` for fp32 ``a`` in [-4, 4], as csrc/philox.h ``sincos_f32``."""
    q = a * TWO_OVER_PI
    k = (q + tl.where(q >= 0.0, 0.5, -0.5)).to(tl.int32)   # round half away from zero
    kf = k.to(tl.float32)
    y = a - kf * PIO2_1
    y = y - kf * PIO2_2
    y = y - kf * PIO2_3
    z = y * y
    ps = SIN_P0 * z + SIN_P1
    ps = ps * z + SIN_P2
    sy = y + ps * z * y
    pc = COS_P0 * z + COS_P1
    pc = pc * z + COS_P2
    cy = (1.0 - 0.5 * z) + pc * z * z
    quadrant = k & 3
    swap = (quadrant & 1) != 0
    s0 = tl.where(swap, cy, sy)
    c0 = tl.where(swap, sy, cy)
    sin = tl.where((quadrant & 2) != 0, -s0, s0)            # quadrants 2, 3
    cos = tl.where(((quadrant + 1) & 2) != 0, -c0, c0)      # quadrants 1, 2
    return sin, cos


@triton.jit
def _box_muller(xe, xo):
    """§5: one Box–Muller pair from words (x_even, x_odd), the spec's exact fp32 steps."""
    u = ((xe >> 8) + 1).to(tl.float32) * TWO_M24          # u_open, (0, 1]
    s = 2.0 * ((xo >> 8).to(tl.float32) * TWO_M24) - 1.0  # [-1, 1), exact
    r = tl.sqrt_rn(-2.0 * log_f32(u))
    sin, cos = sincos_f32(PI_F32 * s)
    return r * cos, r * sin


@triton.jit
def _rademacher_tile(base, tid, k0, k1, BLOCK: tl.constexpr):
    """§4 on the ``[R, 32, 4]`` tile: one Philox call per 128-element row."""
    R: tl.constexpr = BLOCK // 128
    q = tl.arange(0, 32)[None, :, None]
    lane = tl.arange(0, 4)[None, None, :]
    b = (base >> 7) + tl.arange(0, R).to(tl.int64)
    x0, x1, x2, x3 = stream_words(b, tid, 0, k0, k1)
    w = q >> 3                                   # word (j >> 5), j = 4q + lane
    t = ((q & 7) * 4 + lane).to(tl.uint32)       # bit  (j & 31)
    word = _lane_select(w, x0[:, None, None], x1[:, None, None], x2[:, None, None], x3[:, None, None])
    bit = (word >> t) & 1
    return tl.where(bit != 0, 1.0, -1.0)


@triton.jit
def _per_quad_words(base, tid, TAG: tl.constexpr, k0, k1, BLOCK: tl.constexpr):
    """The four ``[R, 32]`` word arrays of stream ``TAG`` when each Philox call covers one
    quad of the ``[R, 32, 4]`` tile starting at ``base``: call ``(base >> 2) + 32 r + q``."""
    R: tl.constexpr = BLOCK // 128
    rr = tl.arange(0, R).to(tl.int64)[:, None]
    qq = tl.arange(0, 32)[None, :]
    return stream_words((base >> 2) + rr * 32 + qq, tid, TAG, k0, k1)


@triton.jit
def _gaussian_tile(base, tid, k0, k1, BLOCK: tl.constexpr):
    """§5 on the ``[R, 32, 4]`` tile: one Philox call (two Box–Muller pairs) per quad."""
    lane = tl.arange(0, 4)[None, None, :]
    x0, x1, x2, x3 = _per_quad_words(base, tid, 0, k0, k1, BLOCK)
    g0, g1 = _box_muller(x0, x1)
    g2, g3 = _box_muller(x2, x3)
    return _lane_select(lane, g0[:, :, None], g1[:, :, None], g2[:, :, None], g3[:, :, None])


@triton.jit
def z_tile(base, tid, k0, k1, dist, BLOCK: tl.constexpr):
    """Perturbation ``z`` (tag 0) of the ``[R, 32, 4]`` tile starting at ``base`` (int64,
    multiple of BLOCK). ``dist``: 0 = Gaussian (§5), 1 = Rademacher (§4); a runtime scalar in
    perturb_ (one compile serves both distributions), a constant in the update kernels (their
    DIST: the other distribution's code and registers are left out, zfkernels/triton/_update.py)."""
    if dist == 1:
        z = _rademacher_tile(base, tid, k0, k1, BLOCK)
    else:
        z = _gaussian_tile(base, tid, k0, k1, BLOCK)
    return z


@triton.jit
def quad_words(base, tid, TAG: tl.constexpr, k0, k1, BLOCK: tl.constexpr):
    """The ``[R, 32, 4]`` tile's words of stream ``TAG`` when each Philox call covers one quad
    (§6 mask, §9 rounding): element i = word i & 3 of call i >> 2."""
    x0, x1, x2, x3 = _per_quad_words(base, tid, TAG, k0, k1, BLOCK)
    lane = tl.arange(0, 4)[None, None, :]
    return _lane_select(lane, x0[:, :, None], x1[:, :, None], x2[:, :, None], x3[:, :, None])


@triton.jit
def mask_tile(base, tid, k0, k1, T, BLOCK: tl.constexpr):
    """Sparse mask ``m`` (§6, tag 1) of the tile as fp32 0/1; ``T`` uint32 threshold."""
    x = quad_words(base, tid, 1, k0, k1, BLOCK)
    return tl.where((x >> 8) < T, 0.0, 1.0)


@triton.jit
def store_rne(ptr, x, mask):
    """Store fp32 ``x`` at ``ptr`` rounded once to the pointee dtype, nearest-even (§7),
    and return the stored value as fp32 (what a later step of the op reads back).

    bf16 is rounded by hand on the uint32 view (the interpreter truncates, old GPUs
    emulate); fp16 uses the native RNE conversion; fp32 is stored as is."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rnd = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rnd = tl.where(x != x, (bits >> 16) | 0x40, rnd)   # NaN stays a (quiet) NaN
        tl.store(ptr, rnd.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        out = (rnd << 16).to(tl.float32, bitcast=True)
    elif ptr.dtype.element_ty == tl.float16:
        y = x.to(tl.float16)
        tl.store(ptr, y, mask=mask)
        out = y.to(tl.float32)
    else:
        tl.store(ptr, x, mask=mask)
        out = x
    return out


@triton.jit
def rounding_words(base, tid, k0, k1, BLOCK: tl.constexpr):
    """§9 random words (tag 3) of the ``[R, 32, 4]`` tile: element i = word i & 3 of call i >> 2."""
    return quad_words(base, tid, 3, k0, k1, BLOCK)


@triton.jit
def _sr_bf16_bits(x, w):
    """§9 bf16 bits (uint32) of fp32 ``x`` rounded stochastically with words ``w``."""
    b = x.to(tl.uint32, bitcast=True)
    a = b & 0x7FFFFFFF
    sr = ((b & 0x80000000) | ((a + (w >> 16)) & 0x7FFF0000)) >> 16
    special = tl.where(a > 0x7F800000, (b >> 16) | 0x40, b >> 16)     # NaN quiet, inf as is
    return tl.where(a >= 0x7F800000, special, sr)


@triton.jit
def _sr_fp16_bits(x, w):
    """§9 fp16 bits (uint32) of fp32 ``x`` rounded stochastically with words ``w``. Shift
    amounts are clamped so that lanes of the branch not taken stay well defined."""
    b = x.to(tl.uint32, bitcast=True)
    a = b & 0x7FFFFFFF
    sign = (b >> 16) & 0x8000
    e = (a >> 23).to(tl.int32)
    on_grid = (a + (w >> 19)) & 0x7FFFE000                         # |x| >= 2^-14: keep 10 bits
    eg = (on_grid >> 23).to(tl.int32)
    normal = tl.where(eg >= 143, 0x7C00, (((eg - 112) << 10).to(tl.uint32) | ((on_grid >> 13) & 0x3FF)))
    m = tl.where(e > 0, (a & 0x7FFFFF) | 0x800000, a & 0x7FFFFF)     # below: units of 2^-24
    k = tl.minimum(tl.maximum(tl.where(e > 0, 126 - e, 125), 14), 200)
    k23 = tl.minimum(k, 23).to(tl.uint32)
    q = tl.where(k < 24, m >> k23, 0)
    rem = tl.where(k < 24, m & ((tl.full(m.shape, 1, tl.uint32) << k23) - 1), m)
    r = w >> (32 - tl.minimum(k, 32)).to(tl.uint32)                 # the word's top k bits
    narrow = ((r.to(tl.uint64) + rem.to(tl.uint64)) >> tl.minimum(k, 32).to(tl.uint64)).to(tl.uint32)
    add = tl.where(k - 32 < 32, rem >> tl.minimum(tl.maximum(k - 32, 0), 31).to(tl.uint32), 0)
    wide = ((w.to(tl.uint64) + add.to(tl.uint64)) >> 32).to(tl.uint32)
    sub = q + tl.where(k <= 32, narrow, wide)
    special = tl.where(a > 0x7F800000, 0x7E00, 0x7C00)
    out = tl.where(a >= 0x7F800000, special, tl.where(e >= 113, normal, sub))
    return sign | out


@triton.jit
def store_param(ptr, x, mask, base, tid, k0, k1, stochastic_rounding, BLOCK: tl.constexpr):
    """The update's parameter store: §7 round-to-nearest, or with ``stochastic_rounding`` (a
    runtime flag) §9 stochastic rounding of a bf16/fp16 parameter from the rounding stream
    of key ``(k0, k1)``."""
    if ptr.dtype.element_ty == tl.float32:
        tl.store(ptr, x, mask=mask)
    else:
        if stochastic_rounding != 0:
            w = rounding_words(base, tid, k0, k1, BLOCK)
            if ptr.dtype.element_ty == tl.bfloat16:
                bits = _sr_bf16_bits(x, w)
            else:
                bits = _sr_fp16_bits(x, w)
            tl.store(ptr, bits.to(tl.uint16).to(ptr.dtype.element_ty, bitcast=True), mask=mask)
        else:
            store_rne(ptr, x, mask)


@triton.jit(do_not_specialize=["n", "key0", "key1"])
def _philox_kernel(cnt_ptr, out_ptr, n, key0, key1, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = rows < n
    k0 = key0.to(tl.uint32, bitcast=True)
    k1 = key1.to(tl.uint32, bitcast=True)
    c0 = tl.load(cnt_ptr + rows * 4 + 0, mask=ok, other=0).to(tl.uint32)
    c1 = tl.load(cnt_ptr + rows * 4 + 1, mask=ok, other=0).to(tl.uint32)
    c2 = tl.load(cnt_ptr + rows * 4 + 2, mask=ok, other=0).to(tl.uint32)
    c3 = tl.load(cnt_ptr + rows * 4 + 3, mask=ok, other=0).to(tl.uint32)
    x0, x1, x2, x3 = philox4x32_10_rounds(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + rows * 4 + 0, x0.to(tl.int64), mask=ok)
    tl.store(out_ptr + rows * 4 + 1, x1.to(tl.int64), mask=ok)
    tl.store(out_ptr + rows * 4 + 2, x2.to(tl.int64), mask=ok)
    tl.store(out_ptr + rows * 4 + 3, x3.to(tl.int64), mask=ok)


def philox4x32_10(counters: torch.Tensor, key0: int, key1: int, *, block_size: int | None = None) -> torch.Tensor:
    """Philox4x32-10 (§1) of each counter row.

    Args:
        counters: int64 tensor ``[N, 4]``, each value in ``[0, 2^32)``.
        key0, key1: key words, integers in ``[0, 2^32)``.
        block_size: rows per program (power of two; default 1024, 8192 in the interpreter).

    Returns:
        int64 tensor ``[N, 4]`` of output words ``x0..x3`` (values in ``[0, 2^32)``).
    """
    if not isinstance(counters, torch.Tensor):
        raise ValueError(f"philox4x32_10: counters must be a torch.Tensor, got {type(counters).__name__}")
    # the messages after the prefix are the compiled ops' and the reference's (csrc/ops_common.h)
    if counters.layout != torch.strided:
        raise ValueError(f"philox4x32_10: counters must be a dense tensor; {R.COUNTERS_DENSE_FIX}")
    if counters.dtype != torch.int64:
        raise ValueError(f"philox4x32_10: counters has dtype {counters.dtype}; {R.COUNTERS_DTYPE_FIX}")
    if counters.dim() != 2 or counters.shape[1] != 4:
        raise ValueError(f"philox4x32_10: counters must have shape [N, 4], got {list(counters.shape)}; "
                         f"{R.COUNTERS_SHAPE_FIX}")
    for name, k in (("key0", key0), ("key1", key1)):
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"philox4x32_10: {name}={k!r} must be an int (a 32-bit unsigned integer); {R.KEY_FIX}")
        if not 0 <= k <= MASK32:
            raise ValueError(f"philox4x32_10: {name}={k} must be a 32-bit unsigned integer in [0, 2**32); "
                             f"{R.KEY_FIX}")
    interp = interpreted(_philox_kernel)
    device_ok("philox4x32_10", "counters", counters, interp)
    counters = counters.contiguous()
    n = counters.shape[0]
    out = torch.empty_like(counters)
    if n == 0:
        return out
    lo, hi = int(counters.min()), int(counters.max())
    if lo < 0 or hi > MASK32:
        raise ValueError(R.counter_values_refused(lo, hi, "philox4x32_10"))
    block = check_block("philox4x32_10", block_size or (8192 if interp else 1024), least=1)
    grid = (triton.cdiv(n, block),)
    with launch_scope(counters.device, interp):     # Triton launches on the current device, not the tensors'
        _philox_kernel[grid](counters, out, n, to_i32(key0), to_i32(key1), BLOCK=block)
    return out
