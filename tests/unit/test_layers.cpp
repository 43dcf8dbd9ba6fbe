// The float ops of the training engine (src/ref/layers.h through include/nibble/ops_layers.h)
// against float64 computations.
//
// Gradient method: each op's float64 forward is in tests/common/layers_f64.h; a scalar
// L = Σ w ⊙ y (w a fixed random weight) is differentiated by central finite differences
// in float64 (fd_grad: h = 1e-5, error ≈ 1e-11, far below what is checked). The op's fp32
// backward, fed dy = w, must match that gradient to within kGradTol of the tensor's
// largest gradient (origin at kGradTol).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "common/layers_f64.h"
#include "common/random.h"
#include "nibble/error.h"
#include "nibble/ops_layers.h"
#include "nibble/parallel.h"
#include "ref/layers.h"

using namespace nibble;
using nibble::testing::randn;
using nibble::testing::attention_f64;
using nibble::testing::cross_entropy_f64;
using nibble::testing::dot;
using nibble::testing::fd_grad;
using nibble::testing::gelu_f64;
using nibble::testing::layernorm_f64;
using nibble::testing::to_f64;

namespace {

// fp32 unit roundoff.
constexpr double kU32 = 1.0 / 16777216.0;
// Every gradient element here is a chain of a few fp32 ops and sums of at most 64 terms;
// Higham's bound for such sums is γ_64 = 64·u ≈ 3.8e-6 of the summed magnitudes. 1e-4 of
// the tensor's largest gradient leaves ×25 for the chain and for cancellation (LayerNorm's
// g − mean(g) − x̂·mean(g·x̂)), while a wrong term changes gradients by O(1).
constexpr double kGradTol = 1e-4;
// Forward outputs: the same argument, with at most D = 64 terms per output.
constexpr double kFwdTol = 1e-5;

// max|a − b| ≤ tol·max|b| (and max|b| > 0: a test on all-zero gradients proves nothing).
void expect_close(const std::vector<float>& a, const std::vector<double>& b, double tol, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  double err = 0, scale = 0;
  size_t worst = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    scale = std::max(scale, std::fabs(b[i]));
    const double e = std::fabs(a[i] - b[i]);
    if (e > err) err = e, worst = i;
  }
  ASSERT_GT(scale, 0.0) << what << ": the reference is all zeros";
  EXPECT_LE(err, tol * scale) << what << ": worst index " << worst << " got " << a[worst] << ", want "
                              << b[worst] << " (scale " << scale << ")";
}

TensorView view(std::vector<float>& v, Shape shape) {
  TensorView t;
  t.data = v.data();
  t.dtype = DType::f32;
  t.shape = std::move(shape);
  return t;
}
TensorView view(std::vector<int32_t>& v, Shape shape) {
  TensorView t;
  t.data = v.data();
  t.dtype = DType::s32;
  t.shape = std::move(shape);
  return t;
}

// ---- float GEMM -------------------------------------------------------------------------

struct GemmCase {
  bool ta, tb;
  int64_t m, n, k, pad;  // pad: extra columns in every leading dimension (strided views)
  float alpha, beta;
};

