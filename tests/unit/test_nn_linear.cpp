// nn::Linear at each precision: forward accuracy against float64, backward against the
// float64 (or reference) computation of each precision's estimator, the contract (saved
// state, errors, accumulation, reproducibility, extra state) and a small regression fit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/random.h"
#include "nibble/error.h"
#include "nibble/ops_linear.h"
#include "nibble/parallel.h"
#include "nn/linear.h"
#include "ref/hadamard.h"
#include "ref/int8_linear.h"
#include "ref/linear.h"
#include "ref/quant.h"

using namespace nibble;
using nibble::nn::Linear;
using nibble::nn::Precision;
using nibble::nn::QuantOptions;
using nibble::nn::StepContext;
using nibble::testing::randn;

namespace {

constexpr Precision kAll[] = {Precision::fp32, Precision::int8, Precision::int4, Precision::w4a4};

const char* pname(Precision p) {
  switch (p) {
    case Precision::fp32: return "fp32";
    case Precision::int8: return "int8";
    case Precision::int4: return "int4";
    case Precision::w4a4: return "w4a4";
  }
  return "?";
}

Linear make_layer(Precision p, int64_t d, int64_t c, bool bias = true, QuantOptions q = {},
                  uint64_t init_seed = 11, float init_std = 0.1f) {
  return Linear("blk.lin", d, c, bias, p, q, 3, init_seed, init_std);
}

nn::Param* find_param(Linear& l, const std::string& suffix) {
  for (nn::Param* p : l.parameters())
    if (p->name == l.name() + suffix) return p;
  return nullptr;
}

std::vector<float> to_vec(const Tensor& t) {
  return std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
}

void set_values(Linear& l, const std::string& suffix, const std::vector<float>& v) {
  nn::Param* p = find_param(l, suffix);
  ASSERT_NE(p, nullptr) << suffix;
  ASSERT_EQ(size_t(p->value.numel()), v.size());
  std::memcpy(p->value.data<float>(), v.data(), v.size() * sizeof(float));
}

void zero_grads(Linear& l) {
  for (nn::Param* p : l.parameters()) std::memset(p->grad.data<float>(), 0, p->grad.nbytes());
}

// y = x·wᵀ + b in fp64.
std::vector<double> linear_f64(const std::vector<float>& x, const std::vector<float>& w,
                               const std::vector<float>& b, int64_t n, int64_t d, int64_t c) {
  std::vector<double> y(static_cast<size_t>(n * c));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c; ++j) {
      double acc = b.empty() ? 0.0 : b[size_t(j)];
      for (int64_t k = 0; k < d; ++k) acc += double(x[size_t(i * d + k)]) * w[size_t(j * d + k)];
      y[size_t(i * c + j)] = acc;
    }
  return y;
}

double sqnr_db(const std::vector<float>& got, const std::vector<double>& exact) {
  double sig = 0, err = 0;
  for (size_t i = 0; i < exact.size(); ++i) {
    sig += exact[i] * exact[i];
    err += (got[i] - exact[i]) * (got[i] - exact[i]);
  }
  return 10 * std::log10(sig / err);
}

double rel_err(const std::vector<float>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

// dx = dy·ŵ, dw = dyᵀ·x̂ in fp64 (the straight-through gradients of y = x̂·ŵᵀ + b).
void ste_grads_f64(const std::vector<float>& dy, const std::vector<float>& xh,
                   const std::vector<float>& wh, int64_t n, int64_t d, int64_t c,
                   std::vector<double>* dx, std::vector<double>* dw) {
  dx->assign(size_t(n * d), 0.0);
  dw->assign(size_t(c * d), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c; ++j) {
      const double g = dy[size_t(i * c + j)];
      for (int64_t k = 0; k < d; ++k) {
        (*dx)[size_t(i * d + k)] += g * wh[size_t(j * d + k)];
        (*dw)[size_t(j * d + k)] += g * xh[size_t(i * d + k)];
      }
    }
}

// Per-row symmetric dequantized copy (the int8 / w4a4 forward quantizers), via ref.
std::vector<float> fake_quant_rows(const std::vector<float>& v, int64_t rows, int64_t cols,
                                   QRange range, bool asymmetric = false) {
  std::vector<float> s(static_cast<size_t>(rows)), out(v.size());
  std::vector<int32_t> zp(asymmetric ? size_t(rows) : 0);
  std::vector<int8_t> q(v.size());
  int32_t* z = asymmetric ? zp.data() : nullptr;
  ref::compute_scales(v.data(), rows, cols, Granularity::row, 0, range, asymmetric, s.data(), z);
  ref::quantize(v.data(), rows, cols, Granularity::row, 0, s.data(), z, range, Rounding::nearest,
                PhiloxKey{}, q.data());
  ref::dequantize(q.data(), rows, cols, Granularity::row, 0, s.data(), z, out.data());
  return out;
}

}  // namespace

