// nibble_bench_gemm_sweep: times every registered INT8 GEMM tile config (and the tile
// scheduler's run-time knobs) against cuBLASLt INT8, after checking each config's output
// against cuBLASLt's element by element. Used to choose the config that
// src/cuda/gemm/gemm_s8s8_s32_tn_sm90.cu compiles in; results go to bench/README.md.
//
//   nibble_bench_gemm_sweep [--shapes MxNxK,...] [--runs N] [--knobs]
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "bench/common/bench_util.cuh"
#include "bench/gemm_sweep_sm90.h"
#include "cuda/blas/cublaslt_baselines.h"
#include "nibble/error.h"

using namespace nibble;

namespace nibble::bench {
std::vector<SweepConfig>& sweep_registry() {
  static std::vector<SweepConfig> r;
  return r;
}
}  // namespace nibble::bench

int main(int argc, char** argv) try {
  struct Shape { int64_t m, n, k; };
  std::vector<Shape> shapes = {
      {8192, 8192, 8192},   {16384, 4096, 4096},  {16384, 768, 768},   {16384, 3072, 768},
      {16384, 768, 3072},   {16384, 1024, 1024},  {16384, 4096, 1024}, {16384, 1024, 4096},
      {16384, 11008, 4096}, {16384, 4096, 11008}, {1024, 4096, 4096},  {128, 4096, 4096}};
  int runs = 20;
  bool knobs = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--runs" && i + 1 < argc) runs = std::stoi(argv[++i]);
    else if (a == "--knobs") knobs = true;
    else if (a == "--shapes" && i + 1 < argc) {
      shapes.clear();
      std::stringstream ss(argv[++i]);
      std::string item;
      while (std::getline(ss, item, ',')) {
        Shape s{};
        char x = 0;
        std::stringstream is(item);
        is >> s.m >> x >> s.n >> x >> s.k;
        shapes.push_back(s);
      }
    } else {
      NB_FAIL("unknown argument '" << a << "'");
    }
  }
  cudaStream_t stream = nullptr;
  NB_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  bool ok = true;

  // Every (config, knobs) variant to time: default knobs for all; with --knobs also swizzle 4
  // along M and along N; split-K 2, 4, 8 for the stream-K configs.
  struct Variant {
    const bench::SweepConfig* cfg;
    bench::SweepKnobs kn;
    std::string label;
  };
  std::vector<Variant> variants;
  for (const auto& cfg : bench::sweep_registry()) {
    std::vector<bench::SweepKnobs> kns = {{1, 0, 1}};
    if (knobs) {
      kns.push_back({4, 1, 1});
      kns.push_back({4, 2, 1});
    }
    if (cfg.stream_k) {
      kns.push_back({1, 0, 2});
      kns.push_back({1, 0, 4});
      kns.push_back({1, 0, 8});
    }
    for (const auto& kn : kns) {
      std::ostringstream os;
      os << cfg.name << " swz=" << kn.max_swizzle << " raster=" << kn.raster;
      if (kn.splits > 1) os << " splitk=" << kn.splits;
      variants.push_back({&cfg, kn, os.str()});
    }
  }

  for (const Shape& s : shapes) {
    const int64_t m = s.m, n = s.n, k = s.k;
    const size_t ab = static_cast<size_t>((m + n) * k);
    const int sets = bench::rotation_sets(ab);
    std::vector<bench::DeviceBytes> A, B, C;
    for (int i = 0; i < sets; ++i) {
      A.emplace_back(static_cast<size_t>(m * k));
      B.emplace_back(static_cast<size_t>(n * k));
      C.emplace_back(static_cast<size_t>(m * n) * 4);
      bench::fill(A[i].as<void>(), m * k, bench::Fill::s8_full, 11 + 2 * static_cast<uint64_t>(i), stream);
      bench::fill(B[i].as<void>(), n * k, bench::Fill::s8_full, 12 + 2 * static_cast<uint64_t>(i), stream);
    }
    bench::DeviceBytes want(static_cast<size_t>(m * n) * 4);
    cuda::cublaslt_gemm_s8s8_s32_tn(A[0].as<int8_t>(), B[0].as<int8_t>(), m, n, k, want.as<int32_t>(), stream);

    // Check every variant once, then time them all interleaved with cuBLASLt.
    std::vector<uint64_t> bad(variants.size());
    std::vector<std::function<void(int)>> launches;
    launches.push_back([&](int i) {
      cuda::cublaslt_gemm_s8s8_s32_tn(A[i].as<int8_t>(), B[i].as<int8_t>(), m, n, k, C[i].as<int32_t>(), stream);
    });
    for (size_t v = 0; v < variants.size(); ++v) {
      const Variant& var = variants[v];
      NB_CUDA_CHECK(cudaMemsetAsync(C[0].as<void>(), 0xA5, static_cast<size_t>(m * n) * 4, stream));
      var.cfg->run({A[0].as<int8_t>(), B[0].as<int8_t>(), m, n, k}, C[0].as<int32_t>(), var.kn, stream);
      bad[v] = bench::count_mismatches(C[0].as<int32_t>(), want.as<int32_t>(), m * n, stream);
      ok = ok && bad[v] == 0;
      launches.push_back([&, v](int i) {
        variants[v].cfg->run({A[i].as<int8_t>(), B[i].as<int8_t>(), m, n, k}, C[i].as<int32_t>(),
                             variants[v].kn, stream);
      });
    }
    const auto t = bench::time_interleaved(launches, sets, 3, runs, stream);
    const double ops = 2.0 * static_cast<double>(m * n) * static_cast<double>(k);
    const double lt_rate = ops / (t[0].median_ms * 1e-3) / 1e12;
    std::printf("\n%lld x %lld x %lld: cuBLASLt INT8 %.0f TOPS (%.4f ms) [%s]\n",
                static_cast<long long>(m), static_cast<long long>(n), static_cast<long long>(k),
                lt_rate, t[0].median_ms,
                cuda::cublaslt_algo_description(cuda::CublasLtKind::s8s8_s32, m, n, k).c_str());
    for (size_t v = 0; v < variants.size(); ++v) {
      const auto& tv = t[v + 1];
      const double rate = ops / (tv.median_ms * 1e-3) / 1e12;
      std::printf("  %-58s %6.0f TOPS  %6.1f%% of cuBLASLt  (%.4f ms, min %.4f)%s\n",
                  variants[v].label.c_str(), rate, 100.0 * rate / lt_rate, tv.median_ms, tv.min_ms,
                  bad[v] ? "  MISMATCH" : "");
    }
    std::fflush(stdout);
  }
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 1;
}
