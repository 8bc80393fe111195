"""The C++ CPU backend against the figures of issue 4, and where its step time goes.

    python bench/cpu_targets.py [--log2-numel 22] [--tensors 8] [--steps 9]

Times (median of --steps after warm-up, interleaved round by round so that machine noise hits all
contenders alike): torch.optim.AdamW(fused=True), GMTAdamW(backend="cpu") approx and exact,
magnitude_threshold(exact=True) against torch.kthvalue over the concatenated |g|, then each part
of a GMT step on its own (histogram passes, radix_select, masked update), then the peak-RSS growth
of GMT steps measured in a fresh subprocess. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gmt_kernels import GMTAdamW, magnitude_threshold, radix  # noqa: E402
from gmt_kernels.backends import resolve  # noqa: E402


def make_params(sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for n in sizes:
        p = torch.nn.Parameter(torch.randn(n, generator=gen))
        p.grad = torch.randn(n, generator=gen)
        params.append(p)
    return params


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(contenders: dict, steps: int, warmup: int = 2) -> dict:
    times = {name: [] for name in contenders}
    for round_index in range(warmup + steps):
        for name, fn in contenders.items():
            t = timed(fn)
            if round_index >= warmup:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def breakdown(params, mask_ratio, steps, exact):
    """Each part of a GMT step alone: every histogram pass (with the state it sees), the select
    steps, the update."""
    backend = resolve("cpu", torch.device("cpu"), torch.float32)
    grads = [p.grad for p in params]
    fmt = radix.KEY_FORMATS[torch.float32]
    numel = sum(g.numel() for g in grads)
    state = radix.initial_state([radix.kept_count(numel, mask_ratio)], [numel], [radix.rank_slack(numel, exact)], fmt)
    select = torch.ops.gmt_kernels.radix_select
    parts, hist = {}, torch.zeros(1, radix.HIST_COLUMNS, dtype=torch.int64)
    for index in range(radix.max_passes(fmt, [numel])):
        seen = state.clone()
        if seen[0, radix.DONE]:
            label = "finished: reads nothing"
        elif seen[0, radix.SAMPLE]:
            label = f"sample of 1/{1 << int(seen[0, radix.SAMPLE])} of the blocks"
        else:
            inside = f"{int(seen[0, radix.LAST] - seen[0, radix.LO]) + 1} keys"
            label = f"full pass, interval of {inside}"

        def one_pass(seen=seen):
            hist.zero_()
            backend.radix_histogram(grads, [0] * len(grads), seen, hist, key_format=fmt)

        parts[f"histogram pass {index + 1} ({label})"] = one_pass
        one_pass()
        parts[f"radix_select after pass {index + 1}"] = lambda h=hist.clone(), s=seen: select(h, s.clone(), fmt.key_bits)
        select(hist, state, fmt.key_bits)
    threshold = radix.keys_to_threshold(radix.result_keys(state), fmt).expand(len(params)).contiguous()
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    steps_t = [torch.tensor(1.0) for _ in params]
    kept = torch.zeros(len(params), dtype=torch.int64)

    def update():
        backend.masked_adamw(
            [p.detach() for p in params], grads, [m for m, _ in moments], [v for _, v in moments], [], steps_t,
            threshold, kept, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False,
            maximize=False, mask_mode="grad", grad_scale=None, skip=None,
        )

    parts["masked_adamw (update pass)"] = update
    parts["torch.sum over every g (one read of g, for scale)"] = lambda: [g.sum() for g in grads]
    return interleaved(parts, steps)


def peak_rss_growth(log2_numel, tensors, threshold):
    """Bytes by which the process high-water mark grows over 5 GMT steps once the state exists."""
    code = f"""
import resource, torch, sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
from gmt_kernels import GMTAdamW
params = [torch.nn.Parameter(torch.randn({1 << log2_numel})) for _ in range({tensors})]
for p in params: p.grad = torch.randn_like(p)
opt = GMTAdamW(params, mask_ratio=0.3, threshold={threshold!r}, backend="cpu")
opt.step(); opt.step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(5): opt.step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2-numel", type=int, default=22)
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--mask-ratio", type=float, default=0.3)
    args = parser.parse_args()
    sizes = [1 << args.log2_numel] * args.tensors
    numel = sum(sizes)

    fused_params = make_params(sizes, 0)
    fused = torch.optim.AdamW(fused_params, lr=1e-3, fused=True)
    contenders = {"torch.optim.AdamW(fused=True)": fused.step}
    for threshold in ("approx", "exact"):
        params = make_params(sizes, 0)
        opt = GMTAdamW(params, lr=1e-3, mask_ratio=args.mask_ratio, threshold=threshold, backend="cpu")
        contenders[f"GMTAdamW cpu {threshold}"] = opt.step
    grads = [p.grad for p in fused_params]
    k = radix.kept_count(numel, args.mask_ratio)
    contenders["magnitude_threshold(exact=True) cpu"] = lambda: magnitude_threshold(grads, args.mask_ratio, backend="cpu")
    contenders["torch.kthvalue(cat |g|)"] = lambda: torch.cat([g.abs().reshape(-1) for g in grads]).kthvalue(numel - k + 1)
    medians = interleaved(contenders, args.steps)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"{args.tensors} tensors x 2^{args.log2_numel} fp32 = {numel} entries, mask_ratio {args.mask_ratio}, "
          f"scope global, median of {args.steps} steps after warm-up\n")
    base = medians["torch.optim.AdamW(fused=True)"]
    kth = medians["torch.kthvalue(cat |g|)"]
    print("| contender | ms | ratio | target |\n|---|---:|---:|---|")
    targets = {"GMTAdamW cpu approx": "<= 1.10 x fused", "GMTAdamW cpu exact": "<= 1.5 x fused"}
    for name, t in medians.items():
        if "kthvalue" in name or "magnitude" in name:
            ratio, target = f"{kth / t:.1f} x faster than kthvalue" if "magnitude" in name else "", (
                ">= 20 x faster" if "magnitude" in name else "")
        else:
            ratio, target = f"{t / base:.2f} x fused", targets.get(name, "")
        print(f"| {name} | {t * 1e3:.1f} | {ratio} | {target} |")

    for exact in (False, True):
        print(f"\n| part of a GMT step ({'exact' if exact else 'approx'}) | ms |\n|---|---:|")
        for name, t in breakdown(fused_params, args.mask_ratio, args.steps, exact).items():
            print(f"| {name} | {t * 1e3:.2f} |")

    print("\n| peak RSS growth over 5 steps after the state exists | MiB |\n|---|---:|")
    for threshold in ("approx", "exact"):
        grown = peak_rss_growth(args.log2_numel, args.tensors, threshold)
        print(f"| GMTAdamW cpu {threshold} | {grown / 2**20:.1f} |")


if __name__ == "__main__":
    main()
