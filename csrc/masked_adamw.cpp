// Backend.masked_adamw for CPU tensors: one pass that reads g, p, m, v (and max_v) once and writes
// p, m, v (and max_v) once, for all tensors of a param group, split over threads as one index space.
//
// The arithmetic follows the reference backend op for op (torch.optim.AdamW's single-tensor
// update, scalars rounded where torch rounds them), so results agree with it to fp32 rounding.
// The loop (masked_adamw_kernel.h) is written once against the lane structs of simd.h and compiled
// for AVX-512, AVX2, NEON and one lane (the portable level); cpu::kernel_level picks one per call.
// No FMA anywhere: every variant rounds like the reference.
//
// Which entries are kept (MaskSource, SEMANTICS.md section 8): the score rule of the criterion,
// computed in the loop exactly as the histogram pass computes it ("grad": |g|; "grad_over_weight":
// |g| / (|theta| + eps) with theta the parameter before this update; "random": the hash of
// scores.py), or the stored 1-bit mask when refresh is false. Stored masks are uint8
// (d0, ceil(inner / 8)), entry (r, c) of the row-major (d0, inner) view at bit c % 8 of byte
// [r, c / 8]; the kernel writes them when refresh is None or true. A thread's range of entries is
// cut into runs that start on a byte boundary of a row: the vector loop stores whole bytes, and
// the at most two partial bytes per row of a range, which a neighbouring range may share, are
// merged atomically.
#include "ops.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "cpu_capability.h"
#include "simd.h"

namespace gmt {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "keep words are stored as little-endian bytes");

// Per-tensor constants of one step, rounded to the compute type C as the reference rounds them.
template <class C>
struct UpdateCoeffs {
  C threshold, decay, lerp_weight, one_minus_lerp_weight, beta2, one_minus_beta2, eps, neg_step_size,
      bias_correction2_sqrt;
  C grad_scale, sign;
  bool small_lerp_weight;  // torch's lerp picks its formula by |weight| < 0.5
};

// One run of one tensor: entries [0, n) at these untyped pointers, the first one being entry
// `entry` of the whole parameter (the random score's index). read_bits / write_bits: the stored
// mask's bytes with entry 0 at bit 0 of the first byte, or null.
struct Piece {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  int64_t n;
  uint64_t entry;
  const uint8_t* read_bits;
  uint8_t* write_bits;
};

struct UpdateFlags {
  bool amsgrad, freeze, scaled, update_params;
};

enum class ParamKind { kFloat, kBFloat16, kHalf, kDouble };

// Where a tensor's keep bits come from. kGradOverWeightOther: grad_over_weight in a compute type
// other than the tensor's (float64 scores of lower-precision tensors in a scope of the f64 key
// format, or float32 scores of float64 tensors given float32 thresholds), one entry at a time, as
// the histogram scores 64-bit keys.
enum class KeepKind { kGrad, kGradOverWeight, kGradOverWeightOther, kRandom, kStored };

struct KeepRule {
  KeepKind kind = KeepKind::kGrad;
  float threshold_f = 0, eps_f = 0;  // float lanes: the least float >= the threshold
  double threshold_d = 0, eps_d = 0;
  uint32_t random_key = 0, random_bound = 0;  // kept iff u >= random_bound
  bool random_none = false;                   // the threshold is above every u: none kept
  bool score_in_double = false;               // kGradOverWeightOther: float64 (else float32) scores
  template <class T>
  T threshold() const {
    if constexpr (std::is_same_v<T, float>) return threshold_f; else return threshold_d;
  }
  template <class T>
  T eps() const {
    if constexpr (std::is_same_v<T, float>) return eps_f; else return eps_d;
  }
};

// x in compute type C (rounded to nearest when C is narrower).
template <class C, class P>
inline C convert(const P* x) {
  if constexpr (std::is_same_v<P, double>) {
    return static_cast<C>(*x);
  } else {
    return static_cast<C>(simd::Scalar<float>::load(x));
  }
}

