#include "ref/linear.h"

#include <algorithm>
#include <cmath>
#include <exception>

#include "nibble/error.h"
#include "nibble/parallel.h"
#include "ref/bitsplit.h"
#include "ref/gemm.h"
#include "ref/hadamard.h"
#include "ref/quant.h"
#include "ref/simd.h"

namespace nibble::ref {
namespace {

void check_dims(int64_t n, int64_t d, int64_t c, const char* layer) {
  NB_CHECK(n > 0 && d > 0 && c > 0, layer << ": sizes must be positive, got N=" << n << " D=" << d
                                            << " C=" << c << " (x [N, D], w [C, D])");
}

void check_scale(float s, const char* what) {
  NB_CHECK(std::isfinite(s) && s > 0.0f,
           what << " = " << s << " must be a positive finite step size; initialise it with "
                   "lsq_init_scale on the first batch");
}

// out[cols, rows] = in[rows, cols]ᵀ: the K-contiguous copies the backward GEMMs need.
std::vector<int8_t> transpose_s8(const std::vector<int8_t>& in, int64_t rows, int64_t cols) {
  std::vector<int8_t> out(in.size());
  detail::transpose_s8(in.data(), rows, cols, out.data());
  return out;
}

PhiloxKey with_role(PhiloxKey key, RngRole role) {
  key.role = role;
  return key;
}

// The saved codes are packed as s4, so a range must lie inside [-8, 7].
void check_s4_range(QRange range, const char* what) {
  NB_CHECK(range.qmin < range.qmax && range.qmin >= -8 && range.qmax <= 7,
           what << " [" << range.qmin << ", " << range.qmax
                << "] does not fit 4 bits; the saved codes are packed s4, so use a range inside "
                   "[-8, 7] such as [-7, 7] or [-8, 7]");
}

std::vector<uint8_t> pack_rows(const int8_t* q, int64_t rows, int64_t cols) {
  std::vector<uint8_t> out(static_cast<size_t>(rows * ((cols + 1) / 2)));
  pack_s4_rows(q, rows, cols, out.data());
  return out;
}

std::vector<int8_t> unpack_rows(const std::vector<uint8_t>& packed, int64_t rows, int64_t cols) {
  NB_CHECK(packed.size() == static_cast<size_t>(rows * ((cols + 1) / 2)),
           "saved linear state: a packed tensor has " << packed.size() << " bytes, expected "
                                                      << rows * ((cols + 1) / 2) << " for ["
                                                      << rows << ", " << cols
                                                      << "]; pass the state the forward filled");
  std::vector<int8_t> out(static_cast<size_t>(rows * cols));
  if (rows * cols > 0) unpack_s4_rows(packed.data(), rows, cols, out.data());
  return out;
}

template <class T>
int64_t vector_bytes(const std::vector<T>& v) {
  return static_cast<int64_t>(v.size() * sizeof(T));
}

// The side-channel nibble of r given its uniform u (lsq_residual_encode's formula).
int8_t residual_code(float r, QRange range, float u) {
  // Outside [qmin, qmax] (±Inf included): the STE mask is 0 and δ is the code itself.
  if (!(r >= static_cast<float>(range.qmin) && r <= static_cast<float>(range.qmax))) {
    return static_cast<int8_t>(kLsqClipped);
  }
  // δ = round(r) − r (exact in fp32), e = floor(14·δ + u) of the EXACT sum: 14·δ is exact in
  // fp64 (27 bits) and the fp64 sum, though it may round for a tiny δ, never crosses an
  // integer (u is on a 2^-16 grid), so the fp64 floor is the exact floor (the CUDA twin takes
  // one fma rounded down). |δ| ≤ 1/2 and u < 1 put e in [−7, 7]: no clamp.
  const float delta = std::nearbyint(r) - r;
  const double y = static_cast<double>(kLsqResidualSteps) * static_cast<double>(delta) +
                   static_cast<double>(u);
  return static_cast<int8_t>(std::floor(y));
}

void encode_residuals_plain(const float* r, const float* u, int64_t count, QRange range,
                            int8_t* e) {
  for (int64_t i = 0; i < count; ++i) e[i] = residual_code(r[i], range, u[i]);
}

#ifdef NB_HAVE_X86_DISPATCH
// floor(14·δ + u) of 8 lanes in fp64 (residual_code's arithmetic), as int32.
NB_TARGET_AVX2 inline __m256i residual_floor8(__m256 delta, __m256 u) {
  const __m256d steps = _mm256_set1_pd(static_cast<double>(kLsqResidualSteps));
  const __m256d y_lo = _mm256_add_pd(_mm256_mul_pd(steps, _mm256_cvtps_pd(_mm256_castps256_ps128(delta))),
                                     _mm256_cvtps_pd(_mm256_castps256_ps128(u)));
  const __m256d y_hi =
      _mm256_add_pd(_mm256_mul_pd(steps, _mm256_cvtps_pd(_mm256_extractf128_ps(delta, 1))),
                    _mm256_cvtps_pd(_mm256_extractf128_ps(u, 1)));
  const __m128i e_lo = _mm256_cvtpd_epi32(_mm256_floor_pd(y_lo));
  const __m128i e_hi = _mm256_cvtpd_epi32(_mm256_floor_pd(y_hi));
  return _mm256_set_m128i(e_hi, e_lo);
}

// encode_residuals_plain, 32 elements per step. For r = ±Inf the in-range lanes compute
// NaN (converted to INT_MIN), which the clip flag then replaces, as the branch does.
NB_TARGET_AVX2 void encode_residuals_avx2(const float* r, const float* u, int64_t count,
                                          QRange range, int8_t* e) {
  const __m256 qmin = _mm256_set1_ps(static_cast<float>(range.qmin));
  const __m256 qmax = _mm256_set1_ps(static_cast<float>(range.qmax));
  const __m256i clipped = _mm256_set1_epi32(kLsqClipped);
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    __m256i codes[4];
    for (int k = 0; k < 4; ++k) {
      const __m256 ri = _mm256_loadu_ps(r + i + 8 * k);
      const __m256 in_range = _mm256_and_ps(_mm256_cmp_ps(ri, qmin, _CMP_GE_OQ),
                                            _mm256_cmp_ps(ri, qmax, _CMP_LE_OQ));
      const __m256 delta = _mm256_sub_ps(detail::nearbyint_ps(ri), ri);
      codes[k] = _mm256_blendv_epi8(clipped, residual_floor8(delta, _mm256_loadu_ps(u + i + 8 * k)),
                                    _mm256_castps_si256(in_range));
    }
    detail::store_s8x32(e + i, codes);
  }
  encode_residuals_plain(r + i, u + i, count - i, range, e + i);
}
#endif

// HQ-quantizes v[rows, d] (codes into q) and, when e is not null, encodes the LSQ residual
// side channel of every element, drawing index index_base + i of key's stream.
void hq_quantize_with_residual(const float* v, int64_t rows, int64_t d, int64_t block, float s,
                               QRange range, const PhiloxKey& key, uint64_t index_base, int8_t* q,
                               int8_t* e) {
  std::vector<float> r(e != nullptr ? static_cast<size_t>(rows * d) : 0);
  hq_quantize(v, rows, d, block, s, range, q, e != nullptr ? r.data() : nullptr);
  if (e == nullptr) return;
  [[maybe_unused]] const bool avx2 = detail::use_avx2();
  // Whole rows per chunk: one run of consecutive Philox indices each.
  detail::parallel_chunks(rows, std::max<int64_t>(1, 16384 / d), d, [&](int64_t r0, int64_t r1) {
    const int64_t first = r0 * d, count = (r1 - r0) * d;
    std::vector<float> u(static_cast<size_t>(count));
    detail::philox_uniforms16(key, index_base + static_cast<uint64_t>(first), count, u.data());
#ifdef NB_HAVE_X86_DISPATCH
    if (avx2) {
      encode_residuals_avx2(r.data() + first, u.data(), count, range, e + first);
      return;
    }
#endif
    encode_residuals_plain(r.data() + first, u.data(), count, range, e + first);
  });
}

// out[b, k] = float(Σ_j coef(b, j)·v[j, k]) for b < nb, k < d, with coef(b, j) =
// coef[b·stride_b + j·stride_j]: fp64 sums over j in index order, zero coefficients skipped
// (the W4A4 straight-through products). Callers pass blocks of kCombRows outputs b, so that
// they share each pass over v.
constexpr int64_t kCombRows = 4;

void fp64_combinations_plain(const float* coef, int64_t stride_b, int64_t stride_j, int64_t nb,
                             const float* v, int64_t nj, int64_t d, float* out) {
  std::vector<double> acc(static_cast<size_t>(d));
  for (int64_t b = 0; b < nb; ++b) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t j = 0; j < nj; ++j) {
      const double g = coef[b * stride_b + j * stride_j];
      if (g == 0.0) continue;
      for (int64_t k = 0; k < d; ++k)
        acc[static_cast<size_t>(k)] += g * static_cast<double>(v[j * d + k]);
    }
    for (int64_t k = 0; k < d; ++k)
      out[b * d + k] = static_cast<float>(acc[static_cast<size_t>(k)]);
  }
}

