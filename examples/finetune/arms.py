"""The arms of the study: how each builds its optimizer from (model, lr), plus optional hooks.

An arm is a name, an optimizer factory and, where a method needs them, two hooks run around the
shared training loop (train.train): `before_training(model, optimizer, data, cfg)` runs after the
optimizer is built and before step 1 (data: the tokenised splits, study.Data; cfg: the TrainConfig;
a method that selects a mask from gradients accumulated over a calibration fraction of the training
set runs train.forward_backward over train.micro_batches(...) there); `after_training(model, initial_state)` runs after the last step, before the
test evaluation (initial_state: the pretrained weights, read-only, for methods that edit the learned
deltas).
Every arm shares TrainConfig (steps, batches, seeds, lr, schedule, clipping, weight decay 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from gmt_kernels import GMTAdamW

GMT_GLOBAL_RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)
DROP_RATIOS = (0.3, 0.9)  # 0.3: the mask ratio of the other sparse arms (the paper uses one ratio for all); 0.9: DARE's


@dataclass(frozen=True)
class Arm:
    name: str
    make_optimizer: Optional[Callable]  # (model, lr, weight_decay) -> optimizer; None: no training
    family: str  # groups arms in the plots: "zero-shot", "adamw", "gmt-global", "gmt-other", ...
    mask_ratio: Optional[float] = None  # x position in the mask-ratio plot
    before_training: Optional[Callable] = None  # (model, optimizer, data, cfg) -> None
    after_training: Optional[Callable] = None  # (model, initial_state) -> None
    # Name of an arm whose training this arm repeats exactly (same optimizer, no before_training): the
    # study reuses that arm's trained model of the same seed when it is at hand, and only the
    # after_training hook differs (e.g. one-off drop after AdamW).
    trains_as: Optional[str] = None
    notes: str = field(default="", compare=False)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def embedding_split(model) -> tuple[list, list]:
    """(embedding-table parameters, all other trainable parameters): nn.Embedding weights are the
    tensors whose rows of tokens absent from a batch get an exactly zero gradient."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = trainable(model)
    return [p for p in params if id(p) in tables], [p for p in params if id(p) not in tables]


def adamw(model, lr, weight_decay):
    return torch.optim.AdamW(trainable(model), lr=lr, weight_decay=weight_decay, fused=True)


def gmt(mask_ratio: float, scope: str = "global", skip_embeddings: bool = False):
    def make(model, lr, weight_decay):
        if skip_embeddings:
            tables, rest = embedding_split(model)
            groups = [{"params": rest}, {"params": tables, "mask_ratio": 0.0}]  # 0: plain AdamW
        else:
            groups = trainable(model)
        return GMTAdamW(groups, lr=lr, weight_decay=weight_decay, mask_ratio=mask_ratio, scope=scope)

    return make


def one_off_drop(drop_ratio: float):
    """after_training hook: the paper's One-off Drop, reset the smallest-|delta| fraction drop_ratio of
    all trainable entries (one global scope) to their pretrained values."""

    def after(model, initial_state):
        from gmt_kernels import drop_deltas

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        drop_deltas([p for _, p in named], [initial_state[n] for n, _ in named], drop_ratio, method="magnitude")

    return after


def default_arms() -> list[Arm]:
    """Every arm that exists today. The criteria arms of issue 12 (random mask redrawn and fixed,
    GaLLoP, SAFT-style fixed top-|g|, one-off drop) are appended here once GMTAdamW has criterion=,
    refresh_every=, select_mask() and gmt_kernels.drop_deltas: each is one Arm(...) line, with
    before_training for the masks selected from calibration gradients and after_training for drop."""
    arms = [
        Arm("zero-shot", None, "zero-shot"),
        Arm("AdamW", adamw, "adamw", 0.0, notes="torch.optim.AdamW(fused=True)"),
    ]
    arms += [Arm(f"GMT global r={r}", gmt(r), "gmt-global", r) for r in GMT_GLOBAL_RATIOS]
    arms += [
        Arm("GMT per-tensor r=0.3", gmt(0.3, scope="tensor"), "gmt-other", 0.3),
        Arm("GMT global r=0.3 skip-emb", gmt(0.3, skip_embeddings=True), "gmt-other", 0.3,
            notes="nn.Embedding tables in a mask_ratio=0 group"),
    ]
    arms += [Arm(f"AdamW + one-off drop {r}", adamw, "drop", r, after_training=one_off_drop(r), trains_as="AdamW",
                 notes=f"AdamW, then drop_deltas(method='magnitude', drop_ratio={r}) against the pretrained weights")
             for r in DROP_RATIOS]
    return arms
