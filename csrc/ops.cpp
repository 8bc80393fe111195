// The CPU kernels of the gmt_kernels operators. The schemas are defined in Python
// (gmt_kernels/ops.py), so that they exist without this extension and can carry fake
// implementations for torch.compile; here only the CPU dispatch key is filled, and the Triton
// backend fills the CUDA key of the same names. gmt_kernels/backends/cpu.py imports gmt_kernels.ops
// before this extension, so the schemas are there when these kernels are checked against them.
//
// This file is the one place that reads the schemas' argument lists: it unpacks them into the
// records of ops.h (Scoring, AdamWOptions, MaskSource), which the kernels take.
#include <torch/library.h>

#include "ops.h"

namespace gmt {
namespace {

Criterion parse_criterion(c10::string_view name, const char* op) {
  if (name == "grad") return Criterion::kGrad;
  if (name == "grad_over_weight") return Criterion::kGradOverWeight;
  if (name == "random") return Criterion::kRandom;
  TORCH_CHECK(false, "gmt_kernels::", op, ": unknown criterion '", std::string(name),
              "'; expected 'grad', 'grad_over_weight' or 'random' (SEMANTICS.md section 8).");
}

Scoring unpack_scoring(const char* op, c10::string_view criterion, double score_eps, at::TensorList weights,
                       const c10::optional<at::Tensor>& random_keys, const c10::optional<at::Tensor>& entry_offsets) {
  Scoring s;
  s.criterion = parse_criterion(criterion, op);
  s.score_eps = score_eps;
  s.weights.assign(weights.begin(), weights.end());
  if (random_keys.has_value()) s.random_keys = *random_keys;
  if (entry_offsets.has_value()) s.entry_offsets = *entry_offsets;
  return s;
}

void radix_histogram_op(at::TensorList grads, at::IntArrayRef scope_of, const at::Tensor& state,
                        const at::Tensor& hist, c10::string_view key_format, c10::string_view criterion,
                        double score_eps, at::TensorList weights, const c10::optional<at::Tensor>& random_keys,
                        const c10::optional<at::Tensor>& entry_offsets) {
  const Scoring scoring = unpack_scoring("radix_histogram", criterion, score_eps, weights, random_keys, entry_offsets);
  radix_histogram_cpu(grads, scope_of, state, hist, std::string(key_format.data(), key_format.size()), scoring);
}

void masked_adamw_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& thresholds,
                     const at::Tensor& kept, at::TensorList masks, double lr, const c10::optional<at::Tensor>& lr_tensor,
                     double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                     c10::string_view mask_mode, const c10::optional<at::Tensor>& grad_scale,
                     const c10::optional<at::Tensor>& skip, c10::string_view criterion, double score_eps,
                     const c10::optional<at::Tensor>& random_keys, const c10::optional<at::Tensor>& entry_offsets,
                     const c10::optional<at::Tensor>& refresh, bool update_params) {
  TORCH_CHECK(mask_mode == "grad" || mask_mode == "freeze", "gmt_kernels::masked_adamw: unknown mask_mode '",
              std::string(mask_mode), "'; expected 'grad' or 'freeze' (SEMANTICS.md section 3).");
  AdamWOptions options;
  options.lr = lr;
  options.lr_tensor = lr_tensor;
  options.beta1 = beta1;
  options.beta2 = beta2;
  options.eps = eps;
  options.weight_decay = weight_decay;
  options.amsgrad = amsgrad;
  options.maximize = maximize;
  options.freeze = mask_mode == "freeze";
  options.grad_scale = grad_scale;
  options.skip = skip;
  MaskSource mask;
  mask.thresholds = thresholds;
  mask.scoring = unpack_scoring("masked_adamw", criterion, score_eps, {}, random_keys, entry_offsets);
  mask.masks.assign(masks.begin(), masks.end());
  mask.refresh = refresh;
  mask.update_params = update_params;
  masked_adamw_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, kept, options, mask);
}

}  // namespace

void Scoring::check(const char* op, size_t n) const {
  if (criterion != Criterion::kRandom) return;
  for (const auto* t : {&random_keys, &entry_offsets}) {
    TORCH_CHECK(t->defined() && t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 &&
                    t->size(0) == int64_t(n) && t->is_contiguous(),
                "gmt_kernels::", op, ": criterion 'random' needs random_keys and entry_offsets, each a contiguous int64 ",
                "CPU tensor [", n, "] (one per tensor; options.Scoring); got ",
                t->defined() ? c10::str(t->scalar_type(), " ", t->sizes(), " on ", t->device()) : std::string("None"), ".");
  }
}

}  // namespace gmt

TORCH_LIBRARY_IMPL(gmt_kernels, CPU, m) {
  m.impl("radix_histogram", &gmt::radix_histogram_op);
  m.impl("masked_adamw", &gmt::masked_adamw_op);
  m.impl("radix_select", &gmt::radix_select_cpu);
}
