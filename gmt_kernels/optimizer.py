"""GMTAdamW: torch.optim.AdamW that updates, at every step, only the entries with the largest |grad|."""

from __future__ import annotations

import functools
import itertools
import math
import operator
import sys
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from . import radix
from .backends import Backend, VouchedList, check_backend_name, resolve, storage_vouched
from .device_constants import DeviceConstants
from . import masks as stored_masks
from .options import CRITERIA, GRAD, AdamWOptions, MaskSource, Scoring
from .scores import random_keys_like
from .threshold import Scope, Selection, select_thresholds, work_lists

SCOPES = ("global", "group", "tensor")
MASK_MODES = ("grad", "freeze")
THRESHOLDS = ("approx", "exact")
NONFINITE = ("skip", "raise", "propagate")


def _check_choice(kind: str, value, choices, hint: str) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {kind} {value!r}. Possible values: {', '.join(map(repr, choices))}. {hint}")


def _check_adamw_hyperparameters(lr, betas, eps, weight_decay) -> None:
    """The checks of torch.optim.AdamW, with its messages."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not (
        (isinstance(betas[0], float) and isinstance(betas[1], float))
        or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))
    ):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element")


@dataclass
class _ScopeRecord:
    """Where one scope's numbers live after a step: row `row` of selection `key` (_SelectionKey)."""

    name: str
    key: tuple
    row: int
    numel: int


# Scopes of one step are selected in calls per (key format, kind): kind "grad" (criterion "grad"
# re-selected at every step: score scopes and NaN/inf check scopes together, as always), "score"
# (the criterion's scopes, finished before the first pass on a step that reuses stored masks),
# "check" (k = 0 scopes that only count the NaN/inf gradient entries).
_KINDS_WITH_NONFINITE = ("grad", "check")


@dataclass
class _Batch:
    """One group's tensors on one device with one dtype: a single backend call."""

    group: dict
    group_index: int
    backend: Backend
    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    positions: list = field(default_factory=list)  # index of each parameter in its group
    states: list = field(default_factory=list)  # their state dicts, once _init_state has run
    scope_rows: list = field(default_factory=list)  # (index, selection key, row) per masked tensor
    ids: list = field(default_factory=list)  # per masked tensor, its index in the step's scoring arrays
    contributions: list = field(default_factory=list)  # distributed.Contribution per tensor (sharded runs)
    uncounted: list = field(default_factory=list)  # tensors whose kept count another rank reports
    slots: Optional[tuple] = None  # (selection key, scope row per tensor, _row_views) once _update ran
    state_lists: Optional[tuple] = None  # _state_lists, kept while a _Layout holds the batch


