"""The options records of the kernel interface (Backend.radix_histogram / Backend.masked_adamw):
how entries are scored, one param group's AdamW hyper-parameters, and which entries an update keeps.

Backends take these records instead of restating a long argument list (as torch.optim's adamw()
functional takes its hyper-parameters once); `schema_args` turns each into the keyword arguments
of the operator schemas in ops.py, in one place.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor

from .ops import split_lr

CRITERIA = ("grad", "grad_over_weight", "random")


@dataclass(frozen=True)
class Scoring:
    """How entries are scored (SEMANTICS.md section 8), the same in the histogram and the update."""

    criterion: str = "grad"
    score_eps: float = 1e-8  # grad_over_weight: s = |g| / (|theta| + score_eps)
    weights: Sequence[Tensor] = ()  # grad_over_weight, histogram only: theta per tensor
    # (masked_adamw reads theta from params)
    random_keys: Optional[Tensor] = None  # random: int64 [n], per tensor the 32-bit key
    # scores.random_key(seed, selection, group, position)
    entry_offsets: Optional[Tensor] = None  # random: int64 [n], row-major index, in the whole
    # unsharded parameter, of the tensor's first entry

    def schema_args(self) -> dict:  # keyword args of the ops' schemas
        return {"criterion": self.criterion, "score_eps": float(self.score_eps),
                "weights": list(self.weights), "random_keys": self.random_keys,
                "entry_offsets": self.entry_offsets}


GRAD = Scoring()


@dataclass(frozen=True)
class AdamWOptions:
    """One param group's AdamW hyper-parameters and the step's AMP / skip inputs."""

    lr: "float | Tensor"
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool = False
    maximize: bool = False
    mask_mode: str = "grad"  # "grad" | "freeze"
    grad_scale: Optional[Tensor] = None  # 0-d: g is divided by it
    skip: Optional[Tensor] = None  # 0-d bool: when true nothing at all changes (masks too)

    def schema_args(self) -> dict:
        """Keyword args of the masked_adamw schema; lr split into (lr, lr_tensor), since a schema
        argument has one type."""
        return {**split_lr(self.lr), "beta1": float(self.beta1), "beta2": float(self.beta2), "eps": float(self.eps),
                "weight_decay": float(self.weight_decay), "amsgrad": bool(self.amsgrad),
                "maximize": bool(self.maximize), "mask_mode": self.mask_mode,
                "grad_scale": self.grad_scale, "skip": self.skip}


@dataclass(frozen=True)
class MaskSource:
    """Which entries the update keeps."""

    thresholds: Tensor  # [n] float32 (float64 for f64 and u32 key formats)
    # (code that torch.compile traces passes it explicitly: dynamo cannot wrap the default instance)
    scoring: Scoring = GRAD
    masks: Sequence[Tensor] = ()  # stored 1-bit masks, one per tensor, or () (none stored)
    # 0-d bool on the tensors' device. None or true: keep = score rule and, if masks are given,
    # write them; false: keep = the stored bit (scores not computed)
    refresh: Optional[Tensor] = None
    update_params: bool = True  # False (select_mask): write masks and kept only

    def schema_args(self) -> dict:
        """Keyword args of the masked_adamw schema (thresholds and masks are positional there, and
        the update reads theta from params, so the scoring's weights are not passed)."""
        scoring = self.scoring.schema_args()
        del scoring["weights"]
        return {**scoring, "refresh": self.refresh, "update_params": bool(self.update_params)}
