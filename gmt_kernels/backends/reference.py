"""The reference backend: SEMANTICS.md in plain PyTorch, one tensor at a time. The oracle for every kernel.

It favours reading like the contract over speed, with one concession to the contract itself:
gradients are histogrammed in fixed-size chunks, so selecting a threshold never holds more than
CHUNK extra entries, whatever the model size (no concatenation, int64 indices throughout).
"""

from __future__ import annotations

import torch

from . import Backend, memory_order_view, register
from .. import radix
from ..radix import ABOVE, BINS, DONE, LAST, LO, NONFINITE, SAMPLE, SAMPLE_BLOCK, SHIFT, score_keys

CHUNK = 1 << 20


def radix_histogram(grads, scope_of, state, hist, *, key_format):
    for index, (grad, s) in enumerate(zip(grads, scope_of)):
        flat = memory_order_view(grad)
        if flat is None:
            flat = grad.reshape(-1)  # a view with holes: a copy of this one tensor
        lo, last, shift, done = state[s, LO], state[s, LAST], state[s, SHIFT], state[s, DONE]
        for start in range(0, flat.numel(), CHUNK):
            keys = score_keys(flat[start : start + CHUNK], key_format)
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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_adamw(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, thresholds, kept, *,
    lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, mask_mode, grad_scale, skip,
):
    for i, param in enumerate(params):
        cdt = _compute_dtype(param.dtype)
        grad = grads[i]
        keep = (grad.abs().to(thresholds.dtype) >= thresholds[i]) | grad.isnan()

        g = grad.to(cdt)
        if grad_scale is not None:
            g = g / grad_scale.to(cdt)
        if maximize:
            g = -g
        if mask_mode == "grad":
            g = torch.where(keep, g, torch.zeros((), dtype=cdt, device=g.device))

        p = param.to(cdt)
        m = exp_avgs[i].to(cdt)
        v = exp_avg_sqs[i].to(cdt)

        # torch.optim.AdamW's single-tensor update, op for op, with the step read on the device.
        step = steps[i].to(torch.float64)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2.sqrt()

        p_new = p * (1 - lr * weight_decay)
        m_new = m.lerp(g, 1 - beta1)
        v_new = (v * beta2).addcmul(g, g, value=1 - beta2)
        if amsgrad:
            vmax_new = torch.maximum(max_exp_avg_sqs[i].to(cdt), v_new)
            denom = (vmax_new.sqrt() / bias_correction2_sqrt.to(cdt)) + eps
        else:
            denom = (v_new.sqrt() / bias_correction2_sqrt.to(cdt)) + eps
        p_new = p_new + (m_new * (-step_size).to(cdt)) / denom

        # Which entries take the new values: all ("grad"), the kept ones ("freeze"), none (skip).
        update = keep if mask_mode == "freeze" else torch.ones_like(keep)
        if skip is not None:
            update = update & ~skip
        param.copy_(torch.where(update, p_new.to(param.dtype), param))
        exp_avgs[i].copy_(torch.where(update, m_new.to(param.dtype), exp_avgs[i]))
        exp_avg_sqs[i].copy_(torch.where(update, v_new.to(param.dtype), exp_avg_sqs[i]))
        if amsgrad:
            max_exp_avg_sqs[i].copy_(torch.where(update, vmax_new.to(param.dtype), max_exp_avg_sqs[i]))
        counted = keep if skip is None else keep & ~skip
        kept[i] += counted.sum()


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
