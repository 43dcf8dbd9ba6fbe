#pragma once
// Registry of INT8 GEMM tile configurations compiled into nibble_bench_gemm_sweep. Each
// gemm_sweep_sm90_*.cu file instantiates a few configs (so two cores compile them in
// parallel) and registers a launcher per config.
#include <cuda_runtime.h>

#include <functional>
#include <string>
#include <vector>

#include "cuda/gemm/gemm_params.h"

namespace nibble::bench {

// Run-time knobs of the persistent tile scheduler (mirrors sm90::SchedulerKnobs).
struct SweepKnobs {
  int max_swizzle = 1;
  int raster = 0;  // 0 heuristic, 1 along M, 2 along N
  int splits = 1;  // stream-K configs only: > 1 forces split-K
};

struct SweepConfig {
  std::string name;
  bool stream_k = false;
  std::function<void(const cuda::GemmS8S8Params&, int32_t*, const SweepKnobs&, cudaStream_t)> run;
};

std::vector<SweepConfig>& sweep_registry();

// Adds a config at static-initialization time.
struct SweepRegistrar {
  SweepRegistrar(std::string name,
                 std::function<void(const cuda::GemmS8S8Params&, int32_t*, const SweepKnobs&,
                                    cudaStream_t)> run,
                 bool stream_k = false) {
    sweep_registry().push_back({std::move(name), stream_k, std::move(run)});
  }
};

}  // namespace nibble::bench
