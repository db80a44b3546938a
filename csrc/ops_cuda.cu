// zfkernels CUDA kernels (TORCH_LIBRARY_IMPL(zfkernels, CUDA)); the schema lives in
// csrc/ops.cpp (extension zfkernels._C, imported first by zfkernels/_compiled.py).
// Semantics: docs/kernel-ops.md; stream: docs/perturbation-stream.md (stream v1), shared
// through csrc/philox.h.  Compiled with --fmad=false, -prec-div=true, -prec-sqrt=true: each
// fp32 step is one correctly rounded IEEE op in the spec's order ("Arithmetic"), so results
// equal the CPU and Triton kernels and the reference bit for bit (Gaussian included: the
// same polynomial log/sincos from philox.h).
//
// Each op is a functor (PerturbFunctor, SgdFunctor, AdamFunctor) run by the one multi-tensor
// launcher of csrc/multi_tensor_apply.cuh: ONE kernel launch per op call and parameter dtype
// for the whole list.  The launch table (per-tensor pointers, dtype codes, numel, id, first
// warp task) depends only on the parameter layout, so it is uploaded once per layout and
// cached on the device (TableCache); the per-call seeds, coefficients and scalars travel in
// the kernel parameters.  A step therefore costs no host-to-device copy and no allocation.

#include <c10/cuda/CUDAStream.h>  // (ATen/cuda/CUDAContext.h would need cusparse/cublas headers)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <mutex>
#include <vector>

#include "module_init.h"         // PyInit: the module and its sources digest
#include "multi_tensor_apply.cuh"  // launcher, storage, z / mask / rounding of a warp task
#include "ops_common.h"            // validation + host scalar preparation, shared with the CPU build
#include "philox.h"
#include "update_math.h"

