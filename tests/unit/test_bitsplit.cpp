// Bit splitting of the output gradient (algorithms.md B.4) and leverage-score sampling
// (B.5-B.8): codes, scale, reconstruction, unbiasedness of the stochastic low half, the
// probability fit and the unbiasedness of the sampled estimator.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "nibble/error.h"
#include "nibble/format.h"
#include "nibble/rng.h"
#include "ref/bitsplit.h"

using namespace nibble;

namespace {

// g[r, c] = row_scale[r]·N(0, 1) from Philox.
std::vector<float> random_gradient(int64_t rows, int64_t cols, uint64_t seed,
                                   const std::function<float(int64_t)>& row_scale) {
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  std::vector<float> g(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      g[r * cols + c] = row_scale(r) * philox_normal(key, static_cast<uint64_t>(r * cols + c));
  return g;
}

float unit_scale(int64_t) { return 1.0f; }

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// The fp32 quantities of the header formula for one element, recomputed independently.
struct SplitTerms {
  float t;    // T = g·scale1
  float h;    // round_half_even(T·fl(1/14)), before the clamp
  float rho;  // T − 14·clamp(h)
};
SplitTerms split_terms(float g, float scale1) {
  SplitTerms x;
  x.t = g * scale1;
  x.h = std::nearbyint(x.t * (1.0f / 14.0f));  // fl(1/14), a multiply (not T / 14)
  x.rho = x.t - 14.0f * std::clamp(x.h, -6.0f, 6.0f);
  return x;
}
// m = max(|min − 1e-8|, |max + 1e-8|) (min clamped ≤ 0, max ≥ 0) and scale1 = 196 / (2m).
float max_abs_guarded(const std::vector<float>& g) {
  float g_min = 0, g_max = 0;
  for (float v : g) g_min = std::min(g_min, v), g_max = std::max(g_max, v);
  return std::max(std::fabs(g_min - 1e-8f), std::fabs(g_max + 1e-8f));
}
float code_scale(const std::vector<float>& g) { return 196.0f / (2.0f * max_abs_guarded(g)); }
// lo before its clamp: floor(ρ + u) of the exact sum (fp64 holds ρ + u exactly here, |ρ| ≥ 2^-40
// or ρ = 0 in these tests; the header's argument covers every ρ).
float exact_floor(float rho, float u) { return static_cast<float>(std::floor(double(rho) + double(u))); }
// Neither half clamps: |h| ≤ 6, and ρ ∈ [−6, 6) so both outcomes floor(ρ) and floor(ρ) + 1 of
// the stochastic rounding lie in [−6, 6].
bool unclipped(const SplitTerms& x) {
  return std::fabs(x.h) <= 6.0f && x.rho >= -6.0f && x.rho < 6.0f;
}

}  // namespace

TEST(BitSplit, MatchesHeaderFormulaElementwise) {
  // Pins the exact fp32 formula and the Philox index r·cols + c that the CUDA twin must match.
  const int64_t rows = 37, cols = 53;
  const auto g = random_gradient(rows, cols, 11, unit_scale);
  const PhiloxKey key{99, 5, 2, RngRole::grad_output_rounding};
  std::vector<int8_t> hi(rows * cols), lo(rows * cols), comb(rows * cols);
  const float s = ref::bitsplit(g.data(), rows, cols, key, hi.data(), lo.data(), comb.data());
  const float m = max_abs_guarded(g);
  ASSERT_EQ(s, 2.0f * m / 196.0f);  // the returned (dequantization) scale
  const float scale1 = 196.0f / (2.0f * m);  // the code scale, one division per tensor
  ASSERT_NE(double(s) * double(scale1), 1.0) << "pick data whose two scales are not exact reciprocals";
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      const SplitTerms x = split_terms(g[i], scale1);
      const float u = philox_uniform16(key, static_cast<uint64_t>(i));  // 16-bit stream
      const int want_hi = static_cast<int>(std::clamp(x.h, -6.0f, 6.0f));
      const int want_lo = static_cast<int>(std::clamp(exact_floor(x.rho, u), -6.0f, 6.0f));
      ASSERT_EQ(hi[i], want_hi) << "(" << r << ", " << c << ")";
      ASSERT_EQ(lo[i], want_lo) << "(" << r << ", " << c << ")";
      ASSERT_EQ(comb[i], 14 * want_hi + want_lo) << "(" << r << ", " << c << ")";
    }
}

