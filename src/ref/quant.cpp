#include "ref/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "nibble/error.h"
#include "nibble/parallel.h"
#include "ref/simd.h"

namespace nibble::ref {

namespace {

// round_code without the finiteness check, for use inside parallel loops (an exception
// must not escape a parallel region). ±Inf saturates; NaN never reaches it because x is
// checked finite and s > 0 before the loop.
int32_t round_code_unchecked(float v, Rounding mode, const PhiloxKey& key, uint64_t index) {
  float r;
  if (mode == Rounding::nearest) {
    // Halves to even under the default rounding mode (rintf; CUDA __float2int_rn).
    r = std::nearbyint(v);
  } else {
    // floor(v + u), u ∈ [0, 1) on a 2^-24 grid: P(round up) = frac(v), so E[q] = v.
    // The fp32 addition v + u rounds like the CUDA __fadd_rn twin.
    r = std::floor(v + philox_uniform(key, index));
  }
  // Saturate like __float2int_rn: callers clamp to a small QRange anyway, and a cast of an
  // out-of-range float to int32 would be undefined behaviour.
  constexpr float kMax = 2147483520.0f;  // largest fp32 below 2^31
  r = std::clamp(r, -2147483648.0f, kMax);
  return static_cast<int32_t>(r);
}

const char* granularity_name(Granularity g) {
  switch (g) {
    case Granularity::tensor: return "tensor";
    case Granularity::row: return "row";
    case Granularity::column: return "column";
    case Granularity::group: return "group";
  }
  return "unknown";
}

void check_shape(int64_t rows, int64_t cols, const char* fn) {
  NB_CHECK(rows >= 0 && cols >= 0,
           fn << ": shape [" << rows << ", " << cols << "] has a negative extent; pass rows, cols >= 0");
}

void check_range(QRange range, const char* fn) {
  NB_CHECK(range.qmin < range.qmax, fn << ": empty code range [" << range.qmin << ", " << range.qmax
                                       << "]; qmin must be below qmax (e.g. [-7, 7] for INT4)");
}

// Codes are stored in int8 containers, so the range must fit one.
void check_range_s8(QRange range, const char* fn) {
  check_range(range, fn);
  NB_CHECK(range.qmin >= -128 && range.qmax <= 127,
           fn << ": code range [" << range.qmin << ", " << range.qmax
              << "] does not fit the int8 container; use a range inside [-128, 127]");
}

// Scale index of element (r, c) for the layouts of compute_scales.
int64_t scale_index(Granularity g, int64_t r, int64_t c, int64_t cols, int64_t group) {
  switch (g) {
    case Granularity::tensor: return 0;
    case Granularity::row: return r;
    case Granularity::column: return c;
    case Granularity::group: return r * (cols / group) + c / group;
  }
  return 0;
}

void check_scales(const float* scale, int64_t n, const char* fn) {
  for (int64_t i = 0; i < n; ++i) {
    NB_CHECK(std::isfinite(scale[i]) && scale[i] > 0.0f,
             fn << ": scale[" << i << "] = " << scale[i]
                << " is not a positive finite number; compute scales with compute_scales");
  }
}

// Per-slice statistics used by compute_scales: running min and max of the raw values.
struct MinMax {
  float lo = 0.0f;  // starts at 0: min is clamped ≤ 0 and max ≥ 0 anyway
  float hi = 0.0f;
  void add(float v) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  void merge(const MinMax& o) {
    lo = std::min(lo, o.lo);
    hi = std::max(hi, o.hi);
  }
};

// MinMax of a run of (finite) values.
MinMax min_max_plain(const float* x, int64_t n) {
  MinMax m;
  for (int64_t i = 0; i < n; ++i) m.add(x[i]);
  return m;
}

#ifdef NB_HAVE_X86_DISPATCH
// min_max_plain in eight lanes: min_ps(v, lo) is (v < lo ? v : lo), std::min's choice, and
// max_ps likewise. min and max are exact, so the lanes give the same extremes as one running
// pair (a zero could only change sign, which no scale formula sees: ±0 as the min or max
// changes neither max − min, nor absmax, nor round(min / s)).
NB_TARGET_AVX2 MinMax min_max_avx2(const float* x, int64_t n) {
  __m256 lo = _mm256_setzero_ps(), hi = lo;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    lo = _mm256_min_ps(v, lo);
    hi = _mm256_max_ps(v, hi);
  }
  alignas(32) float lanes[16];
  _mm256_store_ps(lanes, lo);
  _mm256_store_ps(lanes + 8, hi);
  MinMax m = min_max_plain(x + i, n - i);
  for (int l = 0; l < 8; ++l) m.merge(MinMax{lanes[l], lanes[8 + l]});
  return m;
}
#endif

MinMax min_max_run(const float* x, int64_t n) {
#ifdef NB_HAVE_X86_DISPATCH
  if (detail::use_avx2()) return min_max_avx2(x, n);
#endif
  return min_max_plain(x, n);
}

#ifdef NB_HAVE_X86_DISPATCH
// quantize's loop for one run with one symmetric scale and nearest rounding, 32 values per
// step: q = clamp(rne(x / s), qmin, qmax). Clamping the float before the conversion gives
// the plain loop's codes (its saturation bounds lie outside [qmin, qmax]); x / s is never
// NaN (x is finite, s > 0).
NB_TARGET_AVX2 void quantize_nearest_avx2(const float* x, int64_t count, float s, QRange range,
                                          int8_t* q) {
  const __m256 vs = _mm256_set1_ps(s);
  const __m256 qmin = _mm256_set1_ps(static_cast<float>(range.qmin));
  const __m256 qmax = _mm256_set1_ps(static_cast<float>(range.qmax));
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    __m256i codes[4];
    for (int k = 0; k < 4; ++k) {
      const __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + i + 8 * k), vs);
      codes[k] = _mm256_cvtps_epi32(detail::clamp_ps(detail::nearbyint_ps(v), qmin, qmax));
    }
    detail::store_s8x32(q + i, codes);
  }
  for (; i < count; ++i) {
    const int64_t code = round_code_unchecked(x[i] / s, Rounding::nearest, PhiloxKey{}, 0);
    q[i] = static_cast<int8_t>(std::clamp<int64_t>(code, range.qmin, range.qmax));
  }
}
#endif

