// GPU tests of the native INT4 GEMM for Ampere/Ada (gemm_s4s4_s32_tn_sm80, mma.sync m16n8k64
// s4), in the binary nibble_gpu_tests (CTest label "gpu"). They run on any GPU of compute
// capability ≥ 8.0; on H100/H200 (9.0) the s4 mma.sync is emulated, correct but slow, so the
// results are checked there and nothing is timed anywhere.
//   - int32 outputs: bit-exact against nibble::ref::gemm_s4s4_s32_tn on every element, over
//     M, N ∈ {1, 7, 64, 127, 128, 129, 200, 255, 256, 257} × K ∈ {32, …, 4096} and
//     1024 × 1024 × 4096, with full-range codes [-8, 7];
//   - the nibble order and sign extension, pinned by identity operands and extreme codes;
//   - the fused dequantizing epilogue against ref::epilogue_dequant on the same accumulators,
//     within the bound test_gemm_gpu.cpp derives for the sm_90a kernel (same fp32 operations);
//   - K = 0, M = 0, N = 0; argument checks that throw nibble::Error and queue nothing;
//   - that the loaded kernel is SASS of this device's architecture, spill-free on sm_8x.
// And the same for the s8 twin from the same kernel template (gemm_s8s8_s32_tn_sm80, mma.sync
// m16n8k32 s8, native on sm_8x and sm_90a) with full-range codes [-128, 127], plus the GEMM
// dispatcher (cuda/gemm/gemm_dispatch.h): its path choice, and on H100/H200 that the wgmma and
// the mma.sync s8 GEMMs give bit-identical outputs (same int32 sums, same epilogue operations).
// Every operand is fresh Philox codes (its own seed); outputs are poisoned before each run, so
// an element the kernel never writes cannot pass.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "common/random.h"
#include "cuda/common/check.h"
#include "cuda/gemm/gemm_dispatch.h"
#include "cuda/gemm/gemm_s4s4_s32_tn_sm80.h"
#include "cuda/gemm/gemm_s8s8_s32_tn_sm90.h"
#include "gpu/device_buffer.h"
#include "nibble/dtype.h"
#include "nibble/error.h"
#include "nibble/rng.h"
#include "ref/gemm.h"
#include "ref/quant.h"

using namespace nibble;

namespace {

using test::DeviceBuffer;

constexpr int32_t kPoisonS32 = static_cast<int32_t>(0xA5A5A5A5u);

int current_device_cc() {
  int device = 0, major = 0, minor = 0;
  NB_CUDA_CHECK(cudaGetDevice(&device));
  NB_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  NB_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return 10 * major + minor;
}

// Every test needs mma.sync with s4 operands (compute capability ≥ 8.0).
class GemmS4S4S32TnSm80 : public ::testing::Test {
 protected:
  void SetUp() override {
    const int cc = current_device_cc();
    if (cc < 80)
      GTEST_SKIP() << "compute capability " << cc / 10 << "." << cc % 10
                   << " has no s4 mma.sync; these kernels need 8.0 or higher";
  }
};
using GemmS4S4S32TnDequantSm80 = GemmS4S4S32TnSm80;

struct Shape3 {
  int64_t m, n, k;
};

uint64_t seed_for(int64_t m, int64_t n, int64_t k, int variant) {
  return 0x73346e69626cull ^ (static_cast<uint64_t>(m) << 40) ^ (static_cast<uint64_t>(n) << 20) ^
         static_cast<uint64_t>(k) ^ (static_cast<uint64_t>(variant) << 58);
}

// [rows, k] codes packed row-wise (ceil(k/2) bytes per row, element 2i in the low nibble).
std::vector<uint8_t> pack_rows(const std::vector<int8_t>& codes, int64_t rows, int64_t k) {
  std::vector<uint8_t> packed(static_cast<size_t>(rows * ((k + 1) / 2)));
  ref::pack_s4_rows(codes.data(), rows, k, packed.data());
  return packed;
}

// Fresh full-range codes [-8, 7] for a [rows, k] operand, packed.
std::vector<uint8_t> random_packed(int64_t rows, int64_t k, uint64_t seed) {
  return pack_rows(nibble::testing::randint8(rows * k, seed, -8, 7), rows, k);
}

// Floats uniform in [lo, hi) on Philox's 2^-24 grid.
std::vector<float> random_floats(int64_t count, float lo, float hi, uint64_t seed) {
  std::vector<float> v(static_cast<size_t>(count));
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  for (int64_t i = 0; i < count; ++i)
    v[static_cast<size_t>(i)] = lo + (hi - lo) * philox_uniform(key, static_cast<uint64_t>(i));
  return v;
}

// Counts mismatches of two int32 [.., n] results; reports the first few.
int64_t count_mismatches(const std::vector<int32_t>& got, const std::vector<int32_t>& want,
                         int64_t n) {
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (got[i] != want[i]) {
      if (bad < 5)
        ADD_FAILURE() << "c[" << static_cast<int64_t>(i) / n << ", " << static_cast<int64_t>(i) % n
                      << "] = " << got[i] << ", expected " << want[i];
      ++bad;
    }
  }
  return bad;
}

// Runs the int32 GEMM on packed operands and returns c (synchronized).
std::vector<int32_t> run_s32(const Shape3& s, const std::vector<uint8_t>& a,
                             const std::vector<uint8_t>& b) {
  DeviceBuffer<uint8_t> da(static_cast<int64_t>(a.size())), db(static_cast<int64_t>(b.size()));
  DeviceBuffer<int32_t> dc(s.m * s.n);
  da.upload(a);
  db.upload(b);
  dc.poison();
  cuda::gemm_s4s4_s32_tn_sm80({da.get(), db.get(), s.m, s.n, s.k}, dc.get(), nullptr);
  NB_CUDA_CHECK(cudaDeviceSynchronize());
  return dc.download();
}

