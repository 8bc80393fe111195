"""The select step of the pass loop as each device runs it, against radix.select_bins (the
definition), bit for bit: the C++ kernel (csrc/radix_select.cpp, the CPU key of
gmt_kernels::radix_select) and the Triton kernel (backends/triton/select.py, the CUDA key; here
gmt_kernels::triton_radix_select under the interpreter)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from gmt_kernels import radix  # noqa: E402
from gmt_kernels.backends import resolve  # noqa: E402

KERNELS = {  # name -> (backend whose loading registers it, the op)
    "cpp": ("cpu", lambda: torch.ops.gmt_kernels.radix_select),
    "triton": ("triton", lambda: torch.ops.gmt_kernels.triton_radix_select),
}


def random_states(gen, fmt, scopes, phase):
    """A state of `scopes` scopes in `phase` ("sampled", "exact", "approx") with a histogram
    consistent with it: random sizes up to 2**62, k at its edges (0, 1, numel), sparse, empty and
    one-bin histograms, intervals down to one key wide and up to the whole key range."""
    numels = (torch.randint(1, 1 << 40, (scopes,), generator=gen) << torch.randint(0, 22, (scopes,), generator=gen)).tolist()
    ks = [int(torch.randint(0, n + 1, (), generator=gen)) if n < (1 << 62) else n // 3 for n in numels]
    ks[:4] = [0, numels[1], 1, numels[3] - 1]
    slacks = [int(torch.randint(0, 1000 if i % 3 else 3, (), generator=gen)) if phase == "approx" else 0
              for i in range(scopes)]
    state = radix.initial_state(ks, numels, slacks, fmt)
    state[:, radix.SAMPLE] = torch.randint(1, radix.SAMPLE_MAX_LOG2 + 1, (scopes,), generator=gen) if phase == "sampled" else 0
    if phase != "sampled" or bool(torch.rand((), generator=gen) < 0.5):
        # later passes: intervals strictly inside the proven one, some one key wide, some the whole range
        top = fmt.key_max // 4
        lo = (torch.rand(scopes, generator=gen, dtype=torch.float64) * top).to(torch.int64) + 1
        width = (torch.rand(scopes, generator=gen, dtype=torch.float64) * top).to(torch.int64)
        width >>= torch.randint(0, fmt.key_bits, (scopes,), generator=gen)
        state[:, radix.LO], state[:, radix.LAST] = lo, lo + width
        state[:, radix.KNOWN_LO], state[:, radix.KNOWN_LAST] = lo // 2, lo + 2 * width + 1
        state[6, radix.LO], state[6, radix.LAST], state[6, radix.KNOWN_LO], state[6, radix.KNOWN_LAST] = 0, fmt.key_max, 0, fmt.key_max
        state[:, radix.SHIFT] = ((state[:, radix.LAST] - state[:, radix.LO])[:, None] >> torch.arange(64) > 0).sum(-1).sub(radix.RADIX_BITS).clamp(min=0)
    state[5, radix.DONE] = 1
    hist = torch.zeros(scopes, radix.HIST_COLUMNS, dtype=torch.int64)
    density = torch.rand(scopes, 1, generator=gen) ** 3
    sparse = torch.rand(scopes, radix.BINS, generator=gen) < density
    hist[:, : radix.BINS] = torch.randint(0, 1 << 20, (scopes, radix.BINS), generator=gen) * sparse
    # every other scope with counts of 0-2 per bin: a rank off by one then picks another bin
    hist[::2, : radix.BINS] = torch.randint(0, 3, (scopes // 2, radix.BINS), generator=gen)
    if phase != "sampled":
        hist[:, radix.ABOVE] = torch.randint(0, 1 << 30, (scopes,), generator=gen) * (torch.rand(scopes, generator=gen) < 0.7)
        hist[8, radix.ABOVE] = state[8, radix.K]  # exactly k above: the interval moves up (k_in = 0)
    hist[:, radix.NONFINITE] = torch.randint(0, 5, (scopes,), generator=gen)
    hist[7, : radix.BINS] = 0  # an empty sample / interval
    hist[9, : radix.BINS] = 0
    hist[9, int(torch.randint(0, radix.BINS, (), generator=gen))] = 1 << 35  # everything in one bin
    bins = ((state[:, radix.LAST] - state[:, radix.LO]) >> state[:, radix.SHIFT]) + 1
    hist[:, : radix.BINS] *= torch.arange(radix.BINS) < bins[:, None]  # nothing outside the interval
    return hist, state


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("key_format", ["f16", "f32", "f64"])
@pytest.mark.parametrize("phase", ["sampled", "exact", "approx"])
def test_select_kernel_equals_select_bins(kernel, key_format, phase):
    backend, op = KERNELS[kernel]
    resolve(backend, torch.device("cpu"), torch.float32)  # registers the kernel (fails loudly if it cannot load)
    fmt = radix.KEY_FORMATS_BY_NAME[key_format]
    gen = torch.Generator().manual_seed(10 * ["f16", "f32", "f64"].index(key_format) + len(phase))
    moved = 0
    for _ in range(3):
        hist, state = random_states(gen, fmt, 48, phase)
        expected = state.clone()
        radix.select_bins(hist, expected, fmt.key_bits)
        before = state.clone()
        op()(hist, state, fmt.key_bits)
        assert torch.equal(state, expected), (state != expected).nonzero()[:5].tolist()
        moved += int((state != before).any(-1).sum())
    assert moved > 3 * 40  # nearly every scope changed: the comparison is not between two no-ops
    if phase != "sampled":
        assert (state[:, radix.DONE] == 1).sum() > 1
