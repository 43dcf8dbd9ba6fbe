// GPU tests of the sm_90a INT8 GEMMs and the cuBLASLt baselines (binary nibble_gpu_tests,
// CTest label "gpu": run by `make test-gpu`, never by `make test`).
//   - int32 outputs: bit-exact against nibble::ref::gemm_s8s8_s32_tn, and cuBLASLt INT8
//     bit-exact against ours, on odd-but-legal shapes with full-range and small codes;
//   - the fused dequantizing epilogue against ref::epilogue_dequant on the same accumulators,
//     within the output type's rounding (bounds derived at check_dequant);
//   - argument checks (alignment, K/N multiples) throw nibble::Error naming the requirement.
// Every case draws fresh Philox inputs (its own seed); outputs are poisoned before each run,
// so an element the kernel never writes cannot pass.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <string>
#include <vector>

#include "cuda/blas/cublaslt_baselines.h"
#include "cuda/common/check.h"
#include "cuda/common/stream_fork.h"
#include "cuda/common/workspace.h"
#include "cuda/gemm/gemm_s8s8_s32_tn_sm90.h"
#include "cuda/gemm/gemm_sm90_host.h"
#include "gpu/device_buffer.h"
#include "nibble/dtype.h"
#include "nibble/error.h"
#include "nibble/parallel.h"
#include "nibble/rng.h"
#include "ref/gemm.h"
#include "ref/hadamard.h"

using namespace nibble;

namespace {

using test::DeviceBuffer;

// Codes uniform in [lo, hi] from the Philox stream of `seed` (parallel: each index is its own).
std::vector<int8_t> random_codes(int64_t count, int lo, int hi, uint64_t seed) {
  std::vector<int8_t> q(static_cast<size_t>(count));
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  const uint32_t span = static_cast<uint32_t>(hi - lo + 1);
  const int64_t chunk = 1 << 16;
  parallel_for((count + chunk - 1) / chunk, [&](int64_t c) {
    for (int64_t i = c * chunk; i < std::min(count, (c + 1) * chunk); ++i)
      q[static_cast<size_t>(i)] =
          static_cast<int8_t>(lo + static_cast<int>(philox_u32(key, static_cast<uint64_t>(i)) % span));
  });
  return q;
}

// Floats uniform in [lo, hi) (on Philox's 2^-24 grid).
std::vector<float> random_floats(int64_t count, float lo, float hi, uint64_t seed) {
  std::vector<float> v(static_cast<size_t>(count));
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  for (int64_t i = 0; i < count; ++i)
    v[static_cast<size_t>(i)] = lo + (hi - lo) * philox_uniform(key, static_cast<uint64_t>(i));
  return v;
}

// Seeds: each case gets its own, derived from a fixed base so failures reproduce.
uint64_t seed_for(int64_t m, int64_t n, int64_t k, int variant) {
  return 0x6e6962626c65ull ^ (static_cast<uint64_t>(m) << 40) ^ (static_cast<uint64_t>(n) << 20) ^
         static_cast<uint64_t>(k) ^ (static_cast<uint64_t>(variant) << 60);
}

// Counts mismatches between two int32 results; reports the first few.
int64_t count_mismatches(const std::vector<int32_t>& got, const std::vector<int32_t>& want,
                         int64_t n, const char* what) {
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (got[i] != want[i]) {
      if (bad < 5)
        ADD_FAILURE() << what << ": c[" << static_cast<int64_t>(i) / n << ", "
                      << static_cast<int64_t>(i) % n << "] = " << got[i] << ", expected "
                      << want[i];
      ++bad;
    }
  }
  return bad;
}

struct Shape3 {
  int64_t m, n, k;
};

// ours and cuBLASLt INT8 vs the CPU reference, all elements, exact.
void check_s32(const Shape3& s, int lo, int hi, uint64_t seed,
               cuda::GemmTile tile = cuda::GemmTile::automatic, int max_sms = 0) {
  SCOPED_TRACE(testing::Message() << "M=" << s.m << " N=" << s.n << " K=" << s.k << " codes ["
                                  << lo << ", " << hi << "] seed " << seed << " tile "
                                  << cuda::sm90::tile_name(tile) << " max_sms " << max_sms);
  const auto a = random_codes(s.m * s.k, lo, hi, seed);
  const auto b = random_codes(s.n * s.k, lo, hi, seed + 1);
  std::vector<int32_t> want(static_cast<size_t>(s.m * s.n));
  ref::gemm_s8s8_s32_tn(a.data(), b.data(), s.m, s.n, s.k, want.data());

  DeviceBuffer<int8_t> da(s.m * s.k), db(s.n * s.k);
  DeviceBuffer<int32_t> dc(s.m * s.n), dl(s.m * s.n);
  da.upload(a);
  db.upload(b);
  dc.poison();
  dl.poison();
  cuda::gemm_s8s8_s32_tn_sm90({da.get(), db.get(), s.m, s.n, s.k, tile, max_sms}, dc.get(), nullptr);
  cuda::cublaslt_gemm_s8s8_s32_tn(da.get(), db.get(), s.m, s.n, s.k, dl.get(), nullptr);
  NB_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_EQ(count_mismatches(dc.download(), want, s.n, "ours vs ref"), 0);
  EXPECT_EQ(count_mismatches(dl.download(), want, s.n, "cuBLASLt vs ref"), 0);
}

