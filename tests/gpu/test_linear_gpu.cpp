// GPU tests of the HQ-MM / LSS-MM linear layer (src/cuda/linear/hq_linear.h) against the CPU
// reference (ref::hq_linear_forward / ref::hq_linear_backward) and float64 recomputations.
//   forward:  saved packed codes and side channel of x and w, w_q, w_q_t and x_q bit-exact
//             (fp32 input, and bf16 input against the reference on the widened values);
//             y within the dequant epilogue's rounding (the bound of test_gemm_gpu.cpp);
//   backward: grad scale exact; dx, dw equal to the reference and within a derived fp32 bound
//             of a float64 recomputation; dsx, dsw (exact integer sums) equal to the
//             reference's and within the float64 oracle's bound; db within one fp32 ulp plus the fp64 sums' bound; bf16 dx
//             equal to the reference's value rounded to bf16;
//   sampled variant: dw (1/p folded into re-quantized int8 codes) equal to the reference's and
//             within a float64 oracle of that estimator; dx within fp32 rounding of the
//             reference's Bernoulli estimator, dsx within the oracle's bound; dsw and db
//             as keep-all;
//   shapes that are not multiples of 16 are rejected with a message saying to pad.
// The forward, keep-all and sampled checks run once per GEMM path (LinearGpuPath, the
// parameter is HqLinearConfig::gemm): automatic (on H100/H200 the sm_90a wgmma INT8 GEMM) and
// mma_sm80 forced (the Ampere/Ada path: the forward's native INT4 GEMM on packed codes, s4
// mma.sync emulated on Hopper; the backward's s8 mma.sync GEMM), against the same reference
// and bounds, since every path computes the same integer sums and epilogue. The inference
// forward (no saved buffers) must give the training forward's y bit for bit.
// Every case draws fresh Philox inputs with its own seed; outputs are poisoned first.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cuda/common/check.h"
#include "cuda/gemm/gemm_dispatch.h"
#include "cuda/linear/hq_linear.h"
#include "cuda/linear/hq_linear_kernels.h"
#include "cuda/quant/bitsplit.h"
#include "cuda/quant/status.h"
#include "gpu/device_buffer.h"
#include "nibble/dtype.h"
#include "nibble/error.h"
#include "nibble/rng.h"
#include "ref/bitsplit.h"
#include "ref/gemm.h"
#include "ref/hadamard.h"
#include "ref/linear.h"

using namespace nibble;

static_assert(cuda::kLsqResidualSteps == ref::kLsqResidualSteps &&
                  cuda::kLsqClipped == ref::kLsqClipped,
              "the CUDA side channel must use the reference's constants");

namespace {

using test::DeviceBuffer;

// Gaussian values with a few large outlier columns (as activations have), so that both the
// clipped and the in-range side-channel cases occur.
std::vector<float> random_activations(int64_t rows, int64_t cols, uint64_t seed) {
  std::vector<float> v(static_cast<size_t>(rows * cols));
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  for (int64_t i = 0; i < rows * cols; ++i) {
    const float outlier = (i % cols) % 17 == 3 ? 12.0f : 1.0f;
    v[static_cast<size_t>(i)] = outlier * philox_normal(key, static_cast<uint64_t>(i));
  }
  return v;
}

std::vector<float> widen(const std::vector<bf16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = bf16_to_f32(v[i].bits);
  return out;
}
std::vector<bf16_t> narrow(const std::vector<float>& v) {
  std::vector<bf16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i].bits = f32_to_bf16(v[i]);
  return out;
}
// bf16 bit patterns (round to nearest even) of fp32 values, for exact comparisons.
std::vector<uint16_t> bf16_bits(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = f32_to_bf16(v[i]);
  return out;
}

// Half of the LSQ initial step of x·H: about 3-5% of the elements clip, so the test sees
// both kinds of side-channel entries.
float test_step(const std::vector<float>& v, int64_t rows, int64_t cols, int64_t block,
                QRange range) {
  std::vector<float> t = v;
  ref::hadamard_blocks(t.data(), rows, cols, block);
  return 0.5f * ref::lsq_init_scale(t.data(), rows * cols, range);
}

std::vector<int8_t> transpose(const std::vector<int8_t>& in, int64_t rows, int64_t cols) {
  std::vector<int8_t> out(in.size());
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[j * rows + i] = in[i * cols + j];
  return out;
}

// Everything one layer call needs on the device, for one shape.
struct Layer {
  int64_t n, d, c;
  DeviceBuffer<float> sx{1}, sw{1}, bias;
  DeviceBuffer<int8_t> w_q, w_q_t, x_q;
  DeviceBuffer<uint8_t> w_qp, w_ep, x_qp, x_ep;
  DeviceBuffer<uint64_t> status{1};
  Layer(int64_t n_, int64_t d_, int64_t c_)
      : n(n_), d(d_), c(c_), bias(c_), w_q(c_ * d_), w_q_t(c_ * d_), x_q(n_ * d_),
        w_qp(c_ * d_ / 2), w_ep(c_ * d_ / 2), x_qp(n_ * d_ / 2), x_ep(n_ * d_ / 2) {}
  cuda::HqLinearWeightCodes codes() const {
    return {w_q.get(), w_q_t.get(), w_qp.get(), w_ep.get()};
  }
};

struct Case {
  int64_t n, d, c, block;
  QRange range;
};

uint64_t seed_of(const Case& k, int variant) {
  return 0x4c494e454152ull ^ (static_cast<uint64_t>(k.n) << 40) ^
         (static_cast<uint64_t>(k.d) << 20) ^ static_cast<uint64_t>(k.c) ^
         (static_cast<uint64_t>(k.block) << 52) ^ (static_cast<uint64_t>(variant) << 60);
}

// Forward on the GPU from x of type T (float or bf16); the reference runs on xf (x widened).
template <class T>
void run_forward(Layer& L, const std::vector<T>& x, const std::vector<T>& w,
                 const std::vector<float>& bias, float sx, float sw, const cuda::HqLinearConfig& cfg,
                 const PhiloxKey& key, std::vector<float>* y_f32, std::vector<bf16_t>* y_bf16) {
  DeviceBuffer<T> dx(L.n * L.d), dw(L.c * L.d);
  dx.upload(x);
  dw.upload(w);
  L.sx.upload({sx});
  L.sw.upload({sw});
  L.bias.upload(bias);
  cuda::status_clear(L.status.get(), nullptr);
  cuda::HqLinearWeightParams<T> wp;
  wp.w = dw.get();
  wp.n = L.n, wp.d = L.d, wp.c = L.c;
  wp.sw = L.sw.get();
  wp.out = L.codes();
  wp.status = L.status.get();
  cuda::hq_linear_quantize_weight(wp, cfg, key, nullptr);
  DeviceBuffer<float> yf(L.n * L.c);
  DeviceBuffer<bf16_t> yb(L.n * L.c);
  cuda::HqLinearForwardParams<T> fp;
  fp.x = dx.get();
  fp.n = L.n, fp.d = L.d, fp.c = L.c;
  fp.sx = L.sx.get();
  fp.sw = L.sw.get();
  fp.bias = L.bias.get();
  fp.w_q = L.w_q.get();
  fp.w_q_packed = L.w_qp.get();
  fp.x_q = L.x_q.get();
  fp.x_q_packed = L.x_qp.get();
  fp.x_e_packed = L.x_ep.get();
  fp.y_f32 = yf.get();
  fp.status = L.status.get();
  cuda::hq_linear_forward(fp, cfg, key, nullptr);
  fp.y_f32 = nullptr;
  fp.y = yb.get();
  cuda::hq_linear_forward(fp, cfg, key, nullptr);
  cuda::status_throw_if_set(L.status.get(), "linear forward", nullptr);
  *y_f32 = yf.download();
  *y_bf16 = yb.download();
  // Inference (no saved buffers; on the packed mma_sm80 path x_q's memory then holds the packed
  // codes): the same y, bit for bit. It leaves x_q as check_forward expects it (see there).
  DeviceBuffer<float> yi(L.n * L.c);
  fp.x_q_packed = nullptr;
  fp.x_e_packed = nullptr;
  fp.y = nullptr;
  fp.y_f32 = yi.get();
  cuda::hq_linear_forward(fp, cfg, key, nullptr);
  cuda::status_throw_if_set(L.status.get(), "linear forward (inference)", nullptr);
  const std::vector<float> y_inf = yi.download();
  EXPECT_EQ(std::memcmp(y_inf.data(), y_f32->data(), y_inf.size() * sizeof(float)), 0)
      << "the inference forward's y differs from the training forward's";
}

ref::HqLinearConfig to_ref(const cuda::HqLinearConfig& cfg) {
  ref::HqLinearConfig r;
  r.block = cfg.block;
  r.range = cfg.range;
  r.lss = cfg.lss == cuda::LssVariant::keep_all ? ref::LssMode::keep_nonzero
                                                 : ref::LssMode::bernoulli;
  r.sample_fraction = cfg.sample_fraction;
  return r;
}

