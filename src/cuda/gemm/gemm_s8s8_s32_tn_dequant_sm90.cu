// INT8 tensor-core GEMM for Hopper with the fused dequantizing epilogue (EpiDequantBias,
// gemm_params.h), bf16 output: launcher. Built for sm_90a only; see CMakeLists.txt. The f32
// output launcher is gemm_s8s8_s32_tn_dequant_f32_sm90.cu.
#include "cuda/gemm/gemm_s8s8_s32_tn_sm90.h"
#include "cuda/gemm/gemm_s8s8_sm90_dequant.cuh"

namespace nibble::cuda {

void gemm_s8s8_s32_tn_dequant_sm90(const GemmS8S8Params& p, const EpiDequantBias& epi, bf16_t* y,
                                   cudaStream_t stream) {
  // bf16_t and cutlass::bfloat16_t are both one uint16_t of bfloat16 bits.
  static_assert(sizeof(bf16_t) == sizeof(cutlass::bfloat16_t));
  sm90::dequant_detail::run_dequant("gemm_s8s8_s32_tn_dequant_sm90 (bf16)", p, epi,
                                    reinterpret_cast<cutlass::bfloat16_t*>(y), stream);
}

}  // namespace nibble::cuda
