#include "bench_cli.h"

#include <memory>
#include <string>

#include "nibble/error.h"
#if defined(NIBBLE_HAS_CUDA)
#include "bench/bench_api.h"
#endif

namespace nibble::cli {
namespace {

struct GemmArgs {
  std::string json, plot, shapes;
  int runs = 30, warmup = 5;
};

struct LinearArgs {
  std::string json, plot, shapes;
  int runs = 20, warmup = 3, block = 32;
  bool no_sampled = false;
  double sample_fraction = 0.5;
};

#if !defined(NIBBLE_HAS_CUDA)
[[noreturn]] void no_cuda(const char* what) {
  NB_FAIL("nibble bench " << what << " needs the CUDA backend, but this nibble was built without "
                             "CUDA; rebuild with nvcc on the PATH (cmake -DNIBBLE_WITH_CUDA=ON, "
                             "and scripts/setup.sh for the CUTLASS headers) on a machine with an "
                             "H100/H200");
}
#endif

int run_gemm(const GemmArgs& a) {
#if defined(NIBBLE_HAS_CUDA)
  bench::GemmBenchOptions o;
  o.json_path = a.json;
  o.plot_path = a.plot;
  o.shapes = a.shapes;
  o.runs = a.runs;
  o.warmup = a.warmup;
  return bench::run_gemm_bench(o);
#else
  (void)a;
  no_cuda("gemm");
#endif
}

int run_linear(const LinearArgs& a) {
#if defined(NIBBLE_HAS_CUDA)
  bench::LinearBenchOptions o;
  o.json_path = a.json;
  o.plot_path = a.plot;
  o.shapes = a.shapes;
  o.runs = a.runs;
  o.warmup = a.warmup;
  o.block = a.block;
  o.sampled = !a.no_sampled;
  o.sample_fraction = a.sample_fraction;
  return bench::run_linear_bench(o);
#else
  (void)a;
  no_cuda("linear");
#endif
}

}  // namespace

std::vector<Subcommand> add_bench_commands(CLI::App& app) {
  CLI::App* bench = app.add_subcommand(
      "bench", "GPU benchmarks (sm_90a: H100/H200): the INT8 GEMM and the INT4 linear layer "
               "against cuBLAS BF16 (bench/README.md explains the output)");
  bench->require_subcommand(1);

  auto g = std::make_shared<GemmArgs>();
  CLI::App* gemm = bench->add_subcommand(
      "gemm", "nibble's INT8 GEMM (int32 and fused-dequant outputs) vs cuBLASLt INT8, BF16, FP8");
  gemm->add_option("--json", g->json, "write every number (device, date, commit) as JSON here");
  gemm->add_option("--plot", g->plot, "write a bar chart of the ratios to BF16 as SVG here");
  gemm->add_option("--runs", g->runs, "timed runs per kernel (median)")
      ->check(CLI::Range(20, 100000))
      ->capture_default_str();
  gemm->add_option("--warmup", g->warmup, "warm-up rounds")->check(CLI::Range(0, 1000))->capture_default_str();
  gemm->add_option("--shapes", g->shapes, "MxNxK,MxNxK,... (default: the list in bench/README.md)");

  auto l = std::make_shared<LinearArgs>();
  CLI::App* linear = bench->add_subcommand(
      "linear", "the INT4 linear layer (HQ forward, bit-split backward) vs BF16 cuBLAS, forward "
                "and backward, with a per-kernel breakdown");
  linear->add_option("--json", l->json, "write every number (device, date, commit) as JSON here");
  linear->add_option("--plot", l->plot, "write a bar chart of the speed-ups over BF16 as SVG here");
  linear->add_option("--runs", l->runs, "timed runs per variant (median)")
      ->check(CLI::Range(10, 100000))
      ->capture_default_str();
  linear->add_option("--warmup", l->warmup, "warm-up rounds")->check(CLI::Range(0, 1000))->capture_default_str();
  linear->add_option("--shapes", l->shapes,
                     "MxNxK,... with M = tokens, N = out_features, K = in_features, all multiples "
                     "of 16 (default: the paper's six, M = 16384 transformer shapes, M = 128, "
                     "256 and 1024 at 4096x4096)");
  linear->add_option("--block", l->block, "Hadamard block (power of two dividing K)")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  linear->add_flag("--no-sampled", l->no_sampled, "skip the sampled-LSS variant");
  linear->add_option("--sample-fraction", l->sample_fraction,
                     "sampled variant: expected kept split rows / 2N")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();

  return {Subcommand{gemm, [g] { return run_gemm(*g); }},
          Subcommand{linear, [l] { return run_linear(*l); }}};
}

}  // namespace nibble::cli
