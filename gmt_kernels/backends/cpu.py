"""The C++ CPU backend: the kernels of csrc/, registered by gmt_kernels._C for the CPU key of the
operators gmt_kernels/ops.py defines (torch.ops.gmt_kernels.radix_histogram / masked_adamw).

Importing this module fails (and "auto" falls back to the reference backend, saying why) when the
extension was not built, or when GMT_KERNELS_CPU_CAPABILITY names a level this CPU cannot run;
backend="cpu" then raises with the same reason.

CPU capability levels: every kernel is compiled for AVX-512, AVX2 (+FMA, F16C), NEON (aarch64) and
a portable "default" level, and runs the best one the CPU has, unless GMT_KERNELS_CPU_CAPABILITY
(read when the extension loads, like torch's ATEN_CPU_CAPABILITY) or `set_cpu_capability` asks for
a lower one. `kernel_capabilities()` is what the C++ dispatch itself reports.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .. import ops  # noqa: F401  (the schemas, before the extension registers kernels for them)
from ..options import CRITERIA, GRAD
from . import Backend, contiguous_slots, register

try:
    # After ops: its kernels are checked against the schemas when they register.
    from .. import _C  # noqa: F401  (fills the CPU key of torch.ops.gmt_kernels.* on import)
except ImportError as exc:
    raise ImportError(
        f"the C++ extension gmt_kernels._C is not built ({exc}). Build it from the repository root with "
        "`python setup.py build_ext --inplace` (or `pip install --no-build-isolation -e .`); it needs a C++ "
        "compiler and the torch you run"
    ) from exc

_OPS = torch.ops.gmt_kernels
CAPABILITY_ENV = "GMT_KERNELS_CPU_CAPABILITY"
CAPABILITY_LEVELS = ("avx512", "avx2", "neon", "default")  # every level any build knows, best first


def supported_capabilities() -> list[str]:
    """The levels this CPU and this build can run, best first, always ending with "default"."""
    return list(_C.supported_capabilities())


def cpu_capability() -> str:
    """The level the kernels run at now."""
    return _C.cpu_capability()


def set_cpu_capability(level: str) -> None:
    """Run the kernels at `level` from now on, in this process. ValueError (saying which levels are
    possible) for an unknown level or one this CPU or build cannot run; the level is then unchanged."""
    _C.set_cpu_capability(level)


@contextlib.contextmanager
def use_cpu_capability(level: str) -> Iterator[None]:
    """set_cpu_capability(level) for the `with` block, then the previous level again."""
    previous = cpu_capability()
    set_cpu_capability(level)
    try:
        yield
    finally:
        set_cpu_capability(previous)


def kernel_capabilities() -> dict[str, str]:
    """For each C++ kernel, the level of the variant it runs at the current setting, as its own
    dispatch reports it ("histogram_f64_keys": 64-bit keys, portable on every level)."""
    return dict(_C.kernel_capabilities())


def info() -> dict:
    """What backend_info() reports for this backend."""
    return {
        "cpu_capability": cpu_capability(),
        "supported_capabilities": supported_capabilities(),
        "kernel_capabilities": kernel_capabilities(),
    }


SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def unavailable_reason(device: torch.device, dtype: torch.dtype):
    if device.type != "cpu":
        return f"the C++ CPU backend serves CPU tensors only, not {device.type} tensors"
    if dtype not in SUPPORTED_DTYPES:
        return f"the C++ CPU backend supports {', '.join(map(str, SUPPORTED_DTYPES))}, not {dtype}"
    return None


def radix_histogram(grads, scope_of, state, hist, *, key_format, scoring=GRAD):
    _OPS.radix_histogram(list(grads), list(scope_of), state, hist, key_format.name, **scoring.schema_args())


def masked_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, kept, *, options, mask):
    thresholds, counts, finish = contiguous_slots(mask.thresholds, kept)  # the C++ kernel indexes both [n]
    _OPS.masked_adamw(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), list(steps),
        thresholds, counts, list(mask.masks), **options.schema_args(), **mask.schema_args(),
    )
    if finish is not None:
        finish()


register(
    Backend(
        name="cpu",
        unavailable_reason=unavailable_reason,
        radix_histogram=radix_histogram,
        masked_adamw=masked_adamw,
        auto_devices=("cpu",),
        info=info,
        criteria=CRITERIA,  # every criterion and stored masks, at every capability level
        stored_masks=True,
    )
)