const std::vector<Shape3>& odd_shapes() {
  static const std::vector<Shape3> shapes = {
      {1, 16, 16},     {3, 48, 784},    {129, 784, 48},  {1000, 16, 4096}, {1, 4096, 784},
      {129, 4096, 16}, {3, 784, 4096},  {1000, 48, 784}, {129, 1040, 272}, {257, 272, 1040},
      {1000, 784, 784}};
  return shapes;
}

TEST(GemmS8S8S32TnSm90, BitExactOnOddShapesFullRange) {
  for (const auto& s : odd_shapes()) check_s32(s, -128, 127, seed_for(s.m, s.n, s.k, 1));
}

TEST(GemmS8S8S32TnSm90, BitExactOnOddShapesSmallCodes) {
  // INT4 values, the range the GEMM sees in training.
  for (const auto& s : odd_shapes()) check_s32(s, -8, 7, seed_for(s.m, s.n, s.k, 2));
}

TEST(GemmS8S8S32TnSm90, BitExactAtTransformerShape) {
  check_s32({1024, 3072, 768}, -128, 127, seed_for(1024, 3072, 768, 3));
}

// A large product with full-range codes through the launcher's own tile choice: ours vs
// cuBLASLt INT8 (checked against the reference on the odd shapes) on every element. Returns
// ours; the operands come back through a and b.
std::vector<int32_t> check_large_vs_cublaslt(int64_t m, int64_t n, int64_t k, uint64_t seed,
                                             std::vector<int8_t>& a, std::vector<int8_t>& b) {
  a = random_codes(m * k, -128, 127, seed);
  b = random_codes(n * k, -128, 127, seed + 1);
  DeviceBuffer<int8_t> da(m * k), db(n * k);
  DeviceBuffer<int32_t> dc(m * n), dl(m * n);
  da.upload(a);
  db.upload(b);
  dc.poison();
  dl.poison();
  cuda::gemm_s8s8_s32_tn_sm90({da.get(), db.get(), m, n, k}, dc.get(), nullptr);
  cuda::cublaslt_gemm_s8s8_s32_tn(da.get(), db.get(), m, n, k, dl.get(), nullptr);
  NB_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<int32_t> ours = dc.download();
  EXPECT_EQ(count_mismatches(ours, dl.download(), n, "ours vs cuBLASLt"), 0);
  return ours;
}

// 8192³ once: ours vs cuBLASLt on every element, both vs the CPU reference on 64 sampled rows
// (the full CPU product, 5.5e11 multiply-adds, would take minutes).
TEST(GemmS8S8S32TnSm90, BitExactAt8192Cubed) {
  const int64_t m = 8192, n = 8192, k = 8192;
  const uint64_t seed = seed_for(m, n, k, 4);
  std::vector<int8_t> a, b;
  const auto ours = check_large_vs_cublaslt(m, n, k, seed, a, b);

  // Rows: the first, the last, and 62 from the Philox stream.
  std::vector<int64_t> rows = {0, m - 1};
  const PhiloxKey key{seed + 2, 0, 0, RngRole::data};
  for (uint64_t i = 0; rows.size() < 64; ++i) rows.push_back(philox_u32(key, i) % m);
  std::vector<int8_t> a_rows(rows.size() * static_cast<size_t>(k));
  for (size_t r = 0; r < rows.size(); ++r)
    std::memcpy(&a_rows[r * k], &a[static_cast<size_t>(rows[r] * k)], static_cast<size_t>(k));
  std::vector<int32_t> want(rows.size() * static_cast<size_t>(n));
  ref::gemm_s8s8_s32_tn(a_rows.data(), b.data(), static_cast<int64_t>(rows.size()), n, k, want.data());
  std::vector<int32_t> got(want.size());
  for (size_t r = 0; r < rows.size(); ++r)
    std::copy_n(&ours[static_cast<size_t>(rows[r] * n)], n, &got[r * n]);
  EXPECT_EQ(count_mismatches(got, want, n, "ours vs ref (sampled rows)"), 0);
}

// ---- dequantizing epilogue ------------------------------------------------------------

struct EpiCase {
  bool a_per_row, b_per_col, with_bias, null_scales;
};