// Forward against fp64 x·wᵀ + b, as SQNR. Thresholds (Gaussian x, w; D = 64), from the
// step sizes, with the measured values in brackets: fp32 only rounds (~2^-24·sqrt(D)
// relative, > 120 dB) [136]: 100 dB. INT8 per-token/per-channel: step ≈ 3σ/127, ≈ 44 dB per
// operand, ≈ 41 dB for the product [42]: 35 dB. W4A4 [-7, 7] absmax: step ≈ 3σ/7, ≈ 18 dB
// per operand, ≈ 15 dB product [16.4]: 12 dB. HQ int4 with the LSQ-init step (0.6σ,
// clipping at 4.2σ): ≈ 15 dB per operand, ≈ 12 dB product [12.1]: 9 dB.
TEST(NnLinear, ForwardMatchesFloat64) {
  const int64_t n = 48, d = 64, c = 24;
  for (Precision p : kAll) {
    for (bool bias : {true, false}) {
      Linear l = make_layer(p, d, c, bias);
      const std::vector<float> x = randn(n * d, 100);
      std::vector<float> b;
      if (bias) {
        b = randn(c, 101, 0.2f);
        set_values(l, ".bias", b);
      }
      const std::vector<float> w = to_vec(find_param(l, ".weight")->value);
      std::vector<float> y(size_t(n * c));
      l.forward(x.data(), n, y.data(), StepContext{1, 0, true});
      const double db = sqnr_db(y, linear_f64(x, w, b, n, d, c));
      const double need = p == Precision::fp32 ? 100 : p == Precision::int8 ? 35
                          : p == Precision::w4a4 ? 12 : 9;
      EXPECT_GT(db, need) << pname(p) << " bias=" << bias;
      EXPECT_EQ(l.parameters().size(), size_t((bias ? 2 : 1) + (p == Precision::int4 ? 2 : 0)));
    }
  }
}

TEST(NnLinear, ParametersAreNamedAndFlagged) {
  Linear l = make_layer(Precision::int4, 32, 8);
  std::vector<std::string> names;
  for (nn::Param* p : l.parameters()) names.push_back(p->name);
  EXPECT_EQ(names, (std::vector<std::string>{"blk.lin.weight", "blk.lin.bias", "blk.lin.step_x",
                                             "blk.lin.step_w"}));
  EXPECT_TRUE(find_param(l, ".weight")->weight_decay);
  EXPECT_FALSE(find_param(l, ".bias")->weight_decay);
  EXPECT_FALSE(find_param(l, ".step_x")->weight_decay);
  EXPECT_FALSE(find_param(l, ".step_w")->weight_decay);
  // Weights ~ N(0, 0.1²): the sample std over 256 values is within 5·0.1/sqrt(512) of 0.1.
  const std::vector<float> w = to_vec(find_param(l, ".weight")->value);
  double ss = 0;
  for (float v : w) ss += double(v) * v;
  EXPECT_NEAR(std::sqrt(ss / double(w.size())), 0.1, 5 * 0.1 / std::sqrt(512.0));
  EXPECT_EQ(to_vec(find_param(l, ".bias")->value), std::vector<float>(8, 0.0f));
  EXPECT_THROW(Linear("x", 48, 8, true, Precision::int4, QuantOptions{32}, 0, 1, 0.1f), Error);
  EXPECT_THROW(Linear("x", 48, 8, true, Precision::int4, QuantOptions{12}, 0, 1, 0.1f), Error);
  EXPECT_THROW(Linear("x", 0, 8, true, Precision::fp32, QuantOptions{}, 0, 1, 0.1f), Error);
}

// fp32 backward against central differences of L = Σ y·r in fp64 over the fp32 forward.
// L is linear in each weight, so the difference quotient is exact up to the fp32 rounding
// of y (~1e-7·|L| per evaluation) divided by 2·eps = 0.1: ~1e-5 absolute here.
TEST(NnLinear, Fp32BackwardMatchesFiniteDifferences) {
  const int64_t n = 6, d = 10, c = 7;
  Linear l = make_layer(Precision::fp32, d, c);
  set_values(l, ".bias", randn(c, 7, 0.3f));
  std::vector<float> x = randn(n * d, 5);
  const std::vector<float> r = randn(n * c, 6);
  auto loss = [&](Linear& layer, const std::vector<float>& xin) {
    std::vector<float> y(size_t(n * c));
    layer.forward(xin.data(), n, y.data(), StepContext{0, 0, false});
    double s = 0;
    for (size_t i = 0; i < y.size(); ++i) s += double(y[i]) * r[i];
    return s;
  };
  std::vector<float> y(size_t(n * c)), dx(size_t(n * d));
  l.forward(x.data(), n, y.data(), StepContext{0, 0, true});
  l.backward(r.data(), dx.data(), StepContext{0, 0, true});
  const float eps = 0.05f;
  const double tol = 1e-4;
  for (const char* suffix : {".weight", ".bias"}) {
    nn::Param* p = find_param(l, suffix);
    for (int64_t i = 0; i < p->value.numel(); ++i) {
      float& v = p->value.data<float>()[i];
      const float keep = v;
      v = keep + eps;
      const double lp = loss(l, x);
      v = keep - eps;
      const double lm = loss(l, x);
      v = keep;
      EXPECT_NEAR(p->grad.data<float>()[i], (lp - lm) / (2.0 * double(eps)), tol) << suffix << i;
    }
  }
  for (size_t i = 0; i < x.size(); ++i) {
    const float keep = x[i];
    x[i] = keep + eps;
    const double lp = loss(l, x);
    x[i] = keep - eps;
    const double lm = loss(l, x);
    x[i] = keep;
    EXPECT_NEAR(dx[i], (lp - lm) / (2.0 * double(eps)), tol) << "x" << i;
  }
}

