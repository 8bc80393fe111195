"""One GMT threshold over gradients spread across processes (FSDP2, ZeRO-style shards, DDP).

Radix-select histograms of disjoint sets of entries add up, so a threshold over a tensor split
across ranks costs one all-reduce of the [scopes, 2**width] int64 histogram per pass (done by
threshold.select_thresholds when it is given a group), never a gather of gradients. The
non-finite count comes from the first pass's histogram, so once it is all-reduced every rank
agrees on skipping a step. This module decides, per gradient, which entries this rank counts, and
per scope whether it needs that all-reduce at all: replicated gradients (DDP, a DTensor Replicate
placement) are equal on every rank, which then computes the same threshold without talking.

Who is sharded (docs/distributed.md says the same for users):
- DTensor parameters: the group spans the mesh dims on which some parameter is Shard-ed, inferred
  from the device mesh. The optimizer updates to_local() views; its state stays DTensor.
- Plain tensors with an explicit process_group: each rank holds a disjoint shard (ZeRO style).
  The global entry count is summed over the group once per distinct set of local sizes.
- Plain tensors without one: replicas (DDP) or this process's own tensors; never communicated.

Every rank of the group must step the same scopes in the same order (the same parameters having
gradients): the all-reduce pairs histogram rows by position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from . import radix
from .threshold import Scope, Selection, select_thresholds

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The entries this rank holds: the DTensor's local shard (a view: in-place updates reach it)."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True)
class Contribution:
    """How one gradient takes part in its scope's threshold on this rank."""

    sharded: bool  # its entries are split across the group: its scope needs the all-reduce
    counted_here: bool  # in a group-wide histogram, this rank counts its local entries (False: a replica another rank counts)
    known_numel: int  # entries of the whole tensor known without communication
    shard_numel: int  # entries of this rank's plain-tensor shard, to be summed over the group


# (group, this rank's shard sizes per scope) -> the sizes summed over the group. Every rank must hit or
# miss together, which holds when each rank's shard sizes change only when every rank's do.
_summed_shard_sizes: dict[tuple, list[int]] = {}
_MAX_CACHED_SIZES = 256


