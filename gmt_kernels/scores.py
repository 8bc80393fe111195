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


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for int64 x in [0, 2**32) and a constant c < 2**32, in int64 without
    overflow: split x into 16-bit halves so that no partial product reaches 2**63."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & MASK32


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX_MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX_MUL2)
    return x ^ (x >> 16)


def random_scores(seed: int, selection: int, group_index: int, position: int, entry_index: torch.Tensor) -> torch.Tensor:
    """u for every entry index in `entry_index` (an integer tensor, read as uint64: the entries'
    row-major positions in the whole parameter): an int64 tensor of the same shape and device
    with values in [0, 2**32). Temporaries are a few int64 tensors of entry_index's size: callers
    bound memory by passing chunks."""
    if entry_index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"random_scores takes an integer tensor of entry indices; got {entry_index.dtype}.")
    key = random_key(seed, selection, group_index, position)
    entry = entry_index.to(torch.int64)
    t = _mix(((entry >> 32) & MASK32) ^ key)
    return _mix((_mix(t ^ (entry & MASK32)) + t) & MASK32)
