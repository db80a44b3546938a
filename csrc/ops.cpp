// zfkernels ops: schema (TORCH_LIBRARY), CPU, Meta, CompositeExplicitAutograd, ADInplaceOrView
// (version counter) and Autograd (refusal) kernels.
// Semantics: docs/kernel-ops.md; stream: docs/perturbation-stream.md (stream v1).
// Argument checks and host scalars are shared with the CUDA kernels through ops_common.h.
//
// One arithmetic (docs/kernel-ops.md, "Arithmetic"): every fp32 step is one correctly
// rounded IEEE operation in the order the spec writes it -- compiled with -ffp-contract=off
// and no fast-math, the Gaussian from the polynomial log/sincos of philox.h -- so these
// kernels are bit-identical to the CUDA and Triton kernels and to zfkernels/reference.py.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>  // at::AutoDispatchBelowADInplaceOrView
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>  // torch::autograd::increment_version
#include <torch/library.h>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr (IeeeSubnormals)
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "module_init.h"  // PyInit: the module and its sources digest
#include "ops_common.h"
#include "philox.h"
#include "update_math.h"

// CPU capabilities (docs/kernel-ops.md, "CPU capabilities"). The tile kernels are compiled
// three times into one binary -- baseline x86-64, AVX2, AVX-512 (F/BW/DQ/VL) -- never
// with -march=native (the wheel must run on any x86-64), and each op call runs the variant of
// the capability in force: the best this CPU has, or a lower one named by
// ZEROFLOW_CPU_CAPABILITY (as ATEN_CPU_CAPABILITY does for torch). Every variant does the
// same IEEE operations in the same order (-ffp-contract=off, no fast-math, integer Philox),
// so all give the same bits; tests/test_cpu_capability.py runs each against the reference.
// Explicit variants rather than target_clones: a resolver picks a clone by the CPU alone, so
// only the best clone of a machine could ever be tested or timed on it. GCC only (clang
// builds the baseline variant).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(ZF_BASELINE_ONLY)
#include <immintrin.h>
#define ZF_X86_VARIANTS 1
#define ZF_TARGET_AVX2 __attribute__((target("avx2")))
#define ZF_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2")))
#endif
#define ZF_INLINE inline __attribute__((always_inline))
#define ZF_INLINE_LAMBDA __attribute__((always_inline))  // a lambda compiled into each variant

namespace zf_cpu {

using at::Tensor;
using at::TensorList;
using namespace zf_ops;

constexpr int TILE = 1024;           // elements per tile (multiple of 128)
constexpr int64_t CHUNK = 64 * 1024;  // elements per parallel work item (multiple of TILE)
constexpr int64_t SERIAL_BELOW = 1 << 16;

struct Key {
  uint32_t k0, k1;
};
inline Key key_of(int64_t seed) { return Key{zf::seed_k0((uint64_t)seed), zf::seed_k1((uint64_t)seed)}; }

// ---------------------------------------------------------------------------------------
// CPU capability in force
// ---------------------------------------------------------------------------------------
enum Cap : int { kCapDefault = 0, kCapAvx2 = 1, kCapAvx512 = 2 };
constexpr const char* kCapNames[] = {"default", "avx2", "avx512"};
constexpr int kCapCount = 3;

// The best capability of this CPU that the binary has a variant for.
int cpu_best_cap() {
#ifdef ZF_X86_VARIANTS
  static const int best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      return (int)kCapAvx512;
    return __builtin_cpu_supports("avx2") ? (int)kCapAvx2 : (int)kCapDefault;
  }();
  return best;
#else
  return kCapDefault;
#endif
}

std::atomic<int> g_cap{-1};  // -1: not set, cpu_best_cap()

// Read once per op call: every chunk of a call runs one variant.
int cap_in_force() {
  const int c = g_cap.load(std::memory_order_relaxed);
  return c < 0 ? cpu_best_cap() : c;
}

// Philox words in SIMD registers (integer operations only: the same words as
// zf::philox4x32_10, bit for bit). g++ auto-vectorizes the scalar loop of philox_batch by
// widening every word to 64 bits for the 32x32->64 products and packing the halves back
// (vpermq / vperm2i128 per multiply), which left it no faster than scalar code (1.5 ns per
// element of Gaussian z on a 2-core EPYC, 60% of a Gaussian perturb_); here each product is
// two vpmuludq on the even and odd lanes and two blends (0.46 ns per element in AVX2). Only
// the non-wrapping case (the low counter word does not pass 2^32 inside the batch). Each
// does blocks lo + [0, nb) of counter high word `hi` in whole groups of 8 * U (16 * U) and
// returns how many it did; the caller does the rest.
#ifdef ZF_X86_VARIANTS
constexpr int kPhiloxInFlight = 4;  // independent vectors per round (hides the multiply latency)

__attribute__((target("avx2"), always_inline)) inline void mulhilo8(__m256i m, __m256i a, __m256i& hi,
                                                                     __m256i& lo) {
  const __m256i pe = _mm256_mul_epu32(m, a);                          // lanes 0, 2, 4, 6
  const __m256i po = _mm256_mul_epu32(m, _mm256_srli_epi64(a, 32));   // lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
}

__attribute__((target("avx2"), noinline)) int philox_batch_avx2(uint32_t lo, uint32_t hi, int nb, uint32_t tid,
                                                                 uint32_t tag, uint32_t k0, uint32_t k1,
                                                                 uint32_t* __restrict o0, uint32_t* __restrict o1,
                                                                 uint32_t* __restrict o2, uint32_t* __restrict o3) {
  constexpr int U = kPhiloxInFlight;
  const __m256i M0 = _mm256_set1_epi32((int)zf::PHILOX_M0), M1 = _mm256_set1_epi32((int)zf::PHILOX_M1);
  __m256i K0[10], K1[10];
  for (int r = 0; r < 10; ++r) {
    K0[r] = _mm256_set1_epi32((int)k0);
    K1[r] = _mm256_set1_epi32((int)k1);
    k0 += zf::PHILOX_W0;
    k1 += zf::PHILOX_W1;
  }
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i vhi = _mm256_set1_epi32((int)hi), vtid = _mm256_set1_epi32((int)tid),
                vtag = _mm256_set1_epi32((int)tag);
  int c = 0;
  for (; c + 8 * U <= nb; c += 8 * U) {
    __m256i x0[U], x1[U], x2[U], x3[U];
    for (int u = 0; u < U; ++u) {
      x0[u] = _mm256_add_epi32(_mm256_set1_epi32((int)(lo + (uint32_t)(c + 8 * u))), iota);
      x1[u] = vhi;
      x2[u] = vtid;
      x3[u] = vtag;
    }
    for (int r = 0; r < 10; ++r) {
      for (int u = 0; u < U; ++u) {
        __m256i h0, l0, h1, l1;
        mulhilo8(M0, x0[u], h0, l0);
        mulhilo8(M1, x2[u], h1, l1);
        x0[u] = _mm256_xor_si256(_mm256_xor_si256(h1, x1[u]), K0[r]);
        x2[u] = _mm256_xor_si256(_mm256_xor_si256(h0, x3[u]), K1[r]);
        x1[u] = l1;
        x3[u] = l0;
      }
    }
    for (int u = 0; u < U; ++u) {
      _mm256_storeu_si256((__m256i*)(o0 + c + 8 * u), x0[u]);
      _mm256_storeu_si256((__m256i*)(o1 + c + 8 * u), x1[u]);
      _mm256_storeu_si256((__m256i*)(o2 + c + 8 * u), x2[u]);
      _mm256_storeu_si256((__m256i*)(o3 + c + 8 * u), x3[u]);
    }
  }
  return c;
}

