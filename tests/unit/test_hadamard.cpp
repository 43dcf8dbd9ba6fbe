// Block Hadamard transform, LSQ and the HQ quantizer (src/ref/hadamard.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "nibble/error.h"
#include "nibble/rng.h"
#include "ref/hadamard.h"
#include "ref/linear.h"
#include "ref/quant.h"

using namespace nibble;

namespace {

// fp32 unit roundoff: one correctly rounded fp32 operation has relative error ≤ 2^-24.
constexpr double kU32 = 1.0 / 16777216.0;

std::vector<float> normal_data(int64_t n, uint64_t seed, float sigma = 1.0f) {
  std::vector<float> v(static_cast<size_t>(n));
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  for (int64_t i = 0; i < n; ++i) v[i] = sigma * philox_normal(key, static_cast<uint64_t>(i));
  return v;
}

template <typename Fn>
void expect_error_mentions(Fn&& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no nibble::Error thrown; expected one mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message '" << e.what() << "' does not mention '" << needle << "'";
  }
}

std::vector<int64_t> all_blocks() {
  std::vector<int64_t> b;
  for (int64_t k = 1; k <= 1024; k *= 2) b.push_back(k);
  return b;
}

int log2_of(int64_t block) { return std::countr_zero(static_cast<uint64_t>(block)); }

// Activations [rows, cols] ~ N(0, 1) with a few outlier channels (columns) scaled up, the
// pattern HQ is designed for (algorithms.md A.2).
std::vector<float> activations_with_outliers(int64_t rows, int64_t cols, uint64_t seed) {
  std::vector<float> x = normal_data(rows * cols, seed);
  const int64_t channels[] = {7, 100, 301, 450};
  const float gains[] = {30.0f, 50.0f, 80.0f, 100.0f};
  for (int64_t r = 0; r < rows; ++r) {
    for (int j = 0; j < 4; ++j) x[r * cols + channels[j] % cols] *= gains[j];
  }
  return x;
}

}  // namespace

// ---- the transform -------------------------------------------------------------------------

TEST(Hadamard, NormIsTheRoundedInverseSquareRoot) {
  for (int64_t b : all_blocks()) {
    EXPECT_EQ(ref::hadamard_norm(b), static_cast<float>(1.0 / std::sqrt(static_cast<double>(b))));
  }
  // Even k: an exact power of two.
  EXPECT_EQ(ref::hadamard_norm(1), 1.0f);
  EXPECT_EQ(ref::hadamard_norm(4), 0.5f);
  EXPECT_EQ(ref::hadamard_norm(1024), 1.0f / 32.0f);
}

TEST(Hadamard, DenseMatrixIsSymmetricAndOrthonormal) {
  for (int64_t b : all_blocks()) {
    const std::vector<float> h = ref::hadamard_matrix(b);
    ASSERT_EQ(static_cast<int64_t>(h.size()), b * b);
    const float norm = ref::hadamard_norm(b);
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t j = 0; j < b; ++j) {
        ASSERT_EQ(std::fabs(h[i * b + j]), norm);
        ASSERT_EQ(h[i * b + j], h[j * b + i]);
      }
      // Sylvester order: row 0 is constant, so a one-hot input spreads evenly.
      ASSERT_EQ(h[i], norm);
    }
    // (H·Hᵀ)_ij in float64. Entries are ±n with n = (1/√b)(1 + δ), |δ| ≤ 2^-24, so the
    // diagonal is b·n² = 1 + 2δ + δ² and off-diagonals cancel to 0: |H·Hᵀ − I| ≤ 2^-22
    // (2·2^-24 doubled for margin).
    double worst = 0.0;
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t j = i; j < b; ++j) {
        double dot = 0.0;
        for (int64_t k = 0; k < b; ++k) dot += static_cast<double>(h[i * b + k]) * h[j * b + k];
        worst = std::max(worst, std::fabs(dot - (i == j ? 1.0 : 0.0)));
      }
    }
    EXPECT_LE(worst, 4 * kU32) << "block " << b;
  }
}

