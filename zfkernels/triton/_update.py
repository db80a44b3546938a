"""``@jit`` pieces shared by the fused update kernels (docs/kernel-ops.md, steps 1-4):
pending restore, the q-seed estimate, the mask, history and sign.

Options are runtime scalars, not ``tl.constexpr``: a branch on a value that is uniform over
the launch costs nothing measurable, while every constexpr combination is one more native
compile (seconds each on a GPU). Only the storage dtypes and BLOCK are compile-time."""
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
def restored_estimate(meta_ptr, seed_off, q, base, tid, theta,
                      rkey0, rkey1, restore_scale, mkey0, mkey1, T, dist,
                      h_ptr, inb, history_alpha, one_minus_alpha,
                      has_restore, has_hist, history_init, sign, BLOCK: tl.constexpr):
    """Returns ``(p, g)`` of the tile, in the spec's order of fp32 operations:

    ``p = theta + (z(restore_seed) * m) * restore_scale``;
    ``g = (sum_j z(seeds[j]) * coeffs[j]) * m``, then history (stored here) and sign
    (``m`` only when ``T > 0``). Seeds (int64) sit at ``meta_ptr[seed_off : seed_off + q]``,
    the fp32 bits of the coefficients right after them."""
    m = tl.zeros_like(theta) + 1.0
    if T > 0:
        m = mask_tile(base, tid, mkey0.to(tl.uint32, bitcast=True), mkey1.to(tl.uint32, bitcast=True),
                      T.to(tl.uint32), BLOCK)
    p = theta
    if has_restore != 0:
        zr = z_tile(base, tid, rkey0.to(tl.uint32, bitcast=True), rkey1.to(tl.uint32, bitcast=True), dist, BLOCK)
        if T > 0:
            zr = zr * m
        p = theta + zr * restore_scale
    g = tl.zeros_like(theta)
    for j in range(0, q):
        s = tl.load(meta_ptr + seed_off + j)
        c = tl.load(meta_ptr + seed_off + q + j).to(tl.int32).to(tl.float32, bitcast=True)
        z = z_tile(base, tid, s.to(tl.uint32), (s >> 32).to(tl.uint32), dist, BLOCK)
        g = g + z * c
    if T > 0:
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
