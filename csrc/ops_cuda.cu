// zfkernels CUDA kernels (TORCH_LIBRARY_IMPL(zfkernels, CUDA)); the schema lives in
// csrc/ops.cpp (extension zfkernels._C, imported first by zfkernels/_compiled.py).
// Semantics: docs/kernel-ops.md; stream: docs/perturbation-stream.md (stream v1), shared
// through csrc/philox.h.  Compiled with --fmad=false, -prec-div=true, -prec-sqrt=true: each
// fp32 step is one correctly rounded IEEE op in the spec's order ("Arithmetic"), so results
// equal the CPU and Triton kernels and the reference bit for bit (Gaussian included: the
// same polynomial log/sincos from philox.h).
//
// Multi-tensor launches: ONE kernel per op call for the whole list.  The host packs a table
// of per-tensor entries (pointers, dtype codes, numel, id, first work item) plus the q seeds
// and coefficients into one small byte buffer, copies it to the device (pinned, async, on the
// current stream), and the kernel walks a grid-stride loop over "quads" (4 consecutive
// elements, aligned to 4: one Gaussian / mask Philox call; 32 quads = one 128-element
// Rademacher block), locating each quad's tensor by binary search in the table.

#include <c10/cuda/CUDAStream.h>  // (ATen/cuda/CUDAContext.h would need cusparse/cublas headers)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "ops_common.h"  // validation + host scalar preparation, shared with the CPU build
#include "philox.h"
#include "update_math.h"

