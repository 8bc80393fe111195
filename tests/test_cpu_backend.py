"""The C++ CPU backend (csrc/, gmt_kernels.backends.cpu) op by op against the reference backend,
plus proof that a built extension is what backend="auto" runs on CPU.

The behavioural suite (test_semantics.py) already runs every SEMANTICS.md rule on backend "cpu";
these tests aim at what only a C++ kernel can get wrong: thread ranges that cross tensor
boundaries, dense layouts that are not contiguous, every dtype / key-format pair, every flag of
the update, and int32 counters. The kernel tests run at every CPU capability level this machine
has (the `capability` fixture; its id says which level ran, and each run checks that the C++
dispatch really took that level); the reference results they compare with are computed once per
case. A missing extension fails this module at import, with the reason.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from calls import GRAD_HISTOGRAM_SCHEMA_ARGS, flat_masked_adamw
from test_cpu_capability import VECTOR_KERNELS
from gmt_kernels import GMTAdamW, radix
from gmt_kernels.backends import cpu, reference

# Above the kernels' per-thread grain (2^16), so two threads split these and a range ends mid-tensor.
SIZES = [70001, 0, 1, 3, 65536, 100003]


def scores(n, dtype, case, gen):
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    if case == "wide":  # forty decades, denormals and zeros, signs mixed
        x = x * torch.pow(10.0, torch.empty(n, dtype=torch.float64).uniform_(-30, 10, generator=gen))
        x[:: 97] = 0.0
    elif case == "nonfinite":
        x[:: 1013] = float("nan")
        x[5 :: 2027] = float("inf")
        x[7 :: 4051] = -float("inf")
    elif case == "ties":
        x = torch.randint(-3, 4, (n,), generator=gen).double()
    return x.to(dtype)


def numpy_keys(t: torch.Tensor, fmt: radix.KeyFormat) -> np.ndarray:
    """Keys computed without torch: |x| widened by numpy to the format's float type, bits as int."""
    if fmt.name == "bf16":  # a 15-bit key: the bits of |x| in bfloat16 itself
        return (t.reshape(-1).view(torch.int16).numpy().astype(np.int64) & 0x7FFF)
    np_float = {"f16": np.float16, "f32": np.float32, "f64": np.float64}[fmt.name]
    np_int = {"f16": np.int16, "f32": np.int32, "f64": np.int64}[fmt.name]
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: a bfloat16 is the top half of a float32
        bits = t.reshape(-1).view(torch.int16).numpy().astype(np.int64) & 0x7FFF
        values = (bits << 16).astype(np.int32).view(np.float32)
    else:
        values = np.abs(t.reshape(-1).numpy())
    return values.astype(np_float).view(np_int).astype(np.int64)


def run_passes(backend, grads, scope_of, ks, fmt, select):
    """Every pass of an exact selection driven by `backend` and `select`: (state seen, histogram) each."""
    numels = [sum(g.numel() for g, s in zip(grads, scope_of) if s == row) for row in range(len(ks))]
    state = radix.initial_state(ks, numels, [0] * len(ks), fmt)
    seen = []
    for _ in range(radix.max_passes(fmt, numels)):
        hist = torch.zeros(len(ks), radix.HIST_COLUMNS, dtype=torch.int64)
        backend.radix_histogram(grads, scope_of, state, hist, key_format=fmt)
        seen.append((state.clone(), hist))
        select(hist, state, fmt.key_bits)
    return seen, state


FORMAT_CASES = [  # (gradient dtypes, in order), their key format follows from radix.key_format_for
    [torch.float32],
    [torch.float64],
    [torch.float16],
    [torch.bfloat16],
    [torch.float16, torch.bfloat16, torch.float32],  # meet in f32
    [torch.float32, torch.float16, torch.float64, torch.bfloat16],  # meet in f64
]


