"""The radix histogram pass (Backend.radix_histogram) as one Triton launch per gradient dtype.

Each program takes one CHUNK of one tensor (see tables.py), turns |g| into its integer key in the
scope's key format, keeps the entries whose bits above this pass's digit equal the scope's prefix,
histograms their digit in registers (tl.histogram) over CHUNK entries, and adds that histogram to
the global one with one vector atomic. Programs of finished scopes (DONE) return before reading a
byte: later passes cost only the scopes still being refined. Nothing is copied, nothing returns to
the host.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import triton
import triton.language as tl

from ...radix import RADIX_BITS, KeyFormat
from .tables import flat_storage_view, is_aligned, launch_table

# 4 warps x 16 entries per thread per iteration; 16 iterations per program. A program's private
# histogram (2048 bins) is flushed with one atomic per non-empty bin, so it must cover enough
# entries to make that flush cheap (~0.1 atomic per entry at most) while leaving enough programs
# to fill the GPU (a 1e8-entry model gives 6100 programs).
BLOCK = 1024
ITERS = 16
CHUNK = BLOCK * ITERS
NUM_WARPS = 4
MAX_BINS = 1 << RADIX_BITS  # widths are runtime: one compiled kernel serves every pass

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
def _count(g, valid, prefix_hi, hi, shift, digit_mask, KEY_FLOAT: tl.constexpr, BINS: tl.constexpr):
    key = _keys(g, KEY_FLOAT)
    match = valid & ((key >> hi) == prefix_hi)
    digit = ((key >> shift) & digit_mask).to(tl.int32)
    return tl.histogram(digit, BINS, mask=match)


@triton.jit
def radix_histogram_kernel(
    table,  # int64 [n, 4]: data_ptr, scope row, numel, first chunk
    chunk_owner,  # int32 [chunks]
    state,  # int64 [S, 3]
    hist,  # int64 [S, 2**width]
    shift,
    width,
    GRAD: tl.constexpr,  # element type of every gradient of this launch
    KEY_FLOAT: tl.constexpr,  # float type of the key format
    ALIGNED: tl.constexpr,  # every data_ptr is 16-byte aligned: allow 128-bit loads
    BINS: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunk_owner + pid).to(tl.int64)
    row = table + t * 4  # columns: data_ptr, scope row, numel, first chunk (tables.py)
    scope = tl.load(row + 1)
    # state columns (radix.py): PREFIX 0, K_REMAINING 1, DONE 2
    if tl.load(state + scope * 3 + 2) != 0:  # DONE: this scope needs no more passes
        return
    numel = tl.load(row + 2)
    start = (pid - tl.load(row + 3)) * (BLOCK * ITERS)  # int64: tensors beyond 2**31 entries
    ptr = tl.load(row).to(tl.pointer_type(GRAD))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    base = ptr + start

    hi = shift + width
    prefix = tl.load(state + scope * 3)
    if KEY_FLOAT == tl.float64:
        prefix_hi = prefix >> hi
    else:
        prefix_hi = (prefix >> hi).to(tl.int32)
    digit_mask = (1 << width) - 1
    lanes = tl.arange(0, BLOCK)
    counts = tl.zeros([BINS], dtype=tl.int32)
    if start + BLOCK * ITERS <= numel:
        # A full chunk: unmasked loads, which the compiler can vectorise (the mask of a tail
        # would be unknown per lane and force scalar loads).
        for i in range(ITERS):
            g = tl.load(base + i * BLOCK + lanes)
            counts += _count(g, lanes >= 0, prefix_hi, hi, shift, digit_mask, KEY_FLOAT, BINS)
    else:
        remaining = numel - start
        for i in range(tl.cdiv(remaining, BLOCK).to(tl.int32)):
            offs = i * BLOCK + lanes
            valid = offs < remaining
            g = tl.load(base + offs, mask=valid, other=0.0)
            counts += _count(g, valid, prefix_hi, hi, shift, digit_mask, KEY_FLOAT, BINS)
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist + scope * (1 << width) + bins, counts.to(tl.int64), mask=counts > 0, sem="relaxed")


def launch_histogram(grads, scope_of, state, hist, *, key_format: KeyFormat, shift: int, width: int) -> None:
    if not 1 <= width <= RADIX_BITS or hist.shape[-1] != 1 << width:
        raise ValueError(
            f"radix_histogram: width {width} with a histogram of {hist.shape[-1]} bins; the triton backend "
            f"takes digits of 1..{RADIX_BITS} bits and a histogram of exactly 2**width bins."
        )
    for tensor in (state, hist):
        if not tensor.is_contiguous() or tensor.dtype != torch.int64:
            raise ValueError("radix_histogram: state and hist must be contiguous int64 tensors.")
    launches = defaultdict(lambda: ([], []))
    keep_alive = []
    for grad, scope in zip(grads, scope_of):
        if grad.numel() == 0:
            continue
        flat = flat_storage_view(grad)
        if flat is None:
            # A strided view with holes (rare for gradients): a temporary copy of this one tensor.
            flat = grad.reshape(-1).contiguous()
            keep_alive.append(flat)
        rows, numels = launches[(grad.dtype, is_aligned(flat))]
        rows.append((flat.data_ptr(), int(scope)))
        numels.append(flat.numel())
    for (dtype, aligned), (rows, numels) in launches.items():
        lt = launch_table(rows, numels, CHUNK, hist.device)
        radix_histogram_kernel[(lt.num_chunks,)](
            lt.table, lt.chunk_owner, state, hist, shift, width,
            GRAD=TORCH_TO_TRITON[dtype], KEY_FLOAT=TORCH_TO_TRITON[key_format.float_dtype], ALIGNED=aligned,
            BINS=MAX_BINS, BLOCK=BLOCK, ITERS=ITERS, num_warps=NUM_WARPS,
        )
