"""Stored 1-bit masks (SEMANTICS.md section 8; state key "gmt_mask"): layout, packing, unpacking.

A parameter p of d0 = p.shape[0] rows (1 for a 0-d p) and inner = p.numel() // d0 entries per row
stores its mask as a uint8 tensor of shape (d0, ceil(inner / 8)): entry (r, c) of the row-major
(d0, inner) view of p is bit (c % 8) of byte [r, c // 8], least significant bit first, and the
padding bits of a row's last byte are 0. Rows, not one flat run of bits, so that FSDP2's dim-0
sharding of the state follows the parameter's: a shard of rows owns the bytes of its rows.
"""

from __future__ import annotations

import torch

MASK_DTYPE = torch.uint8
_BITS = 8


def mask_rows(shape) -> tuple[int, int]:
    """(d0, inner) of a parameter of this shape."""
    shape = tuple(shape)
    d0 = shape[0] if shape else 1
    numel = 1
    for size in shape:
        numel *= size
    return d0, (numel // d0 if d0 else 0)


def mask_shape(shape) -> tuple[int, int]:
    """The shape of the stored mask of a parameter of this shape: (d0, ceil(inner / 8))."""
    d0, inner = mask_rows(shape)
    return d0, -(-inner // _BITS)


def new_mask(param: torch.Tensor) -> torch.Tensor:
    """An all-zero stored mask for `param` (on its device)."""
    return torch.zeros(mask_shape(param.shape), dtype=MASK_DTYPE, device=param.device)


def pack(keep: torch.Tensor) -> torch.Tensor:
    """The stored mask of a bool tensor `keep` shaped like its parameter."""
    d0, inner = mask_rows(keep.shape)
    nbytes = -(-inner // _BITS)
    bits = torch.zeros(d0, nbytes * _BITS, dtype=torch.int32, device=keep.device)
    bits[:, :inner] = keep.reshape(d0, inner).to(torch.int32)
    weights = 1 << torch.arange(_BITS, dtype=torch.int32, device=keep.device)
    return (bits.view(d0, nbytes, _BITS) * weights).sum(-1).to(MASK_DTYPE)


def unpack(mask: torch.Tensor, shape) -> torch.Tensor:
    """The bool tensor of `shape` that stored mask `mask` holds."""
    d0, inner = mask_rows(shape)
    shifts = torch.arange(_BITS, dtype=torch.int32, device=mask.device)
    bits = (mask.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(d0, -1)[:, :inner].reshape(shape).bool()