@pytest.fixture(params=cpu.supported_capabilities())
def capability(request):
    """Every CPU capability level this CPU and build can run (the C++ kernels have a variant per
    level); a level the machine lacks is not collected (tests/test_cpu_capability.py checks that the
    list matches the CPU's flags). Asserts that the dispatch takes the level, then runs the test at it."""
    level = request.param
    with cpu.use_cpu_capability(level):
        kernels = cpu.kernel_capabilities()
        assert {k: v for k, v in kernels.items() if k != "histogram_f64_keys"} == dict.fromkeys(VECTOR_KERNELS, level)
        yield level


_REFERENCE_RESULTS = {}


def cached_reference(key, compute):
    """The reference backend's result for one test case, computed once for all capability levels."""
    if key not in _REFERENCE_RESULTS:
        _REFERENCE_RESULTS[key] = compute()
    return _REFERENCE_RESULTS[key]


@pytest.fixture(params=["full", "sampled"])
def first_pass(request, monkeypatch):
    """Scopes of SIZES are too small to sample by default; with SAMPLE_MIN_BLOCKS = 1 they start
    with a sampled pass, and the bracket of so small a sample often misses: every branch runs."""
    if request.param == "sampled":
        monkeypatch.setattr(radix, "SAMPLE_MIN_BLOCKS", 1)
    return request.param


