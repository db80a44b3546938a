// Host side of the multi-tensor ops of the CUDA backend: the argument checks, the launch
// tables, the scalars of every functor (csrc/zo_functors.cuh), one launch per parameter dtype.
// Written once over a Launcher, which owns what differs between the real device and the CPU
// emulation of the CUDA kernels (tests/cuda_emu/), so that the emulation runs this very code:
//
//   struct Launcher {
//     explicit Launcher(TensorList params);         // checks params' device, enters it
//     Table table(const std::vector<Entry>&);  // a handle: .get() is the table where the kernels
//                                              //   read it, kept there while the handle lives
//     Tensor host_bytes(int64_t n);                  // a staging buffer for the q > kInlineQ seeds
//     Tensor to_device(const Tensor& host);          //   and its copy where the kernels read it
//     template <class Functor, typename P, int DIST>
//     void run(const Common&, const typename Functor::Args&);   // one launch over the table
//   };
//
// csrc/ops_cuda.cu's CudaLauncher caches tables on the device and launches the kernels; the
// op functions below are the kernels registered for the CUDA dispatch key.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

#include "multi_tensor_apply.cuh"
#include "ops_common.h"
#include "philox.h"
#include "zo_functors.cuh"

namespace zf_cuda {

using at::Tensor;
using at::TensorList;

inline int32_t dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return F32;
    case at::kBFloat16: return BF16;
    default: return F16;
  }
}

inline int32_t vec_ok(const Tensor& t) {
  const size_t align = t.scalar_type() == at::kFloat ? 16 : 8;
  return (reinterpret_cast<uintptr_t>(t.data_ptr()) % align) == 0 ? 1 : 0;
}

using Slots = std::array<const Tensor*, 4>;  // the tensors of one entry by slot (nullptr: off)

// Blocks of a launch over `tasks` warp tasks: enough to cover them, at most `resident` (what
// fits on all SMs at once; the grid-stride loop does the rest without a tail of half-empty waves).
inline int grid_blocks(int64_t tasks, int64_t resident) {
  const int64_t warps_per_block = kThreads / 32;
  const int64_t want = (tasks + warps_per_block - 1) / warps_per_block;
  return (int)std::max<int64_t>(1, std::min<int64_t>(want, resident));
}

// The q seeds and coefficients: in the kernel parameters up to kInlineQ, else in a buffer
// where the kernels read it (returned: it must live until the launches are enqueued).
template <class Launcher>
Tensor fill_queries(Common& c, at::IntArrayRef seeds, at::ArrayRef<double> coeffs, Launcher& l) {
  const size_t q = seeds.size();
  c.q = (int32_t)q;
  c.seeds_dev = nullptr;
  c.coeffs_dev = nullptr;
  std::memset(c.seeds, 0, sizeof(c.seeds));
  std::memset(c.coeffs, 0, sizeof(c.coeffs));
  if (q <= (size_t)kInlineQ) {
    for (size_t j = 0; j < q; ++j) {
      c.seeds[j] = (uint64_t)seeds[j];
      c.coeffs[j] = zf_ops::f32(coeffs[j]);
    }
    return Tensor();
  }
  const size_t off_coeffs = q * sizeof(uint64_t);
  Tensor host = l.host_bytes((int64_t)(off_coeffs + q * sizeof(float)));
  uint8_t* h = host.template data_ptr<uint8_t>();
  for (size_t j = 0; j < q; ++j) {
    const uint64_t s = (uint64_t)seeds[j];
    const float cf = zf_ops::f32(coeffs[j]);
    std::memcpy(h + j * sizeof(uint64_t), &s, sizeof(uint64_t));
    std::memcpy(h + off_coeffs + j * sizeof(float), &cf, sizeof(float));
  }
  Tensor dev = l.to_device(host);
  c.seeds_dev = reinterpret_cast<const uint64_t*>(dev.template data_ptr<uint8_t>());
  c.coeffs_dev = reinterpret_cast<const float*>(dev.template data_ptr<uint8_t>() + off_coeffs);
  return dev;
}

// The restore's z is query `reuse`'s z (the last query with the restore's seed), as in the
// CPU kernel; -1 when there is no restore or no such query.
inline int32_t reuse_index(at::IntArrayRef seeds, int64_t restore_seed, float restore_scale) {
  if (restore_scale == 0.0f) return -1;
  for (int j = (int)seeds.size() - 1; j >= 0; --j)
    if (seeds[j] == restore_seed) return j;
  return -1;
}

