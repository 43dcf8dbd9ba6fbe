#pragma once
// Helper for the sweep files: registers one TileConfig with the s32 epilogue.
#include "bench/gemm_sweep_sm90.h"
#include "cuda/gemm/gemm_s8s8_sm90_kernel.cuh"

namespace nibble::bench {

template <class Config>
void run_config(const cuda::GemmS8S8Params& p, int32_t* c, const SweepKnobs& knobs,
                cudaStream_t stream) {
  using Gemm = cuda::sm90::GemmS8S8Sm90<Config, cuda::sm90::EpiStoreS32>;
  using Raster = cutlass::gemm::kernel::detail::RasterOrderOptions;
  cuda::sm90::SchedulerKnobs k;
  k.max_swizzle = knobs.max_swizzle;
  k.raster = knobs.raster == 1 ? Raster::AlongM : knobs.raster == 2 ? Raster::AlongN : Raster::Heuristic;
  k.splits = knobs.splits;
  auto args = Gemm::make_arguments(p, c, k);
  cuda::sm90::EpiStoreS32::fill(args.epilogue.thread);
  Gemm::run(args, stream);
}

}  // namespace nibble::bench
