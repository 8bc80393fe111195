"""Every benchmark case, defined once: bench/run.py and the pytest-benchmark suites run these lists.

Two questions, two suites:
- "threshold": what selecting the GMT threshold over N entries (spread over several tensors) costs,
  with the torch ops users reach for and with gmt_kernels.magnitude_threshold per backend.
- "step" / "step_sweep": what a GMTAdamW step costs next to the torch.optim.AdamW step users run
  today, as a ratio to AdamW(fused=True) measured interleaved in one process.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional

import torch

from gmt_kernels import GMTAdamW, available_backends, magnitude_threshold
from gmt_kernels.backends import resolve
from gmt_kernels.radix import kept_count

MASK_RATIO = 0.3  # the paper's working point (GMT paper, Appendix B) and GMTAdamW's default
ADAMW_HYPERPARAMETERS = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
BASELINE_STEP = "AdamW fused"
BASELINE_THRESHOLD = "torch.kthvalue"  # what public GMT code runs over the concatenated |g|


@dataclass(frozen=True)
class Size:
    """How much of each suite a run measures."""

    name: str
    threshold_ns: tuple  # N of the threshold suite, on CPU
    threshold_ns_cuda: tuple
    min_repeats: int  # timed calls per threshold case, at least...
    repeat_budget_s: float  # ...and more while the case has used less than this (small N: many)
    step_tensor_numel: int  # the main step case: `step_tensors` tensors of this many entries
    step_sweep_tensor_numels: tuple
    # The reference backend is pure PyTorch (about 50x an AdamW fused step on CPU): step cases
    # with more entries per tensor than this run it at this size instead (None: no cap)...
    reference_step_cap: Optional[int]
    reference_threshold_cap: Optional[int]  # ...and threshold cases above this N leave it out
    steps: int = 7  # timed steps per optimizer (the median is quoted)
    warmup_steps: int = 1
    threshold_tensors: int = 8
    step_tensors: int = 8


def _pow2s(first: int, last: int, every: int = 1) -> tuple:
    return tuple(1 << e for e in range(first, last + 1, every))


SIZES = {
    # A smoke run of every code path (pytest bench/ --bench-size tiny).
    "tiny": Size(
        "tiny", threshold_ns=(1 << 16, 1 << 20, 1 << 25), threshold_ns_cuda=(1 << 16, 1 << 20, 1 << 25),
        min_repeats=2, repeat_budget_s=0.05, step_tensor_numel=1 << 16, step_sweep_tensor_numels=(1 << 13,),
        reference_step_cap=1 << 16, reference_threshold_cap=1 << 20, steps=3,
    ),
    # What README's main command runs: under 3 minutes on a 2-core CPU.
    "quick": Size(
        "quick", threshold_ns=_pow2s(16, 24, 2) + (1 << 26,), threshold_ns_cuda=_pow2s(16, 28, 2),
        min_repeats=3, repeat_budget_s=0.3, step_tensor_numel=1 << 22,
        step_sweep_tensor_numels=(1 << 14, 1 << 17, 1 << 20),
        reference_step_cap=1 << 20, reference_threshold_cap=1 << 22,
    ),
    "full": Size(
        "full", threshold_ns=_pow2s(16, 26), threshold_ns_cuda=_pow2s(16, 29),
        min_repeats=5, repeat_budget_s=1.0, step_tensor_numel=1 << 22,
        step_sweep_tensor_numels=_pow2s(13, 22), reference_step_cap=None, reference_threshold_cap=None, steps=9,
    ),
}


# ---- backends ---------------------------------------------------------------------------------


def backend_report(device: str, dtype: torch.dtype = torch.float32) -> dict[str, Optional[str]]:
    """Every gmt_kernels backend: None if bench times it on `device`, else the reason it does not."""
    report = {}
    for name, load_failure in available_backends().items():
        if load_failure is not None:
            report[name] = load_failure
        elif name == "triton" and (device != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
            report[name] = (
                "bench times compiled Triton kernels only (CUDA, TRITON_INTERPRET unset); "
                "the Triton interpreter is a correctness tool, far too slow to time"
            )
        else:
            try:
                resolve(name, torch.device(device), dtype)
                report[name] = None
            except RuntimeError as exc:
                report[name] = str(exc)
    return report


def usable_backends(device: str) -> list[str]:
    return [name for name, reason in backend_report(device).items() if reason is None]


# ---- data -------------------------------------------------------------------------------------


def split_sizes(n: int, tensors: int) -> list[int]:
    base = n // tensors
    return [base + (1 if i < n % tensors else 0) for i in range(tensors)]


@lru_cache(maxsize=1)  # cases are ordered by N, so consecutive cases share their gradients
def gradients(n: int, tensors: int, device: str, dtype: str, seed: int = 0, sizes: Optional[tuple] = None) -> tuple:
    """Gaussian gradients whose scale differs per tensor over three decades, as layers' do; n entries
    split evenly over `tensors`, or tensors of the given `sizes`."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, numel in enumerate(sizes or split_sizes(n, tensors)):
        scale = 10.0 ** (-3.0 * i / max(tensors - 1, 1))
        out.append((torch.randn(numel, generator=gen) * scale).to(device=device, dtype=getattr(torch, dtype)))
    return tuple(out)


