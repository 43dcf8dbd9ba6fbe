// The quantized linear layers of both papers against float64 computations of the same math.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cmath>
#include <tuple>
#include <vector>

#include "common/random.h"
#include "nibble/error.h"
#include "nibble/rng.h"
#include "ref/bitsplit.h"
#include "ref/hadamard.h"
#include "ref/int8_linear.h"
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
  ref::hq_linear_forward(p.x.data(), p.w.data(), p.b.data(), p.n, p.d, p.c, sx, sw, cfg,
                         PhiloxKey{101, 0, 1, RngRole::rounding}, y.data(), &saved);
  const std::vector<int8_t> x_q = saved.x_q(), w_q = saved.w_q();

  std::vector<double> expect(y.size()), exact(y.size());
  for (int64_t i = 0; i < p.n; ++i)
    for (int64_t j = 0; j < p.c; ++j) {
      int64_t acc = 0;
      double full = 0;
      for (int64_t k = 0; k < p.d; ++k) {
        acc += x_q[static_cast<size_t>(i * p.d + k)] * w_q[static_cast<size_t>(j * p.d + k)];
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
  for (int8_t q : x_q) ASSERT_TRUE(q >= cfg.range.qmin && q <= cfg.range.qmax);
  // Inference (no saved state) gives the same output bits.
  std::vector<float> y2(y.size());
  ref::hq_linear_forward(p.x.data(), p.w.data(), p.b.data(), p.n, p.d, p.c, sx, sw, cfg,
                         PhiloxKey{}, y2.data(), nullptr);
  EXPECT_EQ(y, y2);
}

namespace {

// The parts of the backward that do not depend on the side channel, in fp64: the
// transformed-domain products dx_t, dw_t (before masks) from the same bit split, and the
// exact r = v/s the forward rounded (fp32, computed as the forward does).
struct HqReference {
  std::vector<double> dxt, dwt;
  std::vector<float> x_r, w_r;
  float grad_scale = 0;
};

HqReference hq_reference(const Problem& p, const ref::HqLinearSaved& saved,
                         const ref::HqLinearConfig& cfg, const PhiloxKey& key) {
  const int64_t n = p.n, d = p.d, c = p.c;
  HqReference out;
  std::vector<int8_t> hi(p.dy.size()), lo(p.dy.size()), q(static_cast<size_t>(std::max(n, c) * d));
  PhiloxKey k2 = key;
  k2.role = RngRole::grad_output_rounding;
  out.grad_scale = ref::bitsplit(p.dy.data(), n, c, k2, hi.data(), lo.data(), nullptr);
  const double s = out.grad_scale;
  const std::vector<int8_t> x_q = saved.x_q(), w_q = saved.w_q();
  out.dxt.assign(static_cast<size_t>(n * d), 0.0);
  out.dwt.assign(static_cast<size_t>(c * d), 0.0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < c; ++j) {
      const double gq = s * (14.0 * hi[static_cast<size_t>(r * c + j)] + lo[static_cast<size_t>(r * c + j)]);
      for (int64_t k = 0; k < d; ++k) {
        out.dxt[static_cast<size_t>(r * d + k)] += gq * saved.sw * w_q[static_cast<size_t>(j * d + k)];
        out.dwt[static_cast<size_t>(j * d + k)] += gq * saved.sx * x_q[static_cast<size_t>(r * d + k)];
      }
    }
  out.x_r.resize(static_cast<size_t>(n * d));
  out.w_r.resize(static_cast<size_t>(c * d));
  ref::hq_quantize(p.x.data(), n, d, cfg.block, saved.sx, cfg.range, q.data(), out.x_r.data());
  ref::hq_quantize(p.w.data(), c, d, cfg.block, saved.sw, cfg.range, q.data(), out.w_r.data());
  return out;
}

bool clipped(double r, QRange q) { return r < q.qmin || r > q.qmax; }

// g·Σ grad·δ with the exact δ(r) (what an fp32 copy of r would give).
double exact_step_grad(const std::vector<double>& grad, const std::vector<float>& r, QRange q) {
  double sum = 0;
  for (size_t e = 0; e < grad.size(); ++e) sum += grad[e] * lsq_delta(r[e], q);
  return sum / std::sqrt(double(q.qmax) * double(grad.size()));
}

// g·Σ grad·δ̃ with δ̃ decoded from the saved side channel (what the backward estimates).
double coded_step_grad(const std::vector<double>& grad, const std::vector<int8_t>& codes,
                       const std::vector<int8_t>& side, QRange q) {
  double sum = 0;
  for (size_t e = 0; e < grad.size(); ++e)
    sum += grad[e] * (side[e] == -8 ? double(codes[e]) : side[e] / 14.0);
  return sum / std::sqrt(double(q.qmax) * double(grad.size()));
}

}  // namespace

// The side channel holds exactly the STE mask and a one-step stochastic rounding of 14·δ.
TEST(HqLinear, SideChannelEncodesMaskAndResidual) {
  for (QRange range : {kInt4Sym, kInt4Full}) {
    const Problem p = make_problem(33, 64, 20, 77);
    ref::HqLinearConfig cfg;
    cfg.block = 32;
    cfg.range = range;
    std::vector<float> y(static_cast<size_t>(p.n * p.c));
    ref::HqLinearSaved saved;
    // sx small enough that the outlier channels clip
    ref::hq_linear_forward(p.x.data(), p.w.data(), nullptr, p.n, p.d, p.c, 0.8f, 0.01f, cfg,
                           PhiloxKey{5, 1, 3, RngRole::rounding}, y.data(), &saved);
    const std::vector<int8_t> x_q = saved.x_q(), x_e = saved.x_e();
    std::vector<int8_t> q_ref(x_q.size());
    std::vector<float> r(x_q.size());
    ref::hq_quantize(p.x.data(), p.n, p.d, cfg.block, 0.8f, range, q_ref.data(), r.data());
    EXPECT_EQ(x_q, q_ref);
    int64_t n_clipped = 0;
    for (size_t e = 0; e < r.size(); ++e) {
      ASSERT_EQ(x_e[e] == ref::kLsqClipped, clipped(r[e], range)) << "element " << e;
      if (x_e[e] == ref::kLsqClipped) {
        ++n_clipped;
        // δ of a clipped element is its code: qmin below, qmax above
        ASSERT_EQ(double(x_q[e]), lsq_delta(r[e], range));
      } else {
        // e is floor or ceil of 14·δ
        const double t = 14.0 * lsq_delta(r[e], range);
        ASSERT_TRUE(x_e[e] == std::floor(t) || x_e[e] == std::ceil(t)) << t << " -> " << int(x_e[e]);
      }
    }
    // The case must be exercised: some clipped, most not.
    EXPECT_GT(n_clipped, 0);
    EXPECT_LT(n_clipped, int64_t(r.size()) / 4);
  }
}

// lsq_backward_exact: the step sum on the integers. Its value is g·(S·T)/14 with T = Σ acc·w
// computed here in __int128; it is the same whatever order the terms come in (the device
// sums in another); it masks like lsq_backward_coded and stays within ~2^-23 relative of the
// coded form's sum of fp32-rounded values; T may pass 2^31 and partial sums may wrap.
TEST(HqLinear, ExactStepSumIsTheIntegerSum) {
  const int64_t n = 4099;
  std::vector<int32_t> acc(static_cast<size_t>(n));
  std::vector<int8_t> q(acc.size()), e(acc.size());
  const PhiloxKey key{31, 2, 7, RngRole::data};
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = philox_u32(key, static_cast<uint64_t>(i));
    // large accumulators (|acc| up to 2^26): T passes 2^31 many times over
    acc[static_cast<size_t>(i)] = static_cast<int32_t>(u % (1u << 27)) - (1 << 26);
    e[static_cast<size_t>(i)] = static_cast<int8_t>(static_cast<int>((u >> 27) % 16) - 8);
    q[static_cast<size_t>(i)] = static_cast<int8_t>(static_cast<int>(philox_u32(key, n + i) % 16) - 8);
  }
  const float scale = 3.1e-5f;
  std::vector<float> g(acc.size()), masked(acc.size());
  for (size_t i = 0; i < g.size(); ++i) g[i] = static_cast<float>(acc[i]) * scale;
  const float got = ref::lsq_backward_exact(acc.data(), scale, g.data(), q.data(), e.data(), n,
                                            kInt4Full, masked.data());
  __int128 t = 0;
  for (size_t i = 0; i < acc.size(); ++i)
    t += static_cast<__int128>(acc[i]) * (e[i] == ref::kLsqClipped ? 14 * q[i] : e[i]);
  const double gs = 1.0 / std::sqrt(7.0 * static_cast<double>(n));
  EXPECT_EQ(got, static_cast<float>(gs * (static_cast<double>(scale) *
                                          static_cast<double>(static_cast<int64_t>(t)) / 14.0)));
  for (size_t i = 0; i < g.size(); ++i)
    ASSERT_EQ(masked[i], e[i] == ref::kLsqClipped ? 0.0f : g[i]) << "element " << i;
  // any order: reversed
  std::vector<int32_t> acc_r(acc.rbegin(), acc.rend());
  std::vector<int8_t> q_r(q.rbegin(), q.rend()), e_r(e.rbegin(), e.rend());
  std::vector<float> g_r(g.rbegin(), g.rend());
  EXPECT_EQ(ref::lsq_backward_exact(acc_r.data(), scale, g_r.data(), q_r.data(), e_r.data(), n,
                                    kInt4Full, nullptr),
            got);
  // against the coded form (fp64 sum of the fp32 values): within 2^-23 of Σ|g·δ̃|
  double abs_sum = 0;
  for (size_t i = 0; i < g.size(); ++i)
    abs_sum += std::fabs(static_cast<double>(g[i]) * ref::lsq_residual_decode(e[i], q[i]));
  std::vector<float> scratch(g.size());
  const float coded = ref::lsq_backward_coded(g.data(), q.data(), e.data(), n, kInt4Full,
                                              scratch.data());
  EXPECT_LE(std::fabs(static_cast<double>(got) - coded),
            gs * std::ldexp(1.0, -23) * abs_sum + std::ldexp(std::fabs(coded), -23));
  EXPECT_THROW(ref::lsq_backward_exact(acc.data(), NAN, g.data(), q.data(), e.data(), n,
                                       kInt4Full, nullptr),
               Error);
  EXPECT_TRUE(ref::lsq_exact_sum_fits(int64_t{1} << 30, 90.0 * 8 * 4096));
  EXPECT_FALSE(ref::lsq_exact_sum_fits(int64_t{1} << 40, 90.0 * 8 * 4096));
}

