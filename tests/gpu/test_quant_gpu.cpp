// GPU tests of the quantization kernels (src/cuda/quant) against their CPU twins in src/ref
// (binary nibble_gpu_tests, CTest label "gpu").
//   - integer outputs (codes, packed bytes, zero points, masks, index lists) and the floats
//     the reference computes with the same fp32 operations (transformed values, r = v/s,
//     scales, the bit-split s, row norms, leverage scores) are compared bit for bit, and the
//     first mismatching index is reported;
//   - lsq_init_scale and fit_probabilities are float reductions in another order: within
//     1 fp32 ulp, for the reasons written in src/cuda/quant/{hadamard,bitsplit}.h;
//   - the host-side argument checks throw nibble::Error, and the device status word names
//     the first bad element.
// Every case draws fresh Philox inputs with its own seed; outputs are poisoned before each
// run, so an element a kernel never writes cannot pass.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cuda/common/check.h"
#include "cuda/quant/bitsplit.h"
#include "cuda/quant/hadamard.h"
#include "cuda/quant/quant.h"
#include "cuda/quant/status.h"
#include "gpu/device_buffer.h"
#include "nibble/dtype.h"
#include "nibble/error.h"
#include "nibble/format.h"
#include "nibble/parallel.h"
#include "nibble/rng.h"
#include "ref/bitsplit.h"
#include "ref/hadamard.h"
#include "ref/quant.h"

using namespace nibble;

namespace {

using test::DeviceBuffer;

// ---- helpers ----------------------------------------------------------------------------------


void sync() { NB_CUDA_CHECK(cudaDeviceSynchronize()); }

// Activation-like data: N(0, 1), a few outlier columns ×20 and, per row, a random gain in
// [0.25, 4) so that per-row scales differ. Parallel (each index is its own Philox draw).
std::vector<float> random_activations(int64_t rows, int64_t cols, uint64_t seed) {
  std::vector<float> v(static_cast<size_t>(rows * cols));
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  const PhiloxKey gain_key{seed, 1, 0, RngRole::data};
  parallel_for(rows, [&](int64_t r) {
    const float gain = 0.25f + 3.75f * philox_uniform(gain_key, static_cast<uint64_t>(r));
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      float x = philox_normal(key, static_cast<uint64_t>(i)) * gain;
      if (c % 97 == 13) x *= 20.0f;
      v[static_cast<size_t>(i)] = x;
    }
  }, cols);
  return v;
}

// Gradient-like data with structured sparsity (algorithms.md B.3): every third row is exactly
// zero, a few rows are 50× larger than the rest.
std::vector<float> random_gradient(int64_t rows, int64_t cols, uint64_t seed) {
  std::vector<float> g = random_activations(rows, cols, seed);
  parallel_for(rows, [&](int64_t r) {
    const float f = (r % 3 == 1) ? 0.0f : (r % 17 == 5 ? 50.0f : 1e-3f);
    for (int64_t c = 0; c < cols; ++c) g[static_cast<size_t>(r * cols + c)] *= f;
  }, cols);
  if (rows == 1) g[0] = 0.37f;  // one-row gradients must not be all zero
  return g;
}

std::vector<bf16_t> to_bf16(const std::vector<float>& v) {
  std::vector<bf16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = bf16_t{f32_to_bf16(v[i])};
  return b;
}
std::vector<float> widen(const std::vector<bf16_t>& b) {
  std::vector<float> v(b.size());
  for (size_t i = 0; i < b.size(); ++i) v[i] = bf16_to_f32(b[i].bits);
  return v;
}

template <class T>
std::vector<T> transpose(const std::vector<T>& a, int64_t rows, int64_t cols) {
  std::vector<T> t(a.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[static_cast<size_t>(c * rows + r)] = a[static_cast<size_t>(r * cols + c)];
  return t;
}

// Index of the first element whose bytes differ (−1 if none): floats are compared bit for bit.
template <class T>
int64_t first_mismatch(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return static_cast<int64_t>(i);
  }
  return -1;
}

template <class T>
double as_number(T v) { return static_cast<double>(v); }

// Bit-for-bit comparison; reports the first mismatching index and both values.
template <class T>
void expect_same(const std::vector<T>& gpu, const std::vector<T>& ref, const std::string& what) {
  const int64_t i = first_mismatch(gpu, ref);
  if (i < 0) return;
  if (gpu.size() != ref.size()) {
    ADD_FAILURE() << what << ": size " << gpu.size() << " vs ref " << ref.size();
    return;
  }
  ADD_FAILURE() << what << ": first mismatch at index " << i << ": gpu "
                << as_number(gpu[static_cast<size_t>(i)]) << ", ref "
                << as_number(ref[static_cast<size_t>(i)]);
}
#define EXPECT_SAME(gpu, ref, what) expect_same(gpu, ref, what)

// |a − b| in units of fp32 ulps (0 for equal numbers).
int64_t ulp_distance(float a, float b) {
  int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  if (ia < 0) ia = std::numeric_limits<int32_t>::min() - ia;
  if (ib < 0) ib = std::numeric_limits<int32_t>::min() - ib;
  return std::llabs(static_cast<int64_t>(ia) - ib);
}

uint64_t read_status(const DeviceBuffer<uint64_t>& st) { return st.download()[0]; }

// (rows, cols, block) cases of the brief: rows 1, 7, 1000; cols multiples of the block.
struct Shape {
  int64_t rows, cols, block;
};
const Shape kHqShapes[] = {
    {1, 32, 1},     {7, 32, 16},   {1000, 96, 16},  {7, 96, 32},     {1000, 768, 32},
    {1, 768, 128},  {7, 4096, 128}, {1000, 4096, 1024}, {1, 1024, 1024}, {7, 768, 256},
    {1000, 1536, 512}, {7, 6, 2},
    // cols % 4 != 0: the kernels' scalar access path (rows % 4 == 0 or not for the transpose)
    {1000, 6, 2}, {7, 33, 1}, {4, 66, 2},
};

// ---- Hadamard and HQ ----------------------------------------------------------------------

TEST(QuantGpu, HadamardBlocksMatchesRef) {
  uint64_t seed = 100;
  for (const Shape& sh : kHqShapes) {
    SCOPED_TRACE(::testing::Message() << "rows " << sh.rows << " cols " << sh.cols << " block " << sh.block);
    const int64_t n = sh.rows * sh.cols;
    const std::vector<float> x = random_activations(sh.rows, sh.cols, ++seed);
    std::vector<float> ref = x;
    ref::hadamard_blocks(ref.data(), sh.rows, sh.cols, sh.block);

    DeviceBuffer<float> dx(x), dy(n);
    cuda::HadamardParams<float> p;
    p.x = dx.get(), p.rows = sh.rows, p.cols = sh.cols, p.block = sh.block, p.y = dy.get();
    cuda::hadamard_blocks(p, nullptr);
    sync();
    EXPECT_SAME(dy.download(), ref, "out of place");
    p.y = dx.get();  // in place
    cuda::hadamard_blocks(p, nullptr);
    sync();
    EXPECT_SAME(dx.download(), ref, "in place");

    // bf16 input: the reference of its exact fp32 widening
    const std::vector<bf16_t> xb = to_bf16(x);
    std::vector<float> ref_b = widen(xb);
    ref::hadamard_blocks(ref_b.data(), sh.rows, sh.cols, sh.block);
    DeviceBuffer<bf16_t> dxb(xb);
    cuda::HadamardParams<bf16_t> pb;
    pb.x = dxb.get(), pb.rows = sh.rows, pb.cols = sh.cols, pb.block = sh.block, pb.y = dy.get();
    cuda::hadamard_blocks(pb, nullptr);
    sync();
    EXPECT_SAME(dy.download(), ref_b, "bf16 input");
  }
}

// Runs hq_quantize on T = float or bf16_t and compares q, q_t and r with ref::hq_quantize of
// the fp32 (widened) input, with the LSQ-init step of the transformed input scaled by
// `step_factor` (< 1 makes some codes clamp).
template <class T>
void check_hq_quantize(const Shape& sh, QRange range, float step_factor, bool all_outputs,
                       uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "rows " << sh.rows << " cols " << sh.cols << " block "
                                    << sh.block << " range [" << range.qmin << ", " << range.qmax
                                    << "] outputs " << (all_outputs ? "q, q_t, r" : "q"));
  const int64_t n = sh.rows * sh.cols;
  std::vector<float> x = random_activations(sh.rows, sh.cols, seed);
  std::vector<T> xt;
  if constexpr (std::is_same_v<T, float>) {
    xt = x;
  } else {
    xt = to_bf16(x);
    x = widen(xt);
  }
  std::vector<float> v = x;
  ref::hadamard_blocks(v.data(), sh.rows, sh.cols, sh.block);
  const float s = ref::lsq_init_scale(v.data(), n, range) * step_factor;
  std::vector<int8_t> q_ref(static_cast<size_t>(n));
  std::vector<float> r_ref(static_cast<size_t>(n));
  ref::hq_quantize(x.data(), sh.rows, sh.cols, sh.block, s, range, q_ref.data(), r_ref.data());

  DeviceBuffer<T> dx(xt);
  DeviceBuffer<float> dstep(std::vector<float>{s}), dr(n);
  DeviceBuffer<int8_t> dq(n), dqt(n);
  DeviceBuffer<uint64_t> st(1);
  cuda::status_clear(st.get(), nullptr);
  cuda::HqQuantizeParams<T> p;
  p.x = dx.get(), p.rows = sh.rows, p.cols = sh.cols, p.block = sh.block, p.range = range;
  p.step = dstep.get(), p.q = dq.get(), p.status = st.get();
  if (all_outputs) p.q_t = dqt.get(), p.r = dr.get();
  cuda::hq_quantize(p, nullptr);
  sync();
  EXPECT_EQ(read_status(st), cuda::kStatusClear);
  EXPECT_SAME(dq.download(), q_ref, "q");
  if (all_outputs) {
    EXPECT_SAME(dqt.download(), transpose(q_ref, sh.rows, sh.cols), "q_t");
    EXPECT_SAME(dr.download(), r_ref, "r");
  }
}

