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
//   pingpong_64x64_c2x1 when M ≤ 128; pingpong_64x128_c2x1 when 128 < M ≤ 256;
//   pingpong_128x128_c1x2 when N ≤ 1024 and K ≥ 3072, or 1024 < M < N;
//   pingpong_128x128_c2x1 otherwise.
// Why (H200 sweep of 2026-12-03, interleaved timer, % of cuBLASLt INT8; bench/README.md): the
// ping-pong 128×128 tile beat the cooperative 128×256 tile on every shape, e.g. 16384×4096×4096
// 99.4% vs 90.5%, 16384×11008×4096 98.3% vs 91.7%, 8192³ 96.5% vs 94.9%, K = 768: 117-124% vs
// 103-114%. The 1×2 cluster won at 16384×768×3072 (106.0% vs 99.4%), 16384×1024×4096 (106.6%
// vs 96.9%) and M = 128 (87.7% vs 82.8%; since 2026-12-04 the 64-row tiles take M ≤ 256,
// gemm_sm90_host.cpp) and tied or lost elsewhere at M = 16384. The second
// sweep, over the paper's shapes and every layer's dx/dw GEMMs, found 1×2 ahead on every
// product with 1024 < M < N (1-5%; 8704×10752×15360, the largest paper dw: 102.8% vs 88.8%),
// 2×1 ahead or tied at M ≥ N and at M ≤ 1024 (1024×4096×16384: 103.6% vs 95.2%). (The H100
// sweep of run 1 had ping-pong 2×1 at 85% of cuBLASLt at 8192³ with sequential timing; bench
// gemm times every compiled tile forced, so each device run re-checks the rule.)
GemmTile choose_tile(const GemmS8S8Params& p);
// The fewest SMs (a multiple of the cluster size) on which the persistent kernel of the
// configuration p runs in as many tile rounds as on all `sms` SMs, i.e.
// ceil(tiles / ceil(tiles / sms)) rounded up to the cluster: the cap for GemmS8S8Params::max_sms
// that frees SMs for a concurrent kernel without lengthening the GEMM (16384×4096 output,
// 128×128 tiles: 4096 tiles take 32 rounds on 132 SMs and on 128, so 4 SMs are free).
int same_round_sms(const GemmS8S8Params& p, int sms);
// The configuration's name in reports, e.g. "coop_128x256x128_c2x1".
const char* tile_name(GemmTile tile);

}  // namespace nibble::cuda::sm90