class GMTAdamW(torch.optim.Optimizer):
    """AdamW that updates only the entries whose |grad| is in the top (1 - mask_ratio) fraction.

    Drop-in for torch.optim.AdamW: same arguments, same state layout, state_dicts load both ways
    (GMT's own counters travel in every param group under "gmt", where torch.distributed.checkpoint
    keeps them too). `foreach` and `fused` are accepted and change nothing (the update is always one
    fused pass); `capturable=True` and `differentiable=True` are refused. GMT arguments:

    mask_ratio: fraction of entries masked (not updated) per step, in [0, 1]; per param group.
    scope: "global" (one threshold over all masked groups), "group" or "tensor".
    mask_mode: "grad" (zero the masked gradient entries, then AdamW) or "freeze" (masked entries
        keep parameter and moments unchanged).
    threshold: "approx" (within 0.05 % of N in rank, fewer passes; SEMANTICS.md allows 0.5 %) or "exact".
    nonfinite: "skip" (a NaN/inf gradient makes the step a no-op, counted in skipped_steps),
        "raise" (FloatingPointError naming the parameter), "propagate" (as torch.optim.AdamW).
    backend: "auto", "reference", "triton" or "cpu".
    criterion: the score that picks the kept entries (SEMANTICS.md section 8): "grad" (|g|, GMT),
        "grad_over_weight" (|g| / (|theta| + score_eps), GaLLoP) or "random" (a 32-bit hash of
        (seed, selection number, parameter, entry): the GMT paper's Random Mask).
    refresh_every: 1 (select at every step), K > 1 (select at every K-th step that is not
        skipped, reuse the stored 1-bit mask in between) or None (select once, then keep the mask).
    seed: the random criterion's seed, an integer in [0, 2**64).
    score_eps: the grad_over_weight score's eps, a finite number >= 0.
    See SEMANTICS.md for the exact contract.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        mask_ratio: float = 0.3,
        scope: str = "global",
        mask_mode: str = "grad",
        threshold: str = "approx",
        nonfinite: str = "skip",
        backend: str = "auto",
        criterion: str = "grad",
        refresh_every: Optional[int] = 1,
        seed: int = 0,
        score_eps: float = 1e-8,
        process_group=None,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        if capturable:
            raise ValueError(
                "GMTAdamW(capturable=True) is not supported: GMTAdamW keeps its step counts on the "
                "parameters' device already and its step needs no host synchronisation; leave "
                "capturable unset (for CUDA graphs, capture opt.step() after a warm-up step)."
            )
        if differentiable:
            raise ValueError(
                "GMTAdamW(differentiable=True) is not supported: a step selects a mask, which has no "
                "gradient. Use torch.optim.AdamW(differentiable=True) to differentiate through an update."
            )
        _check_adamw_hyperparameters(lr, betas, eps, weight_decay)
        radix.check_mask_ratio(mask_ratio)
        _check_choice("scope", scope, SCOPES, "It says which entries share one threshold.")
        _check_choice("mask_mode", mask_mode, MASK_MODES, "See SEMANTICS.md section 3.")
        _check_choice("threshold", threshold, THRESHOLDS, "'exact' is the k-th largest score; 'approx' is within 0.05 % of N in rank.")
        _check_choice("nonfinite", nonfinite, NONFINITE, "It says what a NaN or inf gradient does to the step.")
        check_backend_name(backend)
        _check_choice("criterion", criterion, CRITERIA, "It says how entries are scored (SEMANTICS.md section 8).")
        _check_refresh_every(refresh_every)
        _check_seed(seed)
        _check_score_eps(score_eps)
        self.criterion, self.refresh_every, self.seed, self.score_eps = criterion, refresh_every, seed, float(score_eps)
        self.process_group = process_group
        self.scope, self.mask_mode, self.threshold = scope, mask_mode, threshold
        self.nonfinite, self.backend = nonfinite, backend
        defaults = dict(
            # torch.optim.AdamW's own group keys first (foreach and fused are kept but change nothing:
            # GMT's update is always one fused pass), so that either optimizer loads the other's
            # groups, torch.distributed.checkpoint's strict loading included.
            _torch_adamw_defaults(), foreach=foreach, fused=fused,
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, mask_ratio=mask_ratio,
        )
        # GMT's own state, shared by every param group (see state_dict): skip counter, last stats,
        # the mask schedule (selections made, non-skipped steps since the last one).
        self._gmt = _new_gmt_state()
        super().__init__(params, defaults)
        self._sharding = _infer_sharding(self.param_groups, process_group)
        self._follow_parameters()

    @property
    def skipped_steps(self) -> Tensor:
        """Steps skipped for NaN/inf gradients or GradScaler overflow: a 0-d int64 tensor on the
        device of the first parameter."""
        return self._gmt["skipped_steps"]

    @skipped_steps.setter
    def skipped_steps(self, value: Tensor) -> None:
        self._gmt["skipped_steps"] = value

    @property
    def _last_stats(self) -> dict:
        return self._gmt["last_stats"]

    def _follow_parameters(self) -> torch.device:
        """The primary device (the first parameter's: thresholds and counters live there), as the
        parameters are now: they may have moved since construction (model.to("cuda"), deferred
        initialisation from the meta device). Moves skipped_steps along."""
        first = next((p for g in self.param_groups for p in g["params"]), None)
        primary = first.device if first is not None and first.device.type != "meta" else torch.device("cpu")
        for name in _GMT_COUNTERS:
            if self._gmt[name].device != primary:
                self._gmt[name] = self._gmt[name].to(primary)
        self._primary = primary
        return primary

    # ---- param groups ------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        params = param_group.get("params")
        if isinstance(params, Tensor):
            param_group["params"] = [params]
        elif params is not None and not isinstance(params, set):  # a set: torch's own error
            param_group["params"] = list(params)
            _check_no_repeats(param_group["params"], len(self.param_groups))
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k not in ("params", "gmt")}}
        _check_adamw_hyperparameters(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
        radix.check_mask_ratio(merged["mask_ratio"])
        if self.scope == "global":
            _check_global_mask_ratio([*self.param_groups, merged])
        for p in param_group["params"] if isinstance(param_group.get("params"), list) else []:
            if isinstance(p, Tensor) and p.device.type != "meta":  # meta: deferred init, checked at step
                # a named backend that cannot serve (or lacks the criterion or stored masks) fails now
                self._criteria_backend(resolve(self.backend, p.device, p.dtype), p.device, p.dtype)
        super().add_param_group(param_group)
        self.__dict__.pop("_layout", None)
        self.param_groups[-1]["gmt"] = self._gmt
        if hasattr(self, "_sharding"):
            self._sharding = _infer_sharding(self.param_groups, self.process_group)

    # Attributes that copy.deepcopy and pickle keep besides torch.optim.Optimizer's own.
    _CONFIG = ("scope", "mask_mode", "threshold", "nonfinite", "backend", "criterion", "refresh_every", "seed",
               "score_eps", "process_group", "_gmt")

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({name: self.__dict__[name] for name in self._CONFIG if name in self.__dict__})
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.pop("_layout", None)  # (load_state_dict ends here: new state dicts)
        self.__dict__.setdefault("_gmt", _new_gmt_state())
        for name, value in _new_gmt_state().items():  # pickled by a version without the schedule
            self._gmt.setdefault(name, value)
        for name, value in (("criterion", "grad"), ("refresh_every", 1), ("seed", 0), ("score_eps", 1e-8)):
            self.__dict__.setdefault(name, value)
        for group in self.param_groups:  # groups saved by torch.optim.AdamW lack our keys
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("mask_ratio", self.defaults["mask_ratio"])
            group["gmt"] = self._gmt
        if "scope" in self.__dict__:  # a whole GMTAdamW (deepcopy, pickle)
            self._sharding = _infer_sharding(self.param_groups, self.process_group)
            self._follow_parameters()

    # ---- state_dict --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """torch.optim.AdamW's state_dict; every param group also carries "gmt": a snapshot of
        skipped_steps, the last mask_stats() and the mask schedule (selections, since_selection);
        stored masks are per-parameter state "gmt_mask". They ride in the param groups because
        torch.distributed.checkpoint keeps only "state" and "param_groups" (and every group, so that
        each is complete on its own); torch.optim.AdamW loads the groups and ignores the key."""
        state_dict = super().state_dict()
        snapshot = {"skipped_steps": self.skipped_steps.clone(), "last_stats": self.mask_stats(),
                    "selections": self._gmt["selections"].clone(),
                    "since_selection": self._gmt["since_selection"].clone()}
        for group in state_dict["param_groups"]:
            group["gmt"] = snapshot
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a GMTAdamW or torch.optim.AdamW state_dict. A saved group that lacks a key (a
        torch.optim.AdamW group has no mask_ratio) keeps the live group's value."""
        saved_groups = state_dict["param_groups"]
        extra = state_dict.get("gmt") or next((g["gmt"] for g in saved_groups if "gmt" in g), None)
        groups = [
            {**{k: v for k, v in live.items() if k not in ("params", "gmt")}, **saved}
            for saved, live in zip(saved_groups, self.param_groups)
        ] + list(saved_groups[len(self.param_groups):])  # a length mismatch: torch's own error
        for group in groups:
            if "mask_ratio" in group:
                radix.check_mask_ratio(group["mask_ratio"])
        if self.scope == "global":
            _check_global_mask_ratio(groups)
        # torch's load_state_dict ends in __setstate__, which points every group back at self._gmt.
        super().load_state_dict({**{k: v for k, v in state_dict.items() if k != "gmt"}, "param_groups": groups})
        # torch's loading casts every state tensor but "step" to its parameter's dtype: the stored
        # masks (bytes 0..255, exact in every float dtype) become uint8 again.
        for state in self.state.values():
            if "gmt_mask" in state and state["gmt_mask"].dtype != stored_masks.MASK_DTYPE:
                state["gmt_mask"] = state["gmt_mask"].to(stored_masks.MASK_DTYPE)
        if extra is not None:
            self.skipped_steps.copy_(extra["skipped_steps"])
            for name in ("selections", "since_selection"):
                if name in extra:
                    self._gmt[name].copy_(extra[name])
            self._last_stats.clear()
            self._last_stats.update({name: dict(stats) for name, stats in extra["last_stats"].items()})

    # ---- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # torch.amp.GradScaler hands these over as attributes (see _step_supports_amp_scaling).
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)

        self._follow_parameters()
        key, tensors = self._layout_key()
        layout = self.__dict__.get("_layout")
        if layout is None or key is None or not layout.valid(key):
            layout = None
        try:
            if layout is None:
                self._step(layout, key, tensors, grad_scale, found_inf)
            else:  # the key just checked the gradients', parameters' and states' storage
                with storage_vouched(layout):
                    self._step(layout, key, tensors, grad_scale, found_inf)
        finally:
            self.__dict__.pop("_selected", None)  # holds this step's gradients
            kept = self.__dict__.get("_layout")  # the one used, or kept by this step
            if kept is not None:
                kept.release()
        return loss

    def _step(self, layout: Optional["_Layout"], key, tensors, grad_scale, found_inf) -> None:
        # validates everything before anything changes (a cached layout: validated at an earlier step)
        batches = self._gather() if layout is None else layout.fill(*tensors)
        if not batches:
            return
        for group in self.param_groups:  # a schedule may have edited them since construction
            radix.check_mask_ratio(group["mask_ratio"])
        if self.scope == "global":
            _check_global_mask_ratio(self.param_groups)
        due = self._due()
        reuse = self._reuses_known_on_host(due)
        selections, records, sharded_rows = self._select(batches, due, layout, grad_scale, reuse)

        skip = None
        if self.nonfinite != "propagate" and selections:
            nonfinite = self._nonfinite_count(selections)
            if self.nonfinite == "raise":
                # GradScaler's overflow steps are skipped, not errors: found_inf is read first.
                overflow = found_inf is not None and bool(found_inf.item() != 0)
                if not overflow and nonfinite.item() > 0:
                    self._raise_nonfinite(batches)
            else:
                skip = nonfinite > 0
        if found_inf is not None:
            inf = found_inf.to(self._primary, non_blocking=True) != 0
            skip = inf if skip is None else skip | inf

        counters = None if layout is None else layout.counters
        if layout is None:
            self._init_state(batches)
            if key is not None:  # keyed as the next step will find it: with the states made now
                key, tensors = self._layout_key_of(self.state)
                self._layout = _Layout(key, *tensors, self.refresh_every != 1, batches, *self._selected)
                counters = self._layout.counters
        if self._sharding is not None:
            _use_local_shards(batches)
        skip_on = _PerDevice(skip)
        # The steps' increment, 1 - skip as float32 in one op (where between two constants, not ~
        # then a cast; Python scalars there would each be a fill launch).
        increment_on = _PerDevice(None if skip is None else torch.where(skip, *_zero_one(skip.device)))
        for device, steps, one_tensor in counters or _step_counters(batches):
            if one_tensor is not None:  # every step of the device, as one tensor: one op at any count
                one_tensor.add_(1 if skip is None else increment_on[device])
            elif skip is None:
                torch._foreach_add_(steps, 1)
            else:  # a list of 0-d tensors, not one tensor "scalar": dynamo traces this overload
                torch._foreach_add_(steps, [increment_on[device]] * len(steps))

        kept_by_key = _kept_counters(selections, self._primary)
        refresh_on = _PerDevice(due)
        for batch in batches:
            self._update(batch, selections, kept_by_key, grad_scale, skip_on, refresh_on, update_params=True)

        if self._sharding is not None:
            self._sharding.reduce_rows(kept_by_key, sharded_rows)
        if skip is not None:
            self.skipped_steps += skip.to(self.skipped_steps.device)
        refreshed = self._advance_schedule(due, skip, increment_on[self._primary], reuse)
        self._record_stats(records, selections, kept_by_key, grad_scale, refreshed)

    @torch.no_grad()
    def select_mask(self) -> None:
        """Score the current gradients as step() would, select the mask and store it; nothing else
        changes (parameters, moments, step counts, skipped_steps). The next step() uses this mask and
        the refresh schedule counts from it (SEMANTICS.md section 8). With nonfinite="skip", NaN/inf
        gradients store nothing (a warning says so); "raise" raises FloatingPointError."""
        if self.refresh_every == 1:
            raise ValueError(
                "GMTAdamW.select_mask() needs stored masks, but refresh_every=1 selects a new mask at every "
                "step, so a mask selected now would never be used. Construct the optimizer with "
                "refresh_every=None (select once, keep the mask) or refresh_every=K (re-select every K steps)."
            )
        self._follow_parameters()
        batches = self._gather()
        if not batches:
            return
        for group in self.param_groups:
            radix.check_mask_ratio(group["mask_ratio"])
        if self.scope == "global":
            _check_global_mask_ratio(self.param_groups)
        due = torch.ones((), dtype=torch.bool, device=self._primary)
        selections, _, sharded_rows = self._select(batches, due)
        skip = None
        if self.nonfinite != "propagate" and selections:
            nonfinite = self._nonfinite_count(selections)
            if self.nonfinite == "raise" and nonfinite.item() > 0:
                self._raise_nonfinite(batches)
            skip = nonfinite > 0
            if bool(skip.item()):  # select_mask is not step(): a host read is fine here
                warnings.warn(
                    "GMTAdamW.select_mask(): the gradients have NaN or inf entries, so no mask was selected or "
                    "stored (nonfinite='skip'); the next step() selects one from its own gradients.",
                    RuntimeWarning, stacklevel=2,
                )
        self._init_masks(batches)
        for batch in batches:  # the parameters' own state is not needed: only masks and kept change
            batch.states = [{"gmt_mask": self.state[p]["gmt_mask"]} if "gmt_mask" in self.state[p] else {}
                            for p in batch.params]
        if self._sharding is not None:
            _use_local_shards(batches)
        self.__dict__.pop("_selected", None)
        kept_by_key = _kept_counters(selections, self._primary)
        for batch in batches:
            if batch.group["mask_ratio"] > 0:
                self._update(batch, selections, kept_by_key, None, _PerDevice(skip), _PerDevice(due),
                             update_params=False)
        done = due if skip is None else ~skip
        self._gmt["selections"] += done.to(torch.int64)
        self._gmt["since_selection"].copy_(torch.where(done, 0, self._gmt["since_selection"]))

    def _due(self) -> Optional[Tensor]:
        """Whether this step selects a new mask: None for refresh_every=1 (always, nothing stored),
        else a 0-d bool on the primary device (SEMANTICS.md section 8; read nowhere on the host)."""
        if self.refresh_every == 1:
            return None
        first = self._gmt["selections"] == 0
        if self.refresh_every is None:
            return first
        return first | (self._gmt["since_selection"] >= self.refresh_every)

    def _reuses_known_on_host(self, due: Optional[Tensor]) -> bool:
        """Whether the host knows that this step reuses the stored masks. A reuse step finishes the
        score scopes before their first pass; on a CPU primary device the host reads `due` without
        a sync, and the step then runs no selection and keeps the schedule with fewer ops (a GPU
        runs the passes as launches that read nothing: the host does not wait for the device)."""
        return (due is not None and _reads_schedule_on_host(self._primary) and self._sharding is None
                and not torch.compiler.is_compiling() and not bool(due))

    def _advance_schedule(self, due: Optional[Tensor], skip: Optional[Tensor], not_skip: Optional[Tensor],
                          reuse: bool = False):
        """After the update: selections += due & ~skip; since_selection = 1 after a selection, + 1
        after a reuse, unchanged when skipped. Returns "refreshed" (due & ~skip): True, False (a
        reuse the host knew of: `reuse`), or a 0-d tensor (bool, or with refresh_every=1 the float32
        1 - skip the steps were incremented by, which mask_stats reads as a bool). not_skip: that
        1 - skip (None if skip is None). With refresh_every=1 only the random criterion's selection
        number is counted (nothing else reads the schedule there)."""
        since = self._gmt["since_selection"]
        if reuse:  # due is false: only since_selection moves, by 1 - skip
            since.add_(1 if skip is None else ~skip)
            return False
        if due is None:  # refresh_every=1: every step that is not skipped selects
            refreshed = True if skip is None else not_skip
            if self.criterion == "random":  # the only reader of the count (its selection number)
                self._gmt["selections"] += 1 if skip is None else refreshed.to(torch.int64)
            return refreshed  # (no launches for a count nothing reads: GMT's step stays as lean as before)
        else:
            refreshed = due if skip is None else due & ~skip
            advanced = torch.where(due, torch.ones_like(since), since + 1)
        since.copy_(advanced if skip is None else torch.where(skip, since, advanced))
        self._gmt["selections"] += 1 if refreshed is True else refreshed.to(torch.int64)
        return refreshed

    def _layout_key(self) -> tuple:
        """(key, (grads, state tensors, grad storage)): what the batches, scopes and states of a step
        are derived from, cheap to compare (identities, storage addresses, the groups' layout
        options, which parameters have a gradient), every parameter's grad in group order, the state
        tensors the key covers and where the gradients lie (_layout_key_of). (None, None) where
        nothing is cached: sharded runs, torch.compile."""
        if self._sharding is not None or torch.compiler.is_compiling():
            return None, None
        try:
            return self._layout_key_of(self.state)
        except RuntimeError:  # e.g. a sparse gradient has no data_ptr: _gather says what is wrong
            return None, None

    def _layout_key_of(self, state) -> tuple:
        """(key, (grads, the state tensors whose ids and data_ptrs the key holds, grad storage)).
        The gradients are not in the key, only which parameters have one: zero_grad() (set_to_none)
        makes new gradient objects every step, and the layout derived from the parameters holds for
        them. Their storage (data_ptrs, strides) is what launch plans depend on: _Layout.fill has
        the plans repointed when only the addresses changed, and rebuilt when a stride did."""
        key = [id(state), len(state), self.scope, self.criterion, self.refresh_every, self.nonfinite,
               self.mask_mode, self.threshold, self.backend]
        grads, all_params, more_state = [], [], []
        for group in self.param_groups:
            params = group["params"]
            grads += [p.grad for p in params]
            all_params += params  # (their data_ptrs: p.data replaced by module.half(), .to(), dtype and shape may differ)
            key += (id(group), len(params), group["mask_ratio"], group["amsgrad"], id(group.get("param_names")))
            names = (("max_exp_avg_sq",) if group["amsgrad"] else ()) + (
                ("gmt_mask",) if self.refresh_every != 1 and group["mask_ratio"] > 0 else ())
            if names:
                more_state.append((params, names))
        # Which state dict each parameter has (one replaced is seen: the pairs are compared in
        # order, without hashing a tensor), and the state tensors the update is given (its launch
        # plans hold their addresses): one replaced in its dict, or its storage swapped (.data =,
        # set_), is seen too.
        dicts = list(state.values())
        state_tensors = _state_entries(dicts, _STEP_STATE)
        for params, names in more_state:
            state_tensors += _state_entries(list(map(state.get, params)), names)
        tensors = all_params + state_tensors
        key.append(_fingerprint([*state, *dicts, *tensors], tensors))
        # A gradient's dtype, device and shape are its parameter's (the grad setter and autograd
        # enforce it); its address and strides may change from step to step.
        key.append(tuple(i for i, g in enumerate(grads) if g is None))  # parameters without a gradient
        return key, (grads, state_tensors, (_fingerprint((), grads), _fingerprint((), (), grads)))

    def _nonfinite_count(self, selections) -> Tensor:
        """NaN/inf gradient entries of the step, from the selections that count them on the gradient."""
        counts = [sel.nonfinite.sum() for key, sel in selections.items() if key[1] in _KINDS_WITH_NONFINITE]
        return functools.reduce(torch.add, counts)

    def _select(self, batches: list[_Batch], due: Optional[Tensor], layout: Optional["_Layout"] = None,
                grad_scale: Optional[Tensor] = None, reuse: bool = False):
        """Every scope's threshold for this step: {selection key: Selection}, the scope records and
        the rows to all-reduce. Score scopes start finished where due is false (nothing is read),
        or, where the host knows the step reuses the stored masks (`reuse`), run no pass at all.
        Each selection starts warm (around the last thresholds, see _warm_centres) when it can."""
        if layout is None:
            scopes, records, sharded_rows = self._scopes(batches, separate_check=due is not None)
            works = {}
            self._selected = (scopes, records, works)  # for _keep_layout
        else:
            scopes, records, sharded_rows, works = layout.scopes, layout.records, defaultdict(list), layout.works
        backend_for = lambda g: self._resolve(g.device, g.dtype)  # noqa: E731
        scoring = self._step_random = self._step_scoring(batches)
        selections = {}
        for key, key_scopes in scopes.items():
            fmt, kind = key
            if reuse and kind == "score":
                selections[key] = _unselected(len(key_scopes), fmt, self._primary)
                continue
            done = ~due if kind == "score" and due is not None else None
            options = {"scoring": scoring if kind == "score" else GRAD, "done": done,
                       "warm": self._warm_centres(key, len(key_scopes), records, grad_scale)}
            if self._sharding is None:
                if key not in works:
                    works[key] = work_lists(key_scopes, backend_for)
                selections[key] = select_thresholds(key_scopes, fmt, backend_for, self._primary, work=works[key],
                                                    **options)
            else:
                selections[key] = self._sharding.select(key_scopes, sharded_rows[key], fmt, backend_for,
                                                        self._primary, **options)
        return selections, records, sharded_rows

    def _step_scoring(self, batches: list[_Batch]) -> Scoring:
        """The criterion's Scoring over every masked tensor of the step, indexed by _Batch.ids."""
        if self.criterion == "grad":
            return GRAD
        params = [(b, i) for b in batches for i in range(len(b.params)) if b.ids]
        params.sort(key=lambda bi: bi[0].ids[bi[1]])
        if self.criterion == "grad_over_weight":
            return Scoring("grad_over_weight", self.score_eps, weights=[_local(b.params[i]).detach() for b, i in params])
        groups = tuple(b.group_index for b, i in params)
        positions = tuple(b.positions[i] for b, i in params)
        offsets = tuple(self._entry_offset(b.params[i]) for b, i in params)
        device = self._primary
        consts = _scope_indices.get(
            (device, "random", groups, positions, offsets),
            lambda: tuple(torch.tensor(v, dtype=torch.int64).to(device) for v in (groups, positions, offsets)),
        )
        keys = random_keys_like(self.seed, self._gmt["selections"], consts[0], consts[1])
        return Scoring("random", self.score_eps, random_keys=keys, entry_offsets=consts[2])

    def _entry_offset(self, p: Tensor) -> int:
        if self._sharding is None:
            return 0
        from .distributed import entry_offset

        return entry_offset(p)

    def _resolve(self, device: torch.device, dtype: torch.dtype) -> Backend:
        """resolve() once per (device, dtype) and step, not per tensor (a step's host time grows
        with the tensor count; this keeps the registry out of that)."""
        key = (device, dtype)
        backend = self._resolved.get(key)
        if backend is None:
            backend = self._resolved[key] = self._criteria_backend(resolve(self.backend, device, dtype), device, dtype)
        return backend

    def _criteria_backend(self, backend: Backend, device: torch.device, dtype: torch.dtype) -> Backend:
        """`backend` if its kernels implement this optimizer's criterion and schedule; else, for
        "auto", the reference backend (saying so once), and for a named backend an error before
        anything changes."""
        lacking = backend.lacks(self.criterion, self.refresh_every != 1)
        if lacking is None:
            return backend
        if self.backend != "auto":
            raise RuntimeError(
                f"gmt_kernels backend {backend.name!r} does not implement {lacking} yet; nothing was changed. "
                "Use backend='reference' (pure PyTorch, any device) for it, or criterion='grad' with refresh_every=1."
            )
        fallback = resolve("reference", device, dtype)
        key = (backend.name, lacking)
        if key not in _warned_criteria_fallbacks:
            _warned_criteria_fallbacks.add(key)
            warnings.warn(
                f"gmt_kernels: backend {backend.name!r} does not implement {lacking} yet; using the pure-PyTorch "
                "reference backend for it, which is correct but slower.",
                RuntimeWarning,
                stacklevel=4,
            )
        return fallback

    def _gather(self) -> list[_Batch]:
        self._resolved = {}
        batches: dict[tuple, _Batch] = {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.device.type == "meta":
                    raise RuntimeError(
                        f"GMTAdamW.step: parameter {pi} of param group {gi} is on the meta device, so it can "
                        "never be updated. If the model was materialised after the optimizer was created, "
                        "module.to_empty() made new parameters and this optimizer still holds the meta ones: "
                        "create the optimizer after materialising, or call "
                        "torch.__future__.set_swap_module_params_on_conversion(True) first so that to_empty() "
                        "and to() keep the parameter objects."
                    )
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"GMTAdamW does not support sparse gradients (param group {gi}, parameter {pi}). "
                        "Use dense gradients (e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam."
                    )
                if torch.is_complex(p) or not p.is_floating_point():
                    raise RuntimeError(
                        f"GMTAdamW updates real floating-point parameters; parameter {pi} of param group "
                        f"{gi} is {p.dtype}. Use torch.view_as_real for complex parameters."
                    )
                if group["mask_ratio"] > 0:
                    self._check_maskable(p, gi, pi)
                backend = self._resolve(p.device, p.dtype)
                key = (gi, p.device, p.dtype)
                batch = batches.setdefault(key, _Batch(group=group, group_index=gi, backend=backend))
                batch.params.append(p)
                batch.positions.append(pi)
                if self._sharding is None:
                    batch.grads.append(p.grad)
                else:  # a DTensor's local shard; the contribution says who counts its entries
                    batch.grads.append(_local(p.grad))
                    where = f"parameter {pi} of param group {gi}"
                    batch.contributions.append(self._sharding.contribution(p, p.grad, where))
        return list(batches.values())

    def _check_maskable(self, p: Tensor, gi: int, pi: int) -> None:
        """Random scores and stored masks index entries row-major, which kernels read in memory
        order: such parameters must be contiguous (and, sharded, split along dim 0 only)."""
        needs = [what for what, used in (("criterion='random'", self.criterion == "random"),
                                         (f"refresh_every={self.refresh_every!r}", self.refresh_every != 1)) if used]
        if not needs:
            return
        if not _local(p).is_contiguous():
            raise ValueError(
                f"GMTAdamW with {' and '.join(needs)} indexes the entries of parameter {pi} of param group {gi} "
                f"row-major, but it is not contiguous (shape {tuple(p.shape)}, strides {tuple(_local(p).stride())}); "
                "nothing was changed. Make it contiguous (e.g. module.to(memory_format=torch.contiguous_format)) "
                "or use criterion='grad' with refresh_every=1."
            )
        if self._sharding is not None:
            from .distributed import check_row_sharded

            check_row_sharded(p, f"parameter {pi} of param group {gi}", needs, random=self.criterion == "random",
                              plain_are_shards=self._sharding.plain_are_shards)

    def _init_state(self, batches: list[_Batch]) -> None:
        """The state dict of every parameter, created in torch.optim.AdamW's layout on first use."""
        # Eager and unsharded, the steps made here are 0-d views of one tensor per device: a step
        # whose counters are exactly those adds to all of them in one op (_step_counters).
        packed = self._sharding is None and not torch.compiler.is_compiling()
        new_steps = _new_steps(self.state, batches) if packed else None
        for batch in batches:
            for p in batch.params:
                state = self.state[p]
                if "step" not in state:  # (select_mask may have stored a mask first)
                    state["step"] = (new_steps[p.device].pop() if packed else
                                     torch.zeros((), dtype=torch.float32, device=p.device))
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if batch.group["amsgrad"] and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if state["step"].device != p.device:  # torch.optim.AdamW keeps it on the CPU
                    state["step"] = (new_steps[p.device].pop().copy_(state["step"]) if packed else
                                     state["step"].to(device=p.device, dtype=torch.float32))
                batch.states.append(state)
        self._init_masks(batches)

    def _init_masks(self, batches: list[_Batch]) -> None:
        """The stored mask "gmt_mask" of every masked parameter, created on first use when masks are
        kept between steps (refresh_every != 1): uint8, layout in gmt_kernels/masks.py; for a
        DTensor parameter a DTensor sharded like it along dim 0."""
        if self.refresh_every == 1:
            return
        for batch in batches:
            if batch.group["mask_ratio"] == 0:
                continue
            for p in batch.params:
                state = self.state[p]
                if "gmt_mask" not in state:
                    if self._sharding is not None and _is_dtensor(p):
                        from .distributed import new_sharded_mask

                        state["gmt_mask"] = new_sharded_mask(p)
                    else:
                        state["gmt_mask"] = stored_masks.new_mask(p)

    def _scopes(self, batches: list[_Batch], separate_check: bool):
        """The scopes of this step, grouped by selection key (key format, kind), and a record of each
        for mask_stats. separate_check: count NaN/inf in k = 0 scopes of their own (criteria that do
        not score |g|, and steps that may reuse stored masks), not in the score scopes' histograms."""
        separate_check = separate_check or self.criterion != "grad"
        score_kind = "score" if separate_check else "grad"
        masked: dict[str, list] = defaultdict(list)  # scope name -> [(batch, index)]
        unmasked: dict[torch.dtype, list] = defaultdict(list)
        names = {}
        next_id = 0
        for batch in batches:
            gi = batch.group_index
            ratio = batch.group["mask_ratio"]
            batch.ids = []
            for i, (pi, p) in enumerate(zip(batch.positions, batch.params)):
                if ratio == 0:
                    unmasked[p.dtype].append((batch, i))
                    continue
                batch.ids.append(next_id)
                next_id += 1
                if separate_check:
                    unmasked[p.dtype].append((batch, i))
                if self.scope == "global":
                    name = "global"
                elif self.scope == "group":
                    name = f"group{gi}"
                else:
                    pnames = batch.group.get("param_names")
                    name = f"group{gi}.{pnames[pi] if pnames else pi}"
                names[name] = ratio
                masked[name].append((batch, i))

        scopes: dict[tuple, list[Scope]] = defaultdict(list)
        records = []
        exact = self.threshold == "exact"

        sharded_scopes = []  # (key, row, ratio, members): k waits for the global entry count

        def add(name, members, ratio, kind):
            criterion = self.criterion if kind == "score" else "grad"
            fmt = radix.key_format_for((b.params[i].dtype for b, i in members), criterion)
            key = (fmt, kind)
            numel = sum(b.grads[i].numel() for b, i in members)
            row = len(scopes[key])
            scopes[key].append(
                Scope(
                    grads=[b.grads[i] for b, i in members],
                    k=radix.kept_count(numel, ratio),
                    slack=radix.rank_slack(numel, exact),
                    numel=numel,
                    ids=[b.ids[i] for b, i in members] if kind == "score" else None,
                )
            )
            if name is not None:
                for b, i in members:
                    b.scope_rows.append((i, key, row))
                records.append(_ScopeRecord(name, key, row, numel))
            if self._sharding is not None:
                sharded_scopes.append((key, row, ratio, members))

        for name, members in masked.items():
            add(name, members, names[name], score_kind)
        if self.nonfinite != "propagate":  # tensors only checked for NaN / inf:
            for members in unmasked.values():  # k = 0 (ratio 1), one pass that counts them
                add(None, members, 1.0, "check" if separate_check else "grad")
        sharded_rows = defaultdict(list)  # per selection key, the rows whose histograms are all-reduced
        if sharded_scopes:
            self._globalize_scopes(sharded_scopes, scopes, records, sharded_rows, exact)
        return scopes, records, sharded_rows

    def _globalize_scopes(self, sharded_scopes, scopes, records, sharded_rows, exact) -> None:
        """Give scopes spread over the process group their global entry count (hence k) and the
        gradients this rank histograms (a replica is counted by one rank only)."""
        from .distributed import scope_members

        views = []
        for key, row, ratio, members in sharded_scopes:
            grads = [b.grads[i] for b, i in members]
            ids = scopes[key][row].ids
            view = scope_members(grads, [b.contributions[i] for b, i in members], ids)
            views.append(view)
            if view.sharded:
                sharded_rows[key].append(row)
                for (b, i), c in zip(members, (b.contributions[i] for b, i in members)):
                    if not c.counted_here and i not in b.uncounted:
                        b.uncounted.append(i)
        numels = self._sharding.global_numels(
            [v.known_numel for v in views], [v.shard_numel for v in views], self._primary
        )
        record_of = {(rec.key, rec.row): rec for rec in records}
        for (key, row, ratio, _), view, numel in zip(sharded_scopes, views, numels):
            scope = scopes[key][row]
            scope.grads, scope.ids = view.grads, view.ids
            scope.k, scope.slack, scope.numel = radix.kept_count(numel, ratio), radix.rank_slack(numel, exact), numel
            if (key, row) in record_of:
                record_of[(key, row)].numel = numel

    def _update(self, batch: _Batch, selections, kept_by_key, grad_scale, skip_on, refresh_on, *,
                update_params: bool) -> None:
        group, params = batch.group, batch.params
        device, n = params[0].device, len(params)
        masked = group["mask_ratio"] > 0
        scoring, masks, refresh = GRAD, (), None
        index = None  # scope rows to gather thresholds from and add kept counts to, if not views
        if masked:
            if batch.slots is None:  # (kept with the batch while the layout is cached)
                rows = {i: (key, row) for i, key, row in batch.scope_rows}
                scope_rows = tuple(rows[i][1] for i in range(n))
                views = None if batch.uncounted or device != self._primary else _row_views(scope_rows)
                batch.slots = (rows[0][0], scope_rows, views)  # every tensor of a batch shares its selection key
            key, scope_rows, views = batch.slots
            fmt = key[0]
            if views is not None:  # the scopes' own rows (no gather, no scatter: no launch)
                thresholds, kept = views(selections[key].thresholds), views(kept_by_key[key])
            else:
                index = _device_index(scope_rows, self._primary)
                thresholds = selections[key].thresholds.index_select(0, index).to(device, non_blocking=True)
                kept = torch.zeros(n, dtype=torch.int64, device=device)
            scoring = self._batch_scoring(batch, device)
            if self.refresh_every != 1:
                masks = [s["gmt_mask"] for s in batch.states] if batch.state_lists is None else batch.state_lists[4]
                refresh = refresh_on[device]
        else:  # threshold 0 keeps every entry; nothing reads the counts
            fmt = radix.key_format_for([params[0].dtype])
            thresholds = _zero_threshold(device, fmt.threshold_dtype).expand(n)
            kept = _discarded_counts(device).expand(n)
        beta1, beta2 = (float(b) if isinstance(b, Tensor) else b for b in group["betas"])
        if update_params:
            exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, _ = batch.state_lists or _state_lists(batch, False)
        else:  # select_mask: the update writes masks and kept only; the params stand in for the moments
            exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = list(params), list(params), [], [_unused_step(device)] * n
        batch.backend.masked_adamw(
            params,
            batch.grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            kept,
            options=AdamWOptions(
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                amsgrad=group["amsgrad"] and update_params,
                maximize=group["maximize"],
                mask_mode=self.mask_mode,
                grad_scale=None if grad_scale is None else grad_scale.to(device, non_blocking=True),
                skip=skip_on[device],
            ),
            mask=MaskSource(thresholds, scoring, masks=masks, refresh=refresh, update_params=update_params),
        )
        if index is not None:
            if batch.uncounted:  # replicas whose entries another rank of the group reports
                kept.index_fill_(0, torch.tensor(batch.uncounted, dtype=torch.int64, device=device), 0)
            kept_by_key[key].index_add_(0, index, kept.to(self._primary, non_blocking=True))

    def _batch_scoring(self, batch: _Batch, device: torch.device) -> Scoring:
        """The update's scoring of one masked batch (theta is read from the parameters)."""
        if self.criterion != "random":
            return GRAD if self.criterion == "grad" else Scoring(self.criterion, self.score_eps)
        step = self._step_random
        index = _device_index(tuple(batch.ids), self._primary)
        return Scoring("random", self.score_eps,
                       random_keys=step.random_keys.index_select(0, index).to(device, non_blocking=True),
                       entry_offsets=step.entry_offsets.index_select(0, index).to(device, non_blocking=True))

    def _raise_nonfinite(self, batches: list[_Batch]) -> None:
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                if p.grad is not None and not bool(torch.isfinite(_local(p.grad)).all()):
                    label = f" ({names[pi]!r})" if names else ""
                    raise FloatingPointError(
                        f"GMTAdamW: the gradient of parameter {pi}{label} in param group {gi} has NaN or "
                        "inf entries; nothing was changed. Find where it comes from, or construct the "
                        "optimizer with nonfinite='skip' to skip such steps (as GradScaler does)."
                    )
        if self._sharding is not None:  # the all-reduced histogram saw it on another rank
            raise FloatingPointError(
                "GMTAdamW: a gradient shard on another rank of the process group has NaN or inf entries "
                "(that rank names the parameter); nothing was changed. Use nonfinite='skip' to skip such steps."
            )

    def _record_stats(self, records, selections, kept_by_key, grad_scale, refreshed) -> None:
        thresholds = {}  # per selection key, every row's threshold as mask_stats reports it
        for key, selection in selections.items():
            threshold = selection.thresholds
            if grad_scale is not None and self.criterion != "random":  # scores of the raw, scaled g
                threshold = threshold / grad_scale.to(threshold.device)
            if self.refresh_every != 1:  # a step that reuses the stored mask reports the threshold it was selected with
                previous = self._last_thresholds(key, len(threshold), records)
                if previous is not None:
                    threshold = previous if refreshed is False else torch.where(refreshed.to(threshold.device),
                                                                                threshold, previous)
            thresholds[key] = threshold
        stats = {}
        for rec in records:
            stats[rec.name] = {"threshold": thresholds[rec.key][rec.row], "kept": kept_by_key[rec.key][rec.row],
                               "numel": rec.numel, "refreshed": refreshed}
        # In place: under torch.compile an attribute assignment on an Optimizer is dropped (pytorch#171590).
        self._last_stats.clear()
        self._last_stats.update(stats)
        if records:  # valid while these records are the step's and these stats the last ones
            self.__dict__["_thresholds_kept"] = (records, stats[records[0].name], thresholds)

    def _last_thresholds(self, key, rows: int, records) -> Optional[Tensor]:
        """The thresholds mask_stats() holds for selection `key` (a [rows] tensor in its threshold
        dtype, on the primary device; unscaled by a GradScaler), or None where a row that keeps
        something has none (a first step, new scopes). The last step's tensor when it is still
        the one (same records, stats not loaded since), else gathered from the stats."""
        kept = self.__dict__.get("_thresholds_kept")
        if kept is not None and kept[0] is records and self._last_stats.get(records[0].name) is kept[1]:
            return kept[2].get(key)
        fmt = key[0]
        values = [0.0] * rows  # rows without a record only count NaN/inf (k = 0): never centred
        for rec in records:
            if rec.key == key:
                value = self._last_stats.get(rec.name, {}).get("threshold")
                if value is None:
                    return None
                values[rec.row] = value
        return torch.stack([torch.as_tensor(v, dtype=fmt.threshold_dtype).to(self._primary) for v in values])

    def _warm_centres(self, key, rows: int, records, grad_scale: Optional[Tensor]) -> Optional[Tensor]:
        """Where selection `key` starts: the last thresholds (in the units of this step's scores),
        or None (a cold start). A function of the optimizer's state_dict alone, so a step after
        loading one selects what the uninterrupted run would have."""
        previous = self._last_thresholds(key, rows, records)
        if previous is None or grad_scale is None or self.criterion == "random":
            return previous
        return previous * grad_scale.to(previous.device)

    def mask_stats(self) -> dict:
        """Per scope of the last step: {"threshold": float (in the criterion's score units; "grad":
        unscaled gradient units; on a step that reused the stored mask, the threshold it was selected
        with), "kept": int (entries updated with their gradient; 0 for a skipped step), "numel": int,
        "refreshed": bool (this step selected a new mask)}. Reading it
        synchronises with the device; step() itself does not."""
        stats = {
            name: {k: (v.item() if isinstance(v, Tensor) else v) for k, v in s.items()}
            for name, s in self._last_stats.items()
        }
        for s in stats.values():  # kept on the device as 1 - skip (float32) by refresh_every=1 steps
            if "refreshed" in s:
                s["refreshed"] = bool(s["refreshed"])
        return stats