def kept_entries(grads, threshold: torch.Tensor) -> int:
    return int(sum(int((g.abs() >= threshold).sum()) for g in grads))


# ---- threshold suite --------------------------------------------------------------------------


def _concatenated_scores(grads) -> torch.Tensor:
    return torch.cat([g.abs().flatten() for g in grads])


def _topk(grads, k, backend):
    return torch.topk(_concatenated_scores(grads), k, sorted=False).values.min()


def _kthvalue(grads, k, backend):
    scores = _concatenated_scores(grads)
    return torch.kthvalue(scores, scores.numel() - k + 1).values


def _quantile(grads, k, backend):
    scores = _concatenated_scores(grads)
    n = scores.numel()
    # Position n-k (0-based, ascending) is the k-th largest; "nearest" keeps float error in q harmless.
    return torch.quantile(scores, (n - k) / (n - 1), interpolation="nearest")


QUANTILE_LIMIT = 1 << 24  # torch.quantile refuses inputs with more entries
SAMPLE_FRACTION = 0.01


def _sampled(grads, k, backend):
    """DGC (Lin et al. 2018): the threshold of a 1 % random sample, drawn from each tensor."""
    n = sum(g.numel() for g in grads)
    picks = []
    for g in grads:
        idx = torch.randint(g.numel(), (max(1, math.ceil(SAMPLE_FRACTION * g.numel())),), device=g.device)
        picks.append(g.flatten()[idx].abs())
    sample = torch.cat(picks)
    m = sample.numel()
    k_sample = min(m, max(1, round(k * m / n)))
    return torch.kthvalue(sample, m - k_sample + 1).values


def _gmt_exact(grads, k, backend):
    return magnitude_threshold(grads, MASK_RATIO, exact=True, backend=backend)


def _gmt_approx(grads, k, backend):
    return magnitude_threshold(grads, MASK_RATIO, exact=False, backend=backend)


# name -> (function(grads, k, backend) -> 0-d threshold, uses a gmt_kernels backend)
THRESHOLD_METHODS: dict[str, tuple[Callable, bool]] = {
    "torch.topk": (_topk, False),
    "torch.kthvalue": (_kthvalue, False),
    "torch.quantile": (_quantile, False),
    "sampled 1% + kthvalue": (_sampled, False),
    "magnitude_threshold exact": (_gmt_exact, True),
    "magnitude_threshold approx": (_gmt_approx, True),
}