#ifdef NB_HAVE_X86_DISPATCH
// fp64_combinations_plain for a block of 4 outputs and d a multiple of 8: a 4 × 8 tile of
// sums stays in registers while j runs; each sum still takes its terms in j order, each
// term a multiply then an add (AVX2 has no FMA to fuse them), and a zero coefficient skips
// its term as in the plain loop.
NB_TARGET_AVX2 void fp64_combinations_avx2(const float* coef, int64_t stride_b, int64_t stride_j,
                                           int64_t nb, const float* v, int64_t nj, int64_t d,
                                           float* out) {
  if (nb != kCombRows || d % 8 != 0) {
    fp64_combinations_plain(coef, stride_b, stride_j, nb, v, nj, d, out);
    return;
  }
  std::vector<double> g(static_cast<size_t>(kCombRows * nj));  // g[b·nj + j] = coef(b, j)
  for (int64_t j = 0; j < nj; ++j)
    for (int64_t b = 0; b < kCombRows; ++b)
      g[static_cast<size_t>(b * nj + j)] = coef[b * stride_b + j * stride_j];
  const double* g0 = g.data();
  const double* g1 = g0 + nj;
  const double* g2 = g1 + nj;
  const double* g3 = g2 + nj;
  for (int64_t k0 = 0; k0 < d; k0 += 8) {
    __m256d a00 = _mm256_setzero_pd(), a01 = a00, a10 = a00, a11 = a00;
    __m256d a20 = a00, a21 = a00, a30 = a00, a31 = a00;
    for (int64_t j = 0; j < nj; ++j) {
      const __m256 vf = _mm256_loadu_ps(v + j * d + k0);
      const __m256d v0 = _mm256_cvtps_pd(_mm256_castps256_ps128(vf));
      const __m256d v1 = _mm256_cvtps_pd(_mm256_extractf128_ps(vf, 1));
      // acc += g·v for each output whose coefficient is non-zero
      if (g0[j] != 0.0) {
        const __m256d gv = _mm256_set1_pd(g0[j]);
        a00 = _mm256_add_pd(a00, _mm256_mul_pd(gv, v0));
        a01 = _mm256_add_pd(a01, _mm256_mul_pd(gv, v1));
      }
      if (g1[j] != 0.0) {
        const __m256d gv = _mm256_set1_pd(g1[j]);
        a10 = _mm256_add_pd(a10, _mm256_mul_pd(gv, v0));
        a11 = _mm256_add_pd(a11, _mm256_mul_pd(gv, v1));
      }
      if (g2[j] != 0.0) {
        const __m256d gv = _mm256_set1_pd(g2[j]);
        a20 = _mm256_add_pd(a20, _mm256_mul_pd(gv, v0));
        a21 = _mm256_add_pd(a21, _mm256_mul_pd(gv, v1));
      }
      if (g3[j] != 0.0) {
        const __m256d gv = _mm256_set1_pd(g3[j]);
        a30 = _mm256_add_pd(a30, _mm256_mul_pd(gv, v0));
        a31 = _mm256_add_pd(a31, _mm256_mul_pd(gv, v1));
      }
    }
    // float(acc): the conversion rounds like static_cast (current mode, half to even)
    const __m256d sums[kCombRows][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
    for (int64_t b = 0; b < kCombRows; ++b) {
      _mm_storeu_ps(out + b * d + k0, _mm256_cvtpd_ps(sums[b][0]));
      _mm_storeu_ps(out + b * d + k0 + 4, _mm256_cvtpd_ps(sums[b][1]));
    }
  }
}
#endif

#ifdef NB_HAVE_X86_DISPATCH
// fp64_combinations_avx2 with AVX-512, a 4 × 16 tile: the multiply and the add are the
// explicit-rounding intrinsics (half to even, the default mode the plain loop runs in), which
// the compiler never fuses into an FMA, so each term is still a multiply, then an add.
NB_TARGET_AVX512F void fp64_combinations_avx512(const float* coef, int64_t stride_b,
                                                int64_t stride_j, int64_t nb, const float* v,
                                                int64_t nj, int64_t d, float* out) {
  if (nb != kCombRows || d % 16 != 0) {
    fp64_combinations_plain(coef, stride_b, stride_j, nb, v, nj, d, out);
    return;
  }
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  std::vector<double> g(static_cast<size_t>(kCombRows * nj));  // g[b·nj + j] = coef(b, j)
  for (int64_t j = 0; j < nj; ++j)
    for (int64_t b = 0; b < kCombRows; ++b)
      g[static_cast<size_t>(b * nj + j)] = coef[b * stride_b + j * stride_j];
  for (int64_t k0 = 0; k0 < d; k0 += 16) {
    __m512d acc[kCombRows][2];
    for (auto& row : acc) row[0] = row[1] = _mm512_setzero_pd();
    // The maskz forms with every lane selected are the plain operations; they avoid GCC 12's
    // false "may be used uninitialized" warnings from the unmasked intrinsics' headers.
    constexpr __mmask8 kAll = 0xFF;
    for (int64_t j = 0; j < nj; ++j) {
      const __m512d v0 = _mm512_maskz_cvtps_pd(kAll, _mm256_loadu_ps(v + j * d + k0));
      const __m512d v1 = _mm512_maskz_cvtps_pd(kAll, _mm256_loadu_ps(v + j * d + k0 + 8));
      for (int64_t b = 0; b < kCombRows; ++b) {
        const double gb = g[static_cast<size_t>(b * nj + j)];
        if (gb == 0.0) continue;
        const __m512d gv = _mm512_set1_pd(gb);
        const __m512d p0 = _mm512_maskz_mul_round_pd(kAll, gv, v0, kRound);
        const __m512d p1 = _mm512_maskz_mul_round_pd(kAll, gv, v1, kRound);
        acc[b][0] = _mm512_maskz_add_round_pd(kAll, acc[b][0], p0, kRound);
        acc[b][1] = _mm512_maskz_add_round_pd(kAll, acc[b][1], p1, kRound);
      }
    }
    for (int64_t b = 0; b < kCombRows; ++b) {
      _mm256_storeu_ps(out + b * d + k0, _mm512_maskz_cvt_roundpd_ps(kAll, acc[b][0], kRound));
      _mm256_storeu_ps(out + b * d + k0 + 8, _mm512_maskz_cvt_roundpd_ps(kAll, acc[b][1], kRound));
    }
  }
}
#endif

void fp64_combinations(const float* coef, int64_t stride_b, int64_t stride_j, int64_t nb,
                       const float* v, int64_t nj, int64_t d, float* out) {
#ifdef NB_HAVE_X86_DISPATCH
  if (detail::use_avx512f() && d % 16 == 0) {
    fp64_combinations_avx512(coef, stride_b, stride_j, nb, v, nj, d, out);
    return;
  }
  if (detail::use_avx2()) {
    fp64_combinations_avx2(coef, stride_b, stride_j, nb, v, nj, d, out);
    return;
  }
#endif
  fp64_combinations_plain(coef, stride_b, stride_j, nb, v, nj, d, out);
}

}  // namespace

