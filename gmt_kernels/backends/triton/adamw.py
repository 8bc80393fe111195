"""The fused masked-AdamW pass (Backend.masked_adamw): one Triton launch for a param group's tensors.

Per entry it reads g, p, m, v (and max_v with amsgrad) once, writes p, m, v (and max_v) once,
decides "kept" by comparing the entry's score (scoring.py: |g|, |g| / (|p| + eps) or the random
u, the criterion a compile-time constant) with the tensor's device threshold, or by its bit in the
stored mask when the step reuses one, writes the bits on a refresh, and counts the kept entries
with one atomic per program. Everything that varies per step (threshold, step count, tensor lr,
grad_scale, skip flag) is read on the device, so the launch is the same every step and can be
captured in a CUDA graph. Per-tensor scalars (bias corrections) are computed in float64 once per
program, like torch.optim.AdamW computes them on the host in double.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import triton
import triton.language as tl

from .histogram import TORCH_TO_TRITON
from .scoring import (CRITERIA, check_random_inputs, div_rn, eps_from_bits, float64_bits, narrow, random_key_halves,
                      random_u, weight_score, widen)
from .. import VouchedList, contiguous_slots, memory_order_view
from ...masks import mask_rows, mask_shape
from .tables import Launch, cached_plan, is_aligned, launch_table, repointed

# 4 warps x 16 bytes of each tensor per thread per iteration (one 128-bit access: 4 fp32 or 8
# 16-bit entries; fp64 takes two), 8 iterations per program: 8-16 KiB of each of g/p/m/v per
# program, small enough that a program's registers hold one iteration (no spills with amsgrad and
# fp64), large enough to amortise the per-program scalar work (bias corrections, one atomic for
# the kept count).
ITERS = 8
NUM_WARPS = 4


def block_for(dtype: torch.dtype) -> int:
    return 1024 if dtype.itemsize == 2 else 512
# Table columns (9): param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (0 without amsgrad), step,
# the tensor's index in the call (its threshold / kept slot), then numel and first chunk (tables.py).


@triton.jit
def _sqrt(x):
    if x.dtype == tl.float64:
        return tl.sqrt(x)  # float64 sqrt is always IEEE
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _score_keep(g, p, offs, threshold, entry_base, hi0, t0, t1, score_eps, CRITERION: tl.constexpr):
    """The score rule (SEMANTICS.md section 8), in the threshold's type exactly as the histogram
    pass scores: keep iff s >= threshold or s is NaN (u >= threshold for "random")."""
    if CRITERION == "random":
        return random_u(entry_base + offs, hi0, t0, t1).to(threshold.dtype) >= threshold  # u exact in float64
    elif CRITERION == "grad_over_weight":
        s = weight_score(g, p, score_eps, threshold.dtype)  # theta = p before this step's update
        return (s >= threshold) | (s != s)
    else:
        # Scored after the exact widening to the threshold's type (the interpreter mishandles abs and
        # != on bf16, which it keeps as raw integers). A NaN counts as the largest score: kept.
        score = widen(g, threshold.dtype)
        return (tl.abs(score) >= threshold) | (score != score)


@triton.jit
def _keep(g, p, offs, valid, threshold, entry_base, hi0, t0, t1, score_eps, mask_ptr, bytes_, byte_valid, refresh,
          MASKED: tl.constexpr, CRITERION: tl.constexpr, HAS_MASKS: tl.constexpr):
    """Which entries of the block are kept: the score rule, also written to the stored mask (bit
    l % 8 of byte bytes_[l // 8] for lane l, LSB first), or, when refresh is 0, the stored bits."""
    if HAS_MASKS:
        BLOCK: tl.constexpr = offs.shape[0]
        if refresh != 0:
            keep = _score_keep(g, p, offs, threshold, entry_base, hi0, t0, t1, score_eps, CRITERION)
            bits = tl.reshape((keep & valid).to(tl.int32), [BLOCK // 8, 8]) << tl.arange(0, 8)[None, :]
            if MASKED:
                tl.store(mask_ptr + bytes_, tl.sum(bits, axis=1).to(tl.uint8), mask=byte_valid)
            else:
                tl.store(mask_ptr + bytes_, tl.sum(bits, axis=1).to(tl.uint8))
        else:
            if MASKED:
                stored = tl.load(mask_ptr + bytes_, mask=byte_valid, other=0)
            else:
                stored = tl.load(mask_ptr + bytes_)
            bits = (stored.to(tl.int32)[:, None] >> tl.arange(0, 8)[None, :]) & 1
            keep = tl.reshape(bits, [BLOCK]) != 0
    else:
        keep = _score_keep(g, p, offs, threshold, entry_base, hi0, t0, t1, score_eps, CRITERION)
    return keep


@triton.jit
def _select(p_ptr, g_ptr, offs, valid, threshold, entry_base, hi0, t0, t1, score_eps, mask_ptr, bytes_, byte_valid,
            refresh, MASKED: tl.constexpr, CRITERION: tl.constexpr, HAS_MASKS: tl.constexpr):
    """update_params=False (select_mask): the keep bits only, written to the stored masks and counted."""
    g = offs
    p = offs
    if CRITERION != "random":
        g = tl.load(g_ptr + offs, mask=valid, other=0.0)
    if CRITERION == "grad_over_weight":
        p = tl.load(p_ptr + offs, mask=valid, other=0.0)
    keep = _keep(g, p, offs, valid, threshold, entry_base, hi0, t0, t1, score_eps, mask_ptr, bytes_, byte_valid,
                 refresh, True, CRITERION, HAS_MASKS)
    return tl.sum((keep & valid).to(tl.int32), axis=0)


@triton.jit
def _update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, valid, threshold, grad_scale, sign,
            decay, one_minus_beta1, beta2, one_minus_beta2, eps, neg_step_size, bias_correction2_sqrt,
            entry_base, hi0, t0, t1, score_eps, mask_ptr, bytes_, byte_valid, refresh,
            COMPUTE: tl.constexpr, AMSGRAD: tl.constexpr, MASKED: tl.constexpr, FREEZE: tl.constexpr,
            HAS_GRAD_SCALE: tl.constexpr, CRITERION: tl.constexpr, HAS_MASKS: tl.constexpr):
    """One block: SEMANTICS.md section 3, op for op as torch's single-tensor AdamW (IEEE division and
    square root, lerp's two-sided formula), so results match it to fp32 rounding."""
    if MASKED:
        g = tl.load(g_ptr + offs, mask=valid, other=0.0)
        p = tl.load(p_ptr + offs, mask=valid, other=0.0)
        m = tl.load(m_ptr + offs, mask=valid, other=0.0)
        v = tl.load(v_ptr + offs, mask=valid, other=0.0)
    else:
        g = tl.load(g_ptr + offs)
        p = tl.load(p_ptr + offs)
        m = tl.load(m_ptr + offs)
        v = tl.load(v_ptr + offs)
    keep = _keep(g, p, offs, valid, threshold, entry_base, hi0, t0, t1, score_eps, mask_ptr, bytes_, byte_valid,
                 refresh, MASKED, CRITERION, HAS_MASKS)
    if HAS_GRAD_SCALE:
        gc = div_rn(widen(g, COMPUTE), grad_scale) * sign
    else:  # no AMP: no division at all
        gc = widen(g, COMPUTE) * sign
    if not FREEZE:
        gc = tl.where(keep, gc, 0.0)  # mode "grad": masked entries see a zero gradient
    m_old = widen(m, COMPUTE)
    v_old = widen(v, COMPUTE)
    p_new = widen(p, COMPUTE) * decay
    diff = gc - m_old
    # torch.lerp's formula: the side that keeps the weight small.
    m_new = tl.where(one_minus_beta1 < 0.5, m_old + one_minus_beta1 * diff, gc - diff * (1.0 - one_minus_beta1))
    v_new = v_old * beta2 + one_minus_beta2 * gc * gc
    if AMSGRAD:
        if MASKED:
            vmax = tl.load(vmax_ptr + offs, mask=valid, other=0.0)
        else:
            vmax = tl.load(vmax_ptr + offs)
        vmax_new = tl.maximum(widen(vmax, COMPUTE), v_new, propagate_nan=tl.PropagateNan.ALL)
        second = vmax_new
    else:
        second = v_new
    denom = div_rn(_sqrt(second), bias_correction2_sqrt) + eps
    p_new = p_new + div_rn(m_new * neg_step_size, denom)

    out = p.dtype
    p_out = narrow(p_new, out)
    m_out = narrow(m_new, out)
    v_out = narrow(v_new, out)
    if AMSGRAD:
        vmax_out = narrow(vmax_new, out)
    if FREEZE:
        # Masked entries keep p, m, v (and max_v) bit for bit: the loaded values are written back.
        # A store mask that depends on the data would split every 128-bit store into scalar ones;
        # the blend keeps them whole, and DRAM writes whole 32-byte sectors anyway (a sector of
        # 8 fp32 entries escapes a write only if all 8 are masked: 0.3**8 at mask_ratio 0.3).
        p_out = tl.where(keep, p_out, p)
        m_out = tl.where(keep, m_out, m)
        v_out = tl.where(keep, v_out, v)
        if AMSGRAD:
            vmax_out = tl.where(keep, vmax_out, vmax)
    if MASKED:  # a tensor's last chunk: per-lane masks, scalar accesses
        tl.store(p_ptr + offs, p_out, mask=valid)
        tl.store(m_ptr + offs, m_out, mask=valid)
        tl.store(v_ptr + offs, v_out, mask=valid)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, vmax_out, mask=valid)
    else:  # a full chunk: no mask at all, so the stores are 128 bits wide like the loads
        tl.store(p_ptr + offs, p_out)
        tl.store(m_ptr + offs, m_out)
        tl.store(v_ptr + offs, v_out)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, vmax_out)
    if MASKED:
        keep = keep & valid
    return tl.sum(keep.to(tl.int32), axis=0)


@triton.jit
def _block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, valid, threshold, grad_scale, sign, decay, omb1, b2, omb2,
           eps_c, neg_step_size, bias_correction2_sqrt, entry_base, hi0, t0, t1, score_eps, mask_ptr, bytes_,
           byte_valid, refresh, COMPUTE: tl.constexpr, AMSGRAD: tl.constexpr, MASKED: tl.constexpr,
           FREEZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, CRITERION: tl.constexpr, HAS_MASKS: tl.constexpr,
           UPDATE: tl.constexpr):
    """The kept count of one block, updated (UPDATE) or only selected (select_mask)."""
    if UPDATE:
        return _update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, valid, threshold, grad_scale, sign, decay, omb1,
                       b2, omb2, eps_c, neg_step_size, bias_correction2_sqrt, entry_base, hi0, t0, t1, score_eps,
                       mask_ptr, bytes_, byte_valid, refresh, COMPUTE, AMSGRAD, MASKED, FREEZE, HAS_GRAD_SCALE,
                       CRITERION, HAS_MASKS)
    else:
        return _select(p_ptr, g_ptr, offs, valid, threshold, entry_base, hi0, t0, t1, score_eps, mask_ptr, bytes_,
                       byte_valid, refresh, MASKED, CRITERION, HAS_MASKS)


