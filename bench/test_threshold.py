"""Threshold selection over N entries: each case of cases.threshold_cases, timed by pytest-benchmark."""

import math
from functools import lru_cache

import torch

import cases
import measure
from gmt_kernels.radix import APPROX_RANK_SLACK

EXACT_METHODS = {"torch.topk", "torch.kthvalue", "torch.quantile", "magnitude_threshold exact"}


@lru_cache(maxsize=1)
def _exact_threshold(n, tensors, device, dtype) -> float:
    """The k-th largest |g|, by a sort: independent of every method under test."""
    grads = cases.gradients(n, tensors, device, dtype)
    scores = torch.cat([g.abs().flatten().double() for g in grads])
    k = cases.kept_count(n, cases.MASK_RATIO)
    return float(torch.sort(scores, descending=True).values[k - 1])


def test_refusal_is_recorded(refused_case):
    """torch.quantile above 2^24 entries: the refusal is the result, recorded with its message."""
    record = measure.measure_threshold(refused_case, 1, 0.0)
    assert record["median_s"] is None and refused_case.expected_refusal in record["error"], record


def test_threshold(benchmark, threshold_case, bench_size):
    case = threshold_case
    grads = case.grads()
    threshold = benchmark.pedantic(case.run, args=(grads,), rounds=bench_size.min_repeats, warmup_rounds=1, iterations=1)
    with measure.PeakMemory(case.device) as memory:
        case.run(grads)
    kept = cases.kept_entries(grads, threshold)
    count_error = abs(kept - case.k) / case.n
    benchmark.extra_info.update(method=case.method, backend=case.backend, n=case.n, device=case.device,
                                dtype=case.dtype, extra_bytes=memory.extra_bytes, count_error=count_error)

    exact = _exact_threshold(case.n, case.tensors, case.device, case.dtype)
    if case.method in EXACT_METHODS:
        assert float(threshold) == exact
    elif case.method == "magnitude_threshold approx":
        slack = 0 if case.n < 1 << 16 else math.ceil(APPROX_RANK_SLACK * case.n)
        assert abs(kept - case.k) <= slack, (kept, case.k, slack)
    else:  # a 1 % sample: an estimate, a few sample standard deviations of the kept fraction
        p = case.k / case.n
        assert count_error <= 6 * math.sqrt(p * (1 - p) / (cases.SAMPLE_FRACTION * case.n)) + 1 / case.n
