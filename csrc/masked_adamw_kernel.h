// The masked AdamW loop of csrc/masked_adamw.cpp, written once against the lane structs of simd.h
// and included (deliberately without an include guard) once per ISA namespace, inside that ISA's
// target region. Expects `VF` and `VD` (float and double lanes) in the including namespace, and
// Piece, UpdateCoeffs, UpdateFlags, ParamKind from masked_adamw.cpp.

// NaN-propagating maximum as torch.maximum: `a > b ? a : b`, and a where a is NaN.
template <class V>
GMT_INLINE typename V::R max_nan(typename V::R a, typename V::R b) {
  return V::select(V::isnan(a), a, V::select(V::gt(a, b), a, b));
}

// Entries [0, n) of one tensor piece: V lanes at a time, the tail with one lane (same operations,
// same rounding). The arithmetic is the reference backend's, op for op; returns the kept count.
template <class V, class P, bool AMSGRAD, bool FREEZE, bool SCALED, bool SMALL_LERP>
GMT_INLINE int64_t update_lanes(P* __restrict p, const P* __restrict g, P* __restrict m, P* __restrict v,
                                P* __restrict vmax, int64_t n, const UpdateCoeffs<typename V::T>& c) {
  using R = typename V::R;
  using M = typename V::M;
  using T = typename V::T;
  const R threshold = V::set1(c.threshold), decay = V::set1(c.decay), lerp_weight = V::set1(c.lerp_weight);
  const R one_minus_lerp_weight = V::set1(c.one_minus_lerp_weight), beta2 = V::set1(c.beta2);
  const R one_minus_beta2 = V::set1(c.one_minus_beta2), eps = V::set1(c.eps), neg_step_size = V::set1(c.neg_step_size);
  const R bias_correction2_sqrt = V::set1(c.bias_correction2_sqrt), grad_scale = V::set1(c.grad_scale);
  const R sign = V::set1(c.sign);
  int64_t kept = 0, i = 0;
  for (; i + V::W <= n; i += V::W) {
    const R raw = V::load(g + i);
    const M keep = V::or_(V::ge(V::abs(raw), threshold), V::isnan(raw));  // NaN counts as the largest score
    kept += V::count(keep);
    R grad = SCALED ? V::div(raw, grad_scale) : raw;
    grad = V::mul(grad, sign);
    if (!FREEZE) grad = V::select(keep, grad, V::zero());
    const R m_old = V::load(m + i), v_old = V::load(v + i), p_old = V::load(p + i);
    const R diff = V::sub(grad, m_old);
    // torch's lerp picks its formula by |weight| < 0.5
    const R m_new = SMALL_LERP ? V::add(m_old, V::mul(lerp_weight, diff)) : V::sub(grad, V::mul(diff, one_minus_lerp_weight));
    const R v_new = V::add(V::mul(v_old, beta2), V::mul(V::mul(one_minus_beta2, grad), grad));
    R second = v_new, vmax_old = v_new, vmax_new = v_new;
    if (AMSGRAD) {
      vmax_old = V::load(vmax + i);
      vmax_new = max_nan<V>(vmax_old, v_new);
      second = vmax_new;
    }
    const R denom = V::add(V::div(V::sqrt(second), bias_correction2_sqrt), eps);
    const R p_new = V::add(V::mul(p_old, decay), V::div(V::mul(m_new, neg_step_size), denom));
    if (FREEZE) {  // masked entries keep everything, weight decay included
      V::store(p + i, V::select(keep, p_new, p_old));
      V::store(m + i, V::select(keep, m_new, m_old));
      V::store(v + i, V::select(keep, v_new, v_old));
      if (AMSGRAD) V::store(vmax + i, V::select(keep, vmax_new, vmax_old));
    } else {
      V::store(p + i, p_new);
      V::store(m + i, m_new);
      V::store(v + i, v_new);
      if (AMSGRAD) V::store(vmax + i, vmax_new);
    }
  }
  if constexpr (V::W > 1) {
    if (i < n) {
      kept += update_lanes<simd::Scalar<T>, P, AMSGRAD, FREEZE, SCALED, SMALL_LERP>(
          p + i, g + i, m + i, v + i, AMSGRAD ? vmax + i : vmax, n - i, c);
    }
  }
  return kept;
}

template <class V, class P>
int64_t update_typed(const Piece& piece, const UpdateCoeffs<typename V::T>& c, UpdateFlags f) {
  P* p = static_cast<P*>(piece.param);
  const P* g = static_cast<const P*>(piece.grad);
  P* m = static_cast<P*>(piece.exp_avg);
  P* v = static_cast<P*>(piece.exp_avg_sq);
  P* vmax = static_cast<P*>(piece.max_exp_avg_sq);
#define GMT_CASE(A, F, S, L)                                                               \
  if (f.amsgrad == A && f.freeze == F && f.scaled == S && c.small_lerp_weight == L) \
    return update_lanes<V, P, A, F, S, L>(p, g, m, v, vmax, piece.n, c);
#define GMT_CASES(A, F) GMT_CASE(A, F, false, false) GMT_CASE(A, F, false, true) GMT_CASE(A, F, true, false) GMT_CASE(A, F, true, true)
  GMT_CASES(false, false) GMT_CASES(false, true) GMT_CASES(true, false) GMT_CASES(true, true)
#undef GMT_CASES
#undef GMT_CASE
  return 0;
}

// This ISA's entry point: one piece of one tensor.
int64_t update_piece(ParamKind kind, const Piece& piece, const UpdateCoeffs<float>& cf,
                     const UpdateCoeffs<double>& cd, UpdateFlags f) {
  switch (kind) {
    case ParamKind::kFloat: return update_typed<VF, float>(piece, cf, f);
    case ParamKind::kBFloat16: return update_typed<VF, simd::BF16>(piece, cf, f);
    case ParamKind::kHalf: return update_typed<VF, simd::F16>(piece, cf, f);
    case ParamKind::kDouble: return update_typed<VD, double>(piece, cd, f);
  }
  return 0;
}