@pytest.mark.parametrize("dtypes", FORMAT_CASES, ids=lambda d: "+".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("case", ["normal", "wide", "nonfinite", "ties"])
def test_histograms_equal_reference_every_pass(dtypes, case, capability, first_pass):
    gen = torch.Generator().manual_seed(1)
    grads = [scores(n, dtypes[i % len(dtypes)], case, gen) for i, n in enumerate(SIZES)]
    scope_of = [0, 1, 0, 1, 1, 0]
    fmt = radix.key_format_for(dtypes)
    ks = [radix.kept_count(SIZES[0] + SIZES[2] + SIZES[5], 0.3), radix.kept_count(SIZES[1] + SIZES[3] + SIZES[4], 0.9)]
    ours, our_state = run_passes(cpu, grads, scope_of, ks, fmt, torch.ops.gmt_kernels.radix_select)
    theirs, their_state = cached_reference(
        ("passes", tuple(dtypes), case, first_pass),
        lambda: run_passes(reference, grads, scope_of, ks, fmt, radix.select_bins),
    )
    for (state, hist), (ref_state, ref_hist) in zip(ours, theirs):
        assert torch.equal(state, ref_state)
        for row in range(len(ks)):
            # NaN keys may differ in their low bits: torch itself widens a float16 NaN to 0x7fffffff
            # on its scalar path and to 0x7fc00000 on its vector path. Which bin of the non-finite
            # keys a NaN lands in changes no threshold (NaN scores are all kept); how many there are does.
            lo, last, shift = (int(state[row, c]) for c in (radix.LO, radix.LAST, radix.SHIFT))
            cut = radix.BINS if last < fmt.inf_key else max(0, (fmt.inf_key - lo) >> shift)
            assert torch.equal(hist[row, :cut], ref_hist[row, :cut])
            assert hist[row, cut : radix.BINS].sum() == ref_hist[row, cut : radix.BINS].sum()
            assert torch.equal(hist[row, radix.BINS :], ref_hist[row, radix.BINS :])
    assert torch.equal(our_state, their_state)
    assert our_state[:, radix.DONE].all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_first_pass_counts_numpy_keys(dtype, capability):
    """Independent of the reference: bins, ABOVE and NONFINITE of keys computed by numpy, for the
    whole key range (a first pass) and for intervals inside it."""
    gen = torch.Generator().manual_seed(2)
    grads = [scores(n, dtype, case, gen) for n, case in zip(SIZES, ["wide", "nonfinite"] * 3)]
    fmt = radix.key_format_for([dtype])
    keys = np.concatenate([numpy_keys(g, fmt) for g in grads])
    finite = keys[keys < fmt.inf_key]
    lo, last = int(np.quantile(finite, 0.4)), int(np.quantile(finite, 0.45))
    # The whole range (a first pass), an interval inside it, and one from key 0 (exact zeros inside:
    # the vector levels count zeros apart then).
    for interval in [(0, fmt.key_max), (lo, last), (0, last)]:
        state = radix.initial_state([1], [len(keys)], [0], fmt)
        state[0, radix.SAMPLE] = 0
        state[0, radix.LO], state[0, radix.LAST] = interval
        shift = max(0, (interval[1] - interval[0]).bit_length() - radix.RADIX_BITS)
        state[0, radix.SHIFT] = shift
        hist = torch.zeros(1, radix.HIST_COLUMNS, dtype=torch.int64)
        cpu.radix_histogram(grads, [0] * len(grads), state, hist, key_format=fmt)
        inside = keys[(keys >= interval[0]) & (keys <= interval[1])]
        expected = np.bincount((inside - interval[0]) >> shift, minlength=radix.BINS)
        assert hist[0, : radix.BINS].tolist() == expected.tolist()
        assert hist[0, radix.ABOVE] == int((keys > interval[1]).sum())
        assert hist[0, radix.NONFINITE] == int((keys >= fmt.inf_key).sum())


def test_sampled_pass_counts_the_hashed_blocks(capability):
    """A sampled pass counts exactly the entries of the blocks radix.sampled_blocks picks, per
    tensor and by memory order, and nothing else."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(50, 3000, generator=gen)
    grads = [base.t(), torch.randn(70001, generator=gen), torch.randn(5, generator=gen)]  # a dense transpose first
    fmt = radix.KEY_FORMATS[torch.float32]
    state = radix.initial_state([10], [sum(g.numel() for g in grads)], [0], fmt)
    state[0, radix.SAMPLE] = 2
    hist = torch.zeros(1, radix.HIST_COLUMNS, dtype=torch.int64)
    cpu.radix_histogram(grads, [0, 0, 0], state, hist, key_format=fmt)
    picked = []
    for index, g in enumerate([base.reshape(-1), grads[1], grads[2]]):  # memory order
        block = torch.arange(g.numel()) // radix.SAMPLE_BLOCK
        picked.append(g[radix.sampled_blocks(block, index, 2)])
    keys = radix.score_keys(torch.cat(picked), fmt)
    assert 0 < keys.numel() < sum(g.numel() for g in grads) // 2
    shift = fmt.key_bits - radix.RADIX_BITS
    assert torch.equal(hist[0, : radix.BINS], torch.bincount(keys >> shift, minlength=radix.BINS))


def test_histogram_reads_strided_layouts_and_skips_done_scopes(capability):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(300, 500, generator=gen)
    transposed = base.t()  # dense, not contiguous: read in memory order
    sliced = base[:, ::3]  # gappy: read through a copy
    fmt = radix.KEY_FORMATS[torch.float32]
    state = radix.initial_state([10, 10], [200000, 150000], [0, 0], fmt)
    state[0, radix.LO], state[0, radix.SHIFT] = 1 << 29, 20  # an interval, not the whole range
    state[1, radix.DONE] = 1
    hist = torch.zeros(2, radix.HIST_COLUMNS, dtype=torch.int64)
    cpu.radix_histogram([transposed, sliced, base], [0, 0, 1], state, hist, key_format=fmt)
    expected = torch.zeros_like(hist)
    reference.radix_histogram([transposed, sliced.contiguous()], [0, 0], state, expected, key_format=fmt)
    assert torch.equal(hist, expected)
    assert hist[0, : radix.ABOVE + 1].sum() == transposed.numel() + sliced.numel() and hist[1].sum() == 0


def test_histogram_rejects_bad_arguments_with_reasons():
    g = [torch.randn(10)]
    fmt = radix.KEY_FORMATS[torch.float32]
    state = radix.initial_state([3], [10], [0], fmt)
    hist = torch.zeros(1, radix.HIST_COLUMNS, dtype=torch.int64)
    ops = torch.ops.gmt_kernels
    with pytest.raises(RuntimeError, match="unknown key_format 'f8'"):
        ops.radix_histogram(g, [0], state, hist, "f8", **GRAD_HISTOGRAM_SCHEMA_ARGS)
    with pytest.raises(RuntimeError, match="cannot be scored by criterion 'grad' in key format f16"):
        ops.radix_histogram(g, [0], radix.initial_state([3], [10], [0], radix.KEY_FORMATS[torch.float16]), hist, "f16", **GRAD_HISTOGRAM_SCHEMA_ARGS)
    with pytest.raises(RuntimeError, match=rf"hist must be .*\[1, {radix.HIST_COLUMNS}\]"):
        ops.radix_histogram(g, [0], state, hist[:, : radix.BINS], "f32", **GRAD_HISTOGRAM_SCHEMA_ARGS)
    with pytest.raises(RuntimeError, match=r"state must be .*\[scopes, 10\]"):
        ops.radix_histogram(g, [0], state[:, :3], hist, "f32", **GRAD_HISTOGRAM_SCHEMA_ARGS)
    with pytest.raises(RuntimeError, match="scope_of\\[0\\] = 4 is not a row of state"):
        ops.radix_histogram(g, [4], state, hist, "f32", **GRAD_HISTOGRAM_SCHEMA_ARGS)
    bad = state.clone()
    bad[0, radix.SHIFT] -= 1  # the whole key range in twice as many bins as there are
    with pytest.raises(RuntimeError, match=f"is not an interval of 31-bit keys in at most {radix.BINS} bins"):
        ops.radix_histogram(g, [0], bad, hist, "f32", **GRAD_HISTOGRAM_SCHEMA_ARGS)


# --- radix_select: the C++ copy of radix.select_bins (random states: test_select_kernels.py) ----


def test_cpp_constants_match_radix_py():
    """csrc/radix.h restates radix.py's layout and sample constants; they must agree."""
    header = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "radix.h")).read()
    def constant(name):
        import re
        return float(re.search(rf"{name} = ([0-9.]+)", header).group(1))
    assert constant("kRadixBits") == radix.RADIX_BITS and constant("kSampleBlock") == radix.SAMPLE_BLOCK
    assert constant("kSampleSigmas") == radix.SAMPLE_SIGMAS
    assert "kSampleDesignEffect = double(kSampleBlock)" in header and radix.SAMPLE_DESIGN_EFFECT == radix.SAMPLE_BLOCK
    assert "LO, LAST, SHIFT, SAMPLE, DONE, K, NUMEL, SLACK, KNOWN_LO, KNOWN_LAST, kStateColumns" in header
    assert [radix.LO, radix.KNOWN_LAST, radix.STATE_COLUMNS] == [0, 9, 10]
    assert "0x9E3779B1" in header and "0x85EBCA77" in header