// Counts differing bytes / codes, reporting the first few.
template <class T>
int64_t count_diff(const std::vector<T>& got, const std::vector<T>& want, const char* what) {
  EXPECT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    if (got[i] != want[i]) {
      if (bad < 5)
        ADD_FAILURE() << what << "[" << i << "] = " << static_cast<int>(got[i]) << ", expected "
                      << static_cast<int>(want[i]);
      ++bad;
    }
  }
  return bad;
}

// The forward tests must see both kinds of side-channel entries (clipped and residual) to
// mean anything. Counted over all cases of a test, not per case: the 16x16 case holds only
// 256 entries, and for some seeds none of them is clipped.
struct SideChannelTally {
  int64_t clipped = 0, total = 0;
  void add(const ref::HqLinearSaved& saved) {
    const std::vector<int8_t> xe = saved.x_e();
    clipped += std::count(xe.begin(), xe.end(), static_cast<int8_t>(ref::kLsqClipped));
    total += static_cast<int64_t>(xe.size());
  }
  void expect_both_kinds() const {
    EXPECT_GT(clipped, 0) << "no clipped entry in " << total;
    EXPECT_LT(clipped, total) << "every entry clipped";
  }
};

// Checks the forward against the reference; returns the reference's saved state.
template <class T>
ref::HqLinearSaved check_forward(const Case& k, bool bf16_input, Layer& L, uint64_t seed,
                                 cuda::GemmPath gemm) {
  SCOPED_TRACE(testing::Message() << "N=" << k.n << " D=" << k.d << " C=" << k.c << " block="
                                  << k.block << " range [" << k.range.qmin << ", "
                                  << k.range.qmax << "] bf16_input=" << bf16_input << " gemm "
                                  << cuda::gemm_path_name(gemm));
  std::vector<float> xf = random_activations(k.n, k.d, seed);
  std::vector<float> wf = random_activations(k.c, k.d, seed + 1);
  for (float& v : wf) v *= 0.02f;
  std::vector<float> bias = random_activations(1, k.c, seed + 2);
  std::vector<T> x, w;
  if constexpr (sizeof(T) == 2) {
    x = narrow(xf);
    w = narrow(wf);
    xf = widen(x);  // the reference sees exactly the values the GPU widens
    wf = widen(w);
  } else {
    x = xf;
    w = wf;
  }
  cuda::HqLinearConfig cfg;
  cfg.block = k.block;
  cfg.range = k.range;
  cfg.gemm = gemm;
  const float sx = test_step(xf, k.n, k.d, k.block, k.range);
  const float sw = test_step(wf, k.c, k.d, k.block, k.range);
  const PhiloxKey key{seed + 3, 7, 2, RngRole::rounding};

  std::vector<float> y_ref(static_cast<size_t>(k.n * k.c));
  ref::HqLinearSaved saved;
  ref::hq_linear_forward(xf.data(), wf.data(), bias.data(), k.n, k.d, k.c, sx, sw, to_ref(cfg),
                         key, y_ref.data(), &saved);

  std::vector<float> y32;
  std::vector<bf16_t> y16;
  run_forward(L, x, w, bias, sx, sw, cfg, key, &y32, &y16);

  EXPECT_EQ(count_diff(L.x_qp.download(), saved.x_q_packed, "x_q_packed"), 0);
  EXPECT_EQ(count_diff(L.x_ep.download(), saved.x_e_packed, "x_e_packed"), 0);
  EXPECT_EQ(count_diff(L.w_qp.download(), saved.w_q_packed, "w_q_packed"), 0);
  EXPECT_EQ(count_diff(L.w_ep.download(), saved.w_e_packed, "w_e_packed"), 0);
  const std::vector<int8_t> xq = saved.x_q(), wq = saved.w_q();
  // x_q: the int8 codes, except on the packed INT4 path (mma_sm80, D % 32 == 0, hq_linear.h),
  // where the last (inference) forward left the packed codes in its first N·D/2 bytes.
  if (cuda::resolve_gemm_path(gemm) == cuda::GemmPath::mma_sm80 && k.d % 32 == 0) {
    const std::vector<int8_t> xq_mem = L.x_q.download();
    const std::vector<uint8_t> packed_in_x_q(xq_mem.begin(), xq_mem.begin() + k.n * k.d / 2);
    EXPECT_EQ(count_diff(packed_in_x_q, saved.x_q_packed, "x_q (packed codes, inference)"), 0);
  } else {
    EXPECT_EQ(count_diff(L.x_q.download(), xq, "x_q"), 0);
  }
  EXPECT_EQ(count_diff(L.w_q.download(), wq, "w_q"), 0);
  EXPECT_EQ(count_diff(L.w_q_t.download(), transpose(wq, k.c, k.d), "w_q_t"), 0);

  // y: acc exact on both sides; the epilogue is fma(float(acc), sx·sw, b) on the GPU and
  // fl(fl(float(acc)·(sx·sw)) + b) in the reference: each rounding ≤ 2^-24 of its result, so
  // |y_f32 − ref| ≤ 2^-22·(|p| + |b|) with p = acc·sx·sw; the bf16 output adds half a bf16 ulp,
  // ≤ 2^-8·|ref|, plus twice the f32 term (test_gemm_gpu.cpp, check_dequant).
  std::vector<int32_t> acc(static_cast<size_t>(k.n * k.c));
  ref::gemm_s8s8_s32_tn(xq.data(), wq.data(), k.n, k.c, k.d, acc.data());
  const float s_xw = sx * sw;
  int64_t bad = 0;
  for (int64_t i = 0; i < k.n * k.c; ++i) {
    const double p = std::fabs(static_cast<double>(acc[i]) * s_xw);
    const double b = std::fabs(bias[static_cast<size_t>(i % k.c)]);
    const double r = y_ref[static_cast<size_t>(i)];
    const double b32 = std::ldexp(p + b, -22);
    const double b16 = std::ldexp(std::fabs(r), -8) + std::ldexp(p + b, -21);
    const double e32 = std::fabs(y32[static_cast<size_t>(i)] - r);
    const double e16 = std::fabs(bf16_to_f32(y16[static_cast<size_t>(i)].bits) - r);
    if (!(e32 <= b32) || !(e16 <= b16)) {
      if (bad < 5)
        ADD_FAILURE() << "y[" << i << "]: f32 " << y32[static_cast<size_t>(i)] << ", bf16 "
                      << bf16_to_f32(y16[static_cast<size_t>(i)].bits) << ", ref " << r;
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0);
  return saved;
}

const std::vector<Case>& forward_cases() {
  static const std::vector<Case> cases = {
      {48, 64, 32, 32, kInt4Sym},       // the default block, tiles cut at 48 rows
      {16, 16, 16, 16, kInt4Full},      // smallest legal shape, the released code's range
      {64, 256, 48, 256, kInt4Sym},     // block 256: two chunks per warp row
      {32, 2048, 16, 1024, kInt4Full},  // block 1024: eight chunks, registers at their most
      {160, 384, 80, 128, kInt4Sym},    // block 128 = one chunk, three column tiles
      {96, 48, 64, 2, kInt4Sym},        // block 2, D = 48 < one 128-column chunk
      {80, 208, 112, 1, kInt4Sym},      // block 1 (no transform), D = 208 (1.6 chunks)
      {16, 1024, 4608, 32, kInt4Sym},   // w: 1152 tiles, more than one wave: blocks loop
  };
  return cases;
}

// The GEMM path is the test parameter (see the top of this file). Seeds differ per path too,
// so each path sees fresh inputs.
class LinearGpuPath : public ::testing::TestWithParam<cuda::GemmPath> {
 protected:
  void SetUp() override {
    int device = 0, major = 0;
    NB_CUDA_CHECK(cudaGetDevice(&device));
    NB_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    if (GetParam() == cuda::GemmPath::mma_sm80 && major < 8)
      GTEST_SKIP() << "mma_sm80 needs compute capability 8.0 or higher";
  }
  cuda::GemmPath gemm() const { return GetParam(); }
  int seed_variant(int v) const { return v + (GetParam() == cuda::GemmPath::mma_sm80 ? 5 : 0); }
};

TEST_P(LinearGpuPath, ForwardMatchesRefF32) {
  int v = 0;
  SideChannelTally tally;
  for (const Case& k : forward_cases()) {
    Layer L(k.n, k.d, k.c);
    tally.add(check_forward<float>(k, false, L, seed_of(k, seed_variant(v++)), gemm()));
  }
  tally.expect_both_kinds();
}

TEST_P(LinearGpuPath, ForwardMatchesRefBf16Input) {
  int v = 20;
  SideChannelTally tally;
  for (const Case& k : forward_cases()) {
    Layer L(k.n, k.d, k.c);
    tally.add(check_forward<bf16_t>(k, true, L, seed_of(k, seed_variant(v++)), gemm()));
  }
  tally.expect_both_kinds();
}

// ---- backward ------------------------------------------------------------------------------

// Float64 block Hadamard (the same butterfly, no rounding) for the oracle.
void hadamard_f64(std::vector<double>& v, int64_t rows, int64_t cols, int64_t block) {
  const double norm = 1.0 / std::sqrt(static_cast<double>(block));
  for (int64_t r = 0; r < rows; ++r) {
    double* x = v.data() + r * cols;
    for (int64_t h = 1; h < block; h <<= 1)
      for (int64_t i = 0; i < cols; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          const double a = x[j], b = x[j + h];
          x[j] = a + b;
          x[j + h] = a - b;
        }
    for (int64_t j = 0; j < cols; ++j) x[j] *= norm;
  }
}

// For a transformed-domain gradient t (float64, unmasked) and the side channel: the oracle's
// output H(mask∘t), the LSQ term sum Σ t·δ̃ and Σ|t·δ̃|, and per element the bound
//   |fl − exact| ≤ (log2(block) + 4)·2^-24 · 2^(−k/2)·Σ_{j in the block} |t_j| + t_err
// (t_err: the caller's bound on the error of each t_j times the same row sum). Origin: the
// GPU's t carries ≤ 2 roundings (2^-23 relative, folded into t_rel); the butterfly adds one
// rounding per stage to partial sums bounded by Σ|t_j| (log2(block) stages), the norm's own
// rounding and the final multiply add two more.
struct Oracle {
  std::vector<double> out, bound;
  double lsq_sum = 0, lsq_abs = 0;
};
Oracle oracle(const std::vector<double>& t, double t_rel, const std::vector<int8_t>& q,
              const std::vector<int8_t>& e, int64_t rows, int64_t cols, int64_t block) {
  Oracle o;
  o.out.resize(t.size());
  o.bound.resize(t.size());
  std::vector<double> masked_abs(t.size());
  for (size_t i = 0; i < t.size(); ++i) {
    const double delta = ref::lsq_residual_decode(e[i], q[i]);
    o.lsq_sum += t[i] * delta;
    o.lsq_abs += std::fabs(t[i] * delta);
    o.out[i] = e[i] == ref::kLsqClipped ? 0.0 : t[i];
    masked_abs[i] = std::fabs(o.out[i]);
  }
  hadamard_f64(o.out, rows, cols, block);
  const double stages = std::log2(static_cast<double>(block));
  const double norm = 1.0 / std::sqrt(static_cast<double>(block));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b0 = 0; b0 < cols; b0 += block) {
      double sum = 0;
      for (int64_t j = 0; j < block; ++j) sum += masked_abs[static_cast<size_t>(r * cols + b0 + j)];
      const double bd = ((stages + 4.0) * std::ldexp(1.0, -24) + t_rel) * norm * sum;
      for (int64_t j = 0; j < block; ++j) o.bound[static_cast<size_t>(r * cols + b0 + j)] = bd;
    }
  return o;
}