@triton.jit
def masked_adamw_kernel(
    table,  # int64 [n, COLUMNS]: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, index,
            # [mask, inner (HAS_MASKS)], numel, first chunk
    chunk_owner,  # int32 [chunks]
    thresholds,  # [n] float32 or float64
    kept,  # int64 [n]
    lr_tensor,  # 0-d float tensor, read when lr_from_tensor (else any valid pointer)
    grad_scale_ptr,  # 0-d float tensor, read when HAS_GRAD_SCALE
    skip_ptr,  # 0-d uint8 (a bool viewed as bytes), read when has_skip
    lr: tl.float64,
    weight_decay: tl.float64,
    beta1: tl.float64,
    beta2: tl.float64,
    log_beta1: tl.float64,  # log(beta): beta**step = exp(step * log(beta)) in float64
    log_beta2: tl.float64,
    eps: tl.float64,
    lr_from_tensor,
    has_skip,
    maximize,
    PARAM: tl.constexpr,
    COMPUTE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    ALIGNED: tl.constexpr,  # every pointer of the launch is 16-byte aligned: allow 128-bit accesses
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    FREEZE: tl.constexpr,  # mask_mode "freeze" (else "grad"): compile-time, so "grad" stores unmasked
    HAS_GRAD_SCALE: tl.constexpr,  # g is divided by *grad_scale_ptr (AMP); else no division at all
    random_keys=None,  # random: int64 [n], the tensors' 32-bit keys
    entry_offsets=None,  # random: int64 [n], index of each tensor's first entry in its parameter
    score_eps_bits=None,  # grad_over_weight: scoring.float64_bits(score_eps)
    refresh_ptr=None,  # with HAS_MASKS: 0-d uint8 (a bool as bytes), 0 = keep the stored bits; None = refresh
    CRITERION: tl.constexpr = "grad",  # scoring.CRITERIA
    HAS_MASKS: tl.constexpr = False,  # stored 1-bit masks: written on a refresh, else read
    UPDATE: tl.constexpr = True,  # False (select_mask): write masks and kept only
):
    COLUMNS: tl.constexpr = 11 if HAS_MASKS else 9
    skipped = 0
    if has_skip:
        skipped = tl.load(skip_ptr).to(tl.int32)
    if skipped != 0:  # a skipped step changes nothing and keeps nothing
        return
    pid = tl.program_id(0)
    row = table + tl.load(chunk_owner + pid).to(tl.int64) * COLUMNS
    t = tl.load(row + 6)  # index of this tensor in the call: its threshold and kept slot
    p_ptr = tl.load(row).to(tl.pointer_type(PARAM))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(PARAM))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(PARAM))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(PARAM))
    vmax_ptr = tl.load(row + 4).to(tl.pointer_type(PARAM))
    step_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    numel = tl.load(row + (COLUMNS - 2))
    start = (pid - tl.load(row + (COLUMNS - 1))) * (BLOCK * ITERS)  # int64: tensors beyond 2**31 entries
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        vmax_ptr = tl.multiple_of(vmax_ptr, 16)
    p_ptr += start
    g_ptr += start
    m_ptr += start
    v_ptr += start
    vmax_ptr += start

    # Float arguments as float64 values (the interpreter hands them over as Python floats).
    zero64 = tl.full([], 0.0, tl.float64)
    lr = lr + zero64
    weight_decay = weight_decay + zero64
    beta1 = beta1 + zero64
    beta2 = beta2 + zero64
    log_beta1 = log_beta1 + zero64
    log_beta2 = log_beta2 + zero64
    eps = eps + zero64
    # Per-tensor scalars in float64, rounded once to the compute type (as torch does on the host).
    step = tl.load(step_ptr).to(tl.float64)
    lr64 = lr
    decay = (1.0 - lr * weight_decay).to(COMPUTE)
    if lr_from_tensor:
        # As torch: the decay factor in the lr tensor's own dtype, the step size in float64.
        lr_value = tl.load(lr_tensor)
        lr64 = lr_value.to(tl.float64)
        decay = (1.0 - lr_value * weight_decay.to(lr_value.dtype)).to(COMPUTE)
    bias_correction1 = 1.0 - tl.exp(step * log_beta1)
    bias_correction2 = 1.0 - tl.exp(step * log_beta2)
    neg_step_size = (-(lr64 / bias_correction1)).to(COMPUTE)
    bias_correction2_sqrt = tl.sqrt(bias_correction2).to(COMPUTE)
    grad_scale = tl.full([], 1.0, COMPUTE)
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(COMPUTE)
    sign = tl.full([], 1.0, COMPUTE)
    if maximize:
        sign = -sign
    threshold = tl.load(thresholds + t)
    omb1 = (1.0 - beta1).to(COMPUTE)
    b2 = beta2.to(COMPUTE)
    omb2 = (1.0 - beta2).to(COMPUTE)
    eps_c = eps.to(COMPUTE)

    # Scoring inputs beyond g and p: placeholders (dropped by the compiler) where unused.
    score_eps_t = 0.0
    entry_base = start
    hi0 = 0
    t0 = 0
    t1 = 0
    if CRITERION == "grad_over_weight":
        score_eps_t = eps_from_bits(score_eps_bits, threshold.dtype)  # float32(score_eps) for float32 scores
    if CRITERION == "random":
        entry_base = tl.load(entry_offsets + t) + start  # index in the parameter of the chunk's first entry
        # Entries from 7 before the chunk on (a stored-mask byte may start there: see below).
        hi0, t0, t1 = random_key_halves(tl.load(random_keys + t), entry_base - tl.minimum(start, 8))
    refresh = 1
    mask_ptr = kept  # placeholder
    inner = 8
    if HAS_MASKS:
        mask_ptr = tl.load(row + 7).to(tl.pointer_type(tl.uint8))
        inner = tl.load(row + 8)  # entries per row of the (d0, inner) view; bytes per row: ceil(inner / 8)
        if refresh_ptr is not None:
            refresh = tl.load(refresh_ptr).to(tl.int32)

    NB: tl.constexpr = BLOCK // 8  # stored-mask bytes per block
    lanes = tl.arange(0, BLOCK)
    count = 0
    if (inner % 8) != 0:
        # Stored masks whose rows end inside a byte: the program takes the whole bytes (up to 8
        # entries, padding bits 0) that start in its chunk, as tiles of NB bytes x 8 entries, so that
        # no byte is written by two programs. Offsets are from the chunk's start (down to -7).
        bytes_per_row = (inner + 7) // 8
        end = tl.minimum(start + BLOCK * ITERS, numel)
        first_byte = (start // inner) * bytes_per_row + ((start % inner) + 7) // 8
        end_byte = (end // inner) * bytes_per_row + ((end % inner) + 7) // 8
        for i in range(tl.cdiv(end_byte - first_byte, NB).to(tl.int32)):
            byte = first_byte + i * NB + tl.arange(0, NB)
            byte_valid = byte < end_byte
            r = byte // bytes_per_row
            col = (byte - r * bytes_per_row)[:, None] * 8 + tl.arange(0, 8)[None, :]
            offs = tl.reshape(r[:, None] * inner + col - start, [BLOCK])
            valid = tl.reshape(byte_valid[:, None] & (col < inner), [BLOCK])
            count += _block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, valid, threshold, grad_scale, sign, decay,
                            omb1, b2, omb2, eps_c, neg_step_size, bias_correction2_sqrt, entry_base, hi0, t0, t1,
                            score_eps_t, mask_ptr, byte, byte_valid, refresh, COMPUTE, AMSGRAD, True, FREEZE,
                            HAS_GRAD_SCALE, CRITERION, HAS_MASKS, UPDATE)
    elif start + BLOCK * ITERS <= numel:
        # A full chunk: no per-lane predicates, so loads and stores vectorise to 128 bits. Rows
        # of the stored mask are whole bytes here: the chunk's bytes are its entries / 8.
        for i in range(ITERS):
            byte = start // 8 + i * NB + tl.arange(0, NB)
            count += _block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, i * BLOCK + lanes, lanes >= 0, threshold,
                            grad_scale, sign, decay, omb1, b2, omb2, eps_c, neg_step_size,
                            bias_correction2_sqrt, entry_base, hi0, t0, t1, score_eps_t, mask_ptr, byte, byte >= 0,
                            refresh, COMPUTE, AMSGRAD, False, FREEZE, HAS_GRAD_SCALE, CRITERION, HAS_MASKS, UPDATE)
    else:
        remaining = numel - start
        for i in range(tl.cdiv(remaining, BLOCK).to(tl.int32)):
            offs = i * BLOCK + lanes
            byte = start // 8 + i * NB + tl.arange(0, NB)
            count += _block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, offs < remaining, threshold,
                            grad_scale, sign, decay, omb1, b2, omb2, eps_c, neg_step_size,
                            bias_correction2_sqrt, entry_base, hi0, t0, t1, score_eps_t, mask_ptr, byte,
                            (i * NB + tl.arange(0, NB)) * 8 < remaining, refresh, COMPUTE, AMSGRAD, True, FREEZE,
                            HAS_GRAD_SCALE, CRITERION, HAS_MASKS, UPDATE)
    tl.atomic_add(kept + t, count.to(tl.int64), sem="relaxed")


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf  # 0**step = 0 for every step >= 1


