"""The backend interface and registry: one place that says which backend serves which tensors.

A backend is two functions with fixed signatures (the way torch.optim.adamw dispatches to
_single_tensor_adamw / _multi_tensor_adamw / _fused_adamw):

radix_histogram(grads, scope_of, state, hist, *, key_format, scoring=options.GRAD) -> None
    grads: tensors on one device (any float dtypes). scope_of: list[int], the scope row of each.
    state: int64 [S, radix.STATE_COLUMNS], hist: int64 [S, radix.HIST_COLUMNS], on that device.
    key_format: radix.KeyFormat (radix.key_format_for(dtypes, criterion)). scoring:
    options.Scoring, how entries are scored (SEMANTICS.md section 8; weights: theta per gradient
    for "grad_over_weight"; random_keys and entry_offsets per gradient for "random").
    With (LO, LAST, SHIFT, SAMPLE, DONE) = state[s, :5], for every entry of grads[i] with scope
    s = scope_of[i], DONE == 0, whose block is sampled (radix.sampled_blocks(j // SAMPLE_BLOCK, i,
    SAMPLE), j = the entry's index in memory order, `memory_order_view`; row-major order for
    "random", and for "grad_over_weight" when grad and theta are laid out differently), and
    key = radix.score_keys (the one definition of every criterion's score and key):
        hist[s, (key - LO) >> SHIFT] += 1     if LO <= key <= LAST
        hist[s, radix.ABOVE] += 1             if key > LAST
        hist[s, radix.NONFINITE] += 1         if key >= key_format.inf_key   (never for "u32")
    It must not copy the gradients (extra memory O(bins)) nor synchronise with the host.

masked_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, kept, *, options, mask)
    -> None
    One param group's tensors on one device with one dtype. steps: 0-d float32 tensors, already
    incremented for this step. kept: int64 [n], += number of kept entries (0 if options.skip).
    thresholds and kept may be strided views, stride 0 included (the frontend passes its scopes'
    own rows: tensors that share a scope share one threshold and one counter, and their counts add
    up in it); `contiguous_slots` adapts them for kernels that index both contiguously.
    options: options.AdamWOptions: lr (float or 0-d tensor), beta1, beta2, eps, weight_decay,
    amsgrad, maximize, mask_mode, grad_scale (0-d tensor or None: g is divided by it), skip (0-d
    bool tensor or None: when true, nothing at all changes, stored masks included). The update is
    SEMANTICS.md section 3 with math in float32 (float64 for float64 params).
    mask: options.MaskSource. thresholds: [n] tensor (float32; float64 for the f64 and u32 key
    formats): entry j of tensor i is kept iff its score (radix.entry_scores with mask.scoring, theta
    = params[i] before the update) is >= thresholds[i] or is NaN. For "grad" the comparison is on
    the raw gradient: with grad_scale a power of two, as GradScaler's always is, this is the same
    as scoring g / grad_scale. masks: () or one stored mask per tensor (uint8, layout in
    gmt_kernels/masks.py). refresh (0-d bool or None): None or true keeps by the score rule and
    writes every entry's keep bit into the masks (if given, and not skip); false keeps the entries
    whose stored bit is set (the scores need not be computed). update_params=False
    (select_mask): only masks and kept change.
    Tensors for "random" and stored masks are contiguous (entries are indexed row-major).

Backends register themselves with `register`; `resolve` picks one per (device, dtype).
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .. import options  # noqa: F401  (the records of the interface above)

BACKEND_NAMES = ("auto", "reference", "triton", "cpu")


@dataclass(frozen=True)
class Backend:
    name: str
    # None if this backend can serve tensors of (device, dtype), else a sentence saying why not.
    unavailable_reason: Callable[[torch.device, torch.dtype], Optional[str]]
    radix_histogram: Callable[..., None]
    masked_adamw: Callable[..., None]
    # Device types for which "auto" picks this backend. The Triton interpreter can serve CPU tensors,
    # but only for testing: "auto" takes triton for CUDA tensors and the C++ kernels for CPU ones.
    auto_devices: tuple[str, ...] = ()
    # Facts about how this backend runs here (the cpu backend: its CPU capability level), for
    # backend_info().
    info: Optional[Callable[[], dict]] = None
    # SEMANTICS.md section 8 as far as this backend's kernels implement it: the criteria they score
    # (options.CRITERIA) and whether they read and write stored masks (options.MaskSource.masks).
    criteria: tuple[str, ...] = ("grad",)
    stored_masks: bool = False

    def lacks(self, criterion: str, stored_masks: bool) -> Optional[str]:
        """None if this backend implements `criterion` (and stored masks, if asked), else what it lacks."""
        if criterion not in self.criteria:
            return f"criterion {criterion!r}"
        if stored_masks and not self.stored_masks:
            return "stored masks (refresh_every other than 1, select_mask)"
        return None


_REGISTRY: dict[str, Backend] = {}
_LOADERS: dict[str, Callable[[], None]] = {}
# A loader that failed, with why: importing it again would fail again (and a failed import costs
# milliseconds, more without bytecode caching), so the reason is remembered per loader.
_FAILURES: dict[str, tuple[Callable[[], None], str]] = {}
_warned_fallbacks: set[tuple[str, str]] = set()


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def register_loader(name: str, loader: Callable[[], None]) -> None:
    """A backend whose import is costly or may fail registers a loader, run on first use."""
    _LOADERS[name] = loader


def _load(name: str) -> Optional[str]:
    """Import backend `name` if needed; None on success, else why it could not be loaded."""
    if name in _REGISTRY:
        return None
    loader = _LOADERS.get(name)
    if loader is None:
        return f"backend {name!r} is not part of this build of gmt_kernels"
    failed = _FAILURES.get(name)
    if failed is not None and failed[0] is loader:
        return failed[1]
    try:
        loader()
    except Exception as exc:  # the reason is reported to the user, never swallowed
        reason = f"backend {name!r} failed to load: {type(exc).__name__}: {exc}"
    else:
        if name in _REGISTRY:
            return None
        reason = f"backend {name!r} did not register itself"
    _FAILURES[name] = (loader, reason)
    return reason


def check_backend_name(name: str) -> None:
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"Unknown backend {name!r}. Possible values: {', '.join(map(repr, BACKEND_NAMES))}. "
            "Use 'auto' to let gmt_kernels pick the fastest one installed for each device."
        )


def resolve(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that serves tensors of (device, dtype) when the user asked for `name`.

    A named backend is used or refused with a RuntimeError that says why and what to do; "auto"
    tries the fast backends and falls back to the reference, warning once per reason.
    """
    check_backend_name(name)
    if name != "auto":
        reason = _load(name) or _REGISTRY[name].unavailable_reason(device, dtype)
        if reason is not None:
            raise RuntimeError(
                f"gmt_kernels backend {name!r} cannot serve {dtype} tensors on {device}: {reason}. "
                f"Use backend='auto' (picks per device: {describe_auto(device, dtype)}) or "
                "backend='reference' (pure PyTorch, any device)."
            )
        return _REGISTRY[name]
    fast, reasons = _fastest_available(device, dtype)
    if fast is not None:
        return fast
    _load("reference")
    reason = _REGISTRY["reference"].unavailable_reason(device, dtype)
    if reason is not None:
        raise RuntimeError(
            f"gmt_kernels has no backend for {dtype} tensors on {device}: {'; '.join(reasons)}; and the "
            f"reference backend: {reason}."
        )
    key = (f"{device.type}/{dtype}", "; ".join(reasons))
    if key not in _warned_fallbacks:
        _warned_fallbacks.add(key)
        warnings.warn(
            f"gmt_kernels: no fast backend for {dtype} tensors on {device.type} "
            f"({'; '.join(reasons)}); using the pure-PyTorch reference backend, which is correct "
            "but slower.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _REGISTRY["reference"]


def _fastest_available(device: torch.device, dtype: torch.dtype) -> tuple[Optional[Backend], list[str]]:
    """The fast backend "auto" takes for (device, dtype), or None and why each one cannot serve."""
    reasons, loaded = [], []
    for name in _LOADERS:
        if name != "reference":
            failure = _load(name)
            if failure is None:
                loaded.append(_REGISTRY[name])
            else:
                reasons.append(failure)
    for backend in loaded:
        if device.type not in backend.auto_devices:
            reasons.append(f"backend {backend.name!r} is not used for {device.type} tensors by 'auto'")
            continue
        reason = backend.unavailable_reason(device, dtype)
        if reason is None:
            return backend, reasons
        reasons.append(f"backend {backend.name!r}: {reason}")
    return None, reasons


def describe_auto(device: torch.device, dtype: torch.dtype) -> str:
    fast, _ = _fastest_available(device, dtype)
    return "reference" if fast is None else fast.name


def available_backends() -> dict[str, Optional[str]]:
    """Every backend name with None if it loaded, else the reason it did not."""
    return {name: _load(name) for name in BACKEND_NAMES[1:]}


def backend_info() -> dict[str, dict]:
    """available_backends() with details: for each backend, {"available": bool, "reason": why not or
    None}, plus what a loaded backend reports about itself (cpu: "cpu_capability",
    "supported_capabilities", "kernel_capabilities")."""
    out = {}
    for name, reason in available_backends().items():
        entry = {"available": reason is None, "reason": reason}
        backend = _REGISTRY.get(name)
        if reason is None and backend is not None and backend.info is not None:
            entry.update(backend.info())
        out[name] = entry
    return out


def _import_backend_module(module: str) -> Callable[[], None]:
    def load() -> None:
        importlib.import_module(f"{__name__}.{module}")  # the module registers itself

    return load


register_loader("reference", _import_backend_module("reference"))
register_loader("triton", _import_backend_module("triton"))  # gmt_kernels/backends/triton/
register_loader("cpu", _import_backend_module("cpu"))  # wraps the C++ extension gmt_kernels._C


def memory_order_view(t: torch.Tensor) -> Optional[torch.Tensor]:
    """A 1-D view of t's entries in memory order if they fill a dense block (any dense layout, e.g.
    a transpose or channels_last), else None. Histograms read gradients in this order (a sample
    picks blocks of it); a strided view with holes is read through a contiguous copy."""
    if t.is_contiguous():
        return t.reshape(-1)
    if _dense_in_some_order(t):
        return t.as_strided((t.numel(),), (1,))
    return None


def _dense_in_some_order(t: torch.Tensor) -> bool:
    """The strides, smallest first, are 1, size, size*size', ...: every entry once, no holes."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def contiguous_slots(thresholds: torch.Tensor, kept: torch.Tensor) -> tuple:
    """(thresholds, kept, finish) for a masked_adamw kernel that indexes both [n] contiguously:
    contiguous copies of strided ones (a read-only copy of thresholds; kept counted from zero),
    and finish(), to call after the kernel, adds the counts back into the caller's kept (stride 0:
    all of them into its one counter). finish is None where nothing had to change."""
    if thresholds.is_contiguous() and kept.is_contiguous():
        return thresholds, kept, None
    counts = torch.zeros(kept.shape, dtype=kept.dtype, device=kept.device)

    def finish() -> None:
        if kept.numel() and kept.stride(0) == 0:
            kept[:1].add_(counts.sum(0, keepdim=True))
        else:
            kept.add_(counts)

    return thresholds.contiguous(), counts, finish


_vouching: list = [None]  # storage_vouched's tokens, innermost last


class VouchedList(list):
    """A list of tensors with `call`, a hashable name that a storage_vouched caller gives the call
    it passes the list to (see storage_vouched)."""

    __slots__ = ("call",)

    def __init__(self, items=(), call=None):
        super().__init__(items)
        self.call = call


@contextlib.contextmanager
def storage_vouched(token: object) -> Iterator[None]:
    """While active, the caller vouches that every tensor it passes to radix_histogram and
    masked_adamw (grads, params, Scoring.weights, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
    masks) has the storage it had the last time it was passed under the same token, and that all
    but the weights (which may be fresh views each step) stay alive while the token is used, so
    that a tensor with the id of one passed earlier under the token is that tensor (GMTAdamW: its
    cached layout's key checks their ids and data_ptrs once per step, and a layout whose tensors
    die is not used again). A backend that caches per-tensor launch plans may then skip their
    data_ptr checks, and keep the plans of calls without weights in `token.plans`, a dict that
    lives and dies with the token. A call whose leading list (radix_histogram's grads,
    masked_adamw's params) is a VouchedList passes, in every list, the same tensors as every other
    call under the token whose leading list has the same `call`: its plan may be found by that.
    Gradients are the exception: they may be new objects at each use of the token, and where
    their storage differs from the last use, the caller empties `token.plans` first (a new dict),
    which ends every vouch made before it, plans kept elsewhere included. If only their
    addresses changed (same strides, so the same layout), it moves the old plans to
    `token.moved_plans`, from which a backend may take a named call's plan and repoint it to the
    new addresses."""
    _vouching.append(token)
    try:
        yield
    finally:
        _vouching.pop()


def vouched_token() -> object:
    """The token of the innermost storage_vouched, or None."""
    return _vouching[-1]