// Elementwise: |got − oracle| ≤ bound, and got == the reference's value (as floats).
int64_t check_grad(const std::vector<float>& got, const std::vector<float>& ref_v,
                   const Oracle& o, bool expect_equal_to_ref, const char* what) {
  int64_t bad = 0, unequal = 0;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - o.out[i]);
    if (o.bound[i] > 0) worst = std::max(worst, err / o.bound[i]);
    const bool bound_ok = err <= o.bound[i] || (o.bound[i] == 0 && got[i] == 0.0f);
    if (!bound_ok) {
      if (bad < 5)
        ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", float64 " << o.out[i]
                      << ", |err| " << err << " > bound " << o.bound[i];
      ++bad;
    }
    if (got[i] != ref_v[i]) ++unequal;
  }
  std::printf("[ info     ] %s: largest |err|/bound %.3f, %lld of %zu differ from the reference\n",
              what, worst, static_cast<long long>(unequal), got.size());
  if (expect_equal_to_ref) {
    EXPECT_EQ(unequal, 0) << what << " should equal the reference";
  }
  return bad;
}

// A step gradient against the fp64 oracle g·Σ t·δ̃ with t = acc·s·s' in fp64. The exact sum
// (ref::lsq_backward_exact) scales T by fl32(s·s') (≤ 2^-24 relative off s·s'), then a few
// fp64 roundings and one fp32 rounding: rel = 2^-23. The sampled dx sums the GPU's fp32 t,
// each a few fp32 roundings off the oracle's (rel = 2^-21). |got − oracle| ≤ g·rel·Σ|t·δ̃| +
// ulp(|oracle|) + the fp64 sums' reordering (n·2^-53·Σ|t·δ̃|, g times).
void check_step_grad(float got, double g, const Oracle& o, double rel, int64_t n,
                     const char* what) {
  const double want = g * o.lsq_sum;
  const double ulp = std::ldexp(1.0, std::ilogb(std::max(std::fabs(want), 1e-30)) - 23);
  const double bound =
      g * (rel + 2.0 * static_cast<double>(n) * std::ldexp(1.0, -53)) * o.lsq_abs + ulp;
  EXPECT_LE(std::fabs(static_cast<double>(got) - want), bound)
      << what << ": gpu " << got << ", float64 oracle " << want;
}

uint32_t float_bits(float v) { return std::bit_cast<uint32_t>(v); }

// db: both sides sum N fp32 values in fp64 (different fixed orders) and round once:
//   |gpu − ref| ≤ 2N·2^-53·Σ|dy| + ulp(|ref|).
void check_db(const std::vector<float>& got, const std::vector<float>& want,
              const std::vector<float>& dy, int64_t n, int64_t c) {
  int64_t bad = 0;
  for (int64_t j = 0; j < c; ++j) {
    double abs_sum = 0;
    for (int64_t r = 0; r < n; ++r) abs_sum += std::fabs(dy[static_cast<size_t>(r * c + j)]);
    const float w = want[static_cast<size_t>(j)];
    const double ulp = std::ldexp(1.0, std::ilogb(std::max(std::fabs(w), 1e-30f)) - 23);
    const double bound = 2.0 * static_cast<double>(n) * std::ldexp(1.0, -53) * abs_sum + ulp;
    if (!(std::fabs(static_cast<double>(got[static_cast<size_t>(j)]) - w) <= bound)) {
      if (bad < 5) ADD_FAILURE() << "db[" << j << "] = " << got[static_cast<size_t>(j)] << ", ref " << w;
      ++bad;
    }
  }
  EXPECT_EQ(bad, 0);
}

struct BackwardOut {
  std::vector<float> dx, dw, db;
  float dsx = 0, dsw = 0, scale = 0;
};

// How run_backward queues the call: directly on the legacy default stream, or captured from
// a stream of its own into a CUDA graph that is then launched (after one direct warm-up call
// on that stream, as a user would, so that the caches of workspace and side streams exist).
enum class Launch { direct, graph };

// Runs the GPU backward on the state the forward left in L; dy of type G, dx of type DX.
template <class G, class DX>
BackwardOut run_backward(Layer& L, const std::vector<G>& dy, const cuda::HqLinearConfig& cfg,
                         const PhiloxKey& key, Launch launch = Launch::direct) {
  DeviceBuffer<G> ddy(L.n * L.c);
  ddy.upload(dy);
  const size_t ws_bytes = cuda::hq_linear_backward_workspace_bytes(L.n, L.d, L.c, cfg);
  DeviceBuffer<uint8_t> ws(static_cast<int64_t>(ws_bytes));
  DeviceBuffer<DX> dx(L.n * L.d);
  DeviceBuffer<float> dw(L.c * L.d), db(L.c), scalars(3);
  cuda::HqLinearBackwardParams<G> p;
  p.dy = ddy.get();
  p.n = L.n, p.d = L.d, p.c = L.c;
  p.sx = L.sx.get();
  p.sw = L.sw.get();
  p.x_q_packed = L.x_qp.get();
  p.x_e_packed = L.x_ep.get();
  p.w_q_packed = L.w_qp.get();
  p.w_e_packed = L.w_ep.get();
  p.w_q_t = L.w_q_t.get();
  p.workspace = ws.get();
  p.workspace_bytes = ws_bytes;
  if constexpr (sizeof(DX) == 2) p.dx = dx.get();
  else p.dx_f32 = dx.get();
  p.dw = dw.get();
  p.db = db.get();
  p.dsx = scalars.get();
  p.dsw = scalars.get() + 1;
  p.grad_scale = scalars.get() + 2;
  p.status = L.status.get();
  if (launch == Launch::direct) {
    cuda::status_clear(L.status.get(), nullptr);
    cuda::hq_linear_backward(p, cfg, key, nullptr);
    cuda::status_throw_if_set(L.status.get(), "linear backward", nullptr);
  } else {
    cudaStream_t stream = nullptr;
    NB_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cuda::hq_linear_backward(p, cfg, key, stream);  // warm-up: caches sized outside the capture
    NB_CUDA_CHECK(cudaStreamSynchronize(stream));
    // Poison the outputs, so that only the graph's run can make them right.
    NB_CUDA_CHECK(cudaMemset(dx.get(), 0xff, sizeof(DX) * static_cast<size_t>(L.n * L.d)));
    NB_CUDA_CHECK(cudaMemset(dw.get(), 0xff, sizeof(float) * static_cast<size_t>(L.c * L.d)));
    NB_CUDA_CHECK(cudaMemset(db.get(), 0xff, sizeof(float) * static_cast<size_t>(L.c)));
    NB_CUDA_CHECK(cudaMemset(scalars.get(), 0xff, sizeof(float) * 3));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    NB_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    cuda::status_clear(L.status.get(), stream);
    cuda::hq_linear_backward(p, cfg, key, stream);
    NB_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    NB_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    NB_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    NB_CUDA_CHECK(cudaStreamSynchronize(stream));
    cuda::status_throw_if_set(L.status.get(), "linear backward (graph)", stream);
    NB_CUDA_CHECK(cudaGraphExecDestroy(exec));
    NB_CUDA_CHECK(cudaGraphDestroy(graph));
    NB_CUDA_CHECK(cudaStreamDestroy(stream));
  }
  BackwardOut o;
  if constexpr (sizeof(DX) == 2) o.dx = widen(dx.download());
  else o.dx = dx.download();
  o.dw = dw.download();
  o.db = db.download();
  const std::vector<float> s = scalars.download();
  o.dsx = s[0], o.dsw = s[1], o.scale = s[2];
  return o;
}

