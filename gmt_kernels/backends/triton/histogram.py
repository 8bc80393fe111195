"""The histogram pass (Backend.radix_histogram) as one Triton launch per gradient dtype.

Each program takes one CHUNK of one tensor (see tables.py), turns |g| into its integer key in the
scope's key format, histograms the keys inside the scope's interval [LO, LAST] by (key - LO) >>
SHIFT in registers (tl.histogram) over CHUNK entries, counts the keys above LAST and the
non-finite ones, and adds all of it to the global histogram with one vector atomic and two scalar
ones. Programs of finished scopes (DONE) return before reading a byte; in a sampled pass only the
lanes of picked blocks load, so a pass costs what it reads. Nothing is copied, nothing returns to
the host.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import triton
import triton.language as tl

from ... import radix
from ...radix import KeyFormat
from .. import memory_order_view
from .tables import cached_plan, is_aligned, launch_table

# 4 warps x 8 entries per thread per iteration; 16 iterations per program. A program's private
# histogram (radix.BINS bins) is flushed with one atomic per non-empty bin, so it must cover enough
# entries to make that flush cheap (~0.1 atomic per entry at most) while leaving enough programs
# to fill the GPU (a 1e8-entry model gives 6100 programs).
BLOCK = 1024
ITERS = 16
CHUNK = BLOCK * ITERS
NUM_WARPS = 4
BINS = radix.BINS

TORCH_TO_TRITON = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


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
def _keys(g, KEY_FLOAT: tl.constexpr):
    """Integer keys of |g| read in KEY_FLOAT: the bit pattern without the sign bit (monotone in |g|).

    16-bit formats widen to int32 so that shifts by up to 15 stay defined."""
    if KEY_FLOAT == tl.float64:
        return widen(g, tl.float64).to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    elif KEY_FLOAT == tl.float32:
        return widen(g, tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    else:  # the scope is one 16-bit dtype: g is already in KEY_FLOAT
        return g.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF


@triton.jit
def _count(g, valid, lo, last, shift, KEY_FLOAT: tl.constexpr, INF_KEY: tl.constexpr, BINS: tl.constexpr):
    """(bins, above, nonfinite) of one block of gradients under the scope's interval."""
    key = _keys(g, KEY_FLOAT)
    inside = valid & (key >= lo) & (key <= last)
    digit = ((key - lo) >> shift).to(tl.int32)
    counts = tl.histogram(digit, BINS, mask=inside)
    above = tl.sum((valid & (key > last)).to(tl.int32), axis=0)
    nonfinite = tl.sum((valid & (key >= INF_KEY)).to(tl.int32), axis=0)
    return counts, above, nonfinite


@triton.jit
def _sampled(block, salt, log2):
    """radix.sampled_blocks for blocks (int64), in 32-bit arithmetic that wraps as the hash's
    mod 2**32 does; salt: the tensor's term of the hash (uint32), log2: int32."""
    h = (block & 0x7FFFFFFF).to(tl.uint32) * 0x9E3779B1 + salt
    return ((h >> (31 - log2)) >> 1) == 0  # h >> (32 - log2), defined for log2 = 0 too


