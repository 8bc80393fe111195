"""GMTAdamW: torch.optim.AdamW that updates, at every step, only the entries with the largest |grad|."""

from __future__ import annotations

import functools
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from . import radix
from .backends import Backend, check_backend_name, resolve
from .device_constants import DeviceConstants
from .options import GRAD, AdamWOptions, MaskSource
from .threshold import Scope, select_thresholds

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
    """Where one scope's numbers live after a step: row `row` of its key format's selection."""

    name: str
    fmt: radix.KeyFormat
    row: int
    numel: int


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
    scope_rows: list = field(default_factory=list)  # row per tensor, or None when unmasked
    contributions: list = field(default_factory=list)  # distributed.Contribution per tensor (sharded runs)
    uncounted: list = field(default_factory=list)  # tensors whose kept count another rank reports


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
        # GMT's own state, shared by every param group (see state_dict): skip counter, last stats.
        self._gmt = {"skipped_steps": torch.zeros((), dtype=torch.int64), "last_stats": {}}
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
        if self.skipped_steps.device != primary:
            self.skipped_steps = self.skipped_steps.to(primary)
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
                resolve(self.backend, p.device, p.dtype)  # a named backend that cannot serve fails now
        super().add_param_group(param_group)
        self.param_groups[-1]["gmt"] = self._gmt
        if hasattr(self, "_sharding"):
            self._sharding = _infer_sharding(self.param_groups, self.process_group)

    # Attributes that copy.deepcopy and pickle keep besides torch.optim.Optimizer's own.
    _CONFIG = ("scope", "mask_mode", "threshold", "nonfinite", "backend", "process_group", "_gmt")

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({name: self.__dict__[name] for name in self._CONFIG if name in self.__dict__})
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_gmt", {"skipped_steps": torch.zeros((), dtype=torch.int64), "last_stats": {}})
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
        skipped_steps and the last mask_stats(). They ride in the param groups because
        torch.distributed.checkpoint keeps only "state" and "param_groups" (and every group, so that
        each is complete on its own); torch.optim.AdamW loads the groups and ignores the key."""
        state_dict = super().state_dict()
        snapshot = {"skipped_steps": self.skipped_steps.clone(), "last_stats": self.mask_stats()}
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
        if extra is not None:
            self.skipped_steps.copy_(extra["skipped_steps"])
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
        batches = self._gather()  # validates everything before anything changes
        if not batches:
            return loss
        for group in self.param_groups:  # a schedule may have edited them since construction
            radix.check_mask_ratio(group["mask_ratio"])
        if self.scope == "global":
            _check_global_mask_ratio(self.param_groups)
        scopes, records, sharded_rows = self._scopes(batches)
        backend_for = lambda g: self._resolve(g.device, g.dtype)  # noqa: E731
        selections = {
            fmt: select_thresholds(fmt_scopes, fmt, backend_for, self._primary)
            if self._sharding is None
            else self._sharding.select(fmt_scopes, sharded_rows[fmt], fmt, backend_for, self._primary)
            for fmt, fmt_scopes in scopes.items()
        }

        skip = None
        if self.nonfinite != "propagate" and selections:
            nonfinite = functools.reduce(torch.add, [sel.nonfinite.sum() for sel in selections.values()])
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

        self._init_state(batches)
        if self._sharding is not None:
            _use_local_shards(batches)
        skip_on = _PerDevice(skip)
        steps_by_device = defaultdict(list)
        for batch in batches:
            for state in batch.states:
                steps_by_device[state["step"].device].append(state["step"])
        for device, steps in steps_by_device.items():
            if skip is None:
                torch._foreach_add_(steps, 1)
            else:  # a list of 0-d tensors, not one tensor "scalar": dynamo traces this overload
                torch._foreach_add_(steps, [(~skip_on[device]).to(torch.float32)] * len(steps))

        kept_by_format = {fmt: torch.zeros(len(s), dtype=torch.int64, device=self._primary) for fmt, s in scopes.items()}
        for batch in batches:
            self._update(batch, selections, kept_by_format, grad_scale, skip_on)

        if self._sharding is not None:
            self._sharding.reduce_rows(kept_by_format, sharded_rows)
        if skip is not None:
            self.skipped_steps += skip.to(self.skipped_steps.device)
        self._record_stats(records, selections, kept_by_format, grad_scale, skip)
        return loss

    def _resolve(self, device: torch.device, dtype: torch.dtype) -> Backend:
        """resolve() once per (device, dtype) and step, not per tensor (a step's host time grows
        with the tensor count; this keeps the registry out of that)."""
        key = (device, dtype)
        backend = self._resolved.get(key)
        if backend is None:
            backend = self._resolved[key] = resolve(self.backend, device, dtype)
        return backend

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

    def _init_state(self, batches: list[_Batch]) -> None:
        """The state dict of every parameter, created in torch.optim.AdamW's layout on first use."""
        for batch in batches:
            for p in batch.params:
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if batch.group["amsgrad"] and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if state["step"].device != p.device:  # torch.optim.AdamW keeps it on the CPU
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
                batch.states.append(state)

    def _scopes(self, batches: list[_Batch]):
        """The scopes of this step, grouped by key format, and a record of each for mask_stats."""
        masked: dict[str, list] = defaultdict(list)  # scope name -> [(batch, index)]
        unmasked: dict[torch.dtype, list] = defaultdict(list)
        names = {}
        for batch in batches:
            gi = batch.group_index
            ratio = batch.group["mask_ratio"]
            for i, (pi, p) in enumerate(zip(batch.positions, batch.params)):
                if ratio == 0:
                    unmasked[p.dtype].append((batch, i))
                    continue
                if self.scope == "global":
                    name = "global"
                elif self.scope == "group":
                    name = f"group{gi}"
                else:
                    pnames = batch.group.get("param_names")
                    name = f"group{gi}.{pnames[pi] if pnames else pi}"
                names[name] = ratio
                masked[name].append((batch, i))

        scopes: dict[radix.KeyFormat, list[Scope]] = defaultdict(list)
        records = []
        exact = self.threshold == "exact"

        sharded_scopes = []  # (fmt, row, ratio, members): k waits for the global entry count

        def add(name, members, ratio, record):
            fmt = radix.key_format_for(b.params[i].dtype for b, i in members)
            numel = sum(b.grads[i].numel() for b, i in members)
            row = len(scopes[fmt])
            scopes[fmt].append(
                Scope(
                    grads=[b.grads[i] for b, i in members],
                    k=radix.kept_count(numel, ratio),
                    slack=radix.rank_slack(numel, exact),
                    numel=numel,
                )
            )
            for b, i in members:
                b.scope_rows.append((i, fmt, row))
            if record:
                records.append(_ScopeRecord(name, fmt, row, numel))
            if self._sharding is not None:
                sharded_scopes.append((fmt, row, ratio, members))

        for name, members in masked.items():
            add(name, members, names[name], True)
        if self.nonfinite != "propagate":  # unmasked tensors are only checked for NaN / inf:
            for members in unmasked.values():  # k = 0 (ratio 1), one pass that counts them
                add("unmasked", members, 1.0, False)
        sharded_rows = defaultdict(list)  # per format, the rows whose histograms are all-reduced
        if sharded_scopes:
            self._globalize_scopes(sharded_scopes, scopes, records, sharded_rows, exact)
        return scopes, records, sharded_rows

    def _globalize_scopes(self, sharded_scopes, scopes, records, sharded_rows, exact) -> None:
        """Give scopes spread over the process group their global entry count (hence k) and the
        gradients this rank histograms (a replica is counted by one rank only)."""
        from .distributed import scope_members

        views = []
        for fmt, row, ratio, members in sharded_scopes:
            grads = [b.grads[i] for b, i in members]
            view = scope_members(grads, [b.contributions[i] for b, i in members])
            views.append(view)
            if view.sharded:
                sharded_rows[fmt].append(row)
                for (b, i), c in zip(members, (b.contributions[i] for b, i in members)):
                    if not c.counted_here:
                        b.uncounted.append(i)
        numels = self._sharding.global_numels(
            [v.known_numel for v in views], [v.shard_numel for v in views], self._primary
        )
        record_of = {(rec.fmt, rec.row): rec for rec in records}
        for (fmt, row, ratio, _), view, numel in zip(sharded_scopes, views, numels):
            scope = scopes[fmt][row]
            scope.grads = view.grads
            scope.k, scope.slack, scope.numel = radix.kept_count(numel, ratio), radix.rank_slack(numel, exact), numel
            if (fmt, row) in record_of:
                record_of[(fmt, row)].numel = numel

    def _update(self, batch: _Batch, selections, kept_by_format, grad_scale, skip_on) -> None:
        group, params = batch.group, batch.params
        device, n = params[0].device, len(params)
        fmt = radix.key_format_for([params[0].dtype])
        rows = {i: (f, row) for i, f, row in batch.scope_rows}
        masked = group["mask_ratio"] > 0
        if masked:
            fmt = rows[0][0]  # every tensor of a batch shares its scopes' key format
            index = _device_index(tuple(rows[i][1] for i in range(n)), self._primary)
            thresholds = selections[fmt].thresholds.index_select(0, index).to(device, non_blocking=True)
        else:  # threshold 0 keeps every entry
            thresholds = torch.zeros(n, dtype=fmt.threshold_dtype, device=device)
        kept = torch.zeros(n, dtype=torch.int64, device=device)
        beta1, beta2 = (float(b) if isinstance(b, Tensor) else b for b in group["betas"])
        batch.backend.masked_adamw(
            params,
            batch.grads,
            [s["exp_avg"] for s in batch.states],
            [s["exp_avg_sq"] for s in batch.states],
            [s["max_exp_avg_sq"] for s in batch.states] if group["amsgrad"] else [],
            [s["step"] for s in batch.states],
            kept,
            options=AdamWOptions(
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                amsgrad=group["amsgrad"],
                maximize=group["maximize"],
                mask_mode=self.mask_mode,
                grad_scale=None if grad_scale is None else grad_scale.to(device, non_blocking=True),
                skip=skip_on[device],
            ),
            mask=MaskSource(thresholds, GRAD),
        )
        if masked:
            if batch.uncounted:  # replicas whose entries another rank of the group reports
                kept.index_fill_(0, torch.tensor(batch.uncounted, dtype=torch.int64, device=device), 0)
            kept_by_format[fmt].index_add_(0, index, kept.to(self._primary, non_blocking=True))

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

    def _record_stats(self, records, selections, kept_by_format, grad_scale, skip) -> None:
        stats = {}
        for rec in records:
            threshold = selections[rec.fmt].thresholds[rec.row]
            if grad_scale is not None:
                threshold = threshold / grad_scale.to(threshold.device)
            stats[rec.name] = {"threshold": threshold, "kept": kept_by_format[rec.fmt][rec.row], "numel": rec.numel}
        # In place: under torch.compile an attribute assignment on an Optimizer is dropped (pytorch#171590).
        self._last_stats.clear()
        self._last_stats.update(stats)

    def mask_stats(self) -> dict:
        """Per scope of the last step: {"threshold": float (in unscaled gradient units), "kept": int
        (entries updated with their gradient; 0 for a skipped step), "numel": int}. Reading it
        synchronises with the device; step() itself does not."""
        return {
            name: {k: (v.item() if isinstance(v, Tensor) else v) for k, v in s.items()}
            for name, s in self._last_stats.items()
        }


@functools.cache
def _torch_adamw_defaults() -> dict:
    """The param-group keys torch.optim.AdamW of this torch version has and GMTAdamW has no use for
    (capturable, differentiable, decoupled_weight_decay, ...), with AdamW's default values."""
    probe = torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    return dict(probe.defaults)


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
