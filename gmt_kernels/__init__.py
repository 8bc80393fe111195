"""gmt_kernels: Gradient-Mask Tuning (GMT) at the cost of a fused AdamW step.

GMTAdamW is torch.optim.AdamW that, at every step, updates only the entries whose |grad| is in the
top (1 - mask_ratio) fraction; magnitude_threshold selects that threshold over many tensors without
concatenating them. The contract is SEMANTICS.md (see README.md).
"""

from . import ops  # noqa: F401  (defines the torch.ops.gmt_kernels.* schemas the backends implement)
from .backends import available_backends, backend_info
from .optimizer import GMTAdamW
from .drop import drop_deltas
from .magnitude import magnitude_threshold

__all__ = ["GMTAdamW", "magnitude_threshold", "drop_deltas", "available_backends", "backend_info"]
__version__ = "0.1.0"