// GCC 12's avx512fintrin.h reads its own `__m512i __Y = __Y;` placeholder in _mm512_mul_epu32
// (GCC bug 105593, a false -Wmaybe-uninitialized per call site).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The AVX2 routine at twice the width: the same rounds, mask blends for the odd lanes.
__attribute__((target("avx512f"), always_inline)) inline void mulhilo16(__m512i m, __m512i a, __m512i& hi,
                                                                         __m512i& lo) {
  const __m512i pe = _mm512_mul_epu32(m, a);                          // even lanes
  const __m512i po = _mm512_mul_epu32(m, _mm512_srli_epi64(a, 32));   // odd lanes
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
  lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
}

__attribute__((target("avx512f"), noinline)) int philox_batch_avx512(uint32_t lo, uint32_t hi, int nb, uint32_t tid,
                                                                      uint32_t tag, uint32_t k0, uint32_t k1,
                                                                      uint32_t* __restrict o0, uint32_t* __restrict o1,
                                                                      uint32_t* __restrict o2, uint32_t* __restrict o3) {
  constexpr int U = kPhiloxInFlight;
  const __m512i M0 = _mm512_set1_epi32((int)zf::PHILOX_M0), M1 = _mm512_set1_epi32((int)zf::PHILOX_M1);
  __m512i K0[10], K1[10];
  for (int r = 0; r < 10; ++r) {
    K0[r] = _mm512_set1_epi32((int)k0);
    K1[r] = _mm512_set1_epi32((int)k1);
    k0 += zf::PHILOX_W0;
    k1 += zf::PHILOX_W1;
  }
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i vhi = _mm512_set1_epi32((int)hi), vtid = _mm512_set1_epi32((int)tid),
                vtag = _mm512_set1_epi32((int)tag);
  int c = 0;
  for (; c + 16 * U <= nb; c += 16 * U) {
    __m512i x0[U], x1[U], x2[U], x3[U];
    for (int u = 0; u < U; ++u) {
      x0[u] = _mm512_add_epi32(_mm512_set1_epi32((int)(lo + (uint32_t)(c + 16 * u))), iota);
      x1[u] = vhi;
      x2[u] = vtid;
      x3[u] = vtag;
    }
    for (int r = 0; r < 10; ++r) {
      for (int u = 0; u < U; ++u) {
        __m512i h0, l0, h1, l1;
        mulhilo16(M0, x0[u], h0, l0);
        mulhilo16(M1, x2[u], h1, l1);
        x0[u] = _mm512_xor_si512(_mm512_xor_si512(h1, x1[u]), K0[r]);
        x2[u] = _mm512_xor_si512(_mm512_xor_si512(h0, x3[u]), K1[r]);
        x1[u] = l1;
        x3[u] = l0;
      }
    }
    for (int u = 0; u < U; ++u) {
      _mm512_storeu_si512((void*)(o0 + c + 16 * u), x0[u]);
      _mm512_storeu_si512((void*)(o1 + c + 16 * u), x1[u]);
      _mm512_storeu_si512((void*)(o2 + c + 16 * u), x2[u]);
      _mm512_storeu_si512((void*)(o3 + c + 16 * u), x3[u]);
    }
  }
  return c;
}
#pragma GCC diagnostic pop
#endif

// Philox words of `nb` consecutive blocks starting at b0, structure-of-arrays: the widest
// SIMD routine of capability C first, then narrower ones, then scalar code for the rest.
template <int C>
ZF_INLINE void philox_batch(uint64_t b0, int nb, uint32_t tid, uint32_t tag, Key key,
                            uint32_t* __restrict o0, uint32_t* __restrict o1,
                            uint32_t* __restrict o2, uint32_t* __restrict o3) {
  const uint32_t lo = (uint32_t)b0;
  const uint32_t hi = (uint32_t)(b0 >> 32);
  if ((uint64_t)lo + (uint64_t)nb > (uint64_t(1) << 32)) {  // crosses a 2^32-block boundary
    for (int c = 0; c < nb; ++c) {
      const zf::Words4 w = zf::stream_block(b0 + (uint64_t)c, tid, tag, key.k0, key.k1);
      o0[c] = w.x0; o1[c] = w.x1; o2[c] = w.x2; o3[c] = w.x3;
    }
    return;
  }
  int c = 0;
#ifdef ZF_X86_VARIANTS
  if constexpr (C >= kCapAvx512) c = philox_batch_avx512(lo, hi, nb, tid, tag, key.k0, key.k1, o0, o1, o2, o3);
  if constexpr (C >= kCapAvx2)
    c += philox_batch_avx2(lo + (uint32_t)c, hi, nb - c, tid, tag, key.k0, key.k1, o0 + c, o1 + c, o2 + c, o3 + c);
#endif
  for (; c < nb; ++c) {
    const zf::Words4 w = zf::philox4x32_10(lo + (uint32_t)c, hi, tid, tag, key.k0, key.k1);
    o0[c] = w.x0; o1[c] = w.x1; o2[c] = w.x2; o3[c] = w.x3;
  }
}

// z(seed) for elements [start, start + n) of tensor `tid`; start is a multiple of 128.
template <int C>
ZF_INLINE void fill_z(float* __restrict z, uint64_t start, int n, uint32_t tid, int dist, Key key) {
  if (dist == zf::DIST_RADEMACHER) {
    const int nb = (n + 127) >> 7;
    for (int b = 0; b < nb; ++b) {
      const zf::Words4 w = zf::stream_block((start >> 7) + (uint64_t)b, tid, zf::TAG_PERTURBATION, key.k0, key.k1);
      const uint32_t xs[4] = {w.x0, w.x1, w.x2, w.x3};
      float* zb = z + b * 128;
      for (int q = 0; q < 4; ++q) {
        const uint32_t x = xs[q];
        for (int t = 0; t < 32; ++t) {
          zb[q * 32 + t] = (float)((int32_t)((x >> t) & 1u) * 2 - 1);
        }
      }
    }
  } else {
    const int nb = (n + 3) >> 2;
    alignas(64) uint32_t w0[TILE / 4], w1[TILE / 4], w2[TILE / 4], w3[TILE / 4];
    philox_batch<C>(start >> 2, nb, tid, zf::TAG_PERTURBATION, key, w0, w1, w2, w3);
    alignas(64) float za[TILE / 4], zb[TILE / 4], zc[TILE / 4], zd[TILE / 4];
    for (int c = 0; c < nb; ++c) {
      zf::box_muller(w0[c], w1[c], za[c], zb[c]);
      zf::box_muller(w2[c], w3[c], zc[c], zd[c]);
    }
    for (int c = 0; c < nb; ++c) {
      z[4 * c + 0] = za[c];
      z[4 * c + 1] = zb[c];
      z[4 * c + 2] = zc[c];
      z[4 * c + 3] = zd[c];
    }
  }
}

