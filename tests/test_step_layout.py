"""GMTAdamW keeps what a step derives from its parameters (batches, scopes, selection work lists)
between steps while a cheap key is unchanged (optimizer._Layout), and the Triton launchers skip
re-checking the storage of gradients and parameters that the key has checked. Every change that
the key must see is made here between steps, and each step is compared with the reference backend
run without the cache; the test also checks that the cache was reused on steady steps and rebuilt
after each change, so that it cannot pass with the cache never used. Gradients that are new
objects or move (zero_grad() makes new ones every step) keep the layout: the launch plans are
repointed to them, and the old storage, kept alive and overwritten, would show a stale plan.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from gmt_kernels import GMTAdamW, optimizer  # noqa: E402

SIZES = (40, 57, 33)


def make(backend, cached=True):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in SIZES]
    opt = GMTAdamW(params, lr=1e-2, weight_decay=0.1, mask_ratio=0.4, backend=backend)
    if not cached:  # the reference run: every step derived from scratch
        opt._layout_key = lambda: (None, None)
    return params, opt


def set_grads(params, step, fresh=()):
    """Deterministic gradients for `step`; in place, except for the indices in `fresh` (new tensors)."""
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen)
        p.grad = g if p.grad is None or i in fresh else p.grad.copy_(g)


def grad_set_to_none(params, opt):
    params[1].grad = None


_junked = []  # old gradient storage, kept alive and overwritten: a plan still reading it is seen


def _junk(t):
    _junked.append(t)
    t.fill_(1e3)


def new_grad_object(params, opt):
    old = params[0].grad
    params[0].grad = old.clone()
    _junk(old)


def grad_storage_swapped(params, opt):  # same tensor object, new storage
    old = params[2].grad.data
    params[2].grad.data = old.clone()
    _junk(old)


def param_storage_swapped(params, opt):  # as module.to() does: the Parameter object is kept
    params[0].data = params[0].data.clone()


def hyperparameters_changed(params, opt):
    opt.param_groups[0]["lr"] = 3e-2
    opt.param_groups[0]["mask_ratio"] = 0.6


def group_added(params, opt):
    extra = torch.nn.Parameter(torch.linspace(-1, 1, 29))
    params.append(extra)
    opt.add_param_group({"params": [extra], "mask_ratio": 0.6})


def state_dict_loaded(params, opt):
    opt.load_state_dict(opt.state_dict())


def state_replaced(params, opt):
    p = params[1]
    opt.state[p] = {k: v.clone() for k, v in opt.state[p].items()}


# The state tensors the update writes through the launch plans the layout keeps: each one replaced
# in its dict, or its storage swapped, must be seen (a stale plan would write the old storage).
def moment_replaced(params, opt):
    state = opt.state[params[2]]
    state["exp_avg"] = state["exp_avg"].clone()


def moment_storage_swapped(params, opt):
    state = opt.state[params[0]]
    state["exp_avg_sq"].data = state["exp_avg_sq"].data.clone()


def step_counter_replaced(params, opt):  # no longer one of the views the steps are counted through at once
    state = opt.state[params[1]]
    state["step"] = state["step"].clone()


CHANGES = [grad_set_to_none, new_grad_object, grad_storage_swapped, param_storage_swapped, hyperparameters_changed,
           group_added, state_dict_loaded, state_replaced, moment_replaced, moment_storage_swapped,
           step_counter_replaced]
GRADIENTS_MOVED = (new_grad_object, grad_storage_swapped)  # the layout holds; plans are repointed


@pytest.fixture(params=["packed", "python"])
def fingerprint(request, monkeypatch):
    """The key's fingerprint packed by the C++ extension, and the pure-Python one used without it."""
    if request.param == "python":
        monkeypatch.setattr(optimizer, "_packed_fingerprint", [False])
    else:
        pytest.importorskip("gmt_kernels._C", reason="the C++ extension is not built")
        monkeypatch.setattr(optimizer, "_packed_fingerprint", [None])
    return request.param


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_the_cached_layout_follows_every_change_between_steps(backend, fingerprint):
    params, opt = make(backend)
    expected_params, expected_opt = make("reference", cached=False)
    step = 0

    def both_step(change=None):
        nonlocal step
        step += 1
        for ps, o in ((params, opt), (expected_params, expected_opt)):
            set_grads(ps, step, fresh=(1,) if change is grad_set_to_none else ())
            if change is not None:
                change(ps, o)
            o.step()
        for i, (p, e) in enumerate(zip(params, expected_params)):
            torch.testing.assert_close(p.detach(), e.detach(), msg=lambda m: f"step {step}, parameter {i}: {m}")
            state, expected = opt.state.get(p, {}), expected_opt.state.get(e, {})
            assert state.keys() == expected.keys()
            for name in state:
                torch.testing.assert_close(state[name], expected[name],
                                           msg=lambda m: f"step {step}, parameter {i}, {name}: {m}")
        assert opt.mask_stats() == expected_opt.mask_stats()

    both_step()
    both_step()
    # A fresh optimizer's steps are views of one tensor, counted in one op while the layout holds
    # (so that the changes below are made to a layout that uses it).
    assert all(one is not None for _, _, one in opt._layout._counter_fills)
    for change in CHANGES:
        before = opt.__dict__.get("_layout")
        both_step(change)
        after = opt.__dict__.get("_layout")
        assert after is not None and (after is before) == (change in GRADIENTS_MOVED), change.__name__  # rebuilt
        both_step()  # (a gradient set to None comes back here: rebuilt again)
        steady = opt.__dict__.get("_layout")
        both_step()
        assert opt.__dict__.get("_layout") is steady, change.__name__  # reused while nothing changes
    assert len(params) == 4 and all(len(opt.state[p]) > 0 for p in params)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_state_tensor_replaced_by_a_view_of_its_own_storage_is_seen(backend, fingerprint):
    """The same storage address in another layout (a transpose of exp_avg): only its identity
    tells, and a launch plan kept from before would read it as before. Likewise a new gradient
    object there: its strides tell (the layout holds, its plans do not)."""

    def make_square(backend, cached=True):
        p = torch.nn.Parameter(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))
        opt = GMTAdamW([p], lr=1e-2, mask_ratio=0.4, backend=backend)
        if not cached:
            opt._layout_key = lambda: (None, None)
        return p, opt

    (p, opt), (e, expected_opt) = make_square(backend), make_square("reference", cached=False)
    for step in range(5):
        g = torch.randn(6, 6, generator=torch.Generator().manual_seed(10 + step))
        before = opt.__dict__.get("_layout")
        for q, o in ((p, opt), (e, expected_opt)):
            q.grad = g.clone() if q.grad is None else q.grad.copy_(g)
            if step == 2:  # a new gradient object on the same storage, transposed: same address, new strides
                q.grad = torch.empty(0).set_(q.grad.untyped_storage(), 0, (6, 6), (1, 6)).copy_(g)
            if step == 3:
                o.state[q]["exp_avg"] = o.state[q]["exp_avg"].t()
            o.step()
        assert (opt.__dict__.get("_layout") is before) == (step not in (0, 3))  # rebuilt, else reused
        torch.testing.assert_close(p.detach(), e.detach(), msg=lambda m: f"step {step}: {m}")
        torch.testing.assert_close(opt.state[p]["exp_avg"], expected_opt.state[e]["exp_avg"])


