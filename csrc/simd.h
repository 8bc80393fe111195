// Explicit SIMD for the CPU kernels: one small struct of lane operations per ISA (AVX-512, AVX2+FMA,
// NEON) and a one-lane scalar struct with the same interface, which is the portable "default"
// level and the tail of every vector loop. Kernels are templates over these structs; each ISA's
// copy is compiled inside GMT_BEGIN_<ISA> / GMT_END (a target region, so one binary built for the
// baseline ISA holds every variant), and cpu_capability.h picks one at run time.
//
// Every operation is an IEEE operation on its own (no FMA: the update must round like torch's
// single-tensor AdamW, and setup.py passes -ffp-contract=off so the compiler does not fuse mul+add).
#pragma once

#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define GMT_SIMD_X86 1
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define GMT_SIMD_NEON 1
#include <arm_neon.h>
#endif

#define GMT_INLINE inline __attribute__((always_inline))

// Target regions: every function defined between BEGIN and END is compiled for that ISA.
#if defined(__clang__)
#define GMT_BEGIN_AVX2 \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c,popcnt\"))), apply_to = function)")
#define GMT_BEGIN_AVX512                                                                                \
  _Pragma(                                                                                            \
      "clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,popcnt\"))), " \
      "apply_to = function)")
#define GMT_END _Pragma("clang attribute pop")
#else
#define GMT_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c,popcnt\")")
#define GMT_BEGIN_AVX512 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,popcnt\")")
#define GMT_END _Pragma("GCC pop_options")
#endif

