// Element-wise pieces of the update ops that the CPU and CUDA kernels share verbatim
// (docs/kernel-ops.md, "Arithmetic"). Pure C++, host and device; every float operation is
// one correctly rounded IEEE fp32 op (the builds use -ffp-contract=off / --fmad=false).
#pragma once

#include "philox.h"  // ZF_HD

namespace zf {

// Step 4 of the update: sign(g) = +1 for g > 0, -1 for g < 0; +0, -0 and NaN unchanged
// (a NaN estimate stays visible instead of becoming a silent zero step).
ZF_HD float sign_f32(float g) { return g > 0.0f ? 1.0f : (g < 0.0f ? -1.0f : g); }

}  // namespace zf
