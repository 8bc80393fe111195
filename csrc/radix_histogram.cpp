// Backend.radix_histogram for CPU tensors: one histogram pass over all gradients of all scopes.
//
// Each thread counts its range of the flattened gradients into private 32-bit histograms that live
// in L1, and adds them into the shared int64 histogram only when its range moves on to another
// scope: extra memory is threads x bins, whatever the number of entries.
//
// Three kinds of pass, each with a variant per CPU capability level (cpu_capability.h) for the
// 32-bit key formats (f32, f16, bf16; 64-bit keys take the portable code on every level):
// - interval (most of a step's reading: the bracket, then one bin of it): most entries only raise
//   the ABOVE counter or nothing, so the work is reading g. Vector code compares W keys at a time
//   and packs the digits of those inside the interval into a buffer (AVX-512: compress; AVX2: a
//   permutation from a 256-entry table; NEON: a branch-free append), counted when full.
// - whole (a first pass, every key has a bin): keys and digits in vector code, then scalar
//   increments alternating between two histogram copies.
// - sample (a first pass over the hashed blocks of radix.sampled_blocks): the whole-range code
//   on each picked block of 64 entries, the picks of the group after next prefetched.
// The portable level is the same algorithm one key at a time.
//
// Keys come from the criterion's score (SEMANTICS.md section 8), computed here as the update
// computes it: "grad" |g|; "grad_over_weight" |g| / (|theta| + eps) (f32 keys in vector code, f64
// keys portable); "random" the 32-bit hash of scores.py (u32 keys: nothing is read but the entry
// index, and no key is non-finite).
#include "ops.h"
#include "radix.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <cstring>
#include <type_traits>

#include "cpu_capability.h"
#include "simd.h"

namespace gmt {
namespace {

using radix::kAbove;
using radix::kBins;
using radix::kNonfinite;

template <class To, class From>
inline To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// What one span of one tensor is scored from: the gradient (and theta) from the span's first
// entry, or the random score's inputs for it (t of its 2**32-entry run, its entry index mod 2**32;
// a span never crosses a multiple of 2**32, count_piece splits it there).
struct KeySrc {
  const char* g = nullptr;
  const char* w = nullptr;  // theta (grad_over_weight)
  int64_t elem = 0;         // element size of g and theta
  float eps32 = 0;
  double eps64 = 0;
  uint32_t t = 0, low = 0;
  KeySrc at(int64_t a) const {
    KeySrc s = *this;
    if (g) s.g = g + a * elem;
    if (w) s.w = w + a * elem;
    s.low = low + uint32_t(a);
    return s;
  }
};

// The score keys of grad_over_weight and random for the portable code: s in float32 (f32 format,
// g and theta widened to float32 first) or float64 (f64 format), one IEEE add and one division;
// the key is s's bits with the sign cleared, and every NaN has key key_max (radix.entry_scores:
// one key whatever NaN payload the hardware propagates).
template <class P>
GMT_INLINE float widen32(const char* x, int64_t j) {
  return simd::Scalar<float>::load(reinterpret_cast<const P*>(x) + j);
}
template <class P>
GMT_INLINE double widen64(const char* x, int64_t j) {
  if constexpr (std::is_same_v<P, double>) {
    return reinterpret_cast<const double*>(x)[j];
  } else {
    return double(widen32<P>(x, j));
  }
}
template <class P>
struct OverWeightKeys32 {
  KeySrc s;
  uint32_t operator()(int64_t j) const {
    const float v = std::abs(widen32<P>(s.g, j)) / (std::abs(widen32<P>(s.w, j)) + s.eps32);
    return v != v ? 0x7fffffffu : bit_cast<uint32_t>(v) & 0x7fffffffu;
  }
};
template <class P>
struct OverWeightKeys64 {
  KeySrc s;
  uint64_t operator()(int64_t j) const {
    const double v = std::abs(widen64<P>(s.g, j)) / (std::abs(widen64<P>(s.w, j)) + s.eps64);
    return v != v ? 0x7fffffffffffffffull : bit_cast<uint64_t>(v) & 0x7fffffffffffffffull;
  }
};
struct RandomKeys {  // 64-bit keys in the portable code, so inf_key (2**32) is above every one
  KeySrc s;
  uint64_t operator()(int64_t j) const { return simd::random_u(s.t, s.low + uint32_t(j)); }
};
template <class Bits, class KeyFn>
struct GradKeys {  // |g| read from the gradient's own bits
  const Bits* x;
  KeyFn key;
  auto operator()(int64_t j) const { return key(x[j]); }
};

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

// One scope's interval in this pass (state columns LO, LAST, SHIFT) and its format's inf key.
struct Interval {
  uint64_t lo, last, inf_key;
  int shift;
  bool whole;  // the whole key range in bins of the first pass: every entry has a bin
};

// Private counts of one thread. Two interleaved copies of the histogram let consecutive equal
// digits (common in a first pass: gradients crowd into a few exponents) increment different memory
// words, so the loop is not serialised on store-to-load forwarding of one counter; two copies of
// 4096 bins fill L1.
class LocalCounts {
 public:
  static constexpr int kCopies = 2;
  LocalCounts() : counts_(kBins * kCopies, 0) {}
  uint32_t* copy(int c) { return counts_.data() + c * kBins; }
  int64_t above = 0, nonfinite = 0;

  // Adds the counts into row `scope` of the shared histogram and clears them.
  void flush_into(int64_t* shared_row) {
    for (int64_t b = 0; b < kBins; ++b) {
      uint64_t sum = 0;
      for (int c = 0; c < kCopies; ++c) sum += counts_[c * kBins + b];
      if (sum) atomic_add(shared_row + b, int64_t(sum));
    }
    if (above) atomic_add(shared_row + kAbove, above);
    if (nonfinite) atomic_add(shared_row + kNonfinite, nonfinite);
    std::fill(counts_.begin(), counts_.end(), 0u);
    above = nonfinite = 0;
  }

