"""drop_deltas: the one-off drop of small fine-tuning deltas (SEMANTICS.md section 9).

The GMT paper's One-off Drop ("magnitude") and DARE ("random") post-process a fine-tuned model:
per scope, keep the k entries of largest score and reset every other entry to its pretrained
value. The k-th largest score is found by the same histogram selection as GMTAdamW's threshold
(threshold.select_thresholds and the backends' radix_histogram), fed with scores produced on the
fly: every pass recomputes each chunk's delta p - p0 (or random score u) and histograms it, so the
extra memory is a few chunk-sized temporaries, never a copy of all deltas.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterator

import torch

from . import radix, scores
from .backends import Backend, check_backend_name, resolve
from .options import GRAD
from .threshold import Scope, select_thresholds

METHODS = ("magnitude", "random")
SCOPES = ("global", "tensor")
# Entries scored at once: temporaries are a few tensors of this many entries (8 MiB each for the
# int64 words of random scores). Smaller chunks cost more kernel calls per pass (measured: 2^18 is
# about 1.7x slower than 2^20 for "magnitude" on the 2-core CPU backend).
CHUNK = 1 << 20


@dataclass
class _ScoreSource:
    """One tensor pair as select_thresholds sees it (in place of a gradient): `device` picks the
    work list, and the backend of _scoring_backend asks it for its scores chunk by chunk."""

    param: torch.Tensor
    ref: torch.Tensor
    position: int  # index in the params list: the parameter identity (0, position) of the random score
    method: str
    seed: int

    @property
    def device(self) -> torch.device:
        return self.param.device

    @property
    def score_dtype(self) -> torch.dtype:
        if self.method == "random":
            return torch.float64  # u < 2**32 is exact in float64, and float64 keys are monotone in u
        return _compute_dtype(self.param.dtype)

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(param chunk, reference chunk, scores) over row blocks of dim 0 (views of both tensors)."""
        p, p0 = (t.unsqueeze(0) if t.dim() == 0 else t for t in (self.param, self.ref))
        if p.numel() == 0:
            return
        inner = p.numel() // p.shape[0]
        rows = max(1, CHUNK // inner)
        for r0 in range(0, p.shape[0], rows):
            pc, p0c = p[r0 : r0 + rows], p0[r0 : r0 + rows]
            yield pc, p0c, self._scores(pc, p0c, r0 * inner)

    def _scores(self, pc: torch.Tensor, p0c: torch.Tensor, start: int) -> torch.Tensor:
        if self.method == "random":
            u = scores.random_scores_range(self.seed, 0, 0, self.position, start, pc.shape, pc.device)
            return u.to(torch.float64)
        cdt = _compute_dtype(pc.dtype)
        return pc.to(cdt) - p0c.to(cdt)  # the signed delta: histograms read |delta|


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, float64 for float64: the type the library's math and scores run in."""
    return radix.KEY_FORMATS[dtype].threshold_dtype


def _scoring_backend(inner: Backend) -> Backend:
    """`inner` with a radix_histogram that takes _ScoreSources: each chunk's scores are computed,
    histogrammed by inner's kernel, and dropped before the next chunk. Scopes already DONE are not
    scored at all (the kernel would count nothing): exact selections of typical data end passes
    early, and here a pass costs the scores, not just a read. (Reading the state is a host sync,
    which drop_deltas, unlike step(), may afford.)"""

    def radix_histogram(sources, scope_of, state, hist, *, key_format, scoring=GRAD):  # noqa: ARG001
        # (scoring: the pass loop's default, |x|; the chunks below are the scores already)
        done = state[:, radix.DONE].tolist()
        for source, row in zip(sources, scope_of):
            if done[row]:
                continue
            for _, _, chunk_scores in source.chunks():
                inner.radix_histogram([chunk_scores], [row], state, hist, key_format=key_format)

    return Backend(
        name=inner.name, unavailable_reason=inner.unavailable_reason,
        radix_histogram=radix_histogram, masked_adamw=inner.masked_adamw,
    )


def drop_deltas(
    params,
    reference,
    drop_ratio: float,
    *,
    method: str = "magnitude",
    rescale: bool = False,
    scope: str = "global",
    seed: int = 0,
    backend: str = "auto",
) -> dict:
    """Reset all but the largest fine-tuning deltas to their pretrained values, in place.

    For each tensor p of `params` and its pretrained counterpart p0 in `reference` (same shape,
    dtype and device), delta = p - p0, computed in float32 (float64 for float64 tensors). Per
    scope ("global": all tensors together; "tensor": each on its own) of N entries,
    m = floor(drop_ratio * N) entries are dropped and k = N - m kept, drop_ratio read as the decimal
    Python prints (as mask_ratio, SEMANTICS.md section 1). Entries whose score is >= T, the exact
    k-th largest score of the scope, keep their value (ties at T are all kept); every other entry
    is set to p0 exactly. k = 0 (drop_ratio 1) keeps nothing.

    method="magnitude" (the GMT paper's One-off Drop): score |delta|; a NaN delta counts as the
    largest and is kept. method="random" (DARE): score u, the 32-bit random score of
    gmt_kernels.scores with selection number 0 and parameter identity (group 0, index of the
    tensor in `params`): the score SEMANTICS.md section 8 gives the entries of these tensors at
    a first selection when they are, in this order, the one param group of GMTAdamW.
    rescale=True (DARE's rescale): kept entries become p0 + delta / (1 - drop_ratio), computed in
    the delta's type (1 - drop_ratio rounded to it) and rounded to p's dtype.

    Returns {scope: {"threshold": float, "kept": int, "numel": int}} with scope "global", or the
    index of each tensor for scope="tensor". threshold is T: a |delta| for "magnitude", the
    integer-valued u for "random", +inf when k = 0. kept counts the entries kept (>= k with ties).

    Extra memory: chunks of at most CHUNK entries at a time (each pass recomputes them); the
    selection runs on `backend` ("auto", "reference", "cpu", "triton") as GMTAdamW's threshold
    does. Every argument is checked before anything changes: mismatched lengths, shapes, dtypes or
    devices raise ValueError naming the pair, and the tensors are left untouched.
    """
    params, reference = list(params), list(reference)
    backends = _validate(params, reference, drop_ratio, method, rescale, scope, seed, backend)
    sources = [_ScoreSource(p.detach(), p0.detach(), i, method, seed) for i, (p, p0) in enumerate(zip(params, reference))]
    groups = {"global": sources} if scope == "global" else {i: [s] for i, s in enumerate(sources)}

    with torch.no_grad():
        selected = _select(groups, drop_ratio, backends)
        stats = {}
        for name, members in groups.items():
            threshold, k, numel = selected[name]
            kept = sum(_apply(s, threshold, k, drop_ratio, rescale) for s in members)
            stats[name] = {"threshold": threshold, "kept": kept, "numel": numel}
    return stats


def _select(groups: dict, drop_ratio: float, backends: list) -> dict:
    """{scope name: (threshold, k, numel)}: one select_thresholds call per key format."""
    by_format: dict[radix.KeyFormat, list] = {}
    for name, members in groups.items():
        fmt = radix.key_format_for([s.score_dtype for s in members] or [torch.float32])
        by_format.setdefault(fmt, []).append((name, members))
    stats = {}
    for fmt, named in by_format.items():
        scopes = []
        for name, members in named:
            numel = sum(s.param.numel() for s in members)
            scopes.append(Scope(grads=members, k=radix.kept_count(numel, drop_ratio), slack=0, numel=numel))
        devices = [s.device for _, members in named for s in members]
        primary = devices[0] if devices else torch.device("cpu")
        selection = select_thresholds(scopes, fmt, lambda source: backends[source.position], primary)
        for (name, _), scope, threshold in zip(named, scopes, selection.thresholds.tolist()):
            stats[name] = (math.inf if scope.k == 0 else threshold, scope.k, scope.numel)
    return stats


def _apply(source: _ScoreSource, threshold: float, k: int, drop_ratio: float, rescale: bool) -> int:
    """Reset the entries of one tensor below the threshold to p0 (and rescale the kept ones);
    returns how many entries it kept."""
    kept = torch.zeros((), dtype=torch.int64, device=source.device)  # one host read per tensor
    for pc, p0c, chunk_scores in source.chunks():
        if k == 0:
            pc.copy_(p0c)
            continue
        if source.method == "random":
            keep = chunk_scores >= threshold
        else:  # in the selection's threshold dtype: float64 scopes hold float32 deltas exactly
            keep = (chunk_scores.abs().to(torch.float64) >= threshold) | chunk_scores.isnan()
        kept += keep.sum()
        if rescale:
            cdt = _compute_dtype(pc.dtype)
            delta = chunk_scores if source.method == "magnitude" else pc.to(cdt) - p0c.to(cdt)
            new = (p0c.to(cdt) + delta / torch.tensor(1.0 - drop_ratio, dtype=cdt)).to(pc.dtype)
        else:
            new = pc
        pc.copy_(torch.where(keep, new, p0c))
    return int(kept)


def _validate(params, reference, drop_ratio, method, rescale, scope, seed, backend) -> list:
    """Check every argument and resolve a backend per tensor; raises before anything changes."""
    if isinstance(drop_ratio, bool) or not isinstance(drop_ratio, numbers.Real) or not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(
            f"Invalid drop_ratio value: {drop_ratio!r}. drop_ratio is the fraction of delta entries reset "
            "to the reference, a number in [0, 1] (0 keeps every delta, 0.9 keeps the largest 10 %)."
        )
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}. Possible values: {', '.join(map(repr, METHODS))} "
                         "('magnitude': One-off Drop of the smallest |delta|; 'random': DARE).")
    if scope not in SCOPES:
        raise ValueError(f"Unknown scope {scope!r}. Possible values: {', '.join(map(repr, SCOPES))} "
                         "('global': one threshold over all tensors; 'tensor': one per tensor).")
    if not isinstance(rescale, bool):
        raise ValueError(f"rescale must be True or False; got {rescale!r}.")
    scores.random_key(seed, 0, 0, 0)  # seed: an int in [0, 2**64), else ValueError naming it
    check_backend_name(backend)
    if len(params) != len(reference):
        raise ValueError(
            f"drop_deltas needs one reference tensor per parameter; got {len(params)} params and "
            f"{len(reference)} reference tensors. Pass the pretrained tensors in the same order."
        )
    backends: list[Backend] = []  # per tensor: its histogram backend, fed with its scores
    for i, (p, p0) in enumerate(zip(params, reference)):
        pair = f"params[{i}] and reference[{i}]"
        for name, t in (("params", p), ("reference", p0)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"drop_deltas takes tensors; {name}[{i}] is a {type(t).__name__}.")
            if type(t).__name__ == "DTensor" or t.layout != torch.strided:
                raise ValueError(
                    f"drop_deltas works on plain dense tensors; {name}[{i}] is a {type(t).__name__} with "
                    f"layout {t.layout}. Gather sharded tensors (full_tensor()) or convert sparse ones first."
                )
        for what, a, b in (("shape", tuple(p.shape), tuple(p0.shape)), ("dtype", p.dtype, p0.dtype),
                           ("device", p.device, p0.device)):
            if a != b:
                raise ValueError(
                    f"drop_deltas: {pair} differ in {what}: {a} vs {b}. Each reference tensor must be "
                    "the pretrained counterpart of its parameter (same shape, dtype and device)."
                )
        if p.dtype not in radix.KEY_FORMATS:
            raise ValueError(
                f"drop_deltas: {pair} have dtype {p.dtype}; floating-point tensors only "
                f"({', '.join(str(d) for d in radix.KEY_FORMATS)})."
            )
        score_dtype = torch.float64 if method == "random" else _compute_dtype(p.dtype)
        backends.append(_scoring_backend(resolve(backend, p.device, score_dtype)))
    return backends
