// The masked AdamW loop of csrc/masked_adamw.cpp, written once against the lane structs of simd.h
// and included (deliberately without an include guard) once per ISA namespace, inside that ISA's
// target region. Expects `VF`, `VD` (float and double lanes) and `VU` (32-bit random-score lanes)
// in the including namespace, and Piece, UpdateCoeffs, UpdateFlags, ParamKind, KeepRule, KeepKind
// from masked_adamw.cpp.

// NaN-propagating maximum as torch.maximum: `a > b ? a : b`, and a where a is NaN.
template <class V>
GMT_INLINE typename V::R max_nan(typename V::R a, typename V::R b) {
  return V::select(V::isnan(a), a, V::select(V::gt(a, b), a, b));
}

// ---- keep words: the keep bits of up to 64 consecutive entries (bit j: entry j) ----

// Scored in V's lanes: s = |g| (OVER_WEIGHT false) or |g| / (|theta| + eps), kept iff s >= t or s
// is NaN. Every lane operation is one IEEE operation, so any lane width gives the same bits.
template <class V, class P, bool OVER_WEIGHT>
uint64_t score_word(const P* g, const P* theta, int count, typename V::T threshold, typename V::T eps) {
  using R = typename V::R;
  const R t = V::set1(threshold), e = V::set1(eps);
  uint64_t word = 0;
  int j = 0;
  for (; j + V::W <= count; j += V::W) {
    R s = V::abs(V::load(g + j));
    if (OVER_WEIGHT) s = V::div(s, V::add(V::abs(V::load(theta + j)), e));
    word |= uint64_t(V::template to_bits<P>(V::or_(V::ge(s, t), V::isnan(s)))) << j;
  }
  if constexpr (V::W > 1) {
    if (j < count) {
      word |= score_word<simd::Scalar<typename V::T>, P, OVER_WEIGHT>(g + j, theta + j, count - j, threshold, eps) << j;
    }
  }
  return word;
}

// The random score's keep bits: u(entry) >= bound (unsigned), for entries entry, entry + 1, ...
inline uint64_t random_word(uint32_t key, uint64_t entry, int count, uint32_t bound) {
  uint64_t word = 0;
  const uint32_t low = uint32_t(entry);
  if (uint64_t(low) + uint64_t(count) > (uint64_t(1) << 32)) {  // crosses a 2**32 boundary: t changes
    for (int j = 0; j < count; ++j) {
      const uint64_t e = entry + uint64_t(j);
      word |= uint64_t(simd::random_u(simd::random_high(key, e), uint32_t(e)) >= bound) << j;
    }
    return word;
  }
  const uint32_t high = simd::random_high(key, entry);
  const typename VU::R t = VU::set1(high), lower = VU::set1(bound);
  int j = 0;
  for (; j + VU::W <= count; j += VU::W) {
    word |= uint64_t(VU::ge_bits(VU::hash(VU::from(low + uint32_t(j)), t), lower)) << j;
  }
  for (; j < count; ++j) word |= uint64_t(simd::random_u(high, low + uint32_t(j)) >= bound) << j;
  return word;
}

// Out of line: the update loop inlines only the stored-mask read (a reuse step's whole cost).
template <class V, class P>
__attribute__((noinline)) uint64_t keep_word(const KeepRule& rule, const P* g, const P* theta, const uint8_t* stored, uint64_t entry,
                              int count) {
  using T = typename V::T;
  switch (rule.kind) {
    case KeepKind::kGrad:
      return score_word<V, P, false>(g, theta, count, rule.threshold<T>(), T(0));
    case KeepKind::kGradOverWeight:
      return score_word<V, P, true>(g, theta, count, rule.threshold<T>(), rule.eps<T>());
    case KeepKind::kGradOverWeightOther:
      return rule.score_in_double ? score_word_as<double>(g, theta, count, rule.threshold_d, rule.eps_d)
                                  : score_word_as<float>(g, theta, count, rule.threshold_f, rule.eps_f);
    case KeepKind::kRandom:
      return rule.random_none ? 0 : random_word(rule.random_key, entry, count, rule.random_bound);
    case KeepKind::kStored:
      return stored_word(stored, count);
  }
  return 0;
}

// Keep bits carried across the vector and the scalar part of one run.
struct KeepBits {
  uint64_t word = 0;  // keep bits of the 64 entries from the last multiple of 64 (FROM_WORD)
  uint64_t out = 0;   // bits to store, from the last multiple of 64
};