 private:
  std::vector<uint32_t> counts_;
};

// Digits written W at a time by vector code, or buffered by an interval pass (drain), counted
// here one by one into the two copies alternately.
inline void count_digits(const uint32_t* digits, int count, LocalCounts& local) {
  uint32_t *h0 = local.copy(0), *h1 = local.copy(1);
  if (digits[0] == digits[count - 1]) {  // often a run (zeros): count it in a register
    int same = 1;
    while (same < count && digits[same] == digits[0]) ++same;
    if (same == count) {
      h0[digits[0]] += uint32_t(count);
      return;
    }
  }
  for (int j = 0; j + 1 < count; j += 2) {
    ++h0[digits[j]];
    ++h1[digits[j + 1]];
  }
  if (count & 1) ++h0[digits[count - 1]];
}

// Counts buffered digits (count_digits: the two copies alternately, or a buffer that is one run in
// a register). No branch per digit: the digits of an interval pass are in no order, and a
// run-length loop would mispredict about every other one.
inline void drain(LocalCounts& local, const uint32_t* buffer, int& filled) {
  if (filled > 0) count_digits(buffer, filled, local);
  filled = 0;
}

// The first pass of a scope: every key has a bin, key >> shift.
template <class KeyAt>
__attribute__((always_inline)) inline void count_whole(int64_t n, const KeyAt& key_at, const Interval& iv,
                                                       LocalCounts& local) {
  using Key = decltype(key_at(int64_t(0)));
  uint32_t *h0 = local.copy(0), *h1 = local.copy(1);
  const int shift = iv.shift;
  const Key inf = Key(iv.inf_key);
  int64_t nonfinite = 0, i = 0;
  for (; i + 4 <= n; i += 4) {
    const Key k0 = key_at(i), k1 = key_at(i + 1), k2 = key_at(i + 2), k3 = key_at(i + 3);
    ++h0[k0 >> shift];
    ++h1[k1 >> shift];
    ++h0[k2 >> shift];
    ++h1[k3 >> shift];
    nonfinite += int(k0 >= inf) + int(k1 >= inf) + int(k2 >= inf) + int(k3 >= inf);
  }
  for (; i < n; ++i) {
    const Key k = key_at(i);
    ++h0[k >> shift];
    nonfinite += k >= inf;
  }
  local.nonfinite += nonfinite;
}

// Any interval, portable: blocks of 64 keys are tested by (auto-vectorised) code; a block with keys
// in the interval appends their digits to a buffer without a branch per key (store every digit,
// advance by whether it was inside), and the buffer is counted when full. Counting every key into
// a "no match" bin instead would chain all the misses on one counter.
template <class KeyAt>
__attribute__((always_inline)) inline void count_interval(int64_t n, const KeyAt& key_at, const Interval& iv,
                                                          LocalCounts& local) {
  using Key = decltype(key_at(int64_t(0)));
  constexpr int64_t kBlock = 64, kBuffer = 1024;
  uint32_t buffer[kBuffer + kBlock];
  int fill = 0;
  // key - lo <= span as unsigned numbers: below LO wraps around to a value above any span.
  const Key lo = Key(iv.lo), span = Key(iv.last - iv.lo), last = Key(iv.last), inf = Key(iv.inf_key);
  const int shift = iv.shift;
  int64_t above = 0, nonfinite = 0;
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = std::min(kBlock, n - i);
    uint32_t inside = 0, up = 0, bad = 0;
    for (int64_t j = i; j < i + m; ++j) {
      const Key k = key_at(j);
      inside += Key(k - lo) <= span;
      up += k > last;
      bad += k >= inf;
    }
    above += up;
    nonfinite += bad;
    if (inside == 0) continue;
    for (int64_t j = i; j < i + m; ++j) {
      const Key d = Key(key_at(j) - lo);
      buffer[fill] = uint32_t(d >> shift);
      fill += d <= span;
    }
    if (fill >= kBuffer) drain(local, buffer, fill);
  }
  drain(local, buffer, fill);
  local.above += above;
  local.nonfinite += nonfinite;
}

// The 32-bit keys that vector code makes W at a time, and their one-key functions: |g| (the first
// four), grad_over_weight scores in f32 (by the tensors' dtype), the random score (u32).
enum class Keys32 {
  kFloat,
  kSameWidth16,
  kBFloat16InF32,
  kHalfInF32,
  kOverWeightFloat,
  kOverWeightBFloat16,
  kOverWeightHalf,
  kRandom,
  kNone
};

// Keys not below 2**31 exist (u32): compares must be unsigned, and none is non-finite.
constexpr bool unsigned_keys(Keys32 kind) { return kind == Keys32::kRandom; }

// An interval so narrow that few entries fall inside: under 2**15 keys of a kind whose keys are
// 32-bit scores (a float32 relative width under 0.4 %; the last pass of an exact selection). Keys
// widened from 16-bit values are excluded: one such value can tie thousands of entries.
inline bool sparse_interval(Keys32 kind, const Interval& iv) {
  const bool scores32 = kind == Keys32::kFloat || kind == Keys32::kRandom || kind == Keys32::kOverWeightFloat ||
                        kind == Keys32::kOverWeightBFloat16 || kind == Keys32::kOverWeightHalf;
  return scores32 && iv.last - iv.lo < (uint64_t(1) << 15);
}

// The grad_over_weight kinds, and the type each reads g and theta in.
constexpr bool over_weight_keys(Keys32 kind) {
  return kind == Keys32::kOverWeightFloat || kind == Keys32::kOverWeightBFloat16 || kind == Keys32::kOverWeightHalf;
}
template <Keys32 KIND>
using OverWeightParam = std::conditional_t<KIND == Keys32::kOverWeightFloat, float,
                                           std::conditional_t<KIND == Keys32::kOverWeightHalf, simd::F16, simd::BF16>>;

Keys32 keys32_kind(at::ScalarType dtype, const std::string& format, Criterion criterion) {
  using at::ScalarType;
  if (criterion == Criterion::kRandom) return format == "u32" ? Keys32::kRandom : Keys32::kNone;
  if (criterion == Criterion::kGradOverWeight) {
    if (format != "f32") return Keys32::kNone;
    if (dtype == ScalarType::Float) return Keys32::kOverWeightFloat;
    if (dtype == ScalarType::BFloat16) return Keys32::kOverWeightBFloat16;
    if (dtype == ScalarType::Half) return Keys32::kOverWeightHalf;
    return Keys32::kNone;
  }
  if (format == "f32") {
    if (dtype == ScalarType::Float) return Keys32::kFloat;
    if (dtype == ScalarType::BFloat16) return Keys32::kBFloat16InF32;
    if (dtype == ScalarType::Half) return Keys32::kHalfInF32;
  }
  if ((format == "f16" && dtype == ScalarType::Half) || (format == "bf16" && dtype == ScalarType::BFloat16)) {
    return Keys32::kSameWidth16;
  }
  return Keys32::kNone;
}

// The one-key function of a 32-bit kind for the span that `s` starts.
template <Keys32 KIND>
inline auto keys_of(const KeySrc& s) {
  if constexpr (KIND == Keys32::kFloat) return GradKeys<uint32_t, KeySameWidth32>{reinterpret_cast<const uint32_t*>(s.g), {}};
  if constexpr (KIND == Keys32::kSameWidth16) return GradKeys<uint16_t, KeySameWidth16>{reinterpret_cast<const uint16_t*>(s.g), {}};
  if constexpr (KIND == Keys32::kBFloat16InF32) return GradKeys<uint16_t, KeyBFloat16InF32>{reinterpret_cast<const uint16_t*>(s.g), {}};
  if constexpr (KIND == Keys32::kHalfInF32) return GradKeys<uint16_t, KeyHalfInF32>{reinterpret_cast<const uint16_t*>(s.g), {}};
  if constexpr (over_weight_keys(KIND)) return OverWeightKeys32<OverWeightParam<KIND>>{s};
  if constexpr (KIND == Keys32::kRandom) return RandomKeys{s};
}

// The tail of a vector loop (fewer than W keys left) with the portable code for the same keys.
template <Keys32 KIND>
inline void count_tail(const KeySrc& src, int64_t i, int64_t n, const Interval& iv, LocalCounts& local) {
  if (i >= n) return;
  const auto key_at = keys_of<KIND>(src.at(i));
  if (iv.whole) {
    count_whole(n - i, key_at, iv, local);
  } else {
    count_interval(n - i, key_at, iv, local);
  }
}

#ifdef GMT_SIMD_X86
// For each 8-bit mask, the lanes whose bit is set, in order: the permutation that packs them to
// the front of an AVX2 register (AVX2 has no compress instruction).
struct CompressTable {
  alignas(32) uint32_t lanes[256][8];
  constexpr CompressTable() : lanes() {
    for (int mask = 0; mask < 256; ++mask) {
      int k = 0;
      for (int lane = 0; lane < 8; ++lane) {
        if (mask >> lane & 1) lanes[mask][k++] = uint32_t(lane);
      }
    }
  }
};
constexpr CompressTable kCompress{};

namespace isa_avx2 {
GMT_BEGIN_AVX2
template <class P>
GMT_INLINE __m256 over_weight_scores(const KeySrc& s, int64_t i) {
  using F = simd::avx2::F32;
  const __m256 g = F::load(reinterpret_cast<const P*>(s.g) + i), w = F::load(reinterpret_cast<const P*>(s.w) + i);
  return _mm256_div_ps(F::abs(g), _mm256_add_ps(F::abs(w), _mm256_set1_ps(s.eps32)));
}

template <Keys32 KIND>
GMT_INLINE __m256i load_keys(const KeySrc& s, int64_t i) {
  const void* data = s.g;
  if constexpr (KIND == Keys32::kRandom) {
    using U = simd::avx2::U32;
    return U::hash(U::from(s.low + uint32_t(i)), U::set1(s.t));
  } else if constexpr (over_weight_keys(KIND)) {
    using P = OverWeightParam<KIND>;
    const __m256 score = over_weight_scores<P>(s, i);  // a NaN lane: all ones, then the sign cleared
    const __m256 nan = _mm256_cmp_ps(score, score, _CMP_UNORD_Q);
    return _mm256_and_si256(_mm256_castps_si256(_mm256_or_ps(score, nan)), _mm256_set1_epi32(0x7fffffff));
  } else if constexpr (KIND == Keys32::kFloat) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint32_t*>(data) + i));
    return _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
  } else {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(data) + i));
    if constexpr (KIND == Keys32::kHalfInF32) {  // VCVTPH2PS widens denormals exactly
      return _mm256_and_si256(_mm256_castps_si256(_mm256_cvtph_ps(half)), _mm256_set1_epi32(0x7fffffff));
    }
    const __m256i bits = _mm256_and_si256(_mm256_cvtepu16_epi32(half), _mm256_set1_epi32(0x7fff));
    if constexpr (KIND == Keys32::kBFloat16InF32) return _mm256_slli_epi32(bits, 16);
    return bits;
  }
}

