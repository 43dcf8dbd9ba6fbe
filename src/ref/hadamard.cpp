#include "ref/hadamard.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <vector>

#include "nibble/error.h"
#include "nibble/parallel.h"
#include "ref/quant.h"
#include "ref/simd.h"

namespace nibble::ref {

namespace {

constexpr int64_t kMaxHadamardBlock = 1024;

bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

void check_block(int64_t block, const char* fn) {
  NB_CHECK(is_power_of_two(block) && block <= kMaxHadamardBlock,
           fn << ": hadamard block " << block << " is not a power of two in [1, 1024]; "
              << "use 1, 2, 4, ..., 1024");
}

void check_lsq_range(QRange range, const char* fn) {
  NB_CHECK(range.qmin < 0 && range.qmax > 0,
           fn << ": LSQ needs a signed code range with qmin < 0 < qmax, got [" << range.qmin << ", "
              << range.qmax << "]; use [-7, 7] (paper) or [-8, 7] (released code)");
  NB_CHECK(range.qmin >= -128 && range.qmax <= 127,
           fn << ": code range [" << range.qmin << ", " << range.qmax
              << "] does not fit the int8 container; use a range inside [-128, 127]");
}

void check_step(float s, const char* fn) {
  NB_CHECK(std::isfinite(s) && s > 0.0f, fn << ": step size s = " << s
                                            << " is not a positive finite number; initialise it with "
                                            << "lsq_init_scale and keep it positive (e.g. |s|)");
  // The quantizer multiplies by 1/s: a subnormal s below 2^-128 would make it +Inf (and 0·Inf
  // NaN).
  NB_CHECK(std::isfinite(1.0f / s), fn << ": step size s = " << s
                                       << " is so small that 1/s overflows fp32 (s < 2^-128); "
                                          "clamp the step size to at least 1e-30");
}

// clamp(round_half_even(r), qmin, qmax); the clamp is done in fp32 before the cast so that
// huge or infinite r (tiny s) cannot overflow the integer conversion.
int8_t lsq_code(float r, QRange range) {
  const float c = std::clamp(std::nearbyint(r), static_cast<float>(range.qmin),
                             static_cast<float>(range.qmax));
  return static_cast<int8_t>(c);
}

// One row of hadamard_blocks: the plain butterfly in the documented order.
void hadamard_row_plain(float* row, int64_t cols, int64_t block, float norm) {
  for (int64_t base = 0; base < cols; base += block) {
    float* v = row + base;
    // Unnormalised fast Walsh–Hadamard butterfly, stages h = 1, 2, ..., block/2. Plain
    // fp32 adds and subtracts: there is no product here that could be fused into an FMA.
    for (int64_t h = 1; h < block; h *= 2) {
      for (int64_t g = 0; g < block; g += 2 * h) {
        for (int64_t i = g; i < g + h; ++i) {
          const float a = v[i];
          const float b = v[i + h];
          v[i] = a + b;
          v[i + h] = a - b;
        }
      }
    }
    // One multiply by 2^(−k/2) at the end instead of 1/√2 per stage: same matrix, one
    // rounding per element, and exact when k is even.
    for (int64_t i = 0; i < block; ++i) v[i] *= norm;
  }
}

#ifdef NB_HAVE_X86_DISPATCH
// hadamard_row_plain with 8-float vectors, for block ≥ 8, or any block when cols is a
// multiple of 8. Every element goes through the same adds, subtracts and final multiply,
// stage by stage, as in the plain loops; only the order of independent pairs within a
// stage differs, which cannot change a result.
NB_TARGET_AVX2 void hadamard_row_avx2(float* row, int64_t cols, int64_t block, float norm) {
  const __m256 vnorm = _mm256_set1_ps(norm);
  // Stages h = 1, 2, 4 (those below block) pair lanes of one vector: with sw the vector of
  // each lane's partner, the first of a pair gets x + sw = a + b and the second sw − x = a − b.
  for (int64_t j = 0; j < cols; j += 8) {
    __m256 x = _mm256_loadu_ps(row + j);
    __m256 sw = _mm256_permute_ps(x, 0xB1);  // h = 1: lanes (1, 0, 3, 2, ...)
    x = _mm256_blend_ps(_mm256_add_ps(x, sw), _mm256_sub_ps(sw, x), 0xAA);
    if (block >= 4) {
      sw = _mm256_permute_ps(x, 0x4E);  // h = 2: lanes (2, 3, 0, 1, ...)
      x = _mm256_blend_ps(_mm256_add_ps(x, sw), _mm256_sub_ps(sw, x), 0xCC);
    }
    if (block >= 8) {
      sw = _mm256_permute2f128_ps(x, x, 0x01);  // h = 4: the two halves swapped
      x = _mm256_blend_ps(_mm256_add_ps(x, sw), _mm256_sub_ps(sw, x), 0xF0);
    }
    if (block <= 8) x = _mm256_mul_ps(x, vnorm);
    _mm256_storeu_ps(row + j, x);
  }
  // Stages h = 8, ..., block/2 pair whole vectors; the last one also applies the norm.
  for (int64_t base = 0; base < cols && block > 8; base += block) {
    float* v = row + base;
    for (int64_t h = 8; h < block; h *= 2) {
      const bool last = 2 * h == block;
      for (int64_t g = 0; g < block; g += 2 * h) {
        for (int64_t i = g; i < g + h; i += 8) {
          const __m256 a = _mm256_loadu_ps(v + i);
          const __m256 b = _mm256_loadu_ps(v + i + h);
          __m256 sum = _mm256_add_ps(a, b), diff = _mm256_sub_ps(a, b);
          if (last) {
            sum = _mm256_mul_ps(sum, vnorm);
            diff = _mm256_mul_ps(diff, vnorm);
          }
          _mm256_storeu_ps(v + i, sum);
          _mm256_storeu_ps(v + i + h, diff);
        }
      }
    }
  }
}
#endif

// lsq_quantize on a run of values (q and r may each be null); inv_s = 1/s (fp32 division,
// computed once by the caller).
void lsq_quantize_plain(const float* v, int64_t count, float inv_s, QRange range, int8_t* q,
                        float* r) {
  for (int64_t i = 0; i < count; ++i) {
    // r = v · inv_s (one fp32 multiply); q = clamp(round(r), qmin, qmax)
    const float ri = v[i] * inv_s;
    if (r != nullptr) r[i] = ri;
    if (q != nullptr) q[i] = lsq_code(ri, range);
  }
}

#ifdef NB_HAVE_X86_DISPATCH
// lsq_quantize_plain, 32 values per step. r may be ±Inf (a tiny s): the clamp takes it to a
// bound as std::clamp does; it is never NaN (v is finite, s > 0).
NB_TARGET_AVX2 void lsq_quantize_avx2(const float* v, int64_t count, float inv_s, QRange range,
                                      int8_t* q, float* r) {
  const __m256 vinv = _mm256_set1_ps(inv_s);
  const __m256 qmin = _mm256_set1_ps(static_cast<float>(range.qmin));
  const __m256 qmax = _mm256_set1_ps(static_cast<float>(range.qmax));
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    __m256i codes[4];
    for (int k = 0; k < 4; ++k) {
      const __m256 ri = _mm256_mul_ps(_mm256_loadu_ps(v + i + 8 * k), vinv);
      if (r != nullptr) _mm256_storeu_ps(r + i + 8 * k, ri);
      codes[k] = _mm256_cvtps_epi32(detail::clamp_ps(detail::nearbyint_ps(ri), qmin, qmax));
    }
    if (q != nullptr) detail::store_s8x32(q + i, codes);
  }
  lsq_quantize_plain(v + i, count - i, inv_s, range, q != nullptr ? q + i : nullptr,
                     r != nullptr ? r + i : nullptr);
}
#endif

}  // namespace

