// Shared by the CPU (csrc/ops.cpp) and CUDA (csrc/ops_cuda.cu) extensions: argument
// validation (every op raises the same ValueError text on every backend) and the host-side
// preparation of the fp32 scalars (docs/kernel-ops.md, "Scalars").
//
// Header only, and only inline functions: each extension compiles its own copy.  Both
// extensions are built with -fvisibility=hidden, so these copies are private to each shared
// object and can never be interposed across _C and _C_cuda (the two are compiled by
// different compiler drivers with different flags; sharing code by #include-ing a .cpp made
// the same inline symbols exported from both).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <string>
#include <vector>

namespace zf_ops {

using at::Tensor;
using at::TensorList;

constexpr int64_t kMaskOne = int64_t(1) << 24;
constexpr int64_t kIdLimit = int64_t(1) << 32;

// Dense, contiguous, float32/bfloat16/float16; `list`[k] names it in the error. The name is
// passed in pieces, not as a built string: TORCH_CHECK formats its message only on failure,
// while building "params[k]" for every tensor that passes cost a heap string each: on the
// ViT-B list (152 tensors, meta, best of runs) perturb_ 30 -> 26 us, zo_adam_update_ (three
// lists) 85 -> 71 us per call.
inline void check_float_tensor(const Tensor& t, const char* list, size_t k) {
  TORCH_CHECK_VALUE(t.defined(), "zfkernels: ", list, "[", k, "] is an undefined tensor");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "zfkernels: ", list, "[", k, "] has layout ", t.layout(),
                    "; zeroflow kernels need dense tensors, call .to_dense() first");
  const auto st = t.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, "zfkernels: ", list, "[", k,
                    "] has dtype ", st,
                    "; use float32, bfloat16 or float16 (integer, complex and float64 tensors are "
                    "not supported)");
  TORCH_CHECK_VALUE(t.is_contiguous(), "zfkernels: ", list, "[", k,
                    "] is not contiguous; call .contiguous() on it first");
}

inline void check_params(TensorList params, at::IntArrayRef tensor_ids) {
  TORCH_CHECK_VALUE(params.size() == tensor_ids.size(), "zfkernels: tensor_ids has ",
                    tensor_ids.size(), " entries but params has ", params.size(),
                    "; give one id per tensor");
  for (size_t k = 0; k < params.size(); ++k) {
    check_float_tensor(params[k], "params", k);
    TORCH_CHECK_VALUE(params[k].device() == params[0].device(),
                      "zfkernels: all params must be on one device, but params[0] is on ",
                      params[0].device(), " and params[", k, "] is on ", params[k].device(),
                      "; move them to one device first");
  }
  for (size_t k = 0; k < tensor_ids.size(); ++k) {
    TORCH_CHECK_VALUE(tensor_ids[k] >= 0 && tensor_ids[k] < kIdLimit, "zfkernels: tensor_ids[", k,
                      "]=", tensor_ids[k], " is outside [0, 2**32); use a 32-bit unsigned id");
  }
}

inline void check_buffers(TensorList params, TensorList buffers, const char* name,
                          bool required = false) {
  if (buffers.empty() && !required) return;
  TORCH_CHECK_VALUE(buffers.size() == params.size(), "zfkernels: ", name, " has ", buffers.size(),
                    " tensors but params has ", params.size(),
                    required ? "; pass one buffer per param" : "; pass one buffer per param or none");
  for (size_t k = 0; k < buffers.size(); ++k) {
    const Tensor& b = buffers[k];
    const Tensor& p = params[k];
    check_float_tensor(b, name, k);
    TORCH_CHECK_VALUE(b.device() == p.device(), "zfkernels: ", name, "[", k, "] is on ", b.device(),
                      " but params[", k, "] is on ", p.device(), "; keep each buffer with its param");
    // sym_sizes, not sizes: under torch.compile with dynamic shapes the meta kernel sees
    // symbolic sizes, and sizes() specialized each to its traced value (a recompile for every
    // param shape; a ConstraintViolationError for a size marked dynamic); sym_sizes compares
    // them symbolically (one guard: the two sizes are equal). Real tensors: the same sizes.
    TORCH_CHECK_VALUE(b.sym_sizes() == p.sym_sizes(), "zfkernels: ", name, "[", k, "] has shape ", b.sym_sizes(),
                      " but params[", k, "] has shape ", p.sym_sizes(), "; buffers must match their param");
    TORCH_CHECK_VALUE(b.scalar_type() == p.scalar_type() || b.scalar_type() == at::kFloat,
                      "zfkernels: ", name, "[", k, "] has dtype ", b.scalar_type(), " but params[", k,
                      "] is ", p.scalar_type(), "; use the param's dtype or float32");
  }
}

