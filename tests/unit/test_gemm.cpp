// Integer GEMMs (bit-exact against an int64 triple loop) and the dequantizing epilogue
// (against float64 with fp32-rounding tolerances).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "nibble/error.h"
#include "nibble/format.h"
#include "nibble/parallel.h"
#include "nibble/rng.h"
#include "ref/gemm.h"

using namespace nibble;

namespace {

// Codes in [lo, hi] from a Philox stream (modulo bias < 2^-24, irrelevant here).
std::vector<int8_t> random_codes(int64_t count, int32_t lo, int32_t hi, uint64_t seed) {
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  const uint32_t span = static_cast<uint32_t>(hi - lo + 1);
  std::vector<int8_t> q(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i)
    q[i] = static_cast<int8_t>(lo + static_cast<int32_t>(philox_u32(key, i) % span));
  return q;
}

// Row-wise s4 packing written independently of the library: ceil(k/2) bytes per row,
// element 2i low nibble. The padding nibble of an odd row is filled with garbage (0xA)
// so that a GEMM reading it would fail the comparison.
std::vector<uint8_t> pack_rows(const std::vector<int8_t>& q, int64_t rows, int64_t k) {
  const int64_t row_bytes = (k + 1) / 2;
  std::vector<uint8_t> packed(static_cast<size_t>(rows * row_bytes));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < row_bytes; ++i) {
      const int32_t even = q[r * k + 2 * i];
      const int32_t odd = (2 * i + 1 < k) ? q[r * k + 2 * i + 1] : -6;  // 0xA nibble
      packed[r * row_bytes + i] = pack_s4_pair(even, odd);
    }
  }
  return packed;
}

// C = A·Bᵀ with int64 accumulation: the exact reference.
std::vector<int64_t> naive_gemm(const std::vector<int8_t>& a, const std::vector<int8_t>& b,
                                int64_t m, int64_t n, int64_t k) {
  std::vector<int64_t> c(static_cast<size_t>(m * n), 0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      int64_t acc = 0;
      for (int64_t t = 0; t < k; ++t)
        acc += static_cast<int64_t>(a[i * k + t]) * static_cast<int64_t>(b[j * k + t]);
      c[i * n + j] = acc;
    }
  return c;
}

// Counts mismatches so one failing shape reports once instead of flooding the log.
int64_t count_mismatches(const std::vector<int32_t>& got, const std::vector<int64_t>& want) {
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) bad += (static_cast<int64_t>(got[i]) != want[i]);
  return bad;
}

const int64_t kSizes[] = {1, 3, 7, 33, 65, 129, 200};

enum class Kind { s8s8, s4s4, s8s4 };

