"""An independent, obviously correct GMT: concatenate and sort the scores, mask, call torch's own AdamW.

Everything the library must never do (concatenate all gradients, sort them) is fine here: this is
the yardstick the reference backend is held to, on small problems.
"""

from __future__ import annotations

import math

import torch
from torch.optim.adamw import adamw as torch_functional_adamw


def kth_largest(tensors, k: int) -> float:
    """The k-th largest |x| over all tensors (NaN largest), +inf when k == 0."""
    if k == 0:
        return math.inf
    scores = torch.cat([t.detach().abs().reshape(-1).double() for t in tensors])
    scores = torch.where(scores.isnan(), torch.full_like(scores, math.inf), scores)
    # NaN sorts as +inf here: only its rank matters, and NaN entries are all kept anyway.
    return scores.sort(descending=True).values[k - 1].item()


def keep_count(numel: int, mask_ratio: float) -> int:
    """k = N - floor(r * N) with r read as the decimal Python prints (SEMANTICS.md section 1)."""
    from fractions import Fraction

    return numel - math.floor(Fraction(repr(float(mask_ratio))) * numel)


def keep_mask(grad: torch.Tensor, threshold: float) -> torch.Tensor:
    return (grad.double().abs() >= threshold) | grad.isnan()


class OracleAdamW:
    """GMT for a list of tensors, one scope per entry of `scopes` (lists of indices into params)."""

    def __init__(self, params, *, lr, betas, eps, weight_decay, amsgrad, maximize, mask_ratio, scopes, mask_mode):
        self.params = [p.detach().clone() for p in params]
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        self.max_exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        self.steps = [torch.tensor(0.0) for _ in self.params]
        self.hp = dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay,
                       amsgrad=amsgrad, maximize=maximize)
        self.mask_ratio, self.scopes, self.mask_mode = mask_ratio, scopes, mask_mode
        self.last_thresholds = []

    def step(self, grads):
        keeps = [None] * len(self.params)
        self.last_thresholds = []
        for members in self.scopes:
            numel = sum(grads[i].numel() for i in members)
            t = kth_largest([grads[i] for i in members], keep_count(numel, self.mask_ratio))
            self.last_thresholds.append(t)
            for i in members:
                keeps[i] = keep_mask(grads[i], t)
        for i, p in enumerate(self.params):
            keep = keeps[i] if keeps[i] is not None else torch.ones_like(p, dtype=torch.bool)
            # fp32 math for 16-bit parameters: upcast, let torch's AdamW update, round back.
            compute = torch.float64 if p.dtype == torch.float64 else torch.float32
            g = grads[i].to(compute)
            if self.mask_mode == "grad":
                g = torch.where(keep, g, torch.zeros_like(g))
            new = [t.to(compute).clone() for t in (p, self.exp_avgs[i], self.exp_avg_sqs[i], self.max_exp_avg_sqs[i])]
            torch_functional_adamw([new[0]], [g], [new[1]], [new[2]], [new[3]], [self.steps[i]],
                                   foreach=False, **self.hp)
            olds = (p, self.exp_avgs[i], self.exp_avg_sqs[i], self.max_exp_avg_sqs[i])
            for old, fresh in zip(olds, new):
                take = keep if self.mask_mode == "freeze" else torch.ones_like(keep)
                old.copy_(torch.where(take, fresh.to(old.dtype), old))
        return keeps


# ---- SEMANTICS.md section 9: drop_deltas by concatenating and sorting every score ----

def random_scores_numpy(seed: int, selection: int, group: int, position: int, entries) -> "np.ndarray":
    """The random score u of section 8 restated with numpy uint32 words (whose arithmetic wraps
    modulo 2**32 by itself), independently of gmt_kernels/scores.py."""
    import numpy as np

    def mix(x):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))

    with np.errstate(over="ignore"):
        key = np.uint32(0x243F6A88)
        for word in (seed & 0xFFFFFFFF, seed >> 32, selection & 0xFFFFFFFF, selection >> 32, group, position):
            key = mix(np.array([key ^ np.uint32(word)], dtype=np.uint32))[0]
        entries = np.asarray(entries, dtype=np.uint64)
        t = mix((entries >> np.uint64(32)).astype(np.uint32) ^ key)
        return mix(mix(t ^ (entries & np.uint64(0xFFFFFFFF)).astype(np.uint32)) + t)


def drop_scores(p: torch.Tensor, p0: torch.Tensor, method: str, seed: int, position: int) -> torch.Tensor:
    """float64 scores of one tensor pair: |delta| (delta in fp32, fp64 for fp64; NaN as +inf, the
    largest) or u of entry (0, position) at selection 0, in row-major order."""
    if method == "random":
        u = random_scores_numpy(seed, 0, 0, position, range(p.numel()))
        return torch.from_numpy(u.astype("float64")).reshape(p.shape)
    compute = torch.float64 if p.dtype == torch.float64 else torch.float32
    s = (p.to(compute) - p0.to(compute)).abs().double()
    return torch.where(s.isnan(), torch.full_like(s, math.inf), s)