// keep-mask (1.0f kept / 0.0f zeroed) for elements [start, start + n); start % 4 == 0.
template <int C>
ZF_INLINE void fill_mask(float* __restrict m, uint64_t start, int n, uint32_t tid, Key key, uint32_t T) {
  const int nb = (n + 3) >> 2;
  alignas(64) uint32_t w0[TILE / 4], w1[TILE / 4], w2[TILE / 4], w3[TILE / 4];
  philox_batch<C>(start >> 2, nb, tid, zf::TAG_MASK, key, w0, w1, w2, w3);
  for (int c = 0; c < nb; ++c) {
    m[4 * c + 0] = (w0[c] >> 8) < T ? 0.0f : 1.0f;
    m[4 * c + 1] = (w1[c] >> 8) < T ? 0.0f : 1.0f;
    m[4 * c + 2] = (w2[c] >> 8) < T ? 0.0f : 1.0f;
    m[4 * c + 3] = (w3[c] >> 8) < T ? 0.0f : 1.0f;
  }
}

// bf16 / fp16 storage <-> fp32 tiles, inlined into each variant (in baseline x86-64 code a
// bf16 store took 0.3 ns per element against 0.12 in AVX2: the same integer operations).
ZF_INLINE void bf16_to_f32(float* __restrict d, const c10::BFloat16* __restrict s, int n) {
  for (int i = 0; i < n; ++i) d[i] = static_cast<float>(s[i]);
}
ZF_INLINE void f16_to_f32(float* __restrict d, const c10::Half* __restrict s, int n) {
  for (int i = 0; i < n; ++i) d[i] = static_cast<float>(s[i]);
}
ZF_INLINE void f32_to_bf16(c10::BFloat16* __restrict d, const float* __restrict s, int n) {
  for (int i = 0; i < n; ++i) d[i] = c10::BFloat16(s[i]);
}
ZF_INLINE void f32_to_f16(c10::Half* __restrict d, const float* __restrict s, int n) {
  for (int i = 0; i < n; ++i) d[i] = c10::Half(s[i]);
}

// Storage rounding of a buffer value that is stored and then used (docs/kernel-ops.md).
ZF_INLINE void roundtrip(float* a, int n, at::ScalarType st) {
  if (st == at::kBFloat16) {
    for (int i = 0; i < n; ++i) a[i] = static_cast<float>(c10::BFloat16(a[i]));
  } else if (st == at::kHalf) {
    for (int i = 0; i < n; ++i) a[i] = static_cast<float>(c10::Half(a[i]));
  }
}

struct StreamCfg {
  uint32_t tid;
  int dist;
  uint32_t T;
  Key mask_key;
};

// ---------------------------------------------------------------------------------------
// Tile kernels on fp32 tiles.  `x` is the param tile (fp32 storage or an fp32 copy).
// ---------------------------------------------------------------------------------------
template <int C>
ZF_INLINE void perturb_tile(float* __restrict x, int n, uint64_t start, const StreamCfg& sc, Key key, float scale) {
  alignas(64) float z[TILE];
  fill_z<C>(z, start, n, sc.tid, sc.dist, key);
  if (sc.T) {
    alignas(64) float m[TILE];
    fill_mask<C>(m, start, n, sc.tid, sc.mask_key, sc.T);
    for (int i = 0; i < n; ++i) z[i] = z[i] * m[i];
  }
  for (int i = 0; i < n; ++i) x[i] = x[i] + z[i] * scale;
}

struct Estimate {
  const int64_t* seeds;
  const float* coeffs;
  int q;
  int64_t restore_seed;
  float restore_scale;
  int reuse;  // the query whose z is the restore's z (-1: none); see estimate_tile
};

// The per-call query terms: fp32 coefficients (kept alive in `cf`) and the Estimate over them.
struct QueryTerms {
  std::vector<float> cf;
  Estimate e;
  QueryTerms(at::IntArrayRef seeds, at::ArrayRef<double> coeffs, int64_t restore_seed, float restore_scale)
      : cf(coeffs.size()) {
    for (size_t j = 0; j < coeffs.size(); ++j) cf[j] = f32(coeffs[j]);
    int reuse = -1;
    if (restore_scale != 0.0f)
      for (int j = (int)seeds.size() - 1; j >= 0 && reuse < 0; --j)
        if (seeds[j] == restore_seed) reuse = j;
    e = Estimate{seeds.data(), cf.data(), (int)seeds.size(), restore_seed, restore_scale, reuse};
  }
  QueryTerms(const QueryTerms&) = delete;  // e points into cf
  QueryTerms& operator=(const QueryTerms&) = delete;
};

// p (restored, in place in x) and the raw estimate g (docs/kernel-ops.md, steps 1-2):
//   x = x + (z_r * m) * restore_scale ;  g = (sum_j z_j * c_j) * m   (m only when T > 0).
// The pending restore is usually the last query's perturbation (two-sided estimate:
// restore_seed == seeds[q-1]), so its z tile is kept and reused for that query's term
// instead of being regenerated: one Gaussian generation fewer per tile (the CPU kernel is
// bound by Box-Muller, not memory). Same values, same order: bit-identical either way.
template <int C>
ZF_INLINE void estimate_tile(float* __restrict x, float* __restrict g, int n, uint64_t start,
                             const StreamCfg& sc, const Estimate& e) {
  alignas(64) float z[TILE];
  alignas(64) float zr[TILE];
  alignas(64) float m[TILE];
  if (sc.T) fill_mask<C>(m, start, n, sc.tid, sc.mask_key, sc.T);
  if (e.restore_scale != 0.0f) {
    fill_z<C>(zr, start, n, sc.tid, sc.dist, key_of(e.restore_seed));
    const float rs = e.restore_scale;
    if (sc.T) {
      for (int i = 0; i < n; ++i) x[i] = x[i] + (zr[i] * m[i]) * rs;
    } else {
      for (int i = 0; i < n; ++i) x[i] = x[i] + zr[i] * rs;
    }
  }
  for (int i = 0; i < n; ++i) g[i] = 0.0f;
  for (int j = 0; j < e.q; ++j) {
    const float* __restrict zj = zr;
    if (j != e.reuse) {
      fill_z<C>(z, start, n, sc.tid, sc.dist, key_of(e.seeds[j]));
      zj = z;
    }
    const float c = e.coeffs[j];
    for (int i = 0; i < n; ++i) g[i] = g[i] + zj[i] * c;
  }
  if (sc.T)
    for (int i = 0; i < n; ++i) g[i] = g[i] * m[i];
}

struct HistCfg {
  float* h;  // null: history off
  at::ScalarType h_st;
  bool init;
  float alpha, one_minus_alpha;
  bool sign;
};

