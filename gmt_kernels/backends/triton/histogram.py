"""The histogram pass (Backend.radix_histogram) as one Triton launch per gradient dtype.

A persistent grid (a few programs per SM) walks the CHUNKs of the launch (see tables.py). Per
chunk a program turns the scores (|g|; or, the criterion a compile-time constant, |g| / (|theta| +
eps) or the random u: scoring.py) into integer keys in the scope's key format, histograms the keys inside
the scope's interval [LO, LAST] by (key - LO) >> SHIFT (tl.histogram, BLOCK = 4096 entries per
call, so that the call's fixed shared-memory work, zeroing and reading back 4096 bins, is one
load and one store per entry), counts the keys above LAST and the non-finite ones in per-lane
registers (reduced once per chunk), and adds everything to the global histogram with one vector
atomic and two scalar ones.

- A pass over scopes that are all DONE (approx/exact selections end before radix.max_passes) is
  read as such by every program from the state's DONE flags and ends there: no chunk is visited.
- Chunks of a DONE scope are skipped after reading one flag.
- A sampled pass (SAMPLE > 0) walks a sample list instead of the chunks (tables.sample_list: the
  picked 64-entry blocks of every tensor, listed once per set of tensor sizes): one tl.histogram
  call per 64 picked blocks, so the pass costs what the sample holds, in DRAM and shared memory.
  Without a list (a direct launch), a sampled chunk compacts its picked blocks into 4096-entry
  tiles (_picked_tile): one call per chunk with up to 64 picks.

Nothing is copied, nothing returns to the host.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import triton
import triton.language as tl

from ... import radix
from ...radix import KeyFormat
from .. import VouchedList, memory_order_view
from .scoring import CRITERIA, check_random_inputs, eps_from_bits, float64_bits, random_key_halves, random_u, weight_score, widen
from .tables import Launch, cached_plan, is_aligned, launch_table, repointed, sample_list

# 16 warps x 8 entries per thread per tl.histogram call (4096 entries: the call zeroes and reads
# back 4096 bins of shared memory, one word per entry), 4 calls per 16384-entry chunk. A chunk's
# private histogram is flushed with one atomic per non-empty bin (at most 1/4 per entry). 16 warps
# rather than 8 halve the registers per thread (~115 on sm_90 against ~190: the 4096 bins and the
# per-lane counters are spread over twice as many threads); either way one program fills an SM's
# register file, so the persistent grid has one program per SM.
BLOCK = 4096
ITERS = 4
CHUNK = BLOCK * ITERS
NUM_WARPS = 16
PROGRAMS_PER_SM = 1
BINS = radix.BINS

TORCH_TO_TRITON = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


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
def _bounds(scope_state, KEY_FLOAT: tl.constexpr):
    """(LO, LAST, SHIFT) of a scope: int64 for 63-bit (f64) and 32-bit (u32) keys, else int32."""
    if KEY_FLOAT == tl.float64:
        return tl.load(scope_state), tl.load(scope_state + 1), tl.load(scope_state + 2)
    elif KEY_FLOAT == tl.uint32:
        return tl.load(scope_state), tl.load(scope_state + 1), tl.load(scope_state + 2)
    else:  # 15- and 31-bit keys are int32
        return (tl.load(scope_state).to(tl.int32), tl.load(scope_state + 1).to(tl.int32),
                tl.load(scope_state + 2).to(tl.int32))


@triton.jit
def _block_keys(ptr, wptr, offs, valid, MASKED: tl.constexpr, entry0, hi0, t0, t1, eps, KEY_FLOAT: tl.constexpr,
                INF_KEY: tl.constexpr, CRITERION: tl.constexpr):
    """Keys of the scores of entries offs (offsets from ptr and wptr; entry0 + offs: their indices
    in the whole parameter, for "random"). Unmasked loads when not MASKED (128 bits wide)."""
    if CRITERION == "random":  # neither g nor theta is read
        return random_u(entry0 + offs, hi0, t0, t1).to(tl.int64)
    else:
        if MASKED:
            g = tl.load(ptr + offs, mask=valid, other=0.0)
        else:
            g = tl.load(ptr + offs)
        if CRITERION == "grad_over_weight":
            if MASKED:
                theta = tl.load(wptr + offs, mask=valid, other=0.0)
            else:
                theta = tl.load(wptr + offs)
            key = _keys(weight_score(g, theta, eps, KEY_FLOAT), KEY_FLOAT)
            # Every NaN score (g or theta NaN, 0/0, inf/inf: payloads differ by hardware) has one
            # key, the format's largest (radix.entry_scores).
            if KEY_FLOAT == tl.float64:
                return tl.where(key > INF_KEY, 0x7FFFFFFFFFFFFFFF, key)
            else:
                return tl.where(key > INF_KEY, 0x7FFFFFFF, key)
        else:
            return _keys(g, KEY_FLOAT)


@triton.jit
def _sampled(block, salt, log2):
    """radix.sampled_blocks for blocks (int64), in 32-bit arithmetic that wraps as the hash's
    mod 2**32 does; salt: the tensor's term of the hash (uint32), log2: int32."""
    h = (block & 0x7FFFFFFF).to(tl.uint32) * 0x9E3779B1 + salt
    return ((h >> (31 - log2)) >> 1) == 0  # h >> (32 - log2), defined for log2 = 0 too


