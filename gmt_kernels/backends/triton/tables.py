"""Launch tables: how one kernel launch finds every tensor it works on (multi_tensor_apply-style).

A launch gets two small device tensors instead of one argument per tensor:

- `table`, int64 [n, columns]: per tensor its data_ptr(s) (cast back to typed pointers inside the
  kernel), its numel, and the index of its first chunk;
- `chunk_owner`, int32 [chunks]: for program p, the tensor whose chunk it works on.

Program p then handles entries [(p - first_chunk) * CHUNK, ... + CHUNK) of tensor chunk_owner[p],
with int64 offsets, so a tensor of any size (beyond 2**31 entries) and any number of tensors take
one launch. The tables only hold addresses and sizes, which the host knows without reading the
device, so they are built on the host; they are cached by their contents, so a training loop whose
tensors keep their storage (the usual case) builds them once and later steps copy nothing to the
device (which also keeps a captured CUDA graph valid). The chunk owners, the large part, are
cached by the tensor sizes alone: tensors that move copy only their n rows again. Memory: 8 * columns bytes per tensor plus
4 bytes per CHUNK entries (2.4e-4 bytes per entry at CHUNK = 16384).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from ...device_constants import DeviceConstants
from .. import vouched_token

# Columns of the tables are fixed per kernel; the numel and first-chunk columns come last.
_tables = DeviceConstants(256)


class LaunchTable(NamedTuple):
    table: torch.Tensor  # int64 [n, columns + 2]
    chunk_owner: torch.Tensor  # int32 [num_chunks]
    num_chunks: int
    host: torch.Tensor  # the table on the host (itself for CPU tensors): never written


def launch_table(rows: Sequence[tuple[int, ...]], numels: Sequence[int], chunk: int, device: torch.device) -> LaunchTable:
    """The table for tensors with these per-tensor integer columns and sizes (numel > 0 each)."""

    def build() -> LaunchTable:
        # The chunk owners (4 bytes per chunk: the large part) depend on the sizes only, so tensors
        # that move (new gradient storage every step) copy just their small [n, columns] table again.
        owner, first = _owners.get((device, chunk, tuple(numels)), lambda: _chunk_owner(numels, chunk, device))
        table = torch.cat(
            [torch.tensor(rows, dtype=torch.int64).reshape(len(rows), -1),
             torch.tensor(numels, dtype=torch.int64)[:, None], first[:, None]], dim=1)
        table = table.contiguous()
        return LaunchTable(_to_device(table, device), owner, int(owner.numel()), table)

    return _tables.get((device, chunk, tuple(rows), tuple(numels)), build)


_owners = DeviceConstants(256)


def _chunk_owner(numels, chunk: int, device: torch.device) -> tuple:
    """(chunk owner on the device, first chunk of each tensor on the host)."""
    chunks = torch.tensor([-(-n // chunk) for n in numels], dtype=torch.int64)
    first = torch.cumsum(chunks, 0) - chunks
    owner = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), chunks)
    if owner.numel() >= 2**31:
        raise ValueError(
            f"gmt_kernels triton backend: {owner.numel()} chunks of {chunk} entries exceed one launch's grid "
            "(2**31 - 1 programs); split the parameters into several param groups."
        )
    return _to_device(owner, device), first


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return t
    # Pinned so the copy is truly asynchronous (no host wait) on the current stream.
    return t.pin_memory().to(device, non_blocking=True)


class SampleList(NamedTuple):
    items: torch.Tensor  # int64 [m, 3]: row of the launch table, first index into `blocks`, count (<= per_item)
    blocks: torch.Tensor  # int32: picked block indices, tensor by tensor, ascending
    num_items: int


def sample_list(numels: Sequence[int], indexes: Sequence[int], log2s: Sequence[int], block: int, per_item: int,
                device: torch.device) -> SampleList:
    """The blocks a sampled pass reads (radix.sampled_blocks of each tensor at its log2), as items
    of up to `per_item` blocks of one tensor: a sampled pass then visits only what it counts.
    Depends on the sizes, call indices and sample rates only; built and copied once (4 bytes per
    picked block: 1/512 of the gradient's entries at the usual 1/32 sample)."""
    from ... import radix

    def build() -> SampleList:
        items, picked, offset = [], [], 0
        for row, (n, index, log2) in enumerate(zip(numels, indexes, log2s)):
            blocks = torch.arange(-(-n // block), dtype=torch.int64)
            sel = blocks[radix.sampled_blocks(blocks, index, log2)].to(torch.int32)
            for first in range(0, sel.numel(), per_item):
                items.append((row, offset + first, min(per_item, sel.numel() - first)))
            picked.append(sel)
            offset += sel.numel()
        table = torch.tensor(items, dtype=torch.int64).reshape(-1, 3)
        blocks = torch.cat(picked) if picked else torch.zeros(0, dtype=torch.int32)
        if blocks.numel() == 0:
            blocks = torch.zeros(1, dtype=torch.int32)  # a valid pointer
        return SampleList(_to_device(table.contiguous(), device), _to_device(blocks, device), len(items))

    return _sample_lists.get((device, block, per_item, tuple(numels), tuple(indexes), tuple(log2s)), build)


_sample_lists = DeviceConstants(256)


def is_aligned(*tensors: torch.Tensor) -> bool:
    """True if every tensor starts on a 16-byte boundary: the kernels may then use 128-bit loads."""
    return all(t.data_ptr() % 16 == 0 for t in tensors)


class Launch(NamedTuple):
    """One launch of a plan, with what it takes to repoint it to gradients that moved."""
    aligned: bool
    table: LaunchTable
    grad_column: Optional[int]  # the table column of the gradient's address (None: no column has it)
    grads: list  # of int: the call's gradient index of each row


def repointed(launch: Launch, grads: Sequence[torch.Tensor]) -> Optional[Launch]:
    """The launch with the address of `grads[i]` in its gradient column (gradients that moved, laid
    out as before: the rest of the plan holds), or None where an aligned launch would get an
    unaligned gradient. One [n] column set on the host and one copy of the table to the device."""
    if launch.grad_column is None:
        return launch
    ptrs = [grads[i].data_ptr() for i in launch.grads]
    if launch.aligned and any(ptr % 16 for ptr in ptrs):
        return None
    lt = launch.table
    host = lt.host.clone()
    host[:, launch.grad_column] = torch.tensor(ptrs, dtype=torch.int64)
    return launch._replace(table=lt._replace(table=_to_device(host, lt.table.device), host=host))


# ---- launch plans -------------------------------------------------------------------------------
# What a launcher derives from its tensors (dtypes, layouts, alignment, tables) costs a few
# microseconds per tensor in Python, times the passes of a step. A plan is reused while the call
# gets the same tensor objects (their ids; a weak reference per tensor drops the plan when one
# dies, so that a new tensor at the same id is never taken for it) with the same storage (one
# data_ptr per tensor and call, skipped where the caller vouches for it: storage_vouched), which
# is every step of a training loop that keeps its gradients; a new gradient object
# (zero_grad(set_to_none=True)) rebuilds the plan, and the table cache above still avoids the copy
# if the addresses are the same. Under storage_vouched, a call whose tensors the caller keeps
# alive and vouches for (GMTAdamW's steady steps) keeps its plan in the token's own store instead,
# where a comparison of ids is the whole check (no weak references, no data_ptrs, no LRU), or none
# at all for a call the caller names (a VouchedList); when only its gradients moved, the named
# call's plan is repointed (repointed: one column and one copy per table) instead of rebuilt.


class _Plan:
    __slots__ = ("ptrs", "value", "alive", "refs", "token")  # token: the vouch (token.plans) it was checked under

    def __init__(self, tensors, ptrs, value, token):
        self.ptrs, self.value, self.alive, self.token = ptrs, value, True, token
        self.refs = [weakref.ref(t, self._died) for t in tensors]

    def _died(self, _ref) -> None:
        self.alive = False


_PLAN_CACHE_SIZE = 64
_plans: "OrderedDict[tuple, _Plan]" = OrderedDict()
_data_ptr = torch.Tensor.data_ptr


def cached_plan(tensors: Sequence[torch.Tensor], extra: tuple, build: Callable[[], tuple], *, vouched: int = 0,
                lasting: bool = False, call=None, repoint: Optional[Callable[[object], object]] = None):
    """build() -> (plan, cacheable); the plan of an earlier call with these very tensors (same
    objects, same data_ptrs) and the same `extra` if there is one. vouched: the first `vouched`
    tensors are ones backends.storage_vouched covers; lasting: all of them are, and are kept alive
    by the caller while its token is used (the token's store then holds the plan); call: the
    VouchedList.call of the call's leading list, if it has one (then the plan is found by it);
    repoint(plan) -> the plan for this call's gradients, or None: for a named call whose plan the
    token has in `moved_plans` (its gradients moved, laid out as before; storage_vouched)."""
    token = vouched_token() if vouched else None
    if token is not None and lasting and vouched == len(tensors):
        if call is not None:
            key = ("call", extra, call)
            hit = token.plans.get(key)
            if hit is None:
                moved = token.moved_plans.get(key) if repoint is not None else None
                hit = repoint(moved) if moved is not None else None
                if hit is None:
                    hit, cacheable = build()
                    if not cacheable:
                        return hit
                token.plans[key] = hit
            return hit
        return _token_plan(token.plans, tensors, extra, build)
    # A vouch lasts while the token keeps its store: the caller empties it (a new dict) when the
    # gradients' storage changed, which ends what it vouched for before.
    vouch = None if token is None else token.plans
    key = (extra, tuple(map(id, tensors)))
    hit = _plans.get(key)
    if hit is not None and hit.alive:
        start = vouched if vouch is not None and hit.token is vouch else 0
        if hit.ptrs[start:] == tuple(map(_data_ptr, tensors[start:])):
            hit.token = vouch
            _plans.move_to_end(key)
            return hit.value
    value, cacheable = build()
    if cacheable:
        _plans[key] = _Plan(tensors, tuple(map(_data_ptr, tensors)), value, vouch)
        _plans.move_to_end(key)
        if len(_plans) > _PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    return value


def _token_plan(store: dict, tensors: Sequence[torch.Tensor], extra: tuple, build: Callable[[], tuple]):
    """cached_plan for tensors a storage_vouched token keeps alive with their storage: equal ids are
    the same tensors with the same storage. Keyed by the call (extra, its size and first tensor),
    so a token holds one plan per call of its step; a call whose tensors differ replaces it."""
    ids = list(map(id, tensors))
    key = (extra, len(ids), ids[0] if ids else None)
    hit = store.get(key)
    if hit is not None and hit[0] == ids:
        return hit[1]
    value, cacheable = build()
    if cacheable:
        store[key] = (ids, value)
    return value
