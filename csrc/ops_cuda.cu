// zfkernels CUDA kernels (TORCH_LIBRARY_IMPL(zfkernels, CUDA)); the schema lives in
// csrc/ops.cpp (extension zfkernels._C, imported first by zfkernels/_compiled.py).
// Semantics: docs/kernel-ops.md; stream: docs/perturbation-stream.md (stream v1), shared
// through csrc/philox.h.  Compiled with --fmad=false, -prec-div=true, -prec-sqrt=true: each
// fp32 step is one correctly rounded IEEE op in the spec's order ("Arithmetic"), so results
// equal the CPU and Triton kernels and the reference bit for bit (Gaussian included: the
// same polynomial log/sincos from philox.h).
//
// Each op is a functor (PerturbFunctor, SgdFunctor, AdamFunctor: csrc/zo_functors.cuh) run by
// the one multi-tensor launcher of csrc/multi_tensor_apply.cuh: ONE kernel launch per op call
// and parameter dtype for the whole list.  The op functions (argument checks, tables, scalars)
// are csrc/multi_tensor_ops.h's, over this file's CudaLauncher, the device's part of a launch
// (the CPU emulation of tests/cuda_emu/ runs them over its own).  The launch table (per-tensor
// pointers, dtype codes, numel, id, first warp task) depends only on the parameter layout, so
// it is uploaded once per layout and cached on the device (TableCache); the per-call seeds,
// coefficients and scalars travel in the kernel parameters.  A step therefore costs no
// host-to-device copy and no allocation.

#include <c10/cuda/CUDAStream.h>  // (ATen/cuda/CUDAContext.h would need cusparse/cublas headers)
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <optional>
#include <vector>

#include "module_init.h"         // PyInit: the module and its sources digest
#include "multi_tensor_apply.cuh"  // launcher, storage, z / mask / rounding of a warp task
#include "multi_tensor_ops.h"      // the op functions over a Launcher: checks, tables, scalars
#include "ops_common.h"            // validation + host scalar preparation, shared with the CPU build
#include "philox.h"

namespace zf_cuda {

using namespace zf_ops;

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
// Host side: the device's part of a launch
// ----------------------------------------------------------------------------------------
void check_cuda_device(TensorList params) {
  TORCH_CHECK_VALUE(params[0].is_cuda(), "zfkernels: the CUDA kernels got params on ", params[0].device(),
                    "; all tensors of one call must be on one CUDA device");
}

// Device copies of launch tables, keyed by their exact bytes (pointers, dtypes, sizes, ids):
// a table that compares equal describes the same memory, so reusing it is always correct,
// also after a tensor was freed and another one allocated at the same address.  An optimizer
// calls the ops with the same few layouts every step (one per parameter group and op), so
// after the first step no call uploads anything.  Bounded; the least recently used table is
// dropped (cudaFree waits for the kernels that may still read it).  A step cycles through its
// layouts in a fixed order, the worst case for that policy: once they outnumber the capacity
// every call misses (a cudaFree, an upload, a stream sync).  At 64 tables that was any
// ZO-Adam with more than 32 param groups (two layouts each: perturb, and params + m + v),
// e.g. layer-wise lr groups of an LLM.  1024 tables of 88 bytes a tensor: device memory of
// 13 MB if every one were a ViT-B list (152 tensors), the usual few tables of a run far less.
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
    // The memory of a run near the device's capacity is mostly reserved by torch's caching
    // allocator (free blocks it keeps cached): a cudaMalloc of a few bytes then fails where
    // torch's own allocations free cached blocks and retry. So does this one, once.
    cudaError_t err = cudaMalloc(reinterpret_cast<void**>(&it.dptr), bytes);
    if (err == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();  // clear the (non-sticky) allocation error before the retry
      c10::cuda::CUDACachingAllocator::emptyCache();
      err = cudaMalloc(reinterpret_cast<void**>(&it.dptr), bytes);
    }
    C10_CUDA_CHECK(err);
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
  static constexpr size_t kCapacity = 1024;
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

// The device's part of a launch (csrc/multi_tensor_ops.h): the params' CUDA device entered for
// the call, tables from the cache, q > kInlineQ seeds through pinned memory, the kernel
// launched on the current stream.
class CudaLauncher {
 public:
  explicit CudaLauncher(TensorList params) {
    check_cuda_device(params);
    guard_.emplace(params[0].device());
    device_ = params[0].get_device();
  }
  const Entry* table(const std::vector<Entry>& entries) { return table_cache().get(entries, device_); }
  Tensor host_bytes(int64_t n) { return at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true)); }
  Tensor to_device(const Tensor& host) { return host.to(at::Device(at::kCUDA, device_), /*non_blocking=*/true); }

  // One launch over the table in `c`, on the current stream.
  template <class Functor, typename P, int DIST>
  void run(const Common& c, const typename Functor::Args& a) {
    const int grid = grid_blocks(c.total_tasks, resident_blocks<Functor, P, DIST>(device_));
    multi_tensor_kernel<Functor, P, DIST><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(c, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  std::optional<c10::cuda::CUDAGuard> guard_;
  int device_ = 0;
};

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

}  // namespace zf_cuda

TORCH_LIBRARY_IMPL(zfkernels, CUDA, m) {
  m.impl("philox4x32_10", &zf_cuda::philox4x32_10_cuda);
  m.impl("perturb_", &zf_cuda::perturb_op<zf_cuda::CudaLauncher>);
  m.impl("zo_sgd_update_", &zf_cuda::sgd_op<zf_cuda::CudaLauncher>);
  m.impl("zo_adam_update_", &zf_cuda::adam_op<zf_cuda::CudaLauncher>);
}

// Importing zfkernels._C_cuda registers the CUDA kernels (after zfkernels._C defined the ops).
extern "C" {
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", "zfkernels compiled CUDA ops", -1,
                                          nullptr};
  return zf_ops::create_module(&module_def);
}
}