// Every output of two backward runs, bit for bit (floats compared as bit patterns).
void expect_same_bits(const BackwardOut& a, const BackwardOut& b, const char* what) {
  SCOPED_TRACE(what);
  const auto bits = [](const std::vector<float>& v) {
    std::vector<uint32_t> u(v.size());
    std::memcpy(u.data(), v.data(), sizeof(float) * v.size());
    return u;
  };
  EXPECT_EQ(count_diff(bits(a.dx), bits(b.dx), "dx"), 0);
  EXPECT_EQ(count_diff(bits(a.dw), bits(b.dw), "dw"), 0);
  EXPECT_EQ(count_diff(bits(a.db), bits(b.db), "db"), 0);
  const float sa[3] = {a.dsx, a.dsw, a.scale}, sb[3] = {b.dsx, b.dsw, b.scale};
  EXPECT_EQ(std::memcmp(sa, sb, sizeof(sa)), 0)
      << "dsx " << a.dsx << " vs " << b.dsx << ", dsw " << a.dsw << " vs " << b.dsw
      << ", grad scale " << a.scale << " vs " << b.scale;
}

// Output gradient: Gaussian rows of varied magnitude (a few heavy rows, as B.3 describes) and
// a block of exactly-zero rows.
std::vector<float> random_grad(int64_t n, int64_t c, uint64_t seed) {
  std::vector<float> g(static_cast<size_t>(n * c));
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  for (int64_t r = 0; r < n; ++r) {
    const float row_scale = r % 7 == 0 ? 4.0f : (r % 5 == 1 ? 0.0f : 0.05f);
    for (int64_t j = 0; j < c; ++j)
      g[static_cast<size_t>(r * c + j)] =
          row_scale * philox_normal(key, static_cast<uint64_t>(r * c + j));
  }
  return g;
}

template <class G, class DX>
void check_backward_keep_all(const Case& k, uint64_t seed, cuda::GemmPath gemm, bool fuse = true) {
  SCOPED_TRACE(testing::Message() << "N=" << k.n << " D=" << k.d << " C=" << k.c << " block="
                                  << k.block << " dy " << (sizeof(G) == 2 ? "bf16" : "f32")
                                  << " dx " << (sizeof(DX) == 2 ? "bf16" : "f32"));
  Layer L(k.n, k.d, k.c);
  const ref::HqLinearSaved saved = check_forward<float>(k, false, L, seed, gemm);
  std::vector<float> dyf = random_grad(k.n, k.c, seed + 10);
  std::vector<G> dy;
  if constexpr (sizeof(G) == 2) {
    dy = narrow(dyf);
    dyf = widen(dy);
  } else {
    dy = dyf;
  }
  cuda::HqLinearConfig cfg;
  cfg.block = k.block;
  cfg.range = k.range;
  cfg.gemm = gemm;
  cfg.fuse_mask_epilogues = fuse;
  const PhiloxKey key{seed + 11, 3, 5, RngRole::rounding};
  const ref::HqLinearGrads want = ref::hq_linear_backward(dyf.data(), saved, to_ref(cfg), key);
  const BackwardOut got = run_backward<G, DX>(L, dy, cfg, key);

  EXPECT_EQ(got.scale, want.grad_scale);
  // float64 oracle: t = s·sw·(combined·w_q) and s·sx·(combinedᵀ·x_q) from exact integer sums
  std::vector<int8_t> hi(dyf.size()), lo(dyf.size()), comb(dyf.size());
  const float s = ref::bitsplit(dyf.data(), k.n, k.c,
                                PhiloxKey{key.seed, key.step, key.layer, RngRole::grad_output_rounding},
                                hi.data(), lo.data(), comb.data());
  const std::vector<int8_t> xq = saved.x_q(), wq = saved.w_q(), xe = saved.x_e(), we = saved.w_e();
  std::vector<int32_t> acc_x(static_cast<size_t>(k.n * k.d)), acc_w(static_cast<size_t>(k.c * k.d));
  ref::gemm_s8s8_s32_tn(comb.data(), transpose(wq, k.c, k.d).data(), k.n, k.d, k.c, acc_x.data());
  ref::gemm_s8s8_s32_tn(transpose(comb, k.n, k.c).data(), transpose(xq, k.n, k.d).data(), k.c, k.d,
                        k.n, acc_w.data());
  std::vector<double> tx(acc_x.size()), tw(acc_w.size());
  for (size_t i = 0; i < tx.size(); ++i) tx[i] = static_cast<double>(acc_x[i]) * s * saved.sw;
  for (size_t i = 0; i < tw.size(); ++i) tw[i] = static_cast<double>(acc_w[i]) * s * saved.sx;
  // t on the GPU: float(acc) exact (|acc| ≤ 720·K < 2^24), then fl(s·sw) and the product:
  // two roundings, ≤ 2^-23 relative.
  const Oracle ox = oracle(tx, std::ldexp(1.0, -23), xq, xe, k.n, k.d, k.block);
  const Oracle ow = oracle(tw, std::ldexp(1.0, -23), wq, we, k.c, k.d, k.block);
  if constexpr (sizeof(DX) == 2) {
    // bf16 dx: the reference's fp32 value rounded to nearest even, exactly.
    EXPECT_EQ(count_diff(bf16_bits(got.dx), bf16_bits(want.dx), "dx (bf16 bits)"), 0);
  } else {
    EXPECT_EQ(check_grad(got.dx, want.dx, ox, true, "dx"), 0);
  }
  EXPECT_EQ(check_grad(got.dw, want.dw, ow, true, "dw"), 0);
  const double gx = 1.0 / std::sqrt(static_cast<double>(k.range.qmax) * static_cast<double>(k.n * k.d));
  const double gw = 1.0 / std::sqrt(static_cast<double>(k.range.qmax) * static_cast<double>(k.c * k.d));
  // The step sums are exact integer sums (ref::lsq_backward_exact): the reference's bits.
  EXPECT_EQ(float_bits(got.dsx), float_bits(want.dsx)) << "dsx " << got.dsx << " vs " << want.dsx;
  EXPECT_EQ(float_bits(got.dsw), float_bits(want.dsw)) << "dsw " << got.dsw << " vs " << want.dsw;
  // and within the fp64 oracle's bound of the float formulation g·Σ t·δ̃ (the exact sum
  // differs from it by the fp32 rounding of t, ≤ 2^-23·Σ|t·δ̃|, plus the final roundings)
  check_step_grad(got.dsx, gx, ox, std::ldexp(1.0, -23), k.n * k.d, "dsx");
  check_step_grad(got.dsw, gw, ow, std::ldexp(1.0, -23), k.c * k.d, "dsw");
  check_db(got.db, want.db, dyf, k.n, k.c);

  // The overlapped schedule (the default) and the in-order one run the same kernels with the
  // same fixed reduction orders, and the fused epilogues give the separate passes' results:
  // every output bit for bit, the fp64-summed ones included.
  cuda::HqLinearConfig in_order = cfg;
  in_order.overlap_passes = !cfg.overlap_passes;
  expect_same_bits(got, run_backward<G, DX>(L, dy, in_order, key), "overlap_passes toggled");
  cuda::HqLinearConfig unfused = cfg;
  unfused.fuse_mask_epilogues = !cfg.fuse_mask_epilogues;
  expect_same_bits(got, run_backward<G, DX>(L, dy, unfused, key), "fuse_mask_epilogues toggled");
  const cuda::HqLinearFusedProducts f = cuda::hq_linear_fused_products(k.n, k.d, k.c, cfg);
  std::printf("[ info     ] fused epilogues: dx %s, dw %s\n", f.dx ? "yes" : "no", f.dw ? "yes" : "no");
  // the cases with N, C > 1024 and block ≤ 32 must have run them (on wgmma_sm90)
  if (gemm != cuda::GemmPath::mma_sm80 && k.n > 1024 && k.c > 1024 && k.block <= 32) {
    EXPECT_TRUE(f.dx && f.dw) << "the fused epilogues were not used where fused_mask's rule says";
  }
}

