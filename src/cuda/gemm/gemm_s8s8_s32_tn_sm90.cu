// INT8 tensor-core GEMM for Hopper, int32 output: launcher (checks, configuration, launch).
// Built for sm_90a only (wgmma needs the arch-specific target); see CMakeLists.txt. The
// dequantizing launchers live in gemm_s8s8_s32_tn_dequant_sm90.cu, so that the two files'
// CUTLASS instantiations compile in parallel.
#include "cuda/gemm/gemm_s8s8_s32_tn_sm90.h"

#include "cuda/common/check.h"
#include "cuda/common/workspace.h"
#include "cuda/gemm/gemm_s8s8_sm90_kernel.cuh"
#include "cuda/gemm/gemm_sm90_host.h"

namespace nibble::cuda {

namespace {

template <class Config>
void run_s32(const GemmS8S8Params& p, int32_t* c, cudaStream_t stream) {
  using Gemm = sm90::GemmS8S8Sm90<Config, sm90::EpiStoreS32>;
  auto args = Gemm::make_arguments(p, c, sm90::SchedulerKnobs{});
  sm90::EpiStoreS32::fill(args.epilogue.thread);
  Gemm::run(args, stream);
}

}  // namespace

void gemm_s8s8_s32_tn_sm90(const GemmS8S8Params& p, int32_t* c, cudaStream_t stream) {
  sm90::check_gemm_params("gemm_s8s8_s32_tn_sm90", p, c, 4);
  if (p.m == 0 || p.n == 0) return;
  if (p.k == 0) {  // empty sum: acc = 0
    NB_CUDA_CHECK(cudaMemsetAsync(c, 0, static_cast<size_t>(p.m * p.n) * sizeof(int32_t), stream));
    return;
  }
  sm90::with_tile_config(sm90::choose_tile(p),
                         [&]<class Config>() { run_s32<Config>(p, c, stream); });
}

bool gemm_sm90_available() { return true; }

}  // namespace nibble::cuda
