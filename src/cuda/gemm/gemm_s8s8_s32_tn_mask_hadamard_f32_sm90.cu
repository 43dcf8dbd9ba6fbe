// INT8 tensor-core GEMM for Hopper with the HQ backward's dx epilogue (EpiMaskHadamard), f32
// output: launcher. Built for sm_90a only; see gemm_s8s8_s32_tn_mask_hadamard_sm90.cu.
#include "cuda/gemm/gemm_s8s8_s32_tn_sm90.h"
#include "cuda/gemm/gemm_s8s8_sm90_mask_hadamard.cuh"

namespace nibble::cuda {

void gemm_s8s8_s32_tn_mask_hadamard_sm90(const GemmS8S8Params& p, const EpiMaskHadamard& epi,
                                         float* y, cudaStream_t stream) {
  sm90::run_mask_hadamard("gemm_s8s8_s32_tn_mask_hadamard_sm90 (f32)", p, epi, y, stream);
}

}  // namespace nibble::cuda