TEST(LayersGemm, OpenBlasMatchesLoopsAndFloat64) {
  const GemmCase cases[] = {
      {false, false, 37, 29, 53, 0, 1.0f, 0.0f}, {false, true, 37, 29, 53, 3, 0.7f, 0.3f},
      {true, false, 16, 65, 128, 1, -1.3f, 1.0f}, {true, true, 5, 7, 300, 2, 1.0f, -0.5f},
      {false, true, 64, 64, 32, 0, 0.25f, 0.0f},
      // M > 64: several row blocks of gemm_f32, a partial last one, both layouts of A.
      {true, false, 150, 33, 70, 2, 1.0f, 0.5f}, {false, true, 130, 17, 9, 1, 1.0f, 0.0f},
  };
  uint64_t seed = 100;
  for (const GemmCase& gc : cases) {
    const int64_t a_rows = gc.ta ? gc.k : gc.m, a_cols = gc.ta ? gc.m : gc.k;
    const int64_t b_rows = gc.tb ? gc.n : gc.k, b_cols = gc.tb ? gc.k : gc.n;
    const int64_t lda = a_cols + gc.pad, ldb = b_cols + gc.pad, ldc = gc.n + gc.pad;
    const std::vector<float> a = randn(a_rows * lda, ++seed), b = randn(b_rows * ldb, ++seed);
    std::vector<float> c0 = randn(gc.m * ldc, ++seed);
    if (gc.beta == 0.0f) std::fill(c0.begin(), c0.end(), std::nanf(""));  // beta = 0 must ignore C
    std::vector<float> c_blas = c0, c_loops = c0;
    const auto ta = gc.ta ? ref::Trans::yes : ref::Trans::no, tb = gc.tb ? ref::Trans::yes : ref::Trans::no;
    ref::gemm_f32(ta, tb, gc.m, gc.n, gc.k, gc.alpha, a.data(), lda, b.data(), ldb, gc.beta, c_blas.data(), ldc);
    ref::gemm_f32_loops(ta, tb, gc.m, gc.n, gc.k, gc.alpha, a.data(), lda, b.data(), ldb, gc.beta,
                        c_loops.data(), ldc);
    const double gamma_k = gc.k * kU32 / (1 - gc.k * kU32);
    for (int64_t i = 0; i < gc.m; ++i)
      for (int64_t j = 0; j < gc.n; ++j) {
        double exact = 0, mag = 0;
        for (int64_t p = 0; p < gc.k; ++p) {
          const double av = gc.ta ? a[p * lda + i] : a[i * lda + p];
          const double bv = gc.tb ? b[j * ldb + p] : b[p * ldb + j];
          exact += av * bv;
          mag += std::fabs(av * bv);
        }
        const double c_old = gc.beta == 0.0f ? 0.0 : c0[i * ldc + j];
        exact = gc.alpha * exact + gc.beta * c_old;
        mag = std::fabs(gc.alpha) * mag + std::fabs(gc.beta * c_old);
        const size_t at = static_cast<size_t>(i * ldc + j);
        // Loops: fp64 accumulation then one rounding, so ≤ u·|exact| (+ fp64 noise ~ k·2^-53·mag).
        EXPECT_LE(std::fabs(c_loops[at] - exact), kU32 * std::fabs(exact) + 1e-12 * mag) << i << "," << j;
        // OpenBLAS: fp32 accumulation; Higham's bound γ_K·Σ|a·b| (+ the output's rounding).
        EXPECT_LE(std::fabs(c_blas[at] - exact), gamma_k * mag + kU32 * std::fabs(exact)) << i << "," << j;
      }
    // The padding columns of C are never written.
    for (int64_t i = 0; i < gc.m; ++i)
      for (int64_t j = gc.n; j < ldc; ++j) {
        const size_t at = static_cast<size_t>(i * ldc + j);
        EXPECT_TRUE(std::isnan(c0[at]) ? std::isnan(c_blas[at]) : c_blas[at] == c0[at]);
      }
  }
}

TEST(LayersGemm, OpsMatmulChecksShapes) {
  std::vector<float> a = randn(6, 1), b = randn(6, 2), c(4);
  ops::matmul(view(a, {2, 3}), false, view(b, {2, 3}), true, view(c, {2, 2}));
  double want = 0;
  for (int k = 0; k < 3; ++k) want += double(a[3 + k]) * b[k];  // c[1, 0]
  EXPECT_NEAR(c[2], want, 1e-6);
  try {
    ops::matmul(view(a, {2, 3}), false, view(b, {2, 3}), false, view(c, {2, 2}));
    ADD_FAILURE() << "inner dimensions 3 and 2 were accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("inner dimensions must agree"), std::string::npos) << e.what();
  }
  a[4] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(ops::matmul(view(a, {2, 3}), false, view(b, {2, 3}), true, view(c, {2, 2})), ops::NonFiniteError);
}

// ---- embedding --------------------------------------------------------------------------