// y_gpu vs ref::epilogue_dequant applied to the reference accumulators.
//
// Bounds: both sides compute s = scale_a·scale_b (one fp32 rounding, identical) and
// float(acc) (identical). The reference then rounds p = float(acc)·s and p + bias separately;
// the kernel fuses them into one fma. Each fp32 rounding is ≤ 2^-24 of its result, so
//   |y_f32 − ref| ≤ 2^-24·(|p| + |p + bias| + |p + bias|) ≤ 2^-22·(|p| + |bias|).
// A bf16 output adds one round-to-nearest-even to 8 significant bits, ≤ 2^-8·|y| (half an
// ulp of the value's binade), hence  |y_bf16 − ref| ≤ 2^-8·|ref| + 2^-21·(|p| + |bias|).
// The second term is the "tiny atol": it matters only where bias cancels p.
// Returns the largest |err| / bound seen, so that a near miss shows in the test log.
template <class OutT>
double check_dequant(const Shape3& s, const EpiCase& c, uint64_t seed,
                     cuda::GemmTile tile = cuda::GemmTile::automatic) {
  SCOPED_TRACE(testing::Message() << "M=" << s.m << " N=" << s.n << " K=" << s.k
                                  << " tile " << cuda::sm90::tile_name(tile)
                                  << " per_row=" << c.a_per_row << " per_col=" << c.b_per_col
                                  << " bias=" << c.with_bias << " null_scales=" << c.null_scales
                                  << " out=" << (sizeof(OutT) == 2 ? "bf16" : "f32"));
  const auto a = random_codes(s.m * s.k, -8, 7, seed);
  const auto b = random_codes(s.n * s.k, -128, 127, seed + 1);
  // Scales of the size a real dequant sees (step sizes ~1e-3..1e-1), bias of either sign.
  const auto scale_a = random_floats(c.a_per_row ? s.m : 1, 1e-3f, 1e-1f, seed + 2);
  const auto scale_b = random_floats(c.b_per_col ? s.n : 1, 1e-3f, 1e-1f, seed + 3);
  const auto bias = random_floats(s.n, -4.0f, 4.0f, seed + 4);

  std::vector<int32_t> acc(static_cast<size_t>(s.m * s.n));
  ref::gemm_s8s8_s32_tn(a.data(), b.data(), s.m, s.n, s.k, acc.data());
  ref::DequantEpilogue epi_ref;
  epi_ref.scale_a = c.null_scales ? nullptr : scale_a.data();
  epi_ref.a_per_row = c.a_per_row;
  epi_ref.scale_b = c.null_scales ? nullptr : scale_b.data();
  epi_ref.b_per_col = c.b_per_col;
  epi_ref.bias = c.with_bias ? bias.data() : nullptr;
  std::vector<float> want(acc.size());
  ref::epilogue_dequant(acc.data(), s.m, s.n, epi_ref, want.data());

  DeviceBuffer<int8_t> da(s.m * s.k), db(s.n * s.k);
  DeviceBuffer<float> dsa(static_cast<int64_t>(scale_a.size())),
      dsb(static_cast<int64_t>(scale_b.size())), dbias(s.n);
  DeviceBuffer<OutT> dy(s.m * s.n);
  da.upload(a);
  db.upload(b);
  dsa.upload(scale_a);
  dsb.upload(scale_b);
  dbias.upload(bias);
  dy.poison();
  cuda::EpiDequantBias epi;
  epi.scale_a = c.null_scales ? nullptr : dsa.get();
  epi.a_per_row = c.a_per_row;
  epi.scale_b = c.null_scales ? nullptr : dsb.get();
  epi.b_per_col = c.b_per_col;
  epi.bias = c.with_bias ? dbias.get() : nullptr;
  cuda::gemm_s8s8_s32_tn_dequant_sm90({da.get(), db.get(), s.m, s.n, s.k, tile}, epi, dy.get(),
                                      nullptr);
  NB_CUDA_CHECK(cudaDeviceSynchronize());
  const auto y = dy.download();

  int64_t bad = 0;
  double worst = 0;  // largest |err| / bound seen, reported so a near-miss is visible
  for (int64_t i = 0; i < s.m; ++i) {
    for (int64_t j = 0; j < s.n; ++j) {
      const size_t idx = static_cast<size_t>(i * s.n + j);
      float got = 0;
      if constexpr (sizeof(OutT) == 2) {
        got = bf16_to_f32(y[idx].bits);
      } else {
        got = y[idx];
      }
      const double sa = epi_ref.scale_a ? epi_ref.scale_a[c.a_per_row ? i : 0] : 1.0;
      const double sb = epi_ref.scale_b ? epi_ref.scale_b[c.b_per_col ? j : 0] : 1.0;
      const double p = std::fabs(static_cast<double>(acc[idx]) * sa * sb);
      const double bb = c.with_bias ? std::fabs(bias[static_cast<size_t>(j)]) : 0.0;
      const double r = want[idx];
      const double bound = sizeof(OutT) == 2 ? std::ldexp(std::fabs(r), -8) + std::ldexp(p + bb, -21)
                                             : std::ldexp(p + bb, -22);
      const double err = std::fabs(static_cast<double>(got) - r);
      if (bound > 0) worst = std::max(worst, err / bound);
      if (!(err <= bound)) {  // also catches NaN
        if (bad < 5)
          ADD_FAILURE() << "y[" << i << ", " << j << "] = " << got << ", ref " << r << ", |err| "
                        << err << " > bound " << bound;
        ++bad;
      }
    }
  }
  EXPECT_EQ(bad, 0);
  return worst;
}

const std::vector<EpiCase>& epi_cases() {
  static const std::vector<EpiCase> cases = {
      {true, true, true, false},    // per-token × per-channel scales, bias: the linear layer
      {true, true, false, false},   // no bias
      {false, true, true, false},   // per-tensor activation scale
      {true, false, true, false},   // per-tensor weight scale
      {false, false, false, false}, // both scalar
      {true, true, true, true},     // null scales read as 1: y = float(acc) + bias
  };
  return cases;
}

