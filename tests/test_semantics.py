"""SEMANTICS.md, rule by rule, for every backend (the `backend` fixture of conftest.py).

Each test names the section it holds the library to. The yardsticks are tests/oracle.py (sort and
torch's own AdamW) and torch.optim.AdamW itself.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from gmt_kernels import GMTAdamW, magnitude_threshold, radix
from oracle import OracleAdamW, keep_count, keep_mask, kth_largest

TOL = {  # rtol, atol of a parameter after a few steps, by parameter dtype
    torch.float64: (1e-12, 1e-14),
    torch.float32: (2e-6, 1e-7),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float16: (2e-3, 1e-5),
}


def assert_close(actual, expected, dtype=None):
    rtol, atol = TOL[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


def make_params(shapes, dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(s, dtype=torch.float64).to(dtype)) for s in shapes]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def random_grads(params, scale=1.0):
    return [(torch.randn(p.shape, dtype=torch.float64) * scale).to(p.dtype) for p in params]


# --- section 2: the threshold ---------------------------------------------------------------

def cluster_at_threshold(n, mask_ratio=0.3, size=200):
    """`size` distinct scores sharing their top 22 key bits (one bin of the first two fp32 passes)
    around the k-th largest: an early exit has to look at how many entries its bin holds."""
    k = keep_count(n, mask_ratio)
    above = torch.empty(k - size // 2).uniform_(10, 20)
    cluster = (torch.tensor(5.0).view(torch.int32) + torch.randperm(512)[:size].int()).view(torch.float32)
    below = torch.rand(n - above.numel() - size)
    return torch.cat([above, cluster, below])[torch.randperm(n)]


SCORE_CASES = {
    "cluster_at_threshold": cluster_at_threshold,
    "normal": lambda n: torch.randn(n),
    "all_equal": lambda n: torch.full((n,), 0.5),
    "mostly_zero": lambda n: torch.where(torch.rand(n) < 0.97, torch.zeros(n), torch.randn(n)),
    "few_huge": lambda n: torch.randn(n).index_fill_(0, torch.arange(0, n, max(1, n // 5)), 3e38),
    "denormals": lambda n: torch.randint(0, 1 << 20, (n,), dtype=torch.int32).view(torch.float32),
    "forty_decades": lambda n: torch.randn(n) * torch.pow(10.0, torch.empty(n).uniform_(-25, 15)),
    "ties_at_threshold": lambda n: torch.randint(0, 4, (n,)).float(),
}


@pytest.fixture(params=["full", "sampled"])
def first_pass(request, monkeypatch):
    """Scopes of 2**18 entries and more start with a sampled pass (radix.py). With SAMPLE_MIN_BLOCKS
    = 1 the small scopes of these tests do too, and so small a sample often misleads the bracket:
    the paths that recover from it run as well."""
    if request.param == "sampled":
        monkeypatch.setattr(radix, "SAMPLE_MIN_BLOCKS", 1)
    return request.param


@pytest.mark.parametrize("case", sorted(SCORE_CASES))
@pytest.mark.parametrize("mask_ratio", [0.0, 0.3, 0.99, 1.0])
def test_exact_threshold_is_kth_largest(backend, case, mask_ratio, first_pass):
    """Section 2: T = k-th largest score over all tensors, k = N - floor(r N); +inf when k = 0."""
    data = SCORE_CASES[case](3000 + 37)
    tensors = [data[:3000].reshape(30, 100), data[3000:], torch.empty(0)]
    t = magnitude_threshold(tensors, mask_ratio, exact=True, backend=backend)
    k = keep_count(3037, mask_ratio)
    assert t.item() == kth_largest(tensors, k)
    kept = sum(int(keep_mask(x, t.item()).sum()) for x in tensors)
    assert kept >= k  # ties at T are all kept


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_exact_threshold_every_dtype_and_mixed(backend, dtype):
    """Section 2 across key formats: one dtype alone, and mixed with float32 in one scope."""
    a = (torch.randn(300, dtype=torch.float64) * 10).to(dtype)
    b = torch.randn(77)
    for tensors in ([a], [a, b]):
        t = magnitude_threshold(tensors, 0.4, backend=backend)
        k = keep_count(sum(x.numel() for x in tensors), 0.4)
        assert t.item() == kth_largest(tensors, k)


def test_mask_ratio_is_taken_exactly(backend):
    """k reads r as the decimal Python prints (section 1): floor(0.29 * 100) is 29, although the
    float 0.29 is 0.28999..., whose binary value would give 28."""
    x = torch.arange(1, 101, dtype=torch.float32)
    assert magnitude_threshold([x], 0.29, backend=backend).item() == 30.0  # k = 71: 100..30
    assert magnitude_threshold([x], 0.5, backend=backend).item() == 51.0


def test_zero_dim_and_empty_tensors(backend):
    tensors = [torch.tensor(-3.0), torch.empty(0, 4), torch.tensor([1.0, -2.0])]
    assert magnitude_threshold(tensors, 0.34, backend=backend).item() == 2.0  # k = 3 - 1 = 2
    assert magnitude_threshold([torch.empty(0)], 0.5, backend=backend).item() == math.inf


@pytest.mark.parametrize("case", sorted(SCORE_CASES))
def test_approx_threshold_within_bound(backend, case, first_pass):
    """Section 2: T' lies between the (k+e)-th and (k-e)-th largest; the spec allows e = ceil(0.005 N),
    we promise (and check) e = ceil(0.0005 N)."""
    n = (1 << 16) + 123
    data = SCORE_CASES[case](n)
    tensors = [data[:40000], data[40000:]]
    for mask_ratio in (0.3, 0.9):
        k = keep_count(n, mask_ratio)
        e = math.ceil(0.0005 * n)
        t = magnitude_threshold(tensors, mask_ratio, exact=False, backend=backend).item()
        lower = kth_largest(tensors, min(n, k + e))
        upper = kth_largest(tensors, k - e) if k - e >= 1 else math.inf
        assert lower <= t <= upper


@pytest.mark.parametrize("exact", [True, False])
def test_misleading_sample_changes_cost_not_threshold(backend, exact, monkeypatch):
    """Section 2 for a sampled first pass: scores whose sampled blocks are all small and the rest
    large put the bracket far from the k-th largest; the threshold is still exact (or in bound)."""
    monkeypatch.setattr(radix, "SAMPLE_MIN_BLOCKS", 1)
    n = (1 << 16) + 123
    picked = radix.sampled_blocks(torch.arange(n) // radix.SAMPLE_BLOCK, 0, radix.sample_log2(n))
    data = torch.where(picked, torch.rand(n), 10 + torch.rand(n))
    for mask_ratio in (0.3, 0.99):
        k, e = keep_count(n, mask_ratio), 0 if exact else math.ceil(0.0005 * n)
        t = magnitude_threshold([data], mask_ratio, exact=exact, backend=backend).item()
        assert kth_largest([data], k + e) <= t <= kth_largest([data], k - e)


def test_threshold_never_materialises_all_scores(backend):
    """Section 2: no concatenation or copy of all gradients; at most one chunk of one tensor."""
    tensors = [torch.randn(1 << 18) for _ in range(8)]
    sizes = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                sizes.append(out.numel())
            return out

    with Watch():
        magnitude_threshold(tensors, 0.3, exact=True, backend=backend)
    assert max(sizes) <= 1 << 18  # total is 2^21


# --- sections 2 and 3: scopes and mask modes against the oracle -------------------------------


def scopes_of(scope, group_sizes):
    """Index lists of each scope for params laid out group by group."""
    bounds = [0]
    for size in group_sizes:
        bounds.append(bounds[-1] + size)
    all_idx = list(range(bounds[-1]))
    if scope == "global":
        return [all_idx]
    if scope == "group":
        return [all_idx[bounds[i] : bounds[i + 1]] for i in range(len(group_sizes))]
    return [[i] for i in all_idx]


@pytest.mark.parametrize("scope", ["global", "group", "tensor"])
@pytest.mark.parametrize("mask_mode", ["grad", "freeze"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_steps_match_oracle(backend, scope, mask_mode, amsgrad):
    """Sections 2-3: several steps, two groups, odd shapes: parameters and moments as the oracle."""
    shapes = [(7, 13), (5,), (), (33, 3), (0,)]
    params = make_params(shapes)
    hp = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, maximize=False)
    opt = GMTAdamW([{"params": params[:2]}, {"params": params[2:]}], mask_ratio=0.6, scope=scope,
                   mask_mode=mask_mode, threshold="exact", backend=backend, **hp)
    oracle = OracleAdamW(params, mask_ratio=0.6, scopes=scopes_of(scope, [2, 3]), mask_mode=mask_mode, **hp)
    for _ in range(3):
        grads = random_grads(params)
        set_grads(params, grads)
        opt.step()
        oracle.step(grads)
    for p, q, m, v in zip(params, oracle.params, oracle.exp_avgs, oracle.exp_avg_sqs):
        assert_close(p.detach(), q)
        assert_close(opt.state[p]["exp_avg"], m)
        assert_close(opt.state[p]["exp_avg_sq"], v)
        assert opt.state[p]["step"].item() == 3
    stats = opt.mask_stats()
    assert len(stats) == len(oracle.scopes)
    for (name, s), t in zip(stats.items(), oracle.last_thresholds):
        assert s["threshold"] == t


def test_freeze_leaves_masked_entries_alone_and_grad_mode_decays_them(backend):
    """Section 3: 'freeze' keeps p, m, v of masked entries; 'grad' still applies weight decay."""
    for mode in ("grad", "freeze"):
        (p,) = make_params([(200,)])
        before = p.detach().clone()
        opt = GMTAdamW([p], lr=0.1, weight_decay=0.5, mask_ratio=0.75, mask_mode=mode, backend=backend)
        p.grad = torch.randn(200)
        opt.step()
        keep = keep_mask(p.grad, kth_largest([p.grad], keep_count(200, 0.75)))
        assert int(keep.sum()) == 50
        assert (p.detach()[keep] != before[keep]).all()
        if mode == "freeze":
            assert torch.equal(p.detach()[~keep], before[~keep])
            assert (opt.state[p]["exp_avg"][~keep] == 0).all()
        else:
            assert_close(p.detach()[~keep], before[~keep] * (1 - 0.1 * 0.5))
        assert opt.mask_stats()["global"]["kept"] == 50


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_low_and_high_precision_params(backend, dtype):
    """Section 3: fp32 math for 16-bit parameters (states in the parameter's dtype), fp64 for fp64."""
    params = make_params([(64,), (9, 7)], dtype)
    hp = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, amsgrad=False, maximize=True)
    opt = GMTAdamW(params, mask_ratio=0.5, threshold="exact", backend=backend, **hp)
    oracle = OracleAdamW(params, mask_ratio=0.5, scopes=[[0, 1]], mask_mode="grad", **hp)
    for _ in range(2):
        grads = random_grads(params)
        set_grads(params, grads)
        opt.step()
        oracle.step(grads)
    for p, q in zip(params, oracle.params):
        assert p.dtype == dtype and opt.state[p]["exp_avg"].dtype == dtype
        assert_close(p.detach(), q)


