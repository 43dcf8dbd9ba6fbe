// Sweep configs, part 4: 64-row ping-pong tiles for small M (2026-12-04). At M = 128 the
// shipped 128×128 tiles give 32 CTAs for 132 SMs (128×4096 output), and the GEMM measured
// 71% of cuBLASLt INT8 there; 64-row tiles double (64×128) or quadruple (64×64) the CTAs.
#include "bench/gemm_sweep_sm90_configs.cuh"

namespace nibble::bench {
namespace {
using namespace cuda::sm90;
const SweepRegistrar r1("pingpong_64x128x128_c2x1", run_config<PingpongConfig<64, 128, 2, 1>>);
const SweepRegistrar r2("pingpong_64x64x128_c2x1", run_config<PingpongConfig<64, 64, 2, 1>>);
const SweepRegistrar r3("pingpong_64x128x128_c1x2", run_config<PingpongConfig<64, 128, 1, 2>>);
}  // namespace
}  // namespace nibble::bench
