"""Samples/s of a whole training step (forward, backward, clip, optimizer) per optimizer, as the
GMT paper's Table 3: AdamW(fused=True), GMTAdamW, and naive GMT (cat every |g|, kthvalue, mask,
AdamW(fused=True): bench/cases.NaiveGMT, the public implementations' way).

Each optimizer trains its own copy of the model on the same micro-batches; steps are interleaved
(one step of each per round, the order rotating) so machine load hits all alike; medians are quoted.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from gmt_kernels import GMTAdamW

from .arms import trainable
from .train import TrainConfig, dropout_seed, forward_backward, micro_batches

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from cases import NaiveGMT  # noqa: E402  (bench/ is a folder of scripts, not a package)

MASK_RATIO = 0.3


def contenders(lr: float, weight_decay: float) -> dict:
    return {
        "AdamW(fused=True)": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=weight_decay, fused=True),
        f"GMTAdamW r={MASK_RATIO}": lambda ps: GMTAdamW(ps, lr=lr, weight_decay=weight_decay, mask_ratio=MASK_RATIO),
        f"naive GMT r={MASK_RATIO}": lambda ps: NaiveGMT(ps, MASK_RATIO, lr=lr, weight_decay=weight_decay),
        # the paper's Table 3 also times its Random Mask
        f"GMTAdamW random r={MASK_RATIO}": lambda ps: GMTAdamW(ps, lr=lr, weight_decay=weight_decay, mask_ratio=MASK_RATIO,
                                                               criterion="random"),
    }


def measure(base_model, data, cfg: TrainConfig, rounds: int = 5, warmup: int = 1) -> list[dict]:
    runs = {}
    for name, make in contenders(cfg.lr, cfg.weight_decay).items():
        model = copy.deepcopy(base_model).train()
        runs[name] = (model, make(trainable(model)), [], [])
    steps = warmup + rounds
    batches = micro_batches(len(data.queries["train"]), TrainConfig(**{**cfg.to_dict(), "steps": steps}))
    names = list(runs)
    for step in range(steps):
        for name in names[step % len(names):] + names[: step % len(names)]:
            model, opt, step_s, opt_s = runs[name]
            t0 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            for a in range(cfg.grad_accum):
                micro = step * cfg.grad_accum + a
                torch.manual_seed(dropout_seed(cfg.seed, micro))
                forward_backward(model, data.queries["train"], data.codes["train"], batches[micro], 1.0 / cfg.grad_accum)
            torch.nn.utils.clip_grad_norm_(trainable(model), cfg.max_grad_norm)
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if step >= warmup:
                step_s.append(t2 - t0)
                opt_s.append(t2 - t1)
    samples = cfg.batch_size * cfg.grad_accum
    base_steps = runs[names[0]][2]
    base = statistics.median(base_steps)
    rows = []
    for name in names:
        step_s, opt_s = runs[name][2], runs[name][3]
        med = statistics.median(step_s)
        # A round's contenders train on the same batch, so the per-round ratio cancels the batch's own
        # cost (its token count moves a step by +-15 %), which the ratio of medians keeps.
        paired = statistics.median(s / b for s, b in zip(step_s, base_steps))
        rows.append({"optimizer": name, "step_s_median": med, "step_s_min": min(step_s), "step_s_max": max(step_s),
                     "opt_ms_median": 1e3 * statistics.median(opt_s), "samples_per_s": samples / med,
                     "step_vs_adamw": med / base, "step_vs_adamw_paired": paired, "rounds": len(step_s),
                     "samples_per_step": samples})
    return rows
