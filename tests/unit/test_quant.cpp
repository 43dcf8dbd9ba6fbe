// CPU reference quantizers and s4 packing (src/ref/quant.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "nibble/error.h"
#include "nibble/parallel.h"
#include "nibble/rng.h"
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

std::vector<int8_t> random_s4_codes(int64_t n, uint64_t seed) {
  std::vector<int8_t> q(static_cast<size_t>(n));
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  for (int64_t i = 0; i < n; ++i) {
    q[i] = static_cast<int8_t>(static_cast<int32_t>(philox_u32(key, static_cast<uint64_t>(i)) % 16) - 8);
  }
  return q;
}

// Runs fn, expects a nibble::Error whose message contains `needle`.
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

// Runs the scope on one thread and restores the previous count, even after a failed ASSERT.
struct SingleThreaded {
  int saved = num_threads();
  SingleThreaded() { set_num_threads(1); }
  ~SingleThreaded() { set_num_threads(saved); }
};

const Granularity kAllGranularities[] = {Granularity::tensor, Granularity::row,
                                         Granularity::column, Granularity::group};

int64_t slice_of(Granularity g, int64_t r, int64_t c, int64_t cols, int64_t group) {
  switch (g) {
    case Granularity::tensor: return 0;
    case Granularity::row: return r;
    case Granularity::column: return c;
    case Granularity::group: return r * (cols / group) + c / group;
  }
  return -1;
}

}  // namespace

// ---- s4 packing ------------------------------------------------------------------------

TEST(PackS4, PinnedNibbleOrder) {
  // Element 2i in the low nibble, 2i+1 in the high nibble, two's complement (formats.md,
  // algorithms.md F.2): {1, -2} -> 0xE1, {-8, 7} -> 0x78; an odd tail leaves the high nibble 0.
  const int8_t q[] = {1, -2, -8, 7, -1};
  uint8_t packed[3] = {0xAA, 0xAA, 0xAA};
  ref::pack_s4(q, 5, packed);
  EXPECT_EQ(packed[0], 0xE1);
  EXPECT_EQ(packed[1], 0x78);
  EXPECT_EQ(packed[2], 0x0F);
  int8_t back[5] = {};
  ref::unpack_s4(packed, 5, back);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(back[i], q[i]) << i;
}

TEST(PackS4, SignExtendsEveryValue) {
  for (int lo = -8; lo <= 7; ++lo) {
    for (int hi = -8; hi <= 7; ++hi) {
      const int8_t q[2] = {static_cast<int8_t>(lo), static_cast<int8_t>(hi)};
      uint8_t b = 0;
      ref::pack_s4(q, 2, &b);
      EXPECT_EQ(b, static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4))) << lo << " " << hi;
      int8_t back[2] = {};
      ref::unpack_s4(&b, 2, back);
      EXPECT_EQ(back[0], lo);
      EXPECT_EQ(back[1], hi);
    }
  }
}

TEST(PackS4, RoundTripsRandomCodesOfAnyLength) {
  uint64_t seed = 100;
  for (int64_t n : {1, 2, 3, 7, 64, 1001}) {
    const std::vector<int8_t> q = random_s4_codes(n, seed++);
    std::vector<uint8_t> packed(static_cast<size_t>((n + 1) / 2), 0xFF);
    ref::pack_s4(q.data(), n, packed.data());
    if (n % 2 == 1) {
      EXPECT_EQ(packed.back() >> 4, 0) << "odd tail must leave the high nibble 0";
    }
    std::vector<int8_t> back(static_cast<size_t>(n), 99);
    ref::unpack_s4(packed.data(), n, back.data());
    EXPECT_EQ(back, q) << "n = " << n;
  }
}