// GPU vs reference on given packed operands; returns the number of wrong elements.
int64_t check_s32(const Shape3& s, const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  std::vector<int32_t> want(static_cast<size_t>(s.m * s.n));
  ref::gemm_s4s4_s32_tn(a.data(), b.data(), s.m, s.n, s.k, want.data());
  return count_mismatches(run_s32(s, a, b), want, s.n);
}

// ---- int32: bit-exact --------------------------------------------------------------------

TEST_F(GemmS4S4S32TnSm80, BitExactOnOddShapes) {
  // 700 shapes: every M/N tail against the 128 × 128 CTA tile and its 16 × 8 mma tiles, and
  // K tails against the 128-element stage (32 and 96 leave half an m16n8k64 step zero-filled).
  const std::vector<int64_t> sizes = {1, 7, 64, 127, 128, 129, 200, 255, 256, 257};
  const std::vector<int64_t> ks = {32, 64, 96, 128, 160, 1024, 4096};
  int failing_shapes = 0;
  for (const int64_t k : ks) {
    // One operand per (rows, K) for each side, each from its own seed: A(M, K) differs from
    // B(N, K) even when M = N, and every shape sees different data along each axis.
    std::map<int64_t, std::vector<uint8_t>> a_of, b_of;
    for (const int64_t r : sizes) {
      a_of[r] = random_packed(r, k, seed_for(r, 0, k, 1));
      b_of[r] = random_packed(r, k, seed_for(0, r, k, 2));
    }
    for (const int64_t m : sizes)
      for (const int64_t n : sizes) {
        SCOPED_TRACE(::testing::Message() << "M=" << m << " N=" << n << " K=" << k);
        if (check_s32({m, n, k}, a_of[m], b_of[n]) != 0 && ++failing_shapes >= 10) {
          FAIL() << "stopping after 10 failing shapes";
        }
      }
  }
  EXPECT_EQ(failing_shapes, 0);
}

TEST_F(GemmS4S4S32TnSm80, BitExactAt1024x1024x4096) {
  const Shape3 s{1024, 1024, 4096};
  EXPECT_EQ(check_s32(s, random_packed(s.m, s.k, seed_for(s.m, s.n, s.k, 3)),
                      random_packed(s.n, s.k, seed_for(s.m, s.n, s.k, 4))),
            0);
}

// Several CTAs along both axes with partial tiles at the far edges (8 × 3 CTAs).
TEST_F(GemmS4S4S32TnSm80, BitExactOnManyTiles) {
  const Shape3 s{1000, 300, 2080};
  EXPECT_EQ(check_s32(s, random_packed(s.m, s.k, seed_for(s.m, s.n, s.k, 5)),
                      random_packed(s.n, s.k, seed_for(s.m, s.n, s.k, 6))),
            0);
}

// B = the identity (b[n, k] = 1 iff k = n, N = K) gives c[m, n] = a[m, n]: every code of A comes
// back at its own column, so a swapped nibble order or a missing sign extension shows as a
// wrong element, not only as a wrong sum. Then A = the identity gives c[m, n] = b[n, m].
TEST_F(GemmS4S4S32TnSm80, IdentityOperandsReturnCodesInOrder) {
  const int64_t rows = 37, k = 192;
  std::vector<int8_t> eye(static_cast<size_t>(k * k), 0);
  for (int64_t i = 0; i < k; ++i) eye[static_cast<size_t>(i * k + i)] = 1;
  const auto codes = nibble::testing::randint8(rows * k, 0x1de, -8, 7);
  const auto packed = pack_rows(codes, rows, k);
  const auto eye_packed = pack_rows(eye, k, k);

  const auto c_a = run_s32({rows, k, k}, packed, eye_packed);  // c[m, n] = a[m, n]
  std::vector<int32_t> want_a(codes.begin(), codes.end());
  EXPECT_EQ(count_mismatches(c_a, want_a, k), 0) << "A · I";

  const auto c_b = run_s32({k, rows, k}, eye_packed, packed);  // c[m, n] = b[n, m]
  std::vector<int32_t> want_b(static_cast<size_t>(k * rows));
  for (int64_t m = 0; m < k; ++m)
    for (int64_t n = 0; n < rows; ++n)
      want_b[static_cast<size_t>(m * rows + n)] = codes[static_cast<size_t>(n * k + m)];
  EXPECT_EQ(count_mismatches(c_b, want_b, rows), 0) << "I · Bᵀ";
}

// The extreme codes: (−8)·(−8) = 64 at every k reaches the largest sum, 64·K; (−8)·7 the most
// negative. Constant operands make every element the same known value.
TEST_F(GemmS4S4S32TnSm80, ExtremeCodesReachTheLargestSums) {
  const int64_t m = 129, n = 65, k = 4096;
  const auto constant = [](int64_t rows, int64_t cols, int8_t v) {
    return pack_rows(std::vector<int8_t>(static_cast<size_t>(rows * cols), v), rows, cols);
  };
  const std::vector<std::pair<int8_t, int8_t>> cases = {{-8, -8}, {-8, 7}, {7, 7}, {-1, 1}};
  for (const auto& [va, vb] : cases) {
    SCOPED_TRACE(::testing::Message() << "a = " << int{va} << ", b = " << int{vb});
    const auto c = run_s32({m, n, k}, constant(m, k, va), constant(n, k, vb));
    EXPECT_EQ(count_mismatches(c, std::vector<int32_t>(c.size(), int32_t{va} * vb * k), n), 0);
  }
}

// ---- dequantizing epilogue ------------------------------------------------------------

struct EpiCase {
  bool a_per_row, b_per_col, with_bias, null_scales;
};

