"""GMTAdamW in training scripts written for torch.optim.AdamW (issue 10): checkpoints, distributed
checkpoints, deferred initialisation, GradScaler with nonfinite="raise", torch's keyword arguments,
layouts, copies, and a backend registry that remembers failures. Every backend unless the behaviour
is the frontend's alone."""

from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch

from gmt_kernels import GMTAdamW, backends
from oracle import OracleAdamW, keep_count, kth_largest
from test_semantics import assert_close, make_params, random_grads, saved_and_loaded, set_grads, small_model, train


def steps_of(params, opt):
    return [opt.state[p]["step"].item() for p in params]


# --- checkpoints ---------------------------------------------------------------------------


def test_adamw_checkpoint_keeps_each_groups_mask_ratio(backend):
    """A torch.optim.AdamW state_dict has no mask_ratio: every group keeps its own, and the
    mask_ratio=0 group stays plain AdamW."""
    model = small_model()
    adamw = torch.optim.AdamW(
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.01, foreach=False)
    train(model, adamw, 2, seed=0)
    gmt_model = copy.deepcopy(model)
    opt = GMTAdamW([{"params": gmt_model[0].parameters(), "mask_ratio": 0.0},
                    {"params": gmt_model[2].parameters()}], lr=0.01, mask_ratio=0.5, backend=backend)
    opt.load_state_dict(saved_and_loaded(adamw.state_dict()))
    assert [g["mask_ratio"] for g in opt.param_groups] == [0.0, 0.5]
    for _ in range(2):  # the same gradients for both (a masked group 1 would change group 0's)
        grads = random_grads(list(model.parameters()))
        set_grads(list(model.parameters()), grads)
        set_grads(list(gmt_model.parameters()), grads)
        adamw.step()
        opt.step()
    for p, q in zip(model[0].parameters(), gmt_model[0].parameters()):
        assert_close(q.detach(), p.detach())  # mask_ratio 0: exactly AdamW's trajectory
    assert opt.mask_stats()["global"]["numel"] == sum(p.numel() for p in model[2].parameters())


def test_global_scope_rule_is_checked_on_load_and_at_step_time(backend):
    a, b = make_params([(6,), (5,)])
    opt = GMTAdamW([{"params": [a]}, {"params": [b]}], mask_ratio=0.3, backend=backend)
    saved = opt.state_dict()
    saved["param_groups"][1]["mask_ratio"] = 0.6
    with pytest.raises(ValueError, match=r"must share one mask_ratio; got \[0.3, 0.6\]"):
        opt.load_state_dict(saved)
    assert [g["mask_ratio"] for g in opt.param_groups] == [0.3, 0.3]

    set_grads([a, b], random_grads([a, b]))
    before = [a.detach().clone(), b.detach().clone()]
    opt.param_groups[0]["mask_ratio"] = 0.5  # a schedule that edits one group only
    with pytest.raises(ValueError, match="a schedule must change every masked group at once"):
        opt.step()
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1]) and len(opt.state) == 0
    opt.param_groups[1]["mask_ratio"] = 0.5
    opt.step()
    assert opt.mask_stats()["global"]["kept"] == keep_count(11, 0.5)


