// The quantized linear layers of both papers against float64 computations of the same math.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <vector>

#include "common/random.h"
#include "nibble/error.h"
#include "ref/bitsplit.h"
#include "ref/hadamard.h"
#include "ref/linear.h"
#include "ref/quant.h"

using namespace nibble;
using nibble::testing::randn;

namespace {

// ‖a − b‖ / ‖b‖ in fp64.
double rel_err(const std::vector<float>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

// x[rows, cols] · BlockDiag(H) with the dense orthonormal matrix, fp64.
std::vector<double> hadamard_dense(const std::vector<double>& x, int64_t rows, int64_t cols,
                                   int64_t block) {
  const std::vector<float> h = ref::hadamard_matrix(block);
  std::vector<double> out(x.size(), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b0 = 0; b0 < cols; b0 += block)
      for (int64_t j = 0; j < block; ++j) {
        double acc = 0;
        for (int64_t i = 0; i < block; ++i)
          acc += x[static_cast<size_t>(r * cols + b0 + i)] * h[static_cast<size_t>(i * block + j)];
        out[static_cast<size_t>(r * cols + b0 + j)] = acc;
      }
  return out;
}

double lsq_delta(double r, QRange q) {
  if (r < q.qmin) return q.qmin;
  if (r > q.qmax) return q.qmax;
  return std::nearbyint(r) - r;
}

struct Problem {
  int64_t n, d, c;
  std::vector<float> x, w, b, dy;
};

Problem make_problem(int64_t n, int64_t d, int64_t c, uint64_t seed) {
  Problem p{n, d, c, {}, {}, {}, {}};
  p.x = nibble::testing::randn_with_outlier_channels(n, d, seed, 2, 20.0f);
  p.w = randn(c * d, seed + 1, 0.05f);
  p.b = randn(c, seed + 2, 0.1f);
  // Gradients are row-sparse in practice (algorithms.md B.3): a few heavy token rows.
  p.dy = randn(n * c, seed + 3, 1e-3f);
  for (int64_t r = 0; r < n; r += 7)
    for (int64_t j = 0; j < c; ++j) p.dy[static_cast<size_t>(r * c + j)] *= 30.0f;
  return p;
}

}  // namespace

TEST(HqLinear, ForwardIsTheDequantizedIntegerProduct) {
  const Problem p = make_problem(37, 96, 40, 101);
  ref::HqLinearConfig cfg;
  cfg.block = 32;
  std::vector<float> xh(p.x), wh(p.w);
  ref::hadamard_blocks(xh.data(), p.n, p.d, cfg.block);
  ref::hadamard_blocks(wh.data(), p.c, p.d, cfg.block);
  const float sx = ref::lsq_init_scale(xh.data(), p.n * p.d, cfg.range);
  const float sw = ref::lsq_init_scale(wh.data(), p.c * p.d, cfg.range);
  std::vector<float> y(static_cast<size_t>(p.n * p.c));
  ref::HqLinearSaved saved;
  ref::hq_linear_forward(p.x.data(), p.w.data(), p.b.data(), p.n, p.d, p.c, sx, sw, cfg, y.data(), &saved);

  std::vector<double> expect(y.size()), exact(y.size());
  for (int64_t i = 0; i < p.n; ++i)
    for (int64_t j = 0; j < p.c; ++j) {
      int64_t acc = 0;
      double full = 0;
      for (int64_t k = 0; k < p.d; ++k) {
        acc += saved.x_q[static_cast<size_t>(i * p.d + k)] * saved.w_q[static_cast<size_t>(j * p.d + k)];
        full += double(p.x[static_cast<size_t>(i * p.d + k)]) * p.w[static_cast<size_t>(j * p.d + k)];
      }
      expect[static_cast<size_t>(i * p.c + j)] = double(sx) * sw * double(acc) + p.b[static_cast<size_t>(j)];
      exact[static_cast<size_t>(i * p.c + j)] = full + p.b[static_cast<size_t>(j)];
    }
  // Only the final fp32 multiply-add rounds: a few ulps.
  EXPECT_LT(rel_err(y, expect), 1e-6);
  // Against the unquantized product the error is INT4 quantization noise: 8-20 dB of SQNR
  // for outlier-heavy data at block 32 (algorithms.md C.4 shows HQ works at 4 bits).
  const double sqnr = -20 * std::log10(rel_err(y, exact));
  EXPECT_GT(sqnr, 8.0) << "HQ INT4 linear SQNR " << sqnr << " dB";
  // Codes stay inside the configured range.
  for (int8_t q : saved.x_q) ASSERT_TRUE(q >= cfg.range.qmin && q <= cfg.range.qmax);
}

// The whole backward (every row kept) against a float64 computation of the same estimator:
// the same bit split (same Philox key), then fp64 products, LSQ terms, masks and ·Hᵀ.
TEST(HqLinear, BackwardMatchesFloat64Estimator) {
  for (uint64_t seed : {7u, 8u}) {
    const Problem p = make_problem(45, 64, 24, seed * 100);
    ref::HqLinearConfig cfg;
    cfg.block = 16;
    const float sx = 0.9f, sw = 0.012f;
    std::vector<float> y(static_cast<size_t>(p.n * p.c));
    ref::HqLinearSaved saved;
    ref::hq_linear_forward(p.x.data(), p.w.data(), nullptr, p.n, p.d, p.c, sx, sw, cfg, y.data(), &saved);
    const PhiloxKey key{seed, 3, 2, RngRole::rounding};
    const ref::HqLinearGrads g = ref::hq_linear_backward(p.dy.data(), saved, cfg, key);

    std::vector<int8_t> hi(p.dy.size()), lo(p.dy.size());
    PhiloxKey k2 = key;
    k2.role = RngRole::grad_output_rounding;
    const float s = ref::bitsplit(p.dy.data(), p.n, p.c, k2, hi.data(), lo.data(), nullptr);
    EXPECT_EQ(s, g.grad_scale);

    const int64_t n = p.n, d = p.d, c = p.c;
    std::vector<double> dxt(static_cast<size_t>(n * d), 0.0), dwt(static_cast<size_t>(c * d), 0.0);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < c; ++j) {
        const double gq = double(s) * (14.0 * hi[static_cast<size_t>(r * c + j)] + lo[static_cast<size_t>(r * c + j)]);
        for (int64_t k = 0; k < d; ++k) {
          dxt[static_cast<size_t>(r * d + k)] += gq * sw * saved.w_q[static_cast<size_t>(j * d + k)];
          dwt[static_cast<size_t>(j * d + k)] += gq * sx * saved.x_q[static_cast<size_t>(r * d + k)];
        }
      }
    const double gx = 1.0 / std::sqrt(7.0 * double(n * d)), gw = 1.0 / std::sqrt(7.0 * double(c * d));
    double dsx = 0, dsw = 0;
    for (size_t e = 0; e < dxt.size(); ++e) {
      const double r = saved.x_r[e];
      dsx += dxt[e] * lsq_delta(r, cfg.range);
      if (r < cfg.range.qmin || r > cfg.range.qmax) dxt[e] = 0;
    }
    for (size_t e = 0; e < dwt.size(); ++e) {
      const double r = saved.w_r[e];
      dsw += dwt[e] * lsq_delta(r, cfg.range);
      if (r < cfg.range.qmin || r > cfg.range.qmax) dwt[e] = 0;
    }
    const std::vector<double> dx = hadamard_dense(dxt, n, d, cfg.block);
    const std::vector<double> dw = hadamard_dense(dwt, c, d, cfg.block);
    // The integer products are exact; what remains is fp32 rounding of the dequantize step
    // and of the butterfly (log2(16) = 4 add levels): ~10 ulp relative.
    EXPECT_LT(rel_err(g.dx, dx), 2e-6);
    EXPECT_LT(rel_err(g.dw, dw), 2e-6);
    // The LSQ sums are long fp32/fp64 reductions over cancelling terms: compare relatively
    // to the sum of absolute contributions, which bounds their rounding error.
    EXPECT_NEAR(g.dsx, dsx * gx, 1e-4 * std::abs(dsx * gx) + 1e-7);
    EXPECT_NEAR(g.dsw, dsw * gw, 1e-4 * std::abs(dsw * gw) + 1e-7);
    for (int64_t j = 0; j < c; ++j) {
      double sum = 0;
      for (int64_t r = 0; r < n; ++r) sum += p.dy[static_cast<size_t>(r * c + j)];
      EXPECT_NEAR(g.db[static_cast<size_t>(j)], sum, 1e-6 * (1 + std::abs(sum)));
    }
  }
}