TEST(BitSplit, CodesInRangeScaleAndReconstruction) {
  // Heavy-tailed rows (scales 0.01 .. 100) so some elements clip and many are tiny.
  const int64_t rows = 64, cols = 96;
  const auto g = random_gradient(rows, cols, 21, [](int64_t r) {
    return static_cast<float>(std::pow(10.0, static_cast<double>(r % 5) - 2.0));
  });
  std::vector<int8_t> hi(rows * cols), lo(rows * cols), comb(rows * cols);
  const float s = ref::bitsplit(g.data(), rows, cols, {7, 1, 0, RngRole::grad_output_rounding},
                                hi.data(), lo.data(), comb.data());
  double amax = 0;
  for (float v : g) amax = std::max(amax, std::fabs(double(v)));
  // s = 2·max|g|/196; the 1e-8 guard and two fp32 roundings move it by < 1e-6 relative here.
  EXPECT_NEAR(s, 2.0 * amax / 196.0, 1e-6 * 2.0 * amax / 196.0);
  int64_t n_unclipped = 0;
  bool saw_hi_edge = false;
  const float scale1 = code_scale(g);
  for (int64_t i = 0; i < rows * cols; ++i) {
    ASSERT_GE(hi[i], -6);
    ASSERT_LE(hi[i], 6);
    ASSERT_GE(lo[i], -6);
    ASSERT_LE(lo[i], 6);
    ASSERT_EQ(comb[i], 14 * hi[i] + lo[i]);
    ASSERT_GE(comb[i], -90);
    ASSERT_LE(comb[i], 90);
    saw_hi_edge |= std::abs(hi[i]) == 6;
    if (!unclipped(split_terms(g[i], scale1))) continue;
    ++n_unclipped;
    // |T − (14hi + lo)| = |ρ − lo| ≤ 1 exactly, and s·T = g·(1 + ε), |ε| ≤ 3·2^-24 (the roundings
    // of s, scale1 and T), so |g − s·(14hi + lo)| ≤ s·(1 + 98·3·2^-24) ≤ s·(1 + 1e-5).
    const double err = std::fabs(double(g[i]) - double(s) * comb[i]);
    ASSERT_LE(err, double(s) * (1.0 + 1e-5)) << "element " << i;
  }
  EXPECT_GT(n_unclipped, rows * cols * 9 / 10);
  EXPECT_TRUE(saw_hi_edge) << "test data should reach the clamp of the high half";
}

TEST(BitSplit, HighHalfRoundsHalfToEvenAndClamps) {
  // max|g| = 98 gives s = 1 exactly (1e-8 vanishes in fp32), so T = g and integer T leaves
  // u no room: lo = floor(ρ + u) = ρ for integer ρ.
  // The last element, 0x1.87fffep+5 = 48.9999962, is where T·fl(1/14) (= 3.5 after rounding:
  // hi 4, ρ = −7.0000038, lo clamps to −6) and T/14 (= 3.4999997: hi 3, lo 6) part: it pins the
  // multiply (ref/bitsplit.h).
  const std::vector<float> g = {98, 7, 21, 35, -21, -35, 0, 13, -98, 91, 49, 0x1.87fffep+5f};
  //  T/14:                     7  .5 1.5 2.5 -1.5 -2.5 0 .93  -7   6.5 3.5  3.5 (T·fl(1/14))
  const std::vector<int> want_hi = {6, 0, 2, 2, -2, -2, 0, 1, -6, 6, 4, 4};
  //  ρ = T − 14·hi:            14  7  -7  7   7   -7  0 -1  -14   7  -7  -7.0000038 (clamped)
  const std::vector<int> want_lo = {6, 6, -6, 6, 6, -6, 0, -1, -6, 6, -6, -6};
  const int64_t n = static_cast<int64_t>(g.size());
  std::vector<int8_t> hi(n), lo(n), comb(n);
  const float s = ref::bitsplit(g.data(), 1, n, {3, 0, 0, RngRole::grad_output_rounding}, hi.data(),
                                lo.data(), comb.data());
  ASSERT_EQ(s, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(hi[i], want_hi[i]) << "g = " << g[i];
    EXPECT_EQ(lo[i], want_lo[i]) << "g = " << g[i];
  }
}