template <class C, class P>
uint64_t score_word_as(const P* g, const P* theta, int count, C threshold, C eps) {
  uint64_t word = 0;
  for (int j = 0; j < count; ++j) {
    const C s = std::abs(convert<C>(g + j)) / (std::abs(convert<C>(theta + j)) + eps);
    word |= uint64_t(s >= threshold || s != s) << j;
  }
  return word;
}

inline uint64_t stored_word(const uint8_t* bytes, int count) {
  uint64_t word = 0;
  if (count == 64) {  // a fixed-size copy compiles to one load; a variable-length one need not
    std::memcpy(&word, bytes, 8);
    return word;
  }
  std::memcpy(&word, bytes, size_t((count + 7) / 8));
  return word & ((uint64_t(1) << count) - 1);
}

static_assert(sizeof(c10::BFloat16) == 2 && sizeof(c10::Half) == 2, "16-bit float storage");

namespace isa_default {
using VF = simd::Scalar<float>;
using VD = simd::Scalar<double>;
using VU = simd::U32;
#include "masked_adamw_kernel.h"
}  // namespace isa_default

#ifdef GMT_SIMD_X86
namespace isa_avx2 {
GMT_BEGIN_AVX2
using VF = simd::avx2::F32x2;  // two registers a step: see simd.h
using VD = simd::avx2::F64;
using VU = simd::avx2::U32;
#include "masked_adamw_kernel.h"
GMT_END
}  // namespace isa_avx2

namespace isa_avx512 {
GMT_BEGIN_AVX512
using VF = simd::avx512::F32;
using VD = simd::avx512::F64;
using VU = simd::avx512::U32;
#include "masked_adamw_kernel.h"
GMT_END
}  // namespace isa_avx512
#endif

#ifdef GMT_SIMD_NEON
namespace isa_neon {
using VF = simd::neon::F32;
using VD = simd::neon::F64;
using VU = simd::neon::U32;
#include "masked_adamw_kernel.h"
}  // namespace isa_neon
#endif

int64_t run_piece(cpu::Level level, ParamKind kind, const Piece& piece, const UpdateCoeffs<float>& cf,
                  const UpdateCoeffs<double>& cd, const KeepRule& rule, UpdateFlags f) {
  switch (level) {
#ifdef GMT_SIMD_X86
    case cpu::Level::kAvx512: return isa_avx512::update_piece(kind, piece, cf, cd, rule, f);
    case cpu::Level::kAvx2: return isa_avx2::update_piece(kind, piece, cf, cd, rule, f);
#endif
#ifdef GMT_SIMD_NEON
    case cpu::Level::kNeon: return isa_neon::update_piece(kind, piece, cf, cd, rule, f);
#endif
    default: return isa_default::update_piece(kind, piece, cf, cd, rule, f);
  }
}

ParamKind param_kind(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return ParamKind::kFloat;
    case at::kBFloat16: return ParamKind::kBFloat16;
    case at::kHalf: return ParamKind::kHalf;
    case at::kDouble: return ParamKind::kDouble;
    default: TORCH_CHECK(false, "unreachable: parameter dtype was validated");
  }
}

// The float threshold that keeps exactly the floats a double threshold keeps: the least float >= t
// (|g| of a float is a float, so |g| >= t iff |g| >= that float).
float float_threshold_at_least(double t) {
  if (t != t) return std::numeric_limits<float>::quiet_NaN();
  if (t > double(std::numeric_limits<float>::max())) return std::numeric_limits<float>::infinity();
  float f = static_cast<float>(t);
  if (double(f) < t) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

template <class C>
UpdateCoeffs<C> coefficients(C threshold, double lr, double decay, double step, double beta1, double beta2,
                             double eps, double grad_scale, bool maximize) {
  UpdateCoeffs<C> c;
  c.threshold = threshold;
  const double bias_correction1 = 1.0 - std::pow(beta1, step);
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  c.decay = static_cast<C>(decay);
  c.lerp_weight = static_cast<C>(1.0 - beta1);
  c.one_minus_lerp_weight = C(1) - c.lerp_weight;
  c.small_lerp_weight = std::abs(c.lerp_weight) < C(0.5);
  c.beta2 = static_cast<C>(beta2);
  c.one_minus_beta2 = static_cast<C>(1.0 - beta2);
  c.eps = static_cast<C>(eps);
  c.neg_step_size = static_cast<C>(-(lr / bias_correction1));
  c.bias_correction2_sqrt = static_cast<C>(std::sqrt(bias_correction2));
  c.grad_scale = static_cast<C>(grad_scale);
  c.sign = maximize ? C(-1) : C(1);
  return c;
}

// t.item<T>() of a one-element CPU tensor, read in place: item() is a dispatcher call, and a step
// makes one per parameter (its step count) on caches that the update has just flushed.
template <class T>
T cpu_value(const at::Tensor& t) {
  return AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, t.scalar_type(), "cpu_value",
                                    [&] { return static_cast<T>(static_cast<double>(*t.const_data_ptr<scalar_t>())); });
}

