"""magnitude_threshold: the GMT threshold over any list of tensors, for code that applies the mask itself.

Its own module (not threshold.py) because it dispatches sharded inputs to distributed.py, which
builds on threshold.py: threshold <- distributed <- magnitude, no import cycle.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import radix
from .backends import resolve
from .threshold import Scope, select_thresholds


def magnitude_threshold(
    tensors: Sequence[torch.Tensor],
    mask_ratio: float,
    *,
    exact: bool = True,
    process_group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """The GMT threshold over all entries of `tensors` (SEMANTICS.md section 2), without concatenating them.

    Returns a 0-d tensor on the tensors' device: the k-th largest |x| with k = N - floor(mask_ratio*N)
    (+inf if k = 0). Entries with |x| >= the result are the ones GMT keeps. With exact=False the
    result is within 0.05 % of N in rank of the exact one (SEMANTICS.md allows 0.5 %). No
    host synchronisation, no copy of the inputs: extra memory is a few histograms.
    """
    tensors = list(tensors)
    radix.check_mask_ratio(mask_ratio)
    if not tensors:
        raise ValueError("magnitude_threshold needs at least one tensor to select over; got none.")
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"magnitude_threshold takes tensors; got {type(t).__name__}.")
        if t.layout != torch.strided:
            raise RuntimeError(
                f"magnitude_threshold does not support {t.layout} tensors; convert with .to_dense() first."
            )
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(
            f"magnitude_threshold needs all tensors on one device; got {sorted(map(str, devices))}. "
            "Move them to one device, or call it once per device."
        )
    if process_group is not None or any(type(t).__name__ == "DTensor" for t in tensors):
        from .distributed import magnitude_threshold_sharded  # imports torch.distributed.tensor

        return magnitude_threshold_sharded(
            tensors, mask_ratio, exact=exact, process_group=process_group,
            backend_for=lambda t: resolve(backend, t.device, t.dtype),
        )
    device = devices.pop()
    key_format = radix.key_format_for(t.dtype for t in tensors)
    numel = sum(t.numel() for t in tensors)
    scope = Scope(
        grads=[t.detach() for t in tensors],
        k=radix.kept_count(numel, float(mask_ratio)),
        slack=radix.rank_slack(numel, exact),
        numel=numel,
    )
    selection = select_thresholds(
        [scope], key_format, lambda t: resolve(backend, t.device, t.dtype), device
    )
    return selection.thresholds[0]