ZF_INLINE void history_sign_tile(float* __restrict g, int n, const HistCfg& hc) {
  if (hc.h) {
    float* __restrict h = hc.h;
    if (hc.init) {
      for (int i = 0; i < n; ++i) h[i] = g[i];
    } else {
      const float a = hc.alpha, b = hc.one_minus_alpha;
      for (int i = 0; i < n; ++i) h[i] = h[i] * a + g[i] * b;
    }
    roundtrip(h, n, hc.h_st);
    for (int i = 0; i < n; ++i) g[i] = h[i];
  }
  if (hc.sign) {
    for (int i = 0; i < n; ++i) g[i] = zf::sign_f32(g[i]);
  }
}

struct SgdCfg {
  SgdScalars s;
  float* buf;  // null: momentum off
  at::ScalarType buf_st;
  bool nesterov, momentum_init;
};

template <int C>
ZF_INLINE void sgd_tile(float* __restrict x, int n, uint64_t start, const StreamCfg& sc, const Estimate& e,
                        const HistCfg& hc, const SgdCfg& cfg) {
  alignas(64) float g[TILE];
  estimate_tile<C>(x, g, n, start, sc, e);
  history_sign_tile(g, n, hc);
  const float wd = cfg.s.wd;
  if (wd != 0.0f)
    for (int i = 0; i < n; ++i) g[i] = g[i] + x[i] * wd;
  if (cfg.buf) {
    float* __restrict b = cfg.buf;
    const float mu = cfg.s.mu, omd = cfg.s.one_minus_damp;
    if (cfg.momentum_init) {
      for (int i = 0; i < n; ++i) b[i] = g[i];
    } else {
      for (int i = 0; i < n; ++i) b[i] = b[i] * mu + g[i] * omd;
    }
    roundtrip(b, n, cfg.buf_st);
    if (cfg.nesterov) {
      for (int i = 0; i < n; ++i) g[i] = g[i] + b[i] * mu;
    } else {
      for (int i = 0; i < n; ++i) g[i] = b[i];
    }
  }
  const float lr = cfg.s.lr;
  for (int i = 0; i < n; ++i) x[i] = x[i] - g[i] * lr;
}

struct AdamCfg {
  AdamScalars s;
  bool decoupled;
  float* m;
  float* v;
  at::ScalarType m_st, v_st;
};

template <int C>
ZF_INLINE void adam_tile(float* __restrict x, int n, uint64_t start, const StreamCfg& sc, const Estimate& e,
                         const HistCfg& hc, const AdamCfg& cfg) {
  alignas(64) float g[TILE];
  estimate_tile<C>(x, g, n, start, sc, e);
  history_sign_tile(g, n, hc);
  const AdamScalars& s = cfg.s;
  if (cfg.decoupled) {
    const float f = s.decay_factor;
    for (int i = 0; i < n; ++i) x[i] = x[i] * f;
  } else if (s.wd != 0.0f) {
    const float wd = s.wd;
    for (int i = 0; i < n; ++i) g[i] = g[i] + x[i] * wd;
  }
  float* __restrict m = cfg.m;
  float* __restrict v = cfg.v;
  const float omb1 = s.one_minus_b1, b2 = s.b2, omb2 = s.one_minus_b2;
  for (int i = 0; i < n; ++i) {
    m[i] = m[i] + (g[i] - m[i]) * omb1;
    v[i] = v[i] * b2 + (g[i] * g[i]) * omb2;
  }
  roundtrip(m, n, cfg.m_st);
  roundtrip(v, n, cfg.v_st);
  const float bc2s = s.bc2_sqrt, eps = s.eps, step = s.step_size;
  for (int i = 0; i < n; ++i) {
    const float denom = zf::div_rn(zf::sqrt_rn(v[i]), bc2s) + eps;
    x[i] = x[i] - zf::div_rn(m[i], denom) * step;
  }
}

// ---------------------------------------------------------------------------------------
// Storage <-> fp32 tiles
// ---------------------------------------------------------------------------------------
// A tensor's tile as fp32: direct pointer for fp32 storage, else a converted copy.
struct TileIO {
  void* base = nullptr;  // tensor data
  at::ScalarType st = at::kFloat;
  float* ptr = nullptr;  // fp32 view of the current tile
  alignas(64) float tmp[TILE];

  void bind(const Tensor& t) {
    base = t.data_ptr();
    st = t.scalar_type();
  }
  ZF_INLINE float* load(int64_t off, int n) {
    if (st == at::kFloat) return ptr = static_cast<float*>(base) + off;
    if (st == at::kBFloat16) {
      bf16_to_f32(tmp, static_cast<const c10::BFloat16*>(base) + off, n);
    } else {
      f16_to_f32(tmp, static_cast<const c10::Half*>(base) + off, n);
    }
    return ptr = tmp;
  }
  // §9: the tile rounded stochastically with one random word per element (fp32: as store).
  template <int C>
  ZF_INLINE void store_stochastic(int64_t off, int n, uint32_t tid, Key key) {
    if (st == at::kFloat) return;
    alignas(64) uint32_t w0[TILE / 4], w1[TILE / 4], w2[TILE / 4], w3[TILE / 4];
    const int nb = (n + 3) >> 2;
    philox_batch<C>((uint64_t)off >> 2, nb, tid, zf::TAG_ROUNDING, key, w0, w1, w2, w3);
    const uint32_t* ws[4] = {w0, w1, w2, w3};
    uint16_t* d = static_cast<uint16_t*>(base) + off;
    if (st == at::kBFloat16) {
      for (int i = 0; i < n; ++i) d[i] = zf::sr_bf16_bits(tmp[i], ws[i & 3][i >> 2]);
    } else {
      for (int i = 0; i < n; ++i) d[i] = zf::sr_fp16_bits(tmp[i], ws[i & 3][i >> 2]);
    }
  }
  ZF_INLINE void store(int64_t off, int n) {
    if (st == at::kFloat) return;
    if (st == at::kBFloat16) {
      f32_to_bf16(static_cast<c10::BFloat16*>(base) + off, tmp, n);
    } else {
      f32_to_f16(static_cast<c10::Half*>(base) + off, tmp, n);
    }
  }
};

struct Chunk {
  int32_t k;
  int64_t start, n;
};

// A chunk run by the variant of one capability: `f(cap, chunk)` is a generic lambda whose body
// (and the tile kernels it calls, all always_inline) is compiled into each of these.
template <int C>
using CapTag = std::integral_constant<int, C>;
// Chunks each variant ran (zfkernels._C._chunks_run()): the variants give the same bits, so only
// this shows a test which one ran (one relaxed increment per chunk of CHUNK elements).
std::atomic<uint64_t> g_chunks_run[kCapCount] = {};
template <class F>
void chunk_default(const F& f, const Chunk& c) {
  g_chunks_run[kCapDefault].fetch_add(1, std::memory_order_relaxed);
  f(CapTag<kCapDefault>{}, c);
}
#ifdef ZF_X86_VARIANTS
template <class F>
ZF_TARGET_AVX2 void chunk_avx2(const F& f, const Chunk& c) {
  g_chunks_run[kCapAvx2].fetch_add(1, std::memory_order_relaxed);
  f(CapTag<kCapAvx2>{}, c);
}
template <class F>
ZF_TARGET_AVX512 void chunk_avx512(const F& f, const Chunk& c) {
  g_chunks_run[kCapAvx512].fetch_add(1, std::memory_order_relaxed);
  f(CapTag<kCapAvx512>{}, c);
}
#endif

