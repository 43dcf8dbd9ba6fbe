// The vectorized CPU paths (AVX2 forms beside the plain loops, batched Philox, blocked
// helpers; ref/simd.h) against the plain loops, bit for bit. Each test runs an operation
// twice, with the vectorized forms switched off and on, and compares every output bit
// (memcmp, so signed zeros count). On a CPU without AVX2 both runs take the plain loops and
// the comparisons hold trivially; the tests say so.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common/random.h"
#include "nibble/error.h"
#include "nibble/rng.h"
#include "ref/bitsplit.h"
#include "ref/gemm.h"
#include "ref/hadamard.h"
#include "ref/int8_linear.h"
#include "ref/linear.h"
#include "ref/quant.h"
#include "ref/simd.h"

using namespace nibble;
using nibble::testing::randn;

namespace {

// Runs fn with the vectorized forms switched on or off, restoring the default after.
class SimdSwitch {
 public:
  explicit SimdSwitch(bool on) { ref::detail::set_simd_enabled(on); }
  ~SimdSwitch() { ref::detail::set_simd_enabled(true); }
};

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Values that stress the roundings: normals over a wide range of magnitudes, exact zeros of
// both signs, halves (rounding ties) and a few large values.
std::vector<float> awkward_values(int64_t n, uint64_t seed, float scale) {
  std::vector<float> v = randn(n, seed, scale);
  for (int64_t i = 0; i < n; ++i) {
    switch (i % 17) {
      case 3: v[static_cast<size_t>(i)] = 0.0f; break;
      case 5: v[static_cast<size_t>(i)] = -0.0f; break;
      case 7: v[static_cast<size_t>(i)] = scale * (0.5f + static_cast<float>(i % 9)); break;
      case 11: v[static_cast<size_t>(i)] *= 1000.0f; break;
      case 13: v[static_cast<size_t>(i)] *= 1e-6f; break;
      default: break;
    }
  }
  return v;
}

void note_if_plain_only() {
  if (!ref::detail::cpu_has_avx2())
    std::printf("note: this CPU has no AVX2; both runs take the plain loops\n");
}

}  // namespace

TEST(VectorizedPaths, PhiloxUniformsEqualOneDrawPerIndex) {
  note_if_plain_only();
  // Starts at every word of a block, and just below the 2^32-block carry of the counter.
  const uint64_t firsts[] = {0, 1, 2, 3, 4, 1001, (uint64_t{0xffffffff} << 2) - 37,
                             (uint64_t{1} << 34) + 6};
  for (bool on : {false, true}) {
    SimdSwitch simd(on);
    for (uint64_t first : firsts) {
      const PhiloxKey key{0x9e3779b97f4a7c15ull + first, 12, 345, RngRole::grad_output_rounding};
      for (int64_t count : {1, 5, 31, 32, 33, 100, 1000}) {
        std::vector<float> u(static_cast<size_t>(count));
        ref::detail::philox_uniforms(key, first, count, u.data());
        for (int64_t i = 0; i < count; ++i)
          ASSERT_EQ(u[static_cast<size_t>(i)], philox_uniform(key, first + static_cast<uint64_t>(i)))
              << "first " << first << " count " << count << " i " << i << " simd " << on;
      }
    }
  }
}

TEST(VectorizedPaths, PhiloxUniforms16EqualOneDrawPerIndex) {
  note_if_plain_only();
  // Starts at every element of a block, and just below the 2^32-block carry of the counter.
  const uint64_t firsts[] = {0, 1, 3, 4, 7, 8, 1001, (uint64_t{0xffffffff} << 3) - 75,
                             (uint64_t{1} << 35) + 6};
  for (bool on : {false, true}) {
    SimdSwitch simd(on);
    for (uint64_t first : firsts) {
      const PhiloxKey key{0x9e3779b97f4a7c15ull + first, 12, 345, RngRole::grad_output_rounding};
      for (int64_t count : {1, 5, 63, 64, 65, 100, 1000}) {
        std::vector<float> u(static_cast<size_t>(count));
        ref::detail::philox_uniforms16(key, first, count, u.data());
        for (int64_t i = 0; i < count; ++i)
          ASSERT_EQ(u[static_cast<size_t>(i)],
                    philox_uniform16(key, first + static_cast<uint64_t>(i)))
              << "first " << first << " count " << count << " i " << i << " simd " << on;
      }
    }
  }
}

