"""Check gmt_kernels' kernels against the reference backend on this machine, then time them.

    python -m gmt_kernels.selfcheck [--device cpu|cuda] [--quick] [--json FILE]

Every fast backend that serves the device (on CPU: the C++ kernels at every ISA level this CPU
runs; on CUDA: the Triton kernels) trains copies of the same parameters as the pure-PyTorch
reference backend, step by step, on gradients like a real model's (exact zeros, magnitudes over
decades, NaN where a case asks): the thresholds and kept counts must be identical, parameters and
moments equal within the dtype's rounding. Then one GMTAdamW step is timed next to
torch.optim.AdamW(fused=True). On CUDA, opt.step() is also captured in a CUDA graph and replayed.
Prints a table, optionally writes JSON, and exits with status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from . import GMTAdamW, available_backends
from .backends import resolve

# rtol, atol of parameters and moments after a few steps, by parameter dtype (one rounding of the
# stored value apart, compounded over the steps).
TOLERANCES = {
    torch.float64: (1e-12, 1e-14),
    torch.float32: (2e-6, 1e-7),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float16: (2e-3, 1e-5),
}
STEPS = 3


@dataclass(frozen=True)
class Case:
    name: str
    shapes: tuple
    dtype: torch.dtype = torch.float32
    mask_ratio: float = 0.3
    scope: str = "global"
    mask_mode: str = "grad"
    threshold: str = "exact"
    amsgrad: bool = False
    maximize: bool = False
    nonfinite: str = "skip"
    nan_step: Optional[int] = None  # a NaN enters one gradient entry at this step
    grad_scale: Optional[float] = None


def cases(quick: bool) -> list[Case]:
    odd = ((1,), (17,), (1023,), (33, 31), (4097,), (3, 5, 7))
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for mask_mode in ("grad", "freeze"):
            out.append(Case(f"odd sizes {mask_mode}", odd, dtype, mask_mode=mask_mode))
    for scope in ("global", "group", "tensor"):
        out.append(Case(f"scope {scope}", odd, scope=scope, threshold="approx"))
    out += [
        Case("amsgrad maximize", odd, amsgrad=True, maximize=True),
        Case("mask_ratio 0 (plain AdamW)", odd, mask_ratio=0.0),
        Case("mask_ratio 0.99", odd, mask_ratio=0.99),
        Case("NaN skipped", odd, nan_step=1),
        Case("NaN propagated", odd, nonfinite="propagate", nan_step=1),
        Case("grad_scale 1024", odd, grad_scale=1024.0),
        Case("many tensors", tuple((31 + 7 * i,) for i in range(120))),
        Case("mixed dtypes", odd, dtype=None),  # bf16 and fp32 in one global scope
    ]
    if not quick:  # scopes large enough for the sampled first pass and the approximate exit
        big = ((1 << 18) + 3, (1 << 17) + 1, 1000, 5)
        out += [Case("large approx", big, threshold="approx"), Case("large exact bf16", big, torch.bfloat16)]
    return out


def gradient_like(shape, dtype, generator) -> torch.Tensor:
    """About half exact zeros, the rest over six decades of magnitude, as a real model's gradients."""
    numel = torch.Size(shape).numel()
    values = torch.randn(numel, generator=generator, dtype=torch.float64)
    decades = torch.rand(numel, generator=generator, dtype=torch.float64) * 6 - 8
    zeros = torch.rand(numel, generator=generator) < 0.5
    g = torch.where(zeros, 0.0, values.sign() * 10**decades)
    return g.reshape(shape).to(dtype)


def _dtypes(case: Case, count: int) -> list:
    if case.dtype is None:
        return [torch.bfloat16 if i % 2 else torch.float32 for i in range(count)]
    return [case.dtype] * count