def test_distributed_checkpoint_keeps_gmt_state(backend, tmp_path):
    """torch.distributed.checkpoint keeps only "state" and "param_groups": GMT's counters ride in
    the groups, through dcp.save / dcp.load, flattened or not; torch.optim.AdamW loads the result."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict)

    model = small_model()
    opt = GMTAdamW(model.parameters(), mask_ratio=0.5, backend=backend)
    train(model, opt, 2, seed=0)
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    train(model, opt, 1, seed=1)
    assert opt.skipped_steps.item() == 1
    for flat in (False, True):
        options = StateDictOptions(flatten_optimizer_state_dict=flat)
        with pytest.warns(UserWarning, match="single process"):
            dcp.save({"optim": get_optimizer_state_dict(model, opt, options=options)},
                     checkpoint_id=tmp_path / f"flat{flat}")
        restored = copy.deepcopy(model)
        fresh = GMTAdamW(restored.parameters(), mask_ratio=0.5, backend=backend)
        for target in (fresh, torch.optim.AdamW(restored.parameters(), foreach=False)):
            loaded = {"optim": get_optimizer_state_dict(restored, target, options=options)}
            with pytest.warns(UserWarning, match="single process"):
                dcp.load(loaded, checkpoint_id=tmp_path / f"flat{flat}")
            set_optimizer_state_dict(restored, target, loaded["optim"], options=options)
            for p, q in zip(model.parameters(), restored.parameters()):
                assert torch.equal(opt.state[p]["exp_avg_sq"], target.state[q]["exp_avg_sq"])
        assert fresh.skipped_steps.item() == 1
        assert fresh.mask_stats() == opt.mask_stats()


def test_deepcopy_copies_configuration_state_and_counters(backend):
    model = small_model()
    opt = GMTAdamW(model.parameters(), mask_ratio=0.4, scope="tensor", mask_mode="freeze", nonfinite="skip",
                   backend=backend)
    train(model, opt, 2, seed=0)
    model[0].weight.grad[1, 1] = float("inf")
    opt.step()
    twin_model, twin = copy.deepcopy((model, opt))
    assert (twin.scope, twin.mask_mode, twin.backend, twin.skipped_steps.item()) == ("tensor", "freeze", backend, 1)
    assert twin.mask_stats() == opt.mask_stats()
    train(model, opt, 2, seed=3)
    train(twin_model, twin, 2, seed=3)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    assert twin.skipped_steps.item() == 1 and twin.param_groups[0]["gmt"] is twin._gmt


# --- GradScaler and nonfinite="raise" ---------------------------------------------------------


def test_raise_policy_skips_gradscaler_overflow_steps(backend):
    """found_inf is GradScaler's verdict: an overflow step is skipped, not an error."""
    (p,) = make_params([(20,)])
    opt = GMTAdamW([p], mask_ratio=0.3, nonfinite="raise", backend=backend)
    p.grad = torch.randn(20) * 1024
    p.grad[4] = float("inf")
    before = p.detach().clone()
    opt.step(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(1.0))
    assert torch.equal(p.detach(), before) and opt.skipped_steps.item() == 1
    with pytest.raises(FloatingPointError, match="parameter 0 in param group 0"):
        opt.step(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
    assert torch.equal(p.detach(), before)


# --- deferred initialisation -----------------------------------------------------------------


def test_optimizer_built_on_meta_trains_the_materialised_model(backend, monkeypatch):
    """FSDP2's recipe: build on meta, create the optimizer, to_empty, initialise, train. With
    parameters swapped in place the step follows them (device, counters) and matches an optimizer
    created afterwards; with to_empty's new parameters the stale optimizer refuses to step."""

    def build():
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))

    torch.manual_seed(0)
    reference = build()
    with torch.device("meta"):
        stale_model, model = build(), build()
    stale = GMTAdamW(stale_model.parameters(), lr=0.01, mask_ratio=0.3, backend=backend)
    stale_model.to_empty(device="cpu")  # new Parameter objects: the optimizer still holds the meta ones
    train_error = r"parameter 0 of param group 0 is on the meta device.*set_swap_module_params_on_conversion"
    with pytest.raises(RuntimeError, match=train_error):
        train(stale_model, stale, 1, seed=4)

    opt = GMTAdamW(model.parameters(), lr=0.01, mask_ratio=0.3, backend=backend)
    assert opt.skipped_steps.device.type == "cpu"
    monkeypatch.setattr(torch.__future__, "_swap_module_params_on_conversion", True)
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    initial = [p.detach().clone() for p in model.parameters()]
    after = GMTAdamW(reference.parameters(), lr=0.01, mask_ratio=0.3, backend=backend)
    train(model, opt, 3, seed=4)
    train(reference, after, 3, seed=4)
    for p, q, p0 in zip(model.parameters(), reference.parameters(), initial):
        assert torch.equal(p, q) and not torch.equal(p, p0)
    assert opt.mask_stats() == after.mask_stats() and opt.skipped_steps.device.type == "cpu"


