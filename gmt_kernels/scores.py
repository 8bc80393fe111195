"""The random score u of SEMANTICS.md section 8 (criterion "random", DARE in drop_deltas): the
reference implementation that every kernel restates bit for bit.

u is a 32-bit counter-based hash of (seed, selection number, param group index, position in the
group, entry index), where the entry index is the entry's row-major position in the whole,
unsharded parameter. Nothing is stored or drawn from a generator, so any shard, block or thread
computes the bits of its own entries from their indices alone: every backend and every sharding
gets the same u.

The formula uses only operations on 32-bit unsigned words that C++ (uint32_t, and SIMD lanes:
_mm256_mullo_epi32 keeps the low 32 bits), Triton (uint32 tensors) and torch (int64 tensors
holding values in [0, 2**32), see _mul32) compute identically: multiplication modulo 2**32,
addition modulo 2**32, xor and logical right shift. All arithmetic below is modulo 2**32.

    mix(x):  x ^= x >> 16;  x *= 0x7FEB352D;  x ^= x >> 15;  x *= 0x846CA68B;  x ^= x >> 16
             (an xorshift-multiply finaliser: a bijection of 32-bit words in which every input
             bit flips each output bit with probability close to 1/2)

    key(seed, selection, group, position):            (once per tensor, on the host)
        h = 0x243F6A88
        for w in (seed mod 2**32, seed >> 32, selection mod 2**32, selection >> 32,
                  group, position):
            h = mix(h ^ w)
        return h

    u(entry):                                          (per entry; entry read as uint64)
        t = mix(key ^ (entry >> 32))                   (the same for 2**32 consecutive entries)
        u = mix(mix(t ^ (entry mod 2**32)) + t)

seed and selection are integers in [0, 2**64); group and position in [0, 2**32). For a fixed
key and high half, entry -> u is a bijection, so the entries of one tensor under 2**32 entries
never tie; the final add of t keeps two keys from giving one shifted sequence of values.
A kernel computes `random_key` once per tensor on the host, t once per 2**32 entries (per
block), and per entry two mixes: four 32-bit multiplies, six shifts, seven xors, one add.

Test vectors:
    random_key(0, 0, 0, 0) = 0x0A67ABAC
    u for (seed, selection, group, position, entry):
        (0, 0, 0, 0, 0)            = 0xADC7C7E4
        (0, 0, 0, 0, 1)            = 0xD8A9091F
        (1, 0, 0, 0, 0)            = 0x7101B577
        (7, 3, 1, 2, 2**40 + 5)    = 0xE4843329
(tests/test_scores.py recomputes them with an independent implementation.)
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
_MIX_MUL1, _MIX_MUL2 = 0x7FEB352D, 0x846CA68B
_KEY_START = 0x243F6A88


def _mix_int(x: int) -> int:
    x ^= x >> 16
    x = (x * _MIX_MUL1) & MASK32
    x ^= x >> 15
    x = (x * _MIX_MUL2) & MASK32
    return x ^ (x >> 16)


def _check_counter(name: str, value, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise ValueError(
            f"random score {name} must be an integer in [0, 2**{bits}); got {value!r}. "
            f"Pass a non-negative Python int below {1 << bits}."
        )
    return value


def random_key(seed: int, selection: int, group_index: int, position: int) -> int:
    """The per-tensor key of the random score (see the module docstring): a Python int in [0, 2**32)."""
    words = (
        _check_counter("seed", seed, 64) & MASK32, seed >> 32,
        _check_counter("selection", selection, 64) & MASK32, selection >> 32,
        _check_counter("group_index", group_index, 32), _check_counter("position", position, 32),
    )
    h = _KEY_START
    for w in words:
        h = _mix_int(h ^ w)
    return h


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    """x = x * c mod 2**32 in place, for int64 x in [0, 2**32) and a constant c < 2**32, without
    int64 overflow: c in 16-bit halves, so that no partial product reaches 2**48."""
    high = (x * (c >> 16)).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(c & 0xFFFF).add_(high).bitwise_and_(MASK32)


def _mix_(x: torch.Tensor) -> torch.Tensor:
    """mix() of the module docstring, in place on an int64 tensor of 32-bit words (in-place ops:
    this is the cost of the reference path, a few dozen elementwise ops per entry)."""
    x ^= x >> 16
    _mul32_(x, _MIX_MUL1)
    x ^= x >> 15
    _mul32_(x, _MIX_MUL2)
    x ^= x >> 16
    return x


def _check_index_dtype(entry_index: torch.Tensor) -> None:
    if entry_index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"random_scores takes an integer tensor of entry indices; got {entry_index.dtype}.")


def random_scores(seed: int, selection: int, group_index: int, position: int, entry_index: torch.Tensor) -> torch.Tensor:
    """u for every entry index in `entry_index` (an integer tensor, read as uint64: the entries'
    row-major positions in the whole parameter): an int64 tensor of the same shape and device
    with values in [0, 2**32). Temporaries are a few int64 tensors of entry_index's size: callers
    bound memory by passing chunks."""
    return random_scores_keyed(random_key(seed, selection, group_index, position), entry_index)


def random_scores_keyed(key, entry_index: torch.Tensor) -> torch.Tensor:
    """u(entry) of the module docstring for a tensor whose key is `key` (a Python int, or an int64
    tensor of 32-bit words that broadcasts against entry_index, e.g. a 0-d tensor on the device:
    random_keys_like computes those), for every entry index in `entry_index`."""
    _check_index_dtype(entry_index)
    entry = entry_index.to(torch.int64)
    t = _mix_(((entry >> 32) & MASK32) ^ key)
    u = _mix_((entry & MASK32) ^ t)
    return _mix_(u.add_(t).bitwise_and_(MASK32))


def random_keys_like(seed: int, selection: torch.Tensor, group_index: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """random_key for many tensors at once, on the device: `selection` an int64 tensor in
    [0, 2**63) (e.g. the optimizer's 0-d selection counter, read nowhere on the host), group_index
    and position int64 tensors in [0, 2**32) that broadcast against it. Returns int64 keys in
    [0, 2**32), bit for bit random_key(seed, selection, group, position)."""
    _check_counter("seed", seed, 64)
    words = (seed & MASK32, seed >> 32, selection & MASK32, (selection >> 32) & MASK32, group_index, position)
    h = torch.full(torch.broadcast_shapes(selection.shape, group_index.shape, position.shape), _KEY_START,
                   dtype=torch.int64, device=selection.device)
    for w in words:
        h = _mix_(h ^ w)
    return h


def random_scores_range(seed: int, selection: int, group_index: int, position: int, start: int, shape,
                        device=None) -> torch.Tensor:
    """random_scores of the entries start, start + 1, ... (row-major, as a tensor of `shape`): the
    same bits, with t computed once per run of entries that share their high 32 bits (as a kernel
    does per block) instead of per entry."""
    key = random_key(seed, selection, group_index, position)
    count = math.prod(shape)
    if start < 0 or start + count > 1 << 64:
        raise ValueError(f"entries [{start}, {start + count}) are not uint64 entry indices.")
    out = torch.empty(count, dtype=torch.int64, device=device)
    first = start
    while first < start + count:  # runs that do not cross a multiple of 2**32
        last = min(start + count, ((first >> 32) + 1) << 32)
        t = _mix_int(key ^ (first >> 32))
        u = torch.arange(first & MASK32, ((last - 1) & MASK32) + 1, dtype=torch.int64, device=device)
        u = _mix_(u.bitwise_xor_(t))
        out[first - start : last - start] = _mix_(u.add_(t).bitwise_and_(MASK32))
        first = last
    return out.view(shape)
