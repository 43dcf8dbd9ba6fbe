// CPU reference of bit splitting (algorithms.md B.4) and leverage-score sampling (B.5-B.8).
// fp32 arithmetic in exactly the order of the header formulas, so the CUDA twin can
// reproduce the integer codes and the masks bit for bit.
#include "ref/bitsplit.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "nibble/error.h"
#include "nibble/parallel.h"
#include "ref/simd.h"

namespace nibble::ref {
namespace {


// Rejects NaN, ±Inf and negative leverage scores, naming the first bad index.
void check_scores(const char* op, const float* scores, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    NB_CHECK(std::isfinite(scores[i]) && scores[i] >= 0.0f,
             op << ": scores[" << i << "] = " << scores[i]
                << " is not a finite non-negative number; leverage scores are products of row "
                   "norms, check the gradient and activation inputs");
  }
}

// Row norms in fp64, rounded once to fp32: sqrt(Σ_c q[r,c]²). Every partial sum of these
// integer squares is an integer below 2^53, exact in fp64 in any order, so the sum is taken
// in integers (which vectorize): int32 over blocks of 2^16 squares (≤ 2^30), then int64.
float row_norm_s8(const int8_t* row, int64_t cols) {
  constexpr int64_t kBlock = int64_t{1} << 16;
  int64_t sum = 0;
  for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
    const int64_t c1 = std::min(cols, c0 + kBlock);
    int32_t part = 0;
    for (int64_t c = c0; c < c1; ++c) part += static_cast<int32_t>(row[c]) * row[c];
    sum += part;
  }
  return static_cast<float>(std::sqrt(static_cast<double>(sum)));
}

// min(0, min g) and max(0, max g) over n values; false if any value is not finite.
// min and max are exact, so any split of the values into runs or lanes gives the same
// extremes up to the sign of a zero result, which s = 2·max(|min − 1e-8|, |max + 1e-8|)/196
// does not see.
bool finite_min_max_plain(const float* g, int64_t n, float* g_min, float* g_max) {
  bool finite = true;
  float lo = 0.0f, hi = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    finite = finite && std::isfinite(g[i]);
    lo = std::min(lo, g[i]);
    hi = std::max(hi, g[i]);
  }
  *g_min = lo;
  *g_max = hi;
  return finite;
}

#ifdef NB_HAVE_X86_DISPATCH
// finite_min_max_plain with 8-float vectors: min_ps(v, lo) is (v < lo ? v : lo), std::min's
// choice; the test for non-finite values looks for all exponent bits set.
NB_TARGET_AVX2 bool finite_min_max_avx2(const float* g, int64_t n, float* g_min, float* g_max) {
  __m256 lo = _mm256_setzero_ps(), hi = lo;
  __m256i bad = _mm256_setzero_si256();
  const __m256i exponent = _mm256_set1_epi32(0x7f800000);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(g + i);
    lo = _mm256_min_ps(v, lo);
    hi = _mm256_max_ps(v, hi);
    const __m256i e = _mm256_and_si256(_mm256_castps_si256(v), exponent);
    bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(e, exponent));
  }
  alignas(32) float lanes[16];
  _mm256_store_ps(lanes, lo);
  _mm256_store_ps(lanes + 8, hi);
  float tail_min = 0.0f, tail_max = 0.0f;
  const bool ok = finite_min_max_plain(g + i, n - i, &tail_min, &tail_max) &&
                  _mm256_testz_si256(bad, bad);
  for (int l = 0; l < 8; ++l) {
    tail_min = std::min(tail_min, lanes[l]);
    tail_max = std::max(tail_max, lanes[8 + l]);
  }
  *g_min = tail_min;
  *g_max = tail_max;
  return ok;
}
#endif

