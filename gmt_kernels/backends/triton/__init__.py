"""The Triton backend: the radix histogram pass and the fused masked-AdamW pass as Triton kernels.

Serves float16, bfloat16, float32 and float64 tensors:
- on CUDA (and ROCm) devices, compiled;
- on CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
  imported), which is how the test suite runs these kernels without a GPU.

Each call launches one kernel per (dtype, 16-byte alignment) of the tensors it gets, never one per
tensor (see tables.py). Kernels: histogram.py, adamw.py, select.py (the pass loop's state machine,
radix.select_bins, in one launch per pass: the CUDA kernel of gmt_kernels::radix_select); their
compiled specialisations and register use: `python -m gmt_kernels.aot`.

The kernels are reached through the operators of gmt_kernels/ops.py (so torch.compile sees one
opaque op per call): on CUDA tensors the shared gmt_kernels::radix_histogram / masked_adamw, whose
CUDA key this module fills; on CPU tensors (interpreter) gmt_kernels::triton_*, since the CPU key of
the shared names belongs to the C++ kernels.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import replace
from typing import Optional

import torch
import triton
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode
import triton.language as tl

# The kernels count masked lanes out of tl.histogram (its mask= argument, first in Triton 3.4). An
# older Triton fails here, at load, so "auto" passes it over with its warning instead of step() failing.
if "mask" not in inspect.signature(tl.histogram).parameters:
    raise ImportError(
        f"triton {triton.__version__} is too old for gmt_kernels: its kernels need tl.histogram(mask=...), "
        "added in Triton 3.4. Upgrade with `pip install 'triton>=3.4'`"
    )

from ... import ops  # noqa: E402
from ...options import CRITERIA, GRAD, Scoring, records_from_schema  # noqa: E402
from ...radix import KEY_FORMATS_BY_NAME  # noqa: E402
from .. import Backend, VouchedList, register  # noqa: E402
from .. import reference  # noqa: E402
from .adamw import launch_masked_adamw  # noqa: E402
from .histogram import TORCH_TO_TRITON, launch_histogram, radix_histogram_kernel  # noqa: E402
from .select import launch_select  # noqa: E402

SERVED_DTYPES = tuple(TORCH_TO_TRITON)


def _built_for_interpreter() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(radix_histogram_kernel, InterpretedFunction)


_INTERPRETED = _built_for_interpreter()  # fixed at import; asked per tensor per step


def interpreter_active() -> bool:
    """True if the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETED


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if dtype not in SERVED_DTYPES:
        return f"it serves {', '.join(str(d) for d in SERVED_DTYPES)} tensors only"
    interpreted = interpreter_active()
    if device.type == "cpu":
        if interpreted:
            return None
        return (
            "Triton kernels run on CPU tensors only under the Triton interpreter; set the environment "
            "variable TRITON_INTERPRET=1 before triton is first imported (slow, for testing), or use "
            "backend='cpu' (the C++ kernels) or backend='reference' for CPU tensors"
        )
    if device.type == "cuda":
        if interpreted:
            return (
                "the Triton interpreter is active (TRITON_INTERPRET=1), and it runs on CPU tensors only; "
                "unset TRITON_INTERPRET before starting Python to run the compiled kernels on the GPU"
            )
        return None
    return f"Triton kernels run on CUDA/ROCm devices (or CPU under TRITON_INTERPRET=1), not on {device.type}"


def _ops_for(device: torch.device) -> tuple:
    """(radix_histogram, masked_adamw) operators that run the Triton kernels on `device`."""
    if device.type == "cpu":
        return torch.ops.gmt_kernels.triton_radix_histogram, torch.ops.gmt_kernels.triton_masked_adamw
    return torch.ops.gmt_kernels.radix_histogram, torch.ops.gmt_kernels.masked_adamw


def _dispatch_needed() -> bool:
    """Whether a call must go through the operator: torch.compile traces it as one opaque op, and a
    TorchDispatchMode (FakeTensor, counting.DeviceWork) or autograd must see it. Eager calls under
    no_grad (an optimizer step) call the kernel function itself: the dispatcher's conversions of
    the tensor lists cost about a microsecond per tensor and call (host time of many-tensor steps)."""
    return torch.is_grad_enabled() or torch.compiler.is_compiling() or _current_dispatch_mode() is not None


def _as_list(items) -> list:
    """items as a list: itself if it is one (a VouchedList keeps its call), else a copy."""
    return items if isinstance(items, list) else list(items)


