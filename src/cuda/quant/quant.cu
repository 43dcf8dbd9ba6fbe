// Per-row / per-column scales, quantizer and s4 packing on the GPU (twins of ref/quant.cpp).
//   row scales:    one warp per row (8 rows per thread block): min/max by warp reduction,
//                  then the row's codes from the same warp.
//   column scales: a 32 × 8 thread block per 32 columns: lane x owns a column, the 8 y-lanes
//                  stride the rows; min/max combined through shared memory.
//   quantize / pack / unpack: element-wise grid-stride loops.
#include "cuda/common/check.h"
#include "cuda/quant/device_util.h"
#include "cuda/quant/launch_checks.h"
#include "cuda/quant/quant.h"

namespace nibble::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;  // row kernel: one warp per row
constexpr int kColTile = 32;                  // column kernel: 32 columns × 8 row lanes
constexpr int kColLanes = 8;

// Scale and zero point of one slice from its min (≤ 0) and max (≥ 0), ref::slice_scale's
// order: asymmetric s = (max − min) / (qmax − qmin), zp = qmin − rint(min / s); symmetric
// s = max(−min, max) / qmax; s = 0 becomes 1. Returns false when s overflowed fp32.
__device__ __forceinline__ bool slice_scale(float lo, float hi, QRange range, bool asymmetric,
                                            float& s, int32_t& zp) {
  if (asymmetric) {
    s = __fdiv_rn(__fsub_rn(hi, lo), static_cast<float>(range.qmax - range.qmin));
  } else {
    s = __fdiv_rn(fmaxf(-lo, hi), static_cast<float>(range.qmax));
  }
  if (s == 0.0f) s = 1.0f;
  zp = 0;
  if (asymmetric) {
    zp = range.qmin - detail::float_to_int32_saturated(rintf(__fdiv_rn(lo, s)));
  }
  return detail::is_finite(s);
}

template <class T>
__global__ void __launch_bounds__(kThreads) row_scales_kernel(ScaleParams<T> p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= p.rows) return;  // whole warp
  const T* xr = p.x + row * p.cols;
  // running min/max start at 0: min is clamped ≤ 0 and max ≥ 0 anyway
  float lo = 0.0f, hi = 0.0f;
  for (int64_t c = lane; c < p.cols; c += 32) {
    const float v = detail::to_f32(xr[c]);
    if (detail::is_finite(v)) {
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    } else {
      detail::report(p.status, StatusKind::nonfinite, static_cast<uint64_t>(row * p.cols + c));
    }
  }
  lo = detail::warp_min(lo);
  hi = detail::warp_max(hi);
  float s;
  int32_t zp;
  const bool ok = slice_scale(lo, hi, p.range, p.asymmetric, s, zp);
  if (lane == 0) {
    if (!ok) detail::report(p.status, StatusKind::bad_scale, static_cast<uint64_t>(row));
    p.scale[row] = s;
    if (p.asymmetric) p.zero_point[row] = zp;
  }
  if (p.q == nullptr) return;
  int8_t* qr = p.q + row * p.cols;
  for (int64_t c = lane; c < p.cols; c += 32) {
    qr[c] = detail::quantize_code(detail::to_f32(xr[c]), s, zp, p.range, p.rounding, p.key,
                                  static_cast<uint64_t>(row * p.cols + c));
  }
}

