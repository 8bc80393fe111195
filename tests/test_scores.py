"""The random score u (gmt_kernels/scores.py, SEMANTICS.md section 8): exact bits against an
independent plain-int restatement of the documented formula, statistical quality, and the same
bits whatever slice (shard, block) of the entries is computed."""

from __future__ import annotations

import math

import pytest
import torch

from gmt_kernels import scores

N = 1 << 16
TWO32 = 1 << 32


# ---- an independent restatement of the formula in the module docstring (plain Python ints) ----

def _fmix(word: int) -> int:
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        word = ((word ^ (word >> shift)) * mult) % TWO32
    return word ^ (word >> 16)


def u_plain(seed: int, selection: int, group: int, position: int, entry: int) -> int:
    state = 0x243F6A88
    for word in (seed % TWO32, seed // TWO32, selection % TWO32, selection // TWO32, group, position):
        state = _fmix(state ^ word)
    entry %= 1 << 64
    t = _fmix(state ^ (entry // TWO32))
    return _fmix((_fmix(t ^ (entry % TWO32)) + t) % TWO32)


CASES = [
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (1, 0, 0, 0, 0), (7, 3, 1, 2, (1 << 40) + 5),
    (2**64 - 1, 2**64 - 1, 2**32 - 1, 2**32 - 1, 2**63 - 1), (12345, 2**33, 4, 17, TWO32 - 1),
    (12345, 2**33, 4, 17, TWO32), (0, 1, 0, 0, 0), (0, 0, 1, 0, 0), (0, 0, 0, 1, 0),
]


@pytest.mark.parametrize("case", CASES)
def test_exact_bits_against_plain_ints(case):
    *counters, entry = case
    got = scores.random_scores(*counters, torch.tensor([entry], dtype=torch.int64))
    assert got.dtype == torch.int64
    assert int(got) == u_plain(*case)


def test_docstring_test_vectors():
    """The vectors kernel authors copy from the docstring are the formula's (both implementations)."""
    doc = scores.__doc__
    assert f"random_key(0, 0, 0, 0) = {scores.random_key(0, 0, 0, 0):#010X}".replace("0X", "0x") in doc
    for case in [(0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (1, 0, 0, 0, 0), (7, 3, 1, 2, (1 << 40) + 5)]:
        shown = ", ".join("2**40 + 5" if v == (1 << 40) + 5 else str(v) for v in case)
        line = f"({shown})".ljust(27) + f"= {u_plain(*case):#010X}".replace("0X", "0x")
        assert line in doc, line


def test_many_entries_against_plain_ints():
    gen = torch.Generator().manual_seed(5)
    entries = torch.cat([
        torch.arange(64), torch.randint(0, 2**62, (64,), generator=gen),
        TWO32 - 32 + torch.arange(64),  # across the high-half boundary
    ])
    got = scores.random_scores(99, 5, 2, 3, entries)
    assert got.tolist() == [u_plain(99, 5, 2, 3, int(e)) for e in entries]


def test_deterministic_range_and_index_dtypes():
    idx = torch.arange(N)
    a = scores.random_scores(3, 1, 0, 2, idx)
    assert torch.equal(a, scores.random_scores(3, 1, 0, 2, idx))
    assert torch.equal(a, scores.random_scores(3, 1, 0, 2, idx.to(torch.int32)))
    assert int(a.min()) >= 0 and int(a.max()) < TWO32
    # within one tensor (same high half) entry -> u is a bijection: no ties
    assert a.unique().numel() == N


def _chi_square(values: torch.Tensor, buckets: int) -> float:
    counts = torch.bincount(values, minlength=buckets).double()
    expected = values.numel() / buckets
    return float(((counts - expected) ** 2 / expected).sum())


# 255 degrees of freedom: mean 255, sd 22.6; 400 is 6.4 sd (the inputs are fixed: no flaky test,
# and a hash with visible structure, e.g. u = entry, scores in the tens of thousands).
CHI2_255_LIMIT = 400.0


@pytest.mark.parametrize("start", [0, (1 << 40) - N // 2])
def test_uniform_buckets_and_bits(start):
    u = scores.random_scores(0, 0, 0, 0, torch.arange(start, start + N))
    for shift in (24, 16, 8, 0):  # every byte of the word
        assert _chi_square((u >> shift) & 0xFF, 256) < CHI2_255_LIMIT, shift
    bits = (u[:, None] >> torch.arange(32)) & 1
    ones = bits.double().mean(0)
    assert ((ones - 0.5).abs() < 0.01).all(), ones  # 5 sd for N = 2^16


def _assert_independent(a: torch.Tensor, b: torch.Tensor, what: str):
    """Pairs (a_i, b_i) look like independent uniform words: joint top-nibble chi-square, every bit
    of a ^ b balanced, no linear correlation."""
    joint = ((a >> 28) << 4) | (b >> 28)
    assert _chi_square(joint, 256) < CHI2_255_LIMIT, what
    limit = 5 * 0.5 / a.numel() ** 0.5  # 5 sd of a fraction of fair coin flips
    flips = (((a ^ b)[:, None] >> torch.arange(32)) & 1).double().mean(0)
    assert ((flips - 0.5).abs() < limit).all(), (what, flips)
    corr = torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1]
    assert abs(float(corr)) < 2 * limit, (what, float(corr))


def test_independent_across_counters_and_adjacent_entries():
    idx = torch.arange(N // 4)
    base = scores.random_scores(0, 0, 0, 0, idx)
    others = {
        "seed 1": scores.random_scores(1, 0, 0, 0, idx),
        "seed 2**32": scores.random_scores(1 << 32, 0, 0, 0, idx),
        "selection 1": scores.random_scores(0, 1, 0, 0, idx),
        "selection 2**32": scores.random_scores(0, 1 << 32, 0, 0, idx),
        "group 1": scores.random_scores(0, 0, 1, 0, idx),
        "position 1": scores.random_scores(0, 0, 0, 1, idx),
        "entries + 2**32": scores.random_scores(0, 0, 0, 0, idx + TWO32),
        "entries + 2**40": scores.random_scores(0, 0, 0, 0, idx + (1 << 40)),
    }
    for what, other in others.items():
        _assert_independent(base, other, what)
    _assert_independent(base[:-1], base[1:], "adjacent entries")
    _assert_independent(base[0::2], base[1::2], "even and odd entries")
    row = 128  # entries one row apart in a [128, 128] parameter
    _assert_independent(base[:-row], base[row:], "entries one row apart")


def test_avalanche_of_every_entry_bit():
    """Flipping any one of the 48 low bits of the entry index (both 32-bit halves) flips every
    output bit with probability close to 1/2."""
    gen = torch.Generator().manual_seed(1)
    entries = torch.randint(0, 1 << 48, (4096,), generator=gen)
    u = scores.random_scores(11, 2, 0, 5, entries)
    for bit in range(48):
        flipped = scores.random_scores(11, 2, 0, 5, entries ^ (1 << bit))
        rate = (((u ^ flipped)[:, None] >> torch.arange(32)) & 1).double().mean(0)
        assert ((rate - 0.5).abs() < 0.04).all(), (bit, rate)  # 5 sd for 4096 samples


def test_slices_and_shards_give_the_same_bits():
    """A shard computes its entries from their indices in the whole parameter: rows of a row-major
    [rows, cols] parameter (FSDP's dim-0 shards), arbitrary flat slices, blocks of a kernel."""
    rows, cols = 96, 130
    whole = scores.random_scores(4, 9, 1, 3, torch.arange(rows * cols)).view(rows, cols)
    for r0, r1 in [(0, 24), (24, 48), (48, 96), (95, 96)]:
        shard_index = r0 * cols + torch.arange((r1 - r0) * cols).view(r1 - r0, cols)
        assert torch.equal(scores.random_scores(4, 9, 1, 3, shard_index), whole[r0:r1])
    flat = whole.reshape(-1)
    for a, b in [(0, 1), (77, 1000), (5000, rows * cols)]:
        assert torch.equal(scores.random_scores(4, 9, 1, 3, torch.arange(a, b)), flat[a:b])
    big = (1 << 40) + torch.arange(3000)  # a shard of a parameter of more than 2^40 entries
    assert torch.equal(scores.random_scores(4, 9, 1, 3, big)[1000:], scores.random_scores(4, 9, 1, 3, big[1000:]))


@pytest.mark.parametrize("kwargs, name", [
    (dict(seed=-1), "seed"), (dict(seed=1 << 64), "seed"), (dict(seed=1.0), "seed"), (dict(seed=True), "seed"),
    (dict(selection=-1), "selection"), (dict(group_index=1 << 32), "group_index"), (dict(position=-3), "position"),
])
def test_bad_counters_are_refused(kwargs, name):
    args = dict(seed=0, selection=0, group_index=0, position=0) | kwargs
    with pytest.raises(ValueError, match=name):
        scores.random_scores(entry_index=torch.arange(3), **args)


def test_float_indices_are_refused():
    with pytest.raises(TypeError, match="integer tensor"):
        scores.random_scores(0, 0, 0, 0, torch.arange(3.0))


def test_bits_against_numpy_uint32_words():
    """A third restatement (tests/oracle.py: numpy uint32 arithmetic, which wraps by itself) over
    many entries, both halves of the index in play."""
    from oracle import random_scores_numpy

    gen = torch.Generator().manual_seed(8)
    entries = torch.cat([torch.arange(N), torch.randint(0, 2**63 - 1, (N,), generator=gen)])
    for counters in [(0, 0, 0, 0), (2**64 - 1, 123456789, 7, 2**32 - 1)]:
        got = scores.random_scores(*counters, entries)
        want = random_scores_numpy(*counters, entries.numpy().astype("uint64"))
        assert torch.equal(got, torch.from_numpy(want.astype("int64")))


@pytest.mark.parametrize("start, shape", [(0, (N,)), (TWO32 - 1000, (50, 100)), ((1 << 40) - 7, (3, 5)), (5, (0,))])
def test_range_form_matches_per_entry_form(start, shape):
    """random_scores_range hoists t per run of 2**32 entries (across a boundary: two runs)."""
    count = math.prod(shape)
    want = scores.random_scores(6, 2, 1, 9, torch.arange(start, start + count)).view(shape)
    assert torch.equal(scores.random_scores_range(6, 2, 1, 9, start, shape), want)
