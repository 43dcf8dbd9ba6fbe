// CPU reference of the INT8 training linear layer (int8_linear.h has the formulas).
#include "ref/int8_linear.h"

#include <algorithm>
#include <cmath>

#include "nibble/error.h"
#include "nibble/format.h"
#include "nibble/parallel.h"
#include "ref/gemm.h"
#include "ref/quant.h"
#include "ref/simd.h"

namespace nibble::ref {
namespace {

void check_dims(int64_t n, int64_t d, int64_t c, const char* fn) {
  NB_CHECK(n > 0 && d > 0 && c > 0, fn << ": sizes must be positive, got N=" << n << " D=" << d
                                       << " C=" << c << " (x [N, D], w [C, D])");
}

// out[cols, rows] = in[rows, cols]ᵀ: the K-contiguous copies the backward GEMMs need.
std::vector<int8_t> transpose_s8(const std::vector<int8_t>& in, int64_t rows, int64_t cols) {
  std::vector<int8_t> out(in.size());
  detail::transpose_s8(in.data(), rows, cols, out.data());
  return out;
}

// The stochastic rounding of quantize_rows_int8_stochastic for one row run with its
// uniforms: q = clamp(floor(v/s + u), −127, 127).
void round_row_plain(const float* v, const float* u, int64_t count, float s, int8_t* q) {
  for (int64_t i = 0; i < count; ++i) {
    // One fp32 division, one fp32 add, then floor. |v/s| ≤ 127, so the clamp only catches
    // 127 + u rounding up to 128 in fp32.
    const float t = v[i] / s;
    const float f = std::floor(t + u[i]);
    q[i] = static_cast<int8_t>(std::clamp(f, -127.0f, 127.0f));
  }
}

#ifdef NB_HAVE_X86_DISPATCH
// round_row_plain, 32 values per step with the same operations per lane.
NB_TARGET_AVX2 void round_row_avx2(const float* v, const float* u, int64_t count, float s,
                                   int8_t* q) {
  const __m256 vs = _mm256_set1_ps(s);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    __m256i codes[4];
    for (int k = 0; k < 4; ++k) {
      const __m256 t = _mm256_div_ps(_mm256_loadu_ps(v + i + 8 * k), vs);
      const __m256 f = _mm256_floor_ps(_mm256_add_ps(t, _mm256_loadu_ps(u + i + 8 * k)));
      codes[k] = _mm256_cvtps_epi32(detail::clamp_ps(f, lo, hi));
    }
    detail::store_s8x32(q + i, codes);
  }
  round_row_plain(v + i, u + i, count - i, s, q + i);
}
#endif

// Per-row symmetric INT8 codes with nearest rounding (the forward's quantizer).
void quantize_rows_nearest(const float* v, int64_t rows, int64_t cols, int8_t* q, float* scale) {
  compute_scales(v, rows, cols, Granularity::row, 0, kInt8Sym, false, scale, nullptr);
  quantize(v, rows, cols, Granularity::row, 0, scale, nullptr, kInt8Sym, Rounding::nearest,
           PhiloxKey{}, q);
}

template <class T>
int64_t vector_bytes(const std::vector<T>& v) {
  return static_cast<int64_t>(v.size() * sizeof(T));
}

}  // namespace

int64_t Int8LinearSaved::bytes() const {
  return vector_bytes(x_q) + vector_bytes(x_scale) + vector_bytes(w_q) + vector_bytes(w_scale);
}

void quantize_rows_int8_stochastic(const float* v, int64_t rows, int64_t cols,
                                   const PhiloxKey& key, uint64_t index_base, int8_t* q,
                                   float* scale) {
  const char* fn = "quantize_rows_int8_stochastic";
  NB_CHECK(rows > 0 && cols > 0, fn << ": shape [" << rows << ", " << cols << "] must be positive");
  NB_CHECK(v != nullptr && q != nullptr && scale != nullptr, fn << ": null pointer argument");
  // s[r] = absmax(row r)/127 (rejects NaN/Inf, naming the first bad index)
  compute_scales(v, rows, cols, Granularity::row, 0, kInt8Sym, false, scale, nullptr);
  [[maybe_unused]] const bool avx2 = detail::use_avx2();
  // q = clamp(floor(v/s + u), −127, 127), u = philox_uniform(key, index_base + r·cols + c):
  // the uniforms of a row are one run of consecutive indices.
  detail::parallel_chunks(rows, 1, cols, [&](int64_t r, int64_t) {
    std::vector<float> u(static_cast<size_t>(cols));
    detail::philox_uniforms(key, index_base + static_cast<uint64_t>(r * cols), cols, u.data());
#ifdef NB_HAVE_X86_DISPATCH
    if (avx2) {
      round_row_avx2(v + r * cols, u.data(), cols, scale[r], q + r * cols);
      return;
    }
#endif
    round_row_plain(v + r * cols, u.data(), cols, scale[r], q + r * cols);
  });
}

