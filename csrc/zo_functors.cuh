// The ops of the CUDA backend as functors of the multi-tensor launcher (apex's AdamFunctor
// shape): what one warp task of perturb_, zo_sgd_update_ and zo_adam_update_ does, in the
// order of docs/kernel-ops.md (the numbered steps of its zo_sgd_update_ and zo_adam_update_
// sections).  Device code only; the host side that builds their tables and arguments is
// csrc/multi_tensor_ops.h.  Shared by csrc/ops_cuda.cu and the CPU emulation of the CUDA
// kernels (tests/cuda_emu/).
#pragma once

#include "multi_tensor_apply.cuh"
#include "ops_common.h"  // SgdScalars, AdamScalars
#include "philox.h"
#include "update_math.h"

namespace zf_cuda {

using zf_ops::AdamScalars;
using zf_ops::SgdScalars;

// ----------------------------------------------------------------------------------------
// Functors: one warp task of each op (docs/kernel-ops.md, each op's numbered steps, in order).
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

}  // namespace zf_cuda