// Runs one GEMM kind over every (M, N, K) in kSizes³ with codes drawn from the given ranges.
void check_all_shapes(Kind kind, int32_t a_lo, int32_t a_hi, int32_t b_lo, int32_t b_hi,
                      uint64_t seed) {
  for (int64_t m : kSizes)
    for (int64_t n : kSizes)
      for (int64_t k : kSizes) {
        seed += 2;
        const auto a = random_codes(m * k, a_lo, a_hi, seed);
        const auto b = random_codes(n * k, b_lo, b_hi, seed + 1);
        std::vector<int32_t> c(static_cast<size_t>(m * n), 0x5a5a5a5a);
        switch (kind) {
          case Kind::s8s8:
            ref::gemm_s8s8_s32_tn(a.data(), b.data(), m, n, k, c.data());
            break;
          case Kind::s4s4:
            ref::gemm_s4s4_s32_tn(pack_rows(a, m, k).data(), pack_rows(b, n, k).data(), m, n, k,
                                  c.data());
            break;
          case Kind::s8s4:
            ref::gemm_s8s4_s32_tn(a.data(), pack_rows(b, n, k).data(), m, n, k, c.data());
            break;
        }
        ASSERT_EQ(count_mismatches(c, naive_gemm(a, b, m, n, k)), 0)
            << "M=" << m << " N=" << n << " K=" << k;
      }
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(GemmS8S8, BitExactSmallCodes) { check_all_shapes(Kind::s8s8, -3, 3, -3, 3, 1000); }
TEST(GemmS8S8, BitExactFullRangeCodes) { check_all_shapes(Kind::s8s8, -128, 127, -128, 127, 2000); }
// Odd K (1, 3, 7, 33, ...) exercises the half-used last byte of each packed row.
TEST(GemmS4S4, BitExactSmallCodes) { check_all_shapes(Kind::s4s4, -2, 2, -2, 2, 3000); }
TEST(GemmS4S4, BitExactFullRangeCodes) { check_all_shapes(Kind::s4s4, -8, 7, -8, 7, 4000); }
// A holds bit-split codes in [-90, 90] in the small case, any int8 in the full-range case.
TEST(GemmS8S4, BitExactBitSplitRangeCodes) { check_all_shapes(Kind::s8s4, -90, 90, -7, 7, 5000); }
TEST(GemmS8S4, BitExactFullRangeCodes) { check_all_shapes(Kind::s8s4, -128, 127, -8, 7, 6000); }

TEST(GemmS4S4, EqualsS8S8OnUnpackedCodes) {
  for (int64_t k : {1, 2, 31, 64, 129}) {
    const int64_t m = 37, n = 29;
    const auto a = random_codes(m * k, -8, 7, 7000 + k);
    const auto b = random_codes(n * k, -8, 7, 7100 + k);
    std::vector<int32_t> c4(m * n), c8(m * n), c84(m * n);
    ref::gemm_s4s4_s32_tn(pack_rows(a, m, k).data(), pack_rows(b, n, k).data(), m, n, k, c4.data());
    ref::gemm_s8s8_s32_tn(a.data(), b.data(), m, n, k, c8.data());
    ref::gemm_s8s4_s32_tn(a.data(), pack_rows(b, n, k).data(), m, n, k, c84.data());
    EXPECT_EQ(c4, c8) << "K=" << k;
    EXPECT_EQ(c84, c8) << "K=" << k;
  }
}

TEST(GemmS8S8, AcceptsTheLargestSafeKAndRejectsOneMore) {
  // K·128·128 ≤ 2^31 − 1  <=>  K ≤ 131071. At that K, all −128 codes give exactly
  // 131071·16384 = 2147467264, which must come back exact.
  const int64_t k_max = 131071;
  std::vector<int8_t> a(k_max + 1, -128), b(k_max + 1, -128);
  int32_t c = 0;
  ref::gemm_s8s8_s32_tn(a.data(), b.data(), 1, 1, k_max, &c);
  EXPECT_EQ(c, 2147467264);
  const std::string msg =
      error_of([&] { ref::gemm_s8s8_s32_tn(a.data(), b.data(), 1, 1, k_max + 1, &c); });
  EXPECT_NE(msg.find("overflow the int32 accumulator"), std::string::npos) << msg;
  EXPECT_NE(msg.find("K = 131072"), std::string::npos) << msg;
  // The bound uses the actual codes: small codes allow the same K.
  std::fill(a.begin(), a.end(), int8_t{1});
  ref::gemm_s8s8_s32_tn(a.data(), b.data(), 1, 1, k_max + 1, &c);
  EXPECT_EQ(c, -128 * (k_max + 1));
}

TEST(GemmS8S4, RejectsKTooLargeForInt32) {
  // K·128·8 > 2^31 − 1 for K = 2^21.
  const int64_t k = int64_t{1} << 21;
  std::vector<int8_t> a(k, -128);
  std::vector<uint8_t> b_packed(k / 2, pack_s4_pair(-8, -8));
  int32_t c = 0;
  const std::string msg =
      error_of([&] { ref::gemm_s8s4_s32_tn(a.data(), b_packed.data(), 1, 1, k, &c); });
  EXPECT_NE(msg.find("overflow the int32 accumulator"), std::string::npos) << msg;
}

TEST(GemmBadInput, RejectsNonPositiveSizesAndNullPointers) {
  std::vector<int8_t> a(64, 1), b(64, 1);
  std::vector<uint8_t> ap(64, 0x11), bp(64, 0x11);
  std::vector<int32_t> c(64);
  for (auto [m, n, k] : {std::tuple<int64_t, int64_t, int64_t>{0, 2, 2},
                         {2, 0, 2},
                         {2, 2, 0},
                         {-1, 2, 2},
                         {2, -3, 2},
                         {2, 2, -4}}) {
    std::string msg =
        error_of([&] { ref::gemm_s8s8_s32_tn(a.data(), b.data(), m, n, k, c.data()); });
    EXPECT_NE(msg.find("must all be positive"), std::string::npos) << msg;
    msg = error_of([&] { ref::gemm_s4s4_s32_tn(ap.data(), bp.data(), m, n, k, c.data()); });
    EXPECT_NE(msg.find("must all be positive"), std::string::npos) << msg;
    msg = error_of([&] { ref::gemm_s8s4_s32_tn(a.data(), bp.data(), m, n, k, c.data()); });
    EXPECT_NE(msg.find("must all be positive"), std::string::npos) << msg;
  }
  std::string msg = error_of([&] { ref::gemm_s8s8_s32_tn(nullptr, b.data(), 2, 2, 2, c.data()); });
  EXPECT_NE(msg.find("null pointer"), std::string::npos) << msg;
  msg = error_of([&] { ref::row_sums_s8(b.data(), 0, 4, c.data()); });
  EXPECT_NE(msg.find("must both be positive"), std::string::npos) << msg;
}

TEST(GemmRowSums, MatchesInt64Sums) {
  const int64_t n = 65, k = 131;
  const auto b = random_codes(n * k, -128, 127, 8000);
  std::vector<int32_t> sums(n);
  ref::row_sums_s8(b.data(), n, k, sums.data());
  for (int64_t j = 0; j < n; ++j) {
    int64_t want = 0;
    for (int64_t t = 0; t < k; ++t) want += b[j * k + t];
    EXPECT_EQ(sums[j], want) << "row " << j;
  }
}

// ---- kernels: every blocked kernel against the plain loops and the int64 oracle ------------

namespace {

const ref::GemmKernel kAllKernels[] = {ref::GemmKernel::loops, ref::GemmKernel::blocked,
                                       ref::GemmKernel::blocked_avx2,
                                       ref::GemmKernel::blocked_avx512_vnni};

// Runs `kernel` and the loops on one shape; both must equal the int64 product exactly.
void check_kernel_shape(ref::GemmKernel kernel, int64_t m, int64_t n, int64_t k,
                        const std::vector<int8_t>& a, const std::vector<int8_t>& b,
                        const std::vector<int64_t>& want) {
  std::vector<int32_t> got(static_cast<size_t>(m * n), 0x5a5a5a5a);
  std::vector<int32_t> loops(got.size(), 0x5a5a5a5a);
  ref::gemm_s8s8_s32_tn_with(kernel, a.data(), b.data(), m, n, k, got.data());
  ref::gemm_s8s8_s32_tn_loops(a.data(), b.data(), m, n, k, loops.data());
  ASSERT_EQ(count_mismatches(loops, want), 0) << "loops, M=" << m << " N=" << n << " K=" << k;
  ASSERT_EQ(count_mismatches(got, want), 0)
      << ref::gemm_kernel_name(kernel) << ", M=" << m << " N=" << n << " K=" << k;
}

}  // namespace

TEST(GemmKernels, DefaultKernelIsAvailable) {
  EXPECT_TRUE(ref::gemm_kernel_available(ref::gemm_default_kernel()));
  EXPECT_TRUE(ref::gemm_kernel_available(ref::GemmKernel::loops));
  EXPECT_TRUE(ref::gemm_kernel_available(ref::GemmKernel::blocked));
  for (ref::GemmKernel kernel : kAllKernels) {
    if (!ref::gemm_kernel_available(kernel)) {
      std::vector<int8_t> a(4, 1);
      std::vector<int32_t> c(4);
      const std::string msg = error_of(
          [&] { ref::gemm_s8s8_s32_tn_with(kernel, a.data(), a.data(), 2, 2, 2, c.data()); });
      EXPECT_NE(msg.find("needs an instruction set this CPU lacks"), std::string::npos) << msg;
    }
  }
}

// Random shapes (odd sizes, partial tiles and panels, more than one task per direction) and
// full-range codes: every kernel this CPU has returns the loops' bits, and so does the s4
// path (which unpacks and runs the default kernel).
TEST(GemmKernels, EveryKernelMatchesTheLoopsBitForBit) {
  const PhiloxKey shape_key{11000, 0, 0, RngRole::data};
  std::vector<std::tuple<int64_t, int64_t, int64_t>> shapes = {
      {1, 1, 1}, {4, 16, 2}, {4, 32, 4}, {5, 17, 3}, {64, 128, 64}, {65, 129, 130},
      {130, 260, 77}, {257, 33, 1}, {3, 300, 513}};
  for (uint64_t i = 0; i < 24; ++i) {
    // M, N in [1, 200], K in [1, 300]
    shapes.emplace_back(1 + philox_u32(shape_key, 3 * i) % 200,
                        1 + philox_u32(shape_key, 3 * i + 1) % 200,
                        1 + philox_u32(shape_key, 3 * i + 2) % 300);
  }
  uint64_t seed = 12000;
  int tested = 0;
  for (auto [m, n, k] : shapes) {
    seed += 2;
    const auto a = random_codes(m * k, -128, 127, seed);
    const auto b = random_codes(n * k, -128, 127, seed + 1);
    const auto want = naive_gemm(a, b, m, n, k);
    for (ref::GemmKernel kernel : kAllKernels) {
      if (!ref::gemm_kernel_available(kernel)) continue;
      check_kernel_shape(kernel, m, n, k, a, b, want);
      ++tested;
    }
    {
      // Codes in [-8, 7] through the s4 entry points (odd K: half-used last bytes).
      const auto a4 = random_codes(m * k, -8, 7, seed + 50);
      const auto b4 = random_codes(n * k, -8, 7, seed + 51);
      std::vector<int32_t> c4(static_cast<size_t>(m * n));
      ref::gemm_s4s4_s32_tn(pack_rows(a4, m, k).data(), pack_rows(b4, n, k).data(), m, n, k,
                            c4.data());
      ASSERT_EQ(count_mismatches(c4, naive_gemm(a4, b4, m, n, k)), 0)
          << "s4s4 M=" << m << " N=" << n << " K=" << k;
    }
  }
  EXPECT_GE(tested, 2 * static_cast<int>(shapes.size()));  // loops and blocked at least
}

// The extreme codes at the largest K the int32 check accepts: −128·−128 everywhere (the
// byte kernel's offset makes a + 128 = 0 there and leaves everything to the correction
// term) and alternating −128 / 127 (sums that swing through the full range).
TEST(GemmKernels, ExtremeCodesAtTheLargestSafeK) {
  const int64_t k = 131071, m = 5, n = 33;
  std::vector<int8_t> a(static_cast<size_t>(m * k), -128), b(static_cast<size_t>(n * k), -128);
  for (int pattern = 0; pattern < 2; ++pattern) {
    if (pattern == 1) {
      for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<int8_t>(i % 3 == 0 ? 127 : -128);
      for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<int8_t>(i % 5 == 0 ? 127 : -128);
    }
    const auto want = naive_gemm(a, b, m, n, k);
    for (ref::GemmKernel kernel : kAllKernels) {
      if (!ref::gemm_kernel_available(kernel)) continue;
      check_kernel_shape(kernel, m, n, k, a, b, want);
    }
  }
}

// Small codes allow a large K: with a = ±1 and b = ±127, K = 2^19 passes the check (the
// product stays below 2^26), while the byte kernel's offset sums Σ(a + 128)·b and 128·Σb reach
// 129·127·2^19 > 2^33 and wrap: the wrapped difference must still be the exact product.
TEST(GemmKernels, SmallCodesWithALargeKStayExact) {
  const int64_t k = int64_t{1} << 19, m = 2, n = 3;
  std::vector<int8_t> a(static_cast<size_t>(m * k), 1), b(static_cast<size_t>(n * k), 127);
  a[5] = -1;   // rows that differ, so that a mixed-up row shows
  b[k + 7] = -127;
  std::vector<int64_t> want(static_cast<size_t>(m * n));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      int64_t acc = 0;
      for (int64_t t = 0; t < k; ++t) acc += int64_t{a[i * k + t]} * b[j * k + t];
      want[static_cast<size_t>(i * n + j)] = acc;
    }
  for (ref::GemmKernel kernel : kAllKernels) {
    if (!ref::gemm_kernel_available(kernel)) continue;
    std::vector<int32_t> c(static_cast<size_t>(m * n), 0x5a5a5a5a);
    ref::gemm_s8s8_s32_tn_with(kernel, a.data(), b.data(), m, n, k, c.data());
    EXPECT_EQ(count_mismatches(c, want), 0) << ref::gemm_kernel_name(kernel);
  }
}

