"""The reference backend: SEMANTICS.md in plain PyTorch, one tensor at a time. The oracle for every kernel.

It favours reading like the contract over speed, with one concession to the contract itself:
gradients are histogrammed in fixed-size chunks, so selecting a threshold never holds more than
CHUNK extra entries, whatever the model size (no concatenation, int64 indices throughout).
"""

from __future__ import annotations

import torch

from . import Backend, memory_order_view, register
from .. import masks as stored_masks
from .. import radix
from ..options import CRITERIA, GRAD
from ..radix import ABOVE, BINS, DONE, LAST, LO, NONFINITE, SAMPLE, SAMPLE_BLOCK, SHIFT, entry_scores, score_keys

CHUNK = 1 << 20


def radix_histogram(grads, scope_of, state, hist, *, key_format, scoring=GRAD):
    _check_scoring(scoring, len(grads), histogram=True)
    for index, (grad, s) in enumerate(zip(grads, scope_of)):
        weight = scoring.weights[index] if scoring.criterion == "grad_over_weight" else None
        flat, flat_weight = _flat(grad, weight, row_major=scoring.criterion == "random")
        lo, last, shift, done = state[s, LO], state[s, LAST], state[s, SHIFT], state[s, DONE]
        for start in range(0, flat.numel(), CHUNK):
            piece = slice(start, start + CHUNK)
            keys = score_keys(flat[piece], key_format, scoring, tensor_index=index, start=start,
                              weight=None if flat_weight is None else flat_weight[piece])
            block = torch.arange(start, start + keys.numel(), device=keys.device) // SAMPLE_BLOCK
            counted = (done == 0) & radix.sampled_blocks(block, index, state[s, SAMPLE])
            in_range = counted & (keys >= lo) & (keys <= last)
            # Bins, then ABOVE; entries counted nowhere land in one more bin that is dropped. (A
            # fixed-size scatter_add, not bincount, whose data-dependent size torch.compile cannot trace.)
            binned = torch.where(in_range, (keys - lo) >> shift, torch.where(counted & (keys > last), ABOVE, ABOVE + 1))
            counts = torch.zeros(ABOVE + 2, dtype=torch.int64, device=hist.device)
            counts.scatter_add_(0, binned, torch.ones_like(binned))
            hist[s, : BINS + 1] += counts[: BINS + 1]
            hist[s, NONFINITE] += (counted & (keys >= key_format.inf_key)).sum()


def _flat(grad, weight, row_major: bool):
    """1-D views of grad (and theta) whose positions pair up: memory order when it is the same for
    both (the sample picks blocks of it), else row-major (a copy of this one tensor). The random
    score's entry index is row-major, so that criterion reads row-major order."""
    flat = None if row_major else memory_order_view(grad)
    if weight is not None and (flat is None or weight.stride() != grad.stride() or memory_order_view(weight) is None):
        return grad.reshape(-1), weight.reshape(-1)
    if flat is None:
        flat = grad.reshape(-1)  # a view with holes (or row-major order asked): a copy of this one tensor
    return flat, None if weight is None else memory_order_view(weight)