def test_gradients_made_anew_every_step_keep_the_layout_and_its_plans_are_repointed(monkeypatch):
    """zero_grad() then new gradients at new addresses, every step (the old ones kept alive and
    overwritten): steps equal the uncached reference, the layout is never rebuilt and, once the
    layout's plans exist, none is made from scratch (each is repointed)."""
    from gmt_kernels.backends.triton import adamw, histogram

    builds = []
    for module in (adamw, histogram):
        plan = module._plan
        monkeypatch.setattr(module, "_plan", lambda *a, plan=plan, **k: builds.append(1) or plan(*a, **k))
    params, opt = make("triton")
    expected_params, expected_opt = make("reference", cached=False)
    layouts = set()
    for step in range(5):
        builds.clear()
        for ps, o in ((params, opt), (expected_params, expected_opt)):
            old = [p.grad for p in ps]
            o.zero_grad()
            set_grads(ps, step)
            for g in old:
                if g is not None:
                    _junk(g)
            o.step()
        layouts.add(id(opt._layout))
        assert (len(builds) > 0) == (step <= 1), f"step {step}: {len(builds)} plans made"  # (1: the layout's first use)
        for i, (p, e) in enumerate(zip(params, expected_params)):
            torch.testing.assert_close(p.detach(), e.detach(), msg=lambda m: f"step {step}, parameter {i}: {m}")
        assert opt.mask_stats() == expected_opt.mask_stats()
    assert len(layouts) == 1