namespace zf_cuda {

using at::Tensor;
using at::TensorList;
using namespace zf_ops;

// ----------------------------------------------------------------------------------------
// Functors: one warp task of each op (docs/kernel-ops.md, "Update steps", in order).
// ----------------------------------------------------------------------------------------
struct HistArgs {
  bool on, init, sign;
  float alpha, one_minus_alpha;
};

// Steps 3-4: history (buffer slot `slot`, its stored values preloaded in `hv` unless h.init)
// and sign, on row k's estimate.
template <typename P, class TaskT>
__device__ __forceinline__ void history_sign_row(float g[4], float hv[4], const TaskT& t, int slot, int k,
                                                 const HistArgs& h) {
  if (h.on) {
    if (h.init) {
#pragma unroll
      for (int l = 0; l < 4; ++l) hv[l] = g[l];
    } else {
#pragma unroll
      for (int l = 0; l < 4; ++l) hv[l] = hv[l] * h.alpha + g[l] * h.one_minus_alpha;
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      hv[l] = stored_value<P>(t, slot, hv[l]);
      g[l] = hv[l];
    }
    store_buffer<P>(t, slot, k, hv);
  }
  if (h.sign) {
#pragma unroll
    for (int l = 0; l < 4; ++l) g[l] = zf::sign_f32(g[l]);
  }
}

// All rows of a buffer at once, so that their loads are in flight together (one memory
// latency per task instead of one per row).
template <typename P, class TaskT>
__device__ __forceinline__ void load_buffer_rows(const TaskT& t, int slot, float v[kRows][4]) {
#pragma unroll
  for (int k = 0; k < kRows; ++k) load_buffer<P>(t, slot, k, v[k]);
}

// kMinBlocksPerSM bounds each kernel's registers (65536 / (256 * blocks)): resident warps are
// what hides the memory latency here (H200 profile at 2 blocks, 25 % occupancy: warps stalled
// on loads ~50 % of the time).
struct PerturbFunctor {
  static constexpr int kMinBlocksPerSM = 4;   // <= 64 registers
  struct Args {
    uint64_t seed;
    float scale;
  };
  template <typename P, int DIST, class TaskT>
  __device__ __forceinline__ static void apply(const TaskT& t, const Common& c, const Args& a) {
    float x[kRows][4];
    load_param_rows<P>(t, x);
    const bool masked = c.T != 0u;
    const uint32_t mbits = masked ? mask_bits(t, c) : 0u;
    const ZRows<DIST> zs(t, a.seed);
#pragma unroll
    for (int k = 0; k < kRows; ++k) {
      float z[4];
      zs.row(t, k, z);
      add_scaled_z(x[k], z, mbits, k, a.scale, masked);
      store4<P>(t.e.ptr[SLOT_PARAM], t.vec(SLOT_PARAM), t.i0(k), t.cnt(k), x[k]);
    }
  }
};

struct SgdFunctor {
  static constexpr int kMinBlocksPerSM = 3;   // <= 85 registers
  struct Args {
    SgdScalars s;
    HistArgs h;
    bool mom, nesterov, momentum_init;
  };
  template <typename P, int DIST, class TaskT>
  __device__ __forceinline__ static void apply(const TaskT& t, const Common& c, const Args& a) {
    float x[kRows][4], g[kRows][4];
    load_param_rows<P>(t, x);
    restored_estimate<DIST>(x, g, t, c);
    // The buffers are loaded row by row here (not all rows first as in Adam): the registers for
    // them would push the plain update, the common case, below 3 resident blocks per SM.
#pragma unroll
    for (int k = 0; k < kRows; ++k) {
      if (t.cnt(k) == 0) continue;
      float hv[4], b[4];
      if (a.h.on && !a.h.init) load_buffer<P>(t, SLOT_SGD_HISTORY, k, hv);
      history_sign_row<P>(g[k], hv, t, SLOT_SGD_HISTORY, k, a.h);
      if (a.s.wd != 0.0f) {
#pragma unroll
        for (int l = 0; l < 4; ++l) g[k][l] = g[k][l] + x[k][l] * a.s.wd;
      }
      if (a.mom) {
        if (a.momentum_init) {
#pragma unroll
          for (int l = 0; l < 4; ++l) b[l] = g[k][l];
        } else {
          load_buffer<P>(t, SLOT_SGD_MOMENTUM, k, b);
#pragma unroll
          for (int l = 0; l < 4; ++l) b[l] = b[l] * a.s.mu + g[k][l] * a.s.one_minus_damp;
        }
#pragma unroll
        for (int l = 0; l < 4; ++l) b[l] = stored_value<P>(t, SLOT_SGD_MOMENTUM, b[l]);
        store_buffer<P>(t, SLOT_SGD_MOMENTUM, k, b);
#pragma unroll
        for (int l = 0; l < 4; ++l) g[k][l] = a.nesterov ? g[k][l] + b[l] * a.s.mu : b[l];
      }
#pragma unroll
      for (int l = 0; l < 4; ++l) x[k][l] = x[k][l] - g[k][l] * a.s.lr;
      store_param_row<P>(t, k, x[k], c);
    }
  }
};

struct AdamFunctor {
  static constexpr int kMinBlocksPerSM = 2;   // <= 128 registers
  struct Args {
    AdamScalars s;
    HistArgs h;
    bool decoupled;
  };
  template <typename P, int DIST, class TaskT>
  __device__ __forceinline__ static void apply(const TaskT& t, const Common& c, const Args& a) {
    float x[kRows][4], g[kRows][4];
    load_param_rows<P>(t, x);
    restored_estimate<DIST>(x, g, t, c);
    constexpr int M = SLOT_ADAM_EXP_AVG, V = SLOT_ADAM_EXP_AVG_SQ;
    float mv[kRows][4], vv[kRows][4], hv[kRows][4];
    load_buffer_rows<P>(t, M, mv);
    load_buffer_rows<P>(t, V, vv);
    if (a.h.on && !a.h.init) load_buffer_rows<P>(t, SLOT_ADAM_HISTORY, hv);
#pragma unroll
    for (int k = 0; k < kRows; ++k) {
      if (t.cnt(k) == 0) continue;
      history_sign_row<P>(g[k], hv[k], t, SLOT_ADAM_HISTORY, k, a.h);
      if (a.decoupled) {
#pragma unroll
        for (int l = 0; l < 4; ++l) x[k][l] = x[k][l] * a.s.decay_factor;
      } else if (a.s.wd != 0.0f) {
#pragma unroll
        for (int l = 0; l < 4; ++l) g[k][l] = g[k][l] + x[k][l] * a.s.wd;
      }
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        mv[k][l] = stored_value<P>(t, M, mv[k][l] + (g[k][l] - mv[k][l]) * a.s.one_minus_b1);
        vv[k][l] = stored_value<P>(t, V, vv[k][l] * a.s.b2 + (g[k][l] * g[k][l]) * a.s.one_minus_b2);
      }
      store_buffer<P>(t, M, k, mv[k]);
      store_buffer<P>(t, V, k, vv[k]);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const float denom = zf::div_rn(zf::sqrt_rn(vv[k][l]), a.s.bc2_sqrt) + a.s.eps;
        x[k][l] = x[k][l] - zf::div_rn(mv[k][l], denom) * a.s.step_size;
      }
      store_param_row<P>(t, k, x[k], c);
    }
  }
};

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
// Host side: launch tables, cached per parameter layout
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

