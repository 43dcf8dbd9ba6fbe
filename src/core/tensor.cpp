#include "nibble/tensor.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "nibble/error.h"

namespace nibble {

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

size_t storage_bytes(DType dt, const Shape& shape) {
  if (dt != DType::s4 || shape.empty()) return storage_bytes(dt, shape_numel(shape));
  const int64_t cols = shape.back();
  const int64_t rows = cols > 0 ? shape_numel(shape) / cols : 0;
  return static_cast<size_t>(rows) * storage_bytes(DType::s4, cols);
}

int64_t TensorView::size(int64_t i) const {
  const int64_t d = dim();
  if (i < 0) i += d;
  NB_CHECK(i >= 0 && i < d, "dimension " << i << " out of range for " << describe());
  return shape[static_cast<size_t>(i)];
}

bool TensorView::is_contiguous() const {
  if (strides.empty()) return true;
  int64_t expect = 1;
  for (int64_t i = dim() - 1; i >= 0; --i) {
    const auto iu = static_cast<size_t>(i);
    if (shape[iu] != 1 && strides[iu] != expect) return false;
    expect *= shape[iu];
  }
  return true;
}

std::string TensorView::describe() const {
  std::ostringstream os;
  os << dtype_name(dtype) << shape_str(shape) << " (" << (device == Device::cpu ? "cpu" : "cuda")
     << ")";
  return os.str();
}

Tensor Tensor::empty(Shape shape, DType dtype, Device device) {
  for (int64_t d : shape)
    NB_CHECK(d >= 0, "negative size in shape " << shape_str(shape));
  NB_CHECK(device == Device::cpu,
           "Tensor::empty on cuda needs the CUDA backend; allocate through nibble::cuda");
  Tensor t;
  t.view_.dtype = dtype;
  t.view_.shape = std::move(shape);
  t.view_.device = device;
  // 64-byte alignment for SIMD loads; at least one byte so data() is never null.
  const size_t bytes = (storage_bytes(dtype, t.view_.shape) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes ? bytes : 64);
  NB_CHECK(p != nullptr, "out of host memory allocating " << bytes << " bytes for "
                                                          << t.view_.describe());
  t.storage_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  t.view_.data = p;
  return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype, Device device) {
  Tensor t = empty(std::move(shape), dtype, device);
  std::memset(t.view_.data, 0, t.nbytes());
  return t;
}

Tensor Tensor::borrow(const TensorView& v) {
  Tensor t;
  t.view_ = v;
  return t;
}

Tensor Tensor::reshape(Shape shape) const {
  NB_CHECK(shape_numel(shape) == numel(), "cannot reshape " << view_.describe() << " to "
                                                            << shape_str(shape));
  NB_CHECK(view_.is_contiguous(), "reshape needs a contiguous tensor, got " << view_.describe());
  Tensor t = *this;
  t.view_.shape = std::move(shape);
  t.view_.strides.clear();
  return t;
}

void check_shape(const TensorView& t, const Shape& expected, const char* what) {
  NB_CHECK(t.shape == expected, what << " has shape " << shape_str(t.shape) << ", expected "
                                     << shape_str(expected));
}

void check_dtype(const TensorView& t, DType expected, const char* what) {
  NB_CHECK(t.dtype == expected, what << " has dtype " << dtype_name(t.dtype) << ", expected "
                                     << dtype_name(expected));
}

void check_cpu_contiguous(const TensorView& t, const char* what) {
  NB_CHECK(t.device == Device::cpu, what << " is on the GPU; this op runs on the CPU backend");
  NB_CHECK(t.is_contiguous(), what << " must be contiguous (row-major), got " << t.describe());
}

void check_finite(const TensorView& t, const char* what) {
  if (!is_float(t.dtype)) return;
  check_cpu_contiguous(t, what);
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    double v = 0;
    switch (t.dtype) {
      case DType::f64: v = t.ptr<double>()[i]; break;
      case DType::f32: v = t.ptr<float>()[i]; break;
      case DType::f16: v = f16_to_f32(t.ptr<uint16_t>()[i]); break;
      case DType::bf16: v = bf16_to_f32(t.ptr<uint16_t>()[i]); break;
      default: break;
    }
    NB_CHECK(std::isfinite(v), what << " contains " << (std::isnan(v) ? "NaN" : "Inf")
                                    << " at flat index " << i << " of " << t.describe()
                                    << "; clean or clip the input before quantizing");
  }
}

}  // namespace nibble