// Keys are below 2^31 (the sign bit is cleared), so signed compares order them; `key - lo <= span`
// as unsigned numbers (min_epu32) tests lo <= key <= last in one compare. (A function, not a
// lambda: clang applies the target region to functions only.)
struct IntervalConstants {
  __m256i lo, span, last, below_inf;
  __m128i shift;
};

// ZEROS (only when the interval starts at key 0): exact zeros, which real gradients hold by the
// million, are counted in a register instead of going through the buffer. SPARSE (a narrow
// interval, see sparse_interval): eight keys outside it, the common case, skip the packing.
template <Keys32 KIND, bool ZEROS, bool SPARSE>
GMT_INLINE void count8(const KeySrc& data, int64_t i, const IntervalConstants& c, __m256i& above, __m256i& nonfinite,
                       __m256i& zeros, uint32_t* buffer, int& fill, LocalCounts& local) {
  constexpr int kBuffer = 256;
  const __m256i key = load_keys<KIND>(data, i);
  const __m256i offset = _mm256_sub_epi32(key, c.lo);
  __m256i inside = _mm256_cmpeq_epi32(_mm256_min_epu32(offset, c.span), offset);
  if constexpr (ZEROS) {
    const __m256i is_zero = _mm256_cmpeq_epi32(key, _mm256_setzero_si256());
    zeros = _mm256_sub_epi32(zeros, is_zero);
    inside = _mm256_andnot_si256(is_zero, inside);
  }
  if constexpr (unsigned_keys(KIND)) {  // key > last: not min(key, last) == key; no non-finite keys
    const __m256i at_most = _mm256_cmpeq_epi32(_mm256_min_epu32(key, c.last), key);
    above = _mm256_sub_epi32(above, _mm256_xor_si256(at_most, _mm256_set1_epi32(-1)));
  } else {
    above = _mm256_sub_epi32(above, _mm256_cmpgt_epi32(key, c.last));  // a true lane is -1
    nonfinite = _mm256_sub_epi32(nonfinite, _mm256_cmpgt_epi32(key, c.below_inf));
  }
  const int mask = _mm256_movemask_ps(_mm256_castsi256_ps(inside));
  if constexpr (SPARSE) {
    if (__builtin_expect(mask == 0, 1)) return;
  }
  const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.lanes[mask]));
  const __m256i packed = _mm256_permutevar8x32_epi32(_mm256_srl_epi32(offset, c.shift), order);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(buffer + fill), packed);
  fill += _mm_popcnt_u32(unsigned(mask));
  if (fill >= kBuffer) drain(local, buffer, fill);
}

GMT_INLINE int64_t lane_sum(__m256i lanes) {  // per-lane counts: n < 2^34 per call, no lane wraps
  alignas(32) uint32_t out[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(out), lanes);
  int64_t sum = 0;
  for (uint32_t count : out) sum += count;
  return sum;
}