TEST(QuantGpu, HqQuantizeMatchesRefF32) {
  uint64_t seed = 200;
  for (const Shape& sh : kHqShapes) check_hq_quantize<float>(sh, kInt4Sym, 0.6f, true, ++seed);
  // the released code's [-8, 7], and the q-only path
  check_hq_quantize<float>({1000, 768, 32}, kInt4Full, 0.6f, true, ++seed);
  check_hq_quantize<float>({7, 4096, 1024}, kInt4Sym, 1.0f, false, ++seed);
  check_hq_quantize<float>({1000, 96, 1}, kInt8Sym, 0.05f, true, ++seed);
}

TEST(QuantGpu, HqQuantizeMatchesRefBf16) {
  uint64_t seed = 300;
  for (const Shape& sh : kHqShapes) check_hq_quantize<bf16_t>(sh, kInt4Sym, 0.6f, true, ++seed);
  check_hq_quantize<bf16_t>({7, 96, 32}, kInt4Full, 1.3f, false, ++seed);
}

// Pointers one element past an aligned base: the launchers must fall back to scalar accesses.
TEST(QuantGpu, HqQuantizeUnalignedPointers) {
  const int64_t rows = 1000, cols = 768, block = 32, n = rows * cols;
  const std::vector<float> x = random_activations(rows, cols, 350);
  std::vector<float> v = x;
  ref::hadamard_blocks(v.data(), rows, cols, block);
  const float s = ref::lsq_init_scale(v.data(), n, kInt4Sym);
  std::vector<int8_t> q_ref(static_cast<size_t>(n));
  std::vector<float> r_ref(static_cast<size_t>(n));
  ref::hq_quantize(x.data(), rows, cols, block, s, kInt4Sym, q_ref.data(), r_ref.data());
  std::vector<float> x_shifted(static_cast<size_t>(n + 1));
  std::copy(x.begin(), x.end(), x_shifted.begin() + 1);
  DeviceBuffer<float> dx(x_shifted), dstep(std::vector<float>{s}), dr(n + 1);
  DeviceBuffer<int8_t> dq(n + 1), dqt(n + 1);
  cuda::HqQuantizeParams<float> p;
  p.x = dx.get() + 1, p.rows = rows, p.cols = cols, p.block = block, p.step = dstep.get();
  p.q = dq.get() + 1, p.q_t = dqt.get() + 1, p.r = dr.get() + 1;
  cuda::hq_quantize(p, nullptr);
  sync();
  std::vector<int8_t> q = dq.download(), qt = dqt.download();
  std::vector<float> r = dr.download();
  EXPECT_SAME(std::vector<int8_t>(q.begin() + 1, q.end()), q_ref, "q");
  EXPECT_SAME(std::vector<int8_t>(qt.begin() + 1, qt.end()), transpose(q_ref, rows, cols), "q_t");
  EXPECT_SAME(std::vector<float>(r.begin() + 1, r.end()), r_ref, "r");
}

// Pinned tie behaviour (docs/formats.md): block 1 (no transform), s = 0.5, so r = 2x exactly.
TEST(QuantGpu, HqQuantizeRoundsHalfToEvenAndClamps) {
  const std::vector<float> x = {0.25f, 0.75f, 1.25f, -0.25f, -0.75f, 1.75f, 100.0f, -100.0f};
  const std::vector<int8_t> expect_sym = {0, 2, 2, 0, -2, 4, 7, -7};
  const std::vector<int8_t> expect_full = {0, 2, 2, 0, -2, 4, 7, -8};
  DeviceBuffer<float> dx(x), dstep(std::vector<float>{0.5f});
  DeviceBuffer<int8_t> dq(8);
  cuda::HqQuantizeParams<float> p;
  p.x = dx.get(), p.rows = 1, p.cols = 8, p.block = 1, p.step = dstep.get(), p.q = dq.get();
  cuda::hq_quantize(p, nullptr);
  sync();
  EXPECT_SAME(dq.download(), expect_sym, "[-7, 7]");
  p.range = kInt4Full;
  cuda::hq_quantize(p, nullptr);
  sync();
  EXPECT_SAME(dq.download(), expect_full, "[-8, 7]");
}

TEST(QuantGpu, LsqInitScaleWithinOneUlpOfRef) {
  uint64_t seed = 400;
  DeviceBuffer<double> scratch(cuda::kLsqInitScratch);
  DeviceBuffer<float> dstep(1);
  for (const Shape& sh : kHqShapes) {
    SCOPED_TRACE(::testing::Message() << "rows " << sh.rows << " cols " << sh.cols << " block " << sh.block);
    const int64_t n = sh.rows * sh.cols;
    const std::vector<float> x = random_activations(sh.rows, sh.cols, ++seed);
    std::vector<float> v = x;
    ref::hadamard_blocks(v.data(), sh.rows, sh.cols, sh.block);
    const float s_ref = ref::lsq_init_scale(v.data(), n, kInt4Sym);
    DeviceBuffer<float> dx(x);
    cuda::LsqInitParams<float> p;
    p.x = dx.get(), p.rows = sh.rows, p.cols = sh.cols, p.block = sh.block;
    p.step = dstep.get(), p.scratch = scratch.get();
    cuda::lsq_init_scale(p, nullptr);
    sync();
    const float s_gpu = dstep.download()[0];
    // 1 ulp: both fp64 sums are within (n−1)·2^-53 of the exact sum (cuda/quant/hadamard.h)
    EXPECT_LE(ulp_distance(s_gpu, s_ref), 1) << "gpu " << s_gpu << " ref " << s_ref;
    // deterministic: a second run gives the same bits
    cuda::lsq_init_scale(p, nullptr);
    sync();
    EXPECT_EQ(ulp_distance(dstep.download()[0], s_gpu), 0);

    const std::vector<bf16_t> xb = to_bf16(x);
    std::vector<float> vb = widen(xb);
    ref::hadamard_blocks(vb.data(), sh.rows, sh.cols, sh.block);
    const float sb_ref = ref::lsq_init_scale(vb.data(), n, kInt4Full);
    DeviceBuffer<bf16_t> dxb(xb);
    cuda::LsqInitParams<bf16_t> pb;
    pb.x = dxb.get(), pb.rows = sh.rows, pb.cols = sh.cols, pb.block = sh.block;
    pb.range = kInt4Full, pb.step = dstep.get(), pb.scratch = scratch.get();
    cuda::lsq_init_scale(pb, nullptr);
    sync();
    EXPECT_LE(ulp_distance(dstep.download()[0], sb_ref), 1) << "bf16: gpu " << dstep.download()[0] << " ref " << sb_ref;
  }
  // An all-zero tensor gets s = 1, as on the CPU (edge case, not random data).
  DeviceBuffer<float> zeros(std::vector<float>(64, 0.0f));
  cuda::LsqInitParams<float> pz;
  pz.x = zeros.get(), pz.rows = 2, pz.cols = 32, pz.block = 32, pz.step = dstep.get(), pz.scratch = scratch.get();
  cuda::lsq_init_scale(pz, nullptr);
  sync();
  EXPECT_EQ(dstep.download()[0], 1.0f);
}

// ---- per-row / per-column scales and codes --------------------------------------------------

struct ScaleCase {
  Granularity g;
  QRange range;
  bool asymmetric;
  Rounding rounding;
};

template <class T>
void check_scales(int64_t rows, int64_t cols, const ScaleCase& sc, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "rows " << rows << " cols " << cols << " granularity "
                                    << (sc.g == Granularity::row ? "row" : "column") << " range ["
                                    << sc.range.qmin << ", " << sc.range.qmax << "] "
                                    << (sc.asymmetric ? "asymmetric" : "symmetric") << " "
                                    << (sc.rounding == Rounding::nearest ? "nearest" : "stochastic")
                                    << (std::is_same_v<T, float> ? " f32" : " bf16"));
  const int64_t n = rows * cols;
  std::vector<float> x = random_activations(rows, cols, seed);
  // an all-zero row and column (s = 1, zero point qmin), and a row of one sign
  if (rows > 1)
    for (int64_t c = 0; c < cols; ++c) x[static_cast<size_t>(c)] = 0.0f;
  for (int64_t r = 0; r < rows; ++r) x[static_cast<size_t>(r * cols + cols - 1)] = 0.0f;
  if (rows > 2)
    for (int64_t c = 0; c < cols; ++c) x[static_cast<size_t>(2 * cols + c)] = std::fabs(x[static_cast<size_t>(2 * cols + c)]);
  std::vector<T> xt;
  if constexpr (std::is_same_v<T, float>) {
    xt = x;
  } else {
    xt = to_bf16(x);
    x = widen(xt);
  }
  const int64_t ns = sc.g == Granularity::row ? rows : cols;
  std::vector<float> s_ref(static_cast<size_t>(ns));
  std::vector<int32_t> zp_ref(static_cast<size_t>(ns));
  ref::compute_scales(x.data(), rows, cols, sc.g, 0, sc.range, sc.asymmetric, s_ref.data(),
                      sc.asymmetric ? zp_ref.data() : nullptr);
  const PhiloxKey key{seed * 7, 3, 5, RngRole::rounding};
  std::vector<int8_t> q_ref(static_cast<size_t>(n));
  ref::quantize(x.data(), rows, cols, sc.g, 0, s_ref.data(), sc.asymmetric ? zp_ref.data() : nullptr,
                sc.range, sc.rounding, key, q_ref.data());

  DeviceBuffer<T> dx(xt);
  DeviceBuffer<float> ds(ns);
  DeviceBuffer<int32_t> dzp(ns);
  DeviceBuffer<int8_t> dq(n);
  DeviceBuffer<uint64_t> st(1);
  cuda::status_clear(st.get(), nullptr);
  cuda::ScaleParams<T> p;
  p.x = dx.get(), p.rows = rows, p.cols = cols, p.granularity = sc.g, p.range = sc.range;
  p.asymmetric = sc.asymmetric, p.scale = ds.get(), p.zero_point = sc.asymmetric ? dzp.get() : nullptr;
  p.status = st.get();
  // scales only
  cuda::compute_scales(p, nullptr);
  sync();
  EXPECT_SAME(ds.download(), s_ref, "scales (scale-only call)");
  if (sc.asymmetric) EXPECT_SAME(dzp.download(), zp_ref, "zero points (scale-only call)");
  // fused scales + codes
  ds.poison(), dzp.poison();
  p.q = dq.get(), p.rounding = sc.rounding, p.key = key;
  cuda::compute_scales(p, nullptr);
  sync();
  EXPECT_EQ(read_status(st), cuda::kStatusClear);
  EXPECT_SAME(ds.download(), s_ref, "scales");
  if (sc.asymmetric) EXPECT_SAME(dzp.download(), zp_ref, "zero points");
  EXPECT_SAME(dq.download(), q_ref, "codes");
}