// Scale (and zero point) of one slice from its min/max, fp32 as in the header.
void slice_scale(const MinMax& mm, QRange range, bool asymmetric, float* scale, int32_t* zp,
                 const char* fn, int64_t index) {
  float s;
  if (asymmetric) {
    // s = (max − min) / (qmax − qmin), one fp32 subtraction and one fp32 division
    s = (mm.hi - mm.lo) / static_cast<float>(range.levels());
  } else {
    // s = absmax / qmax
    const float absmax = std::max(-mm.lo, mm.hi);
    s = absmax / static_cast<float>(range.qmax);
  }
  // An all-zero slice (or one so tiny the division underflows) gets s = 1, so its codes
  // are 0 (symmetric) or zp (asymmetric) instead of a division by zero.
  if (s == 0.0f) s = 1.0f;
  NB_CHECK(std::isfinite(s), fn << ": scale " << index << " overflows fp32 (slice min " << mm.lo
                                << ", max " << mm.hi << "); rescale the input");
  *scale = s;
  if (asymmetric) {
    // zp = qmin − round(min / s). min ≤ 0 and (max − min)/s ≈ levels keep zp inside
    // [qmin, qmax] up to fp32 rounding, which cannot move round() by a whole step.
    *zp = range.qmin - round_code_unchecked(mm.lo / s, Rounding::nearest, PhiloxKey{}, 0);
  }
}

// True when no value is ±Inf or NaN: a branch-free test of the exponent bits (all set
// means not finite), OR-ed over a run so that the loop vectorizes (runs: detail::scan_runs).
NB_ALWAYS_INLINE bool run_is_finite(const float* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof bits);
    bad |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}
NB_TARGET_AVX2 bool run_is_finite_avx2(const float* x, int64_t n) { return run_is_finite(x, n); }