template <Keys32 KIND, bool ZEROS, bool SPARSE>
void count_interval_streams(const KeySrc& data, int64_t n, const Interval& iv, LocalCounts& local) {
  const IntervalConstants c{_mm256_set1_epi32(int32_t(iv.lo)), _mm256_set1_epi32(int32_t(iv.last - iv.lo)),
                            _mm256_set1_epi32(int32_t(iv.last)), _mm256_set1_epi32(int32_t(iv.inf_key - 1)),
                            _mm_cvtsi32_si128(iv.shift)};
  __m256i above = _mm256_setzero_si256(), nonfinite = _mm256_setzero_si256(), zeros = _mm256_setzero_si256();
  constexpr int kStreams = 4;
  alignas(32) uint32_t buffers[kStreams][256 + 8];
  int fill[kStreams] = {};
  uint32_t* counts = local.copy(0);
  // Interleaved streams (quarters of the range): more reads in flight, and independent fill
  // counters instead of one dependency chain. Unrolled so that the fill counts live in registers:
  // rolled, GCC kept them in memory (a load and a store per 8 keys; a pass took 10-20 % longer).
  const int64_t part = (n / kStreams) & ~int64_t(7);
  for (int64_t i = 0; i < part; i += 8) {
#pragma GCC unroll 4
    for (int s = 0; s < kStreams; ++s) {
      count8<KIND, ZEROS, SPARSE>(data, s * part + i, c, above, nonfinite, zeros, buffers[s], fill[s], local);
    }
  }
  int64_t i = kStreams * part;
  for (; i + 8 <= n; i += 8) count8<KIND, ZEROS, SPARSE>(data, i, c, above, nonfinite, zeros, buffers[0], fill[0], local);
  for (int s = 0; s < kStreams; ++s) drain(local, buffers[s], fill[s]);
  local.above += lane_sum(above);
  local.nonfinite += lane_sum(nonfinite);
  if constexpr (ZEROS) counts[0] += uint32_t(lane_sum(zeros));  // key 0 is digit 0 when LO is 0
  count_tail<KIND>(data, i, n, iv, local);
}

template <Keys32 KIND>
void count_interval(const KeySrc& data, int64_t n, const Interval& iv, LocalCounts& local) {
  if (iv.lo == 0) return count_interval_streams<KIND, true, false>(data, n, iv, local);
  if (sparse_interval(KIND, iv)) return count_interval_streams<KIND, false, true>(data, n, iv, local);
  count_interval_streams<KIND, false, false>(data, n, iv, local);
}

template <Keys32 KIND>
void count_whole(const KeySrc& data, int64_t n, const Interval& iv, LocalCounts& local) {
  const __m256i below_inf = _mm256_set1_epi32(int32_t(iv.inf_key - 1));
  const __m128i shift = _mm_cvtsi32_si128(iv.shift);
  __m256i nonfinite = _mm256_setzero_si256();
  alignas(32) uint32_t digits[16];
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i k0 = load_keys<KIND>(data, i), k1 = load_keys<KIND>(data, i + 8);
    if constexpr (!unsigned_keys(KIND)) {
      nonfinite = _mm256_sub_epi32(nonfinite, _mm256_cmpgt_epi32(k0, below_inf));
      nonfinite = _mm256_sub_epi32(nonfinite, _mm256_cmpgt_epi32(k1, below_inf));
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(digits), _mm256_srl_epi32(k0, shift));
    _mm256_store_si256(reinterpret_cast<__m256i*>(digits + 8), _mm256_srl_epi32(k1, shift));
    count_digits(digits, 16, local);
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), nonfinite);
  for (int32_t c : lanes) local.nonfinite += uint32_t(c);
  count_tail<KIND>(data, i, n, iv, local);
}
GMT_END
}  // namespace isa_avx2

namespace isa_avx512 {
GMT_BEGIN_AVX512
// float lanes of 16 entries of a float, bfloat16 or half tensor, lanes past `valid` zero.
template <class P>
GMT_INLINE __m512 load_floats(const char* x, int64_t i, __mmask16 valid) {
  if constexpr (std::is_same_v<P, float>) {
    return _mm512_maskz_loadu_ps(valid, reinterpret_cast<const float*>(x) + i);
  } else {
    const __m256i half = _mm256_maskz_loadu_epi16(valid, reinterpret_cast<const uint16_t*>(x) + i);
    if constexpr (std::is_same_v<P, simd::F16>) return _mm512_cvtph_ps(half);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  }
}

template <Keys32 KIND>
GMT_INLINE __m512i load_keys(const KeySrc& s, int64_t i, __mmask16 valid) {
  const void* data = s.g;
  if constexpr (KIND == Keys32::kRandom) {
    using U = simd::avx512::U32;
    return U::hash(U::from(s.low + uint32_t(i)), U::set1(s.t));
  } else if constexpr (over_weight_keys(KIND)) {
    using P = OverWeightParam<KIND>;
    using F = simd::avx512::F32;
    const __m512 g = load_floats<P>(s.g, i, valid), w = load_floats<P>(s.w, i, valid);
    const __m512 score = _mm512_div_ps(F::abs(g), _mm512_add_ps(F::abs(w), _mm512_set1_ps(s.eps32)));
    const __m512i key = _mm512_and_si512(_mm512_castps_si512(score), _mm512_set1_epi32(0x7fffffff));
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(score, score, _CMP_UNORD_Q), key, _mm512_set1_epi32(0x7fffffff));
  } else if constexpr (KIND == Keys32::kFloat) {
    const __m512i bits = _mm512_maskz_loadu_epi32(valid, static_cast<const uint32_t*>(data) + i);
    return _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  } else {
    const __m256i half = _mm256_maskz_loadu_epi16(valid, static_cast<const uint16_t*>(data) + i);
    if constexpr (KIND == Keys32::kHalfInF32) {  // exact for denormals: VCVTPH2PS ignores DAZ
      return _mm512_and_si512(_mm512_castps_si512(_mm512_cvtph_ps(half)), _mm512_set1_epi32(0x7fffffff));
    }
    const __m512i bits = _mm512_and_si512(_mm512_cvtepu16_epi32(half), _mm512_set1_epi32(0x7fff));
    if constexpr (KIND == Keys32::kBFloat16InF32) return _mm512_slli_epi32(bits, 16);
    return bits;
  }
}

// Loads 16 keys at i (lanes past n masked off), updates the counters, and appends the digits of the
// keys inside the interval to `buffer` at `fill` (compressed into a register, then a plain store:
// a compressing store to memory is slow on Zen 4). Returns how many it appended.
template <Keys32 KIND>
GMT_INLINE int count16(const KeySrc& data, int64_t i, int64_t n, __m512i lo, __m512i span, __m512i last, __m512i inf,
                       __m128i shift, __m512i& above, __m512i& nonfinite, uint32_t* buffer) {
  const __mmask16 valid = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
  const __m512i key = load_keys<KIND>(data, i, valid);
  const __m512i offset = _mm512_sub_epi32(key, lo);
  const __mmask16 inside = _mm512_mask_cmple_epu32_mask(valid, offset, span);
  const __m512i one = _mm512_set1_epi32(1);
  above = _mm512_mask_add_epi32(above, _mm512_mask_cmpgt_epu32_mask(valid, key, last), above, one);
  if constexpr (!unsigned_keys(KIND)) {
    nonfinite = _mm512_mask_add_epi32(nonfinite, _mm512_mask_cmpge_epu32_mask(valid, key, inf), nonfinite, one);
  }
  _mm512_storeu_si512(buffer, _mm512_maskz_compress_epi32(inside, _mm512_srl_epi32(offset, shift)));
  return _mm_popcnt_u32(inside);
}

