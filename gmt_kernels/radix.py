"""Radix selection of the k-th largest score, shared by every backend.

A score s = |g| >= 0 has its sign bit clear, so its bit pattern read as an integer (its *key*) is
monotone in s: larger score, larger key; +inf above every finite value; NaN above +inf (so NaN
counts as the largest score, SEMANTICS.md section 5 "propagate"). Selecting the k-th largest score
is selecting the k-th largest key, one 11-bit digit at a time from the top (as AIR top-k and CUB
DeviceTopK do): each pass histograms the digit of the entries whose higher digits equal the prefix
chosen so far, and `select_bins` picks the bin that holds the k-th largest.

Backends implement only the histogram pass (`Backend.radix_histogram`); the state machine below is
plain torch on tiny [scopes, bins] tensors and stays on the device (no host synchronisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RADIX_BITS = 11

# Columns of the per-scope state tensor (int64 [scopes, 3]).
PREFIX, K_REMAINING, DONE = 0, 1, 2

# SEMANTICS.md section 2 allows an approximate threshold e = ceil(0.005 N) ranks away from the k-th
# largest. We promise ten times less: a radix pass ends the selection only once the chosen bin holds
# at most ceil(0.0005 N) entries. Typical gradients get there after two 11-bit passes or one 16-bit pass.
APPROX_RANK_SLACK = 0.0005
EXACT_BELOW = 1 << 16  # scopes smaller than this use the exact path even with threshold="approx"


@dataclass(frozen=True)
class KeyFormat:
    """How scores of one scope become integer keys: the float type they are read in."""

    name: str
    float_dtype: torch.dtype
    int_dtype: torch.dtype
    key_bits: int  # bits below the (always clear) sign bit: exponent and mantissa
    mantissa_bits: int

    def digits(self, digit_bits: int = RADIX_BITS) -> list[tuple[int, int]]:
        """(shift, width) of each pass, most significant first: `digit_bits`-wide digits, the last
        may be narrower. Wider digits mean fewer passes and larger histograms."""
        out, top = [], self.key_bits
        while top > 0:
            width = min(digit_bits, top)
            out.append((top - width, width))
            top -= width
        return out

    @property
    def passes(self) -> list[tuple[int, int]]:
        """The schedule of 11-bit digits, which every backend serves."""
        return self.digits(RADIX_BITS)

    @property
    def threshold_dtype(self) -> torch.dtype:
        return torch.float64 if self.float_dtype == torch.float64 else torch.float32

    def first_nonfinite_bin(self, first_shift: int) -> int:
        """Bins of the first pass (digit at `first_shift`) at or above this one hold +-inf and NaN:
        a first digit of 11 bits or more contains the whole exponent field, and an all-ones
        exponent means non-finite."""
        inf_key = ((1 << (self.key_bits - self.mantissa_bits)) - 1) << self.mantissa_bits
        return inf_key >> first_shift


KEY_FORMATS = {
    torch.float16: KeyFormat("f16", torch.float16, torch.int16, 15, 10),
    torch.bfloat16: KeyFormat("bf16", torch.bfloat16, torch.int16, 15, 7),
    torch.float32: KeyFormat("f32", torch.float32, torch.int32, 31, 23),
    torch.float64: KeyFormat("f64", torch.float64, torch.int64, 63, 52),
}


def key_format_for(dtypes) -> KeyFormat:
    """The narrowest format in which every score of these dtypes is exact: a scope of one 16-bit
    dtype keeps its 15-bit keys (2 passes), mixed 16-bit dtypes meet in float32, float64 wins."""
    dtypes = set(dtypes)
    for dt in dtypes:
        if dt not in KEY_FORMATS:
            raise TypeError(
                f"gmt_kernels scores floating-point gradients only; got dtype {dt}. "
                f"Supported: {', '.join(str(d) for d in KEY_FORMATS)}."
            )
    if len(dtypes) == 1:
        return KEY_FORMATS[dtypes.pop()]
    if torch.float64 in dtypes:
        return KEY_FORMATS[torch.float64]
    return KEY_FORMATS[torch.float32]


def score_keys(grad: torch.Tensor, fmt: KeyFormat) -> torch.Tensor:
    """int64 keys of |grad| read in `fmt` (exact: the format is at least as wide as grad's dtype)."""
    return grad.abs().to(fmt.float_dtype).view(fmt.int_dtype).to(torch.int64)


def keys_to_threshold(prefix: torch.Tensor, fmt: KeyFormat) -> torch.Tensor:
    """The score whose key is `prefix`, in fmt.threshold_dtype (exact)."""
    return prefix.to(fmt.int_dtype).view(fmt.float_dtype).to(fmt.threshold_dtype)


def check_mask_ratio(mask_ratio) -> None:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(
            f"Invalid mask_ratio value: {mask_ratio!r}. mask_ratio is the fraction of entries NOT "
            "updated at each step, a number in [0, 1] (0 = plain AdamW, 0.99 = update 1 %)."
        )


def kept_count(numel: int, mask_ratio: float) -> int:
    """k = N - floor(r * N), with r taken as the exact value of the Python float (no rounding of r*N)."""
    num, den = float(mask_ratio).as_integer_ratio()  # exact, and traceable by torch.compile
    return numel - (num * numel) // den


def rank_slack(numel: int, exact: bool) -> int:
    """How far (in ranks) an approximate threshold may be from the k-th largest; 0 = exact."""
    if exact or numel < EXACT_BELOW:
        return 0
    num, den = APPROX_RANK_SLACK.as_integer_ratio()
    return -((-num * numel) // den)


def initial_state(ks: torch.Tensor) -> torch.Tensor:
    """State [scopes, 3] before the first pass: empty prefix, k to find, not done."""
    state = torch.zeros(ks.shape[0], 3, dtype=torch.int64, device=ks.device)
    state[:, K_REMAINING] = ks
    return state


def select_bins(hist: torch.Tensor, state: torch.Tensor, slack: torch.Tensor, shift: int) -> None:
    """Advance every scope by one digit, in place.

    hist [S, B]: counts of this pass's digit among the entries matching each scope's prefix.
    The chosen digit d is the bin holding the k-th largest of those entries; k shrinks by the
    count of the bins above d. A scope is done once k = 0 (nothing to select: T = +inf) or, in
    approximate mode, once d holds at most `slack` entries: then every value of the bin, its lower
    edge (= the prefix, low bits zero) included, is within `slack` ranks of the k-th largest.
    """
    k = state[:, K_REMAINING]
    from_top = hist.flip(-1).cumsum(-1)  # from_top[:, j] = entries in bins >= B-1-j
    j = (from_top < k[:, None]).sum(-1).clamp(max=hist.shape[-1] - 1)
    in_bin = hist.flip(-1).gather(1, j[:, None]).squeeze(1)
    above = from_top.gather(1, j[:, None]).squeeze(1) - in_bin
    digit = hist.shape[-1] - 1 - j
    active = (state[:, DONE] == 0) & (k > 0)
    state[:, PREFIX] = torch.where(active, state[:, PREFIX] | (digit << shift), state[:, PREFIX])
    state[:, K_REMAINING] = torch.where(active, k - above, k)
    state[:, DONE] |= ((~active) | (in_bin <= slack)).to(torch.int64)