// IEEE subnormals for the op's fp32 arithmetic whatever the calling thread's floating-point
// mode: torch.set_flush_denormal(True) (or another library) sets the SSE control register's
// flush-to-zero and denormals-are-zero bits, with which every variant flushed subnormal inputs
// and results to zero (Adam's m and v of masked coordinates decay through them) and the op
// wrote other bits than the spec's, the reference's and the CUDA kernels' (built -ftz=false).
// Cleared for the op's scope, on each thread that runs its arithmetic; restored after.
class IeeeSubnormals {
 public:
#if defined(__x86_64__) || defined(__i386__)
  IeeeSubnormals() : saved_(_mm_getcsr()) {
    const unsigned ieee = saved_ & ~(kFlushToZero | kDenormalsAreZero);
    if (ieee != saved_) _mm_setcsr(ieee);
  }
  ~IeeeSubnormals() {
    if (_mm_getcsr() != saved_) _mm_setcsr(saved_);
  }

 private:
  static constexpr unsigned kFlushToZero = 0x8000u, kDenormalsAreZero = 0x0040u;
  unsigned saved_;
#endif
};

template <class F>
void run_chunk(int cap, const F& f, const Chunk& c) {
  const IeeeSubnormals ieee;
#ifdef ZF_X86_VARIANTS
  if (cap == kCapAvx512) return chunk_avx512(f, c);
  if (cap == kCapAvx2) return chunk_avx2(f, c);
#endif
  chunk_default(f, c);
}

// Work list over all tensors, in CHUNK-sized pieces aligned to TILE (and so to 128), each run
// by the variant of the capability in force at the call.
template <typename F>
void for_each_chunk(TensorList params, const F& f) {
  const int cap = cap_in_force();
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t k = 0; k < params.size(); ++k) {
    const int64_t numel = params[k].numel();
    total += numel;
    for (int64_t s = 0; s < numel; s += CHUNK) chunks.push_back(Chunk{(int32_t)k, s, std::min(CHUNK, numel - s)});
  }
  if (chunks.empty()) return;
  if (total < SERIAL_BELOW || chunks.size() == 1) {
    for (const Chunk& c : chunks) run_chunk(cap, f, c);
    return;
  }
  at::parallel_for(0, (int64_t)chunks.size(), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) run_chunk(cap, f, chunks[i]);
  });
}

// ---------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------
Tensor philox4x32_10_cpu(const Tensor& counters, int64_t key0, int64_t key1) {
  check_counters(counters);
  check_key(key0, "key0");
  check_key(key1, "key1");
  TORCH_CHECK_VALUE(counters.device().is_cpu(), "zfkernels: counters must be a CPU tensor here");
  Tensor c = counters.contiguous();
  Tensor out = at::empty_like(c);
  const int64_t n = c.size(0);
  if (n == 0) return out;
  check_counter_values(c);
  const int64_t* cp = c.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t* r = cp + 4 * i;
      const zf::Words4 w = zf::philox4x32_10((uint32_t)r[0], (uint32_t)r[1], (uint32_t)r[2], (uint32_t)r[3],
                                             (uint32_t)key0, (uint32_t)key1);
      op[4 * i + 0] = w.x0;
      op[4 * i + 1] = w.x1;
      op[4 * i + 2] = w.x2;
      op[4 * i + 3] = w.x3;
    }
  });
  return out;
}

StreamCfg stream_cfg(uint32_t tid, int64_t dist, int64_t mask_seed, int64_t mask_threshold) {
  return StreamCfg{tid, (int)dist, (uint32_t)mask_threshold, key_of(mask_seed)};
}

void perturb_cpu(TensorList params, at::IntArrayRef tensor_ids, int64_t seed, double scale, int64_t dist,
                 int64_t mask_seed, int64_t mask_threshold) {
  check_perturb_args(params, tensor_ids, seed, scale, dist, mask_seed, mask_threshold);
  if (params.empty()) return;
  const IeeeSubnormals ieee;  // the host scalars too (fp32 roundings of lr, coeffs, ...)
  const float scale_f = f32(scale);
  const Key key = key_of(seed);
  for_each_chunk(params, [&](auto cap, const Chunk& c) ZF_INLINE_LAMBDA {
    constexpr int C = decltype(cap)::value;
    const StreamCfg sc = stream_cfg((uint32_t)tensor_ids[c.k], dist, mask_seed, mask_threshold);
    TileIO io;
    io.bind(params[c.k]);
    for (int64_t off = c.start; off < c.start + c.n; off += TILE) {
      const int n = (int)std::min<int64_t>(TILE, c.start + c.n - off);
      float* x = io.load(off, n);
      perturb_tile<C>(x, n, (uint64_t)off, sc, key, scale_f);
      io.store(off, n);
    }
  });
}

void sgd_cpu(TensorList params, TensorList momentum_buffers, TensorList history_buffers,
             at::IntArrayRef tensor_ids, at::IntArrayRef seeds, at::ArrayRef<double> coeffs, int64_t dist,
             int64_t mask_seed, int64_t mask_threshold, int64_t restore_seed, double restore_scale, double lr,
             double weight_decay, double momentum, double dampening, bool nesterov, bool momentum_init,
             bool sign, double history_alpha, bool history_init, bool stochastic_rounding, int64_t round_seed) {
  check_sgd_args(params, momentum_buffers, history_buffers, tensor_ids, seeds, coeffs, dist, mask_seed, mask_threshold,
                 restore_seed, restore_scale, lr, weight_decay, momentum, dampening, history_alpha, round_seed);
  const IeeeSubnormals ieee;  // the host scalars too (fp32 roundings of lr, coeffs, ...)
  const Key round_key = key_of(round_seed);
  if (params.empty()) return;
  const SgdScalars s = sgd_scalars(restore_scale, lr, weight_decay, momentum, dampening, history_alpha);
  const QueryTerms terms(seeds, coeffs, restore_seed, s.restore_scale);
  const Estimate& e = terms.e;
  const bool has_m = !momentum_buffers.empty(), has_h = !history_buffers.empty();
  for_each_chunk(params, [&](auto cap, const Chunk& c) ZF_INLINE_LAMBDA {
    constexpr int C = decltype(cap)::value;
    const StreamCfg sc = stream_cfg((uint32_t)tensor_ids[c.k], dist, mask_seed, mask_threshold);
    TileIO px, pm, ph;
    px.bind(params[c.k]);
    if (has_m) pm.bind(momentum_buffers[c.k]);
    if (has_h) ph.bind(history_buffers[c.k]);
    for (int64_t off = c.start; off < c.start + c.n; off += TILE) {
      const int n = (int)std::min<int64_t>(TILE, c.start + c.n - off);
      float* x = px.load(off, n);
      HistCfg hc{has_h ? ph.load(off, n) : nullptr, ph.st, history_init, s.alpha, s.one_minus_alpha, sign};
      SgdCfg cfg{s, has_m ? pm.load(off, n) : nullptr, pm.st, nesterov, momentum_init};
      sgd_tile<C>(x, n, (uint64_t)off, sc, e, hc, cfg);
      if (stochastic_rounding) px.store_stochastic<C>(off, n, sc.tid, round_key); else px.store(off, n);
      if (has_m) pm.store(off, n);
      if (has_h) ph.store(off, n);
    }
  });
}