// The range is read as kStreams interleaved streams, each with its own buffer: one core then has
// several sequential reads in flight (a single stream leaves memory bandwidth unused), and each
// buffer's fill count (compress, popcount, add: a dependency chain) advances independently.
template <Keys32 KIND>
void count_interval(const KeySrc& data, int64_t n, const Interval& iv, LocalCounts& local) {
  const __m512i lo = _mm512_set1_epi32(int32_t(iv.lo)), span = _mm512_set1_epi32(int32_t(iv.last - iv.lo));
  const __m512i last = _mm512_set1_epi32(int32_t(iv.last)), inf = _mm512_set1_epi32(int32_t(iv.inf_key));
  const __m128i shift = _mm_cvtsi32_si128(iv.shift);
  __m512i above = _mm512_setzero_si512(), nonfinite = _mm512_setzero_si512();
  constexpr int kStreams = 4, kBuffer = 256;
  alignas(64) uint32_t buffers[kStreams][kBuffer + 16];
  int fill[kStreams] = {};
  // Stream s covers [s * part, (s + 1) * part) of the range, the last one the remainder too.
  const int64_t part = (n / kStreams) & ~int64_t(15);
  for (int64_t i = 0; i < part; i += 16) {
#pragma GCC unroll 4
    for (int s = 0; s < kStreams; ++s) {
      fill[s] += count16<KIND>(data, s * part + i, n, lo, span, last, inf, shift, above, nonfinite,
                               buffers[s] + fill[s]);
      if (fill[s] >= kBuffer) drain(local, buffers[s], fill[s]);
    }
  }
  for (int64_t i = kStreams * part; i < n; i += 16) {
    fill[0] += count16<KIND>(data, i, n, lo, span, last, inf, shift, above, nonfinite, buffers[0] + fill[0]);
    if (fill[0] >= kBuffer) drain(local, buffers[0], fill[0]);
  }
  for (int s = 0; s < kStreams; ++s) drain(local, buffers[s], fill[s]);
  // Per-lane counts: n < 2^36 entries per call (callers pass at most 2^30), so no lane wraps.
  local.above += uint32_t(_mm512_reduce_add_epi32(above));
  local.nonfinite += uint32_t(_mm512_reduce_add_epi32(nonfinite));
}

template <Keys32 KIND>
void count_whole(const KeySrc& data, int64_t n, const Interval& iv, LocalCounts& local) {
  const __m512i inf = _mm512_set1_epi32(int32_t(iv.inf_key)), one = _mm512_set1_epi32(1);
  const __m128i shift = _mm_cvtsi32_si128(iv.shift);
  __m512i nonfinite = _mm512_setzero_si512();
  alignas(64) uint32_t digits[32];
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512i k0 = load_keys<KIND>(data, i, 0xffff), k1 = load_keys<KIND>(data, i + 16, 0xffff);
    if constexpr (!unsigned_keys(KIND)) {
      nonfinite = _mm512_mask_add_epi32(nonfinite, _mm512_cmpge_epu32_mask(k0, inf), nonfinite, one);
      nonfinite = _mm512_mask_add_epi32(nonfinite, _mm512_cmpge_epu32_mask(k1, inf), nonfinite, one);
    }
    _mm512_store_si512(digits, _mm512_srl_epi32(k0, shift));
    _mm512_store_si512(digits + 16, _mm512_srl_epi32(k1, shift));
    count_digits(digits, 32, local);
  }
  local.nonfinite += uint32_t(_mm512_reduce_add_epi32(nonfinite));
  count_tail<KIND>(data, i, n, iv, local);
}
GMT_END
}  // namespace isa_avx512
#endif  // GMT_SIMD_X86

#ifdef GMT_SIMD_NEON
namespace isa_neon {
template <Keys32 KIND>
GMT_INLINE uint32x4_t load_keys(const KeySrc& s, int64_t i) {
  const void* data = s.g;
  if constexpr (KIND == Keys32::kRandom) {
    using U = simd::neon::U32;
    return U::hash(U::from(s.low + uint32_t(i)), U::set1(s.t));
  } else if constexpr (over_weight_keys(KIND)) {
    using P = OverWeightParam<KIND>;
    using F = simd::neon::F32;
    const float32x4_t g = F::load(reinterpret_cast<const P*>(s.g) + i), w = F::load(reinterpret_cast<const P*>(s.w) + i);
    const float32x4_t score = vdivq_f32(F::abs(g), vaddq_f32(F::abs(w), vdupq_n_f32(s.eps32)));
    const uint32x4_t nan = vmvnq_u32(vceqq_f32(score, score));
    return vandq_u32(vorrq_u32(vreinterpretq_u32_f32(score), nan), vdupq_n_u32(0x7fffffffu));
  } else if constexpr (KIND == Keys32::kFloat) {
    return vandq_u32(vld1q_u32(static_cast<const uint32_t*>(data) + i), vdupq_n_u32(0x7fffffffu));
  } else {
    const uint16x4_t half = vld1_u16(static_cast<const uint16_t*>(data) + i);
    if constexpr (KIND == Keys32::kHalfInF32) {  // FCVTL widens denormals exactly (FZ16 is off)
      return vandq_u32(vreinterpretq_u32_f32(vcvt_f32_f16(vreinterpret_f16_u16(half))), vdupq_n_u32(0x7fffffffu));
    }
    const uint16x4_t bits = vand_u16(half, vdup_n_u16(0x7fff));
    if constexpr (KIND == Keys32::kBFloat16InF32) return vshll_n_u16(bits, 16);
    return vmovl_u16(bits);
  }
}

template <Keys32 KIND>
void count_interval(const KeySrc& data, int64_t n, const Interval& iv, LocalCounts& local) {
  const uint32x4_t lo = vdupq_n_u32(uint32_t(iv.lo)), span = vdupq_n_u32(uint32_t(iv.last - iv.lo));
  const uint32x4_t last = vdupq_n_u32(uint32_t(iv.last)), inf = vdupq_n_u32(uint32_t(iv.inf_key));
  const int32x4_t right = vdupq_n_s32(-iv.shift);  // a negative left shift shifts right
  uint32x4_t above = vdupq_n_u32(0), nonfinite = vdupq_n_u32(0);
  constexpr int kBuffer = 256;
  uint32_t buffer[kBuffer + 8];
  alignas(16) uint32_t digits[8], inside[8];
  int fill = 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int h = 0; h < 2; ++h) {
      const uint32x4_t key = load_keys<KIND>(data, i + 4 * h);
      const uint32x4_t offset = vsubq_u32(key, lo);
      above = vsubq_u32(above, vcgtq_u32(key, last));  // a true lane is all ones: subtracting adds 1
      if constexpr (!unsigned_keys(KIND)) nonfinite = vsubq_u32(nonfinite, vcgeq_u32(key, inf));
      vst1q_u32(inside + 4 * h, vshrq_n_u32(vcleq_u32(offset, span), 31));
      vst1q_u32(digits + 4 * h, vshlq_u32(offset, right));
    }
    for (int j = 0; j < 8; ++j) {  // branch-free append: store always, advance if inside
      buffer[fill] = digits[j];
      fill += int(inside[j]);
    }
    if (fill >= kBuffer) drain(local, buffer, fill);
  }
  drain(local, buffer, fill);
  local.above += vaddvq_u32(above);
  local.nonfinite += vaddvq_u32(nonfinite);
  count_tail<KIND>(data, i, n, iv, local);
}