int8_t lsq_residual_encode(float r, QRange range, const PhiloxKey& key, uint64_t index) {
  return residual_code(r, range, philox_uniform16(key, index));
}

float lsq_residual_decode(int32_t e, int32_t q) {
  return e == kLsqClipped ? static_cast<float>(q)
                          : static_cast<float>(e) / static_cast<float>(kLsqResidualSteps);
}

float lsq_backward_coded(const float* grad_v_in, const int8_t* q, const int8_t* e, int64_t n,
                         QRange range, float* grad_v) {
  const char* fn = "lsq_backward_coded";
  NB_CHECK(n > 0, fn << ": needs at least one element (got n = " << n << ")");
  NB_CHECK(grad_v_in != nullptr && q != nullptr && e != nullptr,
           fn << ": grad_v_in, q and e must not be null");
  NB_CHECK(range.qmin < 0 && range.qmax > 0,
           fn << ": LSQ needs a signed code range with qmin < 0 < qmax, got [" << range.qmin
              << ", " << range.qmax << "]; use [-7, 7] (paper) or [-8, 7] (released code)");
  check_finite_values(grad_v_in, 1, n, "lsq_backward_coded: grad_v_in");
  // ∂L/∂s ≈ g · Σ_i grad_i · δ̃_i, index-order fp64 sum (serial: the order is the spec).
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float g_in = grad_v_in[i];
    sum += static_cast<double>(g_in) * static_cast<double>(lsq_residual_decode(e[i], q[i]));
    // STE: ∂v̂/∂v = 1[qmin ≤ r ≤ qmax] = 1[e ≠ −8]. Written after reading g_in (aliasing).
    if (grad_v != nullptr) grad_v[i] = e[i] == kLsqClipped ? 0.0f : g_in;
  }
  // g = 1 / sqrt(qmax · numel)  (LSQ gradient scale, algorithms.md A.3/B.2)
  const double g = 1.0 / std::sqrt(static_cast<double>(range.qmax) * static_cast<double>(n));
  return static_cast<float>(g * sum);
}

