"""Calls of the backend functions from flat arguments, for kernel tests written against the
pre-records signature: `flat_masked_adamw(fn, params, grads, m, v, vmax, steps, thresholds, kept,
lr=..., ..., skip=...)` builds the options.AdamWOptions / options.MaskSource records (score |g|, no
stored masks) and calls fn with them."""

from __future__ import annotations

from gmt_kernels.options import GRAD, AdamWOptions, MaskSource


def flat_masked_adamw(fn, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, thresholds, kept, **hyper):
    return fn(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, kept,
              options=AdamWOptions(**hyper), mask=MaskSource(thresholds, GRAD))


# The keyword arguments of the masked_adamw schema beyond the AdamW hyper-parameters: score |g|,
# no stored masks (the masks list is positional, after kept).
GRAD_MASK_SCHEMA_ARGS = dict(criterion="grad", score_eps=1e-8, random_keys=None, entry_offsets=None, refresh=None,
                             update_params=True)
GRAD_HISTOGRAM_SCHEMA_ARGS = dict(criterion="grad", score_eps=1e-8, weights=[], random_keys=None, entry_offsets=None)
