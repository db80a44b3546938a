// Perturbation stream `stream v1` (docs/perturbation-stream.md), shared by the CPU
// extension (g++, compiled with -ffp-contract=off), the CUDA extension (nvcc, compiled
// with --fmad=false) and the standalone ctest (tests/cpp/test_philox.cpp).
//
// Pure C/C++: no torch include.  Every float operation below is a separate, correctly
// rounded IEEE fp32 op (no contraction, no fast-math), so the CPU and CUDA builds produce
// bit-identical Gaussians (the spec only requires 2^-18 vs float64, see §5).
#pragma once

#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ZF_HD __host__ __device__ __forceinline__
#else
#define ZF_HD inline __attribute__((always_inline))
#endif

namespace zf {

// §1 constants (Random123).
constexpr uint32_t PHILOX_M0 = 0xD2511F53u;
constexpr uint32_t PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u;
constexpr uint32_t PHILOX_W1 = 0xBB67AE85u;

// §2 tags.
constexpr uint32_t TAG_PERTURBATION = 0u;
constexpr uint32_t TAG_MASK = 1u;
constexpr uint32_t TAG_SEED_SCHEDULE = 2u;
constexpr uint32_t TAG_ROUNDING = 3u;  // §9 stochastic rounding of stores

// §4 / §5 / §6 block sizes (elements per Philox call).
constexpr int RADEMACHER_BLOCK = 128;
constexpr int GAUSSIAN_BLOCK = 4;
constexpr int MASK_BLOCK = 4;
constexpr uint32_t MASK_ONE = 1u << 24;

// Distribution codes of the ops.
constexpr int DIST_GAUSSIAN = 0;
constexpr int DIST_RADEMACHER = 1;

// float32(pi) = 3.14159274f, as in §5.
constexpr float PI_F32 = 3.14159274101257324f;

struct Words4 {
  uint32_t x0, x1, x2, x3;
};

// ---------------------------------------------------------------------------------------
// §1 Philox4x32-10
// ---------------------------------------------------------------------------------------
ZF_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = (uint64_t)a * (uint64_t)b;
  lo = (uint32_t)p;
  hi = (uint32_t)(p >> 32);
#endif
}

ZF_HD Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                           uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(PHILOX_M0, c0, hi0, lo0);
    mulhilo32(PHILOX_M1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += PHILOX_W0;
    k1 += PHILOX_W1;
  }
  Words4 w;
  w.x0 = c0;
  w.x1 = c1;
  w.x2 = c2;
  w.x3 = c3;
  return w;
}

// §2 mapping: the Philox words of block `b` of tensor `tensor_id`, stream `tag`, seed key.
ZF_HD Words4 stream_block(uint64_t b, uint32_t tensor_id, uint32_t tag, uint32_t k0,
                          uint32_t k1) {
  return philox4x32_10((uint32_t)b, (uint32_t)(b >> 32), tensor_id, tag, k0, k1);
}

ZF_HD uint32_t seed_k0(uint64_t seed) { return (uint32_t)seed; }
ZF_HD uint32_t seed_k1(uint64_t seed) { return (uint32_t)(seed >> 32); }

ZF_HD uint32_t word(const Words4& w, int j) {
  return j == 0 ? w.x0 : (j == 1 ? w.x1 : (j == 2 ? w.x2 : w.x3));
}

// ---------------------------------------------------------------------------------------
// §3 uniforms (exact in fp32)
// ---------------------------------------------------------------------------------------
ZF_HD float u_open(uint32_t x) { return (float)((x >> 8) + 1u) * 5.9604644775390625e-08f; }
ZF_HD float u_closed(uint32_t x) { return (float)(x >> 8) * 5.9604644775390625e-08f; }

// ---------------------------------------------------------------------------------------
// §4 Rademacher: +1 if bit t of word w is set, else -1
// ---------------------------------------------------------------------------------------
ZF_HD float rademacher_from_word(uint32_t x, int t) {
  return ((x >> t) & 1u) ? 1.0f : -1.0f;
}

ZF_HD float rademacher(uint64_t i, uint32_t tensor_id, uint32_t k0, uint32_t k1) {
  const Words4 w = stream_block(i >> 7, tensor_id, TAG_PERTURBATION, k0, k1);
  const int j = (int)(i & 127u);
  return rademacher_from_word(word(w, j >> 5), j & 31);
}

// ---------------------------------------------------------------------------------------
// §6 mask: 1.0f if kept, 0.0f if zeroed.  threshold == 0 -> always kept.
// ---------------------------------------------------------------------------------------
ZF_HD float mask_from_word(uint32_t x, uint32_t threshold) {
  return (x >> 8) < threshold ? 0.0f : 1.0f;
}

ZF_HD float mask(uint64_t i, uint32_t tensor_id, uint32_t k0, uint32_t k1, uint32_t threshold) {
  if (threshold == 0u) return 1.0f;
  const Words4 w = stream_block(i >> 2, tensor_id, TAG_MASK, k0, k1);
  return mask_from_word(word(w, (int)(i & 3u)), threshold);
}

