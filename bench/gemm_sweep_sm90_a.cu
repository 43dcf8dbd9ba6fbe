// Sweep configs, part 1: cooperative 128×256 / 256×128 tiles with 2-CTA clusters.
#include "bench/gemm_sweep_sm90_configs.cuh"

namespace nibble::bench {
namespace {
using namespace cuda::sm90;
const SweepRegistrar r1("coop_128x256x128_c2x1", run_config<CooperativeConfig<128, 256, 2, 1>>);
const SweepRegistrar r2("coop_128x256x128_c1x2", run_config<CooperativeConfig<128, 256, 1, 2>>);
const SweepRegistrar r3("coop_256x128x128_c1x2", run_config<CooperativeConfig<256, 128, 1, 2>>);
const SweepRegistrar r4("coop_256x128x128_c2x1", run_config<CooperativeConfig<256, 128, 2, 1>>);
}  // namespace
}  // namespace nibble::bench