// Entries [i, end) of one run with V lanes (the caller goes on with one lane from where this
// stops); returns the kept count. The arithmetic is the reference backend's, op for op.
// FROM_WORD: keep bits come from keep_word (other criteria, stored masks), else |g| >= t or NaN.
template <class V, class P, bool AMSGRAD, bool FREEZE, bool SCALED, bool SMALL_LERP, bool FROM_WORD>
GMT_INLINE int64_t update_lanes(const Piece& piece, int64_t& i, int64_t end, const UpdateCoeffs<typename V::T>& c,
                                const KeepRule& rule, KeepBits& bits) {
  using R = typename V::R;
  using M = typename V::M;
  P* __restrict p = static_cast<P*>(piece.param);
  const P* __restrict g = static_cast<const P*>(piece.grad);
  P* __restrict m = static_cast<P*>(piece.exp_avg);
  P* __restrict v = static_cast<P*>(piece.exp_avg_sq);
  P* __restrict vmax = static_cast<P*>(piece.max_exp_avg_sq);
  uint8_t* const write = piece.write_bits;
  const R threshold = V::set1(c.threshold), decay = V::set1(c.decay), lerp_weight = V::set1(c.lerp_weight);
  const R one_minus_lerp_weight = V::set1(c.one_minus_lerp_weight), beta2 = V::set1(c.beta2);
  const R one_minus_beta2 = V::set1(c.one_minus_beta2), eps = V::set1(c.eps), neg_step_size = V::set1(c.neg_step_size);
  const R bias_correction2_sqrt = V::set1(c.bias_correction2_sqrt), grad_scale = V::set1(c.grad_scale);
  const R sign = V::set1(c.sign);

  // Entries [at, at + W): the AdamW update of the kept ones (`raw`: their gradients, loaded).
  auto update_at = [&](int64_t at, R raw, M keep) __attribute__((always_inline)) {
    R grad = SCALED ? V::div(raw, grad_scale) : raw;
    grad = V::mul(grad, sign);
    if (!FREEZE) grad = V::select(keep, grad, V::zero());
    const R m_old = V::load(m + at), v_old = V::load(v + at), p_old = V::load(p + at);
    const R diff = V::sub(grad, m_old);
    // torch's lerp picks its formula by |weight| < 0.5
    const R m_new = SMALL_LERP ? V::add(m_old, V::mul(lerp_weight, diff)) : V::sub(grad, V::mul(diff, one_minus_lerp_weight));
    const R v_new = V::add(V::mul(v_old, beta2), V::mul(V::mul(one_minus_beta2, grad), grad));
    R second = v_new, vmax_old = v_new, vmax_new = v_new;
    if (AMSGRAD) {
      vmax_old = V::load(vmax + at);
      vmax_new = max_nan<V>(vmax_old, v_new);
      second = vmax_new;
    }
    const R denom = V::add(V::div(V::sqrt(second), bias_correction2_sqrt), eps);
    const R p_new = V::add(V::mul(p_old, decay), V::div(V::mul(m_new, neg_step_size), denom));
    if (FREEZE) {  // masked entries keep everything, weight decay included
      V::store(p + at, V::select(keep, p_new, p_old));
      V::store(m + at, V::select(keep, m_new, m_old));
      V::store(v + at, V::select(keep, v_new, v_old));
      if (AMSGRAD) V::store(vmax + at, V::select(keep, vmax_new, vmax_old));
    } else {
      V::store(p + at, p_new);
      V::store(m + at, m_new);
      V::store(v + at, v_new);
      if (AMSGRAD) V::store(vmax + at, vmax_new);
    }
  };

  // The keep bits of entries [at, at + count), count <= 64 (FROM_WORD): a stored mask's are read
  // inline, the criteria's scored out of line.
  auto word_at = [&](int64_t at, int count) __attribute__((always_inline)) {
    return rule.kind == KeepKind::kStored ? stored_word(piece.read_bits + at / 8, count)
                                          : keep_word<V, P>(rule, g + at, p + at, nullptr, piece.entry + uint64_t(at), count);
  };

  int64_t kept = 0;
  if constexpr (FROM_WORD) {
    // Whole words of 64 entries: one fetch, then 64 / W lanes that shift a register. Fetching at
    // `i % 64 == 0` inside the lane loop instead cost a reuse step about 6 % (a branch, a word
    // behind a reference and the shift amount per lane).
    for (; (i & 63) == 0 && i + 64 <= end; i += 64) {
      const uint64_t word = word_at(i, 64);
      kept += __builtin_popcountll(word);
      if (write != nullptr) std::memcpy(write + i / 8, &word, 8);
#pragma GCC unroll 16
      for (int j = 0; j < 64; j += V::W) {
        update_at(i + j, V::load(g + i + j), V::template from_bits<P>(uint32_t(word >> j)));
      }
    }
  }
  uint64_t word = bits.word, out = bits.out;  // in registers for the loop, not behind a reference
  for (; i + V::W <= end; i += V::W) {
    const R raw = V::load(g + i);
    const int bit = int(i & 63);
    M keep;
    if constexpr (FROM_WORD) {
      if (bit == 0) word = word_at(i, int(std::min<int64_t>(64, piece.n - i)));
      keep = V::template from_bits<P>(uint32_t(word >> bit));
    } else {
      keep = V::or_(V::ge(V::abs(raw), threshold), V::isnan(raw));  // NaN counts as the largest score
    }
    kept += V::count(keep);
    if (write != nullptr) {
      out |= uint64_t(V::template to_bits<P>(keep)) << bit;
      if (bit + V::W == 64) {
        std::memcpy(write + (i + V::W - 64) / 8, &out, 8);
        out = 0;
      }
    }
    update_at(i, raw, keep);
  }
  bits.word = word;
  bits.out = out;
  return kept;
}

