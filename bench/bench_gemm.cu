// nibble_bench_gemm: the standalone form of `nibble bench gemm` (bench/gemm_bench.cu holds the
// benchmark; both take the same options).
//
//   nibble_bench_gemm [--json PATH] [--plot PATH.svg] [--runs N] [--warmup N] [--shapes MxNxK,...]
#include <cstdio>
#include <exception>
#include <iostream>
#include <string>

#include "bench/bench_api.h"
#include "nibble/error.h"

int main(int argc, char** argv) try {
  nibble::bench::GemmBenchOptions opt;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto next = [&]() -> std::string {
      NB_CHECK(i + 1 < argc, a << " needs a value");
      return argv[++i];
    };
    if (a == "--json") opt.json_path = next();
    else if (a == "--plot") opt.plot_path = next();
    else if (a == "--runs") opt.runs = std::stoi(next());
    else if (a == "--warmup") opt.warmup = std::stoi(next());
    else if (a == "--shapes") opt.shapes = next();
    else if (a == "-h" || a == "--help") {
      std::cout << "usage: nibble_bench_gemm [--json PATH] [--plot PATH.svg] [--runs N>=20] "
                   "[--warmup N] [--shapes MxNxK,...]\n";
      return 0;
    } else {
      NB_FAIL("unknown argument '" << a << "'; see --help");
    }
  }
  return nibble::bench::run_gemm_bench(opt);
} catch (const std::exception& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 1;
}