def drop_deltas_oracle(params, reference, drop_ratio, *, method, rescale, scope, seed):
    """(new params, stats) of SEMANTICS.md section 9, sorting the concatenated scores of each scope."""
    scores = [drop_scores(p, p0, method, seed, i) for i, (p, p0) in enumerate(zip(params, reference))]
    scopes = {"global": list(range(len(params)))} if scope == "global" else {i: [i] for i in range(len(params))}
    new, stats = [p.clone() for p in params], {}
    for name, members in scopes.items():
        numel = sum(params[i].numel() for i in members)
        k = keep_count(numel, drop_ratio)
        flat = torch.cat([scores[i].reshape(-1) for i in members]) if members else torch.empty(0, dtype=torch.float64)
        threshold = math.inf if k == 0 else flat.sort(descending=True).values[k - 1].item()
        kept = 0
        for i in members:
            p, p0 = params[i], reference[i]
            keep = (scores[i] >= threshold) & (k > 0)
            kept += int(keep.sum())
            value = p
            if rescale:
                compute = torch.float64 if p.dtype == torch.float64 else torch.float32
                delta = p.to(compute) - p0.to(compute)
                value = (p0.to(compute) + delta / torch.tensor(1.0 - drop_ratio, dtype=compute)).to(p.dtype)
            new[i] = torch.where(keep, value, p0)
        stats[name] = {"threshold": threshold, "kept": kept, "numel": numel}
    return new, stats


# ---- SEMANTICS.md section 8: every criterion's score, restated with numpy ----

def criterion_scores(grad, theta, criterion: str, *, wide: bool = False, score_eps: float = 1e-8,
                     random_key_args=(0, 0, 0, 0), entry_offset: int = 0) -> "np.ndarray":
    """Scores of every entry of grad, row-major, as numpy: "grad" |g| (float64, exact), "grad_over_weight"
    |g| / (|theta| + eps) in float32 IEEE arithmetic (float64 if wide), "random" the uint32 u of
    entry entry_offset + j under random_key_args = (seed, selection, group, position)."""
    import numpy as np

    if criterion == "grad":
        return np.abs(grad.detach().double().reshape(-1).numpy())
    if criterion == "grad_over_weight":
        dt = np.float64 if wide else np.float32
        g = np.abs(grad.detach().double().reshape(-1).numpy().astype(dt))
        th = np.abs(theta.detach().double().reshape(-1).numpy().astype(dt))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return g / (th + dt(score_eps))
    if criterion == "random":
        return random_scores_numpy(*random_key_args, entry_offset + np.arange(grad.numel(), dtype=np.uint64))
    raise ValueError(criterion)


def criterion_keys(grad, theta, criterion: str, key_format_name: str, **score_args) -> "np.ndarray":
    """int64 keys, row-major, of every entry's score in a key format: the bits of |score| in the
    format's float type (|g|: g's own bits with the sign bit cleared, widened exactly; a NaN
    grad_over_weight score: all ones, the format's largest key), or the u32 score itself."""
    import numpy as np

    if key_format_name == "u32":
        return criterion_scores(grad, theta, criterion, **score_args).astype(np.int64)
    bits = {"f16": 15, "bf16": 15, "f32": 31, "f64": 63}[key_format_name]
    if criterion == "grad":
        dtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64}[key_format_name]
        int_dtype = {16: torch.int16, 32: torch.int32, 64: torch.int64}[dtype.itemsize * 8]
        raw = grad.detach().reshape(-1).to(dtype).view(int_dtype).numpy().astype(np.int64)
        return raw & ((1 << bits) - 1)
    scores = criterion_scores(grad, theta, criterion, wide=key_format_name == "f64", **score_args)
    float_type, int_type = {"f32": (np.float32, np.int32), "f64": (np.float64, np.int64)}[key_format_name]
    keys = np.ascontiguousarray(scores).astype(float_type).view(int_type).astype(np.int64)
    return np.where(np.isnan(scores), (1 << bits) - 1, keys)


def histogram_oracle(keys_per_tensor, scope_of, state, *, bins: int, inf_key: int, sample_block: int = 64) -> torch.Tensor:
    """One radix pass by definition: per tensor i (keys in row-major = memory order) and entry j,
    counted if its scope row is not DONE and block j // sample_block is in the hash sample."""
    import numpy as np

    scopes = state.shape[0]
    hist = np.zeros((scopes, bins + 2), dtype=np.int64)
    for i, (keys, s) in enumerate(zip(keys_per_tensor, scope_of)):
        lo, last, shift, sample, done = (int(x) for x in state[s, :5])
        if done:
            continue
        for j, key in enumerate(int(k) for k in keys):
            block = j // sample_block
            h = (((block & 0x7FFFFFFF) * 0x9E3779B1) + (((i & 0x7FFFFFFF) * 0x85EBCA77) & 0xFFFFFFFF)) & 0xFFFFFFFF
            if (h >> (32 - sample)) != 0:
                continue
            if lo <= key <= last:
                hist[s, (key - lo) >> shift] += 1
            elif key > last:
                hist[s, bins] += 1
            if key >= inf_key:
                hist[s, bins + 1] += 1
    return torch.from_numpy(hist)