@triton.jit
def radix_histogram_kernel(
    table,  # int64 [n, 5]: data_ptr, scope row, index in the call, numel, first chunk
    chunk_owner,  # int32 [chunks]
    state,  # int64 [S, STATE_COLUMNS]
    hist,  # int64 [S, BINS + 2]
    GRAD: tl.constexpr,  # element type of every gradient of this launch
    KEY_FLOAT: tl.constexpr,  # float type of the key format
    INF_KEY: tl.constexpr,  # the format's smallest non-finite key
    ALIGNED: tl.constexpr,  # every data_ptr is 16-byte aligned: allow 128-bit loads
    BINS: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    STATE_COLUMNS: tl.constexpr,
    SAMPLE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunk_owner + pid).to(tl.int64)
    row = table + t * 5
    scope = tl.load(row + 1)
    scope_state = state + scope * STATE_COLUMNS  # columns (radix.py): LO, LAST, SHIFT, SAMPLE, DONE, ...
    if tl.load(scope_state + 4) != 0:  # DONE: this scope needs no more passes
        return
    salt = (((tl.load(row + 2) & 0x7FFFFFFF) * 0x85EBCA77) & 0xFFFFFFFF).to(tl.uint32)  # the tensor's index
    numel = tl.load(row + 3)
    start = (pid - tl.load(row + 4)) * (BLOCK * ITERS)  # int64: tensors beyond 2**31 entries
    ptr = tl.load(row).to(tl.pointer_type(GRAD))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    base = ptr + start

    sample = tl.load(scope_state + 3).to(tl.int32)
    if KEY_FLOAT == tl.float64:
        lo = tl.load(scope_state)
        last = tl.load(scope_state + 1)
        shift = tl.load(scope_state + 2)
    else:  # 15- and 31-bit keys are int32
        lo = tl.load(scope_state).to(tl.int32)
        last = tl.load(scope_state + 1).to(tl.int32)
        shift = tl.load(scope_state + 2).to(tl.int32)
    lanes = tl.arange(0, BLOCK)
    counts = tl.zeros([BINS], dtype=tl.int32)
    above = 0
    nonfinite = 0
    if sample != 0:
        # A sampled pass: only lanes in picked blocks load (masked-off lanes cost no memory traffic).
        for i in range(tl.cdiv(tl.minimum(numel - start, BLOCK * ITERS), BLOCK).to(tl.int32)):
            offs = i * BLOCK + lanes
            picked = (offs < numel - start) & _sampled((start + offs) // SAMPLE_BLOCK, salt, sample)
            g = tl.load(base + offs, mask=picked, other=0.0)
            c, a, nf = _count(g, picked, lo, last, shift, KEY_FLOAT, INF_KEY, BINS)
            counts += c
            above += a
            nonfinite += nf
    elif start + BLOCK * ITERS <= numel:
        # A full chunk: unmasked loads, which the compiler can vectorise (the mask of a tail
        # would be unknown per lane and force scalar loads).
        for i in range(ITERS):
            g = tl.load(base + i * BLOCK + lanes)
            c, a, nf = _count(g, lanes >= 0, lo, last, shift, KEY_FLOAT, INF_KEY, BINS)
            counts += c
            above += a
            nonfinite += nf
    else:
        remaining = numel - start
        for i in range(tl.cdiv(remaining, BLOCK).to(tl.int32)):
            offs = i * BLOCK + lanes
            valid = offs < remaining
            g = tl.load(base + offs, mask=valid, other=0.0)
            c, a, nf = _count(g, valid, lo, last, shift, KEY_FLOAT, INF_KEY, BINS)
            counts += c
            above += a
            nonfinite += nf
    out = hist + scope * (BINS + 2)
    bins = tl.arange(0, BINS)
    tl.atomic_add(out + bins, counts.to(tl.int64), mask=counts > 0, sem="relaxed")
    if above > 0:
        tl.atomic_add(out + BINS, above.to(tl.int64), sem="relaxed")
    if nonfinite > 0:
        tl.atomic_add(out + BINS + 1, nonfinite.to(tl.int64), sem="relaxed")


def _plan(grads, scope_of, device) -> tuple:
    """([(dtype, aligned, LaunchTable, temporaries)], cacheable): one launch per (dtype, alignment)."""
    launches = defaultdict(lambda: ([], []))
    keep_alive = []
    for index, (grad, scope) in enumerate(zip(grads, scope_of)):
        if grad.numel() == 0:
            continue
        flat = memory_order_view(grad)
        if flat is None:
            # A strided view with holes (rare for gradients): a temporary copy of this one tensor.
            flat = grad.reshape(-1).contiguous()
            keep_alive.append(flat)
        rows, numels = launches[(grad.dtype, is_aligned(flat))]
        rows.append((flat.data_ptr(), int(scope), index))
        numels.append(flat.numel())
    plan = [(dtype, aligned, launch_table(rows, numels, CHUNK, device), keep_alive)
            for (dtype, aligned), (rows, numels) in launches.items()]
    return plan, not keep_alive  # a copy is made afresh for every call


def launch_histogram(grads, scope_of, state, hist, *, key_format: KeyFormat) -> None:
    if hist.dim() != 2 or hist.shape[-1] != radix.HIST_COLUMNS or state.dim() != 2 or state.shape[-1] != radix.STATE_COLUMNS:
        raise ValueError(
            f"radix_histogram: state {tuple(state.shape)} and hist {tuple(hist.shape)}; the triton backend takes "
            f"state [S, {radix.STATE_COLUMNS}] (radix.initial_state) and hist [S, {radix.HIST_COLUMNS}]."
        )
    for tensor in (state, hist):
        if not tensor.is_contiguous() or tensor.dtype != torch.int64:
            raise ValueError("radix_histogram: state and hist must be contiguous int64 tensors.")
    grads = list(grads)
    plan = cached_plan(grads, (hist.device, tuple(scope_of)), lambda: _plan(grads, scope_of, hist.device))
    for dtype, aligned, lt, keep_alive in plan:
        radix_histogram_kernel[(lt.num_chunks,)](
            lt.table, lt.chunk_owner, state, hist,
            GRAD=TORCH_TO_TRITON[dtype], KEY_FLOAT=TORCH_TO_TRITON[key_format.float_dtype],
            INF_KEY=key_format.inf_key, ALIGNED=aligned, BINS=BINS, BLOCK=BLOCK, ITERS=ITERS,
            STATE_COLUMNS=radix.STATE_COLUMNS, SAMPLE_BLOCK=radix.SAMPLE_BLOCK, num_warps=NUM_WARPS,
        )