def test_tensor_lr_and_maximize(backend):
    params = make_params([(50,)])
    hp = dict(lr=0.05, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=True)
    opt = GMTAdamW(params, **{**hp, "lr": torch.tensor(0.05)}, mask_ratio=0.2, threshold="exact", backend=backend)
    oracle = OracleAdamW(params, mask_ratio=0.2, scopes=[[0]], mask_mode="grad", **hp)
    grads = random_grads(params)
    set_grads(params, grads)
    opt.step()
    oracle.step(grads)
    assert_close(params[0].detach(), oracle.params[0])


def test_params_without_grad_are_skipped_and_not_scored(backend):
    """Section 1: a parameter with grad None gets no state and takes no part in the threshold."""
    a, b = make_params([(100,), (100,)])
    opt = GMTAdamW([a, b], mask_ratio=0.5, threshold="exact", backend=backend)
    a.grad = torch.randn(100)
    b_before = b.detach().clone()
    opt.step()
    assert torch.equal(b.detach(), b_before) and len(opt.state[b]) == 0
    assert opt.mask_stats()["global"] == {
        "threshold": kth_largest([a.grad], 50), "kept": 50, "numel": 100, "refreshed": True}


def test_unmasked_group_is_plain_adamw_and_not_counted(backend):
    """Section 2: a group with mask_ratio 0 is plain AdamW and takes no part in the global threshold."""
    a, b = make_params([(40,), (40,)])
    b_ref = b.detach().clone().requires_grad_()
    opt = GMTAdamW([{"params": [a]}, {"params": [b], "mask_ratio": 0.0}], mask_ratio=0.5, backend=backend)
    ref = torch.optim.AdamW([b_ref], foreach=False)
    for _ in range(2):
        a.grad, b.grad = torch.randn(40), torch.randn(40)
        b_ref.grad = b.grad.clone()
        opt.step()
        ref.step()
        assert opt.mask_stats()["global"]["numel"] == 40
        assert opt.mask_stats()["global"]["threshold"] == kth_largest([a.grad], 20)
    assert_close(b.detach(), b_ref.detach())


