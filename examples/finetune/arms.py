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

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from gmt_kernels import GMTAdamW

GMT_GLOBAL_RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)
DROP_RATIOS = (0.3, 0.9)  # 0.3: the mask ratio of the other sparse arms (the paper uses one ratio for all); 0.9: DARE's


@dataclass(frozen=True)
class Arm:
    name: str
    make_optimizer: Optional[Callable]  # (model, lr, weight_decay, seed) -> optimizer; None: no training
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


def adamw(model, lr, weight_decay, seed=0):
    return torch.optim.AdamW(trainable(model), lr=lr, weight_decay=weight_decay, fused=True)


def gmt(mask_ratio: float, scope: str = "global", skip_embeddings: bool = False, **criteria):
    """GMTAdamW factory; criteria: criterion=, refresh_every=, score_eps=, backend= (CRITERIA_DESIGN.md).
    A random criterion draws from the run's seed, so the seeds of an arm differ in their masks too."""

    def make(model, lr, weight_decay, seed=0):
        if skip_embeddings:
            tables, rest = embedding_split(model)
            groups = [{"params": rest}, {"params": tables, "mask_ratio": 0.0}]  # 0: plain AdamW
        else:
            groups = trainable(model)
        extra = {**criteria, "seed": seed} if criteria.get("criterion") == "random" else criteria
        return GMTAdamW(groups, lr=lr, weight_decay=weight_decay, mask_ratio=mask_ratio, scope=scope, **extra)

    return make


CALIBRATION_FRACTION = 0.1  # of the training pairs, for the masks selected once before training


def calibrate_and_select(fraction: float = CALIBRATION_FRACTION):
    """before_training hook of the fixed-mask arms (GaLLoP, SAFT): the mean gradient over the first
    ceil(fraction * train pairs / batch_size) micro-batches of the run's own batch order (train mode,
    dropout seeded apart from training's), then optimizer.select_mask() scores it and stores the mask
    that every step reuses (refresh_every=None). Parameters and moments are untouched."""

    def before(model, optimizer, data, cfg):
        from .train import dropout_seed, forward_backward, micro_batches

        n_pairs = len(data.queries["train"])
        n_micro = max(1, math.ceil(fraction * n_pairs / cfg.batch_size))
        batches = micro_batches(n_pairs, replace(cfg, steps=n_micro, grad_accum=1))
        optimizer.zero_grad(set_to_none=True)
        model.train()
        for i, idx in enumerate(batches):
            torch.manual_seed(dropout_seed(cfg.seed, CALIBRATION_DROPOUT_OFFSET + i))
            forward_backward(model, data.queries["train"], data.codes["train"], idx, 1.0 / n_micro)
        optimizer.select_mask()
        optimizer.zero_grad(set_to_none=True)

    return before


CALIBRATION_DROPOUT_OFFSET = 500_000  # calibration micro-batch i draws dropout as training's micro-batch 500000 + i


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
    arms += criteria_arms()
    return arms


CRITERIA_RATIO = 0.3


def criteria_arms() -> list[Arm]:
    """The baselines of issue 12 at mask_ratio 0.3, each the same size as "GMT global r=0.3 skip-emb":
    the embedding tables in a mask_ratio=0 group, 30 % of every other entry masked. Over all
    parameters (no skip) a score-based mask at 0.3 keeps everything (over 30 % of the scores are
    exactly 0, the word-embedding rows of absent tokens, so the threshold is 0), which makes a fixed
    |g| or |g|/|theta| mask plain AdamW; the random mask is also run over all parameters, as the paper's."""
    r = CRITERIA_RATIO
    b = CRITERIA_BACKEND
    return [
        Arm(f"random r={r} skip-emb redrawn", gmt(r, skip_embeddings=True, criterion="random", refresh_every=1,
                                                   backend=b["random"]), "random", r,
            notes=f"criterion='random', a new mask every step, backend {b['random']!r}"),
        Arm(f"random r={r} skip-emb fixed", gmt(r, skip_embeddings=True, criterion="random", refresh_every=None,
                                                 backend=b["random"]), "random", r,
            notes=f"criterion='random', refresh_every=None: drawn at the first step, kept; backend {b['random']!r}"),
        Arm(f"GaLLoP r={r} skip-emb", gmt(r, skip_embeddings=True, criterion="grad_over_weight", refresh_every=None,
                                           backend=b["grad_over_weight"]), "fixed", r,
            before_training=calibrate_and_select(),
            notes=f"criterion='grad_over_weight', refresh_every=None, select_mask() on the mean gradient of "
                  f"{CALIBRATION_FRACTION:.0%} of the training pairs; backend {b['grad_over_weight']!r}"),
        Arm(f"SAFT top-|g| r={r} skip-emb", gmt(r, skip_embeddings=True, criterion="grad", refresh_every=None,
                                                 backend=b["grad"]), "fixed", r,
            before_training=calibrate_and_select(),
            notes=f"criterion='grad', refresh_every=None, select_mask() on the mean gradient of "
                  f"{CALIBRATION_FRACTION:.0%} of the training pairs; backend {b['grad']!r}"),
        Arm(f"random r={r} redrawn", gmt(r, criterion="random", refresh_every=1, backend=b["random"]), "random", r,
            notes=f"criterion='random' over all parameters (global), a new mask every step; backend {b['random']!r}"),
    ]


# Backend of each criterion's arms: "auto" (the C++ kernels on CPU) unless the C++ backend lacks the
# criterion, then "reference" (set here, and said in each arm's notes and the results).
CRITERIA_BACKEND = {"grad": "auto", "grad_over_weight": "auto", "random": "auto"}
