#include "ops/float_input.h"

#include "nibble/error.h"

namespace nibble::ops::detail {

// Float input of any supported dtype -> contiguous f32 copy (or a borrow when already f32).
Tensor to_f32(const TensorView& x, const char* what) {
  check_cpu_contiguous(x, what);
  NB_CHECK(is_float(x.dtype), what << " must be a float tensor (f32, f16, bf16 or f64), got "
                                   << x.describe());
  check_finite(x, what);
  if (x.dtype == DType::f32) return Tensor::borrow(x);
  Tensor out = Tensor::empty(x.shape, DType::f32);
  float* o = out.data<float>();
  const int64_t n = x.numel();
  for (int64_t i = 0; i < n; ++i) {
    switch (x.dtype) {
      case DType::f16: o[i] = f16_to_f32(x.ptr<uint16_t>()[i]); break;
      case DType::bf16: o[i] = bf16_to_f32(x.ptr<uint16_t>()[i]); break;
      case DType::f64: o[i] = static_cast<float>(x.ptr<double>()[i]); break;
      default: break;
    }
  }
  return out;
}

}  // namespace nibble::ops::detail
