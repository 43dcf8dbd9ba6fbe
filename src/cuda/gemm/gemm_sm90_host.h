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

// The configuration a call runs: p.tile, or for GemmTile::automatic the shape rule below.
//   coop_128x256_c1x2 when N/256 is even, M > N ≥ 4096 and K ≥ 4096; coop_128x256_c2x1 otherwise.
// Why: in the run-1 sweep (bench/README.md) the 1×2 cluster measured 102% / 101% of cuBLASLt INT8
// at 16384×4096×4096 / 16384×4096×11008 against 92% / 96% for 2×1, and lost wherever N/256 is
// odd (N = 768: 73%; N = 11008: 95% vs 99%), because a 1×2 cluster needs pairs of N tiles, and
// at 8192³ (100% vs 107%). The rule is deliberately narrow: it changes only shapes like those.
GemmTile choose_tile(const GemmS8S8Params& p);
// The configuration's name in reports, e.g. "coop_128x256x128_c2x1".
const char* tile_name(GemmTile tile);

}  // namespace nibble::cuda::sm90