TEST(PackS4, RowsPackEachRowToItsOwnBytes) {
  uint64_t seed = 200;
  for (int64_t cols : {7, 8, 33}) {
    const int64_t rows = 5, row_bytes = (cols + 1) / 2;
    const std::vector<int8_t> q = random_s4_codes(rows * cols, seed++);
    std::vector<uint8_t> packed(static_cast<size_t>(rows * row_bytes));
    ref::pack_s4_rows(q.data(), rows, cols, packed.data());
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<uint8_t> one(static_cast<size_t>(row_bytes));
      ref::pack_s4(q.data() + r * cols, cols, one.data());
      for (int64_t b = 0; b < row_bytes; ++b) EXPECT_EQ(packed[r * row_bytes + b], one[b]);
    }
    std::vector<int8_t> back(static_cast<size_t>(rows * cols));
    ref::unpack_s4_rows(packed.data(), rows, cols, back.data());
    EXPECT_EQ(back, q) << "cols = " << cols;
  }
}

TEST(PackS4, RejectsCodesOutsideInt4) {
  uint8_t packed[2];
  const int8_t too_big[] = {0, 3, 8};
  expect_error_mentions([&] { ref::pack_s4(too_big, 3, packed); }, "code 8 at index 2 is outside [-8, 7]");
  const int8_t too_small[] = {-9, 0};
  expect_error_mentions([&] { ref::pack_s4_rows(too_small, 1, 2, packed); }, "outside [-8, 7]");
}

// ---- rounding and clamping ---------------------------------------------------------------

TEST(QuantRounding, TiesGoToEven) {
  const float x[] = {0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 3.5f, 0.49999997f};
  const int8_t expected[] = {0, 2, 2, 0, -2, -2, 4, 0};
  const float one = 1.0f;
  int8_t q[8];
  ref::quantize(x, 1, 8, Granularity::tensor, 0, &one, nullptr, kInt4Sym, Rounding::nearest,
                PhiloxKey{}, q);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(q[i], expected[i]) << "x = " << x[i];
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(ref::round_code(x[i], Rounding::nearest, PhiloxKey{}, 0), expected[i]);
  }
}

TEST(QuantRounding, ClampsAtTheRangeEnds) {
  const float x[] = {-100.0f, -8.4f, -7.6f, -7.0f, 0.2f, 6.6f, 7.4f, 15.4f, 100.0f};
  struct Case {
    QRange range;
    int8_t expected[9];
  };
  const Case cases[] = {
      {kInt4Sym, {-7, -7, -7, -7, 0, 7, 7, 7, 7}},
      {kInt4Full, {-8, -8, -8, -7, 0, 7, 7, 7, 7}},
      {kUint4, {0, 0, 0, 0, 0, 7, 7, 15, 15}},
  };
  const float one = 1.0f;
  for (const Case& k : cases) {
    for (Rounding mode : {Rounding::nearest, Rounding::stochastic}) {
      int8_t q[9];
      ref::quantize(x, 1, 9, Granularity::tensor, 0, &one, nullptr, k.range, mode,
                    PhiloxKey{5, 0, 0, RngRole::rounding}, q);
      for (int i = 0; i < 9; ++i) {
        const std::string where = "x = " + std::to_string(x[i]) + " range [" +
                                  std::to_string(k.range.qmin) + ", " + std::to_string(k.range.qmax) + "]";
        if (mode == Rounding::nearest) {
          EXPECT_EQ(q[i], k.expected[i]) << where;
        } else {
          // Stochastic rounding gives floor(x) or floor(x) + 1, each clamped; past the range
          // ends both clamp to the same code.
          const int down = std::clamp(static_cast<int>(std::floor(x[i])), k.range.qmin, k.range.qmax);
          const int up = std::clamp(static_cast<int>(std::floor(x[i])) + 1, k.range.qmin, k.range.qmax);
          EXPECT_TRUE(q[i] == down || q[i] == up) << where;
        }
      }
    }
  }
}

