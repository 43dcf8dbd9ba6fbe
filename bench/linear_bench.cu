// The linear-layer benchmark behind `nibble bench linear`: nibble's INT4 (HQ-MM / LSS-MM)
// layer on the GPU (src/cuda/linear/hq_linear.h) against the BF16 layer on cuBLAS, per shape
// (M tokens, N out_features, K in_features):
//   forward          hq_linear_forward: fused Hadamard + quantize + side channel of x, then
//                    the INT8 GEMM with the dequant epilogue (bf16 y)      vs one BF16 GEMM
//   forward (infer.) hq_linear_forward with nothing saved for a backward (inference): the
//                    quantizer writes the GEMM operand x_q only (no side channel)
//   weight quant     hq_linear_quantize_weight, once per step (listed on its own line)
//   backward         hq_linear_backward, keep-all: bit split, x codes unpacked transposed,
//                    dx and dw INT8 GEMMs (f32 out), the mask/LSQ/Hadamard passes, db
//                                                                           vs two BF16 GEMMs
//                    (dx = dy·w, dw = dyᵀ·x, bf16 out, cuBLASLt with the transposes it needs)
//   backward sampled Bernoulli leverage-score sampling (hq_linear.h LssVariant::sampled: unbiased
//                    dw and dx, bit-exact with ref::LssMode::bernoulli, no host wait)
// plus a breakdown of the forward and backward into their kernels. Inputs: x, w, dy bf16
// uniform in [−1, 1), bias f32; the step sizes are LSQ initialisations on the data.
// Timing: the method of bench/common/bench_util.cuh (warm-up; every timed launch queued behind
// a spin kernel between two CUDA events; all variants interleaved launch by launch; rotating
// input sets > 4× L2; medians), with the spin sized from the measured host time of a round,
// because a layer call queues a dozen kernels. No variant waits for the GPU inside a call.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <tuple>
#include <vector>

#include "bench/bench_api.h"
#include "bench/bench_report.h"
#include "bench/common/bench_util.cuh"
#include "bench/svg_plot.h"
#include "cuda/blas/cublaslt_baselines.h"
#include "cuda/common/check.h"
#include "cuda/gemm/gemm_s8s8_s32_tn_sm90.h"
#include "cuda/linear/hq_linear.h"
#include "cuda/linear/hq_linear_kernels.h"
#include "cuda/quant/bitsplit.h"
#include "cuda/quant/hadamard.h"
#include "cuda/quant/status.h"
#include "nibble/error.h"
#include "nibble/safetensors.h"  // write_file_atomic

namespace nibble::bench {
namespace {

#define NB_LT_CHECK(call)                                                                    \
  do {                                                                                      \
    const cublasStatus_t nb_st_ = (call);                                                   \
    NB_CHECK(nb_st_ == CUBLAS_STATUS_SUCCESS, #call << " failed: " << cublasLtGetStatusString(nb_st_)); \
  } while (0)

// BF16 GEMMs of the baseline backward, column-major (cuBLAS's convention):
//   C[m, n] = op(A)·op(B), op(X) = X or Xᵀ, bf16 in and out, fp32 accumulation,
// the heuristic's first algorithm with a 64 MiB workspace, planned once per shape.
class Bf16Gemm {
 public:
  Bf16Gemm() {
    NB_LT_CHECK(cublasLtCreate(&handle_));
    NB_CUDA_CHECK(cudaMalloc(&ws_, kWs));
  }
  ~Bf16Gemm() {
    plans_.clear();
    cudaFree(ws_);
    cublasLtDestroy(handle_);
  }
  Bf16Gemm(const Bf16Gemm&) = delete;
  Bf16Gemm& operator=(const Bf16Gemm&) = delete;

  void run(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const bf16_t* a, int64_t lda,
           const bf16_t* b, int64_t ldb, bf16_t* c, int64_t ldc, cudaStream_t stream) {
    const Plan& p = plan(ta, tb, m, n, k, lda, ldb, ldc);
    const float alpha = 1.0f, beta = 0.0f;
    NB_LT_CHECK(cublasLtMatmul(handle_, p.desc, &alpha, a, p.a, b, p.b, &beta, c, p.c, c, p.c,
                               &p.algo, ws_, kWs, stream));
  }

 private:
  static constexpr size_t kWs = size_t{64} << 20;
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    ~Plan() {
      if (a) cublasLtMatrixLayoutDestroy(a);
      if (b) cublasLtMatrixLayoutDestroy(b);
      if (c) cublasLtMatrixLayoutDestroy(c);
      if (desc) cublasLtMatmulDescDestroy(desc);
    }
  };
  using Key = std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

  const Plan& plan(bool ta, bool tb, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                   int64_t ldc) {
    auto& slot = plans_[Key{ta, tb, m, n, k, lda, ldb, ldc}];
    if (slot) return *slot;
    auto p = std::make_unique<Plan>();
    NB_LT_CHECK(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    NB_LT_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)));
    NB_LT_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)));
    const auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
    NB_LT_CHECK(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, ta ? u(k) : u(m), ta ? u(m) : u(k), lda));
    NB_LT_CHECK(cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, tb ? u(n) : u(k), tb ? u(k) : u(n), ldb));
    NB_LT_CHECK(cublasLtMatrixLayoutCreate(&p->c, CUDA_R_16BF, u(m), u(n), ldc));
    cublasLtMatmulPreference_t pref = nullptr;
    NB_LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = kWs;
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatmulAlgoGetHeuristic(handle_, p->desc, p->a, p->b, p->c, p->c, pref, 1,
                                          &result, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    NB_CHECK(st == CUBLAS_STATUS_SUCCESS && found > 0,
             "cuBLASLt found no BF16 algorithm for m=" << m << " n=" << n << " k=" << k);
    p->algo = result.algo;
    slot = std::move(p);
    return *slot;
  }

  cublasLtHandle_t handle_ = nullptr;
  void* ws_ = nullptr;
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