const std::vector<Case>& backward_cases() {
  static const std::vector<Case> cases = {
      {64, 128, 48, 32, kInt4Sym},
      {128, 256, 96, 256, kInt4Sym},
      {48, 2048, 32, 1024, kInt4Full},
      {96, 48, 64, 2, kInt4Sym},
      {256, 512, 512, 64, kInt4Full},
      {16384, 640, 32, 32, kInt4Sym},   // dx: 2560 tiles > 2048 mask blocks: blocks loop
      // both fused epilogues (N, C > 1024 and > 256: fused_mask's rule, block ≤ 32)
      {1088, 256, 1056, 32, kInt4Sym},
      {1040, 80, 1072, 16, kInt4Full},  // the same with partial tiles and D % 32 = 16
      {80, 48, 64, 16, kInt4Full},      // block 16, D = 48: lanes past D in a 256-column chunk;
                                        // the fused epilogues: D % 32 = 16 (a half subtile)
  };
  return cases;
}

TEST_P(LinearGpuPath, BackwardKeepAllMatchesRef) {
  int v = 40;
  for (const Case& k : backward_cases())
    check_backward_keep_all<float, float>(k, seed_of(k, seed_variant(v++)), gemm());
}

TEST_P(LinearGpuPath, BackwardBf16GradientsMatchRef) {
  int v = 50;
  for (const Case& k : backward_cases())
    check_backward_keep_all<bf16_t, bf16_t>(k, seed_of(k, seed_variant(v++)), gemm());
}

// The backward queues nothing that waits for the host and, with overlap_passes, forks a side
// stream through events: captured into a CUDA graph and replayed it must give the direct
// call's bits (outputs poisoned before the replay), keep-all in both schedules and sampled.
TEST_P(LinearGpuPath, BackwardCapturedInGraphMatchesDirect) {
  const Case k{512, 256, 384, 32, kInt4Sym};
  const uint64_t seed = seed_of(k, seed_variant(60));
  Layer L(k.n, k.d, k.c);
  check_forward<float>(k, false, L, seed, gemm());
  const std::vector<bf16_t> dy = narrow(random_grad(k.n, k.c, seed + 10));
  const PhiloxKey key{seed + 11, 3, 5, RngRole::rounding};
  cuda::HqLinearConfig cfg;
  cfg.block = k.block;
  cfg.range = k.range;
  cfg.gemm = gemm();
  for (const bool overlap : {true, false}) {
    cfg.overlap_passes = overlap;
    SCOPED_TRACE(overlap ? "keep-all, overlapped" : "keep-all, in order");
    expect_same_bits(run_backward<bf16_t, bf16_t>(L, dy, cfg, key),
                     run_backward<bf16_t, bf16_t>(L, dy, cfg, key, Launch::graph), "graph");
  }
  cfg.lss = cuda::LssVariant::sampled;
  SCOPED_TRACE("sampled");
  expect_same_bits(run_backward<bf16_t, bf16_t>(L, dy, cfg, key),
                   run_backward<bf16_t, bf16_t>(L, dy, cfg, key, Launch::graph), "graph");
}

// An output gradient whose rows span two decades (scales 1, 0.32, 0.1, 0.03 in turn) with a
// block of exactly-zero rows: the hi halves of many rows are non-zero, so the fitted p of hi
// rows (not only of lo rows) fall below 1.
std::vector<float> graded_grad(int64_t n, int64_t c, uint64_t seed) {
  std::vector<float> g(static_cast<size_t>(n * c));
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  for (int64_t r = 0; r < n; ++r) {
    const float row_scale = r % 5 == 1 ? 0.0f : static_cast<float>(std::pow(10.0, -0.5 * double(r % 4)));
    for (int64_t j = 0; j < c; ++j)
      g[static_cast<size_t>(r * c + j)] =
          row_scale * philox_normal(key, static_cast<uint64_t>(r * c + j));
  }
  return g;
}

struct SampledCase {
  Case shape;
  double fraction;
  bool graded;  // graded_grad, else random_grad
};

