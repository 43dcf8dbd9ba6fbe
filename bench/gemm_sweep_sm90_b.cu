// Sweep configs, part 2: ping-pong schedules, stream-K, and a small tile for small M·N.
#include "bench/gemm_sweep_sm90_configs.cuh"

namespace nibble::bench {
namespace {
using namespace cuda::sm90;
const SweepRegistrar r1("pingpong_128x128x128_c1x2", run_config<PingpongConfig<128, 128, 1, 2>>);
const SweepRegistrar r2("pingpong_128x128x128_c2x1", run_config<PingpongConfig<128, 128, 2, 1>>);
const SweepRegistrar r3("coop_128x256x128_c2x1_streamk",
                        run_config<CooperativeConfig<128, 256, 2, 1, cutlass::gemm::StreamKScheduler>>,
                        true);
const SweepRegistrar r5("coop_128x128x128_c1x1_streamk",
                        run_config<CooperativeConfig<128, 128, 1, 1, cutlass::gemm::StreamKScheduler>>,
                        true);
const SweepRegistrar r4("coop_128x128x128_c1x1", run_config<CooperativeConfig<128, 128, 1, 1>>);
}  // namespace
}  // namespace nibble::bench