// The paper's operator shapes (algorithms.md C.6), the transformer shapes at 16384 tokens,
// and three small token counts at 4096² (128, 256, 1024).
std::vector<Shape> default_linear_shapes() {
  std::vector<Shape> s = {{4608, 5120, 6144}, {5120, 6144, 8192},  {6144, 6144, 9216},
                          {7168, 6656, 8704}, {8192, 7680, 9728}, {15360, 8704, 10752}};
  const int64_t nk[][2] = {{768, 768},   {3072, 768},  {768, 3072},   {1024, 1024},  {4096, 1024},
                           {1024, 4096}, {4096, 4096}, {11008, 4096}, {4096, 11008}};
  for (const auto& p : nk) s.push_back({16384, p[0], p[1]});
  s.push_back({128, 4096, 4096});
  s.push_back({256, 4096, 4096});  // the 64x128 tiles' range (128 < M <= 256)
  s.push_back({1024, 4096, 4096});
  return s;
}

// time_interleaved (bench_util.cuh) with the spin sized from the host's enqueue time: a round
// of layer calls queues many kernels and host-side checks, more than bench_util's 20 µs per
// launch for small shapes.
std::vector<Timing> time_group(const std::vector<std::function<void(int)>>& launches, int sets,
                               int warmup, int runs, cudaStream_t stream) {
  const size_t nk = launches.size();
  for (int i = 0; i < std::max(warmup, 1); ++i)
    for (const auto& l : launches) l(i % sets);
  NB_CUDA_CHECK(cudaStreamSynchronize(stream));
  // One more round, timing the host's enqueue alone.
  const auto t0 = std::chrono::steady_clock::now();
  for (const auto& l : launches) l(0);
  const double round_ns =
      std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
  NB_CUDA_CHECK(cudaStreamSynchronize(stream));
  // event records add host time too: 2·nk of them per round, generously 5 µs each
  const double per_round = round_ns + 10000.0 * static_cast<double>(nk);
  const int64_t spin_ns = static_cast<int64_t>(1.5 * per_round * runs) + 2000000;
  return time_queued(launches, sets, runs, stream, spin_ns);
}

// One rotation set of a layer's inputs and per-set outputs.
struct LayerSet {
  DeviceBytes x, w, dy, bias;       // bf16 x [N, D], w [C, D], dy [N, C]; f32 bias [C]
  DeviceBytes w_q, w_q_t, w_qp, w_ep;
  DeviceBytes x_q, x_qp, x_ep;
  DeviceBytes y;                    // bf16 [N, C]
};

}  // namespace