@functools.cache
def _torch_adamw_defaults() -> dict:
    """The param-group keys torch.optim.AdamW of this torch version has and GMTAdamW has no use for
    (capturable, differentiable, decoupled_weight_decay, ...), with AdamW's default values."""
    probe = torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    return dict(probe.defaults)


_GMT_COUNTERS = ("skipped_steps", "selections", "since_selection")
_warned_criteria_fallbacks: set = set()


def _new_gmt_state() -> dict:
    """GMT's counters (0-d int64, moved to the primary device) and the last stats."""
    state = {name: torch.zeros((), dtype=torch.int64) for name in _GMT_COUNTERS}
    state["last_stats"] = {}
    return state


def _check_refresh_every(refresh_every) -> None:
    if refresh_every is None:
        return
    if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
        raise ValueError(
            f"Invalid refresh_every value: {refresh_every!r}. Use 1 (select a new mask at every step, GMT), "
            "an integer K > 1 (select at every K-th step that is not skipped and reuse the stored mask in "
            "between) or None (select once and keep the mask for the rest of training)."
        )


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise ValueError(
            f"Invalid seed value: {seed!r}. The random criterion's seed is an integer in [0, 2**64); "
            "pass a non-negative Python int."
        )


def _check_score_eps(score_eps) -> None:
    if isinstance(score_eps, bool) or not isinstance(score_eps, (int, float)) or not 0.0 <= score_eps < math.inf:
        raise ValueError(
            f"Invalid score_eps value: {score_eps!r}. criterion='grad_over_weight' scores |g| / (|theta| + "
            "score_eps): pass a finite number >= 0 (default 1e-8)."
        )