// Tasks are fixed blocks of C, so one thread and two give the same bits (and both are exact).
TEST(GemmKernels, ResultsDoNotDependOnTheThreadCount) {
  const int64_t m = 300, n = 200, k = 96;
  const auto a = random_codes(m * k, -128, 127, 13000);
  const auto b = random_codes(n * k, -128, 127, 13001);
  const int before = num_threads();
  for (ref::GemmKernel kernel : kAllKernels) {
    if (!ref::gemm_kernel_available(kernel)) continue;
    std::vector<int32_t> c1(static_cast<size_t>(m * n)), c2(c1.size());
    set_num_threads(1);
    ref::gemm_s8s8_s32_tn_with(kernel, a.data(), b.data(), m, n, k, c1.data());
    set_num_threads(2);
    ref::gemm_s8s8_s32_tn_with(kernel, a.data(), b.data(), m, n, k, c2.data());
    EXPECT_EQ(c1, c2) << ref::gemm_kernel_name(kernel);
  }
  set_num_threads(before);
}

namespace {

std::vector<float> random_floats(int64_t count, float lo, float hi, uint64_t seed) {
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  std::vector<float> v(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) v[i] = lo + (hi - lo) * philox_uniform(key, i);
  return v;
}

// y = float(acc') · (sa·sb) + bias in fp32 performs four roundings, each with relative error
// ≤ 2^-24: int64 -> float, sa·sb, the multiply (all relative to |acc'·sa·sb|) and the bias add
// (relative to the result, ≤ |acc'·sa·sb| + |bias|). So |y − y64| ≤ 4·2^-24·(|prod| + |bias|)
// up to second-order terms; 2^-22·1.01 covers them.
double epilogue_tolerance(double prod, double bias) {
  return std::ldexp(1.0, -22) * 1.01 * (std::fabs(prod) + std::fabs(bias));
}

}  // namespace

