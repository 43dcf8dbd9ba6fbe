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

// 8 consecutive elements as raw words, one 16-byte read-only load per 16 bytes (the source is
// not written during the kernel; the caller guarantees 16-byte alignment), widened exactly to
// fp32 by widen8 (the 8-column lanes of the fused passes).
template <class T>
constexpr int kRawWords = 8 * static_cast<int>(sizeof(T)) / 4;  // 4 (bf16) or 8 (f32)

template <class T>
__device__ __forceinline__ void load_raw8(const T* p, uint32_t (&w)[kRawWords<T>]) {
#pragma unroll
  for (int h = 0; h < kRawWords<T> / 4; ++h) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + h);
    w[4 * h] = v.x, w[4 * h + 1] = v.y, w[4 * h + 2] = v.z, w[4 * h + 3] = v.w;
  }
}
__device__ __forceinline__ void widen8(const uint32_t (&w)[4], float (&out)[8]) {  // bf16
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // little endian: the even element in the low half
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void widen8(const uint32_t (&w)[8], float (&out)[8]) {  // f32
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = __uint_as_float(w[i]);
}

// Packed s4 of 8 elements (element 2i in the low nibble of byte i, 2i + 1 in the high one)
// from the words even = (elements 0, 2, 4, 6) and odd = (1, 3, 5, 7), one element per byte,
// each element's nibble in its byte's low 4 bits.
__device__ __forceinline__ uint32_t pack_nibbles8(uint32_t even, uint32_t odd) {
  return (even & 0x0f0f0f0fu) | ((odd << 4) & 0xf0f0f0f0u);
}

// Bytes `sel` (a __byte_perm index, 0..3) of x[0], x[2], x[4], x[6] and of x[1], x[3], ...
// as the words even, odd of pack_nibbles8.
template <int kSel>
__device__ __forceinline__ void gather_even_odd(const uint32_t (&x)[8], uint32_t& even,
                                                uint32_t& odd) {
  constexpr int kPair = kSel | ((kSel + 4) << 4);  // byte 0: x_a.b[sel], byte 1: x_b.b[sel]
  constexpr int kMerge = 0x5410;                   // bytes 0, 1 of a, then bytes 0, 1 of b
  even = __byte_perm(__byte_perm(x[0], x[2], kPair), __byte_perm(x[4], x[6], kPair), kMerge);
  odd = __byte_perm(__byte_perm(x[1], x[3], kPair), __byte_perm(x[5], x[7], kPair), kMerge);
}

// The transposed store of a byte tile (the second half of the transposing kernels):
//   out[c0 + cc, r0 + r] = tile[r][cc]   for r < TR, cc < TC, r0 + r < rows, c0 + cc < cols,
// out [cols, rows], rows % 4 == 0 and cols % 4 == 0; tile rows padded to TC + 4 bytes. The
// block's threads take the 4 × 4 byte blocks (rows 4m .. 4m+3, columns 4q .. 4q+3) in turn and
// transpose each in registers (4 word reads, 8 byte permutes) into 4 column words. Block u:
// m = u % kM + kM·(u / (kM·TC/4)), q = (u / kM) % (TC/4), kM = min(8, TR/4), so a warp
// writes kM consecutive words of each of its columns and reads distinct banks (tile rows are
// (TC + 4)/4 ≡ 1 words apart modulo 32 for TC ≥ 128).
template <int TR, int TC, int kBlockThreads>
__device__ __forceinline__ void store_tile_transposed(const int8_t (&tile)[TR][TC + 4], int64_t r0,
                                                      int64_t c0, int64_t rows, int64_t cols,
                                                      int8_t* __restrict__ out) {
  static_assert(TR % 4 == 0 && TC % 4 == 0, "whole 4 x 4 byte blocks");
  constexpr int kQuads = TC / 4;
  constexpr int kM = TR / 4 < 8 ? TR / 4 : 8;
  constexpr int kBlocks = (TR / 4) * kQuads;
  for (int u = static_cast<int>(threadIdx.x); u < kBlocks; u += kBlockThreads) {
    const int q = (u / kM) % kQuads;
    const int m = u % kM + kM * (u / (kM * kQuads));
    const int64_t row = r0 + 4 * m;
    const int64_t col = c0 + 4 * q;
    if (row >= rows || col >= cols) continue;
    uint32_t a[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) a[j] = *reinterpret_cast<const uint32_t*>(&tile[4 * m + j][4 * q]);
    const uint32_t t0 = __byte_perm(a[0], a[1], 0x5140);  // a0.b0 a1.b0 a0.b1 a1.b1
    const uint32_t t1 = __byte_perm(a[0], a[1], 0x7362);  // a0.b2 a1.b2 a0.b3 a1.b3
    const uint32_t t2 = __byte_perm(a[2], a[3], 0x5140);
    const uint32_t t3 = __byte_perm(a[2], a[3], 0x7362);
    const uint32_t w[4] = {__byte_perm(t0, t2, 0x5410), __byte_perm(t0, t2, 0x7632),
                           __byte_perm(t1, t3, 0x5410), __byte_perm(t1, t3, 0x7632)};
#pragma unroll
    for (int k = 0; k < 4; ++k) *reinterpret_cast<uint32_t*>(out + (col + k) * rows + row) = w[k];
  }
}

}  // namespace nibble::cuda::detail