TEST(GemmS8S8S32TnDequantSm90, Bf16WithinRounding) {
  int variant = 10;
  double worst = 0;
  for (const auto& s : {Shape3{1, 48, 784}, Shape3{129, 784, 4096}, Shape3{1000, 4096, 784}})
    for (const auto& c : epi_cases())
      worst = std::max(worst, check_dequant<bf16_t>(s, c, seed_for(s.m, s.n, s.k, variant++)));
  std::printf("[ info     ] bf16 dequant: largest |err| / bound = %.3f\n", worst);
}

TEST(GemmS8S8S32TnDequantSm90, F32WithinRounding) {
  int variant = 30;
  double worst = 0;
  for (const auto& s : {Shape3{3, 16, 48}, Shape3{129, 784, 4096}, Shape3{1000, 1040, 784}})
    for (const auto& c : epi_cases())
      worst = std::max(worst, check_dequant<float>(s, c, seed_for(s.m, s.n, s.k, variant++)));
  std::printf("[ info     ] f32 dequant: largest |err| / bound = %.3f\n", worst);
}

// ---- tile configurations ----------------------------------------------------------------
// Every compiled configuration, forced, on the odd shapes (tile counts of 1, odd and even along
// both dimensions, so partial clusters are exercised) and through both epilogues.
const std::vector<cuda::GemmTile>& forced_tiles() {
  static const std::vector<cuda::GemmTile> tiles(std::begin(cuda::kCompiledGemmTiles),
                                                 std::end(cuda::kCompiledGemmTiles));
  return tiles;
}

TEST(GemmS8S8S32TnSm90, EveryTileConfigBitExact) {
  int variant = 50;
  for (const auto tile : forced_tiles()) {
    for (const auto& s : odd_shapes()) check_s32(s, -128, 127, seed_for(s.m, s.n, s.k, variant++), tile);
    check_s32({1100, 1536, 528}, -8, 7, seed_for(1100, 1536, 528, variant++), tile);
  }
}

TEST(GemmS8S8S32TnDequantSm90, EveryTileConfigWithinRounding) {
  int variant = 70;
  for (const auto tile : forced_tiles()) {
    for (const auto& s : {Shape3{129, 784, 4096}, Shape3{1000, 1536, 784}}) {
      check_dequant<bf16_t>(s, epi_cases()[0], seed_for(s.m, s.n, s.k, variant++), tile);
      check_dequant<float>(s, epi_cases()[2], seed_for(s.m, s.n, s.k, variant++), tile);
    }
  }
}

// The automatic rule (gemm_sm90_host.h) picks the 1×2 cluster only for the shapes it names.
TEST(GemmS8S8S32TnSm90, AutomaticTileRule) {
  using cuda::GemmTile;
  const auto pick = [](int64_t m, int64_t n, int64_t k) {
    return cuda::sm90::choose_tile({nullptr, nullptr, m, n, k});
  };
  EXPECT_EQ(pick(16384, 768, 3072), GemmTile::pingpong_128x128_c1x2);    // narrow and deep
  EXPECT_EQ(pick(16384, 1024, 4096), GemmTile::pingpong_128x128_c1x2);
  EXPECT_EQ(pick(128, 4096, 4096), GemmTile::pingpong_64x64_c2x1);       // small M
  EXPECT_EQ(pick(1, 11008, 4096), GemmTile::pingpong_64x64_c2x1);
  EXPECT_EQ(pick(129, 4096, 4096), GemmTile::pingpong_64x128_c2x1);
  EXPECT_EQ(pick(256, 4096, 11008), GemmTile::pingpong_64x128_c2x1);
  EXPECT_EQ(pick(257, 4096, 4096), GemmTile::pingpong_128x128_c2x1);
  EXPECT_EQ(pick(16384, 4096, 4096), GemmTile::pingpong_128x128_c2x1);
  EXPECT_EQ(pick(8192, 8192, 8192), GemmTile::pingpong_128x128_c2x1);
  EXPECT_EQ(pick(16384, 768, 768), GemmTile::pingpong_128x128_c2x1);     // K small
  EXPECT_EQ(pick(16384, 2048, 4096), GemmTile::pingpong_128x128_c2x1);   // N above 1024
  EXPECT_EQ(pick(1024, 4096, 4096), GemmTile::pingpong_128x128_c2x1);
  EXPECT_EQ(pick(1024, 4096, 16384), GemmTile::pingpong_128x128_c2x1);   // M ≤ 1024
  EXPECT_EQ(pick(8704, 10752, 15360), GemmTile::pingpong_128x128_c1x2);  // wider than tall
  EXPECT_EQ(pick(1040, 1056, 64), GemmTile::pingpong_128x128_c1x2);
  EXPECT_EQ(pick(6144, 6144, 9216), GemmTile::pingpong_128x128_c2x1);    // square
  EXPECT_EQ(cuda::sm90::choose_tile({nullptr, nullptr, 16384, 4096, 4096, GemmTile::coop_128x256_c2x1}),
            GemmTile::coop_128x256_c2x1);  // a forced tile wins
}

