#pragma once
// INT8 tensor-core GEMMs for Hopper (sm_90a, wgmma through CUTLASS 3.x collectives).
//   gemm_s8s8_s32_tn_sm90:          c[m, n] = Σ_k a[m, k] · b[n, k]               (int32, exact)
//   gemm_s8s8_s32_tn_dequant_sm90:  y[m, n] = float(acc[m, n]) · (sa · sb) + bias[n] (bf16 / f32)
//   gemm_s8s8_s32_tn_mask_hadamard_sm90: the HQ backward's dx epilogue (EpiMaskHadamard)
// All pointers are device pointers; work is queued on `stream` (no synchronization).
// Requirements, each checked and reported as nibble::Error: a device of compute capability 9.0;
// K % 16 == 0; N·sizeof(output) % 16 == 0 (N % 4 for s32/f32, N % 8 for bf16); A, B and the
// output 16-byte aligned. |Σ| must fit int32, which holds for |a|,|b| ≤ 128 whenever K ≤ 131072.
// M = 0 or N = 0 queue nothing; K = 0 writes acc = 0 (i.e. y = bias).
// Scratch memory comes from nibble::cuda::workspace (cached per device and stream).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/gemm/gemm_params.h"
#include "nibble/dtype.h"

namespace nibble::cuda {

// c: [M, N] s32, row-major.
void gemm_s8s8_s32_tn_sm90(const GemmS8S8Params& p, int32_t* c, cudaStream_t stream);

// y: [M, N] row-major, bf16 (round to nearest even) or f32.
void gemm_s8s8_s32_tn_dequant_sm90(const GemmS8S8Params& p, const EpiDequantBias& epi,
                                   bf16_t* y, cudaStream_t stream);
void gemm_s8s8_s32_tn_dequant_sm90(const GemmS8S8Params& p, const EpiDequantBias& epi,
                                   float* y, cudaStream_t stream);

// y: [M, N] row-major, bf16 or f32: EpiMaskHadamard's y; epi.partials gets
// gemm_s8s8_mask_hadamard_partials(p) fp64 slots (every one written). M, N, K > 0.
void gemm_s8s8_s32_tn_mask_hadamard_sm90(const GemmS8S8Params& p, const EpiMaskHadamard& epi,
                                         bf16_t* y, cudaStream_t stream);
void gemm_s8s8_s32_tn_mask_hadamard_sm90(const GemmS8S8Params& p, const EpiMaskHadamard& epi,
                                         float* y, cudaStream_t stream);
// The number of partial-sum slots a call with these params writes (it depends on the tile
// configuration choose_tile picks for the shape).
int64_t gemm_s8s8_mask_hadamard_partials(const GemmS8S8Params& p);

// True when the CUTLASS sm_90a kernels were compiled into this build (CMake found the
// CUTLASS headers); the launchers above throw otherwise.
bool gemm_sm90_available();

}  // namespace nibble::cuda
