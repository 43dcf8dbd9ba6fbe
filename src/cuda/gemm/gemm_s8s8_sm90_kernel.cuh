#pragma once
// The CUTLASS 3.x kernel behind the sm_90a INT8 GEMMs, as a template over (tile config,
// epilogue). The launchers in gemm_s8s8_s32_tn_sm90.cu instantiate it; bench/ instantiates
// other configs to compare them. Device-only header: include it from .cu files built for
// sm_90a alone (see CMakeLists.txt).
//
// Layouts, in CUTLASS's column-major-first vocabulary:
//   A [M, K] row-major    = cutlass::layout::RowMajor     (K contiguous)
//   B [N, K] row-major    = cutlass::layout::ColumnMajor  as a K×N matrix (K contiguous)
//   D [M, N] row-major    = cutlass::layout::RowMajor
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/gemm/kernel/tile_scheduler.hpp>

#include <algorithm>
#include <cstdint>

#include "cuda/common/check.h"
#include "cuda/common/workspace.h"
#include "cuda/gemm/gemm_params.h"

namespace nibble::cuda::sm90 {

using cute::_0;
using cute::_1;
using cute::Int;
using cute::Shape;
using cute::Stride;

// One kernel configuration: CTA tile (kM × kN × kK), thread-block cluster (kClusterM × kClusterN),
// the mainloop and epilogue schedules, and the tile scheduler.
template <int kM, int kN, int kK, int kClusterM, int kClusterN, class MainloopSchedule,
          class EpilogueSchedule, class Scheduler = cutlass::gemm::PersistentScheduler>
struct TileConfig {
  using TileShape = Shape<Int<kM>, Int<kN>, Int<kK>>;
  using ClusterShape = Shape<Int<kClusterM>, Int<kClusterN>, _1>;
  using Mainloop = MainloopSchedule;
  using Epilogue = EpilogueSchedule;
  using TileScheduler = Scheduler;
  static constexpr int kClusterSize = kClusterM * kClusterN;
};

// Two warpgroups share one 128×256 (or 256×128) tile: 128 int32 accumulators per thread.
template <int kM, int kN, int kClusterM, int kClusterN,
          class Scheduler = cutlass::gemm::PersistentScheduler>
using CooperativeConfig =
    TileConfig<kM, kN, 128, kClusterM, kClusterN,
               cutlass::gemm::KernelTmaWarpSpecializedCooperative,
               cutlass::epilogue::TmaWarpSpecializedCooperative, Scheduler>;

// Two warpgroups alternate over two tiles, so one's epilogue hides under the other's MMAs.
template <int kM, int kN, int kClusterM, int kClusterN>
using PingpongConfig = TileConfig<kM, kN, 128, kClusterM, kClusterN,
                                  cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                  cutlass::epilogue::TmaWarpSpecialized>;

// The configurations the launchers compile, one per GemmTile value (gemm_params.h), chosen by
// measured sweeps (bench/README.md, "configs tried" and "Tile dispatch"): ping-pong 128×128
// with a 2×1 or 1×2 cluster (the H200 sweep's winners), the cooperative 128×256 tile of
// the H100 run 1, and ping-pong 64×64 / 64×128 for small M (the 2026-12-04 sweep);
// persistent scheduler; two CTAs of a cluster share one operand's tile through TMA multicast
// (B along M for 2×1, A along N for 1×2).
// with_tile_config(tile, f) calls f.template operator()<Config>() for the resolved tile
// (never GemmTile::automatic: resolve it with sm90::choose_tile first).
template <class F>
decltype(auto) with_tile_config(GemmTile tile, F&& f) {
  // Calls f with Config, after checking it against the shape table of gemm_params.h.
  const auto run = [&]<GemmTile kTile, class Config>() -> decltype(auto) {
    constexpr GemmTileShape kShape = gemm_tile_shape(kTile);
    static_assert(cute::size<0>(typename Config::TileShape{}) == kShape.m &&
                      cute::size<1>(typename Config::TileShape{}) == kShape.n &&
                      cute::size<0>(typename Config::ClusterShape{}) == kShape.cluster_m &&
                      cute::size<1>(typename Config::ClusterShape{}) == kShape.cluster_n,
                  "with_tile_config and gemm_tile_shape disagree on a tile configuration");
    return f.template operator()<Config>();
  };
  switch (tile) {
    case GemmTile::pingpong_128x128_c1x2:
      return run.template operator()<GemmTile::pingpong_128x128_c1x2, PingpongConfig<128, 128, 1, 2>>();
    case GemmTile::coop_128x256_c2x1:
      return run.template operator()<GemmTile::coop_128x256_c2x1, CooperativeConfig<128, 256, 2, 1>>();
    case GemmTile::pingpong_64x64_c2x1:
      return run.template operator()<GemmTile::pingpong_64x64_c2x1, PingpongConfig<64, 64, 2, 1>>();
    case GemmTile::pingpong_64x128_c2x1:
      return run.template operator()<GemmTile::pingpong_64x128_c2x1, PingpongConfig<64, 128, 2, 1>>();
    case GemmTile::automatic:
    case GemmTile::pingpong_128x128_c2x1:
      break;
  }
  return run.template operator()<GemmTile::pingpong_128x128_c2x1, PingpongConfig<128, 128, 2, 1>>();
}

// ---- epilogues -------------------------------------------------------------------------

// c = acc (int32 out; alpha = 1, no source matrix).
struct EpiStoreS32 {
  using ElementD = int32_t;
  using ElementCompute = int32_t;
  template <class TileShape>
  using Fusion = cutlass::epilogue::fusion::LinearCombination<int32_t, int32_t, void, int32_t>;