def _unused_step(device: torch.device) -> Tensor:
    """A 0-d float32 step for an update that changes no parameter (select_mask): never read."""
    return _scope_indices.get((device, "unused step"), lambda: torch.ones((), dtype=torch.float32, device=device))


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _check_global_mask_ratio(groups) -> None:
    """scope='global' selects one threshold over every masked group: they must share one mask_ratio."""
    ratios = {g["mask_ratio"] for g in groups if g.get("mask_ratio", 0) > 0}
    if len(ratios) > 1:
        raise ValueError(
            f"scope='global' selects one threshold over every masked group, so they must share one "
            f"mask_ratio; got {sorted(ratios)}. Use scope='group' for a threshold per group, or give the "
            "groups the same mask_ratio (0 = unmasked); a schedule must change every masked group at once."
        )


def _check_no_repeats(params, group_index: int) -> None:
    """A parameter listed twice in one group would be updated twice per step (torch only warns)."""
    seen = set()
    for i, p in enumerate(params):
        if id(p) in seen:
            first = next(j for j, q in enumerate(params) if q is p)
            raise ValueError(
                f"GMTAdamW: param group {group_index} lists the same parameter twice (positions {first} "
                f"and {i}); each parameter may appear once. Deduplicate the list (e.g. model.parameters() "
                "already yields a shared parameter once)."
            )
        seen.add(id(p))


