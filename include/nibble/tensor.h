#pragma once
// TensorView: a non-owning view {data, dtype, shape, strides, device}.
// Tensor: an owning, contiguous tensor (row-major) that hands out views.
// Strides are in elements; for packed s4 only contiguous rows are supported and the
// last dimension is the packed one (a row of K codes takes ceil(K/2) bytes).
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "nibble/dtype.h"

namespace nibble {

enum class Device : uint8_t { cpu, cuda };

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);
// Bytes a contiguous tensor of this dtype and shape occupies. Packed s4 packs each row
// (last dimension) on its own: rows·ceil(cols/2) bytes, so an odd row ends on a half byte.
size_t storage_bytes(DType dt, const Shape& shape);

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  Shape shape;
  Shape strides;  // elements; empty means contiguous row-major
  Device device = Device::cpu;

  int64_t dim() const { return static_cast<int64_t>(shape.size()); }
  int64_t numel() const { return shape_numel(shape); }
  int64_t size(int64_t i) const;  // negative i counts from the end
  bool is_contiguous() const;
  template <class T> T* ptr() const { return static_cast<T*>(data); }
  std::string describe() const;  // "f32[128, 64] (cpu)" for error messages
};

class Tensor {
 public:
  Tensor() = default;
  static Tensor empty(Shape shape, DType dtype, Device device = Device::cpu);
  static Tensor zeros(Shape shape, DType dtype, Device device = Device::cpu);
  // Wraps caller-owned memory; the caller keeps it alive.
  static Tensor borrow(const TensorView& v);

  TensorView view() const { return view_; }
  operator TensorView() const { return view_; }
  const Shape& shape() const { return view_.shape; }
  DType dtype() const { return view_.dtype; }
  int64_t numel() const { return view_.numel(); }
  int64_t size(int64_t i) const { return view_.size(i); }
  size_t nbytes() const { return storage_bytes(view_.dtype, view_.shape); }
  bool defined() const { return view_.data != nullptr || view_.numel() == 0; }
  template <class T> T* data() const { return static_cast<T*>(view_.data); }
  // Same storage, new shape with the same element count.
  Tensor reshape(Shape shape) const;

 private:
  std::shared_ptr<void> storage_;
  TensorView view_;
};

// Argument checks used at op boundaries; each throws nibble::Error naming `what`.
void check_shape(const TensorView& t, const Shape& expected, const char* what);
void check_dtype(const TensorView& t, DType expected, const char* what);
void check_cpu_contiguous(const TensorView& t, const char* what);
// Throws if any element of a float tensor is NaN or Inf (names the first bad index).
void check_finite(const TensorView& t, const char* what);

}  // namespace nibble
