// The multi-tensor launcher of the CUDA ops (apex's multi_tensor_apply + functor shape) and
// the per-lane building blocks the functors of csrc/zo_functors.cuh share: storage loads/stores,
// z, the mask and stochastic rounding of a warp task.  Semantics: docs/kernel-ops.md; the
// stream: docs/perturbation-stream.md, through csrc/philox.h.
//
// Work decomposition.  A launch covers a list of tensors of one parameter dtype.  Each tensor
// is cut into *warp tasks* of kTaskElems = kRows * 128 consecutive elements; one warp owns a
// task and walks the tasks of the whole list with a grid-stride loop (grid sized to the SM
// count and the kernel's occupancy).  Inside a task, lane l owns quad l of each of the kRows
// rows of 128 elements (row k: elements base + 128 k + 4 l .. + 3), so every load and store
// instruction of a warp covers 128 consecutive elements (16-byte vectors for fp32, 8 for
// bf16/fp16), and row k is exactly Rademacher block base/128 + k of the stream (§4).
//
// Why this shape (the H200 profile of the previous kernels, one quad per thread with a
// per-quad binary search for its tensor: the Rademacher update issued ~2 instructions per
// element, mostly Philox rounds recomputed by every lane for its 4 elements, and reached 54 %
// of copy bandwidth):
//   - Rademacher: one Philox call per 128 elements, computed once per warp and handed out by
//     one shuffle per row (each lane keeps the one word its row/lane pair needs);
//   - the tensor lookup once per task (512 elements), not per quad, from the previous task's
//     tensor onwards;
//   - the storage type of the parameter is a template parameter (no per-element dtype
//     branches); the buffers are either that type or fp32 (checked by check_buffers), one
//     warp-uniform branch per row;
//   - several independent rows per lane keep kRows 16-byte loads in flight per lane.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "philox.h"
#include "update_math.h"