void adam_cpu(TensorList params, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList history_buffers,
              at::IntArrayRef tensor_ids, at::IntArrayRef seeds, at::ArrayRef<double> coeffs, int64_t dist,
              int64_t mask_seed, int64_t mask_threshold, int64_t restore_seed, double restore_scale, double lr,
              double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
              int64_t step, bool sign, double history_alpha, bool history_init, bool stochastic_rounding,
              int64_t round_seed) {
  check_adam_args(params, exp_avgs, exp_avg_sqs, history_buffers, tensor_ids, seeds, coeffs, dist, mask_seed,
                  mask_threshold, restore_seed, restore_scale, lr, beta1, beta2, eps, weight_decay,
                  decoupled_weight_decay, step, history_alpha, round_seed);
  const IeeeSubnormals ieee;  // the host scalars too (fp32 roundings of lr, coeffs, ...)
  const Key round_key = key_of(round_seed);
  const AdamScalars s = adam_scalars(restore_scale, lr, beta1, beta2, eps, weight_decay, step, history_alpha);
  if (params.empty()) return;
  const QueryTerms terms(seeds, coeffs, restore_seed, s.restore_scale);
  const Estimate& e = terms.e;
  const bool has_h = !history_buffers.empty();
  for_each_chunk(params, [&](auto cap, const Chunk& c) ZF_INLINE_LAMBDA {
    constexpr int C = decltype(cap)::value;
    const StreamCfg sc = stream_cfg((uint32_t)tensor_ids[c.k], dist, mask_seed, mask_threshold);
    TileIO px, pm, pv, ph;
    px.bind(params[c.k]);
    pm.bind(exp_avgs[c.k]);
    pv.bind(exp_avg_sqs[c.k]);
    if (has_h) ph.bind(history_buffers[c.k]);
    for (int64_t off = c.start; off < c.start + c.n; off += TILE) {
      const int n = (int)std::min<int64_t>(TILE, c.start + c.n - off);
      float* x = px.load(off, n);
      HistCfg hc{has_h ? ph.load(off, n) : nullptr, ph.st, history_init, s.alpha, s.one_minus_alpha, sign};
      AdamCfg cfg{s, decoupled_weight_decay, pm.load(off, n), pv.load(off, n), pm.st, pv.st};
      adam_tile<C>(x, n, (uint64_t)off, sc, e, hc, cfg);
      if (stochastic_rounding) px.store_stochastic<C>(off, n, sc.tid, round_key); else px.store(off, n);
      pm.store(off, n);
      pv.store(off, n);
      if (has_h) ph.store(off, n);
    }
  });
}

// ---------------------------------------------------------------------------------------
// Meta (fake) kernels: shapes only; the in-place ops return nothing.
// ---------------------------------------------------------------------------------------
Tensor philox4x32_10_meta(const Tensor& counters, int64_t key0, int64_t key1) {
  check_counters(counters);
  check_key(key0, "key0");
  check_key(key1, "key1");
  // sym_size: under torch.compile with dynamic shapes N is symbolic, and size(0) specialized
  // it to its traced value (a recompile per N; a ConstraintViolationError for N marked dynamic).
  return at::empty_symint({counters.sym_size(0), 4}, counters.options());
}

// The meta kernels run every argument check of the device kernels (the scalar options too: NaN or
// infinite ones, check_scalar; Adam's betas, step, step size and decay factor): the arguments
// no check reads keep their schema names in comments.
void perturb_meta(TensorList params, at::IntArrayRef tensor_ids, int64_t seed, double scale, int64_t dist,
                  int64_t mask_seed, int64_t mask_threshold) {
  check_perturb_args(params, tensor_ids, seed, scale, dist, mask_seed, mask_threshold);
}

void sgd_meta(TensorList params, TensorList momentum_buffers, TensorList history_buffers,
              at::IntArrayRef tensor_ids, at::IntArrayRef seeds, at::ArrayRef<double> coeffs, int64_t dist,
              int64_t mask_seed, int64_t mask_threshold, int64_t restore_seed, double restore_scale,
              double lr, double weight_decay, double momentum, double dampening, bool /*nesterov*/,
              bool /*momentum_init*/, bool /*sign*/, double history_alpha, bool /*history_init*/,
              bool /*stochastic_rounding*/, int64_t round_seed) {
  check_sgd_args(params, momentum_buffers, history_buffers, tensor_ids, seeds, coeffs, dist, mask_seed, mask_threshold,
                 restore_seed, restore_scale, lr, weight_decay, momentum, dampening, history_alpha, round_seed);
}

void adam_meta(TensorList params, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList history_buffers,
               at::IntArrayRef tensor_ids, at::IntArrayRef seeds, at::ArrayRef<double> coeffs, int64_t dist,
               int64_t mask_seed, int64_t mask_threshold, int64_t restore_seed, double restore_scale,
               double lr, double beta1, double beta2, double eps, double weight_decay,
               bool decoupled_weight_decay, int64_t step, bool /*sign*/, double history_alpha,
               bool /*history_init*/, bool /*stochastic_rounding*/, int64_t round_seed) {
  check_adam_args(params, exp_avgs, exp_avg_sqs, history_buffers, tensor_ids, seeds, coeffs, dist, mask_seed,
                  mask_threshold, restore_seed, restore_scale, lr, beta1, beta2, eps, weight_decay,
                  decoupled_weight_decay, step, history_alpha, round_seed);
}


