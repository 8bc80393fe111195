"""The shared selection of gmt_kernels/radix.py: the sample, the bracket it proposes, and how many
passes a selection takes. Run with the reference backend (the histograms are the same on every
backend: tests/test_cpu_backend.py and tests/test_triton_kernels.py check that pass by pass).

Correctness of thresholds is test_semantics.py's job; here the point is the cost model that the
README and the benchmarks rely on: typical gradients are within the approximate bound after the
sample and one full pass, exact after one more, and a misleading sample costs passes, not results.
"""

from __future__ import annotations

import math

import pytest
import torch

from gmt_kernels import radix
from gmt_kernels.backends import reference
from oracle import kth_largest

F32 = radix.KEY_FORMATS[torch.float32]
N = 1 << 20  # sampled by default: 1024 blocks, 1 in 4 picked


def trace(tensors, mask_ratio, exact, fmt=F32):
    """Run a whole selection on the reference backend: (threshold, passes until DONE, the interval
    the first full pass histogrammed (the bracket), the interval it chose)."""
    n = sum(t.numel() for t in tensors)
    k, slack = radix.kept_count(n, mask_ratio), radix.rank_slack(n, exact)
    state = radix.initial_state([k], [n], [slack], fmt)
    done_after, bracket, chosen = None, None, None
    for p in range(radix.max_passes(fmt, [n])):
        before = state[0, [radix.LO, radix.LAST]].tolist()
        sampled = bool(state[0, radix.SAMPLE])
        hist = torch.zeros(1, radix.HIST_COLUMNS, dtype=torch.int64)
        reference.radix_histogram(tensors, [0] * len(tensors), state, hist, key_format=fmt)
        radix.select_bins(hist, state, fmt.key_bits)
        if bracket is None and not sampled:
            bracket, chosen = before, state[0, [radix.LO, radix.LAST]].tolist()
        if done_after is None and state[0, radix.DONE]:
            done_after = p + 1
    threshold = math.inf if k == 0 else radix.keys_to_threshold(radix.result_keys(state), fmt).item()
    return threshold, done_after, bracket, chosen