  template <class FusionArguments>
  static void fill(FusionArguments& args) {
    args.alpha = 1;
    args.beta = 0;
  }
};

// EpiDequantBias (gemm_params.h):
//   y[m, n] = float(acc[m, n]) · (scale_a[m or 0] · scale_b[n or 0]) + bias[n]
// as an epilogue visitor tree evaluated on the accumulators in registers, before the one
// store of y: scale_a is a column broadcast (one value per row m), scale_b and bias are row
// broadcasts (one value per column n). The bool strides pick vector (true) or scalar (false)
// at run time; null pointers read as the null_default (1 for scales, 0 for bias).
// int32 → fp32 conversion rounds to nearest, as float(acc) does in the reference.
template <class OutT>
struct EpiDequantBiasTo {
  using ElementD = OutT;
  using ElementCompute = float;

  template <class TileShape>
  struct Tree {
    static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
    using ScaleA = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float,
                                                               Stride<bool, _0, int64_t>>;
    using ScaleB = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float,
                                                               Stride<_0, bool, int64_t>>;
    using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float,
                                                             Stride<_0, _1, int64_t>>;
    // s = scale_a[m] · scale_b[n]
    using ScaleAB = cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>,
        ScaleA, ScaleB>;
    // y = fma(float(acc), s, bias), rounded once to OutT
    using Type = cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, OutT, float,
                                               kRound>,
        cutlass::epilogue::fusion::Sm90AccFetch, ScaleAB, Bias>;
  };
  template <class TileShape>
  using Fusion = typename Tree<TileShape>::Type;

  template <class FusionArguments>
  static void fill(FusionArguments& args, const EpiDequantBias& epi) {
    // Arguments of a tree node: its children's, in order, then the node's own.
    auto& [acc_args, scale_ab_args, bias_args, fma_args] = args;
    (void)acc_args;
    (void)fma_args;
    auto& [scale_a_args, scale_b_args, mul_args] = scale_ab_args;
    (void)mul_args;
    scale_a_args.ptr_col = epi.scale_a;
    scale_a_args.null_default = 1.0f;
    scale_a_args.dCol = Stride<bool, _0, int64_t>{epi.a_per_row, _0{}, 0};
    scale_b_args.ptr_row = epi.scale_b;
    scale_b_args.null_default = 1.0f;
    scale_b_args.dRow = Stride<_0, bool, int64_t>{_0{}, epi.b_per_col, 0};
    bias_args.ptr_row = epi.bias;
    bias_args.null_default = 0.0f;
    bias_args.dRow = Stride<_0, _1, int64_t>{_0{}, _1{}, 0};
  }
};

// Run-time knobs of the persistent tile scheduler (no recompilation needed).
struct SchedulerKnobs {
  int max_swizzle = 1;  // 1, 2, 4 or 8 CTAs rasterized together (L2 reuse)
  // Heuristic lets CUTLASS pick; AlongM / AlongN force the raster direction.
  cutlass::gemm::kernel::detail::RasterOrderOptions raster =
      cutlass::gemm::kernel::detail::RasterOrderOptions::Heuristic;
  // Stream-K scheduler only: > 1 forces split-K into this many K slices (int32 partial sums
  // are reduced through the workspace; integer addition keeps the result exact). 1 leaves the
  // decomposition to CUTLASS's heuristic.
  int splits = 1;
};

// ---- the kernel ------------------------------------------------------------------------

template <class Config, class Epi>
struct GemmS8S8Sm90 {
  using ElementD = typename Epi::ElementD;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::RowMajor;
  // 16 bytes per row step: the tensor-memory-accelerator (TMA) minimum.
  static constexpr int kAlignAB = 16;
  static constexpr int kAlignD = 16 / static_cast<int>(sizeof(ElementD));

