#pragma once
// CUDA twins of ref/hadamard.h: the block-diagonal Hadamard transform, the fused HQ quantizer
// and the LSQ step-size initialisation (algorithms.md A.3-A.4, F.3, F.9).
//
// All pointers are device pointers; work is queued on `stream` and nothing waits for the GPU.
// Input element type T is float or bf16_t; a bf16 input is widened exactly to fp32 first, so
// it gets the codes the reference computes for its fp32 widening.
//
// Bit-exactness: the transform follows ref::hadamard_blocks' order exactly — stages
// h = 1, 2, ..., block/2, each pair (i, i + h) -> (a + b, a − b) in fp32, then one multiply by
// hadamard_norm(block) — and the quantizer multiplies by inv_s = 1/s (one IEEE division per
// thread, none per element: ref::lsq_quantize's formula) and rounds halves to even, so
// y, q, q_t and r equal the reference bit for bit. lsq_init_scale is a float reduction in
// another order: see its comment for the tolerance.
#include <cuda_runtime.h>

#include <cstdint>

#include "nibble/dtype.h"
#include "nibble/format.h"

namespace nibble::cuda {

// y[rows, cols] = x · BlockDiag(H_k, ..., H_k), block = 2^k in [1, 1024] dividing cols.
// H_k is orthonormal and symmetric, so the same call applies Hᵀ (the backward's dx_t·Hᵀ).
template <class T>
struct HadamardParams {
  const T* x = nullptr;        // [rows, cols] row-major
  int64_t rows = 0;
  int64_t cols = 0;            // multiple of block
  int64_t block = 32;          // 2^k in [1, 1024]
  float* y = nullptr;          // [rows, cols] fp32 row-major; may be x itself when T = float
  uint64_t* status = nullptr;  // optional (status.h): NaN/Inf input, overflow in the transform
};
void hadamard_blocks(const HadamardParams<float>& p, cudaStream_t stream);
void hadamard_blocks(const HadamardParams<bf16_t>& p, cudaStream_t stream);

// HQ quantizer, one kernel, one read of x (ref::hq_quantize):
//   v = x·BlockDiag(H_k)            (butterfly order above, then × hadamard_norm(block))
//   r = v·inv_s                      (fp32 multiply; inv_s = 1/s, IEEE division, s = *step)
//   q = clamp(round_half_even(r), qmin, qmax)
// and, from the same registers, the transposed codes and r (no second pass over memory).
template <class T>
struct HqQuantizeParams {
  const T* x = nullptr;        // [rows, cols] row-major (tokens × in_features, or a weight [C, D])
  int64_t rows = 0;
  int64_t cols = 0;            // K of the forward GEMM; multiple of block
  int64_t block = 32;          // 2^k in [1, 1024]
  QRange range = kInt4Sym;     // signed (qmin < 0 < qmax) and inside [-128, 127]
  const float* step = nullptr; // [1] device: the LSQ step size s > 0 (finite)
  int8_t* q = nullptr;         // [rows, cols] codes, K-contiguous: the forward GEMM operand
  int8_t* q_t = nullptr;       // optional [cols, rows] codes, token-contiguous: dw = dyᵀ·x's B
  float* r = nullptr;          // optional [rows, cols] r = v·inv_s fp32 (STE mask and LSQ δ; ref
                               // HqLinearSaved::x_r)
  uint64_t* status = nullptr;  // optional (status.h): NaN/Inf in x, overflow in v, and a
                               // *step that is not positive finite (or whose 1/s is not
                               // finite, s < 2^-128) as bad_scale 0
};
void hq_quantize(const HqQuantizeParams<float>& p, cudaStream_t stream);
void hq_quantize(const HqQuantizeParams<bf16_t>& p, cudaStream_t stream);

// LSQ initial step of the transformed tensor (ref::lsq_init_scale applied to x·H):
//   s = 2·mean|v| / sqrt(qmax),  v = x·BlockDiag(H_k)   (block = 1: v = x)
// |v| is summed in fp64: per-thread partials, a fixed-order tree per thread block (at most
// kLsqInitScratch blocks), then a one-warp kernel that adds the per-block partials in a fixed
// order. The result is deterministic for a given shape, but the order differs from the
// reference's index-order sum. Both fp64 sums of n non-negative terms are within (n−1)·2^-53 (relative) of the exact
// sum, so for n < 2^26 they differ by less than 2^-26 relative, below half an fp32 ulp: the
// fp32 results are equal or 1 ulp apart (tolerance: 1 ulp). An all-zero tensor gives s = 1,
// as the reference does.
constexpr int64_t kLsqInitScratch = 1024;  // doubles of scratch (the per-block partials)
template <class T>
struct LsqInitParams {
  const T* x = nullptr;          // [rows, cols] row-major, rows·cols > 0
  int64_t rows = 0;
  int64_t cols = 0;              // multiple of block
  int64_t block = 32;            // 2^k in [1, 1024]
  QRange range = kInt4Sym;       // qmax > 0
  float* step = nullptr;         // [1] device output: s
  double* scratch = nullptr;     // [kLsqInitScratch] device doubles (overwritten)
  uint64_t* status = nullptr;    // optional (status.h): NaN/Inf input, overflow in v
};
void lsq_init_scale(const LsqInitParams<float>& p, cudaStream_t stream);
void lsq_init_scale(const LsqInitParams<bf16_t>& p, cudaStream_t stream);

}  // namespace nibble::cuda