// The sampled variant against the reference's Bernoulli estimator (ref::LssMode::bernoulli):
//   dw: bit-exact. The kept rows, t, the re-quantized codes and the int32 sums are the same
//       integers/fp32 operations on both sides, and the epilogue float(acc)·(fl(t·s)·sx) is
//       the keep-all one (one rounding of the same product), so dw_t is equal; the mask and
//       the butterfly are the reference's, so dw is too. Also within the float64 oracle of the
//       re-quantized estimator: float(acc) exact (|acc| ≤ 127·8·2N < 2^24), then fl(t·s),
//       fl(·sx) and the product: three roundings, ≤ 2^-22 relative.
//   dx: within fp32 rounding of the reference's fp64-weighted estimator (bound below).
//   dsw: the same fp64 terms as the reference (dw_t equal) in another order; db as keep-all.
// Equality needs the GPU's p to equal the reference's (fit_probabilities agrees to 1 ulp,
// cuda/quant/bitsplit.h): the test checks that for its inputs first.
void check_backward_sampled(const SampledCase& sc, uint64_t seed, cuda::GemmPath gemm) {
  const Case& k = sc.shape;
  SCOPED_TRACE(testing::Message() << "N=" << k.n << " D=" << k.d << " C=" << k.c << " block="
                                  << k.block << " fraction " << sc.fraction
                                  << (sc.graded ? " graded dy" : " row-structured dy"));
  Layer L(k.n, k.d, k.c);
  const ref::HqLinearSaved saved = check_forward<float>(k, false, L, seed, gemm);
  const std::vector<float> dy = sc.graded ? graded_grad(k.n, k.c, seed + 10)
                                          : random_grad(k.n, k.c, seed + 10);
  cuda::HqLinearConfig cfg;
  cfg.block = k.block;
  cfg.range = k.range;
  cfg.lss = cuda::LssVariant::sampled;
  cfg.sample_fraction = sc.fraction;
  cfg.gemm = gemm;
  const PhiloxKey key{seed + 11, 3, 5, RngRole::rounding};
  const ref::HqLinearGrads want = ref::hq_linear_backward(dy.data(), saved, to_ref(cfg), key);
  const BackwardOut got = run_backward<float, float>(L, dy, cfg, key);
  EXPECT_EQ(got.scale, want.grad_scale);

  // The reference's selections, recomputed: split, scores, p, Bernoulli rows (dw and dx).
  const int64_t n = k.n, c = k.c, d = k.d;
  auto with = [&](RngRole role) { return PhiloxKey{key.seed, key.step, key.layer, role}; };
  std::vector<int8_t> hi(dy.size()), lo(dy.size());
  const float s = ref::bitsplit(dy.data(), n, c, with(RngRole::grad_output_rounding), hi.data(),
                                lo.data(), nullptr);
  const double budget = cfg.sample_fraction * static_cast<double>(2 * n);
  const std::vector<int8_t> wq = saved.w_q(), xq = saved.x_q(), xe = saved.x_e();
  std::vector<float> xn(static_cast<size_t>(n)), scw(static_cast<size_t>(2 * n)), pw(scw.size());
  std::vector<float> scx(scw.size()), px(scw.size());
  std::vector<uint8_t> keep_w(scw.size()), keep_x(scw.size());
  ref::row_norms_s8(xq.data(), n, d, xn.data());
  for (float& v : xn) v *= saved.sx;
  ref::leverage_scores(hi.data(), lo.data(), n, c, s, xn.data(), scw.data());
  ref::leverage_scores(hi.data(), lo.data(), n, c, s, nullptr, scx.data());
  ref::fit_probabilities(scw.data(), 2 * n, budget, pw.data());
  ref::fit_probabilities(scx.data(), 2 * n, budget, px.data());
  const int64_t kept_w = ref::sample_rows(pw.data(), 2 * n, with(RngRole::sample_dw), keep_w.data());
  const int64_t kept_x = ref::sample_rows(px.data(), 2 * n, with(RngRole::sample_dx), keep_x.data());
  EXPECT_EQ(kept_w, want.kept_rows_dw);
  EXPECT_EQ(kept_x, want.kept_rows_dx);
  // The device's fit on the same (bit-exact) scores must give the same fp32 p here.
  for (const std::vector<float>* scores : {&scw, &scx}) {
    DeviceBuffer<float> dsc(2 * n), dp(2 * n);
    dsc.upload(*scores);
    cuda::fit_probabilities({dsc.get(), 2 * n, budget, dp.get(), nullptr}, nullptr);
    const std::vector<float>& p_ref = scores == &scw ? pw : px;
    ASSERT_EQ(dp.download(), p_ref) << "the GPU's fit differs from the reference's by an ulp "
                                       "for these inputs (cuda/quant/bitsplit.h); pick another seed";
  }
  // Sampling dropped rows, and kept rows with p < 1 (hi and lo) carry 1/p weights.
  EXPECT_GT(kept_w, 0);
  EXPECT_LT(kept_w, 2 * n);
  EXPECT_LT(kept_x, 2 * n);
  int64_t weighted_hi = 0, weighted_lo = 0;
  for (int64_t i = 0; i < 2 * n; ++i)
    if (keep_w[static_cast<size_t>(i)] && pw[static_cast<size_t>(i)] < 1.0f)
      ++(i < n ? weighted_hi : weighted_lo);
  EXPECT_GT(weighted_lo, 0);
  if (sc.graded) {
    EXPECT_GT(weighted_hi, 0);
  }

  // dx: t = (wh·acc_hi + wl·acc_lo)·sw; the GPU rounds coef = wh (or wl), coef·sw, and each
  // product (3 roundings per term) and adds the two terms (1 more): ≤ 4·2^-24 relative of
  // |t_hi| + |t_lo|. The oracle takes t_rel relative to |t|, so the bound is taken from a
  // second oracle run on t_abs = |t_hi| + |t_lo| ≥ |t| (the bound only grows).
  const std::vector<int8_t> wq_t = transpose(wq, c, d);
  std::vector<int32_t> ah(static_cast<size_t>(n * d)), al(ah.size());
  ref::gemm_s8s8_s32_tn(hi.data(), wq_t.data(), n, d, c, ah.data());
  ref::gemm_s8s8_s32_tn(lo.data(), wq_t.data(), n, d, c, al.data());
  std::vector<double> t(ah.size()), t_abs(ah.size());
  for (int64_t r = 0; r < n; ++r) {
    const double wh = keep_x[static_cast<size_t>(r)] ? 14.0 * s / px[static_cast<size_t>(r)] : 0.0;
    const double wl = keep_x[static_cast<size_t>(n + r)] ? static_cast<double>(s) / px[static_cast<size_t>(n + r)] : 0.0;
    for (int64_t j = 0; j < d; ++j) {
      const size_t e = static_cast<size_t>(r * d + j);
      t[e] = (wh * ah[e] + wl * al[e]) * saved.sw;
      t_abs[e] = (std::fabs(wh * ah[e]) + std::fabs(wl * al[e])) * saved.sw;
    }
  }
  Oracle ox = oracle(t, 0.0, xq, xe, n, d, k.block);
  const Oracle ob = oracle(t_abs, std::ldexp(1.0, -22), xq, std::vector<int8_t>(xe.size(), 0), n, d, k.block);
  for (size_t i = 0; i < ox.bound.size(); ++i) ox.bound[i] = std::max(ox.bound[i], ob.bound[i]);
  EXPECT_EQ(check_grad(got.dx, want.dx, ox, false, "sampled dx"), 0);
  // dsx: the fp64 sum over the GPU's fp32 t (the reference's lsq_backward_coded form), each t
  // within 2^-22 of |t_hi| + |t_lo| (above): the oracle's Σ|t·δ̃| taken over t_abs
  Oracle os = ox;
  os.lsq_abs = oracle(t_abs, 0.0, xq, xe, n, d, k.block).lsq_abs;
  check_step_grad(got.dsx,
                  1.0 / std::sqrt(static_cast<double>(k.range.qmax) * static_cast<double>(n * d)),
                  os, std::ldexp(1.0, -22), n * d, "sampled dsx");

  // dw: q = the kept rows' β/p-weighted codes re-quantized with t (the reference's function,
  // whose formula tests/unit/test_linear.cpp pins); t_w = t·s·sx·Σ_kept q_iᵀ·x_q(i mod N).
  std::vector<int8_t> q(static_cast<size_t>(2 * n * c));
  const float tq = ref::requantize_sampled_rows(hi.data(), lo.data(), n, c, pw.data(), keep_w.data(),
                                                with(RngRole::sample_dw_rounding), q.data());
  std::vector<double> tw(static_cast<size_t>(c * d), 0.0);
  for (int64_t i = 0; i < 2 * n; ++i) {
    if (!keep_w[static_cast<size_t>(i)]) continue;
    const int64_t r = i % n;
    for (int64_t col = 0; col < c; ++col) {
      const int code = q[static_cast<size_t>(i * c + col)];
      if (code == 0) continue;
      for (int64_t j = 0; j < d; ++j) tw[static_cast<size_t>(col * d + j)] += static_cast<double>(code) * xq[static_cast<size_t>(r * d + j)];
    }
  }
  for (double& v : tw) v *= static_cast<double>(tq) * s * saved.sx;
  const Oracle ow = oracle(tw, std::ldexp(1.0, -22), wq, saved.w_e(), c, d, k.block);
  EXPECT_EQ(check_grad(got.dw, want.dw, ow, true, "sampled dw"), 0);
  const double gw = 1.0 / std::sqrt(static_cast<double>(k.range.qmax) * static_cast<double>(c * d));
  EXPECT_EQ(float_bits(got.dsw), float_bits(want.dsw))
      << "sampled dsw " << got.dsw << " vs " << want.dsw;  // an exact sum, as the reference
  check_step_grad(got.dsw, gw, ow, std::ldexp(1.0, -23), c * d, "sampled dsw");
  check_db(got.db, want.db, dy, n, c);
}

TEST_P(LinearGpuPath, SampledBackwardMatchesRef) {
  const std::vector<SampledCase> cases = {
      {{128, 256, 64, 32, kInt4Sym}, 0.3, false},
      {{80, 208, 48, 16, kInt4Full}, 0.4, true},    // 2N = 160: K padded past the kept rows
      {{48, 96, 112, 32, kInt4Sym}, 0.25, true},
      {{176, 128, 80, 128, kInt4Sym}, 0.3, true},   // block 128, three dw row tiles
      {{1056, 128, 288, 32, kInt4Sym}, 0.3, true},  // N > 1024, C > 256: the dw GEMM fused
  };
  int v = 60;
  for (const SampledCase& sc : cases)
    check_backward_sampled(sc, seed_of(sc.shape, seed_variant(v++)), gemm());
}

// The sampled GEMMs are sized for K_cap rows, not the kept counts (no host wait). A capacity
// below the kept count must be reported with that count, never fault or pass silently.
TEST_P(LinearGpuPath, SampledBackwardReportsCapacityOverflow) {
  const Case k{128, 256, 64, 32, kInt4Sym};
  Layer L(k.n, k.d, k.c);
  const uint64_t seed = seed_of(k, seed_variant(70));
  const ref::HqLinearSaved saved = check_forward<float>(k, false, L, seed, gemm());
  const std::vector<float> dy = graded_grad(k.n, k.c, seed + 10);
  cuda::HqLinearConfig cfg;
  cfg.block = k.block;
  cfg.range = k.range;
  cfg.lss = cuda::LssVariant::sampled;
  cfg.sample_fraction = 0.4;
  cfg.gemm = gemm();
  cfg.sample_capacity_sigmas = -1000.0;  // K_cap = 16, far below the ~102 kept rows
  ASSERT_EQ(cuda::hq_linear_sampled_capacity(k.n, cfg), 16);
  const PhiloxKey key{seed + 11, 3, 5, RngRole::rounding};
  const ref::HqLinearGrads want = ref::hq_linear_backward(dy.data(), saved, to_ref(cfg), key);
  const int64_t kept = std::max(want.kept_rows_dw, want.kept_rows_dx);
  ASSERT_GT(kept, 16);
  try {
    run_backward<float, float>(L, dy, cfg, key);
    ADD_FAILURE() << "a kept count of " << kept << " above K_cap = 16 was not reported";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("kept " + std::to_string(kept) + " rows"), std::string::npos) << msg;
    EXPECT_NE(msg.find("sample_capacity_sigmas"), std::string::npos) << msg;
  }
  // At the default capacity the same call reports nothing (the matches-ref test checks values).
  cfg.sample_capacity_sigmas = 8.0;
  EXPECT_NO_THROW((run_backward<float, float>(L, dy, cfg, key)));
}

