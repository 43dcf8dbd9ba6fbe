#include "cuda/gemm/gemm_sm90_host.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>

#include "cuda/common/check.h"

namespace nibble::cuda::sm90 {

namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Compute capability of the current device as 10·major + minor, queried once per device.
int device_cc() {
  int device = 0;
  NB_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex m;
  static std::map<int, int> ccs;
  std::lock_guard<std::mutex> lock(m);
  auto it = ccs.find(device);
  if (it == ccs.end()) {
    int major = 0, minor = 0;
    NB_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    NB_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    it = ccs.emplace(device, 10 * major + minor).first;
  }
  return it->second;
}

}  // namespace

void check_gemm_params(const char* fn, const GemmS8S8Params& p, const void* out, int out_bytes) {
  const int cc = device_cc();
  NB_CHECK(cc == 90, fn << " needs a compute capability 9.0 GPU (H100/H200, sm_90a wgmma); this "
                        << "device is " << cc / 10 << "." << cc % 10
                        << "; use the reference backend on other GPUs");
  NB_CHECK(p.m >= 0 && p.n >= 0 && p.k >= 0,
           fn << ": negative size M=" << p.m << ", N=" << p.n << ", K=" << p.k);
  NB_CHECK(p.m < (int64_t{1} << 31) && p.n < (int64_t{1} << 31) && p.k < (int64_t{1} << 31),
           fn << ": M=" << p.m << ", N=" << p.n << ", K=" << p.k
              << " exceeds 2^31 - 1; split the GEMM into smaller ones");
  NB_CHECK(p.k % 16 == 0, fn << ": K=" << p.k
                             << " is not a multiple of 16; rows of A and B must be multiples of "
                                "16 bytes for the tensor-memory copies: zero-pad K to "
                             << (p.k + 15) / 16 * 16);
  NB_CHECK(p.n * out_bytes % 16 == 0,
           fn << ": N=" << p.n << " gives output rows of " << p.n * out_bytes
              << " bytes, not a multiple of 16; N must be a multiple of " << 16 / out_bytes
              << " for this output type: pad N to "
              << (p.n * out_bytes + 15) / 16 * 16 / out_bytes);
  NB_CHECK(p.max_sms >= 0, fn << ": max_sms = " << p.max_sms
                              << " is negative; pass 0 for every SM or a positive cap");
  if (p.m == 0 || p.n == 0) return;
  NB_CHECK(out != nullptr, fn << ": the output pointer is null");
  NB_CHECK(aligned16(out), fn << ": the output pointer " << out
                              << " is not 16-byte aligned; pass a cudaMalloc'd base or an "
                                 "offset that is a multiple of 16 bytes");
  if (p.k == 0) return;
  NB_CHECK(p.a != nullptr && p.b != nullptr, fn << ": A or B is null with M, N, K > 0");
  NB_CHECK(aligned16(p.a) && aligned16(p.b),
           fn << ": A (" << static_cast<const void*>(p.a) << ") and B ("
              << static_cast<const void*>(p.b)
              << ") must be 16-byte aligned; pass cudaMalloc'd bases or offsets that are "
                 "multiples of 16 bytes");
}

void check_epilogue(const char* fn, const EpiDequantBias& epi) {
  const auto aligned4 = [](const float* q) { return reinterpret_cast<uintptr_t>(q) % 4 == 0; };
  NB_CHECK(aligned4(epi.scale_a) && aligned4(epi.scale_b) && aligned4(epi.bias),
           fn << ": scale_a, scale_b and bias must be 4-byte aligned float pointers");
}

GemmTile choose_tile(const GemmS8S8Params& p) {
  if (p.tile != GemmTile::automatic) return p.tile;
  // From the H200 sweeps (bench/README.md "H200, 2026-12-03"): one M tile (M ≤ 128) leaves
  // half of a 2×1 cluster idle; narrow, deep products (N ≤ 1024, K ≥ 3072) measured 7-10%
  // faster with A multicast along N; so did every product wider than tall with M > 1024 (the
  // paper's shapes and their dx/dw GEMMs: 1-5%, and 8704×10752×15360 102.8% vs 88.8% of
  // cuBLASLt). At M ≤ 1024 the 2×1 cluster stays (1024×4096×16384: 103.6% vs 95.2%).
  // Small M (sweep of 2026-12-04, bench/README.md run S9): 64-row tiles give the idle SMs
  // work. M = 128: 64×64 at 144% of cuBLASLt INT8 (128×4096²) and 132% (128×4096×11008)
  // against 92% and 73% for the best 128-row tile; 128×11008×4096 is the one shape where it
  // trails (119% vs 125% for 128×128 1×2). M = 256: 64×128 at 159% vs 128%. M = 512: the
  // 128-row tiles win again (163% vs 144%).
  if (p.m <= 128) return GemmTile::pingpong_64x64_c2x1;
  if (p.m <= 256) return GemmTile::pingpong_64x128_c2x1;
  if ((p.n <= 1024 && p.k >= 3072) || (p.m > 1024 && p.m < p.n))
    return GemmTile::pingpong_128x128_c1x2;
  return GemmTile::pingpong_128x128_c2x1;
}

int same_round_sms(const GemmS8S8Params& p, int sms) {
  NB_CHECK(sms > 0, "sm90::same_round_sms: sms = " << sms << " must be positive");
  const GemmTileShape shape = gemm_tile_shape(choose_tile(p));
  const int64_t tile_m = shape.m, tile_n = shape.n;
  const int64_t cluster = shape.cluster_m * shape.cluster_n;
  const int64_t tiles = ((p.m + tile_m - 1) / tile_m) * ((p.n + tile_n - 1) / tile_n);
  if (tiles == 0) return sms;
  // whole clusters only, as the launcher rounds a cap (an odd SM count loses one SM)
  const int64_t usable = std::max<int64_t>(cluster, sms / cluster * cluster);
  const int64_t rounds = (tiles + usable - 1) / usable;
  const int64_t need = (tiles + rounds - 1) / rounds;
  return static_cast<int>(std::min<int64_t>(usable, (need + cluster - 1) / cluster * cluster));
}

const char* tile_name(GemmTile tile) {
  switch (tile) {
    case GemmTile::automatic: return "automatic";
    case GemmTile::pingpong_128x128_c2x1: return "pingpong_128x128x128_c2x1";
    case GemmTile::pingpong_128x128_c1x2: return "pingpong_128x128x128_c1x2";
    case GemmTile::coop_128x256_c2x1: return "coop_128x256x128_c2x1";
    case GemmTile::pingpong_64x64_c2x1: return "pingpong_64x64x128_c2x1";
    case GemmTile::pingpong_64x128_c2x1: return "pingpong_64x128x128_c2x1";
  }
  return "unknown";
}

}  // namespace nibble::cuda::sm90