TEST(QuantStochastic, RoundingIsUnbiased) {
  // Mean code over n independent streams (one Philox step per draw) must approach v. The
  // code is floor(v) + Bernoulli(f), f = frac(v), so the mean's standard error is
  // sqrt(f(1−f)/n) (Bernoulli variance of the fractional part); we allow 5 sigma, so the
  // allowed error shrinks like 1/sqrt(n). The 2^-24 grid of u adds a bias below 1e-7.
  const float v[] = {0.3f, -1.7f, 2.125f, 5.9f};
  const float one = 1.0f;
  // 111k tiny calls: one thread avoids paying an OpenMP fork/join per call.
  const SingleThreaded single_threaded;
  for (int64_t n : {1000, 10000, 100000}) {
    double sum[4] = {};
    for (int64_t t = 0; t < n; ++t) {
      const PhiloxKey key{static_cast<uint64_t>(77 + n), static_cast<uint32_t>(t), 3,
                          RngRole::rounding};
      int8_t q[4];
      ref::quantize(v, 1, 4, Granularity::tensor, 0, &one, nullptr, kInt8Sym,
                    Rounding::stochastic, key, q);
      for (int i = 0; i < 4; ++i) {
        const double fl = std::floor(static_cast<double>(v[i]));
        ASSERT_TRUE(q[i] == fl || q[i] == fl + 1) << "code " << int(q[i]) << " for v = " << v[i];
        sum[i] += q[i];
      }
    }
    for (int i = 0; i < 4; ++i) {
      const double vi = v[i];
      const double f = vi - std::floor(vi);
      const double bound = 5.0 * std::sqrt(f * (1.0 - f) / static_cast<double>(n));
      EXPECT_NEAR(sum[i] / static_cast<double>(n), vi, bound) << "v = " << vi << ", n = " << n;
    }
  }
}

TEST(QuantStochastic, DrawsElementRowTimesColsPlusCol) {
  // The CUDA twin must use the same element index: (r, c) -> r*cols + c.
  const int64_t rows = 6, cols = 13;
  const std::vector<float> x = normal_data(rows * cols, 11, 3.0f);
  const PhiloxKey key{2024, 9, 4, RngRole::rounding};
  const float s[] = {0.37f};
  std::vector<int8_t> q(static_cast<size_t>(rows * cols));
  ref::quantize(x.data(), rows, cols, Granularity::tensor, 0, s, nullptr, kInt8Sym,
                Rounding::stochastic, key, q.data());
  int differs_from_nearest = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      const float v = x[i] / s[0];
      const int expected = static_cast<int>(std::floor(v + philox_uniform(key, static_cast<uint64_t>(i))));
      EXPECT_EQ(q[i], std::clamp(expected, -127, 127)) << "r " << r << " c " << c;
      differs_from_nearest += (q[i] != static_cast<int>(std::nearbyint(v)));
    }
  }
  EXPECT_GT(differs_from_nearest, 0) << "stochastic rounding never left the nearest code";
}

// ---- scales per granularity ---------------------------------------------------------------

