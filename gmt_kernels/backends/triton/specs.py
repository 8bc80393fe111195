"""The compiled specialisations this backend ships: what `python -m gmt_kernels.aot` compiles.

Everything that changes per step (the scope intervals, lr, the skip flag) is a runtime argument, so
a handful of variants cover every call: the element types, amsgrad (whose extra tensor changes the
kernel's loads), 16-byte alignment (which allows 128-bit accesses), and for the update the mask
mode and whether there is a grad_scale (fixed for a whole training run; as compile-time constants
they let "grad" mode store without a mask, hence 128 bits wide, and skip the division by 1), and
the selection criterion and stored masks (SEMANTICS.md section 8, also fixed for a run). A call
outside this list (e.g. float16 params in a float64-keyed scope) is compiled just in time as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.language as tl

from ...radix import SAMPLE_BLOCK, STATE_COLUMNS
from . import adamw, histogram


@dataclass(frozen=True)
class Spec:
    kernel: str  # "histogram" or "masked_adamw"
    label: str  # the variant, e.g. "grad=bf16,key=f32,aligned"
    signature: tuple  # ((name, type or "constexpr"), ...)
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    entries_per_iteration: int  # gradient entries one loop iteration of a program covers


    def function(self):
        return {"histogram": histogram.radix_histogram_kernel, "masked_adamw": adamw.masked_adamw_kernel}[self.kernel]


_SHORT = {tl.float16: "f16", tl.bfloat16: "bf16", tl.float32: "f32", tl.float64: "f64"}
_TORCH = {tl.float16: torch.float16, tl.bfloat16: torch.bfloat16, tl.float32: torch.float32, tl.float64: torch.float64}
_PTR = {tl.float16: "*fp16", tl.bfloat16: "*bf16", tl.float32: "*fp32", tl.float64: "*fp64"}

# (gradient type, key format): every pair radix.key_format_for can produce.
HISTOGRAM_PAIRS = [
    (tl.float16, tl.float16), (tl.bfloat16, tl.bfloat16), (tl.float32, tl.float32),
    (tl.float16, tl.float32), (tl.bfloat16, tl.float32),
    (tl.float64, tl.float64), (tl.float32, tl.float64), (tl.bfloat16, tl.float64), (tl.float16, tl.float64),
]


def _histogram_specs():
    signature = (("table", "*i64"), ("chunk_owner", "*i32"), ("state", "*i64"), ("hist", "*i64"),
                 ("num_chunks", "i32"), ("num_scopes", "i32"), ("items", "*i64"), ("picked", "*i32"),
                 ("num_items", "i32"))

    optional = ("random_keys", "entry_offsets", "score_eps_bits")

    def spec(grad, key, aligned, criterion, label, weight=None):
        # The per-criterion inputs are pointers / a float where the criterion reads them, else
        # constexpr None: absent from the compiled kernel, so "grad" variants compile as before.
        runtime = {"random": {"random_keys": "*i64", "entry_offsets": "*i64"},
                   "grad_over_weight": {"score_eps_bits": "i64"}}.get(criterion, {})
        constexprs = tuple((n, None) for n in optional if n not in runtime) + (
            ("GRAD", grad), ("KEY_FLOAT", key), ("INF_KEY", histogram.inf_key_for(key)), ("ALIGNED", aligned),
            ("BINS", histogram.BINS), ("BLOCK", histogram.BLOCK), ("ITERS", histogram.ITERS),
            ("STATE_COLUMNS", STATE_COLUMNS), ("SAMPLE_BLOCK", SAMPLE_BLOCK), ("CRITERION", criterion),
            ("WEIGHT", weight))
        fixed = tuple((n, "constexpr") for n, _ in constexprs if n not in optional)
        types = signature + fixed[:-2] + tuple((n, runtime.get(n, "constexpr")) for n in optional) + fixed[-2:]
        return Spec("histogram", label, types, constexprs, histogram.NUM_WARPS, histogram.BLOCK)

    for grad, key in HISTOGRAM_PAIRS:
        for aligned in (True, False):
            label = f"grad={_SHORT[grad]},key={_SHORT[key]},{'aligned' if aligned else 'unaligned'}"
            yield spec(grad, key, aligned, "grad", label)
    # grad_over_weight: f32 keys (f64 if the scope holds float64); theta has the gradient's dtype.
    for grad, key in GRAD_OVER_WEIGHT_PAIRS:
        label = f"grad_over_weight,grad={_SHORT[grad]},key={_SHORT[key]},aligned"
        yield spec(grad, key, True, "grad_over_weight", label, weight=grad)
    # random: nothing is loaded, one variant for every dtype (launched with GRAD = float32).
    yield spec(tl.float32, tl.uint32, False, "random", "random,key=u32,unaligned")


# grad_over_weight (key f32, or f64 for float64 scopes), aligned: bf16, fp32 and fp64 scopes; the rest
# (fp16, mixed dtypes, unaligned) compile on first use.
GRAD_OVER_WEIGHT_PAIRS = [(tl.bfloat16, tl.float32), (tl.float32, tl.float32), (tl.float64, tl.float64)]


def _adamw_spec(param, amsgrad, aligned, freeze, scaled, criterion="grad", masks=False):
    compute = tl.float64 if param == tl.float64 else tl.float32
    signature = (
        ("table", "*i64"), ("chunk_owner", "*i32"),
        ("thresholds", "*fp64" if criterion == "random" else _PTR[compute]), ("kept", "*i64"),
        ("lr_tensor", "*fp32"), ("grad_scale_ptr", "*fp32"), ("skip_ptr", "*u8"),
        ("lr", "fp64"), ("weight_decay", "fp64"), ("beta1", "fp64"), ("beta2", "fp64"),
        ("log_beta1", "fp64"), ("log_beta2", "fp64"), ("eps", "fp64"),
        ("lr_from_tensor", "i32"), ("has_skip", "i32"), ("maximize", "i32"),
    )
    # The criterion's inputs and the refresh flag are pointers / a float where used, else constexpr
    # None (absent from the kernel). Stored masks are compiled with a refresh tensor (refresh_every=K).
    runtime = {"random": {"random_keys": "*i64", "entry_offsets": "*i64"},
               "grad_over_weight": {"score_eps_bits": "i64"}}.get(criterion, {})
    if masks:
        runtime = {**runtime, "refresh_ptr": "*u8"}
    optional = ("random_keys", "entry_offsets", "score_eps_bits", "refresh_ptr")
    constexprs = tuple((n, None) for n in optional if n not in runtime) + (
        ("PARAM", param), ("COMPUTE", compute), ("AMSGRAD", amsgrad), ("ALIGNED", aligned),
        ("BLOCK", adamw.block_for(_TORCH[param])), ("ITERS", adamw.ITERS), ("FREEZE", freeze),
        ("HAS_GRAD_SCALE", scaled), ("CRITERION", criterion), ("HAS_MASKS", masks), ("UPDATE", True))
    names = [n for n, _ in constexprs if n not in optional]
    order = [n for n, _ in signature] + ["PARAM", "COMPUTE", "AMSGRAD", "ALIGNED", "BLOCK", "ITERS", "FREEZE",
                                         "HAS_GRAD_SCALE", *optional, "CRITERION", "HAS_MASKS", "UPDATE"]
    types = dict(signature) | {n: runtime.get(n, "constexpr") for n in optional} | {n: "constexpr" for n in names}
    label = (f"param={_SHORT[param]},{'freeze' if freeze else 'grad'},"
             f"{'' if criterion == 'grad' else criterion + ','}{'masks,' if masks else ''}"
             f"{'amsgrad,' if amsgrad else ''}{'grad_scale,' if scaled else ''}{'aligned' if aligned else 'unaligned'}")
    return Spec("masked_adamw", label, tuple((n, types[n]) for n in order), constexprs, adamw.NUM_WARPS,
                adamw.block_for(_TORCH[param]))


def _adamw_specs():
    for param in (tl.float16, tl.bfloat16, tl.float32, tl.float64):
        for amsgrad in (False, True):
            for aligned in (True, False):
                for freeze in (False, True):
                    # With AMP (grad_scale): the aligned variants without amsgrad; the rest compile on first use.
                    for scaled in (False, True) if aligned and not amsgrad else (False,):
                        yield _adamw_spec(param, amsgrad, aligned, freeze, scaled)
    # The other criteria and stored masks: aligned bf16 / fp32 without amsgrad or AMP (the rest
    # compile on first use).
    for param in (tl.bfloat16, tl.float32):
        for freeze in (False, True):
            for criterion in ("grad_over_weight", "random"):
                yield _adamw_spec(param, False, True, freeze, False, criterion)
            for criterion in ("grad", "grad_over_weight", "random"):
                yield _adamw_spec(param, False, True, freeze, False, criterion, masks=True)


def shipped_specs() -> list[Spec]:
    return [*_histogram_specs(), *_adamw_specs()]
