"""The fused masked-AdamW pass (Backend.masked_adamw): one Triton launch for a param group's tensors.

Per entry it reads g, p, m, v (and max_v with amsgrad) once, writes p, m, v (and max_v) once,
decides "kept" by comparing |g| with the tensor's device threshold, and counts the kept entries
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

from .histogram import TORCH_TO_TRITON, widen
from .. import memory_order_view
from .tables import cached_plan, is_aligned, launch_table

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
def _div(x, y):
    """IEEE round-to-nearest division, as torch computes it (Triton's `/` on float32 is approximate)."""
    if x.dtype == tl.float64:
        return x / y  # float64 division is always IEEE
    else:
        return tl.div_rn(x, y)


@triton.jit
def _sqrt(x):
    if x.dtype == tl.float64:
        return tl.sqrt(x)  # float64 sqrt is always IEEE
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, valid, threshold, grad_scale, sign,
            decay, one_minus_beta1, beta2, one_minus_beta2, eps, neg_step_size, bias_correction2_sqrt,
            COMPUTE: tl.constexpr, AMSGRAD: tl.constexpr, MASKED: tl.constexpr, FREEZE: tl.constexpr,
            HAS_GRAD_SCALE: tl.constexpr):
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
    # Scored after the exact widening to the threshold's type (the interpreter mishandles abs and
    # != on bf16, which it keeps as raw integers). A NaN counts as the largest score: kept.
    score = widen(g, threshold.dtype)
    keep = (tl.abs(score) >= threshold) | (score != score)
    if HAS_GRAD_SCALE:
        gc = _div(widen(g, COMPUTE), grad_scale) * sign
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
    denom = _div(_sqrt(second), bias_correction2_sqrt) + eps
    p_new = p_new + _div(m_new * neg_step_size, denom)

    out = p.dtype
    p_out = p_new.to(out)
    m_out = m_new.to(out)
    v_out = v_new.to(out)
    if AMSGRAD:
        vmax_out = vmax_new.to(out)
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
def masked_adamw_kernel(
    table,  # int64 [n, 9]: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, index, numel, first chunk
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
):
    skipped = 0
    if has_skip:
        skipped = tl.load(skip_ptr).to(tl.int32)
    if skipped != 0:  # a skipped step changes nothing and keeps nothing
        return
    pid = tl.program_id(0)
    row = table + tl.load(chunk_owner + pid).to(tl.int64) * 9
    t = tl.load(row + 6)  # index of this tensor in the call: its threshold and kept slot
    p_ptr = tl.load(row).to(tl.pointer_type(PARAM))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(PARAM))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(PARAM))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(PARAM))
    vmax_ptr = tl.load(row + 4).to(tl.pointer_type(PARAM))
    step_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    numel = tl.load(row + 7)
    start = (pid - tl.load(row + 8)) * (BLOCK * ITERS)  # int64: tensors beyond 2**31 entries
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

    lanes = tl.arange(0, BLOCK)
    count = 0
    if start + BLOCK * ITERS <= numel:
        # A full chunk: no masks, so loads and stores vectorise to 128 bits.
        for i in range(ITERS):
            count += _update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, i * BLOCK + lanes, lanes >= 0, threshold,
                             grad_scale, sign, decay, omb1, b2, omb2, eps_c, neg_step_size,
                             bias_correction2_sqrt, COMPUTE, AMSGRAD, False, FREEZE, HAS_GRAD_SCALE)
    else:
        remaining = numel - start
        for i in range(tl.cdiv(remaining, BLOCK).to(tl.int32)):
            offs = i * BLOCK + lanes
            count += _update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, offs < remaining, threshold,
                             grad_scale, sign, decay, omb1, b2, omb2, eps_c, neg_step_size,
                             bias_correction2_sqrt, COMPUTE, AMSGRAD, True, FREEZE, HAS_GRAD_SCALE)
    tl.atomic_add(kept + t, count.to(tl.int64), sem="relaxed")


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf  # 0**step = 0 for every step >= 1


def _plan(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad) -> tuple:
    """(tensors to update by reference, [(aligned, LaunchTable)]): one launch per alignment."""
    device, dtype = params[0].device, params[0].dtype
    launches = defaultdict(lambda: ([], []))
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
        if any(f is None for f in flats) or any(x.stride() != p.stride() or x.dtype != dtype for x in tensors):
            by_reference.append(i)
            continue
        ptrs = [f.data_ptr() for f in flats] + ([] if amsgrad else [0])
        rows, numels = launches[is_aligned(*flats)]
        rows.append((*ptrs, steps[i].data_ptr(), i))  # i: the threshold / kept slot
        numels.append(p.numel())
    if launches:
        for step in steps:
            if step.dtype != torch.float32 or step.device != device:
                raise ValueError("masked_adamw: every step must be a 0-d float32 tensor on the parameters' device.")
    tables = [(aligned, launch_table(rows, numels, block_for(dtype) * ITERS, device))
              for aligned, (rows, numels) in launches.items()]
    return by_reference, tables


def launch_masked_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, thresholds, kept, *,
                        lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, mask_mode, grad_scale, skip,
                        fallback) -> None:
    """`fallback(i)` updates tensor i another way: used only for tensors whose layouts differ."""
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if thresholds.dtype not in (torch.float32, torch.float64) or kept.dtype != torch.int64:
        raise ValueError("masked_adamw: thresholds must be float32/float64 and kept int64 tensors.")
    tensors = [*params, *grads, *exp_avgs, *exp_avg_sqs, *(max_exp_avg_sqs if amsgrad else []), *steps]
    by_reference, tables = cached_plan(
        tensors, (device, bool(amsgrad), len(params)),
        lambda: (_plan(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad), True))
    for i in by_reference:
        fallback(i)  # e.g. a gradient laid out unlike its parameter: rare, handled tensor by tensor
    if not tables:
        return
    lr_is_tensor = isinstance(lr, torch.Tensor)
    unused = _placeholder(device)  # a valid pointer for arguments the kernel is told not to read
    lr_tensor = lr.to(device, non_blocking=True) if lr_is_tensor else unused
    scale = grad_scale if grad_scale is not None else unused
    skip_bytes = skip.view(torch.uint8) if skip is not None else unused.view(torch.uint8)
    block = block_for(dtype)
    for aligned, lt in tables:
        masked_adamw_kernel[(lt.num_chunks,)](
            lt.table, lt.chunk_owner, thresholds, kept, lr_tensor, scale, skip_bytes,
            0.0 if lr_is_tensor else float(lr), float(weight_decay), float(beta1), float(beta2),
            _log(float(beta1)), _log(float(beta2)), float(eps),
            int(lr_is_tensor), int(skip is not None), int(maximize),
            PARAM=TORCH_TO_TRITON[dtype], COMPUTE=TORCH_TO_TRITON[compute], AMSGRAD=bool(amsgrad),
            ALIGNED=aligned, BLOCK=block, ITERS=ITERS, FREEZE=mask_mode == "freeze",
            HAS_GRAD_SCALE=grad_scale is not None, num_warps=NUM_WARPS,
        )


_placeholders: dict = {}


def _placeholder(device: torch.device) -> torch.Tensor:
    if device not in _placeholders:
        _placeholders[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _placeholders[device]