TEST(VectorizedPaths, HadamardMatchesThePlainButterfly) {
  note_if_plain_only();
  for (int64_t block = 1; block <= 1024; block *= 2) {
    // A multiple of 8 columns, and (for small blocks) a row length that is not one.
    for (int64_t cols : {block * 8 >= 64 ? block * 2 : 64, block < 8 ? block * 3 : block}) {
      const int64_t rows = 5;
      const std::vector<float> x =
          awkward_values(rows * cols, 100 + static_cast<uint64_t>(block + cols), 1.0f);
      std::vector<float> plain = x, simd = x;
      {
        SimdSwitch off(false);
        ref::hadamard_blocks(plain.data(), rows, cols, block);
      }
      ref::hadamard_blocks(simd.data(), rows, cols, block);
      EXPECT_TRUE(same_bits(plain, simd)) << "block " << block << " cols " << cols;
    }
  }
}

TEST(VectorizedPaths, BitSplitMatchesThePlainLoop) {
  note_if_plain_only();
  // Sizes with tails of every length modulo 32, and the combined operand present or not.
  for (auto [rows, cols] :
       {std::pair<int64_t, int64_t>{1, 1}, {3, 31}, {7, 33}, {64, 128}, {33, 517}}) {
    const std::vector<float> g =
        awkward_values(rows * cols, 200 + static_cast<uint64_t>(rows * cols), 1e-3f);
    const PhiloxKey key{17, 3, 9, RngRole::grad_output_rounding};
    for (bool with_combined : {true, false}) {
      std::vector<int8_t> hi[2], lo[2], comb[2];
      float s[2];
      for (int on = 0; on < 2; ++on) {
        SimdSwitch simd(on == 1);
        hi[on].assign(static_cast<size_t>(rows * cols), 99);
        lo[on] = hi[on];
        comb[on] = hi[on];
        s[on] = ref::bitsplit(g.data(), rows, cols, key, hi[on].data(), lo[on].data(),
                              with_combined ? comb[on].data() : nullptr);
      }
      EXPECT_EQ(s[0], s[1]);
      EXPECT_TRUE(same_bits(hi[0], hi[1])) << rows << "x" << cols;
      EXPECT_TRUE(same_bits(lo[0], lo[1])) << rows << "x" << cols;
      EXPECT_TRUE(same_bits(comb[0], comb[1])) << rows << "x" << cols;
    }
  }
}

TEST(VectorizedPaths, LsqQuantizeMatchesThePlainLoop) {
  note_if_plain_only();
  const int64_t n = 1000;
  const std::vector<float> v = awkward_values(n, 300, 2.0f);
  // An ordinary step, one that clips most values, and one so small that v/s overflows to ±Inf.
  for (float s : {0.7f, 0.01f, 1e-38f}) {
    for (QRange range : {kInt4Sym, kInt4Full}) {
      std::vector<int8_t> q[2];
      std::vector<float> r[2];
      for (int on = 0; on < 2; ++on) {
        SimdSwitch simd(on == 1);
        q[on].assign(static_cast<size_t>(n), 99);
        r[on].assign(static_cast<size_t>(n), 99.0f);
        ref::lsq_quantize(v.data(), n, s, range, q[on].data(), r[on].data());
      }
      EXPECT_TRUE(same_bits(q[0], q[1])) << "s " << s;
      EXPECT_TRUE(same_bits(r[0], r[1])) << "s " << s;
    }
  }
}