def _check_scoring(scoring, n: int, histogram: bool) -> None:
    if scoring.criterion not in CRITERIA:
        raise ValueError(
            f"unknown criterion {scoring.criterion!r}; expected one of {', '.join(map(repr, CRITERIA))}."
        )
    if histogram and scoring.criterion == "grad_over_weight" and len(scoring.weights) != n:
        raise ValueError(f"criterion 'grad_over_weight' needs one weight per gradient; got {len(scoring.weights)} for {n}.")
    if scoring.criterion == "random" and (scoring.random_keys is None or scoring.entry_offsets is None):
        raise ValueError("criterion 'random' needs random_keys and entry_offsets (int64 [n]).")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, kept, *, options, mask):
    o, scoring, thresholds = options, mask.scoring, mask.thresholds
    _check_scoring(scoring, len(params), histogram=False)
    if mask.refresh is not None and not mask.masks:
        raise ValueError("masked_adamw: refresh was given without stored masks to read.")
    for i, param in enumerate(params):
        cdt = _compute_dtype(param.dtype)
        grad = grads[i]

        # Which entries are kept: the score rule (theta = the parameter before this update), or
        # the stored mask where refresh is false.
        score = entry_scores(grad, radix.KEY_FORMATS_BY_NAME[_format_name(thresholds, scoring)], scoring,
                             tensor_index=i, weight=param)
        keep = score >= thresholds[i]
        if score.is_floating_point():
            keep |= score.isnan()
        if mask.masks:
            if mask.refresh is not None:
                keep = torch.where(mask.refresh, keep, stored_masks.unpack(mask.masks[i], param.shape))
            write = stored_masks.pack(keep)
            if o.skip is not None:
                write = torch.where(o.skip, mask.masks[i], write)
            mask.masks[i].copy_(write)
        counted = keep if o.skip is None else keep & ~o.skip
        kept[i] += counted.sum()
        if not mask.update_params:
            continue

        g = grad.to(cdt)
        if o.grad_scale is not None:
            g = g / o.grad_scale.to(cdt)
        if o.maximize:
            g = -g
        if o.mask_mode == "grad":
            g = torch.where(keep, g, torch.zeros((), dtype=cdt, device=g.device))

        p = param.to(cdt)
        m = exp_avgs[i].to(cdt)
        v = exp_avg_sqs[i].to(cdt)

        # torch.optim.AdamW's single-tensor update, op for op, with the step read on the device.
        lr, beta1, beta2 = o.lr, o.beta1, o.beta2
        step = steps[i].to(torch.float64)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2.sqrt()

        p_new = p * (1 - lr * o.weight_decay)
        m_new = m.lerp(g, 1 - beta1)
        v_new = (v * beta2).addcmul(g, g, value=1 - beta2)
        if o.amsgrad:
            vmax_new = torch.maximum(max_exp_avg_sqs[i].to(cdt), v_new)
            denom = (vmax_new.sqrt() / bias_correction2_sqrt.to(cdt)) + o.eps
        else:
            denom = (v_new.sqrt() / bias_correction2_sqrt.to(cdt)) + o.eps
        p_new = p_new + (m_new * (-step_size).to(cdt)) / denom

        # Which entries take the new values: all ("grad"), the kept ones ("freeze"), none (skip).
        update = keep if o.mask_mode == "freeze" else torch.ones_like(keep)
        if o.skip is not None:
            update = update & ~o.skip
        param.copy_(torch.where(update, p_new.to(param.dtype), param))
        exp_avgs[i].copy_(torch.where(update, m_new.to(param.dtype), exp_avgs[i]))
        exp_avg_sqs[i].copy_(torch.where(update, v_new.to(param.dtype), exp_avg_sqs[i]))
        if o.amsgrad:
            max_exp_avg_sqs[i].copy_(torch.where(update, vmax_new.to(param.dtype), max_exp_avg_sqs[i]))


def _format_name(thresholds: torch.Tensor, scoring) -> str:
    """The key format a masked_adamw call scores in, from what it is given: u32 for the random
    criterion, else float32 or float64 as the thresholds."""
    if scoring.criterion == "random":
        return "u32"
    return "f64" if thresholds.dtype == torch.float64 else "f32"


def unavailable_reason(device: torch.device, dtype: torch.dtype):
    if device.type == "mps":  # torch has no float64 on MPS
        return (
            "it computes bias corrections and the sampled bracket in float64, which the MPS device "
            "lacks; keep the optimizer's parameters on the CPU (or a CUDA device) instead"
        )
    if device.type == "meta":
        return "meta tensors hold no values; materialise the parameters (e.g. module.to_empty(device=...)) first"
    return None


register(
    Backend(
        name="reference",
        unavailable_reason=unavailable_reason,
        radix_histogram=radix_histogram,
        masked_adamw=masked_adamw,
    )
)