inline void check_seed(int64_t s, const char* name) {
  TORCH_CHECK_VALUE(s >= 0, "zfkernels: ", name, "=", s,
                    " is negative; seeds are integers in [0, 2**63)");
}

inline void check_stream_args(int64_t dist, int64_t mask_seed, int64_t mask_threshold) {
  TORCH_CHECK_VALUE(dist == 0 || dist == 1, "zfkernels: dist=", dist,
                    " must be 0 (gaussian) or 1 (rademacher)");
  check_seed(mask_seed, "mask_seed");
  TORCH_CHECK_VALUE(mask_threshold >= 0 && mask_threshold <= kMaskOne, "zfkernels: mask_threshold=",
                    mask_threshold,
                    " is outside [0, 2**24]; it is round(sparsity * 2**24) with sparsity in [0, 1]");
}

inline void check_q(at::IntArrayRef seeds, at::ArrayRef<double> coeffs) {
  TORCH_CHECK_VALUE(seeds.size() == coeffs.size(), "zfkernels: seeds has ", seeds.size(),
                    " entries but coeffs has ", coeffs.size(), "; give one coefficient per seed");
  for (size_t j = 0; j < seeds.size(); ++j) {
    TORCH_CHECK_VALUE(seeds[j] >= 0, "zfkernels: seeds[", j, "]=", seeds[j],
                      " is negative; seeds are integers in [0, 2**63)");
  }
}

// Every tensor of every list on the params' device (the dispatcher picks the kernel from
// the union of devices, so a CPU kernel may see a stray CUDA tensor and vice versa).
inline void check_same_device(TensorList params, std::initializer_list<TensorList> lists) {
  if (params.empty()) return;
  for (TensorList l : lists) {
    for (const Tensor& t : l) {
      TORCH_CHECK_VALUE(t.device() == params[0].device(), "zfkernels: a buffer is on ", t.device(),
                        " but params are on ", params[0].device(),
                        "; all tensors of one call must be on one device");
    }
  }
}

// One list of tensors an op writes, by its schema name (check_no_overlap).
struct WrittenList {
  const char* name;
  TensorList tensors;
};

// The bytes of one written tensor, [begin, end) in the memory of `base`, and its place among
// the call's written tensors (rank: params first, then each buffer list in schema order).
struct WrittenSpan {
  uintptr_t base, begin, end;
  uint32_t rank;
};

