"""What selecting the GMT threshold costs, and what a GMTAdamW step costs next to AdamW.

    python bench/run.py [--quick] [--device cpu|cuda] [--json PATH] [--plot PATH]

Runs the cases of bench/cases.py (the same ones `pytest bench/` runs), prints tables, and writes
one JSON record per measurement plus a PNG. --quick takes under 3 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]  # the checkout's gmt_kernels, run from anywhere

from machine import OtherProcessesCpu, describe, describe_load, machine_info  # noqa: E402  (before torch)

import torch  # noqa: E402

import cases  # noqa: E402
import measure  # noqa: E402
import report  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: under 3 minutes on a 2-core CPU")
    parser.add_argument("--size", choices=sorted(cases.SIZES), help="a named size (overrides --quick)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", metavar="PATH", help="write every record (and the machine) as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write the PNG plot")
    parser.add_argument("--markdown", metavar="PATH", help="write the machine, the tables and the plot link as Markdown")
    parser.add_argument("--only", choices=("threshold", "step"), help="run one suite only")
    args = parser.parse_args(argv)
    # Optional dependencies are checked before measuring, not after minutes of it.
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error(
            "--plot needs matplotlib, which is not installed in this Python. Install it "
            "(`pip install matplotlib`, or `pip install .[bench]`), or run without --plot."
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device cuda asked, but this torch ({torch.__version__}) sees no CUDA device. "
            "Run with --device cpu, or on a machine with a GPU and a CUDA build of torch."
        )
    return args


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="case", dynamic_ncols=True, file=sys.stderr)
    except ImportError:  # tqdm is in requirements-dev.txt; still run without it
        return _PlainProgress(total)


class _PlainProgress:
    def __init__(self, total):
        self.total, self.done = total, 0

    def set_description(self, text):
        print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def update(self, n=1):
        self.done += n

    def close(self):
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    size = cases.SIZES[args.size or ("quick" if args.quick else "full")]
    started, others = time.perf_counter(), OtherProcessesCpu()
    memory_note = None if measure.allocator_for_timing() else "glibc mallopt unavailable: peak RSS may miss freed temporaries"
    memory_note = memory_note or (measure.cpu_peak_supported() if args.device == "cpu" else None)
    torch.manual_seed(0)

    backends = cases.backend_report(args.device)
    threshold_cases = cases.threshold_cases(size, args.device) if args.only != "step" else []
    step_cases = cases.step_cases(size, args.device) if args.only != "threshold" else []
    machine = machine_info(args.device)
    print(f"gmt_kernels bench ({size.name}) on {args.device}: {describe(machine)}", flush=True)
    print("backends: " + ", ".join(f"{n} ({'used' if r is None else 'not used'})" for n, r in backends.items()), flush=True)

    records, pool = [], measure.BaselinePool()
    progress = _progress(len(threshold_cases) + len(step_cases))
    try:
        for n in dict.fromkeys(c.n for c in threshold_cases):
            group = [c for c in threshold_cases if c.n == n]
            progress.set_description(f"threshold N=2^{math.log2(n):g}, {len(group)} methods round-robin")
            records += measure.measure_thresholds(group, size.min_repeats, size.repeat_budget_s)
            progress.update(len(group))
        for case in step_cases:
            progress.set_description(f"{case.suite} {case.label} N=2^{math.log2(case.n):g}")
            record, baseline = measure.measure_step(case, size.steps, size.warmup_steps)
            records.append(record)
            pool.add(case, baseline)
            progress.update()
    finally:
        progress.close()
    measure.add_threshold_ratios(records)
    records += pool.records()
    records += _unavailable_records(backends, args.device)

    notes = _notes(size, memory_note)
    elapsed = time.perf_counter() - started
    machine["load_average_end"] = os.getloadavg()
    machine["other_processes_cpu_share"] = others.share()
    print()
    print(f"Machine: {describe(machine)}; {describe_load(machine)}")
    print(report.all_tables(records, backends, notes))
    print(f"\nTotal time: {elapsed:.0f} s")

    if args.json:
        payload = dict(machine=machine, device=args.device, size=size.name, elapsed_s=elapsed,
                       backends=backends, notes=notes, records=records)
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json} ({len(records)} records)")
    if args.plot:
        report.plot(records, args.plot, f"gmt_kernels bench ({size.name}, {args.device}): {describe(machine)}")
        print(f"wrote {args.plot}")
    if args.markdown:
        text = f"Machine: {describe(machine)}; {describe_load(machine)}. Run: `{_command_line(argv)}`, {elapsed:.0f} s.\n\n"
        text += report.all_tables(records, backends, notes) + "\n"
        if args.plot:
            link = os.path.relpath(os.path.abspath(args.plot), os.path.dirname(os.path.abspath(args.markdown)))
            text += f"\n![bench plot]({link})\n"
        Path(args.markdown).write_text(text)
        print(f"wrote {args.markdown}")
    return 0


def _command_line(argv) -> str:
    return " ".join(["python bench/run.py", *(sys.argv[1:] if argv is None else argv)])


def _unavailable_records(backends: dict, device: str) -> list:
    """A backend that cannot run here is a result too: one record per method it would have served."""
    out = []
    for name, reason in backends.items():
        if reason is None:
            continue
        for suite, method in [("threshold", "magnitude_threshold exact"), ("threshold", "magnitude_threshold approx"),
                              ("step", "GMTAdamW")]:
            out.append(dict(case=suite, method=method, backend=name, device=device, dtype="float32", n=None,
                            tensors=None, label=f"{method} [{name}]", median_s=None, min_s=None, max_s=None,
                            repeats=0, ratio=None, ratio_to=None, extra_bytes=None, count_error=None,
                            error=f"backend unavailable: {reason}", note=""))
    return out


def _notes(size: cases.Size, memory_note) -> list:
    notes = [
        "Times are medians of repeated calls (threshold: >= "
        f"{size.min_repeats} after a warm-up; step: {size.steps} steps after {size.warmup_steps} warm-up).",
        "naive GMT = torch.cat of every |g|, torch.kthvalue, g *= (|g| >= T), AdamW(fused=True).step().",
        "sampled 1% + kthvalue = DGC-style estimate from a 1 % random sample of each tensor.",
    ]
    caps = []
    if size.reference_threshold_cap is not None:
        caps.append(f"threshold cases up to N = 2^{math.log2(size.reference_threshold_cap):g}")
    if size.reference_step_cap is not None:
        caps.append(f"step cases at N <= {size.step_tensors}x2^{math.log2(size.reference_step_cap):g}")
    if caps:
        notes.append(
            f"The reference backend (pure PyTorch, the oracle, not a fast path) is capped in --{size.name}: "
            f"{' and '.join(caps)}; the full run (no --quick) measures it at every size."
        )
    if memory_note:
        notes.append(memory_note)
    return notes


if __name__ == "__main__":
    sys.exit(main())