template <Keys32 KIND>
void count_whole(const KeySrc& data, int64_t n, const Interval& iv, LocalCounts& local) {
  const uint32x4_t inf = vdupq_n_u32(uint32_t(iv.inf_key));
  const int32x4_t right = vdupq_n_s32(-iv.shift);
  uint32x4_t nonfinite = vdupq_n_u32(0);
  alignas(16) uint32_t digits[16];
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int q = 0; q < 4; ++q) {
      const uint32x4_t key = load_keys<KIND>(data, i + 4 * q);
      if constexpr (!unsigned_keys(KIND)) nonfinite = vsubq_u32(nonfinite, vcgeq_u32(key, inf));
      vst1q_u32(digits + 4 * q, vshlq_u32(key, right));
    }
    count_digits(digits, 16, local);
  }
  local.nonfinite += vaddvq_u32(nonfinite);
  count_tail<KIND>(data, i, n, iv, local);
}
}  // namespace isa_neon
#endif  // GMT_SIMD_NEON

// Calls fn(std::integral_constant<Keys32, K>) for the runtime kind K (never kNone).
template <class Fn>
void with_kind(Keys32 kind, Fn&& fn) {
  switch (kind) {
#define GMT_KIND(K) \
  case Keys32::K: return fn(std::integral_constant<Keys32, Keys32::K>{});
    GMT_KIND(kFloat) GMT_KIND(kSameWidth16) GMT_KIND(kBFloat16InF32) GMT_KIND(kHalfInF32)
    GMT_KIND(kOverWeightFloat) GMT_KIND(kOverWeightBFloat16) GMT_KIND(kOverWeightHalf) GMT_KIND(kRandom)
#undef GMT_KIND
    case Keys32::kNone: break;
  }
  TORCH_CHECK(false, "unreachable: no 32-bit keys for this dtype/format/criterion");
}

// One span [0, n) of 32-bit keys at `level` (never kDefault: the portable code is count_piece's).
void count_span_vector(cpu::Level level, Keys32 kind, const KeySrc& src, int64_t n, const Interval& iv,
                       LocalCounts& local) {
#define GMT_LEVEL(NS)                                                           \
  return with_kind(kind, [&](auto k) {                                          \
    constexpr Keys32 K = decltype(k)::value;                                    \
    if (iv.whole) return NS::count_whole<K>(src, n, iv, local);                 \
    NS::count_interval<K>(src, n, iv, local);                                   \
  });
  switch (level) {
#ifdef GMT_SIMD_X86
    case cpu::Level::kAvx512: GMT_LEVEL(isa_avx512)
    case cpu::Level::kAvx2: GMT_LEVEL(isa_avx2)
#endif
#ifdef GMT_SIMD_NEON
    case cpu::Level::kNeon: GMT_LEVEL(isa_neon)
#endif
    default: break;
  }
#undef GMT_LEVEL
  TORCH_CHECK(false, "unreachable: no ", cpu::level_name(level), " histogram variant for this dtype/format pair");
}

// Calls fn(make) where make(src) is the one-key function (j -> key) of the span `src` starts, for
// (tensor dtype, key format, criterion), in the portable code.
template <class Fn>
void with_key_function(at::ScalarType dtype, const std::string& format, Criterion criterion, Fn&& fn) {
  using at::ScalarType;
  const Keys32 kind = keys32_kind(dtype, format, criterion);
  if (kind != Keys32::kNone) {
    return with_kind(kind, [&](auto k) { fn([](const KeySrc& s) { return keys_of<decltype(k)::value>(s); }); });
  }
  auto grad = [&](auto bits_tag, auto key) {
    using Bits = decltype(bits_tag);
    using Key = decltype(key);
    fn([](const KeySrc& s) { return GradKeys<Bits, Key>{reinterpret_cast<const Bits*>(s.g), {}}; });
  };
  if (format == "f64" && criterion == Criterion::kGrad) {
    if (dtype == ScalarType::Double) return grad(uint64_t{}, KeySameWidth64{});
    if (dtype == ScalarType::Float) return grad(uint32_t{}, KeyFloatInF64{});
    if (dtype == ScalarType::Half) return grad(uint16_t{}, KeyHalfInF64{});
    if (dtype == ScalarType::BFloat16) return grad(uint16_t{}, KeyBFloat16InF64{});
  } else if (format == "f64" && criterion == Criterion::kGradOverWeight) {
    if (dtype == ScalarType::Double) return fn([](const KeySrc& s) { return OverWeightKeys64<double>{s}; });
    if (dtype == ScalarType::Float) return fn([](const KeySrc& s) { return OverWeightKeys64<float>{s}; });
    if (dtype == ScalarType::Half) return fn([](const KeySrc& s) { return OverWeightKeys64<simd::F16>{s}; });
    if (dtype == ScalarType::BFloat16) return fn([](const KeySrc& s) { return OverWeightKeys64<simd::BF16>{s}; });
  }
  TORCH_CHECK(false, "unreachable: dtype/format/criterion were validated");
}

// Calls span(a, b) for the parts [a, b) of entries [first, last) of one tensor (the tensor_index-th
// of the call) that lie in its sampled blocks. Blocks are taken 64 at a time: their hashes make a
// 64-bit mask, and the picks of the group two ahead are prefetched from each of `bases` that is
// not null (picked blocks are far apart: reading them would otherwise wait on memory latency block
// after block).
template <class SpanFn>
void for_each_sampled_span(std::array<const char*, 2> bases, int64_t elem_size, int64_t first, int64_t last,
                           int64_t sample_log2, uint64_t tensor_index, SpanFn&& span) {
  constexpr int64_t kBlock = radix::kSampleBlock, kGroup = 64;
  const int64_t first_block = first / kBlock, end_block = (last + kBlock - 1) / kBlock;
  auto picks = [&](int64_t group_start) -> uint64_t {  // a group never straddles the 2^31 wrap of j
    const uint32_t h0 = radix::BlockHash(uint64_t(group_start), tensor_index).h;
    uint64_t bits = 0;
    for (int j = 0; j < kGroup; ++j) {
      bits |= uint64_t(((h0 + uint32_t(j) * radix::BlockHash::kStep) >> (32 - sample_log2)) == 0) << j;
    }
    if (group_start < first_block) bits &= ~uint64_t(0) << (first_block - group_start);
    if (end_block - group_start < kGroup) bits &= (uint64_t(1) << std::max<int64_t>(end_block - group_start, 0)) - 1;
    return bits;
  };
  auto prefetch = [&](int64_t group_start, uint64_t bits) {
    for (; bits; bits &= bits - 1) {
      for (const char* base : bases) {
        if (base == nullptr) continue;
        const char* p = base + (group_start + __builtin_ctzll(bits)) * kBlock * elem_size;
        for (int64_t line = 0; line < kBlock * elem_size; line += 64) __builtin_prefetch(p + line);
      }
    }
  };
  const int64_t first_group = first_block & ~(kGroup - 1);
  uint64_t now = picks(first_group), next = picks(first_group + kGroup);
  prefetch(first_group, now);
  prefetch(first_group + kGroup, next);
  for (int64_t group = first_group; group < end_block; group += kGroup) {
    const uint64_t ahead = picks(group + 2 * kGroup);  // each group's picks are computed once
    prefetch(group + 2 * kGroup, ahead);
    for (uint64_t bits = now; bits; bits &= bits - 1) {
      const int64_t block = group + __builtin_ctzll(bits);
      span(std::max(first, block * kBlock), std::min(last, (block + 1) * kBlock));
    }
    now = next;
    next = ahead;
  }
}

