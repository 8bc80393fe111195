// Backend.radix_histogram for CPU tensors: one radix-select pass over all gradients of all scopes.
//
// Each thread counts its range of the flattened gradients into private 32-bit histograms that live
// in L1, and adds them into the shared int64 histogram only when its range moves on to another
// scope: extra memory is threads x bins, whatever the number of entries.
#include "ops.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>

namespace gmt {
namespace {

struct KeyFormat {
  const char* name;
  int key_bits;
};
constexpr KeyFormat kFormats[] = {{"f16", 15}, {"bf16", 15}, {"f32", 31}, {"f64", 63}};

template <class To, class From>
inline To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// Keys of |g| exactly as radix.score_keys defines them: clear the sign bit in the gradient's own
// type, widen to the format's float type (exact), read the bits as an integer.
struct KeySameWidth32 {  // float in f32
  uint32_t operator()(uint32_t bits) const { return bits & 0x7fffffffu; }
};
struct KeySameWidth16 {  // half in f16, bfloat16 in bf16
  uint32_t operator()(uint16_t bits) const { return bits & 0x7fffu; }
};
struct KeyBFloat16InF32 {  // a bfloat16 is the top half of the float with the same value
  uint32_t operator()(uint16_t bits) const { return uint32_t(bits & 0x7fffu) << 16; }
};
struct KeyHalfInF32 {
  uint32_t operator()(uint16_t bits) const {
    return bit_cast<uint32_t>(c10::detail::fp16_ieee_to_fp32_value(bits & 0x7fffu));
  }
};
struct KeySameWidth64 {  // double in f64
  uint64_t operator()(uint64_t bits) const { return bits & 0x7fffffffffffffffull; }
};
struct KeyFloatInF64 {
  uint64_t operator()(uint32_t bits) const {
    return bit_cast<uint64_t>(double(bit_cast<float>(bits & 0x7fffffffu)));
  }
};
struct KeyHalfInF64 {
  uint64_t operator()(uint16_t bits) const {
    return bit_cast<uint64_t>(double(c10::detail::fp16_ieee_to_fp32_value(bits & 0x7fffu)));
  }
};
struct KeyBFloat16InF64 {
  uint64_t operator()(uint16_t bits) const {
    return bit_cast<uint64_t>(double(bit_cast<float>(uint32_t(bits & 0x7fffu) << 16)));
  }
};

struct Digit {
  int shift;
  int hi;              // shift + width: bits at and above it must equal the scope's prefix
  uint64_t mask;       // bins - 1
  int64_t bins;
};

// Private counts of one thread. Several interleaved copies of the histogram let consecutive equal
// digits (common: gradients crowd into a few exponents) increment different memory words, so the
// loop is not serialised on store-to-load forwarding of one counter. Each copy has one extra
// "no match" bin, so that later passes count without a data-dependent branch.
class LocalHistogram {
 public:
  LocalHistogram(int64_t bins, int copies) : stride_(bins + 1), copies_(copies), counts_(stride_ * copies, 0) {}
  uint32_t* copy(int c) { return counts_.data() + (c % copies_) * stride_; }
  int64_t no_match_bin() const { return stride_ - 1; }

  // Adds the counts into row `scope` of the shared histogram and clears them.
  void flush_into(int64_t* shared_row) {
    for (int64_t b = 0; b + 1 < stride_; ++b) {
      uint64_t sum = 0;
      for (int c = 0; c < copies_; ++c) sum += counts_[c * stride_ + b];
      if (sum) atomic_add(shared_row + b, int64_t(sum));
    }
    std::fill(counts_.begin(), counts_.end(), 0u);
  }