// A capped persistent grid (GemmS8S8Params::max_sms) walks more tiles per CTA; the sums are the
// same bits. Caps of 1 and 3 round to one and to two-CTA clusters; 10 gives several tiles per
// CTA on every shape; same_round_sms is the backward's choice.
TEST(GemmS8S8S32TnSm90, CappedGridBitExact) {
  int variant = 110;
  for (const auto tile : forced_tiles()) {
    for (const auto& s : {Shape3{1000, 1536, 784}, Shape3{129, 784, 4096}, Shape3{257, 272, 1040}}) {
      const cuda::GemmS8S8Params p{nullptr, nullptr, s.m, s.n, s.k, tile};
      for (const int cap : {1, 3, 10, cuda::sm90::same_round_sms(p, 132)})
        check_s32(s, -128, 127, seed_for(s.m, s.n, s.k, variant++), tile, cap);
    }
  }
}

// same_round_sms: the fewest SMs (two-CTA clusters) with the tile rounds of all of them.
TEST(GemmS8S8S32TnSm90, SameRoundSms) {
  const auto sms = [](int64_t m, int64_t n, int avail,
                      cuda::GemmTile tile = cuda::GemmTile::automatic) {
    return cuda::sm90::same_round_sms({nullptr, nullptr, m, n, 4096, tile}, avail);
  };
  EXPECT_EQ(sms(16384, 4096, 132), 128);   // 4096 tiles: 32 rounds on 132 and on 128
  EXPECT_EQ(sms(4096, 4096, 132), 128);    // 1024 tiles: 8 rounds
  EXPECT_EQ(sms(16384, 11008, 132), 132);  // 11008 tiles: 84 rounds need 132 (131.05 → 132)
  EXPECT_EQ(sms(128, 4096, 132), 128);     // 64×64 tiles: 128, one round
  EXPECT_EQ(sms(256, 4096, 132), 128);     // 64×128 tiles: 128, one round
  EXPECT_EQ(sms(100, 100, 132), 4);        // 64×64 tiles: 2 × 2
  EXPECT_EQ(sms(300, 100, 132), 4);        // 128×128 tiles: 3 × 1, rounded up to clusters
  EXPECT_EQ(sms(1000, 100, 132, cuda::GemmTile::pingpong_128x128_c1x2), 8);  // 8 × 1
  EXPECT_EQ(sms(0, 4096, 132), 132);       // nothing to do: no cap
  EXPECT_EQ(sms(16384, 4096, 132, cuda::GemmTile::coop_128x256_c2x1), 128);  // 2048 tiles, 16 rounds
  EXPECT_EQ(sms(16384, 4096, 114), 114);   // 36 rounds of 114 (113.8 → 114)
  EXPECT_EQ(sms(16384, 4096, 131), 128);   // an odd count: 130 usable, 32 rounds on 128
  EXPECT_EQ(sms(16384, 11008, 131), 130);  // 85 rounds on 130 (129.5 → 130), not 131
  EXPECT_THROW(sms(16384, 4096, 0), nibble::Error);
}

// A shape the rule sends to the 1×2 cluster, through the launcher's own choice (the 2×1
// choice is checked against cuBLASLt at 8192³ above).
TEST(GemmS8S8S32TnSm90, AutomaticTileBitExactAtLargeShape) {
  const int64_t m = 8192, n = 1024, k = 4096;
  ASSERT_EQ(cuda::sm90::choose_tile({nullptr, nullptr, m, n, k}), cuda::GemmTile::pingpong_128x128_c1x2);
  std::vector<int8_t> a, b;
  check_large_vs_cublaslt(m, n, k, seed_for(m, n, k, 90), a, b);
}

// K = 0 (e.g. no token kept for a weight gradient): acc = 0, so y = bias and c = 0.
TEST(GemmS8S8S32TnSm90, EmptyKGivesZeroAccumulators) {
  const int64_t m = 5, n = 48;
  const auto bias = random_floats(n, -4.0f, 4.0f, 77);
  const auto scale_b = random_floats(n, 1e-3f, 1e-1f, 78);
  DeviceBuffer<float> dbias(n), dsb(n), dy(m * n);
  DeviceBuffer<int32_t> dc(m * n);
  dbias.upload(bias);
  dsb.upload(scale_b);
  dy.poison();
  dc.poison();
  cuda::EpiDequantBias epi;
  epi.scale_b = dsb.get();
  epi.bias = dbias.get();
  cuda::gemm_s8s8_s32_tn_dequant_sm90({nullptr, nullptr, m, n, 0}, epi, dy.get(), nullptr);
  cuda::gemm_s8s8_s32_tn_sm90({nullptr, nullptr, m, n, 0}, dc.get(), nullptr);
  // M = 0 queues nothing (and must not touch the null output).
  cuda::gemm_s8s8_s32_tn_sm90({nullptr, nullptr, 0, n, 16}, nullptr, nullptr);
  NB_CUDA_CHECK(cudaDeviceSynchronize());
  const auto y = dy.download();
  const auto c = dc.download();
  for (int64_t i = 0; i < m * n; ++i) {
    ASSERT_EQ(y[static_cast<size_t>(i)], bias[static_cast<size_t>(i % n)]) << "element " << i;
    ASSERT_EQ(c[static_cast<size_t>(i)], 0) << "element " << i;
  }
}

