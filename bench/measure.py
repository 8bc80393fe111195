"""How a case becomes a record: wall time (medians, never single times), extra memory, kept-count error."""

from __future__ import annotations

import ctypes
import statistics
import time
from typing import Callable, Optional

import torch

from cases import BASELINE_STEP, BASELINE_THRESHOLD, StepCase, ThresholdCase, kept_entries

# ---- memory -----------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _set_allocator(mmap_threshold: int, trim_threshold: int) -> bool:
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(_LIBC.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def allocator_for_timing() -> bool:
    """glibc's steady state, fixed: after a few large frees its dynamic mmap threshold sits at its
    32 MiB ceiling (trim at twice that), so smaller temporaries reuse heap pages. Fixing it keeps
    every case on the same footing whatever ran before it."""
    return _set_allocator(32 << 20, 64 << 20)


def _allocator_for_memory() -> None:
    """Every allocation of 64 KiB or more mapped on its own and unmapped when freed, so a temporary
    copy of the gradients shows in peak RSS instead of landing in heap pages already resident."""
    if _set_allocator(1 << 16, 1 << 16) and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)


def cpu_peak_supported() -> Optional[str]:
    """None if this process can reset and read its peak RSS, else why not."""
    try:
        _reset_peak_rss()
        _status_bytes("VmHWM")
        return None
    except OSError as exc:
        return f"peak RSS cannot be reset here ({exc}); extra memory is not measured"


class PeakMemory:
    """Extra memory of the code inside `with`: peak above what was in use when it started."""

    def __init__(self, device: str):
        self.device = device
        self.extra_bytes: Optional[int] = None

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        elif cpu_peak_supported() is None:
            _allocator_for_memory()
            _reset_peak_rss()
            self._base = _status_bytes("VmRSS")
        else:
            self._base = None
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.extra_bytes = torch.cuda.max_memory_allocated() - self._base
        elif self._base is not None:
            self.extra_bytes = max(0, _status_bytes("VmHWM") - self._base)
            allocator_for_timing()
        return False


# ---- time -------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _summary(times: list) -> dict:
    return dict(median_s=statistics.median(times), min_s=min(times), max_s=max(times), repeats=len(times))


def _record(suite: str, case, **fields) -> dict:
    base = dict(
        case=suite, method=case.method, backend=case.backend, device=case.device, dtype=case.dtype,
        n=case.n, tensors=case.tensors, label=case.label, median_s=None, min_s=None, max_s=None,
        repeats=0, ratio=None, ratio_to=None, extra_bytes=None, count_error=None, error=None, note="",
    )
    base.update(fields)
    return base


# ---- threshold suite --------------------------------------------------------------------------

MAX_REPEATS = 30


def measure_threshold(case: ThresholdCase, min_repeats: int, budget_s: float) -> dict:
    return measure_thresholds([case], min_repeats, budget_s)[0]


def measure_thresholds(group: list, min_repeats: int, budget_s: float) -> list:
    """Records of cases that share their gradients (one N), timed round-robin: a burst of load from
    another process then slows every method of a round alike instead of one method's every call."""
    records, live = {}, []
    for case in group:
        grads = case.grads()
        try:
            # The warm-up call also measures the extra memory and gives the answer that is checked.
            with PeakMemory(case.device) as memory:
                threshold = case.run(grads)
        except RuntimeError as exc:  # torch.quantile refuses N > 2^24: a result, not a crash
            records[case] = _record("threshold", case, error=f"{type(exc).__name__}: {exc}")
            continue
        count_error = abs(kept_entries(grads, threshold) - case.k) / case.n
        live.append((case, grads, dict(extra_bytes=memory.extra_bytes, count_error=count_error), []))
    rounds = 0
    while live and (rounds < min_repeats or (_spent(live) < budget_s * len(live) and rounds < MAX_REPEATS)):
        for case, grads, _, times in live:
            times.append(timed(lambda: case.run(grads), case.device))
        rounds += 1
    for case, _, fields, times in live:
        records[case] = _record("threshold", case, **_summary(times), **fields)
    return [records[case] for case in group]


def _spent(live: list) -> float:
    return sum(sum(times) for *_, times in live)


def add_threshold_ratios(records: list) -> None:
    """ratio = median time / median time of torch.kthvalue over the concatenated |g| at the same N."""
    records = [r for r in records if r["case"] == "threshold"]
    base = {r["n"]: r["median_s"] for r in records if r["method"] == BASELINE_THRESHOLD and r["median_s"]}
    for r in records:
        if r["median_s"] and r["n"] in base:
            r["ratio"], r["ratio_to"] = r["median_s"] / base[r["n"]], BASELINE_THRESHOLD


# ---- step suite -------------------------------------------------------------------------------


def measure_step(case: StepCase, steps: int, warmup_steps: int) -> tuple[dict, dict]:
    """The candidate's steps alternate with AdamW fused's on the same data in this process, so both
    see the same machine load; the ratio of their medians is the number to quote.

    Returns the candidate's record and the baseline's {"times", "extra_bytes"}."""
    candidate, baseline = case.build(), case.baseline().build()
    times = {id(candidate): [], id(baseline): []}
    for i in range(warmup_steps + steps):
        order = (candidate, baseline) if i % 2 == 0 else (baseline, candidate)  # neither always goes first
        for runner in order:
            runner.prepare()
            elapsed = timed(runner.step, case.device)
            if i >= warmup_steps:
                times[id(runner)].append(elapsed)
    extra = {}
    for runner in (candidate, baseline):
        runner.prepare()
        with PeakMemory(case.device) as memory:
            runner.step()
        extra[id(runner)] = memory.extra_bytes
    cand_times, base_times = times[id(candidate)], times[id(baseline)]
    record = _record(
        case.suite, case, **_summary(cand_times),
        ratio=statistics.median(cand_times) / statistics.median(base_times), ratio_to=case.baseline_method,
        extra_bytes=extra[id(candidate)], count_error=candidate.count_error(), note=case.note,
        threshold=case.threshold, scope=case.scope, baseline_median_s=statistics.median(base_times),
    )
    return record, dict(times=base_times, extra_bytes=extra[id(baseline)])


class BaselinePool:
    """AdamW fused's steps from every interleaved run, pooled per (suite, N) into one record each."""

    def __init__(self):
        self._runs: dict = {}

    def add(self, case: StepCase, sample: dict) -> None:
        baseline = case.baseline()
        entry = self._runs.setdefault((case.suite, baseline.n), (baseline, [], []))
        entry[1].extend(sample["times"])
        if sample["extra_bytes"] is not None:
            entry[2].append(sample["extra_bytes"])

    def records(self) -> list:
        return [
            _record(suite, case, **_summary(times), ratio=1.0, ratio_to=case.method, threshold=None,
                    scope=None, extra_bytes=max(extra) if extra else None,
                    note=f"pooled over the {len(times)} steps timed next to its candidates")
            for (suite, _), (case, times, extra) in sorted(self._runs.items())
        ]
