#pragma once
// Which integer GEMM kernel family runs a call, for callers (the HQ linear layer) that must
// work on Hopper and on Ampere/Ada alike:
//   wgmma_sm90  the CUTLASS sm_90a INT8 GEMM (gemm_s8s8_s32_tn_sm90.h): compute capability 9.0
//               only, and only in builds that found CUTLASS (gemm_sm90_available());
//   mma_sm80    the hand-written mma.sync GEMMs (gemm_s4s4_s32_tn_sm80.h), s4 and s8: any
//               compute capability ≥ 8.0 (on 9.0 s4 is emulated, s8 native; for tests there);
//   automatic   wgmma_sm90 on compute capability 9.0 when gemm_sm90_available(), else
//               mma_sm80 on ≥ 8.0, else nibble::Error.
// Both families compute the same exact int32 sums and the same fp32 epilogue
// fma(float(acc), sa·sb, bias) (docs/gemm_sm80.md), so the path changes speed, never a bit.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/gemm/gemm_params.h"
#include "cuda/gemm/gemm_s4s4_s32_tn_sm80.h"
#include "nibble/dtype.h"

namespace nibble::cuda {

enum class GemmPath : uint8_t { automatic, wgmma_sm90, mma_sm80 };

// "automatic", "wgmma_sm90", "mma_sm80".
const char* gemm_path_name(GemmPath path);

// The concrete path a call with `requested` takes on the current device: automatic resolved
// as above (throws nibble::Error below compute capability 8.0); a forced path is returned as
// given (its launchers check the device themselves).
GemmPath resolve_gemm_path(GemmPath requested);

// c = A·Bᵀ (int32, exact) on s8 operands, through the path's launcher (gemm_s8s8_s32_tn_sm90
// or gemm_s8s8_s32_tn_sm80).
void gemm_s8s8_s32_tn(const GemmS8S8Params& p, int32_t* c, GemmPath path, cudaStream_t stream);
// y = fma(float(A·Bᵀ), sa·sb, bias) on s8 operands, through the path's launcher
// (gemm_s8s8_s32_tn_dequant_sm90 or gemm_s8s8_s32_tn_dequant_sm80; their rules apply).
void gemm_s8s8_s32_tn_dequant(const GemmS8S8Params& p, const EpiDequantBias& epi, float* y,
                              GemmPath path, cudaStream_t stream);
void gemm_s8s8_s32_tn_dequant(const GemmS8S8Params& p, const EpiDequantBias& epi, bf16_t* y,
                              GemmPath path, cudaStream_t stream);

// The same on packed s4 operands: always gemm_s4s4_s32_tn_dequant_sm80 (automatic and mma_sm80).
// Hopper has no s4 tensor cores and wgmma_sm90 has no s4 kernel: forcing it throws; callers
// feed s8 codes to gemm_s8s8_s32_tn_dequant there.
void gemm_s4s4_s32_tn_dequant(const GemmS4S4Params& p, const EpiDequantBias& epi, float* y,
                              GemmPath path, cudaStream_t stream);
void gemm_s4s4_s32_tn_dequant(const GemmS4S4Params& p, const EpiDequantBias& epi, bf16_t* y,
                              GemmPath path, cudaStream_t stream);

}  // namespace nibble::cuda