def pack_mask_numpy(keep: torch.Tensor) -> torch.Tensor:
    """The stored 1-bit mask of a bool tensor (SEMANTICS.md section 8 layout): rows = dim 0 (1 for
    0-d), bits LSB first within a byte, each row padded with zero bits to whole bytes."""
    import numpy as np

    d0 = keep.shape[0] if keep.dim() else 1
    rows = keep.reshape(d0, -1).numpy()
    return torch.from_numpy(np.packbits(rows, axis=1, bitorder="little"))


def unpack_mask_numpy(mask: torch.Tensor, shape) -> torch.Tensor:
    import numpy as np

    d0 = shape[0] if len(shape) else 1
    inner = math.prod(shape) // d0 if d0 else 0
    bits = np.unpackbits(mask.numpy(), axis=1, bitorder="little")[:, :inner]
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def adamw_oracle(p, g, m, v, vmax, step, keep, *, mask_mode, lr, beta1, beta2, eps, weight_decay, amsgrad,
                 maximize, grad_scale=None):
    """(p, m, v, vmax) after one masked AdamW step of SEMANTICS.md section 3, by torch's own AdamW on
    copies (step: the already-incremented count)."""
    compute = torch.float64 if p.dtype == torch.float64 else torch.float32
    gc = g.to(compute)
    if grad_scale is not None:
        gc = gc / grad_scale
    if mask_mode == "grad":
        gc = torch.where(keep, gc, torch.zeros_like(gc))
    new = [t.to(compute).clone() for t in (p, m, v, vmax)]
    torch_functional_adamw([new[0]], [gc], [new[1]], [new[2]], [new[3]], [torch.tensor(float(step) - 1)],
                           foreach=False, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                           amsgrad=amsgrad, maximize=maximize)
    take = keep if mask_mode == "freeze" else torch.ones_like(keep)
    return [torch.where(take, fresh.to(old.dtype), old) for old, fresh in zip((p, m, v, vmax), new)]


class CriteriaOracle:
    """SEMANTICS.md section 8 by the letter: per selection, every scope's scores (criterion_scores)
    concatenated and sorted, k-th largest, keep = s >= T or NaN; the stored keep sets reused on the
    steps in between; torch's AdamW through adamw_oracle. params: list of (tensor, group index,
    position in the group); scopes: lists of indices into params; mask_ratio 0 scopes: none."""

    def __init__(self, params, *, scopes, mask_ratio, criterion, refresh_every, seed=0, score_eps=1e-8,
                 mask_mode="grad", **hyper):
        self.params = [p.detach().clone() for p, _, _ in params]
        self.ids = [(g, pos) for _, g, pos in params]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.vmax = [torch.zeros_like(p) for p in self.params]
        self.steps = [0] * len(self.params)
        self.scopes, self.mask_ratio, self.criterion = scopes, mask_ratio, criterion
        self.refresh_every, self.seed, self.score_eps, self.mask_mode = refresh_every, seed, score_eps, mask_mode
        self.hyper = hyper
        self.selections, self.since = 0, 0
        self.keeps = None
        self.thresholds = None

    def due(self) -> bool:
        if self.refresh_every == 1 or self.selections == 0:
            return True
        return self.refresh_every is not None and self.since >= self.refresh_every

    def select(self, grads) -> None:
        import numpy as np

        keeps = [None] * len(self.params)
        self.thresholds = []
        for members in self.scopes:
            wide = any(self.params[i].dtype == torch.float64 for i in members)
            scores = {i: criterion_scores(grads[i], self.params[i], self.criterion, wide=wide, score_eps=self.score_eps,
                                          random_key_args=(self.seed, self.selections, *self.ids[i])).astype(np.float64)
                      for i in members}
            flat = np.concatenate([scores[i] for i in members])
            k = keep_count(flat.size, self.mask_ratio)
            t = math.inf if k == 0 else np.sort(np.where(np.isnan(flat), np.inf, flat))[::-1][k - 1]
            self.thresholds.append(float(t))
            for i in members:
                keeps[i] = torch.from_numpy((scores[i] >= t) | np.isnan(scores[i])).reshape(self.params[i].shape)
        self.keeps = keeps

    def step(self, grads, skip: bool = False):
        """One optimizer step; returns (kept per scope, whether it selected)."""
        if skip:
            return [0] * len(self.scopes), False
        due = self.due()
        if due:
            self.select(grads)
        for i, p in enumerate(self.params):
            keep = self.keeps[i] if self.keeps[i] is not None else torch.ones_like(p, dtype=torch.bool)
            self.steps[i] += 1
            new = adamw_oracle(p, grads[i], self.m[i], self.v[i], self.vmax[i], self.steps[i], keep,
                               mask_mode=self.mask_mode, **self.hyper)
            self.params[i], self.m[i], self.v[i], self.vmax[i] = new
        self.selections += int(due)
        self.since = 1 if due else self.since + 1
        return [sum(int(self.keeps[i].sum()) for i in members) for members in self.scopes], due

    def select_mask(self, grads) -> None:
        self.select(grads)
        self.selections += 1
        self.since = 0
