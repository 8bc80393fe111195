"""The operators of gmt_kernels: their schemas and fake (meta) implementations, defined in Python.

The schemas live here rather than in C++ so that they exist without the C++ extension and without
triton; the kernels register themselves for these names per device:

    gmt_kernels::radix_histogram, gmt_kernels::masked_adamw
        CPU:  the C++ kernels (csrc/ops.cpp, loaded by backends/cpu.py)
        CUDA: the Triton kernels (backends/triton/__init__.py)
    gmt_kernels::triton_radix_histogram, gmt_kernels::triton_masked_adamw, gmt_kernels::triton_radix_select
        the Triton kernels on whatever device they get: CUDA, or CPU tensors under the Triton
        interpreter (which the dispatcher cannot route through the CPU key the C++ kernels own).
    gmt_kernels::radix_select
        the shared state machine of the pass loop (radix.select_bins) on any device; on CPU
        state, the C++ copy of it (csrc/radix_select.cpp) when the extension is built; on CUDA,
        once the Triton backend is loaded, its one-launch kernel (backends/triton/select.py).

Arguments are Backend.radix_histogram / Backend.masked_adamw of backends/__init__.py with their
records flattened (options.py: Scoring.schema_args, AdamWOptions.schema_args, MaskSource.schema_args):
the key format as its name, lr split in two (a float, or a 0-d tensor passed as lr_tensor, then lr is
ignored), since a schema argument has one type. The mutation annotations (a!)..(f!) tell
torch.compile which arguments change in place; the ops return nothing, so their fake
implementations only have to exist for tracing to go through them.
"""

from __future__ import annotations

import torch

from .radix import select_bins

NAMESPACE = "gmt_kernels"

RADIX_HISTOGRAM_SCHEMA = (
    "(Tensor[] grads, int[] scope_of, Tensor state, Tensor(a!) hist, str key_format, *, "
    "str criterion, float score_eps, Tensor[] weights, Tensor? random_keys, Tensor? entry_offsets) -> ()"
)
RADIX_SELECT_SCHEMA = "(Tensor hist, Tensor(a!) state, int key_bits) -> ()"
MASKED_ADAMW_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] max_exp_avg_sqs, Tensor[] steps, Tensor thresholds, Tensor(e!) kept, Tensor(f!)[] masks, *, "
    "float lr, Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
    "bool maximize, str mask_mode, Tensor? grad_scale, Tensor? skip, str criterion, float score_eps, "
    "Tensor? random_keys, Tensor? entry_offsets, Tensor? refresh, bool update_params) -> ()"
)

# FRAGMENT, not DEF: the C++ extension adds kernels to this namespace (TORCH_LIBRARY_IMPL).
_library = torch.library.Library(NAMESPACE, "FRAGMENT")

OP_NAMES = ("radix_histogram", "masked_adamw", "triton_radix_histogram", "triton_masked_adamw", "radix_select",
            "triton_radix_select")
_SCHEMAS = {"radix_histogram": RADIX_HISTOGRAM_SCHEMA, "masked_adamw": MASKED_ADAMW_SCHEMA, "radix_select": RADIX_SELECT_SCHEMA}

for _name in OP_NAMES:
    _library.define(_name + _SCHEMAS[_name.removeprefix("triton_")])

    # Every argument an op changes is an input, and it returns nothing: tracing needs no shapes.
    @torch.library.register_fake(f"{NAMESPACE}::{_name}", lib=_library)
    def _mutates_inputs_only(*args, **kwargs) -> None:
        return None


# Every device; the C++ extension registers a faster kernel for the CPU key, the Triton backend one
# for the CUDA key.
_library.impl("radix_select", select_bins, "CompositeExplicitAutograd")


def split_lr(lr) -> dict:
    """The (lr, lr_tensor) pair of the masked_adamw schemas for a float or 0-d tensor lr."""
    if isinstance(lr, torch.Tensor):
        return {"lr": 0.0, "lr_tensor": lr}
    return {"lr": float(lr), "lr_tensor": None}


def joined_lr(lr: float, lr_tensor):
    """The lr a backend function takes, back from the schema's (lr, lr_tensor) pair."""
    return lr if lr_tensor is None else lr_tensor