GRADIENT_LIKE = {
    "normal": lambda g: torch.randn(N, generator=g),
    "heavy_tailed": lambda g: torch.randn(N, generator=g) * torch.randn(N, generator=g).exp(),
    # a scale per row of 1024 entries: each sampled block is one row, far from independent entries
    "row_scaled": lambda g: (torch.randn(N // 1024, 1, generator=g).abs() * torch.randn(N // 1024, 1024, generator=g)).reshape(-1),
}


@pytest.mark.parametrize("case", sorted(GRADIENT_LIKE))
@pytest.mark.parametrize("mask_ratio", [0.1, 0.3, 0.9])
def test_typical_gradients_take_one_full_pass_approx_and_two_exact(case, mask_ratio):
    data = GRADIENT_LIKE[case](torch.Generator().manual_seed(0))
    tensors = [data[: N // 3], data[N // 3 :]]
    k = radix.kept_count(N, mask_ratio)
    exact, exact_passes, _, _ = trace(tensors, mask_ratio, exact=True)
    approx, approx_passes, bracket, chosen = trace(tensors, mask_ratio, exact=False)
    assert exact == kth_largest(tensors, k)
    slack = radix.rank_slack(N, exact=False)
    assert kth_largest(tensors, k + slack) <= approx <= kth_largest(tensors, k - slack)
    assert approx_passes == 2  # the sample, then one full pass over the bracket
    assert exact_passes <= 3
    # The sample's bracket held the k-th largest: the first full pass chose a bin inside it.
    assert bracket != [0, F32.key_max] and bracket[0] <= chosen[0] <= chosen[1] <= bracket[1]


def misleading(n, log2, tensor_index=0):
    """Scores whose sampled blocks are all small and the others all large: the sample puts the
    bracket far below the k-th largest."""
    picked = radix.sampled_blocks(torch.arange(n) // radix.SAMPLE_BLOCK, tensor_index, log2)
    return torch.where(picked, torch.rand(n), 10 + torch.rand(n))


@pytest.mark.parametrize("mask_ratio", [0.3, 0.999])
@pytest.mark.parametrize("exact", [True, False])
def test_a_misleading_sample_costs_passes_not_correctness(mask_ratio, exact):
    data = misleading(N, radix.sample_log2(N))
    threshold, passes, bracket, chosen = trace([data], mask_ratio, exact)
    k = radix.kept_count(N, mask_ratio)
    slack = radix.rank_slack(N, exact)
    assert kth_largest([data], k + slack) <= threshold <= kth_largest([data], max(k - slack, 1))
    assert passes is not None and passes <= radix.max_passes(F32, [N])
    if mask_ratio == 0.3:  # (for 0.999 the bracket reaches up to the largest key: no miss)
        assert chosen[0] > bracket[1]  # the full pass proved the bracket too low and moved above it


@pytest.mark.parametrize("fmt", list(radix.KEY_FORMATS.values()), ids=lambda f: f.name)
def test_max_passes_suffice_for_the_worst_interval(fmt):
    """A full pass divides any interval by at least 2**RADIX_BITS: from the whole key range, a
    single key is reached in passes(False) passes; a miss adds the sample and one pass."""
    width, passes = fmt.key_max, 0
    while True:
        passes += 1
        shift = max(0, width.bit_length() - radix.RADIX_BITS)
        if shift == 0:
            break
        width = (1 << shift) - 1  # the widest bin
    assert passes == fmt.passes(False) and fmt.passes(True) == passes + 2


def test_sample_picks_its_fraction_of_blocks_without_aliasing():
    blocks = torch.arange(1 << 16)
    for log2 in range(1, radix.SAMPLE_MAX_LOG2 + 1):
        for tensor_index in (0, 1, 57):
            for stride in (1, 8, 1024):  # periodic structure (rows, heads) must not line up with the picks
                fraction = radix.sampled_blocks(blocks * stride, tensor_index, log2).double().mean().item()
                assert abs(fraction * (1 << log2) - 1) < 0.1
    assert radix.sampled_blocks(blocks, 3, 0).all()
    assert not torch.equal(radix.sampled_blocks(blocks, 0, 3), radix.sampled_blocks(blocks, 1, 3))


def test_sample_size_rule():
    assert radix.sample_log2(2 * radix.SAMPLE_MIN_BLOCKS * radix.SAMPLE_BLOCK - 1) == 0
    assert radix.sample_log2(2 * radix.SAMPLE_MIN_BLOCKS * radix.SAMPLE_BLOCK) == 1
    assert radix.sample_log2(1 << 40) == radix.SAMPLE_MAX_LOG2
    for n in (1 << 19, 1 << 21, 1 << 25):  # at least SAMPLE_MIN_BLOCKS blocks are picked on average
        assert (n // radix.SAMPLE_BLOCK) >> radix.sample_log2(n) >= radix.SAMPLE_MIN_BLOCKS


@pytest.mark.parametrize("exact", [True, False])
def test_exactly_k_entries_above_the_bracket(exact):
    """The edge of the proof: when exactly k entries lie above the bracket, the k-th largest is the
    smallest of them, above the bracket, not in its top bin. The sample sees one value (0.5), so
    the bracket is the bin of 0.5, and the k large entries are all in blocks it did not pick."""
    log2 = radix.sample_log2(N)
    picked = radix.sampled_blocks(torch.arange(N) // radix.SAMPLE_BLOCK, 0, log2)
    k = radix.kept_count(N, 0.5)
    large = (~picked).nonzero().flatten()[torch.randperm(int((~picked).sum()), generator=torch.Generator().manual_seed(1))[:k]]
    data = torch.full((N,), 0.5)
    data[large] = 10 + torch.rand(k)
    threshold, _, bracket, chosen = trace([data], 0.5, exact)
    slack = radix.rank_slack(N, exact)
    assert kth_largest([data], k + slack) <= threshold <= kth_largest([data], k - slack)
    assert chosen[0] == bracket[1] + 1  # proven above the bracket: the interval moved up


@pytest.mark.parametrize("n", [N, 5000], ids=["sampled", "full_first_pass"])
@pytest.mark.parametrize("exact", [True, False])
def test_a_threshold_on_exact_zeros_takes_one_full_pass(n, exact):
    """Half the entries exactly 0 and 30 % masked: the k-th largest is 0. The zeros are one key and
    are never binned (radix.zero_key_start), so the first full pass proves the threshold 0 from the
    count of entries >= 1, in approx and exact mode alike; scores spread over decades above 0 do not
    make it take a second pass (binned with the zeros, they would)."""
    g = torch.Generator().manual_seed(2)
    data = torch.where(torch.rand(n, generator=g) < 0.5, 0.0, torch.rand(n, generator=g) * 10.0 ** -torch.randint(0, 40, (n,), generator=g))
    threshold, passes, bracket, _ = trace([data[: n // 2], data[n // 2 :]], 0.3, exact)
    assert threshold == 0.0 == kth_largest([data], radix.kept_count(n, 0.3))
    sampled = radix.sample_log2(n) > 0
    assert passes == (2 if sampled else 1)
    assert bracket[0] == 1  # the full pass left the zeros out of its bins


def test_zero_key_start_keeps_single_keys_and_intervals_above_zero():
    lo, last = torch.tensor([0, 0, 5, 1]), torch.tensor([0, 9, 9, 1])
    assert radix.zero_key_start(lo, last).tolist() == [0, 1, 5, 1]


def trace_warm(tensors, mask_ratio, exact, centre, fmt=F32):
    """Like trace, from radix.warm_state around `centre` (a score): (threshold, passes until DONE,
    the first pass's interval)."""
    n = sum(t.numel() for t in tensors)
    k, slack = radix.kept_count(n, mask_ratio), radix.rank_slack(n, exact)
    centres = torch.tensor([centre], dtype=fmt.threshold_dtype)
    state = radix.warm_state(centres, radix.warm_constants([k], [n], [slack], fmt), fmt)
    first = state[0, [radix.LO, radix.LAST]].tolist()
    assert state[0, radix.SAMPLE] == 0
    done_after = None
    for p in range(radix.max_passes(fmt, [n], [k], warm=True)):
        hist = torch.zeros(1, radix.HIST_COLUMNS, dtype=torch.int64)
        reference.radix_histogram(tensors, [0] * len(tensors), state, hist, key_format=fmt)
        radix.select_bins(hist, state, fmt.key_bits)
        if done_after is None and state[0, radix.DONE]:
            done_after = p + 1
    return radix.keys_to_threshold(radix.result_keys(state), fmt).item(), done_after, first


# Where a warm start may be centred: the last threshold (on it, or drifted), and what a broken or
# skipped step can leave behind.
WARM_CENTRES = {"on it": 1.0, "7 % above": 1.07, "10 % below": 0.9, "drifted 2x down": 0.5,
                "far above": 1e4, "zero": 0.0, "nan": math.nan, "inf": math.inf}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("centre", sorted(WARM_CENTRES))
@pytest.mark.parametrize("exact", [True, False])
def test_a_warm_start_finds_the_threshold_from_any_centre(dtype, centre, exact):
    """radix.warm_state: whatever the centre, the selection ends within max_passes(warm=True) at the
    exact k-th largest (or within the approximate bound); centred within 10 % of it, the
    first pass holds it: float32 is within the approximate bound after that one pass, exact after
    two; a 16-bit format is exact after one."""
    fmt = radix.KEY_FORMATS[dtype]
    data = GRADIENT_LIKE["heavy_tailed"](torch.Generator().manual_seed(1)).to(dtype)
    tensors = [data[: N // 3], data[N // 3 :]]
    k, slack = radix.kept_count(N, 0.3), radix.rank_slack(N, exact)
    kth = kth_largest(tensors, k)
    threshold, passes, first = trace_warm(tensors, 0.3, exact, kth * WARM_CENTRES[centre], fmt)
    assert kth_largest(tensors, k + slack) <= threshold <= kth_largest(tensors, k - slack)
    if exact:
        assert threshold == kth
    assert passes is not None
    if centre in ("on it", "7 % above", "10 % below"):
        kth_key = radix.score_keys(torch.tensor([kth], dtype=dtype), fmt).item()
        assert first[0] <= kth_key <= first[1]
        assert passes == (2 if exact and fmt.mantissa_bits > 10 else 1)


def test_a_warm_start_leaves_scopes_that_keep_nothing_cold():
    """A scope with k = 0 (threshold +inf, NaN/inf counted) keeps the initial state whatever its
    centre; a scope that keeps something is bracketed, from key 1, within the key range."""
    fmt = F32
    sizes = [0, 5, 5, 5, 5], [N] * 5, [0] * 5
    initial = radix.initial_state(*sizes, fmt)
    centres = torch.tensor([2.0, 0.0, math.inf, 1.5, -math.nan])
    state = radix.warm_state(centres, radix.warm_constants(*sizes, fmt), fmt)
    assert torch.equal(state[0], initial[0])
    half = fmt.warm_half_width
    key = radix.score_keys(torch.tensor([1.5]), fmt).item()
    assert state[1, radix.LO] == 1 and state[1, radix.LAST] == half  # around 0, from key 1
    assert state[2, radix.LO] == fmt.inf_key - half
    assert (state[1:, radix.LO] >= 1).all() and (state[1:, radix.LAST] <= fmt.key_max).all()  # NaN, -0.0
    assert state[3, [radix.LO, radix.LAST]].tolist() == [key - half, key + half]
    assert (state[1:, radix.SAMPLE] == 0).all() and (state[1:, radix.SHIFT] == state[3, radix.SHIFT]).all()
    assert ((state[1:, radix.LAST] - state[1:, radix.LO]) >> state[1:, radix.SHIFT] < radix.BINS).all()
    assert torch.equal(state[:, radix.K:], initial[:, radix.K:])
