#pragma once
// Internal to the CPU backend: the register-blocked integer GEMM kernels behind
// ref::gemm_s8s8_s32_tn (gemm.cpp validates and dispatches, gemm_blocked.cpp holds them).
// Contract of every function: C[M, N] = A[M, K] · B[N, K]ᵀ over int8 codes, arguments
// already validated (sizes > 0, |every partial sum| ≤ 2^31 − 1), result bit-identical to
// the plain loops.
#include <cstdint>

#include "ref/simd.h"  // cpu_has_avx2, cpu_has_avx512_vnni

namespace nibble::ref::detail {

void gemm_s8s8_blocked(const int8_t* a, const int8_t* b, int64_t m, int64_t n, int64_t k,
                       int32_t* c);
// Call only when cpu_has_avx2() (resp. cpu_has_avx512_vnni()) is true.
void gemm_s8s8_blocked_avx2(const int8_t* a, const int8_t* b, int64_t m, int64_t n, int64_t k,
                            int32_t* c);
void gemm_s8s8_blocked_avx512_vnni(const int8_t* a, const int8_t* b, int64_t m, int64_t n,
                                   int64_t k, int32_t* c);

}  // namespace nibble::ref::detail
