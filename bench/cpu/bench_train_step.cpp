// Times forward+backward training steps of a char-level GPT on the CPU backend, one
// precision plan at a time, and prints a checksum of every loss and gradient bit so that
// two builds can be compared for bit-identical results (same checksum = same bits).
//
//   nibble_bench_train_step [--precision fp32|int8|int4|w4a4] [--steps 6] [--threads 2]
//                           [--layers 4] [--d-model 128] [--heads 4] [--context 64]
//                           [--batch 32] [--first-step 0]
// Output: one line per step (seconds) and a summary line with the best and median step
// time and the checksum. Step 0 includes the Hadamard block search of int4 layers; the
// summary leaves it out when there is more than one step.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "nibble/nn.h"
#include "nibble/parallel.h"
#include "nibble/rng.h"

namespace {

// FNV-1a over raw bytes: a checksum of bit patterns, not of values.
struct Fnv {
  uint64_t h = 1469598103934665603ull;
  void add(const void* p, size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  }
};

int64_t arg_int(int argc, char** argv, const char* name, int64_t fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return std::stoll(argv[i + 1]);
  return fallback;
}
std::string arg_str(int argc, char** argv, const char* name, const char* fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return argv[i + 1];
  return fallback;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace nibble;
  const std::string prec = arg_str(argc, argv, "--precision", "int4");
  const int64_t steps = arg_int(argc, argv, "--steps", 6);
  const int64_t first_step = arg_int(argc, argv, "--first-step", 0);
  set_num_threads(static_cast<int>(arg_int(argc, argv, "--threads", 2)));
  nn::GptConfig cfg;
  cfg.n_layers = arg_int(argc, argv, "--layers", 4);
  cfg.d_model = arg_int(argc, argv, "--d-model", 128);
  cfg.n_heads = arg_int(argc, argv, "--heads", 4);
  cfg.context = arg_int(argc, argv, "--context", 64);
  const int64_t batch = arg_int(argc, argv, "--batch", 32);

  const nn::PrecisionPlan plan = nn::PrecisionPlan::uniform(nn::precision_from_name(prec));
  std::unique_ptr<nn::Model> model = nn::make_gpt(cfg, plan, 1234);
  std::vector<nn::Param*> params = model->parameters();

  Fnv fnv;
  std::vector<double> times;
  for (int64_t s = 0; s < steps; ++s) {
    // A fresh batch of random tokens per step (targets: the next token of the same stream).
    nn::Batch b;
    b.size = batch;
    b.seq = cfg.context;
    const PhiloxKey key{99, static_cast<uint32_t>(s), 0, RngRole::data};
    for (int64_t i = 0; i < batch * cfg.context; ++i) {
      const auto u = static_cast<uint64_t>(i);
      b.tokens.push_back(static_cast<int32_t>(philox_u32(key, u) % cfg.vocab));
      b.targets.push_back(static_cast<int32_t>(philox_u32(key, u + 1) % cfg.vocab));
    }
    for (nn::Param* p : params)
      std::memset(p->grad.data<float>(), 0, static_cast<size_t>(p->grad.numel()) * sizeof(float));
    nn::StepContext ctx;
    ctx.seed = 7;
    ctx.step = static_cast<uint32_t>(first_step + s);
    const auto t0 = std::chrono::steady_clock::now();
    const nn::StepResult r = model->forward_backward(b, ctx);
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    times.push_back(sec);
    fnv.add(&r.loss, sizeof r.loss);
    for (nn::Param* p : params) fnv.add(p->grad.data<float>(), p->grad.numel() * sizeof(float));
    std::printf("step %lld  %.4f s  loss %.6f\n", static_cast<long long>(ctx.step), sec, r.loss);
  }
  // The Hadamard blocks the int4 layers chose (searched on the first batch).
  std::string blocks;
  for (const auto& [k, v] : model->extra_state())
    if (k.size() > 15 && k.compare(k.size() - 15, 15, ".hadamard_block") == 0) blocks += " " + v;
  if (!blocks.empty()) std::printf("hadamard blocks:%s\n", blocks.c_str());
  std::vector<double> timed(times.begin() + (times.size() > 1 ? 1 : 0), times.end());
  std::sort(timed.begin(), timed.end());
  std::printf("%s threads %d: best %.4f s/step, median %.4f s/step, checksum %016llx\n",
              prec.c_str(), num_threads(), timed.front(), timed[timed.size() / 2],
              static_cast<unsigned long long>(fnv.h));
  return 0;
}
