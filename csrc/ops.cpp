// The CPU kernels of the gmt_kernels operators. The schemas are defined in Python
// (gmt_kernels/ops.py), so that they exist without this extension and can carry fake
// implementations for torch.compile; here only the CPU dispatch key is filled, and the Triton
// backend fills the CUDA key of the same names. gmt_kernels/backends/cpu.py imports gmt_kernels.ops
// before this extension, so the schemas are there when these kernels are checked against them.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(gmt_kernels, CPU, m) {
  m.impl("radix_histogram", &gmt::radix_histogram_cpu);
  m.impl("masked_adamw", &gmt::masked_adamw_cpu);
  m.impl("radix_select", &gmt::radix_select_cpu);
}
