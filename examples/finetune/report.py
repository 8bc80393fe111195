"""Turn a study's JSON into a markdown table and two plots; re-render with
    python -m examples.finetune.report examples/finetune/results/study.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _md(text: str) -> str:
    """An arm name inside a markdown table cell ("SAFT top-|g|" holds pipes)."""
    return text.replace("|", "\\|")


def _mean_sd(xs) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.4f} ± {sd:.4f}"


def _after_note(rs) -> str:
    """What an after_training hook did, over the runs that recorded it (one-off drop: deltas kept)."""
    kept = [r["after_training"]["deltas_kept"] for r in rs if "deltas_kept" in r.get("after_training", {})]
    if not kept:
        return ""
    return (f"; fraction of deltas kept after the drop {statistics.fmean(kept):.3f} (mean of {len(kept)} of {len(rs)} "
            "runs; the kept-fraction column is its AdamW training's)")


def _ordered(names) -> list:
    """Arm names in arms.default_arms() order (runs of a study made in parts come in any order);
    names it does not know last, as they came."""
    from .arms import default_arms

    rank = {a.name: i for i, a in enumerate(default_arms())}
    return sorted(names, key=lambda n: rank.get(n, len(rank)))


def summarise(out: dict) -> list[dict]:
    """One row per arm: metrics over seeds and the paired difference from AdamW of the same seed."""
    runs = out["runs"]
    adamw = {r["seed"]: r["metrics"]["mrr@10"] for r in runs if r["arm"] == "AdamW"}
    rows = []
    for name in _ordered(dict.fromkeys(r["arm"] for r in runs)):
        rs = [r for r in runs if r["arm"] == name]
        mrr = [r["metrics"]["mrr@10"] for r in rs]
        deltas = {r["seed"]: r["metrics"]["mrr@10"] - adamw[r["seed"]] for r in rs if r["seed"] in adamw}
        rows.append({
            "arm": name, "family": rs[0]["family"], "mask_ratio": rs[0]["mask_ratio"], "seeds": [r["seed"] for r in rs],
            "mrr": mrr, "r1": [r["metrics"]["recall@1"] for r in rs],
            "delta": deltas if "kept_mean" in rs[0] and name != "AdamW" else {},
            "notes": rs[0].get("notes", "") + _after_note(rs), "reused": any("training_reused_from" in r for r in rs),
            "train_s": statistics.fmean(r["train_s"] for r in rs), "eval_s": statistics.fmean(r["eval_s"] for r in rs),
            "kept": statistics.fmean(r["kept_mean"] for r in rs) if "kept_mean" in rs[0] else None,
            "zero_grad": statistics.fmean(r["zero_grad_mean"] for r in rs) if "zero_grad_mean" in rs[0] else None,
            "final_loss": statistics.fmean(statistics.fmean(r["history"]["loss"][-max(1, len(r["history"]["loss"]) // 10):])
                                           for r in rs) if "history" in rs[0] else None,
        })
    return rows


def paired(deltas: dict) -> tuple:
    """(mean, sd, mean / (sd / sqrt(n))) of the per-seed differences; sd and the ratio None below 2 seeds."""
    xs = list(deltas.values())
    if not xs:
        return None, None, None
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return mean, None, None
    sd = statistics.stdev(xs)
    return mean, sd, (mean / (sd / len(xs) ** 0.5) if sd > 0 else None)


def _arm_table(rows) -> list[str]:
    lines = ["| arm | seeds | test MRR@10 (mean ± sd) | recall@1 | Δ MRR@10 vs AdamW, per seed | mean Δ ± sd | t | kept fraction | exactly-zero grads | final loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    for r in rows:
        d = r["delta"]
        per_seed = ", ".join(f"{d[s]:+.4f}" for s in sorted(d)) or "-"
        mean, sd, t = paired(d)
        mean_delta = "-" if mean is None else f"{mean:+.4f}" + ("" if sd is None else f" ± {sd:.4f}")
        lines.append(f"| {_md(r['arm'])} | {len(r['seeds'])} | {_mean_sd(r['mrr'])} | {_mean_sd(r['r1'])} | {per_seed} | {mean_delta} | "
                     f"{fmt(t, '+.1f')} | {fmt(r['kept'], '.3f')} | {fmt(r['zero_grad'], '.3f')} | {fmt(r['final_loss'], '.3f')} |")
    lines += ["", "t: mean Δ / (sd of Δ / sqrt(seeds)), the paired t statistic (with 3 seeds, |t| > 4.3 is p < 0.05 two-sided; "
              "with 2 seeds, |t| > 12.7).", "kept fraction: entries updated with their gradient per step, over all trainable entries (mean of "
              "mask_stats() over steps; a mask_ratio=0 group counts as kept). final loss: mean of the last tenth of the steps, over the arm's own seeds (compare arms on the same seeds only). exactly-zero grads: fraction of gradient "
              "entries that are exactly 0 (mean over steps); where it exceeds mask_ratio, scope='global' has threshold 0 "
              "and keeps every entry."]
    noted = [r for r in rows if r["notes"]]
    if noted:
        lines += ["", "Arms:"] + [f"- {r['arm']}: {r['notes']}" for r in noted]
    same = [r["arm"] for r in rows if r["delta"] and all(v == 0.0 for v in r["delta"].values())]
    if same:
        lines += ["", f"Exactly AdamW's test metrics on every seed: {', '.join(same)}. GMT with scope='global' at a mask "
                  "ratio under the fraction of exactly-zero gradient entries keeps every entry (threshold 0); a one-off "
                  "drop under the fraction of exactly-zero deltas (rows of tokens never seen) drops nothing (threshold "
                  "0, ties kept)."]
    return lines


# (A, B): A's MRR@10 minus B's of the same seed, for the paper's claims: GMT against a random mask of
# the same size, and against the fixed masks (same size: skip-emb at 0.3 keeps 70 % of the
# non-embedding entries in each)
COMPARISONS = [
    ("GMT global r=0.3 skip-emb", "random r=0.3 skip-emb redrawn"),
    ("GMT global r=0.3 skip-emb", "random r=0.3 skip-emb fixed"),
    ("GMT global r=0.3", "random r=0.3 redrawn"),
    ("GMT global r=0.3 skip-emb", "GaLLoP r=0.3 skip-emb"),
    ("GMT global r=0.3 skip-emb", "SAFT top-|g| r=0.3 skip-emb"),
    ("random r=0.3 skip-emb redrawn", "random r=0.3 skip-emb fixed"),
]


def _comparison_table(out: dict) -> list[str]:
    by = {}
    for r in out["runs"]:
        by.setdefault(r["arm"], {})[r["seed"]] = r["metrics"]["mrr@10"]
    lines = []
    for a, b in COMPARISONS:
        if a not in by or b not in by:
            continue
        d = {s: by[a][s] - by[b][s] for s in sorted(set(by[a]) & set(by[b]))}
        if not d:
            continue
        mean, sd, t = paired(d)
        if not lines:
            lines = ["", "Paired comparisons between arms (A's test MRR@10 minus B's, same seed):", "",
                     "| A | B | per seed | mean ± sd | t |", "|---|---|---|---|---|"]
        lines.append(f"| {_md(a)} | {_md(b)} | {', '.join(f'{v:+.4f}' for v in d.values())} | {mean:+.4f}"
                     + ("" if sd is None else f" ± {sd:.4f}") + f" | {'-' if t is None else format(t, '+.1f')} |")
    return lines


def _cost_table(out: dict) -> list[str]:
    """Per arm, from the study's own runs: median whole step and optimizer step (not interleaved, so
    the whole step moves with the machine's load; the optimizer's time is the steadier part)."""
    runs = [r for r in out["runs"] if "step_s_median" in r and "training_reused_from" not in r]
    if not runs:
        return []
    base = [r["opt_s_median"] for r in runs if r["arm"] == "AdamW"]
    base_step = [r["step_s_median"] for r in runs if r["arm"] == "AdamW"]
    lines = ["", "Cost in the study's own runs (median over each run's steps, then median over its seeds; runs not "
             "interleaved, the machine's load moved between them):", "",
             "| arm | backend | whole step s | optimizer step ms | optimizer ms over AdamW's | that, as % of AdamW's whole step |",
             "|---|---|---|---|---|---|"]
    for name in _ordered(dict.fromkeys(r["arm"] for r in runs)):
        rs = [r for r in runs if r["arm"] == name]
        step = statistics.median(r["step_s_median"] for r in rs)
        opt = statistics.median(r["opt_s_median"] for r in rs)
        backend = ", ".join(sorted({str(r.get("backend", "-")) for r in rs}))
        extra = "-" if not base else f"{1e3 * (opt - statistics.median(base)):+.0f}"
        share = "-" if not base else f"{100 * (opt - statistics.median(base)) / statistics.median(base_step):+.1f} %"
        lines.append(f"| {_md(name)} | {backend} | {step:.2f} | {1e3 * opt:.0f} | {extra} | {share} |")
    if any("backend" not in r for r in runs):
        lines += ["", "backend '-': not recorded (runs made before the study recorded it; their GMTAdamW used "
                  "backend='auto', the C++ kernels here)."]
    return lines


def markdown(out: dict) -> str:
    meta, rows = out["meta"], summarise(out)
    cfg = meta.get("config", {})
    lines = []
    if meta.get("quick"):
        lines += ["**Quick pilot** (`--quick`): a smoke run of the whole pipeline with a handful of steps on tiny",
                  "batches and a 200-pair test subset. Its numbers say nothing about GMT versus AdamW.", ""]
    m = meta["machine"]
    lines += [f"Model {meta['model']}; pairs per split {meta['data_sizes']}; max_len {meta['max_len']} tokens; "
              f"steps {cfg.get('steps')} x {cfg.get('batch_size')} pairs x accumulation {cfg.get('grad_accum')}; "
              f"lr {cfg.get('lr')} (warm-up ratio {cfg.get('warmup_ratio')}, cosine), weight decay {cfg.get('weight_decay')}, "
              f"max_grad_norm {cfg.get('max_grad_norm')}.",
              f"Machine: {m['processor']}, {m['cpus']} CPUs, {m['threads']} torch threads, load average at start "
              f"{m['loadavg_at_start']}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; "
              f"{meta.get('duration_s', 0) / 60:.1f} min.", ""]
    parts = meta.get("parts", [])
    if parts:
        lines += ["Parts (each one invocation merged into this file):", "",
                  "| started (UTC) | arms | minutes | load average at start | threads |", "|---|---|---|---|---|"]
        for p_ in parts:
            pm = p_.get("machine", {})
            lines.append(f"| {p_['started']} | {_md(', '.join(p_.get('arms', [])))} | {p_.get('duration_s', 0) / 60:.1f} | "
                         f"{' '.join(pm.get('loadavg_at_start') or [])} | {pm.get('threads')} |")
        lines += [""]
    if "lr_sweep" in out:
        s = out["lr_sweep"]
        lines += ["LR sweep (AdamW, seed 0, validation MRR@10): "
                  + ", ".join(f"{lr:g}: {v:.4f}" for lr, v in zip(s["grid"], s["val_mrr@10"])) + f"; chosen {s['chosen']:g}.", ""]
    if rows:
        lines += _arm_table(rows)
    lines += _comparison_table(out)
    lines += _cost_table(out)
    tables = [(out["throughput"], "")] if out.get("throughput") else [(f["rows"], f["note"]) for f in out.get("throughput_files", [])]
    for throughput, source in tables:
        lines += ["", "Training step, interleaved, median (the paper's Table 3)" + (f" — {source}" if source else "") + ":", "",
                  "| optimizer | step s (median, min-max) | optimizer step ms | samples/s | step / AdamW fused "
                  "(ratio of medians) | step / AdamW fused (median of same-batch ratios) |",
                  "|---|---|---|---|---|---|"]
        for t in throughput:
            paired = f"{t['step_vs_adamw_paired']:.3f}x" if "step_vs_adamw_paired" in t else "not measured"
            lines.append(f"| {t['optimizer']} | {t['step_s_median']:.3f} ({t['step_s_min']:.3f}-{t['step_s_max']:.3f}) | "
                         f"{t['opt_ms_median']:.1f} | {t['samples_per_s']:.2f} | {t['step_vs_adamw']:.3f}x | {paired} |")
        base = throughput[0]
        lines += ["", "Target (issue 13): GMTAdamW's whole training step within 2 % of AdamW(fused=True)'s. Whole-step "
                  "medians move with the machine's load; the optimizer's own time, measured inside the same steps, is "
                  "the steadier part: "
                  + "; ".join(f"{t['optimizer']} adds {t['opt_ms_median'] - base['opt_ms_median']:.0f} ms per step over "
                              f"{base['optimizer']}, {100 * (t['opt_ms_median'] - base['opt_ms_median']) / 1e3 / base['step_s_median']:.1f} % "
                              "of its whole step" for t in throughput[1:]) + "."]
    return "\n".join(lines) + "\n"


def _smooth(xs, window):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot(out: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # up to 20 arms: the default 10-colour cycle would give two arms one colour
    plt.rcParams["axes.prop_cycle"] = matplotlib.cycler(color=plt.get_cmap("tab20").colors)

    rows = summarise(out)
    title = " (quick pilot: not a result)" if out["meta"].get("quick") else ""
    paths = []

    fig, (ax, dx, kx) = plt.subplots(1, 3, figsize=(16, 4.6))
    adamw = next((r for r in rows if r["arm"] == "AdamW"), None)
    m = statistics.fmean(adamw["mrr"]) if adamw else 0.0
    if adamw:
        m = statistics.fmean(adamw["mrr"])
        sd = statistics.stdev(adamw["mrr"]) if len(adamw["mrr"]) > 1 else 0.0
        ax.axhspan(m - sd, m + sd, color="tab:blue", alpha=0.15, label="AdamW mean ± sd over seeds")
        ax.axhline(m, color="tab:blue", lw=1)
    zero = next((r for r in rows if r["family"] == "zero-shot"), None)
    if zero:
        ax.axhline(zero["mrr"][0], color="gray", ls="--", lw=1, label="zero-shot")
    dx.axhline(0.0, color="tab:blue", lw=1)
    sd_of = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    markers = iter("sD^vP*Xhp<>d")
    placed: dict = {}
    for family in dict.fromkeys(r["family"] for r in rows):
        if family in ("zero-shot", "adamw"):
            continue
        fam = sorted((r for r in rows if r["family"] == family and r["mask_ratio"] is not None and r["delta"]),
                     key=lambda r: r["mask_ratio"])
        # GMT global is a line over mask ratios; every other arm is its own marker
        groups = [("GMT global", fam, "o", "-")] if family == "gmt-global" else [(r["arm"], [r], next(markers, "o"), "none") for r in fam]
        for label, members, marker, ls in groups:
            xs = [r["mask_ratio"] for r in members]
            if ls == "none":  # single arms sharing a ratio side by side, not on top of each other
                xs = [x + 0.012 * placed.setdefault(x, []).__len__() for x in xs]
                for x in members:
                    placed[x["mask_ratio"]].append(x["arm"])
            deltas = [list(r["delta"].values()) for r in members]
            # level = AdamW's mean over all its seeds + the arm's mean paired difference: arms run on fewer
            # seeds stay comparable (their own raw mean would carry their seeds' luck)
            ax.errorbar(xs, [m + statistics.fmean(d) for d in deltas], yerr=[sd_of(d) for d in deltas],
                        marker=marker, ls=ls, capsize=3, label=label)
            dx.errorbar(xs, [statistics.fmean(d) for d in deltas], yerr=[sd_of(d) for d in deltas],
                        marker=marker, ls=ls, capsize=3, label=label)
    ax.set_xlabel("mask ratio (fraction of entries not updated per step)")
    ax.set_ylabel("test MRR@10: AdamW mean + paired Δ (± sd of Δ)")
    ax.set_title("MRR@10 against mask ratio" + title, fontsize=10)
    ax.legend(fontsize=7)
    dx.set_xlabel("mask ratio")
    dx.set_ylabel("MRR@10 minus AdamW's of the same seed")
    dx.set_title("Paired difference from AdamW (mean ± sd over seeds)", fontsize=10)
    dx.legend(fontsize=7)
    # the same differences against what each arm actually updated: at low mask ratios scope="global"
    # keeps everything (threshold 0), so its nominal ratio says little
    kx.axhline(0.0, color="tab:blue", lw=1)
    for r in rows:
        if r["delta"] and r["kept"] is not None:
            d = list(r["delta"].values())
            kx.errorbar([r["kept"]], [statistics.fmean(d)], yerr=[sd_of(d)], marker="o", capsize=3, label=r["arm"])
    kx.set_xlabel("kept fraction (entries updated per step, mean)")
    kx.set_ylabel("MRR@10 minus AdamW's of the same seed")
    kx.set_title("Paired difference against the kept fraction", fontsize=10)
    kx.legend(fontsize=6)
    fig.tight_layout()
    paths.append(stem.with_name(stem.name + "_mask_ratio.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, (ax, dx) = plt.subplots(1, 2, figsize=(13, 4.6))
    hist = {}
    for r in out["runs"]:
        if "history" in r:
            hist.setdefault(r["arm"], {})[r["seed"]] = r["history"]["loss"]
    base = hist.get("AdamW", {})
    # arms whose training is AdamW's (one-off drop: reused, or the same losses) add nothing to a loss plot
    same = [a for a, h in hist.items() if a != "AdamW" and all(s in base and h[s] == base[s] for s in h)]
    arms_ = [a for a in hist if a not in same]
    # the left panel: arms run on 3 seeds or more, averaged over the seeds they all share
    left = [a for a in arms_ if len(hist[a]) >= 3]
    common = sorted(set.intersection(*(set(hist[a]) for a in left))) if left else []
    for name in arms_:
        if common and name in left:
            mean = [statistics.fmean(step) for step in zip(*(hist[name][s] for s in common))]
            ax.plot(range(1, len(mean) + 1), _smooth(mean, max(1, len(mean) // 10)), label=name, lw=1.2)
        if name != "AdamW" and base:
            diffs = [[x - y for x, y in zip(hist[name][s], base[s])] for s in hist[name] if s in base]
            mean = [statistics.fmean(step) for step in zip(*diffs)]
            dx.plot(range(1, len(mean) + 1), _smooth(mean, max(1, len(mean) // 10)),
                    label=f"{name} ({len(diffs)} seeds)", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training InfoNCE loss (moving average)")
    ax.set_title(f"Training curves, arms with 3+ seeds, mean over seeds {common}" + title, fontsize=9)
    ax.legend(fontsize=6)
    dx.axhline(0.0, color="tab:blue", lw=1)
    dx.set_xlabel("step")
    dx.set_ylabel("loss minus AdamW's of the same seed and step (moving average)")
    dx.set_title("Paired loss difference from AdamW (mean over each arm's seeds)"
                 + (f"\nidentical to AdamW, not drawn: {', '.join(same)}" if same else ""), fontsize=8)
    dx.legend(fontsize=6)
    fig.tight_layout()
    paths.append(stem.with_name(stem.name + "_curves.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def attach_throughput(out: dict, stem: Path) -> dict:
    """A study run with --no-timing takes its samples/s tables from <name>_throughput*.json beside it
    (python -m examples.finetune.study --timing-only [--name <name>_...]), saying where each came from."""
    if "throughput" in out:
        return out
    files = []
    for side in sorted(stem.parent.glob(stem.name + "_*throughput.json")):
        t = json.loads(side.read_text())
        m, cfg = t["meta"]["machine"], t["meta"].get("config", {})
        note = (f"from {side.name}: {cfg.get('batch_size')} pairs x {t['meta'].get('max_len')} tokens, {m['threads']} torch "
                f"thread(s), load average at start {' '.join(m.get('loadavg_at_start') or [])}")
        files.append({"rows": t["throughput"], "note": note})
    return {**out, "throughput_files": files} if files else out


def write_report(out: dict, stem: Path) -> None:
    out = attach_throughput(out, stem)
    paths = plot(out, stem) if out["runs"] else []
    text = markdown(out) + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in paths) + "\n"
    stem.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    path = Path(sys.argv[1])
    write_report(json.loads(path.read_text()), path.with_suffix(""))
