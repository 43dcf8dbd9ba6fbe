// Throughput of the CPU integer GEMM kernels (ref/gemm.h) on C[M, N] = A[M, K]·B[N, K]ᵀ:
// every kernel this CPU has, best of several runs, and a check that each returns the loops'
// bits.
//   nibble_bench_gemm_cpu [M N K] [--threads T] [--reps R]
// Default shape 2048 × 384 × 128: a GPT layer's qkv projection on 32 × 64 tokens.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "nibble/parallel.h"
#include "nibble/rng.h"
#include "ref/gemm.h"

int main(int argc, char** argv) {
  using namespace nibble;
  int64_t dims[3] = {2048, 384, 128};
  int threads = 2, reps = 5, positional = 0;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      threads = std::stoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
      reps = std::stoi(argv[++i]);
    } else if (positional < 3) {
      dims[positional++] = std::stoll(argv[i]);
    }
  }
  const int64_t m = dims[0], n = dims[1], k = dims[2];
  set_num_threads(threads);
  const PhiloxKey key{1, 0, 0, RngRole::data};
  std::vector<int8_t> a(static_cast<size_t>(m * k)), b(static_cast<size_t>(n * k));
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<int8_t>(philox_u32(key, i) % 181) - 90;
  for (size_t i = 0; i < b.size(); ++i)
    b[i] = static_cast<int8_t>(static_cast<int32_t>(philox_u32(key, a.size() + i) % 15) - 7);
  std::vector<int32_t> want(static_cast<size_t>(m * n));
  ref::gemm_s8s8_s32_tn_loops(a.data(), b.data(), m, n, k, want.data());

  std::printf("M=%lld N=%lld K=%lld, %d threads\n", static_cast<long long>(m),
              static_cast<long long>(n), static_cast<long long>(k), num_threads());
  for (ref::GemmKernel kernel : {ref::GemmKernel::loops, ref::GemmKernel::blocked,
                                 ref::GemmKernel::blocked_avx2,
                                 ref::GemmKernel::blocked_avx512_vnni}) {
    if (!ref::gemm_kernel_available(kernel)) {
      std::printf("  %-20s not available on this CPU\n", ref::gemm_kernel_name(kernel));
      continue;
    }
    std::vector<int32_t> c(want.size());
    double best = 1e30;
    for (int r = 0; r < reps; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      ref::gemm_s8s8_s32_tn_with(kernel, a.data(), b.data(), m, n, k, c.data());
      const auto t1 = std::chrono::steady_clock::now();
      best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
    }
    // GOP/s counts a multiply and an add per MAC.
    std::printf("  %-20s %9.3f ms  %8.1f GOP/s  %s%s\n", ref::gemm_kernel_name(kernel), best * 1e3,
                2.0 * static_cast<double>(m * n * k) / best * 1e-9,
                c == want ? "bit-identical to loops" : "MISMATCH",
                kernel == ref::gemm_default_kernel() ? "  (default)" : "");
  }
  return 0;
}
