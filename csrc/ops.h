// The two kernels of the C++ CPU backend (Backend.radix_histogram and Backend.masked_adamw of
// gmt_kernels/backends/__init__.py, whose docstring is their contract) and the CPU copy of the pass
// loop's select step (radix.select_bins), registered in ops.cpp for the CPU key of the schemas in
// gmt_kernels/ops.py.
//
// ops.cpp unpacks the schemas' keyword arguments once into the records below (the C++ side of
// gmt_kernels/options.py: AdamWOptions, Scoring, MaskSource); the kernels take the records.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "flat_work.h"

namespace gmt {

enum class Criterion { kGrad, kGradOverWeight, kRandom };

// How entries are scored (SEMANTICS.md section 8), the same in the histogram and the update.
struct Scoring {
  Criterion criterion = Criterion::kGrad;
  double score_eps = 1e-8;             // grad_over_weight: s = |g| / (|theta| + score_eps)
  std::vector<at::Tensor> weights;     // grad_over_weight, histogram only: theta per tensor
  at::Tensor random_keys;              // random: int64 [n] CPU, the tensors' 32-bit keys
  at::Tensor entry_offsets;            // random: int64 [n] CPU, index of each tensor's first entry

  // Checks the criterion's inputs for `n` tensors (what is missing or malformed, and what to pass).
  void check(const char* op, size_t n) const;
  uint32_t random_key(size_t i) const { return uint32_t(random_keys.data_ptr<int64_t>()[i]); }
  uint64_t entry_offset(size_t i) const { return uint64_t(entry_offsets.data_ptr<int64_t>()[i]); }
};

// One param group's AdamW hyper-parameters and the step's AMP / skip inputs.
struct AdamWOptions {
  double lr = 0.0;
  c10::optional<at::Tensor> lr_tensor;  // 0-d: used instead of lr
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  bool amsgrad = false, maximize = false;
  bool freeze = false;                  // mask_mode "freeze" (else "grad")
  c10::optional<at::Tensor> grad_scale; // 0-d: g is divided by it
  c10::optional<at::Tensor> skip;       // 0-d bool: when true nothing at all changes
};

// Which entries the update keeps.
struct MaskSource {
  at::Tensor thresholds;              // [n] float32 (float64 for the f64 and u32 key formats)
  Scoring scoring;
  std::vector<at::Tensor> masks;      // stored 1-bit masks (uint8 (d0, ceil(inner / 8))), or none
  c10::optional<at::Tensor> refresh;  // None / true: score (and store if masks); false: read masks
  bool update_params = true;          // false: write masks and kept only
};

void radix_histogram_cpu(at::TensorList grads, at::IntArrayRef scope_of, const at::Tensor& state,
                         const at::Tensor& hist, const std::string& key_format, const Scoring& scoring);

void radix_select_cpu(const at::Tensor& hist, const at::Tensor& state, int64_t key_bits);

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                      const at::Tensor& kept, const AdamWOptions& options, const MaskSource& mask);

}  // namespace gmt
