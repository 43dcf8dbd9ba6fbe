// INT8 tensor-core GEMM for Hopper with the fused dequantizing epilogue (EpiDequantBias,
// gemm_params.h), f32 output (the layer's dx and dw GEMMs): launcher. Built for sm_90a only;
// see CMakeLists.txt and gemm_s8s8_sm90_dequant.cuh.
#include "cuda/gemm/gemm_s8s8_s32_tn_sm90.h"
#include "cuda/gemm/gemm_s8s8_sm90_dequant.cuh"

namespace nibble::cuda {

void gemm_s8s8_s32_tn_dequant_sm90(const GemmS8S8Params& p, const EpiDequantBias& epi, float* y,
                                   cudaStream_t stream) {
  sm90::dequant_detail::run_dequant("gemm_s8s8_s32_tn_dequant_sm90 (f32)", p, epi, y, stream);
}

}  // namespace nibble::cuda
