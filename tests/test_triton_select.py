"""The Triton radix_select kernel (backends/triton/select.py) through a whole selection and on bad
arguments, under the Triton interpreter (gmt_kernels::triton_radix_select); random states against
radix.select_bins are in test_select_kernels.py, for every select kernel."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from gmt_kernels import radix  # noqa: E402
from gmt_kernels.backends import resolve  # noqa: E402

resolve("triton", torch.device("cpu"), torch.float32)  # registers the Triton kernels (fails loudly without triton)


def test_triton_select_follows_a_whole_selection():
    """Pass after pass of a real selection (sampled start, then full passes): same states."""
    from gmt_kernels.backends import reference

    fmt = radix.KEY_FORMATS[torch.float32]
    grads = [torch.randn(3000) * torch.randn(3000).exp(), torch.randn(500)]
    ks, numels = [2100, 0], [3000, 500]
    ours = radix.initial_state(ks, numels, [0, 0], fmt)
    ours[0, radix.SAMPLE] = 1
    theirs = ours.clone()
    for _ in range(fmt.passes(True)):
        hist = torch.zeros(2, radix.HIST_COLUMNS, dtype=torch.int64)
        reference.radix_histogram(grads, [0, 1], ours, hist, key_format=fmt)
        torch.ops.gmt_kernels.triton_radix_select(hist, ours, fmt.key_bits)
        radix.select_bins(hist, theirs, fmt.key_bits)
        assert torch.equal(ours, theirs)
    assert ours[:, radix.DONE].tolist() == [1, 1]
    expected = torch.cat([g.abs() for g in grads[:1]]).sort(descending=True).values[ks[0] - 1]
    assert radix.keys_to_threshold(radix.result_keys(ours)[:1], fmt).item() == expected.item()


def test_bad_arguments_are_refused():
    state = torch.zeros(2, radix.STATE_COLUMNS, dtype=torch.int64)
    with pytest.raises(ValueError, match="takes contiguous int64 state"):
        torch.ops.gmt_kernels.triton_radix_select(torch.zeros(2, 5, dtype=torch.int64), state, 31)
    with pytest.raises(ValueError, match="key_bits 7"):
        torch.ops.gmt_kernels.triton_radix_select(torch.zeros(2, radix.HIST_COLUMNS, dtype=torch.int64), state, 7)
