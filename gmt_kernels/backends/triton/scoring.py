"""The scores of SEMANTICS.md section 8 as Triton device functions, shared by the histogram pass
and the update pass so that both compute the same score bit for bit.

- "grad": s = |g| (the key/threshold comparisons stay in histogram.py and adamw.py as before).
- "grad_over_weight": s = |g| / (|theta| + eps) in the score type (float32, or float64 for f64
  scopes): g and theta widened exactly, one IEEE add and one correctly rounded division
  (`tl.math.div_rn`, never Triton's approximate float32 `/`).
- "random": u = the counter hash of gmt_kernels/scores.py, in uint32 arithmetic (multiplication,
  addition mod 2**32, xor, logical shifts), from the tensor's key and the entry's uint64 index.

The criterion is a compile-time constant of both kernels (one compiled variant per criterion), so
the "grad" variants compile to what they did before scores existed.
"""

from __future__ import annotations

import os
import struct

import torch
import triton
import triton.language as tl

CRITERIA = ("grad", "grad_over_weight", "random")

# Kernels built for the Triton interpreter (fixed when triton is imported, as the backend reads it).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def widen(x, dtype: tl.constexpr):
    """x converted exactly to a wider float type. bfloat16 is the top half of a float32, so it
    widens by a shift of its bits: what the GPU does anyway, and the interpreter's own conversion
    gets bfloat16 denormals (and bfloat16 -> float64) wrong."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def narrow(x, dtype: tl.constexpr):
    """x rounded to nearest (ties to even) into a narrower float type, as the GPU's cvt.rn does.
    The interpreter converts float32 to bfloat16 by truncation, which biases a bfloat16 update
    towards zero step after step; under it the rounding is spelled out on the bits (a NaN stays a
    quiet NaN). Compiled, this is the plain conversion."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        half = tl.where(x != x, (bits >> 16) | 0x40, rounded)
        return half.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def div_rn(x, y):
    """IEEE round-to-nearest division, as torch computes it (Triton's `/` on float32 is approximate)."""
    if x.dtype == tl.float64:
        return x / y  # float64 division is always IEEE
    else:
        return tl.math.div_rn(x, y)


def check_random_inputs(scoring, n: int, op: str) -> None:
    """The random criterion's per-tensor inputs, as both kernels read them: int64, one per tensor."""
    for name in ("random_keys", "entry_offsets"):
        value = getattr(scoring, name)
        if value is None or value.dtype != torch.int64 or value.dim() != 1 or value.numel() < n:
            raise ValueError(
                f"{op}: criterion 'random' needs {name} as an int64 tensor of one value per tensor ({n}); "
                f"got {None if value is None else (value.dtype, tuple(value.shape))}."
            )


def float64_bits(x: float) -> int:
    """score_eps as the kernels take it: the bits of the float64 as a signed int64. (Triton types a
    Python float argument as float32, which would round eps before a float64 score sees it.)"""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def eps_from_bits(bits, SCORE: tl.constexpr):
    """float64_bits back to a float64, rounded to nearest to the score type."""
    return (bits + tl.zeros([], tl.int64)).to(tl.float64, bitcast=True).to(SCORE)


@triton.jit
def weight_score(g, theta, eps, SCORE: tl.constexpr):
    """grad_over_weight: |g| / (|theta| + eps) in SCORE (eps already a SCORE scalar). NaN stays NaN."""
    return div_rn(tl.abs(widen(g, SCORE)), tl.abs(widen(theta, SCORE)) + eps)


@triton.jit
def _mix(x):
    """scores.py's mix() on uint32 words: products wrap mod 2**32, shifts are logical."""
    x ^= x >> 16
    x *= tl.full([], 0x7FEB352D, tl.uint32)
    x ^= x >> 15
    x *= tl.full([], 0x846CA68B, tl.uint32)
    x ^= x >> 16
    return x


@triton.jit
def random_key_halves(key, low_bound):
    """(hi0, t0, t1) for entries in [low_bound, low_bound + 2**32): t of scores.py for the entries
    whose high word is hi0 (t0) or hi0 + 1 (t1). key: the tensor's 32-bit key (any integer type),
    low_bound: int64, <= every entry the caller scores. Scalars: computed once per block."""
    k = key.to(tl.uint32)
    hi0 = (low_bound >> 32).to(tl.uint32)
    return hi0, _mix(k ^ hi0), _mix(k ^ (hi0 + 1))


@triton.jit
def random_u(entry, hi0, t0, t1):
    """u of scores.py (uint32) for int64 entry indices in [hi0 * 2**32, (hi0 + 2) * 2**32)."""
    hi = (entry >> 32).to(tl.uint32)
    lo = entry.to(tl.uint32)  # truncation: the low word
    t = tl.where(hi == hi0, t0, t1)
    return _mix(_mix(t ^ lo) + t)