// The split of `count` elements with their uniforms u: the header's formulas, per element.
// scale1 = 196 / (2m), computed once by the caller; the codes come from it.
void split_plain(const float* g, const float* u, int64_t count, float scale1, int8_t* hi,
                 int8_t* lo, int8_t* combined) {
  const float base = static_cast<float>(kBitSplitBase);
  const float half = static_cast<float>(kBitSplitHalf);
  for (int64_t i = 0; i < count; ++i) {
    // T = g·scale1;  hi = clamp(rne(T·fl(1/14)), −6, 6)   (rintf: half to even)
    const float t = g[i] * scale1;
    const float h = std::clamp(std::nearbyint(t * kBitSplitInvBase), -half, half);
    // ρ = T − 14·hi (exact: 14·hi is, and Sterbenz); lo = clamp(floor(ρ + u), −6, 6) of the
    // EXACT sum (the fp64 sum may round but never across an integer: u is on a 2^-16 grid)
    const float rho = t - base * h;
    const double y = std::floor(static_cast<double>(rho) + static_cast<double>(u[i]));
    const float l = std::clamp(static_cast<float>(y), -half, half);
    const int32_t hq = static_cast<int32_t>(h);
    const int32_t lq = static_cast<int32_t>(l);
    hi[i] = static_cast<int8_t>(hq);
    lo[i] = static_cast<int8_t>(lq);
    if (combined != nullptr) combined[i] = static_cast<int8_t>(kBitSplitBase * hq + lq);
  }
}

#ifdef NB_HAVE_X86_DISPATCH
// split_plain on 32 elements per step, the same operations per lane (ref/simd.h); the floor of
// ρ + u in fp64, 4 lanes at a time.
NB_TARGET_AVX2 void split_avx2(const float* g, const float* u, int64_t count, float scale1,
                               int8_t* hi, int8_t* lo, int8_t* combined) {
  const __m256 vscale = _mm256_set1_ps(scale1);
  const __m256 inv_base = _mm256_set1_ps(kBitSplitInvBase);
  const __m256 base = _mm256_set1_ps(static_cast<float>(kBitSplitBase));
  const __m256 half = _mm256_set1_ps(static_cast<float>(kBitSplitHalf));
  const __m256 neg_half = _mm256_set1_ps(-static_cast<float>(kBitSplitHalf));
  const __m256i half_i = _mm256_set1_epi32(kBitSplitHalf);
  const __m256i neg_half_i = _mm256_set1_epi32(-kBitSplitHalf);
  const __m256i base_i = _mm256_set1_epi32(kBitSplitBase);
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    __m256i hq[4], lq[4], cq[4];
    for (int k = 0; k < 4; ++k) {
      const __m256 t = _mm256_mul_ps(_mm256_loadu_ps(g + i + 8 * k), vscale);
      const __m256 h =
          detail::clamp_ps(detail::nearbyint_ps(_mm256_mul_ps(t, inv_base)), neg_half, half);
      const __m256 rho = _mm256_sub_ps(t, _mm256_mul_ps(base, h));
      const __m256 uk = _mm256_loadu_ps(u + i + 8 * k);
      const __m128i y_lo = _mm256_cvtpd_epi32(_mm256_floor_pd(
          _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(rho)),
                        _mm256_cvtps_pd(_mm256_castps256_ps128(uk)))));
      const __m128i y_hi = _mm256_cvtpd_epi32(_mm256_floor_pd(
          _mm256_add_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(rho, 1)),
                        _mm256_cvtps_pd(_mm256_extractf128_ps(uk, 1)))));
      // integer clamp = the fp32 clamp of the integral fp64 floor (|ρ + u| < 16)
      lq[k] = _mm256_min_epi32(_mm256_max_epi32(_mm256_set_m128i(y_hi, y_lo), neg_half_i), half_i);
      hq[k] = _mm256_cvtps_epi32(h);  // integers: the conversion is exact
      cq[k] = _mm256_add_epi32(_mm256_mullo_epi32(base_i, hq[k]), lq[k]);
    }
    detail::store_s8x32(hi + i, hq);
    detail::store_s8x32(lo + i, lq);
    if (combined != nullptr) detail::store_s8x32(combined + i, cq);
  }
  split_plain(g + i, u + i, count - i, scale1, hi + i, lo + i,
              combined != nullptr ? combined + i : nullptr);
}
#endif

}  // namespace

