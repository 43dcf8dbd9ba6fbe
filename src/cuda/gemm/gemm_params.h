#pragma once
// Parameter structs of the integer GEMM launchers (habit 8: filled and validated once).
// The GEMM is always TN: C[M, N] = A[M, K] · B[N, K]ᵀ, both operands K-contiguous, as the
// forward y = x·wᵀ is naturally, and as dx/dw become once the quantizers emit transposed
// codes (algorithms.md §F.3). Storage is s8: INT4 values ([-8, 7]) and bit-split operands
// ([-90, 90]) are fed to INT8 tensor cores on Hopper, which has no 4-bit MMA (§F.1).
#include <cstdint>

namespace nibble::cuda {

// Which compiled tile configuration of the sm_90a INT8 GEMM runs a call. `automatic` lets the
// launcher choose by shape (sm90::choose_tile, gemm_sm90_host.cpp: a rule read off measured
// sweeps, bench/README.md "Tile dispatch"); the others force one, for benchmarks and tests.
// Every configuration computes the same int32 sums and the same epilogue per element, so the
// choice changes speed only, never a result bit.
enum class GemmTile : uint8_t {
  automatic,
  // 128×128×128 tile, two consumer warpgroups on two tiles in turn (one's epilogue under the
  // other's MMAs), 2×1 cluster: B's tile multicast to 2 CTAs along M
  pingpong_128x128_c2x1,
  pingpong_128x128_c1x2,  // the same, 1×2 cluster: A's tile multicast to 2 CTAs along N
  // 128×256×128 tile, both consumer warpgroups on one tile, 2×1 cluster (the H100 choice of
  // run 1; kept as a forced option for devices where it wins, see bench/README.md)
  coop_128x256_c2x1,
  // 64-row ping-pong tiles for small M (one 64-row wgmma per tile), 2×1 cluster: at M ≤ 256
  // the 128-row tiles leave most SMs idle (M = 128, N = 4096: 32 tiles for 132 SMs)
  pingpong_64x64_c2x1,
  pingpong_64x128_c2x1,
};
// Output tile and cluster of a configuration (not of automatic). The one table of these shapes:
// the sm_90a launchers static_assert their CUTLASS configurations against it
// (with_tile_config), and sm90::same_round_sms counts tiles with it.
struct GemmTileShape {
  int m, n, cluster_m, cluster_n;
};
constexpr GemmTileShape gemm_tile_shape(GemmTile tile) {
  switch (tile) {
    case GemmTile::pingpong_128x128_c1x2: return {128, 128, 1, 2};
    case GemmTile::coop_128x256_c2x1: return {128, 256, 2, 1};
    case GemmTile::pingpong_64x64_c2x1: return {64, 64, 2, 1};
    case GemmTile::pingpong_64x128_c2x1: return {64, 128, 2, 1};
    case GemmTile::automatic:
    case GemmTile::pingpong_128x128_c2x1: break;
  }
  return {128, 128, 2, 1};
}
// Every configuration the launchers compile (tests force each; bench gemm times each).
inline constexpr GemmTile kCompiledGemmTiles[] = {
    GemmTile::pingpong_128x128_c2x1, GemmTile::pingpong_128x128_c1x2,
    GemmTile::coop_128x256_c2x1, GemmTile::pingpong_64x64_c2x1, GemmTile::pingpong_64x128_c2x1};

struct GemmS8S8Params {
  const int8_t* a = nullptr;  // A: [M, K] s8, row-major (K contiguous), 16-byte aligned base
  const int8_t* b = nullptr;  // B: [N, K] s8, row-major (K contiguous), 16-byte aligned base
  int64_t m = 0;              // rows of A and of the output; M = 0 is a no-op
  int64_t n = 0;              // rows of B = columns of the output; N·sizeof(out) % 16 == 0
  int64_t k = 0;              // K % 16 == 0 (16-byte rows for the tensor-memory copies)
  GemmTile tile = GemmTile::automatic;
  // The sm_90a kernels are persistent: one CTA per SM walks the output tiles. max_sms > 0
  // caps that grid at max_sms SMs (rounded down to the cluster size, at least one cluster)
  // so that a kernel queued beside the GEMM on another stream finds SMs free
  // (sm90::same_round_sms picks a cap that costs no tile round). 0 = every SM. The result
  // never depends on it; the mma_sm80 kernels ignore it.
  int max_sms = 0;
};

// EpiDequantBias — the fused dequantizing epilogue, applied to the int32 accumulators:
//   y[m, n] = float(acc[m, n]) · (scale_a[m or 0] · scale_b[n or 0]) + bias[n]
// The same formula as nibble::ref::epilogue_dequant without zero points (src/ref/gemm.h).
// A null scale counts as 1, a null bias as 0. a_per_row / b_per_col choose whether a scale
// is a vector (indexed by m / n) or a single value (read from element 0).
struct EpiDequantBias {
  const float* scale_a = nullptr;  // [M] (a_per_row) or [1]: per-token activation scale
  bool a_per_row = true;
  const float* scale_b = nullptr;  // [N] (b_per_col) or [1]: per-output-channel weight scale
  bool b_per_col = true;
  const float* bias = nullptr;     // [N] or null
};

// EpiMaskHadamard — the dx and dw epilogue of the HQ linear backward: the fused form of the
// layer's separate mask pass (linear_detail::lsq_mask_hadamard) applied to the accumulators
// in registers, for Hadamard blocks B in {1, 2, 4, ..., 32} (one epilogue subtile is 32
// columns wide, so a block never straddles two):
//   g[m, n]  = float(acc[m, n]) · (scale_a[0] · scale_b[0])
//   y[m, n]  = norm · Σ_j H_B[n mod B, j] · (e[m, n0 + j] == −8 ? 0 : g[m, n0 + j]),
//              n0 = n − n mod B, norm = float(1 / sqrt(B)), H_B the Sylvester Hadamard matrix
//   partials[i] = Σ acc[m, n] · w[m, n] over the elements of warp slot i (int64, exact),
//              w = e, or 14·q where e == −8 (14·δ̃; docs/formats.md, "LSQ step sums")
// e and q are the nibbles of e_packed and q_packed [M, N/2] (column n in nibble n % 2 of byte
// n / 2, low nibble first). The butterfly runs the reference's stages h = 1, 2, ..., B/2 with
// the same fp32 additions, so y is bit for bit the separate pass's result.
inline constexpr int kEpiMaskMaxBlock = 32;
inline constexpr int kEpiClippedNibble = -8;    // the side channel's "clipped" code
inline constexpr int kEpiResidualSteps = 14;    // δ̃ = e / 14
struct EpiMaskHadamard {
  const float* scale_a = nullptr;     // [1]: the bit-split scale s
  const float* scale_b = nullptr;     // [1]: the weight step sw
  const uint8_t* q_packed = nullptr;  // [M, N/2]: LSQ codes of the forward input
  const uint8_t* e_packed = nullptr;  // [M, N/2]: their side-channel nibbles
  int block = 32;                     // Hadamard block B
  int64_t* partials = nullptr;        // [gemm_s8s8_mask_hadamard_partials(p)]
};

}  // namespace nibble::cuda
