// The validating op layer: argument checks, dtype widening, and routing to the reference.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <string>

#include "common/random.h"
#include "nibble/error.h"
#include "nibble/ops.h"
#include "ref/gemm.h"

using namespace nibble;

namespace {

Tensor f32_tensor(int64_t rows, int64_t cols, uint64_t seed) {
  Tensor t = Tensor::empty({rows, cols}, DType::f32);
  const auto v = nibble::testing::randn(rows * cols, seed);
  std::memcpy(t.data<float>(), v.data(), t.nbytes());
  return t;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Ops, QuantizeWidensHalfPrecisionExactly) {
  Tensor x = f32_tensor(7, 33, 1);
  Tensor xh = Tensor::empty({7, 33}, DType::bf16);
  for (int64_t i = 0; i < x.numel(); ++i) {
    xh.data<uint16_t>()[i] = f32_to_bf16(x.data<float>()[i]);
    x.data<float>()[i] = bf16_to_f32(xh.data<uint16_t>()[i]);  // the exactly widened values
  }
  ops::QuantSpec spec;
  const ops::Quantized a = ops::quantize(x, spec), b = ops::quantize(xh, spec);
  ASSERT_EQ(a.codes.nbytes(), b.codes.nbytes());
  EXPECT_EQ(std::memcmp(a.codes.data<int8_t>(), b.codes.data<int8_t>(), a.codes.nbytes()), 0);
  const Tensor x_hat = ops::dequantize(a, spec);
  // Per-row INT4 of Gaussian rows: roughly 15-20 dB.
  EXPECT_GT(ops::sqnr_db(x, x_hat), 12.0);
}

TEST(Ops, AsymmetricAndGroupScalesHaveTheDocumentedShapes) {
  const Tensor x = f32_tensor(6, 64, 2);
  ops::QuantSpec spec;
  spec.granularity = Granularity::group;
  spec.group = 16;
  spec.asymmetric = true;
  spec.range = kUint4;
  const ops::Quantized q = ops::quantize(x, spec);
  EXPECT_EQ(q.scale.shape(), (Shape{6, 4}));
  EXPECT_EQ(q.zero_point.shape(), (Shape{6, 4}));
  spec.group = 24;
  EXPECT_NE(error_of([&] { ops::quantize(x, spec); }).find("divide"), std::string::npos);
}

TEST(Ops, PackedGemmMatchesUnpackedGemm) {
  const int64_t m = 9, n = 5, k = 37;  // odd K: each packed row ends on a half byte
  Tensor a = Tensor::empty({m, k}, DType::s8), b = Tensor::empty({n, k}, DType::s8);
  const auto av = nibble::testing::randint8(m * k, 3, -8, 7), bv = nibble::testing::randint8(n * k, 4, -8, 7);
  std::memcpy(a.data<int8_t>(), av.data(), av.size());
  std::memcpy(b.data<int8_t>(), bv.data(), bv.size());
  const Tensor ap = ops::pack_s4(a), bp = ops::pack_s4(b);
  EXPECT_EQ(ap.nbytes(), static_cast<size_t>(m * ((k + 1) / 2)));
  const Tensor c8 = ops::gemm_tn(a, b), c4 = ops::gemm_tn(ap, bp), c84 = ops::gemm_tn(a, bp);
  EXPECT_EQ(std::memcmp(c8.data<int32_t>(), c4.data<int32_t>(), c8.nbytes()), 0);
  EXPECT_EQ(std::memcmp(c8.data<int32_t>(), c84.data<int32_t>(), c8.nbytes()), 0);
  const Tensor back = ops::unpack_s4(ap);
  EXPECT_EQ(std::memcmp(back.data<int8_t>(), a.data<int8_t>(), a.nbytes()), 0);
}

TEST(Ops, RejectsBadInputWithClearMessages) {
  Tensor x = f32_tensor(4, 48, 5);
  EXPECT_NE(error_of([&] { ops::hadamard(x, 32); }).find("32"), std::string::npos);
  EXPECT_NE(error_of([&] { ops::hadamard(x, 24); }).find("power of two"), std::string::npos);
  Tensor a = Tensor::zeros({3, 16}, DType::s8), b = Tensor::zeros({3, 15}, DType::s8);
  EXPECT_NE(error_of([&] { ops::gemm_tn(a, b); }).find("same K"), std::string::npos);
  EXPECT_NE(error_of([&] { ops::gemm_tn(x, x); }).find("s8 or packed s4"), std::string::npos);
  const Tensor ap = ops::pack_s4(Tensor::zeros({3, 16}, DType::s8));
  EXPECT_NE(error_of([&] { ops::gemm_tn(ap, Tensor::zeros({3, 16}, DType::s8)); }).find("swap"), std::string::npos);
  x.data<float>()[17] = INFINITY;
  EXPECT_NE(error_of([&] { ops::quantize(x, ops::QuantSpec{}); }).find("Inf"), std::string::npos);
  Tensor three_d = Tensor::zeros({2, 2, 2}, DType::f32);
  EXPECT_NE(error_of([&] { ops::quantize(three_d, ops::QuantSpec{}); }).find("2-D"), std::string::npos);
  Tensor codes = Tensor::zeros({2, 4}, DType::s8);
  codes.data<int8_t>()[3] = 9;
  EXPECT_NE(error_of([&] { ops::pack_s4(codes); }).find("-8, 7"), std::string::npos);
}
