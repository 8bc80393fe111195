// Backend.masked_adamw for CPU tensors: one pass that reads g, p, m, v (and max_v) once and writes
// p, m, v (and max_v) once, for all tensors of a param group, split over threads as one index space.
//
// The arithmetic follows the reference backend op for op (torch.optim.AdamW's single-tensor
// update, scalars rounded where torch rounds them), so results agree with it to fp32 rounding.
// The loop is plain C++ that GCC vectorises; GMT_MULTIVERSION compiles it for AVX-512, AVX2 and
// the baseline ISA. -ffp-contract=off (setup.py) keeps every clone's rounding the same.
#include "ops.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>

namespace gmt {
namespace {

// Per-tensor constants of one step, rounded to the compute type C as the reference rounds them.
template <class C>
struct Coeffs {
  C decay, lerp_weight, one_minus_lerp_weight, beta2, one_minus_beta2, eps, neg_step_size, bias_correction2_sqrt;
  C grad_scale, sign;
  bool small_lerp_weight;  // torch's lerp picks its formula by |weight| < 0.5
};

// One tensor's part [first, last) as typed pointers, and where its kept count goes.
struct Piece {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  int64_t n;
};

template <class P>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

template <class C, class P>
inline C load(const P& x) {
  return static_cast<C>(x);
}
template <class P, class C>
inline P store(C x) {
  return static_cast<P>(x);
}

template <class C>
inline C nan_propagating_max(C a, C b) {  // torch.maximum: NaN wins
  C larger = a > b ? a : b;
  return a != a ? a : larger;
}

template <class P, class T, bool AMSGRAD, bool FREEZE, bool SCALED>
__attribute__((always_inline)) inline int64_t update(const Piece& piece, const Coeffs<typename Compute<P>::type>& c,
                                                    T threshold) {
  using C = typename Compute<P>::type;
  P* __restrict p = static_cast<P*>(piece.param);
  const P* __restrict g = static_cast<const P*>(piece.grad);
  P* __restrict m = static_cast<P*>(piece.exp_avg);
  P* __restrict v = static_cast<P*>(piece.exp_avg_sq);
  P* __restrict vmax = static_cast<P*>(piece.max_exp_avg_sq);
  // Locals, not reads through `c`: the compiler cannot prove the stores below leave `c` alone, and
  // a loop that re-reads its constants (or branches on one) is not vectorised.
  const C decay = c.decay, lerp_weight = c.lerp_weight, one_minus_lerp_weight = c.one_minus_lerp_weight;
  const C beta2 = c.beta2, one_minus_beta2 = c.one_minus_beta2, eps = c.eps, neg_step_size = c.neg_step_size;
  const C bias_correction2_sqrt = c.bias_correction2_sqrt, grad_scale = c.grad_scale, sign = c.sign;
  const bool small_lerp_weight = c.small_lerp_weight;
  int64_t kept = 0;
  // 32-bit counts inside a block keep the count in the float lanes' width (vectorises cleanly).
  constexpr int64_t kBlock = int64_t(1) << 30;
  for (int64_t start = 0; start < piece.n; start += kBlock) {
    const int64_t stop = std::min(piece.n, start + kBlock);
    int32_t block_kept = 0;
#pragma omp simd reduction(+ : block_kept)
    for (int64_t i = start; i < stop; ++i) {
      const C raw = load<C>(g[i]);
      const T score = static_cast<T>(std::abs(raw));
      const bool keep = (score >= threshold) | (raw != raw);  // NaN counts as the largest score
      block_kept += keep;
      C grad = SCALED ? raw / grad_scale : raw;
      grad = grad * sign;
      if (!FREEZE) grad = keep ? grad : C(0);
      const C m_old = load<C>(m[i]), v_old = load<C>(v[i]);
      const C diff = grad - m_old;
      const C m_new = small_lerp_weight ? m_old + lerp_weight * diff : grad - diff * one_minus_lerp_weight;
      const C v_new = v_old * beta2 + one_minus_beta2 * grad * grad;
      C second = v_new;
      C vmax_new = C(0);
      if (AMSGRAD) {
        vmax_new = nan_propagating_max(load<C>(vmax[i]), v_new);
        second = vmax_new;
      }
      const C denom = std::sqrt(second) / bias_correction2_sqrt + eps;
      const C p_new = load<C>(p[i]) * decay + (m_new * neg_step_size) / denom;
      if (FREEZE) {  // masked entries keep everything, weight decay included
        p[i] = keep ? store<P>(p_new) : p[i];
        m[i] = keep ? store<P>(m_new) : m[i];
        v[i] = keep ? store<P>(v_new) : v[i];
        if (AMSGRAD) vmax[i] = keep ? store<P>(vmax_new) : vmax[i];
      } else {
        p[i] = store<P>(p_new);
        m[i] = store<P>(m_new);
        v[i] = store<P>(v_new);
        if (AMSGRAD) vmax[i] = store<P>(vmax_new);
      }
    }
    kept += block_kept;
  }
  return kept;
}

struct Flags {
  bool amsgrad, freeze, scaled;
};

template <class P, class T>
__attribute__((always_inline)) inline int64_t dispatch_flags(const Piece& piece,
                                                            const Coeffs<typename Compute<P>::type>& c,
                                                            T threshold, Flags f) {
#define GMT_CASE(A, F, S) \
  if (f.amsgrad == A && f.freeze == F && f.scaled == S) return update<P, T, A, F, S>(piece, c, threshold);
  GMT_CASE(false, false, false) GMT_CASE(false, false, true) GMT_CASE(false, true, false)
  GMT_CASE(false, true, true) GMT_CASE(true, false, false) GMT_CASE(true, false, true)
  GMT_CASE(true, true, false) GMT_CASE(true, true, true)
#undef GMT_CASE
  return 0;
}

// One multiversioned entry point per (parameter type, threshold type); the flag variants are
// inlined into each ISA clone.
#define GMT_ENTRY(NAME, P, T)                                                                       \
  GMT_MULTIVERSION int64_t NAME(const Piece& piece, const Coeffs<Compute<P>::type>& c, T threshold, \
                                Flags f) {                                                          \
    return dispatch_flags<P, T>(piece, c, threshold, f);                                            \
  }
GMT_ENTRY(update_float_f32, float, float)
GMT_ENTRY(update_float_f64, float, double)
GMT_ENTRY(update_half_f32, c10::Half, float)
GMT_ENTRY(update_half_f64, c10::Half, double)
GMT_ENTRY(update_bfloat16_f32, c10::BFloat16, float)
GMT_ENTRY(update_bfloat16_f64, c10::BFloat16, double)
GMT_ENTRY(update_double_f32, double, float)
GMT_ENTRY(update_double_f64, double, double)
#undef GMT_ENTRY

int64_t run_piece(at::ScalarType param_type, bool double_threshold, const Piece& piece, const Coeffs<float>& cf,
                  const Coeffs<double>& cd, double threshold, Flags f) {
  const float tf = static_cast<float>(threshold);
  switch (param_type) {
    case at::kFloat:
      return double_threshold ? update_float_f64(piece, cf, threshold, f) : update_float_f32(piece, cf, tf, f);
    case at::kHalf:
      return double_threshold ? update_half_f64(piece, cf, threshold, f) : update_half_f32(piece, cf, tf, f);
    case at::kBFloat16:
      return double_threshold ? update_bfloat16_f64(piece, cf, threshold, f) : update_bfloat16_f32(piece, cf, tf, f);
    case at::kDouble:
      return double_threshold ? update_double_f64(piece, cd, threshold, f) : update_double_f32(piece, cd, tf, f);
    default:
      TORCH_CHECK(false, "unreachable: parameter dtype was validated");
  }
}

template <class C>
Coeffs<C> coefficients(double lr, double decay, double step, double beta1, double beta2, double eps,
                       double grad_scale, bool maximize) {
  Coeffs<C> c;
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
                      const at::Tensor& thresholds, const at::Tensor& kept, double lr,
                      const c10::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                      double weight_decay, bool amsgrad, bool maximize, c10::string_view mask_mode,
                      const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& skip) {
  const size_t n = params.size();
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
  const Flags flags{amsgrad, mask_mode == "freeze", grad_scale.has_value()};
  const bool double_threshold = thresholds.scalar_type() == at::kDouble;
  const at::Tensor thresholds64 = thresholds.to(at::kDouble);
  const double* threshold_of = thresholds64.data_ptr<double>();
  const float decay_f = decay_factor<float>(lr_value, lr_tensor, weight_decay);
  const double decay_d = decay_factor<double>(lr_value, lr_tensor, weight_decay);

  // Operands as dense memory blocks of one common layout, so entry j of every operand is element j
  // of its block. A tensor whose layout differs (rare: states are created like the parameter)
  // is worked on as a contiguous copy and copied back.
  std::vector<std::array<at::Tensor, 5>> operands(n);
  std::vector<std::array<bool, 5>> copied(n);
  std::vector<Coeffs<float>> coeffs_f(n);
  std::vector<Coeffs<double>> coeffs_d(n);
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
    coeffs_f[i] = coefficients<float>(lr_value, decay_f, step, beta1, beta2, eps, scale, maximize);
    coeffs_d[i] = coefficients<double>(lr_value, decay_d, step, beta1, beta2, eps, scale, maximize);
    sizes[i] = params[i].numel();
  }

  FlatIndex flat(sizes);
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
      const int64_t count = run_piece(ops[0].scalar_type(), double_threshold, piece, coeffs_f[i], coeffs_d[i],
                                      threshold_of[i], flags);
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
