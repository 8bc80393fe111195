"""Optimizer steps: each case of cases.step_cases, timed alone by pytest-benchmark and interleaved
with AdamW(fused=True) for the ratio (stored in extra_info), as bench/run.py reports it."""

import math

import measure
from gmt_kernels.radix import APPROX_RANK_SLACK


def test_step(benchmark, step_case, bench_size):
    runner = step_case.build()
    benchmark.pedantic(runner.step, setup=runner.prepare, rounds=bench_size.steps,
                       warmup_rounds=bench_size.warmup_steps, iterations=1)

    record, baseline = measure.measure_step(step_case, bench_size.steps, bench_size.warmup_steps)
    benchmark.extra_info.update(record)
    assert math.isfinite(record["ratio"]) and record["ratio"] > 0
    assert len(baseline["times"]) == bench_size.steps

    if step_case.method == "GMTAdamW":
        # Kept entries of the last step are within the rank slack of every scope (0 when exact).
        scopes = 1 if step_case.scope == "global" else step_case.tensors
        numel = step_case.n // scopes
        slack = 0 if step_case.threshold == "exact" or numel < 1 << 16 else math.ceil(APPROX_RANK_SLACK * numel)
        assert record["count_error"] * step_case.n <= scopes * slack
