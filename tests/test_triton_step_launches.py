"""What a steady-state GMTAdamW step would launch on a GPU, and that it takes no host data, counted
on the Triton backend under the interpreter (gmt_kernels/backends/triton/counting.py: Triton
launches plus aten ops on device tensors, radix_select routed to the CUDA kernel).

Issue 14's bound: at most 4 device launches per selection pass plus 8, whatever the number of
tensors. After a warm-up step nothing is made from host data and nothing is read back (a step can
be captured in a CUDA graph), as long as the gradients keep their storage (which capture needs).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from gmt_kernels import GMTAdamW, radix  # noqa: E402
from gmt_kernels.backends.triton.counting import DeviceWork  # noqa: E402


def steady_step(n_tensors, stub_kernels=False, dtype=torch.float32, new_grads=False, **options):
    """(DeviceWork of the third step, passes per selection, the optimizer and its parameters).
    A steady step's selection starts around the last threshold (radix.warm_state): it never samples.
    stub_kernels: count Triton launches without running them (the counts do not depend on values).
    new_grads: zero_grad() and new gradients at new addresses every step, as a training loop does."""
    gen = torch.Generator().manual_seed(n_tensors)
    params = [torch.nn.Parameter(torch.randn(20 + 7 * (i % 5), generator=gen).to(dtype)) for i in range(n_tensors)]
    opt = GMTAdamW(params, lr=1e-2, backend="triton", **options)
    old = []
    for step in range(3):
        if new_grads:
            old = [p.grad for p in params]  # kept alive: the new ones cannot take their addresses
            opt.zero_grad()
        for p in params:  # else in place: the gradients keep their storage from step to step
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad = g if p.grad is None else p.grad.copy_(g)
        with DeviceWork(stub_kernels=stub_kernels) as work:
            opt.step()
    numel = sum(p.numel() for p in params)
    return work, radix.max_passes(radix.key_format_for([dtype]), [numel], warm=True), opt, params


# bfloat16: 16-bit keys take fewer passes, so the bound leaves less room for the per-step work.
@pytest.mark.parametrize("dtype,expected_passes", [(torch.float32, 4), (torch.bfloat16, 3)], ids=["fp32", "bf16"])
def test_launches_per_step_are_bounded_and_independent_of_the_tensor_count(dtype, expected_passes):
    counts = {}
    for n in (12, 120):
        work, passes, _, _ = steady_step(n, stub_kernels=True, dtype=dtype)
        assert work.launches["triton:radix_histogram_kernel"] == passes
        assert work.launches["triton:radix_select_kernel"] == passes  # one launch per pass, not ~125 ops
        assert work.launches["triton:masked_adamw_kernel"] == 1
        assert work.total <= 4 * passes + 8, work.launches
        counts[n] = dict(work.launches)
    assert passes == expected_passes
    assert counts[12] == counts[120]


def test_gradients_made_anew_each_step_add_launches_independent_of_the_tensor_count():
    """The layout holds and its two launch tables (histogram, update) are repointed: per table, its
    gradient column set on the host and one copy to the device (counted here as two ops: under the
    interpreter the host table is a "device" tensor too)."""
    extra = {}
    for n in (12, 120):
        kept, _, _, _ = steady_step(n, stub_kernels=True)
        moved, _, _, _ = steady_step(n, stub_kernels=True, new_grads=True)
        assert {k: v for k, v in moved.launches.items() if k.startswith("triton:")} == {
            k: v for k, v in kept.launches.items() if k.startswith("triton:")}
        extra[n] = moved.total - kept.total
        assert len(moved.host_data) == 2, moved.host_data  # the two new gradient columns
    assert extra[12] == extra[120] <= 4, extra


def test_a_steady_step_takes_no_host_data():
    work, _, opt, params = steady_step(12, threshold="exact", mask_mode="freeze", amsgrad=True)
    assert work.host_data == []
    assert opt.mask_stats()["global"]["kept"] > 0  # the counted step did run


def test_the_counter_sees_launches_host_data_and_views():
    x = torch.zeros(8)
    with DeviceWork() as work:
        x.add_(1)  # one launch
        y = x.view(2, 4).reshape(8)  # views: none
        z = torch.tensor([1.0, 2.0])  # host data
        w = z * 2  # host work: no device launch
        x[:2] += w  # one launch for the add (the slice is a view), one for the copy back
        y.sum().item()  # a launch, and a read back to the host
    assert work.launches == {"aten::add_": 2, "aten::copy_": 1, "aten::sum": 1} or work.launches == {
        "aten::add_": 1, "aten::add": 1, "aten::copy_": 1, "aten::sum": 1}, work.launches
    assert work.host_data == ["aten::lift_fresh", "aten::_local_scalar_dense"]