TEST(BitSplit, AllZeroGradientUsesTheGuardAndGivesZeroCodes) {
  std::vector<float> g(40, 0.0f);
  std::vector<int8_t> hi(40, 9), lo(40, 9);
  const float s = ref::bitsplit(g.data(), 4, 10, {1, 0, 0, RngRole::grad_output_rounding},
                                hi.data(), lo.data(), nullptr);
  EXPECT_EQ(s, 2.0f * 1e-8f / 196.0f);  // m = 1e-8, so no division by zero
  for (int i = 0; i < 40; ++i) {
    EXPECT_EQ(hi[i], 0);
    EXPECT_EQ(lo[i], 0);
  }
}

TEST(BitSplit, StochasticLowHalfIsUnbiased) {
  // For an unclipped element, lo = floor(ρ + u) is floor(ρ) + Bernoulli(f), f = ρ − floor(ρ),
  // so E[s·(14hi + lo)] = s·T ≈ g and Var[s·(14hi + lo)] = s²·f(1 − f). Over n independent
  // streams (step = 0, 1, ...) the mean's standard error is σ_j = s·sqrt(f(1 − f)/n).
  // Residual bias: u lives on a 2^-16 grid, so E[floor(ρ + u)] = floor(2^16·ρ)·2^-16 (Hermite's
  // identity: the floor of the exact sum), in (ρ − 2^-16, ρ]; and s·T = g·(1 + ε) with
  // |ε| ≤ 3·2^-24 (s, scale1 = 196/(2m) and T = fl(g·scale1) each round once), i.e. ≤ 98·3·2^-24·s
  // = 1.8e-5·s. Together < 2^-16·s + 1.8e-5·s < 3.5e-5·s, added as slack (5σ is ~0.01·s here).
  // Checks: every element within 5σ_j (+ slack); the sum of squared errors over the Σσ_j²
  // (mean 1; relative spread ≈ sqrt(2/#effective elements) ≈ 0.04 for ~1400 elements) within
  // [0.8, 1.2] at two n, which pins the 1/sqrt(n) decay: RMS(n1)/RMS(n2) ≈ sqrt(n2/n1).
  const int64_t rows = 32, cols = 64, count = rows * cols;
  const auto g = random_gradient(rows, cols, 31, unit_scale);
  std::vector<int8_t> hi(count), lo(count), comb(count);
  uint32_t next_step = 0;
  auto run = [&](int64_t n, double* rms) {
    std::vector<double> sum(count, 0.0);
    float s = 0;
    for (int64_t t = 0; t < n; ++t) {
      s = ref::bitsplit(g.data(), rows, cols, {2024, next_step++, 4, RngRole::grad_output_rounding},
                        hi.data(), lo.data(), comb.data());
      for (int64_t i = 0; i < count; ++i) sum[i] += double(s) * comb[i];
    }
    double sq_err = 0, sq_sigma = 0;
    int64_t used = 0;
    const float scale1 = code_scale(g);
    for (int64_t i = 0; i < count; ++i) {
      const SplitTerms x = split_terms(g[i], scale1);
      if (!unclipped(x)) continue;
      ++used;
      const double f = double(x.rho) - std::floor(double(x.rho));
      const double sigma = double(s) * std::sqrt(f * (1.0 - f) / double(n));
      const double err = sum[i] / double(n) - double(g[i]);
      EXPECT_LE(std::fabs(err), 5.0 * sigma + 3.5e-5 * s) << "element " << i << " n=" << n;
      sq_err += err * err;
      sq_sigma += sigma * sigma;
    }
    EXPECT_GT(used, count * 8 / 10);
    const double ratio = sq_err / sq_sigma;
    EXPECT_GT(ratio, 0.8) << "n=" << n;
    EXPECT_LT(ratio, 1.2) << "n=" << n;
    *rms = std::sqrt(sq_err / double(used));
  };
  double rms_small = 0, rms_large = 0;
  run(256, &rms_small);
  run(2048, &rms_large);
  // sqrt(2048/256) = 2.83; the ratio bounds above allow 2.83·sqrt(0.8/1.2) .. 2.83·sqrt(1.2/0.8).
  EXPECT_GT(rms_small / rms_large, 2.3);
  EXPECT_LT(rms_small / rms_large, 3.47);
}

