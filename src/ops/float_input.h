#pragma once
// Shared by the op wrappers: the argument conversion every float-taking op does first.
#include "nibble/tensor.h"

namespace nibble::ops::detail {

// Float input of any supported dtype (f32, f16, bf16, f64) -> contiguous f32, a borrow when
// already f32. Throws nibble::Error naming `what` for a non-float, non-contiguous or
// non-finite input.
Tensor to_f32(const TensorView& x, const char* what);

}  // namespace nibble::ops::detail