inline Common make_common(int64_t mask_seed, int64_t mask_threshold) {
  Common c;
  std::memset(&c, 0, sizeof(Common));
  c.T = (uint32_t)mask_threshold;
  c.mk0 = zf::seed_k0((uint64_t)mask_seed);
  c.mk1 = zf::seed_k1((uint64_t)mask_seed);
  c.reuse = -1;
  return c;
}

inline void fill_restore(Common& c, at::IntArrayRef seeds, int64_t restore_seed, float restore_scale) {
  c.restore_seed = (uint64_t)restore_seed;
  c.restore_scale = restore_scale;
  c.reuse = reuse_index(seeds, restore_seed, restore_scale);
}

inline void fill_rounding(Common& c, bool stochastic_rounding, int64_t round_seed) {
  c.stochastic_rounding = stochastic_rounding;
  c.rk0 = zf::seed_k0((uint64_t)round_seed);
  c.rk1 = zf::seed_k1((uint64_t)round_seed);
}

// One launch per parameter dtype present in the list (entries keep the list's order).  Every
// table is uploaded before the first launch: an upload that fails (cudaMalloc out of memory)
// then raises with nothing written; after a launch it left the first dtype's tensors updated
// and the others not, and a caller that retries the step (an out-of-memory handler that
// shrinks the batch) updated those tensors twice.
template <class Functor, class Launcher>
void launch(Launcher& l, const std::vector<Slots>& slots, at::IntArrayRef tensor_ids, int64_t dist, Common c,
            const typename Functor::Args& a) {
  // Held until the last launch is enqueued (when this function returns): the device's table
  // cache may evict a table for another thread's call, and frees none that is held.
  using Table = decltype(l.table(std::declval<const std::vector<Entry>&>()));
  struct Group {
    int32_t code;
    std::vector<Entry> entries;
    int64_t tasks;
    Table table;
  };
  std::vector<Group> groups;
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
    groups.push_back(Group{code, std::move(entries), tasks, Table()});
  }
  for (Group& g : groups) g.table = l.table(g.entries);
  const bool rad = dist == zf::DIST_RADEMACHER;
  for (const Group& g : groups) {
    c.entries = static_cast<const Entry*>(g.table.get());
    c.ntensors = (int32_t)g.entries.size();
    c.total_tasks = g.tasks;
    if (g.code == F32) {
      rad ? l.template run<Functor, float, zf::DIST_RADEMACHER>(c, a)
          : l.template run<Functor, float, zf::DIST_GAUSSIAN>(c, a);
    } else if (g.code == BF16) {
      rad ? l.template run<Functor, __nv_bfloat16, zf::DIST_RADEMACHER>(c, a)
          : l.template run<Functor, __nv_bfloat16, zf::DIST_GAUSSIAN>(c, a);
    } else {
      rad ? l.template run<Functor, __half, zf::DIST_RADEMACHER>(c, a)
          : l.template run<Functor, __half, zf::DIST_GAUSSIAN>(c, a);
    }
  }
}

// What the two updates share besides their functor's scalars: the mask, steps 1-2 (the pending
// restore, the q-query estimate) and the §9 rounding of the parameter stores; then the launch.
template <class Functor, class Launcher>
void launch_update(Launcher& l, const std::vector<Slots>& slots, at::IntArrayRef tensor_ids, at::IntArrayRef seeds,
                   at::ArrayRef<double> coeffs, int64_t dist, int64_t mask_seed, int64_t mask_threshold,
                   int64_t restore_seed, float restore_scale, bool stochastic_rounding, int64_t round_seed,
                   const typename Functor::Args& a) {
  Common c = make_common(mask_seed, mask_threshold);
  fill_restore(c, seeds, restore_seed, restore_scale);
  fill_rounding(c, stochastic_rounding, round_seed);
  const Tensor queries = fill_queries(c, seeds, coeffs, l);  // held until the launches are enqueued
  launch<Functor>(l, slots, tensor_ids, dist, c, a);
}