template <class T>
__global__ void __launch_bounds__(kColTile * kColLanes) column_scales_kernel(ScaleParams<T> p) {
  __shared__ float lo_sh[kColLanes][kColTile];
  __shared__ float hi_sh[kColLanes][kColTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  const bool active = c < p.cols;
  float lo = 0.0f, hi = 0.0f;
  if (active) {
    for (int64_t r = ty; r < p.rows; r += kColLanes) {
      const float v = detail::to_f32(p.x[r * p.cols + c]);
      if (detail::is_finite(v)) {
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
      } else {
        detail::report(p.status, StatusKind::nonfinite, static_cast<uint64_t>(r * p.cols + c));
      }
    }
  }
  lo_sh[ty][tx] = lo;
  hi_sh[ty][tx] = hi;
  __syncthreads();
  // min/max are exact, so every thread can fold the 8 partials of its column itself.
  for (int y = 0; y < kColLanes; ++y) {
    lo = fminf(lo, lo_sh[y][tx]);
    hi = fmaxf(hi, hi_sh[y][tx]);
  }
  if (!active) return;
  float s;
  int32_t zp;
  const bool ok = slice_scale(lo, hi, p.range, p.asymmetric, s, zp);
  if (ty == 0) {
    if (!ok) detail::report(p.status, StatusKind::bad_scale, static_cast<uint64_t>(c));
    p.scale[c] = s;
    if (p.asymmetric) p.zero_point[c] = zp;
  }
  if (p.q == nullptr) return;
  for (int64_t r = ty; r < p.rows; r += kColLanes) {
    const int64_t i = r * p.cols + c;
    p.q[i] = detail::quantize_code(detail::to_f32(p.x[i]), s, zp, p.range, p.rounding, p.key,
                                   static_cast<uint64_t>(i));
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) quantize_kernel(QuantizeParams<T> p) {
  const int64_t n = p.rows * p.cols;
  const int64_t groups = p.granularity == Granularity::group ? p.cols / p.group : 1;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = i / p.cols, c = i % p.cols;
    int64_t si = 0;  // scale index, ref::scale_index
    switch (p.granularity) {
      case Granularity::tensor: si = 0; break;
      case Granularity::row: si = r; break;
      case Granularity::column: si = c; break;
      case Granularity::group: si = r * groups + c / p.group; break;
    }
    const float s = p.scale[si];
    if (!(s > 0.0f && detail::is_finite(s))) {
      detail::report(p.status, StatusKind::bad_scale, static_cast<uint64_t>(si));
    }
    const float v = detail::to_f32(p.x[i]);
    if (!detail::is_finite(v)) {
      detail::report(p.status, StatusKind::nonfinite, static_cast<uint64_t>(i));
    }
    const int32_t zp = p.zero_point != nullptr ? p.zero_point[si] : 0;
    p.q[i] = detail::quantize_code(v, s, zp, p.range, p.rounding, p.key, static_cast<uint64_t>(i));
  }
}

__global__ void __launch_bounds__(kThreads) pack_s4_rows_kernel(PackS4Params p) {
  const int64_t row_bytes = (p.cols + 1) / 2;
  const int64_t n = p.rows * row_bytes;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = i / row_bytes, b = i % row_bytes;
    const int64_t e = r * p.cols + 2 * b;  // flat index of the even element
    const int32_t even = p.q[e];
    const int32_t odd = 2 * b + 1 < p.cols ? p.q[e + 1] : 0;
    if (even < -8 || even > 7) detail::report(p.status, StatusKind::out_of_range, e);
    if (odd < -8 || odd > 7) detail::report(p.status, StatusKind::out_of_range, e + 1);
    // byte = q[2b] in bits 0-3, q[2b+1] in bits 4-7 (two's complement nibbles)
    p.packed[i] = static_cast<uint8_t>((static_cast<uint32_t>(even) & 0xFu) |
                                       ((static_cast<uint32_t>(odd) & 0xFu) << 4));
  }
}

__global__ void __launch_bounds__(kThreads) unpack_s4_rows_kernel(UnpackS4Params p) {
  const int64_t row_bytes = (p.cols + 1) / 2;
  const int64_t n = p.rows * p.cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = i / p.cols, c = i % p.cols;
    const uint8_t b = p.packed[r * row_bytes + c / 2];
    // sign extension: low (int8)(b << 4) >> 4, high (int8)b >> 4
    const int32_t v = (c % 2 == 0) ? (static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4)
                                   : (static_cast<int8_t>(b) >> 4);
    p.q[i] = static_cast<int8_t>(v);
  }
}

// ---- host side ------------------------------------------------------------------------------

