"""gmt_kernels::radix_select on the device: radix.select_bins as one Triton launch per pass.

One program per scope reads its histogram row and state row and writes the new state row, with the
same arithmetic as radix.select_bins (the definition) and csrc/radix_select.cpp: int64 keys, the
sampled bracket in float64 (IEEE division and square root, no fused multiply-add), so the state is
the same bit for bit (tests/test_triton_select.py). On CUDA this replaces select_bins's ~125 tiny
torch ops per pass (each a launch plus its host time) by one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import radix

BINS = radix.BINS
NUM_WARPS = 4


@triton.jit
def _bin_holding(from_top, digits, rank):
    """The bin where the count from the top reaches rank (>= 1); bin 0 if it never does."""
    return tl.max(tl.where(from_top >= rank, digits, 0), axis=0)


@triton.jit
def radix_select_kernel(
    hist,  # int64 [S, BINS + 2]
    state,  # int64 [S, STATE_COLUMNS]
    BINS: tl.constexpr,
    STATE_COLUMNS: tl.constexpr,
    SAMPLE_SIGMAS: tl.constexpr,
    SAMPLE_DESIGN_EFFECT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s = state + row * STATE_COLUMNS  # columns: radix.LO, LAST, SHIFT, SAMPLE, DONE, K, NUMEL, SLACK, KNOWN_LO, KNOWN_LAST
    if tl.load(s + 4) != 0:  # DONE: select_bins leaves the row as it is
        return
    h = hist + row * (BINS + 2)
    digits = tl.arange(0, BINS)
    counts = tl.load(h + digits)
    above_count = tl.load(h + BINS)
    # from_top[d]: entries in bins >= d (a suffix sum)
    from_top = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
    counted = tl.sum(counts, axis=0)

    lo = tl.load(s)
    last = tl.load(s + 1)
    shift = tl.load(s + 2)
    sampled = tl.load(s + 3) > 0
    k = tl.load(s + 5)
    numel = tl.load(s + 6)
    slack = tl.load(s + 7)
    known_lo = tl.load(s + 8)
    known_last = tl.load(s + 9)
    one = tl.full([], 1, tl.int64)
    bin_width_minus_one = (one << shift) - 1

    if sampled:
        # A bracket around rank k * counted / numel, in float64 as select_bins computes it.
        counted_f = counted.to(tl.float64)
        r = k.to(tl.float64) * counted_f / tl.maximum(numel, 1).to(tl.float64)
        variance = r * (counted_f - r) / tl.maximum(counted, 1).to(tl.float64) * SAMPLE_DESIGN_EFFECT
        delta = SAMPLE_SIGMAS * tl.sqrt(tl.maximum(variance, 0.0)) + 1.0  # float64 sqrt is IEEE
        top_rank = tl.floor(r - delta).to(tl.int64)
        bottom_rank = tl.ceil(r + delta).to(tl.int64)
        new_lo = known_lo
        new_last = known_last
        if counted > 0:
            if top_rank >= 1:
                top_lo = lo + (_bin_holding(from_top, digits, top_rank).to(tl.int64) << shift)
                new_last = tl.minimum(top_lo + bin_width_minus_one, last)
            if bottom_rank <= counted:
                bottom = _bin_holding(from_top, digits, tl.maximum(bottom_rank, 1))
                new_lo = lo + (bottom.to(tl.int64) << shift)
        new_lo = _zero_key_start(new_lo, new_last)
        tl.store(s, new_lo)
        tl.store(s + 1, new_last)
        tl.store(s + 2, _shift_for(new_last - new_lo))
    else:
        # A full pass: where the k-th largest key is, proven by the counts.
        k_in = k - above_count
        up = k_in <= 0
        down = k_in > counted
        digit = _bin_holding(from_top, digits, tl.maximum(k_in, 1))
        in_bin = tl.sum(tl.where(digits == digit, counts, 0), axis=0)
        digit_lo = lo + (digit.to(tl.int64) << shift)
        found_lo = digit_lo
        found_last = tl.minimum(digit_lo + bin_width_minus_one, last)
        if up:
            found_lo = last + 1
            found_last = known_last
        elif down:
            found_lo = known_lo
            found_last = lo - 1
        finished = (k == 0) | (~up & ~down & ((shift == 0) | (in_bin <= slack))) | (found_lo == found_last)
        if k != 0:  # a finished scope's LO is its threshold key; with k = 0 the row stays put
            next_lo = tl.where(finished, found_lo, _zero_key_start(found_lo, found_last))
            tl.store(s, next_lo)
            tl.store(s + 1, found_last)
            tl.store(s + 2, _shift_for(found_last - next_lo))
        if finished:
            tl.store(s + 4, 1)
        else:
            tl.store(s + 8, found_lo)
            tl.store(s + 9, found_last)
    tl.store(s + 3, 0)


@triton.jit
def _zero_key_start(lo, last):
    """radix.zero_key_start: an interval [0, last] is histogrammed from key 1."""
    return tl.where((lo == 0) & (last > 0), 1, lo).to(tl.int64)


@triton.jit
def _shift_for(width):
    """radix._shift_for: smallest s >= 0 with width >> s < BINS; 0 for a negative width."""
    bits = tl.arange(0, 64).to(tl.int64)
    bit_length = tl.sum(((width >> bits) > 0).to(tl.int64), axis=0)
    return tl.maximum(bit_length - 12, 0)


def launch_select(hist: torch.Tensor, state: torch.Tensor, key_bits: int) -> None:
    if (state.dim() != 2 or state.shape[-1] != radix.STATE_COLUMNS or hist.shape != (state.shape[0], radix.HIST_COLUMNS)
            or hist.dtype != torch.int64 or state.dtype != torch.int64 or not hist.is_contiguous()
            or not state.is_contiguous() or hist.device != state.device):
        raise ValueError(
            f"radix_select: hist {tuple(hist.shape)} {hist.dtype} and state {tuple(state.shape)} {state.dtype}; the "
            f"triton kernel takes contiguous int64 state [S, {radix.STATE_COLUMNS}] (radix.initial_state) and hist "
            f"[S, {radix.HIST_COLUMNS}] on one device."
        )
    if not radix.RADIX_BITS <= key_bits <= 63:
        raise ValueError(f"radix_select: key_bits {key_bits} is not a key width of radix.KEY_FORMATS (15, 31 or 63).")
    if state.shape[0] == 0:
        return
    radix_select_kernel[(state.shape[0],)](
        hist, state, BINS=BINS, STATE_COLUMNS=radix.STATE_COLUMNS, SAMPLE_SIGMAS=radix.SAMPLE_SIGMAS,
        SAMPLE_DESIGN_EFFECT=radix.SAMPLE_DESIGN_EFFECT, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