float bitsplit(const float* g, int64_t rows, int64_t cols, const PhiloxKey& key, int8_t* hi,
               int8_t* lo, int8_t* combined) {
  NB_CHECK(rows > 0 && cols > 0,
           "bitsplit: shape [" << rows << ", " << cols << "] must have positive rows and cols");
  NB_CHECK(g != nullptr && hi != nullptr && lo != nullptr,
           "bitsplit: null pointer for " << (g == nullptr    ? "g"
                                             : hi == nullptr ? "hi"
                                                             : "lo")
                                         << "; pass [rows, cols] buffers (combined may be null)");
  [[maybe_unused]] const bool avx2 = detail::use_avx2();
  // One pass for min/max and finiteness; on a failure, a second finds the first bad index.
  float g_min = 0.0f;  // clamped ≤ 0
  float g_max = 0.0f;  // clamped ≥ 0
  // Runs of 2^15 values (in parallel for large g: detail::scan_runs), merged in run order;
  // min/max are exact.
  constexpr int64_t kRun = int64_t{1} << 15;
  const int64_t n_runs = (rows * cols + kRun - 1) / kRun;
  std::vector<float> run_min(static_cast<size_t>(n_runs)), run_max(run_min.size());
  std::vector<uint8_t> run_ok(run_min.size());
  detail::scan_runs(rows * cols, kRun, [&](int64_t i0, int64_t i1) {
    const auto run = static_cast<size_t>(i0 / kRun);
#ifdef NB_HAVE_X86_DISPATCH
    if (avx2) {
      run_ok[run] = finite_min_max_avx2(g + i0, i1 - i0, &run_min[run], &run_max[run]);
      return;
    }
#endif
    run_ok[run] = finite_min_max_plain(g + i0, i1 - i0, &run_min[run], &run_max[run]);
  });
  bool finite = true;
  for (size_t run = 0; run < run_min.size(); ++run) {
    finite = finite && run_ok[run] != 0;
    g_min = std::min(g_min, run_min[run]);
    g_max = std::max(g_max, run_max[run]);
  }
  if (!finite) {
    for (int64_t i = 0; i < rows * cols; ++i) {
      NB_CHECK(std::isfinite(g[i]), "bitsplit: g[" << i / cols << ", " << i % cols << "] = " << g[i]
                                                   << " is not finite; the gradient diverged "
                                                      "upstream (lower the learning rate or "
                                                      "check the loss)");
    }
  }
  // m = max(|min − 1e-8|, |max + 1e-8|): the 1e-8 keeps s > 0 for an all-zero gradient.
  const float m = std::max(std::fabs(g_min - 1e-8f), std::fabs(g_max + 1e-8f));
  // s = 2m / 196 (fp32, multiply first): the dequantization scale returned to callers.
  const float s = 2.0f * m / static_cast<float>(kBitSplitLevels);
  // scale1 = 196 / (2m) (fp32, one division per tensor): the codes come from T = g·scale1.
  const float scale1 = static_cast<float>(kBitSplitLevels) / (2.0f * m);
  // Element idx = r·cols + c draws u = philox_uniform16(key, idx), so a chunk of whole rows
  // is one run of consecutive indices.
  const int64_t rows_per_chunk = std::max<int64_t>(1, 16384 / cols);
  detail::parallel_chunks(rows, rows_per_chunk, cols, [&](int64_t r0, int64_t r1) {
    const int64_t first = r0 * cols, count = (r1 - r0) * cols;
    std::vector<float> u(static_cast<size_t>(count));
    detail::philox_uniforms16(key, static_cast<uint64_t>(first), count, u.data());
    int8_t* comb = combined != nullptr ? combined + first : nullptr;
#ifdef NB_HAVE_X86_DISPATCH
    if (avx2) {
      split_avx2(g + first, u.data(), count, scale1, hi + first, lo + first, comb);
      return;
    }
#endif
    split_plain(g + first, u.data(), count, scale1, hi + first, lo + first, comb);
  });
  return s;
}

void row_norms_s8(const int8_t* q, int64_t rows, int64_t cols, float* norms) {
  NB_CHECK(rows > 0 && cols > 0,
           "row_norms_s8: shape [" << rows << ", " << cols << "] must have positive rows and cols");
  NB_CHECK(q != nullptr && norms != nullptr,
           "row_norms_s8: null pointer for " << (q == nullptr ? "q" : "norms")
                                             << "; pass [rows, cols] codes and a [rows] output");
  parallel_rows(rows, rows * cols, [&](int64_t r) { norms[r] = row_norm_s8(q + r * cols, cols); });
}

