// INT8 tensor-core GEMM for Hopper with the HQ backward's dx epilogue (EpiMaskHadamard,
// gemm_params.h; the node in gemm_s8s8_sm90_mask_hadamard.cuh), bf16 output, and the slot
// count of its partial sums. Built for sm_90a only; the f32 output launcher is
// gemm_s8s8_s32_tn_mask_hadamard_f32_sm90.cu (one file per output type, as the dequant ones).
#include <cstdint>

#include "cuda/gemm/gemm_s8s8_s32_tn_sm90.h"
#include "cuda/gemm/gemm_s8s8_sm90_mask_hadamard.cuh"
#include "nibble/error.h"

namespace nibble::cuda {

namespace sm90 {

void check_mask_hadamard(const char* fn, const GemmS8S8Params& p, const EpiMaskHadamard& epi) {
  NB_CHECK(p.m > 0 && p.n > 0 && p.k > 0,
           fn << ": M=" << p.m << ", N=" << p.n << ", K=" << p.k << " must all be positive");
  NB_CHECK(p.tile == GemmTile::automatic || p.tile == GemmTile::pingpong_128x128_c2x1 ||
               p.tile == GemmTile::pingpong_128x128_c1x2,
           fn << ": tile " << tile_name(p.tile) << " is not compiled with this epilogue; it has "
                 "one tile, 128×128 ping-pong (clusters 2×1 and 1×2): pass GemmTile::automatic "
                 "or one of those");
  const int b = epi.block;
  NB_CHECK(b >= 1 && b <= kEpiMaskMaxBlock && (b & (b - 1)) == 0 && p.n % b == 0,
           fn << ": Hadamard block " << b << " must be a power of two in [1, " << kEpiMaskMaxBlock
              << "] dividing N=" << p.n << " (one epilogue subtile is " << kEpiMaskMaxBlock
              << " columns); larger blocks take the separate mask pass");
  NB_CHECK(epi.scale_a != nullptr && epi.scale_b != nullptr && epi.q_packed != nullptr &&
               epi.e_packed != nullptr && epi.partials != nullptr,
           fn << ": scale_a, scale_b, q_packed, e_packed and partials must all be set");
  const auto aligned4 = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 4 == 0; };
  NB_CHECK(aligned4(epi.q_packed) && aligned4(epi.e_packed) && aligned4(epi.scale_a) &&
               aligned4(epi.scale_b),
           fn << ": q_packed, e_packed, scale_a and scale_b must be 4-byte aligned (the "
                 "epilogue reads the packed codes as 32-bit words)");
  // the epilogue indexes the packed codes with 32-bit offsets (registers are scarce there)
  NB_CHECK(p.m * (p.n / 2) + 256 * p.n < (int64_t{1} << 31),
           fn << ": M·N/2 = " << p.m * (p.n / 2)
              << " packed bytes exceed this epilogue's 32-bit offsets (2^31); split the GEMM "
                 "along M");
}

}  // namespace sm90

void gemm_s8s8_s32_tn_mask_hadamard_sm90(const GemmS8S8Params& p, const EpiMaskHadamard& epi,
                                         bf16_t* y, cudaStream_t stream) {
  static_assert(sizeof(bf16_t) == sizeof(cutlass::bfloat16_t));
  sm90::run_mask_hadamard("gemm_s8s8_s32_tn_mask_hadamard_sm90 (bf16)", p, epi,
                          reinterpret_cast<cutlass::bfloat16_t*>(y), stream);
}

int64_t gemm_s8s8_mask_hadamard_partials(const GemmS8S8Params& p) {
  NB_CHECK(p.m > 0 && p.n > 0, "gemm_s8s8_mask_hadamard_partials: M=" << p.m << ", N=" << p.n
                                   << " must be positive");
  return sm90::mask_hadamard_slots<sm90::PingpongConfig<128, 128, 2, 1>>(p.m, p.n);
}

}  // namespace nibble::cuda