class ShardGroup:
    """The process group a GMT threshold is all-reduced over, and how each parameter is laid out on it."""

    def __init__(self, group, mesh, dims: tuple[int, ...], plain_are_shards: bool):
        self.group = group  # None: nothing is sharded, DTensors only need their local views
        self.mesh = mesh
        self.dims = dims
        self.plain_are_shards = plain_are_shards
        self._rank = dist.get_rank(group) if group is not None else 0
        self._coordinate = mesh.get_coordinate() if mesh is not None else None

    @classmethod
    def infer(cls, params: Sequence[torch.Tensor], process_group=None) -> Optional["ShardGroup"]:
        """None when nothing is distributed (no DTensor and no process_group): the single-process path."""
        dtensors = [p for p in params if is_dtensor(p)]
        if not dtensors:
            if process_group is None:
                return None
            _check_group(process_group)
            return cls(process_group, None, (), plain_are_shards=True)
        meshes = {p.device_mesh for p in dtensors}
        if len(meshes) > 1:
            raise ValueError(
                f"GMTAdamW got DTensor parameters on {len(meshes)} different device meshes; one threshold "
                "needs one mesh. Use one optimizer per mesh, or put the parameters on one mesh."
            )
        mesh = meshes.pop()
        if mesh.get_coordinate() is None:
            raise ValueError("This rank is not part of the DTensor parameters' device mesh; it cannot step them.")
        # An explicit group declares plain tensors to be shards too; inferred, they are replicas.
        explicit = process_group is not None
        dims = tuple(sorted({d for p in dtensors for d, pl in enumerate(p.placements) if pl.is_shard()}))
        if not dims:
            if not explicit:
                return cls(None, mesh, (), plain_are_shards=False)
            _check_group(process_group)
            return cls(process_group, mesh, (), plain_are_shards=True)
        expected = _ranks_along(mesh, dims)
        if not explicit:
            if len(dims) == 1:
                process_group = mesh.get_group(dims[0])
            else:
                raise ValueError(
                    f"The DTensor parameters are sharded over mesh dims {list(dims)} of a {mesh.ndim}-d mesh; "
                    f"GMTAdamW needs one process group spanning ranks {expected} to all-reduce the "
                    "threshold's histograms. Pass it as process_group= (e.g. a flattened mesh's group)."
                )
        _check_group(process_group)
        got = sorted(dist.get_process_group_ranks(process_group))
        if got != expected:
            raise ValueError(
                f"process_group spans ranks {got}, but the DTensor parameters are sharded over ranks "
                f"{expected} (mesh dims {list(dims)}). Pass the group of those mesh dims, or none to infer it."
            )
        return cls(process_group, mesh, dims, plain_are_shards=explicit)

    def contribution(self, param: torch.Tensor, grad: torch.Tensor, where: str) -> Contribution:
        if is_dtensor(param):
            if not is_dtensor(grad) or grad.device_mesh != param.device_mesh or grad.placements != param.placements:
                layout = grad.placements if is_dtensor(grad) else "a plain tensor"
                raise ValueError(
                    f"The gradient of {where} is laid out as {layout}, its DTensor parameter as "
                    f"{param.placements}. GMTAdamW updates local shards in place, so they must match: "
                    "redistribute the gradient to the parameter's placements before step()."
                )
            placements = param.placements
            if any(pl.is_partial() for pl in placements):
                raise ValueError(
                    f"The gradient of {where} has a Partial placement (unreduced partial sums); scores of "
                    "partial sums are not scores of the gradient. Reduce it (redistribute) before step()."
                )
            stray = [d for d, pl in enumerate(placements) if pl.is_shard() and d not in self.dims]
            if stray:
                raise ValueError(
                    f"{where} is sharded over mesh dims {stray}, outside the dims {list(self.dims)} this "
                    "optimizer all-reduces over (inferred at construction). Create the optimizer after "
                    "sharding every parameter, or pass a process_group spanning all sharded dims."
                )
            sharded = self.group is not None and any(pl.is_shard() for pl in placements)
            # Along a Replicate dim every coordinate holds the same entries: coordinate 0 counts them.
            counted = all(self._coordinate[d] == 0 for d in self.dims if not placements[d].is_shard())
            if not self.dims:  # a replica on a group that no DTensor is sharded over: rank 0 counts it
                counted = self._rank == 0
            return Contribution(sharded, counted, param.numel(), 0)
        if is_dtensor(grad):
            raise ValueError(
                f"The gradient of {where} is a DTensor but its parameter is a plain tensor; make both "
                "DTensors (e.g. with fully_shard) or both plain."
            )
        if self.plain_are_shards:
            return Contribution(True, True, 0, grad.numel())
        return Contribution(False, self._rank == 0, grad.numel(), 0)

    def global_numels(self, known: list[int], shard: list[int], device: torch.device) -> list[int]:
        """Entries per scope over the whole group. Plain shards' sizes are summed with one small
        all-reduce per distinct set of local sizes (cached, so a steady run syncs only once)."""
        if not any(shard):
            return list(known)
        key = (self.group, tuple(shard))
        if key not in _summed_shard_sizes:
            if len(_summed_shard_sizes) >= _MAX_CACHED_SIZES:
                _summed_shard_sizes.clear()
            counts = torch.tensor(shard, dtype=torch.int64, device=device)
            dist.all_reduce(counts, group=self.group)
            _summed_shard_sizes[key] = counts.tolist()
        return [a + b for a, b in zip(known, _summed_shard_sizes[key])]

    def select(self, scopes, sharded_rows, key_format, backend_for, primary, **options) -> Selection:
        """options: select_thresholds' scoring=, done= and warm=."""
        return select_split(scopes, sharded_rows, key_format, backend_for, primary, self.group, **options)

    def reduce_rows(self, per_format: dict, rows_per_format: dict) -> None:
        reduce_rows(per_format, rows_per_format, self.group)


def _check_group(group) -> None:
    if not dist.is_initialized():
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first, or leave process_group=None to select over "
            "this process's tensors only."
        )


def _ranks_along(mesh, dims: tuple[int, ...]) -> list[int]:
    """Global ranks that share this rank's coordinates on every mesh dim outside `dims`."""
    coordinate = mesh.get_coordinate()
    index = tuple(slice(None) if d in dims else coordinate[d] for d in range(mesh.ndim))
    return sorted(mesh.mesh[index].flatten().tolist())


@dataclass
class ScopeMembers:
    """One scope's gradients as this rank sees them, before k is known."""

    grads: list  # local gradients this rank histograms
    known_numel: int
    shard_numel: int
    sharded: bool
    ids: Optional[list] = None  # Scope.ids of those gradients


def scope_members(grads: Sequence[torch.Tensor], contributions: Sequence[Contribution], ids=None) -> ScopeMembers:
    sharded = any(c.sharded for c in contributions)
    here = [c.counted_here or not sharded for c in contributions]
    counted = [g for g, h in zip(grads, here) if h]
    return ScopeMembers(
        ids=None if ids is None else [i for i, h in zip(ids, here) if h],
        grads=counted,
        known_numel=sum(c.known_numel for c in contributions),
        shard_numel=sum(c.shard_numel for c in contributions),
        sharded=sharded,
    )