float hadamard_norm(int64_t block) {
  check_block(block, "hadamard_norm");
  // 2^(−k/2) = 1/sqrt(block) in fp64, rounded once to fp32 (exact for even k).
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));
}

std::vector<float> hadamard_matrix(int64_t block) {
  check_block(block, "hadamard_matrix");
  const float norm = hadamard_norm(block);
  std::vector<float> h(static_cast<size_t>(block * block));
  // Sylvester construction: H[i][j] = (−1)^popcount(i & j) · 2^(−k/2).
  for (int64_t i = 0; i < block; ++i) {
    for (int64_t j = 0; j < block; ++j) {
      const bool negative = (std::popcount(static_cast<uint64_t>(i & j)) & 1) != 0;
      h[i * block + j] = negative ? -norm : norm;
    }
  }
  return h;
}

void hadamard_blocks(float* x, int64_t rows, int64_t cols, int64_t block) {
  const char* fn = "hadamard_blocks";
  check_block(block, fn);
  NB_CHECK(rows >= 0 && cols >= 0, fn << ": shape [" << rows << ", " << cols
                                      << "] has a negative extent");
  NB_CHECK(cols % block == 0, fn << ": K = " << cols << " is not a multiple of the hadamard block "
                                 << block << "; pick a block (power of two) that divides K");
  NB_CHECK(x != nullptr || rows * cols == 0, fn << ": x is null for a [" << rows << ", " << cols
                                                << "] tensor");
  check_finite_values(x, rows, cols, "hadamard_blocks: x");
  const float norm = hadamard_norm(block);
  // Block 1 is the identity: no stage, and the multiply by norm = 1 returns every finite
  // value bit for bit (subnormals too, as long as nobody enables flush-to-zero), so there is
  // nothing to do.
  if (block == 1) return;
  // The AVX2 form works on whole vectors of 8: inside a block, or across small blocks.
  [[maybe_unused]] const bool avx2 = detail::use_avx2() && cols % 8 == 0;
  const int64_t stages = std::bit_width(static_cast<uint64_t>(block));  // log2(block) + 1 passes
  detail::parallel_chunks(rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(cols, 1)),
                          cols * stages, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
#ifdef NB_HAVE_X86_DISPATCH
      if (avx2) {
        hadamard_row_avx2(x + r * cols, cols, block, norm);
        continue;
      }
#endif
      hadamard_row_plain(x + r * cols, cols, block, norm);
    }
  });
}