bool all_finite(const float* x, int64_t n) {
  constexpr int64_t kRun = int64_t{1} << 15;
  std::vector<uint8_t> bad_run(static_cast<size_t>((n + kRun - 1) / kRun), 0);
  const bool avx2 = detail::use_avx2();
  detail::scan_runs(n, kRun, [&](int64_t i0, int64_t i1) {
    const bool ok = avx2 ? run_is_finite_avx2(x + i0, i1 - i0) : run_is_finite(x + i0, i1 - i0);
    bad_run[static_cast<size_t>(i0 / kRun)] = !ok;
  });
  return std::find(bad_run.begin(), bad_run.end(), 1) == bad_run.end();
}

}  // namespace

void check_finite_values(const float* x, int64_t rows, int64_t cols, const char* what) {
  const int64_t n = rows * cols;
  if (all_finite(x, n)) return;
  // Something is bad: find the first bad index for the message.
  for (int64_t i = 0; i < n; ++i) {
    NB_CHECK(std::isfinite(x[i]), what << " contains " << (std::isnan(x[i]) ? "NaN" : "Inf")
                                       << " at flat index " << i << " (row " << i / cols << ", col "
                                       << i % cols << " of [" << rows << ", " << cols
                                       << "]); clean or clip the input before quantizing");
  }
}

int64_t scale_count(Granularity g, int64_t rows, int64_t cols, int64_t group) {
  check_shape(rows, cols, "scale_count");
  switch (g) {
    case Granularity::tensor: return 1;
    case Granularity::row: return rows;
    case Granularity::column: return cols;
    case Granularity::group:
      NB_CHECK(group >= 1, "group size " << group << " is not positive; pass a group size >= 1 "
                                         << "that divides the row length " << cols);
      NB_CHECK(cols % group == 0, "group size " << group << " does not divide the row length (cols = "
                                                << cols << "); pick a group that divides cols, "
                                                << "e.g. 32 or 64 for K = 4096");
      return rows * (cols / group);
  }
  NB_FAIL("unknown granularity " << static_cast<int>(g));
}

int32_t round_code(float v, Rounding mode, const PhiloxKey& key, uint64_t index) {
  NB_CHECK(std::isfinite(v), "round_code: value " << v << " at index " << index
                                                  << " is not finite; check the input and the scale");
  return round_code_unchecked(v, mode, key, index);
}

void compute_scales(const float* x, int64_t rows, int64_t cols, Granularity g, int64_t group,
                    QRange range, bool asymmetric, float* scale, int32_t* zero_point) {
  const char* fn = "compute_scales";
  check_shape(rows, cols, fn);
  check_range(range, fn);
  NB_CHECK(asymmetric || range.qmax > 0,
           fn << ": symmetric scales need qmax > 0, got range [" << range.qmin << ", " << range.qmax
              << "]; use a signed range such as [-7, 7] or pass asymmetric = true");
  const int64_t n_scales = scale_count(g, rows, cols, group);
  NB_CHECK(scale != nullptr, fn << ": scale is null; pass " << n_scales << " floats");
  NB_CHECK(!asymmetric || zero_point != nullptr,
           fn << ": asymmetric scales need a zero_point array of " << n_scales << " int32");
  NB_CHECK(x != nullptr || rows * cols == 0, fn << ": x is null for a [" << rows << ", " << cols
                                                << "] tensor");
  check_finite_values(x, rows, cols, "compute_scales: x");

  std::vector<MinMax> stats(static_cast<size_t>(n_scales));
  switch (g) {
    case Granularity::tensor: {
      // Per-row partial min/max, merged serially: min/max are exact, so the result does
      // not depend on the split.
      std::vector<MinMax> per_row(static_cast<size_t>(rows));
      parallel_for(rows, [&](int64_t r) { per_row[r] = min_max_run(x + r * cols, cols); }, cols);
      for (const MinMax& m : per_row) stats[0].merge(m);
      break;
    }
    case Granularity::row:
      parallel_for(rows, [&](int64_t r) { stats[r] = min_max_run(x + r * cols, cols); }, cols);
      break;
    case Granularity::column:
      parallel_for(cols, [&](int64_t c) {
        for (int64_t r = 0; r < rows; ++r) stats[c].add(x[r * cols + c]);
      }, rows);
      break;
    case Granularity::group: {
      const int64_t groups = cols / group;
      parallel_for(rows, [&](int64_t r) {
        for (int64_t c = 0; c < cols; ++c) stats[r * groups + c / group].add(x[r * cols + c]);
      }, cols);
      break;
    }
  }
  for (int64_t i = 0; i < n_scales; ++i) {
    slice_scale(stats[i], range, asymmetric, &scale[i], asymmetric ? &zero_point[i] : nullptr, fn,
                i);
  }
}