void int8_linear_forward(const float* x, const float* w, const float* bias, int64_t n,
                         int64_t d, int64_t c, float* y, Int8LinearSaved* saved) {
  check_dims(n, d, c, "int8_linear_forward");
  NB_CHECK(x != nullptr && w != nullptr && y != nullptr,
           "int8_linear_forward: x, w and y must not be null (bias may be)");
  std::vector<int8_t> x_q(static_cast<size_t>(n * d)), w_q(static_cast<size_t>(c * d));
  std::vector<float> x_scale(static_cast<size_t>(n)), w_scale(static_cast<size_t>(c));
  quantize_rows_nearest(x, n, d, x_q.data(), x_scale.data());
  quantize_rows_nearest(w, c, d, w_q.data(), w_scale.data());

  // y[n,c] = float(x_q·w_qᵀ)[n,c] · (sx[n]·sw[c]) + b[c]
  detail::UninitBuffer<int32_t> acc(n * c);
  gemm_s8s8_s32_tn(x_q.data(), w_q.data(), n, c, d, acc.data());
  DequantEpilogue epi;
  epi.scale_a = x_scale.data();
  epi.a_per_row = true;
  epi.scale_b = w_scale.data();
  epi.b_per_col = true;
  epi.bias = bias;
  epilogue_dequant(acc.data(), n, c, epi, y);

  if (saved != nullptr) {
    saved->n = n, saved->d = d, saved->c = c;
    saved->x_q = std::move(x_q);
    saved->x_scale = std::move(x_scale);
    saved->w_q = std::move(w_q);
    saved->w_scale = std::move(w_scale);
  }
}

void int8_linear_backward(const float* dy, const Int8LinearSaved& saved, const PhiloxKey& key,
                          float* dx, float* dw, float* db) {
  const int64_t n = saved.n, d = saved.d, c = saved.c;
  check_dims(n, d, c, "int8_linear_backward");
  NB_CHECK(saved.x_q.size() == static_cast<size_t>(n * d) &&
               saved.w_q.size() == static_cast<size_t>(c * d) &&
               saved.x_scale.size() == static_cast<size_t>(n) &&
               saved.w_scale.size() == static_cast<size_t>(c),
           "int8_linear_backward: the saved state does not match N=" << n << " D=" << d << " C="
                                                                     << c
                                                                     << "; pass the state that "
                                                                        "int8_linear_forward filled");
  NB_CHECK(dy != nullptr && dw != nullptr,
           "int8_linear_backward: dy and dw must not be null (dx and db may be)");
  check_finite_values(dy, n, c, "int8_linear_backward: dy");
  PhiloxKey k = key;
  k.role = RngRole::rounding;

  // dw[c,k] = float(Σ_n B_q[c,n]·x_q[n,k]) · b[c],  B[c,n] = dy[n,c]·sx[n]
  {
    std::vector<float> b_op(static_cast<size_t>(c * n));
    // In 64 × 64 tiles, so that the transposed reads and writes stay in cache.
    detail::parallel_chunks(c, 64, n, [&](int64_t j0, int64_t j1) {
      for (int64_t r0 = 0; r0 < n; r0 += 64) {
        const int64_t r1 = std::min(n, r0 + 64);
        for (int64_t j = j0; j < j1; ++j)
          for (int64_t r = r0; r < r1; ++r)
            b_op[static_cast<size_t>(j * n + r)] =
                dy[r * c + j] * saved.x_scale[static_cast<size_t>(r)];
      }
    });
    std::vector<int8_t> b_q(b_op.size());
    std::vector<float> b_scale(static_cast<size_t>(c));
    quantize_rows_int8_stochastic(b_op.data(), c, n, k, static_cast<uint64_t>(n * c), b_q.data(),
                                  b_scale.data());
    const std::vector<int8_t> x_q_t = transpose_s8(saved.x_q, n, d);  // [D, N]
    detail::UninitBuffer<int32_t> acc(c * d);
    gemm_s8s8_s32_tn(b_q.data(), x_q_t.data(), c, d, n, acc.data());
    DequantEpilogue epi;
    epi.scale_a = b_scale.data();
    epi.a_per_row = true;
    epilogue_dequant(acc.data(), c, d, epi, dw);
  }

  // dx[n,k] = float(Σ_c A_q[n,c]·w_q[c,k]) · a[n],  A[n,c] = dy[n,c]·sw[c]
  if (dx != nullptr) {
    std::vector<float> a_op(static_cast<size_t>(n * c));
    parallel_for(n, [&](int64_t r) {
      for (int64_t j = 0; j < c; ++j) a_op[static_cast<size_t>(r * c + j)] = dy[r * c + j] * saved.w_scale[static_cast<size_t>(j)];
    }, c);
    std::vector<int8_t> a_q(a_op.size());
    std::vector<float> a_scale(static_cast<size_t>(n));
    quantize_rows_int8_stochastic(a_op.data(), n, c, k, 0, a_q.data(), a_scale.data());
    const std::vector<int8_t> w_q_t = transpose_s8(saved.w_q, c, d);  // [D, C]
    detail::UninitBuffer<int32_t> acc(n * d);
    gemm_s8s8_s32_tn(a_q.data(), w_q_t.data(), n, d, c, acc.data());
    DequantEpilogue epi;
    epi.scale_a = a_scale.data();
    epi.a_per_row = true;
    epilogue_dequant(acc.data(), n, d, epi, dx);
  }

  // db = Σ_rows dy (fp64 sums)
  if (db != nullptr) detail::column_sums(dy, n, c, db);
}

}  // namespace nibble::ref