TEST(BitSplit, RejectsNonFiniteGradientAndBadShapes) {
  std::vector<float> g(12, 0.5f);
  std::vector<int8_t> hi(12), lo(12);
  g[7] = NAN;  // row 1, col 3 of a [3, 4] tensor
  std::string msg =
      error_of([&] { ref::bitsplit(g.data(), 3, 4, {}, hi.data(), lo.data(), nullptr); });
  EXPECT_NE(msg.find("g[1, 3]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("not finite"), std::string::npos) << msg;
  g[7] = -INFINITY;
  msg = error_of([&] { ref::bitsplit(g.data(), 3, 4, {}, hi.data(), lo.data(), nullptr); });
  EXPECT_NE(msg.find("g[1, 3]"), std::string::npos) << msg;
  g[7] = 0.5f;
  msg = error_of([&] { ref::bitsplit(g.data(), 0, 4, {}, hi.data(), lo.data(), nullptr); });
  EXPECT_NE(msg.find("positive rows and cols"), std::string::npos) << msg;
  msg = error_of([&] { ref::bitsplit(g.data(), 3, -4, {}, hi.data(), lo.data(), nullptr); });
  EXPECT_NE(msg.find("positive rows and cols"), std::string::npos) << msg;
  msg = error_of([&] { ref::bitsplit(g.data(), 3, 4, {}, nullptr, lo.data(), nullptr); });
  EXPECT_NE(msg.find("null pointer"), std::string::npos) << msg;
}

// ---- leverage scores and sampling -------------------------------------------------------

TEST(Lss, RowNormsAndLeverageScoresMatchFloat64) {
  const int64_t rows = 29, cols = 41;
  const auto g =
      random_gradient(rows, cols, 41, [](int64_t r) { return r % 6 == 0 ? 0.0f : 1.0f; });
  std::vector<int8_t> hi(rows * cols), lo(rows * cols);
  const float s = ref::bitsplit(g.data(), rows, cols, {5, 0, 0, RngRole::grad_output_rounding},
                                hi.data(), lo.data(), nullptr);
  std::vector<float> hi_norm(rows), x_norm(rows), dw(2 * rows), dx(2 * rows);
  ref::row_norms_s8(hi.data(), rows, cols, hi_norm.data());
  for (int64_t r = 0; r < rows; ++r) x_norm[r] = 0.05f * static_cast<float>(r % 4);  // some 0
  ref::leverage_scores(hi.data(), lo.data(), rows, cols, s, x_norm.data(), dw.data());
  ref::leverage_scores(hi.data(), lo.data(), rows, cols, s, nullptr, dx.data());
  for (int64_t r = 0; r < rows; ++r) {
    double nh = 0, nl = 0;
    for (int64_t c = 0; c < cols; ++c) {
      nh += double(hi[r * cols + c]) * hi[r * cols + c];
      nl += double(lo[r * cols + c]) * lo[r * cols + c];
    }
    nh = std::sqrt(nh), nl = std::sqrt(nl);
    // Norms: one fp32 rounding (2^-24). Scores: up to three more fp32 roundings
    // (14·s, ·norm, ·x_norm): ≤ 4·2^-24 relative, so 2^-22 is the bound.
    const double tol = std::ldexp(1.0, -22);
    EXPECT_NEAR(hi_norm[r], nh, nh * std::ldexp(1.0, -24));
    EXPECT_NEAR(dx[r], nh * 14.0 * s, nh * 14.0 * s * tol);
    EXPECT_NEAR(dx[rows + r], nl * s, nl * s * tol);
    EXPECT_NEAR(dw[r], nh * 14.0 * s * x_norm[r], nh * 14.0 * s * x_norm[r] * tol);
    EXPECT_NEAR(dw[rows + r], nl * s * x_norm[r], nl * s * x_norm[r] * tol);
    if (r % 6 == 0) {
      EXPECT_EQ(dx[r], 0.0f) << "a zero gradient row has score 0";
    }
  }
}

namespace {

double sum_of(const std::vector<double>& p) {
  double total = 0;
  for (double v : p) total += v;
  return total;
}

}  // namespace

TEST(Lss, FitIsProportionalAndSumsToBudget) {
  const int64_t n = 200;
  std::vector<float> c(n);
  const PhiloxKey key{51, 0, 0, RngRole::data};
  for (int64_t i = 0; i < n; ++i) c[i] = 0.5f + philox_uniform(key, i);  // no saturation
  c[17] = 0.0f;
  std::vector<double> p(n);
  ref::fit_probabilities(c.data(), n, 50.0, p.data());
  // Σp = budget up to fp64 rounding of n products (~n·2^-53 relative): 1e-9 is ample.
  EXPECT_NEAR(sum_of(p), 50.0, 50.0 * 1e-9);
  EXPECT_EQ(p[17], 0.0);
  const double lambda = p[0] / c[0];
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_GE(p[i], 0.0);
    ASSERT_LT(p[i], 1.0);
    EXPECT_NEAR(p[i], lambda * c[i], 1e-12 * p[i]) << i;  // p ∝ c (fp64 rounding only)
  }
  // The fp32 output is the fp64 fit rounded once per entry.
  std::vector<float> pf(n);
  ref::fit_probabilities(c.data(), n, 50.0, pf.data());
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(pf[i], static_cast<float>(p[i])) << i;
}

TEST(Lss, FitSaturatesDominantRows) {
  // A few dominant rows among small ones: they get p = 1, the rest share budget − |F| ∝ c.
  const int64_t n = 100;
  std::vector<float> c(n);
  const PhiloxKey key{61, 0, 0, RngRole::data};
  for (int64_t i = 0; i < n; ++i) c[i] = 0.5f + philox_uniform(key, i);
  for (int64_t i : {3, 40, 41, 97}) c[i] = 1000.0f;
  std::vector<double> p(n);
  ref::fit_probabilities(c.data(), n, 20.0, p.data());
  EXPECT_NEAR(sum_of(p), 20.0, 20.0 * 1e-9);
  double rest = 0;
  for (int64_t i = 0; i < n; ++i)
    if (c[i] != 1000.0f) rest += c[i];
  for (int64_t i = 0; i < n; ++i) {
    if (c[i] == 1000.0f) {
      EXPECT_EQ(p[i], 1.0) << i;
    } else {
      EXPECT_NEAR(p[i], c[i] * 16.0 / rest, 1e-12) << i;
    }
  }
  // A cascade: scores {100, 12, 12, 12, 1 × 10, 0 × 6}, budget 5. Round 1 saturates 100
  // (p = 100·5/146 > 1); then 12·4/46 > 1 saturates the 12s; the ten 1s share 1: p = 0.1.
  std::vector<float> c2 = {100, 12, 12, 12};
  c2.insert(c2.end(), 10, 1.0f);
  c2.insert(c2.end(), 6, 0.0f);
  std::vector<double> p2(c2.size());
  ref::fit_probabilities(c2.data(), static_cast<int64_t>(c2.size()), 5.0, p2.data());
  for (size_t i = 0; i < c2.size(); ++i) {
    const double want = i < 4 ? 1.0 : c2[i] == 1.0f ? 0.1 : 0.0;
    EXPECT_NEAR(p2[i], want, 1e-15) << i;
  }
  EXPECT_NEAR(sum_of(p2), 5.0, 5.0 * 1e-9);
}

TEST(Lss, FitKeepsEveryNonzeroRowWhenTheBudgetCoversThem) {
  std::vector<float> c(30, 0.0f);
  for (int i = 0; i < 30; i += 3) c[i] = 0.25f * static_cast<float>(i + 1);  // 10 non-zero
  for (double budget : {10.0, 12.5, 60.0}) {
    std::vector<double> p(30);
    ref::fit_probabilities(c.data(), 30, budget, p.data());
    for (int i = 0; i < 30; ++i) EXPECT_EQ(p[i], c[i] > 0 ? 1.0 : 0.0) << i << " budget " << budget;
  }
  // All-zero scores: every p is 0, no 0/0.
  std::vector<float> zeros(8, 0.0f);
  std::vector<float> pz(8, -1.0f);
  ref::fit_probabilities(zeros.data(), 8, 4.0, pz.data());
  for (float v : pz) EXPECT_EQ(v, 0.0f);
  // Budget 0 keeps nothing.
  std::vector<double> p0(30, -1.0);
  ref::fit_probabilities(c.data(), 30, 0.0, p0.data());
  for (double v : p0) EXPECT_EQ(v, 0.0);
}

TEST(Lss, KeepNonzeroRowsKeepsExactlyTheNonzeroRows) {
  const std::vector<float> c = {0.0f, 1e-30f, 3.0f, 0.0f, 0.5f, 0.0f, 7.0f};
  std::vector<float> p(c.size(), -1.0f);
  std::vector<uint8_t> keep(c.size(), 9);
  const int64_t kept =
      ref::keep_nonzero_rows(c.data(), static_cast<int64_t>(c.size()), p.data(), keep.data());
  EXPECT_EQ(kept, 4);
  for (size_t i = 0; i < c.size(); ++i) {
    EXPECT_EQ(keep[i], c[i] > 0 ? 1 : 0) << i;
    EXPECT_EQ(p[i], c[i] > 0 ? 1.0f : 0.0f) << i;
  }
}

TEST(Lss, SampleRowsComparesPhiloxUniformsWithP) {
  const int64_t n = 300;
  std::vector<float> p(n);
  for (int64_t i = 0; i < n; ++i) p[i] = i % 3 == 0 ? 0.0f : i % 3 == 1 ? 1.0f : 0.37f;
  const PhiloxKey key{71, 9, 1, RngRole::sample_dw};
  std::vector<uint8_t> keep(n);
  const int64_t kept = ref::sample_rows(p.data(), n, key, keep.data());
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(keep[i], philox_uniform(key, i) < p[i] ? 1 : 0) << i;
    if (i % 3 == 0) {
      EXPECT_EQ(keep[i], 0) << "p = 0 never keeps";
    } else if (i % 3 == 1) {
      EXPECT_EQ(keep[i], 1) << "p = 1 always keeps";
    }
    count += keep[i];
  }
  EXPECT_EQ(kept, count);
}