// CompositeExplicitAutograd kernels: the dispatcher routes calls that carry no tensor at all
// (empty lists) to this alias, so they become validated no-ops.  A non-empty call reaching
// them is on a device without zfkernels kernels.
void no_backend(TensorList params) {
  TORCH_CHECK_VALUE(params.empty(), "zfkernels: no compiled kernel for device ", params[0].device(),
                    "; use backend='torch' (the reference) or move the tensors to CPU/CUDA");
}
Tensor philox4x32_10_composite(const Tensor& counters, int64_t /*key0*/, int64_t /*key1*/) {
  // a sparse CPU/CUDA tensor lands here too (no kernel for its layout): name the layout first
  check_counters(counters);
  TORCH_CHECK_VALUE(false, "zfkernels: no compiled philox4x32_10 kernel for device ", counters.device());
}
void perturb_composite(TensorList params, at::IntArrayRef tensor_ids, int64_t seed, double scale, int64_t dist,
                       int64_t mask_seed, int64_t mask_threshold) {
  perturb_meta(params, tensor_ids, seed, scale, dist, mask_seed, mask_threshold);
  no_backend(params);
}
void sgd_composite(TensorList params, TensorList momentum_buffers, TensorList history_buffers,
                   at::IntArrayRef tensor_ids, at::IntArrayRef seeds, at::ArrayRef<double> coeffs, int64_t dist,
                   int64_t mask_seed, int64_t mask_threshold, int64_t restore_seed, double restore_scale, double lr,
                   double weight_decay, double momentum, double dampening, bool nesterov, bool momentum_init,
                   bool sign, double history_alpha, bool history_init, bool stochastic_rounding,
                   int64_t round_seed) {
  sgd_meta(params, momentum_buffers, history_buffers, tensor_ids, seeds, coeffs, dist, mask_seed, mask_threshold,
           restore_seed, restore_scale, lr, weight_decay, momentum, dampening, nesterov, momentum_init, sign,
           history_alpha, history_init, stochastic_rounding, round_seed);
  no_backend(params);
}
void adam_composite(TensorList params, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList history_buffers,
                    at::IntArrayRef tensor_ids, at::IntArrayRef seeds, at::ArrayRef<double> coeffs, int64_t dist,
                    int64_t mask_seed, int64_t mask_threshold, int64_t restore_seed, double restore_scale, double lr,
                    double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                    int64_t step, bool sign, double history_alpha, bool history_init, bool stochastic_rounding,
                    int64_t round_seed) {
  adam_meta(params, exp_avgs, exp_avg_sqs, history_buffers, tensor_ids, seeds, coeffs, dist, mask_seed,
            mask_threshold, restore_seed, restore_scale, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
            step, sign, history_alpha, history_init, stochastic_rounding, round_seed);
  no_backend(params);
}

// ---------------------------------------------------------------------------------------
// ADInplaceOrView kernels: autograd's version counter of every tensor an op writes.
// ---------------------------------------------------------------------------------------
// The CPU and CUDA kernels write through data pointers, which autograd cannot see: without a
// bump, a backward over a graph that saved a param before it was perturbed or updated ran on
// the new values without complaint (a wrong gradient), where torch's own in-place ops (and
// the reference backend, which stores with copy_) raise "modified by an inplace operation".
// So each mutating op has a kernel at ADInplaceOrView, the key of torch's own in-place ops,
// which bumps the version of every tensor of its mutable lists and redispatches below that
// key to the device's kernel (CPU, CUDA, Meta, or the composite for empty lists); it is
// device-agnostic, so the CUDA extension needs none of its own. ADInplaceOrView is in the
// default dispatch set (not in inference mode), so an inference tensor reaches it too, and
// its bump raises torch's "Inplace update to inference tensor outside InferenceMode". The
// bump comes before the write, as that error must; a call that the kernel then refuses has
// bumped without writing, which errs on the safe side (a later backward over the unchanged
// tensor is refused, never run on changed values).
void bump_versions(TensorList tensors) {
  for (const Tensor& t : tensors) {
    if (t.defined()) torch::autograd::increment_version(t);  // an undefined one: the kernel names it
  }
}

template <class Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

void perturb_inplace_view(c10::DispatchKeySet ks, TensorList params, at::IntArrayRef tensor_ids, int64_t seed,
                          double scale, int64_t dist, int64_t mask_seed, int64_t mask_threshold) {
  static const auto op = op_handle<decltype(perturb_cpu)>("zfkernels::perturb_");
  bump_versions(params);
  const at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatch(ks & c10::after_ADInplaceOrView_keyset, params, tensor_ids, seed, scale, dist, mask_seed,
                mask_threshold);
}

void sgd_inplace_view(c10::DispatchKeySet ks, TensorList params, TensorList momentum_buffers,
                      TensorList history_buffers, at::IntArrayRef tensor_ids, at::IntArrayRef seeds,
                      at::ArrayRef<double> coeffs, int64_t dist, int64_t mask_seed, int64_t mask_threshold,
                      int64_t restore_seed, double restore_scale, double lr, double weight_decay, double momentum,
                      double dampening, bool nesterov, bool momentum_init, bool sign, double history_alpha,
                      bool history_init, bool stochastic_rounding, int64_t round_seed) {
  static const auto op = op_handle<decltype(sgd_cpu)>("zfkernels::zo_sgd_update_");
  bump_versions(params);
  bump_versions(momentum_buffers);
  bump_versions(history_buffers);
  const at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatch(ks & c10::after_ADInplaceOrView_keyset, params, momentum_buffers, history_buffers, tensor_ids,
                seeds, coeffs, dist, mask_seed, mask_threshold, restore_seed, restore_scale, lr, weight_decay,
                momentum, dampening, nesterov, momentum_init, sign, history_alpha, history_init,
                stochastic_rounding, round_seed);
}

void adam_inplace_view(c10::DispatchKeySet ks, TensorList params, TensorList exp_avgs, TensorList exp_avg_sqs,
                       TensorList history_buffers, at::IntArrayRef tensor_ids, at::IntArrayRef seeds,
                       at::ArrayRef<double> coeffs, int64_t dist, int64_t mask_seed, int64_t mask_threshold,
                       int64_t restore_seed, double restore_scale, double lr, double beta1, double beta2, double eps,
                       double weight_decay, bool decoupled_weight_decay, int64_t step, bool sign,
                       double history_alpha, bool history_init, bool stochastic_rounding, int64_t round_seed) {
  static const auto op = op_handle<decltype(adam_cpu)>("zfkernels::zo_adam_update_");
  bump_versions(params);
  bump_versions(exp_avgs);
  bump_versions(exp_avg_sqs);
  bump_versions(history_buffers);
  const at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatch(ks & c10::after_ADInplaceOrView_keyset, params, exp_avgs, exp_avg_sqs, history_buffers,
                tensor_ids, seeds, coeffs, dist, mask_seed, mask_threshold, restore_seed, restore_scale, lr, beta1,
                beta2, eps, weight_decay, decoupled_weight_decay, step, sign, history_alpha, history_init,
                stochastic_rounding, round_seed);
}

// ---------------------------------------------------------------------------------------
// Autograd kernel: the ops are not differentiable, and they write in place.
// ---------------------------------------------------------------------------------------
// Without one, torch's autograd fallback let a direct call (torch.ops.zfkernels.*, grad mode
// on) write a leaf that requires grad, which torch's own in-place ops refuse, and write a
// non-leaf while its grad_fn stayed the one of its old value (a wrong gradient, no warning).
// One boxed kernel serves every mutating op: it reads the written lists from the schema's
// alias annotations (Tensor(a!)[]), refuses before anything is written, then redispatches
// below autograd. Device-agnostic (the Autograd alias key), like ADInplaceOrView. The Python
// face and the optimizers call the ops under no_grad, where this costs one flag read.
void refuse_grad_writes(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    const auto& schema = op.schema();
    const auto& args = schema.arguments();
    const size_t first = stack->size() - args.size();
    for (size_t a = 0; a < args.size(); ++a) {
      const c10::AliasInfo* alias = args[a].alias_info();
      const c10::IValue& value = (*stack)[first + a];
      if (alias == nullptr || !alias->isWrite() || !value.isTensorList()) continue;
      const c10::List<Tensor> tensors = value.toTensorList();
      for (size_t k = 0; k < tensors.size(); ++k) {
        const Tensor t = tensors.get(k);
        TORCH_CHECK(!(t.defined() && t.requires_grad()), schema.name(), ": ", args[a].name(), "[", k,
                    "] requires grad, and this op writes it in place without recording a gradient: call it under "
                    "torch.no_grad() (zfkernels' functions and the zeroflow optimizers do), or pass a tensor that "
                    "does not require grad (.detach())");
      }
    }
  }
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

}  // namespace zf_cpu

