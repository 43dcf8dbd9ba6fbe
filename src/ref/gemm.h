#pragma once
// Integer GEMMs (CPU reference) in the TN form C[M, N] = A[M, K] · B[N, K]ᵀ: both operands
// K-contiguous, int32 accumulation (exact: inputs are validated so |Σ| < 2^31).
// s4 operands are packed row-wise: row r of A occupies ceil(K/2) bytes (formats.md).
// M, N, K must be positive (skip the call when a dimension is 0). The int32 check uses the
// actual codes: K·max|a|·max|b| ≤ 2^31 − 1, else nibble::Error (split K, add in int64).
#include <cstdint>

namespace nibble::ref {

void gemm_s8s8_s32_tn(const int8_t* a, const int8_t* b, int64_t m, int64_t n, int64_t k,
                      int32_t* c);
void gemm_s4s4_s32_tn(const uint8_t* a_packed, const uint8_t* b_packed, int64_t m, int64_t n,
                      int64_t k, int32_t* c);
// A is s8 (e.g. a bit-split gradient in [-90, 90]), B is packed s4.
void gemm_s8s4_s32_tn(const int8_t* a, const uint8_t* b_packed, int64_t m, int64_t n,
                      int64_t k, int32_t* c);

// ---- kernels ---------------------------------------------------------------------------
// The GEMMs above run the fastest kernel this CPU supports (chosen once, at run time; the
// build never assumes an instruction set). Every kernel returns the plain loops' int32
// results bit for bit: integer sums are exact in any order, because the accumulator check
// bounds every partial sum too. Selectable here for tests and benchmarks.
enum class GemmKernel : uint8_t {
  loops,                // the plain triple loop: the readable oracle
  blocked,              // 4×16 register tiles over int16-widened panels, portable C++
  blocked_avx2,         // 4×16 tiles with AVX2 vpmaddwd on int16 pairs (CPUs with AVX2)
  blocked_avx512_vnni,  // 4×32 tiles with AVX-512 VNNI vpdpbusd on bytes: A is offset by
                        // +128 to make it unsigned and 128·Σ_k b[n, k] is subtracted after,
                        // exact modulo 2^32, and the true result fits int32
};
bool gemm_kernel_available(GemmKernel kernel);
GemmKernel gemm_default_kernel();  // what gemm_s8s8_s32_tn and the s4 variants use
const char* gemm_kernel_name(GemmKernel kernel);
// gemm_s8s8_s32_tn with a chosen kernel (same checks); throws if this CPU lacks it.
void gemm_s8s8_s32_tn_with(GemmKernel kernel, const int8_t* a, const int8_t* b, int64_t m,
                           int64_t n, int64_t k, int32_t* c);
// The plain loops: gemm_s8s8_s32_tn_with(GemmKernel::loops, ...).
void gemm_s8s8_s32_tn_loops(const int8_t* a, const int8_t* b, int64_t m, int64_t n, int64_t k,
                            int32_t* c);

// Σ_k b[n, k] for each row of an int8 B[N, K]: the zero-point correction term.
void row_sums_s8(const int8_t* b, int64_t n, int64_t k, int32_t* sums);

// Dequantizing epilogue on int32 accumulators acc[M, N]:
//   y[m,n] = float(acc[m,n] − zp_a[m]·b_sum[n]) · (scale_a[m or 0] · scale_b[n or 0]) + bias[n]
// Each pointer may be null (scale -> 1, zp -> 0, bias -> 0); a_per_row / b_per_col choose
// whether scale_a is indexed by m or is a single value (scale_b likewise by n).
// The integer zero-point correction is exact in int64 before the float conversion.
struct DequantEpilogue {
  const float* scale_a = nullptr;
  bool a_per_row = false;
  const float* scale_b = nullptr;
  bool b_per_col = false;
  const float* bias = nullptr;        // [N]
  const int32_t* zp_a = nullptr;      // [M] asymmetric activation zero points
  const int32_t* b_sum = nullptr;     // [N] row sums of B's codes (row_sums_s8)
};
void epilogue_dequant(const int32_t* acc, int64_t m, int64_t n, const DequantEpilogue& epi,
                      float* y);

}  // namespace nibble::ref