TEST(Hadamard, ButterflyMatchesDenseFloat64) {
  const int64_t rows = 3, cols = 2048;
  uint64_t seed = 300;
  for (int64_t b : all_blocks()) {
    const std::vector<float> x = normal_data(rows * cols, seed++);
    std::vector<float> y = x;
    ref::hadamard_blocks(y.data(), rows, cols, b);
    // Exact orthonormal H in float64: H_ij = (−1)^popcount(i&j) / √b.
    const double n64 = 1.0 / std::sqrt(static_cast<double>(b));
    const int k = log2_of(b);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t base = 0; base < cols; base += b) {
        const float* xb = x.data() + r * cols + base;
        double abs_sum = 0.0;
        for (int64_t i = 0; i < b; ++i) abs_sum += std::fabs(xb[i]);
        // k fp32 butterfly stages give |ŷ − y| ≤ k·u·Σ|x| before the scaling; the rounded
        // norm and the final multiply add 2u: (k + 2)·u·Σ|x|/√b, with u = 2^-23 (2× margin).
        const double tol = (k + 2) * 2 * kU32 * n64 * abs_sum;
        for (int64_t j = 0; j < b; ++j) {
          double ref_y = 0.0;
          for (int64_t i = 0; i < b; ++i) {
            ref_y += (std::popcount(static_cast<uint64_t>(i & j)) & 1 ? -n64 : n64) * xb[i];
          }
          ASSERT_NEAR(y[r * cols + base + j], ref_y, tol) << "block " << b << " row " << r << " col " << base + j;
        }
      }
    }
  }
}

TEST(Hadamard, ButterflyFollowsTheDocumentedOrderBitForBit) {
  // The CUDA twin must reproduce the fp32 result exactly, so the stage order (h = 1, 2,
  // ..., block/2, then one multiply by the norm) is part of the contract. A descending
  // order or a 1/√2 per stage is the same matrix but rounds differently.
  const int64_t rows = 4, cols = 1024;
  for (int64_t b : {32, 1024}) {
    std::vector<float> x = normal_data(rows * cols, 400 + static_cast<uint64_t>(b));
    std::vector<float> expected = x;
    const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(b)));
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t base = 0; base < cols; base += b) {
        float* v = expected.data() + r * cols + base;
        for (int64_t h = 1; h < b; h *= 2) {
          for (int64_t i = 0; i < b; ++i) {
            if (i & h) continue;  // i is the first element of its pair (i, i + h)
            const float a = v[i], c = v[i + h];
            v[i] = a + c;
            v[i + h] = a - c;
          }
        }
        for (int64_t i = 0; i < b; ++i) v[i] *= norm;
      }
    }
    ref::hadamard_blocks(x.data(), rows, cols, b);
    int mismatches = 0;
    for (int64_t i = 0; i < rows * cols; ++i) mismatches += (x[i] != expected[i]);
    EXPECT_EQ(mismatches, 0) << "block " << b;
  }
}

TEST(Hadamard, IsItsOwnInverse) {
  const int64_t rows = 5, cols = 1024;
  uint64_t seed = 500;
  for (int64_t b : all_blocks()) {
    const std::vector<float> x = normal_data(rows * cols, seed++, 4.0f);
    std::vector<float> y = x;
    ref::hadamard_blocks(y.data(), rows, cols, b);
    ref::hadamard_blocks(y.data(), rows, cols, b);
    const int k = log2_of(b);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t base = 0; base < cols; base += b) {
        double abs_sum = 0.0;
        for (int64_t i = 0; i < b; ++i) abs_sum += std::fabs(x[r * cols + base + i]);
        // Each pass errs by ≤ (k + 2)·u·Σ|x|/√b per element; the second pass carries the
        // first one's error through H (ℓ1 → ∞ norm √b·1/√b): ≤ 2·(k + 2)·u·Σ|x| in all,
        // u = 2^-23 (2× margin on fp32 roundoff).
        const double tol = 2.0 * (k + 2) * 2 * kU32 * abs_sum;
        for (int64_t i = 0; i < b; ++i) {
          const int64_t at = r * cols + base + i;
          ASSERT_NEAR(y[at], x[at], tol) << "block " << b << " at " << at;
        }
      }
    }
  }
}

