"""Launches and host time of a steady-state GMTAdamW step on the Triton backend, without a GPU.

    python bench/triton_step_host.py [--tensors 12 120 300] [--steps 20]

Runs under the Triton interpreter on CPU tensors (set here), with every Triton kernel stubbed out
(launched through the same Python path, not executed), so that what is left is what the host does
per step: the frontend, the pass loop, the launchers and the aten ops (which on a GPU would be
asynchronous launches; here they run on tiny CPU tensors). Reports per tensor count:

- device launches per step as a GPU would see them (gmt_kernels.backends.triton.counting: Triton
  launches + aten ops on device tensors, radix_select routed to its CUDA kernel), against issue
  14's bound of 4 per selection pass + 8;
- host time per step (median over --steps, kernels stubbed, no counting mode), target <= 1 ms
  for 300 tensors on the project's 2-core VM; and the same when every step has new gradient
  objects at new addresses (zero_grad() before each backward: the launch plans are repointed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from gmt_kernels import GMTAdamW, radix  # noqa: E402
from gmt_kernels.backends.triton.counting import DeviceWork  # noqa: E402


def make(n, gen):
    params = [torch.nn.Parameter(torch.randn(1000 + 13 * i, generator=gen)) for i in range(n)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[12, 120, 300])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threshold", default="approx", choices=["approx", "exact"])
    args = parser.parse_args(argv)
    import warnings

    from triton.runtime.interpreter import InterpretedFunction

    from gmt_kernels.backends.triton.select import launch_select

    # radix_select as CUDA runs it (one Triton launch), not the CPU kernel the dispatcher would pick
    library = torch.library.Library("gmt_kernels", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        library.impl("radix_select", launch_select, "CPU")

    print("| tensors | passes | device launches / step | bound (4 x passes + 8) | host ms / step, median (min) "
          "| same, new gradients every step |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.tensors:
        gen = torch.Generator().manual_seed(n)
        params = make(n, gen)
        opt = GMTAdamW(params, lr=1e-3, backend="triton", threshold=args.threshold)
        passes = radix.max_passes(radix.KEY_FORMATS[torch.float32], [sum(p.numel() for p in params)])
        for _ in range(2):  # warm-up: caches filled, counted launches as a GPU would see them
            with DeviceWork(stub_kernels=True) as work:
                opt.step()
        run = InterpretedFunction.run
        InterpretedFunction.run = lambda self, *a, grid, warmup, **k: None  # launch path kept, kernel not run
        try:
            times, moved = [], []
            for _ in range(args.steps):
                start = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - start)
            grads = [p.grad for p in params]
            for _ in range(args.steps):
                old = [p.grad for p in params]  # alive until the step is done: the new ones lie elsewhere
                opt.zero_grad()
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                start = time.perf_counter()
                opt.step()
                moved.append(time.perf_counter() - start)
                del old
        finally:
            InterpretedFunction.run = run
        print(f"| {n} | {passes} | {work.total} | {4 * passes + 8} | {1e3 * statistics.median(times):.2f} "
              f"({1e3 * min(times):.2f}) | {1e3 * statistics.median(moved):.2f} ({1e3 * min(moved):.2f}) |")
    print(f"\nMachine: {os.cpu_count()} CPUs; torch {torch.__version__}. Launches by kind for the last row: "
          + ", ".join(f"{k} {v}" for k, v in sorted(work.launches.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
