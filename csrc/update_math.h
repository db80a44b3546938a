// Element-wise pieces of the update ops that the CPU and CUDA kernels share verbatim
// (docs/kernel-ops.md, "Arithmetic"). Pure C++, host and device; every float operation is
// one correctly rounded IEEE fp32 op (the builds use -ffp-contract=off / --fmad=false).
#pragma once

#include "philox.h"  // ZF_HD

namespace zf {

// Step 4 of the update: sign(g) = +1 for g > 0, -1 for g < 0; +0, -0 and NaN unchanged
// (a NaN estimate stays visible instead of becoming a silent zero step).
ZF_HD float sign_f32(float g) { return g > 0.0f ? 1.0f : (g < 0.0f ? -1.0f : g); }

// §9 of docs/perturbation-stream.md: stochastic rounding of an fp32 value to bf16 / fp16
// bits with the uint32 random word w (integer operations only: the same bits on every
// backend). NaN and infinities round to nearest, the sign is kept.
ZF_HD uint16_t sr_bf16_bits(float x, uint32_t w) {
  const uint32_t b = f2u(x);
  const uint32_t a = b & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) {  // inf / NaN: nearest (NaN stays a quiet NaN)
    return (uint16_t)(a > 0x7F800000u ? ((b >> 16) | 0x40u) : (b >> 16));
  }
  return (uint16_t)(((b & 0x80000000u) | ((a + (w >> 16)) & 0x7FFF0000u)) >> 16);
}

// fp16 bits of a finite fp32 value that lies exactly on the fp16 grid (or is >= 2^16: inf).
ZF_HD uint16_t fp16_bits_of_grid_value(uint32_t a) {
  const uint32_t e = a >> 23;            // biased fp32 exponent, >= 113 here
  if (e >= 127 + 16) return 0x7C00u;     // 2^16 or more: inf
  return (uint16_t)(((e - 112) << 10) | ((a >> 13) & 0x3FFu));
}

ZF_HD uint16_t sr_fp16_bits(float x, uint32_t w) {
  const uint32_t b = f2u(x);
  const uint32_t a = b & 0x7FFFFFFFu;
  const uint16_t sign = (uint16_t)((b >> 16) & 0x8000u);
  if (a >= 0x7F800000u) return (uint16_t)(sign | (a > 0x7F800000u ? 0x7E00u : 0x7C00u));
  const uint32_t e = a >> 23;
  if (e >= 113) return (uint16_t)(sign | fp16_bits_of_grid_value((a + (w >> 19)) & 0x7FFFE000u));
  // below 2^-14: units of 2^-24, |x| = M * 2^-k
  const uint32_t M = e > 0 ? ((a & 0x7FFFFFu) | 0x800000u) : (a & 0x7FFFFFu);
  const uint32_t k = e > 0 ? 126u - e : 125u;  // >= 14
  const uint32_t q = k < 24 ? (M >> k) : 0u;
  const uint32_t rem = k < 24 ? (M & ((1u << k) - 1u)) : M;
  uint32_t carry;
  if (k <= 32) {
    const uint64_t r = (uint64_t)(w >> (32 - k)) + (uint64_t)rem;  // k == 32: w itself
    carry = (uint32_t)(r >> k);
  } else {
    const uint32_t add = (k - 32) < 32 ? (rem >> (k - 32)) : 0u;
    carry = (uint32_t)(((uint64_t)w + (uint64_t)add) >> 32);
  }
  return (uint16_t)(sign | (q + carry));  // 1024 = 0x0400: the smallest normal
}

}  // namespace zf
