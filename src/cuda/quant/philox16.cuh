#pragma once
// Device helpers for the 16-bit Philox streams (rng.h philox_uniform16: element i reads half
// i % 2 of word (i % 8) / 2 of block i / 8), shared by the HQ quantizers' LSQ side channel
// (src/cuda/linear/hq_linear_quant.cu) and the bit split (src/cuda/quant/bitsplit.cu).
//
// The bit split gives each lane 4 consecutive elements per group, so lanes 2m and 2m + 1 hold
// the two halves of one block when the pair's first index is a multiple of 8. pair() then
// computes ONE block per lane for TWO groups (the even lane the first group's, the odd lane the
// second's) and the lanes swap the halves they do not use: one Philox-4x32-10 per 8 elements.
// The quantizer's lanes hold 8 consecutive elements, one whole block (magic_uniforms8).
#if !defined(__CUDACC__)
#error "cuda/quant/philox16.cuh is for CUDA translation units"
#endif

#include <cstdint>

#include "nibble/rng.h"

namespace nibble::cuda::philox16 {

// 0x43400000 | b is the fp32 192 + b·2^-16 for b < 2^16, exactly: the ulp of [128, 256) is 2^-16.
// A kernel adds its real operand x to it rounded down (__fadd_rd / __fmaf_rd): for |x| < 64 the
// sum stays in [128, 256) and floor(rd(x + 192 + u)) = 192 + floor(x + u) of the EXACT sum
// (rounding down never crosses the integer below, and 192 + integer is representable). The
// integer part then sits in bits 16..22: bits >> 16 = 0x4300 + floor − 128 = 0x4340 + floor(x + u).
constexpr uint32_t kMagicBits = 0x43400000u;

// Block blk of the stream whose schedule is s (rng.h philox4x32_10_scheduled). The hot
// kernels take the schedule as a by-value kernel argument (philox_schedule(key) on the host),
// so its round keys are constant-bank operands.
__device__ __forceinline__ Philox4 block(const PhiloxSchedule& s, uint64_t blk) {
  return philox4x32_10_scheduled(s, blk);
}

// The same block from the key alone (kernels off the hot path): the schedule is built per call.
__device__ __forceinline__ Philox4 block(const PhiloxKey& key, uint64_t blk) {
  return philox4x32_10_scheduled(philox_schedule(key), blk);
}

// 192 + u_k for the 4 elements whose stream words are w[0] (elements 0, 1) and w[1] (2, 3):
// one byte permute each (low half for even k, high half for odd k).
__device__ __forceinline__ void magic_uniforms4(const uint32_t (&w)[2], float (&U)[4]) {
  U[0] = __uint_as_float(__byte_perm(w[0], kMagicBits, 0x7610));
  U[1] = __uint_as_float(__byte_perm(w[0], kMagicBits, 0x7632));
  U[2] = __uint_as_float(__byte_perm(w[1], kMagicBits, 0x7610));
  U[3] = __uint_as_float(__byte_perm(w[1], kMagicBits, 0x7632));
}

// 192 + u_k for the 8 elements of one whole block o (elements 2w, 2w + 1 in word w): the
// layout of a lane that holds 8 consecutive elements starting at a multiple of 8.
__device__ __forceinline__ void magic_uniforms8(const Philox4& o, float (&U)[8]) {
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    U[2 * w] = __uint_as_float(__byte_perm(o.v[w], kMagicBits, 0x7610));
    U[2 * w + 1] = __uint_as_float(__byte_perm(o.v[w], kMagicBits, 0x7632));
  }
}

// Lanes 2m, 2m + 1 (odd = lane & 1) hold indices index_a .. +3 of group A and index_b .. +3 of
// group B, where the even lane's index_a and index_b are multiples of 8 and the odd lane's are
// 4 more. Returns the two stream words of this lane's 4 elements of each group. Every lane of
// the warp must call it (shuffles).
template <class Key>
__device__ __forceinline__ void pair(const Key& key, uint64_t index_a, uint64_t index_b, bool odd,
                                     uint32_t (&wa)[2], uint32_t (&wb)[2]) {
  const Philox4 o = block(key, (odd ? index_b : index_a) >> 3);
  // the even lane computed A and keeps its words 0, 1; the odd lane computed B and keeps 2, 3
  const uint32_t s0 = odd ? o.v[0] : o.v[2];
  const uint32_t s1 = odd ? o.v[1] : o.v[3];
  const uint32_t r0 = __shfl_xor_sync(0xffffffffu, s0, 1);
  const uint32_t r1 = __shfl_xor_sync(0xffffffffu, s1, 1);
  wa[0] = odd ? r0 : o.v[0];
  wa[1] = odd ? r1 : o.v[1];
  wb[0] = odd ? o.v[2] : r0;
  wb[1] = odd ? o.v[3] : r1;
}

// Without a partner: the two words of elements index .. index + 3 (index % 4 == 0), half of
// one block.
template <class Key>
__device__ __forceinline__ void own(const Key& key, uint64_t index, uint32_t (&w)[2]) {
  const Philox4 o = block(key, index >> 3);
  const bool upper = (index & 4) != 0;
  w[0] = upper ? o.v[2] : o.v[0];
  w[1] = upper ? o.v[3] : o.v[1];
}

}  // namespace nibble::cuda::philox16
