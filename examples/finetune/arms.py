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

import functools
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
    after_training: Optional[Callable] = None  # (model, initial_state) -> None or a dict recorded with the run
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
        extra = {**criteria, "seed": seed} if criteria.get("criterion") == "random" else dict(criteria)
        if extra.get("backend") == "probe":
            extra["backend"] = criterion_backend(extra.get("criterion", "grad"), extra.get("refresh_every", 1))
        return GMTAdamW(groups, lr=lr, weight_decay=weight_decay, mask_ratio=mask_ratio, scope=scope, **extra)

    return make


CALIBRATION_FRACTION = 0.05  # of the training pairs, for the masks selected once before training


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
        stats = drop_deltas([p for _, p in named], [initial_state[n] for n, _ in named], drop_ratio, method="magnitude")
        g = stats["global"]
        # kept counts ties at the threshold: when more than drop_ratio of the deltas are exactly 0 (rows of
        # tokens never seen), the threshold is 0 and nothing is dropped
        return {"deltas_kept": g["kept"] / g["numel"], "threshold": g["threshold"]}

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
    # A control, not a method: masking 30 % of the entries also shrinks the update's size, and the lr
    # sweep's chosen value (1e-4) was the lowest of its grid; AdamW at 0.7 x lr tells whether a smaller
    # step alone explains a masked arm's gain.
    arms.append(Arm("AdamW lr x0.7 (control)", scaled_lr(adamw, 0.7), "control", None,
                    notes="torch.optim.AdamW(fused=True) at 0.7 x the study's lr: a step-size control for the 0.3 masks"))
    return arms


def scaled_lr(make, factor: float):
    def scaled(model, lr, weight_decay, seed=0):
        return make(model, lr * factor, weight_decay, seed=seed)

    return scaled


CRITERIA_RATIO = 0.3


def criteria_arms() -> list[Arm]:
    """The baselines of issue 12 at mask_ratio 0.3, each the same size as "GMT global r=0.3 skip-emb":
    the embedding tables in a mask_ratio=0 group, 30 % of every other entry masked. Over all
    parameters (no skip) a score-based mask at 0.3 keeps everything (over 30 % of the scores are
    exactly 0, the word-embedding rows of absent tokens, so the threshold is 0), which makes a fixed
    |g| or |g|/|theta| mask plain AdamW; the random mask is also run over all parameters, as the
    paper's. Backend: criterion_backend() picks it when the optimizer is built; each run records it."""
    r = CRITERIA_RATIO
    calib = f"select_mask() on the mean gradient of {CALIBRATION_FRACTION:.0%} of the training pairs"

    def make(criterion, refresh_every, skip=True):
        return gmt(r, skip_embeddings=skip, criterion=criterion, refresh_every=refresh_every, backend="probe")

    return [
        Arm(f"random r={r} skip-emb redrawn", make("random", 1), "random", r,
            notes="criterion='random', a new mask every step (seeded by the run's seed)"),
        Arm(f"random r={r} skip-emb fixed", make("random", None), "random", r,
            notes="criterion='random', refresh_every=None: drawn at the first step and kept"),
        Arm(f"GaLLoP r={r} skip-emb", make("grad_over_weight", None), "fixed", r, before_training=calibrate_and_select(),
            notes=f"criterion='grad_over_weight', refresh_every=None, {calib}"),
        Arm(f"SAFT top-|g| r={r} skip-emb", make("grad", None), "fixed", r, before_training=calibrate_and_select(),
            notes=f"criterion='grad', refresh_every=None, {calib}"),
        Arm(f"random r={r} redrawn", make("random", 1, skip=False), "random", r,
            notes="criterion='random' over all parameters (global scope), a new mask every step"),
    ]


@functools.cache
def criterion_backend(criterion: str, refresh_every) -> str:
    """"cpu" (the C++ kernels, as "auto" picks for the other arms) when it serves this criterion and
    schedule, else "reference": two steps and a select_mask() on a small tensor with backend="cpu";
    a refusal (ValueError / RuntimeError / NotImplementedError) means reference. Each run records
    the backend it used (results: "backend")."""
    p = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 64).reshape(8, 8))
    try:
        opt = GMTAdamW([p], lr=1e-3, mask_ratio=0.5, backend="cpu", criterion=criterion, refresh_every=refresh_every)
        for _ in range(2):
            p.grad = torch.linspace(1.0, 2.0, 64).reshape(8, 8)
            if refresh_every != 1:
                opt.select_mask()
            opt.step()
    except (ValueError, RuntimeError, NotImplementedError):
        return "reference"
    return "cpu"