float lsq_init_scale(const float* v, int64_t n, QRange range) {
  const char* fn = "lsq_init_scale";
  NB_CHECK(n > 0 && v != nullptr, fn << ": needs at least one value (got n = " << n << ")");
  NB_CHECK(range.qmax > 0, fn << ": qmax = " << range.qmax << " must be positive; use [-7, 7]");
  check_finite_values(v, 1, n, "lsq_init_scale: v");
  // s = 2·mean|v| / sqrt(qmax), in fp64 (index-order sum), rounded once to fp32
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += std::fabs(static_cast<double>(v[i]));
  const double s = 2.0 * (sum / static_cast<double>(n)) / std::sqrt(static_cast<double>(range.qmax));
  const float s32 = static_cast<float>(s);
  // All zeros (or an fp32 underflow): s = 1, as compute_scales does, so codes are 0.
  return s32 > 0.0f ? s32 : 1.0f;
}

void lsq_quantize(const float* v, int64_t n, float s, QRange range, int8_t* q, float* r) {
  const char* fn = "lsq_quantize";
  NB_CHECK(n >= 0, fn << ": negative length " << n);
  NB_CHECK(v != nullptr || n == 0, fn << ": v is null for " << n << " values");
  check_lsq_range(range, fn);
  check_step(s, fn);
  check_finite_values(v, 1, n, "lsq_quantize: v");
  // One fp32 division per tensor; every element is then one multiply (docs/formats.md).
  const float inv_s = 1.0f / s;
  [[maybe_unused]] const bool avx2 = detail::use_avx2();
  detail::parallel_chunks(n, 16384, 1, [&](int64_t i0, int64_t i1) {
    float* r_run = r != nullptr ? r + i0 : nullptr;
    int8_t* q_run = q != nullptr ? q + i0 : nullptr;
#ifdef NB_HAVE_X86_DISPATCH
    if (avx2) {
      lsq_quantize_avx2(v + i0, i1 - i0, inv_s, range, q_run, r_run);
      return;
    }
#endif
    lsq_quantize_plain(v + i0, i1 - i0, inv_s, range, q_run, r_run);
  });
}

float lsq_backward(const float* grad_v_in, const float* r, int64_t n, QRange range,
                   float* grad_v) {
  const char* fn = "lsq_backward";
  NB_CHECK(n > 0, fn << ": needs at least one element (got n = " << n << ")");
  NB_CHECK(grad_v_in != nullptr && r != nullptr, fn << ": grad_v_in and r must not be null");
  check_lsq_range(range, fn);
  check_finite_values(grad_v_in, 1, n, "lsq_backward: grad_v_in");
  // r = v/s may legitimately be ±Inf (a tiny s): the mask and δ handle it; NaN is a bug.
  for (int64_t i = 0; i < n; ++i) {
    NB_CHECK(!std::isnan(r[i]), fn << ": r contains NaN at flat index " << i
                                   << "; pass the r written by lsq_quantize / hq_quantize");
  }
  const float qmin = static_cast<float>(range.qmin);
  const float qmax = static_cast<float>(range.qmax);
  // ∂L/∂s = g · Σ_i grad_i · δ(r_i), index-order fp64 sum (serial: the order is the spec).
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float ri = r[i];
    const float g_in = grad_v_in[i];
    // δ(r) = qmin / qmax outside the range, round(r) − r inside (exact in fp32 for |r| ≥ 1/2
    // by Sterbenz, and trivially 0 − r below).
    float delta;
    bool in_range;
    if (ri < qmin) {
      delta = qmin;
      in_range = false;
    } else if (ri > qmax) {
      delta = qmax;
      in_range = false;
    } else {
      delta = std::nearbyint(ri) - ri;
      in_range = true;
    }
    sum += static_cast<double>(g_in) * static_cast<double>(delta);
    // STE: ∂v̂/∂v = 1[qmin ≤ r ≤ qmax]. Written after reading g_in, so grad_v may alias.
    if (grad_v != nullptr) grad_v[i] = in_range ? g_in : 0.0f;
  }
  // g = 1 / sqrt(qmax · numel)  (LSQ gradient scale, algorithms.md A.3/B.2)
  const double g = 1.0 / std::sqrt(static_cast<double>(range.qmax) * static_cast<double>(n));
  return static_cast<float>(g * sum);
}