def _check_masks(params, masks) -> None:
    if len(masks) != len(params):
        raise ValueError(f"masked_adamw: {len(masks)} stored masks for {len(params)} parameters; pass one per "
                         "parameter, or none.")
    for i, (p, m) in enumerate(zip(params, masks)):
        if (m.dtype != torch.uint8 or tuple(m.shape) != mask_shape(p.shape) or not m.is_contiguous()
                or m.device != p.device):
            raise ValueError(
                f"masked_adamw: stored mask {i} is a {m.dtype} tensor of shape {tuple(m.shape)} on {m.device}; a "
                f"parameter of shape {tuple(p.shape)} takes a contiguous uint8 tensor of shape {mask_shape(p.shape)} on "
                f"{p.device} (1 bit per entry, rows of its (d0, inner) view, LSB first)."
            )


def _plan(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, masks, amsgrad, row_major, slot) -> tuple:
    """(tensors to update by reference, [tables.Launch]): one launch per alignment.
    row_major: entries are indexed row-major (random scores, stored masks), so only contiguous
    parameters go to the kernel (which indexes memory order). slot: the stride of thresholds and
    kept (0: every tensor shares one threshold and one counter)."""
    device, dtype = params[0].device, params[0].dtype
    launches = defaultdict(lambda: ([], [], []))
    by_reference = []
    for i, p in enumerate(params):
        if p.dtype != dtype or p.device != device:
            raise ValueError(
                f"masked_adamw takes one dtype on one device per call; got {p.dtype} on {p.device} after "
                f"{dtype} on {device}. Call it once per (device, dtype)."
            )
        tensors = [p, grads[i], exp_avgs[i], exp_avg_sqs[i]] + ([max_exp_avg_sqs[i]] if amsgrad else [])
        if p.numel() == 0:
            continue
        flats = [memory_order_view(x) for x in tensors]
        if (any(f is None for f in flats) or any(x.stride() != p.stride() or x.dtype != dtype for x in tensors)
                or (row_major and not p.is_contiguous())):
            by_reference.append(i)
            continue
        ptrs = [f.data_ptr() for f in flats] + ([] if amsgrad else [0])
        rows, numels, indexes = launches[is_aligned(*flats)]
        stored = (masks[i].data_ptr(), mask_rows(p.shape)[1]) if masks else ()  # mask, inner
        rows.append((*ptrs, steps[i].data_ptr(), i * slot, *stored))  # the threshold / kept slot
        numels.append(p.numel())
        indexes.append(i)
    if launches:
        for step in steps:
            if step.dtype != torch.float32 or step.device != device:
                raise ValueError("masked_adamw: every step must be a 0-d float32 tensor on the parameters' device.")
    tables = [Launch(aligned, launch_table(rows, numels, block_for(dtype) * ITERS, device), _GRAD_COLUMN, indexes)
              for aligned, (rows, numels, indexes) in launches.items()]
    return by_reference, tables