namespace {

// One rank-1 term of an LSS product: `values` added at `offset` of the flattened output.
struct Term {
  int64_t offset;
  std::vector<double> values;
};

// Runs n independent Bernoulli samplings (keys differ in step) of Σ_i (m_i/p_i)·T_i and checks
// it against Σ_i T_i. The closed-form variance of one sample is (algorithms.md B.5, P1 Prop. 4.1
// and B.2) Var = E‖est − exact‖_F² = Σ_i (1 − p_i)/p_i·‖T_i‖², with ‖T_i‖ = ‖G↕_i‖‖X̂↕_i‖ for dW
// and ‖G↕_i‖ for dX. Checks, each ≥ 5σ:
//  * ‖mean − exact‖_F ≤ 5·sqrt(Var/n) (E‖mean − exact‖² = Var/n) at two n: the error shrinks like
//    1/sqrt(n), and a bias (e.g. a missing 1/p) would exceed it at the larger n;
//  * the empirical mean of ‖est − exact‖² equals Var within 5 standard errors (the standard
//    error estimated from the same samples);
//  * the mean kept count is Σp within 5·sqrt(Σp(1 − p)/n).
void check_unbiased(const std::vector<Term>& terms, int64_t out_size, const std::vector<float>& p,
                    uint64_t seed, RngRole role) {
  const int64_t n_rows = static_cast<int64_t>(terms.size());
  std::vector<double> exact(out_size, 0.0);
  double var = 0, p_sum = 0, count_var = 0;
  for (int64_t i = 0; i < n_rows; ++i) {
    double norm2 = 0;
    for (size_t j = 0; j < terms[i].values.size(); ++j) {
      exact[terms[i].offset + j] += terms[i].values[j];
      norm2 += terms[i].values[j] * terms[i].values[j];
    }
    if (p[i] > 0) {
      var += (1.0 - p[i]) / p[i] * norm2;
    } else {
      ASSERT_EQ(norm2, 0.0) << "a row with p = 0 must contribute nothing";
    }
    p_sum += p[i];
    count_var += p[i] * (1.0 - p[i]);
  }
  ASSERT_GT(var, 0.0) << "the test needs rows with 0 < p < 1";
  uint32_t step = 0;
  for (int64_t n : {1000, 16000}) {
    std::vector<double> sum(out_size, 0.0), est(out_size);
    std::vector<uint8_t> keep(n_rows);
    double sq_sum = 0, sq_sq_sum = 0, kept_sum = 0;
    for (int64_t t = 0; t < n; ++t) {
      kept_sum += double(ref::sample_rows(p.data(), n_rows, {seed, step++, 0, role}, keep.data()));
      std::fill(est.begin(), est.end(), 0.0);
      for (int64_t i = 0; i < n_rows; ++i) {
        if (!keep[i]) continue;
        const double w = 1.0 / p[i];  // m_i / p_i
        for (size_t j = 0; j < terms[i].values.size(); ++j)
          est[terms[i].offset + j] += w * terms[i].values[j];
      }
      double sq = 0;
      for (int64_t j = 0; j < out_size; ++j) {
        sum[j] += est[j];
        sq += (est[j] - exact[j]) * (est[j] - exact[j]);
      }
      sq_sum += sq;
      sq_sq_sum += sq * sq;
    }
    double err2 = 0;
    for (int64_t j = 0; j < out_size; ++j) {
      const double e = sum[j] / double(n) - exact[j];
      err2 += e * e;
    }
    EXPECT_LE(std::sqrt(err2), 5.0 * std::sqrt(var / double(n))) << "n=" << n;
    const double mean_sq = sq_sum / double(n);
    const double se_sq = std::sqrt((sq_sq_sum / double(n) - mean_sq * mean_sq) / double(n));
    EXPECT_NEAR(mean_sq, var, 5.0 * se_sq) << "n=" << n;
    // Kept count: u on the 2^-24 grid keeps with probability ≤ p + 2^-24 per row (slack).
    EXPECT_NEAR(kept_sum / double(n), p_sum,
                5.0 * std::sqrt(count_var / double(n)) + double(n_rows) * std::ldexp(1.0, -24))
        << "n=" << n;
  }
}

}  // namespace

