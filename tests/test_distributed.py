"""Distributed GMT on real process groups: gloo on loopback, 2 and 4 ranks (issue 6).

Starting processes costs seconds, so each world size is started once (a module fixture) and its
ranks run every scenario in turn, saving what the tests below check: thresholds against a sort of
the unsharded gradient (tests/oracle.py), parameters against a single-process run, the number and
size of all-reduces, agreement on skipped steps. A scenario that fails on a rank is reported by
the tests that read it, with the rank's traceback; the others still run.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from gmt_kernels import GMTAdamW, available_backends, magnitude_threshold, radix
from oracle import keep_count, kth_largest


def histograms_then_kept(step: int) -> list:
    """What step `step` (from 0) of one sharded float32 scope all-reduces: one histogram per pass,
    then the kept count. These tests' models are too small to sample: the first step makes full
    passes; later ones start around the last threshold (radix.warm_state), one pass more at most."""
    return [radix.HIST_COLUMNS * 8] * radix.KEY_FORMATS[torch.float32].passes(False, warm=step > 0) + [8]


BACKENDS = ["reference"] + (["cpu"] if available_backends()["cpu"] is None else [])
STEPS = 3
CRITERIA_OPTIONS = ("grad", "grad_over_weight", "random")  # each with refresh_every=2 (stored masks)
GLOBAL_BATCH = 8  # split evenly over 2 or 4 ranks
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
TIMEOUT_S = 300  # a whole world's run (on 2 shared cores); collectives time out sooner (PG_TIMEOUT)
PG_TIMEOUT = datetime.timedelta(seconds=60)


# ---- the model and data, identical in every process ---------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyTransformer(nn.Module):
    """~86k parameters: over 2**16, so threshold='approx' really takes the approximate path; the
    head's 5 outputs shard unevenly (2, 2, 1, 0 entries of its bias on 4 ranks)."""

    def __init__(self, inputs=12, width=48, heads=4, depth=3, outputs=5):
        super().__init__()
        self.embed = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, outputs)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_model() -> TinyTransformer:
    torch.manual_seed(1234)
    return TinyTransformer()


def batch(step: int):
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 6, 12, generator=generator)
    return x, torch.randn(GLOBAL_BATCH, 6, 5, generator=generator)


def loss_of(model, x, y):
    return F.mse_loss(model(x), y)  # a mean: the mean of equal-sized ranks' means is the global mean