const ScaleCase kScaleCases[] = {
    {Granularity::row, kInt4Sym, false, Rounding::nearest},
    {Granularity::row, kInt4Full, false, Rounding::stochastic},
    {Granularity::row, kUint4, true, Rounding::nearest},
    {Granularity::row, kInt8Sym, true, Rounding::stochastic},  // asymmetric on a signed range
    {Granularity::column, kInt4Sym, false, Rounding::nearest},
    {Granularity::column, kInt8Sym, false, Rounding::stochastic},
    {Granularity::column, kUint4, true, Rounding::nearest},
    {Granularity::column, kInt4Full, true, Rounding::stochastic},
};

TEST(QuantGpu, ScalesAndCodesMatchRef) {
  uint64_t seed = 500;
  const int64_t rows_list[] = {1, 7, 1000};
  const int64_t cols_list[] = {32, 96, 768, 4096};
  for (const ScaleCase& sc : kScaleCases) {
    for (int64_t rows : rows_list) {
      for (int64_t cols : cols_list) {
        if (rows * cols > 1000 * 768 && sc.rounding == Rounding::stochastic) continue;  // time
        check_scales<float>(rows, cols, sc, ++seed);
      }
    }
    check_scales<bf16_t>(7, 768, sc, ++seed);
    check_scales<bf16_t>(1000, 96, sc, ++seed);
  }
}

TEST(QuantGpu, QuantizeWithGivenScalesMatchesRef) {
  uint64_t seed = 600;
  const int64_t rows = 7, cols = 768, group = 64;
  struct Case { Granularity g; bool asymmetric; QRange range; Rounding mode; };
  const Case cases[] = {
      {Granularity::tensor, false, kInt4Sym, Rounding::nearest},
      {Granularity::row, true, kUint4, Rounding::stochastic},
      {Granularity::column, false, kInt4Full, Rounding::stochastic},
      {Granularity::group, true, QRange{-128, 127}, Rounding::nearest},
      {Granularity::group, false, kInt8Sym, Rounding::stochastic},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "granularity " << static_cast<int>(c.g));
    const std::vector<float> x = random_activations(rows, cols, ++seed);
    const int64_t ns = ref::scale_count(c.g, rows, cols, group);
    std::vector<float> s(static_cast<size_t>(ns));
    std::vector<int32_t> zp(static_cast<size_t>(ns));
    ref::compute_scales(x.data(), rows, cols, c.g, group, c.range, c.asymmetric, s.data(),
                        c.asymmetric ? zp.data() : nullptr);
    const PhiloxKey key{seed, 1, 2, RngRole::rounding};
    std::vector<int8_t> q_ref(static_cast<size_t>(rows * cols));
    ref::quantize(x.data(), rows, cols, c.g, group, s.data(), c.asymmetric ? zp.data() : nullptr,
                  c.range, c.mode, key, q_ref.data());
    DeviceBuffer<float> dx(x), ds(s);
    DeviceBuffer<int32_t> dzp(zp);
    DeviceBuffer<int8_t> dq(rows * cols);
    cuda::QuantizeParams<float> p;
    p.x = dx.get(), p.rows = rows, p.cols = cols, p.granularity = c.g, p.group = group;
    p.scale = ds.get(), p.zero_point = c.asymmetric ? dzp.get() : nullptr, p.range = c.range;
    p.rounding = c.mode, p.key = key, p.q = dq.get();
    cuda::quantize(p, nullptr);
    sync();
    EXPECT_SAME(dq.download(), q_ref, "codes");
  }
}

TEST(QuantGpu, PackUnpackS4RowsMatchRef) {
  // pinned bytes (docs/formats.md): {1, −2} -> 0xE1, {−8, 7} -> 0x78; odd tail -> high nibble 0
  {
    DeviceBuffer<int8_t> dq(std::vector<int8_t>{1, -2, -8, 7, 5});
    DeviceBuffer<uint8_t> dp(3);
    cuda::PackS4Params p;
    p.q = dq.get(), p.rows = 1, p.cols = 5, p.packed = dp.get();
    cuda::pack_s4_rows(p, nullptr);
    sync();
    EXPECT_SAME(dp.download(), (std::vector<uint8_t>{0xE1, 0x78, 0x05}), "pinned bytes");
  }
  uint64_t seed = 700;
  const int64_t shapes[][2] = {{1, 1}, {7, 33}, {1000, 96}, {3, 4097}, {1000, 4096}};
  for (const auto& sh : shapes) {
    const int64_t rows = sh[0], cols = sh[1];
    SCOPED_TRACE(::testing::Message() << "rows " << rows << " cols " << cols);
    std::vector<int8_t> q(static_cast<size_t>(rows * cols));
    const PhiloxKey key{++seed, 0, 0, RngRole::data};
    for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<int8_t>(static_cast<int>(philox_u32(key, i) % 16) - 8);
    const int64_t rb = (cols + 1) / 2;
    std::vector<uint8_t> packed_ref(static_cast<size_t>(rows * rb));
    ref::pack_s4_rows(q.data(), rows, cols, packed_ref.data());
    DeviceBuffer<int8_t> dq(q), dq2(rows * cols);
    DeviceBuffer<uint8_t> dp(rows * rb);
    DeviceBuffer<uint64_t> st(1);
    cuda::status_clear(st.get(), nullptr);
    cuda::PackS4Params p;
    p.q = dq.get(), p.rows = rows, p.cols = cols, p.packed = dp.get(), p.status = st.get();
    cuda::pack_s4_rows(p, nullptr);
    cuda::UnpackS4Params u;
    u.packed = dp.get(), u.rows = rows, u.cols = cols, u.q = dq2.get();
    cuda::unpack_s4_rows(u, nullptr);
    sync();
    EXPECT_EQ(read_status(st), cuda::kStatusClear);
    EXPECT_SAME(dp.download(), packed_ref, "packed bytes");
    EXPECT_SAME(dq2.download(), q, "round trip");
  }
}

// The status word names the first bad element (and status_throw_if_set turns it into an Error).
TEST(QuantGpu, StatusNamesFirstBadElement) {
  const int64_t rows = 7, cols = 96;
  std::vector<float> x = random_activations(rows, cols, 800);
  x[300] = std::numeric_limits<float>::quiet_NaN();
  x[301] = std::numeric_limits<float>::infinity();  // same block of 32: its outputs are NaN too
  x[500] = -std::numeric_limits<float>::infinity();
  DeviceBuffer<float> dx(x), dstep(std::vector<float>{0.1f}), dscale(rows);
  DeviceBuffer<int8_t> dq(rows * cols);
  DeviceBuffer<uint64_t> st(1);

  cuda::status_clear(st.get(), nullptr);
  cuda::HqQuantizeParams<float> hp;
  hp.x = dx.get(), hp.rows = rows, hp.cols = cols, hp.block = 32, hp.step = dstep.get();
  hp.q = dq.get(), hp.status = st.get();
  cuda::hq_quantize(hp, nullptr);
  sync();
  EXPECT_EQ(read_status(st), cuda::status_code(cuda::StatusKind::nonfinite, 300));
  try {
    cuda::status_throw_if_set(st.get(), "hq_quantize", nullptr, cols);
    ADD_FAILURE() << "status_throw_if_set did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("flat index 300 (row 3, col 12)"), std::string::npos) << e.what();
  }

  cuda::status_clear(st.get(), nullptr);
  cuda::ScaleParams<float> sp;
  sp.x = dx.get(), sp.rows = rows, sp.cols = cols, sp.scale = dscale.get(), sp.status = st.get();
  cuda::compute_scales(sp, nullptr);
  sync();
  EXPECT_EQ(read_status(st), cuda::status_code(cuda::StatusKind::nonfinite, 300));

  // finite input, bad step
  x = random_activations(rows, cols, 801);
  dx.upload(x);
  dstep.upload({0.0f});
  cuda::status_clear(st.get(), nullptr);
  cuda::hq_quantize(hp, nullptr);
  sync();
  EXPECT_EQ(read_status(st), cuda::status_code(cuda::StatusKind::bad_scale, 0));
  EXPECT_THROW(cuda::status_throw_if_set(st.get(), "hq_quantize", nullptr), Error);

  // finite input whose transform overflows fp32: reported at its first transformed index
  x.assign(static_cast<size_t>(rows * cols), 1.0f);
  x[100] = 3e38f, x[101] = 3e38f;  // block [96, 128): v[96] = (… + 6e38) overflows
  dx.upload(x);
  dstep.upload({1.0f});
  cuda::status_clear(st.get(), nullptr);
  cuda::hq_quantize(hp, nullptr);
  sync();
  EXPECT_EQ(read_status(st), cuda::status_code(cuda::StatusKind::overflow, 96));

  // an s4 code outside [-8, 7]
  std::vector<int8_t> q(20, 3);
  q[13] = 8;
  q[17] = -9;
  DeviceBuffer<int8_t> dq4(q);
  DeviceBuffer<uint8_t> dp(10);
  cuda::status_clear(st.get(), nullptr);
  cuda::PackS4Params pp;
  pp.q = dq4.get(), pp.rows = 2, pp.cols = 10, pp.packed = dp.get(), pp.status = st.get();
  cuda::pack_s4_rows(pp, nullptr);
  sync();
  EXPECT_EQ(read_status(st), cuda::status_code(cuda::StatusKind::out_of_range, 13));
}