void quantize(const float* x, int64_t rows, int64_t cols, Granularity g, int64_t group,
              const float* scale, const int32_t* zero_point, QRange range, Rounding mode,
              const PhiloxKey& key, int8_t* q) {
  const char* fn = "quantize";
  check_shape(rows, cols, fn);
  check_range_s8(range, fn);
  const int64_t n_scales = scale_count(g, rows, cols, group);
  NB_CHECK(scale != nullptr, fn << ": scale is null; pass " << n_scales << " floats ("
                                << granularity_name(g) << " granularity)");
  NB_CHECK((x != nullptr && q != nullptr) || rows * cols == 0,
           fn << ": x or q is null for a [" << rows << ", " << cols << "] tensor");
  check_scales(scale, n_scales, fn);
  check_finite_values(x, rows, cols, "quantize: x");

#ifdef NB_HAVE_X86_DISPATCH
  // The common case of the linear layers: one symmetric scale per row (or per tensor),
  // nearest rounding, no random numbers.
  if (detail::use_avx2() && zero_point == nullptr && mode == Rounding::nearest &&
      (g == Granularity::row || g == Granularity::tensor)) {
    parallel_for(rows, [&](int64_t r) {
      const float s = scale[g == Granularity::row ? r : 0];
      quantize_nearest_avx2(x + r * cols, cols, s, range, q + r * cols);
    }, cols);
    return;
  }
#endif
  parallel_for(rows, [&](int64_t r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      const int64_t si = scale_index(g, r, c, cols, group);
      // q = clamp(round(x / s) + zp, qmin, qmax); int64 so a saturated code cannot overflow
      const float v = x[i] / scale[si];
      int64_t code = round_code_unchecked(v, mode, key, static_cast<uint64_t>(i));
      if (zero_point != nullptr) code += zero_point[si];
      q[i] = static_cast<int8_t>(std::clamp<int64_t>(code, range.qmin, range.qmax));
    }
  }, cols);
}

void dequantize(const int8_t* q, int64_t rows, int64_t cols, Granularity g, int64_t group,
                const float* scale, const int32_t* zero_point, float* x_hat) {
  const char* fn = "dequantize";
  check_shape(rows, cols, fn);
  const int64_t n_scales = scale_count(g, rows, cols, group);
  NB_CHECK(scale != nullptr, fn << ": scale is null; pass " << n_scales << " floats ("
                                << granularity_name(g) << " granularity)");
  NB_CHECK((q != nullptr && x_hat != nullptr) || rows * cols == 0,
           fn << ": q or x_hat is null for a [" << rows << ", " << cols << "] tensor");
  check_scales(scale, n_scales, fn);

  parallel_for(rows, [&](int64_t r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      const int64_t si = scale_index(g, r, c, cols, group);
      // x̂ = s · (q − zp): the integer difference is exact, then one fp32 multiply
      const int32_t d = static_cast<int32_t>(q[i]) - (zero_point ? zero_point[si] : 0);
      x_hat[i] = scale[si] * static_cast<float>(d);
    }
  }, cols);
}