TEST(LayersGrad, Embedding) {
  const int64_t rows = 5, dim = 4, n = 7;
  std::vector<float> table = randn(rows * dim, 11);
  std::vector<int32_t> ids = {3, 0, 3, 4, 1, 3, 0};  // repeats: their gradients must add
  std::vector<float> out(n * dim), w = randn(n * dim, 12);
  ops::embedding_forward(view(ids, {n}), view(table, {rows, dim}), view(out, {n, dim}));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < dim; ++d) EXPECT_EQ(out[i * dim + d], table[ids[i] * dim + d]);
  std::vector<float> dtable(rows * dim, 0.5f);  // accumulates onto what is there
  ops::embedding_backward(view(ids, {n}), view(w, {n, dim}), view(dtable, {rows, dim}));
  const auto wd = to_f64(w);
  std::vector<double> fd = fd_grad(to_f64(table), [&](const std::vector<double>& t) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t d = 0; d < dim; ++d) s += t[ids[i] * dim + d] * wd[i * dim + d];
    return s;
  });
  for (double& g : fd) g += 0.5;
  expect_close(dtable, fd, kGradTol, "dtable");
  // Row 2 is never looked up: exactly the prior 0.5.
  for (int64_t d = 0; d < dim; ++d) EXPECT_EQ(dtable[2 * dim + d], 0.5f);
  ids[5] = 5;
  EXPECT_THROW(ops::embedding_forward(view(ids, {n}), view(table, {rows, dim}), view(out, {n, dim})), Error);
}

// ---- LayerNorm --------------------------------------------------------------------------

TEST(LayersGrad, LayerNorm) {
  const int64_t rows = 6, dim = 24;
  const float eps = 1e-5f;
  std::vector<float> x = randn(rows * dim, 21, 2.0f, 0.5f), gamma = randn(dim, 22, 0.3f, 1.0f),
                     beta = randn(dim, 23, 0.2f), w = randn(rows * dim, 24);
  std::vector<float> y(rows * dim), mean(rows), rstd(rows);
  ops::layernorm_forward(view(x, {rows, dim}), view(gamma, {dim}), view(beta, {dim}), eps,
                         view(y, {rows, dim}), view(mean, {rows}), view(rstd, {rows}));
  const auto xd = to_f64(x), gd = to_f64(gamma), bd = to_f64(beta), wd = to_f64(w);
  expect_close(y, layernorm_f64(xd, gd, bd, rows, dim, eps), kFwdTol, "layernorm y");

  std::vector<float> dx(rows * dim), dgamma(dim, 0.0f), dbeta(dim, 0.0f);
  ops::layernorm_backward(view(w, {rows, dim}), view(x, {rows, dim}), view(mean, {rows}), view(rstd, {rows}),
                          view(gamma, {dim}), view(dx, {rows, dim}), view(dgamma, {dim}), view(dbeta, {dim}));
  expect_close(dx, fd_grad(xd, [&](const std::vector<double>& v) { return dot(layernorm_f64(v, gd, bd, rows, dim, eps), wd); }),
               kGradTol, "layernorm dx");
  expect_close(dgamma, fd_grad(gd, [&](const std::vector<double>& v) { return dot(layernorm_f64(xd, v, bd, rows, dim, eps), wd); }),
               kGradTol, "layernorm dgamma");
  expect_close(dbeta, fd_grad(bd, [&](const std::vector<double>& v) { return dot(layernorm_f64(xd, gd, v, rows, dim, eps), wd); }),
               kGradTol, "layernorm dbeta");
}

// ---- GELU -------------------------------------------------------------------------------

TEST(LayersGrad, Gelu) {
  const int64_t n = 300;
  std::vector<float> x = randn(n, 31, 2.5f), y(n), w = randn(n, 32), dx(n);
  ops::gelu_forward(view(x, {n}), view(y, {n}));
  const auto xd = to_f64(x), wd = to_f64(w);
  std::vector<double> y64(n);
  for (int64_t i = 0; i < n; ++i) y64[i] = gelu_f64(xd[i]);
  expect_close(y, y64, kFwdTol, "gelu y");
  ops::gelu_backward(view(w, {n}), view(x, {n}), view(dx, {n}));
  expect_close(dx, fd_grad(xd, [&](const std::vector<double>& v) {
                 double s = 0;
                 for (size_t i = 0; i < v.size(); ++i) s += gelu_f64(v[i]) * wd[i];
                 return s;
               }),
               kGradTol, "gelu dx");
}