void leverage_scores(const int8_t* hi, const int8_t* lo, int64_t rows, int64_t cols, float s,
                     const float* x_norm, float* scores) {
  NB_CHECK(rows > 0 && cols > 0, "leverage_scores: shape ["
                                     << rows << ", " << cols
                                     << "] must have positive rows and cols");
  NB_CHECK(hi != nullptr && lo != nullptr && scores != nullptr,
           "leverage_scores: null pointer for "
               << (hi == nullptr   ? "hi"
                   : lo == nullptr ? "lo"
                                   : "scores")
               << "; pass [rows, cols] codes and a [2·rows] output (x_norm may be null)");
  NB_CHECK(std::isfinite(s) && s > 0.0f,
           "leverage_scores: scale s = " << s
                                         << " must be finite and positive; pass the value "
                                            "bitsplit returned");
  if (x_norm != nullptr) {
    for (int64_t r = 0; r < rows; ++r)
      NB_CHECK(std::isfinite(x_norm[r]) && x_norm[r] >= 0.0f,
               "leverage_scores: x_norm[" << r << "] = " << x_norm[r]
                                          << " must be finite and non-negative (‖x_q row‖·sx)");
  }
  const float hi_scale = static_cast<float>(kBitSplitBase) * s;  // s↑ = 14·s
  parallel_rows(rows, 2 * rows * cols, [&](int64_t r) {
    // a = ‖hi_r‖·(14s), e = ‖lo_r‖·s; for dw both are multiplied by x_norm[r] (fp32).
    float a = row_norm_s8(hi + r * cols, cols) * hi_scale;
    float e = row_norm_s8(lo + r * cols, cols) * s;
    if (x_norm != nullptr) {
      a *= x_norm[r];
      e *= x_norm[r];
    }
    scores[r] = a;
    scores[rows + r] = e;
  });
}

void fit_probabilities(const float* scores, int64_t n, double budget, double* p) {
  NB_CHECK(n > 0, "fit_probabilities: n = " << n << " must be positive");
  NB_CHECK(scores != nullptr && p != nullptr, "fit_probabilities: null pointer for "
                                                  << (scores == nullptr ? "scores" : "p")
                                                  << "; pass [n] buffers");
  NB_CHECK(std::isfinite(budget) && budget >= 0.0,
           "fit_probabilities: budget = " << budget
                                          << " must be finite and >= 0 (the expected kept count)");
  check_scores("fit_probabilities", scores, n);
  int64_t nonzero = 0;
  for (int64_t i = 0; i < n; ++i) nonzero += scores[i] > 0.0f ? 1 : 0;
  // Budget covers every non-zero row: keep them all (this also covers all-zero scores).
  if (static_cast<double>(nonzero) <= budget) {
    for (int64_t i = 0; i < n; ++i) p[i] = scores[i] > 0.0f ? 1.0 : 0.0;
    return;
  }
  // Saturated rows F get p = 1; the rest share budget − |F| in proportion to c. Each round
  // saturates at least one more row or stops, and budget − |F| stays > 0 because more than
  // budget − |F| unsaturated rows are non-zero (their p sum to it, so fewer than that many
  // can reach 1). This equals the header's clamp-and-rescale loop, computed from c directly.
  std::vector<char> saturated(static_cast<size_t>(n), 0);
  int64_t n_saturated = 0;
  for (;;) {
    double rest_sum = 0.0;
    for (int64_t i = 0; i < n; ++i)
      if (!saturated[i]) rest_sum += scores[i];
    if (rest_sum <= 0.0) {  // unreachable by the argument above; guards the division
      for (int64_t i = 0; i < n; ++i) p[i] = saturated[i] ? 1.0 : 0.0;
      return;
    }
    const double lambda = (budget - static_cast<double>(n_saturated)) / rest_sum;
    bool grew = false;
    for (int64_t i = 0; i < n; ++i) {
      if (saturated[i]) {
        p[i] = 1.0;
        continue;
      }
      // p_i = c_i·(budget − |F|) / Σ_{j∉F} c_j
      p[i] = static_cast<double>(scores[i]) * lambda;
      if (p[i] >= 1.0) {
        p[i] = 1.0;
        saturated[i] = 1;
        ++n_saturated;
        grew = true;
      }
    }
    if (!grew) return;
  }
}

void fit_probabilities(const float* scores, int64_t n, double budget, float* p) {
  NB_CHECK(p != nullptr, "fit_probabilities: null pointer for p; pass an [n] buffer");
  std::vector<double> p64(static_cast<size_t>(std::max<int64_t>(n, 0)));
  fit_probabilities(scores, n, budget, p64.data());
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(p64[i]);
}

