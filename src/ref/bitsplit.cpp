// CPU reference of bit splitting (algorithms.md B.4) and leverage-score sampling (B.5-B.8).
// fp32 arithmetic in exactly the order of the header formulas, so the CUDA twin can
// reproduce the integer codes and the masks bit for bit.
#include "ref/bitsplit.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "nibble/error.h"
#include "nibble/parallel.h"

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

// Row norms in fp64, rounded once to fp32: sqrt(Σ_c q[r,c]²).
float row_norm_s8(const int8_t* row, int64_t cols) {
  double sum = 0.0;
  for (int64_t c = 0; c < cols; ++c) sum += static_cast<double>(row[c]) * row[c];
  return static_cast<float>(std::sqrt(sum));
}

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
  // One pass: reject non-finite values (first bad index) and find min/max.
  float g_min = 0.0f;  // clamped ≤ 0
  float g_max = 0.0f;  // clamped ≥ 0
  for (int64_t i = 0; i < rows * cols; ++i) {
    NB_CHECK(std::isfinite(g[i]), "bitsplit: g[" << i / cols << ", " << i % cols << "] = " << g[i]
                                                 << " is not finite; the gradient diverged "
                                                    "upstream (lower the learning rate or "
                                                    "check the loss)");
    g_min = std::min(g_min, g[i]);
    g_max = std::max(g_max, g[i]);
  }
  // m = max(|min − 1e-8|, |max + 1e-8|): the 1e-8 keeps s > 0 for an all-zero gradient.
  const float m = std::max(std::fabs(g_min - 1e-8f), std::fabs(g_max + 1e-8f));
  // s = 2m / 196 (fp32, multiply first)
  const float s = 2.0f * m / static_cast<float>(kBitSplitLevels);
  const float base = static_cast<float>(kBitSplitBase);
  const float half = static_cast<float>(kBitSplitHalf);
  parallel_rows(rows, rows * cols, [&](int64_t r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t idx = r * cols + c;
      // T = g / s;  hi = clamp(rne(T / 14), −6, 6)   (rintf: half to even)
      const float t = g[idx] / s;
      const float h = std::clamp(std::nearbyint(t / base), -half, half);
      // lo = clamp(floor((T − 14·hi) + u), −6, 6),  u = philox_uniform(key, r·cols + c)
      const float u = philox_uniform(key, static_cast<uint64_t>(idx));
      const float l = std::clamp(std::floor((t - base * h) + u), -half, half);
      const int32_t hq = static_cast<int32_t>(h);
      const int32_t lq = static_cast<int32_t>(l);
      hi[idx] = static_cast<int8_t>(hq);
      lo[idx] = static_cast<int8_t>(lq);
      if (combined != nullptr) combined[idx] = static_cast<int8_t>(kBitSplitBase * hq + lq);
    }
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

}  // namespace nibble::ref
