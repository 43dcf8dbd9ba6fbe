// The GEMM benchmark behind `nibble bench gemm` (and the nibble_bench_gemm binary): nibble's
// sm_90a INT8 GEMM against cuBLASLt INT8, BF16 and FP8 (e4m3), all TN (C[M, N] = A[M, K]·B[N, K]ᵀ),
// in one process, timed the same way (bench/common/bench_util.cuh: warm-up, queued launches
// between CUDA events behind a spin kernel, the kernels interleaved launch by launch, rotating
// input sets larger than L2, median of the runs).
//
// Before timing each shape, ours and cuBLASLt INT8 are run on the same inputs and compared
// element by element (a mismatch is reported in the table and the JSON and fails the exit
// code). Reading the table: bench/README.md.
#include <cuda_runtime.h>

#include <cstdio>
#include <functional>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bench/bench_api.h"
#include "bench/bench_report.h"
#include "bench/common/bench_util.cuh"
#include "bench/svg_plot.h"
#include "cuda/blas/cublaslt_baselines.h"
#include "cuda/common/check.h"
#include "cuda/gemm/gemm_s8s8_s32_tn_sm90.h"
#include "cuda/gemm/gemm_sm90_host.h"
#include "nibble/error.h"
#include "nibble/safetensors.h"  // write_file_atomic