# --- torch.optim.AdamW's keyword arguments ------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(foreach=None), dict(foreach=True), dict(fused=False), dict(fused=True),
                                    dict(capturable=False, differentiable=False)])
def test_adamw_keywords_that_change_nothing_are_accepted(kwargs):
    params = make_params([(12,), (3, 4)])
    twins = [p.detach().clone().requires_grad_() for p in params]
    opts = [GMTAdamW(params, backend="reference", **kwargs), GMTAdamW(twins, backend="reference")]
    grads = random_grads(params)
    set_grads(params, grads)
    set_grads(twins, grads)
    for opt in opts:
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins))


@pytest.mark.parametrize("name", ["capturable", "differentiable"])
def test_capturable_and_differentiable_are_refused(name):
    with pytest.raises(ValueError, match=rf"GMTAdamW\({name}=True\) is not supported.*"):
        GMTAdamW(make_params([(3,)]), **{name: True})


def test_parameter_listed_twice_is_refused():
    a, b = make_params([(3,), (4,)])
    with pytest.raises(ValueError, match=r"param group 0 lists the same parameter twice \(positions 0 and 2\)"):
        GMTAdamW([a, b, a])
    opt = GMTAdamW([a])
    with pytest.raises(ValueError, match=r"param group 1 lists the same parameter twice"):
        opt.add_param_group({"params": iter([b, b])})
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [a]})  # torch's own rule
    assert len(opt.param_groups) == 1


# --- param groups, dtypes and layouts through the optimizer ----------------------------------------


def test_add_param_group_then_step_matches_oracle(backend):
    a, b, c = make_params([(40,), (7, 9), (25,)])
    opt = GMTAdamW([a], lr=0.01, mask_ratio=0.3, backend=backend)
    set_grads([a], random_grads([a]))
    opt.step()
    opt.add_param_group({"params": [b, c]})
    oracle = OracleAdamW([a, b, c], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                         maximize=False, mask_ratio=0.3, scopes=[[0, 1, 2]], mask_mode="grad")
    oracle.params[0].copy_(a.detach())
    oracle.exp_avgs[0].copy_(opt.state[a]["exp_avg"])
    oracle.exp_avg_sqs[0].copy_(opt.state[a]["exp_avg_sq"])
    oracle.steps[0].fill_(1.0)
    for _ in range(2):
        grads = random_grads([a, b, c])
        set_grads([a, b, c], grads)
        opt.step()
        oracle.step(grads)
    for p, q in zip([a, b, c], oracle.params):
        assert_close(p.detach(), q)
    assert steps_of([a, b, c], opt) == [3.0, 2.0, 2.0]


def test_mixed_bf16_and_fp32_share_one_global_threshold(backend):
    a, b = make_params([(300,)], torch.bfloat16) + make_params([(200,)], torch.float32)
    opt = GMTAdamW([a, b], mask_ratio=0.4, threshold="exact", backend=backend)
    grads = random_grads([a, b])
    set_grads([a, b], grads)
    opt.step()
    stats = opt.mask_stats()["global"]
    expected = kth_largest(grads, keep_count(500, 0.4))
    assert stats["threshold"] == expected
    kept = sum(int((g.double().abs() >= expected).sum()) for g in grads)
    assert stats["kept"] == kept and stats["numel"] == 500


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_non_contiguous_layouts_are_kept_and_updated_like_contiguous(backend, layout):
    shape = (4, 3, 5, 6) if layout == "channels_last" else (7, 9)
    base = torch.randn(shape)
    if layout == "channels_last":
        param = torch.nn.Parameter(base.to(memory_format=torch.channels_last))
    else:
        param = torch.nn.Parameter(base.t().contiguous().t())
    dense = torch.nn.Parameter(base.clone())
    opts = [GMTAdamW([param], lr=0.01, mask_ratio=0.3, backend=backend),
            GMTAdamW([dense], lr=0.01, mask_ratio=0.3, backend=backend)]
    strides = param.stride()
    for _ in range(2):
        g = torch.randn(shape)
        param.grad = torch.empty_like(param).copy_(g)  # the parameter's own layout, as autograd gives
        dense.grad = g.clone()
        for opt in opts:
            opt.step()
    assert param.stride() == strides != dense.stride()
    assert opts[0].state[param]["exp_avg"].stride() == strides
    assert_close(param.detach(), dense.detach())


