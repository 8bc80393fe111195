"""The operators of gmt_kernels/ops.py under torch.compile.

What would break if the registration were wrong: a schema without its mutation annotations lets
functionalization drop the in-place updates (compiled parameters then never move); a missing fake
implementation makes tracing fail; an op missing from a device's dispatch key sends CPU tensors to
a kernel that cannot serve them. Each test compares compiled against eager on the same numbers,
and the eager numbers against the reference backend, so a compiled no-op cannot pass.

aot_eager (dynamo + functionalization, no code generation) keeps this fast; inductor would compile
C++ for the CPU and add a minute per graph without testing anything more about the registration.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

from calls import GRAD_HISTOGRAM_SCHEMA_ARGS, GRAD_MASK_SCHEMA_ARGS, flat_masked_adamw
from gmt_kernels import GMTAdamW, ops, radix
from gmt_kernels.backends import resolve

SHAPES = [(17, 9), (33,), (5, 4, 3), (0,)]
STEPS = 3
OP_BACKENDS = ["cpu", "triton"]  # the backends whose kernels are custom ops (triton: interpreter)


def make_model(backend, **options):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(STEPS)]
    opt = GMTAdamW(params, lr=1e-2, weight_decay=0.1, mask_ratio=0.5, backend=backend, **options)
    return params, grads, opt


def run_steps(params, grads, step):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        step()


def recording(graphs):
    """A torch.compile backend: aot_eager that keeps every dynamo graph for inspection."""
    from torch._dynamo.backends.registry import lookup_backend

    def compile_graph(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    return compile_graph


def called_ops(graphs) -> set:
    return {
        str(node.target).removesuffix(".default") for gm in graphs for node in gm.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("gmt_kernels.")
    }


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["reference", *OP_BACKENDS])
@pytest.mark.parametrize("options", [
    dict(threshold="exact", mask_mode="grad"),
    dict(threshold="approx", mask_mode="freeze", amsgrad=True, scope="tensor"),
], ids=["exact-grad", "approx-freeze-amsgrad-tensor"])
def test_compiled_step_matches_eager(backend, options):
    params, grads, opt = make_model(backend, **options)
    ref_params, _, ref_opt = make_model("reference", **options)
    eager_params, _, eager_opt = make_model(backend, **options)
    graphs = []
    run_steps(params, grads, torch.compile(opt.step, backend=recording(graphs)))
    run_steps(eager_params, grads, eager_opt.step)
    run_steps(ref_params, grads, ref_opt.step)

    moved = sum(int((p != p0).sum()) for p, p0 in zip(params, make_model(backend)[0]))
    assert moved > 0  # the mutations survived functionalization
    for p, eager, ref in zip(params, eager_params, ref_params):
        torch.testing.assert_close(p, eager, rtol=0, atol=0)
        torch.testing.assert_close(eager, ref, rtol=2e-6, atol=1e-7)
        for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in eager_opt.state[eager]:
                torch.testing.assert_close(opt.state[p][key], eager_opt.state[eager][key], rtol=0, atol=0)
                torch.testing.assert_close(eager_opt.state[eager][key], ref_opt.state[ref][key], rtol=2e-6, atol=1e-7)
    # The kernels were traced into a graph, not run in a skipped frame; radix_select is every backend's.
    assert "gmt_kernels.radix_select" in called_ops(graphs)
    if backend in OP_BACKENDS:
        prefix = "gmt_kernels.triton_" if backend == "triton" else "gmt_kernels."
        assert {f"{prefix}radix_histogram", f"{prefix}masked_adamw"} <= called_ops(graphs)


def test_compiled_step_records_mask_stats():
    """dynamo drops attribute assignments on Optimizer instances (pytorch/pytorch#171590): the
    frontend must update its stats in place for mask_stats() to see a compiled step."""
    params, grads, opt = make_model("cpu", threshold="exact")
    eager_params, _, eager_opt = make_model("cpu", threshold="exact")
    run_steps(params, grads, torch.compile(opt.step, backend="aot_eager"))
    run_steps(eager_params, grads, eager_opt.step)
    assert eager_opt.mask_stats()["global"]["kept"] > 0
    assert opt.mask_stats() == eager_opt.mask_stats()


def histogram_then_update(backend, grads, params, exp_avgs, exp_avg_sqs, steps, state, hist, lr):
    """One radix pass and one masked update: the two ops back to back, as step() issues them."""
    fmt = radix.KEY_FORMATS[torch.float32]
    backend.radix_histogram(grads, list(range(len(grads))), state, hist, key_format=fmt)
    torch.ops.gmt_kernels.radix_select(hist, state, fmt.key_bits)
    thresholds = torch.full((len(params),), 0.5)
    kept = torch.zeros(len(params), dtype=torch.int64)
    flat_masked_adamw(
        backend.masked_adamw, params, grads, exp_avgs, exp_avg_sqs, [], steps, thresholds, kept, lr=lr, beta1=0.9, beta2=0.999,
        eps=1e-8, weight_decay=0.01, amsgrad=False, maximize=False, mask_mode="freeze", grad_scale=None,
        skip=torch.tensor(False),
    )
    return kept


@pytest.mark.parametrize("backend_name", OP_BACKENDS)
@pytest.mark.parametrize("lr", [1e-2, torch.tensor(1e-2)], ids=["float-lr", "tensor-lr"])
def test_ops_compile_in_one_graph(backend_name, lr):
    """fullgraph=True: neither op may break the graph, and both mutate what they were given."""
    backend = resolve(backend_name, torch.device("cpu"), torch.float32)

    def inputs():
        g = torch.Generator().manual_seed(1)
        grads = [torch.randn(s, generator=g) for s in SHAPES]
        params = [torch.randn(s, generator=g) for s in SHAPES]
        return dict(
            grads=grads, params=params, exp_avgs=[torch.zeros_like(p) for p in params],
            exp_avg_sqs=[torch.zeros_like(p) for p in params], steps=[torch.ones(()) for _ in params],
            state=radix.initial_state([5, 5, 5, 0], [153, 33, 60, 0], [0] * 4, radix.KEY_FORMATS[torch.float32]),
            hist=torch.zeros(4, radix.HIST_COLUMNS, dtype=torch.int64),
        )

    compiled, eager = inputs(), inputs()
    compiled_kept = torch.compile(histogram_then_update, backend="aot_eager", fullgraph=True)(
        backend, lr=lr, **compiled)
    eager_kept = histogram_then_update(backend, lr=lr, **eager)

    expected_kept = torch.tensor([int((g.abs() >= 0.5).sum()) for g in eager["grads"]])
    assert torch.equal(eager_kept, expected_kept)
    assert torch.equal(compiled_kept, eager_kept)
    assert int(compiled["hist"][:, : radix.BINS].sum()) == sum(g.numel() for g in compiled["grads"])
    assert int(compiled["state"][:, radix.DONE].sum()) == 1  # k = 0: nothing to select
    for key, value in compiled.items():
        for got, want in zip(value if isinstance(value, list) else [value], eager[key] if isinstance(value, list) else [eager[key]]):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
    assert not torch.equal(compiled["params"][0], inputs()["params"][0])


@pytest.mark.parametrize("name", ops.OP_NAMES)
def test_schemas_declare_what_the_kernels_mutate(name):
    schema = getattr(torch.ops.gmt_kernels, name).default._schema
    mutated = {arg.name for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write}
    if name.endswith("radix_histogram"):
        assert mutated == {"hist"}
    elif name.endswith("radix_select"):
        assert mutated == {"state"}
    else:
        assert mutated == {"params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "kept", "masks"}
    assert not schema.returns  # everything the kernels produce is written into their inputs


def test_one_op_name_serves_cpu_through_the_cpp_kernels():
    """The dispatcher, not Python, picks the kernel per device: CPU is the C++ extension's key."""
    resolve("cpu", torch.device("cpu"), torch.float32)
    resolve("triton", torch.device("cpu"), torch.float32)
    table = torch._C._dispatch_dump_table("gmt_kernels::masked_adamw")
    cpu_line = next(line for line in table.splitlines() if line.startswith("CPU:"))
    assert "ops.cpp" in cpu_line
    cuda_line = next(line for line in table.splitlines() if line.startswith("CUDA:"))
    assert "backends/triton" in cuda_line
    select = torch._C._dispatch_dump_table("gmt_kernels::radix_select").splitlines()
    assert "ops.cpp" in next(line for line in select if line.startswith("CPU:"))
    assert "backends/triton" in next(line for line in select if line.startswith("CUDA:"))  # one Triton launch


def opcheck_inputs(name):
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(7, 3, generator=gen), torch.randn(5, generator=gen)]
    fmt = radix.KEY_FORMATS[torch.float32]
    state = radix.initial_state([3, 3], [21, 5], [0, 0], fmt)
    if name.endswith("radix_histogram"):
        return (grads, [0, 1], state, torch.zeros(2, radix.HIST_COLUMNS, dtype=torch.int64), "f32"), GRAD_HISTOGRAM_SCHEMA_ARGS
    if name.endswith("radix_select"):
        hist = torch.zeros(2, radix.HIST_COLUMNS, dtype=torch.int64)
        torch.ops.gmt_kernels.radix_histogram(grads, [0, 1], state, hist, "f32", **GRAD_HISTOGRAM_SCHEMA_ARGS)
        return (hist, state, fmt.key_bits), {}
    params = [torch.randn(g.shape, generator=gen) for g in grads]
    states = [[torch.rand(g.shape, generator=gen) for g in grads] for _ in range(3)]
    args = (params, grads, *states, [torch.full((), 2.0) for _ in grads], torch.full((2,), 0.5),
            torch.zeros(2, dtype=torch.int64), [])
    hyper = dict(lr=0.01, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=True,
                 maximize=False, mask_mode="grad", grad_scale=None, skip=torch.tensor(False), **GRAD_MASK_SCHEMA_ARGS)
    return args, hyper


@pytest.mark.parametrize("name", ops.OP_NAMES)
def test_opcheck(name):
    """torch.library.opcheck: the kernels mutate exactly what the schema says (test_schema), and the
    fake implementation and functionalization agree with them (test_faketensor, test_aot_dispatch_dynamic)."""
    resolve("cpu", torch.device("cpu"), torch.float32)
    resolve("triton", torch.device("cpu"), torch.float32)
    args, kwargs = opcheck_inputs(name)
    results = torch.library.opcheck(getattr(torch.ops.gmt_kernels, name).default, args, kwargs)
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_whole_step_compiles_to_one_graph(backend):
    """No graph break anywhere in GMTAdamW.step: the frontend, the pass loop and both ops trace."""
    params, grads, opt = make_model(backend, threshold="exact")
    eager_params, _, eager_opt = make_model(backend, threshold="exact")
    run_steps(params, grads[:1], opt.step)  # the first step creates the state, outside the graph
    run_steps(eager_params, grads[:1], eager_opt.step)
    run_steps(params, grads[1:], torch.compile(opt.step, fullgraph=True, backend="aot_eager"))
    run_steps(eager_params, grads[1:], eager_opt.step)
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    assert opt.mask_stats() == eager_opt.mask_stats()