@dataclass(frozen=True)
class ThresholdCase:
    method: str
    n: int
    tensors: int
    device: str
    backend: Optional[str] = None
    dtype: str = "float32"
    mask_ratio: float = MASK_RATIO

    @property
    def k(self) -> int:
        return kept_count(self.n, self.mask_ratio)

    @property
    def label(self) -> str:
        return self.method if self.backend is None else f"{self.method} [{self.backend}]"

    @property
    def expected_refusal(self) -> Optional[str]:
        """The error torch raises by design for this case (recorded as the result), or None."""
        if self.method == "torch.quantile" and self.n > QUANTILE_LIMIT:
            return "quantile() input tensor is too large"
        return None

    @property
    def id(self) -> str:
        return f"{self.label}-N_pow2_{math.log2(self.n):g}".replace(" ", "_")

    def grads(self) -> tuple:
        return gradients(self.n, self.tensors, self.device, self.dtype)

    def run(self, grads) -> torch.Tensor:
        fn, _ = THRESHOLD_METHODS[self.method]
        return fn(grads, self.k, self.backend)


def threshold_cases(size: Size, device: str) -> list[ThresholdCase]:
    backends = usable_backends(device)
    ns = size.threshold_ns_cuda if device == "cuda" else size.threshold_ns
    cases = []
    cap = size.reference_threshold_cap
    for n in ns:
        for method, (_, per_backend) in THRESHOLD_METHODS.items():
            for backend in backends if per_backend else [None]:
                if backend != "reference" or cap is None or n <= cap:
                    cases.append(ThresholdCase(method, n, size.threshold_tensors, device, backend))
    return cases


# ---- step suite -------------------------------------------------------------------------------


class NaiveGMT:
    """The GMT step users write themselves: cat every |g|, kthvalue, mask the grads, stock AdamW."""

    def __init__(self, params, mask_ratio: float, **adamw):
        self.params = list(params)
        self.mask_ratio = mask_ratio
        self.inner = torch.optim.AdamW(self.params, fused=True, **adamw)

    @torch.no_grad()
    def step(self):
        grads = [p.grad for p in self.params]
        threshold = _kthvalue(grads, kept_count(sum(g.numel() for g in grads), self.mask_ratio), None)
        for g in grads:
            g.mul_(g.abs() >= threshold)
        self.inner.step()


@dataclass(frozen=True)
class StepCase:
    suite: str  # "step" (the main case) or "step_sweep"
    method: str  # "AdamW fused", "AdamW foreach", "naive GMT", "GMTAdamW"
    tensor_numel: int
    tensors: int
    device: str
    backend: Optional[str] = None
    threshold: Optional[str] = None
    scope: Optional[str] = None
    dtype: str = "float32"
    mask_ratio: float = MASK_RATIO
    note: str = ""
    sizes: Optional[tuple] = None  # tensors of these sizes instead of `tensors` x `tensor_numel`
    baseline_method: str = BASELINE_STEP  # what the ratio is taken to, timed interleaved

    @property
    def n(self) -> int:
        return sum(self.sizes) if self.sizes else self.tensor_numel * self.tensors

    @property
    def label(self) -> str:
        if self.method != "GMTAdamW":
            return self.method
        return f"GMTAdamW {self.threshold}/{self.scope} [{self.backend}]"

    @property
    def id(self) -> str:
        return f"{self.suite}-{self.label}-N_pow2_{math.log2(self.n):g}".replace(" ", "_")

    def baseline(self) -> "StepCase":
        return StepCase(self.suite, self.baseline_method, self.tensor_numel, self.tensors, self.device,
                        dtype=self.dtype, sizes=self.sizes, baseline_method=self.baseline_method)

    def build(self) -> "StepRunner":
        return StepRunner(self)