TEST(Hadamard, PreservesProductsBeforeQuantization) {
  // (X·H)(W·H)ᵀ = X·Wᵀ because H·Hᵀ = I (algorithms.md A.3, Eq. 3).
  const int64_t n = 16, c = 24, d = 512;
  for (int64_t b : {1, 32, 256, 512}) {
    const std::vector<float> x = normal_data(n * d, 600 + static_cast<uint64_t>(b));
    const std::vector<float> w = normal_data(c * d, 700 + static_cast<uint64_t>(b), 0.1f);
    std::vector<float> xt = x, wt = w;
    ref::hadamard_blocks(xt.data(), n, d, b);
    ref::hadamard_blocks(wt.data(), c, d, b);
    const int k = log2_of(b);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < c; ++j) {
        double y = 0.0, yt = 0.0, nx = 0.0, nw = 0.0;
        for (int64_t t = 0; t < d; ++t) {
          y += static_cast<double>(x[i * d + t]) * w[j * d + t];
          yt += static_cast<double>(xt[i * d + t]) * wt[j * d + t];
          nx += static_cast<double>(x[i * d + t]) * x[i * d + t];
          nw += static_cast<double>(w[j * d + t]) * w[j * d + t];
        }
        // The fp32 transform errs by ‖δx̃‖₂ ≤ (k + 2)·u·√b·‖x‖₂ per row (see above), so
        // |Δ(x̃·w̃)| ≤ 2·(k + 2)·u·√b·‖x‖·‖w‖, u = 2^-23 (2× margin).
        const double tol = 2.0 * (k + 2) * 2 * kU32 * std::sqrt(static_cast<double>(b)) *
                           std::sqrt(nx) * std::sqrt(nw);
        ASSERT_NEAR(yt, y, tol) << "block " << b << " (" << i << ", " << j << ")";
      }
    }
  }
}

TEST(HadamardErrors, RejectBadInput) {
  std::vector<float> x = normal_data(2 * 96, 800);
  expect_error_mentions([&] { ref::hadamard_blocks(x.data(), 2, 96, 64); },
                        "K = 96 is not a multiple of the hadamard block 64");
  expect_error_mentions([&] { ref::hadamard_blocks(x.data(), 2, 96, 48); },
                        "hadamard block 48 is not a power of two");
  expect_error_mentions([&] { ref::hadamard_blocks(x.data(), 1, 2048, 2048); }, "[1, 1024]");
  expect_error_mentions([&] { ref::hadamard_blocks(x.data(), 2, 96, 0); }, "hadamard block 0");
  expect_error_mentions([&] { ref::hadamard_matrix(3); }, "not a power of two");
  x[101] = std::numeric_limits<float>::quiet_NaN();
  expect_error_mentions([&] { ref::hadamard_blocks(x.data(), 2, 96, 32); }, "NaN at flat index 101");
  x[101] = -std::numeric_limits<float>::infinity();
  expect_error_mentions([&] { ref::hadamard_blocks(x.data(), 2, 96, 32); }, "Inf at flat index 101");
}

// ---- LSQ -------------------------------------------------------------------------------------

TEST(Lsq, InitScaleIsTwoMeanAbsOverSqrtQmax) {
  const std::vector<float> v = normal_data(4096, 900, 0.7f);
  for (QRange range : {kInt4Sym, kInt4Full}) {
    double sum = 0.0;
    for (float e : v) sum += std::fabs(e);
    const double s64 = 2.0 * (sum / 4096.0) / std::sqrt(static_cast<double>(range.qmax));
    // One rounding of the fp64 value to fp32.
    EXPECT_NEAR(ref::lsq_init_scale(v.data(), 4096, range), s64, kU32 * s64);
  }
  const std::vector<float> zeros(16, 0.0f);
  EXPECT_EQ(ref::lsq_init_scale(zeros.data(), 16, kInt4Sym), 1.0f);
}