int64_t sample_rows(const float* p, int64_t n, const PhiloxKey& key, uint8_t* keep) {
  NB_CHECK(n > 0, "sample_rows: n = " << n << " must be positive");
  NB_CHECK(p != nullptr && keep != nullptr, "sample_rows: null pointer for "
                                                << (p == nullptr ? "p" : "keep")
                                                << "; pass [n] buffers");
  for (int64_t i = 0; i < n; ++i)
    NB_CHECK(p[i] >= 0.0f && p[i] <= 1.0f,
             "sample_rows: p[" << i << "] = " << p[i]
                               << " is not a probability in [0, 1]; use fit_probabilities");
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    // keep_i = u_i < p_i  (u on a 2^-24 grid in [0, 1): p = 1 always keeps, p = 0 never)
    keep[i] = philox_uniform(key, static_cast<uint64_t>(i)) < p[i] ? 1 : 0;
    kept += keep[i];
  }
  return kept;
}

int64_t keep_nonzero_rows(const float* scores, int64_t n, float* p, uint8_t* keep) {
  NB_CHECK(n > 0, "keep_nonzero_rows: n = " << n << " must be positive");
  NB_CHECK(scores != nullptr && p != nullptr && keep != nullptr,
           "keep_nonzero_rows: null pointer for " << (scores == nullptr ? "scores"
                                                      : p == nullptr    ? "p"
                                                                        : "keep")
                                                  << "; pass [n] buffers");
  check_scores("keep_nonzero_rows", scores, n);
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool nonzero = scores[i] > 0.0f;
    p[i] = nonzero ? 1.0f : 0.0f;
    keep[i] = nonzero ? 1 : 0;
    kept += keep[i];
  }
  return kept;
}

float requantize_sampled_rows(const int8_t* hi, const int8_t* lo, int64_t rows, int64_t cols,
                              const float* p, const uint8_t* keep, const PhiloxKey& key,
                              int8_t* q) {
  const char* fn = "requantize_sampled_rows";
  NB_CHECK(rows > 0 && cols > 0,
           fn << ": shape [" << rows << ", " << cols << "] must have positive rows and cols");
  NB_CHECK(hi != nullptr && lo != nullptr && p != nullptr && keep != nullptr && q != nullptr,
           fn << ": null pointer; pass hi, lo [rows, cols], p, keep [2·rows] and q [2·rows, cols]");
  const int64_t n_split = 2 * rows;
  // f_i = float(β_i) / p_i for the kept rows (0 marks a dropped row)
  std::vector<float> f(static_cast<size_t>(n_split), 0.0f);
  for (int64_t i = 0; i < n_split; ++i) {
    if (!keep[i]) continue;
    NB_CHECK(p[i] > 0.0f && p[i] <= 1.0f,
             fn << ": kept row " << i << " has p = " << p[i]
                << "; a kept row needs p in (0, 1] (sample_rows keeps only rows with u < p)");
    const float beta = i < rows ? static_cast<float>(kBitSplitBase) : 1.0f;
    f[static_cast<size_t>(i)] = beta / p[i];
  }
  auto code = [&](int64_t i, int64_t col) -> float {
    return static_cast<float>(i < rows ? hi[i * cols + col] : lo[(i - rows) * cols + col]);
  };
  // t = max |a| / 127 over the kept elements (max is exact: any order)
  float a_max = 0.0f;
  for (int64_t i = 0; i < n_split; ++i) {
    if (!keep[i]) continue;
    for (int64_t col = 0; col < cols; ++col)
      a_max = std::max(a_max, std::fabs(f[static_cast<size_t>(i)] * code(i, col)));
  }
  const float t = a_max > 0.0f ? a_max / 127.0f : 1.0f;
  NB_CHECK(std::isfinite(t),
           fn << ": the re-quantization scale t = max|β/p·code|/127 is not finite; a kept row "
                 "has a p so small that β/p overflows fp32 (check the leverage scores)");
  // q = clamp(floor(a / t + u), −127, 127); E_u[q] = a / t
  parallel_rows(n_split, n_split * cols, [&](int64_t i) {
    int8_t* qi = q + i * cols;
    if (!keep[i]) {
      std::fill(qi, qi + cols, int8_t{0});
      return;
    }
    std::vector<float> u(static_cast<size_t>(cols));
    detail::philox_uniforms(key, static_cast<uint64_t>(i * cols), cols, u.data());
    const float fi = f[static_cast<size_t>(i)];
    for (int64_t col = 0; col < cols; ++col) {
      const float a = fi * code(i, col);
      const float v = std::floor(a / t + u[static_cast<size_t>(col)]);
      qi[col] = static_cast<int8_t>(std::clamp(v, -127.0f, 127.0f));
    }
  });
  return t;
}

}  // namespace nibble::ref