TEST(QuantGpu, LaunchersRejectBadArguments) {
  DeviceBuffer<float> dx(7 * 96), dstep(std::vector<float>{1.0f}), ds(96), dr(7 * 96);
  DeviceBuffer<int8_t> dq(7 * 96);
  DeviceBuffer<int32_t> dzp(96);
  std::vector<float> host(7 * 96, 1.0f);
  cuda::HqQuantizeParams<float> good;
  good.x = dx.get(), good.rows = 7, good.cols = 96, good.block = 32, good.step = dstep.get();
  good.q = dq.get();
  EXPECT_NO_THROW(cuda::hq_quantize(good, nullptr));
  auto expect_error = [](auto&& call, const char* needle) {
    try {
      call();
      ADD_FAILURE() << "no nibble::Error (expected one mentioning \"" << needle << "\")";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  auto hq = [&](auto edit) {
    return [=]() {
      cuda::HqQuantizeParams<float> p = good;
      edit(p);
      cuda::hq_quantize(p, nullptr);
    };
  };
  expect_error(hq([](auto& p) { p.block = 48; }), "not a power of two");
  expect_error(hq([](auto& p) { p.block = 2048; }), "not a power of two");
  expect_error(hq([](auto& p) { p.block = 64; }), "not a multiple of the hadamard block");
  expect_error(hq([](auto& p) { p.x = nullptr; }), "x is null");
  expect_error(hq([](auto& p) { p.q = nullptr; }), "q (the [rows, cols] codes) is null");
  expect_error(hq([](auto& p) { p.step = nullptr; }), "step");
  expect_error(hq([&](auto& p) { p.x = host.data(); }), "host memory");
  expect_error(hq([](auto& p) { p.range = kUint4; }), "signed code range");
  expect_error(hq([](auto& p) { p.rows = -1; }), "negative extent");

  cuda::HadamardParams<float> hp;
  hp.x = dx.get(), hp.rows = 7, hp.cols = 96, hp.block = 0, hp.y = dx.get();
  expect_error([&] { cuda::hadamard_blocks(hp, nullptr); }, "not a power of two");

  DeviceBuffer<double> scratch(cuda::kLsqInitScratch);
  cuda::LsqInitParams<float> lp;
  lp.x = dx.get(), lp.rows = 7, lp.cols = 96, lp.block = 32, lp.step = dstep.get();
  expect_error([&] { cuda::lsq_init_scale(lp, nullptr); }, "scratch is null");
  lp.scratch = scratch.get(), lp.rows = 0;
  expect_error([&] { cuda::lsq_init_scale(lp, nullptr); }, "at least one value");

  cuda::ScaleParams<float> sp;
  sp.x = dx.get(), sp.rows = 7, sp.cols = 96, sp.scale = ds.get();
  sp.granularity = Granularity::tensor;
  expect_error([&] { cuda::compute_scales(sp, nullptr); }, "Granularity::row or ::column");
  sp.granularity = Granularity::row, sp.asymmetric = true;
  expect_error([&] { cuda::compute_scales(sp, nullptr); }, "zero_point is null");
  sp.asymmetric = false, sp.range = QRange{-200, 7};
  expect_error([&] { cuda::compute_scales(sp, nullptr); }, "int8 container");
  sp.range = QRange{-7, 0};
  expect_error([&] { cuda::compute_scales(sp, nullptr); }, "qmax > 0");
}

// ---- bit splitting ------------------------------------------------------------------------

// A random gradient [rows, cols] as T; g receives the values T holds (bf16 widened exactly),
// the reference's input.
template <class T>
std::vector<T> gradient_as(int64_t rows, int64_t cols, uint64_t seed, std::vector<float>& g) {
  g = random_gradient(rows, cols, seed);
  if constexpr (std::is_same_v<T, float>) {
    return g;
  } else {
    std::vector<T> t = to_bf16(g);
    g = widen(t);
    return t;
  }
}

template <class T>
void check_bitsplit(int64_t rows, int64_t cols, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "rows " << rows << " cols " << cols
                                    << (std::is_same_v<T, float> ? " f32" : " bf16"));
  const int64_t n = rows * cols;
  std::vector<float> g;
  const std::vector<T> gt = gradient_as<T>(rows, cols, seed, g);
  const PhiloxKey key{seed ^ 0x5bd1e995ull, 11, 3, RngRole::grad_output_rounding};
  std::vector<int8_t> hi(static_cast<size_t>(n)), lo(hi.size()), comb(hi.size());
  const float s_ref = ref::bitsplit(g.data(), rows, cols, key, hi.data(), lo.data(), comb.data());
  std::vector<int64_t> sumsq_ref(static_cast<size_t>(2 * rows), 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t h = hi[static_cast<size_t>(r * cols + c)], l = lo[static_cast<size_t>(r * cols + c)];
      sumsq_ref[static_cast<size_t>(r)] += h * h;
      sumsq_ref[static_cast<size_t>(rows + r)] += l * l;
    }
  }

  DeviceBuffer<T> dg(gt);
  DeviceBuffer<float> dscale(2);
  DeviceBuffer<int8_t> dhi(n), dlo(n), dcomb(n), dcomb_t(n);
  DeviceBuffer<int64_t> dsumsq(2 * rows);
  DeviceBuffer<uint64_t> st(1);
  cuda::status_clear(st.get(), nullptr);
  cuda::BitSplitParams<T> p;
  p.g = dg.get(), p.rows = rows, p.cols = cols, p.key = key, p.scale = dscale.get();
  p.hi = dhi.get(), p.lo = dlo.get(), p.combined = dcomb.get(), p.combined_t = dcomb_t.get();
  p.row_sumsq = dsumsq.get(), p.status = st.get();
  cuda::bitsplit(p, nullptr);
  sync();
  EXPECT_EQ(read_status(st), cuda::kStatusClear);
  EXPECT_SAME(std::vector<float>{dscale.download()[0]}, std::vector<float>{s_ref}, "s");
  EXPECT_SAME(dhi.download(), hi, "hi");
  EXPECT_SAME(dlo.download(), lo, "lo");
  EXPECT_SAME(dcomb.download(), comb, "combined");
  EXPECT_SAME(dcomb_t.download(), transpose(comb, rows, cols), "combined_t");
  EXPECT_SAME(dsumsq.download(), sumsq_ref, "row sums of squares");

  // combined_t alone (the dw operand), written by the same pass
  dcomb_t.poison();
  cuda::BitSplitParams<T> p2;
  p2.g = dg.get(), p2.rows = rows, p2.cols = cols, p2.key = key, p2.scale = dscale.get();
  p2.combined_t = dcomb_t.get();
  cuda::bitsplit(p2, nullptr);
  sync();
  EXPECT_SAME(dcomb_t.download(), transpose(comb, rows, cols), "combined_t alone");

  // combined and combined_t only (the layer's keep-all request); with rows, cols % 16 == 0 every
  // call here takes the 8-column kernel (bitsplit_lanes8_kernel), otherwise bitsplit_kernel
  dcomb.poison();
  dcomb_t.poison();
  p2.combined = dcomb.get();
  cuda::bitsplit(p2, nullptr);
  sync();
  EXPECT_EQ(dscale.download()[0], s_ref);
  EXPECT_SAME(dcomb.download(), comb, "combined (with combined_t only)");
  EXPECT_SAME(dcomb_t.download(), transpose(comb, rows, cols), "combined_t (with combined only)");
}

TEST(BitSplitGpu, MatchesRef) {
  uint64_t seed = 900;
  const int64_t rows_list[] = {1, 7, 1000};
  const int64_t cols_list[] = {32, 96, 768, 4096};
  for (int64_t rows : rows_list)
    for (int64_t cols : cols_list) check_bitsplit<float>(rows, cols, ++seed);
  check_bitsplit<float>(33, 130, ++seed);    // partial tiles; cols % 4 != 0: scalar path
  check_bitsplit<float>(1000, 130, ++seed);  // scalar loads, 4-row transposed stores
  // cols % 8 == 4: vector loads, but lane pairs straddle two 16-bit Philox blocks on odd rows,
  // so each lane draws its own block (philox16::own) instead of sharing one per two rows
  check_bitsplit<float>(37, 100, ++seed);
  check_bitsplit<float>(64, 36, ++seed);
  // rows, cols % 16 == 0: the 8-column kernel (all outputs); a partial 64-row tile
  // (1008, 48 rows) and a partial 256-column tile (272, 768 columns)
  check_bitsplit<float>(1008, 768, ++seed);
  check_bitsplit<float>(48, 272, ++seed);
  check_bitsplit<float>(16, 16, ++seed);
}