@dataclass
class StepRunner:
    """One optimizer on its own parameters and gradients (the same values for every case)."""

    case: StepCase
    params: list = field(init=False)
    optimizer: object = field(init=False)
    _fresh_grads: Optional[list] = field(init=False, default=None)

    def __post_init__(self):
        c = self.case
        grads = gradients(c.n, c.tensors, c.device, c.dtype, sizes=c.sizes)
        self.params = []
        for g in grads:
            p = torch.nn.Parameter(torch.randn_like(g))
            p.grad = g.clone()
            self.params.append(p)
        if c.method == "AdamW fused":
            self.optimizer = torch.optim.AdamW(self.params, fused=True, **ADAMW_HYPERPARAMETERS)
        elif c.method == "AdamW foreach":
            self.optimizer = torch.optim.AdamW(self.params, foreach=True, **ADAMW_HYPERPARAMETERS)
        elif c.method == "naive GMT":
            self.optimizer = NaiveGMT(self.params, c.mask_ratio, **ADAMW_HYPERPARAMETERS)
            self._fresh_grads = [p.grad.clone() for p in self.params]  # its step masks them in place
        elif c.method == "GMTAdamW":
            self.optimizer = GMTAdamW(
                self.params, mask_ratio=c.mask_ratio, threshold=c.threshold, scope=c.scope,
                backend=c.backend, **ADAMW_HYPERPARAMETERS,
            )
        else:
            raise ValueError(f"Unknown step method {c.method!r}; known: {', '.join(STEP_METHODS)}.")

    def prepare(self) -> None:
        """Untimed, before every step: a training step would see fresh gradients from backward."""
        if self._fresh_grads is not None:
            for p, g in zip(self.params, self._fresh_grads):
                p.grad.copy_(g)

    def step(self) -> None:
        self.optimizer.step()

    def count_error(self) -> Optional[float]:
        """|kept - k| / N of the last step (scopes summed), against the exact count k."""
        if not isinstance(self.optimizer, GMTAdamW):
            return None
        stats = self.optimizer.mask_stats().values()
        kept = sum(s["kept"] for s in stats)
        k = sum(kept_count(s["numel"], self.case.mask_ratio) for s in stats)
        return abs(kept - k) / self.case.n


STEP_METHODS = ("AdamW fused", "AdamW foreach", "naive GMT", "GMTAdamW")
GMT_VARIANTS = [(t, s) for t in ("approx", "exact") for s in ("global", "tensor")]


def _capped(size: Size, backend: Optional[str], tensor_numel: int) -> tuple[int, str]:
    cap = size.reference_step_cap
    if backend == "reference" and cap is not None and tensor_numel > cap:
        return cap, f"reference capped at {size.step_tensors}x2^{math.log2(cap):g} in --{size.name}"
    return tensor_numel, ""


# Python overhead per step: a model of many small tensors (200 of 4K-16K entries), where a step is
# mostly the host issuing work. Timed next to AdamW(foreach=True), the usual optimizer there.
MANY_SMALL_SIZES = tuple(round(4096 * 4 ** (i / 199)) for i in range(200))
MANY_SMALL_BASELINE = "AdamW foreach"


def many_small_cases(device: str) -> list[StepCase]:
    backends = [b for b in usable_backends(device) if b != "reference"]  # the oracle: no overhead target
    common = dict(tensor_numel=0, tensors=len(MANY_SMALL_SIZES), device=device, sizes=MANY_SMALL_SIZES,
                  baseline_method=MANY_SMALL_BASELINE)
    cases = [StepCase("many_small", BASELINE_STEP, **common)]
    for backend in backends:
        for threshold in ("approx", "exact"):
            cases.append(StepCase("many_small", "GMTAdamW", backend=backend, threshold=threshold, scope="global",
                                  **common))
    return cases


def step_cases(size: Size, device: str) -> list[StepCase]:
    """Every candidate step; each is timed interleaved with its own AdamW fused baseline."""
    backends = usable_backends(device)
    tensors, numel = size.step_tensors, size.step_tensor_numel
    cases = [
        StepCase("step", "AdamW foreach", numel, tensors, device),
        StepCase("step", "naive GMT", numel, tensors, device),
    ]
    for backend in backends:
        for threshold, scope in GMT_VARIANTS:
            capped, note = _capped(size, backend, numel)
            cases.append(StepCase("step", "GMTAdamW", capped, tensors, device, backend, threshold, scope, note=note))
    for sweep_numel in size.step_sweep_tensor_numels:
        cases.append(StepCase("step_sweep", "AdamW foreach", sweep_numel, tensors, device))
        cases.append(StepCase("step_sweep", "naive GMT", sweep_numel, tensors, device))
        for backend in backends:
            capped, _ = _capped(size, backend, sweep_numel)
            if capped == sweep_numel:
                cases.append(StepCase("step_sweep", "GMTAdamW", sweep_numel, tensors, device, backend, "approx", "global"))
    return cases + many_small_cases(device)