unsigned grid_stride_blocks(int64_t n) {
  const int64_t blocks = detail::ceil_div(n, kThreads);
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // enough to fill any GPU; the loop does the rest
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

template <class T>
void compute_scales_impl(const ScaleParams<T>& p, cudaStream_t stream) {
  const char* fn = "cuda::compute_scales";
  detail::check_shape(p.rows, p.cols, fn);
  detail::check_range_s8(p.range, fn);
  NB_CHECK(p.granularity == Granularity::row || p.granularity == Granularity::column,
           fn << ": the GPU computes row (per-token / per-output-channel) and column "
              << "(per-input-channel) scales; use Granularity::row or ::column, or "
              << "ref::compute_scales for tensor and group scales");
  NB_CHECK(p.asymmetric || p.range.qmax > 0,
           fn << ": symmetric scales need qmax > 0, got range [" << p.range.qmin << ", "
              << p.range.qmax << "]; use a signed range such as [-7, 7] or set asymmetric");
  const bool per_row = p.granularity == Granularity::row;
  const int64_t n_scales = per_row ? p.rows : p.cols;
  const int64_t n = p.rows * p.cols;
  detail::check_device_pointer(p.x, n, fn, "x");
  detail::check_device_pointer(p.scale, n_scales, fn, "scale");
  if (p.asymmetric) detail::check_device_pointer(p.zero_point, n_scales, fn, "zero_point");
  if (p.q != nullptr) detail::check_device_pointer(p.q, n, fn, "q");
  if (p.status != nullptr) detail::check_device_pointer(p.status, 1, fn, "status");
  if (n_scales == 0) return;
  if (per_row) {
    const int64_t blocks = detail::ceil_div(p.rows, kRowsPerBlock);
    detail::check_grid_extent(blocks, fn, "the row tiling");
    row_scales_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  } else {
    const int64_t blocks = detail::ceil_div(p.cols, kColTile);
    detail::check_grid_extent(blocks, fn, "the column tiling");
    column_scales_kernel<T><<<static_cast<unsigned>(blocks), dim3(kColTile, kColLanes), 0, stream>>>(p);
  }
  NB_CUDA_CHECK_LAUNCH();
}

template <class T>
void quantize_impl(const QuantizeParams<T>& p, cudaStream_t stream) {
  const char* fn = "cuda::quantize";
  detail::check_shape(p.rows, p.cols, fn);
  detail::check_range_s8(p.range, fn);
  int64_t n_scales = 1;
  switch (p.granularity) {
    case Granularity::tensor: n_scales = 1; break;
    case Granularity::row: n_scales = p.rows; break;
    case Granularity::column: n_scales = p.cols; break;
    case Granularity::group:
      NB_CHECK(p.group >= 1 && p.cols % p.group == 0,
               fn << ": group size " << p.group << " does not divide the row length (cols = "
                  << p.cols << "); pick a group that divides cols, e.g. 32 or 64 for K = 4096");
      n_scales = p.rows * (p.cols / p.group);
      break;
  }
  const int64_t n = p.rows * p.cols;
  detail::check_device_pointer(p.x, n, fn, "x");
  detail::check_device_pointer(p.q, n, fn, "q");
  if (n == 0) return;
  detail::check_device_pointer(p.scale, n_scales, fn, "scale");
  if (p.zero_point != nullptr) detail::check_device_pointer(p.zero_point, n_scales, fn, "zero_point");
  if (p.status != nullptr) detail::check_device_pointer(p.status, 1, fn, "status");
  quantize_kernel<T><<<grid_stride_blocks(n), kThreads, 0, stream>>>(p);
  NB_CUDA_CHECK_LAUNCH();
}

}  // namespace

void compute_scales(const ScaleParams<float>& p, cudaStream_t stream) {
  compute_scales_impl(p, stream);
}
void compute_scales(const ScaleParams<bf16_t>& p, cudaStream_t stream) {
  compute_scales_impl(p, stream);
}
void quantize(const QuantizeParams<float>& p, cudaStream_t stream) { quantize_impl(p, stream); }
void quantize(const QuantizeParams<bf16_t>& p, cudaStream_t stream) { quantize_impl(p, stream); }

void pack_s4_rows(const PackS4Params& p, cudaStream_t stream) {
  const char* fn = "cuda::pack_s4_rows";
  detail::check_shape(p.rows, p.cols, fn);
  const int64_t bytes = p.rows * ((p.cols + 1) / 2);
  detail::check_device_pointer(p.q, p.rows * p.cols, fn, "q");
  detail::check_device_pointer(p.packed, bytes, fn, "packed");
  if (p.status != nullptr) detail::check_device_pointer(p.status, 1, fn, "status");
  if (bytes == 0) return;
  pack_s4_rows_kernel<<<grid_stride_blocks(bytes), kThreads, 0, stream>>>(p);
  NB_CUDA_CHECK_LAUNCH();
}

void unpack_s4_rows(const UnpackS4Params& p, cudaStream_t stream) {
  const char* fn = "cuda::unpack_s4_rows";
  detail::check_shape(p.rows, p.cols, fn);
  const int64_t n = p.rows * p.cols;
  detail::check_device_pointer(p.packed, p.rows * ((p.cols + 1) / 2), fn, "packed");
  detail::check_device_pointer(p.q, n, fn, "q");
  if (n == 0) return;
  unpack_s4_rows_kernel<<<grid_stride_blocks(n), kThreads, 0, stream>>>(p);
  NB_CUDA_CHECK_LAUNCH();
}

}  // namespace nibble::cuda