float lsq_backward_exact(const int32_t* acc, float scale, const float* grad_v_in, const int8_t* q,
                         const int8_t* e, int64_t n, QRange range, float* grad_v) {
  const char* fn = "lsq_backward_exact";
  NB_CHECK(n > 0, fn << ": needs at least one element (got n = " << n << ")");
  NB_CHECK(acc != nullptr && grad_v_in != nullptr && q != nullptr && e != nullptr,
           fn << ": acc, grad_v_in, q and e must not be null");
  NB_CHECK(range.qmin < 0 && range.qmax > 0,
           fn << ": LSQ needs a signed code range with qmin < 0 < qmax, got [" << range.qmin
              << ", " << range.qmax << "]; use [-7, 7] (paper) or [-8, 7] (released code)");
  NB_CHECK(std::isfinite(scale), fn << ": scale " << scale << " is not finite");
  // Two's-complement sums are exact modulo 2^64, so the wrapping unsigned sum is T whenever
  // |T| < 2^63 (the callers check lsq_exact_sum_fits), in any order.
  uint64_t t = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t w = e[i] == kLsqClipped ? kLsqResidualSteps * q[i] : e[i];
    t += static_cast<uint64_t>(static_cast<int64_t>(acc[i]) * w);
    if (grad_v != nullptr) grad_v[i] = e[i] == kLsqClipped ? 0.0f : grad_v_in[i];
  }
  const double sum = static_cast<double>(scale) * static_cast<double>(static_cast<int64_t>(t)) /
                     static_cast<double>(kLsqResidualSteps);
  const double g = 1.0 / std::sqrt(static_cast<double>(range.qmax) * static_cast<double>(n));
  return static_cast<float>(g * sum);
}

bool lsq_exact_sum_fits(int64_t n, double acc_bound) {
  return static_cast<double>(n) * acc_bound * (kLsqResidualSteps * 8.0) < 0x1p63;
}

int64_t HqLinearSaved::bytes() const {
  return vector_bytes(x_q_packed) + vector_bytes(x_e_packed) + vector_bytes(w_q_packed) +
         vector_bytes(w_e_packed) + static_cast<int64_t>(2 * sizeof(float));
}
std::vector<int8_t> HqLinearSaved::x_q() const { return unpack_rows(x_q_packed, n, d); }
std::vector<int8_t> HqLinearSaved::x_e() const { return unpack_rows(x_e_packed, n, d); }
std::vector<int8_t> HqLinearSaved::w_q() const { return unpack_rows(w_q_packed, c, d); }
std::vector<int8_t> HqLinearSaved::w_e() const { return unpack_rows(w_e_packed, c, d); }