// Device copies of launch tables, keyed by their exact bytes (pointers, dtypes, sizes, ids):
// a table that compares equal describes the same memory, so reusing it is always correct,
// also after a tensor was freed and another one allocated at the same address.  An optimizer
// calls the ops with the same few layouts every step (one per parameter group and op), so
// after the first step no call uploads anything.  Bounded; the least recently used table is
// dropped (cudaFree waits for the kernels that may still read it).
class TableCache {
 public:
  const Entry* get(const std::vector<Entry>& entries, int device) {
    const size_t bytes = entries.size() * sizeof(Entry);
    std::lock_guard<std::mutex> lock(mu_);
    ++clock_;
    for (Item& it : items_) {
      if (it.device == device && it.bytes.size() == bytes && std::memcmp(it.bytes.data(), entries.data(), bytes) == 0) {
        it.used = clock_;
        return it.dptr;
      }
    }
    if (items_.size() >= kCapacity) {
      auto lru = std::min_element(items_.begin(), items_.end(),
                                  [](const Item& a, const Item& b) { return a.used < b.used; });
      C10_CUDA_CHECK(cudaFree(lru->dptr));  // synchronizes: no launch still reads it
      items_.erase(lru);
    }
    Item it;
    it.device = device;
    it.bytes.resize(bytes);
    std::memcpy(it.bytes.data(), entries.data(), bytes);
    C10_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&it.dptr), bytes));
    // Complete before any stream's kernel can read it (a plain cudaMemcpy from pageable memory
    // may return before the DMA lands): copy on this stream and wait, once per layout.
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    C10_CUDA_CHECK(cudaMemcpyAsync(it.dptr, entries.data(), bytes, cudaMemcpyHostToDevice, stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
    it.used = clock_;
    items_.push_back(std::move(it));
    return items_.back().dptr;
  }

 private:
  static constexpr size_t kCapacity = 64;
  struct Item {
    int device;
    std::vector<uint8_t> bytes;
    Entry* dptr;
    uint64_t used;
  };
  std::mutex mu_;
  std::vector<Item> items_;
  uint64_t clock_ = 0;
};

TableCache& table_cache() {
  static TableCache* cache = new TableCache();  // never destroyed: no CUDA calls at process exit
  return *cache;
}

using Slots = std::array<const Tensor*, 4>;  // the tensors of one entry by slot (nullptr: off)

