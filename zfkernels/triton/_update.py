"""``@jit`` pieces shared by the fused update kernels (docs/kernel-ops.md):
pending restore, the q-seed estimate, the mask, history and sign."""
from __future__ import annotations

import triton
import triton.language as tl

from .philox import mask_tile, store_rne, z_tile


@triton.jit
def load_f32(ptr, mask):
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def restored_estimate(meta_ptr, seed_off, q, base, tid, theta,
                      rkey0, rkey1, restore_scale, mkey0, mkey1, T,
                      h_ptr, inb, one_minus_alpha, history_alpha,
                      DIST: tl.constexpr, HAS_MASK: tl.constexpr, HAS_RESTORE: tl.constexpr,
                      HAS_HIST: tl.constexpr, HIST_INIT: tl.constexpr, SIGN: tl.constexpr,
                      LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr):
    """Returns ``(p, g)`` of the tile:

    ``p = theta + restore_scale * m * z(restore_seed)``;
    ``g = m * sum_j coeffs[j] * z(seeds[j])``, then history (stored here) and sign.
    Operand order follows zfkernels.reference (bit-exact in fp32). Seeds (int64) sit at ``meta_ptr[seed_off : seed_off + q]``, the fp32 bits of the
    coefficients right after them."""
    if HAS_MASK:
        m = mask_tile(base, tid, mkey0.to(tl.uint32, bitcast=True), mkey1.to(tl.uint32, bitcast=True),
                      T.to(tl.uint32), BLOCK)
    p = theta
    if HAS_RESTORE:
        zr = z_tile(base, tid, rkey0.to(tl.uint32, bitcast=True), rkey1.to(tl.uint32, bitcast=True),
                    DIST, LIBDEVICE, BLOCK)
        if HAS_MASK:
            zr = m * zr
        p = theta + zr * restore_scale
    g = tl.zeros_like(theta)
    for j in range(0, q):
        s = tl.load(meta_ptr + seed_off + j)
        c = tl.load(meta_ptr + seed_off + q + j).to(tl.int32).to(tl.float32, bitcast=True)
        z = z_tile(base, tid, s.to(tl.uint32), (s >> 32).to(tl.uint32), DIST, LIBDEVICE, BLOCK)
        g = g + z * c
    if HAS_MASK:
        g = m * g
    if HAS_HIST:
        if HIST_INIT:
            h = g
        else:
            h = load_f32(h_ptr, inb) * history_alpha + g * one_minus_alpha
        g = store_rne(h_ptr, h, inb)              # later steps read the stored h
    if SIGN:
        g = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, tl.where(g == 0, 0.0, g)))  # torch.sign
    return p, g