namespace gmt {
namespace simd {

// Storage types of 16-bit floats as the kernels see them (c10::Half / c10::BFloat16 have this layout).
struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

// float -> bfloat16 rounding to nearest even, NaN -> 0x7FC0: c10::BFloat16's rounding.
inline uint16_t bf16_round(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (x != x) return 0x7FC0;
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_widen(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
// IEEE half <-> float: exact widening, round-to-nearest-even narrowing (c10::Half's conversions).
inline float f16_widen(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
inline uint16_t f16_round(float x) { return c10::detail::fp16_ieee_from_fp32_value(x); }

// ---- one lane: the portable level, and every vector loop's tail ----
template <class T_>
struct Scalar {
  using T = T_;
  using R = T;
  using M = bool;
  static constexpr int W = 1;
  static GMT_INLINE R set1(T x) { return x; }
  static GMT_INLINE R zero() { return T(0); }
  static GMT_INLINE R load(const T* p) { return *p; }
  static GMT_INLINE void store(T* p, R x) { *p = x; }
  static GMT_INLINE R load(const BF16* p) { return bf16_widen(p->bits); }
  static GMT_INLINE void store(BF16* p, R x) { p->bits = bf16_round(x); }
  static GMT_INLINE R load(const F16* p) { return f16_widen(p->bits); }
  static GMT_INLINE void store(F16* p, R x) { p->bits = f16_round(x); }
  static GMT_INLINE R add(R a, R b) { return a + b; }
  static GMT_INLINE R sub(R a, R b) { return a - b; }
  static GMT_INLINE R mul(R a, R b) { return a * b; }
  static GMT_INLINE R div(R a, R b) { return a / b; }
  static GMT_INLINE R sqrt(R a) { return std::sqrt(a); }
  static GMT_INLINE R abs(R a) { return std::abs(a); }
  static GMT_INLINE M ge(R a, R b) { return a >= b; }
  static GMT_INLINE M gt(R a, R b) { return a > b; }
  static GMT_INLINE M isnan(R a) { return a != a; }
  static GMT_INLINE M or_(M a, M b) { return a | b; }
  static GMT_INLINE R select(M m, R a, R b) { return m ? a : b; }
  static GMT_INLINE int count(M m) { return int(m); }
  // Keep masks as bits in entry order (bit j: entry j of the W), for stored masks and word sources.
  template <class P>
  static GMT_INLINE uint32_t to_bits(M m) { return uint32_t(m); }
  template <class P>
  static GMT_INLINE M from_bits(uint32_t bits) { return (bits & 1u) != 0; }
};

// The random score of gmt_kernels/scores.py (its docstring is the spec): 32-bit words, products
// modulo 2**32, logical shifts. t = mix(key ^ (entry >> 32)) once per 2**32 entries, then
// u = mix(mix(t ^ (entry mod 2**32)) + t) per entry.
constexpr uint32_t kMixMul1 = 0x7FEB352Du, kMixMul2 = 0x846CA68Bu;
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMixMul1;
  x ^= x >> 15;
  x *= kMixMul2;
  return x ^ (x >> 16);
}
inline uint32_t random_high(uint32_t key, uint64_t entry) { return mix32(key ^ uint32_t(entry >> 32)); }
inline uint32_t random_u(uint32_t t, uint32_t low) { return mix32(mix32(t ^ low) + t); }

// 32-bit unsigned lanes for the random score, one lane: the portable level and the tails.
struct U32 {
  using R = uint32_t;
  static constexpr int W = 1;
  static GMT_INLINE R set1(uint32_t x) { return x; }
  static GMT_INLINE R iota() { return 0u; }  // lane j holds j
  static GMT_INLINE R from(uint32_t start) { return start; }  // lane j holds start + j (mod 2**32)
  static GMT_INLINE R hash(R low, R t) { return random_u(t, low); }
  static GMT_INLINE uint32_t ge_bits(R u, R bound) { return uint32_t(u >= bound); }  // unsigned
};

}  // namespace simd
}  // namespace gmt

#ifdef GMT_SIMD_X86
namespace gmt {
namespace simd {
namespace avx2 {
GMT_BEGIN_AVX2
struct F32 {
  using T = float;
  using R = __m256;
  using M = __m256;
  static constexpr int W = 8;
  static GMT_INLINE R set1(float x) { return _mm256_set1_ps(x); }
  static GMT_INLINE R zero() { return _mm256_setzero_ps(); }
  static GMT_INLINE R load(const float* p) { return _mm256_loadu_ps(p); }
  static GMT_INLINE void store(float* p, R x) { _mm256_storeu_ps(p, x); }
  static GMT_INLINE R load(const BF16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static GMT_INLINE void store(BF16* p, R x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(isnan(x)));
    // packus works per 128-bit half: [r0..3 r0..3 | r4..7 r4..7]; gather the two halves' low quads.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static GMT_INLINE R load(const F16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static GMT_INLINE void store(F16* p, R x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
  static GMT_INLINE R add(R a, R b) { return _mm256_add_ps(a, b); }
  static GMT_INLINE R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static GMT_INLINE R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static GMT_INLINE R div(R a, R b) { return _mm256_div_ps(a, b); }
  static GMT_INLINE R sqrt(R a) { return _mm256_sqrt_ps(a); }
  static GMT_INLINE R abs(R a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
  static GMT_INLINE M ge(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static GMT_INLINE M gt(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static GMT_INLINE M isnan(R a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
  static GMT_INLINE M or_(M a, M b) { return _mm256_or_ps(a, b); }
  static GMT_INLINE R select(M m, R a, R b) { return _mm256_blendv_ps(b, a, m); }
  static GMT_INLINE int count(M m) { return _mm_popcnt_u32(unsigned(_mm256_movemask_ps(m))); }
  template <class P>
  static GMT_INLINE uint32_t to_bits(M m) { return uint32_t(_mm256_movemask_ps(m)); }
  static GMT_INLINE M lanes_of(uint32_t bits) {  // bit j of `bits` -> lane j all ones
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int32_t(bits)), lane_bit), lane_bit));
  }
  template <class P>
  static GMT_INLINE M from_bits(uint32_t bits) { return lanes_of(bits); }
};
// Two registers of 8 floats per step: the 16-bit formats then convert with one 256-bit load or
// store and no lane-crossing shuffle, and the loop has two independent chains per iteration.
// bfloat16 entries are held in the order unpacklo/unpackhi give (0-3, 8-11 | 4-7, 12-15): every
// operand is loaded and stored the same way, and the arithmetic is lane by lane, so the order
// never shows; float and half entries are held in their natural order.
struct F32x2 {
  using T = float;
  struct R {
    __m256 a, b;
  };
  using M = R;
  static constexpr int W = 16;
  static GMT_INLINE R set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
  static GMT_INLINE R zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static GMT_INLINE R load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static GMT_INLINE void store(float* p, R x) {
    _mm256_storeu_ps(p, x.a);
    _mm256_storeu_ps(p + 8, x.b);
  }
  static GMT_INLINE R load(const BF16* p) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i zero = _mm256_setzero_si256();  // a bfloat16 is the top half of its float
    return {_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw)), _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw))};
  }
  static GMT_INLINE __m256i bf16_bits(__m256 x) {  // c10's rounding, the result in the low 16 bits
    const __m256i u = _mm256_castps_si256(x);
    const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  }
  static GMT_INLINE void store(BF16* p, R x) {  // packus per 128-bit half undoes the unpack order
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_packus_epi32(bf16_bits(x.a), bf16_bits(x.b)));
  }
  static GMT_INLINE R load(const F16* p) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm256_cvtph_ps(_mm256_castsi256_si128(raw)), _mm256_cvtph_ps(_mm256_extracti128_si256(raw, 1))};
  }
  static GMT_INLINE void store(F16* p, R x) {
    const __m256i packed = _mm256_set_m128i(_mm256_cvtps_ph(x.b, _MM_FROUND_TO_NEAREST_INT), _mm256_cvtps_ph(x.a, _MM_FROUND_TO_NEAREST_INT));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
  }