INSTANTIATE_TEST_SUITE_P(LinearGpu, LinearGpuPath,
                         ::testing::Values(cuda::GemmPath::automatic, cuda::GemmPath::mma_sm80),
                         [](const ::testing::TestParamInfo<cuda::GemmPath>& info) {
                           return std::string(cuda::gemm_path_name(info.param));
                         });

// K_cap = min(round16(2N), round16(ceil(E + σ·√E + 16))), at least 16, E = fraction·2N.
TEST(LinearGpu, SampledCapacityFormula) {
  cuda::HqLinearConfig cfg;
  cfg.lss = cuda::LssVariant::sampled;
  cfg.sample_fraction = 0.5;  // N = 16384: E = 16384, √E = 128, 16384 + 1024 + 16 = 17424
  EXPECT_EQ(cuda::hq_linear_sampled_capacity(16384, cfg), 17424);
  cfg.sample_fraction = 0.3;  // N = 128: E = 76.8, ceil(76.8 + 8·8.76… + 16) = 163 → 176
  EXPECT_EQ(cuda::hq_linear_sampled_capacity(128, cfg), 176);
  cfg.sample_fraction = 1.0;  // the whole list: 2N = 200 → 208
  EXPECT_EQ(cuda::hq_linear_sampled_capacity(100, cfg), 208);
  cfg.sample_fraction = 0.5;
  cfg.sample_capacity_sigmas = -1e9;
  EXPECT_EQ(cuda::hq_linear_sampled_capacity(16384, cfg), 16);
  cfg.sample_capacity_sigmas = 1e300;
  EXPECT_EQ(cuda::hq_linear_sampled_capacity(16384, cfg), 32768);
  // Bad settings are errors here, in the workspace query and in the backward (same rules).
  cfg.sample_capacity_sigmas = std::nan("");
  EXPECT_THROW(cuda::hq_linear_sampled_capacity(16384, cfg), Error);
  EXPECT_THROW(cuda::hq_linear_backward_workspace_bytes(128, 64, 64, cfg), Error);
  cfg.sample_capacity_sigmas = 8.0;
  for (const double fraction : {0.0, -0.5, 1.5}) {
    cfg.sample_fraction = fraction;
    EXPECT_THROW(cuda::hq_linear_sampled_capacity(16384, cfg), Error) << fraction;
    EXPECT_THROW(cuda::hq_linear_backward_workspace_bytes(128, 64, 64, cfg), Error) << fraction;
  }
  cfg.sample_fraction = 0.5;
  EXPECT_THROW(cuda::hq_linear_sampled_capacity(0, cfg), Error);
  EXPECT_THROW(cuda::hq_linear_sampled_capacity(2000000, cfg), Error);
  cfg.lss = cuda::LssVariant::keep_all;  // keep-all ignores the sampling settings
  cfg.sample_fraction = 0.0;
  EXPECT_NO_THROW(cuda::hq_linear_backward_workspace_bytes(128, 64, 64, cfg));
}

// The fused quantizer at stream indices whose Philox block number has a non-zero high word
// (index_base ≥ 2^35): the kernels take the launch's PhiloxSchedule, whose round 0 folds the
// counter's constant words and XORs the block's high word in separately, so these blocks take
// a path that indices below 2^35 (every layer of a normal size) never do. Codes, packed codes
// and side channel against ref::hq_quantize and ref::lsq_residual_encode, for f32 and bf16
// input and a block that spans lanes (32) and one that spans chunks (512).
template <class T>
void expect_quantizer_at_high_indices(int64_t block, uint64_t index_base, uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "block " << block << " index_base " << index_base
                                  << (sizeof(T) == 2 ? " bf16" : " f32"));
  const int64_t rows = 48, cols = 1024, n = rows * cols;
  std::vector<float> x = random_activations(rows, cols, seed);
  if constexpr (sizeof(T) == 2) x = widen(narrow(x));  // the values the kernel reads
  const QRange range = kInt4Full;
  const float s = test_step(x, rows, cols, block, range);
  const PhiloxKey key{seed ^ 0x5bd1e995u, 7, 3, RngRole::rounding};

  std::vector<int8_t> q_ref(static_cast<size_t>(n));
  std::vector<float> r_ref(static_cast<size_t>(n));
  ref::hq_quantize(x.data(), rows, cols, block, s, range, q_ref.data(), r_ref.data());
  std::vector<uint8_t> qp_ref(static_cast<size_t>(n / 2)), ep_ref(static_cast<size_t>(n / 2));
  int64_t clipped = 0;
  for (int64_t i = 0; i < n; i += 2) {
    const int8_t e0 = ref::lsq_residual_encode(r_ref[i], range, key, index_base + i);
    const int8_t e1 = ref::lsq_residual_encode(r_ref[i + 1], range, key, index_base + i + 1);
    clipped += (e0 == ref::kLsqClipped) + (e1 == ref::kLsqClipped);
    qp_ref[i / 2] = static_cast<uint8_t>((q_ref[i] & 0xf) | ((q_ref[i + 1] & 0xf) << 4));
    ep_ref[i / 2] = static_cast<uint8_t>((e0 & 0xf) | ((e1 & 0xf) << 4));
  }
  ASSERT_GT(clipped, 0) << "the test data must clip some elements";
  ASSERT_LT(clipped, n / 4);

  std::vector<T> xt(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (sizeof(T) == 2) xt[i] = bf16_t{f32_to_bf16(x[i])};
    else xt[i] = x[i];
  }
  DeviceBuffer<T> dx(xt);
  DeviceBuffer<float> step(std::vector<float>{s});
  DeviceBuffer<int8_t> q(std::vector<int8_t>(static_cast<size_t>(n), int8_t{0x55}));
  DeviceBuffer<uint8_t> qp(std::vector<uint8_t>(static_cast<size_t>(n / 2), 0xa5));
  DeviceBuffer<uint8_t> ep(std::vector<uint8_t>(static_cast<size_t>(n / 2), 0x5a));
  DeviceBuffer<uint64_t> st(1);
  cuda::status_clear(st.get(), nullptr);
  cuda::HqLsqQuantizeParams<T> p;
  p.x = dx.get(), p.rows = rows, p.cols = cols, p.block = block, p.step = step.get();
  p.range = range;
  p.key = key;
  p.index_base = index_base;
  p.q = q.get(), p.q_packed = qp.get(), p.e_packed = ep.get(), p.status = st.get();
  cuda::hq_lsq_quantize(p, nullptr);
  NB_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_EQ(st.download()[0], cuda::kStatusClear);
  const std::vector<int8_t> q_got = q.download();
  const std::vector<uint8_t> qp_got = qp.download(), ep_got = ep.download();
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(q_got[i], q_ref[i]) << "code " << i;
  for (int64_t i = 0; i < n / 2; ++i) {
    ASSERT_EQ(qp_got[i], qp_ref[i]) << "packed code byte " << i;
    ASSERT_EQ(ep_got[i], ep_ref[i]) << "side-channel byte " << i;
  }
}

TEST(LinearGpu, LsqQuantizerSideChannelAtHighStreamIndices) {
  // block numbers (index >> 3) with high words 1, 0x30 and 2^28 + 1; all multiples of 8
  const uint64_t bases[] = {uint64_t{1} << 35, (uint64_t{0x30} << 35) + 8 * 1234567,
                            ((uint64_t{1} << 28) + 1) << 35};
  uint64_t seed = 0x7a11;
  for (const uint64_t base : bases) {
    for (const int64_t block : {int64_t{32}, int64_t{512}}) {
      expect_quantizer_at_high_indices<float>(block, base, ++seed);
      expect_quantizer_at_high_indices<bf16_t>(block, base, ++seed);
    }
  }
}

