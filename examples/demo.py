"""Train one small model with torch.optim.AdamW and with GMTAdamW side by side.

Prints the loss curves and the median optimizer step time of each. Runs in seconds on a CPU:
    python examples/demo.py [--steps 200] [--mask-ratio 0.3]
"""

import argparse
import statistics
import time

import torch

from gmt_kernels import GMTAdamW


def make_data(n=2048, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g) / dim**0.5
    return x, torch.tanh(x @ w) + 0.05 * torch.randn(n, 1, generator=g)


def make_model(dim=64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(dim, 256), torch.nn.GELU(), torch.nn.Linear(256, 1))


def train(name, make_optimizer, x, y, steps, batch=128):
    model = make_model(x.shape[1])
    opt = make_optimizer(model.parameters())
    losses, step_times = [], []
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        step_times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return name, opt, losses, statistics.median(step_times[5:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--mask-ratio", type=float, default=0.3)
    args = parser.parse_args()
    x, y = make_data()
    lr = 3e-3
    runs = [
        train("AdamW (torch, foreach)", lambda p: torch.optim.AdamW(p, lr=lr), x, y, args.steps),
        train(f"GMTAdamW r={args.mask_ratio} approx", lambda p: GMTAdamW(p, lr=lr, mask_ratio=args.mask_ratio), x, y, args.steps),
        train(f"GMTAdamW r={args.mask_ratio} exact freeze",
              lambda p: GMTAdamW(p, lr=lr, mask_ratio=args.mask_ratio, threshold="exact", mask_mode="freeze"),
              x, y, args.steps),
    ]
    checkpoints = sorted({0, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1})
    print(f"{'optimizer':<34}" + "".join(f"{'loss@' + str(c):>11}" for c in checkpoints) + f"{'step (median)':>16}")
    for name, opt, losses, step_time in runs:
        print(f"{name:<34}" + "".join(f"{losses[c]:>11.4f}" for c in checkpoints) + f"{step_time * 1e3:>13.3f} ms")
    for name, opt, _, _ in runs:
        if isinstance(opt, GMTAdamW):
            stats = opt.mask_stats()["global"]
            print(f"{name}: last step kept {stats['kept']} of {stats['numel']} entries "
                  f"(threshold |g| >= {stats['threshold']:.3g}); backend {opt.backend!r}")


if __name__ == "__main__":
    main()
