#include "nibble/ops.h"

#include <cmath>
#include <cstring>

#include "nibble/error.h"
#include "ops/float_input.h"
#include "ref/gemm.h"
#include "ref/hadamard.h"
#include "ref/quant.h"

namespace nibble::ops {

using detail::to_f32;
namespace {

void check_2d(const TensorView& t, const char* what) {
  NB_CHECK(t.dim() == 2, what << " must be 2-D [rows, cols], got " << t.describe());
  check_cpu_contiguous(t, what);
}


Shape scale_shape(const QuantSpec& spec, int64_t rows, int64_t cols) {
  switch (spec.granularity) {
    case Granularity::tensor: return {1};
    case Granularity::row: return {rows};
    case Granularity::column: return {cols};
    case Granularity::group:
      NB_CHECK(spec.group > 0 && cols % spec.group == 0,
               "group size " << spec.group << " must be positive and divide the " << cols
                             << " columns");
      return {rows, cols / spec.group};
  }
  NB_FAIL("unknown granularity");
}

}  // namespace

Quantized quantize(const TensorView& x, const QuantSpec& spec, const PhiloxKey& key) {
  NB_CHECK(x.dim() == 2, "quantize: x must be 2-D [rows, cols], got " << x.describe());
  NB_CHECK(spec.range.qmin < spec.range.qmax && spec.range.qmin >= -128 && spec.range.qmax <= 127,
           "code range [" << spec.range.qmin << ", " << spec.range.qmax
                          << "] does not fit an s8 container; use e.g. [-7, 7], [-8, 7] or [0, 15]");
  const Tensor xf = to_f32(x, "quantize: x");
  const int64_t rows = x.size(0), cols = x.size(1);
  Quantized q;
  q.codes = Tensor::empty({rows, cols}, DType::s8);
  q.scale = Tensor::empty(scale_shape(spec, rows, cols), DType::f32);
  if (spec.asymmetric) q.zero_point = Tensor::empty(q.scale.shape(), DType::s32);
  int32_t* zp = spec.asymmetric ? q.zero_point.data<int32_t>() : nullptr;
  ref::compute_scales(xf.data<float>(), rows, cols, spec.granularity, spec.group, spec.range,
                      spec.asymmetric, q.scale.data<float>(), zp);
  ref::quantize(xf.data<float>(), rows, cols, spec.granularity, spec.group, q.scale.data<float>(),
                zp, spec.range, spec.rounding, key, q.codes.data<int8_t>());
  return q;
}

Tensor dequantize(const Quantized& q, const QuantSpec& spec) {
  check_2d(q.codes, "dequantize: codes");
  check_dtype(q.codes, DType::s8, "dequantize: codes");
  const int64_t rows = q.codes.size(0), cols = q.codes.size(1);
  check_shape(q.scale, scale_shape(spec, rows, cols), "dequantize: scale");
  check_dtype(q.scale, DType::f32, "dequantize: scale");
  if (spec.asymmetric) {
    check_shape(q.zero_point, q.scale.shape(), "dequantize: zero_point");
    check_dtype(q.zero_point, DType::s32, "dequantize: zero_point");
  }
  Tensor out = Tensor::empty({rows, cols}, DType::f32);
  ref::dequantize(q.codes.data<int8_t>(), rows, cols, spec.granularity, spec.group,
                  q.scale.data<float>(), spec.asymmetric ? q.zero_point.data<int32_t>() : nullptr,
                  out.data<float>());
  return out;
}

Tensor pack_s4(const TensorView& codes) {
  check_2d(codes, "pack_s4: codes");
  check_dtype(codes, DType::s8, "pack_s4: codes");
  Tensor out = Tensor::empty(codes.shape, DType::s4);
  ref::pack_s4_rows(codes.ptr<int8_t>(), codes.size(0), codes.size(1), out.data<uint8_t>());
  return out;
}

Tensor unpack_s4(const TensorView& packed) {
  check_2d(packed, "unpack_s4: packed");
  check_dtype(packed, DType::s4, "unpack_s4: packed");
  Tensor out = Tensor::empty(packed.shape, DType::s8);
  ref::unpack_s4_rows(packed.ptr<uint8_t>(), packed.size(0), packed.size(1), out.data<int8_t>());
  return out;
}

double sqnr_db(const TensorView& x, const TensorView& x_hat) {
  NB_CHECK(x.shape == x_hat.shape, "sqnr_db: shapes differ: " << x.describe() << " vs "
                                                              << x_hat.describe());
  const Tensor a = to_f32(x, "sqnr_db: x"), b = to_f32(x_hat, "sqnr_db: x_hat");
  return ref::sqnr_db(a.data<float>(), b.data<float>(), a.numel());
}

Tensor hadamard(const TensorView& x, int64_t block) {
  NB_CHECK(x.dim() == 2, "hadamard: x must be 2-D [rows, cols], got " << x.describe());
  const Tensor xf = to_f32(x, "hadamard: x");
  Tensor out = Tensor::empty(x.shape, DType::f32);
  std::memcpy(out.data<float>(), xf.data<float>(), out.nbytes());
  ref::hadamard_blocks(out.data<float>(), x.size(0), x.size(1), block);
  return out;
}

Tensor gemm_tn(const TensorView& a, const TensorView& b) {
  check_2d(a, "gemm_tn: A");
  check_2d(b, "gemm_tn: B");
  NB_CHECK(a.size(1) == b.size(1), "gemm_tn: A is " << a.describe() << " and B is " << b.describe()
                                                    << "; both must be [*, K] with the same K "
                                                       "(C = A·Bᵀ, TN layout)");
  auto int_operand = [](DType dt) { return dt == DType::s8 || dt == DType::s4; };
  NB_CHECK(int_operand(a.dtype) && int_operand(b.dtype),
           "gemm_tn: operands must be s8 or packed s4, got " << dtype_name(a.dtype) << " and "
                                                             << dtype_name(b.dtype));
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  Tensor c = Tensor::empty({m, n}, DType::s32);
  int32_t* out = c.data<int32_t>();
  if (a.dtype == DType::s8 && b.dtype == DType::s8) {
    ref::gemm_s8s8_s32_tn(a.ptr<int8_t>(), b.ptr<int8_t>(), m, n, k, out);
  } else if (a.dtype == DType::s4 && b.dtype == DType::s4) {
    ref::gemm_s4s4_s32_tn(a.ptr<uint8_t>(), b.ptr<uint8_t>(), m, n, k, out);
  } else if (a.dtype == DType::s8 && b.dtype == DType::s4) {
    ref::gemm_s8s4_s32_tn(a.ptr<int8_t>(), b.ptr<uint8_t>(), m, n, k, out);
  } else {
    NB_FAIL("gemm_tn: s4 × s8 is not provided; swap the operands (Cᵀ = B·Aᵀ) to use s8 × s4");
  }
  return c;
}

}  // namespace nibble::ops