int64_t W4A4Saved::bytes() const {
  return vector_bytes(x_q_packed) + vector_bytes(x_scale) + vector_bytes(x_zero) +
         vector_bytes(w_q_packed) + vector_bytes(w_scale);
}
std::vector<int8_t> W4A4Saved::x_q() const {
  std::vector<int8_t> q = unpack_rows(x_q_packed, n, d);
  for (int8_t& v : q) v = static_cast<int8_t>(v + x_code_offset);
  return q;
}
std::vector<int8_t> W4A4Saved::w_q() const { return unpack_rows(w_q_packed, c, d); }

void hq_linear_forward(const float* x, const float* w, const float* bias, int64_t n, int64_t d,
                       int64_t c, float sx, float sw, const HqLinearConfig& cfg,
                       const PhiloxKey& key, float* y, HqLinearSaved* saved) {
  check_dims(n, d, c, "hq_linear_forward");
  check_scale(sx, "activation step size sx");
  check_scale(sw, "weight step size sw");
  check_s4_range(cfg.range, "hq_linear_forward: code range");
  NB_CHECK(cfg.range.qmin < 0 && cfg.range.qmax > 0,
           "hq_linear_forward: LSQ needs qmin < 0 < qmax, got [" << cfg.range.qmin << ", "
                                                                 << cfg.range.qmax
                                                                 << "]; use [-7, 7] or [-8, 7]");
  NB_CHECK(x != nullptr && w != nullptr && y != nullptr,
           "hq_linear_forward: x, w and y must not be null (bias may be)");
  // Side channel: x_r draws indices [0, N·D), w_r draws [N·D, N·D + C·D) of one stream.
  const PhiloxKey resid_key = with_role(key, RngRole::rounding);
  std::vector<int8_t> x_q(static_cast<size_t>(n * d)), w_q(static_cast<size_t>(c * d));
  std::vector<int8_t> x_e(saved ? x_q.size() : 0), w_e(saved ? w_q.size() : 0);
  hq_quantize_with_residual(x, n, d, cfg.block, sx, cfg.range, resid_key, 0, x_q.data(),
                            saved ? x_e.data() : nullptr);
  hq_quantize_with_residual(w, c, d, cfg.block, sw, cfg.range, resid_key,
                            static_cast<uint64_t>(n * d), w_q.data(),
                            saved ? w_e.data() : nullptr);

  // y = float(x_q·w_qᵀ) · (sx·sw) + b
  detail::UninitBuffer<int32_t> acc(n * c);
  gemm_s8s8_s32_tn(x_q.data(), w_q.data(), n, c, d, acc.data());
  DequantEpilogue epi;
  epi.scale_a = &sx;
  epi.scale_b = &sw;
  epi.bias = bias;
  epilogue_dequant(acc.data(), n, c, epi, y);

  if (saved != nullptr) {
    HqLinearSaved& s = *saved;
    s.n = n, s.d = d, s.c = c, s.sx = sx, s.sw = sw;
    s.block = cfg.block;
    s.range = cfg.range;
    s.x_q_packed = pack_rows(x_q.data(), n, d);
    s.x_e_packed = pack_rows(x_e.data(), n, d);
    s.w_q_packed = pack_rows(w_q.data(), c, d);
    s.w_e_packed = pack_rows(w_e.data(), c, d);
  }
}

