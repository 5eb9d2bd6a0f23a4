// Vectorised sigmoid and tanh for the recurrent cells.
//
// ATen's Vectorized<float>::exp()/tanh() call out to Sleef (~45 cycles a vector here);
// the LSTM step evaluates five of them per hidden unit, which made the pointwise pass
// as slow as the recurrent GEMM at batch 32. The AVX-512 versions below inline a
// Cephes-style exp (degree-6 polynomial, ~1 ulp) and a refined reciprocal (rcp14 + one
// Newton step, ~1e-8 relative), ~15 instructions a vector; the AVX2 versions are the same
// on 8 lanes. The DEFAULT capability and float64 use ATen's functions.
#pragma once

#include <ATen/cpu/vec/vec.h>

#if !defined(CPU_CAPABILITY)
#error "csrc/cpu/kernels/ is compiled once per capability, with CPU_CAPABILITY set (kernels.h)"
#endif

namespace seqfuse {
inline namespace CPU_CAPABILITY {  // one copy per capability (kernels.h)

using at::vec::Vectorized;

template <typename scalar_t>
inline Vectorized<scalar_t> vsigmoid(const Vectorized<scalar_t>& x) {
  const Vectorized<scalar_t> one(scalar_t(1));
  return one / (one + x.neg().exp());
}

template <typename scalar_t>
inline Vectorized<scalar_t> vtanh(const Vectorized<scalar_t>& x) {
  return x.tanh();
}

// exp(x) for x <= 0, as in a softmax after subtracting the row maximum: exactly 0 for
// -inf (masked scores) and, in float32, below -87, where exp underflows anyway; NaN for NaN.
template <typename scalar_t>
inline Vectorized<scalar_t> vexp_nonpos(const Vectorized<scalar_t>& x) {
  return x.exp();
}

#if defined(CPU_CAPABILITY_AVX512)
namespace detail {

// exp(x) for x already clamped to [-87, 87].
inline __m512 exp_clamped(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// 1/d for d in [1, 1e38]: rcp14 then one Newton step.
inline __m512 reciprocal(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

// _mm512_max_ps / _mm512_min_ps return their SECOND operand when either is NaN: the bound
// goes first so that a NaN input stays NaN (as in eager PyTorch) instead of clamping.
inline __m512 clamp87(__m512 x) {
  return _mm512_min_ps(_mm512_set1_ps(87.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
}

}  // namespace detail

template <>
inline Vectorized<float> vsigmoid(const Vectorized<float>& x) {
  const __m512 e = detail::exp_clamped(detail::clamp87(_mm512_sub_ps(_mm512_setzero_ps(), x)));
  return detail::reciprocal(_mm512_add_ps(e, _mm512_set1_ps(1.0f)));
}

// tanh(x) = sign(x) * (1 - e) / (1 + e), e = exp(-2|x|): no overflow, and the absolute
// error stays at float epsilon near 0.
template <>
inline Vectorized<float> vtanh(const Vectorized<float>& x) {
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 e = detail::exp_clamped(
      _mm512_max_ps(_mm512_set1_ps(-87.0f), _mm512_mul_ps(ax, _mm512_set1_ps(-2.0f))));  // NaN stays NaN
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 t = _mm512_mul_ps(_mm512_sub_ps(one, e), detail::reciprocal(_mm512_add_ps(one, e)));
  // copy the sign of x onto t
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x80000000));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign));
}

template <>
inline Vectorized<float> vexp_nonpos(const Vectorized<float>& x) {
  const __m512 e = detail::exp_clamped(detail::clamp87(x));  // NaN stays NaN
  // below -87 (masked scores are -inf): 0. _CMP_NLT_UQ is true for NaN, which is kept, so
  // a NaN score poisons its row as it does in eager PyTorch's softmax.
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ), e);
}
#elif defined(CPU_CAPABILITY_AVX2)
// The same formulas on 8 lanes. AVX2 has no scalef and no rcp14: 2^n is built in the
// exponent field (n stays within [-126, 126] after the clamp, so it is a normal float),
// and 1/d is rcp (12 bits) and one Newton step (~23 bits, 1.2e-7 relative).
namespace detail {

inline __m256 exp_clamped(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
}

inline __m256 reciprocal(__m256 d) {
  const __m256 r = _mm256_rcp_ps(d);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
}

// min/max return their second operand for a NaN: the bound first keeps NaN (as AVX-512).
inline __m256 clamp87(__m256 x) {
  return _mm256_min_ps(_mm256_set1_ps(87.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
}

}  // namespace detail

template <>
inline Vectorized<float> vsigmoid(const Vectorized<float>& x) {
  const __m256 e = detail::exp_clamped(detail::clamp87(_mm256_sub_ps(_mm256_setzero_ps(), x)));
  return detail::reciprocal(_mm256_add_ps(e, _mm256_set1_ps(1.0f)));
}

template <>
inline Vectorized<float> vtanh(const Vectorized<float>& x) {
  const __m256 sign_bit = _mm256_castsi256_ps(_mm256_set1_epi32(0x80000000));
  const __m256 ax = _mm256_andnot_ps(sign_bit, x);
  const __m256 e = detail::exp_clamped(
      _mm256_max_ps(_mm256_set1_ps(-87.0f), _mm256_mul_ps(ax, _mm256_set1_ps(-2.0f))));  // NaN stays NaN
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_mul_ps(_mm256_sub_ps(one, e), detail::reciprocal(_mm256_add_ps(one, e)));
  return _mm256_or_ps(t, _mm256_and_ps(x, sign_bit));
}

template <>
inline Vectorized<float> vexp_nonpos(const Vectorized<float>& x) {
  const __m256 e = detail::exp_clamped(detail::clamp87(x));  // NaN stays NaN
  // below -87: 0; _CMP_NLT_UQ is true for NaN, which is kept (as AVX-512).
  return _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_NLT_UQ), e);
}
#endif

// The activations and fused multiply-add of cell_math.h's formulas on vectors (its Act).
struct VecAct {
  template <typename V> static V sigmoid(const V& x) { return vsigmoid(x); }
  template <typename V> static V tanh(const V& x) { return vtanh(x); }
  template <typename V> static V relu(const V& x) { return at::vec::clamp_min(x, V(0.0f)); }
  template <typename V> static V fma(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
  template <typename V> static V relu_grad(const V& dy, const V& y) { return V::blendv(V(0.0f), dy, y > V(0.0f)); }
};

}  // namespace CPU_CAPABILITY
}  // namespace seqfuse