TEST(VectorizedPaths, QuantizeAndScalesMatchThePlainLoops) {
  note_if_plain_only();
  const int64_t rows = 9, cols = 77;
  const std::vector<float> x = awkward_values(rows * cols, 400, 3.0f);
  for (Granularity g : {Granularity::row, Granularity::tensor}) {
    for (QRange range : {kInt4Sym, kInt8Sym}) {
      const int64_t ns = g == Granularity::row ? rows : 1;
      std::vector<float> scale[2];
      std::vector<int8_t> q[2], q_tiny[2];
      for (int on = 0; on < 2; ++on) {
        SimdSwitch simd(on == 1);
        scale[on].assign(static_cast<size_t>(ns), 0.0f);
        ref::compute_scales(x.data(), rows, cols, g, 0, range, false, scale[on].data(), nullptr);
        q[on].assign(static_cast<size_t>(rows * cols), 99);
        ref::quantize(x.data(), rows, cols, g, 0, scale[on].data(), nullptr, range,
                      Rounding::nearest, PhiloxKey{}, q[on].data());
        // Scales so small that x / s saturates.
        const std::vector<float> tiny(static_cast<size_t>(ns), 1e-38f);
        q_tiny[on].assign(static_cast<size_t>(rows * cols), 99);
        ref::quantize(x.data(), rows, cols, g, 0, tiny.data(), nullptr, range, Rounding::nearest,
                      PhiloxKey{}, q_tiny[on].data());
      }
      EXPECT_TRUE(same_bits(scale[0], scale[1]));
      EXPECT_TRUE(same_bits(q[0], q[1]));
      EXPECT_TRUE(same_bits(q_tiny[0], q_tiny[1]));
    }
  }
}

TEST(VectorizedPaths, EpilogueMatchesThePlainLoop) {
  note_if_plain_only();
  const int64_t m = 7, n = 45;
  std::vector<int32_t> acc(static_cast<size_t>(m * n));
  for (size_t i = 0; i < acc.size(); ++i)
    acc[i] = static_cast<int32_t>((i * 2654435761u) % 2000001) - 1000000;
  acc[3] = 0;
  const std::vector<float> sa = randn(m, 501, 0.1f), sb = randn(n, 502, 0.1f), bias = randn(n, 503);
  for (int variant = 0; variant < 4; ++variant) {
    ref::DequantEpilogue epi;
    epi.scale_a = sa.data();
    epi.a_per_row = variant % 2 == 0;
    epi.scale_b = variant < 2 ? sb.data() : nullptr;
    epi.b_per_col = true;
    // Without a bias, −0 products must come out as +0 (−0 + 0): keep that case.
    epi.bias = variant == 1 ? nullptr : bias.data();
    std::vector<float> y[2];
    for (int on = 0; on < 2; ++on) {
      SimdSwitch simd(on == 1);
      y[on].assign(static_cast<size_t>(m * n), 99.0f);
      ref::epilogue_dequant(acc.data(), m, n, epi, y[on].data());
    }
    EXPECT_TRUE(same_bits(y[0], y[1])) << "variant " << variant;
  }
}