// ---- cross-entropy ----------------------------------------------------------------------

TEST(LayersGrad, CrossEntropyIgnoresNegativeTargets) {
  const int64_t rows = 6, classes = 7;
  std::vector<float> z = randn(rows * classes, 41, 3.0f);
  std::vector<int32_t> t = {2, -1, 6, 0, -100, 3};
  const ops::CrossEntropyResult r = ops::cross_entropy_forward(view(z, {rows, classes}), view(t, {rows}));
  EXPECT_EQ(r.count, 4);
  const auto zd = to_f64(z);
  // The loss sums 4 rows of fp64 log-sum-exp from fp32 logits: exact to fp64 noise.
  EXPECT_NEAR(r.mean_loss(), cross_entropy_f64(zd, t, rows, classes), 1e-12);
  int64_t correct = 0;
  for (int64_t i = 0; i < rows; ++i) {
    if (t[i] < 0) continue;
    correct += std::max_element(z.begin() + i * classes, z.begin() + (i + 1) * classes) - z.begin() - i * classes == t[i];
  }
  EXPECT_EQ(r.correct, correct);

  std::vector<float> dz(rows * classes);
  ops::cross_entropy_backward(view(z, {rows, classes}), view(t, {rows}), 1.0f / static_cast<float>(r.count),
                              view(dz, {rows, classes}));
  expect_close(dz, fd_grad(zd, [&](const std::vector<double>& v) { return cross_entropy_f64(v, t, rows, classes); }),
               kGradTol, "cross-entropy dlogits");
  for (int64_t c = 0; c < classes; ++c) EXPECT_EQ(dz[1 * classes + c], 0.0f);
  // In place: dlogits may be the logits themselves.
  std::vector<float> inplace = z;
  ops::cross_entropy_backward(view(inplace, {rows, classes}), view(t, {rows}), 1.0f / static_cast<float>(r.count),
                              view(inplace, {rows, classes}));
  EXPECT_EQ(inplace, dz);
  t[0] = 7;
  EXPECT_THROW(ops::cross_entropy_forward(view(z, {rows, classes}), view(t, {rows})), Error);
}

// ---- attention --------------------------------------------------------------------------

void check_attention_grad(bool causal, uint64_t seed) {
  const int64_t B = 2, T = 5, C = 8, H = 2;
  std::vector<float> qkv = randn(B * T * 3 * C, seed), w = randn(B * T * C, seed + 1);
  std::vector<float> out(B * T * C), att(B * H * T * T), dqkv(B * T * 3 * C);
  ops::attention_forward(view(qkv, {B, T, 3 * C}), H, causal, view(out, {B, T, C}), view(att, {B, H, T, T}));
  const auto qd = to_f64(qkv), wd = to_f64(w);
  expect_close(out, attention_f64(qd, B, T, C, H, causal), kFwdTol, "attention out");
  ops::attention_backward(view(w, {B, T, C}), view(qkv, {B, T, 3 * C}), view(att, {B, H, T, T}), H, causal,
                          view(dqkv, {B, T, 3 * C}));
  expect_close(dqkv, fd_grad(qd, [&](const std::vector<double>& v) { return dot(attention_f64(v, B, T, C, H, causal), wd); }),
               kGradTol, causal ? "causal attention dqkv" : "attention dqkv");
}

TEST(LayersGrad, AttentionCausal) { check_attention_grad(true, 51); }
TEST(LayersGrad, AttentionNonCausal) { check_attention_grad(false, 53); }

