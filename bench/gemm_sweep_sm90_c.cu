// Sweep configs, part 3: shallower K tiles (64 bytes: more pipeline stages in the same shared
// memory) for the two shipped cooperative tiles, and a ping-pong 128×128 with a 2×2 cluster.
// Added for the H200 (2026-12-03), where the shipped 128×256×128 tiles measured 87-89% of
// cuBLASLt INT8 at 16384×4096×4096 and 16384×11008×4096 and cuBLASLt chose a 128×128 tile.
#include "bench/gemm_sweep_sm90_configs.cuh"

namespace nibble::bench {
namespace {
using namespace cuda::sm90;
template <int kM, int kN, int kClusterM, int kClusterN>
using CooperativeK64 = TileConfig<kM, kN, 64, kClusterM, kClusterN,
                                  cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                  cutlass::epilogue::TmaWarpSpecializedCooperative>;
const SweepRegistrar r1("coop_128x256x64_c2x1", run_config<CooperativeK64<128, 256, 2, 1>>);
const SweepRegistrar r2("coop_128x256x64_c1x2", run_config<CooperativeK64<128, 256, 1, 2>>);
const SweepRegistrar r3("pingpong_128x128x128_c2x2", run_config<PingpongConfig<128, 128, 2, 2>>);
}  // namespace
}  // namespace nibble::bench