TEST(QuantScales, MatchFloat64AndBoundTheErrorByHalfAStep) {
  const int64_t rows = 12, cols = 32, group = 8;
  // Rows with different magnitudes so every granularity sees different slices; all-positive
  // row 3 checks that min is clamped to 0 for asymmetric scales.
  std::vector<float> x = normal_data(rows * cols, 31);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      float& v = x[r * cols + c];
      v *= 0.25f + 0.5f * static_cast<float>(r);
      if (r == 3) v = std::fabs(v) + 0.5f;
    }
  }
  for (Granularity g : kAllGranularities) {
    for (bool asym : {false, true}) {
      const QRange range = asym ? kUint4 : kInt4Sym;
      const int64_t ns = ref::scale_count(g, rows, cols, group);
      std::vector<float> s(static_cast<size_t>(ns));
      std::vector<int32_t> zp(static_cast<size_t>(ns), 0);
      ref::compute_scales(x.data(), rows, cols, g, group, range, asym, s.data(),
                          asym ? zp.data() : nullptr);
      // float64 recomputation of each slice's min/max (clamped around 0)
      std::vector<double> mn(static_cast<size_t>(ns), 0.0), mx(static_cast<size_t>(ns), 0.0);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t k = slice_of(g, r, c, cols, group);
          mn[k] = std::min(mn[k], static_cast<double>(x[r * cols + c]));
          mx[k] = std::max(mx[k], static_cast<double>(x[r * cols + c]));
        }
      }
      for (int64_t k = 0; k < ns; ++k) {
        double s64;
        double tol;
        if (asym) {
          s64 = (mx[k] - mn[k]) / range.levels();
          tol = 2 * kU32 * s64;  // fp32 subtraction + fp32 division, one rounding each
          // Away from ties (random data), the zero point is exact.
          EXPECT_EQ(zp[k], range.qmin - static_cast<int32_t>(std::nearbyint(mn[k] / s64)));
        } else {
          s64 = std::max(-mn[k], mx[k]) / range.qmax;
          tol = kU32 * s64;  // absmax is exact; one fp32 division
        }
        EXPECT_NEAR(s[k], s64, tol) << "granularity " << int(g) << " asym " << asym << " slice " << k;
      }

      std::vector<int8_t> q(static_cast<size_t>(rows * cols));
      std::vector<float> xh(static_cast<size_t>(rows * cols));
      ref::quantize(x.data(), rows, cols, g, group, s.data(), asym ? zp.data() : nullptr, range,
                    Rounding::nearest, PhiloxKey{}, q.data());
      ref::dequantize(q.data(), rows, cols, g, group, s.data(), asym ? zp.data() : nullptr,
                      xh.data());
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t i = r * cols + c, k = slice_of(g, r, c, cols, group);
          // The spec formula, element by element: pins the scale layout of each granularity.
          const int32_t code = static_cast<int32_t>(std::nearbyint(x[i] / s[k])) + zp[k];
          EXPECT_EQ(q[i], std::clamp(code, range.qmin, range.qmax)) << "r " << r << " c " << c;
          // Every value lies inside the scale's range, so |x̂ − x| ≤ s/2, plus the fp32
          // rounding of x/s and of s·q: ≤ 2^-24·(|x| + |x̂|), doubled for margin.
          const double bound = s[k] / 2.0 + 2 * kU32 * (std::fabs(x[i]) + std::fabs(xh[i]));
          EXPECT_LE(std::fabs(static_cast<double>(xh[i]) - x[i]), bound)
              << "granularity " << int(g) << " asym " << asym << " r " << r << " c " << c;
        }
      }
      if (asym) {
        for (int64_t k = 0; k < ns; ++k) {
          // The code range covers [min, max] up to half a step (and fp32 noise)...
          const double lo = static_cast<double>(s[k]) * (range.qmin - zp[k]);
          const double hi = static_cast<double>(s[k]) * (range.qmax - zp[k]);
          EXPECT_LE(lo, mn[k] + s[k] * (0.5 + 1e-5));
          EXPECT_GE(hi, mx[k] - s[k] * (0.5 + 1e-5));
        }
        // ... and 0 is exactly representable: it quantizes to zp and comes back as 0.
        std::vector<float> zeros(static_cast<size_t>(rows * cols), 0.0f);
        ref::quantize(zeros.data(), rows, cols, g, group, s.data(), zp.data(), range,
                      Rounding::nearest, PhiloxKey{}, q.data());
        ref::dequantize(q.data(), rows, cols, g, group, s.data(), zp.data(), xh.data());
        for (float v : xh) EXPECT_EQ(v, 0.0f);
      }
    }
  }
}