#define GMT_PAIR(NAME, INTRINSIC) \
  static GMT_INLINE R NAME(R x, R y) { return {INTRINSIC(x.a, y.a), INTRINSIC(x.b, y.b)}; }
  GMT_PAIR(add, _mm256_add_ps)
  GMT_PAIR(sub, _mm256_sub_ps)
  GMT_PAIR(mul, _mm256_mul_ps)
  GMT_PAIR(div, _mm256_div_ps)
  GMT_PAIR(or_, _mm256_or_ps)
  static GMT_INLINE R ge(R x, R y) { return {_mm256_cmp_ps(x.a, y.a, _CMP_GE_OQ), _mm256_cmp_ps(x.b, y.b, _CMP_GE_OQ)}; }
  static GMT_INLINE R gt(R x, R y) { return {_mm256_cmp_ps(x.a, y.a, _CMP_GT_OQ), _mm256_cmp_ps(x.b, y.b, _CMP_GT_OQ)}; }
#undef GMT_PAIR
  static GMT_INLINE R sqrt(R x) { return {_mm256_sqrt_ps(x.a), _mm256_sqrt_ps(x.b)}; }
  static GMT_INLINE R abs(R x) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    return {_mm256_and_ps(x.a, magnitude), _mm256_and_ps(x.b, magnitude)};
  }
  static GMT_INLINE M isnan(R x) { return {_mm256_cmp_ps(x.a, x.a, _CMP_UNORD_Q), _mm256_cmp_ps(x.b, x.b, _CMP_UNORD_Q)}; }
  static GMT_INLINE R select(M m, R x, R y) { return {_mm256_blendv_ps(y.a, x.a, m.a), _mm256_blendv_ps(y.b, x.b, m.b)}; }
  static GMT_INLINE int count(M m) {
    return _mm_popcnt_u32(unsigned(_mm256_movemask_ps(m.a)) | unsigned(_mm256_movemask_ps(m.b)) << 8);
  }
  // Entry-ordered bits: bfloat16 lanes hold entries 0-3, 8-11 | 4-7, 12-15 (see above).
  template <class P>
  static GMT_INLINE uint32_t to_bits(M m) {
    const uint32_t a = uint32_t(_mm256_movemask_ps(m.a)), b = uint32_t(_mm256_movemask_ps(m.b));
    if constexpr (std::is_same_v<P, BF16>) {
      return (a & 0xFu) | (b & 0xFu) << 4 | (a >> 4) << 8 | (b >> 4) << 12;
    } else {
      return a | b << 8;
    }
  }
  template <class P>
  static GMT_INLINE M from_bits(uint32_t bits) {
    if constexpr (std::is_same_v<P, BF16>) {
      return {F32::lanes_of((bits & 0xFu) | ((bits >> 8) & 0xFu) << 4),
              F32::lanes_of(((bits >> 4) & 0xFu) | ((bits >> 12) & 0xFu) << 4)};
    } else {
      return {F32::lanes_of(bits & 0xFFu), F32::lanes_of(bits >> 8)};
    }
  }
};
struct F64 {
  using T = double;
  using R = __m256d;
  using M = __m256d;
  static constexpr int W = 4;
  static GMT_INLINE R set1(double x) { return _mm256_set1_pd(x); }
  static GMT_INLINE R zero() { return _mm256_setzero_pd(); }
  static GMT_INLINE R load(const double* p) { return _mm256_loadu_pd(p); }
  static GMT_INLINE void store(double* p, R x) { _mm256_storeu_pd(p, x); }
  static GMT_INLINE R add(R a, R b) { return _mm256_add_pd(a, b); }
  static GMT_INLINE R sub(R a, R b) { return _mm256_sub_pd(a, b); }
  static GMT_INLINE R mul(R a, R b) { return _mm256_mul_pd(a, b); }
  static GMT_INLINE R div(R a, R b) { return _mm256_div_pd(a, b); }
  static GMT_INLINE R sqrt(R a) { return _mm256_sqrt_pd(a); }
  static GMT_INLINE R abs(R a) { return _mm256_and_pd(a, _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffll))); }
  static GMT_INLINE M ge(R a, R b) { return _mm256_cmp_pd(a, b, _CMP_GE_OQ); }
  static GMT_INLINE M gt(R a, R b) { return _mm256_cmp_pd(a, b, _CMP_GT_OQ); }
  static GMT_INLINE M isnan(R a) { return _mm256_cmp_pd(a, a, _CMP_UNORD_Q); }
  static GMT_INLINE M or_(M a, M b) { return _mm256_or_pd(a, b); }
  static GMT_INLINE R select(M m, R a, R b) { return _mm256_blendv_pd(b, a, m); }
  static GMT_INLINE int count(M m) { return _mm_popcnt_u32(unsigned(_mm256_movemask_pd(m))); }
  template <class P>
  static GMT_INLINE uint32_t to_bits(M m) { return uint32_t(_mm256_movemask_pd(m)); }
  template <class P>
  static GMT_INLINE M from_bits(uint32_t bits) {
    const __m256i lane_bit = _mm256_setr_epi64x(1, 2, 4, 8);
    return _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(bits), lane_bit), lane_bit));
  }
};