void hq_quantize(const float* x, int64_t rows, int64_t cols, int64_t block, float s,
                 QRange range, int8_t* q, float* r) {
  const char* fn = "hq_quantize";
  NB_CHECK(rows >= 0 && cols >= 0, fn << ": shape [" << rows << ", " << cols
                                      << "] has a negative extent");
  NB_CHECK(q != nullptr || rows * cols == 0, fn << ": q is null; pass [rows, cols] int8 codes");
  NB_CHECK(x != nullptr || rows * cols == 0, fn << ": x is null");
  check_step(s, fn);
  // The transform works on a copy: x belongs to the caller (e.g. the saved activation).
  std::vector<float> xt(x, x + rows * cols);
  hadamard_blocks(xt.data(), rows, cols, block);
  lsq_quantize(xt.data(), rows * cols, s, range, q, r);
}

namespace {

// ‖s·Q(v·H/s)·Hᵀ − v‖_F for v[rows, d] with the LSQ-init step of v·H (algorithms.md A.3).
double hq_reconstruction_error(const float* v, int64_t rows, int64_t d, int64_t block,
                               QRange range) {
  const int64_t n = rows * d;
  std::vector<float> vt(v, v + n);
  hadamard_blocks(vt.data(), rows, d, block);
  const float s = lsq_init_scale(vt.data(), n, range);
  std::vector<int8_t> q(static_cast<size_t>(n));
  lsq_quantize(vt.data(), n, s, range, q.data(), nullptr);
  // v̄ = s·q, then back through H (its own inverse)
  for (int64_t i = 0; i < n; ++i) vt[i] = s * static_cast<float>(q[i]);
  hadamard_blocks(vt.data(), rows, d, block);
  double err = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double e = static_cast<double>(vt[i]) - static_cast<double>(v[i]);
    err += e * e;
  }
  return std::sqrt(err);
}

}  // namespace

BlockSearchResult hq_search_block(const float* x, int64_t n, const float* w, int64_t c,
                                  int64_t d, QRange range, int64_t max_block) {
  const char* fn = "hq_search_block";
  NB_CHECK(n > 0 && c > 0 && d > 0, fn << ": needs non-empty x[n, d] and w[c, d], got n = " << n
                                       << ", c = " << c << ", d = " << d);
  NB_CHECK(x != nullptr && w != nullptr, fn << ": x and w must not be null");
  NB_CHECK(max_block >= 1, fn << ": max_block = " << max_block << " must be at least 1");
  check_lsq_range(range, fn);
  check_finite_values(x, n, d, "hq_search_block: x");
  check_finite_values(w, c, d, "hq_search_block: w");

  BlockSearchResult result;
  const int64_t limit = std::min(max_block, kMaxHadamardBlock);
  for (int64_t block = 1; block <= limit; block *= 2) {
    if (d % block != 0) continue;
    // score = ‖X̄ − X‖_F · ‖W̄ − W‖_F (the released code's form of MSE(X̄)·MSE(W̄))
    const double score = hq_reconstruction_error(x, n, d, block, range) *
                         hq_reconstruction_error(w, c, d, block, range);
    result.candidates.push_back(block);
    result.scores.push_back(score);
  }
  // Strict < keeps the smaller block on a tie (block 1 is always a candidate).
  size_t best = 0;
  for (size_t i = 1; i < result.scores.size(); ++i) {
    if (result.scores[i] < result.scores[best]) best = i;
  }
  result.block = result.candidates[best];
  return result;
}

}  // namespace nibble::ref