def param_groups(model, grouped: bool):
    """Two groups (blocks / the rest) for scope='group', else one."""
    if not grouped:
        return list(model.parameters())
    blocks = [p for n, p in model.named_parameters() if n.startswith("blocks.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("blocks.")]
    return [{"params": blocks}, {"params": rest}]


# ---- in the worker processes --------------------------------------------------------------------


class AllReduceLog:
    """Records the all-reduces issued while it is active (sizes in bytes)."""

    def __init__(self):
        self.sizes: list[int] = []

    def __enter__(self):
        self._original = dist.all_reduce

        def logged(tensor, *args, **kwargs):
            self.sizes.append(tensor.numel() * tensor.element_size())
            return self._original(tensor, *args, **kwargs)

        dist.all_reduce = logged
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def fsdp_model():
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def local_rows(x, rank, world):
    per_rank = GLOBAL_BATCH // world
    return x[rank * per_rank : (rank + 1) * per_rank]


def train_fsdp(rank, world, backend, threshold, scope, mask_ratio=0.7, **options):
    """Several FSDP2 steps; everything needed to check them against the unsharded computation.
    options: more GMTAdamW arguments (criterion, refresh_every, ...)."""
    model = fsdp_model()
    opt = GMTAdamW(param_groups(model, scope == "group"), mask_ratio=mask_ratio, scope=scope,
                   threshold=threshold, backend=backend, **HYPER, **options)
    out = {"grads": [], "stats": [], "all_reduce_bytes": []}
    for step in range(STEPS):
        x, y = batch(step)
        loss_of(model, local_rows(x, rank, world), local_rows(y, rank, world)).backward()
        out["grads"].append({n: full(p.grad) for n, p in model.named_parameters()})
        with AllReduceLog() as log:
            opt.step()
        out["all_reduce_bytes"].append(log.sizes)
        out["stats"].append(opt.mask_stats())
        opt.zero_grad()
    out["params"] = {n: full(p).detach() for n, p in model.named_parameters()}
    out["state_is_sharded"] = all(
        type(s[key]) is type(p) and s[key].placements == p.placements
        for p, s in opt.state.items() for key in ("exp_avg", "exp_avg_sq")
    )
    if options.get("refresh_every", 1) != 1:  # stored masks: DTensors sharded like their parameters
        out["masks_are_sharded"] = all(
            type(s["gmt_mask"]) is type(p) and s["gmt_mask"].placements == p.placements
            and s["gmt_mask"].to_local().shape[0] == p.to_local().shape[0]
            for p, s in opt.state.items()
        )
        out["masks"] = {n: full(opt.state[p]["gmt_mask"]) for n, p in model.named_parameters()}
    return out


def train_ddp(rank, world, backend):
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model())
    opt = GMTAdamW(model.parameters(), mask_ratio=0.7, threshold="exact", backend=backend, **HYPER)
    sizes = []
    for step in range(STEPS):
        x, y = batch(step)
        loss_of(model, local_rows(x, rank, world), local_rows(y, rank, world)).backward()
        with AllReduceLog() as log:
            opt.step()
        sizes += log.sizes
        opt.zero_grad()
    return {"params": {n.removeprefix("module."): p.detach() for n, p in model.named_parameters()},
            "all_reduce_bytes": sizes}


def nonfinite_on_one_rank(rank, world, nonfinite):
    """The last rank alone puts a NaN into its shard of one gradient."""
    model = fsdp_model()
    opt = GMTAdamW(model.parameters(), mask_ratio=0.5, threshold="exact", nonfinite=nonfinite,
                   backend="reference", **HYPER)
    x, y = batch(0)
    loss_of(model, local_rows(x, rank, world), local_rows(y, rank, world)).backward()
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    if rank == world - 1:
        model.blocks[1].up.weight.grad.to_local()[0, 0] = float("nan")
    raised = None
    try:
        opt.step()
    except FloatingPointError as exc:
        raised = str(exc)
    return {
        "unchanged": all(torch.equal(before[n], p.to_local()) for n, p in model.named_parameters()),
        "skipped_steps": int(opt.skipped_steps),
        "steps": sorted({float(s["step"]) for s in opt.state.values()}),
        "raised": raised,
    }


def thresholds_of_shards(rank, world):
    """magnitude_threshold over a DTensor and over plain, unequal shards with an explicit group."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(7)
    whole = torch.randn(1001, 3) * torch.logspace(-3, 3, 3)
    dtensor = distribute_tensor(whole, mesh, [Shard(0)])
    bounds = [0, 5, 400, 1700, 3003][: world] + [3003]  # rank r holds flat entries bounds[r]:bounds[r+1]
    shard = whole.reshape(-1)[bounds[rank] : bounds[rank + 1]]
    out = {}
    for ratio in (0.0, 0.3, 0.99, 1.0):
        out[("dtensor", ratio)] = magnitude_threshold([dtensor], ratio, backend="reference").item()
        out[("plain", ratio)] = magnitude_threshold([shard], ratio, process_group=dist.group.WORLD,
                                                    backend="reference").item()
    with AllReduceLog() as log:
        magnitude_threshold([shard], 0.3, process_group=dist.group.WORLD, backend="reference")
    out["cached_count_all_reduces"] = len(log.sizes)
    out["whole"] = whole
    return out


def zero_style_shards(rank, world):
    """ZeRO style: each rank owns a slice of one flat parameter, plain tensors, explicit group."""
    torch.manual_seed(11)
    flat = torch.randn(3001)
    grads = [torch.randn(3001) * torch.rand(3001) for _ in range(STEPS)]
    cut = [i * 3001 // world for i in range(world + 1)]
    mine = nn.Parameter(flat[cut[rank] : cut[rank + 1]].clone())
    opt = GMTAdamW([mine], mask_ratio=0.8, threshold="exact", backend="reference",
                   process_group=dist.group.WORLD, **HYPER)
    for g in grads:
        mine.grad = g[cut[rank] : cut[rank + 1]].clone()
        opt.step()
    return {"flat": flat, "grads": grads, "mine": mine.detach(), "stats": opt.mask_stats()}


def mixed_layouts_data():
    torch.manual_seed(5)
    params = [torch.randn(37, 4), torch.randn(50), torch.randn(3, 3)]
    grads = [[torch.randn(p.shape) * (i + 1) for i, p in enumerate(params)] for _ in range(STEPS)]
    return params, grads


def mixed_layouts(rank, world, scope):
    """A Shard(0) DTensor, a Replicate DTensor and a plain (replicated) tensor in one optimizer:
    each replica is counted once in group-wide totals; scope='tensor' all-reduces only the shard's row."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    layouts = [[Shard(0)], [Replicate()], None]
    place = lambda t, layout: t.clone() if layout is None else distribute_tensor(t.clone(), mesh, layout)  # noqa: E731
    values, grads = mixed_layouts_data()
    params = [nn.Parameter(place(v, layout)) for v, layout in zip(values, layouts)]
    opt = GMTAdamW(params, mask_ratio=0.6, scope=scope, threshold="exact", backend="reference", **HYPER)
    out = {"stats": [], "all_reduce_bytes": []}
    for step_grads in grads:
        for p, g, layout in zip(params, step_grads, layouts):
            p.grad = place(g, layout)
        with AllReduceLog() as log:
            opt.step()
        out["all_reduce_bytes"].append(log.sizes)
        out["stats"].append(opt.mask_stats())
    out["params"] = [full(p).detach() for p in params]
    return out


def hsdp_with_checkpoint(rank, world, ckpt_dir):
    """HSDP (2-d mesh, (Replicate, Shard)): histograms go over the shard dim only; then the
    optimizer state goes through torch.distributed.checkpoint and back."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = make_model()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    make_opt = lambda: GMTAdamW(model.parameters(), mask_ratio=0.7, threshold="exact", backend="reference", **HYPER)  # noqa: E731
    opt = make_opt()
    x, y = batch(0)
    replica = slice(mesh.get_coordinate()[0] * GLOBAL_BATCH // 2, (mesh.get_coordinate()[0] + 1) * GLOBAL_BATCH // 2)
    loss_of(model, x[replica], y[replica]).backward()
    grads = {n: full(p.grad) for n, p in model.named_parameters()}
    with AllReduceLog() as log:
        opt.step()
    opt.zero_grad()
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt_dir)
    restored = make_opt()
    state = get_optimizer_state_dict(model, restored)  # fresh state of the right layout to load into
    dcp.load({"optim": state}, checkpoint_id=ckpt_dir)
    set_optimizer_state_dict(model, restored, state)
    same_state = all(
        torch.equal(full(opt.state[p][key]), full(restored.state[p][key])) and type(restored.state[p][key]) is type(p)
        for p in model.parameters() for key in ("exp_avg", "exp_avg_sq")
    ) and all(float(opt.state[p]["step"]) == float(restored.state[p]["step"]) == 1.0 for p in model.parameters())
    return {"grads": grads, "stats": opt.mask_stats(), "all_reduce_bytes": log.sizes,
            "group_ranks": dist.get_process_group_ranks(opt._sharding.group), "same_state": same_state}


def scenarios(rank, world):
    jobs = {}
    for backend in BACKENDS:
        jobs[("fsdp", backend, "exact", "global")] = lambda b=backend: train_fsdp(rank, world, b, "exact", "global")
        jobs[("ddp", backend)] = lambda b=backend: train_ddp(rank, world, b)
    jobs[("fsdp", "reference", "approx", "global")] = lambda: train_fsdp(rank, world, "reference", "approx", "global")
    for scope in ("tensor", "group"):
        jobs[("fsdp", "reference", "exact", scope)] = lambda s=scope: train_fsdp(rank, world, "reference", "exact", s)
    for criterion in CRITERIA_OPTIONS:  # (4 ranks: uneven shards, one rank without a row of the head's bias)
        jobs[("fsdp-criterion", criterion)] = lambda c=criterion: train_fsdp(
            rank, world, "reference", "exact", "global", criterion=c, refresh_every=2, seed=3)
    for mode in ("skip", "raise"):
        jobs[("nonfinite", mode)] = lambda m=mode: nonfinite_on_one_rank(rank, world, m)
    jobs["thresholds"] = lambda: thresholds_of_shards(rank, world)
    for scope in ("global", "tensor"):
        jobs[("mixed", scope)] = lambda s=scope: mixed_layouts(rank, world, s)
    jobs["zero"] = lambda: zero_style_shards(rank, world)
    return jobs


def worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 4 ranks share 2 cores
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # our head returns a view; no in-place use
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=PG_TIMEOUT)
    results = {}
    jobs = scenarios(rank, world)
    jobs["hsdp"] = lambda: hsdp_with_checkpoint(rank, world, os.path.join(out_dir, "checkpoint"))
    for name, job in jobs.items():
        try:
            results[name] = job()
        except Exception:  # reported by the tests that read this scenario
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()  # a rank that failed early must not run ahead into the next scenario
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


# ---- in the test process ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def world(request, tmp_path_factory):
    size = request.param
    out_dir = str(tmp_path_factory.mktemp(f"world{size}"))
    context = mp.start_processes(worker, args=(size, free_port(), out_dir), nprocs=size, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {size}-rank run did not finish within {TIMEOUT_S} s")
    return size, [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(size)]


def result(world, name, rank=0):
    got = world[1][rank][name]
    if "error" in got:
        pytest.fail(f"rank {rank} failed in scenario {name}:\n{got['error']}")
    return got


def single_process(grads_per_step, threshold, scope, backend, mask_ratio=0.7, **options):
    """The same optimizer on the unsharded model, fed the same (full) gradients."""
    model = make_model()
    opt = GMTAdamW(param_groups(model, scope == "group"), mask_ratio=mask_ratio, scope=scope,
                   threshold=threshold, backend=backend, **HYPER, **options)
    single_process.last = opt
    named = dict(model.named_parameters())
    stats = []
    for grads in grads_per_step:
        for n, g in grads.items():
            named[n].grad = g.clone()
        opt.step()
        stats.append(opt.mask_stats())
    return {n: p.detach() for n, p in named.items()}, stats


def scope_members(model, scope):
    named = list(make_model().named_parameters())
    if scope == "global":
        return {"global": [n for n, _ in named]}
    if scope == "group":
        return {"group0": [n for n, _ in named if n.startswith("blocks.")],
                "group1": [n for n, _ in named if not n.startswith("blocks.")]}
    return {f"group0.{i}": [n] for i, (n, _) in enumerate(named)}


def assert_params_equal(actual: dict, expected: dict, rtol=1e-6, atol=1e-7):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp_exact_threshold_is_the_unsharded_kth_largest(world, backend):
    """Issue 6 item 1: the threshold over FSDP2 shards is the k-th largest |g| of the whole model;
    mask_stats reports global counts; every rank agrees; state stays sharded (item 2)."""
    size, ranks = world
    run = result(world, ("fsdp", backend, "exact", "global"))
    names = scope_members(None, "global")["global"]
    for step, grads in enumerate(run["grads"]):
        numel = sum(grads[n].numel() for n in names)
        k = keep_count(numel, 0.7)
        stats = run["stats"][step]["global"]
        assert stats["numel"] == numel
        assert stats["threshold"] == kth_largest([grads[n] for n in names], k)
        assert stats["kept"] >= k - 1  # summed over ranks (the exact count is checked by the replay)
        for r in range(1, size):
            assert result(world, ("fsdp", backend, "exact", "global"), r)["stats"][step] == run["stats"][step]
    assert run["state_is_sharded"]


def trained_in_one_process(backend):
    """The parameters after the same training run (model, data, seed) in this process alone."""
    model = make_model()
    opt = GMTAdamW(model.parameters(), mask_ratio=0.7, threshold="exact", backend=backend, **HYPER)
    for step in range(STEPS):
        loss_of(model, *batch(step)).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp_exact_run_equals_single_process(world, backend):
    """Issue 6 item 3: parameters after an FSDP2 run equal the unsharded optimizer on the same
    gradients, and a single-process training run of the same model, data and seed."""
    run = result(world, ("fsdp", backend, "exact", "global"))
    replayed, stats = single_process(run["grads"], "exact", "global", backend)
    assert_params_equal(run["params"], replayed)
    assert [s["global"] for s in stats] == [s["global"] for s in run["stats"]]

    # Gradients differ from the sharded run's by summation order only (~1e-7 relative).
    assert_params_equal(run["params"], trained_in_one_process(backend), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scope", ["tensor", "group"])
def test_fsdp_per_tensor_and_per_group_scopes_span_the_whole_tensor(world, scope):
    """Issue 6 item 1: a sharded tensor's (or group's) threshold is over all its entries, on every rank."""
    run = result(world, ("fsdp", "reference", "exact", scope))
    members = scope_members(None, scope)
    for step, grads in enumerate(run["grads"]):
        assert run["stats"][step].keys() == members.keys()
        for name, scope_names in members.items():
            numel = sum(grads[n].numel() for n in scope_names)
            assert run["stats"][step][name]["numel"] == numel
            assert run["stats"][step][name]["threshold"] == kth_largest([grads[n] for n in scope_names], keep_count(numel, 0.7))
    replayed, _ = single_process(run["grads"], "exact", scope, "reference")
    assert_params_equal(run["params"], replayed)


def test_fsdp_approx_threshold_within_semantics_bound(world):
    """Issue 6 item 3 with threshold='approx': within the promised rank bound (0.05 % of N) of the unsharded
    gradient, and the same threshold the unsharded optimizer finds step by step (same histograms, and
    the same warm start from the last threshold after the first step; the first step's is also the
    one-off magnitude_threshold's)."""
    run = result(world, ("fsdp", "reference", "approx", "global"))
    names = scope_members(None, "global")["global"]
    replayed, replayed_stats = single_process(run["grads"], "approx", "global", "reference")
    for step, grads in enumerate(run["grads"]):
        tensors = [grads[n] for n in names]
        numel = sum(t.numel() for t in tensors)
        assert numel >= 1 << 16  # the approximate path is really taken
        k, slack = keep_count(numel, 0.7), math.ceil(0.0005 * numel)  # the bound radix.py promises
        found = run["stats"][step]["global"]["threshold"]
        assert kth_largest(tensors, min(numel, k + slack)) <= found <= kth_largest(tensors, max(1, k - slack))
        assert found == replayed_stats[step]["global"]["threshold"]
        if step == 0:
            assert found == magnitude_threshold(tensors, 0.7, exact=False, backend="reference").item()
    assert_params_equal(run["params"], replayed)


def test_fsdp_communication_is_one_histogram_per_pass(world):
    """Issue 6: a global float32 exact threshold costs one all-reduce of a [1, radix.HIST_COLUMNS]
    int64 histogram per pass (radix.max_passes of the scope) plus one of the kept count, whatever
    the model size."""
    run = result(world, ("fsdp", "reference", "exact", "global"))
    for step, sizes in enumerate(run["all_reduce_bytes"]):
        assert sizes == histograms_then_kept(step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_needs_no_communication_and_equals_single_process(world, backend):
    """Issue 6 item 1/3: replicated (DDP) gradients: no all-reduce in step(), same result everywhere."""
    size, _ = world
    expected = trained_in_one_process(backend)
    for rank in range(size):
        run = result(world, ("ddp", backend), rank)
        assert run["all_reduce_bytes"] == []
        assert_params_equal(run["params"], expected, rtol=1e-4, atol=1e-5)
        assert_params_equal(run["params"], result(world, ("ddp", backend), 0)["params"], rtol=0, atol=0)


def test_nonfinite_on_one_rank_skips_the_step_on_every_rank(world):
    """SEMANTICS.md section 5 across ranks: the all-reduced first histogram carries the NaN count."""
    size, _ = world
    for rank in range(size):
        run = result(world, ("nonfinite", "skip"), rank)
        assert run["unchanged"] and run["skipped_steps"] == 1 and run["steps"] == [0.0]
        assert run["raised"] is None


def test_nonfinite_raise_raises_on_every_rank(world):
    size, _ = world
    for rank in range(size):
        run = result(world, ("nonfinite", "raise"), rank)
        assert run["unchanged"] and run["raised"] is not None
        if rank == size - 1:
            assert "parameter" in run["raised"] and "NaN" in run["raised"]
        else:
            assert "another rank" in run["raised"]


def test_magnitude_threshold_over_dtensor_and_plain_shards(world):
    """magnitude_threshold(process_group=...) and DTensor inputs: the unsharded k-th largest; the
    global count of plain shards is all-reduced once per distinct set of shard sizes."""
    size, ranks = world
    for rank in range(size):
        run = result(world, "thresholds", rank)
        whole = run["whole"]
        for ratio in (0.0, 0.3, 0.99, 1.0):
            expected = kth_largest([whole], keep_count(whole.numel(), ratio))
            assert run[("dtensor", ratio)] == expected
            assert run[("plain", ratio)] == expected
        assert run["cached_count_all_reduces"] == 3  # the histograms only


def test_zero_style_plain_shards_equal_single_process(world):
    """Plain-tensor shards with an explicit process_group (ZeRO style) equal one process over the whole."""
    size, _ = world
    run = result(world, "zero")
    sharded = torch.cat([result(world, "zero", rank)["mine"] for rank in range(size)])
    whole = nn.Parameter(run["flat"].clone())
    opt = GMTAdamW([whole], mask_ratio=0.8, threshold="exact", backend="reference", **HYPER)
    for g in run["grads"]:
        whole.grad = g.clone()
        opt.step()
    torch.testing.assert_close(sharded, whole.detach(), rtol=1e-6, atol=1e-7)
    for rank in range(size):
        assert result(world, "zero", rank)["stats"]["global"] == opt.mask_stats()["global"]


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_replicas_beside_shards_are_counted_once(world, scope):
    """A Replicate DTensor and a plain tensor next to a Shard(0) one: thresholds, kept counts and
    parameters equal one process over the whole tensors; replicated-only scopes send nothing."""
    size, _ = world
    values, grads = mixed_layouts_data()
    params = [nn.Parameter(v.clone()) for v in values]
    opt = GMTAdamW(params, mask_ratio=0.6, scope=scope, threshold="exact", backend="reference", **HYPER)
    expected_stats = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        expected_stats.append(opt.mask_stats())
    for rank in range(size):
        run = result(world, ("mixed", scope), rank)
        assert run["stats"] == expected_stats
        for got, want in zip(run["params"], params):
            torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-7)
        for step, sizes in enumerate(run["all_reduce_bytes"]):  # one row (the sharded scope) per pass, then its kept count
            assert sizes == histograms_then_kept(step)
    for step, step_grads in enumerate(grads):
        if scope == "global":
            numel = sum(g.numel() for g in step_grads)
            assert expected_stats[step]["global"]["threshold"] == kth_largest(step_grads, keep_count(numel, 0.6))


def test_hsdp_reduces_over_the_shard_dim_and_checkpoints(world):
    """A (Replicate, Shard) mesh: the group is the shard dim's, the threshold is the whole model's;
    the DTensor optimizer state round-trips through torch.distributed.checkpoint (issue 6 item 2)."""
    size, _ = world
    run = result(world, "hsdp")
    names = list(run["grads"])
    numel = sum(g.numel() for g in run["grads"].values())
    assert run["stats"]["global"]["numel"] == numel
    assert run["stats"]["global"]["threshold"] == kth_largest(list(run["grads"].values()), keep_count(numel, 0.7))
    for rank in range(size):
        other = result(world, "hsdp", rank)
        assert other["stats"] == run["stats"] and other["same_state"]
        shard_group = [r for r in range(size) if r // (size // 2) == rank // (size // 2)]
        assert other["group_ranks"] == shard_group
        assert other["all_reduce_bytes"] == histograms_then_kept(0)
    assert names


@pytest.mark.parametrize("criterion", CRITERIA_OPTIONS)
def test_fsdp_criteria_with_stored_masks_equal_one_process(world, criterion):
    """Section 8 under FSDP2: every criterion with refresh_every=2 (a selection, a reuse, a selection)
    gives the unsharded run's parameters, stats and stored masks; the random score of a shard is
    the whole parameter's (entry offsets), and the masks are DTensors sharded like the parameters."""
    size, ranks = world
    options = dict(criterion=criterion, refresh_every=2, seed=3)
    run = result(world, ("fsdp-criterion", criterion))
    expected_params, expected_stats = single_process(run["grads"], "exact", "global", "reference", **options)
    assert run["masks_are_sharded"]
    assert [s["global"]["refreshed"] for s in run["stats"]] == [True, False, True]
    for step, stats in enumerate(run["stats"]):
        assert stats["global"]["kept"] == expected_stats[step]["global"]["kept"]
        assert stats["global"]["threshold"] == expected_stats[step]["global"]["threshold"]
    assert_params_equal(run["params"], expected_params)
    single = single_process.last
    named = dict(zip([n for n, _ in make_model().named_parameters()], single.param_groups[0]["params"]))
    for name, mask in run["masks"].items():
        assert torch.equal(mask, single.state[named[name]]["gmt_mask"]), name
    for r in range(1, size):  # every rank reports the same
        assert result(world, ("fsdp-criterion", criterion), r)["stats"] == run["stats"]
