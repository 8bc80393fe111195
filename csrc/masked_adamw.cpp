// Backend.masked_adamw for CPU tensors: one pass that reads g, p, m, v (and max_v) once and writes
// p, m, v (and max_v) once, for all tensors of a param group, split over threads as one index space.
//
// The arithmetic follows the reference backend op for op (torch.optim.AdamW's single-tensor
// update, scalars rounded where torch rounds them), so results agree with it to fp32 rounding.
// The loop (masked_adamw_kernel.h) is written once against the lane structs of simd.h and compiled
// for AVX-512, AVX2, NEON and one lane (the portable level); cpu::kernel_level picks one per call.
// No FMA anywhere: every variant rounds like the reference.
#include "ops.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "cpu_capability.h"
#include "simd.h"

namespace gmt {
namespace {

// Per-tensor constants of one step, rounded to the compute type C as the reference rounds them.
template <class C>
struct UpdateCoeffs {
  C threshold, decay, lerp_weight, one_minus_lerp_weight, beta2, one_minus_beta2, eps, neg_step_size,
      bias_correction2_sqrt;
  C grad_scale, sign;
  bool small_lerp_weight;  // torch's lerp picks its formula by |weight| < 0.5
};

// One tensor's part [first, last) as untyped pointers (entry 0 is `first`).
struct Piece {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  int64_t n;
};

struct UpdateFlags {
  bool amsgrad, freeze, scaled;
};

enum class ParamKind { kFloat, kBFloat16, kHalf, kDouble };

static_assert(sizeof(c10::BFloat16) == 2 && sizeof(c10::Half) == 2, "16-bit float storage");

namespace isa_default {
using VF = simd::Scalar<float>;
using VD = simd::Scalar<double>;
#include "masked_adamw_kernel.h"
}  // namespace isa_default

#ifdef GMT_SIMD_X86
namespace isa_avx2 {
GMT_BEGIN_AVX2
using VF = simd::avx2::F32x2;  // two registers a step: see simd.h
using VD = simd::avx2::F64;
#include "masked_adamw_kernel.h"
GMT_END
}  // namespace isa_avx2

namespace isa_avx512 {
GMT_BEGIN_AVX512
using VF = simd::avx512::F32;
using VD = simd::avx512::F64;
#include "masked_adamw_kernel.h"
GMT_END
}  // namespace isa_avx512
#endif

#ifdef GMT_SIMD_NEON
namespace isa_neon {
using VF = simd::neon::F32;
using VD = simd::neon::F64;
#include "masked_adamw_kernel.h"
}  // namespace isa_neon
#endif

int64_t run_piece(cpu::Level level, ParamKind kind, const Piece& piece, const UpdateCoeffs<float>& cf,
                  const UpdateCoeffs<double>& cd, UpdateFlags f) {
  switch (level) {
#ifdef GMT_SIMD_X86
    case cpu::Level::kAvx512: return isa_avx512::update_piece(kind, piece, cf, cd, f);
    case cpu::Level::kAvx2: return isa_avx2::update_piece(kind, piece, cf, cd, f);
#endif
#ifdef GMT_SIMD_NEON
    case cpu::Level::kNeon: return isa_neon::update_piece(kind, piece, cf, cd, f);
#endif
    default: return isa_default::update_piece(kind, piece, cf, cd, f);
  }
}

ParamKind param_kind(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return ParamKind::kFloat;
    case at::kBFloat16: return ParamKind::kBFloat16;
    case at::kHalf: return ParamKind::kHalf;
    case at::kDouble: return ParamKind::kDouble;
    default: TORCH_CHECK(false, "unreachable: parameter dtype was validated");
  }
}

// The float threshold that keeps exactly the floats a double threshold keeps: the least float >= t
// (|g| of a float is a float, so |g| >= t iff |g| >= that float).
float float_threshold_at_least(double t) {
  if (t != t) return std::numeric_limits<float>::quiet_NaN();
  if (t > double(std::numeric_limits<float>::max())) return std::numeric_limits<float>::infinity();
  float f = static_cast<float>(t);
  if (double(f) < t) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

template <class C>
UpdateCoeffs<C> coefficients(C threshold, double lr, double decay, double step, double beta1, double beta2,
                             double eps, double grad_scale, bool maximize) {
  UpdateCoeffs<C> c;
  c.threshold = threshold;
  const double bias_correction1 = 1.0 - std::pow(beta1, step);
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  c.decay = static_cast<C>(decay);
  c.lerp_weight = static_cast<C>(1.0 - beta1);
  c.one_minus_lerp_weight = C(1) - c.lerp_weight;
  c.small_lerp_weight = std::abs(c.lerp_weight) < C(0.5);
  c.beta2 = static_cast<C>(beta2);
  c.one_minus_beta2 = static_cast<C>(1.0 - beta2);
  c.eps = static_cast<C>(eps);
  c.neg_step_size = static_cast<C>(-(lr / bias_correction1));
  c.bias_correction2_sqrt = static_cast<C>(std::sqrt(bias_correction2));
  c.grad_scale = static_cast<C>(grad_scale);
  c.sign = maximize ? C(-1) : C(1);
  return c;
}

// p * (1 - lr * weight_decay) as the reference computes it: a float lr in double (Python), a
// tensor lr in the tensor's own dtype.
template <class C>
C decay_factor(double lr, const c10::optional<at::Tensor>& lr_tensor, double weight_decay) {
  if (lr_tensor.has_value() && lr_tensor->scalar_type() == at::kFloat) {
    const float lrf = lr_tensor->item<float>();
    return static_cast<C>(1.0f - lrf * static_cast<float>(weight_decay));
  }
  return static_cast<C>(1.0 - lr * weight_decay);
}

void check_same(const at::Tensor& t, const at::Tensor& param, const char* what, size_t i) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == param.scalar_type() && t.sizes() == param.sizes(),
              "gmt_kernels::masked_adamw (C++ CPU backend): ", what, "[", i, "] must be a CPU tensor of the ",
              "parameter's dtype and shape (", param.scalar_type(), " ", param.sizes(), "); got ", t.scalar_type(),
              " ", t.sizes(), " on ", t.device(), ".");
}

}  // namespace

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                      const at::Tensor& thresholds, const at::Tensor& kept, at::TensorList masks, double lr,
                      const c10::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                      double weight_decay, bool amsgrad, bool maximize, c10::string_view mask_mode,
                      const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& skip,
                      c10::string_view criterion, double /*score_eps*/,
                      const c10::optional<at::Tensor>& /*random_keys*/,
                      const c10::optional<at::Tensor>& /*entry_offsets*/, const c10::optional<at::Tensor>& refresh,
                      bool update_params) {
  const size_t n = params.size();
  // Only GMT's |g| score so far; the other criteria and stored masks (SEMANTICS.md section 8) follow.
  TORCH_CHECK(criterion == "grad" && masks.empty() && !refresh.has_value() && update_params,
              "gmt_kernels::masked_adamw (C++ CPU backend): criterion '", std::string(criterion),
              "' and stored masks are not supported yet; use backend='reference'.");
  TORCH_CHECK(mask_mode == "grad" || mask_mode == "freeze", "gmt_kernels::masked_adamw: unknown mask_mode '",
              std::string(mask_mode), "'; expected 'grad' or 'freeze' (SEMANTICS.md section 3).");
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n &&
                  (amsgrad ? max_exp_avg_sqs.size() == n : max_exp_avg_sqs.empty()),
              "gmt_kernels::masked_adamw: expected one grad, exp_avg, exp_avg_sq, step",
              amsgrad ? " and max_exp_avg_sq" : "", " per parameter (", n, " parameters) and ",
              amsgrad ? "" : "no max_exp_avg_sqs without amsgrad; ", "got ", grads.size(), ", ", exp_avgs.size(),
              ", ", exp_avg_sqs.size(), ", ", steps.size(), ", ", max_exp_avg_sqs.size(), ".");
  TORCH_CHECK(thresholds.device().is_cpu() && thresholds.dim() == 1 && thresholds.size(0) == int64_t(n) &&
                  (thresholds.scalar_type() == at::kFloat || thresholds.scalar_type() == at::kDouble),
              "gmt_kernels::masked_adamw: thresholds must be a float32 or float64 CPU tensor [", n, "]; got ",
              thresholds.scalar_type(), " ", thresholds.sizes(), " on ", thresholds.device(), ".");
  TORCH_CHECK(kept.device().is_cpu() && kept.scalar_type() == at::kLong && kept.dim() == 1 &&
                  kept.size(0) == int64_t(n) && kept.is_contiguous(),
              "gmt_kernels::masked_adamw: kept must be a contiguous int64 CPU tensor [", n, "]; got ",
              kept.scalar_type(), " ", kept.sizes(), " on ", kept.device(), ".");
  for (const auto* opt : {&lr_tensor, &grad_scale, &skip}) {
    TORCH_CHECK(!opt->has_value() || ((*opt)->numel() == 1 && (*opt)->device().is_cpu()),
                "gmt_kernels::masked_adamw: lr_tensor, grad_scale and skip must be one-element CPU tensors.");
  }
  if (skip.has_value() && skip->item<bool>()) return;  // a skipped step changes nothing at all

  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu(), "gmt_kernels::masked_adamw (C++ CPU backend): parameter ", i, " is on ",
                p.device(), "; this backend serves CPU tensors only. Use backend='auto' to pick one per device.");
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble || p.scalar_type() == at::kHalf ||
                    p.scalar_type() == at::kBFloat16,
                "gmt_kernels::masked_adamw: parameter ", i, " is ", p.scalar_type(),
                "; supported dtypes are float32, float64, float16 and bfloat16.");
    check_same(grads[i], p, "grads", i);
    check_same(exp_avgs[i], p, "exp_avgs", i);
    check_same(exp_avg_sqs[i], p, "exp_avg_sqs", i);
    if (amsgrad) check_same(max_exp_avg_sqs[i], p, "max_exp_avg_sqs", i);
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].device().is_cpu(), "gmt_kernels::masked_adamw: steps[", i,
                "] must be a one-element CPU tensor (the state's 'step').");
  }

  const double lr_value = lr_tensor.has_value() ? lr_tensor->item<double>() : lr;
  const double scale = grad_scale.has_value() ? grad_scale->item<double>() : 1.0;
  const UpdateFlags flags{amsgrad, mask_mode == "freeze", grad_scale.has_value()};
  const at::Tensor thresholds64 = thresholds.to(at::kDouble);
  const double* threshold_of = thresholds64.data_ptr<double>();
  const float decay_f = decay_factor<float>(lr_value, lr_tensor, weight_decay);
  const double decay_d = decay_factor<double>(lr_value, lr_tensor, weight_decay);

  // Operands as dense memory blocks of one common layout, so entry j of every operand is element j
  // of its block. A tensor whose layout differs (rare: states are created like the parameter)
  // is worked on as a contiguous copy and copied back.
  std::vector<std::array<at::Tensor, 5>> operands(n);
  std::vector<std::array<bool, 5>> copied(n);
  std::vector<UpdateCoeffs<float>> coeffs_f(n);
  std::vector<UpdateCoeffs<double>> coeffs_d(n);
  std::vector<int64_t> sizes(n);
  for (size_t i = 0; i < n; ++i) {
    std::array<at::Tensor, 5> original{params[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
                                       amsgrad ? max_exp_avg_sqs[i] : at::Tensor()};
    const bool shared_layout = std::all_of(original.begin(), original.begin() + (amsgrad ? 5 : 4), [&](const at::Tensor& t) {
      return t.is_non_overlapping_and_dense() && t.strides() == params[i].strides();
    });
    for (int k = 0; k < 5; ++k) {
      copied[i][k] = original[k].defined() && !shared_layout && !original[k].is_contiguous();
      operands[i][k] = copied[i][k] ? original[k].contiguous() : original[k];
    }
    const double step = steps[i].item<double>();
    coeffs_f[i] = coefficients<float>(float_threshold_at_least(threshold_of[i]), lr_value, decay_f, step, beta1, beta2, eps, scale, maximize);
    coeffs_d[i] = coefficients<double>(threshold_of[i], lr_value, decay_d, step, beta1, beta2, eps, scale, maximize);
    sizes[i] = params[i].numel();
  }

  FlatIndex flat(sizes);
  const cpu::Level level = cpu::kernel_level(cpu::Kernel::kMaskedAdamw);
  int64_t* kept_out = kept.data_ptr<int64_t>();
  at::parallel_for(0, flat.total(), kGrain, [&](int64_t begin, int64_t end) {
    flat.for_each_piece(begin, end, [&](size_t i, int64_t first, int64_t last) {
      const auto& ops = operands[i];
      const int64_t elem = ops[0].element_size();
      auto at_first = [&](const at::Tensor& t) {
        return t.defined() ? static_cast<void*>(static_cast<char*>(t.data_ptr()) + first * elem) : nullptr;
      };
      const Piece piece{at_first(ops[0]), at_first(ops[1]), at_first(ops[2]), at_first(ops[3]), at_first(ops[4]),
                        last - first};
      const int64_t count = run_piece(level, param_kind(ops[0].scalar_type()), piece, coeffs_f[i], coeffs_d[i], flags);
      atomic_add(kept_out + i, count);
    });
  });

  for (size_t i = 0; i < n; ++i) {
    const at::Tensor mutated[] = {params[i], at::Tensor(), exp_avgs[i], exp_avg_sqs[i],
                                  amsgrad ? max_exp_avg_sqs[i] : at::Tensor()};
    for (int k = 0; k < 5; ++k) {
      if (copied[i][k] && mutated[k].defined()) mutated[k].copy_(operands[i][k]);
    }
  }
}

}  // namespace gmt