def check_case(case: Case, backend: str, device: torch.device) -> dict:
    """Trains the case with `backend` and with the reference; the largest relative error and what
    differed, if anything."""
    generator = torch.Generator().manual_seed(0)
    dtypes = _dtypes(case, len(case.shapes))
    init = [gradient_like(s, d, generator) * 1e6 for s, d in zip(case.shapes, dtypes)]
    runs = {}
    for name in (backend, "reference"):
        params = [torch.nn.Parameter(t.clone().to(device)) for t in init]
        opt = GMTAdamW(params, lr=1e-3, weight_decay=0.01, amsgrad=case.amsgrad, maximize=case.maximize,
                       mask_ratio=case.mask_ratio, scope=case.scope, mask_mode=case.mask_mode,
                       threshold=case.threshold, nonfinite=case.nonfinite, backend=name)
        runs[name] = (params, opt)
    problems, worst = [], 0.0
    for step in range(STEPS):
        grads = [gradient_like(s, d, generator) for s, d in zip(case.shapes, dtypes)]
        if case.nan_step == step:
            grads[len(grads) // 2].view(-1)[0] = float("nan")
        scale = None if case.grad_scale is None else torch.tensor(case.grad_scale, device=device)
        for params, opt in runs.values():
            for p, g in zip(params, grads):
                p.grad = (g if scale is None else g * case.grad_scale).to(device)
            if scale is None:
                opt.step()
            else:
                opt.step(grad_scale=scale, found_inf=torch.zeros((), device=device))
        (cand, cand_opt), (ref, ref_opt) = runs[backend], runs["reference"]
        if cand_opt.mask_stats() != ref_opt.mask_stats():
            problems.append(f"step {step}: mask_stats {cand_opt.mask_stats()} != reference {ref_opt.mask_stats()}")
        if cand_opt.skipped_steps.item() != ref_opt.skipped_steps.item():
            problems.append(f"step {step}: skipped_steps {cand_opt.skipped_steps.item()} != {ref_opt.skipped_steps.item()}")
        for i, (p, q) in enumerate(zip(cand, ref)):
            pairs = [("param", p, q)] + [
                (key, cand_opt.state[p][key], ref_opt.state[q][key]) for key in ("exp_avg", "exp_avg_sq")
                if key in cand_opt.state[p]
            ]
            for what, a, b in pairs:
                error = _relative_error(a, b)
                worst = max(worst, error)
                rtol, atol = TOLERANCES[a.dtype]
                if not torch.allclose(a.cpu().double(), b.cpu().double(), rtol=rtol, atol=atol, equal_nan=True):
                    problems.append(f"step {step}: {what} of tensor {i} ({a.dtype}) differs, relative error {error:.3g}")
    return {"ok": not problems, "max_rel_error": worst, "problems": problems[:5]}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    both_nan = a.isnan() & b.isnan()
    diff = torch.where(both_nan, 0.0, (a - b).abs() / b.abs().clamp(min=1e-30))
    return float(diff.nan_to_num(nan=float("inf")).max()) if diff.numel() else 0.0


# ---- what runs here -----------------------------------------------------------------------


def targets(device: torch.device) -> list[tuple[str, Optional[str]]]:
    """(backend, CPU ISA level or None) pairs to check on `device`: the fast backends that "auto"
    would use there (not the Triton interpreter on CPU tensors: a test tool). The reference is the
    yardstick."""
    out = []
    for name, failure in available_backends().items():
        if name == "reference" or failure is not None:
            continue
        try:
            backend = resolve(name, device, torch.float32)
        except RuntimeError:  # cannot serve this device
            continue
        if device.type not in backend.auto_devices:
            continue
        if name == "cpu":
            from .backends import cpu

            out += [(name, level) for level in cpu.supported_capabilities()]
        else:
            out.append((name, None))
    return out


def _level(backend: str, level: Optional[str]):
    if level is None:
        return contextlib.nullcontext()
    from .backends import cpu

    return cpu.use_cpu_capability(level)


def speed(backend: str, level: Optional[str], device: torch.device, quick: bool) -> dict:
    """Median GMTAdamW step (approx, global, mask_ratio 0.3) over the median torch.optim.AdamW(fused=True)
    step, timed alternately on the same gradients."""
    tensors, numel, steps = (8, 1 << 18, 5) if quick else (8, 1 << 21, 9)
    generator = torch.Generator().manual_seed(1)
    grads = [gradient_like((numel,), torch.float32, generator).to(device) for _ in range(tensors)]
    optimizers = {}
    for name in ("gmt", "fused"):
        params = [torch.nn.Parameter(torch.randn(numel, generator=generator).to(device)) for _ in grads]
        for p, g in zip(params, grads):
            p.grad = g
        optimizers[name] = (GMTAdamW(params, lr=1e-4, mask_ratio=0.3, threshold="approx", backend=backend)
                            if name == "gmt" else torch.optim.AdamW(params, lr=1e-4, fused=True))
    times = {"gmt": [], "fused": []}
    with _level(backend, level):
        for i in range(steps + 1):
            for name in (("gmt", "fused") if i % 2 else ("fused", "gmt")):
                _sync(device)
                start = time.perf_counter()
                optimizers[name].step()
                _sync(device)
                if i:
                    times[name].append(time.perf_counter() - start)
    gmt, fused = statistics.median(times["gmt"]), statistics.median(times["fused"])
    return {"entries": tensors * numel, "gmt_step_s": gmt, "fused_adamw_step_s": fused, "ratio": gmt / fused}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_graph_check(device: torch.device) -> dict:
    """opt.step() captured once in a CUDA graph and replayed on new gradients (copied into the
    same .grad tensors) must train as eager steps do."""
    generator = torch.Generator().manual_seed(2)
    shapes = ((1 << 16) + 5, 4097, 33)
    init = [gradient_like((n,), torch.float32, generator) * 1e6 for n in shapes]
    runs = []
    for _ in range(2):
        params = [torch.nn.Parameter(t.clone().to(device)) for t in init]
        for p in params:
            p.grad = torch.zeros_like(p)
        runs.append((params, GMTAdamW(params, lr=1e-3, mask_ratio=0.3, backend="triton")))
    (graph_params, graph_opt), (eager_params, eager_opt) = runs
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up: state, tables and compiled kernels exist before capture
        for opt in (graph_opt, eager_opt):
            opt.step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()
    for _ in range(3):
        grads = [gradient_like((n,), torch.float32, generator).to(device) for n in shapes]
        for p, q, g in zip(graph_params, eager_params, grads):
            p.grad.copy_(g)
            q.grad.copy_(g)
        graph.replay()
        eager_opt.step()
    torch.cuda.synchronize(device)
    error = max(_relative_error(p, q) for p, q in zip(graph_params, eager_params))
    ok = all(torch.allclose(p, q, rtol=2e-6, atol=1e-7) for p, q in zip(graph_params, eager_params))
    return {"ok": ok, "max_rel_error": error}


# ---- the command --------------------------------------------------------------------------


def run(device: torch.device, quick: bool) -> dict:
    report = {
        "device": str(device),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "backends": available_backends(),
        "checks": [], "speed": [], "cuda_graph": None,
    }
    pairs = targets(device)
    if not pairs:
        report["problem"] = f"no fast backend serves {device} here (see 'backends'); nothing to check"
    for backend, level in pairs:
        with _level(backend, level):
            if level is not None:
                from .backends import cpu

                report.setdefault("kernel_levels", {})[level] = cpu.kernel_capabilities()
            for case in cases(quick):
                result = check_case(case, backend, device)
                report["checks"].append({"backend": backend, "level": level, "case": case.name,
                                         "dtype": str(case.dtype).replace("torch.", "") if case.dtype else "mixed",
                                         **result})
        report["speed"].append({"backend": backend, "level": level, **speed(backend, level, device, quick)})
    if device.type == "cuda" and any(b == "triton" for b, _ in pairs):
        report["cuda_graph"] = cuda_graph_check(device)
    report["ok"] = bool(pairs) and all(c["ok"] for c in report["checks"]) and (
        report["cuda_graph"] is None or report["cuda_graph"]["ok"])
    return report


def render(report: dict) -> str:
    lines = [f"gmt_kernels selfcheck on {report['device']} ({report['machine']['platform']}, torch "
             f"{report['machine']['torch']})"]
    for name, failure in report["backends"].items():
        lines.append(f"  backend {name}: {'loaded' if failure is None else failure}")
    groups: dict = {}
    for c in report["checks"]:
        groups.setdefault((c["backend"], c["level"]), []).append(c)
    lines.append("")
    lines.append(f"{'backend [level]':<20} {'cases':>6} {'failed':>7} {'max rel error':>14}")
    for (backend, level), checks in groups.items():
        failed = [c for c in checks if not c["ok"]]
        label = backend if level is None else f"{backend} [{level}]"
        worst = max(c["max_rel_error"] for c in checks)
        lines.append(f"{label:<20} {len(checks):>6} {len(failed):>7} {worst:>14.3g}")
        for c in failed:
            lines.append(f"    FAILED {c['case']} ({c['dtype']}): {'; '.join(c['problems'])}")
    if report["speed"]:
        lines.append("")
        lines.append(f"{'backend [level]':<20} {'entries':>9} {'GMTAdamW step':>14} {'AdamW fused':>12} {'ratio':>7}")
        for s in report["speed"]:
            label = s["backend"] if s["level"] is None else f"{s['backend']} [{s['level']}]"
            lines.append(f"{label:<20} {s['entries']:>9} {s['gmt_step_s'] * 1e3:>11.2f} ms "
                         f"{s['fused_adamw_step_s'] * 1e3:>9.2f} ms {s['ratio']:>6.2f}x")
    if report["cuda_graph"] is not None:
        g = report["cuda_graph"]
        lines.append(f"\nCUDA graph capture and replay of opt.step(): {'ok' if g['ok'] else 'MISMATCH'} "
                     f"(max rel error {g['max_rel_error']:.3g})")
    if "problem" in report:
        lines.append(f"\n{report['problem']}")
    lines.append(f"\nselfcheck: {'PASSED' if report['ok'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gmt_kernels.selfcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="small cases and a short timing (under a minute on CPU)")
    parser.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda asked, but this torch ({torch.__version__}) sees no CUDA device; "
                     "run with --device cpu, or on a machine with a GPU and a CUDA build of torch.")
    report = run(torch.device(args.device), args.quick)
    print(render(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