# --- masked_adamw ---------------------------------------------------------------------------------


def update_inputs(dtype, *, amsgrad, nan, gen, threshold_dtype):
    params = [scores(n, dtype, "normal", gen) for n in SIZES]
    grads = [scores(n, dtype, "nonfinite" if nan else "normal", gen) * 0.1 for n in SIZES]
    exp_avgs = [scores(n, dtype, "normal", gen) * 0.01 for n in SIZES]
    exp_avg_sqs = [scores(n, dtype, "normal", gen).abs() * 1e-4 for n in SIZES]
    max_sqs = [v * 1.5 for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.tensor(float(s)) for s in (1, 2, 3, 7, 10, 1000)]
    # Thresholds the gradient dtype holds exactly, so that gradients can tie with them: every fifth
    # entry (past the NaN of index 0) is +-its threshold, kept by the rule's >= (a > would mask it).
    thresholds = torch.tensor([0.05, 0.0, float("inf"), 0.1, 0.07, 0.12]).to(dtype).to(threshold_dtype)
    for g, t in zip(grads, thresholds.tolist()):
        if math.isfinite(t):
            g[1::5] = t
            g[6::10] = -t
    return params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, thresholds


# The reference's torch ops round a few intermediate results differently (torch's vector lerp uses
# an FMA): parameters of size ~1 may differ in their last bit.
UPDATE_TOL = {torch.float32: (1e-6, 1e-7), torch.float64: (1e-13, 1e-15), torch.float16: (1e-3, 1e-6),
              torch.bfloat16: (8e-3, 1e-6)}