// check_no_overlap's report: every written tensor placed, sorted by (base, begin, rank), and
// the first neighbours that overlap named, the later one in the call first. For a tensor whose
// storage holds no memory (meta, a FakeTensor under torch.compile) base is the storage and
// begin its byte offset there; the tensors of one call are on one device, so of one kind.
// Returns without a word where nothing overlaps (the meta kernels' check).
// zfkernels/_overlap.py makes the same report for the reference and Triton: every backend names
// the same pair in the same words.
inline void report_overlap(std::initializer_list<WrittenList> lists, size_t n) {
  std::vector<WrittenSpan> spans;
  spans.reserve(n);
  uint32_t rank = 0;
  for (const WrittenList& l : lists) {
    for (const Tensor& t : l.tensors) {
      const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
      // a fake tensor of symbolic shape (torch.compile's dynamic shapes) has no range to place:
      // skipped here, the real tensors are checked when the compiled graph calls the op
      const int64_t nbytes = impl->has_symbolic_sizes_strides() ? 0 : t.numel() * (int64_t)t.itemsize();
      if (nbytes > 0 && impl->has_storage()) {
        c10::StorageImpl* s = impl->unsafe_storage().unsafeGetStorageImpl();
        WrittenSpan w;
        if (s->_mutable_data_ptr_no_checks().get() != nullptr) {
          w.base = 0;
          w.begin = reinterpret_cast<uintptr_t>(t.data_ptr());
        } else {
          w.base = reinterpret_cast<uintptr_t>(s);
          w.begin = (uintptr_t)(t.storage_offset() * (int64_t)t.itemsize());
        }
        w.end = w.begin + (uintptr_t)nbytes;
        w.rank = rank;
        spans.push_back(w);
      }
      ++rank;
    }
  }
  std::sort(spans.begin(), spans.end(), [](const WrittenSpan& a, const WrittenSpan& b) {
    return a.base != b.base ? a.base < b.base : a.begin != b.begin ? a.begin < b.begin : a.rank < b.rank;
  });
  for (size_t i = 0; i + 1 < spans.size(); ++i) {
    const WrittenSpan& a = spans[i];
    const WrittenSpan& b = spans[i + 1];
    if (a.base != b.base || b.begin >= a.end) continue;
    const char* names[2] = {"", ""};
    size_t index[2] = {0, 0};
    const uint32_t ranks[2] = {std::max(a.rank, b.rank), std::min(a.rank, b.rank)};
    for (int j = 0; j < 2; ++j) {
      size_t r = ranks[j];
      for (const WrittenList& l : lists) {
        if (r < l.tensors.size()) {
          names[j] = l.name;
          index[j] = r;
          break;
        }
        r -= l.tensors.size();
      }
    }
    TORCH_CHECK_VALUE(false, "zfkernels: ", names[0], "[", index[0], "] overlaps ", names[1], "[", index[1],
                      "] in memory (the same tensor, or views of one storage); every tensor an op writes needs "
                      "memory of its own, or the backends would write different bits: pass each param once and "
                      "give each buffer its own storage (e.g. torch.zeros_like(param))");
  }
}

// No two tensors that one call writes share a byte of memory: two params (the same tensor twice,
// overlapping views), a buffer and a param (its own or another's), two buffers of one list or of
// two. Through shared memory each backend would write different bits (the cpu tiles, the
// reference's whole-tensor steps and the GPU's concurrent tiles each read what another store
// already changed, in their own order), or race, so such a call is refused before anything is
// written (docs/kernel-ops.md, "Errors"), by the cpu, cuda and meta kernels alike.
//
// The byte ranges [data, data + nbytes) sorted by start, neighbours compared: ranges overlap
// somewhere iff two neighbours do, so O(n log n), never a pairwise O(n^2) test. The tensors are
// contiguous (checked before), so the range is exactly what the kernels touch; zero-element
// tensors touch nothing and are skipped. This pass sorts bare 16-byte ranges; only a call that
// overlaps, or one on tensors without memory (meta), takes report_overlap's full sort.
// Host cost on the optimizer's ViT-B layout (152 tensors, 4 elements each; cpu, thread time,
// a busy 2-core machine): this function alone 1.8 us per call on params, 4 us on params +
// momentum (304 tensors), 6 us on params + m + v (456; report_overlap's 32-byte sort: 8.4 us),
// best of 7 x 20000 calls. Whole calls through zfkernels.call_op, best of 5 alternating runs of
// the build without and with it: perturb_ 45.0 -> 45.6 us, zo_sgd_update_ 56.2 -> 56.8 us (with
// momentum 81.4 -> 84.0 us), zo_adam_update_ 106.8 -> 111.3 us; a whole ZO-SGD step 253 -> 254 us,
// a ZO-Adam step 358 -> 372 us (two perturb_ and one update a step: ~10 us expected).
inline void check_no_overlap(std::initializer_list<WrittenList> lists) {
  struct Range {
    uintptr_t begin, end;
  };
  size_t n = 0;
  const Tensor* first = nullptr;  // params[0]: all tensors of a call are on its device (checked)
  for (const WrittenList& l : lists) {
    if (!first && !l.tensors.empty()) first = &l.tensors[0];
    n += l.tensors.size();
  }
  if (n < 2) return;
  const c10::TensorImpl* impl = first->unsafeGetTensorImpl();
  if (!impl->has_storage() || !impl->unsafe_storage().unsafeGetStorageImpl()->_mutable_data_ptr_no_checks())
    return report_overlap(lists, n);  // no memory (meta / fake, or an empty params[0]): placed by storage
  std::vector<Range> ranges;
  ranges.reserve(n);
  for (const WrittenList& l : lists) {
    for (const Tensor& t : l.tensors) {
      const int64_t nbytes = t.numel() * (int64_t)t.itemsize();
      if (nbytes == 0) continue;
      const uintptr_t b = reinterpret_cast<uintptr_t>(t.data_ptr());
      ranges.push_back(Range{b, b + (uintptr_t)nbytes});
    }
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  for (size_t i = 0; i + 1 < ranges.size(); ++i) {
    if (ranges[i + 1].begin < ranges[i].end) return report_overlap(lists, n);
  }
}

// The philox op's messages say what to give (the reference and the Triton op say the same
// after their prefix; tests/test_op_faces.py::test_philox_refusals_say_the_fix_on_every_backend).
inline void check_counters(const Tensor& c) {
  TORCH_CHECK_VALUE(c.layout() == at::kStrided, "zfkernels: counters must be a dense tensor; give a strided one "
                    "(counters.to_dense())");
  TORCH_CHECK_VALUE(c.scalar_type() == at::kLong, "zfkernels: counters has dtype ", c.scalar_type(),
                    "; use an int64 tensor (values in [0, 2**32)), e.g. counters.to(torch.int64)");
  TORCH_CHECK_VALUE(c.dim() == 2 && c.sym_size(1) == 4, "zfkernels: counters must have shape [N, 4], got ",
                    c.sym_sizes(),  // sym_: a symbolic N stays symbolic (see check_buffers)
                    "; give one row of four 32-bit counter words (c0, c1, c2, c3) per output row");
}

// After check_counters, on a tensor with rows (the meta kernel has no values to check).
inline void check_counter_values(const Tensor& c) {
  const int64_t lo = c.min().item<int64_t>(), hi = c.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < kIdLimit, "zfkernels: counters values must lie in [0, 2**32), got values from ",
                    lo, " to ", hi, "; each value is one 32-bit word of a counter: split a wider counter n over "
                    "the words, e.g. (n & 0xFFFFFFFF, n >> 32, 0, 0)");
}