 private:
  int64_t stride_;
  int copies_;
  std::vector<uint32_t> counts_;
};

template <class Bits, class KeyFn>
__attribute__((always_inline)) inline void count_all(const Bits* x, int64_t n, KeyFn key, const Digit& d, LocalHistogram& local) {
  uint32_t *h0 = local.copy(0), *h1 = local.copy(1), *h2 = local.copy(2), *h3 = local.copy(3);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++h0[(key(x[i]) >> d.shift) & d.mask];
    ++h1[(key(x[i + 1]) >> d.shift) & d.mask];
    ++h2[(key(x[i + 2]) >> d.shift) & d.mask];
    ++h3[(key(x[i + 3]) >> d.shift) & d.mask];
  }
  for (; i < n; ++i) ++h0[(key(x[i]) >> d.shift) & d.mask];
}

// Later passes: only entries under the chosen prefix count (a few percent after the first pass,
// a few in a million after the second). A vectorised test skips blocks without a match; blocks
// with one are counted without branching on each entry (matches are too frequent and random in
// the second pass for a branch to predict), non-matching entries landing in the no-match bin.
template <class Bits, class KeyFn, class Key>
__attribute__((always_inline)) inline void count_matching(const Bits* x, int64_t n, KeyFn key, const Digit& d,
                                                          Key prefix_hi, LocalHistogram& local) {
  constexpr int64_t kBlock = 32;
  uint32_t *h0 = local.copy(0), *h1 = local.copy(1), *h2 = local.copy(2), *h3 = local.copy(3);
  const int hi = d.hi, shift = d.shift;
  const uint64_t mask = d.mask, no_match = uint64_t(local.no_match_bin());
  auto bin = [&](Bits bits) {
    const Key k = key(bits);
    return (k >> hi) == prefix_hi ? uint64_t(k >> shift) & mask : no_match;
  };
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    uint32_t matches = 0;
    for (int64_t j = 0; j < kBlock; ++j) matches += (Key(key(x[i + j])) >> hi) == prefix_hi;
    if (matches == 0) continue;
    for (int64_t j = i; j < i + kBlock; j += 4) {
      ++h0[bin(x[j])];
      ++h1[bin(x[j + 1])];
      ++h2[bin(x[j + 2])];
      ++h3[bin(x[j + 3])];
    }
  }
  for (; i < n; ++i) ++h0[bin(x[i])];
}

template <class Bits, class KeyFn>
__attribute__((always_inline)) inline void count_piece(const void* data, int64_t first, int64_t last, KeyFn key, const Digit& d, int key_bits,
                 uint64_t prefix, LocalHistogram& local) {
  using Key = decltype(key(Bits{}));
  const Bits* x = static_cast<const Bits*>(data) + first;
  if (d.hi >= key_bits) {  // first pass: every entry is under the empty prefix
    count_all(x, last - first, key, d, local);
  } else {
    count_matching(x, last - first, key, d, Key(prefix >> d.hi), local);
  }
}

// Calls count_piece with the key function for (gradient dtype, key format). Compiled per ISA: the
// block test of later passes is vector code.
GMT_MULTIVERSION void count_tensor_piece(at::ScalarType dtype, const std::string& format, const void* data,
                                         int64_t first, int64_t last, const Digit& d, int key_bits,
                                         uint64_t prefix, LocalHistogram& local) {
  using at::ScalarType;
#define GMT_COUNT(BITS, KEY) return count_piece<BITS>(data, first, last, KEY{}, d, key_bits, prefix, local)
  if (format == "f32") {
    if (dtype == ScalarType::Float) GMT_COUNT(uint32_t, KeySameWidth32);
    if (dtype == ScalarType::BFloat16) GMT_COUNT(uint16_t, KeyBFloat16InF32);
    if (dtype == ScalarType::Half) GMT_COUNT(uint16_t, KeyHalfInF32);
  } else if (format == "f16" && dtype == ScalarType::Half) {
    GMT_COUNT(uint16_t, KeySameWidth16);
  } else if (format == "bf16" && dtype == ScalarType::BFloat16) {
    GMT_COUNT(uint16_t, KeySameWidth16);
  } else if (format == "f64") {
    if (dtype == ScalarType::Double) GMT_COUNT(uint64_t, KeySameWidth64);
    if (dtype == ScalarType::Float) GMT_COUNT(uint32_t, KeyFloatInF64);
    if (dtype == ScalarType::Half) GMT_COUNT(uint16_t, KeyHalfInF64);
    if (dtype == ScalarType::BFloat16) GMT_COUNT(uint16_t, KeyBFloat16InF64);
  }
#undef GMT_COUNT
  TORCH_CHECK(false, "unreachable: dtype/format pair was validated");
}

bool format_holds(const std::string& format, at::ScalarType dtype) {
  using at::ScalarType;
  if (format == "f64") return at::isFloatingType(dtype) && at::elementSize(dtype) <= 8;
  if (format == "f32") return dtype == ScalarType::Float || dtype == ScalarType::Half || dtype == ScalarType::BFloat16;
  if (format == "f16") return dtype == ScalarType::Half;
  if (format == "bf16") return dtype == ScalarType::BFloat16;
  return false;
}

}  // namespace

