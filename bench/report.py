"""Records as tables (Markdown, readable in a terminal too) and as one PNG."""

from __future__ import annotations

import math
from typing import Optional

from cases import BASELINE_STEP, MANY_SMALL_BASELINE, THRESHOLD_METHODS


def _seconds(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _mib(b: Optional[int]) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _percent(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return "0" if x == 0 else f"{100 * x:.2g}"


def _pow2(n: int) -> str:
    e = math.log2(n)
    return f"2^{e:g}" if e == int(e) else str(n)


def markdown_table(headers: list, rows: list) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def _matrix(records: list, cell) -> str:
    ns = sorted({r["n"] for r in records})
    labels = list(dict.fromkeys(r["label"] for r in records))
    at = {(r["label"], r["n"]): r for r in records}
    rows = [[label, *(cell(at[(label, n)]) if (label, n) in at else "" for n in ns)] for label in labels]
    return markdown_table(["method [backend]", *(f"N={_pow2(n)}" for n in ns)], rows)


def _refused(cell):
    return lambda r: "refused" if r["error"] else cell(r)


def threshold_tables(records: list) -> str:
    recs = [r for r in records if r["case"] == "threshold" and r["n"] is not None]
    if not recs:
        return ""
    parts = [
        "Threshold selection, median time per call (N entries over 8 tensors, mask_ratio 0.3):",
        _matrix(recs, _refused(lambda r: _seconds(r["median_s"]))),
        "Extra memory, MiB (peak above what was in use before the call):",
        _matrix(recs, _refused(lambda r: _mib(r["extra_bytes"]))),
        "Kept-count error, % of N (|#{|g| >= T} - k| / N against the exact k):",
        _matrix(recs, _refused(lambda r: _percent(r["count_error"]))),
    ]
    parts += [f"refused: {e}" for e in sorted({r["error"] for r in recs if r["error"]})]
    return "\n\n".join(parts)


def step_table(records: list) -> str:
    recs = [r for r in records if r["case"] == "step" and r["median_s"] is not None]
    if not recs:
        return ""
    recs.sort(key=lambda r: (r["method"] != BASELINE_STEP, r["ratio"] or 0))
    rows = [
        [r["label"], _pow2(r["n"]), _seconds(r["median_s"]), f"{_seconds(r['min_s'])} - {_seconds(r['max_s'])}",
         f"{r['ratio']:.2f}x", _mib(r["extra_bytes"]), _percent(r["count_error"]), r["note"]]
        for r in recs
    ]
    headers = ["optimizer [backend]", "N", "median step", "min - max", f"/ {BASELINE_STEP}",
               "extra MiB", "kept err %", "note"]
    steps = max(r["repeats"] for r in recs if r["method"] != BASELINE_STEP)
    return (f"Optimizer step, 8 tensors (ratio = median / median of {BASELINE_STEP}, interleaved in one "
            f"process, {steps} steps each):\n\n" + markdown_table(headers, rows))


def sweep_table(records: list) -> str:
    sweep = [r for r in records if r["case"] == "step_sweep" and r["median_s"] is not None]
    if not sweep:
        return ""
    ns = sorted({r["n"] for r in sweep})
    at = {(r["label"], r["n"]): r for r in sweep}
    labels = [label for label in dict.fromkeys(r["label"] for r in sweep) if label != BASELINE_STEP]
    rows = [[label, *(f"{at[(label, n)]['ratio']:.2f}x" if (label, n) in at else "" for n in ns)] for label in labels]
    rows.append([f"({BASELINE_STEP} median step)", *(_seconds(at[(BASELINE_STEP, n)]["median_s"]) if (BASELINE_STEP, n) in at else ""
                                                     for n in ns)])
    table = markdown_table(["optimizer [backend]", *(f"N={_pow2(n)}" for n in ns)], rows)
    return f"Step-time ratio to {BASELINE_STEP} versus N (8 tensors):\n\n{table}"


def many_small_table(records: list) -> str:
    recs = [r for r in records if r["case"] == "many_small" and r["median_s"] is not None]
    if not recs:
        return ""
    recs.sort(key=lambda r: (r["method"] != MANY_SMALL_BASELINE, r["ratio"] or 0))
    baseline = MANY_SMALL_BASELINE
    rows = [[r["label"], _seconds(r["median_s"]), f"{_seconds(r['min_s'])} - {_seconds(r['max_s'])}",
             f"{r['ratio']:.2f}x"] for r in recs]
    table = markdown_table(["optimizer [backend]", "median step", "min - max", f"/ {baseline}"], rows)
    return (f"Step overhead: {recs[0]['tensors']} tensors of 4K-16K entries ({_pow2(recs[0]['n'])} in all; "
            f"ratio to {baseline} timed interleaved, the target is <= 2x):\n\n{table}")


def unavailable_lines(backends: dict) -> str:
    lines = [f"- {name}: {reason}" for name, reason in backends.items() if reason is not None]
    return "Backends not measured:\n\n" + "\n".join(lines) if lines else ""


def all_tables(records: list, backends: dict, notes: list) -> str:
    parts = [threshold_tables(records), step_table(records), sweep_table(records), many_small_table(records),
             unavailable_lines(backends)]
    if notes:
        parts.append("Notes:\n\n" + "\n".join(f"- {n}" for n in notes))
    return "\n\n".join(p for p in parts if p)


# ---- plot -------------------------------------------------------------------------------------

_STYLE = {  # method -> (marker, linestyle): torch ops dashed, gmt_kernels solid
    "torch.topk": ("v", "--"),
    "torch.kthvalue": ("s", "--"),
    "torch.quantile": ("D", "--"),
    "sampled 1% + kthvalue": ("x", ":"),
    "magnitude_threshold exact": ("o", "-"),
    "magnitude_threshold approx": ("^", "-"),
}


def plot(records: list, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(20, 7.2), gridspec_kw=dict(width_ratios=[1.1, 1.1, 1]))
    _plot_thresholds(axes[0], [r for r in records if r["case"] == "threshold"])
    _plot_step_bars(axes[1], [r for r in records if r["case"] == "step" and r["ratio"] is not None])
    _plot_sweep(axes[2], [r for r in records if r["case"] == "step_sweep" and r["ratio"] is not None])
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_thresholds(ax, recs: list) -> None:
    labels = list(dict.fromkeys(r["label"] for r in recs))
    colors = _colors(len(labels))
    for color, label in zip(colors, labels):
        pts = sorted((r["n"], r["median_s"] / r["n"] * 1e9) for r in recs if r["label"] == label and r["median_s"])
        if not pts:
            continue
        method = next(r["method"] for r in recs if r["label"] == label)
        marker, ls = _STYLE.get(method, ("o", "-"))
        ax.plot(*zip(*pts), marker=marker, linestyle=ls, color=color, label=label, linewidth=1.8)
        if any(r["error"] for r in recs if r["label"] == label):
            ax.annotate("refuses N > 2^24", xy=pts[-1], xytext=(6, -4), textcoords="offset points",
                        fontsize=8, color=color, ha="left", va="top")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (entries over 8 tensors)")
    ax.set_ylabel("time per entry (ns), median")
    ax.set_title("Threshold selection: time per entry vs N")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)


_BACKEND_COLORS = {"reference": "#1f77b4", "cpu": "#17becf", "triton": "#9467bd"}


def _step_color(r: dict):
    if r["method"].startswith("AdamW"):
        return "#555555"
    if r["method"] == "naive GMT":
        return "#d62728"
    return _BACKEND_COLORS.get(r["backend"], "#2ca02c")


def _plot_step_bars(ax, recs: list) -> None:
    main_n = max((r["n"] for r in recs), default=0)
    # One baseline bar: the capped cases' own baselines are in their ratios already.
    recs = sorted((r for r in recs if r["method"] != BASELINE_STEP or r["n"] == main_n), key=lambda r: r["ratio"])
    names = [r["label"] + (f" (N={_pow2(r['n'])})" if r["note"] and "capped" in r["note"] else "") for r in recs]
    colors = [_step_color(r) for r in recs]
    bars = ax.barh(range(len(recs)), [r["ratio"] for r in recs], color=colors)
    ax.set_yticks(range(len(recs)), names, fontsize=8)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1)
    for bar, r in zip(bars, recs):
        ax.text(bar.get_width() * 1.05, bar.get_y() + bar.get_height() / 2, f"{r['ratio']:.2f}x",
                va="center", fontsize=8)
    ax.set_xlim(right=max(r["ratio"] for r in recs) * 3 if recs else 10)
    from matplotlib.patches import Patch

    backends = dict.fromkeys(r["backend"] for r in recs if r["method"] == "GMTAdamW")
    kinds = [("#555555", "torch.optim.AdamW"), ("#d62728", "naive GMT (torch ops)")]
    kinds += [(_step_color(dict(method="GMTAdamW", backend=b)), f"GMTAdamW [{b}]") for b in backends]
    ax.legend(handles=[Patch(color=c, label=t) for c, t in kinds], fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    n = main_n
    ax.set_xlabel(f"step time / {BASELINE_STEP} step time (interleaved medians, log)")
    ax.set_title(f"Optimizer step, N = {_pow2(n)} (8 tensors)" if n else "Optimizer step")
    ax.grid(True, axis="x", which="both", alpha=0.3)


def _plot_sweep(ax, recs: list) -> None:
    recs = [r for r in recs if r["method"] != BASELINE_STEP]
    labels = list(dict.fromkeys(r["label"] for r in recs))
    for label in labels:
        pts = sorted((r["n"], r["ratio"]) for r in recs if r["label"] == label)
        first = next(r for r in recs if r["label"] == label)
        color = _step_color(first)
        ax.plot(*zip(*pts), marker="o", color=color, label=label, linewidth=1.8,
                linestyle="--" if first["method"] == "AdamW foreach" else "-")
    ax.axhline(1.0, color="black", linewidth=1, label=BASELINE_STEP)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (entries over 8 tensors)")
    ax.set_ylabel(f"step time / {BASELINE_STEP} (log)")
    ax.set_title("Step-time ratio vs N")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


assert set(_STYLE) == set(THRESHOLD_METHODS), "every threshold method needs a plot style"
