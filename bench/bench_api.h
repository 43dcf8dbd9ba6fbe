#pragma once
// The benchmarks behind `nibble bench gemm` and `nibble bench linear` (tools/nibble/bench_cli.cpp),
// built into the nibble_bench static library when CUDA is on. Plain C++: the CLI includes it
// without the CUDA toolkit's headers. Each returns the process exit status (0 = ok, 1 = a
// check failed) and throws nibble::Error on bad options or CUDA errors. Reading the output:
// bench/README.md.
#include <string>

namespace nibble::bench {

struct GemmBenchOptions {
  std::string json_path;   // empty: no JSON
  std::string plot_path;   // empty: no SVG
  int runs = 30;           // timed runs per kernel (median reported), >= 20
  int warmup = 5;
  std::string shapes;      // "MxNxK,MxNxK,..."; empty: the default list
};
int run_gemm_bench(const GemmBenchOptions& opt);

struct LinearBenchOptions {
  std::string json_path;
  std::string plot_path;
  int runs = 20;
  int warmup = 3;
  std::string shapes;            // "MxNxK,..." with M = tokens, N = out_features, K = in_features
  int block = 32;                // Hadamard block
  bool sampled = true;           // also time the sampled-LSS backward (LssVariant::sampled)
  double sample_fraction = 0.5;  // its Σp / 2N
};
int run_linear_bench(const LinearBenchOptions& opt);

}  // namespace nibble::bench