_GRAD_COLUMN = 1  # of a table row: param, grad, exp_avg, exp_avg_sq, ...


def _repointed(plan, grads):
    """The plan for gradients that moved (laid out as before), or None (see tables.repointed)."""
    by_reference, tables = plan
    moved = [repointed(launch, grads) for launch in tables]
    return None if None in moved else (by_reference, moved)


def _check_mask_source(mask, n: int) -> None:
    scoring = mask.scoring
    if scoring.criterion not in CRITERIA:
        raise ValueError(f"masked_adamw: unknown criterion {scoring.criterion!r}; expected one of "
                         f"{', '.join(map(repr, CRITERIA))}.")
    if mask.thresholds.dtype not in (torch.float32, torch.float64):
        raise ValueError("masked_adamw: thresholds must be a float32/float64 tensor.")
    if scoring.criterion == "random":
        if mask.thresholds.dtype != torch.float64:
            raise ValueError("masked_adamw: criterion 'random' compares u with float64 thresholds (u32 key format).")
        check_random_inputs(scoring, n, "masked_adamw")
    if mask.refresh is not None and not mask.masks:
        raise ValueError("masked_adamw: refresh says whether to write or read the stored masks; it needs masks "
                         "(one uint8 tensor per parameter).")


def launch_masked_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, kept, *, options, mask,
                        fallback) -> None:
    """options: options.AdamWOptions, mask: options.MaskSource. `fallback(i, thresholds, kept)` updates
    tensor i another way: used only for tensors whose layouts differ (or, with row-major indexing,
    non-contiguous ones)."""
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if kept.dtype != torch.int64:
        raise ValueError("masked_adamw: kept must be an int64 tensor.")
    _check_mask_source(mask, len(params))
    masks, amsgrad, criterion = list(mask.masks), bool(options.amsgrad), mask.scoring.criterion
    if masks:
        _check_masks(params, masks)
    row_major = bool(masks) or criterion == "random"
    # The table's slot column indexes thresholds and kept (strided views of the scopes' rows, one
    # stride for both) and, for "random", the contiguous per-tensor keys: else contiguous slots.
    slot = kept.stride(0) if len(params) > 1 else 1
    thresholds, finish = mask.thresholds, None
    if thresholds.stride(0) != slot and len(params) > 1 or (slot != 1 and criterion == "random"):
        thresholds, kept, finish = contiguous_slots(thresholds, kept)
        slot = 1
    tensors = [*params, *grads, *exp_avgs, *exp_avg_sqs, *(max_exp_avg_sqs if amsgrad else []), *steps, *masks]
    by_reference, tables = cached_plan(
        tensors, (device, amsgrad, len(params), bool(masks), row_major, slot),
        lambda: (_plan(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, masks, amsgrad, row_major,
                       slot), True), vouched=len(tensors), lasting=True,
        call=params.call if isinstance(params, VouchedList) else None,
        repoint=lambda plan: _repointed(plan, grads))
    for i in by_reference:
        fallback(i, thresholds, kept)  # e.g. a gradient laid out unlike its parameter: rare, tensor by tensor
    if tables:
        _launch(tables, params, thresholds, kept, options, mask, dtype, compute, amsgrad, criterion, masks)
    if finish is not None:
        finish()


