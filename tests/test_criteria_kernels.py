"""The kernels of SEMANTICS.md section 8 (criteria, stored masks) against an independent oracle.

Backend.radix_histogram and Backend.masked_adamw of each backend in CRITERIA_BACKENDS, for every
criterion, key format and dtype, odd sizes and many tensors, are checked against tests/oracle.py:
scores restated with numpy (IEEE float32 division, numpy uint32 words for the random score), the
histogram counted entry by entry, masks packed with numpy.packbits, and torch's own AdamW. Shapes
stay small: the Triton kernels run under the interpreter.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gmt_kernels import radix, scores
from gmt_kernels.backends import resolve
from gmt_kernels.options import GRAD, AdamWOptions, MaskSource, Scoring
from oracle import (adamw_oracle, criterion_keys, criterion_scores, histogram_oracle, kth_largest, pack_mask_numpy,
                    unpack_mask_numpy)


def cpu_at_each_level() -> list:
    """"cpu@<level>" for every CPU capability level this CPU and build run (the C++ kernels have a
    variant per level); plain "cpu" (failing loudly in resolve) when the extension is missing."""
    try:
        from gmt_kernels.backends import cpu
    except ImportError:
        return ["cpu"]
    return [f"cpu@{level}" for level in cpu.supported_capabilities()]


# The backends whose kernels implement every criterion (the others refuse them with a RuntimeError).
CRITERIA_BACKENDS = ["reference", *cpu_at_each_level(), "triton"]


def backend_of(backend_name):
    return resolve(backend_name.split("@")[0], torch.device("cpu"), torch.float32)


@pytest.fixture(autouse=True)
def _cpu_level(request):
    """Runs a "cpu@<level>" case at that level, after checking that every criterion kernel's
    dispatch takes it (as the C++ side reports it)."""
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("backend_name", "") if callspec else ""
    if "@" not in name:
        yield
        return
    from gmt_kernels.backends import cpu

    level = name.split("@")[1]
    with cpu.use_cpu_capability(level):
        kernels = cpu.kernel_capabilities()
        assert {k: v for k, v in kernels.items() if "grad_over_weight" in k or "random" in k or "stored" in k} == \
            dict.fromkeys(["histogram_grad_over_weight", "histogram_random", "masked_adamw_grad_over_weight",
                           "masked_adamw_random", "masked_adamw_stored_mask"], level)
        yield

SHAPES = [(1,), (7,), (3, 5, 7), (130,), (2, 67), ()]
SEED = 12345
SELECTION = 3
ENTRY_OFFSETS = [0, 5, 1 << 33, 7, (1 << 32) - 3, 11]  # shards start anywhere; one run crosses 2**32

# (criterion, dtypes of the tensors in turn, the scope's key format)
FORMAT_CASES = [
    ("grad", [torch.float32], "f32"),
    ("grad", [torch.float64], "f64"),
    ("grad", [torch.float16], "f16"),
    ("grad", [torch.bfloat16], "bf16"),
    ("grad", [torch.float16, torch.bfloat16], "f32"),
    ("grad", [torch.float32, torch.float64], "f64"),
    ("grad_over_weight", [torch.float32], "f32"),
    ("grad_over_weight", [torch.bfloat16], "f32"),
    ("grad_over_weight", [torch.float16, torch.bfloat16], "f32"),
    ("grad_over_weight", [torch.float64], "f64"),
    ("grad_over_weight", [torch.float32, torch.float64], "f64"),
    ("random", [torch.float32], "u32"),
    ("random", [torch.bfloat16, torch.float64], "u32"),
]


def case_id(case):
    criterion, dtypes, fmt = case
    return f"{criterion}-{'+'.join(str(d).removeprefix('torch.') for d in dtypes)}-{fmt}"


def make_tensors(dtypes, gen, special=True):
    """grads and thetas of SHAPES, dtypes in turn, with zeros, -0, denormal-ish and huge values, and
    (special=True) NaN and inf in both."""
    grads, thetas = [], []
    for i, shape in enumerate(SHAPES):
        dtype = dtypes[i % len(dtypes)]
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-6, 3, shape, generator=gen)
        th = torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-4, 2, shape, generator=gen)
        flat_g, flat_th = g.view(-1), th.view(-1)
        if flat_g.numel() >= 7:
            flat_g[0], flat_g[1], flat_th[2], flat_th[3] = 0.0, -0.0, 0.0, -0.0
            flat_g[4] = 1e-30
            if special:
                flat_g[5] = math.nan if i % 2 else math.inf
                flat_th[6] = math.nan if i % 2 else -math.inf
        grads.append(g.to(dtype))
        thetas.append(th.to(dtype))
    return grads, thetas


def scoring_for(criterion, thetas, device="cpu"):
    n = len(SHAPES)
    if criterion == "grad":
        return GRAD
    if criterion == "grad_over_weight":
        return Scoring("grad_over_weight", score_eps=1e-3, weights=thetas)
    keys = scores.random_keys_like(SEED, torch.tensor(SELECTION), torch.full((n,), 2), torch.arange(n))
    return Scoring("random", random_keys=keys.to(device), entry_offsets=torch.tensor(ENTRY_OFFSETS, device=device))


def oracle_scores(criterion, grads, thetas, fmt_name):
    return [
        criterion_scores(g, th, criterion, wide=fmt_name == "f64", **score_args(i))
        for i, (g, th) in enumerate(zip(grads, thetas))
    ]


def score_args(i):
    return dict(score_eps=1e-3, random_key_args=(SEED, SELECTION, 2, i), entry_offset=ENTRY_OFFSETS[i])


def test_key_format_of_each_criterion():
    for criterion, dtypes, name in FORMAT_CASES:
        assert radix.key_format_for(dtypes, criterion).name == name
    u32 = radix.KEY_FORMATS_BY_NAME["u32"]
    assert (u32.key_bits, u32.int_dtype, u32.threshold_dtype) == (32, torch.int64, torch.float64)
    assert u32.inf_key > u32.key_max  # no key is non-finite
    with pytest.raises(TypeError, match="floating-point gradients only"):
        radix.key_format_for([torch.int32], "random")


@pytest.mark.parametrize("backend_name", CRITERIA_BACKENDS)
@pytest.mark.parametrize("case", FORMAT_CASES, ids=case_id)
@pytest.mark.parametrize("variant", ["full", "narrow", "sampled"])
def test_histogram_matches_oracle(backend_name, case, variant):
    criterion, dtypes, fmt_name = case
    gen = torch.Generator().manual_seed(len(dtypes) * 7 + len(criterion))
    grads, thetas = make_tensors(dtypes, gen)
    fmt = radix.key_format_for([g.dtype for g in grads], criterion)
    assert fmt.name == fmt_name
    keys = [criterion_keys(g, th, criterion, fmt_name, **score_args(i)) for i, (g, th) in enumerate(zip(grads, thetas))]
    scope_of = [i % 2 for i in range(len(grads))]

    state = radix.initial_state([5, 5, 5], [100, 100, 100], [0, 0, 0], fmt)
    state[2, radix.DONE] = 1  # a finished scope counts nothing (no tensor maps to it here, nor would)
    if variant == "narrow":  # scope 1: an interval around its median key, bins 4 keys wide
        median = int(np.median(np.concatenate([k for k, s in zip(keys, scope_of) if s == 1])))
        lo = max(0, median - 2000)
        state[1, radix.LO], state[1, radix.SHIFT] = lo, 2
        state[1, radix.LAST] = min(fmt.key_max, lo + (radix.BINS << 2) - 1)
    if variant == "sampled":  # hash-picked blocks of 64 entries (the larger tensors span several)
        state[0, radix.SAMPLE], state[1, radix.SAMPLE] = 1, 2
    backend = backend_of(backend_name)
    hist = torch.full((3, radix.HIST_COLUMNS), 0, dtype=torch.int64)
    backend.radix_histogram(grads, scope_of, state, hist, key_format=fmt, scoring=scoring_for(criterion, thetas))
    expected = histogram_oracle(keys, scope_of, state, bins=radix.BINS, inf_key=fmt.inf_key)
    assert torch.equal(hist, expected), (hist - expected).nonzero()[:10].tolist()
    if criterion == "random":
        assert hist[:, radix.NONFINITE].sum() == 0


@pytest.mark.parametrize("backend_name", CRITERIA_BACKENDS)
@pytest.mark.parametrize("case", [c for c in FORMAT_CASES if c[1] != [torch.float32, torch.float64]], ids=case_id)
@pytest.mark.parametrize("sampled", [False, True])
def test_pass_loop_finds_the_kth_largest_score(backend_name, case, sampled):
    """The backend's histograms driven through radix.select_bins give the exact k-th largest score
    (sort-based) of a two-scope selection, for every criterion (finite scores)."""
    criterion, dtypes, fmt_name = case
    gen = torch.Generator().manual_seed(99)
    grads, thetas = make_tensors(dtypes, gen, special=False)
    fmt = radix.key_format_for([g.dtype for g in grads], criterion)
    scope_of = [i % 2 for i in range(len(grads))]
    all_scores = oracle_scores(criterion, grads, thetas, fmt_name)
    members = [[i for i in range(len(grads)) if scope_of[i] == s] for s in (0, 1)]
    numels = [sum(grads[i].numel() for i in m) for m in members]
    ks = [max(1, numels[0] // 3), numels[1] - 2]
    state = radix.initial_state(ks, numels, [0, 0], fmt)
    if sampled:  # small scopes never sample by themselves; force a sampled first pass
        state[:, radix.SAMPLE] = 1
    backend = backend_of(backend_name)
    scoring = scoring_for(criterion, thetas)
    for _ in range(fmt.passes(sampled)):
        hist = torch.zeros(2, radix.HIST_COLUMNS, dtype=torch.int64)
        backend.radix_histogram(grads, scope_of, state, hist, key_format=fmt, scoring=scoring)
        radix.select_bins(hist, state, fmt.key_bits)
    assert state[:, radix.DONE].tolist() == [1, 1]
    found = radix.keys_to_threshold(radix.result_keys(state), fmt)
    assert found.dtype == fmt.threshold_dtype
    for s in (0, 1):
        flat = np.concatenate([all_scores[i].astype(np.float64) for i in members[s]])
        expected = kth_largest([torch.from_numpy(flat)], ks[s])
        assert found[s].item() == expected


# --- masked_adamw ------------------------------------------------------------------------------

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False)


def update_case(criterion, dtype, gen, fmt_name):
    """Params (theta), grads, moments, steps and per-tensor thresholds that keep some, all (0) and
    none (inf) of a tensor's entries: each a score of the tensor, so ties at the threshold happen."""
    grads, params = make_tensors([dtype], gen)
    moments = [[torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype) * 1e-2 for p in params]
               for _ in range(2)]
    moments[1] = [v.abs() for v in moments[1]]
    vmax = [v * 1.5 for v in moments[1]]
    steps = [torch.tensor(float(1 + i)) for i in range(len(params))]
    all_scores = oracle_scores(criterion, grads, params, fmt_name)
    thresholds = []
    for i, s in enumerate(all_scores):
        finite = np.sort(s[np.isfinite(s)].astype(np.float64))
        thresholds.append(0.0 if i == 1 else math.inf if i == 3 else float(finite[len(finite) * 2 // 5]))
    tdtype = torch.float64 if fmt_name in ("f64", "u32") else torch.float32
    return params, grads, moments, vmax, steps, torch.tensor(thresholds, dtype=tdtype), all_scores


def identical(a, b) -> bool:
    """Same bits (NaN equal to NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def clone_all(tensors):
    return [t.clone() for t in tensors]


def oracle_keep(all_scores, thresholds, shapes):
    keeps = []
    for s, t, shape in zip(all_scores, thresholds.tolist(), shapes):
        s = s.astype(np.float64)
        keeps.append(torch.from_numpy((s >= t) | np.isnan(s)).reshape(shape))
    return keeps


def run_update(backend_name, criterion, params, grads, moments, vmax, steps, thresholds, *, mask_mode,
               masks=(), refresh=None, update_params=True, skip=None):
    backend = backend_of(backend_name)
    kept = torch.full((len(params),), 3, dtype=torch.int64)
    scoring = scoring_for(criterion, params)
    if criterion == "grad_over_weight":  # masked_adamw reads theta from params
        scoring = Scoring("grad_over_weight", score_eps=scoring.score_eps)
    backend.masked_adamw(params, grads, moments[0], moments[1], vmax, steps, kept,
                         options=AdamWOptions(**HYPER, mask_mode=mask_mode, skip=skip),
                         mask=MaskSource(thresholds, scoring, masks=masks, refresh=refresh, update_params=update_params))
    return kept - 3


def assert_close_all(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m: f"{what}[{i}]: {m}")


@pytest.mark.parametrize("backend_name", CRITERIA_BACKENDS)
@pytest.mark.parametrize("criterion", ["grad", "grad_over_weight", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mask_mode", ["grad", "freeze"])
def test_masked_adamw_matches_oracle(backend_name, criterion, dtype, mask_mode):
    gen = torch.Generator().manual_seed(7)
    fmt_name = radix.key_format_for([dtype], criterion).name
    params, grads, moments, vmax, steps, thresholds, all_scores = update_case(criterion, dtype, gen, fmt_name)
    keeps = oracle_keep(all_scores, thresholds, [p.shape for p in params])
    expected = [adamw_oracle(p, g, m, v, vm, st, keep, mask_mode=mask_mode, **HYPER)
                for p, g, m, v, vm, st, keep in zip(params, grads, moments[0], moments[1], vmax, steps, keeps)]
    kept = run_update(backend_name, criterion, params, grads, moments, vmax, steps, thresholds, mask_mode=mask_mode)
    assert kept.tolist() == [int(k.sum()) for k in keeps]
    assert kept[1] == grads[1].numel() and kept[3] == int(np.isnan(all_scores[3].astype(np.float64)).sum())  # inf keeps NaN only
    for what, index in (("param", 0), ("exp_avg", 1), ("exp_avg_sq", 2), ("max_exp_avg_sq", 3)):
        ours = (params, moments[0], moments[1], vmax)[index]
        assert_close_all(ours, [e[index] for e in expected], what)


@pytest.mark.parametrize("backend_name", CRITERIA_BACKENDS)
@pytest.mark.parametrize("criterion", ["grad", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["shared", "strided"])
def test_masked_adamw_takes_the_scopes_rows_as_views(backend_name, criterion, dtype, layout):
    """thresholds and kept as views of per-scope rows, as the optimizer passes them: "shared", one
    row expanded to every tensor (stride 0: all counts add up in it); "strided", every other row."""
    gen = torch.Generator().manual_seed(10)
    fmt_name = radix.key_format_for([dtype], criterion).name
    params, grads, moments, vmax, steps, thresholds, all_scores = update_case(criterion, dtype, gen, fmt_name)
    n = len(params)
    if layout == "shared":
        thresholds = thresholds[:1].expand(n)
        rows = torch.tensor([-1.0, float(thresholds[0]), -1.0], dtype=thresholds.dtype)  # junk around the row
        threshold_view, counters = rows[1:2].expand(n), torch.full((3,), 5, dtype=torch.int64)
        kept_view = counters[1:2].expand(n)
    else:
        rows = torch.full((2 * n,), -1.0, dtype=thresholds.dtype)
        rows[::2] = thresholds
        threshold_view, counters = rows[::2], torch.full((2 * n,), 5, dtype=torch.int64)
        kept_view = counters[::2]
    keeps = oracle_keep(all_scores, thresholds, [p.shape for p in params])
    expected = [adamw_oracle(p, g, m, v, vm, st, keep, mask_mode="grad", **HYPER)
                for p, g, m, v, vm, st, keep in zip(params, grads, moments[0], moments[1], vmax, steps, keeps)]
    scoring = scoring_for(criterion, params)
    backend_of(backend_name).masked_adamw(params, grads, moments[0], moments[1], vmax, steps, kept_view,
                                          options=AdamWOptions(**HYPER), mask=MaskSource(threshold_view, scoring))
    counts = [int(k.sum()) for k in keeps]
    if layout == "shared":
        assert counters.tolist() == [5, 5 + sum(counts), 5]
    else:
        assert counters.tolist() == [x for c in counts for x in (5 + c, 5)]
    assert_close_all(params, [e[0] for e in expected], "param")
    assert_close_all(moments[0], [e[1] for e in expected], "exp_avg")


MASK_VARIANTS = ["write", "refresh-true", "read", "select", "skip"]


@pytest.mark.parametrize("backend_name", CRITERIA_BACKENDS)
@pytest.mark.parametrize("criterion", ["grad", "grad_over_weight", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", MASK_VARIANTS)
def test_masked_adamw_with_stored_masks(backend_name, criterion, dtype, variant):
    """write: refresh None writes every keep bit; refresh-true: the same; read: refresh false keeps
    the stored bits whatever the scores, masks unchanged; select: update_params=False writes masks
    and kept only; skip: nothing changes, masks included, nothing counted."""
    gen = torch.Generator().manual_seed(8)
    fmt_name = radix.key_format_for([dtype], criterion).name
    params, grads, moments, vmax, steps, thresholds, all_scores = update_case(criterion, dtype, gen, fmt_name)
    shapes = [p.shape for p in params]
    rule = oracle_keep(all_scores, thresholds, shapes)
    stored = [torch.rand(shape, generator=gen) < 0.5 for shape in shapes]
    masks = [pack_mask_numpy(s) for s in stored]
    assert [tuple(m.shape) for m in masks] == [(s[0] if s else 1, -(-(math.prod(s) // (s[0] if s else 1)) // 8))
                                               for s in shapes]
    before = [clone_all(x) for x in (params, moments[0], moments[1], vmax, masks)]
    refresh = {"refresh-true": torch.tensor(True), "read": torch.tensor(False)}.get(variant)
    keeps = stored if variant == "read" else rule
    kept = run_update(backend_name, criterion, params, grads, moments, vmax, steps, thresholds, mask_mode="freeze",
                      masks=masks, refresh=refresh, update_params=variant != "select",
                      skip=torch.tensor(variant == "skip"))
    if variant == "skip":
        assert kept.tolist() == [0] * len(params)
        for now, then in zip((params, moments[0], moments[1], vmax, masks), before):
            assert all(identical(a, b) for a, b in zip(now, then))
        return
    assert kept.tolist() == [int(k.sum()) for k in keeps]
    expected_masks = [pack_mask_numpy(k) for k in keeps]
    assert all(torch.equal(m, e) for m, e in zip(masks, expected_masks))
    assert all(torch.equal(unpack_mask_numpy(m, s), k) for m, s, k in zip(masks, shapes, keeps))
    if variant == "select":
        for now, then in zip((params, moments[0], moments[1], vmax), before):
            assert all(identical(a, b) for a, b in zip(now, then))
        return
    expected = [adamw_oracle(p, g, m, v, vm, st, keep, mask_mode="freeze", **HYPER)
                for p, g, m, v, vm, st, keep in zip(*before[:1], grads, *before[1:4], steps, keeps)]
    assert_close_all(params, [e[0] for e in expected], "param")
    assert_close_all(moments[0], [e[1] for e in expected], "exp_avg")


@pytest.mark.parametrize("backend_name", CRITERIA_BACKENDS)
def test_random_scores_do_not_read_the_gradient(backend_name):
    """A random mask depends on (seed, selection, tensor, entry) only: other gradient values, NaN
    included, keep exactly the same entries."""
    gen = torch.Generator().manual_seed(9)
    params, grads, moments, vmax, steps, thresholds, _ = update_case("random", torch.float32, gen, "u32")
    masks_a = [pack_mask_numpy(torch.zeros(p.shape, dtype=torch.bool)) for p in params]
    masks_b = clone_all(masks_a)
    kw = dict(mask_mode="grad", update_params=False)
    run_update(backend_name, "random", clone_all(params), grads, [clone_all(m) for m in moments], clone_all(vmax),
               steps, thresholds, masks=masks_a, **kw)
    other = [torch.full_like(g, math.nan) if i % 2 else torch.randn(g.shape, generator=gen) for i, g in enumerate(grads)]
    run_update(backend_name, "random", clone_all(params), other, [clone_all(m) for m in moments], clone_all(vmax),
               steps, thresholds, masks=masks_b, **kw)
    assert all(torch.equal(a, b) for a, b in zip(masks_a, masks_b))
    assert sum(int(m.sum()) for m in masks_a) > 0


def test_device_keys_equal_the_host_key():
    selection = torch.tensor([0, 1, 5, (1 << 40) + 3])
    for seed in (0, 7, (1 << 63) + 5):
        keys = scores.random_keys_like(seed, selection[:, None], torch.tensor([0, 3]), torch.tensor([2, 0]))
        for a, sel in enumerate(selection.tolist()):
            for b, (group, pos) in enumerate([(0, 2), (3, 0)]):
                assert keys[a, b].item() == scores.random_key(seed, sel, group, pos)


def test_mask_layout_of_every_shape_matches_numpy_packbits():
    """masks.pack / unpack / mask_shape against numpy, shards without rows (FSDP2's uneven
    dim-0 shards) and 0-d parameters included."""
    from gmt_kernels import masks

    gen = torch.Generator().manual_seed(3)
    for shape in [(0,), (0, 48), (5,), (), (3, 17), (2, 8), (2, 0), (4, 3, 5)]:
        keep = torch.rand(shape, generator=gen) < 0.5
        packed = masks.pack(keep)
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == masks.mask_shape(shape)
        assert torch.equal(packed, pack_mask_numpy(keep)), shape
        assert torch.equal(masks.unpack(packed, shape), keep)