def assert_updates_match(dtype, case, flags, *, nan=False, threshold_dtype=None, layout=None):
    """The C++ update of update_inputs at the current capability level against the reference backend's
    (computed once per case); returns the kept counts and the inputs the update started from."""
    amsgrad = flags.get("amsgrad", False)
    threshold_dtype = threshold_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)

    def fresh_inputs():
        gen = torch.Generator().manual_seed(4)
        return update_inputs(dtype, amsgrad=amsgrad, nan=nan, gen=gen, threshold_dtype=threshold_dtype)

    kwargs = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False, maximize=False,
                  mask_mode="grad", grad_scale=None, skip=None)
    kwargs.update(flags)

    def run_reference():
        inputs, kept_ref = fresh_inputs(), torch.zeros(len(SIZES), dtype=torch.int64)
        flat_masked_adamw(reference.masked_adamw, *inputs, kept_ref, **kwargs)
        return inputs, kept_ref

    expected_state, kept_ref = cached_reference(("update", dtype, case, nan, threshold_dtype), run_reference)
    before = fresh_inputs()
    ours = [[t.clone() for t in group] if isinstance(group, list) else group.clone() for group in before]
    if layout is not None:
        ours = layout(ours)
    kept = torch.full((len(SIZES),), 5, dtype=torch.int64)  # the op adds to it
    flat_masked_adamw(cpu.masked_adamw, *ours, kept, **kwargs)
    assert (kept - 5).tolist() == kept_ref.tolist()
    rtol, atol = UPDATE_TOL[dtype]
    for name, mine, expected in zip(["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"], ours, expected_state):
        for i, (a, b) in enumerate(zip(mine, expected)):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{name}[{i}]: {m}")
    return kept - 5, before