TEST(Lss, SampledEstimatorIsUnbiased) {
  // G [N, C] with a few heavy rows (they saturate), some exactly-zero rows, the rest N(0, 1);
  // X̂ = sX·QX with QX [N, D] in [-7, 7]. G↕ = [14s·hi ; s·lo], X̂↕ = [X̂ ; X̂], budget N.
  const int64_t N = 64, C = 16, D = 8;
  const auto g = random_gradient(N, C, 81, [](int64_t r) {
    return r % 11 == 0 ? 0.0f : r % 13 == 1 ? 4.0f : 1.0f;
  });
  std::vector<int8_t> hi(N * C), lo(N * C), qx(N * D);
  const float s = ref::bitsplit(g.data(), N, C, {82, 0, 0, RngRole::grad_output_rounding},
                                hi.data(), lo.data(), nullptr);
  const PhiloxKey xkey{83, 0, 0, RngRole::data};
  for (int64_t i = 0; i < N * D; ++i)
    qx[i] = static_cast<int8_t>(static_cast<int32_t>(philox_u32(xkey, i) % 15) - 7);
  const float sx = 0.05f;
  std::vector<float> x_norm(N);
  ref::row_norms_s8(qx.data(), N, D, x_norm.data());
  for (float& v : x_norm) v *= sx;  // ‖x_q row‖·sX
  const double split_scale[2] = {14.0 * s, double(s)};
  const int8_t* split[2] = {hi.data(), lo.data()};

  // dW = G↕ᵀ M̃ X̂↕: term i is the [C, D] outer product G↕_iᵀ X̂↕_i.
  {
    std::vector<float> scores(2 * N), p(2 * N);
    ref::leverage_scores(hi.data(), lo.data(), N, C, s, x_norm.data(), scores.data());
    ref::fit_probabilities(scores.data(), 2 * N, double(N), p.data());
    int64_t saturated = 0;
    for (float v : p) saturated += v == 1.0f;
    ASSERT_GT(saturated, 0) << "the heavy rows should saturate";
    std::vector<Term> terms(2 * N);
    for (int64_t i = 0; i < 2 * N; ++i) {
      const int64_t r = i % N;
      terms[i].offset = 0;
      terms[i].values.resize(C * D);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t d = 0; d < D; ++d)
          terms[i].values[c * D + d] =
              split_scale[i / N] * split[i / N][r * C + c] * double(sx) * qx[r * D + d];
    }
    check_unbiased(terms, C * D, p, 84, RngRole::sample_dw);
  }
  // dX = Î↕ M̃ G↕ Ŵ: Ŵ is shared and drops out; term i is G↕_i placed in output row i mod N.
  {
    std::vector<float> scores(2 * N), p(2 * N);
    ref::leverage_scores(hi.data(), lo.data(), N, C, s, nullptr, scores.data());
    ref::fit_probabilities(scores.data(), 2 * N, double(N), p.data());
    std::vector<Term> terms(2 * N);
    for (int64_t i = 0; i < 2 * N; ++i) {
      const int64_t r = i % N;
      terms[i].offset = r * C;
      terms[i].values.resize(C);
      for (int64_t c = 0; c < C; ++c)
        terms[i].values[c] = split_scale[i / N] * split[i / N][r * C + c];
    }
    check_unbiased(terms, N * C, p, 85, RngRole::sample_dx);
  }
}