// p * (1 - lr * weight_decay) as the reference computes it: a float lr in double (Python), a
// tensor lr in the tensor's own dtype.
template <class C>
C decay_factor(double lr, const c10::optional<at::Tensor>& lr_tensor, double weight_decay) {
  if (lr_tensor.has_value() && lr_tensor->scalar_type() == at::kFloat) {
    const float lrf = cpu_value<float>(*lr_tensor);
    return static_cast<C>(1.0f - lrf * static_cast<float>(weight_decay));
  }
  return static_cast<C>(1.0 - lr * weight_decay);
}

void check_same(const at::Tensor& t, const at::Tensor& param, const char* what, size_t i) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == param.scalar_type() && t.sizes() == param.sizes(),
              "gmt_kernels::masked_adamw (C++ CPU backend): ", what, "[", i, "] must be a CPU tensor of the ",
              "parameter's dtype and shape (", param.scalar_type(), " ", param.sizes(), "); got ", t.scalar_type(),
              " ", t.sizes(), " on ", t.device(), ".");
}

// A stored mask's row layout (design section 4). Rows whose inner size is a multiple of 8 end on a
// byte boundary, so the whole tensor is then one row: bit e of the bytes is entry e.
struct MaskRows {
  uint8_t* bytes = nullptr;
  int64_t inner = 0, row_bytes = 0;
};

MaskRows mask_rows(const at::Tensor& param, const at::Tensor& mask, size_t i) {
  const int64_t numel = param.numel();
  const int64_t d0 = param.dim() == 0 ? 1 : param.size(0);
  const int64_t inner = d0 == 0 ? 0 : numel / d0;
  const int64_t row_bytes = (inner + 7) / 8;
  TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.size(0) == d0 &&
                  mask.size(1) == row_bytes && mask.is_contiguous(),
              "gmt_kernels::masked_adamw: masks[", i, "] must be a contiguous uint8 CPU tensor of shape (", d0, ", ",
              row_bytes, ") (the 1-bit mask of a parameter of shape ", param.sizes(),
              ", design section 4: rows of ceil(inner / 8) bytes); got ", mask.scalar_type(), " ", mask.sizes(),
              " on ", mask.device(), ".");
  MaskRows rows{mask.data_ptr<uint8_t>(), inner, row_bytes};
  if (inner % 8 == 0) {
    rows.inner = numel;
    rows.row_bytes = numel / 8;
  }
  return rows;
}