TEST(LayersAttention, CausalOutputIgnoresLaterPositions) {
  const int64_t B = 2, T = 9, C = 12, H = 3;
  std::vector<float> qkv = randn(B * T * 3 * C, 61);
  std::vector<float> out(B * T * C), att(B * H * T * T);
  ops::attention_forward(view(qkv, {B, T, 3 * C}), H, true, view(out, {B, T, C}), view(att, {B, H, T, T}));
  for (int64_t t = 0; t < T; ++t) {
    // Replace everything (q, k and v) after position t with fresh values.
    std::vector<float> changed = qkv;
    const std::vector<float> fresh = randn(B * T * 3 * C, 62 + static_cast<uint64_t>(t), 3.0f);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = t + 1; s < T; ++s)
        for (int64_t c = 0; c < 3 * C; ++c) changed[(b * T + s) * 3 * C + c] = fresh[(b * T + s) * 3 * C + c];
    std::vector<float> out2(B * T * C), att2(B * H * T * T);
    ops::attention_forward(view(changed, {B, T, 3 * C}), H, true, view(out2, {B, T, C}), view(att2, {B, H, T, T}));
    // Outputs at positions ≤ t are bit-identical; the change is visible after t.
    bool later_changed = t + 1 == T;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < T; ++s)
        for (int64_t c = 0; c < C; ++c) {
          const size_t i = static_cast<size_t>((b * T + s) * C + c);
          if (s <= t) ASSERT_EQ(out[i], out2[i]) << "t " << t << " s " << s;
          else later_changed |= out[i] != out2[i];
        }
    EXPECT_TRUE(later_changed) << t;
  }
  // P is zero above the diagonal and each row sums to 1.
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t t = 0; t < T; ++t) {
      double sum = 0;
      for (int64_t s = 0; s < T; ++s) {
        const float p = att[(bh * T + t) * T + s];
        if (s > t) {
          EXPECT_EQ(p, 0.0f);
        }
        sum += p;
      }
      EXPECT_NEAR(sum, 1.0, 4 * T * kU32);  // T fp32 roundings of the normalized terms
    }
}

TEST(LayersAttention, RejectsHeadsNotDividingWidth) {
  std::vector<float> qkv = randn(2 * 30, 65), out(2 * 10), att(4 * 2 * 2);
  try {
    ops::attention_forward(view(qkv, {1, 2, 30}), 4, true, view(out, {1, 2, 10}), view(att, {1, 4, 2, 2}));
    ADD_FAILURE() << "10 channels over 4 heads were accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not divisible by 4 heads"), std::string::npos) << e.what();
  }
}

// Each output is written by one index of parallel_for: same bits with 1 and 2 threads.
TEST(LayersAttention, ThreadCountDoesNotChangeBits) {
  // Sizes above parallel_for's serial threshold (2^16 operations) for every op here.
  const int64_t B = 4, T = 32, C = 32, H = 4, rows = 1024;
  std::vector<float> qkv = randn(B * T * 3 * C, 71), dout = randn(B * T * C, 72);
  std::vector<float> xl = randn(rows * C, 73, 2.0f), dyl = randn(rows * C, 74);
  auto run = [&](int threads) {
    set_num_threads(threads);
    std::vector<float> out(B * T * C), att(B * H * T * T), dqkv(B * T * 3 * C), y(rows * C), mean(rows),
        rstd(rows), dx(rows * C), dg(C, 0.0f), db(C, 0.0f);
    std::vector<float> g(C, 1.5f), b(C, 0.1f);
    ops::attention_forward(view(qkv, {B, T, 3 * C}), H, true, view(out, {B, T, C}), view(att, {B, H, T, T}));
    ops::attention_backward(view(dout, {B, T, C}), view(qkv, {B, T, 3 * C}), view(att, {B, H, T, T}), H, true,
                            view(dqkv, {B, T, 3 * C}));
    ops::layernorm_forward(view(xl, {rows, C}), view(g, {C}), view(b, {C}), 1e-5f, view(y, {rows, C}),
                           view(mean, {rows}), view(rstd, {rows}));
    ops::layernorm_backward(view(dyl, {rows, C}), view(xl, {rows, C}), view(mean, {rows}), view(rstd, {rows}),
                            view(g, {C}), view(dx, {rows, C}), view(dg, {C}), view(db, {C}));
    std::vector<float> c(150 * 40);  // op(A) = xlᵀ with xl read as [200, 150]: three row blocks
    ref::gemm_f32(ref::Trans::yes, ref::Trans::no, 150, 40, 200, 1.0f, xl.data(), 150, dyl.data(), 40, 0.0f,
                  c.data(), 40);
    std::vector<float> all = out;
    all.insert(all.end(), c.begin(), c.end());
    for (const auto* v : {&dqkv, &y, &dx, &dg, &db}) all.insert(all.end(), v->begin(), v->end());
    return all;
  };
  const int before = num_threads();
  const std::vector<float> one = run(1), two = run(2);
  set_num_threads(before);
  EXPECT_EQ(one, two);
}