// ----------------------------------------------------------------------------------------
// The ops (schemas: csrc/ops.cpp; semantics: docs/kernel-ops.md)
// ----------------------------------------------------------------------------------------
template <class Launcher>
void perturb_op(TensorList params, at::IntArrayRef tensor_ids, int64_t seed, double scale, int64_t dist,
                int64_t mask_seed, int64_t mask_threshold) {
  zf_ops::check_perturb_args(params, tensor_ids, seed, scale, dist, mask_seed, mask_threshold);
  if (params.empty()) return;
  Launcher l(params);
  std::vector<Slots> slots(params.size());
  for (size_t k = 0; k < params.size(); ++k) slots[k] = {&params[k], nullptr, nullptr, nullptr};  // SLOT_PARAM
  Common c = make_common(mask_seed, mask_threshold);
  launch<PerturbFunctor>(l, slots, tensor_ids, dist, c, PerturbFunctor::Args{(uint64_t)seed, zf_ops::f32(scale)});
}

template <class Launcher>
void sgd_op(TensorList params, TensorList momentum_buffers, TensorList history_buffers, at::IntArrayRef tensor_ids,
            at::IntArrayRef seeds, at::ArrayRef<double> coeffs, int64_t dist, int64_t mask_seed,
            int64_t mask_threshold, int64_t restore_seed, double restore_scale, double lr, double weight_decay,
            double momentum, double dampening, bool nesterov, bool momentum_init, bool sign, double history_alpha,
            bool history_init, bool stochastic_rounding, int64_t round_seed) {
  zf_ops::check_sgd_args(params, momentum_buffers, history_buffers, tensor_ids, seeds, coeffs, dist, mask_seed,
                         mask_threshold, restore_seed, restore_scale, lr, weight_decay, momentum, dampening,
                         history_alpha, round_seed);
  if (params.empty()) return;
  Launcher l(params);
  const bool has_m = !momentum_buffers.empty(), has_h = !history_buffers.empty();
  std::vector<Slots> slots(params.size());
  for (size_t k = 0; k < params.size(); ++k)  // SLOT_PARAM, SLOT_SGD_MOMENTUM, SLOT_SGD_HISTORY
    slots[k] = {&params[k], has_m ? &momentum_buffers[k] : nullptr, has_h ? &history_buffers[k] : nullptr,
                nullptr};
  SgdFunctor::Args a;
  a.s = zf_ops::sgd_scalars(restore_scale, lr, weight_decay, momentum, dampening, history_alpha);
  a.h = HistArgs{has_h, history_init, sign, a.s.alpha, a.s.one_minus_alpha};
  a.mom = has_m;
  a.nesterov = nesterov;
  a.momentum_init = momentum_init;
  launch_update<SgdFunctor>(l, slots, tensor_ids, seeds, coeffs, dist, mask_seed, mask_threshold, restore_seed,
                            a.s.restore_scale, stochastic_rounding, round_seed, a);
}

template <class Launcher>
void adam_op(TensorList params, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList history_buffers,
             at::IntArrayRef tensor_ids, at::IntArrayRef seeds, at::ArrayRef<double> coeffs, int64_t dist,
             int64_t mask_seed, int64_t mask_threshold, int64_t restore_seed, double restore_scale, double lr,
             double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay, int64_t step,
             bool sign, double history_alpha, bool history_init, bool stochastic_rounding, int64_t round_seed) {
  zf_ops::check_adam_args(params, exp_avgs, exp_avg_sqs, history_buffers, tensor_ids, seeds, coeffs, dist, mask_seed,
                          mask_threshold, restore_seed, restore_scale, lr, beta1, beta2, eps, weight_decay,
                          decoupled_weight_decay, step, history_alpha, round_seed);
  AdamFunctor::Args a;
  a.s = zf_ops::adam_scalars(restore_scale, lr, beta1, beta2, eps, weight_decay, step, history_alpha);
  if (params.empty()) return;
  Launcher l(params);
  const bool has_h = !history_buffers.empty();
  std::vector<Slots> slots(params.size());
  for (size_t k = 0; k < params.size(); ++k)  // SLOT_PARAM, SLOT_ADAM_EXP_AVG, SLOT_ADAM_EXP_AVG_SQ, SLOT_ADAM_HISTORY
    slots[k] = {&params[k], &exp_avgs[k], &exp_avg_sqs[k], has_h ? &history_buffers[k] : nullptr};
  a.h = HistArgs{has_h, history_init, sign, a.s.alpha, a.s.one_minus_alpha};
  a.decoupled = decoupled_weight_decay;
  launch_update<AdamFunctor>(l, slots, tensor_ids, seeds, coeffs, dist, mask_seed, mask_threshold, restore_seed,
                             a.s.restore_scale, stochastic_rounding, round_seed, a);
}

}  // namespace zf_cuda
