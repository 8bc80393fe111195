// The two kernels of the C++ CPU backend (Backend.radix_histogram and Backend.masked_adamw of
// gmt_kernels/backends/__init__.py, whose docstring is their contract) and the CPU copy of the pass
// loop's select step (radix.select_bins), registered in ops.cpp for the CPU key of the schemas in
// gmt_kernels/ops.py.
#pragma once

#include <ATen/ATen.h>

#include "flat_work.h"

namespace gmt {

void radix_histogram_cpu(at::TensorList grads, at::IntArrayRef scope_of, const at::Tensor& state,
                         const at::Tensor& hist, c10::string_view key_format, c10::string_view criterion,
                         double score_eps, at::TensorList weights, const c10::optional<at::Tensor>& random_keys,
                         const c10::optional<at::Tensor>& entry_offsets);

void radix_select_cpu(const at::Tensor& hist, const at::Tensor& state, int64_t key_bits);

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                      const at::Tensor& thresholds, const at::Tensor& kept, at::TensorList masks, double lr,
                      const c10::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                      double weight_decay, bool amsgrad, bool maximize, c10::string_view mask_mode,
                      const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& skip,
                      c10::string_view criterion, double score_eps, const c10::optional<at::Tensor>& random_keys,
                      const c10::optional<at::Tensor>& entry_offsets, const c10::optional<at::Tensor>& refresh,
                      bool update_params);

}  // namespace gmt
