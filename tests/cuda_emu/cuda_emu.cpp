// The CUDA backend's kernels run on the CPU: the device code of csrc/multi_tensor_apply.cuh and
// csrc/zo_functors.cuh and the op functions of csrc/multi_tensor_ops.h, compiled by the host
// compiler, with each warp of the grid emulated by 32 threads that meet at every __shfl_sync.
//
// Why: no GPU is at hand on the development and CI machines, and a device lease is minutes a
// task; this runs the CUDA kernels' own work decomposition (warp tasks, the FULL and bounded
// paths, the tensor lookup, the grid-stride loop), the Rademacher word hand-out by shuffles, the
// restore's reuse of a query's z, the buffer slots and dtypes and the stochastic-rounding stores
// on every test machine, where tests/test_cuda_emulation.py compares them bit for bit with the
// reference.  What it cannot check: the device intrinsics (here the host paths of philox.h, the
// ones the CPU kernels use, and the host implementations of cuda_bf16.h / cuda_fp16.h), the
// memory model, occupancy, speed.
//
// Loading this library (torch.ops.load_library, after zfkernels) replaces the CPU kernels of
// zfkernels::perturb_, zo_sgd_update_ and zo_adam_update_ with the emulated CUDA ones, so that
// every test of the "cpu" backend runs them, under the real schemas (tests/conftest.py does
// it in a child pytest: ZF_EMULATE_CUDA_KERNELS). torch.ops.zf_cuda_emu.launches() counts the
// emulated kernel launches, so a run can tell that it went through them.
#include <cuda_bf16.h>  // host implementations of the conversions, same bits as the device's
#include <cuda_fp16.h>
#include <vector_types.h>

// The CUDA keywords, for the host compiler.
#undef __global__
#undef __device__
#undef __forceinline__
#undef __grid_constant__
#define __global__
#define __device__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)

#include <torch/library.h>

#include <atomic>
#include <barrier>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

// The identity of the emulated thread, and the warp it belongs to.
namespace zf_emu {
struct Warp {
  std::barrier<> meet{32};
  uint32_t slot[32];
};
thread_local Warp* warp = nullptr;
thread_local int lane = 0;
}  // namespace zf_emu

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 gridDim;

// Every lane of the warp posts its value, then reads its source lane's (the kernels only
// shuffle with the full mask, from warp-uniform control flow).
inline uint32_t __shfl_sync(unsigned mask, uint32_t value, int src) {
  if (mask != 0xFFFFFFFFu) throw std::logic_error("cuda_emu: __shfl_sync with a partial mask is not emulated");
  zf_emu::Warp& w = *zf_emu::warp;
  w.slot[zf_emu::lane] = value;
  w.meet.arrive_and_wait();
  const uint32_t got = w.slot[src & 31];
  w.meet.arrive_and_wait();  // every lane has read before the next shuffle writes
  return got;
}

#include "multi_tensor_ops.h"

namespace zf_emu {

using at::Tensor;
using at::TensorList;
using zf_cuda::Common;
using zf_cuda::Entry;

// Blocks resident at once on the emulated device: 2 (16 warps), so that lists of more than
// 16 warp tasks (8192 elements) go through the grid-stride loop, and small ones leave warps idle.
constexpr int64_t kResidentBlocks = 2;

std::atomic<int64_t> launches{0};
// > 0: the table() call that brings it to 0 throws, as a failed upload (cudaMalloc out of
// memory) does on the device (torch.ops.zf_cuda_emu.fail_table(n): the n-th table from now).
std::atomic<int64_t> fail_table_in{0};

// The emulator's part of a launch (csrc/multi_tensor_ops.h): CPU tensors, tables kept in host
// memory while held, the grid run by 32 lane threads, one warp after the other.
class EmuLauncher {
 public:
  explicit EmuLauncher(TensorList params) {
    TORCH_CHECK_VALUE(params[0].is_cpu(), "zf_cuda_emu: the emulated CUDA kernels take CPU tensors, got ",
                      params[0].device());
  }
  // The table, kept in host memory while the returned handle lives (as the device's cache
  // keeps a held table on the device): run() refuses a table whose handle was dropped, so the
  // emulation checks that the op functions hold it until the launch.
  std::shared_ptr<const Entry> table(const std::vector<Entry>& entries) {
    if (fail_table_in.load() > 0 && fail_table_in.fetch_sub(1) == 1)
      throw std::runtime_error("cuda_emu: injected failure of a table upload");
    std::shared_ptr<std::vector<Entry>> owner(new std::vector<Entry>(entries), [this](std::vector<Entry>* v) {
      held_.erase(v->data());
      delete v;
    });
    held_.insert(owner->data());
    return std::shared_ptr<const Entry>(owner, owner->data());
  }
  Tensor host_bytes(int64_t n) { return at::empty({n}, at::kByte); }
  Tensor to_device(const Tensor& host) { return host; }

  template <class Functor, typename P, int DIST>
  void run(const Common& c, const typename Functor::Args& a) {
    const int64_t warps_per_block = zf_cuda::kThreads / 32;
    if (!held_.count(c.entries))
      throw std::logic_error("cuda_emu: a launch over a table whose handle was dropped (on the device its memory "
                             "may be freed by then): csrc/multi_tensor_ops.h must hold it until the launch");
    const int blocks = zf_cuda::grid_blocks(c.total_tasks, kResidentBlocks);
    launches.fetch_add(1);
    Warp w;
    std::vector<std::thread> lanes;
    std::exception_ptr error;
    std::mutex error_mu;
    for (int l = 0; l < 32; ++l) {
      lanes.emplace_back([&, l] {
        warp = &w;
        lane = l;
        gridDim = dim3(blocks, 1, 1);
        try {
          for (int b = 0; b < blocks; ++b) {
            for (int k = 0; k < (int)warps_per_block; ++k) {
              blockIdx = make_uint3(b, 0, 0);
              threadIdx = make_uint3(32 * k + l, 0, 0);
              zf_cuda::multi_tensor_kernel<Functor, P, DIST>(c, a);
            }
          }
        } catch (...) {
          // A lane that throws stops meeting the others: the kernels throw nothing, so this
          // can only be the partial-mask check, which every lane reaches together.
          std::lock_guard<std::mutex> lock(error_mu);
          if (!error) error = std::current_exception();
        }
      });
    }
    for (std::thread& t : lanes) t.join();
    if (error) std::rethrow_exception(error);
  }

 private:
  std::set<const Entry*> held_;  // the tables whose handles live
};

}  // namespace zf_emu

int64_t launch_count() { return zf_emu::launches.load(); }
void fail_table(int64_t n) { zf_emu::fail_table_in.store(n); }

TORCH_LIBRARY_IMPL(zfkernels, CPU, m) {
  m.impl("perturb_", &zf_cuda::perturb_op<zf_emu::EmuLauncher>);
  m.impl("zo_sgd_update_", &zf_cuda::sgd_op<zf_emu::EmuLauncher>);
  m.impl("zo_adam_update_", &zf_cuda::adam_op<zf_emu::EmuLauncher>);
}

TORCH_LIBRARY(zf_cuda_emu, m) {
  m.def("launches() -> int", &launch_count);
  m.def("fail_table(int n) -> ()", &fail_table);
}
