#pragma once
// The dequantizing sm_90a INT8 GEMM launch, shared by its two launcher files (bf16 output in
// gemm_s8s8_s32_tn_dequant_sm90.cu, f32 output in gemm_s8s8_s32_tn_dequant_f32_sm90.cu): one
// file per output type, so that their CUTLASS instantiations (one per compiled tile config)
// compile in parallel and each stays within a CI machine's memory. Device-only header.
#include "cuda/common/check.h"
#include "cuda/common/workspace.h"
#include "cuda/gemm/gemm_s8s8_sm90_kernel.cuh"
#include "cuda/gemm/gemm_sm90_host.h"

namespace nibble::cuda::sm90::dequant_detail {

// K = 0: acc = 0, so y[m, n] = 0 · (scale_a · scale_b) + bias[n], the epilogue formula itself.
template <class OutT>
__global__ void dequant_empty_k_kernel(EpiDequantBias epi, int64_t m, int64_t n, OutT* y) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= m * n) return;
  const int64_t row = i / n, col = i % n;
  const float sa = epi.scale_a ? epi.scale_a[epi.a_per_row ? row : 0] : 1.0f;
  const float sb = epi.scale_b ? epi.scale_b[epi.b_per_col ? col : 0] : 1.0f;
  const float v = 0.0f * (sa * sb) + (epi.bias ? epi.bias[col] : 0.0f);
  y[i] = OutT(v);  // cutlass::bfloat16_t converts with round-to-nearest-even
}

template <class Config, class OutT>
void run_config(const GemmS8S8Params& p, const EpiDequantBias& epi, OutT* y, cudaStream_t stream) {
  using Epi = sm90::EpiDequantBiasTo<OutT>;
  using Gemm = sm90::GemmS8S8Sm90<Config, Epi>;
  auto args = Gemm::make_arguments(p, y, sm90::SchedulerKnobs{});
  Epi::fill(args.epilogue.thread, epi);
  Gemm::run(args, stream);
}

template <class OutT>
void run_dequant(const char* fn, const GemmS8S8Params& p, const EpiDequantBias& epi, OutT* y,
                 cudaStream_t stream) {
  sm90::check_gemm_params(fn, p, y, static_cast<int>(sizeof(OutT)));
  sm90::check_epilogue(fn, epi);
  if (p.m == 0 || p.n == 0) return;
  if (p.k == 0) {
    const int64_t total = p.m * p.n;
    const int threads = 256;
    dequant_empty_k_kernel<OutT><<<static_cast<unsigned>((total + threads - 1) / threads),
                                   threads, 0, stream>>>(epi, p.m, p.n, y);
    NB_CUDA_CHECK_LAUNCH();
    return;
  }
  sm90::with_tile_config(sm90::choose_tile(p),
                         [&]<class Config>() { run_config<Config>(p, epi, y, stream); });
}


}  // namespace nibble::cuda::sm90::dequant_detail
