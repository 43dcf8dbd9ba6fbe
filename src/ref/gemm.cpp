// CPU reference integer GEMMs (TN: C[M, N] = A[M, K] · B[N, K]ᵀ) and the dequantizing
// epilogue. The plain loops (one parallel_for over the rows of C, each row accumulating in
// int32) are the oracle; the GEMMs run the register-blocked kernels of gemm_blocked.cpp,
// which return the same bits (gemm.h), picked once for this CPU.
#include "ref/gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <vector>

#include "nibble/error.h"
#include "nibble/format.h"
#include "nibble/parallel.h"
#include "ref/gemm_blocked.h"

namespace nibble::ref {
namespace {


constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

void check_gemm_args(const char* op, const void* a, const void* b, int64_t m, int64_t n, int64_t k,
                     const int32_t* c) {
  NB_CHECK(m > 0 && n > 0 && k > 0,
           op << ": sizes M = " << m << ", N = " << n << ", K = " << k
              << " must all be positive; skip the call (the product is empty or all zeros) "
                 "when a dimension is 0");
  NB_CHECK(a != nullptr && b != nullptr && c != nullptr,
           op << ": a null pointer was passed for "
              << (a == nullptr   ? "A"
                  : b == nullptr ? "B"
                                 : "C")
              << "; pass buffers of [M, K], [N, K] and [M, N] elements");
}

// Largest |code| in a buffer of int8 codes (128 for −128), from the smallest and largest
// code: integer min/max reductions, which compilers vectorize.
NB_ALWAYS_INLINE int32_t max_abs_s8_body(const int8_t* q, int64_t count) {
  int8_t lo = 0, hi = 0;
  for (int64_t i = 0; i < count; ++i) {
    lo = std::min(lo, q[i]);
    hi = std::max(hi, q[i]);
  }
  return std::max(-static_cast<int32_t>(lo), static_cast<int32_t>(hi));
}
NB_TARGET_AVX2 int32_t max_abs_s8_avx2(const int8_t* q, int64_t count) {
  return max_abs_s8_body(q, count);
}
int32_t max_abs_s8(const int8_t* q, int64_t count) {
  // Runs of 2^16 codes (in parallel for large buffers: detail::scan_runs); the largest of
  // their maxima.
  constexpr int64_t kRun = int64_t{1} << 16;
  std::vector<int32_t> run_max(static_cast<size_t>((count + kRun - 1) / kRun), 0);
  const bool avx2 = detail::use_avx2();
  detail::scan_runs(count, kRun, [&](int64_t i0, int64_t i1) {
    run_max[static_cast<size_t>(i0 / kRun)] =
        avx2 ? max_abs_s8_avx2(q + i0, i1 - i0) : max_abs_s8_body(q + i0, i1 - i0);
  });
  return *std::max_element(run_max.begin(), run_max.end());
}

// |Σ_k a·b| ≤ K·max|a|·max|b|: reject K where that bound exceeds the int32 accumulator.
void check_accumulator_range(const char* op, int64_t k, int32_t max_a, int32_t max_b) {
  const int64_t per_product = static_cast<int64_t>(max_a) * max_b;
  if (per_product == 0) return;
  NB_CHECK(k <= kInt32Max / per_product,
           op << ": K = " << k << " with max|a| = " << max_a << " and max|b| = " << max_b
              << " can reach |sum| = " << k * per_product
              << " > 2^31 - 1 and overflow the int32 accumulator; split K into chunks of at most "
              << kInt32Max / per_product << " and add the partial results in int64");
}

// Unpacks row-wise packed s4 codes [rows, k] (each row ceil(k/2) bytes, element 2i in the
// low nibble) into int8. An odd row's final high nibble is padding and is never read.
void unpack_s4_rows_into(const uint8_t* packed, int64_t rows, int64_t k, int8_t* out) {
  const int64_t row_bytes = (k + 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* src = packed + r * row_bytes;
    int8_t* dst = out + r * k;
    for (int64_t i = 0; i < k; ++i) {
      const uint8_t byte = src[i / 2];
      dst[i] = static_cast<int8_t>((i % 2 == 0) ? unpack_s4_low(byte) : unpack_s4_high(byte));
    }
  }
}

// c[m, :] = a[m, :] · b[n, :]ᵀ over int8 codes; the caller has checked the int32 range.
void gemm_rows_s8s8(const int8_t* a, const int8_t* b, int64_t m, int64_t n, int64_t k, int32_t* c) {
  parallel_rows(m, m * n * k, [&](int64_t i) {
    const int8_t* a_row = a + i * k;
    for (int64_t j = 0; j < n; ++j) {
      const int8_t* b_row = b + j * k;
      int32_t acc = 0;
      for (int64_t t = 0; t < k; ++t) acc += static_cast<int32_t>(a_row[t]) * b_row[t];
      c[i * n + j] = acc;
    }
  });
}

// Runs one kernel on validated arguments.
void run_kernel(GemmKernel kernel, const int8_t* a, const int8_t* b, int64_t m, int64_t n,
                int64_t k, int32_t* c) {
  switch (kernel) {
    case GemmKernel::loops: gemm_rows_s8s8(a, b, m, n, k, c); return;
    case GemmKernel::blocked: detail::gemm_s8s8_blocked(a, b, m, n, k, c); return;
    case GemmKernel::blocked_avx2: detail::gemm_s8s8_blocked_avx2(a, b, m, n, k, c); return;
    case GemmKernel::blocked_avx512_vnni:
      detail::gemm_s8s8_blocked_avx512_vnni(a, b, m, n, k, c);
      return;
  }
  NB_FAIL("gemm: unknown kernel " << static_cast<int>(kernel));
}

// One row of epilogue_dequant without a zero point: y = float(acc) · (sa · sb) + bias.
// Compiled plainly and for AVX2 (which has no FMA: a multiply, then an add, as written).
NB_ALWAYS_INLINE void dequant_row_body(const int32_t* acc, int64_t n, float sa, const float* sb,
                                       const float* bias, float* y) {
  for (int64_t j = 0; j < n; ++j) y[j] = static_cast<float>(acc[j]) * (sa * sb[j]) + bias[j];
}
NB_TARGET_AVX2 void dequant_row_avx2(const int32_t* acc, int64_t n, float sa, const float* sb,
                                     const float* bias, float* y) {
  dequant_row_body(acc, n, sa, sb, bias, y);
}

void check_kernel_available(GemmKernel kernel) {
  NB_CHECK(gemm_kernel_available(kernel),
           "gemm_s8s8_s32_tn_with: kernel " << gemm_kernel_name(kernel)
                                            << " needs an instruction set this CPU lacks; ask "
                                               "gemm_kernel_available first, or use "
                                               "gemm_default_kernel()");
}

}  // namespace

bool gemm_kernel_available(GemmKernel kernel) {
  switch (kernel) {
    case GemmKernel::loops:
    case GemmKernel::blocked: return true;
    case GemmKernel::blocked_avx2: return detail::cpu_has_avx2();
    case GemmKernel::blocked_avx512_vnni: return detail::cpu_has_avx512_vnni();
  }
  return false;
}

GemmKernel gemm_default_kernel() {
  static const GemmKernel best = detail::cpu_has_avx512_vnni() ? GemmKernel::blocked_avx512_vnni
                                 : detail::cpu_has_avx2()      ? GemmKernel::blocked_avx2
                                                               : GemmKernel::blocked;
  return best;
}

const char* gemm_kernel_name(GemmKernel kernel) {
  switch (kernel) {
    case GemmKernel::loops: return "loops";
    case GemmKernel::blocked: return "blocked";
    case GemmKernel::blocked_avx2: return "blocked_avx2";
    case GemmKernel::blocked_avx512_vnni: return "blocked_avx512_vnni";
  }
  return "unknown";
}

void gemm_s8s8_s32_tn_with(GemmKernel kernel, const int8_t* a, const int8_t* b, int64_t m,
                           int64_t n, int64_t k, int32_t* c) {
  const char* op = "gemm_s8s8_s32_tn";
  check_gemm_args(op, a, b, m, n, k, c);
  check_kernel_available(kernel);
  check_accumulator_range(op, k, max_abs_s8(a, m * k), max_abs_s8(b, n * k));
  run_kernel(kernel, a, b, m, n, k, c);
}

void gemm_s8s8_s32_tn_loops(const int8_t* a, const int8_t* b, int64_t m, int64_t n, int64_t k,
                            int32_t* c) {
  gemm_s8s8_s32_tn_with(GemmKernel::loops, a, b, m, n, k, c);
}

void gemm_s8s8_s32_tn(const int8_t* a, const int8_t* b, int64_t m, int64_t n, int64_t k,
                      int32_t* c) {
  gemm_s8s8_s32_tn_with(gemm_default_kernel(), a, b, m, n, k, c);
}

void gemm_s4s4_s32_tn(const uint8_t* a_packed, const uint8_t* b_packed, int64_t m, int64_t n,
                      int64_t k, int32_t* c) {
  const char* op = "gemm_s4s4_s32_tn";
  check_gemm_args(op, a_packed, b_packed, m, n, k, c);
  // Unpack each operand row once; the int8 product is then the same kernel as s8s8.
  std::vector<int8_t> a(static_cast<size_t>(m * k));
  std::vector<int8_t> b(static_cast<size_t>(n * k));
  unpack_s4_rows_into(a_packed, m, k, a.data());
  unpack_s4_rows_into(b_packed, n, k, b.data());
  check_accumulator_range(op, k, max_abs_s8(a.data(), m * k), max_abs_s8(b.data(), n * k));
  run_kernel(gemm_default_kernel(), a.data(), b.data(), m, n, k, c);
}

void gemm_s8s4_s32_tn(const int8_t* a, const uint8_t* b_packed, int64_t m, int64_t n, int64_t k,
                      int32_t* c) {
  const char* op = "gemm_s8s4_s32_tn";
  check_gemm_args(op, a, b_packed, m, n, k, c);
  std::vector<int8_t> b(static_cast<size_t>(n * k));
  unpack_s4_rows_into(b_packed, n, k, b.data());
  check_accumulator_range(op, k, max_abs_s8(a, m * k), max_abs_s8(b.data(), n * k));
  run_kernel(gemm_default_kernel(), a, b.data(), m, n, k, c);
}

void row_sums_s8(const int8_t* b, int64_t n, int64_t k, int32_t* sums) {
  NB_CHECK(n > 0 && k > 0,
           "row_sums_s8: sizes N = " << n << ", K = " << k << " must both be positive");
  NB_CHECK(b != nullptr && sums != nullptr, "row_sums_s8: null pointer for "
                                                << (b == nullptr ? "b" : "sums")
                                                << "; pass [N, K] codes and an [N] output");
  // |Σ| ≤ 128·K fits int32 for every K below 2^24.
  NB_CHECK(k <= kInt32Max / 128, "row_sums_s8: K = " << k << " exceeds " << kInt32Max / 128
                                                     << "; the int32 row sum could overflow");
  parallel_rows(n, n * k, [&](int64_t j) {
    const int8_t* row = b + j * k;
    int32_t sum = 0;
    for (int64_t t = 0; t < k; ++t) sum += row[t];
    sums[j] = sum;
  });
}

void epilogue_dequant(const int32_t* acc, int64_t m, int64_t n, const DequantEpilogue& epi,
                      float* y) {
  NB_CHECK(m > 0 && n > 0,
           "epilogue_dequant: sizes M = " << m << ", N = " << n << " must both be positive");
  NB_CHECK(acc != nullptr && y != nullptr, "epilogue_dequant: null pointer for "
                                               << (acc == nullptr ? "acc" : "y")
                                               << "; pass [M, N] buffers");
  NB_CHECK((epi.zp_a == nullptr) == (epi.b_sum == nullptr),
           "epilogue_dequant: zp_a is " << (epi.zp_a ? "set" : "null") << " but b_sum is "
                                        << (epi.b_sum ? "set" : "null")
                                        << "; the zero-point correction needs both (b_sum from "
                                           "row_sums_s8 of B's codes) or neither");
  const int64_t n_scale_a = epi.a_per_row ? m : 1;
  const int64_t n_scale_b = epi.b_per_col ? n : 1;
  if (epi.scale_a != nullptr) {
    for (int64_t i = 0; i < n_scale_a; ++i)
      NB_CHECK(std::isfinite(epi.scale_a[i]),
               "epilogue_dequant: scale_a[" << i << "] = " << epi.scale_a[i] << " is not finite");
  }
  if (epi.scale_b != nullptr) {
    for (int64_t j = 0; j < n_scale_b; ++j)
      NB_CHECK(std::isfinite(epi.scale_b[j]),
               "epilogue_dequant: scale_b[" << j << "] = " << epi.scale_b[j] << " is not finite");
  }
  if (epi.bias != nullptr) {
    for (int64_t j = 0; j < n; ++j)
      NB_CHECK(std::isfinite(epi.bias[j]),
               "epilogue_dequant: bias[" << j << "] = " << epi.bias[j] << " is not finite");
  }
  if (epi.zp_a == nullptr) {
    // No zero point: the correction is 0, and int32 -> fp32 rounds acc as int64 -> fp32
    // would. scale_b and bias expanded to [N] (1 and 0 where absent: the same fp32 values
    // the general loop uses), so that the row loop has no branches and vectorizes.
    std::vector<float> sb(static_cast<size_t>(n)), bias(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) {
      sb[static_cast<size_t>(j)] = epi.scale_b ? epi.scale_b[epi.b_per_col ? j : 0] : 1.0f;
      bias[static_cast<size_t>(j)] = epi.bias ? epi.bias[j] : 0.0f;
    }
    const bool avx2 = detail::use_avx2();
    parallel_rows(m, m * n, [&](int64_t i) {
      const float sa = epi.scale_a ? epi.scale_a[epi.a_per_row ? i : 0] : 1.0f;
      if (avx2) dequant_row_avx2(acc + i * n, n, sa, sb.data(), bias.data(), y + i * n);
      else dequant_row_body(acc + i * n, n, sa, sb.data(), bias.data(), y + i * n);
    });
    return;
  }
  parallel_rows(m, m * n, [&](int64_t i) {
    const float sa = epi.scale_a ? epi.scale_a[epi.a_per_row ? i : 0] : 1.0f;
    const int64_t zp = epi.zp_a ? epi.zp_a[i] : 0;
    for (int64_t j = 0; j < n; ++j) {
      const float sb = epi.scale_b ? epi.scale_b[epi.b_per_col ? j : 0] : 1.0f;
      const int64_t b_sum = epi.b_sum ? epi.b_sum[j] : 0;
      // y = float(acc − zp_a·b_sum) · (scale_a · scale_b) + bias; the correction is exact
      // in int64 (it can leave the int32 range) and rounds to fp32 once.
      const int64_t corrected = static_cast<int64_t>(acc[i * n + j]) - zp * b_sum;
      const float scale = sa * sb;
      const float bias = epi.bias ? epi.bias[j] : 0.0f;
      y[i * n + j] = static_cast<float>(corrected) * scale + bias;
    }
  });
}

}  // namespace nibble::ref
