"""Bytes GMTAdamW all-reduces per step under FSDP2, next to the size of the gradient it thresholds.

The distributed threshold all-reduces one [scopes, radix.HIST_COLUMNS] int64 histogram per pass plus
the kept counts, so its volume depends on the number of scopes and passes, not on the model size.
This starts `world` gloo ranks on loopback (CPU), wraps an MLP stack with fully_shard, and counts
every torch.distributed.all_reduce issued inside opt.step().

    python bench/comm_volume.py                 # a table for a few model sizes, 2 ranks
    python bench/comm_volume.py --world 4 --json # machine-readable

`measure(...)` returns the same numbers as a dict, for a harness that collects benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth)))


def _worker(rank, world, port, width, depth, threshold, scope, steps, out_path):
    from torch.distributed.fsdp import fully_shard

    from gmt_kernels import GMTAdamW

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model(width, depth)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = GMTAdamW(model.parameters(), mask_ratio=0.9, threshold=threshold, scope=scope, backend="reference")

    sizes = []
    original = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        sizes.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    for _ in range(steps):
        model(torch.randn(4, width)).square().mean().backward()
        dist.all_reduce = counted
        try:
            opt.step()
        finally:
            dist.all_reduce = original
        opt.zero_grad()
    if rank == 0:
        numel = sum(p.numel() for p in model.parameters())
        local = sum(p.to_local().numel() for p in model.parameters())
        result = {
            "world": world, "threshold": threshold, "scope": scope, "params": numel,
            "grad_bytes": numel * 4, "grad_bytes_per_rank": local * 4,
            "all_reduces_per_step": len(sizes) / steps, "all_reduce_bytes_per_step": sum(sizes) / steps,
        }
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def measure(world=2, width=256, depth=4, threshold="exact", scope="global", steps=2) -> dict:
    """All-reduce volume of one GMTAdamW step (averaged over `steps`) on an FSDP2 MLP stack."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        mp.start_processes(_worker, args=(world, port, width, depth, threshold, scope, steps, out_path),
                           nprocs=world, start_method="spawn")
        with open(out_path) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [
        measure(args.world, width, depth, threshold, scope)
        for width, depth, threshold, scope in [
            (64, 2, "exact", "global"), (256, 4, "exact", "global"), (512, 4, "exact", "global"),
            (512, 4, "approx", "global"), (256, 4, "exact", "tensor"),
        ]
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'params':>10} {'grad bytes':>12} {'per rank':>10} {'threshold':>9} {'scope':>7} "
          f"{'all-reduces':>11} {'bytes/step':>10} {'ratio':>8}")
    for r in rows:
        print(f"{r['params']:>10} {r['grad_bytes']:>12} {r['grad_bytes_per_rank']:>10} {r['threshold']:>9} "
              f"{r['scope']:>7} {r['all_reduces_per_step']:>11.1f} {r['all_reduce_bytes_per_step']:>10.0f} "
              f"{r['all_reduce_bytes_per_step'] / r['grad_bytes']:>8.2%}")


if __name__ == "__main__":
    main()