def test_the_fingerprint_tells_identity_address_and_strides_apart(fingerprint):
    """optimizer._fingerprint against what it must see: the same objects, addresses and strides give
    equal values; another object, a moved storage, another layout of the same storage, or a tensor
    where None was, give different ones; a tensor without storage is a RuntimeError."""
    fp = optimizer._fingerprint
    a, b = torch.zeros(4, 4), torch.zeros(4, 4)
    assert fp([a, b], [a, b], [a, b]) == fp([a, b], [a, b], [a, b])
    assert fp([a, b]) != fp([b, a])
    assert fp([a, None]) != fp([a, b])
    same_storage = torch.empty(0).set_(a.untyped_storage(), 0, (4, 4), (4, 1))
    assert fp([], [a]) == fp([], [same_storage]) and fp([a]) != fp([same_storage])  # address, not identity
    assert fp([], [a]) != fp([], [b])
    assert fp([], [], [a]) == fp([], [], [b]) != fp([], [], [a.t()])  # strides, not address
    assert fp([], [], [torch.zeros(())]) != fp([], [], [None])
    moved = a.clone()
    before = fp([], [a, a])
    a.data = moved
    assert fp([], [a, a]) != before
    with pytest.raises(RuntimeError):
        fp([], [torch.zeros(3).to_sparse()])


def test_a_vouch_ends_when_the_caller_empties_its_store():
    """storage_vouched: when the gradients' storage changes, the caller empties token.plans, and a
    plan cached before (here one with weights, kept in the shared cache, not the token's store)
    must check the gradients' addresses again instead of trusting the old vouch."""
    from types import SimpleNamespace

    from gmt_kernels import radix
    from gmt_kernels.backends import resolve, storage_vouched
    from gmt_kernels.options import Scoring

    backend = resolve("triton", torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(300, generator=gen), torch.randn(77, generator=gen)]
    weights = [torch.randn(300, generator=gen), torch.randn(77, generator=gen)]  # kept alive: the plan stays
    scoring = Scoring("grad_over_weight", score_eps=1e-3, weights=weights)
    fmt = radix.KEY_FORMATS_BY_NAME["f32"]
    token = SimpleNamespace(plans={}, moved_plans={})

    def histogram():
        state = radix.initial_state([100], [377], [0], fmt)
        hist = torch.zeros(1, radix.HIST_COLUMNS, dtype=torch.int64)
        with storage_vouched(token):
            backend.radix_histogram(grads, [0, 0], state, hist, key_format=fmt, scoring=scoring)
        return hist

    histogram()
    old = grads[1].data
    grads[1].data = old * 1e6  # moved, and the new values fall in other bins
    old.fill_(0.0)
    token.plans = {}
    reference = resolve("reference", torch.device("cpu"), torch.float32)
    expected = torch.zeros(1, radix.HIST_COLUMNS, dtype=torch.int64)
    reference.radix_histogram(grads, [0, 0], radix.initial_state([100], [377], [0], fmt), expected, key_format=fmt,
                              scoring=scoring)
    assert torch.equal(histogram(), expected)
