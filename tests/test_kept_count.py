"""SEMANTICS.md section 1: m = floor(r * N) masked entries, r read as the decimal Python prints for it.

The float 0.3 is a hair below 3/10; reading its binary value would mask 299 of 1000 entries. The
independent yardstick here is decimal.Decimal(repr(r)) with enough precision for the product to
be exact, checked against radix.kept_count (the library) and oracle.keep_count (the test oracle).
"""

from __future__ import annotations

import decimal
import math
import random
import struct

import pytest
import torch

from gmt_kernels import GMTAdamW, magnitude_threshold, radix
from oracle import keep_count


def masked_by_decimal(numel: int, r: float) -> int:
    with decimal.localcontext() as ctx:
        ctx.prec = 200  # 17 significant digits of r times a 20-digit N: every product exact
        return int((decimal.Decimal(repr(r)) * numel).to_integral_value(rounding=decimal.ROUND_FLOOR))


@pytest.mark.parametrize("numel, r, masked", [
    (1000, 0.3, 300), (1000, 0.7, 700), (100, 0.29, 29), (10, 0.1, 1), (1000, 0.9, 900),
    (3, 1 / 3, 0), (10**6, 0.999999, 999999), (7, 1.0, 7), (7, 0.0, 0), (7, 0, 0), (7, 1, 7),
])
def test_decimal_reading(numel, r, masked):
    assert radix.kept_count(numel, r) == numel - masked
    assert keep_count(numel, r) == numel - masked
    assert masked_by_decimal(numel, r) == masked


def test_binary_value_would_differ():
    """The cases above are the ones where the float's exact binary value gives another count."""
    from fractions import Fraction

    assert math.floor(Fraction(0.3) * 1000) == 299 and math.floor(Fraction(0.29) * 100) == 28
    assert math.floor(Fraction(0.7) * 1000) == 699


def _ratios(rng: random.Random):
    yield from (0.0, 1.0, 5e-324, 1e-300, 1e-7, 2.5e-7, 0.1 + 0.2, 1 - 1e-16, 0.5, 0.05)
    for _ in range(400):
        yield rng.random()  # 16-17 significant digits
    for _ in range(400):
        yield round(rng.random(), rng.randint(1, 6))  # what users type
    for _ in range(100):
        # a float just beside a short decimal: its repr is long and must not be rounded to the short one
        x = round(rng.random(), 3)
        bits = struct.unpack("<q", struct.pack("<d", x))[0] + rng.choice((-1, 1))
        y = struct.unpack("<d", struct.pack("<q", bits))[0]
        if 0.0 <= y <= 1.0:
            yield y


def test_against_decimal_over_many_ratios_and_sizes():
    rng = random.Random(12)
    sizes = [0, 1, 2, 3, 7, 10, 100, 999, 1000, 10**6, 2**31 - 1, 2**40 + 3, 10**17 + 1]
    for r in _ratios(rng):
        for numel in sizes + [rng.randrange(1, 2**50)]:
            m = masked_by_decimal(numel, r)
            assert radix.kept_count(numel, r) == numel - m, (numel, r)
            assert keep_count(numel, r) == numel - m, (numel, r)
            assert 0 <= m <= numel


def test_decimal_fraction_is_the_printed_decimal():
    from fractions import Fraction

    rng = random.Random(3)
    for r in list(_ratios(rng)) + [1e16, 1.5e20, 123.25]:
        num, den = radix.decimal_fraction(r)
        assert Fraction(num, den) == Fraction(repr(r)), r


def _distinct_grads(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = [math.prod(s) for s in shapes]
    values = (torch.randperm(sum(sizes), generator=gen).double() + 1) / sum(sizes)  # no ties
    return [v.reshape(s).float() for v, s in zip(values.split(sizes), shapes)]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("r, kept", [(0.3, 700), (0.7, 300), (0.29, 710)])
def test_optimizer_and_threshold_keep_the_decimal_count(backend, r, kept):
    """Every caller of kept_count (step, mask_stats, magnitude_threshold) sees the decimal count."""
    shapes = [(10, 30), (700,)]
    grads = _distinct_grads(shapes)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = GMTAdamW(params, lr=1e-3, mask_ratio=r, threshold="exact", backend=backend)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    assert opt.mask_stats()["global"]["kept"] == kept
    moved = sum(int((p != 0).sum()) for p in params)
    assert moved == kept
    threshold = magnitude_threshold(grads, r, backend=backend)
    assert sum(int((g >= threshold).sum()) for g in grads) == kept


def test_compiled_step_keeps_the_decimal_count():
    """kept_count runs inside GMTAdamW.step, which torch.compile traces with fullgraph=True."""
    import torch._dynamo

    torch._dynamo.reset()
    try:
        grads = _distinct_grads([(1000,)])
        param = torch.nn.Parameter(torch.zeros(1000))
        opt = GMTAdamW([param], lr=1e-3, mask_ratio=0.3, threshold="exact", backend="reference")
        param.grad = grads[0].clone()
        torch.compile(opt.step, backend="aot_eager", fullgraph=True)()
        assert int((param != 0).sum()) == 700
        assert opt.mask_stats()["global"]["kept"] == 700
    finally:
        torch._dynamo.reset()
