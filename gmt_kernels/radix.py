"""Selection of the k-th largest score by histogram passes, shared by every backend.

A score s = |g| >= 0 has its sign bit clear, so its bit pattern read as an integer (its *key*) is
monotone in s: larger score, larger key; +inf above every finite value; NaN above +inf (so NaN
counts as the largest score, SEMANTICS.md section 5 "propagate").

Every scope keeps an interval [LO, LAST] of keys and a bin width 2**SHIFT. A pass histograms, for
every entry of the scope, (key - LO) >> SHIFT if LO <= key <= LAST (at most BINS bins), and counts
the entries above LAST (column ABOVE) and the non-finite ones (column NONFINITE). `select_bins`
then narrows the interval to the bin that holds the k-th largest key. With LO = 0 and SHIFT =
key_bits - 12 this is the first pass of a 12-bit radix select (AIR top-k and CUB use 11); each
later pass divides the interval by 2**12. Exact zeros (half of a language model's gradient entries)
are one key and never binned: an interval [0, LAST] is histogrammed from key 1, and a threshold of
0 is proven by the count of entries >= 1 (`zero_key_start`).

The first pass may be a *sample*: scopes of 2**18 entries or more count only the entries of
hash-picked blocks of SAMPLE_BLOCK entries (1/2 .. 1/32 of them), which costs a fraction of a full
pass, and `select_bins` turns that sample into a bracket [LO, LAST] that very likely holds the k-th
largest. The next (full) pass histograms only that bracket in BINS bins: typical gradients are
then within the approximate bound after one full pass and exact after two, where a radix select
needs two and three. 12-bit bins (not 11) let a bracket up to 2**24 keys wide end in one bin of at
most 2**12 keys, so that the second full pass is exact. The full pass also counts the entries
above the bracket, so it proves whether the bracket holds the k-th largest; if the sample misled
it (adversarial data), the interval becomes the proven side and selection goes on: a miss costs
passes, never correctness.

Later selections of an optimizer start *warm* (`warm_state`): the first pass is a full pass over a
bracket around the last threshold, which saves the sample pass (gradients drift slowly between
steps; a bracket that missed is proven so by the same counts and costs passes, never correctness).

Backends implement only the histogram pass (`Backend.radix_histogram`); the state machine below
is plain torch on tiny [scopes, bins] tensors and stays on the device (no host synchronisation).
The C++ extension carries the same `select_bins` for CPU state (csrc/radix_select.cpp), tested
against this one, because on CPU a pass's dozen tiny torch ops would cost more than the pass.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

RADIX_BITS = 12
BINS = 1 << RADIX_BITS

# Columns of a pass's histogram (int64 [scopes, HIST_COLUMNS]): BINS bins, then two counters.
ABOVE = BINS  # entries with key > LAST (for a full pass: every such entry of the scope)
NONFINITE = BINS + 1  # entries that are NaN or +-inf (key >= KeyFormat.inf_key)
HIST_COLUMNS = BINS + 2

# Columns of the per-scope state (int64 [scopes, STATE_COLUMNS]). Kernels read the first five.
LO, LAST, SHIFT, SAMPLE, DONE, K, NUMEL, SLACK, KNOWN_LO, KNOWN_LAST = range(10)
STATE_COLUMNS = 10
# LO, LAST: the interval histogrammed next; SHIFT: log2 of its bin width; SAMPLE: log2 of the
# fraction of blocks the next pass counts (0: every entry); DONE: selection finished (LO is the
# threshold key); K: entries to keep; NUMEL: entries of the scope; SLACK: allowed rank error;
# KNOWN_LO, KNOWN_LAST: the interval proven to hold the k-th largest key.

# SEMANTICS.md section 2 allows an approximate threshold e = ceil(0.005 N) ranks away from the k-th
# largest. We promise ten times less: a pass ends the selection only once the chosen bin holds at
# most ceil(0.0005 N) entries.
APPROX_RANK_SLACK = 0.0005
EXACT_BELOW = 1 << 16  # scopes smaller than this use the exact path even with threshold="approx"

# The sample: blocks of SAMPLE_BLOCK consecutive entries of a tensor, picked by a hash of (block,
# tensor) so that periodic structure (rows, heads) cannot line up with the picks. A scope samples
# 1 / 2**SAMPLE blocks with SAMPLE the largest value <= SAMPLE_MAX_LOG2 that leaves it at least
# SAMPLE_MIN_BLOCKS blocks; smaller scopes start with a full pass.
SAMPLE_BLOCK = 64
SAMPLE_MIN_BLOCKS = 2048
SAMPLE_MAX_LOG2 = 5
# Bracket half-width, in standard deviations of the sampled rank. Entries of one block are often
# alike (one row, one channel). The fraction of a block above any threshold has variance at most
# p (1 - p), so a sample of blocks of b entries has at most b times the variance of b times as many
# independent entries: SAMPLE_DESIGN_EFFECT = SAMPLE_BLOCK makes the bracket hold for any data.
SAMPLE_SIGMAS = 4.0
SAMPLE_DESIGN_EFFECT = float(SAMPLE_BLOCK)
_HASH_BLOCK, _HASH_TENSOR, _HASH_MASK = 0x9E3779B1, 0x85EBCA77, 0xFFFFFFFF


@dataclass(frozen=True)
class KeyFormat:
    """How scores of one scope become integer keys: the float type they are read in, or (integer
    formats: "u32", the random criterion's 32-bit scores) the integer score itself."""

    name: str
    float_dtype: torch.dtype  # the float type scores are read in (integer formats: their thresholds')
    int_dtype: torch.dtype
    key_bits: int  # bits below the (always clear) sign bit: exponent and mantissa
    mantissa_bits: int
    integer: bool = False  # keys are the scores themselves (no NaN / inf: NONFINITE stays 0)

    @property
    def key_max(self) -> int:
        return (1 << self.key_bits) - 1

    @property
    def inf_key(self) -> int:
        """Keys at or above this one are +-inf (all-ones exponent, zero mantissa) or NaN; integer
        formats have none (a key past key_max)."""
        if self.integer:
            return 1 << self.key_bits
        return ((1 << (self.key_bits - self.mantissa_bits)) - 1) << self.mantissa_bits

    def passes(self, sampled: bool, warm: bool = False) -> int:
        """Passes that always suffice: a full pass divides any interval by 2**RADIX_BITS, a
        sampled start adds the sample pass and at most one pass over a bracket that missed, and a
        warm start (`warm_state`) adds its bracket pass."""
        return -(-self.key_bits // RADIX_BITS) + (1 if warm else 2 if sampled else 0)

    @property
    def warm_half_width(self) -> int:
        """Half-width in keys of a warm start's bracket (`warm_state`): half a binade either side of
        a float key (it holds a threshold that moved by 25 %, or by up to 33-50 % depending on where
        in its binade it lies), 1/64 of the range of an integer key (the random criterion's
        threshold hardly moves). Fine-tuning all-MiniLM-L6-v2 (30 steps, clipped gradients), the
        global threshold moved by about 23 % a step at most, and per-tensor thresholds of 2**18+
        entries left this bracket in 0-1.4 % of the steps (a quarter binade: 7-14 % of the global
        and 8-13 % of the per-tensor steps)."""
        return 1 << (self.key_bits - 6 if self.integer else self.mantissa_bits - 1)

    @property
    def threshold_dtype(self) -> torch.dtype:
        """float32, or float64 for f64 keys and for u32 (every 32-bit integer exact)."""
        return torch.float64 if self.float_dtype == torch.float64 else torch.float32


KEY_FORMATS = {
    torch.float16: KeyFormat("f16", torch.float16, torch.int16, 15, 10),
    torch.bfloat16: KeyFormat("bf16", torch.bfloat16, torch.int16, 15, 7),
    torch.float32: KeyFormat("f32", torch.float32, torch.int32, 31, 23),
    torch.float64: KeyFormat("f64", torch.float64, torch.int64, 63, 52),
}
# The random criterion's scores u in [0, 2**32): int64 keys equal to u, float64 thresholds (exact).
U32 = KeyFormat("u32", torch.float64, torch.int64, 32, 0, integer=True)
KEY_FORMATS_BY_NAME = {fmt.name: fmt for fmt in (*KEY_FORMATS.values(), U32)}


def key_format_for(dtypes, criterion: str = "grad") -> KeyFormat:
    """The key format of a scope whose gradients have these dtypes, under `criterion`
    (SEMANTICS.md section 8, options.CRITERIA):
    "grad": the narrowest format in which every |g| is exact: a scope of one 16-bit dtype keeps its
        15-bit keys, mixed 16-bit dtypes meet in float32, float64 wins;
    "grad_over_weight": scores are computed in float32, or float64 if any tensor is float64;
    "random": u32."""
    dtypes = set(dtypes)
    for dt in dtypes:
        if dt not in KEY_FORMATS:
            raise TypeError(
                f"gmt_kernels scores floating-point gradients only; got dtype {dt}. "
                f"Supported: {', '.join(str(d) for d in KEY_FORMATS)}."
            )
    if criterion == "random":
        return U32
    if criterion == "grad_over_weight":
        return KEY_FORMATS[torch.float64 if torch.float64 in dtypes else torch.float32]
    if criterion != "grad":
        raise ValueError(f"unknown criterion {criterion!r}; expected one of 'grad', 'grad_over_weight', 'random'.")
    if len(dtypes) == 1:
        return KEY_FORMATS[dtypes.pop()]
    if torch.float64 in dtypes:
        return KEY_FORMATS[torch.float64]
    return KEY_FORMATS[torch.float32]


def entry_scores(grad: torch.Tensor, fmt: KeyFormat, scoring=None, *, tensor_index: int = 0, start: int = 0,
                 weight=None) -> torch.Tensor:
    """The score of every entry of `grad` (SEMANTICS.md sections 1 and 8), the one definition every
    backend restates: float scores in fmt.threshold_dtype, or int64 u for the random criterion.

    scoring: options.Scoring (None: "grad"). grad is a row-major piece of the scope's
    `tensor_index`-th tensor that starts at its row-major entry `start` (the random score's entry
    index is scoring.entry_offsets[tensor_index] + start + j); weight: theta, same shape as grad
    ("grad_over_weight"). A tensor keeps entry j iff score >= its threshold or the score is NaN.
    - "grad": |g| (exact in the threshold dtype);
    - "grad_over_weight": |g| / (|theta| + eps) with g, theta and eps = score_eps rounded to
      the threshold dtype first, one correctly rounded add and one correctly rounded division; every
      NaN (from g or theta, 0/0, inf/inf) becomes the NaN whose bits are all ones but the sign bit
      (key key_max): the largest score, with one key whatever NaN payload the hardware propagates;
    - "random": u of scores.py from the tensor's key scoring.random_keys[tensor_index].
    """
    criterion = "grad" if scoring is None else scoring.criterion
    if criterion == "grad":
        return grad.abs().to(fmt.threshold_dtype)
    if criterion == "grad_over_weight":
        cdt = fmt.threshold_dtype
        eps = torch.full((), scoring.score_eps, dtype=cdt, device=grad.device)
        s = grad.to(cdt).abs() / (weight.to(cdt).abs() + eps)
        return torch.where(s.isnan(), _canonical_nan(cdt, grad.device), s)
    if criterion == "random":
        from .scores import random_scores_keyed

        entries = torch.arange(start, start + grad.numel(), dtype=torch.int64, device=grad.device)
        entries = entries + scoring.entry_offsets[tensor_index]
        return random_scores_keyed(scoring.random_keys[tensor_index], entries).view(grad.shape)
    raise ValueError(f"unknown criterion {criterion!r}; expected one of 'grad', 'grad_over_weight', 'random'.")


def _canonical_nan(dtype: torch.dtype, device) -> torch.Tensor:
    """The positive NaN with every exponent and mantissa bit set: its key is KeyFormat.key_max."""
    int_dtype = torch.int64 if dtype == torch.float64 else torch.int32
    return torch.full((), torch.iinfo(int_dtype).max, dtype=int_dtype, device=device).view(dtype)


def score_keys(grad: torch.Tensor, fmt: KeyFormat, scoring=None, *, tensor_index: int = 0, start: int = 0,
               weight=None) -> torch.Tensor:
    """int64 keys of entry_scores (same arguments), monotone in the score, NaN above +inf: a float
    score's bits read as an integer (exact: the format is at least as wide as the score), a u32
    score itself."""
    if fmt.integer:
        return entry_scores(grad, fmt, scoring, tensor_index=tensor_index, start=start, weight=weight)
    if scoring is None or scoring.criterion == "grad":  # |g| in its own dtype, widened exactly
        s = grad.abs()
    else:
        s = entry_scores(grad, fmt, scoring, tensor_index=tensor_index, start=start, weight=weight)
    return s.to(fmt.float_dtype).view(fmt.int_dtype).to(torch.int64)


def keys_to_threshold(keys: torch.Tensor, fmt: KeyFormat) -> torch.Tensor:
    """The score whose key is `keys`, in fmt.threshold_dtype (exact)."""
    if fmt.integer:
        return keys.to(fmt.threshold_dtype)
    return keys.to(fmt.int_dtype).view(fmt.float_dtype).to(fmt.threshold_dtype)


def check_mask_ratio(mask_ratio) -> None:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(
            f"Invalid mask_ratio value: {mask_ratio!r}. mask_ratio is the fraction of entries NOT "
            "updated at each step, a number in [0, 1] (0 = plain AdamW, 0.99 = update 1 %)."
        )


def kept_count(numel: int, mask_ratio: float) -> int:
    """k = N - floor(r * N) (SEMANTICS.md section 1), with r read as the decimal that Python prints
    for it, `fractions.Fraction(repr(r))`: 0.3 masks 300 of 1000 entries, where the float's binary
    value (a hair below 3/10) would mask 299. Exact integer arithmetic, no rounding of r * N."""
    num, den = decimal_fraction(mask_ratio)
    return numel - (num * numel) // den


def decimal_fraction(value: float) -> tuple[int, int]:
    """(num, den) with num / den the decimal `repr(float(value))` prints, e.g. 0.3 -> (3, 10),
    1e-05 -> (1, 100000); value finite and >= 0. Not reduced (den is a power of ten): callers
    only floor-divide with it. Plain string and integer operations rather than fractions.Fraction,
    which torch.compile cannot trace (GMTAdamW.step calls kept_count under fullgraph=True)."""
    text = repr(float(value))  # shortest decimal that round-trips: "0.3", "1e-05", "2.5e-07", "1.0"
    mantissa, _, exponent = text.partition("e")
    whole, _, fraction = mantissa.partition(".")
    num, den = int(whole + fraction), 10 ** len(fraction)
    shift = int(exponent) if exponent else 0
    if shift >= 0:
        return num * 10**shift, den
    return num, den * 10**-shift


def rank_slack(numel: int, exact: bool) -> int:
    """How far (in ranks) an approximate threshold may be from the k-th largest; 0 = exact."""
    if exact or numel < EXACT_BELOW:
        return 0
    num, den = APPROX_RANK_SLACK.as_integer_ratio()
    return -((-num * numel) // den)


def sample_log2(numel: int) -> int:
    """log2 of the block sampling stride of a scope's first pass (0: a full first pass)."""
    blocks = numel // SAMPLE_BLOCK
    if blocks < 2 * SAMPLE_MIN_BLOCKS:
        return 0
    return min(SAMPLE_MAX_LOG2, (blocks // SAMPLE_MIN_BLOCKS).bit_length() - 1)


def sampled_blocks(block: torch.Tensor, tensor_index: int, log2) -> torch.Tensor:
    """Whether block `block` (int64: entry index // SAMPLE_BLOCK in its tensor's memory order) of
    the `tensor_index`-th gradient of a radix_histogram call is in a sample of 1 / 2**log2 blocks
    (log2: int or 0-d tensor; 0 = every block): the top `log2` bits of a 32-bit multiplicative
    hash are zero. Every backend counts exactly these blocks."""
    h = ((block & 0x7FFFFFFF) * _HASH_BLOCK) & _HASH_MASK
    h = (h + (((tensor_index & 0x7FFFFFFF) * _HASH_TENSOR) & _HASH_MASK)) & _HASH_MASK
    return (h >> (32 - log2)) == 0


def first_pass_sample_log2(numel: int, k: int) -> int:
    """SAMPLE of a scope's first pass: sample_log2, except that a scope keeping nothing (k = 0,
    threshold +inf) needs no bracket, only one full pass that counts its non-finite entries."""
    return sample_log2(numel) if k > 0 else 0


def initial_state(ks, numels, slacks, fmt: KeyFormat) -> torch.Tensor:
    """State [scopes, STATE_COLUMNS] (on the CPU) before the first pass: the whole key range, a
    sampled first pass for large scopes. ks, numels, slacks: per scope, Python ints. A full first
    pass histograms from key 1 (see `zero_key_start`); a sample counts every entry, zeros included,
    since its bracket scales ranks by the number of entries it counted."""
    rows = _initial_rows(ks, numels, slacks, fmt)
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), STATE_COLUMNS)


def _initial_rows(ks, numels, slacks, fmt: KeyFormat) -> list:
    rows = []
    for k, n, slack in zip(ks, numels, slacks):
        sample = first_pass_sample_log2(n, k)
        rows.append([0 if sample else 1, fmt.key_max, fmt.key_bits - RADIX_BITS, sample, 0, k, n, slack, 0, fmt.key_max])
    return rows


def warm_state(centres: torch.Tensor, constants: tuple, fmt: KeyFormat) -> torch.Tensor:
    """The state before the first pass of a *warm start*: scopes that keep something (K > 0) begin
    with a full pass over the bracket [centre - w, centre + w] of keys (w = fmt.warm_half_width)
    instead of a sample. centres [S]: where each scope's k-th largest score is expected, in
    fmt.threshold_dtype (GMTAdamW passes the previous selection's thresholds: gradients drift
    slowly, so the bracket usually holds the k-th largest and the sample pass is saved).
    constants: warm_constants of the scopes, built once per set of scopes.

    The bracket pass proves itself like any full pass (its ABOVE count and bins), so a centre that
    is far off costs passes (at most fmt.passes(False) more), never correctness. For a 16-bit
    format the bracket spans under BINS keys, so a hit is exact after this one pass. An exact
    selection's result does not depend on the centre; an approximate one ends in a bin whose edges
    do. Three or four small ops, none reading host data: a step stays capturable."""
    if fmt.integer:
        keys = centres.to(torch.int64)
    else:
        keys = centres.to(fmt.float_dtype).view(fmt.int_dtype).to(torch.int64)
    template, weight, lower, upper = constants
    return torch.clamp(torch.addcmul(template, keys[:, None], weight), lower, upper)


def warm_constants(ks, numels, slacks, fmt: KeyFormat) -> tuple:
    """(template, weight, lower, upper) of `warm_state` (on the CPU) for scopes of these k, sizes
    and slacks (Python ints, as initial_state): the template is the initial state with the LO, LAST,
    SHIFT and SAMPLE columns of scopes that keep something set to -w, +w, the bracket's shift and 0;
    weight is 1 where the centre is added (those LO and LAST); lower and upper bound every column:
    LO in [1, key_max - w] (from key 1: `zero_key_start`) and LAST in [w, key_max], so that any
    centre key (a NaN of either sign, -0.0, past the range) gives a bracket inside the key range."""
    half = fmt.warm_half_width
    shift = max(0, (2 * half).bit_length() - RADIX_BITS)  # _shift_for's rule, on a Python int (traceable)
    template = _initial_rows(ks, numels, slacks, fmt)
    weight = [[0] * STATE_COLUMNS for _ in ks]
    lower = [[-(1 << 63)] * STATE_COLUMNS for _ in ks]
    upper = [[(1 << 63) - 1] * STATE_COLUMNS for _ in ks]
    for row, k in enumerate(ks):
        if k > 0:
            template[row][LO], template[row][LAST], template[row][SHIFT], template[row][SAMPLE] = -half, half, shift, 0
            weight[row][LO] = weight[row][LAST] = 1
            lower[row][LO], upper[row][LO] = 1, fmt.key_max - half
            lower[row][LAST], upper[row][LAST] = half, fmt.key_max
    return tuple(torch.tensor(t, dtype=torch.int64).reshape(len(ks), STATE_COLUMNS) for t in (template, weight, lower, upper))


def _shift_for(width: torch.Tensor) -> torch.Tensor:
    """Smallest s >= 0 with width >> s < BINS (width = LAST - LO >= 0): bins that cover the interval."""
    bit_length = ((width[:, None] >> torch.arange(64, device=width.device)) > 0).sum(-1)
    return (bit_length - RADIX_BITS).clamp(min=0)


def select_bins(hist: torch.Tensor, state: torch.Tensor, key_bits: int) -> None:
    """Advance every scope that is not DONE by one pass, in place (the same rule as csrc/radix_select.cpp).

    hist [S, HIST_COLUMNS]: the pass's counts under each scope's state. For a sampled pass
    (SAMPLE > 0), the scope's rank k scaled to the sample, widened by SAMPLE_SIGMAS deviations,
    picks a bracket of bins; the proven interval stays as it was. For a full pass, the k-th largest
    key is above LAST if at least k entries are, below LO if fewer than k are >= LO, else in the bin
    where the count from the top reaches k. The interval becomes that region. A scope is DONE once
    k = 0 (threshold +inf), its bin is one key wide (exact), or, with SLACK > 0, its bin holds at
    most SLACK entries: every key of the bin, its lower edge LO included, is then within SLACK
    ranks of the k-th largest.
    """
    lo, last, shift = state[:, LO], state[:, LAST], state[:, SHIFT]
    k, numel, slack = state[:, K], state[:, NUMEL], state[:, SLACK]
    known_lo, known_last = state[:, KNOWN_LO], state[:, KNOWN_LAST]
    active = state[:, DONE] == 0
    sampled = state[:, SAMPLE] > 0

    from_top = hist[:, :BINS].flip(-1).cumsum(-1)  # from_top[:, j]: entries in bins >= BINS-1-j
    counted = from_top[:, -1]

    def bin_holding(rank):  # the bin where the count from the top reaches rank (>= 1)
        return BINS - 1 - (from_top < rank[:, None]).sum(-1).clamp(max=BINS - 1)

    def bin_lo(digit):
        return lo + (digit << shift)

    def bin_last(digit):  # written so that it cannot overflow for 63-bit keys
        return torch.minimum(bin_lo(digit) + ((torch.ones_like(shift) << shift) - 1), last)

    # Sampled pass: a bracket around rank k * counted / numel.
    r = k.double() * counted.double() / numel.clamp(min=1).double()
    variance = r * (counted.double() - r) / counted.clamp(min=1).double() * SAMPLE_DESIGN_EFFECT
    delta = SAMPLE_SIGMAS * variance.clamp(min=0).sqrt() + 1
    top_rank = torch.floor(r - delta).to(torch.int64)
    bottom_rank = torch.ceil(r + delta).to(torch.int64)
    bracket_last = torch.where(top_rank >= 1, bin_last(bin_holding(top_rank.clamp(min=1))), known_last)
    bracket_lo = torch.where(bottom_rank <= counted, bin_lo(bin_holding(bottom_rank.clamp(min=1))), known_lo)
    bracket_lo = torch.where(counted > 0, bracket_lo, known_lo)
    bracket_last = torch.where(counted > 0, bracket_last, known_last)

    # Full pass: where the k-th largest key is, proven by the counts.
    k_in = k - hist[:, ABOVE]
    up = k_in <= 0
    down = k_in > counted
    digit = bin_holding(k_in.clamp(min=1))
    in_bin = hist[:, :BINS].gather(1, digit[:, None]).squeeze(1)
    found_lo = torch.where(up, last + 1, torch.where(down, known_lo, bin_lo(digit)))
    found_last = torch.where(up, known_last, torch.where(down, lo - 1, bin_last(digit)))
    inside = ~up & ~down
    # Done: k = 0; the k-th largest in a bin holding at most SLACK entries; or proven to be one key
    # (a bin one key wide, or the counts above / below the interval: key 0, see zero_key_start).
    finished = (k == 0) | (inside & ((shift == 0) | (in_bin <= slack))) | (found_lo == found_last)

    new_lo = torch.where(sampled, bracket_lo, found_lo)
    new_last = torch.where(sampled, bracket_last, found_last)
    moving = active & ~(~sampled & (k == 0))  # a finished scope's LO is its threshold key
    new_lo = torch.where(sampled | ~finished, zero_key_start(new_lo, new_last), new_lo)
    state[:, LO] = torch.where(moving, new_lo, lo)
    state[:, LAST] = torch.where(moving, new_last, last)
    state[:, SHIFT] = torch.where(moving, _shift_for(state[:, LAST] - state[:, LO]), shift)
    refined = active & ~sampled
    state[:, KNOWN_LO] = torch.where(refined & ~finished, found_lo, known_lo)
    state[:, KNOWN_LAST] = torch.where(refined & ~finished, found_last, known_last)
    state[:, DONE] |= (refined & finished).to(torch.int64)
    state[:, SAMPLE] = torch.where(active, 0, state[:, SAMPLE])


def zero_key_start(lo, last):
    """Where the next pass's histogram starts for the interval [lo, last]: key 1 instead of 0 when
    the interval holds more than key 0. A score of exactly 0 is one key, and gradients often hold
    many (embedding rows of tokens not in the batch); binned with tiny scores they fill one bin that
    no slack accepts, costing another pass. Left out of the bins, they are still accounted for: a
    full pass that finds fewer than k entries >= 1 proves the threshold is 0 (interval [0, 0])."""
    return torch.where((lo == 0) & (last > 0), torch.ones_like(lo), lo)


def result_keys(state: torch.Tensor) -> torch.Tensor:
    """The threshold key of every scope once all passes ran (meaningless where K = 0: +inf)."""
    return state[:, LO]


def result_thresholds(state: torch.Tensor, fmt: KeyFormat) -> torch.Tensor:
    """keys_to_threshold(result_keys(state), fmt) as one device op, a new contiguous tensor. A float
    format's key is the score's bits, so its low bytes within the int64 LO column are the score:
    they are read in place (little-endian) and widened once, instead of narrowing to the key's
    integer type, viewing and widening (a launch each)."""
    if fmt.integer:
        return result_keys(state).to(fmt.threshold_dtype, copy=True, memory_format=torch.contiguous_format)
    if sys.byteorder != "little":
        return keys_to_threshold(result_keys(state), fmt).clone()
    per_word = 8 // fmt.float_dtype.itemsize  # scores per int64 column
    scores = state.view(fmt.float_dtype)[:, LO * per_word]  # a strided view: no launch
    return scores.to(fmt.threshold_dtype, copy=True, memory_format=torch.contiguous_format)


def max_passes(fmt: KeyFormat, numels, ks=None, warm: bool = False) -> int:
    """Passes of a selection over scopes of these sizes, and these k if given (known on the host:
    no sync), from a warm start (`warm_state`) or not. Scopes that all keep nothing (k = 0: only
    counted for NaN/inf) need one pass."""
    if ks is not None and all(k == 0 for k in ks):
        return 1
    if warm:
        return fmt.passes(False, warm=True)
    ks = [1] * len(numels) if ks is None else ks  # k unknown: as if every scope kept something
    return fmt.passes(any(first_pass_sample_log2(int(n), k) > 0 for n, k in zip(numels, ks)))