HqLinearGrads hq_linear_backward(const float* dy, const HqLinearSaved& saved,
                                 const HqLinearConfig& cfg, const PhiloxKey& key) {
  const int64_t n = saved.n, d = saved.d, c = saved.c;
  check_dims(n, d, c, "hq_linear_backward");
  const size_t x_bytes = static_cast<size_t>(n * ((d + 1) / 2));
  const size_t w_bytes = static_cast<size_t>(c * ((d + 1) / 2));
  NB_CHECK(saved.x_q_packed.size() == x_bytes && saved.x_e_packed.size() == x_bytes &&
               saved.w_q_packed.size() == w_bytes && saved.w_e_packed.size() == w_bytes,
           "hq_linear_backward: the saved state does not match N=" << n << " D=" << d << " C=" << c
                                                                   << "; pass the state that "
                                                                      "hq_linear_forward filled");
  NB_CHECK(cfg.block == saved.block && cfg.range.qmin == saved.range.qmin &&
               cfg.range.qmax == saved.range.qmax,
           "hq_linear_backward: config (block " << cfg.block << ", range [" << cfg.range.qmin
                                                << ", " << cfg.range.qmax
                                                << "]) differs from the forward's (block "
                                                << saved.block << ", range [" << saved.range.qmin
                                                << ", " << saved.range.qmax
                                                << "]); pass the forward's config");
  NB_CHECK(cfg.sample_fraction > 0.0 && cfg.sample_fraction <= 1.0,
           "sample_fraction " << cfg.sample_fraction << " must be in (0, 1]");
  NB_CHECK(dy != nullptr, "hq_linear_backward: dy is null; pass the [N, C] output gradient");
  // The exact step sums (lsq_backward_exact): the dw product sums N terms of |code| ≤ 127·8
  // (sampled: 2N re-quantized rows), the dx product C terms of 90·8.
  NB_CHECK(lsq_exact_sum_fits(c * d, 2.0 * 127 * 8 * static_cast<double>(n)) &&
               lsq_exact_sum_fits(n * d, 90.0 * 8 * static_cast<double>(c)),
           "hq_linear_backward: N=" << n << ", D=" << d << ", C=" << c
                                    << " is too large for the exact int64 LSQ step sums "
                                       "(N·D·C must stay below about 4·10^13); split the batch");
  HqLinearGrads g;
  const std::vector<int8_t> x_q = saved.x_q(), w_q = saved.w_q();

  // 1. Bit split dy once; both products share it (the released code's choice, B.7).
  std::vector<int8_t> hi(static_cast<size_t>(n * c)), lo(hi.size()), comb(hi.size());
  const float s = bitsplit(dy, n, c, with_role(key, RngRole::grad_output_rounding), hi.data(),
                           lo.data(), comb.data());
  g.grad_scale = s;

  std::vector<float> dw_t(static_cast<size_t>(c * d)), dx_t(static_cast<size_t>(n * d));
  // dw (both variants) and the keep-all dx are integer products with one per-tensor scale:
  // their LSQ step sums are taken on the integers (lsq_backward_exact); the sampled dx's rows
  // carry 1/p weights, so its sum is the fp64 one over the dequantized values.
  detail::UninitBuffer<int32_t> acc_w(c * d);
  std::vector<int32_t> acc_x;  // keep-all only
  float scale_w = 0, scale_x = 0;
  if (cfg.lss == LssMode::keep_nonzero) {
    // Every split row kept with p = 1, so the two INT4 products collapse exactly into one
    // INT8 GEMM on 14·hi + lo (design.md). Zero rows add nothing; they are only counted.
    std::vector<float> scores(static_cast<size_t>(2 * n)), p(scores.size());
    std::vector<uint8_t> keep(scores.size());
    leverage_scores(hi.data(), lo.data(), n, c, s, nullptr, scores.data());
    g.kept_rows_dx = g.kept_rows_dw = keep_nonzero_rows(scores.data(), 2 * n, p.data(), keep.data());

    // dw_t = float(combᵀ·x_q) · (s·sx): A = combᵀ [C, N], B = x_qᵀ [D, N]
    const std::vector<int8_t> comb_t = transpose_s8(comb, n, c);
    const std::vector<int8_t> x_q_t = transpose_s8(x_q, n, d);
    gemm_s8s8_s32_tn(comb_t.data(), x_q_t.data(), c, d, n, acc_w.data());
    scale_w = s * saved.sx;  // the epilogue's fp32 product sa·sb
    DequantEpilogue epi_w;
    epi_w.scale_a = &s;
    epi_w.scale_b = &saved.sx;
    epilogue_dequant(acc_w.data(), c, d, epi_w, dw_t.data());

    // dx_t = float(comb·w_q) · (s·sw): A = comb [N, C], B = w_qᵀ [D, C]
    const std::vector<int8_t> w_q_t = transpose_s8(w_q, c, d);
    acc_x.resize(static_cast<size_t>(n * d));
    gemm_s8s8_s32_tn(comb.data(), w_q_t.data(), n, d, c, acc_x.data());
    scale_x = s * saved.sw;
    DequantEpilogue epi_x;
    epi_x.scale_a = &s;
    epi_x.scale_b = &saved.sw;
    epilogue_dequant(acc_x.data(), n, d, epi_x, dx_t.data());
  } else {
    const double budget = cfg.sample_fraction * static_cast<double>(2 * n);
    // Split row i < N is hi row i (value scale 14s); row N + i is lo row i (scale s).
    auto row_scale = [&](int64_t i) -> double {
      return i < n ? static_cast<double>(kBitSplitBase) * s : static_cast<double>(s);
    };

    // dw = Σ_kept (β_i·s/p_i)·G↕_iᵀ·X̂↕_i. 1/p varies along dw's K (tokens), so it cannot be
    // an epilogue scale (algorithms.md F.6): it is folded into the codes, re-quantized to
    // int8 with one scale t (requantize_sampled_rows, unbiased), and dw is one INT8 GEMM:
    //   dw_t = float(Σ_kept q_iᵀ·x_q(i mod N)) · ((t·s)·sx)
    std::vector<float> x_norm(static_cast<size_t>(n));
    row_norms_s8(x_q.data(), n, d, x_norm.data());
    for (float& v : x_norm) v *= saved.sx;
    std::vector<float> sc_w(static_cast<size_t>(2 * n)), p_w(sc_w.size());
    std::vector<uint8_t> keep_w(sc_w.size());
    leverage_scores(hi.data(), lo.data(), n, c, s, x_norm.data(), sc_w.data());
    fit_probabilities(sc_w.data(), 2 * n, budget, p_w.data());
    const int64_t k_w =
        sample_rows(p_w.data(), 2 * n, with_role(key, RngRole::sample_dw), keep_w.data());
    g.kept_rows_dw = k_w;
    std::vector<int8_t> q_w(static_cast<size_t>(2 * n * c));
    const float t = requantize_sampled_rows(hi.data(), lo.data(), n, c, p_w.data(), keep_w.data(),
                                            with_role(key, RngRole::sample_dw_rounding),
                                            q_w.data());
    const float ts = t * s;  // t·s: one fp32 product (the device's scalar, then the epilogue)
    scale_w = ts * saved.sx;
    if (k_w == 0) std::fill(acc_w.data(), acc_w.data() + c * d, 0);  // dw_t stays 0
    if (k_w > 0) {
      // A = the kept rows' q, transposed [C, k]; B = their x codes, transposed [D, k]
      // (kept rows in ascending i, as the device's compaction; the integer sum is exact in
      // any order anyway).
      std::vector<int8_t> a_t(static_cast<size_t>(c * k_w)), b_t(static_cast<size_t>(d * k_w));
      int64_t j = 0;
      for (int64_t i = 0; i < 2 * n; ++i) {
        if (!keep_w[static_cast<size_t>(i)]) continue;
        const int8_t* qi = q_w.data() + i * c;
        const int8_t* xi = x_q.data() + (i % n) * d;
        for (int64_t col = 0; col < c; ++col) a_t[static_cast<size_t>(col * k_w + j)] = qi[col];
        for (int64_t kk = 0; kk < d; ++kk) b_t[static_cast<size_t>(kk * k_w + j)] = xi[kk];
        ++j;
      }
      gemm_s8s8_s32_tn(a_t.data(), b_t.data(), c, d, k_w, acc_w.data());
      DequantEpilogue epi_w;
      epi_w.scale_a = &ts;
      epi_w.scale_b = &saved.sx;
      epilogue_dequant(acc_w.data(), c, d, epi_w, dw_t.data());
    }

    // dx: split rows i and N+i both feed output row i, so 1/p is a per-row scale of the
    // integer products hi·w_q and lo·w_q (an epilogue scale on the GPU).
    std::vector<float> sc_x(static_cast<size_t>(2 * n)), p_x(sc_x.size());
    std::vector<uint8_t> keep_x(sc_x.size());
    leverage_scores(hi.data(), lo.data(), n, c, s, nullptr, sc_x.data());
    fit_probabilities(sc_x.data(), 2 * n, budget, p_x.data());
    g.kept_rows_dx = sample_rows(p_x.data(), 2 * n, with_role(key, RngRole::sample_dx), keep_x.data());
    const std::vector<int8_t> w_q_t = transpose_s8(w_q, c, d);
    detail::UninitBuffer<int32_t> acc_hi(n * d), acc_lo(n * d);
    gemm_s8s8_s32_tn(hi.data(), w_q_t.data(), n, d, c, acc_hi.data());
    gemm_s8s8_s32_tn(lo.data(), w_q_t.data(), n, d, c, acc_lo.data());
    parallel_for(n, [&](int64_t r) {
      const auto ih = static_cast<size_t>(r), il = static_cast<size_t>(n + r);
      const double wh = keep_x[ih] ? row_scale(r) / p_x[ih] : 0.0;
      const double wl = keep_x[il] ? row_scale(n + r) / p_x[il] : 0.0;
      for (int64_t k = 0; k < d; ++k) {
        const auto e = static_cast<size_t>(r * d + k);
        dx_t[e] = static_cast<float>((wh * acc_hi[e] + wl * acc_lo[e]) * saved.sw);
      }
    }, d);
  }

  // 2. LSQ step-size gradients and STE masks, in the transformed domain, from the side
  //    channel: the masks are exact, the δ sums unbiased (see lsq_residual_encode).
  const std::vector<int8_t> x_e = saved.x_e(), w_e = saved.w_e();
  // The two fp64 sums are serial chains (index order is the spec) but independent of each
  // other: one thread each. An error is rethrown after the loop, dx's first, as in sequence.
  std::exception_ptr errors[2];
  parallel_for(2, [&](int64_t which) {
    try {
      if (which == 0) {
        g.dsx = acc_x.empty()
                    ? lsq_backward_coded(dx_t.data(), x_q.data(), x_e.data(), n * d, cfg.range,
                                         dx_t.data())
                    : lsq_backward_exact(acc_x.data(), scale_x, dx_t.data(), x_q.data(),
                                         x_e.data(), n * d, cfg.range, dx_t.data());
      } else {
        g.dsw = lsq_backward_exact(acc_w.data(), scale_w, dw_t.data(), w_q.data(), w_e.data(),
                                   c * d, cfg.range, dw_t.data());
      }
    } catch (...) {
      errors[which] = std::current_exception();
    }
  }, (n + c) * d);
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);

  // 3. Back to the original domain: ·Hᵀ, and H is symmetric, so the same transform.
  hadamard_blocks(dx_t.data(), n, d, cfg.block);
  hadamard_blocks(dw_t.data(), c, d, cfg.block);
  g.dx = std::move(dx_t);
  g.dw = std::move(dw_t);

  // 4. db = Σ_rows dy (fp64 sums).
  g.db.assign(static_cast<size_t>(c), 0.0f);
  detail::column_sums(dy, n, c, g.db.data());
  return g;
}