// Random-score lanes (see simd::U32): the 32-bit multiplies keep the low half, as the spec's.
struct U32 {
  using R = __m256i;
  static constexpr int W = 8;
  static GMT_INLINE R set1(uint32_t x) { return _mm256_set1_epi32(int32_t(x)); }
  static GMT_INLINE R iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static GMT_INLINE R from(uint32_t start) { return _mm256_add_epi32(set1(start), iota()); }
  static GMT_INLINE R mix(R x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int32_t(kMixMul1)));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int32_t(kMixMul2)));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  }
  static GMT_INLINE R hash(R low, R t) { return mix(_mm256_add_epi32(mix(_mm256_xor_si256(low, t)), t)); }
  static GMT_INLINE uint32_t ge_bits(R u, R bound) {  // unsigned u >= bound: max(u, bound) == u
    return uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_max_epu32(u, bound), u))));
  }
};
GMT_END
}  // namespace avx2

namespace avx512 {
GMT_BEGIN_AVX512
struct F32 {
  using T = float;
  using R = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  static GMT_INLINE R set1(float x) { return _mm512_set1_ps(x); }
  static GMT_INLINE R zero() { return _mm512_setzero_ps(); }
  static GMT_INLINE R load(const float* p) { return _mm512_loadu_ps(p); }
  static GMT_INLINE void store(float* p, R x) { _mm512_storeu_ps(p, x); }
  static GMT_INLINE R load(const BF16* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static GMT_INLINE void store(BF16* p, R x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    r = _mm512_mask_blend_epi32(isnan(x), r, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static GMT_INLINE R load(const F16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static GMT_INLINE void store(F16* p, R x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static GMT_INLINE R add(R a, R b) { return _mm512_add_ps(a, b); }
  static GMT_INLINE R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static GMT_INLINE R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static GMT_INLINE R div(R a, R b) { return _mm512_div_ps(a, b); }
  static GMT_INLINE R sqrt(R a) { return _mm512_sqrt_ps(a); }
  static GMT_INLINE R abs(R a) { return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7fffffff))); }
  static GMT_INLINE M ge(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static GMT_INLINE M gt(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static GMT_INLINE M isnan(R a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  static GMT_INLINE M or_(M a, M b) { return M(a | b); }
  static GMT_INLINE R select(M m, R a, R b) { return _mm512_mask_blend_ps(m, b, a); }
  static GMT_INLINE int count(M m) { return _mm_popcnt_u32(unsigned(m)); }
  template <class P>
  static GMT_INLINE uint32_t to_bits(M m) { return uint32_t(m); }
  template <class P>
  static GMT_INLINE M from_bits(uint32_t bits) { return M(bits); }
};
struct F64 {
  using T = double;
  using R = __m512d;
  using M = __mmask8;
  static constexpr int W = 8;
  static GMT_INLINE R set1(double x) { return _mm512_set1_pd(x); }
  static GMT_INLINE R zero() { return _mm512_setzero_pd(); }
  static GMT_INLINE R load(const double* p) { return _mm512_loadu_pd(p); }
  static GMT_INLINE void store(double* p, R x) { _mm512_storeu_pd(p, x); }
  static GMT_INLINE R add(R a, R b) { return _mm512_add_pd(a, b); }
  static GMT_INLINE R sub(R a, R b) { return _mm512_sub_pd(a, b); }
  static GMT_INLINE R mul(R a, R b) { return _mm512_mul_pd(a, b); }
  static GMT_INLINE R div(R a, R b) { return _mm512_div_pd(a, b); }
  static GMT_INLINE R sqrt(R a) { return _mm512_sqrt_pd(a); }
  static GMT_INLINE R abs(R a) { return _mm512_castsi512_pd(_mm512_and_si512(_mm512_castpd_si512(a), _mm512_set1_epi64(0x7fffffffffffffffll))); }
  static GMT_INLINE M ge(R a, R b) { return _mm512_cmp_pd_mask(a, b, _CMP_GE_OQ); }
  static GMT_INLINE M gt(R a, R b) { return _mm512_cmp_pd_mask(a, b, _CMP_GT_OQ); }
  static GMT_INLINE M isnan(R a) { return _mm512_cmp_pd_mask(a, a, _CMP_UNORD_Q); }
  static GMT_INLINE M or_(M a, M b) { return M(a | b); }
  static GMT_INLINE R select(M m, R a, R b) { return _mm512_mask_blend_pd(m, b, a); }
  static GMT_INLINE int count(M m) { return _mm_popcnt_u32(unsigned(m)); }
  template <class P>
  static GMT_INLINE uint32_t to_bits(M m) { return uint32_t(m); }
  template <class P>
  static GMT_INLINE M from_bits(uint32_t bits) { return M(bits); }
};

struct U32 {
  using R = __m512i;
  static constexpr int W = 16;
  static GMT_INLINE R set1(uint32_t x) { return _mm512_set1_epi32(int32_t(x)); }
  static GMT_INLINE R iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static GMT_INLINE R from(uint32_t start) { return _mm512_add_epi32(set1(start), iota()); }
  static GMT_INLINE R mix(R x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int32_t(kMixMul1)));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int32_t(kMixMul2)));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  }
  static GMT_INLINE R hash(R low, R t) { return mix(_mm512_add_epi32(mix(_mm512_xor_si512(low, t)), t)); }
  static GMT_INLINE uint32_t ge_bits(R u, R bound) { return uint32_t(_mm512_cmpge_epu32_mask(u, bound)); }
};
GMT_END
}  // namespace avx512
}  // namespace simd
}  // namespace gmt
#endif  // GMT_SIMD_X86

