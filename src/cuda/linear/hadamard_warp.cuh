#pragma once
// Device helpers of the linear layer's fused passes (CUDA translation units only): the block
// Hadamard butterfly of one warp row, the E = 8 tiling, 8-element stores and exact rounding
// and s4 unpacking helpers.
//
// Warp row layout (E = 4: the layout of src/cuda/quant/hadamard.cu; E = 8: the forward
// quantizer's), so that a tile of W = 32·E·J columns holds whole Hadamard blocks: in chunk
// j < J, lane l holds the E consecutive columns 32·E·j + E·l + k, k < E. Butterfly stages
// h = 1, 2, ..., block/2 pair
//   h < E               registers k and k ^ h of the lane,
//   E ≤ h < 32·E        lanes l and l ^ (h/E) (a shuffle),
//   h ≥ 32·E            chunks j and j ^ (h/(32·E)),
// each pair (a, b) -> (a + b, a − b) in fp32 (__fadd_rn / __fsub_rn: never contracted), the
// reference's order (ref::hadamard_blocks, docs/formats.md "Hadamard"), so results are bit
// for bit the reference's. The caller multiplies by hadamard_norm(block) afterwards.
#if !defined(__CUDACC__)
#error "cuda/linear/hadamard_warp.cuh is for CUDA translation units"
#endif

#include <cstdint>
#include <type_traits>

#include "cuda/quant/device_util.h"
#include "nibble/dtype.h"
#include "nibble/rng.h"