// The whole INT4 layer, forward (codes and side channel) and backward (every output), in
// both LSS modes, on sizes whose rows are not multiples of the vector widths.
TEST(VectorizedPaths, HqLinearMatchesThePlainLoops) {
  note_if_plain_only();
  const int64_t n = 37, d = 64, c = 24;
  const std::vector<float> x = awkward_values(n * d, 600, 1.0f), w = randn(c * d, 601, 0.05f);
  const std::vector<float> b = randn(c, 602), dy = awkward_values(n * c, 603, 1e-2f);
  for (ref::LssMode lss : {ref::LssMode::keep_nonzero, ref::LssMode::bernoulli}) {
    for (int64_t block : {1, 4, 32}) {
      ref::HqLinearConfig cfg;
      cfg.block = block;
      cfg.lss = lss;
      const PhiloxKey key{5, 2, 7, RngRole::rounding};
      std::vector<float> y[2];
      ref::HqLinearSaved saved[2];
      ref::HqLinearGrads g[2];
      for (int on = 0; on < 2; ++on) {
        SimdSwitch simd(on == 1);
        y[on].assign(static_cast<size_t>(n * c), 0.0f);
        ref::hq_linear_forward(x.data(), w.data(), b.data(), n, d, c, 0.3f, 0.01f, cfg, key,
                               y[on].data(), &saved[on]);
        g[on] = ref::hq_linear_backward(dy.data(), saved[on], cfg, key);
      }
      const std::string what = "block " + std::to_string(block) +
                               (lss == ref::LssMode::bernoulli ? " bernoulli" : " keep_nonzero");
      EXPECT_TRUE(same_bits(y[0], y[1])) << what;
      EXPECT_TRUE(same_bits(saved[0].x_q_packed, saved[1].x_q_packed)) << what;
      EXPECT_TRUE(same_bits(saved[0].x_e_packed, saved[1].x_e_packed)) << what;
      EXPECT_TRUE(same_bits(saved[0].w_q_packed, saved[1].w_q_packed)) << what;
      EXPECT_TRUE(same_bits(saved[0].w_e_packed, saved[1].w_e_packed)) << what;
      EXPECT_TRUE(same_bits(g[0].dx, g[1].dx)) << what;
      EXPECT_TRUE(same_bits(g[0].dw, g[1].dw)) << what;
      EXPECT_TRUE(same_bits(g[0].db, g[1].db)) << what;
      EXPECT_EQ(g[0].dsx, g[1].dsx) << what;
      EXPECT_EQ(g[0].dsw, g[1].dsw) << what;
      EXPECT_EQ(g[0].kept_rows_dw, g[1].kept_rows_dw) << what;
      EXPECT_EQ(g[0].kept_rows_dx, g[1].kept_rows_dx) << what;
    }
  }
}

TEST(VectorizedPaths, Int8LinearMatchesThePlainLoops) {
  note_if_plain_only();
  const int64_t n = 45, d = 40, c = 33;
  const std::vector<float> x = awkward_values(n * d, 700, 1.0f), w = randn(c * d, 701, 0.05f);
  const std::vector<float> b = randn(c, 702), dy = awkward_values(n * c, 703, 1e-2f);
  std::vector<float> y[2], dx[2], dw[2], db[2];
  ref::Int8LinearSaved saved[2];
  for (int on = 0; on < 2; ++on) {
    SimdSwitch simd(on == 1);
    y[on].assign(static_cast<size_t>(n * c), 0.0f);
    dx[on].assign(static_cast<size_t>(n * d), 0.0f);
    dw[on].assign(static_cast<size_t>(c * d), 0.0f);
    db[on].assign(static_cast<size_t>(c), 0.0f);
    ref::int8_linear_forward(x.data(), w.data(), b.data(), n, d, c, y[on].data(), &saved[on]);
    ref::int8_linear_backward(dy.data(), saved[on], PhiloxKey{3, 1, 4, RngRole::rounding},
                              dx[on].data(), dw[on].data(), db[on].data());
  }
  EXPECT_TRUE(same_bits(y[0], y[1]));
  EXPECT_TRUE(same_bits(saved[0].x_q, saved[1].x_q));
  EXPECT_TRUE(same_bits(saved[0].w_q, saved[1].w_q));
  EXPECT_TRUE(same_bits(dx[0], dx[1]));
  EXPECT_TRUE(same_bits(dw[0], dw[1]));
  EXPECT_TRUE(same_bits(db[0], db[1]));
}