// Calls run(at, count, bytes, offset, own, whole_byte) for the runs of entries [first, last) of
// one tensor. Each run lies in one row and either starts on a byte boundary and covers whole bytes
// (offset -1; bytes: its first byte), or lies in one byte (bytes) from bit `offset`: then `own`
// holds the bits of that byte no other thread's range writes (the run's, and the padding after
// the row's last column), and whole_byte says whether that is all of its bits.
template <class Fn>
void for_each_mask_run(const MaskRows& rows, int64_t first, int64_t last, Fn&& run) {
  for (int64_t e = first; e < last;) {
    const int64_t row = e / rows.inner, col = e % rows.inner;
    const int64_t col_end = col + (std::min(last, (row + 1) * rows.inner) - e);
    uint8_t* row_start = rows.bytes + row * rows.row_bytes;
    for (int64_t c = col; c < col_end;) {
      if (c % 8 != 0 || col_end - c < 8) {  // part of one byte
        const int64_t stop = std::min(col_end, (c / 8 + 1) * 8);
        // Bits of this byte no other range writes: ours, and the padding after the row's last column.
        uint32_t own = ((1u << (stop - c)) - 1) << (c % 8);
        if (stop == rows.inner) own |= 0xFFu << (stop % 8 == 0 ? 8 : stop % 8);
        const bool whole_byte = (c / 8) * 8 >= col && std::min((c / 8) * 8 + 8, rows.inner) <= col_end;
        run(e + (c - col), stop - c, row_start + c / 8, int(c % 8), uint8_t(own & 0xFFu), whole_byte);
        c = stop;
      } else {
        const int64_t stop = c + (col_end - c) / 8 * 8;
        run(e + (c - col), stop - c, row_start + c / 8, -1, uint8_t(0), true);
        c = stop;
      }
    }
    e += col_end - col;
  }
}

// Short rows (fewer than kShortRow entries, not a multiple of 8; a 1-D tensor has rows of one
// entry, one byte each): runs would be an entry or a few long, so blocks of entries are staged
// instead as dense bits (bit j: entry first + j), copied from and to the rows one entry at a time.
constexpr int64_t kShortRow = 64, kStagedEntries = 4096;

bool short_rows(const MaskRows& rows) { return rows.inner < kShortRow && rows.inner % 8 != 0; }

void gather_bits(const MaskRows& rows, int64_t first, int64_t count, uint8_t* dense) {
  std::memset(dense, 0, size_t((count + 7) / 8));
  int64_t r = first / rows.inner, c = first % rows.inner;
  for (int64_t j = 0; j < count; ++j) {
    dense[j >> 3] |= uint8_t(((rows.bytes[r * rows.row_bytes + (c >> 3)] >> (c & 7)) & 1) << (j & 7));
    if (++c == rows.inner) {
      c = 0;
      ++r;
    }
  }
}