namespace nibble::cuda::linear_detail {

constexpr unsigned kFullMask = 0xffffffffu;

// B > 0 names the block at compile time (B = `block`): every stage unrolls and the shuffle
// stages lose their loop and divergence checks; B = 0 reads the runtime `block`.
template <int J, int B = 0, int E>
__device__ __forceinline__ void hadamard_warp(float (&v)[J][E], int lane, int block) {
  static_assert(E == 4 || E == 8, "a lane holds 4 or 8 consecutive columns");
  constexpr int kChunkCols = 32 * E;
  if constexpr (B > 0) block = B;
#pragma unroll
  for (int h = 1; h < E; h <<= 1) {
    if (h < block) {
#pragma unroll
      for (int j = 0; j < J; ++j) {
#pragma unroll
        for (int k = 0; k < E; ++k) {
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
#pragma unroll
  for (int h = E; h < kChunkCols; h <<= 1) {
    if (h >= block) break;
    const int m = h / E;
    // the lower lane holds a and receives b: a + b = fma(a, +1, b); the upper holds b and
    // receives a: a − b = fma(b, −1, a). The product by ±1 is exact, so the fma rounds once,
    // exactly like __fadd_rn / __fsub_rn (signed zeros included), in one instruction instead
    // of an add, a subtract and a select.
    const float sign = (lane & m) == 0 ? 1.0f : -1.0f;
#pragma unroll
    for (int j = 0; j < J; ++j) {
#pragma unroll
      for (int k = 0; k < E; ++k) {
        const float other = __shfl_xor_sync(kFullMask, v[j][k], m);
        v[j][k] = __fmaf_rn(v[j][k], sign, other);
      }
    }
  }
#pragma unroll
  for (int hj = 1; hj < J; hj <<= 1) {
    if (hj * kChunkCols < block) {
#pragma unroll
      for (int j = 0; j < J; ++j) {
        if ((j & hj) == 0) {
#pragma unroll
          for (int k = 0; k < E; ++k) {
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

// ---- the E = 8 tiling of the fused passes (forward quantizer, backward mask pass) ----------
// A thread block of 8 warps owns kTileRows8<J> rows × 256·J columns, J = max(1, block/256)
// chunks per warp row; a warp transforms kRowsPerBatch8<J> rows at a time (16 elements per
// lane at J ≤ 2, 32 at J = 4), walking 4 such batches (2 at J = 4), and shared tiles stay at
// ~16 KB. Issue-bound passes gain from it (bench/README.md, "H200, 2026-12-03, runs
// S1–S7"): one lane's 8 side-channel uniforms are one whole Philox block, three butterfly
// stages run in registers, loads and stores are 16 bytes, and the per-thread set-up is spread
// over 64 elements. (The bit split's 8-column pass, cuda/quant/bitsplit.cu, is the same
// tiling at J = 1 with its own constants: the quant layer does not include this header.)
constexpr int kLaneCols8 = 8;
constexpr int kChunkCols8 = 32 * kLaneCols8;  // 256
template <int J>
constexpr int kRowsPerBatch8 = J == 1 ? 2 : 1;
template <int J>
constexpr int kTileRows8 = J == 1 ? 64 : (J == 2 ? 32 : 16);

// Calls f(integral_constant<int, J>, integral_constant<int, B>) for a Hadamard block B (a
// power of two in [1, 1024], checked by the caller) and its chunk count J: the butterfly's
// stages are then unrolled for exactly B, with no runtime stage checks.
template <class F>
void dispatch_block8(int64_t block, F&& f) {
  using std::integral_constant;
  constexpr integral_constant<int, 1> one{};
  switch (block) {
    case 1: f(one, integral_constant<int, 1>{}); break;
    case 2: f(one, integral_constant<int, 2>{}); break;
    case 4: f(one, integral_constant<int, 4>{}); break;
    case 8: f(one, integral_constant<int, 8>{}); break;
    case 16: f(one, integral_constant<int, 16>{}); break;
    case 32: f(one, integral_constant<int, 32>{}); break;
    case 64: f(one, integral_constant<int, 64>{}); break;
    case 128: f(one, integral_constant<int, 128>{}); break;
    case 256: f(one, integral_constant<int, 256>{}); break;
    case 512: f(integral_constant<int, 2>{}, integral_constant<int, 512>{}); break;
    default: f(integral_constant<int, 4>{}, integral_constant<int, 1024>{}); break;
  }
}

// load_raw8 / widen8 (8 consecutive elements as 16-byte loads, widened exactly): see
// cuda/quant/device_util.h; store8 below writes them back.
using detail::kRawWords;
using detail::load_raw8;
using detail::widen8;

__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
// Two fp32 values as bf16 bits, lo in the low half: the hardware's round-to-nearest-even pack
// (one instruction; nibble::f32_to_bf16's integer rule took about six per value). The same
// bits as f32_to_bf16 for every finite value (subnormals kept, overflow to ±Inf) and for ±Inf;
// a NaN gives 0x7fff, which is f32_to_bf16 of the canonical NaN 0x7fffffff that GPU arithmetic
// produces, so callers whose values come out of fp32 arithmetic (the dx pass: every output is
// a product by the Hadamard norm) get f32_to_bf16's bits exactly
// (LinearGpu.MaskPassBf16StoreRoundsLikeTheReference checks the edge cases).
__device__ __forceinline__ uint32_t bf16x2_bits_rne(float lo, float hi) {
  uint32_t d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

__device__ __forceinline__ void store8(bf16_t* p, const float (&v)[8]) {
  uint4 w;
  w.x = bf16x2_bits_rne(v[0], v[1]);
  w.y = bf16x2_bits_rne(v[2], v[3]);
  w.z = bf16x2_bits_rne(v[4], v[5]);
  w.w = bf16x2_bits_rne(v[6], v[7]);
  *reinterpret_cast<uint4*>(p) = w;
}

// The helpers below replace rounding and int <-> float conversion instructions (FRND, F2I,
// I2F) by adds and bit operations: fewer instructions in the issue-bound quantizer, and each
// replacement is exact, so codes stay bit-identical to the reference.

// 1.5·2^23. For fp32 v with |v| ≤ 2^21, v + kRoundMagic is rint(v) (the sum's ulp is 1, ties to
// even, like rintf) plus 1.5·2^23, and its bit pattern is 0x4B400000 + rint(v): the low bits
// hold rint(v) in two's complement, and (sum − kRoundMagic) is rint(v) as a float (exact).
constexpr float kRoundMagic = 12582912.0f;

// floor(v) for |v| ≤ 2^21 as 0x4B400000 + floor(v): the exact sum v + 1.5·2^23 lies in
// [2^23, 2^24), where the fp32 values are the integers, so rounding it down (__fadd_rd) gives
// 1.5·2^23 + floor(v).
__device__ __forceinline__ uint32_t floor_bits(float v) {
  return __float_as_uint(__fadd_rd(v, kRoundMagic));
}

// The 4 sign-extended codes of a 16-bit word of packed s4 (element 2i low, 2i+1 high) as one
// word, element k in byte k: the nibbles spread to bytes (a mask, a shift and a byte permute),
// then each byte's sign bit 3 times 0x1e (= 0xf0, no carry between bytes) fills its top nibble.
__device__ __forceinline__ uint32_t unpack_s4x4(uint32_t word16) {
  const uint32_t even = word16 & 0x0f0fu;         // bytes 0, 1: elements 0, 2
  const uint32_t odd = (word16 >> 4) & 0x0f0fu;   // bytes 0, 1: elements 1, 3
  const uint32_t codes = __byte_perm(even, odd, 0x5140);
  return codes | ((codes & 0x08080808u) * 0x1eu);
}

// Sign-extended nibble k (0..3) of a 16-bit word of packed s4 (element 2i low, 2i+1 high).
__device__ __forceinline__ int nibble_at(uint32_t word16, int k) {
  return static_cast<int>(static_cast<int32_t>(word16 << (28 - 4 * k))) >> 28;
}

}  // namespace nibble::cuda::linear_detail