def _infer_sharding(param_groups, process_group):
    """distributed.ShardGroup for DTensor parameters or an explicit process_group, else None (one
    process: torch.distributed is not even imported)."""
    params = [p for g in param_groups for p in g["params"]]
    if process_group is None and "torch.distributed.tensor" not in sys.modules:
        return None  # no DTensor can exist yet
    from .distributed import ShardGroup

    return ShardGroup.infer(params, process_group)


def _local(t: Tensor) -> Tensor:
    from .distributed import local

    return local(t)


def _use_local_shards(batches: list[_Batch]) -> None:
    """Backends see plain tensors: the local shards of DTensor parameters and of their state."""
    for batch in batches:
        batch.params = [_local(p) for p in batch.params]
        batch.states = [{key: _local(value) for key, value in state.items()} for state in batch.states]


_scope_indices = DeviceConstants()


def _device_index(rows: tuple, device: torch.device) -> Tensor:
    """The int64 tensor `rows` on `device`, copied from the host once per distinct value."""
    return _scope_indices.get((device, rows), lambda: torch.tensor(rows, dtype=torch.int64).to(device))


class _Layout:
    """What step() derives from the parameters, their gradients and state and the groups' layout
    options (batches, scopes, selection work lists, which state tensors the update and the step
    counters take: per-tensor Python work), kept for the next steps while _layout_key is
    unchanged. It holds no gradient or state tensor between steps (memory: zero_grad may free
    them, state may be replaced or moved; only the steps' one tensor, 4 bytes per parameter):
    fill() puts the step's in place, release() takes them out again. A state tensor it was built
    with that dies invalidates it, so that a new one at the same id is never mistaken for it. New
    gradient objects keep it (zero_grad() makes them every step); the backends may keep the launch
    plans of its steps in `plans` (backends.storage_vouched) while the gradients' storage stays."""

    def __init__(self, key, grads, state_tensors, grad_storage, stored_masks, batches, scopes, records, works):
        self.key, self.batches, self.scopes, self.records, self.works = key, batches, scopes, records, works
        self.plans = {}  # the backends' launch plans for steps under this layout (storage_vouched)
        self.moved_plans = {}  # during a step whose gradients moved: the plans of the step before
        self.grad_storage = grad_storage  # (data_ptrs, strides) of the gradients the plans were made for
        self._alive = [True]
        alive = self._alive
        died = lambda _, alive=alive: alive.clear()  # noqa: E731
        self._refs = [weakref.ref(t, died) for t in state_tensors if isinstance(t, Tensor)]
        index = {id(g): i for i, g in enumerate(grads) if g is not None}
        pick = lambda gs, call=None: _picker([index[id(g)] for g in gs], call)  # noqa: E731
        self._fills = [(batch, pick(batch.grads)) for batch in batches]
        self._scope_fills = [(scope, pick(scope.grads)) for key_scopes in scopes.values() for scope in key_scopes]
        # The backends' calls, named (VouchedList): a histogram's by its work list, an update's by
        # its batch's parameters; every other list of such a call is picked from the key's tensors too.
        calls = itertools.count()
        self._work_fills = [(work, name, pick(entry[1], next(calls)))
                            for work in works.values() for name, entry in work.items()]
        for batch in batches:
            batch.params = VouchedList(batch.params, next(calls))
        # The update's state lists and the step counters, picked from the key's state tensors.
        index = {id(t): i for i, t in enumerate(state_tensors) if isinstance(t, Tensor)}
        pick = lambda ts: _picker([index[id(t)] for t in ts])  # noqa: E731
        self._state_fills = [(batch, tuple(map(pick, _state_lists(batch, stored_masks)))) for batch in batches]
        self._counter_fills = [(device, pick(steps), one_tensor)
                               for device, steps, one_tensor in _step_counters(batches, one_tensor=True)]
        self.counters = None  # while filled: _step_counters of the step
        self.fill(grads, state_tensors, grad_storage)

    def valid(self, key: tuple) -> bool:
        return bool(self._alive) and key == self.key

    def fill(self, grads: list, state_tensors: list, grad_storage: tuple) -> list:
        if grad_storage != self.grad_storage:  # new plans; repointed ones where only addresses changed
            self.moved_plans = self.plans if grad_storage[1] == self.grad_storage[1] else {}
            self.plans = {}
            self.grad_storage = grad_storage
        for batch, pick in self._fills:
            batch.grads = pick(grads)
        for scope, pick in self._scope_fills:
            scope.grads = pick(grads)
        for work, name, pick in self._work_fills:
            backend, _, rows, ids = work[name]
            work[name] = (backend, pick(grads), rows, ids)
        for batch, picks in self._state_fills:
            batch.state_lists = tuple(pick(state_tensors) for pick in picks)
        self.counters = [(device, pick(state_tensors), one_tensor) for device, pick, one_tensor in self._counter_fills]
        return self.batches

    def release(self) -> None:
        for batch, _ in self._fills:
            batch.grads = []
        for scope, _ in self._scope_fills:
            scope.grads = []
        for work, name, _ in self._work_fills:
            backend, _, rows, ids = work[name]
            work[name] = (backend, [], rows, ids)
        for batch, _ in self._state_fills:
            batch.state_lists = None
        self.counters = None
        self.moved_plans = {}


