"""SEMANTICS.md section 8 through GMTAdamW: criteria, refresh schedules, select_mask, stored masks.

Each behaviour is checked against tests/oracle.py's CriteriaOracle (scores restated with numpy,
sorted per scope, masks kept in Python between selections, torch's own AdamW), on every backend in
CRITERIA_BACKENDS (the kernel tests' list: backends whose kernels implement every criterion).
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch

from gmt_kernels import GMTAdamW
from gmt_kernels.masks import unpack
from oracle import CriteriaOracle, keep_count, unpack_mask_numpy
from test_criteria_kernels import CRITERIA_BACKENDS
from test_semantics import assert_close, assert_step_reads_nothing, make_params, random_grads, set_grads

CRITERIA = ["grad", "grad_over_weight", "random"]
HYPER = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=True)
ORACLE_HYPER = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False)
SHAPES = [(13, 9), (3, 5, 2), ()]


@pytest.fixture(params=list(dict.fromkeys(name.split("@")[0] for name in CRITERIA_BACKENDS)))
def backend(request):
    """Each backend once, the C++ one at its best CPU capability level (the kernel tests run it at
    every level)."""
    return request.param


def oracle_scopes(scope, n):
    return [list(range(n))] if scope == "global" else [[i] for i in range(n)]


def scope_names(scope, n):
    return ["global"] if scope == "global" else [f"group0.{i}" for i in range(n)]


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=2e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("refresh_every", [1, 2, None])
@pytest.mark.parametrize("mask_mode", ["grad", "freeze"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_steps_match_the_oracle(backend, criterion, refresh_every, mask_mode, scope):
    """Three steps (selections and reuses): parameters, moments, kept counts and "refreshed"."""
    params = make_params(SHAPES)
    opt = GMTAdamW(params, **HYPER, mask_ratio=0.6, scope=scope, mask_mode=mask_mode, threshold="exact",
                   backend=backend, criterion=criterion, refresh_every=refresh_every, seed=11, score_eps=1e-2)
    oracle = CriteriaOracle([(p, 0, i) for i, p in enumerate(params)], scopes=oracle_scopes(scope, len(params)),
                            mask_ratio=0.6, criterion=criterion, refresh_every=refresh_every, seed=11, score_eps=1e-2,
                            mask_mode=mask_mode, **ORACLE_HYPER)
    for _ in range(3):
        grads = random_grads(params)
        set_grads(params, grads)
        opt.step()
        kept, selected = oracle.step(grads)
        stats = opt.mask_stats()
        for name, k in zip(scope_names(scope, len(params)), kept):
            assert stats[name]["kept"] == k and stats[name]["refreshed"] == selected
        for i, p in enumerate(params):
            close(p.detach(), oracle.params[i])
            close(opt.state[p]["exp_avg"], oracle.m[i])
            close(opt.state[p]["max_exp_avg_sq"], oracle.vmax[i])
    assert ("gmt_mask" in opt.state[params[0]]) == (refresh_every != 1)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_group_scope_and_group_identity(backend, criterion):
    """scope="group" with two param groups (the random score keys on (group, position))."""
    params = make_params([(20,), (7, 3), (30,)])
    groups = [{"params": params[:2]}, {"params": params[2:]}]
    opt = GMTAdamW(groups, **HYPER, mask_ratio=0.5, scope="group", threshold="exact", backend=backend,
                   criterion=criterion, refresh_every=2, seed=5)
    oracle = CriteriaOracle([(params[0], 0, 0), (params[1], 0, 1), (params[2], 1, 0)], scopes=[[0, 1], [2]],
                            mask_ratio=0.5, criterion=criterion, refresh_every=2, seed=5, **ORACLE_HYPER)
    for _ in range(3):
        grads = random_grads(params)
        set_grads(params, grads)
        opt.step()
        kept, _ = oracle.step(grads)
        assert [opt.mask_stats()[f"group{g}"]["kept"] for g in (0, 1)] == kept
        for i, p in enumerate(params):
            close(p.detach(), oracle.params[i])


def test_bfloat16_and_float64_params(backend):
    for dtype in (torch.bfloat16, torch.float64):
        params = make_params([(30,), (4, 6)], dtype=dtype)
        opt = GMTAdamW(params, **HYPER, mask_ratio=0.4, threshold="exact", backend=backend,
                       criterion="grad_over_weight", refresh_every=2)
        oracle = CriteriaOracle([(p, 0, i) for i, p in enumerate(params)], scopes=[[0, 1]], mask_ratio=0.4,
                                criterion="grad_over_weight", refresh_every=2, **ORACLE_HYPER)
        for _ in range(3):
            grads = random_grads(params)
            set_grads(params, grads)
            opt.step()
            kept, _ = oracle.step(grads)
            assert opt.mask_stats()["global"]["kept"] == kept[0]
            for i, p in enumerate(params):
                assert_close(p.detach(), oracle.params[i])


@pytest.mark.parametrize("criterion", CRITERIA)
def test_select_mask_changes_nothing_else_and_the_next_step_uses_it(backend, criterion):
    params = make_params(SHAPES)
    opt = GMTAdamW(params, **HYPER, mask_ratio=0.5, threshold="exact", backend=backend, criterion=criterion,
                   refresh_every=3, seed=2)
    oracle = CriteriaOracle([(p, 0, i) for i, p in enumerate(params)], scopes=[list(range(len(params)))],
                            mask_ratio=0.5, criterion=criterion, refresh_every=3, seed=2, **ORACLE_HYPER)
    grads = random_grads(params)
    set_grads(params, grads)
    opt.step()
    oracle.step(grads)
    before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items() if k != "gmt_mask"}
    values = [p.detach().clone() for p in params]
    calibration = random_grads(params, scale=3.0)
    set_grads(params, calibration)
    opt.select_mask()
    oracle.select_mask(calibration)
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    after = opt.state_dict()["state"][0]
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert opt.skipped_steps.item() == 0
    for i, p in enumerate(params):  # the stored mask is the calibration gradient's selection
        assert torch.equal(unpack(opt.state[p]["gmt_mask"], p.shape), oracle.keeps[i])
    for _ in range(4):  # the schedule counts from select_mask: three reuses, then a selection
        grads = random_grads(params)
        set_grads(params, grads)
        opt.step()
        kept, selected = oracle.step(grads)
        assert opt.mask_stats()["global"]["refreshed"] == selected
        assert opt.mask_stats()["global"]["kept"] == kept[0]
        for i, p in enumerate(params):
            close(p.detach(), oracle.params[i])
    assert selected


def test_select_mask_refuses_refresh_every_1_and_skips_nonfinite(backend):
    params = make_params([(10,)])
    set_grads(params, random_grads(params))
    with pytest.raises(ValueError, match="refresh_every=1 selects a new mask at every step"):
        GMTAdamW(params, backend=backend).select_mask()
    opt = GMTAdamW(params, backend=backend, refresh_every=None)
    params[0].grad[3] = math.nan
    with pytest.warns(RuntimeWarning, match="no mask was selected or stored"):
        opt.select_mask()
    assert opt._gmt["selections"].item() == 0
    assert opt.state[params[0]]["gmt_mask"].sum() == 0
    raising = GMTAdamW(params, backend=backend, refresh_every=None, nonfinite="raise")
    with pytest.raises(FloatingPointError, match="parameter 0"):
        raising.select_mask()


@pytest.mark.parametrize("criterion", CRITERIA)
def test_a_skipped_step_neither_selects_nor_advances_the_schedule(backend, criterion):
    params = make_params([(50,), (6, 4)])
    opt = GMTAdamW(params, **HYPER, mask_ratio=0.5, threshold="exact", backend=backend, criterion=criterion,
                   refresh_every=2)
    oracle = CriteriaOracle([(p, 0, i) for i, p in enumerate(params)], scopes=[[0, 1]], mask_ratio=0.5,
                            criterion=criterion, refresh_every=2, **ORACLE_HYPER)
    pattern = [False, True, False, True, True, False, False]  # skipped steps (NaN gradient)
    for skipped in pattern:
        grads = random_grads(params)
        if skipped:
            grads[1][2, 1] = math.nan
        set_grads(params, grads)
        masks = [opt.state[p]["gmt_mask"].clone() for p in params if "gmt_mask" in opt.state[p]]
        opt.step()
        kept, selected = oracle.step(grads, skip=skipped)
        stats = opt.mask_stats()["global"]
        assert stats["refreshed"] == selected and stats["kept"] == kept[0]
        assert opt._gmt["selections"].item() == oracle.selections
        assert opt._gmt["since_selection"].item() == oracle.since
        if skipped:
            assert all(torch.equal(m, opt.state[p]["gmt_mask"]) for m, p in zip(masks, params))
        for i, p in enumerate(params):
            close(p.detach(), oracle.params[i])
    assert opt.skipped_steps.item() == sum(pattern)


# --- random masks ------------------------------------------------------------------------------

def stored(opt, p):
    return unpack_mask_numpy(opt.state[p]["gmt_mask"], p.shape)


def test_random_masks_exact_count_and_uniform_over_positions(backend):
    """Every selection keeps exactly k entries; over 100 selections each of 64 positions is kept
    about 100 * 1/4 times (a chi-square statistic with 63 degrees of freedom, fixed seed)."""
    params = make_params([(8, 8)])
    opt = GMTAdamW(params, mask_ratio=0.75, backend=backend, criterion="random", refresh_every=None, seed=3)
    set_grads(params, random_grads(params))
    counts = torch.zeros(8, 8)
    selections = 100
    for _ in range(selections):
        opt.select_mask()
        mask = stored(opt, params[0])
        assert int(mask.sum()) == keep_count(64, 0.75)
        counts += mask
    expected = selections * 0.25
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 63 + 5 * math.sqrt(2 * 63), chi2  # mean 63, sd 11.2
    assert counts.min() > 0


def test_random_masks_ignore_the_gradient_and_are_redrawn_per_selection(backend):
    """refresh_every=1, freeze, no weight decay: the entries that move are the kept ones. Two
    optimizers with one seed and unrelated gradients (one ordered by |g|) move the same entries; each
    step draws a new mask that shares about k^2 / N entries with the last."""
    params_a, params_b = make_params([(30, 10)]), make_params([(30, 10)])
    opts = [GMTAdamW(p, mask_ratio=0.5, backend=backend, criterion="random", seed=9, mask_mode="freeze",
                     weight_decay=0.0) for p in (params_a, params_b)]
    masks = []
    for _ in range(3):
        set_grads(params_a, [torch.randn(30, 10) + 0.01])
        set_grads(params_b, [torch.arange(1.0, 301.0).reshape(30, 10)])  # GMT would keep the last 15 rows
        moved = []
        for params, opt in zip((params_a, params_b), opts):
            before = params[0].detach().clone()
            opt.step()
            moved.append(params[0].detach() != before)
        assert torch.equal(moved[0], moved[1])
        masks.append(moved[0])
        assert int(masks[-1].sum()) == 150
    overlaps = [int((masks[i] & masks[i + 1]).sum()) for i in range(2)]
    assert all(0.6 * 75 < o < 1.4 * 75 for o in overlaps), overlaps


@pytest.mark.parametrize("criterion", CRITERIA)
def test_refresh_every_none_keeps_the_first_mask(backend, criterion):
    params = make_params([(40,), (5, 5)])
    opt = GMTAdamW(params, mask_ratio=0.5, backend=backend, criterion=criterion, refresh_every=None,
                   mask_mode="freeze", weight_decay=0.0)
    first = None
    for step in range(4):
        set_grads(params, random_grads(params, scale=10.0 ** step))
        before = [p.detach().clone() for p in params]
        opt.step()
        moved = [p.detach() != b for p, b in zip(params, before)]  # freeze: exactly the kept entries move
        masks = [stored(opt, p) for p in params]
        assert all(torch.equal(m, k) for m, k in zip(moved, masks))
        first = first or masks
        assert all(torch.equal(m, f) for m, f in zip(masks, first))
        assert opt.mask_stats()["global"]["refreshed"] == (step == 0)


# --- state_dict ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_masks_survive_a_state_dict_round_trip(backend, dtype):
    def make():
        torch.manual_seed(1)
        params = make_params([(12, 5), (33,)], dtype=dtype)
        return params, GMTAdamW(params, **HYPER, mask_ratio=0.5, backend=backend, criterion="random",
                                refresh_every=3, seed=4)

    params, opt = make()
    grads = [random_grads(params) for _ in range(6)]
    for g in grads[:2]:
        set_grads(params, g)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    params2, opt2 = make()
    with torch.no_grad():
        for p, q in zip(params2, params):
            p.copy_(q)
    opt2.load_state_dict(saved)
    for p, q in zip(params, params2):
        assert opt2.state[q]["gmt_mask"].dtype == torch.uint8
        assert torch.equal(opt2.state[q]["gmt_mask"], opt.state[p]["gmt_mask"])
    for g in grads[2:]:
        for ps, o in ((params, opt), (params2, opt2)):
            set_grads(ps, g)
            o.step()
        assert opt.mask_stats()["global"] == opt2.mask_stats()["global"]
    assert all(torch.equal(p, q) for p, q in zip(params, params2))
    assert opt2._gmt["selections"].item() == opt._gmt["selections"].item() == 2

    # torch.optim.AdamW loads it (the masks ride along as state it does not read) and steps.
    adamw = torch.optim.AdamW(params2, lr=0.05, betas=(0.9, 0.99), weight_decay=0.1, amsgrad=True)
    adamw.load_state_dict(opt.state_dict())
    set_grads(params2, grads[0])
    adamw.step()
    back = GMTAdamW(params2, **HYPER, mask_ratio=0.5, backend=backend, criterion="random", refresh_every=3, seed=4)
    back.load_state_dict(adamw.state_dict())  # the masks went through AdamW's cast to the param dtype
    assert all(torch.equal(back.state[q]["gmt_mask"], opt.state[p]["gmt_mask"]) for p, q in zip(params, params2))


# --- errors and host syncs -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"criterion": "magnitude"}, "Unknown criterion 'magnitude'"),
    ({"refresh_every": 0}, "Invalid refresh_every value: 0"),
    ({"refresh_every": True}, "Invalid refresh_every value: True"),
    ({"refresh_every": 2.0}, "Invalid refresh_every value: 2.0"),
    ({"seed": -1}, r"Invalid seed value: -1. The random criterion's seed is an integer in \[0, 2\*\*64\)"),
    ({"seed": 1 << 64}, "Invalid seed value"),
    ({"score_eps": -1e-8}, "Invalid score_eps value: -1e-08"),
    ({"score_eps": math.nan}, "Invalid score_eps value: nan"),
])
def test_bad_arguments_say_what_is_possible(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GMTAdamW(make_params([(4,)]), **kwargs)


@pytest.mark.parametrize("options", [{"criterion": "random"}, {"refresh_every": 4}])
def test_non_contiguous_parameters_are_refused_before_anything_changes(backend, options):
    base = torch.randn(6, 4)
    p = torch.nn.Parameter(base.t())  # a transposed view: not contiguous
    q = torch.nn.Parameter(torch.randn(5))
    opt = GMTAdamW([q, p], backend=backend, **options)
    set_grads([q, p], [torch.randn(5), torch.randn(4, 6)])
    values = [q.detach().clone(), p.detach().clone()]
    with pytest.raises(ValueError, match="parameter 1 of param group 0 row-major, but it is not contiguous"):
        opt.step()
    assert torch.equal(q, values[0]) and torch.equal(p, values[1]) and not opt.state


@pytest.mark.parametrize("options", [
    {"criterion": "grad_over_weight"}, {"criterion": "random"}, {"refresh_every": 2},
    {"criterion": "random", "refresh_every": None, "nonfinite": "propagate"},
    {"criterion": "grad_over_weight", "refresh_every": 3},
], ids=str)
def test_step_never_reads_device_values_on_the_host(backend, options):
    assert_step_reads_nothing(backend, steps=3, **options)  # reuse steps and a selection


def test_a_cpu_step_that_reuses_the_mask_runs_no_selection(backend, monkeypatch):
    """On a CPU device, step() reads whether it selects (no device to wait for) and a reuse step
    runs no selection at all; the oracle tests above check that its result is unchanged."""
    from gmt_kernels import optimizer

    selections = []
    real = optimizer.select_thresholds
    monkeypatch.setattr(optimizer, "select_thresholds", lambda *a, **k: selections.append(1) or real(*a, **k))
    params = make_params([(50,), (6, 4)])
    opt = GMTAdamW(params, mask_ratio=0.5, backend=backend, refresh_every=3, nonfinite="propagate")
    for step in range(7):
        set_grads(params, random_grads(params))
        before = len(selections)
        opt.step()
        assert opt.mask_stats()["global"]["refreshed"] == (step % 3 == 0)
        assert len(selections) - before == (step % 3 == 0), step


def test_a_backend_without_the_criterion_is_refused_or_replaced_by_auto(monkeypatch):
    """A named backend whose kernels lack the criterion or stored masks refuses at construction;
    "auto" takes the reference backend instead and says so (Backend.criteria / stored_masks)."""
    import dataclasses

    from gmt_kernels import backends
    from gmt_kernels import optimizer as optimizer_module

    reference = backends.resolve("reference", torch.device("cpu"), torch.float32)
    grad_only = dataclasses.replace(reference, name="cpu", criteria=("grad",), stored_masks=False, auto_devices=("cpu",))
    monkeypatch.setitem(backends._REGISTRY, "cpu", grad_only)
    monkeypatch.setattr(optimizer_module, "_warned_criteria_fallbacks", set())
    params = make_params([(10,)])
    GMTAdamW(params, backend="cpu")  # criterion "grad", refresh_every=1: served
    with pytest.raises(RuntimeError, match="backend 'cpu' does not implement criterion 'random' yet"):
        GMTAdamW(params, backend="cpu", criterion="random")
    with pytest.raises(RuntimeError, match=r"does not implement stored masks \(refresh_every other than 1"):
        GMTAdamW(params, backend="cpu", refresh_every=4)
    with pytest.warns(RuntimeWarning, match="using the pure-PyTorch reference backend"):
        opt = GMTAdamW(params, backend="auto", criterion="grad_over_weight")
    set_grads(params, random_grads(params))
    opt.step()
    assert opt._resolve(torch.device("cpu"), torch.float32).name == "reference"