TEST(Lsq, QuantizeWritesCodesAndRatios) {
  const int64_t n = 3000;
  const std::vector<float> v = normal_data(n, 910, 3.0f);
  const float s = 0.83f;
  for (QRange range : {kInt4Sym, kInt4Full}) {
    std::vector<int8_t> q(static_cast<size_t>(n));
    std::vector<float> r(static_cast<size_t>(n));
    ref::lsq_quantize(v.data(), n, s, range, q.data(), r.data());
    int clipped = 0, differs_from_division = 0;
    const float inv_s = 1.0f / s;  // one fp32 division per tensor
    for (int64_t i = 0; i < n; ++i) {
      // r = v·fl(1/s) (one fp32 multiply), q = clamp(round_half_even(r), qmin, qmax)
      ASSERT_EQ(r[i], v[i] * inv_s) << i;
      const int expected = std::clamp(static_cast<int>(std::nearbyint(v[i] * inv_s)), range.qmin, range.qmax);
      ASSERT_EQ(q[i], expected) << i;
      clipped += (r[i] < range.qmin || r[i] > range.qmax);
      differs_from_division += r[i] != v[i] / s;
    }
    EXPECT_GT(clipped, 0) << "the data should exercise the clamp";
    // s = 0.83 is no power of two: the multiply differs from v / s on a good share of the
    // elements, so this test tells the two formulas apart.
    EXPECT_GT(differs_from_division, n / 20);
  }
}

TEST(Lsq, ResidualNibbleIsTheExactFloorWithSixteenBitUniforms) {
  // e = −8 outside [qmin, qmax]; else floor(14·(rint(r) − r) + u) of the exact sum with
  // u = philox_uniform16(key, index) (docs/formats.md), in [−7, 7] without a clamp.
  const PhiloxKey key{31, 4, 2, RngRole::rounding};
  const std::vector<float> base = normal_data(4000, 930, 4.0f);
  std::vector<float> r = base;
  // exact half-integers (δ = ±1/2, 14·δ = ±7), values a few ulps off integers (tiny δ), bounds
  for (float v : {0.5f, -0.5f, 2.5f, -6.5f, 6.5f, 7.0f, -7.0f, -8.0f, 7.5f, 3.0f,
                  std::nextafter(3.0f, 4.0f), std::nextafter(-2.0f, -3.0f), 1e-30f, -1e-30f})
    for (int k = 0; k < 20; ++k) r.push_back(v);
  for (QRange range : {kInt4Sym, kInt4Full}) {
    int64_t in_range = 0, differs_from_24bit = 0, at_seven = 0;
    for (size_t i = 0; i < r.size(); ++i) {
      const int e = ref::lsq_residual_encode(r[i], range, key, i);
      if (!(r[i] >= range.qmin && r[i] <= range.qmax)) {
        ASSERT_EQ(e, ref::kLsqClipped) << r[i];
        continue;
      }
      ++in_range;
      const float delta = std::nearbyint(r[i]) - r[i];
      const double want = std::floor(14.0 * double(delta) + double(philox_uniform16(key, i)));
      ASSERT_EQ(e, want) << "r = " << r[i] << " index " << i;
      ASSERT_GE(e, -7);
      ASSERT_LE(e, 7);
      at_seven += std::fabs(delta) == 0.5f;
      differs_from_24bit +=
          e != std::floor(14.0 * double(delta) + double(philox_uniform(key, i)));
    }
    EXPECT_GT(in_range, 3000);
    EXPECT_GT(at_seven, 40);
    // the stream matters: the old 24-bit draw gives another nibble for many elements
    EXPECT_GT(differs_from_24bit, in_range / 10);
  }
}