# --- the backend registry ------------------------------------------------------------------


def test_failed_backend_is_not_imported_again(monkeypatch):
    calls = []

    def broken():
        calls.append(1)
        raise ImportError("no _C here")

    monkeypatch.setitem(backends._LOADERS, "cpu", broken)
    monkeypatch.delitem(backends._REGISTRY, "cpu", raising=False)
    monkeypatch.setattr(backends, "_FAILURES", {})
    monkeypatch.setattr(backends, "_warned_fallbacks", set())
    params = make_params([(5,), (6,)])
    with pytest.warns(RuntimeWarning, match="backend 'cpu' failed to load: ImportError: no _C here"):
        opt = GMTAdamW(params)
        for _ in range(3):
            set_grads(params, random_grads(params))
            opt.step()
    assert len(calls) == 1
    assert backends.available_backends()["cpu"] == "backend 'cpu' failed to load: ImportError: no _C here"


def test_mps_and_meta_are_refused_by_the_reference_backend_with_a_reason():
    with pytest.raises(RuntimeError, match="float64, which the MPS device lacks"):
        backends.resolve("reference", torch.device("mps"), torch.float32)
    with pytest.raises(RuntimeError, match="no backend for torch.float32 tensors on mps.*float64"):
        backends.resolve("auto", torch.device("mps"), torch.float32)


def test_triton_without_masked_histogram_is_refused_at_load(monkeypatch):
    """A Triton older than 3.4 has no tl.histogram(mask=): the backend does not load, and says why."""
    import triton.language as tl

    monkeypatch.setattr(tl, "histogram", lambda input, num_bins, _semantic=None, _generator=None: None)
    for name in [m for m in sys.modules if m.startswith("gmt_kernels.backends.triton")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(backends._REGISTRY, "triton", raising=False)
    monkeypatch.setattr(backends, "_FAILURES", {})
    reason = backends.available_backends()["triton"]
    assert "too old for gmt_kernels" in reason and "pip install 'triton>=3.4'" in reason
    with pytest.raises(RuntimeError, match="backend 'triton' cannot serve"):
        backends.resolve("triton", torch.device("cpu"), torch.float32)


def test_unmasked_groups_are_checked_for_nan_in_one_pass(backend, monkeypatch):
    """mask_ratio=0 groups need no threshold: under nonfinite="skip" one histogram pass counts
    their NaN/inf entries; a masked group still takes its full selection."""
    name = backend
    passes = []
    real = backends._REGISTRY[name]

    def counting(*args, **kwargs):
        passes.append(1)
        return real.radix_histogram(*args, **kwargs)

    monkeypatch.setitem(backends._REGISTRY, name, dataclasses.replace(real, radix_histogram=counting))
    params = make_params([(300,), (40,)])
    opt = GMTAdamW(params, mask_ratio=0.0, backend=backend)
    set_grads(params, random_grads(params))
    opt.step()
    assert len(passes) == 1
    params[1].grad[3] = float("nan")
    before = [p.detach().clone() for p in params]
    opt.step()
    assert len(passes) == 2 and opt.skipped_steps.item() == 1
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    masked = GMTAdamW(params, mask_ratio=0.3, threshold="exact", backend=backend)
    set_grads(params, random_grads(params))
    masked.step()
    assert len(passes) == 2 + 3  # 31-bit keys, 12 bits a pass