int run_linear_bench(const LinearBenchOptions& opt) {
  const int runs = opt.runs, warmup = opt.warmup;
  NB_CHECK(runs >= 10, "--runs " << runs << ": use at least 10 for a stable median");
  NB_CHECK(warmup >= 0, "--warmup " << warmup << " must be >= 0");
  NB_CHECK(opt.sample_fraction > 0 && opt.sample_fraction <= 1,
           "--sample-fraction " << opt.sample_fraction << " must be in (0, 1]");
  const std::vector<Shape> shapes =
      opt.shapes.empty() ? default_linear_shapes() : parse_shapes(opt.shapes);
  for (const Shape& s : shapes)
    NB_CHECK(s.m % 16 == 0 && s.n % 16 == 0 && s.k % 16 == 0 && s.k % opt.block == 0,
             "--shapes: " << shape_label(s) << " must have M, N, K multiples of 16 and K a "
                          << "multiple of the Hadamard block " << opt.block << "; pad it");

  cudaDeviceProp prop{};
  int device = 0;
  NB_CUDA_CHECK(cudaGetDevice(&device));
  NB_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  const std::string commit = git_commit();
  int runtime_version = 0;
  NB_CUDA_CHECK(cudaRuntimeGetVersion(&runtime_version));
  std::printf("device: %s (%d SMs, L2 %d MiB), CUDA runtime %d, commit %s\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, runtime_version, commit.c_str());
  std::printf("INT4 linear layer (HQ forward, bit-split backward, Hadamard block %d) vs BF16 "
              "cuBLAS; M = tokens, N = out_features, K = in_features\n",
              opt.block);
  std::printf("median of %d timed runs after %d warm-up rounds, variants interleaved; rotating "
              "input sets > 4x L2; times in microseconds, x = BF16 time / nibble time\n\n",
              runs, warmup);

  cudaStream_t stream = nullptr;
  NB_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  Bf16Gemm bf16;

  cuda::HqLinearConfig cfg;
  cfg.block = opt.block;
  // the keep-all backward with every kernel in order on one stream (overlap_passes off), timed
  // beside the default so the overlap's gain is measured in the same rounds
  cuda::HqLinearConfig cfg_in_order = cfg;
  cfg_in_order.overlap_passes = false;
  // the backward with the mask passes separate from the GEMMs (as before the fused epilogues)
  cuda::HqLinearConfig cfg_unfused = cfg;
  cfg_unfused.fuse_mask_epilogues = false;
  cuda::HqLinearConfig cfg_sampled = cfg;
  cfg_sampled.lss = cuda::LssVariant::sampled;
  cfg_sampled.sample_fraction = opt.sample_fraction;
  const PhiloxKey key{2024, 1, 0, RngRole::rounding};

  nlohmann::json jshapes = nlohmann::json::array();
  BarChart chart;
  chart.title = std::string("nibble INT4 linear layer vs cuBLAS BF16 (") + prop.name + ")";
  chart.y_label = "speed-up over BF16 (BF16 time / nibble time)";
  chart.series = {"forward", "forward (inference)", "forward + weight quant", "backward keep-all"};
  if (opt.sampled) chart.series.push_back("backward, sampled LSS");
  chart.values.assign(chart.series.size(), {});
  std::vector<std::string> notes;

  std::printf("%-20s %9s %9s %8s %9s %6s %6s %6s | %9s %9s %9s %9s %6s | %9s %6s | %6s\n",
              "M x N x K", "fwd", "infer", "wquant", "BF16 fwd", "fwd x", "inf x", "+wq x", "bwd",
              "in-order", "unfused", "BF16 bwd", "bwd x", "sampled", "x", "step x");
  for (const Shape& shape : shapes) {
    const int64_t n = shape.m, c = shape.n, d = shape.k;
    const size_t nd = static_cast<size_t>(n * d), cd = static_cast<size_t>(c * d),
                 nc = static_cast<size_t>(n * c);
    const int sets = rotation_sets(2 * (nd + cd + nc));
    std::vector<LayerSet> S(static_cast<size_t>(sets));
    for (int i = 0; i < sets; ++i) {
      LayerSet& L = S[static_cast<size_t>(i)];
      const uint64_t seed = 5000 + 16 * static_cast<uint64_t>(i);
      L.x = DeviceBytes(2 * nd);
      L.w = DeviceBytes(2 * cd);
      L.dy = DeviceBytes(2 * nc);
      L.bias = DeviceBytes(4 * static_cast<size_t>(c));
      L.w_q = DeviceBytes(cd);
      L.w_q_t = DeviceBytes(cd);
      L.w_qp = DeviceBytes(cd / 2);
      L.w_ep = DeviceBytes(cd / 2);
      L.x_q = DeviceBytes(nd);
      L.x_qp = DeviceBytes(nd / 2);
      L.x_ep = DeviceBytes(nd / 2);
      L.y = DeviceBytes(2 * nc);
      fill(L.x.as<void>(), n * d, Fill::bf16_unit, seed, stream);
      fill(L.w.as<void>(), c * d, Fill::bf16_unit, seed + 1, stream);
      fill(L.dy.as<void>(), n * c, Fill::bf16_unit, seed + 2, stream);
      fill(L.bias.as<void>(), c, Fill::f32_bias, seed + 3, stream);
    }
    // Step sizes: LSQ initialisations of set 0's x·H and w·H. scal = sx, sw, dsx, dsw, s.
    DeviceBytes scal(8 * sizeof(float)), scratch(cuda::kLsqInitScratch * sizeof(double)),
        status(sizeof(uint64_t));
    for (int t = 0; t < 2; ++t) {
      cuda::LsqInitParams<bf16_t> li;
      li.x = t == 0 ? S[0].x.as<bf16_t>() : S[0].w.as<bf16_t>();
      li.rows = t == 0 ? n : c;
      li.cols = d;
      li.block = cfg.block;
      li.range = cfg.range;
      li.step = scal.as<float>() + t;
      li.scratch = scratch.as<double>();
      cuda::lsq_init_scale(li, stream);
    }
    const float* sx = scal.as<float>();
    const float* sw = scal.as<float>() + 1;
    const size_t ws_keep_bytes = cuda::hq_linear_backward_workspace_bytes(n, d, c, cfg);
    const size_t ws_samp_bytes =
        opt.sampled ? cuda::hq_linear_backward_workspace_bytes(n, d, c, cfg_sampled) : 0;
    const size_t ws_unfused_bytes = cuda::hq_linear_backward_workspace_bytes(n, d, c, cfg_unfused);
    DeviceBytes ws_keep(ws_keep_bytes), ws_samp(ws_samp_bytes), ws_unfused(ws_unfused_bytes);
    DeviceBytes dx(2 * nd), dw(4 * cd), db(4 * static_cast<size_t>(c));
    DeviceBytes y16(2 * nc), dx16(2 * nd), dw16(2 * cd);
    // breakdown buffers
    DeviceBytes comb(nc), comb_t(nc), x_q_t(nd), dx_t(4 * nd), dw_t(4 * cd),
        split_scale(2 * sizeof(float)),
        parts_x(sizeof(double) * static_cast<size_t>(cuda::linear_detail::lsq_partials_count(n, d, cfg.block))),
        parts_w(sizeof(double) * static_cast<size_t>(cuda::linear_detail::lsq_partials_count(c, d, cfg.block))),
        parts_db(sizeof(double) * static_cast<size_t>(cuda::bitsplit_column_chunks(n) * c)),
        parts_fused(sizeof(int64_t) * static_cast<size_t>(std::max(
                                          cuda::gemm_s8s8_mask_hadamard_partials({nullptr, nullptr, n, d, 16}),
                                          cuda::gemm_s8s8_mask_hadamard_partials({nullptr, nullptr, c, d, 16}))));
    cuda::status_clear(status.as<uint64_t>(), stream);

    const auto weight_quant = [&](int i) {
      LayerSet& L = S[static_cast<size_t>(i)];
      cuda::HqLinearWeightParams<bf16_t> p;
      p.w = L.w.as<bf16_t>();
      p.n = n, p.d = d, p.c = c;
      p.sw = sw;
      p.out = {L.w_q.as<int8_t>(), L.w_q_t.as<int8_t>(), L.w_qp.as<uint8_t>(), L.w_ep.as<uint8_t>()};
      p.status = status.as<uint64_t>();
      cuda::hq_linear_quantize_weight(p, cfg, key, stream);
    };
    // saved: the training forward (codes and side channel of x kept for the backward);
    // otherwise the inference forward (the quantizer writes the GEMM operand x_q only)
    const auto forward = [&](int i, bool saved) {
      LayerSet& L = S[static_cast<size_t>(i)];
      cuda::HqLinearForwardParams<bf16_t> p;
      p.x = L.x.as<bf16_t>();
      p.n = n, p.d = d, p.c = c;
      p.sx = sx;
      p.sw = sw;
      p.bias = L.bias.as<float>();
      p.w_q = L.w_q.as<int8_t>();
      p.x_q = L.x_q.as<int8_t>();
      if (saved) {
        p.x_q_packed = L.x_qp.as<uint8_t>();
        p.x_e_packed = L.x_ep.as<uint8_t>();
      }
      p.y = L.y.as<bf16_t>();
      p.status = status.as<uint64_t>();
      cuda::hq_linear_forward(p, cfg, key, stream);
    };
    const auto forward_quant = [&](int i, bool saved) {
      LayerSet& L = S[static_cast<size_t>(i)];
      cuda::HqLsqQuantizeParams<bf16_t> q;
      q.x = L.x.as<bf16_t>();
      q.rows = n;
      q.cols = d;
      q.block = cfg.block;
      q.range = cfg.range;
      q.step = sx;
      q.key = key;
      q.q = L.x_q.as<int8_t>();
      if (saved) {
        q.q_packed = L.x_qp.as<uint8_t>();
        q.e_packed = L.x_ep.as<uint8_t>();
      }
      cuda::hq_lsq_quantize(q, stream);
    };
    const auto forward_gemm = [&](int i) {
      LayerSet& L = S[static_cast<size_t>(i)];
      cuda::EpiDequantBias epi;
      epi.scale_a = sx;
      epi.a_per_row = false;
      epi.scale_b = sw;
      epi.b_per_col = false;
      epi.bias = L.bias.as<float>();
      cuda::gemm_s8s8_s32_tn_dequant_sm90({L.x_q.as<int8_t>(), L.w_q.as<int8_t>(), n, c, d}, epi,
                                          L.y.as<bf16_t>(), stream);
    };
    const auto backward = [&](int i, const cuda::HqLinearConfig& conf, DeviceBytes& ws,
                              size_t ws_bytes) {
      LayerSet& L = S[static_cast<size_t>(i)];
      cuda::HqLinearBackwardParams<bf16_t> p;
      p.dy = L.dy.as<bf16_t>();
      p.n = n, p.d = d, p.c = c;
      p.sx = sx;
      p.sw = sw;
      p.x_q_packed = L.x_qp.as<uint8_t>();
      p.x_e_packed = L.x_ep.as<uint8_t>();
      p.w_q_packed = L.w_qp.as<uint8_t>();
      p.w_e_packed = L.w_ep.as<uint8_t>();
      p.w_q_t = L.w_q_t.as<int8_t>();
      p.workspace = ws.as<void>();
      p.workspace_bytes = ws_bytes;
      p.dx = dx.as<bf16_t>();
      p.dw = dw.as<float>();
      p.db = db.as<float>();
      p.dsx = scal.as<float>() + 2;
      p.dsw = scal.as<float>() + 3;
      p.grad_scale = scal.as<float>() + 4;
      p.status = status.as<uint64_t>();
      cuda::hq_linear_backward(p, conf, key, stream);
    };
    // Backward breakdown: the same kernels hq_linear_backward queues, one by one.
    const auto bwd_bitsplit = [&](int i) {
      cuda::BitSplitParams<bf16_t> bs;
      bs.g = S[static_cast<size_t>(i)].dy.as<bf16_t>();
      bs.rows = n;
      bs.cols = c;
      bs.key = key;
      bs.key.role = RngRole::grad_output_rounding;
      bs.scale = split_scale.as<float>();
      bs.combined = comb.as<int8_t>();
      bs.combined_t = comb_t.as<int8_t>();
      bs.col_partials = parts_db.as<double>();  // db's column sums ride on the first pass
      cuda::bitsplit(bs, stream);
    };
    const auto bwd_unpack = [&](int i) {
      cuda::linear_detail::unpack_s4_transpose(S[static_cast<size_t>(i)].x_qp.as<uint8_t>(), n, d,
                                               x_q_t.as<int8_t>(), stream);
    };
    const auto bwd_gemm_dx = [&](int i) {
      cuda::EpiDequantBias epi;
      epi.scale_a = split_scale.as<float>();
      epi.a_per_row = false;
      epi.scale_b = sw;
      epi.b_per_col = false;
      cuda::gemm_s8s8_s32_tn_dequant_sm90(
          {comb.as<int8_t>(), S[static_cast<size_t>(i)].w_q_t.as<int8_t>(), n, d, c}, epi,
          dx_t.as<float>(), stream);
    };
    const auto bwd_gemm_dw = [&](int) {
      cuda::EpiDequantBias epi;
      epi.scale_a = split_scale.as<float>();
      epi.a_per_row = false;
      epi.scale_b = sx;
      epi.b_per_col = false;
      cuda::gemm_s8s8_s32_tn_dequant_sm90({comb_t.as<int8_t>(), x_q_t.as<int8_t>(), c, d, n}, epi,
                                          dw_t.as<float>(), stream);
    };
    // the dx and dw GEMMs with the mask, step sums and Hadamard in their epilogues (the layer's
    // keep-all kernels on this path; the layer caps their grids, these do not)
    const auto bwd_gemm_dx_fused = [&](int i) {
      cuda::EpiMaskHadamard epi;
      epi.scale_a = split_scale.as<float>();
      epi.scale_b = sw;
      epi.q_packed = S[static_cast<size_t>(i)].x_qp.as<uint8_t>();
      epi.e_packed = S[static_cast<size_t>(i)].x_ep.as<uint8_t>();
      epi.block = static_cast<int>(cfg.block);
      epi.partials = parts_fused.as<int64_t>();
      cuda::gemm_s8s8_s32_tn_mask_hadamard_sm90(
          {comb.as<int8_t>(), S[static_cast<size_t>(i)].w_q_t.as<int8_t>(), n, d, c}, epi,
          dx.as<bf16_t>(), stream);
    };
    const auto bwd_gemm_dw_fused = [&](int i) {
      cuda::EpiMaskHadamard epi;
      epi.scale_a = split_scale.as<float>();
      epi.scale_b = sx;
      epi.q_packed = S[static_cast<size_t>(i)].w_qp.as<uint8_t>();
      epi.e_packed = S[static_cast<size_t>(i)].w_ep.as<uint8_t>();
      epi.block = static_cast<int>(cfg.block);
      epi.partials = parts_fused.as<int64_t>();
      cuda::gemm_s8s8_s32_tn_mask_hadamard_sm90({comb_t.as<int8_t>(), x_q_t.as<int8_t>(), c, d, n},
                                                epi, dw.as<float>(), stream);
    };
    const auto bwd_mask_dx = [&](int i) {
      cuda::linear_detail::LsqMaskHadamardParams<bf16_t> m;
      m.g_t = dx_t.as<float>();
      m.rows = n;
      m.cols = d;
      m.block = cfg.block;
      m.q_packed = S[static_cast<size_t>(i)].x_qp.as<uint8_t>();
      m.e_packed = S[static_cast<size_t>(i)].x_ep.as<uint8_t>();
      m.out = dx.as<bf16_t>();
      m.partials = parts_x.as<double>();
      cuda::linear_detail::lsq_mask_hadamard(m, stream);
    };
    const auto bwd_mask_dw = [&](int i) {
      cuda::linear_detail::LsqMaskHadamardParams<float> m;
      m.g_t = dw_t.as<float>();
      m.rows = c;
      m.cols = d;
      m.block = cfg.block;
      m.q_packed = S[static_cast<size_t>(i)].w_qp.as<uint8_t>();
      m.e_packed = S[static_cast<size_t>(i)].w_ep.as<uint8_t>();
      m.out = dw.as<float>();
      m.partials = parts_w.as<double>();
      cuda::linear_detail::lsq_mask_hadamard(m, stream);
    };
    const auto bwd_db = [&](int) {  // the partials come from bwd_bitsplit's first pass
      cuda::linear_detail::column_sums_finalize(parts_db.as<double>(), cuda::bitsplit_column_chunks(n),
                                                c, db.as<float>(), stream);
    };
    // BF16 baseline, row-major tensors read column-major (cuBLAS):
    //   y  [N, C] = x·wᵀ      the TN GEMM of cublaslt_baselines.h
    //   dx [N, D] = dy·w      dxᵀ [D, N] = wᵀ[D, C] · dyᵀ[C, N]
    //   dw [C, D] = dyᵀ·x     dwᵀ [D, C] = xᵀ[D, N] · (dyᵀ[C, N])ᵀ
    const auto bf16_forward = [&](int i) {
      LayerSet& L = S[static_cast<size_t>(i)];
      cuda::cublaslt_gemm_bf16_tn(L.x.as<bf16_t>(), L.w.as<bf16_t>(), n, c, d, y16.as<bf16_t>(), stream);
    };
    const auto bf16_backward = [&](int i) {
      LayerSet& L = S[static_cast<size_t>(i)];
      bf16.run(false, false, d, n, c, L.w.as<bf16_t>(), d, L.dy.as<bf16_t>(), c, dx16.as<bf16_t>(), d,
               stream);
      bf16.run(false, true, d, c, n, L.x.as<bf16_t>(), d, L.dy.as<bf16_t>(), c, dw16.as<bf16_t>(), d,
               stream);
    };

    std::vector<std::string> names = {
        "weight_quant",  "forward",      "backward",    "bf16_forward", "bf16_backward",
        "fwd_quant_x",   "fwd_gemm",     "bwd_bitsplit", "bwd_unpack_x_t", "bwd_gemm_dx",
        "bwd_gemm_dw",   "bwd_mask_dx",  "bwd_mask_dw", "bwd_db", "forward_inference",
        "fwd_quant_x_inference", "backward_in_order", "backward_unfused"};
    std::vector<std::function<void(int)>> launches = {
        weight_quant,
        [&](int i) { forward(i, true); },
        [&](int i) { backward(i, cfg, ws_keep, ws_keep_bytes); },
        bf16_forward,
        bf16_backward,
        [&](int i) { forward_quant(i, true); },
        forward_gemm,
        bwd_bitsplit,
        bwd_unpack,
        bwd_gemm_dx,
        bwd_gemm_dw,
        bwd_mask_dx,
        bwd_mask_dw,
        bwd_db,
        [&](int i) { forward(i, false); },
        [&](int i) { forward_quant(i, false); },
        [&](int i) { backward(i, cfg_in_order, ws_keep, ws_keep_bytes); },
        [&](int i) { backward(i, cfg_unfused, ws_unfused, ws_unfused_bytes); }};
    if (cfg.block <= cuda::kEpiMaskMaxBlock) {  // the fused epilogues' blocks
      names.insert(names.end(), {"bwd_gemm_dx_fused", "bwd_gemm_dw_fused"});
      launches.insert(launches.end(), {bwd_gemm_dx_fused, bwd_gemm_dw_fused});
    }
    // The forward state of every set must exist before a backward reads it.
    for (int i = 0; i < sets; ++i) {
      weight_quant(i);
      forward(i, true);
    }
    // The sampled variant never waits for the GPU either, so it joins the interleaved group.
    if (opt.sampled) {
      names.push_back("backward_sampled");
      launches.push_back([&](int i) { backward(i, cfg_sampled, ws_samp, ws_samp_bytes); });
    }
    const std::vector<Timing> t = time_group(launches, sets, warmup, runs, stream);
    const Timing t_sampled = opt.sampled ? t.back() : Timing{};
    cuda::status_throw_if_set(status.as<uint64_t>(), "nibble bench linear (the INT4 layer)", stream);

    const auto med = [&](const char* name) {
      const auto it = std::find(names.begin(), names.end(), name);
      return t[static_cast<size_t>(it - names.begin())].median_ms;
    };
    const double f = med("forward"), wq = med("weight_quant"), bf = med("bf16_forward");
    const double fi = med("forward_inference"), fix = bf / fi;
    const double b = med("backward"), bb = med("bf16_backward"), bio = med("backward_in_order");
    const double bun = med("backward_unfused");
    const double fx = bf / f, fwx = bf / (f + wq), bx = bb / b;
    const double sx_ratio = opt.sampled ? bb / t_sampled.median_ms : 0.0;
    const double step_x = (bf + bb) / (f + wq + b);
    const std::string label = shape_label(shape);
    std::printf("%-20s %9.1f %9.1f %8.1f %9.1f %5.2fx %5.2fx %5.2fx | %9.1f %9.1f %9.1f %9.1f %5.2fx | ",
                label.c_str(), 1e3 * f, 1e3 * fi, 1e3 * wq, 1e3 * bf, fx, fix, fwx, 1e3 * b,
                1e3 * bio, 1e3 * bun, 1e3 * bb, bx);
    if (opt.sampled) std::printf("%9.1f %5.2fx | ", 1e3 * t_sampled.median_ms, sx_ratio);
    else std::printf("%9s %6s | ", "-", "-");
    std::printf("%5.2fx\n", step_x);
    std::fflush(stdout);
    if (fx < 1.0 || bx < 1.0) {
      notes.push_back(label + ": nibble is slower than BF16 in the " +
                      (fx < 1.0 && bx < 1.0 ? std::string("forward and the backward")
                                            : fx < 1.0 ? std::string("forward") : std::string("backward")));
    }

    nlohmann::json js = {{"m_tokens", n}, {"n_out", c}, {"k_in", d}, {"rotating_sets", sets},
                         {"workspace_bytes_keep_all", ws_keep_bytes},
                         {"workspace_bytes_sampled", ws_samp_bytes},
                         {"forward_over_bf16", fx}, {"forward_inference_over_bf16", fix},
                         {"forward_with_weight_quant_over_bf16", fwx},
                         {"backward_over_bf16", bx},
                         {"backward_in_order_over_bf16", bb / bio},
                         {"backward_unfused_over_bf16", bb / bun}, {"step_over_bf16", step_x}};
    for (size_t j = 0; j < names.size(); ++j) {
      js["times"][names[j]] = {{"median_ms", t[j].median_ms}, {"min_ms", t[j].min_ms},
                               {"max_ms", t[j].max_ms}, {"runs", t[j].runs}};
    }
    if (opt.sampled) {
      js["times"]["backward_sampled"] = {{"median_ms", t_sampled.median_ms},
                                         {"min_ms", t_sampled.min_ms},
                                         {"max_ms", t_sampled.max_ms},
                                         {"runs", t_sampled.runs}};
      js["backward_sampled_over_bf16"] = sx_ratio;
    }
    jshapes.push_back(js);
    chart.groups.push_back(label);
    chart.values[0].push_back(fx);
    chart.values[1].push_back(fix);
    chart.values[2].push_back(fwx);
    chart.values[3].push_back(bx);
    if (opt.sampled) chart.values[4].push_back(sx_ratio);
  }
  std::printf("\nforward = x quantization (Hadamard + codes + side channel) + INT8 GEMM with "
              "dequant; infer = the same with nothing saved for a backward; bwd = the keep-all backward "
              "(independent kernels overlapped on two streams), in-order = the same kernels on one stream, unfused = with the mask passes separate from the GEMMs (fuse_mask_epilogues = false); wquant = weight quantization (once per step); step x = BF16 (fwd + bwd) "
              "/ nibble (fwd + wquant + bwd)\n");
  if (notes.empty()) {
    std::printf("nibble beats BF16 in the forward and the backward on every shape\n");
  } else {
    std::printf("rows where nibble cannot beat BF16:\n");
    for (const auto& s : notes) std::printf("  %s\n", s.c_str());
  }

  if (!opt.json_path.empty()) {
    nlohmann::json doc = {{"benchmark", "nibble bench linear"},
                          {"device", prop.name},
                          {"sm_count", prop.multiProcessorCount},
                          {"l2_bytes", prop.l2CacheSize},
                          {"cuda_runtime", runtime_version},
                          {"date_utc", utc_now()},
                          {"git_commit", commit},
                          {"hadamard_block", opt.block},
                          {"code_range", {cfg.range.qmin, cfg.range.qmax}},
                          {"sample_fraction", opt.sample_fraction},
                          {"runs", runs},
                          {"warmup", warmup},
                          {"dtypes", "x, w, dy bf16; y bf16; nibble dx bf16, dw f32; BF16 baseline dx, dw bf16"},
                          {"notes_slower_than_bf16", notes},
                          {"shapes", jshapes}};
    write_file_atomic(opt.json_path, doc.dump(2) + "\n");  // temporary file, then rename
    std::printf("wrote %s\n", opt.json_path.c_str());
  }
  if (!opt.plot_path.empty()) {
    write_bar_chart_svg(chart, opt.plot_path);
    std::printf("wrote %s\n", opt.plot_path.c_str());
  }
  NB_CUDA_CHECK(cudaStreamDestroy(stream));
  return 0;
}

}  // namespace nibble::bench