namespace zf_cuda {

using at::Tensor;
using at::TensorList;
using namespace zf_ops;

enum DType : int32_t { F32 = 0, BF16 = 1, F16 = 2 };

// Per-tensor entry of the launch table.  ptr[SLOT_PARAM] = param, ptr[1..3] = the op's buffers.
struct Entry {
  void* ptr[4];
  int32_t dt[4];
  int32_t vec[4];  // 1 when ptr is aligned for a 4-element vector access
  int64_t numel;
  int64_t quad_start;  // first global quad of this tensor
  uint32_t tid;
  uint32_t pad;
};

// Slots of an entry (docs/kernel-ops.md, "Schemas"): the param, then the op's buffers in schema
// order, as in the Triton pointer table.
constexpr int SLOT_PARAM = 0;
constexpr int SLOT_SGD_MOMENTUM = 1, SLOT_SGD_HISTORY = 2;
constexpr int SLOT_ADAM_EXP_AVG = 1, SLOT_ADAM_EXP_AVG_SQ = 2, SLOT_ADAM_HISTORY = 3;

struct Common {
  const Entry* entries;
  const uint64_t* seeds;
  const float* coeffs;
  int32_t ntensors;
  int32_t q;
  int64_t total_quads;
  int32_t dist;
  uint32_t T;
  uint32_t mk0, mk1;
  uint64_t restore_seed;
  float restore_scale;
  bool stochastic_rounding;  // §9 for the parameter stores of the updates
  uint32_t rk0, rk1;         // the rounding seed's key
};

// ----------------------------------------------------------------------------------------
// Device helpers
// ----------------------------------------------------------------------------------------
__device__ __forceinline__ int find_tensor(const Entry* e, int n, int64_t q) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (e[mid].quad_start <= q) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ float round_to(float v, int dt) {
  if (dt == BF16) return __bfloat162float(__float2bfloat16_rn(v));
  if (dt == F16) return __half2float(__float2half_rn(v));
  return v;
}

// Load elements [i0, i0 + cnt) (cnt <= 4) as fp32.
__device__ __forceinline__ void load4(const void* p, int dt, int vec, int64_t i0, int cnt, float v[4]) {
  if (dt == F32) {
    const float* f = static_cast<const float*>(p) + i0;
    if (vec && cnt == 4) {
      const float4 t = *reinterpret_cast<const float4*>(f);
      v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
      return;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = j < cnt ? f[j] : 0.0f;
  } else if (dt == BF16) {
    const __nv_bfloat16* h = static_cast<const __nv_bfloat16*>(p) + i0;
    if (vec && cnt == 4) {
      const uint2 t = *reinterpret_cast<const uint2*>(h);
      const __nv_bfloat162 a = *reinterpret_cast<const __nv_bfloat162*>(&t.x);
      const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(&t.y);
      v[0] = __low2float(a); v[1] = __high2float(a); v[2] = __low2float(b); v[3] = __high2float(b);
      return;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = j < cnt ? __bfloat162float(h[j]) : 0.0f;
  } else {
    const __half* h = static_cast<const __half*>(p) + i0;
    if (vec && cnt == 4) {
      const uint2 t = *reinterpret_cast<const uint2*>(h);
      const __half2 a = *reinterpret_cast<const __half2*>(&t.x);
      const __half2 b = *reinterpret_cast<const __half2*>(&t.y);
      v[0] = __low2float(a); v[1] = __high2float(a); v[2] = __low2float(b); v[3] = __high2float(b);
      return;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = j < cnt ? __half2float(h[j]) : 0.0f;
  }
}

// Store with one round-to-nearest-even to the storage dtype.
__device__ __forceinline__ void store4(void* p, int dt, int vec, int64_t i0, int cnt, const float v[4]) {
  if (dt == F32) {
    float* f = static_cast<float*>(p) + i0;
    if (vec && cnt == 4) {
      *reinterpret_cast<float4*>(f) = make_float4(v[0], v[1], v[2], v[3]);
      return;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (j < cnt) f[j] = v[j];
  } else if (dt == BF16) {
    __nv_bfloat16* h = static_cast<__nv_bfloat16*>(p) + i0;
    if (vec && cnt == 4) {
      __nv_bfloat162 a = __halves2bfloat162(__float2bfloat16_rn(v[0]), __float2bfloat16_rn(v[1]));
      __nv_bfloat162 b = __halves2bfloat162(__float2bfloat16_rn(v[2]), __float2bfloat16_rn(v[3]));
      uint2 t;
      memcpy(&t.x, &a, 4);
      memcpy(&t.y, &b, 4);
      *reinterpret_cast<uint2*>(h) = t;
      return;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (j < cnt) h[j] = __float2bfloat16_rn(v[j]);
  } else {
    __half* h = static_cast<__half*>(p) + i0;
    if (vec && cnt == 4) {
      __half2 a = __halves2half2(__float2half_rn(v[0]), __float2half_rn(v[1]));
      __half2 b = __halves2half2(__float2half_rn(v[2]), __float2half_rn(v[3]));
      uint2 t;
      memcpy(&t.x, &a, 4);
      memcpy(&t.y, &b, 4);
      *reinterpret_cast<uint2*>(h) = t;
      return;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (j < cnt) h[j] = __float2half_rn(v[j]);
  }
}

// z(seed) for the quad starting at element i0 (i0 % 4 == 0) of tensor tid.
__device__ __forceinline__ void quad_z(float z[4], int dist, uint64_t i0, uint32_t tid, uint64_t seed) {
  const uint32_t k0 = zf::seed_k0(seed), k1 = zf::seed_k1(seed);
  if (dist == zf::DIST_RADEMACHER) {
    const zf::Words4 w = zf::stream_block(i0 >> 7, tid, zf::TAG_PERTURBATION, k0, k1);
    const int j = (int)(i0 & 127u);
    const uint32_t x = zf::word(w, j >> 5);
    const int t = j & 31;
#pragma unroll
    for (int l = 0; l < 4; ++l) z[l] = zf::rademacher_from_word(x, t + l);
  } else {
    const zf::Words4 w = zf::stream_block(i0 >> 2, tid, zf::TAG_PERTURBATION, k0, k1);
    zf::box_muller(w.x0, w.x1, z[0], z[1]);
    zf::box_muller(w.x2, w.x3, z[2], z[3]);
  }
}

__device__ __forceinline__ void quad_mask(float m[4], uint64_t i0, uint32_t tid, const Common& c) {
  if (c.T == 0u) {
    m[0] = m[1] = m[2] = m[3] = 1.0f;
    return;
  }
  const zf::Words4 w = zf::stream_block(i0 >> 2, tid, zf::TAG_MASK, c.mk0, c.mk1);
  m[0] = zf::mask_from_word(w.x0, c.T);
  m[1] = zf::mask_from_word(w.x1, c.T);
  m[2] = zf::mask_from_word(w.x2, c.T);
  m[3] = zf::mask_from_word(w.x3, c.T);
}

// Restore (in x) and estimate g (docs/kernel-ops.md, steps 1-2):
//   x = x + (z_r * m) * restore_scale ;  g = (sum_j z_j * c_j) * m   (m only when T > 0).
__device__ __forceinline__ void quad_estimate(float x[4], float g[4], const float m[4], uint64_t i0,
                                              uint32_t tid, const Common& c) {
  float z[4];
  if (c.restore_scale != 0.0f) {
    quad_z(z, c.dist, i0, tid, c.restore_seed);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const float zm = c.T ? z[l] * m[l] : z[l];
      x[l] = x[l] + zm * c.restore_scale;
    }
  }
#pragma unroll
  for (int l = 0; l < 4; ++l) g[l] = 0.0f;
  for (int j = 0; j < c.q; ++j) {
    quad_z(z, c.dist, i0, tid, c.seeds[j]);
    const float cj = c.coeffs[j];
#pragma unroll
    for (int l = 0; l < 4; ++l) g[l] = g[l] + z[l] * cj;
  }
  if (c.T) {
#pragma unroll
    for (int l = 0; l < 4; ++l) g[l] = g[l] * m[l];
  }
}

struct HistArgs {
  bool on, init, sign;
  float alpha, one_minus_alpha;
};

// History (buffer slot `slot` of the entry) and sign.
__device__ __forceinline__ void quad_history_sign(float g[4], const Entry& e, int slot, int64_t i0, int cnt,
                                                  const HistArgs& h) {
  if (h.on) {
    float hv[4];
    if (h.init) {
#pragma unroll
      for (int l = 0; l < 4; ++l) hv[l] = g[l];
    } else {
      load4(e.ptr[slot], e.dt[slot], e.vec[slot], i0, cnt, hv);
#pragma unroll
      for (int l = 0; l < 4; ++l) hv[l] = hv[l] * h.alpha + g[l] * h.one_minus_alpha;
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      hv[l] = round_to(hv[l], e.dt[slot]);
      g[l] = hv[l];
    }
    store4(e.ptr[slot], e.dt[slot], e.vec[slot], i0, cnt, hv);
  }
  if (h.sign) {
#pragma unroll
    for (int l = 0; l < 4; ++l) g[l] = zf::sign_f32(g[l]);
  }
}

// ----------------------------------------------------------------------------------------
// Kernels
// ----------------------------------------------------------------------------------------
#define ZF_QUAD_LOOP_BEGIN                                                              \
  for (int64_t gq = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; gq < c.total_quads; \
       gq += (int64_t)gridDim.x * blockDim.x) {                                         \
    const int t = find_tensor(c.entries, c.ntensors, gq);                               \
    const Entry& e = c.entries[t];                                                      \
    const int64_t i0 = (gq - e.quad_start) * 4;                                         \
    const int cnt = (int)min((int64_t)4, e.numel - i0);                                 \
    const uint32_t tid = e.tid;
#define ZF_QUAD_LOOP_END }

__global__ void perturb_kernel(Common c, uint64_t seed, float scale) {
  ZF_QUAD_LOOP_BEGIN
  float x[4], z[4], m[4];
  load4(e.ptr[SLOT_PARAM], e.dt[SLOT_PARAM], e.vec[SLOT_PARAM], i0, cnt, x);
  quad_z(z, c.dist, (uint64_t)i0, tid, seed);
  quad_mask(m, (uint64_t)i0, tid, c);
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    const float zm = c.T ? z[l] * m[l] : z[l];
    x[l] = x[l] + zm * scale;
  }
  store4(e.ptr[SLOT_PARAM], e.dt[SLOT_PARAM], e.vec[SLOT_PARAM], i0, cnt, x);
  ZF_QUAD_LOOP_END
}

// The update's parameter store: round-to-nearest (store4), or §9 stochastic rounding of a
// bf16/fp16 parameter with the quad's four words of the rounding stream (i0 % 4 == 0).
__device__ __forceinline__ void store_param(const Entry& e, int64_t i0, int cnt, const float x[4], uint32_t tid,
                                            const Common& c) {
  const int dt = e.dt[SLOT_PARAM];
  if (!c.stochastic_rounding || dt == F32) {
    store4(e.ptr[SLOT_PARAM], dt, e.vec[SLOT_PARAM], i0, cnt, x);
    return;
  }
  const zf::Words4 w = zf::stream_block((uint64_t)i0 >> 2, tid, zf::TAG_ROUNDING, c.rk0, c.rk1);
  uint16_t* p = static_cast<uint16_t*>(e.ptr[SLOT_PARAM]) + i0;
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    if (l < cnt) p[l] = dt == BF16 ? zf::sr_bf16_bits(x[l], zf::word(w, l)) : zf::sr_fp16_bits(x[l], zf::word(w, l));
  }
}

struct SgdArgs {
  SgdScalars s;
  HistArgs h;
  bool mom, nesterov, momentum_init;
};

__global__ void sgd_kernel(Common c, SgdArgs a) {
  ZF_QUAD_LOOP_BEGIN
  float x[4], g[4], m[4];
  load4(e.ptr[SLOT_PARAM], e.dt[SLOT_PARAM], e.vec[SLOT_PARAM], i0, cnt, x);
  quad_mask(m, (uint64_t)i0, tid, c);
  quad_estimate(x, g, m, (uint64_t)i0, tid, c);
  quad_history_sign(g, e, SLOT_SGD_HISTORY, i0, cnt, a.h);
  if (a.s.wd != 0.0f) {
#pragma unroll
    for (int l = 0; l < 4; ++l) g[l] = g[l] + x[l] * a.s.wd;
  }
  if (a.mom) {
    float b[4];
    if (a.momentum_init) {
#pragma unroll
      for (int l = 0; l < 4; ++l) b[l] = g[l];
    } else {
      load4(e.ptr[SLOT_SGD_MOMENTUM], e.dt[SLOT_SGD_MOMENTUM], e.vec[SLOT_SGD_MOMENTUM], i0, cnt, b);
#pragma unroll
      for (int l = 0; l < 4; ++l) b[l] = b[l] * a.s.mu + g[l] * a.s.one_minus_damp;
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) b[l] = round_to(b[l], e.dt[SLOT_SGD_MOMENTUM]);
    store4(e.ptr[SLOT_SGD_MOMENTUM], e.dt[SLOT_SGD_MOMENTUM], e.vec[SLOT_SGD_MOMENTUM], i0, cnt, b);
#pragma unroll
    for (int l = 0; l < 4; ++l) g[l] = a.nesterov ? g[l] + b[l] * a.s.mu : b[l];
  }
#pragma unroll
  for (int l = 0; l < 4; ++l) x[l] = x[l] - g[l] * a.s.lr;
  store_param(e, i0, cnt, x, tid, c);
  ZF_QUAD_LOOP_END
}

struct AdamArgs {
  AdamScalars s;
  HistArgs h;
  bool decoupled;
};

__global__ void adam_kernel(Common c, AdamArgs a) {
  ZF_QUAD_LOOP_BEGIN
  float x[4], g[4], m[4];
  load4(e.ptr[SLOT_PARAM], e.dt[SLOT_PARAM], e.vec[SLOT_PARAM], i0, cnt, x);
  quad_mask(m, (uint64_t)i0, tid, c);
  quad_estimate(x, g, m, (uint64_t)i0, tid, c);
  quad_history_sign(g, e, SLOT_ADAM_HISTORY, i0, cnt, a.h);
  if (a.decoupled) {
#pragma unroll
    for (int l = 0; l < 4; ++l) x[l] = x[l] * a.s.decay_factor;
  } else if (a.s.wd != 0.0f) {
#pragma unroll
    for (int l = 0; l < 4; ++l) g[l] = g[l] + x[l] * a.s.wd;
  }
  constexpr int M = SLOT_ADAM_EXP_AVG, V = SLOT_ADAM_EXP_AVG_SQ;
  float mv[4], vv[4];
  load4(e.ptr[M], e.dt[M], e.vec[M], i0, cnt, mv);
  load4(e.ptr[V], e.dt[V], e.vec[V], i0, cnt, vv);
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    mv[l] = round_to(mv[l] + (g[l] - mv[l]) * a.s.one_minus_b1, e.dt[M]);
    vv[l] = round_to(vv[l] * a.s.b2 + (g[l] * g[l]) * a.s.one_minus_b2, e.dt[V]);
  }
  store4(e.ptr[M], e.dt[M], e.vec[M], i0, cnt, mv);
  store4(e.ptr[V], e.dt[V], e.vec[V], i0, cnt, vv);
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    const float denom = zf::div_rn(zf::sqrt_rn(vv[l]), a.s.bc2_sqrt) + a.s.eps;
    x[l] = x[l] - zf::div_rn(mv[l], denom) * a.s.step_size;
  }
  store_param(e, i0, cnt, x, tid, c);
  ZF_QUAD_LOOP_END
}

__global__ void philox_kernel(const int64_t* __restrict__ cnt, int64_t* __restrict__ out, int64_t n,
                              uint32_t k0, uint32_t k1) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t* r = cnt + 4 * i;
    const zf::Words4 w = zf::philox4x32_10((uint32_t)r[0], (uint32_t)r[1], (uint32_t)r[2], (uint32_t)r[3], k0, k1);
    out[4 * i + 0] = w.x0;
    out[4 * i + 1] = w.x1;
    out[4 * i + 2] = w.x2;
    out[4 * i + 3] = w.x3;
  }
}

// ----------------------------------------------------------------------------------------
// Host side: launch table
// ----------------------------------------------------------------------------------------
int32_t dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return F32;
    case at::kBFloat16: return BF16;
    default: return F16;
  }
}