TEST(Epilogue, ScalesAndBiasMatchFloat64) {
  const int64_t m = 33, n = 65;
  const auto acc_codes = random_codes(m * n, -128, 127, 9000);
  std::vector<int32_t> acc(m * n);
  // Spread accumulators over a wide range, including values above 2^24 (inexact in fp32).
  for (int64_t i = 0; i < m * n; ++i)
    acc[i] = acc_codes[i] * (1 + 131071 * static_cast<int32_t>(i % 7));
  const auto sa = random_floats(m, 1e-3f, 2e-2f, 9001);
  const auto sb = random_floats(n, 1e-3f, 2e-2f, 9002);
  const auto bias = random_floats(n, -3.0f, 3.0f, 9003);
  for (int a_mode = 0; a_mode < 3; ++a_mode)    // none, per-tensor, per-row
    for (int b_mode = 0; b_mode < 3; ++b_mode)  // none, per-tensor, per-column
      for (int with_bias = 0; with_bias < 2; ++with_bias) {
        ref::DequantEpilogue epi;
        epi.scale_a = a_mode ? sa.data() : nullptr;
        epi.a_per_row = a_mode == 2;
        epi.scale_b = b_mode ? sb.data() : nullptr;
        epi.b_per_col = b_mode == 2;
        epi.bias = with_bias ? bias.data() : nullptr;
        std::vector<float> y(m * n);
        ref::epilogue_dequant(acc.data(), m, n, epi, y.data());
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) {
            const double s_a = a_mode == 0 ? 1.0 : a_mode == 1 ? sa[0] : sa[i];
            const double s_b = b_mode == 0 ? 1.0 : b_mode == 1 ? sb[0] : sb[j];
            const double bj = with_bias ? bias[j] : 0.0;
            const double prod = static_cast<double>(acc[i * n + j]) * s_a * s_b;
            ASSERT_NEAR(y[i * n + j], prod + bj, epilogue_tolerance(prod, bj))
                << "a_mode=" << a_mode << " b_mode=" << b_mode << " bias=" << with_bias << " at ("
                << i << ", " << j << ")";
          }
      }
}