TEST(BitSplitGpu, Bf16InputMatchesRefOfWidenedInput) {
  uint64_t seed = 950;
  check_bitsplit<bf16_t>(7, 768, ++seed);
  check_bitsplit<bf16_t>(1000, 96, ++seed);
  check_bitsplit<bf16_t>(64, 4096, ++seed);
  check_bitsplit<bf16_t>(208, 528, ++seed);
}

// g and the outputs one element past an aligned base: scalar accesses, per-element Philox.
TEST(BitSplitGpu, UnalignedPointers) {
  const int64_t rows = 100, cols = 96, n = rows * cols;
  const std::vector<float> g = random_gradient(rows, cols, 970);
  const PhiloxKey key{970, 1, 1, RngRole::grad_output_rounding};
  std::vector<int8_t> hi(static_cast<size_t>(n)), lo(hi.size()), comb(hi.size());
  const float s_ref = ref::bitsplit(g.data(), rows, cols, key, hi.data(), lo.data(), comb.data());
  std::vector<float> g_shifted(static_cast<size_t>(n + 1));
  std::copy(g.begin(), g.end(), g_shifted.begin() + 1);
  DeviceBuffer<float> dg(g_shifted), dscale(2);
  DeviceBuffer<int8_t> dcomb(n + 1), dcomb_t(n + 1);
  cuda::BitSplitParams<float> p;
  p.g = dg.get() + 1, p.rows = rows, p.cols = cols, p.key = key, p.scale = dscale.get();
  p.combined = dcomb.get() + 1, p.combined_t = dcomb_t.get() + 1;
  cuda::bitsplit(p, nullptr);
  sync();
  EXPECT_EQ(dscale.download()[0], s_ref);
  const std::vector<int8_t> c = dcomb.download(), ct = dcomb_t.download();
  EXPECT_SAME(std::vector<int8_t>(c.begin() + 1, c.end()), comb, "combined");
  EXPECT_SAME(std::vector<int8_t>(ct.begin() + 1, ct.end()), transpose(comb, rows, cols), "combined_t");
}

// Edge case (not random data): an all-zero gradient keeps s > 0 through the 1e-8 and gives
// all-zero codes, as on the CPU.
TEST(BitSplitGpu, AllZeroGradient) {
  const int64_t rows = 3, cols = 32;
  std::vector<float> g(rows * cols, 0.0f);
  std::vector<int8_t> hi(g.size()), lo(g.size()), comb(g.size());
  const PhiloxKey key{1, 0, 0, RngRole::grad_output_rounding};
  const float s_ref = ref::bitsplit(g.data(), rows, cols, key, hi.data(), lo.data(), comb.data());
  DeviceBuffer<float> dg(g), dscale(2);
  DeviceBuffer<int8_t> dcomb(rows * cols);
  cuda::BitSplitParams<float> p;
  p.g = dg.get(), p.rows = rows, p.cols = cols, p.key = key, p.scale = dscale.get(), p.combined = dcomb.get();
  cuda::bitsplit(p, nullptr);
  sync();
  EXPECT_EQ(dscale.download()[0], s_ref);
  EXPECT_GT(s_ref, 0.0f);
  EXPECT_SAME(dcomb.download(), comb, "combined");
}

TEST(BitSplitGpu, RejectsBadArgumentsAndReportsNonFinite) {
  DeviceBuffer<float> dg(7 * 96), dscale(2);
  DeviceBuffer<int8_t> dcomb(7 * 96);
  cuda::BitSplitParams<float> p;
  p.g = dg.get(), p.rows = 7, p.cols = 96, p.scale = dscale.get();
  EXPECT_THROW(cuda::bitsplit(p, nullptr), Error);  // no output requested
  p.combined = dcomb.get();
  p.rows = 0;
  EXPECT_THROW(cuda::bitsplit(p, nullptr), Error);
  p.rows = 7, p.scale = nullptr;
  EXPECT_THROW(cuda::bitsplit(p, nullptr), Error);
  p.scale = dscale.get(), p.g = nullptr;
  EXPECT_THROW(cuda::bitsplit(p, nullptr), Error);

  std::vector<float> g = random_gradient(7, 96, 960);
  g[400] = std::numeric_limits<float>::infinity();
  dg.upload(g);
  DeviceBuffer<uint64_t> st(1);
  cuda::status_clear(st.get(), nullptr);
  p.g = dg.get(), p.status = st.get();
  cuda::bitsplit(p, nullptr);
  sync();
  EXPECT_EQ(read_status(st), cuda::status_code(cuda::StatusKind::nonfinite, 400));
}

// The first pass's optional column partials (the layer's db): every partial within the fp64
// bound of a sum of fp32 values in another order, the same s and codes as without them, a
// NaN reported at its index, and cols % 4 != 0 rejected. 600 rows: a partial 256-row chunk;
// 260 columns: a partial 128-column tile.
template <class T>
void check_bitsplit_column_partials(int64_t rows, int64_t cols, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "rows " << rows << " cols " << cols
                                    << (std::is_same_v<T, float> ? " f32" : " bf16"));
  const int64_t n = rows * cols;
  std::vector<float> g;
  const std::vector<T> gt = gradient_as<T>(rows, cols, seed, g);
  const PhiloxKey key{seed, 2, 5, RngRole::grad_output_rounding};
  std::vector<int8_t> hi(static_cast<size_t>(n)), lo(hi.size()), comb(hi.size());
  const float s_ref = ref::bitsplit(g.data(), rows, cols, key, hi.data(), lo.data(), comb.data());
  const int64_t chunks = cuda::bitsplit_column_chunks(rows);
  ASSERT_EQ(chunks, (rows + 255) / 256);
  DeviceBuffer<T> dg(gt);
  DeviceBuffer<float> dscale(2);
  DeviceBuffer<int8_t> dcomb(n);
  DeviceBuffer<double> dparts(chunks * cols);
  DeviceBuffer<uint64_t> st(1);
  cuda::status_clear(st.get(), nullptr);
  cuda::BitSplitParams<T> p;
  p.g = dg.get(), p.rows = rows, p.cols = cols, p.key = key, p.scale = dscale.get();
  p.combined = dcomb.get(), p.col_partials = dparts.get(), p.status = st.get();
  cuda::bitsplit(p, nullptr);
  sync();
  EXPECT_EQ(read_status(st), cuda::kStatusClear);
  EXPECT_EQ(dscale.download()[0], s_ref);
  EXPECT_SAME(dcomb.download(), comb, "combined");
  const std::vector<double> parts = dparts.download();
  int64_t bad = 0;
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t c = 0; c < cols; ++c) {
      double sum = 0.0, abs_sum = 0.0;
      for (int64_t r = 256 * k; r < std::min(rows, 256 * (k + 1)); ++r) {
        sum += g[static_cast<size_t>(r * cols + c)];
        abs_sum += std::fabs(g[static_cast<size_t>(r * cols + c)]);
      }
      // two orders of ≤ 256 exact fp64 terms: each within 256·2^-53·Σ|g| of the exact sum
      const double bound = 2.0 * 256.0 * std::ldexp(1.0, -53) * abs_sum;
      const double got = parts[static_cast<size_t>(k * cols + c)];
      if (!(std::fabs(got - sum) <= bound) && bad++ < 5)
        ADD_FAILURE() << "partial [" << k << ", " << c << "] = " << got << ", expected " << sum;
    }
  }
  EXPECT_EQ(bad, 0);

  std::vector<float> g_bad = g;
  g_bad[static_cast<size_t>(n - cols + 3)] = std::numeric_limits<float>::quiet_NaN();
  g_bad[static_cast<size_t>(n - 1)] = std::numeric_limits<float>::infinity();
  if constexpr (std::is_same_v<T, float>) dg.upload(g_bad);
  else dg.upload(to_bf16(g_bad));
  cuda::status_clear(st.get(), nullptr);
  cuda::bitsplit(p, nullptr);
  sync();
  EXPECT_EQ(read_status(st), cuda::status_code(cuda::StatusKind::nonfinite, n - cols + 3));
}

TEST(BitSplitGpu, ColumnPartialsOfTheFirstPass) {
  check_bitsplit_column_partials<float>(600, 260, 980);
  check_bitsplit_column_partials<bf16_t>(600, 260, 981);
  check_bitsplit_column_partials<bf16_t>(16, 4096, 982);
  // cols % 4 != 0: the fused pass needs 4-element vectors
  DeviceBuffer<float> dg(7 * 98), dscale(2);
  DeviceBuffer<int8_t> dcomb(7 * 98);
  DeviceBuffer<double> dparts(98);
  cuda::BitSplitParams<float> p;
  p.g = dg.get(), p.rows = 7, p.cols = 98, p.scale = dscale.get(), p.combined = dcomb.get();
  p.col_partials = dparts.get();
  try {
    cuda::bitsplit(p, nullptr);
    ADD_FAILURE() << "col_partials with cols = 98 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cols % 4 == 0"), std::string::npos) << e.what();
  }
}

// ---- leverage scores and row selection ----------------------------------------------------

struct SplitData {
  int64_t rows, cols;
  std::vector<int8_t> hi, lo, x_q;
  float s, sx;
};