// Bernoulli sampling is unbiased given the bit split: for each key the sampled estimator's
// expectation over the masks is the keep-every-row estimator with the same split. Over K
// keys the mean difference shrinks like 1/sqrt(K) (the masks are independent across keys).
TEST(HqLinear, BernoulliSamplingIsUnbiased) {
  const Problem p = make_problem(48, 32, 16, 4242);
  ref::HqLinearConfig keep_cfg, samp_cfg;
  keep_cfg.block = samp_cfg.block = 32;
  samp_cfg.lss = ref::LssMode::bernoulli;
  samp_cfg.sample_fraction = 0.5;
  std::vector<float> y(static_cast<size_t>(p.n * p.c));
  ref::HqLinearSaved saved;
  ref::hq_linear_forward(p.x.data(), p.w.data(), nullptr, p.n, p.d, p.c, 0.8f, 0.01f, keep_cfg, y.data(), &saved);

  auto mean_abs_diff = [&](int keys) {
    std::vector<double> diff_w(static_cast<size_t>(p.c * p.d), 0.0), diff_x(static_cast<size_t>(p.n * p.d), 0.0);
    double scale_w = 0, scale_x = 0, kept = 0;
    for (int t = 0; t < keys; ++t) {
      const PhiloxKey key{9000u + static_cast<uint64_t>(t), 0, 0, RngRole::rounding};
      const auto a = ref::hq_linear_backward(p.dy.data(), saved, keep_cfg, key);
      const auto b = ref::hq_linear_backward(p.dy.data(), saved, samp_cfg, key);
      kept += double(b.kept_rows_dw);
      for (size_t e = 0; e < diff_w.size(); ++e) {
        diff_w[e] += (double(b.dw[e]) - a.dw[e]) / keys;
        scale_w += std::abs(double(a.dw[e])) / keys;
      }
      for (size_t e = 0; e < diff_x.size(); ++e) {
        diff_x[e] += (double(b.dx[e]) - a.dx[e]) / keys;
        scale_x += std::abs(double(a.dx[e])) / keys;
      }
    }
    double ew = 0, ex = 0;
    for (double v : diff_w) ew += std::abs(v);
    for (double v : diff_x) ex += std::abs(v);
    return std::array<double, 3>{ew / scale_w, ex / scale_x, kept / keys};
  };
  const auto small = mean_abs_diff(25);
  const auto large = mean_abs_diff(400);
  // 16x the keys: the relative bias estimate should fall ~4x; demand at least 2.5x.
  EXPECT_LT(large[0], small[0] / 2.5) << small[0] << " -> " << large[0];
  EXPECT_LT(large[1], small[1] / 2.5) << small[1] << " -> " << large[1];
  EXPECT_LT(large[0], 0.1);
  // The expected number of kept split rows is the budget fraction·2N (or all non-zero rows).
  EXPECT_NEAR(large[2], 0.5 * 2 * p.n, 0.1 * p.n);
}