TEST(Lsq, StepGradientMatchesFiniteDifferences) {
  const int64_t n = 4096;
  std::vector<float> v = normal_data(n, 920);
  for (int64_t i = 0; i < n; i += 17) v[i] *= 8.0f;  // some values beyond the clip range
  const std::vector<float> w = normal_data(n, 921);  // upstream gradient ∂L/∂v̂
  for (QRange range : {kInt4Sym, kInt4Full}) {
    const float s = ref::lsq_init_scale(v.data(), n, range);
    std::vector<float> r(static_cast<size_t>(n));
    ref::lsq_quantize(v.data(), n, s, range, nullptr, r.data());
    std::vector<float> grad_v(static_cast<size_t>(n));
    const float ds = ref::lsq_backward(w.data(), r.data(), n, range, grad_v.data());
    const double g = 1.0 / std::sqrt(static_cast<double>(range.qmax) * static_cast<double>(n));

    // Freeze the rounding residual c = round(r) − r of in-range elements (c = 0 when
    // clipped); then F(s') = s'·(clamp(v/s', qmin, qmax) + c) and ∂F/∂s' at s is δ(r).
    // Elements within 0.01 of a clip edge get weight 0 so the ±h steps cannot cross it.
    std::vector<double> c(static_cast<size_t>(n)), wt(static_cast<size_t>(n));
    int in_range = 0, clipped = 0;
    for (int64_t i = 0; i < n; ++i) {
      const bool inside = r[i] >= range.qmin && r[i] <= range.qmax;
      c[i] = inside ? std::nearbyint(r[i]) - r[i] : 0.0;
      const bool near_edge = std::fabs(r[i] - range.qmin) < 0.01 || std::fabs(r[i] - range.qmax) < 0.01;
      wt[i] = near_edge ? 0.0 : w[i];
      in_range += inside;
      clipped += !inside;
      // STE mask: the gradient passes exactly where qmin ≤ v/s ≤ qmax.
      ASSERT_EQ(grad_v[i], inside ? w[i] : 0.0f) << i;
    }
    ASSERT_GT(in_range, 0);
    ASSERT_GT(clipped, 10) << "the data should exercise the clipped branch of δ";
    auto loss = [&](double sp) {
      double l = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        const double clamped = std::clamp(static_cast<double>(v[i]) / sp, double(range.qmin), double(range.qmax));
        l += wt[i] * sp * (clamped + c[i]);
      }
      return l;
    };
    const double h = 1e-4 * s;
    const double fd = (loss(s + h) - loss(s - h)) / (2 * h);
    // The near-edge elements were dropped from the difference quotient; drop them from the
    // analytic side too by recomputing lsq_backward with the same weights.
    std::vector<float> w_kept(static_cast<size_t>(n));
    double scale_of_sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      w_kept[i] = static_cast<float>(wt[i]);
      scale_of_sum += std::fabs(wt[i]) * (std::fabs(c[i]) + range.qmax + 1);
    }
    const double analytic = ref::lsq_backward(w_kept.data(), r.data(), n, range, nullptr) / g;
    // F is linear in s' on [s − h, s + h], so the central difference is exact up to fp64
    // cancellation (~1e-16·Σ|wF|/h ≈ 1e-10 here); the fp32 return value of lsq_backward
    // adds 2^-24 relative. Bound: 1e-6·Σ|w|·(|c| + qmax + 1).
    EXPECT_NEAR(analytic, fd, 1e-6 * scale_of_sum) << "range [" << range.qmin << ", " << range.qmax << "]";
    // Sanity: the full-weight gradient is not trivially zero and carries the g factor.
    EXPECT_NE(ds, 0.0f);
  }
}

TEST(Lsq, BackwardAllowsGradInPlace) {
  const int64_t n = 500;
  const std::vector<float> v = normal_data(n, 930, 6.0f);
  std::vector<float> grad = normal_data(n, 931);
  const std::vector<float> grad_in = grad;
  std::vector<float> r(static_cast<size_t>(n)), separate(static_cast<size_t>(n));
  ref::lsq_quantize(v.data(), n, 1.0f, kInt4Sym, nullptr, r.data());
  const float ds_separate = ref::lsq_backward(grad_in.data(), r.data(), n, kInt4Sym, separate.data());
  const float ds_inplace = ref::lsq_backward(grad.data(), r.data(), n, kInt4Sym, grad.data());
  EXPECT_EQ(ds_separate, ds_inplace);
  EXPECT_EQ(grad, separate);
}

// ---- HQ --------------------------------------------------------------------------------------

