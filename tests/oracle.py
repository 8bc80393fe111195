"""An independent, obviously correct GMT: concatenate and sort the scores, mask, call torch's own AdamW.

Everything the library must never do (concatenate all gradients, sort them) is fine here: this is
the yardstick the reference backend is held to, on small problems.
"""

from __future__ import annotations

import math

import torch
from torch.optim.adamw import adamw as torch_functional_adamw


def kth_largest(tensors, k: int) -> float:
    """The k-th largest |x| over all tensors (NaN largest), +inf when k == 0."""
    if k == 0:
        return math.inf
    scores = torch.cat([t.detach().abs().reshape(-1).double() for t in tensors])
    scores = torch.where(scores.isnan(), torch.full_like(scores, math.inf), scores)
    # NaN sorts as +inf here: only its rank matters, and NaN entries are all kept anyway.
    return scores.sort(descending=True).values[k - 1].item()


def keep_count(numel: int, mask_ratio: float) -> int:
    """k = N - floor(r * N) with r read as the decimal Python prints (SEMANTICS.md section 1)."""
    from fractions import Fraction

    return numel - math.floor(Fraction(repr(float(mask_ratio))) * numel)


def keep_mask(grad: torch.Tensor, threshold: float) -> torch.Tensor:
    return (grad.double().abs() >= threshold) | grad.isnan()


class OracleAdamW:
    """GMT for a list of tensors, one scope per entry of `scopes` (lists of indices into params)."""

    def __init__(self, params, *, lr, betas, eps, weight_decay, amsgrad, maximize, mask_ratio, scopes, mask_mode):
        self.params = [p.detach().clone() for p in params]
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        self.max_exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        self.steps = [torch.tensor(0.0) for _ in self.params]
        self.hp = dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay,
                       amsgrad=amsgrad, maximize=maximize)
        self.mask_ratio, self.scopes, self.mask_mode = mask_ratio, scopes, mask_mode
        self.last_thresholds = []

    def step(self, grads):
        keeps = [None] * len(self.params)
        self.last_thresholds = []
        for members in self.scopes:
            numel = sum(grads[i].numel() for i in members)
            t = kth_largest([grads[i] for i in members], keep_count(numel, self.mask_ratio))
            self.last_thresholds.append(t)
            for i in members:
                keeps[i] = keep_mask(grads[i], t)
        for i, p in enumerate(self.params):
            keep = keeps[i] if keeps[i] is not None else torch.ones_like(p, dtype=torch.bool)
            # fp32 math for 16-bit parameters: upcast, let torch's AdamW update, round back.
            compute = torch.float64 if p.dtype == torch.float64 else torch.float32
            g = grads[i].to(compute)
            if self.mask_mode == "grad":
                g = torch.where(keep, g, torch.zeros_like(g))
            new = [t.to(compute).clone() for t in (p, self.exp_avgs[i], self.exp_avg_sqs[i], self.max_exp_avg_sqs[i])]
            torch_functional_adamw([new[0]], [g], [new[1]], [new[2]], [new[3]], [self.steps[i]],
                                   foreach=False, **self.hp)
            olds = (p, self.exp_avgs[i], self.exp_avg_sqs[i], self.max_exp_avg_sqs[i])
            for old, fresh in zip(olds, new):
                take = keep if self.mask_mode == "freeze" else torch.ones_like(keep)
                old.copy_(torch.where(take, fresh.to(old.dtype), old))
        return keeps