namespace zf_cuda {

enum DType : int32_t { F32 = 0, BF16 = 1, F16 = 2 };

constexpr int kThreads = 256;              // 8 warps per block
constexpr int kRows = 4;                   // rows (quads) per lane per task
constexpr int kTaskElems = kRows * 128;    // one warp task: kRows Rademacher blocks
constexpr int kInlineQ = 16;               // seeds/coeffs passed in the kernel parameters up to this q
constexpr unsigned kFullMask = 0xFFFFFFFFu;

// Per-tensor entry of the launch table.  ptr[0] = param, ptr[1..3] = the op's buffers.
struct Entry {
  void* ptr[4];
  int32_t dt[4];   // storage code of each slot
  int32_t vec[4];  // 1 when ptr is aligned for a 4-element vector access
  int64_t numel;
  int64_t task_start;  // first warp task of this tensor
  uint32_t tid;
  uint32_t all_vec;  // 1 when every tensor of the entry is aligned for vector accesses
};

// Slots of an entry (docs/kernel-ops.md, "Schemas"): the param, then the op's buffers in schema
// order, as in the Triton pointer table.
constexpr int SLOT_PARAM = 0;
constexpr int SLOT_SGD_MOMENTUM = 1, SLOT_SGD_HISTORY = 2;
constexpr int SLOT_ADAM_EXP_AVG = 1, SLOT_ADAM_EXP_AVG_SQ = 2, SLOT_ADAM_HISTORY = 3;

// What every functor needs besides its own scalars.  Passed by value as a __grid_constant__
// kernel parameter (read from the constant bank, never copied to local memory).
struct Common {
  const Entry* entries;       // the launch table (device)
  const uint64_t* seeds_dev;  // q > kInlineQ: seeds and coeffs in device memory
  const float* coeffs_dev;
  uint64_t seeds[kInlineQ];
  float coeffs[kInlineQ];
  int32_t ntensors;
  int32_t q;
  int32_t reuse;  // the query whose z is the restore's z (-1: none); see restored_estimate
  uint32_t T;     // mask threshold (0: no mask)
  uint32_t mk0, mk1;
  int64_t total_tasks;
  uint64_t restore_seed;
  float restore_scale;
  bool stochastic_rounding;  // §9 for the parameter stores of the updates
  uint32_t rk0, rk1;         // the rounding seed's key
};

__device__ __forceinline__ uint64_t seed_at(const Common& c, int j) {
  return c.q <= kInlineQ ? c.seeds[j] : c.seeds_dev[j];
}
__device__ __forceinline__ float coeff_at(const Common& c, int j) {
  return c.q <= kInlineQ ? c.coeffs[j] : c.coeffs_dev[j];
}

// One warp task, as seen by one lane.
// The entry is copied to registers once per task: stores through the param pointers could
// alias the table as far as the compiler knows, which would make it reload the fields.
// FULL: the task lies wholly inside its tensor and every tensor of the entry is aligned for
// vector accesses (Entry::all_vec) - the common case, compiled without any bounds or alignment
// test (the H200 profile of the general path: ~650 instructions issued per task).
template <bool FULL>
struct Task {
  Entry e;
  int64_t base;    // first element of the task in its tensor (a multiple of kTaskElems)
  int lane;
  __device__ __forceinline__ uint32_t tid() const { return e.tid; }
  __device__ __forceinline__ int64_t i0(int k) const { return base + 128 * k + 4 * lane; }
  __device__ __forceinline__ int cnt(int k) const {
    if constexpr (FULL) {
      return 4;
    } else {
      const int64_t left = e.numel - i0(k);
      return left >= 4 ? 4 : (left > 0 ? (int)left : 0);
    }
  }
  __device__ __forceinline__ bool vec(int slot) const {
    if constexpr (FULL) return true; else return e.vec[slot] != 0;
  }
};

// ----------------------------------------------------------------------------------------
// Storage: one template over the element type (fp32, bf16, fp16), round to nearest even.
// ----------------------------------------------------------------------------------------
template <typename T> struct Storage;
template <> struct Storage<float> {
  using Vec = float4;  // 16 bytes
  static constexpr int code = F32;
  __device__ static float to_f32(float v) { return v; }
  __device__ static float from_f32(float v) { return v; }
};
template <> struct Storage<__nv_bfloat16> {
  using Vec = uint2;   // 8 bytes
  static constexpr int code = BF16;
  __device__ static float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Storage<__half> {
  using Vec = uint2;
  static constexpr int code = F16;
  __device__ static float to_f32(__half v) { return __half2float(v); }
  __device__ static __half from_f32(float v) { return __float2half_rn(v); }
};

// Elements [i0, i0 + cnt) (cnt <= 4) of p as fp32; a full, aligned quad in one vector load.
template <typename T>
__device__ __forceinline__ void load4(const void* p, bool vec, int64_t i0, int cnt, float v[4]) {
  const T* q = static_cast<const T*>(p) + i0;
  if (vec && cnt == 4) {
    const typename Storage<T>::Vec raw = *reinterpret_cast<const typename Storage<T>::Vec*>(q);
    T h[4];
    memcpy(h, &raw, sizeof(raw));
#pragma unroll
    for (int l = 0; l < 4; ++l) v[l] = Storage<T>::to_f32(h[l]);
    return;
  }
#pragma unroll
  for (int l = 0; l < 4; ++l) v[l] = l < cnt ? Storage<T>::to_f32(q[l]) : 0.0f;
}

template <typename T>
__device__ __forceinline__ void store4(void* p, bool vec, int64_t i0, int cnt, const float v[4]) {
  T* q = static_cast<T*>(p) + i0;
  if (vec && cnt == 4) {
    T h[4];
#pragma unroll
    for (int l = 0; l < 4; ++l) h[l] = Storage<T>::from_f32(v[l]);
    typename Storage<T>::Vec raw;
    memcpy(&raw, h, sizeof(raw));
    *reinterpret_cast<typename Storage<T>::Vec*>(q) = raw;
    return;
  }
#pragma unroll
  for (int l = 0; l < 4; ++l)
    if (l < cnt) q[l] = Storage<T>::from_f32(v[l]);
}

// A buffer of a param of type P is stored as P or as fp32 (check_buffers).
template <typename P, class TaskT>
__device__ __forceinline__ void load_buffer(const TaskT& t, int slot, int k, float v[4]) {
  const Entry& e = t.e;
  if (e.dt[slot] == F32) load4<float>(e.ptr[slot], t.vec(slot), t.i0(k), t.cnt(k), v);
  else load4<P>(e.ptr[slot], t.vec(slot), t.i0(k), t.cnt(k), v);
}
template <typename P, class TaskT>
__device__ __forceinline__ void store_buffer(const TaskT& t, int slot, int k, const float v[4]) {
  const Entry& e = t.e;
  if (e.dt[slot] == F32) store4<float>(e.ptr[slot], t.vec(slot), t.i0(k), t.cnt(k), v);
  else store4<P>(e.ptr[slot], t.vec(slot), t.i0(k), t.cnt(k), v);
}
// The value a buffer holds after its store (later steps of the update read the stored value).
template <typename P, class TaskT>
__device__ __forceinline__ float stored_value(const TaskT& t, int slot, float v) {
  return t.e.dt[slot] == F32 ? v : Storage<P>::to_f32(Storage<P>::from_f32(v));
}

template <typename P, class TaskT>
__device__ __forceinline__ void load_param_rows(const TaskT& t, float x[kRows][4]) {
#pragma unroll
  for (int k = 0; k < kRows; ++k) load4<P>(t.e.ptr[SLOT_PARAM], t.vec(SLOT_PARAM), t.i0(k), t.cnt(k), x[k]);
}

// ----------------------------------------------------------------------------------------
// The stream over a task.
// ----------------------------------------------------------------------------------------
// z(seed) of the lane's quads, one row at a time (only one row's z is live: registers, not
// ILP, limit these kernels; the H200 build of a 4-rows-at-once version used 128-186).
template <int DIST> struct ZRows;

// §4.  Row k is block b0 + k.  Lane l needs word l/8 of it (its 4 elements start at bit
// 4(l%8)).  Lane s computes block b0 + s % kRows and keeps word (s / kRows) % 4, so the word
// lane l needs for row k sits in lane k + kRows * (l / 8): one Philox call per 128 elements,
// one shuffle per row.
template <> struct ZRows<zf::DIST_RADEMACHER> {
  uint32_t mine;
  int src, bit0;
  template <class TaskT>
  __device__ __forceinline__ ZRows(const TaskT& t, uint64_t seed) {
    const uint64_t b0 = (uint64_t)t.base >> 7;
    const zf::Words4 w = zf::stream_block(b0 + (uint64_t)(t.lane % kRows), t.tid(), zf::TAG_PERTURBATION,
                                          zf::seed_k0(seed), zf::seed_k1(seed));
    mine = zf::word(w, (t.lane / kRows) & 3);
    src = kRows * (t.lane >> 3);
    bit0 = 4 * (t.lane & 7);
  }
  // Every lane of the warp must call row(k) (it shuffles).
  template <class TaskT>
  __device__ __forceinline__ void row(const TaskT&, int k, float z[4]) const {
    const uint32_t x = __shfl_sync(kFullMask, mine, k + src);
#pragma unroll
    for (int l = 0; l < 4; ++l) z[l] = zf::rademacher_from_word(x, bit0 + l);
  }
};

// §5.  One Philox call and two Box-Muller pairs per quad.
template <> struct ZRows<zf::DIST_GAUSSIAN> {
  uint32_t k0, k1;
  template <class TaskT>
  __device__ __forceinline__ ZRows(const TaskT&, uint64_t seed) : k0(zf::seed_k0(seed)), k1(zf::seed_k1(seed)) {}
  template <class TaskT>
  __device__ __forceinline__ void row(const TaskT& t, int k, float z[4]) const {
    const zf::Words4 w = zf::stream_block((uint64_t)t.i0(k) >> 2, t.tid(), zf::TAG_PERTURBATION, k0, k1);
    zf::box_muller(w.x0, w.x1, z[0], z[1]);
    zf::box_muller(w.x2, w.x3, z[2], z[3]);
  }
};

// §6 mask of the lane's quads as bits (bit 4k + l: element l of row k kept), kept as one
// register instead of kRows * 4 floats.  Only called when T > 0.
template <class TaskT>
__device__ __forceinline__ uint32_t mask_bits(const TaskT& t, const Common& c) {
  uint32_t bits = 0;
#pragma unroll
  for (int k = 0; k < kRows; ++k) {
    const zf::Words4 w = zf::stream_block((uint64_t)t.i0(k) >> 2, t.tid(), zf::TAG_MASK, c.mk0, c.mk1);
#pragma unroll
    for (int l = 0; l < 4; ++l) bits |= (zf::mask_from_word(zf::word(w, l), c.T) != 0.0f ? 1u : 0u) << (4 * k + l);
  }
  return bits;
}
// The mask value m (1.0f or 0.0f) of element l of row k.
__device__ __forceinline__ float mask_at(uint32_t bits, int k, int l) {
  return ((bits >> (4 * k + l)) & 1u) ? 1.0f : 0.0f;
}

// x = x + (z * m) * scale  (z * m only when masked) on row k: the perturbation and the restore.
__device__ __forceinline__ void add_scaled_z(float x[4], const float z[4], uint32_t mbits, int k, float scale,
                                             bool masked) {
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    const float zm = masked ? z[l] * mask_at(mbits, k, l) : z[l];
    x[l] = x[l] + zm * scale;
  }
}

// Steps 1-2 of the updates (docs/kernel-ops.md): the restore in x and the raw estimate
//   x = x + (z_r * m) * restore_scale ;  g = (sum_j z_j * c_j) * m   (m only when T > 0).
// The pending restore is usually a query's own perturbation (MeZO: restore_seed == seeds[0]),
// so that z is generated once and used for both (c.reuse): the restore and the sum are
// independent chains of fp32 ops, so the order in which they are interleaved changes no bit.
template <int DIST, class TaskT>
__device__ __forceinline__ void restored_estimate(float x[kRows][4], float g[kRows][4], const TaskT& t,
                                                  const Common& c) {
  const bool masked = c.T != 0u;
  const uint32_t mbits = masked ? mask_bits(t, c) : 0u;
  const bool restore = c.restore_scale != 0.0f;
  float z[4];
  if (restore && c.reuse < 0) {
    const ZRows<DIST> zr(t, c.restore_seed);
#pragma unroll
    for (int k = 0; k < kRows; ++k) {
      zr.row(t, k, z);
      add_scaled_z(x[k], z, mbits, k, c.restore_scale, masked);
    }
  }
#pragma unroll
  for (int k = 0; k < kRows; ++k)
#pragma unroll
    for (int l = 0; l < 4; ++l) g[k][l] = 0.0f;
  for (int j = 0; j < c.q; ++j) {
    const ZRows<DIST> zj(t, seed_at(c, j));
    const float cj = coeff_at(c, j);
    const bool also_restore = restore && j == c.reuse;
#pragma unroll
    for (int k = 0; k < kRows; ++k) {
      zj.row(t, k, z);
      if (also_restore) add_scaled_z(x[k], z, mbits, k, c.restore_scale, masked);
#pragma unroll
      for (int l = 0; l < 4; ++l) g[k][l] = g[k][l] + z[l] * cj;
    }
  }
  if (masked) {
#pragma unroll
    for (int k = 0; k < kRows; ++k)
#pragma unroll
      for (int l = 0; l < 4; ++l) g[k][l] = g[k][l] * mask_at(mbits, k, l);
  }
}

// The update's parameter store of row k: round to nearest, or §9 stochastic rounding of a
// bf16/fp16 parameter with the quad's four words of the rounding stream.
template <typename P, class TaskT>
__device__ __forceinline__ void store_param_row(const TaskT& t, int k, const float x[4], const Common& c) {
  const Entry& e = t.e;
  if constexpr (Storage<P>::code != F32) {
    if (c.stochastic_rounding) {
      const int64_t i0 = t.i0(k);
      const int cnt = t.cnt(k);
      const zf::Words4 w = zf::stream_block((uint64_t)i0 >> 2, t.tid(), zf::TAG_ROUNDING, c.rk0, c.rk1);
      uint16_t b[4];
#pragma unroll
      for (int l = 0; l < 4; ++l)
        b[l] = Storage<P>::code == BF16 ? zf::sr_bf16_bits(x[l], zf::word(w, l)) : zf::sr_fp16_bits(x[l], zf::word(w, l));
      uint16_t* q = static_cast<uint16_t*>(e.ptr[SLOT_PARAM]) + i0;
      if (t.vec(SLOT_PARAM) && cnt == 4) {
        uint2 raw;
        memcpy(&raw, b, sizeof(raw));
        *reinterpret_cast<uint2*>(q) = raw;
      } else {
#pragma unroll
        for (int l = 0; l < 4; ++l)
          if (l < cnt) q[l] = b[l];
      }
      return;
    }
  }
  store4<P>(e.ptr[SLOT_PARAM], t.vec(SLOT_PARAM), t.i0(k), t.cnt(k), x);
}

// ----------------------------------------------------------------------------------------
// The launcher kernel: warp tasks over the table, each handed to the functor.
// ----------------------------------------------------------------------------------------
// The entry holding task `task`, searching from `from` (a warp's tasks only increase).
__device__ __forceinline__ int find_tensor_from(const Entry* e, int from, int n, int64_t task) {
  int lo = from, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (e[mid].task_start <= task) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <class Functor, typename P, int DIST>
__global__ void __launch_bounds__(kThreads, Functor::kMinBlocksPerSM) multi_tensor_kernel(const __grid_constant__ Common c,
                                                                const __grid_constant__ typename Functor::Args a) {
  const int lane = threadIdx.x & 31;
  const int64_t first = ((int64_t)blockIdx.x * kThreads + threadIdx.x) >> 5;
  const int64_t stride = ((int64_t)gridDim.x * kThreads) >> 5;
  int t = 0;
  for (int64_t task = first; task < c.total_tasks; task += stride) {
    t = find_tensor_from(c.entries, t, c.ntensors, task);
    const Entry e = c.entries[t];
    const int64_t base = (task - e.task_start) * kTaskElems;
    if (e.all_vec && e.numel - base >= kTaskElems) {
      Functor::template apply<P, DIST>(Task<true>{e, base, lane}, c, a);
    } else {
      Functor::template apply<P, DIST>(Task<false>{e, base, lane}, c, a);
    }
  }
}

}  // namespace zf_cuda