// The whole backward (every row kept) against a float64 computation of the same estimator:
// the same bit split (same Philox key), then fp64 products, LSQ terms, masks and ·Hᵀ.
// dx and dw use the exact masks (from an fp32 r recomputed here), so they are checked as
// tightly as with an fp32 copy of r; dsx and dsw are checked against the estimator's own
// value g·Σ grad·δ̃ decoded from the saved nibbles (their unbiasedness is the next test).
TEST(HqLinear, BackwardMatchesFloat64Estimator) {
  for (uint64_t seed : {7u, 8u}) {
    const Problem p = make_problem(45, 64, 24, seed * 100);
    ref::HqLinearConfig cfg;
    cfg.block = 16;
    const float sx = 0.9f, sw = 0.012f;
    std::vector<float> y(static_cast<size_t>(p.n * p.c));
    ref::HqLinearSaved saved;
    ref::hq_linear_forward(p.x.data(), p.w.data(), nullptr, p.n, p.d, p.c, sx, sw, cfg,
                           PhiloxKey{seed, 3, 2, RngRole::rounding}, y.data(), &saved);
    const PhiloxKey key{seed, 3, 2, RngRole::rounding};
    const ref::HqLinearGrads g = ref::hq_linear_backward(p.dy.data(), saved, cfg, key);
    HqReference ref_bw = hq_reference(p, saved, cfg, key);
    EXPECT_EQ(ref_bw.grad_scale, g.grad_scale);

    const int64_t n = p.n, d = p.d, c = p.c;
    const double dsx = coded_step_grad(ref_bw.dxt, saved.x_q(), saved.x_e(), cfg.range);
    const double dsw = coded_step_grad(ref_bw.dwt, saved.w_q(), saved.w_e(), cfg.range);
    int64_t masked = 0;
    for (size_t e = 0; e < ref_bw.dxt.size(); ++e)
      if (clipped(ref_bw.x_r[e], cfg.range)) ref_bw.dxt[e] = 0, ++masked;
    for (size_t e = 0; e < ref_bw.dwt.size(); ++e)
      if (clipped(ref_bw.w_r[e], cfg.range)) ref_bw.dwt[e] = 0, ++masked;
    EXPECT_GT(masked, 0) << "the STE mask must be exercised";
    const std::vector<double> dx = hadamard_dense(ref_bw.dxt, n, d, cfg.block);
    const std::vector<double> dw = hadamard_dense(ref_bw.dwt, c, d, cfg.block);
    // The integer products are exact; what remains is fp32 rounding of the dequantize step
    // and of the butterfly (log2(16) = 4 add levels): ~10 ulp relative.
    EXPECT_LT(rel_err(g.dx, dx), 2e-6);
    EXPECT_LT(rel_err(g.dw, dw), 2e-6);
    // The LSQ sums are long fp32/fp64 reductions over cancelling terms: compare relatively
    // to their magnitude (fp32 products summed in fp64: ~1e-6 relative at most here).
    EXPECT_NEAR(g.dsx, dsx, 1e-4 * std::abs(dsx) + 1e-7);
    EXPECT_NEAR(g.dsw, dsw, 1e-4 * std::abs(dsw) + 1e-7);
    for (int64_t j = 0; j < c; ++j) {
      double sum = 0;
      for (int64_t r = 0; r < n; ++r) sum += p.dy[static_cast<size_t>(r * c + j)];
      EXPECT_NEAR(g.db[static_cast<size_t>(j)], sum, 1e-6 * (1 + std::abs(sum)));
    }
  }
}