// ---- argument checks -----------------------------------------------------------------

// Runs fn, expects nibble::Error whose message contains `needle`.
template <class Fn>
void expect_error_containing(Fn fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected nibble::Error containing \"" << needle << "\"";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(GemmS8S8S32TnSm90, RejectsIllegalShapesAndAlignment) {
  DeviceBuffer<int8_t> a(64 * 64), b(64 * 64);
  DeviceBuffer<int32_t> c(64 * 64);
  DeviceBuffer<bf16_t> y(64 * 64);
  const cuda::EpiDequantBias epi;
  expect_error_containing(
      [&] { cuda::gemm_s8s8_s32_tn_sm90({a.get(), b.get(), 16, 16, 24}, c.get(), nullptr); },
      "K=24 is not a multiple of 16");
  expect_error_containing(
      [&] { cuda::gemm_s8s8_s32_tn_sm90({a.get(), b.get(), 16, 18, 16}, c.get(), nullptr); },
      "N must be a multiple of 4");
  expect_error_containing(
      [&] {
        cuda::gemm_s8s8_s32_tn_dequant_sm90({a.get(), b.get(), 16, 20, 16}, epi, y.get(), nullptr);
      },
      "N must be a multiple of 8");
  expect_error_containing(
      [&] { cuda::gemm_s8s8_s32_tn_sm90({a.get() + 8, b.get(), 16, 16, 16}, c.get(), nullptr); },
      "16-byte aligned");
  expect_error_containing(
      [&] { cuda::gemm_s8s8_s32_tn_sm90({a.get(), b.get(), 16, 16, 16}, c.get() + 1, nullptr); },
      "16-byte aligned");
  expect_error_containing(
      [&] { cuda::gemm_s8s8_s32_tn_sm90({a.get(), b.get(), -1, 16, 16}, c.get(), nullptr); },
      "negative size");
  expect_error_containing(
      [&] {
        cuda::gemm_s8s8_s32_tn_sm90(
            {a.get(), b.get(), 16, 16, 16, cuda::GemmTile::automatic, -4}, c.get(), nullptr);
      },
      "max_sms = -4 is negative");
}

// ---- the dx epilogue: mask, δ̃ sum, block Hadamard (EpiMaskHadamard) ---------------------
// Oracle: the reference's own operations on the host: acc = ref::gemm_s8s8_s32_tn, g =
// float(acc)·fl(sa·sb), masked where e = −8, ref::hadamard_blocks (butterfly and × norm), then
// bf16 by round-to-nearest-even; y must match bit for bit. The int64 slot sums must add up to
// T = Σ acc·w (w = e, or 14·q where e = −8) exactly, and every slot must be written (poisoned).
struct MaskCase {
  Shape3 s;
  int block;
};

template <class OutT>
void check_mask_hadamard(const MaskCase& mc, uint64_t seed, cuda::GemmTile tile, int max_sms = 0) {
  const auto [m, n, k] = mc.s;
  SCOPED_TRACE(testing::Message() << "M=" << m << " N=" << n << " K=" << k << " block="
                                  << mc.block << " tile=" << cuda::sm90::tile_name(tile)
                                  << " max_sms=" << max_sms
                                  << (sizeof(OutT) == 2 ? " bf16" : " f32"));
  const std::vector<int8_t> a = random_codes(m * k, -90, 90, seed);
  const std::vector<int8_t> b = random_codes(n * k, -8, 7, seed + 1);
  // side channel: nibbles in [−8, 7], about one in eight clipped (−8); codes in [−8, 7]
  const std::vector<int8_t> e = random_codes(m * n, -8, 7, seed + 2);
  const std::vector<int8_t> q = random_codes(m * n, -8, 7, seed + 3);
  std::vector<uint8_t> ep(static_cast<size_t>(m * n / 2)), qp(ep.size());
  for (size_t i = 0; i < ep.size(); ++i) {
    ep[i] = static_cast<uint8_t>((e[2 * i] & 0xf) | (e[2 * i + 1] & 0xf) << 4);
    qp[i] = static_cast<uint8_t>((q[2 * i] & 0xf) | (q[2 * i + 1] & 0xf) << 4);
  }
  const std::vector<float> scales = random_floats(2, 1e-3f, 2e-2f, seed + 4);

  std::vector<int32_t> acc(static_cast<size_t>(m * n));
  ref::gemm_s8s8_s32_tn(a.data(), b.data(), m, n, k, acc.data());
  const float sab = scales[0] * scales[1];
  std::vector<float> want(acc.size());
  int64_t lsq = 0;
  for (size_t i = 0; i < acc.size(); ++i) {
    const float g = static_cast<float>(acc[i]) * sab;
    const bool clipped = e[i] == cuda::kEpiClippedNibble;
    lsq += static_cast<int64_t>(acc[i]) * (clipped ? cuda::kEpiResidualSteps * q[i] : e[i]);
    want[i] = clipped ? 0.0f : g;
  }
  ref::hadamard_blocks(want.data(), m, n, mc.block);

  DeviceBuffer<int8_t> da(a), db(b);
  DeviceBuffer<uint8_t> dep(ep), dqp(qp);
  DeviceBuffer<float> dscales(scales);
  DeviceBuffer<OutT> y(m * n);
  cuda::GemmS8S8Params p{da.get(), db.get(), m, n, k, tile, max_sms};
  const int64_t slots = cuda::gemm_s8s8_mask_hadamard_partials(p);
  constexpr int64_t kPoison = INT64_MIN;
  DeviceBuffer<int64_t> parts(std::vector<int64_t>(static_cast<size_t>(slots), kPoison));
  cuda::EpiMaskHadamard epi;
  epi.scale_a = dscales.get();
  epi.scale_b = dscales.get() + 1;
  epi.q_packed = dqp.get();
  epi.e_packed = dep.get();
  epi.block = mc.block;
  epi.partials = parts.get();
  cuda::gemm_s8s8_s32_tn_mask_hadamard_sm90(p, epi, y.get(), nullptr);
  NB_CUDA_CHECK(cudaDeviceSynchronize());

  const std::vector<OutT> got = y.download();
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    bool same;
    if constexpr (sizeof(OutT) == 2) same = got[i].bits == f32_to_bf16(want[i]);
    else same = std::memcmp(&got[i], &want[i], sizeof(float)) == 0;
    if (!same) {
      if (bad < 5)
        ADD_FAILURE() << "y[" << i / n << ", " << i % n << "] differs from the reference (want "
                      << want[i] << ")";
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0);
  const std::vector<int64_t> part = parts.download();
  int64_t total = 0, unwritten = 0;
  for (int64_t v : part) {
    if (v == kPoison) ++unwritten;
    total += v;
  }
  EXPECT_EQ(unwritten, 0) << "of " << slots << " slots";
  EXPECT_EQ(total, lsq) << "Σ acc·w";
}

const std::vector<MaskCase>& mask_cases() {
  // partial tiles along M and N, N % 32 = 16 (a half subtile), every block size, K = 16
  static const std::vector<MaskCase> cases = {
      {{129, 96, 64}, 32}, {{200, 48, 32}, 16}, {{64, 256, 128}, 1},
      {{300, 544, 160}, 8}, {{128, 128, 16}, 2}, {{257, 64, 48}, 4},
  };
  return cases;
}

// The fused epilogue has one tile, the 128×128 ping-pong (the large shapes' choice), with 2×1
// and 1×2 clusters; the partial tiles, a capped grid (the layer's same-round cap) and every
// block.
TEST(GemmS8S8MaskHadamardSm90, BitExactAgainstReference) {
  int variant = 90;
  for (const MaskCase& mc : mask_cases()) {
    check_mask_hadamard<float>(mc, seed_for(mc.s.m, mc.s.n, mc.s.k, variant++),
                               cuda::GemmTile::automatic);
    check_mask_hadamard<bf16_t>(mc, seed_for(mc.s.m, mc.s.n, mc.s.k, variant++),
                                cuda::GemmTile::pingpong_128x128_c2x1);
    check_mask_hadamard<float>(mc, seed_for(mc.s.m, mc.s.n, mc.s.k, variant++),
                               cuda::GemmTile::pingpong_128x128_c1x2);
    check_mask_hadamard<bf16_t>(mc, seed_for(mc.s.m, mc.s.n, mc.s.k, variant++),
                                cuda::GemmTile::automatic, 3);
  }
}

TEST(GemmS8S8MaskHadamardSm90, BitExactAtTransformerShape) {
  check_mask_hadamard<bf16_t>({{2048, 4096, 1024}, 32}, seed_for(2048, 4096, 1024, 97),
                              cuda::GemmTile::automatic);
}

TEST(GemmS8S8MaskHadamardSm90, RejectsBlocksItCannotFuse) {
  DeviceBuffer<int8_t> a(64 * 64), b(64 * 64);
  DeviceBuffer<uint8_t> codes(64 * 32);
  DeviceBuffer<float> y(64 * 64), sc(2);
  DeviceBuffer<int64_t> parts(64);
  cuda::EpiMaskHadamard epi;
  epi.scale_a = sc.get();
  epi.scale_b = sc.get() + 1;
  epi.q_packed = codes.get();
  epi.e_packed = codes.get();
  epi.partials = parts.get();
  epi.block = 64;
  expect_error_containing(
      [&] {
        cuda::gemm_s8s8_s32_tn_mask_hadamard_sm90({a.get(), b.get(), 64, 64, 64}, epi, y.get(),
                                                  nullptr);
      },
      "separate mask pass");
  epi.block = 12;
  expect_error_containing(
      [&] {
        cuda::gemm_s8s8_s32_tn_mask_hadamard_sm90({a.get(), b.get(), 64, 64, 64}, epi, y.get(),
                                                  nullptr);
      },
      "power of two");
  epi.block = 32;
  epi.partials = nullptr;
  expect_error_containing(
      [&] {
        cuda::gemm_s8s8_s32_tn_mask_hadamard_sm90({a.get(), b.get(), 64, 64, 64}, epi, y.get(),
                                                  nullptr);
      },
      "must all be set");
  epi.partials = parts.get();
  expect_error_containing(
      [&] {
        cuda::gemm_s8s8_s32_tn_mask_hadamard_sm90(
            {a.get(), b.get(), 64, 64, 64, cuda::GemmTile::coop_128x256_c2x1}, epi, y.get(),
            nullptr);
      },
      "one tile");
}

// ---- the other baselines: sanity (they are only timed, but a wrong baseline lies) -------

// Small integer inputs make bf16 and e4m3 products and sums exact (|Σ| ≤ 64·2·2 = 256 is an
// integer bf16 represents), so cuBLASLt must reproduce the int64 reference exactly.
TEST(CublasLtBaselines, Bf16AndFp8ExactOnSmallIntegers) {
  const int64_t m = 129, n = 48, k = 64;
  const auto a = random_codes(m * k, -2, 2, 91);
  const auto b = random_codes(n * k, -2, 2, 92);
  std::vector<int32_t> want(static_cast<size_t>(m * n));
  ref::gemm_s8s8_s32_tn(a.data(), b.data(), m, n, k, want.data());

  std::vector<bf16_t> a16(a.size()), b16(b.size());
  std::vector<uint8_t> a8(a.size()), b8(b.size());
  // e4m3 bytes for −2..2: sign bit 7, exponent bias 7, 3 mantissa bits (1 = 0x38, 2 = 0x40).
  const auto e4m3 = [](int v) -> uint8_t {
    const uint8_t mag = v == 0 ? 0 : (std::abs(v) == 1 ? 0x38 : 0x40);
    return static_cast<uint8_t>(mag | (v < 0 ? 0x80 : 0));
  };
  for (size_t i = 0; i < a.size(); ++i) {
    a16[i].bits = f32_to_bf16(a[i]);
    a8[i] = e4m3(a[i]);
  }
  for (size_t i = 0; i < b.size(); ++i) {
    b16[i].bits = f32_to_bf16(b[i]);
    b8[i] = e4m3(b[i]);
  }
  DeviceBuffer<bf16_t> da16(m * k), db16(n * k), dc16(m * n), dc8(m * n);
  DeviceBuffer<uint8_t> da8(m * k), db8(n * k);
  da16.upload(a16);
  db16.upload(b16);
  da8.upload(a8);
  db8.upload(b8);
  dc16.poison();
  dc8.poison();
  cuda::cublaslt_gemm_bf16_tn(da16.get(), db16.get(), m, n, k, dc16.get(), nullptr);
  cuda::cublaslt_gemm_e4m3_bf16_tn(da8.get(), db8.get(), m, n, k, dc8.get(), nullptr);
  NB_CUDA_CHECK(cudaDeviceSynchronize());
  const auto c16 = dc16.download();
  const auto c8 = dc8.download();
  int64_t bad16 = 0, bad8 = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    bad16 += bf16_to_f32(c16[i].bits) != static_cast<float>(want[i]);
    bad8 += bf16_to_f32(c8[i].bits) != static_cast<float>(want[i]);
  }
  EXPECT_EQ(bad16, 0) << "bf16 GEMM";
  EXPECT_EQ(bad8, 0) << "e4m3 GEMM";
}