// ---- small pieces -----------------------------------------------------------------------

TEST(LayersOps, AddAndPatchify) {
  std::vector<float> a = randn(10, 81), b = randn(10, 82), out(10);
  ops::add(view(a, {2, 5}), view(b, {2, 5}), view(out, {2, 5}));
  for (int i = 0; i < 10; ++i) EXPECT_EQ(out[i], a[i] + b[i]);
  EXPECT_THROW(ops::add(view(a, {2, 5}), view(b, {5, 2}), view(out, {2, 5})), Error);

  const int64_t B = 2, Hh = 6, W = 4, p = 2;
  std::vector<float> img = randn(B * Hh * W, 83), patches(B * 6 * 4);
  ops::patchify(view(img, {B, Hh, W}), p, view(patches, {B, 6, 4}));
  for (int64_t bb = 0; bb < B; ++bb)
    for (int64_t y = 0; y < Hh; ++y)
      for (int64_t x = 0; x < W; ++x) {
        const int64_t patch = (y / p) * (W / p) + x / p, within = (y % p) * p + x % p;
        EXPECT_EQ(patches[(bb * 6 + patch) * 4 + within], img[(bb * Hh + y) * W + x]);
      }
  try {
    ops::patchify(view(img, {B, Hh, W}), 4, view(patches, {B, 1, 16}));
    ADD_FAILURE() << "patch 4 on a 6x4 image was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("does not tile"), std::string::npos) << e.what();
  }
}

TEST(LayersOps, LsqFakeQuantize) {
  const int64_t n = 257;
  std::vector<float> x = randn(n, 91, 1.5f), y(n), r(n), dy = randn(n, 92), dx(n);
  const QRange range = kInt4Sym;
  const float s = ops::lsq_init_step(view(x, {n}), range);
  double mean_abs = 0;
  for (float v : x) mean_abs += std::fabs(v);
  EXPECT_NEAR(s, 2 * mean_abs / n / std::sqrt(7.0), 1e-6);
  ops::lsq_fake_quantize(view(x, {n}), s, range, view(y, {n}), view(r, {n}));
  double ds_want = 0;
  for (int64_t i = 0; i < n; ++i) {
    // r = x·fl(1/s): one multiply by the reciprocal (docs/formats.md), not x / s
    const float ri = x[i] * (1.0f / s);
    const float q = std::clamp(std::nearbyint(ri), -7.0f, 7.0f);
    EXPECT_EQ(r[i], ri);
    EXPECT_EQ(y[i], s * q);
    const double delta = ri < -7 ? -7.0 : ri > 7 ? 7.0 : std::nearbyint(ri) - ri;
    ds_want += dy[i] * delta;
  }
  ds_want /= std::sqrt(7.0 * n);
  const float ds = ops::lsq_fake_quantize_backward(view(dy, {n}), view(r, {n}), range, view(dx, {n}));
  // ds: n fp32 products summed; relative error ≤ γ_n·Σ|terms| / |Σ terms| — 1e-4 is generous.
  EXPECT_NEAR(ds, ds_want, 1e-4 * std::fabs(ds_want) + 1e-6);
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(dx[i], (r[i] >= -7 && r[i] <= 7) ? dy[i] : 0.0f);
  EXPECT_THROW(ops::lsq_fake_quantize(view(x, {n}), 0.0f, range, view(y, {n}), view(r, {n})), Error);
}