// The step-size gradients from the side channel are unbiased: with the backward's key fixed
// (same bit split, same dx_t, dw_t), the mean over K forward keys of dsx (dsw) approaches the
// exact g·Σ dx_t·δ(r) of an fp32 copy of r. Bound: 5 standard errors of the mean (SE from
// the sample standard deviation over the keys; the keys' streams are independent). The SE
// shrinks like 1/sqrt(K), checked between K = 128 and K = 2048 (ratio 4). A biased encoding
// (deterministic floor(14·δ)) misses by 11 SE (dsw) and 25 SE (dsx) at K = 2048 here.
TEST(HqLinear, StepSizeGradientIsUnbiased) {
  const Problem p = make_problem(40, 64, 24, 9090);
  ref::HqLinearConfig cfg;
  cfg.block = 32;
  const float sx = 0.6f, sw = 0.012f;
  const PhiloxKey bkey{17, 5, 4, RngRole::rounding};
  std::vector<float> y(static_cast<size_t>(p.n * p.c));
  ref::HqLinearSaved saved;
  ref::hq_linear_forward(p.x.data(), p.w.data(), nullptr, p.n, p.d, p.c, sx, sw, cfg, bkey,
                         y.data(), &saved);
  const HqReference rb = hq_reference(p, saved, cfg, bkey);
  const double exact_x = exact_step_grad(rb.dxt, rb.x_r, cfg.range);
  const double exact_w = exact_step_grad(rb.dwt, rb.w_r, cfg.range);

  const int keys = 2048;
  std::vector<double> sx_samples, sw_samples;
  for (int t = 0; t < keys; ++t) {
    ref::hq_linear_forward(p.x.data(), p.w.data(), nullptr, p.n, p.d, p.c, sx, sw, cfg,
                           PhiloxKey{1000u + uint64_t(t), uint32_t(t), 4, RngRole::rounding},
                           y.data(), &saved);
    const ref::HqLinearGrads g = ref::hq_linear_backward(p.dy.data(), saved, cfg, bkey);
    sx_samples.push_back(g.dsx);
    sw_samples.push_back(g.dsw);
  }
  struct Stats { double mean, se; };
  auto stats = [](const std::vector<double>& v, size_t k) {
    double m = 0, var = 0;
    for (size_t i = 0; i < k; ++i) m += v[i] / double(k);
    for (size_t i = 0; i < k; ++i) var += (v[i] - m) * (v[i] - m) / double(k - 1);
    return Stats{m, std::sqrt(var / double(k))};
  };
  for (auto [samples, exact, what] : {std::tuple{&sx_samples, exact_x, "dsx"},
                                      std::tuple{&sw_samples, exact_w, "dsw"}}) {
    const Stats small = stats(*samples, 128), large = stats(*samples, keys);
    EXPECT_LT(std::abs(small.mean - exact), 5 * small.se) << what << " K=128";
    EXPECT_LT(std::abs(large.mean - exact), 5 * large.se) << what << " K=" << keys;
    // SE(128)/SE(2048) = 4 up to the sampling error of the K = 128 standard deviation
    // (relative sd 1/sqrt(2·127) ≈ 6.3%, i.e. 0.25 on the ratio): ±1.3 is > 5 sigma.
    EXPECT_NEAR(small.se / large.se, 4.0, 1.3) << what;
    // The noise is small next to the gradient itself: one key is already a useful estimate.
    EXPECT_LT(large.se * std::sqrt(double(keys)), 0.2 * std::abs(exact)) << what;
  }
}

