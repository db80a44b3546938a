"""``@jit`` pieces shared by the fused update kernels (docs/kernel-ops.md, steps 1-4):
pending restore, the q-seed estimate, the mask, history and sign.

Four options of the update kernels are compile-time (``tl.constexpr``): ``DIST`` (0 Gaussian,
1 Rademacher), ``RESTORE`` (a pending restore, restore_scale != 0), ``SPARSE`` (the mask on,
T > 0; the threshold T stays a runtime value) and ``ONE_QUERY`` (q == 1: the estimate is one
``0 + z * c``, straight-line; q > 1 keeps the runtime loop). As runtime scalars every path's
registers sat in every launch (the Rademacher kernel held the Gaussian one's). Measured on an
H200 (Triton 3.6, 2026-12-04, ``benchmarks/sass_census.py --time``, 64M fp32 elements, % of
``copy_`` moving the same arrays, bits identical to the op), runtime -> dist, T, q, has_restore
constant: sgd Rademacher 165 registers, 26.8 % -> 40, 63.6 %; sgd Gaussian 165, 19.6 % -> 128,
27.9 %; adam Rademacher 165, 45.0 % -> 56, 64.6 %. Each combination is one more native compile
(0.3-0.7 s each on the H200): at most 16 per kernel and storage dtypes, and a ONE_QUERY flag
rather than q itself keeps it so. The other options stay runtime scalars: each of them the
only runtime one leaves 32-40 registers (census), little. perturb_ keeps dist and T runtime:
constant, it used 32 registers instead of 80 and ran slower (72.7 % -> 40.8 % of copy_)."""
from __future__ import annotations

import triton
import triton.language as tl

from .philox import mask_tile, store_rne, z_tile


@triton.jit
def load_f32(ptr, mask):
    """The stored values as fp32, exactly. bf16 by its bits (``bits << 16``, what the
    conversion is): Triton's interpreter flushed bf16 subnormals to 0 in its conversion
    (its ``_convert_float`` drops their leading bit when both formats share the exponent
    bias), so a bf16 weight of 2^-133 became 0 there and on no other backend."""
    if ptr.dtype.element_ty == tl.bfloat16:
        raw = tl.load(ptr.to(tl.pointer_type(tl.uint16)), mask=mask, other=0)
        return (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def sign_f32(g):
    """Step 4: +1 where g > 0, -1 where g < 0; +0, -0 and NaN unchanged."""
    return tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, g))


@triton.jit
def query_term(meta_ptr, seed_off, q, j, base, tid, DIST: tl.constexpr, BLOCK: tl.constexpr):
    """``z(seeds[j]) * coeffs[j]`` of the tile: seed j (int64) at ``meta_ptr[seed_off + j]``,
    the fp32 bits of its coefficient at ``meta_ptr[seed_off + q + j]``."""
    s = tl.load(meta_ptr + seed_off + j)
    c = tl.load(meta_ptr + seed_off + q + j).to(tl.int32).to(tl.float32, bitcast=True)
    return z_tile(base, tid, s.to(tl.uint32), (s >> 32).to(tl.uint32), DIST, BLOCK) * c


@triton.jit
def restored_estimate(meta_ptr, seed_off, q, base, tid, theta,
                      rkey0, rkey1, restore_scale, mkey0, mkey1, T,
                      h_ptr, inb, history_alpha, one_minus_alpha,
                      has_hist, history_init, sign, DIST: tl.constexpr, RESTORE: tl.constexpr,
                      SPARSE: tl.constexpr, ONE_QUERY: tl.constexpr, BLOCK: tl.constexpr):
    """Returns ``(p, g)`` of the tile, in the spec's order of fp32 operations:

    ``p = theta + (z(restore_seed) * m) * restore_scale``;
    ``g = (sum_j z(seeds[j]) * coeffs[j]) * m``, then history (stored here) and sign
    (``m`` only when ``T > 0``). Seeds (int64) sit at ``meta_ptr[seed_off : seed_off + q]``,
    the fp32 bits of the coefficients right after them. ``DIST`` (0 Gaussian, 1 Rademacher),
    ``RESTORE`` (restore_scale != 0), ``SPARSE`` (T > 0) and ``ONE_QUERY`` (q == 1) are
    compile-time (module docstring)."""
    m = tl.zeros_like(theta) + 1.0
    if SPARSE:
        m = mask_tile(base, tid, mkey0.to(tl.uint32, bitcast=True), mkey1.to(tl.uint32, bitcast=True),
                      T.to(tl.uint32), BLOCK)
    p = theta
    if RESTORE:
        zr = z_tile(base, tid, rkey0.to(tl.uint32, bitcast=True), rkey1.to(tl.uint32, bitcast=True), DIST, BLOCK)
        if SPARSE:
            zr = zr * m
        p = theta + zr * restore_scale
    g = tl.zeros_like(theta)
    if ONE_QUERY:
        # q == 1, straight-line code: the loop's one iteration, the same operations; g = 0 + z * c,
        # not z * c (0 + -0 is +0, as the sum of every other backend gives); q given as the constant
        # 1, so the coefficient's offset folds (sm_90, Triton 3.6: 56 registers for Adam, 54 with q)
        g = g + query_term(meta_ptr, seed_off, 1, 0, base, tid, DIST, BLOCK)
    else:
        for j in range(0, q):
            g = g + query_term(meta_ptr, seed_off, q, j, base, tid, DIST, BLOCK)
    if SPARSE:
        g = g * m
    if has_hist != 0:
        if history_init != 0:
            h = g
        else:
            h = load_f32(h_ptr, inb) * history_alpha + g * one_minus_alpha
        g = store_rne(h_ptr, h, inb)              # later steps read the stored h
    if sign != 0:
        g = sign_f32(g)
    return p, g


def update_constants(dist: int, restore_scale: float, T: int, seeds) -> dict:
    """The compile-time options of an update launch (module docstring), as 0/1 ints: one
    native compile per distinct dict."""
    return {"DIST": int(dist), "RESTORE": int(restore_scale != 0.0), "SPARSE": int(T > 0),
            "ONE_QUERY": int(len(seeds) == 1)}