_STEP_STATE = ("step", "exp_avg", "exp_avg_sq")  # what every update is given of a parameter's state


def _state_entries(states: list, names: tuple) -> list:
    """The entries `names` of the state dicts that are not None or empty, name by name (None where
    one lacks an entry)."""
    present = list(filter(None, states))
    entries = []
    try:
        for name in names:
            entries += map(operator.getitem, present, itertools.repeat(name))
    except KeyError:  # a state made by select_mask (gmt_mask only) or before amsgrad was set
        entries = [state.get(name) for name in names for state in present]
    return entries


def _fingerprint(objects: list, addressed: list = (), strided: list = ()):
    """A value equal between two calls iff each of `objects` is the same object, each of
    `addressed` (tensor or None) has the same data_ptr, and each of `strided` (tensor or None) the
    same strides. Packed in one C++ call (gmt_kernels._C.layout_fingerprint) where the extension is
    built: ~10 ns a value, against ~100 ns in Python. RuntimeError for a tensor without storage
    (sparse)."""
    if _packed_fingerprint[0] is None:
        try:
            from ._C import layout_fingerprint
        except Exception:  # not built (or refused, e.g. a bad GMT_KERNELS_CPU_CAPABILITY): the backends say so
            layout_fingerprint = False
        _packed_fingerprint[0] = layout_fingerprint
    if _packed_fingerprint[0]:
        return _packed_fingerprint[0](list(objects), list(addressed), list(strided))
    return (list(map(id, objects)), [None if t is None else t.data_ptr() for t in addressed],
            [None if t is None else t.stride() for t in strided])