def select_split(scopes: list[Scope], sharded_rows: Sequence[int], key_format, backend_for, primary, group,
                 **options) -> Selection:
    """select_thresholds with the all-reduce only over the scopes that need it (rows keep their order)."""
    sharded_rows = sorted(sharded_rows)
    if group is None or not sharded_rows:
        return select_thresholds(scopes, key_format, backend_for, primary, **options)
    if len(sharded_rows) == len(scopes):
        return select_thresholds(scopes, key_format, backend_for, primary, process_group=group, **options)
    local_rows = [r for r in range(len(scopes)) if r not in set(sharded_rows)]
    warm = options.pop("warm", None)
    warm_of = lambda rows: None if warm is None else warm[rows]  # noqa: E731
    shared = select_thresholds([scopes[r] for r in sharded_rows], key_format, backend_for, primary,
                               process_group=group, warm=warm_of(sharded_rows), **options)
    alone = select_thresholds([scopes[r] for r in local_rows], key_format, backend_for, primary,
                              warm=warm_of(local_rows), **options)
    position = torch.tensor(sharded_rows + local_rows, dtype=torch.int64).argsort().to(primary, non_blocking=True)
    return Selection(
        thresholds=torch.cat([shared.thresholds, alone.thresholds]).index_select(0, position),
        nonfinite=torch.cat([shared.nonfinite, alone.nonfinite]).index_select(0, position),
        key_format=key_format,
    )


def reduce_rows(per_format: dict, rows_per_format: dict, group) -> None:
    """Sum the given rows of each format's [S] tensor over the group, in place, in one all-reduce."""
    picks = [(fmt, torch.tensor(sorted(rows), dtype=torch.int64)) for fmt, rows in rows_per_format.items() if rows]
    if group is None or not picks:
        return
    parts = [per_format[fmt].index_select(0, idx.to(per_format[fmt].device)) for fmt, idx in picks]
    flat = torch.cat(parts)
    dist.all_reduce(flat, group=group)
    for (fmt, idx), part in zip(picks, flat.split([p.numel() for p in parts])):
        per_format[fmt].index_copy_(0, idx.to(part.device), part)


def magnitude_threshold_sharded(tensors, mask_ratio: float, *, exact: bool, process_group, backend_for) -> torch.Tensor:
    """magnitude_threshold over tensors spread across ranks (DTensors, or plain shards with a group)."""
    shard_group = ShardGroup.infer(tensors, process_group)
    contributions = [shard_group.contribution(t, t, f"tensor {i}") for i, t in enumerate(tensors)]
    members = scope_members([local(t).detach() for t in tensors], contributions)
    device = local(tensors[0]).device
    (numel,) = shard_group.global_numels([members.known_numel], [members.shard_numel], device)
    scope = Scope(grads=members.grads, k=radix.kept_count(numel, float(mask_ratio)),
                  slack=radix.rank_slack(numel, exact), numel=numel)
    key_format = radix.key_format_for(t.dtype for t in tensors)
    group = shard_group.group if members.sharded else None
    return select_thresholds([scope], key_format, backend_for, device, process_group=group).thresholds[0]


# ---- stored masks and random scores of sharded parameters (SEMANTICS.md section 8) ----

def check_row_sharded(param, where: str, needs, *, random: bool, plain_are_shards: bool) -> None:
    """Stored masks follow a DTensor parameter's dim-0 sharding, and the random score indexes entries
    row-major in the whole parameter: a DTensor must be Shard(0) or Replicate on every mesh dim, and
    random scores of plain-tensor shards cannot know where their entries sit in the whole parameter."""
    what = " and ".join(needs)
    if is_dtensor(param):
        stray = [pl for pl in param.placements if pl.is_shard() and pl.dim != 0]
        if stray:
            raise ValueError(
                f"GMTAdamW with {what}: {where} is sharded as {param.placements}; stored masks and random "
                "scores need shards of whole rows (Shard(0), as FSDP2's fully_shard makes) or replicas. "
                "Shard it along dim 0, or use criterion='grad' with refresh_every=1."
            )
    elif random and plain_are_shards:
        raise ValueError(
            f"GMTAdamW with criterion='random': {where} is a plain-tensor shard of an explicit process_group, "
            "so where its entries sit in the whole parameter (the random score's entry index) is unknown. "
            "Use DTensor parameters (e.g. FSDP2's fully_shard), or another criterion."
        )


def _local_offset(param):
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)


def entry_offset(param) -> int:
    """Row-major index, in the whole parameter, of this rank's first local entry (0 for plain tensors:
    the random criterion refuses plain shards, check_row_sharded)."""
    if not is_dtensor(param) or param.dim() == 0:
        return 0
    _, offset = _local_offset(param)
    inner = 1
    for size in param.shape[1:]:
        inner *= size
    return int(offset[0]) * inner


def new_sharded_mask(param):
    """The all-zero stored mask of a DTensor parameter: a DTensor of the mask's global shape, sharded
    like the parameter (Shard(0) / Replicate), whose local part is the mask of the local rows."""
    from . import masks

    local_mask = masks.new_mask(local(param))
    shape = masks.mask_shape(param.shape)
    return DTensor.from_local(local_mask, param.device_mesh, param.placements, run_check=False,
                              shape=torch.Size(shape), stride=(shape[1], 1))