inline void check_key(int64_t k, const char* name) {
  TORCH_CHECK_VALUE(k >= 0 && k < kIdLimit, "zfkernels: ", name, "=", k,
                    " must be a 32-bit unsigned integer in [0, 2**32); give one 32-bit word of the key, "
                    "e.g. key0 = seed & 0xFFFFFFFF and key1 = seed >> 32 for a 64-bit seed");
}

// The smallest double that rounds to inf in float32 (halfway between FLT_MAX and 2^128, which
// round-to-nearest-even sends up), and FLT_MAX: zfkernels/opspec.py F32_OVERFLOW, F32_MAX.
constexpr double kF32Overflow = 0x1.ffffffp+127;
constexpr double kF32Max = 0x1.fffffep+127;

// A double as Python's f"{v:g}" writes it (C's %g, which Python's format follows), so that the
// messages are opspec's to the character.
inline std::string fmt_g(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// A float option that is NaN, or (unless inf_ok) infinite in float32, where the kernels compute
// (+-inf, or a double of magnitude kF32Overflow or more, which rounds to +-inf): a call with it
// wrote inf / nan into the parameters on every backend. Refused before anything is written;
// zfkernels/opspec.py scalar_refusal, the same words, and FINITE_SCALARS, which options each op
// checks and when (an option of a feature only when the feature's buffer list is non-empty;
// inf_ok: Adam's eps, whose +-inf makes m / denom +-0, a finite update). Python writes every NaN
// as "nan" (C's %g may write "-nan").
inline std::string scalar_fix(const char* name, bool inf_ok) {  // built on a refusal only
  return std::string("; give ") + name + " a number" +
         (inf_ok ? std::string() : " of magnitude at most " + fmt_g(kF32Max) + " (float32's largest number)");
}
inline void check_scalar(double v, const char* name, bool inf_ok = false) {
  TORCH_CHECK_VALUE(!std::isnan(v), "zfkernels: ", name, "=nan is not a number: a call with it writes nan into the "
                    "parameters", scalar_fix(name, inf_ok));
  TORCH_CHECK_VALUE(inf_ok || std::fabs(v) < kF32Overflow, "zfkernels: ", name, "=", fmt_g(v),
                    " is infinite in float32, where the kernels compute: a call with it writes inf / nan into the "
                    "parameters", scalar_fix(name, inf_ok));
}

// The argument checks that every implementation (cpu, cuda, meta) of an op runs first.
inline void check_perturb_args(TensorList params, at::IntArrayRef tensor_ids, int64_t seed, double scale,
                               int64_t dist, int64_t mask_seed, int64_t mask_threshold) {
  check_params(params, tensor_ids);
  check_no_overlap({{"params", params}});
  check_seed(seed, "seed");
  check_stream_args(dist, mask_seed, mask_threshold);
  check_scalar(scale, "scale");
}

inline void check_sgd_args(TensorList params, TensorList momentum_buffers, TensorList history_buffers,
                           at::IntArrayRef tensor_ids, at::IntArrayRef seeds, at::ArrayRef<double> coeffs,
                           int64_t dist, int64_t mask_seed, int64_t mask_threshold, int64_t restore_seed,
                           double restore_scale, double lr, double weight_decay, double momentum, double dampening,
                           double history_alpha, int64_t round_seed) {
  check_params(params, tensor_ids);
  check_buffers(params, momentum_buffers, "momentum_buffers");
  check_buffers(params, history_buffers, "history_buffers");
  check_same_device(params, {momentum_buffers, history_buffers});
  check_no_overlap({{"params", params}, {"momentum_buffers", momentum_buffers}, {"history_buffers", history_buffers}});
  check_q(seeds, coeffs);
  check_stream_args(dist, mask_seed, mask_threshold);
  check_seed(restore_seed, "restore_seed");
  check_seed(round_seed, "round_seed");
  check_scalar(restore_scale, "restore_scale");  // opspec.FINITE_SCALARS["zo_sgd_update_"], in its order
  check_scalar(lr, "lr");
  check_scalar(weight_decay, "weight_decay");
  if (!momentum_buffers.empty()) {
    check_scalar(momentum, "momentum");
    check_scalar(dampening, "dampening");
  }
  if (!history_buffers.empty()) check_scalar(history_alpha, "history_alpha");
}

// Adam's decay rates in [0, 1), as torch.optim.Adam: beta1 = 1 makes the bias correction
// 1 - beta1^step zero, beta2 > 1 makes 1 - beta2^step negative (the square root of it NaN), and
// either outside the range no longer averages; NaN fails the test too.
inline void check_beta(double beta, const char* name, int index) {
  TORCH_CHECK_VALUE(beta >= 0.0 && beta < 1.0, "zfkernels: ", name, "=", beta, " (betas[", index,
                    "]) is outside [0, 1); Adam's decay rates need 0 <= beta < 1, e.g. betas=(0.9, 0.999)");
}

// The fp64 step size lr / (1 - beta1^step) and AdamW's decay factor 1 - lr * weight_decay that
// adam_scalars rounds to fp32 must be finite there: each option may be finite in float32 and
// they not (lr=3e38 at step 1 is 3e39), and the update then wrote inf / nan into every
// parameter. zfkernels/opspec.py adam_scalars_refusal, the same expressions and words (the face,
// the optimizers and the Python backends refuse with it). After check_beta: 1 - beta1^step > 0.
inline void check_adam_scalars(double lr, double beta1, int64_t step, double weight_decay,
                               bool decoupled_weight_decay) {
  const double bc1 = 1.0 - std::pow(beta1, (double)step);
  const double size = lr / bc1;
  TORCH_CHECK_VALUE(!(std::fabs(size) >= kF32Overflow), "zfkernels: lr=", fmt_g(lr), " makes Adam step ", step,
                    "'s bias-corrected step size lr / (1 - beta1**", step, ") = ", fmt_g(size), " (beta1=",
                    fmt_g(beta1), ") infinite in float32, where the kernels compute: the update would write inf / "
                    "nan into every parameter; give lr at most ", fmt_g(kF32Max * bc1),
                    " for this step (float32's largest number times 1 - beta1**", step, ")");
  const double decay = 1.0 - lr * weight_decay;
  TORCH_CHECK_VALUE(!(decoupled_weight_decay && std::fabs(decay) >= kF32Overflow), "zfkernels: lr=", fmt_g(lr),
                    " and weight_decay=", fmt_g(weight_decay),
                    " make AdamW's decay factor 1 - lr * weight_decay = ", fmt_g(decay),
                    " infinite in float32, where the kernels compute: the update would write inf / nan into every "
                    "parameter; give lr * weight_decay at most ", fmt_g(kF32Max), " (float32's largest number)");
}

inline void check_adam_args(TensorList params, TensorList exp_avgs, TensorList exp_avg_sqs,
                            TensorList history_buffers, at::IntArrayRef tensor_ids, at::IntArrayRef seeds,
                            at::ArrayRef<double> coeffs, int64_t dist, int64_t mask_seed, int64_t mask_threshold,
                            int64_t restore_seed, double restore_scale, double lr, double beta1, double beta2,
                            double eps, double weight_decay, bool decoupled_weight_decay, int64_t step,
                            double history_alpha, int64_t round_seed) {
  check_params(params, tensor_ids);
  check_buffers(params, exp_avgs, "exp_avgs", /*required=*/true);
  check_buffers(params, exp_avg_sqs, "exp_avg_sqs", /*required=*/true);
  check_buffers(params, history_buffers, "history_buffers");
  check_same_device(params, {exp_avgs, exp_avg_sqs, history_buffers});
  check_no_overlap({{"params", params}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
                    {"history_buffers", history_buffers}});
  check_q(seeds, coeffs);
  check_stream_args(dist, mask_seed, mask_threshold);
  check_seed(restore_seed, "restore_seed");
  check_seed(round_seed, "round_seed");
  check_beta(beta1, "beta1", 0);
  check_beta(beta2, "beta2", 1);
  TORCH_CHECK_VALUE(step >= 1, "zfkernels: step=", step,
                    " must be >= 1 (Adam's bias correction counts from 1)");
  check_adam_scalars(lr, beta1, step, weight_decay, decoupled_weight_decay);
  check_scalar(restore_scale, "restore_scale");  // opspec.FINITE_SCALARS["zo_adam_update_"], in its order
  check_scalar(lr, "lr");
  check_scalar(eps, "eps", /*inf_ok=*/true);
  check_scalar(weight_decay, "weight_decay");
  if (!history_buffers.empty()) check_scalar(history_alpha, "history_alpha");
}

// Host-side scalar preparation shared by CPU and CUDA: the same fp32 constants as
// zfkernels/reference.py ("1 - x" factors are computed in fp64 from the op's arguments,
// then rounded once to fp32).
inline float f32(double v) { return static_cast<float>(v); }

struct SgdScalars {
  float restore_scale, lr, wd, mu, one_minus_damp, alpha, one_minus_alpha;
};
inline SgdScalars sgd_scalars(double restore_scale, double lr, double weight_decay, double momentum,
                              double dampening, double history_alpha) {
  SgdScalars s;
  s.restore_scale = f32(restore_scale);
  s.lr = f32(lr);
  s.wd = f32(weight_decay);
  s.mu = f32(momentum);
  s.one_minus_damp = f32(1.0 - dampening);
  s.alpha = f32(history_alpha);
  s.one_minus_alpha = f32(1.0 - history_alpha);
  return s;
}

struct AdamScalars {
  float restore_scale, lr, wd, decay_factor, one_minus_b1, b2, one_minus_b2, eps, step_size,
      bc2_sqrt, alpha, one_minus_alpha;
};
inline AdamScalars adam_scalars(double restore_scale, double lr, double beta1, double beta2,
                                double eps, double weight_decay, int64_t step, double history_alpha) {
  AdamScalars s;   // betas in [0, 1) and step >= 1 were checked by check_adam_args
  s.restore_scale = f32(restore_scale);
  const double bc1 = 1.0 - std::pow(beta1, (double)step);
  const double bc2 = 1.0 - std::pow(beta2, (double)step);
  s.step_size = f32(lr / bc1);
  s.bc2_sqrt = f32(std::sqrt(bc2));
  s.lr = f32(lr);
  s.wd = f32(weight_decay);
  s.decay_factor = f32(1.0 - lr * weight_decay);
  s.b2 = f32(beta2);
  s.one_minus_b1 = f32(1.0 - beta1);
  s.one_minus_b2 = f32(1.0 - beta2);
  s.eps = f32(eps);
  s.alpha = f32(history_alpha);
  s.one_minus_alpha = f32(1.0 - history_alpha);
  return s;
}

}  // namespace zf_ops