TEST(HqLinear, RejectsBadInput) {
  Problem p = make_problem(8, 48, 8, 5);
  ref::HqLinearConfig cfg;
  cfg.block = 32;  // does not divide D = 48
  std::vector<float> y(64);
  EXPECT_THROW(ref::hq_linear_forward(p.x.data(), p.w.data(), nullptr, 8, 48, 8, 1.f, 1.f, cfg, y.data(), nullptr), Error);
  cfg.block = 16;
  EXPECT_THROW(ref::hq_linear_forward(p.x.data(), p.w.data(), nullptr, 8, 48, 8, 0.f, 1.f, cfg, y.data(), nullptr), Error);
  p.x[5] = NAN;
  EXPECT_THROW(ref::hq_linear_forward(p.x.data(), p.w.data(), nullptr, 8, 48, 8, 1.f, 1.f, cfg, y.data(), nullptr), Error);
  ref::HqLinearSaved empty;
  EXPECT_THROW(ref::hq_linear_backward(p.dy.data(), empty, cfg, PhiloxKey{}), Error);
}

TEST(W4A4Linear, IntegerFormEqualsFakeQuantizedProduct) {
  for (bool asym : {false, true}) {
    const int64_t n = 29, d = 72, c = 33;
    std::vector<float> x = randn(n * d, asym ? 11 : 12, 1.0f, asym ? 0.8f : 0.0f);
    if (asym)  // post-GELU-like: mostly positive with a long right tail
      for (float& v : x) v = v > 0 ? v : 0.1f * v;
    const std::vector<float> w = randn(c * d, 13, 0.05f), b = randn(c, 14, 0.1f);
    ref::W4A4Config cfg;
    cfg.asymmetric = asym;
    ref::W4A4Saved saved;
    std::vector<float> y(static_cast<size_t>(n * c));
    ref::w4a4_linear_forward(x.data(), w.data(), b.data(), n, d, c, cfg, y.data(), &saved);
    std::vector<float> xh(x.size()), wh(w.size());
    ref::dequantize(saved.x_q.data(), n, d, Granularity::row, 0, saved.x_scale.data(),
                    asym ? saved.x_zero.data() : nullptr, xh.data());
    ref::dequantize(saved.w_q.data(), c, d, Granularity::row, 0, saved.w_scale.data(), nullptr, wh.data());
    std::vector<double> expect(y.size()), exact(y.size());
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < c; ++j) {
        double acc = 0, full = 0;
        for (int64_t k = 0; k < d; ++k) {
          acc += double(xh[static_cast<size_t>(i * d + k)]) * wh[static_cast<size_t>(j * d + k)];
          full += double(x[static_cast<size_t>(i * d + k)]) * w[static_cast<size_t>(j * d + k)];
        }
        expect[static_cast<size_t>(i * c + j)] = acc + b[static_cast<size_t>(j)];
        exact[static_cast<size_t>(i * c + j)] = full + b[static_cast<size_t>(j)];
      }
    // The integer path is exact up to the epilogue's fp32 multiply; the fake-quant side
    // rounds each dequantized value to fp32 (~1 ulp each, random signs): ~1e-6 relative.
    EXPECT_LT(rel_err(y, expect), 1e-5) << "asymmetric=" << asym;
    const double sqnr = -20 * std::log10(rel_err(y, exact));
    EXPECT_GT(sqnr, 12.0) << "W4A4 SQNR " << sqnr << " dB, asymmetric=" << asym;
    if (asym) {
      for (int8_t q : saved.x_q) ASSERT_TRUE(q >= 0 && q <= 15);
    }
  }
}