SplitData make_split(int64_t rows, int64_t cols, int64_t d, uint64_t seed) {
  SplitData sd{rows, cols, {}, {}, {}, 0.0f, 0.0f};
  const std::vector<float> g = random_gradient(rows, cols, seed);
  sd.hi.resize(static_cast<size_t>(rows * cols));
  sd.lo.resize(sd.hi.size());
  sd.s = ref::bitsplit(g.data(), rows, cols, PhiloxKey{seed, 0, 0, RngRole::grad_output_rounding},
                       sd.hi.data(), sd.lo.data(), nullptr);
  const std::vector<float> x = random_activations(rows, d, seed + 1);
  sd.x_q.resize(static_cast<size_t>(rows * d));
  sd.sx = ref::lsq_init_scale(x.data(), rows * d, kInt4Sym);
  ref::lsq_quantize(x.data(), rows * d, sd.sx, kInt4Sym, sd.x_q.data(), nullptr);
  return sd;
}

TEST(LssGpu, RowNormsAndLeverageScoresMatchRef) {
  uint64_t seed = 1000;
  const int64_t shapes[][3] = {{1, 32, 96}, {7, 96, 32}, {1000, 768, 768}, {7, 4096, 4096}};
  for (const auto& sh : shapes) {
    const int64_t rows = sh[0], cols = sh[1], d = sh[2];
    SCOPED_TRACE(::testing::Message() << "rows " << rows << " cols " << cols << " d " << d);
    const SplitData sd = make_split(rows, cols, d, ++seed);
    std::vector<float> x_norm(static_cast<size_t>(rows));
    ref::row_norms_s8(sd.x_q.data(), rows, d, x_norm.data());
    std::vector<float> x_norm_plain = x_norm;
    for (float& v : x_norm) v *= sd.sx;
    std::vector<float> sc_dw(static_cast<size_t>(2 * rows)), sc_dx(sc_dw.size());
    ref::leverage_scores(sd.hi.data(), sd.lo.data(), rows, cols, sd.s, x_norm.data(), sc_dw.data());
    ref::leverage_scores(sd.hi.data(), sd.lo.data(), rows, cols, sd.s, nullptr, sc_dx.data());

    DeviceBuffer<int8_t> dxq(sd.x_q), dhi(sd.hi), dlo(sd.lo);
    DeviceBuffer<float> dsx(std::vector<float>{sd.sx}), ds(std::vector<float>{sd.s});
    DeviceBuffer<float> dxn(rows), dsc(2 * rows);
    cuda::RowNormsParams rp;
    rp.q = dxq.get(), rp.rows = rows, rp.cols = d, rp.norms = dxn.get();
    cuda::row_norms_s8(rp, nullptr);
    sync();
    EXPECT_SAME(dxn.download(), x_norm_plain, "row norms");
    rp.scale = dsx.get();
    cuda::row_norms_s8(rp, nullptr);
    sync();
    EXPECT_SAME(dxn.download(), x_norm, "row norms × sx");

    cuda::LeverageParams lp;
    lp.hi = dhi.get(), lp.lo = dlo.get(), lp.rows = rows, lp.cols = cols, lp.scale = ds.get();
    lp.x_norm = dxn.get(), lp.scores = dsc.get();
    cuda::leverage_scores(lp, nullptr);
    sync();
    EXPECT_SAME(dsc.download(), sc_dw, "dw scores from codes");
    lp.x_norm = nullptr;
    dsc.poison();
    cuda::leverage_scores(lp, nullptr);
    sync();
    EXPECT_SAME(dsc.download(), sc_dx, "dx scores from codes");

    // from bitsplit's fused sums of squares
    std::vector<int64_t> sumsq(static_cast<size_t>(2 * rows), 0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t h = sd.hi[static_cast<size_t>(r * cols + c)], l = sd.lo[static_cast<size_t>(r * cols + c)];
        sumsq[static_cast<size_t>(r)] += h * h;
        sumsq[static_cast<size_t>(rows + r)] += l * l;
      }
    DeviceBuffer<int64_t> dsumsq(sumsq);
    lp.hi = nullptr, lp.lo = nullptr, lp.row_sumsq = dsumsq.get(), lp.x_norm = dxn.get();
    dsc.poison();
    cuda::leverage_scores(lp, nullptr);
    sync();
    EXPECT_SAME(dsc.download(), sc_dw, "dw scores from row_sumsq");
  }
}

// dw leverage scores of a realistic split (heavy rows, exact-zero rows).
std::vector<float> realistic_scores(int64_t rows, int64_t cols, uint64_t seed) {
  const SplitData sd = make_split(rows, cols, 64, seed);
  std::vector<float> x_norm(static_cast<size_t>(rows));
  ref::row_norms_s8(sd.x_q.data(), rows, 64, x_norm.data());
  for (float& v : x_norm) v *= sd.sx;
  std::vector<float> sc(static_cast<size_t>(2 * rows));
  ref::leverage_scores(sd.hi.data(), sd.lo.data(), rows, cols, sd.s, x_norm.data(), sc.data());
  return sc;
}

// cuda::sample_rows on p (host copy p_host, device copy p_dev) against ref::sample_rows with the
// same key: keep masks, the kept list (ascending, −1 to round16(n)) and both counts, bit for bit,
// and a clear status word. Returns the reference's kept count.
int64_t expect_sampling_matches_ref(const std::vector<float>& p_host, const DeviceBuffer<float>& p_dev,
                                    const PhiloxKey& key) {
  const int64_t n = static_cast<int64_t>(p_host.size());
  std::vector<uint8_t> keep_ref(static_cast<size_t>(n));
  const int64_t kept_ref = ref::sample_rows(p_host.data(), n, key, keep_ref.data());
  std::vector<int32_t> index_ref;
  for (int64_t i = 0; i < n; ++i)
    if (keep_ref[static_cast<size_t>(i)]) index_ref.push_back(static_cast<int32_t>(i));
  const int64_t padded_n = (n + 15) / 16 * 16;
  index_ref.resize(static_cast<size_t>(padded_n), -1);
  DeviceBuffer<uint8_t> dkeep(n);
  DeviceBuffer<int32_t> didx(padded_n), dcount(2);
  DeviceBuffer<uint64_t> st(1);
  cuda::status_clear(st.get(), nullptr);
  cuda::SampleRowsParams sp;
  sp.p = p_dev.get(), sp.n = n, sp.key = key, sp.keep = dkeep.get(), sp.kept_index = didx.get();
  sp.kept_count = dcount.get(), sp.status = st.get();
  cuda::sample_rows(sp, nullptr);
  sync();
  EXPECT_EQ(read_status(st), cuda::kStatusClear);
  EXPECT_SAME(dkeep.download(), keep_ref, "keep masks");
  EXPECT_SAME(didx.download(), index_ref, "kept index list");
  const std::vector<int32_t> count = dcount.download();
  EXPECT_EQ(count[0], kept_ref);
  EXPECT_EQ(count[1], (kept_ref + 15) / 16 * 16);
  return kept_ref;
}

TEST(LssGpu, FitProbabilitiesWithinOneUlpAndSamplesMatchRef) {
  uint64_t seed = 1100;
  const int64_t rows_list[] = {7, 1000, 4096, 5000};  // 2N = 10000: two selection rounds
  const double fractions[] = {0.5, 0.1, 0.9};
  for (int64_t rows : rows_list) {
    for (double fraction : fractions) {
      SCOPED_TRACE(::testing::Message() << "rows " << rows << " fraction " << fraction);
      const int64_t n = 2 * rows;
      const std::vector<float> sc = realistic_scores(rows, 96, ++seed);
      const double budget = fraction * static_cast<double>(n);
      std::vector<double> p64(static_cast<size_t>(n));
      ref::fit_probabilities(sc.data(), n, budget, p64.data());
      std::vector<float> p_ref(static_cast<size_t>(n));
      ref::fit_probabilities(sc.data(), n, budget, p_ref.data());

      DeviceBuffer<float> dsc(sc), dp(n);
      DeviceBuffer<uint64_t> st(1);
      cuda::status_clear(st.get(), nullptr);
      cuda::FitProbabilitiesParams fp;
      fp.scores = dsc.get(), fp.n = n, fp.budget = budget, fp.p = dp.get(), fp.status = st.get();
      cuda::fit_probabilities(fp, nullptr);
      sync();
      EXPECT_EQ(read_status(st), cuda::kStatusClear);
      const std::vector<float> p_gpu = dp.download();
      int64_t worst = 0, saturated = 0;
      double sum = 0;
      for (int64_t i = 0; i < n; ++i) {
        // 1 ulp: the fp64 sums differ by ~2n·2^-53 relative (cuda/quant/bitsplit.h)
        worst = std::max(worst, ulp_distance(p_gpu[static_cast<size_t>(i)], p_ref[static_cast<size_t>(i)]));
        saturated += p64[static_cast<size_t>(i)] == 1.0;
        sum += p_gpu[static_cast<size_t>(i)];
      }
      EXPECT_LE(worst, 1);
      // Σp = budget up to the fp32 rounding of each p (≤ n·2^-24 relative) or = #nonzero
      int64_t nonzero = 0;
      for (float v : sc) nonzero += v > 0.0f;
      const double target = std::min<double>(budget, static_cast<double>(nonzero));
      // bound: each fp32 p is rounded once (relative 2^-24), so |Σp − target| ≤ 2^-24·target;
      // doubled for the fp64 sum and the 1-ulp tolerance above
      EXPECT_NEAR(sum, target, 2 * 6e-8 * target) << "saturated rows " << saturated;

      // Sampling: same masks as the reference for the same key. Valid only if no uniform lies
      // within the 1-ulp p tolerance of its p; check that the inputs are clear of it.
      const PhiloxKey key{seed * 31, 7, 2, RngRole::sample_dw};
      for (int64_t i = 0; i < n; ++i) {
        const float u = philox_uniform(key, static_cast<uint64_t>(i));
        const float pr = p_ref[static_cast<size_t>(i)];
        ASSERT_FALSE(pr > 0.0f && pr < 1.0f && ulp_distance(u, pr) <= 1)
            << "test input too close to a sampling boundary at " << i << "; change the seed";
      }
      expect_sampling_matches_ref(p_ref, dp, key);
    }
  }
}