// The INT8 backward is the ref's estimator, and that estimator, recomputed in fp64 from the
// same stochastically rounded operands (same Philox stream), matches: the integer products
// are exact, so only the fp32 epilogue and the folded-scale products round (~1e-6).
TEST(NnLinear, Int8BackwardMatchesFloat64Estimator) {
  const int64_t n = 20, d = 24, c = 12;
  Linear l = make_layer(Precision::int8, d, c);
  const std::vector<float> x = randn(n * d, 31), dy = randn(n * c, 32);
  const StepContext ctx{77, 5, true};
  std::vector<float> y(size_t(n * c)), dx(size_t(n * d));
  l.forward(x.data(), n, y.data(), ctx);
  l.backward(dy.data(), dx.data(), ctx);

  // The same forward codes and scales, then the documented operands A = dy∘sw, B = (dy∘sx)ᵀ.
  const std::vector<float> w = to_vec(find_param(l, ".weight")->value);
  ref::Int8LinearSaved saved;
  std::vector<float> y_ref(y.size());
  ref::int8_linear_forward(x.data(), w.data(), nullptr, n, d, c, y_ref.data(), &saved);
  std::vector<float> a(static_cast<size_t>(n * c)), bt(a.size()), a_s(static_cast<size_t>(n)),
      b_s(static_cast<size_t>(c));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c; ++j) {
      a[size_t(i * c + j)] = dy[size_t(i * c + j)] * saved.w_scale[size_t(j)];
      bt[size_t(j * n + i)] = dy[size_t(i * c + j)] * saved.x_scale[size_t(i)];
    }
  std::vector<int8_t> a_q(a.size()), b_q(bt.size());
  const PhiloxKey key{77, 5, 3, RngRole::rounding};
  ref::quantize_rows_int8_stochastic(a.data(), n, c, key, 0, a_q.data(), a_s.data());
  ref::quantize_rows_int8_stochastic(bt.data(), c, n, key, uint64_t(n * c), b_q.data(), b_s.data());
  std::vector<double> edx(dx.size(), 0.0), edw(size_t(c * d), 0.0), edb(size_t(c), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c; ++j) {
      edb[size_t(j)] += dy[size_t(i * c + j)];
      for (int64_t k = 0; k < d; ++k) {
        edx[size_t(i * d + k)] += double(a_s[size_t(i)]) * a_q[size_t(i * c + j)] * saved.w_q[size_t(j * d + k)];
        edw[size_t(j * d + k)] += double(b_s[size_t(j)]) * b_q[size_t(j * n + i)] * saved.x_q[size_t(i * d + k)];
      }
    }
  EXPECT_LT(rel_err(dx, edx), 2e-6);
  EXPECT_LT(rel_err(to_vec(find_param(l, ".weight")->grad), edw), 2e-6);
  EXPECT_LT(rel_err(to_vec(find_param(l, ".bias")->grad), edb), 1e-6);
  EXPECT_EQ(y, y_ref);
}

// The INT8 gradients are unbiased: over K keys the mean of dx (dw) approaches the fp64
// straight-through gradient dy·ŵ (dyᵀ·x̂) of the forward's dequantized operands. Bound:
// ‖mean − exact‖ ≤ 5·SE with SE = sqrt(Σ_e var_e / K) (var_e the sample variance of element
// e over the keys): the expected squared error is SE², and the norm's relative spread is
// ~11% here (the rounding noise of one token row drives a whole row of dx, so ~N·C = 160
// independent terms), making 5 SE a > 30 sigma bound. The bound shrinks like 1/sqrt(K):
// SE(64)/SE(1024) = 4 (the variance sums spread by ~1%: ±0.5 is > 10 sigma), and the
// error stays under it at both K. Nearest rounding instead would be off by ~23 SE (dx).
TEST(NnLinear, Int8GradientIsUnbiased) {
  const int64_t n = 16, d = 20, c = 10;
  const std::vector<float> x = randn(n * d, 41), dy = randn(n * c, 42);
  Linear l = make_layer(Precision::int8, d, c, false);
  const std::vector<float> w = to_vec(find_param(l, ".weight")->value);
  std::vector<double> edx, edw;
  ste_grads_f64(dy, fake_quant_rows(x, n, d, kInt8Sym), fake_quant_rows(w, c, d, kInt8Sym), n, d,
                c, &edx, &edw);
  const int keys = 1024;
  std::vector<std::vector<float>> sdx, sdw;
  std::vector<float> y(size_t(n * c)), dx(size_t(n * d));
  for (int t = 0; t < keys; ++t) {
    const StepContext ctx{uint64_t(500 + t), uint32_t(t), true};
    zero_grads(l);
    l.forward(x.data(), n, y.data(), ctx);
    l.backward(dy.data(), dx.data(), ctx);
    sdx.push_back(dx);
    sdw.push_back(to_vec(find_param(l, ".weight")->grad));
  }
  struct Err { double err, bound; };
  auto check = [&](const std::vector<std::vector<float>>& s, const std::vector<double>& exact,
                   int k) {
    double err2 = 0, var_sum = 0;
    for (size_t e = 0; e < exact.size(); ++e) {
      double m = 0, v = 0;
      for (int t = 0; t < k; ++t) m += s[size_t(t)][e] / double(k);
      for (int t = 0; t < k; ++t) v += (s[size_t(t)][e] - m) * (s[size_t(t)][e] - m) / double(k - 1);
      err2 += (m - exact[e]) * (m - exact[e]);
      var_sum += v;
    }
    return Err{std::sqrt(err2), 5 * std::sqrt(var_sum / k)};
  };
  for (auto [s, exact, what] : {std::tuple{&sdx, &edx, "dx"}, std::tuple{&sdw, &edw, "dw"}}) {
    const Err small = check(*s, *exact, 64), large = check(*s, *exact, keys);
    EXPECT_LT(small.err, small.bound) << what;
    EXPECT_LT(large.err, large.bound) << what;
    EXPECT_NEAR(small.bound / large.bound, 4.0, 0.5) << what;
    // Noise scale sanity: one key is within a few percent of the exact gradient.
    double norm = 0;
    for (double v : *exact) norm += v * v;
    EXPECT_LT(large.bound / 5 * std::sqrt(double(keys)), 0.05 * std::sqrt(norm)) << what;
  }
}

