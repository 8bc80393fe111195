"""The Triton backend's two kernels, called directly under the Triton interpreter (CPU tensors).

Yardsticks: the reference backend's radix_histogram / masked_adamw on identical inputs, and an
independent sort for thresholds. tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported;
the fallback below does the same when this file runs on its own.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from calls import flat_masked_adamw
from gmt_kernels import radix  # noqa: E402
from gmt_kernels.backends import reference, resolve  # noqa: E402
from gmt_kernels.threshold import Scope, select_thresholds  # noqa: E402

import gmt_kernels.backends.triton as tb  # noqa: E402  (no triton: this module fails, loudly)
from gmt_kernels.backends.triton import adamw as triton_adamw, histogram as triton_histogram  # noqa: E402

CPU = torch.device("cpu")
HIST_CHUNK = triton_histogram.CHUNK


def test_backend_is_available_under_the_interpreter():
    assert tb.interpreter_active(), "tests must run the kernels under TRITON_INTERPRET=1"
    backend = resolve("triton", CPU, torch.float32)
    assert backend.name == "triton" and backend.auto_devices == ("cuda",)
    assert resolve("auto", CPU, torch.float32).name == "cpu"  # the interpreter is for tests only
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert tb.unavailable_reason(CPU, dtype) is None
    assert "float16" in tb.unavailable_reason(CPU, torch.int32)
    assert "TRITON_INTERPRET" in tb.unavailable_reason(torch.device("cuda"), torch.float32)
    assert "meta" in tb.unavailable_reason(torch.device("meta"), torch.float32)


def test_cpu_tensors_without_interpreter_are_refused_with_a_way_out():
    code = (
        "import torch\n"
        "from gmt_kernels import GMTAdamW\n"
        "from gmt_kernels.backends.triton import unavailable_reason\n"
        "print(unavailable_reason(torch.device('cpu'), torch.float32))\n"
        "try:\n"
        "    GMTAdamW([torch.nn.Parameter(torch.randn(3))], backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERROR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True).stdout
    assert "TRITON_INTERPRET=1" in out and "backend='cpu'" in out and "backend='reference'" in out
    assert "ERROR gmt_kernels backend 'triton' cannot serve torch.float32 tensors on cpu" in out


# --- radix_histogram ---------------------------------------------------------------------------

SCORES = {
    "normal": lambda n: torch.randn(n, dtype=torch.float64),
    "all_equal": lambda n: torch.full((n,), 0.37, dtype=torch.float64),
    "mostly_zeros": lambda n: torch.where(torch.rand(n) < 0.97, 0.0, torch.randn(n, dtype=torch.float64)),
    "huge": lambda n: torch.where(torch.rand(n) < 0.01, 1e30, 1.0) * torch.randn(n, dtype=torch.float64),
    "denormal": lambda n: torch.randn(n, dtype=torch.float64) * 1e-40,
    "40_decades": lambda n: torch.randn(n, dtype=torch.float64).sign() * 10 ** (torch.rand(n, dtype=torch.float64) * 40 - 30),
    "nonfinite": lambda n: torch.where(torch.rand(n) < 0.05, torch.tensor([math.nan, math.inf, -math.inf])[torch.randint(3, (n,))].double(), torch.randn(n, dtype=torch.float64)),
}

# (scope of each tensor, its shape): tails on both sides of a chunk, odd sizes, 0-d, empty.
LAYOUT = [(0, (HIST_CHUNK + 77,)), (0, (3, 5)), (0, ()), (1, (0,)), (1, (1000,)), (2, (7,)), (2, (129, 3))]


def run_passes(backend, grads, scope_of, ks, slack, fmt):
    """Every pass of the shared loop with this backend; returns the histograms and the final state."""
    numels = [sum(g.numel() for g, s in zip(grads, scope_of) if s == row) for row in range(len(ks))]
    state = radix.initial_state(ks, numels, slack, fmt)
    hists = []
    for _ in range(radix.max_passes(fmt, numels)):
        hist = torch.zeros(len(ks), radix.HIST_COLUMNS, dtype=torch.int64)
        backend.radix_histogram(grads, scope_of, state, hist, key_format=fmt)
        hists.append(hist)
        radix.select_bins(hist, state, fmt.key_bits)
    return hists, state


@pytest.mark.parametrize("case", list(SCORES))
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16,), (torch.float16,), (torch.float64,),
                                    (torch.float32, torch.bfloat16, torch.float16), (torch.float64, torch.bfloat16)],
                         ids=["f32", "bf16", "f16", "f64", "f32+bf16+f16", "f64+bf16"])
def test_histogram_passes_match_reference(case, dtypes, monkeypatch):
    """Every pass's histogram equals the reference's, for every key format (mixed dtypes in one
    scope included), with scope 0 starting from a sample (SAMPLE_MIN_BLOCKS lowered so that a scope
    of this size samples), and the exact threshold equals the k-th largest score found by sorting."""
    monkeypatch.setattr(radix, "SAMPLE_MIN_BLOCKS", 1)
    fmt = radix.key_format_for(dtypes)
    grads = [SCORES[case](math.prod(shape)).reshape(shape).to(dtypes[i % len(dtypes)])
             for i, (_, shape) in enumerate(LAYOUT)]
    scope_of = [s for s, _ in LAYOUT]
    numels = [sum(g.numel() for g, s in zip(grads, scope_of) if s == row) for row in range(3)]
    ks = [radix.kept_count(n, 0.7) for n in numels]
    ours, state = run_passes(tb, grads, scope_of, ks, [0, 0, 0], fmt)
    theirs, ref_state = run_passes(reference, grads, scope_of, ks, [0, 0, 0], fmt)
    assert radix.sample_log2(numels[0]) > 0  # scope 0 starts with a sample
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert torch.equal(state, ref_state)
    for row in range(3):
        scores = torch.cat([g.reshape(-1).double().abs() for g, s in zip(grads, scope_of) if s == row])
        scores = torch.where(scores.isnan(), math.inf, scores)
        expected = scores.sort(descending=True).values[ks[row] - 1].item()
        found = radix.keys_to_threshold(radix.result_keys(state)[row], fmt).item()
        assert found == expected or (math.isnan(found) and expected == math.inf)


def test_done_scopes_are_skipped_and_intervals_are_honoured():
    """state[s, DONE] = 1: nothing counted for s; otherwise keys in [LO, LAST] by (key - LO) >> SHIFT,
    keys above LAST in ABOVE, non-finite ones in NONFINITE; a sampled scope counts its picked blocks."""
    fmt = radix.KEY_FORMATS[torch.float32]
    grads = [torch.randn(5000), torch.randn(300), torch.randn(40), torch.randn(3000)]
    grads[0][::97] = math.inf
    scope_of = [0, 1, 2, 3]
    key0 = radix.score_keys(grads[0], fmt)
    state = radix.initial_state([1, 1, 1, 1], [5000, 300, 40, 3000], [0, 0, 0, 0], fmt)
    lo, last = int(key0.median()), int(key0.median()) + 3000
    state[0, radix.LO], state[0, radix.LAST], state[0, radix.SHIFT] = lo, last, 1
    state[1, radix.DONE] = 1
    state[2, radix.LO] = fmt.inf_key  # no N(0, 1) score is in [inf, key_max]: all below
    state[3, radix.SAMPLE] = 1
    hist = torch.zeros(4, radix.HIST_COLUMNS, dtype=torch.int64)
    tb.radix_histogram(grads, scope_of, state, hist, key_format=fmt)
    inside = key0[(key0 >= lo) & (key0 <= last)]
    assert torch.equal(hist[0, : radix.BINS], torch.bincount((inside - lo) >> 1, minlength=radix.BINS))
    assert hist[0, radix.ABOVE] == (key0 > last).sum() and hist[0, radix.NONFINITE] == 5000 // 97 + 1
    assert hist[1].sum() == 0  # done: not even read
    assert hist[2, : radix.ABOVE + 1].sum() == 0
    picked = radix.sampled_blocks(torch.arange(3000) // radix.SAMPLE_BLOCK, 3, 1)
    expected = torch.bincount(radix.score_keys(grads[3][picked], fmt) >> (fmt.key_bits - radix.RADIX_BITS),
                              minlength=radix.BINS)
    assert torch.equal(hist[3, : radix.BINS], expected) and 0 < expected.sum() < 3000


def count_launches(monkeypatch, module, name):
    launches = []
    kernel = getattr(module, name)

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(module, name, Counting())
    return launches


def test_one_histogram_launch_for_many_tensors(monkeypatch):
    """Launches depend on the dtypes of a call, never on how many tensors it has."""
    launches = count_launches(monkeypatch, triton_histogram, "radix_histogram_kernel")
    fmt = radix.KEY_FORMATS[torch.float32]
    grads = [torch.randn(n) for n in range(1, 61)]
    state = radix.initial_state([100, 100], [900, 930], [0, 0], fmt)
    hist = torch.zeros(2, radix.HIST_COLUMNS, dtype=torch.int64)
    scope_of = [i % 2 for i in range(60)]
    tb.radix_histogram(grads, scope_of, state, hist, key_format=fmt)
    assert len(launches) == 1 and launches[0] == (8,)  # a persistent grid: 8 programs walk the 60 chunks
    expected = torch.zeros_like(hist)
    reference.radix_histogram(grads, scope_of, state, expected, key_format=fmt)
    assert torch.equal(hist, expected)
    grads += [torch.randn(33).to(torch.bfloat16) for _ in range(20)]
    tb.radix_histogram(grads, [i % 2 for i in range(80)], state, hist, key_format=fmt)
    assert len(launches) == 3  # + one per dtype


def test_histogram_of_views_unaligned_and_strided():
    """Views at odd offsets (unaligned: scalar loads), permuted dense layouts, strided views with holes."""
    fmt = radix.KEY_FORMATS[torch.float32]
    base = torch.randn(10000)
    grads = [base[1:4001], base[4003:4003 + 97 * 51].reshape(97, 51).t(), torch.randn(40, 30)[:, ::3], torch.randn(6, 7).t()]
    state = radix.initial_state([10, 10], [4000 + 400, 97 * 51 + 42], [0, 0], fmt)
    state[1, radix.SAMPLE] = 1  # blocks of a transpose are picked in memory order
    ours = torch.zeros(2, radix.HIST_COLUMNS, dtype=torch.int64)
    theirs = torch.zeros_like(ours)
    tb.radix_histogram(grads, [0, 1, 0, 1], state, ours, key_format=fmt)
    reference.radix_histogram(grads, [0, 1, 0, 1], state, theirs, key_format=fmt)
    assert torch.equal(ours, theirs)


def huge_tensor_table(buffer: torch.Tensor, start: int, extra_columns=()):
    """A launch table describing a tensor of start + len(buffer) entries of which only the last
    len(buffer) exist (in `buffer`), and one program for the chunk at `start`: it checks that the
    kernels compute offsets beyond 2**31 in 64 bits without allocating 8 GiB."""
    chunk_size = buffer.numel()
    assert start % chunk_size == 0
    fake_ptr = buffer.data_ptr() - start * buffer.element_size()
    return fake_ptr, start + chunk_size, -(start // chunk_size)


def test_histogram_offsets_beyond_2_31():
    start = 2**31 + HIST_CHUNK  # a multiple of CHUNK past 2**31
    buf = torch.randn(HIST_CHUNK)
    ptr, numel, first = huge_tensor_table(buf, start)
    table = torch.tensor([[ptr, 0, 0, numel, first]], dtype=torch.int64)
    fmt = radix.KEY_FORMATS[torch.float32]
    state = radix.initial_state([5], [numel], [0], fmt)
    state[0, radix.SAMPLE] = 2  # the picked blocks' indices are past 2**21 too
    hist = torch.zeros(1, radix.HIST_COLUMNS, dtype=torch.int64)
    triton_histogram.radix_histogram_kernel[(1,)](
        table, torch.zeros(1, dtype=torch.int32), state, hist, 1, 1,
        torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1, dtype=torch.int32), 0,  # no sample list: tiles
        GRAD=triton_histogram.tl.float32,
        KEY_FLOAT=triton_histogram.tl.float32, INF_KEY=fmt.inf_key, ALIGNED=False, BINS=radix.BINS,
        BLOCK=triton_histogram.BLOCK, ITERS=triton_histogram.ITERS, STATE_COLUMNS=radix.STATE_COLUMNS,
        SAMPLE_BLOCK=radix.SAMPLE_BLOCK)
    picked = radix.sampled_blocks((start + torch.arange(HIST_CHUNK)) // radix.SAMPLE_BLOCK, 0, 2)
    expected = torch.bincount(radix.score_keys(buf[picked], fmt) >> (fmt.key_bits - radix.RADIX_BITS), minlength=radix.BINS)
    assert torch.equal(hist[0, : radix.BINS], expected) and 0 < expected.sum() < HIST_CHUNK


@pytest.mark.parametrize("case", ["normal", "all_equal", "mostly_zeros", "huge", "denormal", "40_decades"])
def test_approximate_threshold_bound(case):
    """threshold='approx' through the shared pass loop: within the rank slack of SEMANTICS.md."""
    n, ratio = (1 << 16) + 123, 0.9
    grads = [SCORES[case](n - 1000).float(), SCORES[case](1000).float()]
    k, slack = radix.kept_count(n, ratio), radix.rank_slack(n, exact=False)
    sel = select_thresholds([Scope(grads, k, slack, n)], radix.KEY_FORMATS[torch.float32],
                            lambda g: resolve("triton", g.device, g.dtype), CPU)
    t = sel.thresholds[0].item()
    scores = torch.cat([g.abs() for g in grads]).double().sort(descending=True).values
    lo, hi = scores[min(k + slack, n) - 1].item(), scores[max(k - slack, 1) - 1].item()
    assert lo <= t <= hi


# --- masked_adamw ------------------------------------------------------------------------------


def adamw_inputs(dtype, shapes, amsgrad, seed=0, thresholds=None):
    g = torch.Generator().manual_seed(seed)

    def rand(shape, scale=1.0, positive=False):
        x = torch.rand(shape, generator=g, dtype=torch.float64) if positive else torch.randn(shape, generator=g, dtype=torch.float64)
        return (x * scale).to(dtype)

    params = [rand(s) for s in shapes]
    grads = [rand(s) for s in shapes]
    if grads[0].numel() > 3:
        grads[0].view(-1)[3] = math.nan  # kept (NaN scores highest), propagates as in torch
    exp_avgs = [rand(s, 0.1) for s in shapes]
    exp_avg_sqs = [rand(s, 0.01, positive=True) for s in shapes]
    max_sqs = [v * 1.5 for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.tensor(float(3 + i)) for i in range(len(shapes))]
    tdt = torch.float64 if dtype == torch.float64 else torch.float32
    if thresholds is None:
        thresholds = torch.linspace(0.0, 1.5, len(shapes), dtype=tdt)
    kept = torch.zeros(len(shapes), dtype=torch.int64)
    return [params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, thresholds.to(tdt), kept]


TOL = {torch.float64: (1e-13, 1e-15), torch.float32: (2e-6, 1e-7),
       torch.bfloat16: (1e-2, 1e-5), torch.float16: (2e-3, 1e-5)}


def assert_same_update(ours, theirs, dtype):
    rtol, atol = TOL[dtype]
    for name, a_list, b_list in zip(["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"], ours[:5], theirs[:5]):
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=f"{name}[{i}] differs")
    assert torch.equal(ours[7], theirs[7]), f"kept counts {ours[7].tolist()} != {theirs[7].tolist()}"


ADAMW_SHAPES = [(triton_adamw.block_for(torch.float16) * triton_adamw.ITERS + 41,), (3, 5), (), (0,), (700,), (1,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("mask_mode", ["grad", "freeze"])
def test_masked_adamw_matches_reference(dtype, amsgrad, mask_mode):
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, maximize=False,
                 mask_mode=mask_mode, grad_scale=None, skip=None)
    ours, theirs = adamw_inputs(dtype, ADAMW_SHAPES, amsgrad), adamw_inputs(dtype, ADAMW_SHAPES, amsgrad)
    flat_masked_adamw(tb.masked_adamw, *ours, **hyper)
    flat_masked_adamw(reference.masked_adamw, *theirs, **hyper)
    assert_same_update(ours, theirs, dtype)
    # An independent count: entries with |g| >= threshold, NaN included.
    for i, g in enumerate(ours[1]):
        score = g.double().abs()
        assert ours[7][i] == int(((score >= ours[6][i].item()) | score.isnan()).sum())


@pytest.mark.parametrize("variant", ["tensor_lr", "grad_scale_maximize", "skip", "not_skipped", "beta1_zero",
                                     "small_beta1", "threshold_inf"])
def test_masked_adamw_options(variant):
    dtype = torch.float32
    hyper = dict(lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.01, amsgrad=True, maximize=False,
                 mask_mode="grad", grad_scale=None, skip=None)
    thresholds = None
    if variant == "tensor_lr":
        hyper["lr"] = torch.tensor(0.05)
    elif variant == "grad_scale_maximize":
        hyper.update(grad_scale=torch.tensor(1024.0), maximize=True)
    elif variant in ("skip", "not_skipped"):
        hyper["skip"] = torch.tensor(variant == "skip")
    elif variant == "beta1_zero":
        hyper["beta1"] = 0.0
    elif variant == "small_beta1":
        hyper["beta1"] = 0.3  # lerp weight 0.7: torch's other lerp formula
    elif variant == "threshold_inf":
        thresholds = torch.full((len(ADAMW_SHAPES),), math.inf)
    ours = adamw_inputs(dtype, ADAMW_SHAPES, True, thresholds=thresholds)
    theirs = adamw_inputs(dtype, ADAMW_SHAPES, True, thresholds=thresholds)
    before = [t.clone() for t in ours[0]]
    flat_masked_adamw(tb.masked_adamw, *ours, **hyper)
    flat_masked_adamw(reference.masked_adamw, *theirs, **hyper)
    assert_same_update(ours, theirs, dtype)
    if variant == "skip":
        assert all(torch.equal(a, b) for a, b in zip(ours[0], before)) and ours[7].sum() == 0


def test_masked_adamw_one_launch_many_tensors_and_odd_layouts(monkeypatch):
    """Many small tensors take one launch; unaligned views take a second; a gradient laid out unlike
    its parameter is updated by the reference path for that tensor alone."""
    launches = count_launches(monkeypatch, triton_adamw, "masked_adamw_kernel")
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False, maximize=False,
                 mask_mode="freeze", grad_scale=None, skip=None)
    shapes = [(n,) for n in range(1, 41)]
    ours, theirs = adamw_inputs(torch.float32, shapes, False), adamw_inputs(torch.float32, shapes, False)
    flat_masked_adamw(tb.masked_adamw, *ours, **hyper)
    flat_masked_adamw(reference.masked_adamw, *theirs, **hyper)
    assert_same_update(ours, theirs, torch.float32)
    assert launches == [(40,)]

    launches.clear()
    shapes = [(6, 9), (50,), (8, 4)]

    def odd_layouts(seed):
        inputs = adamw_inputs(torch.float32, shapes, False, seed=seed)
        flat = torch.zeros(60)
        flat[1:51] = inputs[0][1]
        inputs[0][1] = flat[1:51]  # a parameter view at an odd offset: unaligned
        inputs[1][2] = inputs[1][2].t().contiguous().t()  # gradient strides differ from the parameter's
        return inputs, flat

    (ours, flat_ours), (theirs, flat_theirs) = odd_layouts(1), odd_layouts(1)
    flat_masked_adamw(tb.masked_adamw, *ours, **hyper)
    flat_masked_adamw(reference.masked_adamw, *theirs, **hyper)
    assert_same_update(ours, theirs, torch.float32)
    assert torch.equal(flat_ours, flat_theirs)  # nothing written outside the view
    assert len(launches) == 2


def test_masked_adamw_offsets_beyond_2_31():
    block, iters = triton_adamw.block_for(torch.float32), triton_adamw.ITERS
    chunk = block * iters
    start = 2**31 + chunk
    tensors = [torch.randn(chunk) for _ in range(3)] + [torch.rand(chunk)]  # p, g, m, v
    expected = [t.clone() for t in tensors]
    step = torch.tensor(2.0)
    ptrs = [huge_tensor_table(t, start)[0] for t in tensors]
    _, numel, first = huge_tensor_table(tensors[0], start)
    table = torch.tensor([[*ptrs, 0, step.data_ptr(), 0, numel, first]], dtype=torch.int64)
    thresholds, kept = torch.tensor([0.5]), torch.zeros(1, dtype=torch.int64)
    dummy = torch.zeros(1)
    tl = triton_adamw.tl
    triton_adamw.masked_adamw_kernel[(1,)](
        table, torch.zeros(1, dtype=torch.int32), thresholds, kept, dummy, dummy, dummy.view(torch.uint8),
        0.01, 0.1, 0.9, 0.999, math.log(0.9), math.log(0.999), 1e-8, 0, 0, 0,
        PARAM=tl.float32, COMPUTE=tl.float32, AMSGRAD=False, ALIGNED=False, BLOCK=block, ITERS=iters,
        FREEZE=False, HAS_GRAD_SCALE=False)
    ref_kept = torch.zeros(1, dtype=torch.int64)
    flat_masked_adamw(reference.masked_adamw, [expected[0]], [expected[1]], [expected[2]], [expected[3]], [], [step], thresholds,
                           ref_kept, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False,
                           maximize=False, mask_mode="grad", grad_scale=None, skip=None)
    for a, b in zip(tensors, expected):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
    assert torch.equal(kept, ref_kept)


# --- end to end --------------------------------------------------------------------------------


def test_gmt_adamw_trains_a_small_model_like_the_reference():
    """GMTAdamW(backend='triton') on CPU tensors through the interpreter, against backend='reference'."""
    from gmt_kernels import GMTAdamW

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))

    runs = {}
    for backend in ("triton", "reference"):
        m = model()
        opt = GMTAdamW([{"params": m[0].parameters()}, {"params": m[2].parameters(), "mask_ratio": 0.0}],
                       lr=0.02, mask_ratio=0.8, threshold="exact", mask_mode="freeze", amsgrad=True,
                       backend=backend)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = torch.randn(32, 12, generator=g)
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        runs[backend] = (m, opt.mask_stats())
    (m_t, stats_t), (m_r, stats_r) = runs["triton"], runs["reference"]
    assert stats_t.keys() == stats_r.keys()
    for name in stats_t:  # parameters agree to fp32 rounding, so thresholds agree to about as much
        assert stats_t[name]["kept"] == stats_r[name]["kept"] and stats_t[name]["numel"] == stats_r[name]["numel"]
        assert math.isclose(stats_t[name]["threshold"], stats_r[name]["threshold"], rel_tol=1e-5)
    for p, q in zip(m_t.parameters(), m_r.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_sampled_pass_with_many_picks_per_chunk():
    """SAMPLE = 1 picks about half of a chunk's 256 blocks: two or three tiles of 64 picked blocks
    per chunk, a tail chunk, and a DONE scope next to it; equal to the reference's histogram."""
    fmt = radix.KEY_FORMATS[torch.float32]
    grads = [torch.randn(2 * HIST_CHUNK + 1000), torch.randn(HIST_CHUNK)]
    state = radix.initial_state([10, 10], [grads[0].numel(), HIST_CHUNK], [0, 0], fmt)
    state[0, radix.SAMPLE] = 1
    state[1, radix.DONE] = 1
    ours, theirs = (torch.zeros(2, radix.HIST_COLUMNS, dtype=torch.int64) for _ in range(2))
    tb.radix_histogram(grads, [0, 1], state, ours, key_format=fmt)
    reference.radix_histogram(grads, [0, 1], state, theirs, key_format=fmt)
    assert torch.equal(ours, theirs)
    assert 0.4 < ours[0, : radix.BINS].sum() / grads[0].numel() < 0.6 and ours[1].sum() == 0
    # A scope sampling at a higher rate than its entries in this call suggest (a shard of a larger
    # scope): the list holds 1/2 of the blocks, the kernel counts the 1/8 the scope picks.
    state[0, radix.SAMPLE] = 3
    ours.zero_(), theirs.zero_()
    tb.radix_histogram(grads, [0, 1], state, ours, key_format=fmt)
    reference.radix_histogram(grads, [0, 1], state, theirs, key_format=fmt)
    assert torch.equal(ours, theirs) and 0.05 < ours[0, : radix.BINS].sum() / grads[0].numel() < 0.2