#ifdef GMT_SIMD_NEON
namespace gmt {
namespace simd {
namespace neon {
struct F32 {
  using T = float;
  using R = float32x4_t;
  using M = uint32x4_t;
  static constexpr int W = 4;
  static GMT_INLINE R set1(float x) { return vdupq_n_f32(x); }
  static GMT_INLINE R zero() { return vdupq_n_f32(0.0f); }
  static GMT_INLINE R load(const float* p) { return vld1q_f32(p); }
  static GMT_INLINE void store(float* p, R x) { vst1q_f32(p, x); }
  static GMT_INLINE R load(const BF16* p) {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
  }
  static GMT_INLINE void store(BF16* p, R x) {
    const uint32x4_t u = vreinterpretq_u32_f32(x);
    const uint32x4_t bias = vaddq_u32(vdupq_n_u32(0x7FFF), vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1)));
    uint32x4_t r = vshrq_n_u32(vaddq_u32(u, bias), 16);
    r = vbslq_u32(isnan(x), vdupq_n_u32(0x7FC0), r);
    vst1_u16(reinterpret_cast<uint16_t*>(p), vmovn_u32(r));
  }
  static GMT_INLINE R load(const F16* p) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p))));
  }
  static GMT_INLINE void store(F16* p, R x) {
    vst1_u16(reinterpret_cast<uint16_t*>(p), vreinterpret_u16_f16(vcvt_f16_f32(x)));
  }
  static GMT_INLINE R add(R a, R b) { return vaddq_f32(a, b); }
  static GMT_INLINE R sub(R a, R b) { return vsubq_f32(a, b); }
  static GMT_INLINE R mul(R a, R b) { return vmulq_f32(a, b); }
  static GMT_INLINE R div(R a, R b) { return vdivq_f32(a, b); }
  static GMT_INLINE R sqrt(R a) { return vsqrtq_f32(a); }
  static GMT_INLINE R abs(R a) { return vabsq_f32(a); }
  static GMT_INLINE M ge(R a, R b) { return vcgeq_f32(a, b); }
  static GMT_INLINE M gt(R a, R b) { return vcgtq_f32(a, b); }
  static GMT_INLINE M isnan(R a) { return vmvnq_u32(vceqq_f32(a, a)); }
  static GMT_INLINE M or_(M a, M b) { return vorrq_u32(a, b); }
  static GMT_INLINE R select(M m, R a, R b) { return vbslq_f32(m, a, b); }
  static GMT_INLINE int count(M m) { return int(vaddvq_u32(vshrq_n_u32(m, 31))); }
  template <class P>
  static GMT_INLINE uint32_t to_bits(M m) {
    static const uint32_t weights[4] = {1, 2, 4, 8};
    return vaddvq_u32(vandq_u32(m, vld1q_u32(weights)));
  }
  template <class P>
  static GMT_INLINE M from_bits(uint32_t bits) {
    static const uint32_t weights[4] = {1, 2, 4, 8};
    return vtstq_u32(vdupq_n_u32(bits), vld1q_u32(weights));
  }
};
struct F64 {
  using T = double;
  using R = float64x2_t;
  using M = uint64x2_t;
  static constexpr int W = 2;
  static GMT_INLINE R set1(double x) { return vdupq_n_f64(x); }
  static GMT_INLINE R zero() { return vdupq_n_f64(0.0); }
  static GMT_INLINE R load(const double* p) { return vld1q_f64(p); }
  static GMT_INLINE void store(double* p, R x) { vst1q_f64(p, x); }
  static GMT_INLINE R add(R a, R b) { return vaddq_f64(a, b); }
  static GMT_INLINE R sub(R a, R b) { return vsubq_f64(a, b); }
  static GMT_INLINE R mul(R a, R b) { return vmulq_f64(a, b); }
  static GMT_INLINE R div(R a, R b) { return vdivq_f64(a, b); }
  static GMT_INLINE R sqrt(R a) { return vsqrtq_f64(a); }
  static GMT_INLINE R abs(R a) { return vabsq_f64(a); }
  static GMT_INLINE M ge(R a, R b) { return vcgeq_f64(a, b); }
  static GMT_INLINE M gt(R a, R b) { return vcgtq_f64(a, b); }
  static GMT_INLINE M isnan(R a) { return veorq_u64(vceqq_f64(a, a), vdupq_n_u64(~uint64_t(0))); }
  static GMT_INLINE M or_(M a, M b) { return vorrq_u64(a, b); }
  static GMT_INLINE R select(M m, R a, R b) { return vbslq_f64(m, a, b); }
  static GMT_INLINE int count(M m) { return int(vaddvq_u64(vshrq_n_u64(m, 63))); }
  template <class P>
  static GMT_INLINE uint32_t to_bits(M m) {
    static const uint64_t weights[2] = {1, 2};
    return uint32_t(vaddvq_u64(vandq_u64(m, vld1q_u64(weights))));
  }
  template <class P>
  static GMT_INLINE M from_bits(uint32_t bits) {
    static const uint64_t weights[2] = {1, 2};
    return vtstq_u64(vdupq_n_u64(bits), vld1q_u64(weights));
  }
};