// The int4 layer runs the ref's HQ-MM / LSS-MM estimator (whose fp64 check is
// HqLinear.BackwardMatchesFloat64Estimator): same step sizes (LSQ init on this batch), same
// keys, so the outputs and gradients are bit-identical; the layer adds the rest of the
// contract (cold start, sign of s).
TEST(NnLinear, Int4BackwardIsTheReferenceEstimator) {
  const int64_t n = 24, d = 32, c = 16;
  const std::vector<float> x = nibble::testing::randn_with_outlier_channels(n, d, 51, 2, 10.0f);
  const std::vector<float> dy = randn(n * c, 52, 0.01f);
  for (auto [cold, lss] : {std::pair{int64_t(0), false}, std::pair{int64_t(3), false},
                           std::pair{int64_t(0), true}}) {
    QuantOptions q;
    q.hadamard_block = 16;
    q.lsq_cold_start_steps = cold;
    q.lss_sampling = lss;
    Linear l = make_layer(Precision::int4, d, c, true, q);
    const StepContext ctx{9, 1, true};
    std::vector<float> y(size_t(n * c)), dx(size_t(n * d));
    l.forward(x.data(), n, y.data(), ctx);
    l.backward(dy.data(), dx.data(), ctx);

    const std::vector<float> w = to_vec(find_param(l, ".weight")->value);
    std::vector<float> xh(x), wh(w);
    ref::hadamard_blocks(xh.data(), n, d, 16);
    ref::hadamard_blocks(wh.data(), c, d, 16);
    const float sx = ref::lsq_init_scale(xh.data(), n * d, kInt4Sym);
    const float sw = ref::lsq_init_scale(wh.data(), c * d, kInt4Sym);
    EXPECT_EQ(find_param(l, ".step_x")->value.data<float>()[0], sx);
    EXPECT_EQ(find_param(l, ".step_w")->value.data<float>()[0], sw);
    ref::HqLinearConfig cfg;
    cfg.block = 16;
    cfg.lss = lss ? ref::LssMode::bernoulli : ref::LssMode::keep_nonzero;
    const PhiloxKey key{9, 1, 3, RngRole::rounding};
    ref::HqLinearSaved saved;
    std::vector<float> y_ref(y.size());
    ref::hq_linear_forward(x.data(), w.data(), nullptr, n, d, c, sx, sw, cfg, key, y_ref.data(), &saved);
    const ref::HqLinearGrads g = ref::hq_linear_backward(dy.data(), saved, cfg, key);
    EXPECT_EQ(y, y_ref);  // bias is zero
    EXPECT_EQ(dx, g.dx);
    EXPECT_EQ(to_vec(find_param(l, ".weight")->grad), g.dw);
    EXPECT_EQ(to_vec(find_param(l, ".bias")->grad), g.db);
    // Cold start (step 1 < 3): s_x was set from the batch, not learned, so no gradient.
    EXPECT_EQ(find_param(l, ".step_x")->grad.data<float>()[0], cold > 1 ? 0.0f : g.dsx);
    EXPECT_EQ(find_param(l, ".step_w")->grad.data<float>()[0], g.dsw);
    EXPECT_NE(g.dsx, 0.0f);
    if (lss) {
      EXPECT_LT(g.kept_rows_dw, 2 * n);  // sampling dropped split rows
    }
    // After the cold start the step is the parameter's value, untouched by the forward.
    find_param(l, ".step_x")->value.data<float>()[0] = 0.123f;
    l.forward(x.data(), n, y.data(), StepContext{9, uint32_t(cold), true});
    EXPECT_EQ(find_param(l, ".step_x")->value.data<float>()[0], 0.123f);
  }
  // A negative step works as |s|, and its gradient is that of |s| times sign(s).
  QuantOptions q;
  q.hadamard_block = 16;
  q.lsq_cold_start_steps = 0;
  Linear a = make_layer(Precision::int4, d, c, true, q), b = make_layer(Precision::int4, d, c, true, q);
  std::vector<float> ya(size_t(n * c)), yb(ya.size());
  a.forward(x.data(), n, ya.data(), StepContext{1, 0, true});  // initialises the steps
  b.forward(x.data(), n, yb.data(), StepContext{1, 0, true});
  a.backward(dy.data(), nullptr, StepContext{1, 0, true});
  b.backward(dy.data(), nullptr, StepContext{1, 0, true});
  zero_grads(a);
  zero_grads(b);
  find_param(b, ".step_x")->value.data<float>()[0] *= -1.0f;
  find_param(b, ".step_w")->value.data<float>()[0] *= -1.0f;
  a.forward(x.data(), n, ya.data(), StepContext{1, 1, true});
  b.forward(x.data(), n, yb.data(), StepContext{1, 1, true});
  a.backward(dy.data(), nullptr, StepContext{1, 1, true});
  b.backward(dy.data(), nullptr, StepContext{1, 1, true});
  EXPECT_EQ(ya, yb);
  EXPECT_EQ(find_param(b, ".step_x")->grad.data<float>()[0], -find_param(a, ".step_x")->grad.data<float>()[0]);
  EXPECT_EQ(find_param(b, ".step_w")->grad.data<float>()[0], -find_param(a, ".step_w")->grad.data<float>()[0]);
}