TEST(LssBadInput, RejectsNegativeOrNaNScoresAndBadBudgets) {
  std::vector<float> c = {1.0f, 2.0f, -0.5f, 4.0f};
  std::vector<float> p(4);
  std::vector<uint8_t> keep(4);
  std::string msg = error_of([&] { ref::fit_probabilities(c.data(), 4, 2.0, p.data()); });
  EXPECT_NE(msg.find("scores[2]"), std::string::npos) << msg;
  msg = error_of([&] { ref::keep_nonzero_rows(c.data(), 4, p.data(), keep.data()); });
  EXPECT_NE(msg.find("scores[2]"), std::string::npos) << msg;
  c[2] = NAN;
  msg = error_of([&] { ref::fit_probabilities(c.data(), 4, 2.0, p.data()); });
  EXPECT_NE(msg.find("scores[2]"), std::string::npos) << msg;
  c[2] = 3.0f;
  for (double budget : {-1.0, double(NAN), double(INFINITY)}) {
    msg = error_of([&] { ref::fit_probabilities(c.data(), 4, budget, p.data()); });
    EXPECT_NE(msg.find("budget"), std::string::npos) << msg;
  }
  msg = error_of([&] { ref::fit_probabilities(c.data(), 0, 2.0, p.data()); });
  EXPECT_NE(msg.find("must be positive"), std::string::npos) << msg;
  p = {0.5f, 1.5f, 0.0f, 0.1f};
  msg = error_of([&] { ref::sample_rows(p.data(), 4, {}, keep.data()); });
  EXPECT_NE(msg.find("p[1]"), std::string::npos) << msg;
  p[1] = NAN;
  msg = error_of([&] { ref::sample_rows(p.data(), 4, {}, keep.data()); });
  EXPECT_NE(msg.find("p[1]"), std::string::npos) << msg;
  std::vector<int8_t> codes(8, 1);
  std::vector<float> scores(4);
  msg = error_of([&] {
    ref::leverage_scores(codes.data(), codes.data(), 2, 4, 0.0f, nullptr, scores.data());
  });
  EXPECT_NE(msg.find("scale s"), std::string::npos) << msg;
  const float bad_x[2] = {1.0f, -1.0f};
  msg = error_of(
      [&] { ref::leverage_scores(codes.data(), codes.data(), 2, 4, 1.0f, bad_x, scores.data()); });
  EXPECT_NE(msg.find("x_norm[1]"), std::string::npos) << msg;
}