TEST(QuantScales, AllZeroSliceGetsUnitScale) {
  // Row 1 is all zeros: its scale is 1 (not 0/7), codes 0 (symmetric) or zp (asymmetric).
  std::vector<float> x = normal_data(3 * 8, 41);
  std::fill(x.begin() + 8, x.begin() + 16, 0.0f);
  float s[3];
  int32_t zp[3];
  ref::compute_scales(x.data(), 3, 8, Granularity::row, 0, kInt4Sym, false, s, nullptr);
  EXPECT_EQ(s[1], 1.0f);
  EXPECT_NE(s[0], 1.0f);
  ref::compute_scales(x.data(), 3, 8, Granularity::row, 0, kUint4, true, s, zp);
  EXPECT_EQ(s[1], 1.0f);
  EXPECT_EQ(zp[1], kUint4.qmin);
  int8_t q[24];
  float xh[24];
  ref::quantize(x.data(), 3, 8, Granularity::row, 0, s, zp, kUint4, Rounding::nearest, PhiloxKey{}, q);
  ref::dequantize(q, 3, 8, Granularity::row, 0, s, zp, xh);
  for (int c = 0; c < 8; ++c) EXPECT_EQ(xh[8 + c], 0.0f);
}

TEST(QuantSqnr, PinnedValues) {
  const float x[] = {3.0f, 4.0f};
  const float xh[] = {3.0f, 3.0f};
  // Σx² = 25, Σe² = 1: 10·log10(25)
  EXPECT_NEAR(ref::sqnr_db(x, xh, 2), 10.0 * std::log10(25.0), 1e-12);
  EXPECT_EQ(ref::sqnr_db(x, x, 2), std::numeric_limits<double>::infinity());
}

// ---- bad input -----------------------------------------------------------------------------

TEST(QuantErrors, RejectBadInput) {
  std::vector<float> x = normal_data(4 * 6, 51);
  float s[24];
  int32_t zp[24];
  int8_t q[24];
  x[9] = std::numeric_limits<float>::quiet_NaN();
  expect_error_mentions([&] { ref::compute_scales(x.data(), 4, 6, Granularity::row, 0, kInt4Sym, false, s, nullptr); },
                        "NaN at flat index 9");
  x[9] = 0.5f;
  x[13] = std::numeric_limits<float>::infinity();
  s[0] = 1.0f;
  expect_error_mentions([&] { ref::quantize(x.data(), 4, 6, Granularity::tensor, 0, s, nullptr, kInt4Sym,
                                            Rounding::nearest, PhiloxKey{}, q); },
                        "Inf at flat index 13");
  x[13] = 0.5f;
  expect_error_mentions([&] { ref::compute_scales(x.data(), 4, 6, Granularity::group, 4, kInt4Sym, false, s, nullptr); },
                        "group size 4 does not divide");
  expect_error_mentions([&] { ref::quantize(x.data(), 4, 6, Granularity::group, 0, s, nullptr, kInt4Sym,
                                            Rounding::nearest, PhiloxKey{}, q); },
                        "group size 0");
  s[0] = 0.0f;
  expect_error_mentions([&] { ref::quantize(x.data(), 4, 6, Granularity::tensor, 0, s, nullptr, kInt4Sym,
                                            Rounding::nearest, PhiloxKey{}, q); },
                        "scale[0] = 0 is not a positive finite number");
  s[0] = 1.0f;
  expect_error_mentions([&] { ref::quantize(x.data(), 4, 6, Granularity::tensor, 0, s, nullptr, kUint8,
                                            Rounding::nearest, PhiloxKey{}, q); },
                        "does not fit the int8 container");
  expect_error_mentions([&] { ref::compute_scales(x.data(), 4, 6, Granularity::tensor, 0, QRange{3, 3}, false, s, nullptr); },
                        "empty code range");
  expect_error_mentions([&] { ref::compute_scales(x.data(), 4, 6, Granularity::tensor, 0, kUint4, true, s, nullptr); },
                        "zero_point");
  expect_error_mentions([&] { ref::dequantize(q, -1, 6, Granularity::row, 0, s, zp, x.data()); },
                        "negative extent");
  expect_error_mentions([&] { ref::round_code(std::numeric_limits<float>::quiet_NaN(), Rounding::nearest, PhiloxKey{}, 3); },
                        "not finite");
  const float bad_hat[] = {1.0f, std::numeric_limits<float>::infinity()};
  expect_error_mentions([&] { ref::sqnr_db(x.data(), bad_hat, 2); }, "x_hat contains Inf at flat index 1");
}