// W4A4 backward = the straight-through gradients of the fake-quantized product, in fp64
// from the forward's quantizers (fp32 products summed in fp64: ~1e-7 relative).
TEST(NnLinear, W4A4BackwardIsStraightThrough) {
  const int64_t n = 18, d = 40, c = 12;
  for (bool asym : {false, true}) {
    QuantOptions q;
    q.w4a4_asymmetric = asym;
    Linear l = make_layer(Precision::w4a4, d, c, true, q);
    const std::vector<float> x = randn(n * d, 61, 1.0f, asym ? 0.7f : 0.0f), dy = randn(n * c, 62);
    std::vector<float> y(size_t(n * c)), dx(size_t(n * d));
    l.forward(x.data(), n, y.data(), StepContext{3, 3, true});
    l.backward(dy.data(), dx.data(), StepContext{3, 3, true});
    const std::vector<float> w = to_vec(find_param(l, ".weight")->value);
    const std::vector<float> xh = asym ? fake_quant_rows(x, n, d, kUint4, true)
                                       : fake_quant_rows(x, n, d, kInt4Sym);
    std::vector<double> edx, edw;
    ste_grads_f64(dy, xh, fake_quant_rows(w, c, d, kInt4Sym), n, d, c, &edx, &edw);
    EXPECT_LT(rel_err(dx, edx), 1e-6) << "asymmetric=" << asym;
    EXPECT_LT(rel_err(to_vec(find_param(l, ".weight")->grad), edw), 1e-6) << "asymmetric=" << asym;
  }
}

// Same context -> the same bits; another step -> other stochastic rounding (int8, int4),
// the same bits where nothing is random (fp32, w4a4).
TEST(NnLinear, ReproducibleFromTheStepContext) {
  const int64_t n = 16, d = 32, c = 8;
  const std::vector<float> x = randn(n * d, 71), dy = randn(n * c, 72);
  for (Precision p : kAll) {
    auto run = [&](uint32_t step) {
      QuantOptions q;
      q.lsq_cold_start_steps = 0;
      Linear l = make_layer(p, d, c, true, q);
      std::vector<float> y(size_t(n * c)), dx(size_t(n * d));
      const StepContext ctx{123, step, true};
      l.forward(x.data(), n, y.data(), ctx);
      l.backward(dy.data(), dx.data(), ctx);
      std::vector<float> all = y;
      all.insert(all.end(), dx.begin(), dx.end());
      for (nn::Param* prm : l.parameters()) {
        const std::vector<float> g = to_vec(prm->grad);
        all.insert(all.end(), g.begin(), g.end());
      }
      return all;
    };
    const std::vector<float> a = run(4), b = run(4), other = run(5);
    EXPECT_EQ(a, b) << pname(p);
    const bool random = p == Precision::int8 || p == Precision::int4;
    EXPECT_EQ(a != other, random) << pname(p);
  }
}

// Outputs and gradients do not depend on the number of threads (sizes large enough that
// the parallel loops do split).
TEST(NnLinear, ThreadCountDoesNotChangeBits) {
  const int64_t n = 96, d = 64, c = 48;
  const std::vector<float> x = randn(n * d, 151), dy = randn(n * c, 152);
  const int threads = num_threads();
  for (Precision p : kAll) {
    auto run = [&](int t) {
      set_num_threads(t);
      Linear l = make_layer(p, d, c);  // int4: block searched, steps initialised here
      std::vector<float> y(size_t(n * c)), dx(size_t(n * d));
      l.forward(x.data(), n, y.data(), StepContext{8, 30, true});
      l.backward(dy.data(), dx.data(), StepContext{8, 30, true});
      for (nn::Param* prm : l.parameters()) {
        const std::vector<float> g = to_vec(prm->grad);
        y.insert(y.end(), g.begin(), g.end());
      }
      y.insert(y.end(), dx.begin(), dx.end());
      return y;
    };
    const std::vector<float> one = run(1), two = run(2);
    EXPECT_EQ(one, two) << pname(p);
  }
  set_num_threads(threads);
}