TEST(Epilogue, ZeroPointCorrectionIsExactInInt64) {
  // acc − zp·b_sum = (2^31 − 1) + 3·10^9 leaves the int32 range: an int32 correction would wrap.
  const int32_t acc = std::numeric_limits<int32_t>::max();
  const int32_t zp = -30000, b_sum = 100000;
  ref::DequantEpilogue epi;
  epi.zp_a = &zp;
  epi.b_sum = &b_sum;
  float y = 0;
  ref::epilogue_dequant(&acc, 1, 1, epi, &y);
  const double want = 2147483647.0 + 3e9;
  // One rounding int64 -> float (the unit scales are exact): relative 2^-24.
  EXPECT_NEAR(y, want, want * std::ldexp(1.0, -24));
}

TEST(Epilogue, AsymmetricActivationsTimesSymmetricWeightsMatchFloat64) {
  // x [M, K] per token asymmetric to [0, 15] with integer zero points; w [N, K] per channel
  // symmetric to [-7, 7]. Codes are computed here in float64 (independent of ref::quantize):
  //   sx = (max − min)/15 with min ≤ 0 ≤ max, zp = −round(min/sx), qx = clamp(round(x/sx) + zp, 0,
  //   15) sw = max|w|/7, qw = clamp(round(w/sw), −7, 7)
  const int64_t m = 17, n = 23, k = 129;
  const auto x = random_floats(m * k, -1.0f, 3.0f, 9100);
  const auto w = random_floats(n * k, -0.5f, 0.5f, 9101);
  std::vector<float> sx(m), sw(n);
  std::vector<int32_t> zp(m);
  std::vector<int8_t> qx(m * k), qw(n * k);
  for (int64_t i = 0; i < m; ++i) {
    double lo = 0, hi = 0;
    for (int64_t t = 0; t < k; ++t) {
      lo = std::min(lo, double(x[i * k + t]));
      hi = std::max(hi, double(x[i * k + t]));
    }
    sx[i] = static_cast<float>((hi - lo) / 15.0);
    zp[i] = static_cast<int32_t>(-std::nearbyint(lo / sx[i]));
    for (int64_t t = 0; t < k; ++t)
      qx[i * k + t] = static_cast<int8_t>(
          std::clamp(std::nearbyint(x[i * k + t] / double(sx[i])) + zp[i], 0.0, 15.0));
  }
  for (int64_t j = 0; j < n; ++j) {
    double amax = 0;
    for (int64_t t = 0; t < k; ++t) amax = std::max(amax, std::fabs(double(w[j * k + t])));
    sw[j] = static_cast<float>(amax / 7.0);
    for (int64_t t = 0; t < k; ++t)
      qw[j * k + t] =
          static_cast<int8_t>(std::clamp(std::nearbyint(w[j * k + t] / double(sw[j])), -7.0, 7.0));
  }
  // Integer path: acc = qx·qwᵀ, b_sum = Σ_k qw, y = (acc − zp·b_sum)·sx·sw.
  std::vector<int32_t> acc(m * n), b_sum(n);
  ref::gemm_s8s8_s32_tn(qx.data(), qw.data(), m, n, k, acc.data());
  ref::row_sums_s8(qw.data(), n, k, b_sum.data());
  ref::DequantEpilogue epi;
  epi.scale_a = sx.data();
  epi.a_per_row = true;
  epi.scale_b = sw.data();
  epi.b_per_col = true;
  epi.zp_a = zp.data();
  epi.b_sum = b_sum.data();
  std::vector<float> y(m * n);
  ref::epilogue_dequant(acc.data(), m, n, epi, y.data());
  // Reference: x̂·ŵᵀ in float64 from the dequantized values x̂ = sx(qx − zp), ŵ = sw·qw.
  bool zp_matters = false;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double want = 0, mag = 0;
      for (int64_t t = 0; t < k; ++t) {
        const double xh = double(sx[i]) * (qx[i * k + t] - zp[i]);
        const double wh = double(sw[j]) * qw[j * k + t];
        want += xh * wh;
        mag += std::fabs(xh * wh);
      }
      zp_matters |= std::fabs(want - double(acc[i * n + j]) * sx[i] * sw[j]) > 1e-3;
      // fp32 epilogue bound (3 roundings, no bias) + the float64 sum's own rounding
      // K·2^-53·Σ|terms|.
      const double tol = epilogue_tolerance(want, 0.0) + double(k) * std::ldexp(mag, -53);
      ASSERT_NEAR(y[i * n + j], want, tol) << "(" << i << ", " << j << ")";
    }
  EXPECT_TRUE(zp_matters) << "the test data must make the zero-point term non-trivial";
}

TEST(EpilogueBadInput, RejectsMismatchedZeroPointsAndBadScales) {
  const int32_t acc[4] = {1, 2, 3, 4};
  const int32_t zp[2] = {1, 2};
  float y[4];
  ref::DequantEpilogue epi;
  epi.zp_a = zp;  // b_sum missing
  std::string msg = error_of([&] { ref::epilogue_dequant(acc, 2, 2, epi, y); });
  EXPECT_NE(msg.find("needs both"), std::string::npos) << msg;
  const float bad_scale[2] = {1.0f, NAN};
  ref::DequantEpilogue epi2;
  epi2.scale_b = bad_scale;
  epi2.b_per_col = true;
  msg = error_of([&] { ref::epilogue_dequant(acc, 2, 2, epi2, y); });
  EXPECT_NE(msg.find("scale_b[1]"), std::string::npos) << msg;
  msg = error_of([&] { ref::epilogue_dequant(acc, 0, 2, ref::DequantEpilogue{}, y); });
  EXPECT_NE(msg.find("must both be positive"), std::string::npos) << msg;
}