// Stores the bits of the last, incomplete group of 64 entries of a run of n.
inline void flush_bits(const Piece& piece, const KeepBits& bits) {
  const int64_t rest = piece.n & 63;
  if (piece.write_bits != nullptr && rest != 0) {
    std::memcpy(piece.write_bits + (piece.n - rest) / 8, &bits.out, size_t((rest + 7) / 8));
  }
}

template <class V, class P, bool AMSGRAD, bool FREEZE, bool SCALED, bool SMALL_LERP, bool FROM_WORD>
int64_t update_run(const Piece& piece, const UpdateCoeffs<typename V::T>& c, const KeepRule& rule) {
  KeepBits bits;
  int64_t i = 0;
  int64_t kept = update_lanes<V, P, AMSGRAD, FREEZE, SCALED, SMALL_LERP, FROM_WORD>(piece, i, piece.n, c, rule, bits);
  if constexpr (V::W > 1) {  // the tail: the same operations one lane at a time
    kept += update_lanes<simd::Scalar<typename V::T>, P, AMSGRAD, FREEZE, SCALED, SMALL_LERP, FROM_WORD>(
        piece, i, piece.n, c, rule, bits);
  }
  flush_bits(piece, bits);
  return kept;
}

// update_params=False (select_mask): only the keep bits, stored if asked, and their count.
template <class V, class P>
int64_t select_run(const Piece& piece, const KeepRule& rule) {
  const P* g = static_cast<const P*>(piece.grad);
  const P* theta = static_cast<const P*>(piece.param);
  int64_t kept = 0;
  for (int64_t i = 0; i < piece.n; i += 64) {
    const int count = int(std::min<int64_t>(64, piece.n - i));
    const uint64_t word = keep_word<V, P>(rule, g ? g + i : nullptr, theta + i,
                                          piece.read_bits ? piece.read_bits + i / 8 : nullptr, piece.entry + uint64_t(i), count);
    if (piece.write_bits != nullptr) std::memcpy(piece.write_bits + i / 8, &word, size_t((count + 7) / 8));
    kept += __builtin_popcountll(word);
  }
  return kept;
}

template <class V, class P>
int64_t update_typed(const Piece& piece, const UpdateCoeffs<typename V::T>& c, const KeepRule& rule, UpdateFlags f) {
  if (!f.update_params) return select_run<V, P>(piece, rule);
  const bool from_word = rule.kind != KeepKind::kGrad;
#define GMT_CASE(A, F, S, L, W)                                                                         \
  if (f.amsgrad == A && f.freeze == F && f.scaled == S && c.small_lerp_weight == L && from_word == W) \
    return update_run<V, P, A, F, S, L, W>(piece, c, rule);
#define GMT_CASES_W(A, F, S, L) GMT_CASE(A, F, S, L, false) GMT_CASE(A, F, S, L, true)
#define GMT_CASES(A, F) \
  GMT_CASES_W(A, F, false, false) GMT_CASES_W(A, F, false, true) GMT_CASES_W(A, F, true, false) GMT_CASES_W(A, F, true, true)
  GMT_CASES(false, false) GMT_CASES(false, true) GMT_CASES(true, false) GMT_CASES(true, true)
#undef GMT_CASES
#undef GMT_CASES_W
#undef GMT_CASE
  return 0;
}

// This ISA's entry point: one run of one tensor.
int64_t update_piece(ParamKind kind, const Piece& piece, const UpdateCoeffs<float>& cf, const UpdateCoeffs<double>& cd,
                     const KeepRule& rule, UpdateFlags f) {
  switch (kind) {
    case ParamKind::kFloat: return update_typed<VF, float>(piece, cf, rule, f);
    case ParamKind::kBFloat16: return update_typed<VF, simd::BF16>(piece, cf, rule, f);
    case ParamKind::kHalf: return update_typed<VF, simd::F16>(piece, cf, rule, f);
    case ParamKind::kDouble: return update_typed<VD, double>(piece, cd, rule, f);
  }
  return 0;
}