// Gradients add into Param::grad: two identical steps give exactly twice one step.
TEST(NnLinear, GradientsAccumulate) {
  const int64_t n = 12, d = 16, c = 8;
  const std::vector<float> x = randn(n * d, 81), dy = randn(n * c, 82);
  for (Precision p : kAll) {
    QuantOptions q;
    q.lsq_cold_start_steps = 0;
    Linear l = make_layer(p, d, c, true, q);
    std::vector<float> y(size_t(n * c));
    const StepContext ctx{5, 2, true};
    l.forward(x.data(), n, y.data(), ctx);
    l.backward(dy.data(), nullptr, ctx);
    std::vector<std::vector<float>> once;
    for (nn::Param* prm : l.parameters()) once.push_back(to_vec(prm->grad));
    l.forward(x.data(), n, y.data(), ctx);
    l.backward(dy.data(), nullptr, ctx);
    size_t i = 0;
    for (nn::Param* prm : l.parameters()) {
      std::vector<float> twice = once[i++];
      for (float& v : twice) v *= 2.0f;
      EXPECT_EQ(to_vec(prm->grad), twice) << pname(p) << " " << prm->name;
    }
  }
}

// The contract's errors and the "nothing saved outside training" rule.
TEST(NnLinear, SavedStateAndErrors) {
  const int64_t n = 8, d = 16, c = 4;
  std::vector<float> x = randn(n * d, 91);
  const std::vector<float> dy = randn(n * c, 92);
  std::vector<float> y(size_t(n * c));
  for (Precision p : kAll) {
    Linear l = make_layer(p, d, c);
    // Evaluation keeps nothing, and a backward then has nothing to use.
    l.forward(x.data(), n, y.data(), StepContext{0, 0, false});
    EXPECT_EQ(l.saved_bytes(), 0) << pname(p);
    try {
      l.backward(dy.data(), nullptr, StepContext{});
      ADD_FAILURE() << pname(p) << ": backward without a saved forward did not throw";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("without a saved forward"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("blk.lin"), std::string::npos) << e.what();
    }
    // A backward consumes the saved state.
    l.forward(x.data(), n, y.data(), StepContext{0, 0, true});
    EXPECT_GT(l.saved_bytes(), 0);
    l.backward(dy.data(), nullptr, StepContext{});
    EXPECT_EQ(l.saved_bytes(), 0);
    EXPECT_THROW(l.backward(dy.data(), nullptr, StepContext{}), Error);
    // Non-finite inputs: a clear error naming the layer and the index.
    for (float bad : {NAN, INFINITY}) {
      x[13] = bad;
      try {
        l.forward(x.data(), n, y.data(), StepContext{0, 0, true});
        ADD_FAILURE() << pname(p) << ": non-finite x did not throw";
      } catch (const Error& e) {
        const std::string msg = e.what();
        EXPECT_NE(msg.find("blk.lin"), std::string::npos) << msg;
        EXPECT_NE(msg.find(std::isnan(bad) ? "NaN" : "Inf"), std::string::npos) << msg;
        EXPECT_NE(msg.find("index 13"), std::string::npos) << msg;
      }
      x[13] = 0.5f;
    }
    l.forward(x.data(), n, y.data(), StepContext{0, 0, true});
    std::vector<float> bad_dy = dy;
    bad_dy[3] = NAN;
    EXPECT_THROW(l.backward(bad_dy.data(), nullptr, StepContext{}), Error) << pname(p);
  }
}

// The Hadamard block searched on the first training batch is kept in extra_state; a fresh
// layer that loads it (and the parameters) computes the same bits, where a fresh layer that
// does not would search again on whatever batch it sees first.
TEST(NnLinear, ExtraStateRoundTrip) {
  const int64_t n = 32, d = 64, c = 16;
  const std::vector<float> x0 = nibble::testing::randn_with_outlier_channels(n, d, 101, 3, 30.0f);
  const std::vector<float> x1 = randn(n * d, 102);
  Linear a = make_layer(Precision::int4, d, c);
  std::vector<float> y(size_t(n * c));
  EXPECT_EQ(a.extra_state().at("blk.lin.hadamard_block"), "0");
  EXPECT_EQ(a.extra_state().at("blk.lin.lsq_initialized"), "0");
  a.forward(x0.data(), n, y.data(), StepContext{1, 0, true});
  const auto st = a.extra_state();
  const int64_t searched = std::stoll(st.at("blk.lin.hadamard_block"));
  EXPECT_EQ(searched, ref::hq_search_block(x0.data(), n, to_vec(find_param(a, ".weight")->value).data(),
                                           c, d, kInt4Sym).block);
  EXPECT_GT(searched, 1);  // outlier channels: a real transform wins
  EXPECT_EQ(st.at("blk.lin.lsq_initialized"), "1");

  Linear b = make_layer(Precision::int4, d, c, true, QuantOptions{}, 999);
  for (const char* s : {".weight", ".bias", ".step_x", ".step_w"})
    set_values(b, s, to_vec(find_param(a, s)->value));
  b.load_extra_state(st);
  EXPECT_EQ(b.extra_state(), st);
  std::vector<float> ya(y.size()), yb(y.size());
  a.forward(x1.data(), n, ya.data(), StepContext{1, 50, false});
  b.forward(x1.data(), n, yb.data(), StepContext{1, 50, false});
  EXPECT_EQ(ya, yb);

  // Bad states are refused with a clear error.
  auto bad = st;
  bad["blk.lin.hadamard_block"] = "48";
  EXPECT_THROW(b.load_extra_state(bad), Error);
  bad["blk.lin.hadamard_block"] = "16x";
  EXPECT_THROW(b.load_extra_state(bad), Error);
  bad = st;
  bad.erase("blk.lin.lsq_initialized");
  EXPECT_THROW(b.load_extra_state(bad), Error);
  // Other precisions keep no extra state.
  EXPECT_TRUE(make_layer(Precision::int8, d, c).extra_state().empty());
}