// The schema: the argument table of zfkernels/opspec.py, which tests/test_opspec.py compares
// with these strings (and with the Triton and reference signatures).
TORCH_LIBRARY(zfkernels, m) {
  m.def("philox4x32_10(Tensor counters, int key0, int key1) -> Tensor");
  m.def(
      "perturb_(Tensor(a!)[] params, int[] tensor_ids, int seed, float scale, int dist, "
      "int mask_seed, int mask_threshold) -> ()");
  m.def(
      "zo_sgd_update_(Tensor(a!)[] params, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] history_buffers, int[] tensor_ids, int[] seeds, float[] coeffs, "
      "int dist, int mask_seed, int mask_threshold, int restore_seed, "
      "float restore_scale, float lr, float weight_decay, float momentum, "
      "float dampening, bool nesterov, bool momentum_init, bool sign, "
      "float history_alpha, bool history_init, bool stochastic_rounding, int round_seed) -> ()");
  m.def(
      "zo_adam_update_(Tensor(a!)[] params, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] history_buffers, int[] tensor_ids, int[] seeds, float[] coeffs, "
      "int dist, int mask_seed, int mask_threshold, int restore_seed, "
      "float restore_scale, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool decoupled_weight_decay, int step, bool sign, "
      "float history_alpha, bool history_init, bool stochastic_rounding, int round_seed) -> ()");
}

TORCH_LIBRARY_IMPL(zfkernels, CPU, m) {
  m.impl("philox4x32_10", &zf_cpu::philox4x32_10_cpu);
  m.impl("perturb_", &zf_cpu::perturb_cpu);
  m.impl("zo_sgd_update_", &zf_cpu::sgd_cpu);
  m.impl("zo_adam_update_", &zf_cpu::adam_cpu);
}

TORCH_LIBRARY_IMPL(zfkernels, Meta, m) {
  m.impl("philox4x32_10", &zf_cpu::philox4x32_10_meta);
  m.impl("perturb_", &zf_cpu::perturb_meta);
  m.impl("zo_sgd_update_", &zf_cpu::sgd_meta);
  m.impl("zo_adam_update_", &zf_cpu::adam_meta);
}

TORCH_LIBRARY_IMPL(zfkernels, CompositeExplicitAutograd, m) {
  m.impl("philox4x32_10", &zf_cpu::philox4x32_10_composite);
  m.impl("perturb_", &zf_cpu::perturb_composite);
  m.impl("zo_sgd_update_", &zf_cpu::sgd_composite);
  m.impl("zo_adam_update_", &zf_cpu::adam_composite);
}

TORCH_LIBRARY_IMPL(zfkernels, ADInplaceOrView, m) {  // the mutating ops (philox4x32_10 writes no input)
  m.impl("perturb_", &zf_cpu::perturb_inplace_view);
  m.impl("zo_sgd_update_", &zf_cpu::sgd_inplace_view);
  m.impl("zo_adam_update_", &zf_cpu::adam_inplace_view);
}

TORCH_LIBRARY_IMPL(zfkernels, Autograd, m) {  // the mutating ops (philox4x32_10's output needs no grad)
  m.impl("perturb_", torch::CppFunction::makeFromBoxedFunction<&zf_cpu::refuse_grad_writes>());
  m.impl("zo_sgd_update_", torch::CppFunction::makeFromBoxedFunction<&zf_cpu::refuse_grad_writes>());
  m.impl("zo_adam_update_", torch::CppFunction::makeFromBoxedFunction<&zf_cpu::refuse_grad_writes>());
}

// The Python module: importing zfkernels._C registers the ops; its functions read and set the
// CPU capability in force (zfkernels/_compiled.py applies ZEROFLOW_CPU_CAPABILITY with them).
namespace zf_cpu {

PyObject* py_cpu_capability(PyObject*, PyObject*) { return PyUnicode_FromString(kCapNames[cap_in_force()]); }

PyObject* py_cpu_capabilities(PyObject*, PyObject*) {  // this CPU's, lowest first
  const int best = cpu_best_cap();
  PyObject* out = PyTuple_New(best + 1);
  if (out == nullptr) return nullptr;
  for (int c = 0; c <= best; ++c) PyTuple_SET_ITEM(out, c, PyUnicode_FromString(kCapNames[c]));
  return out;
}

PyObject* py_set_cpu_capability(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  if (name == nullptr) {
    PyErr_Clear();
    PyErr_SetString(PyExc_TypeError, "set_cpu_capability: name must be a str");
    return nullptr;
  }
  for (int c = 0; c < kCapCount; ++c) {
    if (std::strcmp(name, kCapNames[c]) != 0) continue;
    if (c > cpu_best_cap()) {
      PyErr_Format(PyExc_ValueError,
                   "CPU capability '%s' is not available on this machine or in this build (the best here is '%s'); "
                   "choose one of the capabilities of zfkernels.cpu_capabilities()",
                   name, kCapNames[cpu_best_cap()]);
      return nullptr;
    }
    g_cap.store(c, std::memory_order_relaxed);
    Py_RETURN_NONE;
  }
  PyErr_Format(PyExc_ValueError, "unknown CPU capability '%s'; use one of 'default', 'avx2', 'avx512'", name);
  return nullptr;
}

PyObject* py_chunks_run(PyObject*, PyObject*) {  // for tests: chunks run per variant, lowest first
  return Py_BuildValue("(KKK)", (unsigned long long)g_chunks_run[0].load(), (unsigned long long)g_chunks_run[1].load(),
                       (unsigned long long)g_chunks_run[2].load());
}

PyMethodDef module_methods[] = {
    {"cpu_capability", py_cpu_capability, METH_NOARGS, "The CPU capability whose kernels the ops run."},
    {"cpu_capabilities", py_cpu_capabilities, METH_NOARGS, "The CPU capabilities of this machine, lowest first."},
    {"set_cpu_capability", py_set_cpu_capability, METH_O, "Run the kernels of this CPU capability."},
    {"_chunks_run", py_chunks_run, METH_NOARGS, "Chunks each variant ran (default, avx2, avx512), for tests."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace zf_cpu

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "zfkernels compiled CPU ops", -1,
                                          zf_cpu::module_methods};
  return zf_ops::create_module(&module_def);
}
}
