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
// it is uploaded once per layout and cached on the device (csrc/table_cache.h, over this
// file's CudaTableMemory); the per-call seeds, coefficients and scalars travel in the kernel
// parameters.  A step therefore costs no host-to-device copy and no allocation, and can be
// captured in a CUDA graph after one eager step (a table missing during a capture raises the
// warm-up message; a captured table is never evicted).  The launcher holds each table's Handle
// until its launch is enqueued: another thread's call may evict it meanwhile, not free it.

#include <c10/cuda/CUDAStream.h>  // (ATen/cuda/CUDAContext.h would need cusparse/cublas headers)
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <vector>

#include "module_init.h"         // PyInit: the module and its sources digest
#include "multi_tensor_apply.cuh"  // launcher, storage, z / mask / rounding of a warp task
#include "multi_tensor_ops.h"      // the op functions over a Launcher: checks, tables, scalars
#include "ops_common.h"            // validation + host scalar preparation, shared with the CPU build
#include "philox.h"
#include "table_cache.h"         // the launch-table cache, over CudaTableMemory

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

// Whether the current stream is being captured into a CUDA graph (torch.cuda.graph).
bool current_stream_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status));
  return status != cudaStreamCaptureStatusNone;  // an invalidated capture is still one
}

// The launch tables' memory for csrc/table_cache.h (which says why each piece is there): the
// current device and stream (the launcher entered the params' device).
struct CudaTableMemory {
  bool capturing() { return current_stream_capturing(); }
  void* try_allocate(size_t bytes) {
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, bytes);
    if (err == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();  // clear the (non-sticky) allocation error before the retry
      return nullptr;
    }
    C10_CUDA_CHECK(err);
    return p;
  }
  void release_cached_memory() { c10::cuda::CUDACachingAllocator::emptyCache(); }
  [[noreturn]] void out_of_memory(size_t bytes) {
    // torch's out-of-memory error (torch.OutOfMemoryError), which a caller's handler catches
    TORCH_CHECK_WITH(OutOfMemoryError, false, "CUDA out of memory: zfkernels could not allocate a launch table of ",
                     bytes, " bytes, also after emptying torch's cache of free blocks");
    std::abort();  // not reached: the check throws
  }
  // Complete before any stream's kernel can read it (a plain cudaMemcpy from pageable memory
  // may return before the DMA lands): copy on this stream and wait, once per layout.
  void upload(void* dst, const void* src, size_t bytes) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  void free(void* p) noexcept { C10_CUDA_CHECK_WARN(cudaFree(p)); }  // synchronizes: no launch still reads it
  [[noreturn]] void fail(const char* message) {
    TORCH_CHECK(false, message);
    std::abort();  // not reached: the check throws
  }
};

using CudaTableCache = TableCache<CudaTableMemory>;

CudaTableCache& table_cache() {
  static CudaTableCache* cache = new CudaTableCache();  // never destroyed: no CUDA calls at process exit
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
  // Held by the caller until its launches are enqueued (csrc/table_cache.h: Handle).
  CudaTableCache::Handle table(const std::vector<Entry>& entries) {
    return table_cache().get(entries.data(), entries.size() * sizeof(Entry), device_);
  }
  // q > kInlineQ: the seeds and coefficients are staged in pinned host memory that the call
  // frees after its copy. A graph would replay that copy from the freed buffer (whatever was
  // allocated there since), and a pinned allocation may itself be refused under capture:
  // refused before anything is allocated or written, with the fix.
  Tensor host_bytes(int64_t n) {
    TORCH_CHECK(!current_stream_capturing(), "zfkernels: a CUDA graph is being captured (torch.cuda.graph) and this op "
                "call has more than ", kInlineQ, " query seeds, which travel through a host buffer that a replay "
                "would read after it is freed; capture calls with q <= ", kInlineQ,
                " or run this call eagerly");
    return at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  }
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
  check_counter_values(c);
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
