#pragma once
// cuBLASLt GEMMs that nibble's own kernels are measured and checked against, all in the same
// TN form as the INT8 GEMM: C[M, N] = A[M, K] · B[N, K]ᵀ, row-major, A and B K-contiguous.
//   cublaslt_gemm_bf16_tn       bf16 × bf16 → bf16, fp32 accumulation
//   cublaslt_gemm_s8s8_s32_tn   s8 × s8 → s32 (exact)
//   cublaslt_gemm_e4m3_bf16_tn  fp8 e4m3 × e4m3 → bf16, unit scales, fp32 accumulation with
//                               cuBLASLt's fast-accumulation mode (what FP8 training uses in
//                               the forward pass; the speed competitor of design.md)
// Each call finds (once per shape and device, then cached) cuBLASLt's heuristic first choice
// with a 64 MiB workspace, which comes from nibble::cuda::workspace. All pointers are device
// pointers; the work is queued on `stream`. Errors throw nibble::Error.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "nibble/dtype.h"

namespace nibble::cuda {

inline constexpr size_t kCublasLtWorkspaceBytes = size_t{64} << 20;

void cublaslt_gemm_bf16_tn(const bf16_t* a, const bf16_t* b, int64_t m, int64_t n, int64_t k,
                           bf16_t* c, cudaStream_t stream);
void cublaslt_gemm_s8s8_s32_tn(const int8_t* a, const int8_t* b, int64_t m, int64_t n, int64_t k,
                               int32_t* c, cudaStream_t stream);
// a, b: fp8 e4m3 bytes (__nv_fp8_e4m3 storage).
void cublaslt_gemm_e4m3_bf16_tn(const uint8_t* a, const uint8_t* b, int64_t m, int64_t n,
                                int64_t k, bf16_t* c, cudaStream_t stream);

enum class CublasLtKind { bf16, s8s8_s32, e4m3_bf16 };
const char* cublaslt_kind_name(CublasLtKind kind);  // "bf16", "s8s8_s32", "e4m3_bf16"

// The algorithm cuBLASLt chose for this kind and shape (planning it if needed), as
// "algo=.. tile=.. stages=.. splitk=.. cluster=.." for benchmark reports.
std::string cublaslt_algo_description(CublasLtKind kind, int64_t m, int64_t n, int64_t k);

}  // namespace nibble::cuda