# --- section 3: mask_ratio 0 is torch.optim.AdamW, over torch's own conformance inputs -----------


def conformance_inputs():
    from torch.testing._internal.common_optimizers import optim_inputs_func_adamw

    return [(i.desc, i.kwargs) for i in optim_inputs_func_adamw(device="cpu")]


@pytest.mark.parametrize("desc,kwargs", conformance_inputs(), ids=[d for d, _ in conformance_inputs()])
def test_mask_ratio_zero_is_torch_adamw(backend, desc, kwargs):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    twin.load_state_dict(model.state_dict())
    ours = GMTAdamW(model.parameters(), mask_ratio=0.0, backend=backend, **kwargs)
    theirs = torch.optim.AdamW(twin.parameters(), foreach=False, **kwargs)
    for _ in range(4):
        x = torch.randn(8, 6)
        for m, o in ((model, ours), (twin, theirs)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        if backend == "reference":
            assert torch.equal(p, q)  # same op order: bitwise
        else:
            assert_close(p.detach(), q.detach())


def conformance_error_inputs():
    from torch.testing._internal.common_optimizers import optim_error_inputs_func_adamw

    ours = {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"}
    # torch only warns on a parameter listed twice in a group; GMTAdamW refuses it
    # (test_parameter_listed_twice_is_refused).
    return [e for e in optim_error_inputs_func_adamw(device="cpu", dtype=torch.float32)
            if set(e.optimizer_error_input.kwargs) <= ours
            and e.optimizer_error_input.desc != "a param group cannot have duplicate parameters"]


@pytest.mark.parametrize("error_input", conformance_error_inputs(),
                         ids=[e.optimizer_error_input.desc for e in conformance_error_inputs()])
def test_construction_errors_match_torch(error_input):
    """Section 7: the same errors and messages as torch.optim.AdamW."""
    inp = error_input.optimizer_error_input
    params = inp.params if inp.params is not None else [torch.nn.Parameter(torch.randn(2))]
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            GMTAdamW(params, backend="reference", **inp.kwargs)
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            GMTAdamW(params, backend="reference", **inp.kwargs)


# --- section 4: state -----------------------------------------------------------------------


def train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def saved_and_loaded(state_dict):
    """What torch.save + torch.load hand back: no tensor shared with the live optimizer."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def small_model():
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


@pytest.mark.parametrize("direction", ["torch_to_gmt", "gmt_to_torch"])
def test_state_dict_interchangeable_with_torch_adamw(backend, direction):
    """Section 4: a state_dict of one loads into the other and training resumes identically."""
    make = {
        "torch": lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, amsgrad=True, foreach=False),
        "gmt": lambda m: GMTAdamW(m.parameters(), lr=0.01, amsgrad=True, mask_ratio=0.0, backend=backend),
    }
    first, second = direction.split("_to_")
    a, b = small_model(), small_model()
    b.load_state_dict(a.state_dict())
    opt_a = make[first](a)
    train(a, opt_a, 3, seed=1)
    b.load_state_dict(a.state_dict())
    opt_b = make[second](b)
    opt_b.load_state_dict(saved_and_loaded(opt_a.state_dict()))
    for p, q in zip(a.parameters(), b.parameters()):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert set(sa) == set(sb) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert sa["step"].dtype == sb["step"].dtype == torch.float32
    train(a, opt_a, 3, seed=2)
    train(b, opt_b, 3, seed=2)
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(p.detach(), q.detach())


def test_state_dict_round_trip_keeps_gmt_counters(backend):
    """Section 4: skipped_steps and the last kept counts survive a state_dict round trip."""
    model = small_model()
    opt = GMTAdamW(model.parameters(), mask_ratio=0.5, backend=backend)
    train(model, opt, 2, seed=0)
    next(model.parameters()).grad[0, 0] = float("nan")
    opt.step()
    saved = saved_and_loaded(opt.state_dict())
    fresh = GMTAdamW(model.parameters(), mask_ratio=0.5, backend=backend)
    fresh.load_state_dict(saved)
    assert fresh.skipped_steps.item() == 1 and fresh.skipped_steps.dtype == torch.int64
    assert fresh.mask_stats() == opt.mask_stats()
    assert fresh.mask_stats()["global"]["kept"] == 0  # the last step was skipped


def warm_run(backend, threshold, grads_per_step, params=None, opt=None):
    """GMTAdamW over two tensors of 2**16 + 123 entries (approximate selections apply), stepped on
    each of grads_per_step; returns (params, optimizer, the global threshold of every step)."""
    if params is None:
        params = [torch.nn.Parameter(torch.zeros(40000)), torch.nn.Parameter(torch.zeros(25659))]
        opt = GMTAdamW(params, lr=1e-3, mask_ratio=0.3, threshold=threshold, backend=backend)
    thresholds = []
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        thresholds.append(opt.mask_stats()["global"]["threshold"])
    return params, opt, thresholds


def drifting_grads(scales, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(n, generator=gen) * s for n in (40000, 25659)] for s in scales]


@pytest.mark.parametrize("threshold", ["exact", "approx"])
def test_warm_started_steps_keep_the_threshold_in_bound(backend, threshold):
    """Section 2 at every step: a step's selection starts around the last step's threshold
    (radix.warm_state). Gradients that drift a little (its bracket holds the k-th largest) or jump
    (it does not) get the exact threshold, or one within the bound, all the same."""
    steps = drifting_grads([1.0, 1.05, 0.97, 8.0, 0.01, 1.0])
    _, _, thresholds = warm_run(backend, threshold, steps)
    n = 40000 + 25659
    k, e = keep_count(n, 0.3), 0 if threshold == "exact" else math.ceil(0.0005 * n)
    for grads, t in zip(steps, thresholds):
        assert kth_largest(grads, k + e) <= t <= kth_largest(grads, k - e)


def test_a_step_starts_around_the_last_threshold_and_resumes_exactly(backend, monkeypatch):
    """The warm start's centre is the last mask_stats() threshold, which the state_dict carries:
    a run resumed from a state_dict selects (approximately: the result depends on the centre) and
    updates exactly as the uninterrupted run."""
    from gmt_kernels import optimizer as optimizer_module

    centres = []
    select = optimizer_module.select_thresholds

    def spy(*args, warm=None, **kwargs):
        centres.append(None if warm is None else warm.tolist())
        return select(*args, warm=warm, **kwargs)

    monkeypatch.setattr(optimizer_module, "select_thresholds", spy)
    steps = drifting_grads([1.0, 1.1, 0.9, 1.2])
    whole, _, thresholds = warm_run(backend, "approx", steps)
    assert centres == [None] + [[t] for t in thresholds[:-1]]
    params, opt, first = warm_run(backend, "approx", steps[:2])
    saved = saved_and_loaded(opt.state_dict())
    params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = GMTAdamW(params, lr=1e-3, mask_ratio=0.3, backend=backend)
    resumed.load_state_dict(saved)
    centres.clear()
    _, _, rest = warm_run(backend, "approx", steps[2:], params, resumed)
    assert centres == [[first[-1]], [rest[0]]]
    assert first + rest == thresholds
    assert all(torch.equal(a, b) for a, b in zip(whole, params))


# --- section 5: non-finite gradients -------------------------------------------------------


def snapshot(params, opt):
    return [p.detach().clone() for p in params] + [
        v.clone() for p in params for v in opt.state[p].values()]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("masked_group", [True, False])
def test_nonfinite_skip_is_a_no_op(backend, bad, masked_group):
    """Section 5 'skip': the whole step is a no-op, counted in skipped_steps; also for an
    unmasked (mask_ratio 0) group."""
    a, b = make_params([(30,), (20,)])
    opt = GMTAdamW([{"params": [a]}, {"params": [b], "mask_ratio": 0.0}], mask_ratio=0.5, backend=backend)
    a.grad, b.grad = torch.randn(30), torch.randn(20)
    opt.step()
    before = snapshot([a, b], opt)
    a.grad, b.grad = torch.randn(30), torch.randn(20)
    (a if masked_group else b).grad[3] = bad
    opt.step()
    after = snapshot([a, b], opt)
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert opt.skipped_steps.item() == 1
    a.grad, b.grad = torch.randn(30), torch.randn(20)
    opt.step()
    assert opt.state[a]["step"].item() == 2 and opt.skipped_steps.item() == 1


def test_nonfinite_raise_names_parameter_and_changes_nothing(backend):
    a, b = make_params([(30,), (20,)])
    named = [("first.weight", a), ("second.weight", b)]
    opt = GMTAdamW([{"params": named[:1]}, {"params": named[1:]}], nonfinite="raise", backend=backend)
    a.grad, b.grad = torch.randn(30), torch.randn(20)
    opt.step()
    before = snapshot([a, b], opt)
    b.grad[5] = float("nan")
    with pytest.raises(FloatingPointError, match=r"parameter 0 \('second.weight'\) in param group 1"):
        opt.step()
    assert all(torch.equal(x, y) for x, y in zip(before, snapshot([a, b], opt)))


def test_nonfinite_propagate_is_torch_adamw_and_nan_counts_largest(backend):
    """Section 5 'propagate': as torch.optim.AdamW; a NaN score counts as the largest (kept)."""
    (p,) = make_params([(10,)])
    q = p.detach().clone().requires_grad_()
    opt = GMTAdamW([p], mask_ratio=0.0, nonfinite="propagate", backend=backend)
    ref = torch.optim.AdamW([q], foreach=False)
    p.grad = torch.randn(10)
    p.grad[2] = float("nan")
    q.grad = p.grad.clone()
    opt.step()
    ref.step()
    assert_close(p.detach(), q.detach())
    (r,) = make_params([(100,)])
    opt = GMTAdamW([r], mask_ratio=0.995, nonfinite="propagate", threshold="exact", backend=backend)
    r.grad = torch.randn(100)
    r.grad[7] = float("nan")
    opt.step()
    assert opt.mask_stats()["global"]["kept"] == 1
    assert r.detach()[7].isnan()


# --- section 6: AMP ------------------------------------------------------------------------


def test_grad_scaler_matches_unscaled_training(backend):
    """Section 6: with GradScaler the step sees g / scale; an overflow skips the step."""
    a, b = small_model(), small_model()
    b.load_state_dict(a.state_dict())
    opt_a = GMTAdamW(a.parameters(), mask_ratio=0.5, threshold="exact", backend=backend)
    opt_b = GMTAdamW(b.parameters(), mask_ratio=0.5, threshold="exact", backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(3):
        x = torch.randn(8, 6)
        opt_a.zero_grad()
        a(x).square().mean().backward()
        opt_a.step()
        opt_b.zero_grad()
        scaler.scale(b(x).square().mean()).backward()
        scaler.step(opt_b)
        scaler.update()
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(q.detach(), p.detach())
    assert opt_b.mask_stats()["global"]["threshold"] == opt_a.mask_stats()["global"]["threshold"]

    before = [p.detach().clone() for p in b.parameters()]
    opt_b.zero_grad()
    scaler.scale(b(torch.randn(8, 6)).square().mean() * float("inf")).backward()
    scaler.step(opt_b)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(before, b.parameters()))
    assert opt_b.skipped_steps.item() == 1 and scaler.get_scale() == 512.0


def test_step_takes_grad_scale_and_found_inf(backend):
    (p,) = make_params([(40,)])
    (q,) = [p.detach().clone().requires_grad_()]
    opt_p = GMTAdamW([p], mask_ratio=0.25, backend=backend)
    opt_q = GMTAdamW([q], mask_ratio=0.25, backend=backend)
    g = torch.randn(40)
    p.grad, q.grad = g * 8, g.clone()
    opt_p.step(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(0.0))
    opt_q.step()
    assert_close(p.detach(), q.detach())
    before = p.detach().clone()
    opt_p.step(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0))
    assert torch.equal(p.detach(), before) and opt_p.skipped_steps.item() == 1


# --- section 7: errors ---------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(mask_ratio=1.5), "mask_ratio"),
    (dict(mask_ratio=-0.1), "mask_ratio"),
    (dict(scope="layer"), "Unknown scope 'layer'. Possible values: 'global', 'group', 'tensor'"),
    (dict(mask_mode="zero"), "Unknown mask_mode 'zero'"),
    (dict(threshold="fast"), "Unknown threshold 'fast'"),
    (dict(nonfinite="ignore"), "Unknown nonfinite 'ignore'"),
    (dict(backend="cuda"), "Unknown backend 'cuda'. Possible values: 'auto', 'reference', 'triton', 'cpu'"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GMTAdamW([torch.nn.Parameter(torch.randn(3))], **kwargs)


def test_global_scope_needs_one_mask_ratio():
    a, b, c = make_params([(3,), (3,), (3,)])
    with pytest.raises(ValueError, match="must share one mask_ratio"):
        GMTAdamW([{"params": [a]}, {"params": [b], "mask_ratio": 0.5}], mask_ratio=0.3)
    opt = GMTAdamW([{"params": [a]}, {"params": [b], "mask_ratio": 0.0}], mask_ratio=0.3)
    with pytest.raises(ValueError, match="must share one mask_ratio"):
        opt.add_param_group({"params": [c], "mask_ratio": 0.9})
    assert len(opt.param_groups) == 2
    GMTAdamW([{"params": [a]}, {"params": [b], "mask_ratio": 0.5}], mask_ratio=0.3, scope="group")


def test_sparse_gradient_is_refused_and_changes_nothing(backend):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = GMTAdamW(emb.parameters(), backend=backend)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before) and len(opt.state) == 0


def test_named_backend_that_cannot_load_is_an_error(monkeypatch):
    from gmt_kernels import backends

    monkeypatch.setitem(backends._LOADERS, "cpu", lambda: (_ for _ in ()).throw(ImportError("no _C")))
    monkeypatch.delitem(backends._REGISTRY, "cpu", raising=False)
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot serve .* ImportError: no _C.*backend='auto'"):
        GMTAdamW([torch.nn.Parameter(torch.randn(3))], backend="cpu")


def test_auto_falls_back_with_one_warning(monkeypatch):
    from gmt_kernels import backends

    for name in ("triton", "cpu"):
        monkeypatch.setitem(backends._LOADERS, name, lambda: (_ for _ in ()).throw(ImportError("absent")))
        monkeypatch.delitem(backends._REGISTRY, name, raising=False)
    monkeypatch.setattr(backends, "_warned_fallbacks", set())
    (p,) = make_params([(5,)])
    with pytest.warns(RuntimeWarning, match="using the pure-PyTorch reference backend") as record:
        opt = GMTAdamW([p])
        p.grad = torch.randn(5)
        opt.step()
        opt.step()
    assert len([w for w in record if "reference backend" in str(w.message)]) == 1


def test_hooks_and_zero_grad_work_as_in_torch(backend):
    (p,) = make_params([(4,)])
    opt = GMTAdamW([p], backend=backend)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    p.grad = torch.randn(4)
    loss = opt.step(lambda: torch.tensor(1.5))
    assert calls == ["pre", "post"] and loss.item() == 1.5
    opt.zero_grad()
    assert p.grad is None


HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}


@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("threshold", ["exact", "approx"])
def test_step_never_reads_device_values_on_the_host(backend, nonfinite, threshold):
    """Section 2: no device-host synchronisation inside step(): no tensor value reaches Python."""
    assert_step_reads_nothing(backend, nonfinite=nonfinite, threshold=threshold)


def assert_step_reads_nothing(backend, steps=1, **options):
    """GMTAdamW(**options) steps (after a first step that creates the state) without any tensor
    value reaching Python (test_criteria.py runs it with every criterion and schedule), as on a
    GPU: on a CPU device a step may read its refresh schedule (optimizer._reads_schedule_on_host),
    which is switched off here."""
    from unittest import mock

    from gmt_kernels import optimizer

    with mock.patch.object(optimizer, "_reads_schedule_on_host", lambda device: False):
        _assert_step_reads_nothing(backend, steps, **options)


def _assert_step_reads_nothing(backend, steps, **options):
    params = make_params([(300,), (17, 5), ()])
    opt = GMTAdamW(params, mask_ratio=0.3, backend=backend, **options)
    set_grads(params, random_grads(params))
    opt.step()  # first step creates the state
    reads = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in HOST_READS:
                reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    for _ in range(steps):
        set_grads(params, random_grads(params))
        with Watch():
            opt.step(grad_scale=torch.tensor(1.0), found_inf=torch.tensor(0.0))
    assert reads == []


def test_named_parameters_name_tensor_scopes(backend):
    model = small_model()
    opt = GMTAdamW(model.named_parameters(), scope="tensor", mask_ratio=0.5, backend=backend)
    train(model, opt, 1, seed=0)
    stats = opt.mask_stats()
    assert sorted(stats) == sorted(f"group0.{name}" for name, _ in model.named_parameters())
    for name, p in model.named_parameters():
        assert stats[f"group0.{name}"]["numel"] == p.numel()
        assert stats[f"group0.{name}"]["kept"] == keep_count(p.numel(), 0.5)  # no ties in random grads
    assert opt.state_dict()["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]


def test_triton_on_cpu_tensors_without_interpreter_is_refused():
    """Section 7: backend='triton' on CPU tensors without TRITON_INTERPRET says what to do."""
    import os
    import subprocess
    import sys

    code = (
        "import torch; from gmt_kernels import GMTAdamW\n"
        "try:\n"
        "    GMTAdamW([torch.nn.Parameter(torch.randn(3))], backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "backend 'triton' cannot serve torch.float32 tensors on cpu" in out.stdout, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout and "backend='reference'" in out.stdout


@pytest.mark.parametrize("name,device", [("cpu", "cuda"), ("cpu", "meta"), ("triton", "meta")])
def test_backend_refuses_tensors_of_another_device(name, device):
    """Section 7: backend='cpu' on CUDA tensors (and any backend on a device it lacks) is an error."""
    from gmt_kernels.backends import resolve

    with pytest.raises(RuntimeError, match=rf"backend '{name}' cannot serve torch.float32 tensors on {device}"):
        resolve(name, torch.device(device), torch.float32)


@pytest.mark.parametrize("mask_ratio", [-0.1, 1.5, True, "0.3"])
def test_magnitude_threshold_refuses_bad_mask_ratio(mask_ratio):
    with pytest.raises(ValueError, match=r"Invalid mask_ratio value: .* a number in \[0, 1\]"):
        magnitude_threshold([torch.randn(4)], mask_ratio, backend="reference")
