#pragma once
// Native integer tensor-core GEMMs for Ampere/Ada (sm_80/86/89), hand-written on mma.sync
// (docs/gemm_sm80.md has the kernel layout). One kernel template serves two element types:
//   s4 (mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32), packed operands:
//     gemm_s4s4_s32_tn_sm80:          c[m, n] = Σ_k a[m, k] · b[n, k]                 (int32, exact)
//     gemm_s4s4_s32_tn_dequant_sm80:  y[m, n] = fma(float(acc[m, n]), sa · sb, bias[n])  (bf16 / f32)
//   s8 (mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32), int8 operands, the same formulas:
//     gemm_s8s8_s32_tn_sm80, gemm_s8s8_s32_tn_dequant_sm80 (GemmS8S8Params; p.tile is ignored)
// with sa = scale_a[m or 0], sb = scale_b[n or 0] (EpiDequantBias, gemm_params.h): the same fp32
// operations, in the same order, as the sm_90a INT8 kernels' epilogue.
//
// The kernels are also built for sm_90a, where the s4 mma.sync is emulated (correct, slow) and
// the s8 mma.sync is native: that is where they are tested, never timed.
//
// All pointers are device pointers; work is queued on `stream` (no synchronization).
// Requirements, each checked before anything is queued and reported as nibble::Error:
//   - a device of compute capability ≥ 8.0 whose architecture this build has code for;
//   - s4: K % 32 == 0 (packed rows of a multiple of 16 bytes, the cp.async copy width), and
//     K < 2^25 so that |Σ| ≤ 64·K (|a·b| ≤ (−8)·(−8)) fits int32;
//     s8: K % 16 == 0 (16-byte rows), and K < 2^17 = 131072 so that |Σ| ≤ 128·128·K fits int32;
//   - A, B and the output 16-byte aligned; scale/bias pointers 4-byte aligned;
//   - any M, N ≥ 0 (tails are predicated): M = 0 or N = 0 queues nothing; K = 0 writes
//     acc = 0, i.e. c = 0 and y = bias (A and B may then be null).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/gemm/gemm_params.h"
#include "nibble/dtype.h"

namespace nibble::cuda {

struct GemmS4S4Params {
  // A: [M, K] packed s4, row-major: each row is K/2 bytes, element 2i in the low nibble of
  // byte i, 2i+1 in the high nibble, two's complement (docs/formats.md). 16-byte aligned.
  const uint8_t* a = nullptr;
  // B: [N, K] packed s4, row-major (K contiguous), the same packing. 16-byte aligned.
  const uint8_t* b = nullptr;
  int64_t m = 0;  // rows of A and of the output
  int64_t n = 0;  // rows of B = columns of the output
  int64_t k = 0;  // reduction length in elements (not bytes); K % 32 == 0
};

// c: [M, N] s32, row-major.
void gemm_s4s4_s32_tn_sm80(const GemmS4S4Params& p, int32_t* c, cudaStream_t stream);

// y: [M, N] row-major, bf16 (the fp32 result rounded to nearest even) or f32.
void gemm_s4s4_s32_tn_dequant_sm80(const GemmS4S4Params& p, const EpiDequantBias& epi, bf16_t* y,
                                   cudaStream_t stream);
void gemm_s4s4_s32_tn_dequant_sm80(const GemmS4S4Params& p, const EpiDequantBias& epi, float* y,
                                   cudaStream_t stream);

// The s8 twins: A [M, K], B [N, K] int8, row-major (K contiguous), as for the sm_90a kernels
// (gemm_s8s8_s32_tn_sm90.h), but any N and any compute capability ≥ 8.0. c / y as above.
void gemm_s8s8_s32_tn_sm80(const GemmS8S8Params& p, int32_t* c, cudaStream_t stream);
void gemm_s8s8_s32_tn_dequant_sm80(const GemmS8S8Params& p, const EpiDequantBias& epi, bf16_t* y,
                                   cudaStream_t stream);
void gemm_s8s8_s32_tn_dequant_sm80(const GemmS8S8Params& p, const EpiDequantBias& epi, float* y,
                                   cudaStream_t stream);

// What the driver loaded for one of the three kernels on the current device (from
// cudaFuncGetAttributes), for tests and reports: that the image is SASS of this device's
// architecture and spills nothing to local memory. Throws like the launchers when the
// device is below 8.0 or the build has no code for it.
enum class GemmS4S4Out : uint8_t { s32, bf16, f32 };
struct GemmS4S4Sm80KernelInfo {
  int device_cc = 0;           // 10·major + minor of the current device
  int binary_cc = 0;           // 10·major + minor of the loaded SASS (cudaFuncAttributes::binaryVersion)
  int ptx_version = 0;         // 10·major + minor of the PTX it came from
  int registers = 0;           // per thread
  int64_t local_bytes = 0;     // local memory per thread (register spills, stack); 0 expected
  int64_t static_smem_bytes = 0;
  int max_threads_per_block = 0;
};
GemmS4S4Sm80KernelInfo gemm_s4s4_s32_tn_sm80_kernel_info(GemmS4S4Out out);
GemmS4S4Sm80KernelInfo gemm_s8s8_s32_tn_sm80_kernel_info(GemmS4S4Out out);  // the s8 kernels

}  // namespace nibble::cuda