void w4a4_linear_forward(const float* x, const float* w, const float* bias, int64_t n,
                         int64_t d, int64_t c, const W4A4Config& cfg, float* y,
                         W4A4Saved* saved) {
  check_dims(n, d, c, "w4a4_linear_forward");
  NB_CHECK(x != nullptr && w != nullptr && y != nullptr,
           "w4a4_linear_forward: x, w and y must not be null (bias may be)");
  if (!cfg.asymmetric) check_s4_range(cfg.act_range, "w4a4_linear_forward: activation range");
  check_s4_range(cfg.weight_range, "w4a4_linear_forward: weight range");
  const QRange act_range = cfg.asymmetric ? kUint4 : cfg.act_range;
  std::vector<int8_t> x_q(static_cast<size_t>(n * d));
  std::vector<float> x_scale(static_cast<size_t>(n));
  std::vector<int32_t> x_zero(cfg.asymmetric ? static_cast<size_t>(n) : 0, 0);
  int32_t* zx = cfg.asymmetric ? x_zero.data() : nullptr;
  const PhiloxKey unused{};  // nearest rounding draws no random numbers
  compute_scales(x, n, d, Granularity::row, 0, act_range, cfg.asymmetric, x_scale.data(), zx);
  quantize(x, n, d, Granularity::row, 0, x_scale.data(), zx, act_range, Rounding::nearest,
           unused, x_q.data());

  std::vector<int8_t> w_q(static_cast<size_t>(c * d));
  std::vector<float> w_scale(static_cast<size_t>(c));
  compute_scales(w, c, d, Granularity::row, 0, cfg.weight_range, false, w_scale.data(), nullptr);
  quantize(w, c, d, Granularity::row, 0, w_scale.data(), nullptr, cfg.weight_range,
           Rounding::nearest, unused, w_q.data());

  // y = float(acc − zx[n]·Σ_k w_q[c,k]) · (sx[n]·sw[c]) + b[c]
  detail::UninitBuffer<int32_t> acc(n * c);
  std::vector<int32_t> w_sum(static_cast<size_t>(c));
  gemm_s8s8_s32_tn(x_q.data(), w_q.data(), n, c, d, acc.data());
  row_sums_s8(w_q.data(), c, d, w_sum.data());
  DequantEpilogue epi;
  epi.scale_a = x_scale.data();
  epi.a_per_row = true;
  epi.scale_b = w_scale.data();
  epi.b_per_col = true;
  epi.bias = bias;
  epi.zp_a = zx;
  epi.b_sum = zx ? w_sum.data() : nullptr;
  epilogue_dequant(acc.data(), n, c, epi, y);

  if (saved != nullptr) {
    W4A4Saved& s = *saved;
    s.n = n, s.d = d, s.c = c;
    // Asymmetric codes [0, 15] are stored shifted by −8 so that they pack as s4.
    s.x_code_offset = cfg.asymmetric ? 8 : 0;
    if (s.x_code_offset != 0)
      for (int8_t& v : x_q) v = static_cast<int8_t>(v - s.x_code_offset);
    s.x_q_packed = pack_rows(x_q.data(), n, d);
    s.x_scale = std::move(x_scale);
    s.x_zero = std::move(x_zero);
    s.w_q_packed = pack_rows(w_q.data(), c, d);
    s.w_scale = std::move(w_scale);
  }
}

