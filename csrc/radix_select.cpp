// gmt_kernels::radix_select for CPU state: radix.select_bins (gmt_kernels/radix.py, the definition)
// as a loop over scopes. On CPU a pass's select is a dozen tiny torch ops, ~100 us of dispatch per
// pass, more than a pass over a few million gradient entries; this runs in microseconds. The
// arithmetic is the same, op for op (float64 for the sampled bracket), so both give the same state;
// tests/test_cpu_backend.py checks it on random and adversarial histograms.
#include "ops.h"
#include "radix.h"

#include <cmath>

namespace gmt {
namespace {

using namespace radix;

// The bin where the count of entries from the top reaches `rank` (>= 1); bin 0 if it never does.
int64_t bin_holding(const int64_t* h, int64_t rank) {
  int64_t from_top = 0;
  for (int64_t d = kBins - 1; d >= 0; --d) {
    from_top += h[d];
    if (from_top >= rank) return d;
  }
  return 0;
}

// Smallest s >= 0 with width >> s < kBins; 0 for an empty interval (width < 0), as radix._shift_for.
int64_t shift_for(int64_t width) {
  const int64_t bit_length = width <= 0 ? 0 : 64 - __builtin_clzll(uint64_t(width));
  return std::max<int64_t>(0, bit_length - kRadixBits);
}

// radix.zero_key_start: an interval [0, last] is histogrammed from key 1 (zeros are one key).
int64_t zero_key_start(int64_t lo, int64_t last) { return lo == 0 && last > 0 ? 1 : lo; }

void select_one(const int64_t* h, int64_t* s) {
  const int64_t lo = s[LO], last = s[LAST], shift = s[SHIFT], k = s[K];
  auto bin_lo = [&](int64_t digit) { return lo + (digit << shift); };
  auto bin_last = [&](int64_t digit) { return std::min(bin_lo(digit) + ((int64_t(1) << shift) - 1), last); };
  int64_t counted = 0;
  for (int64_t d = 0; d < kBins; ++d) counted += h[d];

  int64_t new_lo, new_last;
  if (s[SAMPLE] > 0) {  // a bracket around rank k * counted / numel
    new_lo = s[KNOWN_LO];
    new_last = s[KNOWN_LAST];
    if (counted > 0) {
      const double r = double(k) * double(counted) / double(std::max<int64_t>(s[NUMEL], 1));
      const double variance = r * (double(counted) - r) / double(counted) * kSampleDesignEffect;
      const double delta = kSampleSigmas * std::sqrt(std::max(variance, 0.0)) + 1;
      const int64_t top_rank = int64_t(std::floor(r - delta)), bottom_rank = int64_t(std::ceil(r + delta));
      if (top_rank >= 1) new_last = bin_last(bin_holding(h, top_rank));
      if (bottom_rank <= counted) new_lo = bin_lo(bin_holding(h, std::max<int64_t>(bottom_rank, 1)));
    }
  } else {  // where the k-th largest key is, proven by the counts of a full pass
    if (k == 0) {
      s[DONE] = 1;
      s[SAMPLE] = 0;
      return;
    }
    const int64_t k_in = k - h[kAbove];
    bool finished = false;
    if (k_in <= 0) {
      new_lo = last + 1;
      new_last = s[KNOWN_LAST];
    } else if (k_in > counted) {
      new_lo = s[KNOWN_LO];
      new_last = lo - 1;
    } else {
      const int64_t digit = bin_holding(h, k_in);
      new_lo = bin_lo(digit);
      new_last = bin_last(digit);
      finished = shift == 0 || h[digit] <= s[SLACK];
    }
    finished = finished || new_lo == new_last;  // the counts prove a single key (e.g. 0)
    if (finished) {
      s[DONE] = 1;
    } else {
      s[KNOWN_LO] = new_lo;
      s[KNOWN_LAST] = new_last;
    }
  }
  if (!s[DONE]) new_lo = zero_key_start(new_lo, new_last);
  s[LO] = new_lo;
  s[LAST] = new_last;
  s[SHIFT] = shift_for(new_last - new_lo);
  s[SAMPLE] = 0;
}

}  // namespace

void radix_select_cpu(const at::Tensor& hist, const at::Tensor& state, int64_t key_bits) {
  TORCH_CHECK(state.device().is_cpu() && state.scalar_type() == at::kLong && state.dim() == 2 &&
                  state.size(1) == kStateColumns && state.is_contiguous(),
              "gmt_kernels::radix_select: state must be a contiguous int64 CPU tensor [scopes, ", int64_t(kStateColumns),
              "]; got ", state.scalar_type(), " ", state.sizes(), " on ", state.device(), ".");
  TORCH_CHECK(hist.device().is_cpu() && hist.scalar_type() == at::kLong && hist.is_contiguous() && hist.dim() == 2 &&
                  hist.size(0) == state.size(0) && hist.size(1) == kHistColumns,
              "gmt_kernels::radix_select: hist must be a contiguous int64 CPU tensor [", state.size(0), ", ",
              kHistColumns, "]; got ", hist.scalar_type(), " ", hist.sizes(), " on ", hist.device(), ".");
  TORCH_CHECK(key_bits >= kRadixBits && key_bits <= 63, "gmt_kernels::radix_select: key_bits ", key_bits,
              " is not a key width of radix.KEY_FORMATS (15, 31 or 63).");
  const int64_t* h = hist.data_ptr<int64_t>();
  int64_t* s = state.data_ptr<int64_t>();
  for (int64_t row = 0; row < state.size(0); ++row) {
    if (s[row * kStateColumns + DONE] == 0) select_one(h + row * kHistColumns, s + row * kStateColumns);
  }
}

}  // namespace gmt