FLAG_CASES = {
    "plain": {},
    "freeze": {"mask_mode": "freeze"},
    "amsgrad": {"amsgrad": True},
    "amsgrad_freeze_maximize": {"amsgrad": True, "mask_mode": "freeze", "maximize": True},
    "grad_scale_pow2": {"grad_scale": torch.tensor(1024.0)},
    "grad_scale_odd_beta1_large": {"grad_scale": torch.tensor(3.0), "beta1": 0.3},
    "tensor_lr": {"lr": torch.tensor(3e-3)},
    "tensor_lr_f64_no_decay": {"lr": torch.tensor(3e-3, dtype=torch.float64), "weight_decay": 0.0},
    "not_skipped": {"skip": torch.tensor(False)},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_update_equals_reference(dtype, case, capability):
    assert_updates_match(dtype, case, FLAG_CASES[case])


@pytest.mark.parametrize("mask_mode", ["grad", "freeze"])
def test_update_with_nan_and_inf_gradients(mask_mode, capability):
    kept, inputs = assert_updates_match(torch.float32, f"nan-{mask_mode}", {"mask_mode": mask_mode, "amsgrad": True},
                                        nan=True)
    grads, thresholds = inputs[1], inputs[6]
    # Counted by numpy: entries with |g| >= threshold, or NaN (scores() puts a NaN at index 0 of
    # every tensor, so tensor 2, one entry under a threshold of +inf, keeps exactly that one).
    expected = [int(((np.abs(g.numpy()) >= float(t)) | np.isnan(g.numpy())).sum()) for g, t in zip(grads, thresholds)]
    assert kept.tolist() == expected
    assert expected[2] == 1 and 0 < expected[0] < SIZES[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_update_compares_in_float64_thresholds(dtype, capability):
    """A float32/float16 parameter of a float64 scope: |g| is compared in float64, as the reference."""
    assert_updates_match(dtype, "f64-thresholds", {"mask_mode": "freeze"}, threshold_dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float64_threshold_between_floats_keeps_what_a_float64_compare_keeps(dtype, capability):
    """The kernels compare a float32-computed |g| with a float64 threshold through the least float
    >= it; entries one ulp either side of thresholds that fall between, on and just above floats."""
    base = torch.tensor(0.1, dtype=dtype)
    below, above = (torch.nextafter(base, torch.tensor(x, dtype=dtype)) for x in (0.0, 1.0))
    g = torch.stack([below, base, above, -below, -base, -above]).repeat(7)  # 42 entries: vector body and tail
    f = float(base)
    for t in [0.1, f, np.nextafter(f, 1.0), np.nextafter(f, 0.0), float(above), float("inf"), 0.0]:
        kept = torch.zeros(1, dtype=torch.int64)
        p, m, v = torch.zeros_like(g), torch.zeros_like(g), torch.zeros_like(g)
        flat_masked_adamw(cpu.masked_adamw, [p], [g], [m], [v], [], [torch.tensor(1.0)], torch.tensor([t], dtype=torch.float64), kept,
                         lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                         mask_mode="freeze", grad_scale=None, skip=None)
        expected = int((np.abs(g.double().numpy()) >= t).sum())
        assert int(kept) == expected, f"threshold {t!r}"
        assert int((m != 0).sum()) == expected  # freeze: exactly the kept entries moved


@pytest.mark.parametrize("threshold_dtype", [torch.float32, torch.float64])
def test_update_reads_thresholds_in_any_stride_and_scalars_of_any_dtype(threshold_dtype):
    """The C++ op reads its thresholds where they lie (a strided view; no copy) and its one-element
    step counts, grad_scale and skip in their own dtypes: the same update as contiguous thresholds
    and float32 scalars."""
    from gmt_kernels.options import AdamWOptions, MaskSource

    gen = torch.Generator().manual_seed(8)
    sizes = [100, 7, 1000]
    grads = [torch.randn(n, generator=gen) for n in sizes]

    def run(thresholds, steps, grad_scale, skip):
        params = [torch.ones(n) for n in sizes]
        m, v = [torch.zeros(n) for n in sizes], [torch.zeros(n) for n in sizes]
        kept = torch.zeros(len(sizes), dtype=torch.int64)
        options = AdamWOptions(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, grad_scale=grad_scale,
                               skip=skip)
        cpu._OPS.masked_adamw(params, grads, m, v, [], steps, thresholds, kept, [], **options.schema_args(),
                              **MaskSource(thresholds).schema_args())
        return params + m + v, kept

    values = [0.3, 0.8, 1.2]
    interleaved = torch.tensor([x for t in values for x in (t, 99.0)], dtype=threshold_dtype)
    contiguous = torch.tensor(values, dtype=threshold_dtype)
    expected, expected_kept = run(contiguous, [torch.tensor(float(s)) for s in (1, 3, 7)], torch.tensor(2.0),
                                  torch.tensor(False))
    got, kept = run(interleaved[::2], [torch.tensor(1, dtype=torch.int64), torch.tensor([3.0], dtype=torch.float64),
                                       torch.tensor(7.0, dtype=torch.bfloat16)],
                    torch.tensor([2.0], dtype=torch.float64), torch.tensor(0))
    assert torch.equal(kept, expected_kept)
    assert kept.tolist() == [int((g.abs() >= t).sum()) for g, t in zip(grads, values)]  # scores of the scaled g
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    _, skipped_kept = run(contiguous, [torch.tensor(1.0)] * 3, None, torch.tensor(2, dtype=torch.int64))
    assert skipped_kept.sum() == 0  # any nonzero skip skips


def test_skip_changes_nothing_and_counts_nothing():
    gen = torch.Generator().manual_seed(5)
    params, grads, m, v, vmax, steps, thresholds = update_inputs(torch.float32, amsgrad=True, nan=False, gen=gen,
                                                                 threshold_dtype=torch.float32)
    before = [t.clone() for t in params + m + v + vmax]
    kept = torch.zeros(len(SIZES), dtype=torch.int64)
    flat_masked_adamw(cpu.masked_adamw, params, grads, m, v, vmax, steps, thresholds, kept, lr=1e-2, beta1=0.9, beta2=0.999,
                     eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False, mask_mode="grad",
                     grad_scale=None, skip=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(before, params + m + v + vmax))
    assert kept.sum() == 0


def test_update_handles_layouts_that_differ_between_operands(capability):
    def mixed(groups):
        params, grads, m, v, vmax, steps, thresholds = groups
        # A channels-last-like layout for tensor 0 shared by all operands (dense, not contiguous),
        # and a grad of tensor 5 whose memory order differs from its parameter's.
        def relayout(t):
            return t.reshape(7, 10001).t().contiguous().t().reshape(-1) if t.numel() == 70007 else t

        def transposed_copy(t):  # same values, stored transposed: a dense non-contiguous [n] view
            return t.view(1, -1).expand(2, -1)[0]  # an expanded view: overlapping memory

        grads = list(grads)
        grads[5] = transposed_copy(grads[5].clone())
        return [[relayout(t) for t in params], grads, m, v, vmax, steps, thresholds]

    assert_updates_match(torch.float32, "amsgrad", {"amsgrad": True}, layout=mixed)


def test_update_writes_through_non_contiguous_parameters():
    gen = torch.Generator().manual_seed(6)
    storage = torch.randn(400, 300, generator=gen)
    param = storage.t()  # the optimizer's state is created with preserve_format: same strides
    grad = torch.randn(400, 300, generator=gen).t()
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    ref = [param.contiguous(), grad.contiguous(), m.contiguous(), v.contiguous()]
    kwargs = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False, maximize=False,
                  mask_mode="freeze", grad_scale=None, skip=None)
    threshold = torch.tensor([0.5])
    flat_masked_adamw(cpu.masked_adamw, [param], [grad], [m], [v], [], [torch.tensor(1.0)], threshold, torch.zeros(1, dtype=torch.int64), **kwargs)
    flat_masked_adamw(reference.masked_adamw, [ref[0]], [ref[1]], [ref[2]], [ref[3]], [], [torch.tensor(1.0)], threshold,
                           torch.zeros(1, dtype=torch.int64), **kwargs)
    assert param.data_ptr() == storage.data_ptr()  # updated in place
    torch.testing.assert_close(param, ref[0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(m, ref[2], rtol=1e-6, atol=1e-9)


def test_update_rejects_mismatched_operands_with_reasons():
    p = [torch.randn(4)]
    args = lambda g, m: (p, g, m, [torch.zeros(4)], [], [torch.tensor(1.0)], torch.zeros(1), torch.zeros(1, dtype=torch.int64))  # noqa: E731
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                  mask_mode="grad", grad_scale=None, skip=None)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be a CPU tensor of the parameter's dtype and shape"):
        flat_masked_adamw(cpu.masked_adamw, *args([torch.randn(4, dtype=torch.float64)], [torch.zeros(4)]), **kwargs)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] must be .* \[4\]"):
        flat_masked_adamw(cpu.masked_adamw, *args([torch.randn(4)], [torch.zeros(5)]), **kwargs)
    with pytest.raises(RuntimeError, match="unknown mask_mode 'lazy'"):
        flat_masked_adamw(cpu.masked_adamw, *args([torch.randn(4)], [torch.zeros(4)]), **{**kwargs, "mask_mode": "lazy"})


# --- the extension is what "auto" runs -------------------------------------------------------------


AUTO_STEP = """
import warnings, torch
from gmt_kernels import GMTAdamW
from gmt_kernels.backends import resolve
params = [torch.nn.Parameter(torch.randn(n)) for n in (3000, 70000)]
for p in params:
    p.grad = torch.randn_like(p)
warnings.simplefilter("error")  # a fallback to the reference warns: make it fail
opt = GMTAdamW(params, mask_ratio=0.5, threshold="exact", backend="auto")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    opt.step()
print(resolve("auto", torch.device("cpu"), torch.float32).name)
print(" ".join(sorted({e.name for e in prof.events() if e.name.startswith("gmt_kernels::")})))
print(opt.mask_stats()["global"]["kept"])
"""


def test_auto_on_cpu_runs_the_cpp_kernels_without_fallback():
    """In a user's process (no TRITON_INTERPRET, which this test session sets for the Triton
    backend), "auto" on CPU tensors must run the C++ operators, seen by the profiler."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", AUTO_STEP], env=env, capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    backend, ops, kept = out.stdout.strip().splitlines()[-3:]
    assert backend == "cpu"
    assert ops.split() == ["gmt_kernels::masked_adamw", "gmt_kernels::radix_histogram", "gmt_kernels::radix_select"]
    assert int(kept) == 36500  # k of 73000 entries with distinct scores


def test_missing_extension_fails_import_with_build_instructions(monkeypatch):
    import gmt_kernels

    monkeypatch.setitem(sys.modules, "gmt_kernels._C", None)  # what a failed import of _C looks like
    monkeypatch.delattr(gmt_kernels, "_C")
    monkeypatch.delitem(sys.modules, "gmt_kernels.backends.cpu")
    with pytest.raises(ImportError, match=r"gmt_kernels\._C is not built .*setup\.py build_ext --inplace"):
        importlib.import_module("gmt_kernels.backends.cpu")
    monkeypatch.undo()
    importlib.import_module("gmt_kernels.backends.cpu")  # the real module registers "cpu" again


@pytest.mark.parametrize("shape", [(30011, 13), (2049, 67), (200003,)])
def test_stored_masks_of_tensors_split_over_threads(shape, capability):
    """Masks of tensors large enough that threads split them mid-row and mid-byte (rows of 13: staged
    as dense bits, merged atomically at range and block edges; rows of 67: runs of whole bytes and
    partial ones; 1-D: one byte an entry), written by a random selection, then read back by a
    refresh=false step and a select-only call, against the reference backend."""
    from gmt_kernels import masks as stored_masks
    from gmt_kernels import scores
    from gmt_kernels.options import AdamWOptions, MaskSource, Scoring

    gen = torch.Generator().manual_seed(21)
    p, g, g2 = (torch.randn(shape, generator=gen) for _ in range(3))
    scoring = Scoring("random", random_keys=torch.tensor([scores.random_key(1, 2, 0, 0)]),
                      entry_offsets=torch.tensor([(1 << 32) - 1000]))  # a run crosses 2**32
    thresholds = torch.tensor([float(0.4 * 2**32)], dtype=torch.float64)
    options = AdamWOptions(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, mask_mode="freeze")
    results = {}
    for name, backend in (("cpu", cpu), ("reference", reference)):
        params, moments = [p.clone()], [torch.zeros_like(p), torch.zeros_like(p)]
        mask = [torch.full(stored_masks.mask_shape(shape), 0xA5, dtype=torch.uint8)]
        written, read, selected = (torch.zeros(1, dtype=torch.int64) for _ in range(3))
        backend.masked_adamw(params, [g], [moments[0]], [moments[1]], [], [torch.tensor(1.0)], written,
                             options=options, mask=MaskSource(thresholds, scoring, mask, torch.tensor(True)))
        before = mask[0].clone()
        backend.masked_adamw(params, [g2], [moments[0]], [moments[1]], [],
                             [torch.tensor(2.0)], read, options=options,
                             mask=MaskSource(torch.tensor([0.0], dtype=torch.float64), scoring, mask, torch.tensor(False)))
        assert torch.equal(mask[0], before)  # reading leaves the mask
        backend.masked_adamw(params, [g], [], [], [], [], selected, options=options,
                             mask=MaskSource(thresholds, scoring, mask, None, update_params=False))
        results[name] = (mask[0], params[0], written, read, selected)
    ours, expected = results["cpu"], results["reference"]
    assert torch.equal(ours[0], expected[0])
    torch.testing.assert_close(ours[1], expected[1])  # the update agrees to fp32 rounding (kept entries only)
    assert ours[2].item() == ours[3].item() == ours[4].item() == expected[2].item() > 0