// ---------------------------------------------------------------------------------------
// §5 Gaussian lane math: vectorizable fp32 log and sincos.
//
// Branch-free polynomial code (selects only), so that g++ auto-vectorizes loops calling
// it.  Accuracy (measured in the ctest vs float64 on the same inputs): log ~1 ulp relative,
// sin/cos ~1 ulp on [-pi, pi]; the Gaussian stays ~1e-6 from float64 Box-Muller.
// ---------------------------------------------------------------------------------------
ZF_HD uint32_t f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}
ZF_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

// Correctly rounded sqrt and division, whatever the build flags (on the device the _rn
// intrinsics; on the host the IEEE operations, never a reciprocal approximation).
ZF_HD float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return sqrtf(x);
#endif
}
ZF_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// Natural log for finite positive normal x (the Box-Muller u is in [2^-24, 1]).
// Cephes logf scheme: x = 2^e * m, m in [sqrt(1/2), sqrt(2)), log(m) = f - f^2/2 + f^3 P(f),
// f = m - 1; e*ln2 added in two parts.
ZF_HD float log_f32(float x) {
  const uint32_t ix = f2u(x);
  // Shift so that the mantissa lands in [sqrt(1/2), sqrt(2)).
  const uint32_t t = ix - 0x3f3504f3u;  // 0x3f3504f3 = sqrt(1/2)
  const int32_t e = (int32_t)t >> 23;
  const uint32_t im = (t & 0x007fffffu) + 0x3f3504f3u;
  const float m = u2f(im);
  const float f = m - 1.0f;
  const float ef = (float)e;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f + -1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f + -1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f + -1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f + -2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  float r = f + y;
  r = r + ef * 0.693359375f;
  return r;
}

// sin and cos of a in [-4, 4] (the Box-Muller angle is in [-pi, pi]).  Cephes sinf/cosf
// polynomials on [-pi/4, pi/4] after a 3-part Cody-Waite reduction by k*pi/2, |k| <= 3:
// k*DP1 and k*DP2 are exact, so the reduction error is ~1e-15.
ZF_HD void sincos_f32(float a, float& s_out, float& c_out) {
  // k = nearest integer to a * 2/pi (round half away from zero; ties are harmless).
  const float q = a * 0.636619772367581343f;
  const float kf = (float)(int32_t)(q + (q >= 0.0f ? 0.5f : -0.5f));
  const int32_t k = (int32_t)kf;
  float y = a - kf * 1.5703125f;                  // pi/2 = DP1 + DP2 + DP3
  y = y - kf * 4.837512969970703125e-4f;
  y = y - kf * 7.54978995489188216e-8f;
  const float z = y * y;
  // sin(y) on [-pi/4, pi/4]
  float ps = -1.9515295891e-4f;
  ps = ps * z + 8.3321608736e-3f;
  ps = ps * z + -1.6666654611e-1f;
  ps = ps * z * y;
  const float sy = y + ps;
  // cos(y) on [-pi/4, pi/4]
  float pc = 2.443315711809948e-5f;
  pc = pc * z + -1.388731625493765e-3f;
  pc = pc * z + 4.166664568298827e-2f;
  pc = pc * z * z;
  const float cy = (1.0f - 0.5f * z) + pc;
  // quadrant: k mod 4
  const int32_t qd = k & 3;
  const bool swap = (qd & 1) != 0;
  const float s0 = swap ? cy : sy;
  const float c0 = swap ? sy : cy;
  const bool sneg = (qd & 2) != 0;                // quadrants 2, 3: sin negative
  const bool cneg = ((qd + 1) & 2) != 0;          // quadrants 1, 2: cos negative
  s_out = sneg ? -s0 : s0;
  c_out = cneg ? -c0 : c0;
}

// One Box-Muller pair from words (x_even, x_odd): lanes (even, odd) = (r cos a, r sin a).
ZF_HD void box_muller(uint32_t x_even, uint32_t x_odd, float& z_even, float& z_odd) {
  const float u = u_open(x_even);
  const float s = 2.0f * u_closed(x_odd) - 1.0f;
  const float r = sqrt_rn(-2.0f * log_f32(u));
  const float a = PI_F32 * s;
  float sn, cs;
  sincos_f32(a, sn, cs);
  z_even = r * cs;
  z_odd = r * sn;
}

ZF_HD float gaussian(uint64_t i, uint32_t tensor_id, uint32_t k0, uint32_t k1) {
  const Words4 w = stream_block(i >> 2, tensor_id, TAG_PERTURBATION, k0, k1);
  float a, b;
  if ((i & 3u) < 2u) {
    box_muller(w.x0, w.x1, a, b);
  } else {
    box_muller(w.x2, w.x3, a, b);
  }
  return (i & 1u) ? b : a;
}

// z(seed)_i for dist 0 (gaussian) / 1 (rademacher); scalar reference path.
ZF_HD float perturbation(int dist, uint64_t i, uint32_t tensor_id, uint32_t k0, uint32_t k1) {
  return dist == DIST_RADEMACHER ? rademacher(i, tensor_id, k0, k1)
                                 : gaussian(i, tensor_id, k0, k1);
}

}  // namespace zf