const std::vector<EpiCase>& epi_cases() {
  static const std::vector<EpiCase> cases = {
      {true, true, true, false},     // per-token × per-channel scales, bias: the linear layer
      {true, true, false, false},    // no bias
      {false, true, true, false},    // per-tensor activation scale
      {true, false, true, false},    // per-tensor weight scale
      {false, false, false, false},  // both scalar, no bias
      {true, true, true, true},      // null scales read as 1: y = float(acc) + bias
  };
  return cases;
}

// y_gpu vs ref::epilogue_dequant on the reference accumulators. The kernel computes
// fma(float(acc), sa·sb, bias) like the sm_90a kernel, so the bound is the one derived in
// test_gemm_gpu.cpp (check_dequant): with p = |acc·sa·sb|, b = |bias|,
//   f32:  |y − ref| ≤ 2^-22·(p + b);   bf16: |y − ref| ≤ 2^-8·|ref| + 2^-21·(p + b).
// Returns the largest |err| / bound seen, so a near miss shows in the log.
// check_dequant_on: the comparison for given operands (raw bytes, uploaded as they are) and
// their reference accumulators; `launch(a, b, shape, epi, y)` queues the GPU GEMM.
template <class OutT, class Launch>
double check_dequant_on(const Shape3& s, const EpiCase& c, uint64_t seed,
                        const std::vector<int32_t>& acc, const std::vector<uint8_t>& a,
                        const std::vector<uint8_t>& b, Launch launch) {
  SCOPED_TRACE(::testing::Message() << "M=" << s.m << " N=" << s.n << " K=" << s.k
                                  << " per_row=" << c.a_per_row << " per_col=" << c.b_per_col
                                  << " bias=" << c.with_bias << " null_scales=" << c.null_scales
                                  << " out=" << (sizeof(OutT) == 2 ? "bf16" : "f32"));
  // Scales of the size a real dequant sees (INT4 step sizes ~1e-3..1e-1), bias of either sign.
  const auto scale_a = random_floats(c.a_per_row ? s.m : 1, 1e-3f, 1e-1f, seed + 2);
  const auto scale_b = random_floats(c.b_per_col ? s.n : 1, 1e-3f, 1e-1f, seed + 3);
  const auto bias = random_floats(s.n, -4.0f, 4.0f, seed + 4);

  ref::DequantEpilogue epi_ref;
  epi_ref.scale_a = c.null_scales ? nullptr : scale_a.data();
  epi_ref.a_per_row = c.a_per_row;
  epi_ref.scale_b = c.null_scales ? nullptr : scale_b.data();
  epi_ref.b_per_col = c.b_per_col;
  epi_ref.bias = c.with_bias ? bias.data() : nullptr;
  std::vector<float> want(acc.size());
  ref::epilogue_dequant(acc.data(), s.m, s.n, epi_ref, want.data());

  DeviceBuffer<uint8_t> da(static_cast<int64_t>(a.size())), db(static_cast<int64_t>(b.size()));
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
  launch(da.get(), db.get(), s, epi, dy.get());
  NB_CUDA_CHECK(cudaDeviceSynchronize());
  const auto y = dy.download();

  int64_t bad = 0;
  double worst = 0;
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
      const double bound = sizeof(OutT) == 2
                               ? std::ldexp(std::fabs(r), -8) + std::ldexp(p + bb, -21)
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

template <class OutT>
double check_dequant(const Shape3& s, const EpiCase& c, uint64_t seed) {
  const auto a = random_packed(s.m, s.k, seed);
  const auto b = random_packed(s.n, s.k, seed + 1);
  std::vector<int32_t> acc(static_cast<size_t>(s.m * s.n));
  ref::gemm_s4s4_s32_tn(a.data(), b.data(), s.m, s.n, s.k, acc.data());
  return check_dequant_on<OutT>(s, c, seed, acc, a, b,
                                [](const uint8_t* da, const uint8_t* db, const Shape3& sh,
                                   const cuda::EpiDequantBias& epi, OutT* y) {
                                  cuda::gemm_s4s4_s32_tn_dequant_sm80({da, db, sh.m, sh.n, sh.k},
                                                                      epi, y, nullptr);
                                });
}

const std::vector<Shape3>& dequant_shapes() {
  static const std::vector<Shape3> shapes = {
      {1, 7, 32}, {7, 129, 96}, {200, 127, 160}, {129, 257, 4096}, {257, 256, 1024}};
  return shapes;
}

TEST_F(GemmS4S4S32TnDequantSm80, Bf16WithinRounding) {
  int variant = 10;
  double worst = 0;
  for (const auto& s : dequant_shapes())
    for (const auto& c : epi_cases())
      worst = std::max(worst, check_dequant<bf16_t>(s, c, seed_for(s.m, s.n, s.k, variant++)));
  std::printf("[ info     ] s4 bf16 dequant: largest |err| / bound = %.3f\n", worst);
}

TEST_F(GemmS4S4S32TnDequantSm80, F32WithinRounding) {
  int variant = 30;
  double worst = 0;
  for (const auto& s : dequant_shapes())
    for (const auto& c : epi_cases())
      worst = std::max(worst, check_dequant<float>(s, c, seed_for(s.m, s.n, s.k, variant++)));
  std::printf("[ info     ] s4 f32 dequant: largest |err| / bound = %.3f\n", worst);
}

// ---- empty dimensions ------------------------------------------------------------------

// K = 0 (e.g. no token kept for a weight gradient): acc = 0, so c = 0 and y = bias, without
// reading A or B (null here). M = 0 or N = 0 queue nothing and may pass null outputs.
TEST_F(GemmS4S4S32TnSm80, EmptyKGivesZeroAccumulators) {
  const int64_t m = 5, n = 7;  // odd N: the scalar-store path
  const auto bias = random_floats(n, -4.0f, 4.0f, 77);
  const auto scale_b = random_floats(n, 1e-3f, 1e-1f, 78);
  DeviceBuffer<float> dbias(n), dsb(n), dy(m * n);
  DeviceBuffer<bf16_t> dy16(m * n);
  DeviceBuffer<int32_t> dc(m * n);
  dbias.upload(bias);
  dsb.upload(scale_b);
  dy.poison();
  dy16.poison();
  dc.poison();
  cuda::EpiDequantBias epi;
  epi.scale_b = dsb.get();
  epi.bias = dbias.get();
  cuda::gemm_s4s4_s32_tn_dequant_sm80({nullptr, nullptr, m, n, 0}, epi, dy.get(), nullptr);
  cuda::gemm_s4s4_s32_tn_dequant_sm80({nullptr, nullptr, m, n, 0}, epi, dy16.get(), nullptr);
  cuda::gemm_s4s4_s32_tn_sm80({nullptr, nullptr, m, n, 0}, dc.get(), nullptr);
  cuda::gemm_s4s4_s32_tn_sm80({nullptr, nullptr, 0, n, 64}, nullptr, nullptr);
  cuda::gemm_s4s4_s32_tn_sm80({nullptr, nullptr, m, 0, 64}, nullptr, nullptr);
  cuda::gemm_s4s4_s32_tn_dequant_sm80({nullptr, nullptr, 0, 0, 64}, epi,
                                      static_cast<float*>(nullptr), nullptr);
  NB_CUDA_CHECK(cudaDeviceSynchronize());
  const auto y = dy.download();
  const auto y16 = dy16.download();
  const auto c = dc.download();
  for (int64_t i = 0; i < m * n; ++i) {
    const float b = bias[static_cast<size_t>(i % n)];
    ASSERT_EQ(y[static_cast<size_t>(i)], b) << "element " << i;
    ASSERT_EQ(y16[static_cast<size_t>(i)].bits, f32_to_bf16(b)) << "element " << i;
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

TEST_F(GemmS4S4S32TnSm80, RejectsBadArgumentsAndQueuesNothing) {
  const int64_t m = 64, n = 64, k = 128;
  DeviceBuffer<uint8_t> a(m * k / 2 + 16), b(n * k / 2 + 16);
  DeviceBuffer<int32_t> c(m * n + 4);
  DeviceBuffer<float> y(m * n + 4), scale(n + 4);
  c.poison();
  y.poison();
  cuda::EpiDequantBias epi;
  using cuda::gemm_s4s4_s32_tn_dequant_sm80;
  using cuda::gemm_s4s4_s32_tn_sm80;
  expect_error_containing([&] { gemm_s4s4_s32_tn_sm80({a.get(), b.get(), m, n, 48}, c.get(), nullptr); },
                          "K=48 is not a multiple of 32");
  expect_error_containing([&] { gemm_s4s4_s32_tn_sm80({a.get(), b.get(), m, n, 100}, c.get(), nullptr); },
                          "zero-pad K to 128");
  expect_error_containing(
      [&] { gemm_s4s4_s32_tn_sm80({a.get(), b.get(), m, n, int64_t{1} << 25}, c.get(), nullptr); },
      "overflow the int32 accumulator");
  expect_error_containing([&] { gemm_s4s4_s32_tn_sm80({a.get(), b.get(), -1, n, k}, c.get(), nullptr); },
                          "negative size");
  expect_error_containing(
      [&] { gemm_s4s4_s32_tn_sm80({a.get() + 8, b.get(), m, n, k}, c.get(), nullptr); },
      "must be 16-byte aligned");
  expect_error_containing(
      [&] { gemm_s4s4_s32_tn_sm80({a.get(), b.get() + 4, m, n, k}, c.get(), nullptr); },
      "must be 16-byte aligned");
  expect_error_containing(
      [&] { gemm_s4s4_s32_tn_sm80({a.get(), b.get(), m, n, k}, c.get() + 1, nullptr); },
      "is not 16-byte aligned");
  expect_error_containing([&] { gemm_s4s4_s32_tn_sm80({nullptr, b.get(), m, n, k}, c.get(), nullptr); },
                          "A is null");
  expect_error_containing([&] { gemm_s4s4_s32_tn_sm80({a.get(), nullptr, m, n, k}, c.get(), nullptr); },
                          "B is null");
  expect_error_containing([&] { gemm_s4s4_s32_tn_sm80({a.get(), b.get(), m, n, k}, nullptr, nullptr); },
                          "output pointer is null");
  expect_error_containing(
      [&] {
        gemm_s4s4_s32_tn_dequant_sm80({a.get(), b.get(), m, n, 96 + 8}, epi, y.get(), nullptr);
      },
      "not a multiple of 32");
  expect_error_containing(
      [&] {
        cuda::EpiDequantBias bad = epi;
        bad.scale_b = reinterpret_cast<const float*>(reinterpret_cast<const char*>(scale.get()) + 2);
        gemm_s4s4_s32_tn_dequant_sm80({a.get(), b.get(), m, n, k}, bad, y.get(), nullptr);
      },
      "4-byte aligned");
  expect_error_containing(
      [&] { gemm_s4s4_s32_tn_dequant_sm80({a.get(), b.get(), m, n, k}, epi, y.get() + 2, nullptr); },
      "is not 16-byte aligned");

  // Nothing was queued: both outputs still hold the poison bytes.
  NB_CUDA_CHECK(cudaDeviceSynchronize());
  const auto c_after = c.download();
  const auto y_after = y.download();
  EXPECT_TRUE(std::all_of(c_after.begin(), c_after.end(), [](int32_t v) { return v == kPoisonS32; }));
  uint32_t y_poison = 0xA5A5A5A5u;
  float y_poison_f = 0;
  std::memcpy(&y_poison_f, &y_poison, sizeof(float));
  EXPECT_TRUE(std::all_of(y_after.begin(), y_after.end(),
                          [&](float v) { return std::memcmp(&v, &y_poison_f, sizeof(float)) == 0; }));
}

// ---- the native path -------------------------------------------------------------------

// The kernels the driver loaded are SASS for this device's architecture family (not some other
// image), with the expected block shape and shared memory. On sm_8x the s4 mma.sync is a native
// IMMA.16864.S4.S4 and the kernels spill nothing (ptxas -v: 122 registers on sm_80). On 9.x
// ptxas replaces each s4 mma.sync by a call to an emulation routine built on IMMA.16832.S8,
// whose calling convention costs a few spilled bytes; that check, and any notion of speed,
// do not apply there. Nothing is timed.
TEST_F(GemmS4S4S32TnSm80, LoadsNativeKernelsForThisDevice) {
  const int cc = current_device_cc();
  for (const auto out : {cuda::GemmS4S4Out::s32, cuda::GemmS4S4Out::bf16, cuda::GemmS4S4Out::f32}) {
    const auto info = cuda::gemm_s4s4_s32_tn_sm80_kernel_info(out);
    SCOPED_TRACE(::testing::Message() << "output kind " << static_cast<int>(out));
    std::printf("[ info     ] s4 kernel %d on cc %d: SASS %d, PTX %d, %d registers, %lld bytes "
                "local, %lld bytes static smem\n",
                static_cast<int>(out), info.device_cc, info.binary_cc, info.ptx_version,
                info.registers, static_cast<long long>(info.local_bytes),
                static_cast<long long>(info.static_smem_bytes));
    EXPECT_EQ(info.device_cc, cc);
    EXPECT_EQ(info.binary_cc / 10, cc / 10) << "SASS of another architecture family was loaded";
    EXPECT_LE(info.binary_cc, cc);
    EXPECT_EQ(info.static_smem_bytes, 48 * 1024);
    EXPECT_GE(info.max_threads_per_block, 256);
    if (cc / 10 == 8) {
      EXPECT_EQ(info.local_bytes, 0) << "register spills on the native path";
    }
  }
  if (cc / 10 != 8)
    GTEST_SKIP() << "compute capability " << cc / 10 << "." << cc % 10
                 << " emulates mma.sync s4: the spill check is for sm_8x only, and this path is "
                    "never timed (correctness only)";
}

// ==== the s8 twin: gemm_s8s8_s32_tn_sm80 / gemm_s8s8_s32_tn_dequant_sm80 ====================

using GemmS8S8S32TnSm80 = GemmS4S4S32TnSm80;  // the same requirement: compute capability ≥ 8.0

// Fresh full-range s8 codes [-128, 127] for a [rows, k] operand.
std::vector<int8_t> random_s8(int64_t rows, int64_t k, uint64_t seed) {
  return nibble::testing::randint8(rows * k, seed, -128, 127);
}

std::vector<int32_t> run_s8_s32(const Shape3& s, const std::vector<int8_t>& a,
                                const std::vector<int8_t>& b) {
  DeviceBuffer<int8_t> da(static_cast<int64_t>(a.size())), db(static_cast<int64_t>(b.size()));
  DeviceBuffer<int32_t> dc(s.m * s.n);
  da.upload(a);
  db.upload(b);
  dc.poison();
  cuda::gemm_s8s8_s32_tn_sm80({da.get(), db.get(), s.m, s.n, s.k}, dc.get(), nullptr);
  NB_CUDA_CHECK(cudaDeviceSynchronize());
  return dc.download();
}

int64_t check_s8_s32(const Shape3& s, const std::vector<int8_t>& a, const std::vector<int8_t>& b) {
  std::vector<int32_t> want(static_cast<size_t>(s.m * s.n));
  ref::gemm_s8s8_s32_tn(a.data(), b.data(), s.m, s.n, s.k, want.data());
  return count_mismatches(run_s8_s32(s, a, b), want, s.n);
}

TEST_F(GemmS8S8S32TnSm80, BitExactOnOddShapes) {
  // 245 shapes: M/N tails against the 128 × 128 CTA tile and the 16 × 8 mma tiles; K tails
  // against the 64-element stage (16 and 48 leave part of an m16n8k32 step zero-filled, 80 and
  // 1040 end on a partial stage).
  const std::vector<int64_t> sizes = {1, 7, 127, 128, 129, 255, 257};
  const std::vector<int64_t> ks = {16, 48, 64, 80, 1040};
  int failing_shapes = 0;
  for (const int64_t k : ks) {
    std::map<int64_t, std::vector<int8_t>> a_of, b_of;
    for (const int64_t r : sizes) {
      a_of[r] = random_s8(r, k, seed_for(r, 0, k, 101));
      b_of[r] = random_s8(r, k, seed_for(0, r, k, 102));
    }
    for (const int64_t m : sizes)
      for (const int64_t n : sizes) {
        SCOPED_TRACE(::testing::Message() << "M=" << m << " N=" << n << " K=" << k);
        if (check_s8_s32({m, n, k}, a_of[m], b_of[n]) != 0 && ++failing_shapes >= 10) {
          FAIL() << "stopping after 10 failing shapes";
        }
      }
  }
  EXPECT_EQ(failing_shapes, 0);
}

// Several CTAs along both axes with partial tiles at the far edges (8 × 3 CTAs), K = 2064 =
// 32 stages + 16 bytes.
TEST_F(GemmS8S8S32TnSm80, BitExactOnManyTiles) {
  const Shape3 s{1000, 300, 2064};
  EXPECT_EQ(check_s8_s32(s, random_s8(s.m, s.k, seed_for(s.m, s.n, s.k, 103)),
                         random_s8(s.n, s.k, seed_for(s.m, s.n, s.k, 104))),
            0);
}

// B = the identity gives c = a (every code back at its own column: byte order and sign), and
// A = the identity gives c[m, n] = b[n, m]. K = 176: 2 stages + 48 bytes.
TEST_F(GemmS8S8S32TnSm80, IdentityOperandsReturnCodesInOrder) {
  const int64_t rows = 37, k = 176;
  std::vector<int8_t> eye(static_cast<size_t>(k * k), 0);
  for (int64_t i = 0; i < k; ++i) eye[static_cast<size_t>(i * k + i)] = 1;
  const auto codes = random_s8(rows, k, 0x5e8);
  const auto c_a = run_s8_s32({rows, k, k}, codes, eye);
  EXPECT_EQ(count_mismatches(c_a, std::vector<int32_t>(codes.begin(), codes.end()), k), 0) << "A · I";
  const auto c_b = run_s8_s32({k, rows, k}, eye, codes);
  std::vector<int32_t> want_b(static_cast<size_t>(k * rows));
  for (int64_t m = 0; m < k; ++m)
    for (int64_t n = 0; n < rows; ++n)
      want_b[static_cast<size_t>(m * rows + n)] = codes[static_cast<size_t>(n * k + m)];
  EXPECT_EQ(count_mismatches(c_b, want_b, rows), 0) << "I · Bᵀ";
}

// The largest K the launcher accepts, 2^17 − 16, with the extreme codes: (−128)·(−128)
// everywhere sums to 16384·K = 2^31 − 2^18, the largest int32 sum the bound admits.
TEST_F(GemmS8S8S32TnSm80, ExtremeCodesAtTheLargestK) {
  const int64_t m = 17, n = 9, k = (int64_t{1} << 17) - 16;
  const std::vector<std::pair<int8_t, int8_t>> cases = {
      {-128, -128}, {-128, 127}, {127, 127}, {-1, 1}};
  for (const auto& [va, vb] : cases) {
    SCOPED_TRACE(::testing::Message() << "a = " << int{va} << ", b = " << int{vb});
    const auto c = run_s8_s32({m, n, k}, std::vector<int8_t>(static_cast<size_t>(m * k), va),
                              std::vector<int8_t>(static_cast<size_t>(n * k), vb));
    const int64_t want = int64_t{va} * vb * k;
    ASSERT_LE(want, int64_t{INT32_MAX});
    EXPECT_EQ(count_mismatches(c, std::vector<int32_t>(c.size(), static_cast<int32_t>(want)), n), 0);
  }
}

template <class OutT>
double check_dequant_s8(const Shape3& s, const EpiCase& c, uint64_t seed) {
  const auto a = random_s8(s.m, s.k, seed);
  const auto b = random_s8(s.n, s.k, seed + 1);
  std::vector<int32_t> acc(static_cast<size_t>(s.m * s.n));
  ref::gemm_s8s8_s32_tn(a.data(), b.data(), s.m, s.n, s.k, acc.data());
  return check_dequant_on<OutT>(
      s, c, seed, acc, std::vector<uint8_t>(a.begin(), a.end()),
      std::vector<uint8_t>(b.begin(), b.end()),
      [](const uint8_t* da, const uint8_t* db, const Shape3& sh, const cuda::EpiDequantBias& epi,
         OutT* y) {
        cuda::gemm_s8s8_s32_tn_dequant_sm80({reinterpret_cast<const int8_t*>(da),
                                             reinterpret_cast<const int8_t*>(db), sh.m, sh.n, sh.k},
                                            epi, y, nullptr);
      });
}

const std::vector<Shape3>& dequant_shapes_s8() {
  static const std::vector<Shape3> shapes = {
      {1, 7, 16}, {7, 129, 48}, {200, 127, 80}, {129, 257, 4096}, {257, 256, 1040}};
  return shapes;
}

TEST_F(GemmS8S8S32TnSm80, DequantBf16WithinRounding) {
  int variant = 110;
  double worst = 0;
  for (const auto& s : dequant_shapes_s8())
    for (const auto& c : epi_cases())
      worst = std::max(worst, check_dequant_s8<bf16_t>(s, c, seed_for(s.m, s.n, s.k, variant++)));
  std::printf("[ info     ] s8 bf16 dequant: largest |err| / bound = %.3f\n", worst);
}

TEST_F(GemmS8S8S32TnSm80, DequantF32WithinRounding) {
  int variant = 130;
  double worst = 0;
  for (const auto& s : dequant_shapes_s8())
    for (const auto& c : epi_cases())
      worst = std::max(worst, check_dequant_s8<float>(s, c, seed_for(s.m, s.n, s.k, variant++)));
  std::printf("[ info     ] s8 f32 dequant: largest |err| / bound = %.3f\n", worst);
}

TEST_F(GemmS8S8S32TnSm80, EmptyKGivesZeroAccumulators) {
  const int64_t m = 5, n = 7;
  const auto bias = random_floats(n, -4.0f, 4.0f, 177);
  const auto scale_b = random_floats(n, 1e-3f, 1e-1f, 178);
  DeviceBuffer<float> dbias(n), dsb(n), dy(m * n);
  DeviceBuffer<bf16_t> dy16(m * n);
  DeviceBuffer<int32_t> dc(m * n);
  dbias.upload(bias);
  dsb.upload(scale_b);
  dy.poison();
  dy16.poison();
  dc.poison();
  cuda::EpiDequantBias epi;
  epi.scale_b = dsb.get();
  epi.bias = dbias.get();
  cuda::gemm_s8s8_s32_tn_dequant_sm80({nullptr, nullptr, m, n, 0}, epi, dy.get(), nullptr);
  cuda::gemm_s8s8_s32_tn_dequant_sm80({nullptr, nullptr, m, n, 0}, epi, dy16.get(), nullptr);
  cuda::gemm_s8s8_s32_tn_sm80({nullptr, nullptr, m, n, 0}, dc.get(), nullptr);
  cuda::gemm_s8s8_s32_tn_sm80({nullptr, nullptr, 0, n, 64}, nullptr, nullptr);
  cuda::gemm_s8s8_s32_tn_sm80({nullptr, nullptr, m, 0, 64}, nullptr, nullptr);
  NB_CUDA_CHECK(cudaDeviceSynchronize());
  const auto y = dy.download();
  const auto y16 = dy16.download();
  const auto c = dc.download();
  for (int64_t i = 0; i < m * n; ++i) {
    const float b = bias[static_cast<size_t>(i % n)];
    ASSERT_EQ(y[static_cast<size_t>(i)], b) << "element " << i;
    ASSERT_EQ(y16[static_cast<size_t>(i)].bits, f32_to_bf16(b)) << "element " << i;
    ASSERT_EQ(c[static_cast<size_t>(i)], 0) << "element " << i;
  }
}

TEST_F(GemmS8S8S32TnSm80, RejectsBadArgumentsAndQueuesNothing) {
  const int64_t m = 64, n = 64, k = 128;
  DeviceBuffer<int8_t> a(m * k + 16), b(n * k + 16);
  DeviceBuffer<int32_t> c(m * n + 4);
  DeviceBuffer<float> y(m * n + 4), scale(n + 4);
  c.poison();
  y.poison();
  cuda::EpiDequantBias epi;
  using cuda::gemm_s8s8_s32_tn_dequant_sm80;
  using cuda::gemm_s8s8_s32_tn_sm80;
  expect_error_containing([&] { gemm_s8s8_s32_tn_sm80({a.get(), b.get(), m, n, 24}, c.get(), nullptr); },
                          "K=24 is not a multiple of 16");
  expect_error_containing([&] { gemm_s8s8_s32_tn_sm80({a.get(), b.get(), m, n, 40}, c.get(), nullptr); },
                          "zero-pad K to 48");
  expect_error_containing(
      [&] { gemm_s8s8_s32_tn_sm80({a.get(), b.get(), m, n, int64_t{1} << 17}, c.get(), nullptr); },
      "overflow the int32 accumulator");
  expect_error_containing([&] { gemm_s8s8_s32_tn_sm80({a.get(), b.get(), m, -1, k}, c.get(), nullptr); },
                          "negative size");
  expect_error_containing(
      [&] { gemm_s8s8_s32_tn_sm80({a.get() + 8, b.get(), m, n, k}, c.get(), nullptr); },
      "must be 16-byte aligned");
  expect_error_containing(
      [&] { gemm_s8s8_s32_tn_sm80({a.get(), b.get() + 4, m, n, k}, c.get(), nullptr); },
      "must be 16-byte aligned");
  expect_error_containing(
      [&] { gemm_s8s8_s32_tn_sm80({a.get(), b.get(), m, n, k}, c.get() + 1, nullptr); },
      "is not 16-byte aligned");
  expect_error_containing([&] { gemm_s8s8_s32_tn_sm80({nullptr, b.get(), m, n, k}, c.get(), nullptr); },
                          "A is null");
  expect_error_containing([&] { gemm_s8s8_s32_tn_sm80({a.get(), nullptr, m, n, k}, c.get(), nullptr); },
                          "B is null");
  expect_error_containing([&] { gemm_s8s8_s32_tn_sm80({a.get(), b.get(), m, n, k}, nullptr, nullptr); },
                          "output pointer is null");
  expect_error_containing(
      [&] {
        cuda::EpiDequantBias bad = epi;
        bad.bias = reinterpret_cast<const float*>(reinterpret_cast<const char*>(scale.get()) + 2);
        gemm_s8s8_s32_tn_dequant_sm80({a.get(), b.get(), m, n, k}, bad, y.get(), nullptr);
      },
      "4-byte aligned");
  expect_error_containing(
      [&] { gemm_s8s8_s32_tn_dequant_sm80({a.get(), b.get(), m, n, k}, epi, y.get() + 2, nullptr); },
      "is not 16-byte aligned");
  NB_CUDA_CHECK(cudaDeviceSynchronize());
  const auto c_after = c.download();
  EXPECT_TRUE(std::all_of(c_after.begin(), c_after.end(), [](int32_t v) { return v == kPoisonS32; }));
  uint32_t y_poison = 0xA5A5A5A5u;
  const auto y_after = y.download();
  EXPECT_TRUE(std::all_of(y_after.begin(), y_after.end(),
                          [&](float v) { return std::memcmp(&v, &y_poison, sizeof(float)) == 0; }));
}

// The s8 mma.sync is native on sm_8x and on sm_90a (IMMA.16832.S8.S8; ptxas -v: 125 registers
// on sm_80, 127 on sm_90a, no stack), so no spills are expected on either.
TEST_F(GemmS8S8S32TnSm80, LoadsNativeKernelsForThisDevice) {
  const int cc = current_device_cc();
  for (const auto out : {cuda::GemmS4S4Out::s32, cuda::GemmS4S4Out::bf16, cuda::GemmS4S4Out::f32}) {
    const auto info = cuda::gemm_s8s8_s32_tn_sm80_kernel_info(out);
    SCOPED_TRACE(::testing::Message() << "output kind " << static_cast<int>(out));
    std::printf("[ info     ] s8 kernel %d on cc %d: SASS %d, PTX %d, %d registers, %lld bytes "
                "local, %lld bytes static smem\n",
                static_cast<int>(out), info.device_cc, info.binary_cc, info.ptx_version,
                info.registers, static_cast<long long>(info.local_bytes),
                static_cast<long long>(info.static_smem_bytes));
    EXPECT_EQ(info.device_cc, cc);
    EXPECT_EQ(info.binary_cc / 10, cc / 10) << "SASS of another architecture family was loaded";
    EXPECT_LE(info.binary_cc, cc);
    EXPECT_EQ(info.static_smem_bytes, 48 * 1024);
    EXPECT_GE(info.max_threads_per_block, 256);
    if (cc / 10 == 8 || cc == 90) {
      EXPECT_EQ(info.local_bytes, 0) << "register spills in the s8 kernel";
    }
  }
}

// ---- the dispatcher ------------------------------------------------------------------------

TEST_F(GemmS8S8S32TnSm80, DispatchChoosesThePathAndRejectsS4OnWgmma) {
  const int cc = current_device_cc();
  const bool hopper = cc == 90 && cuda::gemm_sm90_available();
  EXPECT_EQ(cuda::resolve_gemm_path(cuda::GemmPath::automatic),
            hopper ? cuda::GemmPath::wgmma_sm90 : cuda::GemmPath::mma_sm80);
  EXPECT_EQ(cuda::resolve_gemm_path(cuda::GemmPath::mma_sm80), cuda::GemmPath::mma_sm80);
  EXPECT_EQ(cuda::resolve_gemm_path(cuda::GemmPath::wgmma_sm90), cuda::GemmPath::wgmma_sm90);
  DeviceBuffer<uint8_t> a(64 * 64), b(64 * 64);
  DeviceBuffer<float> y(64 * 64);
  expect_error_containing(
      [&] {
        cuda::gemm_s4s4_s32_tn_dequant({a.get(), b.get(), 64, 64, 64}, cuda::EpiDequantBias{},
                                       y.get(), cuda::GemmPath::wgmma_sm90, nullptr);
      },
      "has no s4 kernel");
}

// On H100/H200 both paths exist: the same s8 operands and epilogue through wgmma_sm90 and
// mma_sm80 must give the same bits (exact int32 sums; s = sa·sb, then fma(float(acc), s, bias)
// on both), with and without bias, per-row/per-column and scalar scales, f32 and bf16.
// N = 136 (a multiple of 8, as the sm_90a kernel needs for bf16), M and K odd multiples.
TEST_F(GemmS8S8S32TnSm80, DispatchPathsAgreeBitForBitOnHopper) {
  if (!(current_device_cc() == 90 && cuda::gemm_sm90_available()))
    GTEST_SKIP() << "needs compute capability 9.0 and the CUTLASS sm_90a kernels";
  const Shape3 s{200, 136, 1040};
  const auto a = random_s8(s.m, s.k, 0xd15a);
  const auto b = random_s8(s.n, s.k, 0xd15b);
  DeviceBuffer<int8_t> da(s.m * s.k), db(s.n * s.k);
  da.upload(a);
  db.upload(b);
  int variant = 0;
  for (const auto& c : epi_cases()) {
    SCOPED_TRACE(::testing::Message() << "per_row=" << c.a_per_row << " per_col=" << c.b_per_col
                                      << " bias=" << c.with_bias << " null_scales=" << c.null_scales);
    const uint64_t seed = seed_for(s.m, s.n, s.k, 150 + variant++);
    const auto scale_a = random_floats(c.a_per_row ? s.m : 1, 1e-3f, 1e-1f, seed);
    const auto scale_b = random_floats(c.b_per_col ? s.n : 1, 1e-3f, 1e-1f, seed + 1);
    const auto bias = random_floats(s.n, -4.0f, 4.0f, seed + 2);
    DeviceBuffer<float> dsa(static_cast<int64_t>(scale_a.size())),
        dsb(static_cast<int64_t>(scale_b.size())), dbias(s.n);
    dsa.upload(scale_a);
    dsb.upload(scale_b);
    dbias.upload(bias);
    cuda::EpiDequantBias epi;
    epi.scale_a = c.null_scales ? nullptr : dsa.get();
    epi.a_per_row = c.a_per_row;
    epi.scale_b = c.null_scales ? nullptr : dsb.get();
    epi.b_per_col = c.b_per_col;
    epi.bias = c.with_bias ? dbias.get() : nullptr;
    const cuda::GemmS8S8Params p{da.get(), db.get(), s.m, s.n, s.k};
    DeviceBuffer<float> y90(s.m * s.n), y80(s.m * s.n);
    DeviceBuffer<bf16_t> h90(s.m * s.n), h80(s.m * s.n);
    y90.poison();
    y80.poison();
    h90.poison();
    h80.poison();
    cuda::gemm_s8s8_s32_tn_dequant(p, epi, y90.get(), cuda::GemmPath::wgmma_sm90, nullptr);
    cuda::gemm_s8s8_s32_tn_dequant(p, epi, y80.get(), cuda::GemmPath::mma_sm80, nullptr);
    cuda::gemm_s8s8_s32_tn_dequant(p, epi, h90.get(), cuda::GemmPath::wgmma_sm90, nullptr);
    cuda::gemm_s8s8_s32_tn_dequant(p, epi, h80.get(), cuda::GemmPath::mma_sm80, nullptr);
    NB_CUDA_CHECK(cudaDeviceSynchronize());
    const auto f90 = y90.download(), f80 = y80.download();
    const auto b90 = h90.download(), b80 = h80.download();
    int64_t bad = 0;
    for (size_t i = 0; i < f90.size(); ++i) {
      const bool same = std::memcmp(&f90[i], &f80[i], sizeof(float)) == 0 && b90[i].bits == b80[i].bits;
      if (!same && bad++ < 5)
        ADD_FAILURE() << "y[" << i / static_cast<size_t>(s.n) << ", " << i % static_cast<size_t>(s.n)
                      << "]: wgmma f32 " << f90[i] << " / bf16 " << b90[i].bits << ", mma_sm80 f32 "
                      << f80[i] << " / bf16 " << b80[i].bits;
    }
    EXPECT_EQ(bad, 0);
  }
}

}  // namespace