// An evaluation before the first training step uses temporary choices (block, steps from
// its own batch) and keeps none of them: training afterwards is bit-identical.
TEST(NnLinear, EvaluationBeforeTrainingChangesNothing) {
  const int64_t n = 16, d = 32, c = 8;
  const std::vector<float> xe = nibble::testing::randn_with_outlier_channels(n, d, 131, 1, 50.0f);
  const std::vector<float> xt = randn(n * d, 132), dy = randn(n * c, 133);
  Linear a = make_layer(Precision::int4, d, c), b = make_layer(Precision::int4, d, c);
  std::vector<float> ya(size_t(n * c)), yb(ya.size());
  a.forward(xe.data(), n, ya.data(), StepContext{1, 0, false});
  EXPECT_EQ(a.extra_state().at("blk.lin.hadamard_block"), "0");
  EXPECT_EQ(a.extra_state().at("blk.lin.lsq_initialized"), "0");
  for (Linear* l : {&a, &b}) {
    l->forward(xt.data(), n, l == &a ? ya.data() : yb.data(), StepContext{1, 0, true});
    l->backward(dy.data(), nullptr, StepContext{1, 0, true});
  }
  EXPECT_EQ(ya, yb);
  EXPECT_EQ(a.extra_state(), b.extra_state());
  for (const char* s : {".weight", ".bias", ".step_x", ".step_w"}) {
    EXPECT_EQ(to_vec(find_param(a, s)->value), to_vec(find_param(b, s)->value)) << s;
    EXPECT_EQ(to_vec(find_param(a, s)->grad), to_vec(find_param(b, s)->grad)) << s;
  }
}

// The op layer validates before any work, with messages that say what to do.
TEST(NnLinear, OpsValidateArguments) {
  const int64_t n = 4, d = 8, c = 3;
  std::vector<float> x = randn(n * d, 141), w = randn(c * d, 142), y(size_t(n * c));
  auto view = [](std::vector<float>& v, Shape shape) {
    TensorView t;
    t.data = v.data();
    t.shape = std::move(shape);
    return t;
  };
  const TensorView xv = view(x, {n, d}), wv = view(w, {c, d}), yv = view(y, {n, c});
  std::vector<float> w_bad(size_t(c * (d + 1)));
  ops::LinearSaved saved;
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  // w with another D
  EXPECT_NE(message([&] { ops::int8_linear_forward(xv, view(w_bad, {c, d + 1}), TensorView{}, yv, &saved); })
                .find("same D"), std::string::npos);
  // y of the wrong shape
  EXPECT_THROW(ops::w4a4_linear_forward(xv, wv, TensorView{}, {}, view(y, {c, n}), &saved), Error);
  // a block that does not divide D, a non-positive step, an 8-bit range
  ops::HqLinearOptions o;
  o.block = 16;
  EXPECT_NE(message([&] { ops::hq_linear_forward(xv, wv, TensorView{}, 1, 1, o, {}, yv, &saved); })
                .find("does not divide"), std::string::npos);
  o.block = 8;
  EXPECT_THROW(ops::hq_linear_forward(xv, wv, TensorView{}, 0, 1, o, {}, yv, &saved), Error);
  o.range = kInt8Sym;
  EXPECT_THROW(ops::hq_linear_forward(xv, wv, TensorView{}, 1, 1, o, {}, yv, &saved), Error);
  o.range = kInt4Sym;
  EXPECT_TRUE(saved.empty());
  // A backward on state from another kind of forward, or with other options.
  ops::int8_linear_forward(xv, wv, TensorView{}, yv, &saved);
  EXPECT_EQ(saved.rows(), n);
  std::vector<float> dy = randn(n * c, 143);
  EXPECT_NE(message([&] { ops::hq_linear_backward(view(dy, {n, c}), saved, o, {}); })
                .find("another kind of forward"), std::string::npos);
  ops::hq_linear_forward(xv, wv, TensorView{}, 1, 1, o, {}, yv, &saved);
  ops::HqLinearOptions o2 = o;
  o2.block = 4;
  EXPECT_NE(message([&] { ops::hq_linear_backward(view(dy, {n, c}), saved, o2, {}); })
                .find("differ from the forward"), std::string::npos);
  // dy of the wrong shape
  EXPECT_THROW(ops::hq_linear_backward(view(dy, {c, n}), saved, o, {}), Error);
  EXPECT_NO_THROW(ops::hq_linear_backward(view(dy, {n, c}), saved, o, {}));
  // Inference: nothing saved
  ops::LinearSaved none;
  ops::w4a4_linear_forward(xv, wv, TensorView{}, {}, yv, nullptr);
  EXPECT_EQ(none.bytes(), 0);
  EXPECT_THROW(ops::w4a4_linear_backward(view(dy, {n, c}), none, true), Error);
}