  using FusionOp = typename Epi::template Fusion<typename Config::TileShape>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::TileShape,
      typename Config::ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto, int32_t,
      typename Epi::ElementCompute, void, LayoutD, kAlignD, ElementD, LayoutD, kAlignD,
      typename Config::Epilogue, FusionOp>::CollectiveOp;

  // Shared memory left after the epilogue's buffers (and what the epilogue asks to withhold,
  // Epi::kMainloopSmemWithheld) goes to mainloop pipeline stages.
  static constexpr int kSmemWithheld = [] {
    if constexpr (requires { Epi::kMainloopSmemWithheld; }) return Epi::kMainloopSmemWithheld;
    else return 0;
  }();
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, LayoutA, kAlignAB, int8_t,
      LayoutB, kAlignAB, int32_t, typename Config::TileShape, typename Config::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage)) + kSmemWithheld>,
      typename Config::Mainloop>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue,
                                                      typename Config::TileScheduler>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using Arguments = typename Device::Arguments;

  // Builds the CUTLASS arguments; the caller fills the epilogue's fusion arguments.
  static Arguments make_arguments(const GemmS8S8Params& p, ElementD* d, const SchedulerKnobs& knobs) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    const int m = static_cast<int>(p.m), n = static_cast<int>(p.n), k = static_cast<int>(p.k);
    // Packed strides (row pitch = K for A and B, N for D), batch stride unused (L = 1).
    StrideA stride_a = cute::make_stride(static_cast<int64_t>(k), _1{}, static_cast<int64_t>(m) * k);
    StrideB stride_b = cute::make_stride(static_cast<int64_t>(k), _1{}, static_cast<int64_t>(n) * k);
    StrideD stride_d = cute::make_stride(static_cast<int64_t>(n), _1{}, static_cast<int64_t>(m) * n);

    cutlass::KernelHardwareInfo hw;
    NB_CUDA_CHECK(cudaGetDevice(&hw.device_id));
    hw.sm_count = device_sm_count();
    if (p.max_sms > 0) {
      constexpr int kCluster = Config::kClusterSize;
      hw.sm_count = std::max(kCluster, std::min(hw.sm_count, p.max_sms) / kCluster * kCluster);
    }

    Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = {m, n, k, 1};
    args.mainloop = {p.a, stride_a, p.b, stride_b};
    args.epilogue.ptr_C = nullptr;
    args.epilogue.dC = stride_d;
    args.epilogue.ptr_D = d;
    args.epilogue.dD = stride_d;
    args.hw_info = hw;
    args.scheduler.max_swizzle_size = knobs.max_swizzle;
    args.scheduler.raster_order = knobs.raster;
    if constexpr (requires { args.scheduler.splits; }) {
      if (knobs.splits > 1) {
        using Decomposition = decltype(args.scheduler.decomposition_mode);
        args.scheduler.splits = knobs.splits;
        args.scheduler.decomposition_mode = Decomposition::SplitK;
      }
    }
    return args;
  }

  // Checks, takes workspace, launches on `stream`.
  static void run(const Arguments& args, cudaStream_t stream) {
    Device gemm;
    cutlass::Status st = gemm.can_implement(args);
    NB_CHECK(st == cutlass::Status::kSuccess,
             "CUTLASS cannot run this INT8 GEMM (M=" << cute::get<0>(args.problem_shape)
                 << ", N=" << cute::get<1>(args.problem_shape)
                 << ", K=" << cute::get<2>(args.problem_shape) << "): " << cutlassGetStatusString(st)
                 << "; check K % 16 == 0, N·sizeof(out) % 16 == 0 and 16-byte aligned pointers");
    void* ws = workspace(Device::get_workspace_size(args), stream);
    st = gemm.initialize(args, ws, stream);
    NB_CHECK(st == cutlass::Status::kSuccess,
             "CUTLASS INT8 GEMM initialize failed: " << cutlassGetStatusString(st));
    st = gemm.run(stream);
    NB_CHECK(st == cutlass::Status::kSuccess,
             "CUTLASS INT8 GEMM launch failed: " << cutlassGetStatusString(st)
                 << " (last CUDA error: " << cudaGetErrorString(cudaGetLastError()) << ")");
  }
};

}  // namespace nibble::cuda::sm90