int32_t vec_ok(const Tensor& t) {
  const size_t align = t.scalar_type() == at::kFloat ? 16 : 8;
  return (reinterpret_cast<uintptr_t>(t.data_ptr()) % align) == 0 ? 1 : 0;
}

void check_cuda_device(TensorList params) {
  TORCH_CHECK_VALUE(params[0].is_cuda(), "zfkernels: the CUDA kernels got params on ", params[0].device(),
                    "; all tensors of one call must be on one CUDA device");
}

// Packs entries + seeds + coeffs into one device buffer; fills c.entries/seeds/coeffs.
// `slots[k]` lists the tensors of entry k by slot (SLOT_*; nullptr: the buffer is off).  Returns the device buffer, which
// must stay alive until the launch is enqueued (the caching allocator handles reuse).
Tensor make_table(const std::vector<std::array<const Tensor*, 4>>& slots, at::IntArrayRef tensor_ids,
                  at::IntArrayRef seeds, at::ArrayRef<double> coeffs, Common& c) {
  const size_t n = slots.size();
  const size_t q = seeds.size();
  std::vector<Entry> entries(n);
  int64_t quads = 0;
  for (size_t k = 0; k < n; ++k) {
    Entry& e = entries[k];
    std::memset(&e, 0, sizeof(Entry));
    for (int s = 0; s < 4; ++s) {
      const Tensor* t = slots[k][s];
      if (t) {
        e.ptr[s] = t->data_ptr();
        e.dt[s] = dtype_code(*t);
        e.vec[s] = vec_ok(*t);
      }
    }
    e.numel = slots[k][SLOT_PARAM]->numel();
    e.quad_start = quads;
    e.tid = (uint32_t)tensor_ids[k];
    quads += (e.numel + 3) / 4;
  }
  const size_t off_seeds = n * sizeof(Entry);
  const size_t off_coeffs = off_seeds + q * sizeof(uint64_t);
  const size_t bytes = off_coeffs + q * sizeof(float) + 16;
  Tensor host = at::empty({(int64_t)bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = host.data_ptr<uint8_t>();
  std::memcpy(h, entries.data(), n * sizeof(Entry));
  for (size_t j = 0; j < q; ++j) {
    const uint64_t s = (uint64_t)seeds[j];
    const float cf = f32(coeffs[j]);
    std::memcpy(h + off_seeds + j * sizeof(uint64_t), &s, sizeof(uint64_t));
    std::memcpy(h + off_coeffs + j * sizeof(float), &cf, sizeof(float));
  }
  Tensor dev = host.to(slots[0][SLOT_PARAM]->device(), /*non_blocking=*/true);
  uint8_t* d = dev.data_ptr<uint8_t>();
  c.entries = reinterpret_cast<const Entry*>(d);
  c.seeds = reinterpret_cast<const uint64_t*>(d + off_seeds);
  c.coeffs = reinterpret_cast<const float*>(d + off_coeffs);
  c.ntensors = (int32_t)n;
  c.q = (int32_t)q;
  c.total_quads = quads;
  return dev;
}

void fill_stream(Common& c, int64_t dist, int64_t mask_seed, int64_t mask_threshold) {
  c.dist = (int32_t)dist;
  c.T = (uint32_t)mask_threshold;
  c.mk0 = zf::seed_k0((uint64_t)mask_seed);
  c.mk1 = zf::seed_k1((uint64_t)mask_seed);
  c.restore_seed = 0;
  c.restore_scale = 0.0f;
  c.stochastic_rounding = false;
  c.rk0 = c.rk1 = 0u;
}

void fill_rounding(Common& c, bool stochastic_rounding, int64_t round_seed) {
  c.stochastic_rounding = stochastic_rounding;
  c.rk0 = zf::seed_k0((uint64_t)round_seed);
  c.rk1 = zf::seed_k1((uint64_t)round_seed);
}

int grid_for(int64_t work, int threads) {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t want = (work + threads - 1) / threads;
  return (int)std::max<int64_t>(1, std::min<int64_t>(want, (int64_t)sms * 16));
}

constexpr int kThreads = 256;

Tensor philox4x32_10_cuda(const Tensor& counters, int64_t key0, int64_t key1) {
  check_counters(counters);
  check_key(key0, "key0");
  check_key(key1, "key1");
  TORCH_CHECK_VALUE(counters.is_cuda(), "zfkernels: counters must be a CUDA tensor here");
  const c10::cuda::CUDAGuard guard(counters.device());
  Tensor c = counters.contiguous();
  Tensor out = at::empty_like(c);
  const int64_t n = c.size(0);
  if (n == 0) return out;
  TORCH_CHECK_VALUE(c.min().item<int64_t>() >= 0 && c.max().item<int64_t>() < (int64_t(1) << 32),
                    "zfkernels: counters values must lie in [0, 2**32)");
  philox_kernel<<<grid_for(n, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      c.data_ptr<int64_t>(), out.data_ptr<int64_t>(), n, (uint32_t)key0, (uint32_t)key1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void perturb_cuda(TensorList params, at::IntArrayRef tensor_ids, int64_t seed, double scale, int64_t dist,
                  int64_t mask_seed, int64_t mask_threshold) {
  check_params(params, tensor_ids);
  check_seed(seed, "seed");
  check_stream_args(dist, mask_seed, mask_threshold);
  if (params.empty()) return;
  check_cuda_device(params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<std::array<const Tensor*, 4>> slots(params.size());
  for (size_t k = 0; k < params.size(); ++k) slots[k] = {&params[k], nullptr, nullptr, nullptr};  // SLOT_PARAM
  Common c;
  fill_stream(c, dist, mask_seed, mask_threshold);
  Tensor table = make_table(slots, tensor_ids, {}, {}, c);
  if (c.total_quads == 0) return;
  perturb_kernel<<<grid_for(c.total_quads, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      c, (uint64_t)seed, f32(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void sgd_cuda(TensorList params, TensorList momentum_buffers, TensorList history_buffers,
              at::IntArrayRef tensor_ids, at::IntArrayRef seeds, at::ArrayRef<double> coeffs, int64_t dist,
              int64_t mask_seed, int64_t mask_threshold, int64_t restore_seed, double restore_scale, double lr,
              double weight_decay, double momentum, double dampening, bool nesterov, bool momentum_init,
              bool sign, double history_alpha, bool history_init, bool stochastic_rounding, int64_t round_seed) {
  check_sgd_args(params, momentum_buffers, history_buffers, tensor_ids, seeds, coeffs, dist, mask_seed, mask_threshold,
                 restore_seed, round_seed);
  if (params.empty()) return;
  check_cuda_device(params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const bool has_m = !momentum_buffers.empty(), has_h = !history_buffers.empty();
  std::vector<std::array<const Tensor*, 4>> slots(params.size());
  for (size_t k = 0; k < params.size(); ++k)  // SLOT_PARAM, SLOT_SGD_MOMENTUM, SLOT_SGD_HISTORY
    slots[k] = {&params[k], has_m ? &momentum_buffers[k] : nullptr, has_h ? &history_buffers[k] : nullptr,
                nullptr};
  Common c;
  fill_stream(c, dist, mask_seed, mask_threshold);
  fill_rounding(c, stochastic_rounding, round_seed);
  SgdArgs a;
  a.s = sgd_scalars(restore_scale, lr, weight_decay, momentum, dampening, history_alpha);
  c.restore_seed = (uint64_t)restore_seed;
  c.restore_scale = a.s.restore_scale;
  a.h = HistArgs{has_h, history_init, sign, a.s.alpha, a.s.one_minus_alpha};
  a.mom = has_m;
  a.nesterov = nesterov;
  a.momentum_init = momentum_init;
  Tensor table = make_table(slots, tensor_ids, seeds, coeffs, c);
  if (c.total_quads == 0) return;
  sgd_kernel<<<grid_for(c.total_quads, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(c, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adam_cuda(TensorList params, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList history_buffers,
               at::IntArrayRef tensor_ids, at::IntArrayRef seeds, at::ArrayRef<double> coeffs, int64_t dist,
               int64_t mask_seed, int64_t mask_threshold, int64_t restore_seed, double restore_scale, double lr,
               double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
               int64_t step, bool sign, double history_alpha, bool history_init, bool stochastic_rounding,
               int64_t round_seed) {
  check_adam_args(params, exp_avgs, exp_avg_sqs, history_buffers, tensor_ids, seeds, coeffs, dist, mask_seed,
                  mask_threshold, restore_seed, step, round_seed);
  AdamArgs a;
  a.s = adam_scalars(restore_scale, lr, beta1, beta2, eps, weight_decay, step, history_alpha);
  if (params.empty()) return;
  check_cuda_device(params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const bool has_h = !history_buffers.empty();
  std::vector<std::array<const Tensor*, 4>> slots(params.size());
  for (size_t k = 0; k < params.size(); ++k)  // SLOT_PARAM, SLOT_ADAM_EXP_AVG, SLOT_ADAM_EXP_AVG_SQ, SLOT_ADAM_HISTORY
    slots[k] = {&params[k], &exp_avgs[k], &exp_avg_sqs[k], has_h ? &history_buffers[k] : nullptr};
  Common c;
  fill_stream(c, dist, mask_seed, mask_threshold);
  fill_rounding(c, stochastic_rounding, round_seed);
  c.restore_seed = (uint64_t)restore_seed;
  c.restore_scale = a.s.restore_scale;
  a.h = HistArgs{has_h, history_init, sign, a.s.alpha, a.s.one_minus_alpha};
  a.decoupled = decoupled_weight_decay;
  Tensor table = make_table(slots, tensor_ids, seeds, coeffs, c);
  if (c.total_quads == 0) return;
  adam_kernel<<<grid_for(c.total_quads, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(c, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace zf_cuda

TORCH_LIBRARY_IMPL(zfkernels, CUDA, m) {
  m.impl("philox4x32_10", &zf_cuda::philox4x32_10_cuda);
  m.impl("perturb_", &zf_cuda::perturb_cuda);
  m.impl("zo_sgd_update_", &zf_cuda::sgd_cuda);
  m.impl("zo_adam_update_", &zf_cuda::adam_cuda);
}

// Importing zfkernels._C_cuda registers the CUDA kernels (after zfkernels._C defined the ops).
extern "C" {
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", "zfkernels compiled CUDA ops", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}