void radix_histogram_cpu(at::TensorList grads, at::IntArrayRef scope_of, const at::Tensor& state,
                         const at::Tensor& hist, c10::string_view key_format, int64_t shift, int64_t width) {
  const std::string format(key_format.data(), key_format.size());
  int key_bits = -1;
  for (const auto& f : kFormats) key_bits = format == f.name ? f.key_bits : key_bits;
  TORCH_CHECK(key_bits > 0, "gmt_kernels::radix_histogram: unknown key_format '", format,
              "'; expected one of f16, bf16, f32, f64 (radix.KEY_FORMATS).");
  TORCH_CHECK(width >= 1 && width <= 20 && shift >= 0 && shift + width <= key_bits,
              "gmt_kernels::radix_histogram: digit (shift=", shift, ", width=", width, ") does not fit the ",
              key_bits, "-bit keys of format ", format, "; widths 1..20 with shift + width <= ", key_bits,
              " are supported.");
  TORCH_CHECK(state.device().is_cpu() && state.scalar_type() == at::kLong && state.dim() == 2 &&
                  state.size(1) == 3 && state.is_contiguous(),
              "gmt_kernels::radix_histogram: state must be a contiguous int64 CPU tensor [scopes, 3]; got ",
              state.scalar_type(), " ", state.sizes(), " on ", state.device(), ".");
  const int64_t scopes = state.size(0), bins = int64_t(1) << width;
  TORCH_CHECK(hist.device().is_cpu() && hist.scalar_type() == at::kLong && hist.is_contiguous() &&
                  hist.dim() == 2 && hist.size(0) == scopes && hist.size(1) == bins,
              "gmt_kernels::radix_histogram: hist must be a contiguous int64 CPU tensor [", scopes, ", ", bins,
              "] (scopes x 2**width); got ", hist.scalar_type(), " ", hist.sizes(), " on ", hist.device(), ".");
  TORCH_CHECK(int64_t(scope_of.size()) == int64_t(grads.size()),
              "gmt_kernels::radix_histogram: scope_of has ", scope_of.size(), " entries for ", grads.size(),
              " gradients; it needs one scope row per gradient.");

  const int64_t* st = state.data_ptr<int64_t>();
  std::vector<at::Tensor> work;  // gradients of scopes still selecting, as dense memory blocks
  std::vector<int64_t> sizes, rows;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    const int64_t s = scope_of[i];
    TORCH_CHECK(s >= 0 && s < scopes, "gmt_kernels::radix_histogram: scope_of[", i, "] = ", s,
                " is not a row of state, which has ", scopes, " scopes.");
    TORCH_CHECK(g.device().is_cpu(), "gmt_kernels::radix_histogram (C++ CPU backend): gradient ", i, " is on ",
                g.device(), "; this backend serves CPU tensors only. Use backend='auto' to pick one per device.");
    TORCH_CHECK(format_holds(format, g.scalar_type()), "gmt_kernels::radix_histogram: a ", g.scalar_type(),
                " gradient (", i, ") cannot be scored exactly in key format ", format,
                "; radix.key_format_for picks a format wide enough for every dtype of a scope.");
    if (st[s * 3 + 2] != 0 || g.numel() == 0) continue;  // scope done: its entries are no longer counted
    // Order does not matter to a histogram, so any dense layout is read as it lies in memory;
    // only overlapping or gappy views (rare for gradients) pay for a copy.
    work.push_back(g.is_non_overlapping_and_dense() ? g : g.contiguous());
    sizes.push_back(g.numel());
    rows.push_back(s);
  }
  FlatIndex flat(sizes);
  int64_t* out = hist.data_ptr<int64_t>();
  const int copies = width <= 12 ? 4 : 1;  // keep the private copies within L1/L2
  Digit digit{int(shift), int(shift + width), uint64_t(bins - 1), bins};

  at::parallel_for(0, flat.total(), kGrain, [&](int64_t begin, int64_t end) {
    LocalHistogram local(bins, copies);
    int64_t pending_row = -1;
    int64_t pending_entries = 0;
    flat.for_each_piece(begin, end, [&](size_t item, int64_t first, int64_t last) {
      const int64_t row = rows[item];
      // A 32-bit private counter must not wrap: flush before 2^32 entries could reach one bin.
      if (pending_row != row || pending_entries + (last - first) >= (int64_t(1) << 32)) {
        if (pending_row >= 0) local.flush_into(out + pending_row * bins);
        pending_row = row;
        pending_entries = 0;
      }
      const at::Tensor& g = work[item];
      constexpr int64_t kPiece = int64_t(1) << 30;
      for (int64_t lo = first; lo < last; lo += kPiece) {
        const int64_t hi = std::min(last, lo + kPiece);
        if (pending_entries + (hi - lo) >= (int64_t(1) << 32)) {
          local.flush_into(out + row * bins);
          pending_entries = 0;
        }
        count_tensor_piece(g.scalar_type(), format, g.data_ptr(), lo, hi, digit, key_bits,
                           uint64_t(st[row * 3 + 0]), local);
        pending_entries += hi - lo;
      }
    });
    if (pending_row >= 0) local.flush_into(out + pending_row * bins);
  });
}

}  // namespace gmt