// The levels one call's passes run at, read once per call (cpu::kernel_level).
struct PassLevels {
  cpu::Level whole, interval, sample, f64, over_weight, random;
};

// One tensor of a call: its scoring inputs from entry 0 (KeySrc with t and low unset) and, for the
// random score, its key and the index of its entry 0 in the whole parameter.
struct TensorKeys {
  KeySrc src;
  at::ScalarType dtype;
  uint32_t random_key = 0;
  uint64_t entry0 = 0;
};

// Entries [first, last) of one tensor, or only those of its sampled blocks when sample_log2 > 0.
void count_piece(const PassLevels& levels, const TensorKeys& tk, const std::string& format, Criterion criterion,
                 int64_t first, int64_t last, const Interval& iv, int64_t sample_log2, uint64_t tensor_index,
                 LocalCounts& local) {
  const Keys32 kind = keys32_kind(tk.dtype, format, criterion);
  const cpu::Level level = kind == Keys32::kNone                     ? levels.f64
                           : criterion == Criterion::kRandom         ? levels.random
                           : criterion == Criterion::kGradOverWeight ? levels.over_weight
                           : sample_log2 > 0                         ? levels.sample
                           : iv.whole                                ? levels.whole
                                                                     : levels.interval;
  const bool random = criterion == Criterion::kRandom;
  // The random score reads no memory: nothing to prefetch.
  const std::array<const char*, 2> bases{random ? nullptr : tk.src.g, random ? nullptr : tk.src.w};
  // Calls count(src, n) for the span [a, b), cut where the random score's entry crosses a multiple
  // of 2**32 (t changes there).
  auto spans = [&](int64_t a, int64_t b, auto&& count) {
    while (a < b) {
      KeySrc s = tk.src.at(a);
      int64_t stop = b;
      if (random) {
        const uint64_t entry = tk.entry0 + uint64_t(a);
        s.t = simd::random_high(tk.random_key, entry);
        s.low = uint32_t(entry);
        stop = std::min<int64_t>(b, a + int64_t((uint64_t(1) << 32) - s.low));
      }
      count(s, stop - a);
      a = stop;
    }
  };
  auto run = [&](auto&& count) {
    auto one = [&](int64_t a, int64_t b) { spans(a, b, count); };
    if (sample_log2 == 0) return one(first, last);
    for_each_sampled_span(bases, tk.src.elem, first, last, sample_log2, tensor_index, one);
  };
  if (level != cpu::Level::kDefault) {
    return run([&](const KeySrc& s, int64_t n) { count_span_vector(level, kind, s, n, iv, local); });
  }
  with_key_function(tk.dtype, format, criterion, [&](auto make) {
    run([&](const KeySrc& s, int64_t n) {
      const auto key_at = make(s);
      if (iv.whole) {
        count_whole(n, key_at, iv, local);
      } else {
        count_interval(n, key_at, iv, local);
      }
    });
  });
}

// Whether key format `format` scores tensors of `dtype` exactly under `criterion` (radix.py picks
// the format: by dtype for grad, f32 or f64 for grad_over_weight, u32 for random).
bool format_holds(const std::string& format, at::ScalarType dtype, Criterion criterion) {
  using at::ScalarType;
  const bool floating = dtype == ScalarType::Float || dtype == ScalarType::Double || dtype == ScalarType::Half ||
                        dtype == ScalarType::BFloat16;
  if (criterion == Criterion::kRandom) return format == "u32";
  if (format == "u32") return false;
  if (format == "f64") return floating;
  if (format == "f32") return dtype == ScalarType::Float || dtype == ScalarType::Half || dtype == ScalarType::BFloat16;
  if (criterion == Criterion::kGradOverWeight) return false;  // scored in float32 or float64
  if (format == "f16") return dtype == ScalarType::Half;
  if (format == "bf16") return dtype == ScalarType::BFloat16;
  return false;
}

const char* criterion_name(Criterion c) {
  switch (c) {
    case Criterion::kGrad: return "grad";
    case Criterion::kGradOverWeight: return "grad_over_weight";
    case Criterion::kRandom: return "random";
  }
  return "?";
}

}  // namespace