def _launch(tables, params, thresholds, kept, options, mask, dtype, compute, amsgrad, criterion, masks) -> None:
    device = params[0].device
    lr, skip, grad_scale = options.lr, options.skip, options.grad_scale
    lr_is_tensor = isinstance(lr, torch.Tensor)
    unused = _placeholder(device)  # a valid pointer for arguments the kernel is told not to read
    lr_tensor = lr.to(device, non_blocking=True) if lr_is_tensor else unused
    scale = grad_scale if grad_scale is not None else unused
    skip_bytes = skip.view(torch.uint8) if skip is not None else unused.view(torch.uint8)
    scoring = mask.scoring
    # Criterion inputs as None where unused: compile-time absent, so the "grad" variants are unchanged.
    extra = dict(random_keys=scoring.random_keys if criterion == "random" else None,
                 entry_offsets=scoring.entry_offsets if criterion == "random" else None,
                 score_eps_bits=float64_bits(scoring.score_eps) if criterion == "grad_over_weight" else None,
                 refresh_ptr=mask.refresh.view(torch.uint8) if masks and mask.refresh is not None else None)
    block = block_for(dtype)
    for launch in tables:
        aligned, lt = launch.aligned, launch.table
        masked_adamw_kernel[(lt.num_chunks,)](
            lt.table, lt.chunk_owner, thresholds, kept, lr_tensor, scale, skip_bytes,
            0.0 if lr_is_tensor else float(lr), float(options.weight_decay), float(options.beta1),
            float(options.beta2), _log(float(options.beta1)), _log(float(options.beta2)), float(options.eps),
            int(lr_is_tensor), int(skip is not None), int(options.maximize), **extra,
            PARAM=TORCH_TO_TRITON[dtype], COMPUTE=TORCH_TO_TRITON[compute], AMSGRAD=amsgrad,
            ALIGNED=aligned, BLOCK=block, ITERS=ITERS, FREEZE=options.mask_mode == "freeze",
            HAS_GRAD_SCALE=grad_scale is not None, CRITERION=criterion, HAS_MASKS=bool(masks),
            UPDATE=bool(mask.update_params), num_warps=NUM_WARPS,
        )


_placeholders: dict = {}


def _placeholder(device: torch.device) -> torch.Tensor:
    if device not in _placeholders:
        _placeholders[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _placeholders[device]