// The saved state is 1 byte per element of x and w (code + side-channel nibbles) against
// 4 bytes per element for an fp32 copy of r (and 5 for the old int8 codes + fp32 r).
TEST(HqLinear, SavedStateIsOneBytePerElement) {
  for (int64_t d : {64, 63}) {
    const int64_t n = 31, c = 10;
    const std::vector<float> x = randn(n * d, 3), w = randn(c * d, 4, 0.1f);
    ref::HqLinearConfig cfg;
    cfg.block = 1;
    std::vector<float> y(static_cast<size_t>(n * c));
    ref::HqLinearSaved saved;
    ref::hq_linear_forward(x.data(), w.data(), nullptr, n, d, c, 0.5f, 0.05f, cfg, PhiloxKey{},
                           y.data(), &saved);
    const int64_t row_bytes = (d + 1) / 2;  // odd rows end on a half byte
    EXPECT_EQ(saved.bytes(), 2 * (n + c) * row_bytes + 8);
    EXPECT_LE(saved.bytes(), (n + c) * (d + 1) + 8);
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
  ref::hq_linear_forward(p.x.data(), p.w.data(), nullptr, p.n, p.d, p.c, 0.8f, 0.01f, keep_cfg,
                         PhiloxKey{}, y.data(), &saved);

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

namespace {

// The dw sampling of one backward, recomputed with the reference's selection helpers (tested
// in test_bitsplit.cpp): bit split, dw leverage scores, p, Bernoulli rows.
// An output gradient whose rows span two decades (scales 1, 0.32, 0.1, 0.03 in turn), so that
// the hi halves of many rows are non-zero and the fitted p of hi and of lo rows fall below 1.
std::vector<float> graded_grad(int64_t n, int64_t c, uint64_t seed) {
  std::vector<float> g = randn(n * c, seed);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < c; ++j)
      g[static_cast<size_t>(r * c + j)] *= static_cast<float>(std::pow(10.0, -0.5 * double(r % 4)));
  return g;
}

struct DwSampling {
  std::vector<int8_t> hi, lo;
  std::vector<float> p;
  std::vector<uint8_t> keep;
  float s = 0;
  int64_t kept = 0;
};

DwSampling dw_sampling(const Problem& pr, const ref::HqLinearSaved& saved,
                       const ref::HqLinearConfig& cfg, const PhiloxKey& key) {
  const int64_t n = pr.n, c = pr.c, d = pr.d;
  DwSampling o;
  o.hi.resize(pr.dy.size());
  o.lo.resize(pr.dy.size());
  o.s = ref::bitsplit(pr.dy.data(), n, c, PhiloxKey{key.seed, key.step, key.layer, RngRole::grad_output_rounding},
                      o.hi.data(), o.lo.data(), nullptr);
  std::vector<float> xn(static_cast<size_t>(n)), sc(static_cast<size_t>(2 * n));
  const std::vector<int8_t> xq = saved.x_q();
  ref::row_norms_s8(xq.data(), n, d, xn.data());
  for (float& v : xn) v *= saved.sx;
  ref::leverage_scores(o.hi.data(), o.lo.data(), n, c, o.s, xn.data(), sc.data());
  o.p.resize(sc.size());
  o.keep.resize(sc.size());
  ref::fit_probabilities(sc.data(), 2 * n, cfg.sample_fraction * double(2 * n), o.p.data());
  o.kept = ref::sample_rows(o.p.data(), 2 * n, PhiloxKey{key.seed, key.step, key.layer, RngRole::sample_dw},
                            o.keep.data());
  return o;
}

}  // namespace

// The sampled backward against a float64 computation of its estimator. dw: the kept rows'
// β/p-weighted codes re-quantized to int8 with one scale t (the formula of
// ref::requantize_sampled_rows, written out again here in fp32), then fp64 sums, masks and
// ·Hᵀ; dx: the fp64 1/p row weights on the exact integer products. Both within the fp32
// rounding of the dequantize step and the butterfly (~10 ulp relative, as the keep-all test).
TEST(HqLinear, BernoulliBackwardMatchesFloat64Estimator) {
  for (uint64_t seed : {31u, 32u}) {
    Problem pr = make_problem(45, 64, 24, seed * 77);
    pr.dy = graded_grad(pr.n, pr.c, seed * 77 + 9);
    const int64_t n = pr.n, d = pr.d, c = pr.c;
    ref::HqLinearConfig cfg;
    cfg.block = 16;
    cfg.lss = ref::LssMode::bernoulli;
    cfg.sample_fraction = 0.35;
    std::vector<float> y(static_cast<size_t>(n * c));
    ref::HqLinearSaved saved;
    ref::hq_linear_forward(pr.x.data(), pr.w.data(), nullptr, n, d, c, 0.9f, 0.012f, cfg,
                           PhiloxKey{seed, 1, 6, RngRole::rounding}, y.data(), &saved);
    const PhiloxKey key{seed + 5, 2, 6, RngRole::rounding};
    const ref::HqLinearGrads g = ref::hq_linear_backward(pr.dy.data(), saved, cfg, key);
    const DwSampling ds = dw_sampling(pr, saved, cfg, key);
    EXPECT_EQ(g.kept_rows_dw, ds.kept);
    EXPECT_EQ(g.grad_scale, ds.s);
    // The case must exercise the weights: rows dropped, and kept rows with p well below 1.
    EXPECT_LT(ds.kept, 2 * n);
    int64_t small_p_hi = 0, small_p_lo = 0;
    for (int64_t i = 0; i < 2 * n; ++i) {
      const bool small = ds.keep[size_t(i)] && ds.p[size_t(i)] < 0.75f;
      (i < n ? small_p_hi : small_p_lo) += small;
    }
    EXPECT_GT(small_p_hi, 0);
    EXPECT_GT(small_p_lo, 0);

    // f_i = β_i / p_i, a = f_i·code, t = max|a| / 127, q = clamp(floor(a/t + u), ±127)
    auto code = [&](int64_t i, int64_t col) {
      return i < n ? ds.hi[size_t(i * c + col)] : ds.lo[size_t((i - n) * c + col)];
    };
    std::vector<float> f(static_cast<size_t>(2 * n), 0.0f);
    float a_max = 0;
    for (int64_t i = 0; i < 2 * n; ++i) {
      if (!ds.keep[size_t(i)]) continue;
      f[size_t(i)] = (i < n ? 14.0f : 1.0f) / ds.p[size_t(i)];
      for (int64_t col = 0; col < c; ++col)
        a_max = std::max(a_max, std::fabs(f[size_t(i)] * float(code(i, col))));
    }
    const float t = a_max / 127.0f;
    const PhiloxKey rkey{key.seed, key.step, key.layer, RngRole::sample_dw_rounding};
    std::vector<int8_t> q(static_cast<size_t>(2 * n * c), 0), q_ref(q.size());
    for (int64_t i = 0; i < 2 * n; ++i) {
      if (!ds.keep[size_t(i)]) continue;
      for (int64_t col = 0; col < c; ++col) {
        const float a = f[size_t(i)] * float(code(i, col));
        const float v = std::floor(a / t + philox_uniform(rkey, uint64_t(i * c + col)));
        q[size_t(i * c + col)] = int8_t(std::clamp(v, -127.0f, 127.0f));
      }
    }
    EXPECT_EQ(ref::requantize_sampled_rows(ds.hi.data(), ds.lo.data(), n, c, ds.p.data(),
                                           ds.keep.data(), rkey, q_ref.data()),
              t);
    EXPECT_EQ(q, q_ref);

    // dw_t = Σ_kept q_iᵀ·x_q(i mod N) · t·s·sx ; dx_t[r] = Σ_{i ∈ {r, N+r} kept} (β_i s/p_i)·code_i·w_q·sw
    const std::vector<int8_t> xq = saved.x_q(), wq = saved.w_q();
    HqReference rb = hq_reference(pr, saved, cfg, key);  // for x_r, w_r (the exact masks)
    std::vector<double> dwt(static_cast<size_t>(c * d), 0.0), dxt(static_cast<size_t>(n * d), 0.0);
    std::vector<float> p_x(static_cast<size_t>(2 * n)), sc_x(p_x.size());
    std::vector<uint8_t> keep_x(p_x.size());
    ref::leverage_scores(ds.hi.data(), ds.lo.data(), n, c, ds.s, nullptr, sc_x.data());
    ref::fit_probabilities(sc_x.data(), 2 * n, cfg.sample_fraction * double(2 * n), p_x.data());
    EXPECT_EQ(ref::sample_rows(p_x.data(), 2 * n, PhiloxKey{key.seed, key.step, key.layer, RngRole::sample_dx}, keep_x.data()),
              g.kept_rows_dx);
    for (int64_t i = 0; i < 2 * n; ++i) {
      const int64_t r = i % n;
      const double beta = i < n ? 14.0 : 1.0;
      for (int64_t col = 0; col < c; ++col) {
        if (ds.keep[size_t(i)]) {
          const double qv = q[size_t(i * c + col)];
          for (int64_t k = 0; k < d; ++k) dwt[size_t(col * d + k)] += qv * xq[size_t(r * d + k)];
        }
        if (keep_x[size_t(i)]) {
          const double gx = beta * ds.s / p_x[size_t(i)] * code(i, col) * saved.sw;
          for (int64_t k = 0; k < d; ++k) dxt[size_t(r * d + k)] += gx * wq[size_t(col * d + k)];
        }
      }
    }
    for (double& v : dwt) v *= double(t) * ds.s * saved.sx;
    const double dsw = coded_step_grad(dwt, wq, saved.w_e(), cfg.range);
    const double dsx = coded_step_grad(dxt, xq, saved.x_e(), cfg.range);
    for (size_t e = 0; e < dwt.size(); ++e)
      if (clipped(rb.w_r[e], cfg.range)) dwt[e] = 0;
    for (size_t e = 0; e < dxt.size(); ++e)
      if (clipped(rb.x_r[e], cfg.range)) dxt[e] = 0;
    EXPECT_LT(rel_err(g.dw, hadamard_dense(dwt, c, d, cfg.block)), 2e-6) << "seed " << seed;
    EXPECT_LT(rel_err(g.dx, hadamard_dense(dxt, n, d, cfg.block)), 2e-6) << "seed " << seed;
    EXPECT_NEAR(g.dsw, dsw, 1e-4 * std::abs(dsw) + 1e-7);
    EXPECT_NEAR(g.dsx, dsx, 1e-4 * std::abs(dsx) + 1e-7);
  }
}

// The sampled dw is unbiased: for each key, E[sampled dw − keep-all dw] = 0 over the masks
// and the re-quantization's u, given that key's bit split (the mask and ·Hᵀ are linear and
// fixed by the saved state). The K keys draw independent streams, so the differences D_t are
// independent with mean 0, and their mean over K keys has standard error SE = sd/sqrt(K)
// (sd estimated from the same samples). Checked per element and on the projection
// S_t = <D_t, dw_t> / ‖dw_t‖² (the relative error of the sampled gradient along the true one,
// where a missing or wrong 1/p shows as a scale bias):
//   |mean| < 5·SE: a false alarm has probability ~6e-7 per statistic under the CLT (the
//   per-element check has c·d = 512 of them: ~3e-4 in all).
// SE must shrink like 1/sqrt(K): SE(128)/SE(2048) = 4, up to the sampling error of the K = 128
// standard deviation (relative ~1/sqrt(2·127) ≈ 6% for Gaussian data; the 1/p weights make
// the tails heavier, so ±1.5 on the ratio, i.e. ±37%).
// Two gradients: row-sparse (make_problem: only lo rows are sampled with p < 1) and graded
// (hi rows too). Measured sensitivity at K = 2048: dropping 1/p moves S by −0.01 and −0.08
// (≈ 75 and 120 SE); rounding a/t to nearest instead of stochastically gives a per-element
// z of 14 on the row-sparse gradient.
TEST(HqLinear, BernoulliDwIsUnbiased) {
  for (int graded : {0, 1}) {
    SCOPED_TRACE(graded ? "graded gradient" : "row-sparse gradient");
    Problem pr = make_problem(37, 32, 16, 5151);
    if (graded) pr.dy = graded_grad(pr.n, pr.c, 5152);
    ref::HqLinearConfig keep_cfg, samp_cfg;
    keep_cfg.block = samp_cfg.block = 32;
    samp_cfg.lss = ref::LssMode::bernoulli;
    samp_cfg.sample_fraction = 0.3;
    std::vector<float> y(static_cast<size_t>(pr.n * pr.c));
    ref::HqLinearSaved saved;
    ref::hq_linear_forward(pr.x.data(), pr.w.data(), nullptr, pr.n, pr.d, pr.c, 0.8f, 0.01f,
                           keep_cfg, PhiloxKey{3, 0, 1, RngRole::rounding}, y.data(), &saved);
    const int keys = 2048;
    const size_t m = static_cast<size_t>(pr.c * pr.d);
    std::vector<std::vector<double>> diff(keys, std::vector<double>(m));
    std::vector<double> proj(keys);
    double kept = 0;
    for (int t = 0; t < keys; ++t) {
      const PhiloxKey key{70000u + uint64_t(t), uint32_t(t), 1, RngRole::rounding};
      const auto a = ref::hq_linear_backward(pr.dy.data(), saved, keep_cfg, key);
      const auto b = ref::hq_linear_backward(pr.dy.data(), saved, samp_cfg, key);
      kept += double(b.kept_rows_dw) / keys;
      double dot = 0, norm2 = 0;
      for (size_t e = 0; e < m; ++e) {
        diff[size_t(t)][e] = double(b.dw[e]) - double(a.dw[e]);
        dot += diff[size_t(t)][e] * a.dw[e];
        norm2 += double(a.dw[e]) * a.dw[e];
      }
      proj[size_t(t)] = dot / norm2;
    }
    struct Stats { double mean, se; };
    auto stats = [](auto value, size_t k) {
      double mean = 0, var = 0;
      for (size_t i = 0; i < k; ++i) mean += value(i) / double(k);
      for (size_t i = 0; i < k; ++i) var += (value(i) - mean) * (value(i) - mean) / double(k - 1);
      return Stats{mean, std::sqrt(var / double(k))};
    };
    // Sampling really happened: about the budget 0.3·2N of the 2N rows kept.
    EXPECT_NEAR(kept, 0.3 * 2 * pr.n, 0.05 * 2 * pr.n);
    for (size_t k : {size_t(128), size_t(keys)}) {
      const Stats sp = stats([&](size_t i) { return proj[i]; }, k);
      EXPECT_LT(std::abs(sp.mean), 5 * sp.se) << "projection, K=" << k << ": mean " << sp.mean;
      int64_t bad = 0;
      double worst = 0;
      for (size_t e = 0; e < m; ++e) {
        const Stats st = stats([&](size_t i) { return diff[i][e]; }, k);
        worst = std::max(worst, std::abs(st.mean) / st.se);
        bad += std::abs(st.mean) >= 5 * st.se;
      }
      EXPECT_EQ(bad, 0) << "K=" << k << ": largest |mean|/SE " << worst;
    }
    const Stats small = stats([&](size_t i) { return proj[i]; }, 128);
    const Stats large = stats([&](size_t i) { return proj[i]; }, keys);
    EXPECT_NEAR(small.se / large.se, 4.0, 1.5);
    // One sample is a usable gradient: its relative error along dw has sd well below 1.
    EXPECT_LT(large.se * std::sqrt(double(keys)), 0.5);
  }
}

// requantize_sampled_rows on a hand-made case: 3 tokens, 5 columns; hi rows 0 (p = 1) and 2
// (p = 0.6) and lo row 1 (split row 4, p = 0.01) kept, the rest dropped. The small-p row
// dominates the scale: t = (1/0.01)·6/127 ≈ 600/127, and its −6 becomes the clamped −127.
TEST(HqLinear, RequantizedSampledRowsFollowTheFormula) {
  const int64_t n = 3, c = 5;
  const std::vector<int8_t> hi = {6, -2, 3, 1, -5,   4, 2, -1, 3, 5,   -3, 6, 2, -4, 1};
  const std::vector<int8_t> lo = {-1, 2, 4, -3, 1,   3, -6, 1, 5, -2,   2, 1, -5, 3, 4};
  const std::vector<float> p = {1.0f, 0.3f, 0.6f, 0.2f, 0.01f, 0.9f};
  const std::vector<uint8_t> keep = {1, 0, 1, 0, 1, 0};
  const PhiloxKey key{123, 4, 2, RngRole::sample_dw_rounding};
  std::vector<int8_t> q(static_cast<size_t>(2 * n * c), 99);
  const float t = ref::requantize_sampled_rows(hi.data(), lo.data(), n, c, p.data(), keep.data(),
                                               key, q.data());
  // The largest |a| is lo row 1's −6 weighted by 1/0.01 (100 in fp32), not 14·6 = 84 of the
  // p = 1 row nor (14/0.6)·6 = 140.
  EXPECT_EQ(t, ((1.0f / 0.01f) * 6.0f) / 127.0f);
  EXPECT_NEAR(t, 600.0 / 127.0, 1e-5);
  const std::vector<float> f = {14.0f / 1.0f, 0, 14.0f / 0.6f, 0, 1.0f / 0.01f, 0};
  for (int64_t i = 0; i < 2 * n; ++i)
    for (int64_t col = 0; col < c; ++col) {
      const int8_t got = q[size_t(i * c + col)];
      if (!keep[size_t(i)]) {
        EXPECT_EQ(got, 0) << "dropped row " << i;
        continue;
      }
      const float code = i < n ? hi[size_t(i * c + col)] : lo[size_t((i - n) * c + col)];
      const float v = (f[size_t(i)] * code) / t;  // the value q rounds, in units of t
      const float u = philox_uniform(key, uint64_t(i * c + col));  // index i·C + col
      EXPECT_EQ(got, int8_t(std::clamp(std::floor(v + u), -127.0f, 127.0f))) << i << ", " << col;
      EXPECT_TRUE(got == std::floor(v) || got == std::floor(v) + 1 || got == -127) << v;
    }
  EXPECT_EQ(q[size_t(4 * c + 1)], -127);  // a/t = −127 (up to an ulp): the clamp's only case
  // Unbiased: over K keys, mean(q)·t → a, each element within 5 SE, SE ≤ t·(1/2)/sqrt(K)
  // (a stochastic rounding's variance is frac·(1 − frac) ≤ 1/4 step²), plus 1e-4·t for the
  // clamp and the fp32 rounding of a/t + u.
  const int keys = 4096;
  std::vector<double> mean(q.size(), 0.0);
  for (int k = 0; k < keys; ++k) {
    const float tk = ref::requantize_sampled_rows(hi.data(), lo.data(), n, c, p.data(), keep.data(),
                                                  PhiloxKey{1000u + uint64_t(k), 0, 0, RngRole::sample_dw_rounding},
                                                  q.data());
    EXPECT_EQ(tk, t);
    for (size_t e = 0; e < q.size(); ++e) mean[e] += double(q[e]) * tk / keys;
  }
  for (int64_t i = 0; i < 2 * n; ++i) {
    if (!keep[size_t(i)]) continue;
    for (int64_t col = 0; col < c; ++col) {
      const float code = i < n ? hi[size_t(i * c + col)] : lo[size_t((i - n) * c + col)];
      const double a = double(f[size_t(i)] * code);
      EXPECT_NEAR(mean[size_t(i * c + col)], a, 5 * 0.5 * t / std::sqrt(double(keys)) + 1e-4 * t)
          << i << ", " << col;
    }
  }
}

TEST(HqLinear, RejectsBadInput) {
  Problem p = make_problem(8, 48, 8, 5);
  ref::HqLinearConfig cfg;
  cfg.block = 32;  // does not divide D = 48
  std::vector<float> y(64);
  const PhiloxKey key{};
  EXPECT_THROW(ref::hq_linear_forward(p.x.data(), p.w.data(), nullptr, 8, 48, 8, 1.f, 1.f, cfg, key, y.data(), nullptr), Error);
  cfg.block = 16;
  EXPECT_THROW(ref::hq_linear_forward(p.x.data(), p.w.data(), nullptr, 8, 48, 8, 0.f, 1.f, cfg, key, y.data(), nullptr), Error);
  // Saved codes are packed s4: an 8-bit range cannot be stored.
  ref::HqLinearConfig wide = cfg;
  wide.range = kInt8Sym;
  EXPECT_THROW(ref::hq_linear_forward(p.x.data(), p.w.data(), nullptr, 8, 48, 8, 1.f, 1.f, wide, key, y.data(), nullptr), Error);
  // The backward must get the forward's block.
  ref::HqLinearSaved saved;
  ref::hq_linear_forward(p.x.data(), p.w.data(), nullptr, 8, 48, 8, 1.f, 1.f, cfg, key, y.data(), &saved);
  ref::HqLinearConfig other = cfg;
  other.block = 8;
  EXPECT_THROW(ref::hq_linear_backward(p.dy.data(), saved, other, key), Error);
  EXPECT_NO_THROW(ref::hq_linear_backward(p.dy.data(), saved, cfg, key));
  p.x[5] = NAN;
  EXPECT_THROW(ref::hq_linear_forward(p.x.data(), p.w.data(), nullptr, 8, 48, 8, 1.f, 1.f, cfg, key, y.data(), nullptr), Error);
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
    const std::vector<int8_t> x_q = saved.x_q(), w_q = saved.w_q();
    ref::dequantize(x_q.data(), n, d, Granularity::row, 0, saved.x_scale.data(),
                    asym ? saved.x_zero.data() : nullptr, xh.data());
    ref::dequantize(w_q.data(), c, d, Granularity::row, 0, saved.w_scale.data(), nullptr, wh.data());
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
      for (int8_t q : x_q) ASSERT_TRUE(q >= 0 && q <= 15);
    }
    // Saved codes are packed: half a byte per element of x and w, plus fp32 scales.
    EXPECT_EQ(saved.bytes(), (n + c) * (d / 2) + 4 * (n + c) + (asym ? 4 * n : 0));
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
  const std::vector<int8_t> x_q = saved.x_q(), w_q = saved.w_q();
  ref::dequantize(x_q.data(), n, d, Granularity::row, 0, saved.x_scale.data(), nullptr, xh.data());
  ref::dequantize(w_q.data(), c, d, Granularity::row, 0, saved.w_scale.data(), nullptr, wh.data());
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

TEST(Int8Linear, ForwardIsTheDequantizedIntegerProduct) {
  const int64_t n = 23, d = 48, c = 17;
  const std::vector<float> x = nibble::testing::randn_with_outlier_channels(n, d, 201, 1, 8.0f);
  const std::vector<float> w = randn(c * d, 202, 0.05f), b = randn(c, 203, 0.1f);
  ref::Int8LinearSaved saved;
  std::vector<float> y(static_cast<size_t>(n * c));
  ref::int8_linear_forward(x.data(), w.data(), b.data(), n, d, c, y.data(), &saved);
  std::vector<float> xh(x.size()), wh(w.size());
  ref::dequantize(saved.x_q.data(), n, d, Granularity::row, 0, saved.x_scale.data(), nullptr, xh.data());
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
  // Exact integer product, one fp32 rounding in the epilogue and ~1 ulp per dequantized
  // value on the fake-quant side: ~1e-6 relative.
  EXPECT_LT(rel_err(y, expect), 1e-5);
  // Per-token INT8 with an outlier channel (8σ): ≈ 8σ/127 steps on x, ≈ 30 dB and up.
  EXPECT_GT(-20 * std::log10(rel_err(y, exact)), 28.0);
  EXPECT_EQ(saved.bytes(), n * d + c * d + 4 * (n + c));
  // Inference form gives the same bits.
  std::vector<float> y2(y.size());
  ref::int8_linear_forward(x.data(), w.data(), b.data(), n, d, c, y2.data(), nullptr);
  EXPECT_EQ(y, y2);
}

// The stochastic INT8 row quantizer of the backward: codes are the floor or the ceiling of
// v/s, the row's absmax element maps to ±127, and over K keys the mean code·s approaches v
// (aggregate bound 5·sqrt(Σ var / K), as in NnLinear.Int8GradientIsUnbiased).
TEST(Int8Linear, StochasticRowQuantizerIsUnbiased) {
  const int64_t rows = 6, cols = 40;
  std::vector<float> v = randn(rows * cols, 211, 0.3f);
  for (int64_t c = 0; c < cols; ++c) v[static_cast<size_t>(2 * cols + c)] = 0.0f;  // an all-zero row
  std::vector<int8_t> q(v.size());
  std::vector<float> s(static_cast<size_t>(rows));
  const int keys = 512;
  std::vector<double> mean(v.size(), 0.0), sq(v.size(), 0.0);
  for (int t = 0; t < keys; ++t) {
    ref::quantize_rows_int8_stochastic(v.data(), rows, cols, PhiloxKey{uint64_t(t), 0, 0, RngRole::rounding},
                                       uint64_t(t) * 1000, q.data(), s.data());
    for (size_t e = 0; e < v.size(); ++e) {
      const float ratio = v[e] / s[e / cols];
      ASSERT_TRUE(q[e] == std::floor(ratio) || q[e] == std::ceil(ratio)) << ratio << " " << int(q[e]);
      const double deq = double(q[e]) * s[e / cols];
      mean[e] += deq / keys;
      sq[e] += deq * deq / keys;
    }
  }
  EXPECT_EQ(s[2], 1.0f);  // all-zero row: s = 1, codes 0
  double err2 = 0, var = 0;
  for (size_t e = 0; e < v.size(); ++e) {
    err2 += (mean[e] - v[e]) * (mean[e] - v[e]);
    var += (sq[e] - mean[e] * mean[e]) * keys / (keys - 1);
  }
  EXPECT_LT(std::sqrt(err2), 5 * std::sqrt(var / keys));
  EXPECT_GT(var, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    if (r == 2) continue;
    int amax = 0;
    for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::abs(int(q[static_cast<size_t>(r * cols + c)])));
    EXPECT_EQ(amax, 127) << "row " << r;
  }
}