namespace {

void check_s4_codes(const int8_t* q, int64_t n, const char* fn) {
  // A branch-free scan first (q + 8 in [0, 15] for a valid code; runs: detail::scan_runs),
  // the message loop only when it found something.
  constexpr int64_t kRun = int64_t{1} << 16;
  std::vector<uint8_t> bad_run(static_cast<size_t>((n + kRun - 1) / kRun), 0);
  detail::scan_runs(n, kRun, [&](int64_t i0, int64_t i1) {
    uint32_t bad = 0;
    for (int64_t i = i0; i < i1; ++i)
      bad |= static_cast<uint32_t>(static_cast<uint8_t>(q[i] + 8) > 15);
    bad_run[static_cast<size_t>(i0 / kRun)] = bad != 0;
  });
  if (std::find(bad_run.begin(), bad_run.end(), 1) == bad_run.end()) return;
  for (int64_t i = 0; i < n; ++i) {
    NB_CHECK(q[i] >= -8 && q[i] <= 7, fn << ": code " << static_cast<int>(q[i]) << " at index " << i
                                         << " is outside [-8, 7]; clamp codes to an INT4 range "
                                         << "before packing");
  }
}

// pack_s4 on codes already checked to lie in [-8, 7]:
// byte b = q[2b] in bits 0-3, q[2b+1] in bits 4-7 (0 past an odd end)
void pack_s4_unchecked(const int8_t* q, int64_t n, uint8_t* packed) {
  for (int64_t b = 0; b < n / 2; ++b) packed[b] = pack_s4_pair(q[2 * b], q[2 * b + 1]);
  if (n % 2 != 0) packed[n / 2] = pack_s4_pair(q[n - 1], 0);
}

}  // namespace

void pack_s4(const int8_t* q, int64_t n, uint8_t* packed) {
  NB_CHECK(n >= 0, "pack_s4: negative length " << n);
  NB_CHECK((q != nullptr && packed != nullptr) || n == 0, "pack_s4: null pointer for " << n << " codes");
  check_s4_codes(q, n, "pack_s4");
  pack_s4_unchecked(q, n, packed);
}

void unpack_s4(const uint8_t* packed, int64_t n, int8_t* q) {
  NB_CHECK(n >= 0, "unpack_s4: negative length " << n);
  NB_CHECK((q != nullptr && packed != nullptr) || n == 0, "unpack_s4: null pointer for " << n << " codes");
  // element 2b from the low nibble of byte b, 2b + 1 from the high one
  for (int64_t b = 0; b < n / 2; ++b) {
    q[2 * b] = static_cast<int8_t>(unpack_s4_low(packed[b]));
    q[2 * b + 1] = static_cast<int8_t>(unpack_s4_high(packed[b]));
  }
  if (n % 2 != 0) q[n - 1] = static_cast<int8_t>(unpack_s4_low(packed[n / 2]));
}

void pack_s4_rows(const int8_t* q, int64_t rows, int64_t cols, uint8_t* packed) {
  check_shape(rows, cols, "pack_s4_rows");
  NB_CHECK((q != nullptr && packed != nullptr) || rows * cols == 0,
           "pack_s4_rows: null pointer for [" << rows << ", " << cols << "] codes");
  // Validate first, outside the packing loop: an exception must not leave a parallel region.
  check_s4_codes(q, rows * cols, "pack_s4_rows");
  const int64_t row_bytes = (cols + 1) / 2;
  parallel_for(rows, [&](int64_t r) {
    pack_s4_unchecked(q + r * cols, cols, packed + r * row_bytes);
  }, cols);
}

void unpack_s4_rows(const uint8_t* packed, int64_t rows, int64_t cols, int8_t* q) {
  check_shape(rows, cols, "unpack_s4_rows");
  NB_CHECK((q != nullptr && packed != nullptr) || rows * cols == 0,
           "unpack_s4_rows: null pointer for [" << rows << ", " << cols << "] codes");
  const int64_t row_bytes = (cols + 1) / 2;
  parallel_for(rows, [&](int64_t r) { unpack_s4(packed + r * row_bytes, cols, q + r * cols); }, cols);
}

double sqnr_db(const float* x, const float* x_hat, int64_t n) {
  NB_CHECK(n >= 0, "sqnr_db: negative length " << n);
  NB_CHECK((x != nullptr && x_hat != nullptr) || n == 0, "sqnr_db: null pointer for " << n << " values");
  check_finite_values(x, 1, n, "sqnr_db: x");
  check_finite_values(x_hat, 1, n, "sqnr_db: x_hat");
  // 10·log10(Σx² / Σ(x − x̂)²), fp64 sums in index order
  double signal = 0.0, noise = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double xi = x[i];
    const double e = xi - static_cast<double>(x_hat[i]);
    signal += xi * xi;
    noise += e * e;
  }
  if (noise == 0.0) return std::numeric_limits<double>::infinity();
  return 10.0 * std::log10(signal / noise);
}

}  // namespace nibble::ref
