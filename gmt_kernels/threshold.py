"""Thresholds of many scopes at once: the histogram pass loop, the same for every backend.

Each pass runs one `radix_histogram` per (device, backend) over all tensors of all scopes that
share a key format, sums the histograms on the primary device (and over `process_group`), and
advances every scope's state with the radix_select op (radix.select_bins). Launches per step
therefore depend on the number of passes, devices and key formats, never on the number of
parameters. The number of passes is fixed in advance (radix.max_passes), since ending early would
need the device to tell the host; a pass over scopes that are all DONE reads no gradient.

Nothing in a steady-state step comes from host data: the initial state is built once per set of
scope sizes and kept on the device (a step copies it device to device, or starts warm from it and
the last thresholds, radix.warm_state), so a step can be captured in a CUDA graph. On a GPU a pass
is two launches (histogram, select) when every pass gets its own zeroed histogram rows, one
allocation per step (small scope counts), else three (a zero_ per pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from . import ops, radix  # noqa: F401  (ops defines torch.ops.gmt_kernels.*)
from .backends import Backend
from .device_constants import DeviceConstants
from .options import GRAD, Scoring


@dataclass
class Scope:
    """Entries that share one threshold: k = number to keep, slack = allowed rank error (0: exact),
    numel = entries of the scope (over every rank, for a scope sharded across processes).
    ids: per gradient, its index into the per-tensor fields of the call's Scoring (weights,
    random_keys, entry_offsets); None when the criterion has none ("grad")."""

    grads: list
    k: int
    slack: int
    numel: int
    ids: Optional[list] = None


@dataclass
class Selection:
    thresholds: torch.Tensor  # [S] in key_format.threshold_dtype, on the primary device
    nonfinite: torch.Tensor  # [S] int64: entries that are NaN or +-inf
    key_format: radix.KeyFormat
    kept: Optional[torch.Tensor] = None  # [S] int64 zeros: the update's kept count per scope (or None: make one)


def select_thresholds(
    scopes: Sequence[Scope],
    key_format: radix.KeyFormat,
    backend_for: Callable[[torch.Tensor], Backend],
    primary: torch.device,
    process_group=None,
    *,
    scoring: Scoring = GRAD,
    done: Optional[torch.Tensor] = None,
    work: Optional[dict] = None,
    warm: Optional[torch.Tensor] = None,
) -> Selection:
    """Thresholds of `scopes` (one key format) scored by `scoring` (its per-tensor fields indexed by
    Scope.ids). done: a 0-d bool tensor on the primary device, or None; where true, every scope
    starts finished, so the passes read nothing (a step that reuses stored masks). work:
    work_lists(scopes, backend_for) if the caller kept it from an earlier step with these scopes.
    warm: [S] on the primary device, where each scope's threshold is expected (the previous
    selection's), or None: the first pass is then a bracket around it (radix.warm_state) instead of
    a sample or a full radix pass."""
    initial, sampled_first, warm_constants = _initial_state(scopes, key_format, primary)
    if warm is None:
        any_sampled = any(radix.first_pass_sample_log2(s.numel, s.k) > 0 for s in scopes)
        state = initial.clone()  # the one copy a step makes of it, device to device
    else:
        any_sampled = False
        state = radix.warm_state(warm, warm_constants, key_format)
    if done is not None:
        state[:, radix.DONE] = done.to(torch.int64)

    if work is None:
        work = work_lists(scopes, backend_for)
    local_state = {dev: state if dev == primary else state.to(dev) for dev, _ in work}
    scorings = {key: _scoring_for(scoring, ids, key[0]) for key, (_, _, _, ids) in work.items()}

    passes = radix.max_passes(key_format, [s.numel for s in scopes], [s.k for s in scopes], warm=warm is not None)
    # One zeroed histogram per pass in a single allocation (and no copy of pass 0's non-finite
    # counts), unless that would take more than _HIST_ROWS_AT_ONCE rows of 32 KiB.
    # The update's kept counters (Selection.kept) share that allocation.
    at_once = passes * len(scopes) <= _HIST_ROWS_AT_ONCE
    rows = passes * len(scopes) if at_once else 0
    zeros = torch.zeros(rows * radix.HIST_COLUMNS + len(scopes), dtype=torch.int64, device=primary)
    kept = zeros[rows * radix.HIST_COLUMNS:]
    if at_once:
        hists = zeros[:rows * radix.HIST_COLUMNS].view(passes, len(scopes), radix.HIST_COLUMNS)
    else:
        hist = torch.empty(len(scopes), radix.HIST_COLUMNS, dtype=torch.int64, device=primary)
    nonfinite = None
    for pass_index in range(passes):
        if at_once:
            hist = hists[pass_index]
        else:
            hist.zero_()
        for (device, name), (backend, grads, rows, _) in work.items():
            part = hist if device == primary else torch.zeros_like(hist, device=device)
            backend.radix_histogram(grads, rows, local_state[device], part, key_format=key_format,
                                    scoring=scorings[(device, name)])
            if part is not hist:
                hist += part.to(primary)
        if process_group is not None:
            torch.distributed.all_reduce(hist, group=process_group)
        # Scopes whose first pass is a sample find their non-finite count in the second pass.
        if pass_index == 0:
            nonfinite = hist[:, radix.NONFINITE] if at_once else hist[:, radix.NONFINITE].clone()
        elif pass_index == 1 and any_sampled:
            nonfinite = torch.where(sampled_first, hist[:, radix.NONFINITE], nonfinite)
        torch.ops.gmt_kernels.radix_select(hist, state, key_format.key_bits)
        for device, copy in local_state.items():
            if copy is not state:
                copy.copy_(state, non_blocking=True)

    thresholds = radix.result_thresholds(state, key_format)
    if any(s.k == 0 for s in scopes):  # k = 0: nothing kept, threshold +inf
        thresholds.masked_fill_(state[:, radix.K] == 0, float("inf"))
    return Selection(thresholds, nonfinite, key_format, kept)


def work_lists(scopes: Sequence[Scope], backend_for: Callable[[torch.Tensor], Backend]) -> dict:
    """Per (device, backend name): (backend, the gradients, the state row of each one's scope, its id)."""
    work: dict[tuple[torch.device, str], tuple[Backend, list, list, list]] = {}
    for row, scope in enumerate(scopes):
        for j, grad in enumerate(scope.grads):
            backend = backend_for(grad)
            entry = work.setdefault((grad.device, backend.name), (backend, [], [], []))
            entry[1].append(grad)
            entry[2].append(row)
            entry[3].append(None if scope.ids is None else scope.ids[j])
    return work


def _scoring_for(scoring: Scoring, ids: list, device: torch.device) -> Scoring:
    """The call's scoring restricted to one work list's gradients (ids in their order)."""
    if scoring.criterion == "grad":
        return scoring
    weights = [scoring.weights[i] for i in ids] if scoring.weights else ()
    random_keys = entry_offsets = None
    if scoring.random_keys is not None:
        index = _work_indices.get((device, tuple(ids)), lambda: torch.tensor(ids, dtype=torch.int64).to(device))
        random_keys = scoring.random_keys.to(device, non_blocking=True).index_select(0, index)
        entry_offsets = scoring.entry_offsets.to(device, non_blocking=True).index_select(0, index)
    return Scoring(scoring.criterion, scoring.score_eps, weights, random_keys, entry_offsets)


_HIST_ROWS_AT_ONCE = 64  # 2 MiB
_work_indices = DeviceConstants()
_initial_states = DeviceConstants()


def _initial_state(scopes: Sequence[Scope], key_format: radix.KeyFormat, primary: torch.device):
    """(radix.initial_state, whether each scope's first pass is a sample, radix.warm_constants) on
    the primary device, built on the host and copied once per set of scope sizes; later steps reuse
    the device copies (a step clones the state or makes a warm one from them)."""

    def make():
        sizes = [s.k for s in scopes], [s.numel for s in scopes], [s.slack for s in scopes]
        host_state = radix.initial_state(*sizes, key_format)
        warm = tuple(t.to(primary) for t in radix.warm_constants(*sizes, key_format))
        return host_state.to(primary), (host_state[:, radix.SAMPLE] > 0).to(primary), warm

    # The sampling rule's constants are in the key: a state cached under other ones would plan
    # passes that max_passes no longer counts.
    sampling = (radix.SAMPLE_MIN_BLOCKS, radix.SAMPLE_MAX_LOG2, radix.SAMPLE_BLOCK)
    return _initial_states.get((primary, key_format.name, sampling, tuple((s.k, s.numel, s.slack) for s in scopes)), make)
