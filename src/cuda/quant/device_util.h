#pragma once
// Device helpers of the quantization kernels (included by src/cuda/quant/*.cu only).
//
// Every float operation that decides a code is written as an explicit IEEE intrinsic
// (__fadd_rn, __fmul_rn, __fdiv_rn, ...): they are never contracted into FMAs nor turned into
// reciprocal multiplies, whatever the compiler flags, so each one rounds exactly like the
// matching fp32 operation of the CPU reference.
#if !defined(__CUDACC__)
#error "cuda/quant/device_util.h is for CUDA translation units"
#endif

#include <cstdint>

#include "cuda/quant/status.h"
#include "nibble/dtype.h"
#include "nibble/format.h"
#include "nibble/rng.h"

namespace nibble::cuda::detail {

constexpr unsigned kFullMask = 0xffffffffu;

// Exact widening to fp32: a bf16 is the upper half of an fp32 (NaN stays NaN).
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16_t v) {
  return __uint_as_float(static_cast<uint32_t>(v.bits) << 16);
}

// Records a problem in the optional status word (status.h); the lowest code wins.
__device__ __forceinline__ void report(uint64_t* status, StatusKind kind, uint64_t index) {
  if (status != nullptr) {
    // status_code(kind, index), spelled out: status.h is a host header
    const uint64_t code =
        (static_cast<uint64_t>(kind) << kStatusKindShift) | (index & kStatusIndexMask);
    atomicMin(reinterpret_cast<unsigned long long*>(status), static_cast<unsigned long long>(code));
  }
}

__device__ __forceinline__ bool is_finite(float v) { return isfinite(v); }

// Warp reductions (butterfly: every lane ends with the result). min/max are exact; the
// integer sum is exact; the double sum has a fixed order, so it is deterministic.
__device__ __forceinline__ float warp_min(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
__device__ __forceinline__ long long warp_sum(long long v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v = __dadd_rn(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// rint(v) saturated to the int32 range, as ref::round_code: the clamp happens in fp32
// (2147483520 = largest fp32 below 2^31), so the conversion is always defined.
__device__ __forceinline__ int32_t float_to_int32_saturated(float r) {
  r = fminf(fmaxf(r, -2147483648.0f), 2147483520.0f);
  return static_cast<int32_t>(r);
}

// Round v to an integer: halves to even, or floor(v + u) with u = philox_uniform(key, index)
// (one fp32 addition, then floor) — ref::round_code without the finiteness check.
__device__ __forceinline__ int32_t round_code(float v, Rounding mode, const PhiloxKey& key,
                                              uint64_t index) {
  const float r = mode == Rounding::nearest ? rintf(v)
                                            : floorf(__fadd_rn(v, philox_uniform(key, index)));
  return float_to_int32_saturated(r);
}

// q = clamp(round(x / s) + zp, qmin, qmax): one IEEE division, int64 so saturation cannot wrap.
__device__ __forceinline__ int8_t quantize_code(float x, float s, int32_t zp, QRange range,
                                                Rounding mode, const PhiloxKey& key,
                                                uint64_t index) {
  long long code = round_code(__fdiv_rn(x, s), mode, key, index);
  code += zp;
  code = code < range.qmin ? range.qmin : (code > range.qmax ? range.qmax : code);
  return static_cast<int8_t>(code);
}

}  // namespace nibble::cuda::detail