@triton.jit
def _picked_tile(start, remaining, salt, sample, group, SAMPLE_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
                 CHUNK: tl.constexpr):
    """(offsets, valid) of one BLOCK-entry tile holding the `group`-th BLOCK // SAMPLE_BLOCK picked
    blocks of the chunk at `start` (slot j: the (group * slots + j)-th picked block)."""
    SLOTS: tl.constexpr = BLOCK // SAMPLE_BLOCK
    NB: tl.constexpr = CHUNK // SAMPLE_BLOCK
    blocks = tl.arange(0, NB)
    picked = (blocks * SAMPLE_BLOCK < remaining) & _sampled(start // SAMPLE_BLOCK + blocks, salt, sample)
    # The picked blocks first, in order (a sort of NB values: one per thread, no NB x SLOTS matrix).
    order = tl.sort(tl.where(picked, blocks, blocks + NB))
    tiles = tl.reshape(order, [NB // SLOTS, SLOTS])
    block_of_slot = tl.sum(tl.where(tl.arange(0, NB // SLOTS)[:, None] == group, tiles, 0), axis=0)
    used = block_of_slot < NB  # past the last pick: the unpicked blocks, sorted after NB
    offs = block_of_slot[:, None] * SAMPLE_BLOCK + tl.arange(0, SAMPLE_BLOCK)[None, :]
    valid = used[:, None] & (offs < remaining)
    return tl.reshape(offs, [BLOCK]), tl.reshape(valid, [BLOCK])


@triton.jit
def _tensor_scoring(row, ptr, low, random_keys, entry_offsets, score_eps_bits, WEIGHT: tl.constexpr,
                    KEY_FLOAT: tl.constexpr, CRITERION: tl.constexpr):
    """What _block_keys needs of one tensor besides g: (theta's pointer, table column 3, and eps
    in the score type: grad_over_weight; the tensor's first entry index and the hash's halves for
    entries from `low` on: random). Unused parts are placeholders the compiler drops."""
    wptr = ptr
    eps = 0.0
    entry0 = 0
    hi0 = 0
    t0 = 0
    t1 = 0
    if CRITERION == "grad_over_weight":
        wptr = tl.load(row + 3).to(tl.pointer_type(WEIGHT))
        eps = eps_from_bits(score_eps_bits, KEY_FLOAT)
    if CRITERION == "random":
        index = tl.load(row + 2)  # the tensor's index in the call: its key and entry offset
        entry0 = tl.load(entry_offsets + index)
        hi0, t0, t1 = random_key_halves(tl.load(random_keys + index), entry0 + low)
    return wptr, eps, entry0, hi0, t0, t1


@triton.jit
def _count_item(item, items, picked, table, state, hist, random_keys, entry_offsets, score_eps_bits,
                GRAD: tl.constexpr, WEIGHT: tl.constexpr, KEY_FLOAT: tl.constexpr, INF_KEY: tl.constexpr,
                CRITERION: tl.constexpr, COLUMNS: tl.constexpr, BINS: tl.constexpr, BLOCK: tl.constexpr,
                STATE_COLUMNS: tl.constexpr, SAMPLE_BLOCK: tl.constexpr):
    """One item of a sample list: up to BLOCK // SAMPLE_BLOCK picked blocks of one tensor, one
    tl.histogram call. Blocks the scope's own rate does not pick are masked (the list may have
    been built at a lower rate than the scope's, e.g. for a shard of a larger scope)."""
    SLOTS: tl.constexpr = BLOCK // SAMPLE_BLOCK
    t = tl.load(items + item * 3)
    first = tl.load(items + item * 3 + 1)
    count = tl.load(items + item * 3 + 2)
    row = table + t * COLUMNS
    scope = tl.load(row + 1)
    scope_state = state + scope * STATE_COLUMNS
    if (tl.load(scope_state + 4) == 0) & (tl.load(scope_state + 3) != 0):
        sample = tl.load(scope_state + 3).to(tl.int32)
        salt = (((tl.load(row + 2) & 0x7FFFFFFF) * 0x85EBCA77) & 0xFFFFFFFF).to(tl.uint32)
        numel = tl.load(row + (COLUMNS - 2))
        ptr = tl.load(row).to(tl.pointer_type(GRAD))
        lo, last, shift = _bounds(scope_state, KEY_FLOAT)
        slots = tl.arange(0, SLOTS)
        block = tl.load(picked + first + slots, mask=slots < count, other=0).to(tl.int64)
        used = (slots < count) & _sampled(block, salt, sample)
        offs = block[:, None] * SAMPLE_BLOCK + tl.arange(0, SAMPLE_BLOCK)[None, :]
        valid = tl.reshape(used[:, None] & (offs < numel), [BLOCK])
        low = 0
        if CRITERION == "random":  # the list is ascending: the item's first block bounds its entries
            low = tl.load(picked + first).to(tl.int64) * SAMPLE_BLOCK
        wptr, eps, entry0, hi0, t0, t1 = _tensor_scoring(row, ptr, low, random_keys, entry_offsets, score_eps_bits,
                                                         WEIGHT, KEY_FLOAT, CRITERION)
        key = _block_keys(ptr, wptr, tl.reshape(offs, [BLOCK]), valid, True, entry0, hi0, t0, t1, eps, KEY_FLOAT,
                          INF_KEY, CRITERION)
        inside = valid & (key >= lo) & (key <= last)
        counts = tl.histogram(((key - lo) >> shift).to(tl.int32), BINS, mask=inside)
        out = hist + scope * (BINS + 2)
        tl.atomic_add(out + tl.arange(0, BINS), counts.to(tl.int64), mask=counts > 0, sem="relaxed")
        above = tl.sum((valid & (key > last)).to(tl.int32), axis=0)
        nonfinite = 0
        if CRITERION != "random":  # u has no non-finite values: NONFINITE stays 0
            nonfinite = tl.sum((valid & (key >= INF_KEY)).to(tl.int32), axis=0)
        if above > 0:
            tl.atomic_add(out + BINS, above.to(tl.int64), sem="relaxed")
        if nonfinite > 0:
            tl.atomic_add(out + BINS + 1, nonfinite.to(tl.int64), sem="relaxed")


@triton.jit
def radix_histogram_kernel(
    table,  # int64 [n, COLUMNS]: data_ptr, scope row, index in the call, [theta's data_ptr,] numel, first chunk
    chunk_owner,  # int32 [chunks]
    state,  # int64 [S, STATE_COLUMNS]
    hist,  # int64 [S, BINS + 2]
    num_chunks,  # chunks of the launch (the grid may be smaller: programs loop)
    num_scopes,  # S
    items,  # int64 [num_items, 3]: table row, first index into picked, count (tables.sample_list)
    picked,  # int32: block indices of the sampled blocks
    num_items,  # 0: no list, sampled chunks are read through _picked_tile
    GRAD: tl.constexpr,  # element type of every gradient of this launch
    KEY_FLOAT: tl.constexpr,  # float type of the key format; tl.uint32 for the random score's u32 keys
    INF_KEY: tl.constexpr,  # the format's smallest non-finite key
    ALIGNED: tl.constexpr,  # every data_ptr is 16-byte aligned: allow 128-bit loads
    BINS: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    STATE_COLUMNS: tl.constexpr,
    SAMPLE_BLOCK: tl.constexpr,
    random_keys=None,  # random: int64 [tensors of the call], each tensor's 32-bit key
    entry_offsets=None,  # random: int64 [tensors of the call], index of each tensor's first entry in its parameter
    score_eps_bits=None,  # grad_over_weight: scoring.float64_bits(score_eps)
    CRITERION: tl.constexpr = "grad",  # scoring.CRITERIA
    WEIGHT: tl.constexpr = None,  # grad_over_weight: element type of theta
):
    COLUMNS: tl.constexpr = 6 if CRITERION == "grad_over_weight" else 5
    # A dead pass (every scope DONE) ends here, after one read of the DONE and SAMPLE flags; a
    # sampled pass with a sample list does not visit the chunks, a full pass not the list.
    full_active = 0
    sampled_active = 0
    for first_row in range(0, num_scopes, 1024):
        rows = first_row + tl.arange(0, 1024)
        flags = state + rows.to(tl.int64) * STATE_COLUMNS
        live = tl.load(flags + 4, mask=rows < num_scopes, other=1) == 0
        sampling = tl.load(flags + 3, mask=rows < num_scopes, other=0) != 0
        full_active += tl.sum((live & ~sampling).to(tl.int32), axis=0)
        sampled_active += tl.sum((live & sampling).to(tl.int32), axis=0)
    if (full_active == 0) & (sampled_active == 0):
        return
    listed = num_items > 0
    lanes = tl.arange(0, BLOCK)
    if sampled_active > 0:
        for item in tl.range(tl.program_id(0), num_items, tl.num_programs(0)):
            _count_item(item, items, picked, table, state, hist, random_keys, entry_offsets, score_eps_bits, GRAD, WEIGHT,
                        KEY_FLOAT, INF_KEY, CRITERION, COLUMNS, BINS, BLOCK, STATE_COLUMNS, SAMPLE_BLOCK)
    chunks = num_chunks
    if (full_active == 0) & listed:
        chunks = 0
    for chunk in tl.range(tl.program_id(0), chunks, tl.num_programs(0)):
        t = tl.load(chunk_owner + chunk).to(tl.int64)
        row = table + t * COLUMNS
        scope = tl.load(row + 1)
        scope_state = state + scope * STATE_COLUMNS  # columns (radix.py): LO, LAST, SHIFT, SAMPLE, DONE, ...
        skip = tl.load(scope_state + 4) != 0  # DONE scopes need no more passes
        if listed:
            skip = skip | (tl.load(scope_state + 3) != 0)  # the list serves sampled scopes
        if ~skip:
            salt = (((tl.load(row + 2) & 0x7FFFFFFF) * 0x85EBCA77) & 0xFFFFFFFF).to(tl.uint32)  # the tensor's index
            numel = tl.load(row + (COLUMNS - 2))
            start = (chunk - tl.load(row + (COLUMNS - 1))) * (BLOCK * ITERS)  # int64: tensors beyond 2**31 entries
            ptr = tl.load(row).to(tl.pointer_type(GRAD))
            wptr, eps, entry0, hi0, t0, t1 = _tensor_scoring(row, ptr, start, random_keys, entry_offsets, score_eps_bits,
                                                             WEIGHT, KEY_FLOAT, CRITERION)
            if ALIGNED:
                ptr = tl.multiple_of(ptr, 16)
            base = ptr + start
            wbase = base
            if CRITERION == "grad_over_weight":
                if ALIGNED:
                    wptr = tl.multiple_of(wptr, 16)
                wbase = wptr + start
            if CRITERION == "random":
                entry0 += start
            sample = tl.load(scope_state + 3).to(tl.int32)
            lo, last, shift = _bounds(scope_state, KEY_FLOAT)
            remaining = numel - start
            full = remaining >= BLOCK * ITERS
            if sample != 0:  # tiles of picked blocks
                blocks = tl.arange(0, (BLOCK * ITERS) // SAMPLE_BLOCK)
                picks = (blocks * SAMPLE_BLOCK < remaining) & _sampled(start // SAMPLE_BLOCK + blocks, salt, sample)
                tiles = tl.cdiv(tl.sum(picks.to(tl.int32), axis=0), BLOCK // SAMPLE_BLOCK)
            elif full:
                tiles = tl.full([], ITERS, tl.int32)
            else:
                tiles = tl.cdiv(remaining, BLOCK).to(tl.int32)
            counts = tl.zeros([BINS], dtype=tl.int32)
            above = tl.zeros([BLOCK], dtype=tl.int32)  # per lane, reduced once per chunk
            nonfinite = tl.zeros([BLOCK], dtype=tl.int32)
            for i in range(tiles):
                if sample != 0:
                    offs, valid = _picked_tile(start, remaining, salt, sample, i, SAMPLE_BLOCK, BLOCK, BLOCK * ITERS)
                    key = _block_keys(base, wbase, offs, valid, True, entry0, hi0, t0, t1, eps, KEY_FLOAT, INF_KEY,
                                      CRITERION)
                elif full:
                    # Unmasked: the compiler can vectorise (a tail's per-lane mask forces scalar loads).
                    valid = lanes >= 0
                    key = _block_keys(base + i * BLOCK, wbase + i * BLOCK, lanes, valid, False, entry0 + i * BLOCK, hi0,
                                      t0, t1, eps, KEY_FLOAT, INF_KEY, CRITERION)
                else:
                    offs = i * BLOCK + lanes
                    valid = offs < remaining
                    key = _block_keys(base, wbase, offs, valid, True, entry0, hi0, t0, t1, eps, KEY_FLOAT, INF_KEY,
                                      CRITERION)
                inside = valid & (key >= lo) & (key <= last)
                counts += tl.histogram(((key - lo) >> shift).to(tl.int32), BINS, mask=inside)
                above += (valid & (key > last)).to(tl.int32)
                if CRITERION != "random":  # u has no non-finite values: NONFINITE stays 0
                    nonfinite += (valid & (key >= INF_KEY)).to(tl.int32)
            out = hist + scope * (BINS + 2)
            bins = tl.arange(0, BINS)
            tl.atomic_add(out + bins, counts.to(tl.int64), mask=counts > 0, sem="relaxed")
            above_total = tl.sum(above, axis=0)
            nonfinite_total = tl.sum(nonfinite, axis=0)
            if above_total > 0:
                tl.atomic_add(out + BINS, above_total.to(tl.int64), sem="relaxed")
            if nonfinite_total > 0:
                tl.atomic_add(out + BINS + 1, nonfinite_total.to(tl.int64), sem="relaxed")


def _flat_pair(grad: torch.Tensor, theta: torch.Tensor, keep_alive: list) -> tuple:
    """1-D views of g and theta whose positions pair up, as the reference backend reads them: memory
    order when it is the same for both (the sample picks blocks of it), else row-major copies."""
    if theta.shape != grad.shape:
        raise ValueError(
            f"radix_histogram: criterion 'grad_over_weight' got a weight of shape {tuple(theta.shape)} for a "
            f"gradient of shape {tuple(grad.shape)}; pass each parameter (theta) with its own gradient."
        )
    flat, flat_theta = memory_order_view(grad), memory_order_view(theta)
    if flat is None or flat_theta is None or theta.stride() != grad.stride():
        flat, flat_theta = grad.reshape(-1).contiguous(), theta.reshape(-1).contiguous()
        keep_alive.extend((flat, flat_theta))
    return flat, flat_theta


def inf_key_for(key_float) -> int:
    """INF_KEY of a key type: the float format's smallest non-finite key; 0 for u32 keys (the
    random score has no non-finite values, and the kernel does not count them)."""
    if key_float == tl.uint32:
        return 0
    return radix.KEY_FORMATS[{v: k for k, v in TORCH_TO_TRITON.items()}[key_float]].inf_key


def _plan(grads, scope_of, scoring, device) -> tuple:
    """([(grid, tables.Launch, SampleList, compile-time arguments, temporaries)], cacheable): one
    launch per (dtype of g, dtype of theta, alignment); "random" reads neither, so one launch."""
    launches = defaultdict(lambda: ([], []))
    keep_alive = []
    criterion = scoring.criterion
    weights = list(scoring.weights)
    if criterion == "grad_over_weight" and len(weights) != len(grads):
        raise ValueError(
            f"radix_histogram: criterion 'grad_over_weight' needs one weight (theta) per gradient; got "
            f"{len(weights)} weights for {len(grads)} gradients."
        )
    for index, (grad, scope) in enumerate(zip(grads, scope_of)):
        if grad.numel() == 0:
            continue
        if criterion == "random":  # entry j is scored from its index alone: nothing is read
            rows, numels = launches[(torch.float32, None, False)]
            rows.append((0, int(scope), index))
            numels.append(grad.numel())
            continue
        if criterion == "grad_over_weight":
            flat, theta = _flat_pair(grad, weights[index], keep_alive)
            rows, numels = launches[(grad.dtype, theta.dtype, is_aligned(flat, theta))]
            rows.append((flat.data_ptr(), int(scope), index, theta.data_ptr()))
        else:
            flat = memory_order_view(grad)
            if flat is None:
                # A strided view with holes (rare for gradients): a temporary copy of this one tensor.
                flat = grad.reshape(-1).contiguous()
                keep_alive.append(flat)
            rows, numels = launches[(grad.dtype, None, is_aligned(flat))]
            rows.append((flat.data_ptr(), int(scope), index))
        numels.append(flat.numel())
    # Sample lists at the rate of each scope's entries in this call (at least 1/2): the scope's own
    # rate on the device is the same, or higher for a shard of a larger scope (a subset of these).
    scope_numel = defaultdict(int)
    for (rows, numels) in launches.values():
        for row, n in zip(rows, numels):
            scope_numel[row[1]] += n
    plan = []
    for (dtype, weight, aligned), (rows, numels) in launches.items():
        log2s = [max(1, radix.sample_log2(scope_numel[row[1]])) for row in rows]
        samples = sample_list(numels, [row[2] for row in rows], log2s, radix.SAMPLE_BLOCK,
                              BLOCK // radix.SAMPLE_BLOCK, device)
        launch = Launch(aligned, launch_table(rows, numels, CHUNK, device), None if criterion == "random" else 0,
                        [row[2] for row in rows])
        grid = (min(max(launch.table.num_chunks, samples.num_items), _programs(device)),)
        constants = dict(GRAD=TORCH_TO_TRITON[dtype], ALIGNED=aligned,
                         WEIGHT=None if weight is None else TORCH_TO_TRITON[weight])
        plan.append((grid, launch, samples, constants, keep_alive))
    return plan, not keep_alive  # a copy is made afresh for every call


def _repointed(plan, grads):
    """The plan for gradients that moved (laid out as before), or None (see tables.repointed).
    Only plans without weights are kept under a token: a row's one address is its gradient's."""
    moved = [repointed(launch, grads) for _, launch, *_ in plan]
    if None in moved:
        return None
    return [(grid, launch, *rest) for (grid, _, *rest), launch in zip(plan, moved)]


def _check_scoring(scoring, key_format: KeyFormat, n: int) -> None:
    """The score's key format and per-tensor inputs, before anything is launched."""
    criterion = scoring.criterion
    if criterion not in CRITERIA:
        raise ValueError(
            f"radix_histogram: unknown criterion {criterion!r}; expected one of {', '.join(map(repr, CRITERIA))}."
        )
    wanted = {"random": ("u32",), "grad_over_weight": ("f32", "f64")}.get(criterion)
    if wanted is not None and key_format.name not in wanted:
        raise ValueError(
            f"radix_histogram: criterion {criterion!r} scores in key format {' or '.join(wanted)}, not "
            f"{key_format.name!r}; take the key format the frontend picks for it (radix.py)."
        )
    if criterion == "random":
        check_random_inputs(scoring, n, "radix_histogram")


def launch_histogram(grads, scope_of, state, hist, *, key_format: KeyFormat, scoring) -> None:
    if hist.dim() != 2 or hist.shape[-1] != radix.HIST_COLUMNS or state.dim() != 2 or state.shape[-1] != radix.STATE_COLUMNS:
        raise ValueError(
            f"radix_histogram: state {tuple(state.shape)} and hist {tuple(hist.shape)}; the triton backend takes "
            f"state [S, {radix.STATE_COLUMNS}] (radix.initial_state) and hist [S, {radix.HIST_COLUMNS}]."
        )
    for tensor in (state, hist):
        if not tensor.is_contiguous() or tensor.dtype != torch.int64:
            raise ValueError("radix_histogram: state and hist must be contiguous int64 tensors.")
    call = grads.call if isinstance(grads, VouchedList) else None
    grads = grads if isinstance(grads, list) else list(grads)
    criterion = scoring.criterion
    _check_scoring(scoring, key_format, len(grads))
    weights = list(scoring.weights) if criterion == "grad_over_weight" else []
    plan = cached_plan(grads + weights if weights else grads, (hist.device, tuple(scope_of), criterion),
                       lambda: _plan(grads, scope_of, scoring, hist.device), vouched=len(grads) + len(weights),
                       lasting=not weights, call=call, repoint=lambda plan: _repointed(plan, grads))
    random = criterion == "random"
    extra = dict(random_keys=scoring.random_keys if random else None,
                 entry_offsets=scoring.entry_offsets if random else None,
                 score_eps_bits=float64_bits(scoring.score_eps) if criterion == "grad_over_weight" else None)
    constants = _launch_constants(key_format, criterion)
    for grid, launch, samples, plan_constants, keep_alive in plan:
        lt = launch.table
        radix_histogram_kernel[grid](
            lt.table, lt.chunk_owner, state, hist, lt.num_chunks, state.shape[0], samples.items, samples.blocks,
            samples.num_items, **extra, **constants, **plan_constants)


_constants: dict = {}


def _launch_constants(key_format: KeyFormat, criterion: str) -> dict:
    """The histogram kernel's compile-time arguments fixed by the key format and criterion."""
    key = (key_format.name, criterion)
    if key not in _constants:
        key_float = tl.uint32 if criterion == "random" else TORCH_TO_TRITON[key_format.float_dtype]
        _constants[key] = dict(KEY_FLOAT=key_float, INF_KEY=inf_key_for(key_float), BINS=BINS, BLOCK=BLOCK,
                               ITERS=ITERS, STATE_COLUMNS=radix.STATE_COLUMNS, SAMPLE_BLOCK=radix.SAMPLE_BLOCK,
                               CRITERION=criterion, num_warps=NUM_WARPS)
    return _constants[key]


_INTERPRETER_PROGRAMS = 8  # CPU tensors (interpreter): few programs, so that tests exercise the loop
_program_counts: dict = {}


def _programs(device: torch.device) -> int:
    """Programs of a persistent launch on `device`: PROGRAMS_PER_SM per multiprocessor."""
    if device.type == "cpu":
        return _INTERPRETER_PROGRAMS
    if device not in _program_counts:
        _program_counts[device] = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return _program_counts[device]
