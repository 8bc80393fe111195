"""drop_deltas (SEMANTICS.md section 9) against an independent sort-based oracle (tests/oracle.py),
on every backend that can run here."""

from __future__ import annotations

import math

import pytest
import torch

import gmt_kernels
from gmt_kernels import drop
from gmt_kernels.backends import Backend
from oracle import drop_deltas_oracle, keep_count, random_scores_numpy

BACKENDS = ["reference", "cpu"]  # the rest of the file; test_matches_oracle also runs on triton


def _pairs(dtypes=(torch.float32, torch.bfloat16, torch.float64), seed=0, ties=False):
    """Fine-tuned and pretrained tensors: mixed dtypes, a transposed (non-contiguous) parameter, a
    0-d and an empty one. ties=True quantises the deltas to a few values."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37, 29), (64,), (), (0, 3), (11, 5, 3)]
    params, refs = [], []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        p0 = torch.randn(shape, generator=gen, dtype=torch.float64)
        delta = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.01
        if ties:
            delta = (delta * 300).round() / 300
        p, p0 = (p0 + delta).to(dtype), p0.to(dtype)
        if i == 0:  # a transposed view: entries in memory order differ from row-major order
            p, p0 = p.t().contiguous().t(), p0.t().contiguous().t()
        params.append(p)
        refs.append(p0)
    return params, refs


def _check(params, refs, drop_ratio, backend, **options):
    expected, expected_stats = drop_deltas_oracle(params, refs, drop_ratio, **options)
    work = [p.clone() for p in params]
    if not params[0].is_contiguous():
        work[0] = work[0].t().contiguous().t()  # keep the transposed layout
    stats = gmt_kernels.drop_deltas(work, refs, drop_ratio, backend=backend, **options)
    assert stats == expected_stats
    for i, (got, want) in enumerate(zip(work, expected)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), (i, (got != want).sum())
    return stats


@pytest.mark.parametrize("method", ["magnitude", "random"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("rescale", [False, True])
def test_matches_oracle(backend, method, scope, rescale):  # backend: every one (conftest)
    params, refs = _pairs()
    stats = _check(params, refs, 0.7, backend, method=method, rescale=rescale, scope=scope, seed=5)
    names = ["global"] if scope == "global" else list(range(len(params)))
    assert list(stats) == names
    for s in stats.values():  # at least k; exactly k for u within one tensor (no ties there)
        k = keep_count(s["numel"], 0.7)
        assert s["kept"] >= k and (s["kept"] == k or method == "magnitude" or scope == "global")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_ties_are_all_kept(backend, scope):
    params, refs = _pairs(dtypes=(torch.float32,), ties=True)
    stats = _check(params, refs, 0.5, backend, method="magnitude", rescale=False, scope=scope, seed=0)
    total = sum(s["kept"] for s in stats.values())
    assert total > sum(s["numel"] - s["numel"] // 2 for s in stats.values())  # ties pushed it above k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["magnitude", "random"])
@pytest.mark.parametrize("drop_ratio", [0, 0.0, 1, 1.0, 0.3])
def test_edge_ratios(backend, method, drop_ratio):
    params, refs = _pairs()
    stats = _check(params, refs, drop_ratio, backend, method=method, rescale=True, scope="global", seed=1)
    n = stats["global"]["numel"]
    if drop_ratio == 1:  # nothing kept: every tensor is its reference again
        assert stats["global"] == {"threshold": math.inf, "kept": 0, "numel": n}
    if drop_ratio == 0:  # everything kept, rescale by 1 changes nothing beyond rounding p0 + delta
        assert stats["global"]["kept"] == n


def test_decimal_drop_ratio_and_no_rescale_leaves_kept_entries_bitwise():
    """0.3 of 1000 drops 300 (the decimal reading of section 1); kept entries are not recomputed."""
    p0 = torch.zeros(1000)
    p = (torch.randperm(1000).float() + 1) * 1e-3
    work = p.clone()
    stats = gmt_kernels.drop_deltas([work], [p0], 0.3, backend="reference")
    assert stats["global"]["kept"] == 700 and int((work == 0).sum()) == 300
    assert torch.equal(work[work != 0], p[work != 0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_sampled_first_pass_and_small_chunks(backend, method, monkeypatch):
    """A scope of 2^18+ entries starts with a sampled pass; chunks of 2^12 entries split rows of
    the larger tensors. The inner histogram kernel never sees more than a chunk at a time."""
    monkeypatch.setattr(drop, "CHUNK", 1 << 12)
    seen = []
    real_resolve = drop.resolve

    def spying_resolve(name, device, dtype):
        inner = real_resolve(name, device, dtype)

        def radix_histogram(grads, scope_of, state, hist, **kwargs):
            seen.extend(g.numel() for g in grads)
            inner.radix_histogram(grads, scope_of, state, hist, **kwargs)

        return Backend(inner.name, inner.unavailable_reason, radix_histogram, inner.masked_adamw)

    monkeypatch.setattr(drop, "resolve", spying_resolve)
    gen = torch.Generator().manual_seed(3)
    refs = [torch.randn(300, 700, generator=gen), torch.randn(70000, generator=gen)]
    params = [r + torch.randn(r.shape, generator=gen) * 0.01 for r in refs]
    _check(params, refs, 0.9, backend, method=method, rescale=False, scope="global", seed=2)
    assert seen and max(seen) <= 1 << 12


def test_random_mask_is_uniform_exact_and_redrawn_per_seed():
    """DARE: exactly k entries (no ties within a tensor), spread evenly over positions, unrelated
    to |delta|, different for another seed; the same seed gives the same mask."""
    n = 1 << 14
    p0 = torch.zeros(n)
    p = torch.linspace(1, 2, n)  # |delta| grows with the position
    masks = {}
    for seed in (0, 1, 0):
        work = p.clone()
        stats = gmt_kernels.drop_deltas([work], [p0], 0.75, method="random", seed=seed, backend="cpu")
        keep = work != 0
        assert stats["global"]["kept"] == n // 4 == int(keep.sum())
        quarters = keep.view(4, -1).sum(1).double()
        assert ((quarters - n / 16).abs() < 5 * math.sqrt(n / 16)).all(), quarters  # 5 sd
        if seed in masks:
            assert torch.equal(masks[seed], keep)
        masks[seed] = keep
    overlap = int((masks[0] & masks[1]).sum())
    assert abs(overlap - n / 16) < 5 * math.sqrt(n / 16)  # independent masks share 1/16 of entries


def test_random_scores_are_the_documented_hash():
    """drop_deltas(method="random") keeps the top k of u(seed, 0, 0, index, entry), computed here
    by the numpy restatement: parameter identity (group 0, index in the list)."""
    params = [torch.ones(6, 7), torch.ones(40)]
    refs = [torch.zeros(6, 7), torch.zeros(40)]
    stats = gmt_kernels.drop_deltas(params, refs, 0.5, method="random", scope="tensor", seed=9, backend="reference")
    for i, (p, n) in enumerate(zip(params, (42, 40))):
        u = torch.from_numpy(random_scores_numpy(9, 0, 0, i, range(n)).astype("int64"))
        top = u.sort(descending=True).values[n // 2 - 1]
        assert stats[i]["threshold"] == float(top)
        assert torch.equal(p.reshape(-1) != 0, u >= top)


def test_nan_delta_counts_as_largest():
    p0 = torch.zeros(10)
    p = torch.arange(1.0, 11.0)
    p[2] = float("nan")
    stats = gmt_kernels.drop_deltas([p], [p0], 0.8, backend="reference")  # k = 2: NaN and 10
    assert stats["global"]["kept"] == 2 and stats["global"]["threshold"] == 10.0
    assert p[2].isnan() and p[9] == 10.0 and int((p == 0).sum()) == 8


def _bad_calls():
    ok = [torch.ones(3), torch.ones(2, 2)]
    ref = [torch.zeros(3), torch.zeros(2, 2)]
    yield "lengths", ok, ref[:1], {}, "1 reference"
    yield "shape", ok, [ref[0], torch.zeros(4)], {}, r"params\[1\] and reference\[1\] differ in shape"
    yield "dtype", ok, [ref[0], ref[1].double()], {}, r"params\[1\] and reference\[1\] differ in dtype"
    yield "device", ok, [ref[0], torch.zeros(2, 2, device="meta")], {}, r"params\[1\] and reference\[1\] differ in device"
    yield "int", ok + [torch.ones(2, dtype=torch.int64)], ref + [torch.zeros(2, dtype=torch.int64)], {}, r"params\[2\] and reference\[2\] have dtype"
    for r in (-0.1, 1.5, True, "0.5", math.nan):
        yield f"ratio {r!r}", ok, ref, {"drop_ratio": r}, "drop_ratio"
    yield "method", ok, ref, {"method": "dare"}, "method"
    yield "scope", ok, ref, {"scope": "group"}, "scope"
    yield "rescale", ok, ref, {"rescale": 1}, "rescale"
    yield "seed", ok, ref, {"seed": -1}, "seed"
    yield "backend", ok, ref, {"backend": "gpu"}, "backend"


@pytest.mark.parametrize("case", list(_bad_calls()), ids=lambda c: c[0])
def test_bad_arguments_change_nothing(case):
    _, params, refs, kwargs, message = case
    before = [p.clone() for p in params]
    kwargs = {"drop_ratio": 0.5} | kwargs
    with pytest.raises(ValueError, match=message):
        gmt_kernels.drop_deltas(params, refs, kwargs.pop("drop_ratio"), **kwargs)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_named_backend_that_cannot_serve_is_refused_before_any_change():
    """backend="cpu" cannot serve the second pair (meta tensors): refused before the first changes."""
    params = [torch.ones(3), torch.ones(2, device="meta")]
    refs = [torch.zeros(3), torch.zeros(2, device="meta")]
    with pytest.raises(RuntimeError, match="'cpu' cannot serve"):
        gmt_kernels.drop_deltas(params, refs, 0.5, backend="cpu")
    assert torch.equal(params[0], torch.ones(3))