struct U32 {
  using R = uint32x4_t;
  static constexpr int W = 4;
  static GMT_INLINE R set1(uint32_t x) { return vdupq_n_u32(x); }
  static GMT_INLINE R iota() {
    static const uint32_t lanes[4] = {0, 1, 2, 3};
    return vld1q_u32(lanes);
  }
  static GMT_INLINE R from(uint32_t start) { return vaddq_u32(set1(start), iota()); }
  static GMT_INLINE R mix(R x) {
    x = veorq_u32(x, vshrq_n_u32(x, 16));
    x = vmulq_u32(x, vdupq_n_u32(kMixMul1));
    x = veorq_u32(x, vshrq_n_u32(x, 15));
    x = vmulq_u32(x, vdupq_n_u32(kMixMul2));
    return veorq_u32(x, vshrq_n_u32(x, 16));
  }
  static GMT_INLINE R hash(R low, R t) { return mix(vaddq_u32(mix(veorq_u32(low, t)), t)); }
  static GMT_INLINE uint32_t ge_bits(R u, R bound) {
    static const uint32_t weights[4] = {1, 2, 4, 8};
    return vaddvq_u32(vandq_u32(vcgeq_u32(u, bound), vld1q_u32(weights)));
  }
};
}  // namespace neon
}  // namespace simd
}  // namespace gmt
#endif  // GMT_SIMD_NEON
