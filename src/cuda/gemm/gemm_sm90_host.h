#pragma once
// Host-side halves of the sm_90a INT8 GEMM launchers, shared by the .cu files that hold the
// kernel instantiations: argument checks, and the name of the tile configuration.
#include <cstdint>

#include "cuda/gemm/gemm_params.h"

namespace nibble::cuda::sm90 {

// Checks every precondition listed in gemm_s8s8_s32_tn_sm90.h; throws nibble::Error naming the
// broken one. `fn` names the launcher in messages; out_bytes is sizeof(output element).
void check_gemm_params(const char* fn, const GemmS8S8Params& p, const void* out, int out_bytes);
void check_epilogue(const char* fn, const EpiDequantBias& epi);

// The tile configuration the launchers compile and run, for every shape (bench/README.md has
// the sweep that chose it, and the shapes where another config measured faster).
inline constexpr const char* kTileConfigName = "coop_128x256x128_c2x1";

}  // namespace nibble::cuda::sm90