TEST(LayersOps, NonFiniteInputsNameTheFirstBadIndex) {
  // Several 2^16-element chunks of the parallel scan; the bad values sit in the third.
  const int64_t n = 200000;
  std::vector<float> x = randn(n, 95), y(n);
  x[150001] = std::numeric_limits<float>::infinity();
  x[170000] = std::nanf("");
  try {
    ops::gelu_forward(view(x, {n}), view(y, {n}));
    ADD_FAILURE() << "an Inf input was accepted";
  } catch (const ops::NonFiniteError& e) {
    EXPECT_NE(std::string(e.what()).find("gelu_forward: x contains Inf at flat index 150001"), std::string::npos)
        << e.what();
  }
  x[150001] = 1.0f;
  EXPECT_THROW(ops::gelu_forward(view(x, {n}), view(y, {n})), ops::NonFiniteError);
  x[170000] = -std::numeric_limits<float>::max();  // the largest finite magnitude passes
  EXPECT_NO_THROW(ops::gelu_forward(view(x, {n}), view(y, {n})));
}

// ---- optimizer --------------------------------------------------------------------------

TEST(LayersOptim, AdamWMatchesFloat64) {
  const int64_t n = 50;
  std::vector<float> p = randn(n, 101), m(n, 0.0f), v(n, 0.0f);
  std::vector<double> pd = to_f64(p), md(n, 0.0), vd(n, 0.0);
  ops::AdamWConfig cfg;
  cfg.lr = 0.01f;
  cfg.beta1 = 0.9f;
  cfg.beta2 = 0.95f;
  cfg.eps = 1e-8f;
  cfg.weight_decay = 0.1f;
  cfg.grad_scale = 0.5f;
  for (int64_t step = 1; step <= 5; ++step) {
    std::vector<float> g = randn(n, 110 + static_cast<uint64_t>(step));
    cfg.step = step;
    ops::adamw_update(view(p, {n}), view(g, {n}), view(m, {n}), view(v, {n}), cfg);
    for (int64_t i = 0; i < n; ++i) {
      const double gi = 0.5 * g[i];
      md[i] = 0.9 * md[i] + 0.1 * gi;
      vd[i] = 0.95 * vd[i] + 0.05 * gi * gi;
      const double mh = md[i] / (1 - std::pow(0.9, step)), vh = vd[i] / (1 - std::pow(0.95, step));
      pd[i] -= 0.01 * (0.1 * pd[i] + mh / (std::sqrt(vh) + 1e-8));
    }
  }
  // Each step moves p by ≤ lr·(1 + wd·|p|) ≈ 0.01 with fp32 relative error of a few u;
  // five steps plus p's own rounding: 1e-6 absolute is ≥ 10× that.
  for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(p[i], pd[i], 1e-6) << i;

  // Decoupled decay: a zero gradient shrinks p by exactly (1 − lr·wd) in fp32, moments stay 0.
  std::vector<float> q = {1.0f, -2.0f}, zero(2, 0.0f), m2(2, 0.0f), v2(2, 0.0f);
  cfg.step = 1;
  ops::adamw_update(view(q, {2}), view(zero, {2}), view(m2, {2}), view(v2, {2}), cfg);
  EXPECT_FLOAT_EQ(q[0], 1.0f - 0.01f * 0.1f);
  EXPECT_FLOAT_EQ(q[1], -2.0f * (1.0f - 0.01f * 0.1f));

  std::vector<float> bad = zero;
  bad[1] = std::nanf("");
  const std::vector<float> before = q;
  EXPECT_THROW(ops::adamw_update(view(q, {2}), view(bad, {2}), view(m2, {2}), view(v2, {2}), cfg), ops::NonFiniteError);
  EXPECT_EQ(q, before);  // nothing written
}

TEST(LayersOptim, GlobalNorm) {
  std::vector<float> a = randn(5000, 121), b = randn(17, 122, 3.0f);
  double want = 0;
  for (float x : a) want += double(x) * x;
  for (float x : b) want += double(x) * x;
  EXPECT_NEAR(ops::global_norm({view(a, {5000}), view(b, {17})}), std::sqrt(want), 1e-12 * std::sqrt(want));
  b[3] = std::numeric_limits<float>::infinity();
  EXPECT_FALSE(std::isfinite(ops::global_norm({view(a, {5000}), view(b, {17})})));
}

}  // namespace
