#pragma once
// Device helpers of the linear layer's fused passes (CUDA translation units only): the block
// Hadamard butterfly of one warp row, vector loads and stores, Philox uniforms by fours.
//
// Warp row layout (the same as src/cuda/quant/hadamard.cu, so that a tile of W = 128·J columns
// holds whole Hadamard blocks): in chunk j < J, lane l holds the 4 consecutive columns
// 128j + 4l + k, k < 4. Butterfly stages h = 1, 2, ..., block/2 pair
//   h = 1, 2       registers k and k ^ h of the lane,
//   h = 4 .. 64    lanes l and l ^ (h/4) (a shuffle),
//   h = 128 .. 512 chunks j and j ^ (h/128),
// each pair (a, b) -> (a + b, a − b) in fp32 (__fadd_rn / __fsub_rn: never contracted), the
// reference's order (ref::hadamard_blocks, docs/formats.md "Hadamard"), so results are bit
// for bit the reference's. The caller multiplies by hadamard_norm(block) afterwards.
#if !defined(__CUDACC__)
#error "cuda/linear/hadamard_warp.cuh is for CUDA translation units"
#endif

#include <cstdint>

#include "nibble/dtype.h"
#include "nibble/rng.h"

namespace nibble::cuda::linear_detail {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kChunk = 128;  // columns per warp-wide chunk: 32 lanes × 4

template <int J>
__device__ __forceinline__ void hadamard_warp(float (&v)[J][4], int lane, int block) {
#pragma unroll
  for (int h = 1; h <= 2; h <<= 1) {
    if (h < block) {
#pragma unroll
      for (int j = 0; j < J; ++j) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if ((k & h) == 0) {
            const float a = v[j][k];
            const float b = v[j][k + h];
            v[j][k] = __fadd_rn(a, b);
            v[j][k + h] = __fsub_rn(a, b);
          }
        }
      }
    }
  }
  for (int h = 4; h < block && h < kChunk; h <<= 1) {
    const int m = h >> 2;
    const bool lower = (lane & m) == 0;
#pragma unroll
    for (int j = 0; j < J; ++j) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float other = __shfl_xor_sync(kFullMask, v[j][k], m);
        // the lower lane holds a: a + b; the upper holds b and receives a: a − b
        v[j][k] = lower ? __fadd_rn(v[j][k], other) : __fsub_rn(other, v[j][k]);
      }
    }
  }
#pragma unroll
  for (int hj = 1; hj < J; hj <<= 1) {
    if (hj * kChunk < block) {
#pragma unroll
      for (int j = 0; j < J; ++j) {
        if ((j & hj) == 0) {
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float a = v[j][k];
            const float b = v[j + hj][k];
            v[j][k] = __fadd_rn(a, b);
            v[j + hj][k] = __fsub_rn(a, b);
          }
        }
      }
    }
  }
}

// Four consecutive elements widened to fp32 (16-byte f32 load or 8-byte bf16 load; the caller
// guarantees alignment: cols % 16 == 0 and 16-byte aligned bases).
__device__ __forceinline__ void load4(const float* p, float (&out)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
}
__device__ __forceinline__ void load4(const bf16_t* p, float (&out)[4]) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);  // little endian: element 0 low
  out[0] = __uint_as_float(v.x << 16), out[1] = __uint_as_float(v.x & 0xffff0000u);
  out[2] = __uint_as_float(v.y << 16), out[3] = __uint_as_float(v.y & 0xffff0000u);
}

// fp32 -> bf16 bits, round to nearest even (NaN stays a quiet NaN): nibble::f32_to_bf16's rule.
__device__ __forceinline__ uint32_t bf16_bits_rne(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

__device__ __forceinline__ void store4(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(bf16_t* p, const float (&v)[4]) {
  uint2 w;
  w.x = bf16_bits_rne(v[0]) | (bf16_bits_rne(v[1]) << 16);
  w.y = bf16_bits_rne(v[2]) | (bf16_bits_rne(v[3]) << 16);
  *reinterpret_cast<uint2*>(p) = w;
}

// The 4 uniforms of elements index .. index + 3 (index % 4 == 0) from one Philox call: the
// 4 words of one counter block, what philox_uniform returns for each (rng.h).
__device__ __forceinline__ void philox_uniform4(const PhiloxKey& key, uint64_t index,
                                                float (&u)[4]) {
  const uint64_t blk = index >> 2;
  const Philox4 ctr{{static_cast<uint32_t>(blk), static_cast<uint32_t>(blk >> 32), key.step,
                     (key.layer << 8) | static_cast<uint32_t>(key.role)}};
  const Philox4 out = philox4x32_10(ctr, static_cast<uint32_t>(key.seed),
                                    static_cast<uint32_t>(key.seed >> 32));
#pragma unroll
  for (int k = 0; k < 4; ++k) u[k] = static_cast<float>(out.v[k] >> 8) * (1.0f / 16777216.0f);
}

// Sign-extended nibble k (0..3) of a 16-bit word of packed s4 (element 2i low, 2i+1 high).
__device__ __forceinline__ int nibble_at(uint32_t word16, int k) {
  return static_cast<int>(static_cast<int32_t>(word16 << (28 - 4 * k))) >> 28;
}

}  // namespace nibble::cuda::linear_detail