namespace nibble::bench {

namespace {

// 8192³; the transformer shapes at M = 16384 tokens (BERT-base/large, LLaMA-7B's 4096/11008);
// and three smaller token counts at 4096² (128, 256, 1024).
std::vector<Shape> default_gemm_shapes() {
  std::vector<Shape> s = {{8192, 8192, 8192}};
  const int64_t nk[][2] = {{768, 768},   {3072, 768},  {768, 3072},   {1024, 1024},  {4096, 1024},
                           {1024, 4096}, {4096, 4096}, {11008, 4096}, {4096, 11008}};
  for (const auto& p : nk) s.push_back({16384, p[0], p[1]});
  s.push_back({128, 4096, 4096});
  s.push_back({256, 4096, 4096});  // the 64x128 tiles' range (128 < M <= 256)
  s.push_back({1024, 4096, 4096});
  return s;
}

// One kernel's result on one shape.
struct Result {
  std::string name;
  Timing t;
  double rate = 0;  // tera-ops per second (2·M·N·K / time)
  std::string algo;
};

}  // namespace

int run_gemm_bench(const GemmBenchOptions& opt) {
  const std::string& json_path = opt.json_path;
  const int runs = opt.runs, warmup = opt.warmup;
  NB_CHECK(runs >= 20, "--runs " << runs << ": use at least 20 for a stable median");
  NB_CHECK(warmup >= 0, "--warmup " << warmup << " must be >= 0");
  const std::vector<Shape> shapes = opt.shapes.empty() ? default_gemm_shapes() : parse_shapes(opt.shapes);
  cudaDeviceProp prop{};
  int device = 0;
  NB_CUDA_CHECK(cudaGetDevice(&device));
  NB_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  const std::string commit = git_commit();
  int runtime_version = 0;
  NB_CUDA_CHECK(cudaRuntimeGetVersion(&runtime_version));
  std::printf("device: %s (%d SMs, L2 %d MiB), CUDA runtime %d, commit %s\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, runtime_version, commit.c_str());
  std::printf("ours: the launchers' tile choice per shape (sm90::choose_tile), named after the check\n");
  std::printf("median of %d timed runs after %d warm-up rounds, the seven kernels interleaved; "
              "rotating input sets > 4x L2\n\n",
              runs, warmup);

  cudaStream_t stream = nullptr;
  NB_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  nlohmann::json jshapes = nlohmann::json::array();
  BarChart chart;
  chart.title = std::string("INT8 GEMM throughput relative to cuBLAS BF16 (") + prop.name + ")";
  chart.y_label = "speed / cuBLAS BF16";
  chart.series = {"ours INT8, s32 out", "ours INT8 + dequant, bf16 out", "cuBLASLt INT8",
                  "cuBLASLt FP8 e4m3"};
  chart.values.assign(chart.series.size(), {});
  bool all_match = true;
  // Every compiled tile configuration is also timed forced (columns after ours/BF16, % of
  // cuBLASLt INT8): paired evidence for the automatic rule on the device at hand.
  const std::vector<cuda::GemmTile> forced(std::begin(cuda::kCompiledGemmTiles),
                                           std::end(cuda::kCompiledGemmTiles));
  std::printf("%-22s %10s %10s %8s %10s %10s %10s %10s %9s", "M x N x K", "ours TOPS",
              "LtI8 TOPS", "ours/Lt", "ours+dq", "BF16 TF", "FP8 TF", "ours ms", "ours/BF16");
  for (size_t t = 0; t < forced.size(); ++t) std::printf("  tile%zu/Lt", t + 1);
  std::printf("  check, tile\n");
  for (size_t t = 0; t < forced.size(); ++t)
    std::printf("  tile%zu = %s\n", t + 1, cuda::sm90::tile_name(forced[t]));
  for (const Shape& s : shapes) {
    const int64_t m = s.m, n = s.n, k = s.k;
    // Each input type has its own rotating sets (A, B), so that all seven kernels can be timed
    // interleaved; outputs (sized for 4-byte elements) and the dequant vectors are per set too.
    const size_t mk = static_cast<size_t>(m * k), nk = static_cast<size_t>(n * k);
    const size_t c_bytes = static_cast<size_t>(m * n) * 4;
    // Rotation is sized on the int8 operands; the bf16 sets are twice as large, so colder.
    const int sets = rotation_sets(mk + nk);
    std::vector<DeviceBytes> A8, B8, A16, B16, Af8, Bf8, C, SA, SB, BIAS;
    for (int i = 0; i < sets; ++i) {
      const uint64_t seed = 1000 + 16 * static_cast<uint64_t>(i);
      A8.emplace_back(mk);
      B8.emplace_back(nk);
      A16.emplace_back(mk * 2);
      B16.emplace_back(nk * 2);
      Af8.emplace_back(mk);
      Bf8.emplace_back(nk);
      C.emplace_back(c_bytes);
      SA.emplace_back(static_cast<size_t>(m) * 4);
      SB.emplace_back(static_cast<size_t>(n) * 4);
      BIAS.emplace_back(static_cast<size_t>(n) * 4);
      fill(A8[i].as<void>(), m * k, Fill::s8_full, seed + 0, stream);
      fill(B8[i].as<void>(), n * k, Fill::s8_full, seed + 1, stream);
      fill(A16[i].as<void>(), m * k, Fill::bf16_unit, seed + 2, stream);
      fill(B16[i].as<void>(), n * k, Fill::bf16_unit, seed + 3, stream);
      fill(Af8[i].as<void>(), m * k, Fill::e4m3_unit, seed + 4, stream);
      fill(Bf8[i].as<void>(), n * k, Fill::e4m3_unit, seed + 5, stream);
      fill(SA[i].as<void>(), m, Fill::f32_scale, seed + 6, stream);
      fill(SB[i].as<void>(), n, Fill::f32_scale, seed + 7, stream);
      fill(BIAS[i].as<void>(), n, Fill::f32_bias, seed + 8, stream);
    }
    DeviceBytes check_c(c_bytes);

    // Check first: ours and cuBLASLt INT8 on the same inputs, every element.
    cuda::gemm_s8s8_s32_tn_sm90({A8[0].as<int8_t>(), B8[0].as<int8_t>(), m, n, k}, C[0].as<int32_t>(), stream);
    cuda::cublaslt_gemm_s8s8_s32_tn(A8[0].as<int8_t>(), B8[0].as<int8_t>(), m, n, k, check_c.as<int32_t>(), stream);
    const uint64_t mismatches = count_mismatches(C[0].as<int32_t>(), check_c.as<int32_t>(), m * n, stream);
    all_match = all_match && mismatches == 0;

    std::vector<std::string> names = {"ours_s8s8_s32", "ours_s8s8_dequant_bf16",
                                      "cublaslt_s8s8_s32", "cublaslt_bf16", "cublaslt_e4m3_bf16"};
    std::vector<std::function<void(int)>> launches = {
        [&](int i) {
          cuda::gemm_s8s8_s32_tn_sm90({A8[i].as<int8_t>(), B8[i].as<int8_t>(), m, n, k},
                                      C[i].as<int32_t>(), stream);
        },
        [&](int i) {
          cuda::EpiDequantBias epi;
          epi.scale_a = SA[i].as<float>();
          epi.scale_b = SB[i].as<float>();
          epi.bias = BIAS[i].as<float>();
          cuda::gemm_s8s8_s32_tn_dequant_sm90({A8[i].as<int8_t>(), B8[i].as<int8_t>(), m, n, k}, epi,
                                              C[i].as<bf16_t>(), stream);
        },
        [&](int i) {
          cuda::cublaslt_gemm_s8s8_s32_tn(A8[i].as<int8_t>(), B8[i].as<int8_t>(), m, n, k,
                                          C[i].as<int32_t>(), stream);
        },
        [&](int i) {
          cuda::cublaslt_gemm_bf16_tn(A16[i].as<bf16_t>(), B16[i].as<bf16_t>(), m, n, k,
                                      C[i].as<bf16_t>(), stream);
        },
        [&](int i) {
          cuda::cublaslt_gemm_e4m3_bf16_tn(Af8[i].as<uint8_t>(), Bf8[i].as<uint8_t>(), m, n, k,
                                           C[i].as<bf16_t>(), stream);
        },
    };
    // Every compiled tile forced, timed in the same interleaved rounds.
    for (const cuda::GemmTile tile : forced) {
      names.push_back(std::string("ours_s8s8_s32_forced_") + cuda::sm90::tile_name(tile));
      launches.push_back([&, tile](int i) {
        cuda::gemm_s8s8_s32_tn_sm90({A8[i].as<int8_t>(), B8[i].as<int8_t>(), m, n, k, tile},
                                    C[i].as<int32_t>(), stream);
      });
    }
    const std::vector<Timing> times = time_interleaved(launches, sets, warmup, runs, stream);
    const double ops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
    std::vector<Result> results;
    for (size_t j = 0; j < names.size(); ++j) {
      Result r;
      r.name = names[j];
      r.t = times[j];
      r.rate = ops / (r.t.median_ms * 1e-3) / 1e12;
      results.push_back(r);
    }
    results[2].algo = cuda::cublaslt_algo_description(cuda::CublasLtKind::s8s8_s32, m, n, k);
    results[3].algo = cuda::cublaslt_algo_description(cuda::CublasLtKind::bf16, m, n, k);
    results[4].algo = cuda::cublaslt_algo_description(cuda::CublasLtKind::e4m3_bf16, m, n, k);
    const Result& ours = results[0];
    const Result& ours_dq = results[1];
    const Result& lt_i8 = results[2];
    const Result& lt_bf16 = results[3];
    const Result& lt_fp8 = results[4];

    char label[64];
    std::snprintf(label, sizeof(label), "%lld x %lld x %lld", static_cast<long long>(m),
                  static_cast<long long>(n), static_cast<long long>(k));
    const char* tile = cuda::sm90::tile_name(cuda::sm90::choose_tile({nullptr, nullptr, m, n, k}));
    std::printf("%-22s %10.0f %10.0f %7.1f%% %10.0f %10.0f %10.0f %10.4f %8.2fx", label,
                ours.rate, lt_i8.rate, 100.0 * ours.rate / lt_i8.rate, ours_dq.rate, lt_bf16.rate,
                lt_fp8.rate, ours.t.median_ms, ours.rate / lt_bf16.rate);
    for (size_t t = 0; t < forced.size(); ++t)
      std::printf("  %8.1f%%", 100.0 * results[5 + t].rate / lt_i8.rate);
    std::printf("  %s %s\n", mismatches == 0 ? "exact" : "MISMATCH", tile);
    std::fflush(stdout);

    nlohmann::json js = {{"m", m}, {"n", n}, {"k", k}, {"rotating_sets", sets},
                         {"ours_vs_cublaslt_int8_mismatches", mismatches},
                         {"ours_tile", tile},
                         {"ours_pct_of_cublaslt_int8", 100.0 * ours.rate / lt_i8.rate},
                         {"ours_over_cublas_bf16", ours.rate / lt_bf16.rate}};
    for (const Result& r : results) {
      js["kernels"][r.name] = {{"median_ms", r.t.median_ms}, {"min_ms", r.t.min_ms},
                               {"max_ms", r.t.max_ms},       {"runs", r.t.runs},
                               {"tera_ops_per_s", r.rate}};
      if (!r.algo.empty()) js["kernels"][r.name]["cublaslt_algo"] = r.algo;
    }
    jshapes.push_back(js);
    chart.groups.push_back(shape_label(s));
    chart.values[0].push_back(ours.rate / lt_bf16.rate);
    chart.values[1].push_back(ours_dq.rate / lt_bf16.rate);
    chart.values[2].push_back(lt_i8.rate / lt_bf16.rate);
    chart.values[3].push_back(lt_fp8.rate / lt_bf16.rate);
  }

  if (!json_path.empty()) {
    nlohmann::json doc = {{"benchmark", "nibble bench gemm"},
                          {"device", prop.name},
                          {"sm_count", prop.multiProcessorCount},
                          {"l2_bytes", prop.l2CacheSize},
                          {"cuda_runtime", runtime_version},
                          {"date_utc", utc_now()},
                          {"git_commit", commit},
                          {"ours_config", "sm90::choose_tile per shape (shapes[].ours_tile)"},
                          {"runs", runs},
                          {"warmup", warmup},
                          {"ops_convention", "2*M*N*K per GEMM"},
                          {"shapes", jshapes}};
    write_file_atomic(json_path, doc.dump(2) + "\n");  // temporary file, then rename
    std::printf("\nwrote %s\n", json_path.c_str());
  }
  NB_CUDA_CHECK(cudaStreamDestroy(stream));
  if (!opt.plot_path.empty()) {
    write_bar_chart_svg(chart, opt.plot_path);
    std::printf("wrote %s\n", opt.plot_path.c_str());
  }
  if (!all_match) {
    std::fprintf(stderr, "error: ours and cuBLASLt INT8 disagree on at least one shape\n");
    return 1;
  }
  return 0;
}

}  // namespace nibble::bench
