// Operator schemas of gmt_kernels and their CPU kernels. The schemas are device-neutral so that
// another backend (Triton on CUDA) can register kernels for the same names under its dispatch key.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(gmt_kernels, m) {
  m.def(
      "radix_histogram(Tensor[] grads, int[] scope_of, Tensor state, Tensor(a!) hist, str key_format, "
      "int shift, int width) -> ()");
  // lr is a float, or a 0-d tensor passed as lr_tensor (then lr is ignored), as torch.optim.AdamW's.
  m.def(
      "masked_adamw(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor[] steps, Tensor thresholds, Tensor(e!) kept, *, float lr, "
      "Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
      "bool maximize, str mask_mode, Tensor? grad_scale, Tensor? skip) -> ()");
}

TORCH_LIBRARY_IMPL(gmt_kernels, CPU, m) {
  m.impl("radix_histogram", &gmt::radix_histogram_cpu);
  m.impl("masked_adamw", &gmt::masked_adamw_cpu);
}