// Selection on arbitrary p (exact 0s and 1s included) over several 8192-row rounds of the
// selection kernel and a ragged end (n % 8 != 0): the reference's masks and list, bit for bit.
TEST(LssGpu, SampleRowsMatchesRefOverSeveralRounds) {
  for (const int64_t n : {int64_t{20001}, int64_t{8191}, int64_t{8193}}) {
    SCOPED_TRACE(::testing::Message() << "n " << n);
    const PhiloxKey data{static_cast<uint64_t>(n) * 17, 0, 0, RngRole::data};
    std::vector<float> p(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const float u = philox_uniform(data, static_cast<uint64_t>(i));
      p[static_cast<size_t>(i)] = i % 13 == 0 ? 0.0f : (i % 11 == 0 ? 1.0f : u);
    }
    const PhiloxKey key{static_cast<uint64_t>(n) * 29, 3, 1, RngRole::sample_dx};
    DeviceBuffer<float> dp(p);
    const int64_t kept = expect_sampling_matches_ref(p, dp, key);
    EXPECT_GT(kept, 0);
    EXPECT_LT(kept, n);
  }
}

// The pair launchers (one thread block per problem) give exactly the single calls' results, and
// refuse overlapping outputs.
TEST(LssGpu, PairLaunchesEqualSingleCalls) {
  const std::vector<float> sa = realistic_scores(3000, 64, 1501), sb = realistic_scores(700, 96, 1502);
  const int64_t na = 6000, nb = 1400;
  DeviceBuffer<float> dsa(sa), dsb(sb), pa(na), pb(nb), pa1(na), pb1(nb);
  cuda::fit_probabilities({dsa.get(), na, 0.4 * na, pa1.get(), nullptr}, nullptr);
  cuda::fit_probabilities({dsb.get(), nb, 0.6 * nb, pb1.get(), nullptr}, nullptr);
  cuda::fit_probabilities_pair({dsa.get(), na, 0.4 * na, pa.get(), nullptr},
                               {dsb.get(), nb, 0.6 * nb, pb.get(), nullptr}, nullptr);
  sync();
  EXPECT_SAME(pa.download(), pa1.download(), "pair fit a");
  EXPECT_SAME(pb.download(), pb1.download(), "pair fit b");

  const auto sampling = [](const DeviceBuffer<float>& p, int64_t n, uint64_t seed,
                           DeviceBuffer<uint8_t>& keep, DeviceBuffer<int32_t>& idx,
                           DeviceBuffer<int32_t>& count) {
    cuda::SampleRowsParams sp;
    sp.p = p.get(), sp.n = n, sp.key = PhiloxKey{seed, 1, 2, RngRole::sample_dw};
    sp.keep = keep.get(), sp.kept_index = idx.get(), sp.kept_count = count.get();
    return sp;
  };
  DeviceBuffer<uint8_t> ka(na), kb(nb), ka1(na), kb1(nb);
  DeviceBuffer<int32_t> ia(na), ib(nb + 8), ia1(na), ib1(nb + 8), ca(2), cb(2), ca1(2), cb1(2);
  cuda::sample_rows(sampling(pa1, na, 11, ka1, ia1, ca1), nullptr);
  cuda::sample_rows(sampling(pb1, nb, 12, kb1, ib1, cb1), nullptr);
  cuda::sample_rows_pair(sampling(pa, na, 11, ka, ia, ca), sampling(pb, nb, 12, kb, ib, cb), nullptr);
  sync();
  EXPECT_SAME(ka.download(), ka1.download(), "pair keep a");
  EXPECT_SAME(kb.download(), kb1.download(), "pair keep b");
  EXPECT_SAME(ia.download(), ia1.download(), "pair list a");
  EXPECT_SAME(ib.download(), ib1.download(), "pair list b");
  EXPECT_EQ(ca.download(), ca1.download());
  EXPECT_EQ(cb.download(), cb1.download());

  const auto overlap_error = [](auto&& call) {
    try {
      call();
    } catch (const Error& e) {
      return std::string(e.what()).find("overlapping") != std::string::npos;
    }
    return false;
  };
  EXPECT_TRUE(overlap_error([&] {
    cuda::fit_probabilities_pair({dsa.get(), na, 10.0, pa.get(), nullptr},
                                 {dsb.get(), nb, 10.0, pa.get() + 8, nullptr}, nullptr);
  }));
  EXPECT_TRUE(overlap_error([&] {  // only the counts are shared
    cuda::sample_rows_pair(sampling(pa, na, 1, ka, ia, ca), sampling(pa, na, 2, ka1, ia1, ca),
                           nullptr);
  }));
}

TEST(LssGpu, FitProbabilitiesKeepsAllWhenBudgetCoversNonzero) {
  const std::vector<float> sc = realistic_scores(1000, 96, 1200);
  int64_t nonzero = 0;
  for (float v : sc) nonzero += v > 0.0f;
  ASSERT_LT(nonzero, 2000);  // the gradient has exact-zero rows
  std::vector<float> p_ref(sc.size());
  ref::fit_probabilities(sc.data(), 2000, static_cast<double>(nonzero), p_ref.data());
  DeviceBuffer<float> dsc(sc), dp(2000);
  cuda::FitProbabilitiesParams fp;
  fp.scores = dsc.get(), fp.n = 2000, fp.budget = static_cast<double>(nonzero), fp.p = dp.get();
  cuda::fit_probabilities(fp, nullptr);
  sync();
  EXPECT_SAME(dp.download(), p_ref, "p");
}

TEST(LssGpu, KeepNonzeroRowsCompactsAndPads) {
  uint64_t seed = 1300;
  const int64_t rows_list[] = {1, 7, 8, 9, 1000, 4096, 5003};  // 2N = 10006: two rounds
  for (int64_t rows : rows_list) {
    SCOPED_TRACE(::testing::Message() << "rows " << rows);
    const int64_t n = 2 * rows;
    std::vector<float> sc = realistic_scores(rows, 32, ++seed);
    if (rows == 8) std::fill(sc.begin(), sc.end(), 0.0f);  // edge: nothing kept
    std::vector<float> p_ref(static_cast<size_t>(n));
    std::vector<uint8_t> keep_ref(static_cast<size_t>(n));
    const int64_t kept_ref = ref::keep_nonzero_rows(sc.data(), n, p_ref.data(), keep_ref.data());
    std::vector<int32_t> index_ref;
    for (int64_t i = 0; i < n; ++i)
      if (keep_ref[static_cast<size_t>(i)]) index_ref.push_back(static_cast<int32_t>(i));
    const int64_t padded_n = (n + 15) / 16 * 16;
    index_ref.resize(static_cast<size_t>(padded_n), -1);

    DeviceBuffer<float> dsc(sc), dp(n);
    DeviceBuffer<uint8_t> dkeep(n);
    DeviceBuffer<int32_t> didx(padded_n), dcount(2);
    cuda::KeepNonzeroParams kp;
    kp.scores = dsc.get(), kp.n = n, kp.p = dp.get(), kp.keep = dkeep.get();
    kp.kept_index = didx.get(), kp.kept_count = dcount.get();
    cuda::keep_nonzero_rows(kp, nullptr);
    sync();
    EXPECT_SAME(dp.download(), p_ref, "p");
    EXPECT_SAME(dkeep.download(), keep_ref, "keep");
    EXPECT_SAME(didx.download(), index_ref, "kept index list");
    const std::vector<int32_t> count = dcount.download();
    EXPECT_EQ(count[0], kept_ref);
    EXPECT_EQ(count[1], (kept_ref + 15) / 16 * 16);
    EXPECT_EQ(count[1] % cuda::kKeptRowsMultiple, 0);
  }
}

TEST(LssGpu, GatherRowsTransposesKeptRowsWithZeroPadding) {
  uint64_t seed = 1400;
  const int64_t shapes[][2] = {{7, 96}, {1000, 768}, {33, 130}};
  for (const auto& sh : shapes) {
    const int64_t rows = sh[0], cols = sh[1];
    SCOPED_TRACE(::testing::Message() << "rows " << rows << " cols " << cols);
    std::vector<int8_t> q(static_cast<size_t>(rows * cols));
    const PhiloxKey key{++seed, 0, 0, RngRole::data};
    for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<int8_t>(static_cast<int>(philox_u32(key, i) % 181) - 90);
    // keep every row whose draw is odd, then pad with −1 to a multiple of 16
    std::vector<int32_t> index;
    for (int64_t r = 0; r < rows; ++r)
      if (philox_u32(PhiloxKey{seed, 1, 0, RngRole::data}, static_cast<uint64_t>(r)) & 1) index.push_back(static_cast<int32_t>(r));
    const int64_t kept = static_cast<int64_t>(index.size());
    const int64_t k = (kept + 15) / 16 * 16 + 16;  // one extra all-padding group
    index.resize(static_cast<size_t>(k), -1);
    std::vector<int8_t> expect(static_cast<size_t>(cols * k), 0);
    for (int64_t j = 0; j < kept; ++j)
      for (int64_t c = 0; c < cols; ++c)
        expect[static_cast<size_t>(c * k + j)] = q[static_cast<size_t>(index[static_cast<size_t>(j)] * cols + c)];
    DeviceBuffer<int8_t> dq(q), dout(cols * k);
    DeviceBuffer<int32_t> didx(index);
    cuda::GatherRowsParams gp;
    gp.q = dq.get(), gp.rows = rows, gp.cols = cols, gp.index = didx.get(), gp.k = k, gp.out = dout.get();
    cuda::gather_rows_t_s8(gp, nullptr);
    sync();
    EXPECT_SAME(dout.download(), expect, "gathered operand");
  }
}