TEST(W4A4Linear, StraightThroughBackward) {
  const int64_t n = 17, d = 40, c = 9;
  const std::vector<float> x = randn(n * d, 21), w = randn(c * d, 22, 0.1f), dy = randn(n * c, 23);
  ref::W4A4Saved saved;
  std::vector<float> y(static_cast<size_t>(n * c)), dx(x.size()), dw(w.size()), db(static_cast<size_t>(c));
  ref::w4a4_linear_forward(x.data(), w.data(), nullptr, n, d, c, ref::W4A4Config{}, y.data(), &saved);
  ref::w4a4_linear_backward(dy.data(), saved, dx.data(), dw.data(), db.data());
  std::vector<float> xh(x.size()), wh(w.size());
  ref::dequantize(saved.x_q.data(), n, d, Granularity::row, 0, saved.x_scale.data(), nullptr, xh.data());
  ref::dequantize(saved.w_q.data(), c, d, Granularity::row, 0, saved.w_scale.data(), nullptr, wh.data());
  std::vector<double> edx(dx.size(), 0.0), edw(dw.size(), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c; ++j)
      for (int64_t k = 0; k < d; ++k) {
        edx[static_cast<size_t>(i * d + k)] += double(dy[static_cast<size_t>(i * c + j)]) * wh[static_cast<size_t>(j * d + k)];
        edw[static_cast<size_t>(j * d + k)] += double(dy[static_cast<size_t>(i * c + j)]) * xh[static_cast<size_t>(i * d + k)];
      }
  EXPECT_LT(rel_err(dx, edx), 1e-6);
  EXPECT_LT(rel_err(dw, edw), 1e-6);
}