void radix_histogram_cpu(at::TensorList grads, at::IntArrayRef scope_of, const at::Tensor& state,
                         const at::Tensor& hist, const std::string& format, const Scoring& scoring) {
  using namespace radix;
  const KeyFormat* fmt = find_format(format);
  TORCH_CHECK(fmt != nullptr, "gmt_kernels::radix_histogram: unknown key_format '", format,
              "'; expected one of f16, bf16, f32, f64, u32 (radix.KEY_FORMATS).");
  TORCH_CHECK(state.device().is_cpu() && state.scalar_type() == at::kLong && state.dim() == 2 &&
                  state.size(1) == kStateColumns && state.is_contiguous(),
              "gmt_kernels::radix_histogram: state must be a contiguous int64 CPU tensor [scopes, ", int64_t(kStateColumns),
              "] (radix.initial_state); got ", state.scalar_type(), " ", state.sizes(), " on ", state.device(), ".");
  const int64_t scopes = state.size(0);
  TORCH_CHECK(hist.device().is_cpu() && hist.scalar_type() == at::kLong && hist.is_contiguous() &&
                  hist.dim() == 2 && hist.size(0) == scopes && hist.size(1) == kHistColumns,
              "gmt_kernels::radix_histogram: hist must be a contiguous int64 CPU tensor [", scopes, ", ", kHistColumns,
              "] (scopes x radix.HIST_COLUMNS); got ", hist.scalar_type(), " ", hist.sizes(), " on ", hist.device(), ".");
  TORCH_CHECK(int64_t(scope_of.size()) == int64_t(grads.size()),
              "gmt_kernels::radix_histogram: scope_of has ", scope_of.size(), " entries for ", grads.size(),
              " gradients; it needs one scope row per gradient.");
  const Criterion criterion = scoring.criterion;
  scoring.check("radix_histogram", grads.size());
  const bool over_weight = criterion == Criterion::kGradOverWeight;
  TORCH_CHECK(!over_weight || scoring.weights.size() == grads.size(), "gmt_kernels::radix_histogram: criterion ",
              "'grad_over_weight' needs one weight (theta) per gradient; got ", scoring.weights.size(), " for ",
              grads.size(), " gradients.");

  const int64_t* st = state.data_ptr<int64_t>();
  std::vector<Interval> intervals(scopes);
  for (int64_t s = 0; s < scopes; ++s) {
    const int64_t* row = st + s * kStateColumns;
    if (row[DONE] != 0) continue;
    TORCH_CHECK(row[LO] >= 0 && row[LO] <= row[LAST] && uint64_t(row[LAST]) <= fmt->key_max() && row[SHIFT] >= 0 &&
                    row[SHIFT] < 64 && ((uint64_t(row[LAST]) - uint64_t(row[LO])) >> row[SHIFT]) < uint64_t(kBins) &&
                    row[SAMPLE] >= 0 && row[SAMPLE] <= 31,
                "gmt_kernels::radix_histogram: state row ", s, " (LO=", row[LO], ", LAST=", row[LAST], ", SHIFT=",
                row[SHIFT], ", SAMPLE=", row[SAMPLE], ") is not an interval of ", fmt->key_bits,
                "-bit keys in at most ", kBins, " bins; build states with radix.initial_state and radix_select.");
    const bool whole = row[LO] == 0 && uint64_t(row[LAST]) == fmt->key_max();
    intervals[s] = Interval{uint64_t(row[LO]), uint64_t(row[LAST]), fmt->inf_key(), int(row[SHIFT]), whole};
  }

  std::vector<at::Tensor> work;  // tensors of scopes still selecting, as dense memory blocks
  std::vector<TensorKeys> keys;
  std::vector<int64_t> sizes, rows, index_in_call;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    const int64_t s = scope_of[i];
    TORCH_CHECK(s >= 0 && s < scopes, "gmt_kernels::radix_histogram: scope_of[", i, "] = ", s,
                " is not a row of state, which has ", scopes, " scopes.");
    TORCH_CHECK(g.device().is_cpu(), "gmt_kernels::radix_histogram (C++ CPU backend): gradient ", i, " is on ",
                g.device(), "; this backend serves CPU tensors only. Use backend='auto' to pick one per device.");
    TORCH_CHECK(format_holds(format, g.scalar_type(), criterion), "gmt_kernels::radix_histogram: a ", g.scalar_type(),
                " gradient (", i, ") cannot be scored by criterion '", criterion_name(criterion), "' in key format ",
                format, "; radix.py picks the format (by dtype for 'grad', f32 or f64 for 'grad_over_weight', u32 for ",
                "'random').");
    if (over_weight) {
      const at::Tensor& w = scoring.weights[i];
      TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == g.scalar_type() && w.sizes() == g.sizes(),
                  "gmt_kernels::radix_histogram: weights[", i, "] (theta) must be a CPU tensor of gradient ", i,
                  "'s dtype and shape (", g.scalar_type(), " ", g.sizes(), "); got ", w.scalar_type(), " ", w.sizes(),
                  " on ", w.device(), ".");
    }
    if (st[s * kStateColumns + DONE] != 0 || g.numel() == 0) continue;  // a finished scope reads nothing
    // Memory order (backends.memory_order_view): any dense layout is read as it lies; only
    // overlapping or gappy views (rare for gradients) pay for a copy. g and theta are read in one
    // layout, else both as contiguous copies.
    at::Tensor gw = g, ww;
    if (over_weight) {
      ww = scoring.weights[i];
      const bool shared = g.is_non_overlapping_and_dense() && ww.is_non_overlapping_and_dense() &&
                          g.strides() == ww.strides();
      if (!shared) {
        gw = g.contiguous();
        ww = ww.contiguous();
      }
    } else if (!g.is_non_overlapping_and_dense()) {
      gw = g.contiguous();
    }
    work.push_back(gw);
    if (ww.defined()) work.push_back(ww);
    TensorKeys tk;
    tk.dtype = g.scalar_type();
    tk.src.g = static_cast<const char*>(gw.data_ptr());
    tk.src.w = ww.defined() ? static_cast<const char*>(ww.data_ptr()) : nullptr;
    tk.src.elem = g.element_size();
    tk.src.eps32 = static_cast<float>(scoring.score_eps);
    tk.src.eps64 = scoring.score_eps;
    if (criterion == Criterion::kRandom) {
      tk.random_key = scoring.random_key(i);
      tk.entry0 = scoring.entry_offset(i);
    }
    keys.push_back(tk);
    sizes.push_back(g.numel());
    rows.push_back(s);
    index_in_call.push_back(int64_t(i));
  }
  if (keys.empty()) return;
  FlatIndex flat(sizes);
  int64_t* out = hist.data_ptr<int64_t>();
  using cpu::Kernel;
  const PassLevels levels{cpu::kernel_level(Kernel::kHistogramWhole), cpu::kernel_level(Kernel::kHistogramInterval),
                          cpu::kernel_level(Kernel::kHistogramSample), cpu::kernel_level(Kernel::kHistogramF64),
                          cpu::kernel_level(Kernel::kHistogramGradOverWeight),
                          cpu::kernel_level(Kernel::kHistogramRandom)};

  at::parallel_for(0, flat.total(), kGrain, [&](int64_t begin, int64_t end) {
    LocalCounts local;
    int64_t pending_row = -1;
    int64_t pending_entries = 0;
    flat.for_each_piece(begin, end, [&](size_t item, int64_t first, int64_t last) {
      const int64_t row = rows[item];
      // A 32-bit private counter must not wrap: flush before 2^32 entries could reach one bin.
      if (pending_row != row || pending_entries + (last - first) >= (int64_t(1) << 32)) {
        if (pending_row >= 0) local.flush_into(out + pending_row * kHistColumns);
        pending_row = row;
        pending_entries = 0;
      }
      const int64_t sample_log2 = st[row * kStateColumns + SAMPLE];
      constexpr int64_t kPiece = int64_t(1) << 30;
      for (int64_t lo = first; lo < last; lo += kPiece) {
        const int64_t hi = std::min(last, lo + kPiece);
        if (pending_entries + (hi - lo) >= (int64_t(1) << 32)) {
          local.flush_into(out + row * kHistColumns);
          pending_entries = 0;
        }
        count_piece(levels, keys[item], format, criterion, lo, hi, intervals[row], sample_log2,
                    uint64_t(index_in_call[item]), local);
        pending_entries += hi - lo;
      }
    });
    if (pending_row >= 0) local.flush_into(out + pending_row * kHistColumns);
  });
}

}  // namespace gmt