TEST(LssGpu, RejectsBadArgumentsAndReportsBadValues) {
  DeviceBuffer<float> dsc(64), dp(64);
  DeviceBuffer<int32_t> didx(64), dcount(2);
  cuda::FitProbabilitiesParams fp;
  fp.scores = dsc.get(), fp.n = 64, fp.budget = -1.0, fp.p = dp.get();
  EXPECT_THROW(cuda::fit_probabilities(fp, nullptr), Error);
  fp.budget = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THROW(cuda::fit_probabilities(fp, nullptr), Error);
  fp.budget = 8.0, fp.n = 0;
  EXPECT_THROW(cuda::fit_probabilities(fp, nullptr), Error);
  fp.n = 64, fp.p = nullptr;
  EXPECT_THROW(cuda::fit_probabilities(fp, nullptr), Error);

  cuda::SampleRowsParams sp;
  sp.p = dp.get(), sp.n = 64;
  EXPECT_THROW(cuda::sample_rows(sp, nullptr), Error);  // no output
  sp.kept_index = didx.get(), sp.p = nullptr;
  EXPECT_THROW(cuda::sample_rows(sp, nullptr), Error);

  cuda::KeepNonzeroParams kp;
  kp.scores = nullptr, kp.n = 64, kp.kept_count = dcount.get();
  EXPECT_THROW(cuda::keep_nonzero_rows(kp, nullptr), Error);

  cuda::LeverageParams lp;
  lp.rows = 7, lp.cols = 32, lp.scores = dp.get();
  EXPECT_THROW(cuda::leverage_scores(lp, nullptr), Error);  // no codes, no sums, no scale

  // device-side value checks: a negative score, a p above 1
  std::vector<float> sc = realistic_scores(32, 32, 1500);
  sc[40] = -1.0f;
  dsc.upload(sc);
  DeviceBuffer<uint64_t> st(1);
  cuda::status_clear(st.get(), nullptr);
  fp.scores = dsc.get(), fp.p = dp.get(), fp.status = st.get();
  cuda::fit_probabilities(fp, nullptr);
  sync();
  EXPECT_EQ(read_status(st), cuda::status_code(cuda::StatusKind::out_of_range, 40));
  std::vector<float> p(64, 0.5f);
  p[9] = 1.5f;
  dp.upload(p);
  cuda::status_clear(st.get(), nullptr);
  sp.p = dp.get(), sp.status = st.get();
  cuda::sample_rows(sp, nullptr);
  sync();
  EXPECT_EQ(read_status(st), cuda::status_code(cuda::StatusKind::out_of_range, 9));
}

// ---- throughput (not a test: run with --gtest_also_run_disabled_tests) ---------------------
// Times each launcher with CUDA events (3 warm-up calls, then the mean of 20) and prints the
// effective bandwidth (bytes the kernel must read + write, divided by the time), next to a
// device-to-device copy of the input as the roofline. Inputs are resident in HBM (the 8192 ×
// 4096 tensors exceed the 50 MB L2); numbers go to bench/README.md "quantization kernels".
template <class F>
double time_us(F&& launch) {
  for (int i = 0; i < 3; ++i) launch();
  cudaEvent_t start, stop;
  NB_CUDA_CHECK(cudaEventCreate(&start));
  NB_CUDA_CHECK(cudaEventCreate(&stop));
  constexpr int kIters = 20;
  NB_CUDA_CHECK(cudaEventRecord(start));
  for (int i = 0; i < kIters; ++i) launch();
  NB_CUDA_CHECK(cudaEventRecord(stop));
  NB_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  NB_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  NB_CUDA_CHECK(cudaEventDestroy(start));
  NB_CUDA_CHECK(cudaEventDestroy(stop));
  return 1000.0 * ms / kIters;
}

void report(const char* what, double us, double bytes) {
  std::printf("%-58s %9.1f us %8.0f GB/s\n", what, us, bytes / us * 1e-3);
}

TEST(QuantGpuBench, DISABLED_Throughput) {
  const int64_t rows = 8192, cols = 4096, n = rows * cols;
  const double nd = static_cast<double>(n);
  const std::vector<float> x = random_activations(rows, cols, 9000);
  DeviceBuffer<float> dx(x), dr(n), dstep(std::vector<float>{0.05f}), dscale(std::max(rows, cols));
  DeviceBuffer<bf16_t> dxb(to_bf16(x));
  DeviceBuffer<int8_t> dq(n), dqt(n);
  DeviceBuffer<float> dcopy(n);
  cudaDeviceProp prop{};
  NB_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, x [%lld, %lld]\n", prop.name, static_cast<long long>(rows), static_cast<long long>(cols));
  report("copy f32 -> f32 (roofline)", time_us([&] {
    NB_CUDA_CHECK(cudaMemcpyAsync(dcopy.get(), dx.get(), static_cast<size_t>(n) * 4, cudaMemcpyDeviceToDevice));
  }), 8 * nd);

  for (int64_t block : {32, 1024}) {
    cuda::HqQuantizeParams<bf16_t> p;
    p.x = dxb.get(), p.rows = rows, p.cols = cols, p.block = block, p.step = dstep.get(), p.q = dq.get();
    std::string name = "hq_quantize bf16 block " + std::to_string(block);
    report((name + ": q").c_str(), time_us([&] { cuda::hq_quantize(p, nullptr); }), 3 * nd);
    p.q_t = dqt.get();
    report((name + ": q, q_t").c_str(), time_us([&] { cuda::hq_quantize(p, nullptr); }), 4 * nd);
    p.r = dr.get();
    report((name + ": q, q_t, r").c_str(), time_us([&] { cuda::hq_quantize(p, nullptr); }), 8 * nd);
  }
  {
    cuda::HqQuantizeParams<float> p;
    p.x = dx.get(), p.rows = rows, p.cols = cols, p.block = 32, p.step = dstep.get(), p.q = dq.get();
    p.q_t = dqt.get(), p.r = dr.get();
    report("hq_quantize f32 block 32: q, q_t, r", time_us([&] { cuda::hq_quantize(p, nullptr); }), 10 * nd);
    DeviceBuffer<double> scratch(cuda::kLsqInitScratch);
    cuda::LsqInitParams<float> lp;
    lp.x = dx.get(), lp.rows = rows, lp.cols = cols, lp.block = 32, lp.step = dstep.get(), lp.scratch = scratch.get();
    report("lsq_init_scale f32 block 32", time_us([&] { cuda::lsq_init_scale(lp, nullptr); }), 4 * nd);
    dstep.upload({0.05f});
  }
  {
    cuda::ScaleParams<bf16_t> p;
    p.x = dxb.get(), p.rows = rows, p.cols = cols, p.scale = dscale.get(), p.q = dq.get();
    report("compute_scales bf16 row symmetric + codes", time_us([&] { cuda::compute_scales(p, nullptr); }), 3 * nd);
    p.granularity = Granularity::column;
    report("compute_scales bf16 column symmetric + codes", time_us([&] { cuda::compute_scales(p, nullptr); }), 3 * nd);
  }
  {
    DeviceBuffer<uint8_t> dp(n / 2);
    cuda::PackS4Params p;
    p.q = dq.get(), p.rows = rows, p.cols = cols, p.packed = dp.get();
    report("pack_s4_rows", time_us([&] { cuda::pack_s4_rows(p, nullptr); }), 1.5 * nd);
  }
  {
    const std::vector<float> g = random_gradient(rows, cols, 9001);
    DeviceBuffer<float> dg(g), ds2(2);
    DeviceBuffer<int64_t> dsumsq(2 * rows);
    cuda::BitSplitParams<float> p;
    p.g = dg.get(), p.rows = rows, p.cols = cols, p.scale = ds2.get(), p.combined = dq.get();
    p.combined_t = dqt.get(), p.row_sumsq = dsumsq.get();
    report("bitsplit f32: combined, combined_t, row_sumsq (2 passes)", time_us([&] { cuda::bitsplit(p, nullptr); }), 10 * nd);
    const int64_t m = 2 * rows;
    DeviceBuffer<float> dsc(m), dprob(m), dxn(rows);
    cuda::RowNormsParams rp;
    rp.q = dq.get(), rp.rows = rows, rp.cols = cols, rp.norms = dxn.get();
    report("row_norms_s8", time_us([&] { cuda::row_norms_s8(rp, nullptr); }), nd);
    cuda::LeverageParams lp;
    lp.row_sumsq = dsumsq.get(), lp.rows = rows, lp.cols = cols, lp.scale = ds2.get();
    lp.x_norm = dxn.get(), lp.scores = dsc.get();
    cuda::leverage_scores(lp, nullptr);
    cuda::FitProbabilitiesParams fp;
    fp.scores = dsc.get(), fp.n = m, fp.budget = 0.5 * static_cast<double>(m), fp.p = dprob.get();
    report("fit_probabilities n = 16384 (one block)", time_us([&] { cuda::fit_probabilities(fp, nullptr); }), 8.0 * m);
    DeviceBuffer<int32_t> didx((m + 15) / 16 * 16), dcount(2);
    cuda::SampleRowsParams sp;
    sp.p = dprob.get(), sp.n = m, sp.key = PhiloxKey{1, 2, 3, RngRole::sample_dw};
    sp.kept_index = didx.get(), sp.kept_count = dcount.get();
    report("sample_rows + compaction n = 16384 (one block)", time_us([&] { cuda::sample_rows(sp, nullptr); }), 8.0 * m);
  }
  sync();
}

}  // namespace