// Each byte takes the bits of its columns in [first, first + count), and its padding (zero) when
// its row's last column is among them; a byte with bits outside the block (another thread's, or
// the next block's) is merged atomically.
void scatter_bits(const MaskRows& rows, int64_t first, int64_t count, const uint8_t* dense) {
  int64_t r = first / rows.inner, c = first % rows.inner;
  for (int64_t j = 0; j < count;) {
    const int64_t stop = std::min({rows.inner, (c / 8 + 1) * 8, c + (count - j)});
    uint32_t bits = 0, own = 0;
    for (int64_t x = c; x < stop; ++x, ++j) {
      bits |= uint32_t((dense[j >> 3] >> (j & 7)) & 1) << (x & 7);
      own |= 1u << (x & 7);
    }
    if (stop == rows.inner) own |= (0xFFu << (stop & 7 ? stop & 7 : 8)) & 0xFFu;
    uint8_t* byte = rows.bytes + r * rows.row_bytes + c / 8;
    if (own == 0xFFu) {
      *byte = uint8_t(bits);
    } else {
      __atomic_fetch_and(byte, uint8_t(~own), __ATOMIC_RELAXED);
      __atomic_fetch_or(byte, uint8_t(bits), __ATOMIC_RELAXED);
    }
    c = stop;
    if (c == rows.inner) {
      c = 0;
      ++r;
    }
  }
}

}  // namespace

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                      const at::Tensor& kept, const AdamWOptions& options, const MaskSource& mask) {
  const size_t n = params.size();
  const bool amsgrad = options.amsgrad, update = mask.update_params;
  const Criterion criterion = mask.scoring.criterion;
  const at::Tensor& thresholds = mask.thresholds;
  if (update) {
    TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n &&
                    (amsgrad ? max_exp_avg_sqs.size() == n : max_exp_avg_sqs.empty()),
                "gmt_kernels::masked_adamw: expected one grad, exp_avg, exp_avg_sq, step",
                amsgrad ? " and max_exp_avg_sq" : "", " per parameter (", n, " parameters) and ",
                amsgrad ? "" : "no max_exp_avg_sqs without amsgrad; ", "got ", grads.size(), ", ", exp_avgs.size(),
                ", ", exp_avg_sqs.size(), ", ", steps.size(), ", ", max_exp_avg_sqs.size(), ".");
  } else {
    TORCH_CHECK(grads.size() == n, "gmt_kernels::masked_adamw: expected one grad per parameter (", n,
                " parameters); got ", grads.size(), ".");
  }
  TORCH_CHECK(thresholds.device().is_cpu() && thresholds.dim() == 1 && thresholds.size(0) == int64_t(n) &&
                  (thresholds.scalar_type() == at::kFloat || thresholds.scalar_type() == at::kDouble),
              "gmt_kernels::masked_adamw: thresholds must be a float32 or float64 CPU tensor [", n, "]; got ",
              thresholds.scalar_type(), " ", thresholds.sizes(), " on ", thresholds.device(), ".");
  TORCH_CHECK(kept.device().is_cpu() && kept.scalar_type() == at::kLong && kept.dim() == 1 &&
                  kept.size(0) == int64_t(n) && kept.is_contiguous(),
              "gmt_kernels::masked_adamw: kept must be a contiguous int64 CPU tensor [", n, "]; got ",
              kept.scalar_type(), " ", kept.sizes(), " on ", kept.device(), ".");
  for (const auto* opt : {&options.lr_tensor, &options.grad_scale, &options.skip, &mask.refresh}) {
    TORCH_CHECK(!opt->has_value() || ((*opt)->numel() == 1 && (*opt)->device().is_cpu()),
                "gmt_kernels::masked_adamw: lr_tensor, grad_scale, skip and refresh must be one-element CPU tensors.");
  }
  mask.scoring.check("masked_adamw", n);
  TORCH_CHECK(mask.masks.empty() || mask.masks.size() == n, "gmt_kernels::masked_adamw: masks holds ",
              mask.masks.size(), " tensors for ", n, " parameters; pass one stored mask per parameter, or none.");
  const bool has_masks = !mask.masks.empty();
  const bool reuse = mask.refresh.has_value() && !cpu_value<bool>(*mask.refresh);
  TORCH_CHECK(!mask.refresh.has_value() || has_masks, "gmt_kernels::masked_adamw: refresh was given without stored ",
              "masks to read or write; pass the masks (one per parameter), or refresh=None when none are stored.");
  if (options.skip.has_value() && cpu_value<bool>(*options.skip)) return;  // a skipped step changes nothing at all

  const bool needs_rows = criterion == Criterion::kRandom || has_masks;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu(), "gmt_kernels::masked_adamw (C++ CPU backend): parameter ", i, " is on ",
                p.device(), "; this backend serves CPU tensors only. Use backend='auto' to pick one per device.");
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble || p.scalar_type() == at::kHalf ||
                    p.scalar_type() == at::kBFloat16,
                "gmt_kernels::masked_adamw: parameter ", i, " is ", p.scalar_type(),
                "; supported dtypes are float32, float64, float16 and bfloat16.");
    TORCH_CHECK(!needs_rows || p.is_contiguous(), "gmt_kernels::masked_adamw: parameter ", i,
                " is not contiguous; criterion 'random' and stored masks index entries in row-major order, which "
                "must be the memory order. Make the parameter contiguous.");
    check_same(grads[i], p, "grads", i);
    if (!update) continue;
    check_same(exp_avgs[i], p, "exp_avgs", i);
    check_same(exp_avg_sqs[i], p, "exp_avg_sqs", i);
    if (amsgrad) check_same(max_exp_avg_sqs[i], p, "max_exp_avg_sqs", i);
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].device().is_cpu(), "gmt_kernels::masked_adamw: steps[", i,
                "] must be a one-element CPU tensor (the state's 'step').");
  }
  std::vector<MaskRows> rows(n);
  for (size_t i = 0; i < n && has_masks; ++i) rows[i] = mask_rows(params[i], mask.masks[i], i);

  const double lr_value = options.lr_tensor.has_value() ? cpu_value<double>(*options.lr_tensor) : options.lr;
  const double scale = options.grad_scale.has_value() ? cpu_value<double>(*options.grad_scale) : 1.0;
  const UpdateFlags flags{amsgrad, options.freeze, options.grad_scale.has_value(), update};
  const bool wide_scores = thresholds.scalar_type() == at::kDouble;  // the f64 (or u32) key format
  auto threshold_of = [&](size_t i) {  // read in place, in any stride
    const int64_t at = int64_t(i) * thresholds.stride(0);
    return wide_scores ? thresholds.const_data_ptr<double>()[at] : double(thresholds.const_data_ptr<float>()[at]);
  };
  const float decay_f = decay_factor<float>(lr_value, options.lr_tensor, options.weight_decay);
  const double decay_d = decay_factor<double>(lr_value, options.lr_tensor, options.weight_decay);

  // Operands as dense memory blocks of one common layout, so entry j of every operand is element j
  // of its block. A tensor whose layout differs (rare: states are created like the parameter)
  // is worked on as a contiguous copy and copied back.
  std::vector<std::array<at::Tensor, 5>> operands(n);
  std::vector<std::array<bool, 5>> copied(n);
  std::vector<UpdateCoeffs<float>> coeffs_f(n);
  std::vector<UpdateCoeffs<double>> coeffs_d(n);
  std::vector<KeepRule> rules(n);
  std::vector<int64_t> sizes(n);
  const int used = update ? (amsgrad ? 5 : 4) : 2;
  for (size_t i = 0; i < n; ++i) {
    std::array<at::Tensor, 5> original{params[i], grads[i], update ? exp_avgs[i] : at::Tensor(),
                                       update ? exp_avg_sqs[i] : at::Tensor(),
                                       update && amsgrad ? max_exp_avg_sqs[i] : at::Tensor()};
    const bool shared_layout = std::all_of(original.begin(), original.begin() + used, [&](const at::Tensor& t) {
      return t.is_non_overlapping_and_dense() && t.strides() == params[i].strides();
    });
    for (int k = 0; k < 5; ++k) {
      copied[i][k] = original[k].defined() && !shared_layout && !original[k].is_contiguous();
      operands[i][k] = copied[i][k] ? original[k].contiguous() : original[k];
    }
    const double step = update ? cpu_value<double>(steps[i]) : 1.0;
    const double t = threshold_of(i);
    coeffs_f[i] = coefficients<float>(float_threshold_at_least(t), lr_value, decay_f, step, options.beta1,
                                      options.beta2, options.eps, scale, options.maximize);
    coeffs_d[i] = coefficients<double>(t, lr_value, decay_d, step, options.beta1, options.beta2, options.eps, scale,
                                       options.maximize);
    KeepRule& rule = rules[i];
    rule.threshold_f = float_threshold_at_least(t);
    rule.threshold_d = t;
    rule.eps_f = static_cast<float>(mask.scoring.score_eps);
    rule.eps_d = mask.scoring.score_eps;
    if (reuse) {
      rule.kind = KeepKind::kStored;
    } else if (criterion == Criterion::kGradOverWeight) {
      // Scored in the thresholds' dtype (the key format's), lanes of the tensor's own compute type
      // when they agree.
      rule.score_in_double = wide_scores;
      rule.kind = wide_scores == (params[i].scalar_type() == at::kDouble) ? KeepKind::kGradOverWeight
                                                                          : KeepKind::kGradOverWeightOther;
    } else if (criterion == Criterion::kRandom) {
      rule.kind = KeepKind::kRandom;
      rule.random_key = mask.scoring.random_key(i);
      // u >= t for an integer u in [0, 2**32): u >= ceil(t); none when t is NaN or above 2**32 - 1.
      rule.random_none = !(t <= 4294967295.0);
      rule.random_bound = t <= 0.0 || rule.random_none ? 0u : uint32_t(std::ceil(t));
    }
    sizes[i] = params[i].numel();
  }

  FlatIndex flat(sizes);
  using cpu::Kernel;
  const Kernel variant = reuse                                      ? Kernel::kMaskedAdamwStoredMask
                         : criterion == Criterion::kGradOverWeight ? Kernel::kMaskedAdamwGradOverWeight
                         : criterion == Criterion::kRandom         ? Kernel::kMaskedAdamwRandom
                                                                   : Kernel::kMaskedAdamw;
  const cpu::Level level = cpu::kernel_level(variant);
  const bool write_masks = has_masks && !reuse;
  int64_t* kept_out = kept.data_ptr<int64_t>();
  at::parallel_for(0, flat.total(), kGrain, [&](int64_t begin, int64_t end) {
    flat.for_each_piece(begin, end, [&](size_t i, int64_t first, int64_t last) {
      const auto& ops = operands[i];
      const int64_t elem = ops[0].element_size();
      const ParamKind kind = param_kind(ops[0].scalar_type());
      const uint64_t entry0 = criterion == Criterion::kRandom ? mask.scoring.entry_offset(i) : 0;
      auto piece_at = [&](int64_t at, int64_t count) {
        auto ptr = [&](const at::Tensor& t) {
          return t.defined() ? static_cast<void*>(static_cast<char*>(t.data_ptr()) + at * elem) : nullptr;
        };
        return Piece{ptr(ops[0]), ptr(ops[1]), ptr(ops[2]), ptr(ops[3]), ptr(ops[4]), count, entry0 + uint64_t(at),
                     nullptr, nullptr};
      };
      int64_t count = 0;
      if (!has_masks) {
        count = run_piece(level, kind, piece_at(first, last - first), coeffs_f[i], coeffs_d[i], rules[i], flags);
      } else if (short_rows(rows[i])) {
        uint8_t staged[kStagedEntries / 8];
        for (int64_t at = first; at < last; at += kStagedEntries) {
          const int64_t len = std::min(kStagedEntries, last - at);
          Piece piece = piece_at(at, len);
          if (reuse) {
            gather_bits(rows[i], at, len, staged);
            piece.read_bits = staged;
          } else {
            piece.write_bits = staged;
          }
          count += run_piece(level, kind, piece, coeffs_f[i], coeffs_d[i], rules[i], flags);
          if (write_masks) scatter_bits(rows[i], at, len, staged);
        }
      } else {
        for_each_mask_run(rows[i], first, last, [&](int64_t at, int64_t len, uint8_t* bytes, int offset, uint8_t own,
                                                     bool whole_byte) {
          Piece piece = piece_at(at, len);
          if (offset < 0) {  // whole bytes
            if (reuse) piece.read_bits = bytes; else piece.write_bits = bytes;
            count += run_piece(level, kind, piece, coeffs_f[i], coeffs_d[i], rules[i], flags);
            return;
          }
          uint8_t staged = reuse ? uint8_t(*bytes >> offset) : uint8_t(0);  // entry `at` at bit 0
          if (reuse) piece.read_bits = &staged; else piece.write_bits = &staged;
          count += run_piece(level, kind, piece, coeffs_f[i], coeffs_d[i], rules[i], flags);
          if (!write_masks) return;
          const uint8_t bits = uint8_t((uint32_t(staged) << offset) & own);
          if (whole_byte) {
            *bytes = bits;
          } else {  // a neighbouring range owns the other bits of this byte
            __atomic_fetch_and(bytes, uint8_t(~own), __ATOMIC_RELAXED);
            __atomic_fetch_or(bytes, bits, __ATOMIC_RELAXED);
          }
        });
      }
      atomic_add(kept_out + i, count);
    });
  });

  for (size_t i = 0; i < n && update; ++i) {
    const at::Tensor mutated[] = {params[i], at::Tensor(), exp_avgs[i], exp_avg_sqs[i],
                                  amsgrad ? max_exp_avg_sqs[i] : at::Tensor()};
    for (int k = 0; k < 5; ++k) {
      if (copied[i][k] && mutated[k].defined()) mutated[k].copy_(operands[i][k]);
    }
  }
}

}  // namespace gmt