// The scratch cache cannot grow inside a CUDA graph capture (it would free memory the graph
// keeps a pointer to): a clear error that says to warm up first, and the capture can still end.
TEST(CudaWorkspace, GrowingWhileCapturingThrows) {
  cudaStream_t stream = nullptr;
  NB_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  ASSERT_NE(cuda::workspace(256, stream), nullptr);
  NB_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  EXPECT_NE(cuda::workspace(128, stream), nullptr);  // fits: no growth, fine while capturing
  try {
    cuda::workspace(size_t{1} << 20, stream);
    ADD_FAILURE() << "growing the scratch while capturing did not throw";
  } catch (const nibble::Error& e) {
    EXPECT_NE(std::string(e.what()).find("warm-up"), std::string::npos) << e.what();
  }
  cudaGraph_t graph = nullptr;
  NB_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  if (graph != nullptr) NB_CUDA_CHECK(cudaGraphDestroy(graph));
  EXPECT_NE(cuda::workspace(size_t{1} << 20, stream), nullptr);  // outside a capture it grows
  NB_CUDA_CHECK(cudaStreamDestroy(stream));
}

// The fork's side stream sits one priority step above the caller's stream, clamped to the
// device's range, and is the same stream for every fork from one caller stream.
TEST(StreamFork, SidePriorityOneStepAboveTheCaller) {
  int least = 0, greatest = 0;
  NB_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  for (const int caller : {least, greatest}) {
    cudaStream_t stream = nullptr;
    NB_CUDA_CHECK(cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking, caller));
    cudaStream_t first = nullptr;
    {
      cuda::StreamFork fork(stream);
      first = fork.side();
      int side = 0;
      NB_CUDA_CHECK(cudaStreamGetPriority(fork.side(), &side));
      EXPECT_EQ(side, caller > greatest ? caller - 1 : greatest) << "caller priority " << caller;
      fork.join();
    }
    cuda::StreamFork again(stream);
    EXPECT_EQ(again.side(), first);
    again.join();
    NB_CUDA_CHECK(cudaStreamSynchronize(stream));
    NB_CUDA_CHECK(cudaStreamDestroy(stream));
  }
}

}  // namespace