// Bytes held between forward and backward. Per element of x (the part that grows with the
// batch): fp32 4, int8 1 (+ a 4-byte scale per token), int4 1 (code + side-channel nibbles),
// w4a4 ½ (+ a scale per token). The weight-side part is fixed per layer.
TEST(NnLinear, SavedBytes) {
  const int64_t d = 64, c = 32;
  auto bytes = [&](Precision p, int64_t n) {
    QuantOptions q;
    q.hadamard_block = 32;
    Linear l = make_layer(p, d, c, true, q);
    const std::vector<float> x = randn(n * d, 111);
    std::vector<float> y(size_t(n * c));
    l.forward(x.data(), n, y.data(), StepContext{0, 0, true});
    return l.saved_bytes();
  };
  const int64_t n = 64;
  // Growth per additional token row, divided by D: bytes per element of x.
  auto per_x = [&](Precision p) { return double(bytes(p, 2 * n) - bytes(p, n)) / double(n * d); };
  EXPECT_EQ(per_x(Precision::fp32), 4.0);
  EXPECT_EQ(per_x(Precision::int8), 1.0 + 4.0 / d);
  EXPECT_EQ(per_x(Precision::int4), 1.0);
  EXPECT_EQ(per_x(Precision::w4a4), 0.5 + 4.0 / d);
  // int4 in total: 1 byte per element of x and of w, plus the two fp32 step sizes.
  EXPECT_EQ(bytes(Precision::int4, n), n * d + c * d + 8);
  EXPECT_EQ(bytes(Precision::fp32, n), 4 * n * d);
}

// A tiny regression y = x·w*ᵀ + b* fitted by the layer alone with Adam (lr 0.01 for every
// parameter, step sizes included; 400 steps, fresh batches of 64). Measured relative test
// error (eval mode, ‖y − y*‖²/‖y*‖²) from a start of ~1 (weights start near 0): fp32 5e-14
// (exact fit), int8 7e-5, int4 0.027, w4a4 0.024 (the 4-bit quantization-noise floor, in
// line with the forward SQNR of 12-16 dB). Thresholds: fp32 1e-6, int8 1e-3, 4-bit 0.1.
TEST(NnLinear, RegressionConverges) {
  const int64_t d = 32, c = 8, n = 64, steps = 400;
  const std::vector<float> w_star = randn(c * d, 121, 1.0f / std::sqrt(float(d)));
  const std::vector<float> b_star = randn(c, 122, 0.3f);
  auto target = [&](const std::vector<float>& x) {
    const std::vector<double> t = linear_f64(x, w_star, b_star, n, d, c);
    return std::vector<float>(t.begin(), t.end());
  };
  const std::vector<float> x_test = randn(n * d, 999);
  const std::vector<float> y_test = target(x_test);
  for (Precision p : kAll) {
    Linear l = make_layer(p, d, c, true, QuantOptions{}, 11, 0.02f);
    // Adam state per parameter
    std::vector<std::vector<float>> m1, m2;
    for (nn::Param* prm : l.parameters()) {
      m1.emplace_back(size_t(prm->value.numel()), 0.0f);
      m2.emplace_back(size_t(prm->value.numel()), 0.0f);
    }
    auto test_error = [&]() {
      std::vector<float> y(size_t(n * c));
      l.forward(x_test.data(), n, y.data(), StepContext{0, 0, false});
      double num = 0, den = 0;
      for (size_t i = 0; i < y.size(); ++i) {
        num += double(y[i] - y_test[i]) * (y[i] - y_test[i]);
        den += double(y_test[i]) * y_test[i];
      }
      return num / den;
    };
    const double start = test_error();
    std::vector<float> y(size_t(n * c)), dy(size_t(n * c));
    for (int64_t s = 0; s < steps; ++s) {
      const std::vector<float> x = randn(n * d, 2000 + uint64_t(s));
      const std::vector<float> t = target(x);
      const StepContext ctx{7, uint32_t(s), true};
      zero_grads(l);
      l.forward(x.data(), n, y.data(), ctx);
      // L = mean (y − t)² / 2 -> dy = (y − t) / (n·c)
      for (size_t i = 0; i < y.size(); ++i) dy[i] = (y[i] - t[i]) / float(n * c);
      l.backward(dy.data(), nullptr, ctx);
      const float lr = 0.01f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
      const float c1 = 1.0f - std::pow(b1, float(s + 1)), c2 = 1.0f - std::pow(b2, float(s + 1));
      size_t pi = 0;
      for (nn::Param* prm : l.parameters()) {
        float* v = prm->value.data<float>();
        const float* g = prm->grad.data<float>();
        for (int64_t i = 0; i < prm->value.numel(); ++i) {
          float& a = m1[pi][size_t(i)];
          float& b = m2[pi][size_t(i)];
          a = b1 * a + (1 - b1) * g[i];
          b = b2 * b + (1 - b2) * g[i] * g[i];
          v[i] -= lr * (a / c1) / (std::sqrt(b / c2) + eps);
        }
        ++pi;
      }
    }
    const double end = test_error();
    const double need = p == Precision::fp32 ? 1e-6 : p == Precision::int8 ? 1e-3 : 0.1;
    EXPECT_GT(start, 0.5) << pname(p);
    EXPECT_LT(end, need) << pname(p) << " start " << start << " end " << end;
  }
}