void w4a4_linear_backward(const float* dy, const W4A4Saved& saved, float* dx, float* dw,
                          float* db) {
  const int64_t n = saved.n, d = saved.d, c = saved.c;
  check_dims(n, d, c, "w4a4_linear_backward");
  NB_CHECK(saved.x_scale.size() == static_cast<size_t>(n) &&
               saved.w_scale.size() == static_cast<size_t>(c) &&
               (saved.x_zero.empty() || saved.x_zero.size() == static_cast<size_t>(n)),
           "w4a4_linear_backward: the saved scales do not match N=" << n << " C=" << c
                                                                    << "; pass the state that "
                                                                       "w4a4_linear_forward filled");
  NB_CHECK(dy != nullptr && dw != nullptr,
           "w4a4_linear_backward: dy and dw must not be null (dx and db may be)");
  const int32_t* zx = saved.x_zero.empty() ? nullptr : saved.x_zero.data();
  const std::vector<int8_t> x_q = saved.x_q(), w_q = saved.w_q();
  std::vector<float> x_hat(static_cast<size_t>(n * d)), w_hat(static_cast<size_t>(c * d));
  dequantize(x_q.data(), n, d, Granularity::row, 0, saved.x_scale.data(), zx, x_hat.data());
  dequantize(w_q.data(), c, d, Granularity::row, 0, saved.w_scale.data(), nullptr, w_hat.data());
  // Straight-through estimator: the rounding is treated as identity, so the gradients are
  // those of y = x̂·ŵᵀ + b with respect to x̂ and ŵ:
  //   dx[r, k] = Σ_j dy[r, j]·ŵ[j, k],  dw[j, k] = Σ_r dy[r, j]·x̂[r, k]
  // each an fp64 sum in index order that skips zero gradients, rounded once to fp32.
  if (dx != nullptr) {
    detail::parallel_chunks(n, kCombRows, c * d, [&](int64_t r0, int64_t r1) {
      fp64_combinations(dy + r0 * c, c, 1, r1 - r0, w_hat.data(), c, d, dx + r0 * d);
    });
  }
  detail::parallel_chunks(c, kCombRows, n * d, [&](int64_t j0, int64_t j1) {
    fp64_combinations(dy + j0, 1, c, j1 - j0, x_hat.data(), n, d, dw + j0 * d);
  });
  if (db != nullptr) detail::column_sums(dy, n, c, db);
}

}  // namespace nibble::ref