TEST(Int8Linear, RejectsBadInput) {
  const int64_t n = 5, d = 8, c = 3;
  std::vector<float> x = randn(n * d, 221), w = randn(c * d, 222), dy = randn(n * c, 223);
  std::vector<float> y(static_cast<size_t>(n * c)), dx(x.size()), dw(w.size());
  ref::Int8LinearSaved saved;
  EXPECT_THROW(ref::int8_linear_backward(dy.data(), saved, PhiloxKey{}, dx.data(), dw.data(), nullptr), Error);
  ref::int8_linear_forward(x.data(), w.data(), nullptr, n, d, c, y.data(), &saved);
  EXPECT_NO_THROW(ref::int8_linear_backward(dy.data(), saved, PhiloxKey{}, nullptr, dw.data(), nullptr));
  dy[4] = INFINITY;
  EXPECT_THROW(ref::int8_linear_backward(dy.data(), saved, PhiloxKey{}, dx.data(), dw.data(), nullptr), Error);
  x[7] = NAN;
  EXPECT_THROW(ref::int8_linear_forward(x.data(), w.data(), nullptr, n, d, c, y.data(), &saved), Error);
  EXPECT_THROW(ref::int8_linear_forward(x.data(), w.data(), nullptr, 0, d, c, y.data(), &saved), Error);
}