TEST(Hq, QuantizeIsTransformThenLsqAndLeavesXAlone) {
  const int64_t rows = 8, cols = 256, block = 32;
  const std::vector<float> x = normal_data(rows * cols, 1000, 2.0f);
  const std::vector<float> x_copy = x;
  const float s = 0.6f;
  std::vector<int8_t> q(static_cast<size_t>(rows * cols)), q_ref(q.size());
  std::vector<float> r(q.size()), r_ref(q.size());
  ref::hq_quantize(x.data(), rows, cols, block, s, kInt4Full, q.data(), r.data());
  EXPECT_EQ(x, x_copy);
  std::vector<float> xt = x;
  ref::hadamard_blocks(xt.data(), rows, cols, block);
  ref::lsq_quantize(xt.data(), rows * cols, s, kInt4Full, q_ref.data(), r_ref.data());
  EXPECT_EQ(q, q_ref);
  EXPECT_EQ(r, r_ref);
}

TEST(Hq, BeatsPerTensorAbsmaxOnOutlierChannels) {
  const int64_t rows = 256, cols = 512, n = rows * cols;
  const std::vector<float> x = activations_with_outliers(rows, cols, 1100);

  // Baseline: per-tensor symmetric INT4, absmax scale.
  float s_tensor;
  ref::compute_scales(x.data(), rows, cols, Granularity::tensor, 0, kInt4Sym, false, &s_tensor, nullptr);
  std::vector<int8_t> q(static_cast<size_t>(n));
  std::vector<float> xh(static_cast<size_t>(n));
  ref::quantize(x.data(), rows, cols, Granularity::tensor, 0, &s_tensor, nullptr, kInt4Sym,
                Rounding::nearest, PhiloxKey{}, q.data());
  ref::dequantize(q.data(), rows, cols, Granularity::tensor, 0, &s_tensor, nullptr, xh.data());
  const double sqnr_tensor = ref::sqnr_db(x.data(), xh.data(), n);

  // HQ: X·H, LSQ-init step on the transformed tensor, then back to the original domain.
  auto hq_sqnr = [&](int64_t block) {
    std::vector<float> xt = x;
    ref::hadamard_blocks(xt.data(), rows, cols, block);
    const float s = ref::lsq_init_scale(xt.data(), n, kInt4Sym);
    ref::hq_quantize(x.data(), rows, cols, block, s, kInt4Sym, q.data(), nullptr);
    for (int64_t i = 0; i < n; ++i) xt[i] = s * static_cast<float>(q[i]);
    ref::hadamard_blocks(xt.data(), rows, cols, block);  // H is its own inverse
    return ref::sqnr_db(x.data(), xt.data(), n);
  };
  const double sqnr_hq32 = hq_sqnr(32);
  const std::vector<float> w = normal_data(128 * cols, 1101, 0.05f);
  const ref::BlockSearchResult found = ref::hq_search_block(x.data(), rows, w.data(), 128, cols, kInt4Sym);
  const double sqnr_hq_found = hq_sqnr(found.block);
  std::printf("  per-tensor absmax INT4: %.2f dB; HQ block 32: %.2f dB; HQ searched block %lld: %.2f dB\n",
              sqnr_tensor, sqnr_hq32, static_cast<long long>(found.block), sqnr_hq_found);
  // Measured at seeds 1100-1105: per-tensor 12-13 dB, searched HQ (block 64-128) 16.3-16.5 dB,
  // HQ at a fixed block 32 only 8-9 dB: with the LSQ-init step (2·mean|v|/√7, set by the many
  // ordinary blocks) the blocks holding a ×100 channel still peak at ~100/√32 ≈ 18σ and
  // clip hard. A larger block spreads the outlier further, which is what the search finds.
  // Assert the searched block with a 3 dB margin (half the noise power); block 32 is shown.
  EXPECT_GT(sqnr_hq_found, sqnr_tensor + 3.0);
  EXPECT_GT(found.block, 32);
  EXPECT_GT(sqnr_hq_found, sqnr_hq32);
}