// W4A4's fp64 straight-through products, with output gradients that hold exact zeros of
// both signs (skipped terms) and widths that take each form: a multiple of 16 (AVX-512),
// of 8 only (AVX2), neither (plain loops).
TEST(VectorizedPaths, W4A4LinearMatchesThePlainLoops) {
  note_if_plain_only();
  for (auto [d, c] : {std::pair<int64_t, int64_t>{64, 24}, {40, 16}, {36, 13}}) {
    const int64_t n = 23;
    const std::vector<float> x = awkward_values(n * d, 800, 1.0f), w = randn(c * d, 801, 0.05f);
    const std::vector<float> dy = awkward_values(n * c, 803, 1e-2f);
    for (bool asym : {false, true}) {
      ref::W4A4Config cfg;
      cfg.asymmetric = asym;
      std::vector<float> y[2], dx[2], dw[2], db[2];
      ref::W4A4Saved saved[2];
      for (int on = 0; on < 2; ++on) {
        SimdSwitch simd(on == 1);
        y[on].assign(static_cast<size_t>(n * c), 0.0f);
        dx[on].assign(static_cast<size_t>(n * d), 0.0f);
        dw[on].assign(static_cast<size_t>(c * d), 0.0f);
        db[on].assign(static_cast<size_t>(c), 0.0f);
        ref::w4a4_linear_forward(x.data(), w.data(), nullptr, n, d, c, cfg, y[on].data(),
                                 &saved[on]);
        ref::w4a4_linear_backward(dy.data(), saved[on], dx[on].data(), dw[on].data(), db[on].data());
      }
      EXPECT_TRUE(same_bits(y[0], y[1])) << "d " << d << " asym " << asym;
      EXPECT_TRUE(same_bits(saved[0].x_q_packed, saved[1].x_q_packed)) << "d " << d;
      EXPECT_TRUE(same_bits(dx[0], dx[1])) << "d " << d << " asym " << asym;
      EXPECT_TRUE(same_bits(dw[0], dw[1])) << "d " << d << " asym " << asym;
      EXPECT_TRUE(same_bits(db[0], db[1])) << "d " << d << " asym " << asym;
    }
  }
}

// The helpers the layers share: byte transposes of ragged shapes, and column sums that keep
// each column's fp64 order.
TEST(VectorizedPaths, TransposeAndColumnSumsMatchNaiveLoops) {
  for (auto [rows, cols] :
       {std::pair<int64_t, int64_t>{1, 1}, {8, 8}, {13, 70}, {64, 9}, {129, 200}}) {
    const std::vector<int8_t> in =
        nibble::testing::randint8(rows * cols, 900 + static_cast<uint64_t>(rows), -128, 127);
    std::vector<int8_t> out(in.size());
    ref::detail::transpose_s8(in.data(), rows, cols, out.data());
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j)
        ASSERT_EQ(out[static_cast<size_t>(j * rows + i)], in[static_cast<size_t>(i * cols + j)])
            << rows << "x" << cols << " at (" << i << ", " << j << ")";
    const std::vector<float> v =
        awkward_values(rows * cols, 950 + static_cast<uint64_t>(cols), 1.0f);
    std::vector<float> sums(static_cast<size_t>(cols));
    ref::detail::column_sums(v.data(), rows, cols, sums.data());
    for (int64_t j = 0; j < cols; ++j) {
      double acc = 0;
      for (int64_t i = 0; i < rows; ++i) acc += v[static_cast<size_t>(i * cols + j)];
      const float want = static_cast<float>(acc);
      ASSERT_EQ(std::memcmp(&sums[static_cast<size_t>(j)], &want, sizeof want), 0) << "column " << j;
    }
  }
}

// The branch-free finiteness scans still name the first bad element.
TEST(VectorizedPaths, FinitenessChecksNameTheFirstBadIndex) {
  std::vector<float> v = randn(5000, 990);
  v[3001] = std::numeric_limits<float>::infinity();
  v[1500] = std::numeric_limits<float>::quiet_NaN();
  try {
    ref::check_finite_values(v.data(), 50, 100, "test: v");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("NaN at flat index 1500 (row 15, col 0"), std::string::npos)
        << e.what();
  }
  std::vector<int8_t> hi(v.size()), lo(v.size());
  try {
    ref::bitsplit(v.data(), 50, 100, PhiloxKey{}, hi.data(), lo.data(), nullptr);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("g[15, 0]"), std::string::npos) << e.what();
  }
}