// The q seeds and coefficients: in the kernel parameters up to kInlineQ, else in a device
// buffer uploaded with this call (returned: it must live until the launches are enqueued).
Tensor fill_queries(Common& c, at::IntArrayRef seeds, at::ArrayRef<double> coeffs, const at::Device& device) {
  const size_t q = seeds.size();
  c.q = (int32_t)q;
  c.seeds_dev = nullptr;
  c.coeffs_dev = nullptr;
  std::memset(c.seeds, 0, sizeof(c.seeds));
  std::memset(c.coeffs, 0, sizeof(c.coeffs));
  if (q <= (size_t)kInlineQ) {
    for (size_t j = 0; j < q; ++j) {
      c.seeds[j] = (uint64_t)seeds[j];
      c.coeffs[j] = f32(coeffs[j]);
    }
    return Tensor();
  }
  const size_t off_coeffs = q * sizeof(uint64_t);
  Tensor host = at::empty({(int64_t)(off_coeffs + q * sizeof(float))},
                          at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = host.data_ptr<uint8_t>();
  for (size_t j = 0; j < q; ++j) {
    const uint64_t s = (uint64_t)seeds[j];
    const float cf = f32(coeffs[j]);
    std::memcpy(h + j * sizeof(uint64_t), &s, sizeof(uint64_t));
    std::memcpy(h + off_coeffs + j * sizeof(float), &cf, sizeof(float));
  }
  Tensor dev = host.to(device, /*non_blocking=*/true);
  c.seeds_dev = reinterpret_cast<const uint64_t*>(dev.data_ptr<uint8_t>());
  c.coeffs_dev = reinterpret_cast<const float*>(dev.data_ptr<uint8_t>() + off_coeffs);
  return dev;
}

// The restore's z is query `reuse`'s z (the last query with the restore's seed), as in the
// CPU kernel; -1 when there is no restore or no such query.
int32_t reuse_index(at::IntArrayRef seeds, int64_t restore_seed, float restore_scale) {
  if (restore_scale == 0.0f) return -1;
  for (int j = (int)seeds.size() - 1; j >= 0; --j)
    if (seeds[j] == restore_seed) return j;
  return -1;
}

Common make_common(int64_t mask_seed, int64_t mask_threshold) {
  Common c;
  std::memset(&c, 0, sizeof(Common));
  c.T = (uint32_t)mask_threshold;
  c.mk0 = zf::seed_k0((uint64_t)mask_seed);
  c.mk1 = zf::seed_k1((uint64_t)mask_seed);
  c.reuse = -1;
  return c;
}

void fill_restore(Common& c, at::IntArrayRef seeds, int64_t restore_seed, float restore_scale) {
  c.restore_seed = (uint64_t)restore_seed;
  c.restore_scale = restore_scale;
  c.reuse = reuse_index(seeds, restore_seed, restore_scale);
}

void fill_rounding(Common& c, bool stochastic_rounding, int64_t round_seed) {
  c.stochastic_rounding = stochastic_rounding;
  c.rk0 = zf::seed_k0((uint64_t)round_seed);
  c.rk1 = zf::seed_k1((uint64_t)round_seed);
}

// Blocks of the kernel resident on all SMs of `device` at once, asked of the occupancy
// calculator once per kernel and device (it depends only on the kernel's registers and the
// device), not on every launch: an op call made two runtime queries and one occupancy
// calculation per launch, host work on the step's critical path after each loss read (RAJA
// and CCCL cache it likewise).  Keyed by the kernel's template arguments, not its function
// type: the kernels of one functor share their signature but not their registers.
template <class Functor, typename P, int DIST>
int64_t resident_blocks(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int64_t> cached[kMaxDevices];  // 0: not asked yet (zero-initialized)
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    const int64_t known = cached[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, multi_tensor_kernel<Functor, P, DIST>, kThreads, 0));
  const int64_t blocks = (int64_t)std::max(sms, 1) * std::max(per_sm, 1);
  if (cacheable) cached[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

// One launch over the table in `c`: enough blocks to cover the tasks, at most what is resident
// on all SMs at once (the grid-stride loop does the rest without a tail of half-empty waves).
template <class Functor, typename P, int DIST>
void launch_one(const Common& c, const typename Functor::Args& a, int device) {
  const int64_t warps_per_block = kThreads / 32;
  const int64_t want = (c.total_tasks + warps_per_block - 1) / warps_per_block;
  const int grid = (int)std::max<int64_t>(1, std::min<int64_t>(want, resident_blocks<Functor, P, DIST>(device)));
  multi_tensor_kernel<Functor, P, DIST><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(c, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One launch per parameter dtype present in the list (entries keep the list's order).
template <class Functor>
void launch(const std::vector<Slots>& slots, at::IntArrayRef tensor_ids, int64_t dist, Common c,
            const typename Functor::Args& a) {
  const int device = slots[0][SLOT_PARAM]->get_device();
  for (int32_t code : {F32, BF16, F16}) {
    std::vector<Entry> entries;
    int64_t tasks = 0;
    for (size_t k = 0; k < slots.size(); ++k) {
      if (dtype_code(*slots[k][SLOT_PARAM]) != code) continue;
      Entry e;
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
      e.task_start = tasks;
      e.tid = (uint32_t)tensor_ids[k];
      e.all_vec = 1;
      for (int s = 0; s < 4; ++s)
        if (slots[k][s] && !e.vec[s]) e.all_vec = 0;
      tasks += (e.numel + kTaskElems - 1) / kTaskElems;
      if (e.numel > 0) entries.push_back(e);
    }
    if (tasks == 0) continue;
    c.entries = table_cache().get(entries, device);
    c.ntensors = (int32_t)entries.size();
    c.total_tasks = tasks;
    const bool rad = dist == zf::DIST_RADEMACHER;
    if (code == F32) {
      rad ? launch_one<Functor, float, zf::DIST_RADEMACHER>(c, a, device)
          : launch_one<Functor, float, zf::DIST_GAUSSIAN>(c, a, device);
    } else if (code == BF16) {
      rad ? launch_one<Functor, __nv_bfloat16, zf::DIST_RADEMACHER>(c, a, device)
          : launch_one<Functor, __nv_bfloat16, zf::DIST_GAUSSIAN>(c, a, device);
    } else {
      rad ? launch_one<Functor, __half, zf::DIST_RADEMACHER>(c, a, device)
          : launch_one<Functor, __half, zf::DIST_GAUSSIAN>(c, a, device);
    }
  }
}

// ----------------------------------------------------------------------------------------
// The ops
// ----------------------------------------------------------------------------------------
constexpr int kPhiloxThreads = 256;

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
  const int blocks = (int)std::min<int64_t>((n + kPhiloxThreads - 1) / kPhiloxThreads, 65535);
  philox_kernel<<<blocks, kPhiloxThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
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
  std::vector<Slots> slots(params.size());
  for (size_t k = 0; k < params.size(); ++k) slots[k] = {&params[k], nullptr, nullptr, nullptr};  // SLOT_PARAM
  Common c = make_common(mask_seed, mask_threshold);
  launch<PerturbFunctor>(slots, tensor_ids, dist, c, PerturbFunctor::Args{(uint64_t)seed, f32(scale)});
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
  std::vector<Slots> slots(params.size());
  for (size_t k = 0; k < params.size(); ++k)  // SLOT_PARAM, SLOT_SGD_MOMENTUM, SLOT_SGD_HISTORY
    slots[k] = {&params[k], has_m ? &momentum_buffers[k] : nullptr, has_h ? &history_buffers[k] : nullptr,
                nullptr};
  SgdFunctor::Args a;
  a.s = sgd_scalars(restore_scale, lr, weight_decay, momentum, dampening, history_alpha);
  a.h = HistArgs{has_h, history_init, sign, a.s.alpha, a.s.one_minus_alpha};
  a.mom = has_m;
  a.nesterov = nesterov;
  a.momentum_init = momentum_init;
  Common c = make_common(mask_seed, mask_threshold);
  fill_restore(c, seeds, restore_seed, a.s.restore_scale);
  fill_rounding(c, stochastic_rounding, round_seed);
  const Tensor queries = fill_queries(c, seeds, coeffs, params[0].device());
  launch<SgdFunctor>(slots, tensor_ids, dist, c, a);
}

void adam_cuda(TensorList params, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList history_buffers,
               at::IntArrayRef tensor_ids, at::IntArrayRef seeds, at::ArrayRef<double> coeffs, int64_t dist,
               int64_t mask_seed, int64_t mask_threshold, int64_t restore_seed, double restore_scale, double lr,
               double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
               int64_t step, bool sign, double history_alpha, bool history_init, bool stochastic_rounding,
               int64_t round_seed) {
  check_adam_args(params, exp_avgs, exp_avg_sqs, history_buffers, tensor_ids, seeds, coeffs, dist, mask_seed,
                  mask_threshold, restore_seed, step, round_seed);
  AdamFunctor::Args a;
  a.s = adam_scalars(restore_scale, lr, beta1, beta2, eps, weight_decay, step, history_alpha);
  if (params.empty()) return;
  check_cuda_device(params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const bool has_h = !history_buffers.empty();
  std::vector<Slots> slots(params.size());
  for (size_t k = 0; k < params.size(); ++k)  // SLOT_PARAM, SLOT_ADAM_EXP_AVG, SLOT_ADAM_EXP_AVG_SQ, SLOT_ADAM_HISTORY
    slots[k] = {&params[k], &exp_avgs[k], &exp_avg_sqs[k], has_h ? &history_buffers[k] : nullptr};
  a.h = HistArgs{has_h, history_init, sign, a.s.alpha, a.s.one_minus_alpha};
  a.decoupled = decoupled_weight_decay;
  Common c = make_common(mask_seed, mask_threshold);
  fill_restore(c, seeds, restore_seed, a.s.restore_scale);
  fill_rounding(c, stochastic_rounding, round_seed);
  const Tensor queries = fill_queries(c, seeds, coeffs, params[0].device());
  launch<AdamFunctor>(slots, tensor_ids, dist, c, a);
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
  return zf_ops::create_module(&module_def);
}
}