// The dx pass's bf16 store (the hardware's round-to-nearest-even pack) against nibble's
// f32_to_bf16 on the values where roundings differ if anything does: ties to even either
// way, the last values below the overflow to Inf, subnormals, ±0, ±Inf, and random bit
// patterns over every exponent. Block 1 makes the pass the identity on unclipped elements
// (norm 1), so out must be f32_to_bf16(g) bit for bit; a NaN comes out of the GPU's fp32
// multiply as the canonical NaN, whose bf16 is 0x7fff.
TEST(LinearGpu, MaskPassBf16StoreRoundsLikeTheReference) {
  const int64_t rows = 32, cols = 256, n = rows * cols;
  const uint32_t special[] = {
      0x3f808000u, 0x3f818000u, 0x3f807fffu, 0x3f808001u, 0xbf808000u, 0xbf818000u,  // ties
      0x7f7f7fffu, 0x7f7f8000u, 0x7f7effffu, 0x7f7e8000u, 0x7f7fffffu, 0xff7f8000u,  // overflow
      0x00000001u, 0x00008000u, 0x00018000u, 0x00017fffu, 0x007fffffu, 0x807f8000u,  // subnormal
      0x00800000u, 0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u,               // 0, Inf
      0x7fc00000u, 0xffc00001u, 0x7f800001u, 0x7fbfffffu};                           // NaN
  std::vector<float> g(static_cast<size_t>(n));
  const PhiloxKey key{0xb16b00b5u, 0, 0, RngRole::data};
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits = philox_u32(key, static_cast<uint64_t>(i));
    if (i < static_cast<int64_t>(std::size(special))) bits = special[i];
    else if (i % 3 == 1) bits = (bits & 0xffff0000u) | 0x8000u;  // a tie at a random value
    std::memcpy(&g[static_cast<size_t>(i)], &bits, 4);
  }
  // codes random, side channel in range (e in [−7, 7]: nothing masked)
  std::vector<uint8_t> qp(static_cast<size_t>(n / 2)), ep(static_cast<size_t>(n / 2));
  for (int64_t i = 0; i < n / 2; ++i) {
    const uint32_t r = philox_u32(key, static_cast<uint64_t>(n + i));
    qp[i] = static_cast<uint8_t>(r);
    const auto nib = [](uint32_t v) { return static_cast<uint8_t>((v % 15 + 9) & 0xf); };  // −7..7
    ep[i] = static_cast<uint8_t>(nib(r >> 8) | (nib(r >> 16) << 4));
  }
  DeviceBuffer<float> dg(g);
  DeviceBuffer<uint8_t> dq(qp), de(ep);
  DeviceBuffer<bf16_t> out(std::vector<bf16_t>(static_cast<size_t>(n), bf16_t{0x1234}));
  DeviceBuffer<double> partials(cuda::linear_detail::lsq_partials_count(rows, cols, 1));
  cuda::linear_detail::LsqMaskHadamardParams<bf16_t> p;
  p.g_t = dg.get(), p.rows = rows, p.cols = cols, p.block = 1;
  p.q_packed = dq.get(), p.e_packed = de.get(), p.out = out.get(), p.partials = partials.get();
  cuda::linear_detail::lsq_mask_hadamard(p, nullptr);
  NB_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<bf16_t> got = out.download();
  for (int64_t i = 0; i < n; ++i) {
    const float v = g[static_cast<size_t>(i)];
    const uint16_t want = std::isnan(v) ? uint16_t{0x7fff} : f32_to_bf16(v);
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    ASSERT_EQ(got[static_cast<size_t>(i)].bits, want)
        << "element " << i << " fp32 bits 0x" << std::hex << bits;
  }
}

// The fused quantizer's status word. The kernel tests finiteness once, after the transform
// (a NaN/Inf input makes its whole Hadamard block non-finite), and classifies only then, so:
// the first NaN/Inf input wins over the overflows its block shows, an overflow of finite
// inputs is named at its first transformed index, a step that is not positive finite is
// bad_scale 0, and clean input leaves the word clear. Bad values sit in later batches of a
// warp (rows ≥ 16) and in a tile past the first, for the three tilings (J = 1, 1, 4).
template <class T>
void expect_lsq_quantizer_reports(int64_t block, uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "block " << block << (sizeof(T) == 2 ? " bf16" : " f32"));
  const int64_t rows = 144, cols = 2048;
  const auto to_t = [](const std::vector<float>& v) {
    std::vector<T> t(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      if constexpr (sizeof(T) == 2) t[i] = bf16_t{f32_to_bf16(v[i])};
      else t[i] = v[i];
    }
    return t;
  };
  std::vector<float> x = random_activations(rows, cols, seed);
  DeviceBuffer<T> dx(to_t(x));
  DeviceBuffer<float> step(std::vector<float>{0.05f});
  DeviceBuffer<int8_t> q(rows * cols);
  DeviceBuffer<uint8_t> qp(rows * cols / 2), ep(rows * cols / 2);
  DeviceBuffer<uint64_t> st(1);
  cuda::HqLsqQuantizeParams<T> p;
  p.x = dx.get(), p.rows = rows, p.cols = cols, p.block = block, p.step = step.get();
  p.key = PhiloxKey{seed, 1, 0, RngRole::rounding};
  p.q = q.get(), p.q_packed = qp.get(), p.e_packed = ep.get(), p.status = st.get();
  const auto run = [&] {
    cuda::status_clear(st.get(), nullptr);
    cuda::hq_lsq_quantize(p, nullptr);
    NB_CUDA_CHECK(cudaDeviceSynchronize());
    return st.download()[0];
  };
  EXPECT_EQ(run(), cuda::kStatusClear);

  const int64_t i_nan = 130 * cols + 1234, i_inf = 77 * cols + 2047;
  std::vector<float> bad = x;
  bad[static_cast<size_t>(i_nan)] = std::numeric_limits<float>::quiet_NaN();
  bad[static_cast<size_t>(i_inf)] = -std::numeric_limits<float>::infinity();
  dx.upload(to_t(bad));
  EXPECT_EQ(run(), cuda::status_code(cuda::StatusKind::nonfinite, i_inf));
  bad[static_cast<size_t>(i_inf)] = 0.5f;
  dx.upload(to_t(bad));
  EXPECT_EQ(run(), cuda::status_code(cuda::StatusKind::nonfinite, i_nan));

  // a whole block of 3e38 (finite in bf16 too): its first sum overflows, so v at the block's
  // first column is +Inf (the reference's butterfly puts every pair's sum at the lower index)
  bad = x;
  const int64_t b0 = 93 * cols + (cols - block);
  for (int64_t k = 0; k < block; ++k) bad[static_cast<size_t>(b0 + k)] = 3e38f;
  dx.upload(to_t(bad));
  EXPECT_EQ(run(), cuda::status_code(cuda::StatusKind::overflow, b0));

  dx.upload(to_t(x));
  for (const float s : {0.0f, -1.0f, std::numeric_limits<float>::infinity(),
                        std::numeric_limits<float>::quiet_NaN()}) {
    step.upload({s});
    EXPECT_EQ(run(), cuda::status_code(cuda::StatusKind::bad_scale, 0)) << "step " << s;
  }
}

TEST(LinearGpu, LsqQuantizerReportsBadInput) {
  expect_lsq_quantizer_reports<float>(32, 950);
  expect_lsq_quantizer_reports<bf16_t>(32, 951);
  expect_lsq_quantizer_reports<float>(256, 952);
  expect_lsq_quantizer_reports<float>(1024, 953);
}

// db's finalise (the partials come from the bit split): empty extents and missing buffers are
// errors at the boundary (host checks, before any launch).
TEST(LinearGpu, ColumnSumsFinalizeRejectsBadArguments) {
  namespace ld = cuda::linear_detail;
  EXPECT_THROW(ld::column_sums_finalize(nullptr, 0, 16, nullptr, nullptr), Error);
  EXPECT_THROW(ld::column_sums_finalize(nullptr, 4, 0, nullptr, nullptr), Error);
  try {
    ld::column_sums_finalize(nullptr, 4, 16, nullptr, nullptr);
    ADD_FAILURE() << "null partials accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("partials [chunks, cols] is null"), std::string::npos)
        << e.what();
  }
}

TEST(LinearGpu, RejectsShapesThatAreNotMultiplesOf16) {
  DeviceBuffer<float> x(64 * 64), w(64 * 64), s(2);
  DeviceBuffer<int8_t> q(64 * 64);
  DeviceBuffer<bf16_t> y(64 * 64);
  cuda::HqLinearConfig cfg;
  cfg.block = 8;
  auto forward = [&](int64_t n, int64_t d, int64_t c) {
    cuda::HqLinearForwardParams<float> p;
    p.x = x.get();
    p.n = n, p.d = d, p.c = c;
    p.sx = s.get();
    p.sw = s.get() + 1;
    p.w_q = q.get();
    p.x_q = q.get();
    p.y = y.get();
    cuda::hq_linear_forward(p, cfg, PhiloxKey{}, nullptr);
  };
  for (const auto& shape : {std::vector<int64_t>{24, 32, 32}, std::vector<int64_t>{32, 40, 32},
                            std::vector<int64_t>{32, 32, 20}}) {
    try {
      forward(shape[0], shape[1], shape[2]);
      ADD_FAILURE() << "N=" << shape[0] << " D=" << shape[1] << " C=" << shape[2] << " accepted";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("multiples of 16"), std::string::npos) << msg;
      EXPECT_NE(msg.find("pad"), std::string::npos) << msg;
    }
  }
  // A block that does not divide D.
  cfg.block = 64;
  try {
    forward(32, 96, 32);
    ADD_FAILURE() << "block 64 with D = 96 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("dividing D"), std::string::npos) << e.what();
  }
  // The backward and the workspace query apply the same rules.
  EXPECT_THROW(cuda::hq_linear_backward_workspace_bytes(24, 32, 32, cuda::HqLinearConfig{}), Error);
}

}  // namespace