# The VouchedList.call of an operator call's leading list, which the dispatcher's list conversion
# drops: set around the call, taken back by the kernel (a mode that counts launches then sees the
# launch plans an eager step uses). Per thread: another thread's call must never name this one's.
_dispatched = threading.local()


@contextlib.contextmanager
def _naming(items):
    _dispatched.call = items.call if isinstance(items, VouchedList) else None
    try:
        yield
    finally:
        _dispatched.call = None


def _named(items: list) -> list:
    call = getattr(_dispatched, "call", None)
    _dispatched.call = None
    return items if call is None else VouchedList(items, call)


def radix_histogram(grads, scope_of, state, hist, *, key_format, scoring=GRAD) -> None:
    if not _dispatch_needed():
        return _histogram_kernel(_as_list(grads), list(scope_of), state, hist, key_format.name,
                                 **scoring.schema_args())
    histogram_op, _ = _ops_for(hist.device)
    with _naming(grads):
        histogram_op(list(grads), list(scope_of), state, hist, key_format.name, **scoring.schema_args())


def masked_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, kept, *, options, mask) -> None:
    if not _dispatch_needed():
        return _masked_adamw_kernel(
            _as_list(params), _as_list(grads), _as_list(exp_avgs), _as_list(exp_avg_sqs), _as_list(max_exp_avg_sqs),
            _as_list(steps), mask.thresholds, kept, list(mask.masks), **options.schema_args(), **mask.schema_args())
    _, adamw_op = _ops_for(kept.device)
    with _naming(params):
        adamw_op(
            list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), list(steps),
            mask.thresholds, kept, list(mask.masks), **options.schema_args(), **mask.schema_args(),
        )


# ---- the operator kernels ------------------------------------------------------------------------

def _histogram_kernel(grads, scope_of, state, hist, key_format, **scoring) -> None:
    """scoring: the schema's keyword arguments, which are options.Scoring's fields."""
    fmt = KEY_FORMATS_BY_NAME.get(key_format)
    if fmt is None:
        raise ValueError(
            f"radix_histogram: unknown key_format {key_format!r}; expected one of "
            f"{', '.join(map(repr, KEY_FORMATS_BY_NAME))} (radix.key_format_for picks one)."
        )
    launch_histogram(_named(grads), scope_of, state, hist, key_format=fmt, scoring=Scoring(**scoring))


def _masked_adamw_kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, thresholds, kept, masks,
                         **schema) -> None:
    options, mask = records_from_schema(thresholds, masks, **schema)

    def one_tensor_by_reference(i: int, thresholds, kept) -> None:
        # For a tensor whose gradient or states are laid out unlike the parameter (a strided view
        # with holes, different strides), or a non-contiguous one where entries are indexed
        # row-major (random scores, stored masks): the reference update of this one tensor, still
        # on the device and without a host sync. Normal training never takes this path.
        one = slice(i, i + 1)
        scoring = mask.scoring
        if scoring.criterion == "random":
            scoring = replace(scoring, random_keys=scoring.random_keys[one], entry_offsets=scoring.entry_offsets[one])
        reference.masked_adamw(
            [params[i]], [grads[i]], [exp_avgs[i]], [exp_avg_sqs[i]],
            [max_exp_avg_sqs[i]] if options.amsgrad else [], [steps[i]], kept[one], options=options,
            mask=replace(mask, thresholds=thresholds[one], scoring=scoring, masks=tuple(mask.masks[one])))

    launch_masked_adamw(_named(params), grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, kept, options=options,
                        mask=mask, fallback=one_tensor_by_reference)


_library = torch.library.Library(ops.NAMESPACE, "IMPL")
for _name, _kernel in (("radix_histogram", _histogram_kernel), ("masked_adamw", _masked_adamw_kernel),
                       ("radix_select", launch_select)):
    _library.impl(_name, _kernel, "CUDA")  # the CPU key is the C++ backend's
    _library.impl(f"triton_{_name}", _kernel, "CPU")  # CPU tensors: the Triton interpreter
    _library.impl(f"triton_{_name}", _kernel, "CUDA")


register(
    Backend(
        name="triton",
        unavailable_reason=unavailable_reason,
        radix_histogram=radix_histogram,
        masked_adamw=masked_adamw,
        auto_devices=("cuda",),
        criteria=CRITERIA,
        stored_masks=True,
    )
)