TEST(Hq, SearchPicksALargeBlockForStrongOutliers) {
  const int64_t n = 256, c = 64, d = 512;
  const std::vector<float> x = activations_with_outliers(n, d, 1200);
  const std::vector<float> w = normal_data(c * d, 1201, 0.05f);
  const ref::BlockSearchResult res = ref::hq_search_block(x.data(), n, w.data(), c, d, kInt4Sym);
  for (size_t i = 0; i < res.candidates.size(); ++i) {
    std::printf("  block %4lld: score %.4g\n", static_cast<long long>(res.candidates[i]), res.scores[i]);
  }
  EXPECT_GT(res.block, 1);
  // The winner has the smallest score, and beats "no transform" clearly.
  const auto best = std::min_element(res.scores.begin(), res.scores.end());
  EXPECT_EQ(res.candidates[static_cast<size_t>(best - res.scores.begin())], res.block);
  EXPECT_LT(*best, 0.5 * res.scores[0]);
}

TEST(Hq, SearchCandidatesArePowersOfTwoDividingD) {
  struct Case {
    int64_t d, max_block;
    std::vector<int64_t> expected;
  };
  const Case cases[] = {
      {96, 1024, {1, 2, 4, 8, 16, 32}},
      {768, 1024, {1, 2, 4, 8, 16, 32, 64, 128, 256}},
      {3072, 1024, {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024}},
      {512, 64, {1, 2, 4, 8, 16, 32, 64}},
  };
  uint64_t seed = 1300;
  for (const Case& k : cases) {
    const std::vector<float> x = normal_data(16 * k.d, seed++);
    const std::vector<float> w = normal_data(8 * k.d, seed++, 0.1f);
    const ref::BlockSearchResult res = ref::hq_search_block(x.data(), 16, w.data(), 8, k.d, kInt4Sym, k.max_block);
    EXPECT_EQ(res.candidates, k.expected) << "d = " << k.d;
    ASSERT_EQ(res.scores.size(), res.candidates.size());
    for (double sc : res.scores) {
      EXPECT_TRUE(std::isfinite(sc) && sc > 0.0) << "score " << sc << " for d = " << k.d;
    }
    EXPECT_NE(std::find(res.candidates.begin(), res.candidates.end(), res.block), res.candidates.end());
  }
}

TEST(HqErrors, RejectBadInput) {
  std::vector<float> x = normal_data(4 * 96, 1400);
  std::vector<int8_t> q(x.size());
  std::vector<float> r(x.size());
  expect_error_mentions([&] { ref::hq_quantize(x.data(), 4, 96, 64, 0.5f, kInt4Sym, q.data(), nullptr); },
                        "not a multiple of the hadamard block 64");
  expect_error_mentions([&] { ref::hq_quantize(x.data(), 4, 96, 32, 0.0f, kInt4Sym, q.data(), nullptr); },
                        "step size s = 0");
  // A subnormal s whose reciprocal overflows fp32 (the quantizer multiplies by 1/s).
  expect_error_mentions([&] { ref::hq_quantize(x.data(), 4, 96, 32, 1e-39f, kInt4Sym, q.data(), nullptr); },
                        "1/s overflows");
  expect_error_mentions([&] { ref::hq_quantize(x.data(), 4, 96, 32, 0.5f, kUint4, q.data(), nullptr); },
                        "signed code range");
  expect_error_mentions([&] { ref::hq_search_block(x.data(), 4, x.data(), 4, 96, kInt4Sym, 0); },
                        "max_block = 0");
  x[7] = std::numeric_limits<float>::infinity();
  expect_error_mentions([&] { ref::hq_quantize(x.data(), 4, 96, 32, 0.5f, kInt4Sym, q.data(), nullptr); },
                        "Inf at flat index 7");
  expect_error_mentions([&] { ref::lsq_init_scale(x.data(), 96, kInt4Sym); }, "Inf at flat index 7");
  expect_error_mentions([&] { ref::hq_search_block(x.data(), 4, x.data(), 4, 96, kInt4Sym); },
                        "x contains Inf at flat index 7");
  x[7] = 1.0f;
  r[3] = std::numeric_limits<float>::quiet_NaN();
  expect_error_mentions([&] { ref::lsq_backward(x.data(), r.data(), 96, kInt4Sym, nullptr); },
                        "r contains NaN at flat index 3");
}
