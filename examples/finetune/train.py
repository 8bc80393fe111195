"""The training loop every arm runs: same batches, dropout, schedule and clipping; only the optimizer differs.

Per step: grad_accum micro-batches (loss / grad_accum each, so the optimizer sees the mean gradient),
clip the accumulated gradient to max_grad_norm, then optimizer.step() (GMT's mask is taken on that
clipped, accumulated gradient), then the LR schedule (linear warm-up over warmup_ratio of the steps,
then cosine to 0: transformers' get_cosine_schedule_with_warmup, as Trainer's lr_scheduler_type="cosine").
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch

from .model import collate, embed, info_nce


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 16  # pairs per micro-batch: each query's negatives are the batch's other codes
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def micro_batches(n_pairs: int, cfg: TrainConfig) -> list[list[int]]:
    """Pair indices of every micro-batch, in order: epochs of permutations drawn from the seed alone,
    so every arm of one seed sees the same batches."""
    need = cfg.steps * cfg.grad_accum * cfg.batch_size
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    while len(order) < need:
        order += torch.randperm(n_pairs, generator=gen).tolist()
    return [order[i : i + cfg.batch_size] for i in range(0, need, cfg.batch_size)]


def dropout_seed(seed: int, micro: int) -> int:
    # Re-seeded before every forward: dropout masks depend on (seed, micro-batch) only, never on what
    # else (an optimizer, an evaluation) drew from the global generator in between.
    return seed * 1_000_003 + micro


def kept_fraction(optimizer, params: Sequence[torch.Tensor]) -> Optional[float]:
    """Fraction of trainable entries updated with their gradient in the last step (parameters outside
    every masked scope, e.g. a mask_ratio=0 group, count as kept); None for a plain optimizer."""
    if not hasattr(optimizer, "mask_stats"):
        return None
    stats = optimizer.mask_stats().values()
    total = sum(p.numel() for p in params)
    scoped = sum(s["numel"] for s in stats)
    return (sum(s["kept"] for s in stats) + total - scoped) / total


def forward_backward(model, query_ids, code_ids, idx: Sequence[int], weight: float = 1.0) -> float:
    """InfoNCE of one micro-batch, its gradient (times weight) added to .grad; returns the weighted loss."""
    q = embed(model, collate([query_ids[i] for i in idx]))
    c = embed(model, collate([code_ids[i] for i in idx]))
    loss = info_nce(q, c) * weight
    loss.backward()
    return loss.item()


def train(model, optimizer, query_ids, code_ids, cfg: TrainConfig, on_step=None) -> dict:
    """Fine-tune model in place; returns the per-step history. on_step(step, history), if given, runs
    after every step (progress logging)."""
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * cfg.steps), cfg.steps)
    batches = micro_batches(len(query_ids), cfg)
    history = {k: [] for k in ("loss", "lr", "grad_norm", "zero_grad", "kept", "step_s", "opt_s")}
    model.train()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for a in range(cfg.grad_accum):
            micro = step * cfg.grad_accum + a
            torch.manual_seed(dropout_seed(cfg.seed, micro))
            loss_sum += forward_backward(model, query_ids, code_ids, batches[micro], 1.0 / cfg.grad_accum)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        zero = sum(int((p.grad == 0).sum()) for p in params if p.grad is not None)
        history["lr"].append(scheduler.get_last_lr()[0])
        t1 = time.perf_counter()
        optimizer.step()
        t2 = time.perf_counter()
        scheduler.step()
        history["loss"].append(loss_sum)
        history["grad_norm"].append(float(norm))
        history["zero_grad"].append(zero / sum(p.numel() for p in params))
        history["kept"].append(kept_fraction(optimizer, params))
        history["step_s"].append(time.perf_counter() - t0)
        history["opt_s"].append(t2 - t1)
        if on_step is not None:
            on_step(step, history)
    return history