_packed_fingerprint: list = [None]  # gmt_kernels._C.layout_fingerprint, False if unavailable, None before the first use


def _state_lists(batch: _Batch, stored_masks: bool) -> tuple:
    """(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, masks) of a batch for masked_adamw; masks:
    the stored ones if kept between steps (stored_masks) and the group is masked, else []."""
    states = batch.states
    return ([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if batch.group["amsgrad"] else [], [s["step"] for s in states],
            [s["gmt_mask"] for s in states] if stored_masks and batch.group["mask_ratio"] > 0 else [])


def _new_steps(state: dict, batches: list[_Batch]) -> dict:
    """Per device, the zero 0-d float32 steps _init_state will hand out there (pop() takes the
    next), as views of one [n] tensor: one for each parameter without a step on its own device."""
    needed = defaultdict(int)
    for batch in batches:
        for p in batch.params:
            step = state[p].get("step")
            if step is None or step.device != p.device:
                needed[p.device] += 1
    steps = {}
    for device, n in needed.items():
        counters = torch.zeros(n, dtype=torch.float32, device=device)
        steps[device] = [counters[i] for i in reversed(range(n))]
    return steps


def _step_counters(batches: list[_Batch], one_tensor: bool = False) -> list:
    """Per device, (device, the steps of the batches' parameters, one 1-D tensor whose entries are
    exactly those steps or None). one_tensor: look for it (_one_tensor)."""
    steps_by_device = defaultdict(list)
    for batch in batches:  # _init_state put every step on its parameter's device
        steps_by_device[batch.params[0].device] += [s["step"] for s in batch.states]
    return [(device, steps, _one_tensor(steps) if one_tensor else None) for device, steps in steps_by_device.items()]


def _one_tensor(steps: list) -> Optional[Tensor]:
    """A 1-D float32 tensor over a storage that holds the 0-d float32 `steps` and nothing else,
    each entry once (the views _new_steps makes, while no step is missing or added); else None.
    Adding to it is then adding to each step."""
    if not all(isinstance(step, Tensor) and step.dim() == 0 and step.dtype == torch.float32 for step in steps):
        return None
    first, n = steps[0], len(steps)
    storage = first.untyped_storage()
    if storage.nbytes() != 4 * n:
        return None
    offsets = set()
    for step in steps:
        if step.untyped_storage().data_ptr() != storage.data_ptr() or step.device != first.device:
            return None
        offsets.add(step.storage_offset())
    if offsets != set(range(n)):
        return None
    return first.as_strided((n,), (1,), 0)


def _picker(index: list, call=None):
    """items -> [items[i] for i in index], at C speed; a VouchedList with `call` if one is given."""
    if call is not None:
        pick = _picker(index)
        return lambda items: VouchedList(pick(items), call)
    if not index:
        return lambda items: []
    if len(index) == 1:
        (i,) = index
        return lambda items: [items[i]]
    get = operator.itemgetter(*index)
    return lambda items: list(get(items))


def _row_views(rows: tuple):
    """For a batch whose tensors' scope rows are all one row (scopes "global", "group") or
    consecutive rows ("tensor"), a function that views a per-scope [S] tensor as the batch's [n]
    (stride 0 or a slice: thresholds read and kept counts added in place, no launch); else None."""
    first, n = rows[0], len(rows)
    if rows == (first,) * n:
        return lambda t: t[first:first + 1].expand(n)
    if rows == tuple(range(first, first + n)):
        return lambda t: t[first:first + n]
    return None


def _reads_schedule_on_host(device: torch.device) -> bool:
    """Whether step() may read the refresh schedule's 0-d `due` flag on the host: on CPU, where
    that is a memory read, not a wait for the device."""
    return device.type == "cpu"


def _unselected(scopes: int, key_format: radix.KeyFormat, device: torch.device) -> Selection:
    """What select_thresholds gives for scopes finished before their first pass, less the passes:
    no non-finite entry counted, zeroed kept counts, and thresholds that nothing reads (a reuse
    step keeps the stored bits and reports the thresholds they were selected with)."""
    zeros = torch.zeros(2, scopes, dtype=torch.int64, device=device)
    return Selection(torch.zeros(scopes, dtype=key_format.threshold_dtype, device=device), zeros[0], key_format,
                     zeros[1])


def _kept_counters(selections: dict, primary: torch.device) -> dict:
    """Per selection key, the zeroed [S] int64 kept counts the updates add to."""
    return {key: sel.kept if sel.kept is not None else
            torch.zeros(len(sel.thresholds), dtype=torch.int64, device=primary) for key, sel in selections.items()}


def _zero_threshold(device: torch.device, dtype: torch.dtype) -> Tensor:
    """A read-only [1] zero threshold (keeps every entry) for unmasked groups."""
    return _scope_indices.get((device, "zero threshold", dtype), lambda: torch.zeros(1, dtype=dtype, device=device))


def _zero_one(device: torch.device) -> tuple:
    """0-d float32 0 and 1 on the device, read-only."""
    return _scope_indices.get((device, "0 and 1"), lambda: tuple(torch.tensor(v, device=device) for v in (0.0, 1.0)))


_discarded: dict = {}


def _discarded_counts(device: torch.device) -> Tensor:
    """A [1] int64 counter that unmasked groups' updates add to and nothing reads (made once per
    device, so that such a group costs no zeroing launch per step)."""
    if device not in _discarded:
        _discarded[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return _discarded[device]


class _PerDevice:
    """A 0-d flag (or None) made available on every device that asks, copied once per device."""

    def __init__(self, value: Optional[Tensor]):
        self._copies = {} if value is None else {value.device: value}
        self._value = value

    def __getitem__(self, device: torch.device) -> Optional[Tensor]:
        if self._value is None:
            return None
        if device not in self._copies:
            self._copies[device] = self._value.to(device, non_blocking=True)
        return self._copies[device]
