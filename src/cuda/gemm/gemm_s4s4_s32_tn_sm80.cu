// Integer tensor-core GEMMs for Ampere/Ada: C[M, N] = A[M, K] · B[N, K]ᵀ, written by hand
// (inline PTX, no CUTLASS), with an int32 or a fused dequantizing (bf16 / f32) epilogue, for
// two element types from ONE kernel template (ElemS4 / ElemS8 below):
//   s4: packed operands, mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 (gemm_s4s4_*_sm80);
//   s8: int8 operands,   mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (gemm_s8s8_*_sm80).
// The two mma shapes have the same fragment layout in bytes (a 32-bit register holds 8 s4 or
// 4 s8 elements of the same 4 bytes of a row), so everything but the instruction, the bytes
// per row (K/2 or K) and the host checks is shared and works on bytes.
// Built for every CUDA architecture of the build (80 86 89 90a): on sm_90a the s4 mma.sync is
// emulated, which is slow but exact, and is how the GPU tests run on H100/H200; the s8
// mma.sync is native there (IMMA.16832.S8.S8).
// docs/gemm_sm80.md explains the tiling, the fragment layouts and what was verified where.
//
// Kernel layout (one CTA = 8 warps = 256 threads):
//   CTA tile    128 (M) × 128 (N), K in steps of 64 bytes of each row (128 s4 / 64 s8);
//   warp tile    64 (M) ×  32 (N): 2 × 4 warps; per warp 4 × 4 mma tiles of 16 × 8;
//   pipeline    3 shared-memory stages filled by cp.async.cg (16 bytes per copy), so that two
//               K-steps are in flight while the tensor cores work on the third;
//   fragments   ldmatrix.x4 (b16 view of the bytes), 2 mma K-steps (32 bytes each) per stage;
//   epilogue    straight from the accumulator registers to global memory, predicated.
#include "cuda/gemm/gemm_s4s4_s32_tn_sm80.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <type_traits>

#include "cuda/common/check.h"
#include "nibble/error.h"

namespace nibble::cuda {

namespace {

// ---- tile configuration ----------------------------------------------------------------

constexpr int kTileM = 128;
constexpr int kTileN = 128;
constexpr int kTileKBytes = 64;  // 128 s4 or 64 s8 elements of a row per stage
constexpr int kStages = 3;
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 4;
constexpr int kThreads = 32 * kWarpsM * kWarpsN;  // 256
constexpr int kWarpM = kTileM / kWarpsM;          // 64
constexpr int kWarpN = kTileN / kWarpsN;          // 32
constexpr int kMmaM = 16;
constexpr int kMmaN = 8;
constexpr int kMmaKBytes = 32;                // m16n8k64 s4 / m16n8k32 s8: 32 bytes of K
constexpr int kFragsM = kWarpM / kMmaM;       // 4 mma tiles along M per warp
constexpr int kFragsN = kWarpN / kMmaN;       // 4 mma tiles along N per warp
constexpr int kKSteps = kTileKBytes / kMmaKBytes;  // 2 mma K-steps per stage
constexpr int kChunk = 16;                          // bytes per cp.async and per ldmatrix row
constexpr int kChunksPerRow = kTileKBytes / kChunk;  // 4
constexpr int kStageBytesA = kTileM * kTileKBytes;  // 8 KiB
constexpr int kStageBytesB = kTileN * kTileKBytes;  // 8 KiB
constexpr int kSmemBytes = kStages * (kStageBytesA + kStageBytesB);  // 48 KiB
constexpr int kCopiesA = kTileM * kChunksPerRow / kThreads;  // 16-byte copies per thread
constexpr int kCopiesB = kTileN * kChunksPerRow / kThreads;

// Why 48 KiB: the static shared-memory limit, so no opt-in attribute is needed. Shared memory
// then allows 2 CTAs per SM on sm_86/89 (100 KiB) and 3 on sm_80 (164 KiB); the 122 registers
// per thread ptxas uses (docs/gemm_sm80.md) hold every architecture at 2, i.e. 16 warps per SM.
static_assert(kSmemBytes <= 48 * 1024, "static shared memory is limited to 48 KiB");
static_assert(kTileM * kChunksPerRow % kThreads == 0 && kTileN * kChunksPerRow % kThreads == 0,
              "every thread issues the same number of copies");
static_assert(kChunksPerRow == 4, "smem_offset's swizzle is written for 64-byte rows");
static_assert(kFragsN % 2 == 0, "B fragments are loaded two n8 tiles per ldmatrix.x4");

// ---- element types -------------------------------------------------------------------------
// What differs between the s4 and the s8 GEMM: elements per byte of a row, the mma instruction
// (one 16 × 8 tile over 32 bytes of K, same fragment registers), and the host's bounds:
//   kKMultiple   K must be a multiple of it: rows of a multiple of 16 bytes (cp.async width);
//   kMaxAbsProduct, kKLimitLog2: |a·b| ≤ kMaxAbsProduct, so |Σ| ≤ kMaxAbsProduct·K < 2^31
//                for K < 2^kKLimitLog2 (kMaxAbsProduct · 2^kKLimitLog2 = 2^31).
// d += a · b below is exact int32 (no saturation: the launcher bounds K).
struct ElemS4 {
  static constexpr int kElemsPerByte = 2;
  static constexpr int64_t kKMultiple = 32;
  static constexpr int64_t kMaxAbsProduct = 64;  // (−8)·(−8)
  static constexpr int kKLimitLog2 = 25;
  static constexpr const char* kName = "s4";
  static constexpr const char* kRowBytes = "K/2";  // for messages
  __device__ __forceinline__ static void mma(int32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
struct ElemS8 {
  static constexpr int kElemsPerByte = 1;
  static constexpr int64_t kKMultiple = 16;
  static constexpr int64_t kMaxAbsProduct = 128 * 128;  // (−128)·(−128)
  static constexpr int kKLimitLog2 = 17;
  static constexpr const char* kName = "s8";
  static constexpr const char* kRowBytes = "K";
  __device__ __forceinline__ static void mma(int32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
static_assert(ElemS4::kMaxAbsProduct << ElemS4::kKLimitLog2 == int64_t{1} << 31);
static_assert(ElemS8::kMaxAbsProduct << ElemS8::kKLimitLog2 == int64_t{1} << 31);
static_assert(ElemS4::kKMultiple / ElemS4::kElemsPerByte == kChunk &&
                  ElemS8::kKMultiple / ElemS8::kElemsPerByte == kChunk,
              "K multiples give rows of whole 16-byte chunks");

// The kernel's operands as bytes: a [m, K / E::kElemsPerByte], b [n, K / E::kElemsPerByte],
// both row-major, 16-byte aligned; k in elements (a multiple of E::kKMultiple).
struct Sm80Args {
  const uint8_t* a = nullptr;
  const uint8_t* b = nullptr;
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
};

// ---- shared-memory layout ----------------------------------------------------------------
// A stage holds 128 rows of 64 bytes (4 chunks of 16 bytes), row-major. ldmatrix reads 8 rows
// of one chunk column per 8×8 matrix; unswizzled, rows 64 bytes apart map to only 2 of the 8
// 16-byte bank groups of a 128-byte line (4-way conflicts). XOR-ing the chunk index with bits
// 1-2 of the row puts those 8 rows on 8 distinct bank groups (row parity picks the half line,
// (row >> 1) & 3 the chunk within it), for ldmatrix reads and for the cp.async writes alike.
__device__ __forceinline__ uint32_t smem_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * kTileKBytes + ((chunk ^ ((row >> 1) & 3)) * kChunk));
}

// ---- PTX wrappers --------------------------------------------------------------------------

// 16-byte global → shared copy that bypasses L1 (.cg). With src_bytes = 0 nothing is read and
// the 16 bytes are zero-filled: that is how out-of-range rows and the K tail become zeros,
// which add nothing to the int32 sums (a 16-byte K tail fills half an mma K-step).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? kChunk : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8×8 matrices of 16-bit elements; lane l supplies the address of row l % 8 of matrix
// l / 8 and receives, in r[j], elements 2(l%4), 2(l%4)+1 of row l/4 of matrix j. In bytes:
// bytes 4(l%4) … 4(l%4)+3 of a 16-byte row, i.e. s4 elements 8(l%4) … 8(l%4)+7 (element 2i in
// the low nibble) or s8 elements 4(l%4) … 4(l%4)+3, in memory order, as the mma reads them.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// ---- global → shared -------------------------------------------------------------------

// Copies one stage: rows [0, 128) of the tile starting at `tile` (row stride row_bytes), bytes
// [k_byte0, k_byte0 + 64) of each. Rows ≥ rows_valid and bytes ≥ row_bytes are zero-filled.
// Thread t copies chunks t, t + 256, … (4 per row), so a warp covers 8 whole rows per copy.
template <int kCopies>
__device__ __forceinline__ void load_stage(uint32_t smem_stage, const uint8_t* tile,
                                           int rows_valid, int64_t row_bytes, int64_t k_byte0,
                                           int tid) {
#pragma unroll
  for (int i = 0; i < kCopies; ++i) {
    const int id = tid + i * kThreads;
    const int row = id / kChunksPerRow;
    const int chunk = id % kChunksPerRow;
    const int64_t kb = k_byte0 + chunk * kChunk;
    const bool valid = row < rows_valid && kb < row_bytes;
    // A skipped copy still needs an address; the tile base is one that exists.
    const uint8_t* src = valid ? tile + row * row_bytes + kb : tile;
    cp_async_16(smem_stage + smem_offset(row, chunk), src, valid);
  }
}

// ---- epilogue helpers -----------------------------------------------------------------

__device__ __forceinline__ float to_out(float v, float*) { return v; }
__device__ __forceinline__ __nv_bfloat16 to_out(float v, __nv_bfloat16*) {
  return __float2bfloat16_rn(v);  // round to nearest even
}

// Stores out[row, col] = v0 and, if col + 1 < n, out[row, col + 1] = v1 (col is even).
// One 2-element vector store when n is even (then row·n + col is even, so the pair is aligned
// given a 16-byte aligned base); two scalar stores otherwise.
template <class T>
__device__ __forceinline__ void store_pair(T* out, int64_t n, int64_t row, int64_t col, T v0,
                                           T v1) {
  struct alignas(2 * sizeof(T)) Pair {
    T lo, hi;
  };
  T* p = out + row * n + col;
  if (col + 1 < n) {
    if (n % 2 == 0) {
      *reinterpret_cast<Pair*>(p) = Pair{v0, v1};
    } else {
      p[0] = v0;
      p[1] = v1;
    }
  } else {
    p[0] = v0;
  }
}

// ---- the kernel ------------------------------------------------------------------------

// E = ElemS4 or ElemS8. OutT = int32_t: c = acc. OutT = float or __nv_bfloat16: the
// EpiDequantBias epilogue.
// blockIdx.x walks M tiles (so consecutive CTAs share a B tile in L2), blockIdx.y N tiles.
template <class E, class OutT>
__global__ void __launch_bounds__(kThreads)
    gemm_sm80_kernel(Sm80Args p, EpiDequantBias epi, OutT* out) {
  __shared__ alignas(128) uint8_t smem[kSmemBytes];

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int warp_m = warp / kWarpsN;  // 0..1
  const int warp_n = warp % kWarpsN;  // 0..3
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int64_t row_bytes = p.k / E::kElemsPerByte;  // exact: K % kKMultiple == 0
  const int k_tiles = static_cast<int>((row_bytes + kTileKBytes - 1) / kTileKBytes);
  const int rows_a = static_cast<int>(p.m - m0 < kTileM ? p.m - m0 : kTileM);
  const int rows_b = static_cast<int>(p.n - n0 < kTileN ? p.n - n0 : kTileN);
  // K = 0 runs no stage and never reads A or B (which may be null): acc stays 0.
  const uint8_t* tile_a = k_tiles > 0 ? p.a + m0 * row_bytes : nullptr;
  const uint8_t* tile_b = k_tiles > 0 ? p.b + n0 * row_bytes : nullptr;

  const uint32_t smem_a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t smem_b = smem_a + kStages * kStageBytesA;

  // ldmatrix addresses of this lane (see ldmatrix_x4 for which lane supplies which row).
  // A, one x4 per 16-row mma tile: matrices (rows 0-7 | 8-15) × (chunk 2s | 2s+1) in the
  // order a0 a1 a2 a3 of the A fragment: a0 = (row g, bytes 0-15 of the 32), a1 = (row g+8,
  // bytes 0-15), a2 = (row g, bytes 16-31), a3 = (row g+8, bytes 16-31); g = lane / 4. (s4
  // m16n8k64: bytes 0-15 = K 0-31; s8 m16n8k32: bytes 0-15 = K 0-15.)
  const int a_row = warp_m * kWarpM + (lane % 8) + 8 * ((lane / 8) % 2);
  const int a_chunk = lane / 16;
  // B, one x4 per two 8-row mma tiles: matrices (rows 0-7, chunk 2s), (rows 0-7, chunk 2s+1),
  // (rows 8-15, chunk 2s), (rows 8-15, chunk 2s+1) = b0, b1 of tile 2j, then b0, b1 of 2j+1.
  const int b_row = warp_n * kWarpN + (lane % 8) + 8 * (lane / 16);
  const int b_chunk = (lane / 8) % 2;
  // Rows 16·i (A tiles) and 16·j (B tile pairs) apart keep (row >> 1) & 3, so the swizzled
  // offset of tile i is the offset of tile 0 plus i · 16 rows.
  uint32_t a_off[kKSteps], b_off[kKSteps];
#pragma unroll
  for (int s = 0; s < kKSteps; ++s) {
    a_off[s] = smem_offset(a_row, 2 * s + a_chunk);
    b_off[s] = smem_offset(b_row, 2 * s + b_chunk);
  }

  int32_t acc[kFragsM][kFragsN][4] = {};

  // Prologue: stages 0 .. kStages-2 in flight. One commit per stage even when empty, so that
  // the wait count below means the same thing in every iteration.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) {
      load_stage<kCopiesA>(smem_a + s * kStageBytesA, tile_a, rows_a, row_bytes,
                           int64_t{s} * kTileKBytes, tid);
      load_stage<kCopiesB>(smem_b + s * kStageBytesB, tile_b, rows_b, row_bytes,
                           int64_t{s} * kTileKBytes, tid);
    }
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    // Stage kt has landed (all but the newest kStages-2 groups are complete) for this thread;
    // the barrier makes every thread's copies visible, and also guarantees that everyone has
    // finished reading the stage the next copy overwrites (it was computed in iteration kt-1).
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < k_tiles) {
      const int ns = next % kStages;
      load_stage<kCopiesA>(smem_a + ns * kStageBytesA, tile_a, rows_a, row_bytes,
                           int64_t{next} * kTileKBytes, tid);
      load_stage<kCopiesB>(smem_b + ns * kStageBytesB, tile_b, rows_b, row_bytes,
                           int64_t{next} * kTileKBytes, tid);
    }
    cp_async_commit();

    const int stage = kt % kStages;
    const uint32_t sa = smem_a + stage * kStageBytesA;
    const uint32_t sb = smem_b + stage * kStageBytesB;
#pragma unroll
    for (int s = 0; s < kKSteps; ++s) {
      uint32_t a_frag[kFragsM][4];
      uint32_t b_frag[kFragsN][2];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i)
        ldmatrix_x4(a_frag[i], sa + a_off[s] + i * kMmaM * kTileKBytes);
#pragma unroll
      for (int j = 0; j < kFragsN / 2; ++j) {
        uint32_t r[4];
        ldmatrix_x4(r, sb + b_off[s] + j * 2 * kMmaN * kTileKBytes);
        b_frag[2 * j][0] = r[0];
        b_frag[2 * j][1] = r[1];
        b_frag[2 * j + 1][0] = r[2];
        b_frag[2 * j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < kFragsM; ++i)
#pragma unroll
        for (int j = 0; j < kFragsN; ++j)
          E::mma(acc[i][j], a_frag[i], b_frag[j][0], b_frag[j][1]);
    }
  }
  // Only empty groups can still be pending here (no copy is issued for k-tiles ≥ k_tiles), and
  // the epilogue does not touch shared memory, so no final wait or barrier is needed.

  // ---- epilogue: the m16n8 accumulator fragment holds, in acc[..][..][h], row g + 8·(h / 2)
  // and column 2·(lane % 4) + h % 2 of its tile (g = lane / 4). ------------------------------
  const int g = lane / 4;
  const int t = lane % 4;
  const int64_t row_base = m0 + warp_m * kWarpM + g;
  const int64_t col_base = n0 + warp_n * kWarpN + 2 * t;

  if constexpr (std::is_same_v<OutT, int32_t>) {
    // c = acc
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t row = row_base + i * kMmaM + 8 * half;
        if (row >= p.m) continue;
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) {
          const int64_t col = col_base + j * kMmaN;
          if (col >= p.n) continue;
          store_pair(out, p.n, row, col, acc[i][j][2 * half], acc[i][j][2 * half + 1]);
        }
      }
  } else {
    // y = fma(float(acc), sa · sb, bias), sa = scale_a[m or 0], sb = scale_b[n or 0];
    // a null scale reads as 1 and a null bias as 0. Each step is an explicit round-to-nearest
    // intrinsic so that nothing is re-associated or contracted: float(acc) (__int2float_rn),
    // one fp32 product sa · sb (__fmul_rn), one fused multiply-add (__fmaf_rn), then bf16
    // rounds the fp32 result to nearest even. The sm_90a INT8 epilogue does the same
    // operations in the same order (gemm_s8s8_sm90_kernel.cuh: s = sa·sb, then one
    // homogeneous_multiply_add(float(acc), s, bias)), so one test bound covers both, and with
    // a null bias (fma(x, s, 0)) both round float(acc)·s once: equal bits.
    float col_scale[kFragsN][2], col_bias[kFragsN][2];
#pragma unroll
    for (int j = 0; j < kFragsN; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t col = col_base + j * kMmaN + h;
        const bool in = col < p.n;
        col_scale[j][h] =
            in && epi.scale_b != nullptr ? __ldg(epi.scale_b + (epi.b_per_col ? col : 0)) : 1.0f;
        col_bias[j][h] = in && epi.bias != nullptr ? __ldg(epi.bias + col) : 0.0f;
      }
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t row = row_base + i * kMmaM + 8 * half;
        if (row >= p.m) continue;
        const float row_scale =
            epi.scale_a != nullptr ? __ldg(epi.scale_a + (epi.a_per_row ? row : 0)) : 1.0f;
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) {
          const int64_t col = col_base + j * kMmaN;
          if (col >= p.n) continue;
          float y[2];
#pragma unroll
          for (int h = 0; h < 2; ++h)
            y[h] = __fmaf_rn(__int2float_rn(acc[i][j][2 * half + h]),
                             __fmul_rn(row_scale, col_scale[j][h]), col_bias[j][h]);
          store_pair(out, p.n, row, col, to_out(y[0], out), to_out(y[1], out));
        }
      }
  }
}

// ---- host side -------------------------------------------------------------------------

bool aligned(const void* q, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(q) % bytes == 0; }

// The architectures this translation unit was compiled for (nvcc's __CUDA_ARCH_LIST__, e.g.
// "800,860,890,900"), for the message when the device has no image.
// Variadic because the list's commas would otherwise split it into macro arguments.
#define NB_S4_STRINGIFY_IMPL(...) #__VA_ARGS__
#define NB_S4_STRINGIFY(...) NB_S4_STRINGIFY_IMPL(__VA_ARGS__)
#ifdef __CUDA_ARCH_LIST__
constexpr const char* kBuiltArchs = NB_S4_STRINGIFY(__CUDA_ARCH_LIST__);
#else
constexpr const char* kBuiltArchs = "unknown";
#endif

// Compute capability of the current device (10·major + minor), and whether the driver found
// an image of the kernels for it; queried once per device. Throws when either rules it out.
// `ref_hint` names the reference function to use instead.
int checked_device_cc(const char* fn, const char* ref_hint) {
  struct DeviceState {
    int cc = 0;
    cudaError_t image = cudaSuccess;
  };
  int device = 0;
  NB_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<int, DeviceState> states;
  DeviceState state;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = states.find(device);
    if (it == states.end()) {
      int major = 0, minor = 0;
      NB_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
      NB_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
      DeviceState s;
      s.cc = 10 * major + minor;
      if (s.cc >= 80) {
        // All six kernels come from this file's fatbinary, so one query answers for all.
        cudaFuncAttributes attr{};
        s.image = cudaFuncGetAttributes(&attr, gemm_sm80_kernel<ElemS4, int32_t>);
        if (s.image != cudaSuccess) (void)cudaGetLastError();  // clear the sticky error
      }
      it = states.emplace(device, s).first;
    }
    state = it->second;
  }
  NB_CHECK(state.cc >= 80, fn << " needs a GPU of compute capability 8.0 or higher (integer "
                              << "mma.sync: A100, RTX 30xx/40xx, L4, H100); this device is "
                              << state.cc / 10 << "." << state.cc % 10
                              << "; use the reference backend (" << ref_hint << ")");
  NB_CHECK(state.image == cudaSuccess,
           fn << ": this build has no kernel image for compute capability " << state.cc / 10
              << "." << state.cc % 10 << " (" << cudaGetErrorString(state.image)
              << "; built for " << kBuiltArchs << "); re-run cmake with "
              << "-DCMAKE_CUDA_ARCHITECTURES including " << state.cc
              << (state.cc == 90 ? "a" : "") << " and rebuild");
  return state.cc;
}

template <class E>
const char* ref_hint() {
  return E::kElemsPerByte == 2 ? "ref::gemm_s4s4_s32_tn" : "ref::gemm_s8s8_s32_tn";
}

// Every precondition listed in gemm_s4s4_s32_tn_sm80.h, before anything is queued.
// The operands are the caller's (packed s4 or s8) as bytes; k in elements.
template <class E>
void check_params(const char* fn, const void* a, const void* b, int64_t m, int64_t n, int64_t k,
                  const void* out) {
  checked_device_cc(fn, ref_hint<E>());
  NB_CHECK(m >= 0 && n >= 0 && k >= 0,
           fn << ": negative size M=" << m << ", N=" << n << ", K=" << k);
  NB_CHECK(m < (int64_t{1} << 31) && n < (int64_t{1} << 31),
           fn << ": M=" << m << ", N=" << n
              << " exceeds 2^31 - 1; split the GEMM into smaller ones");
  constexpr int64_t kMul = E::kKMultiple;
  NB_CHECK(k % kMul == 0, fn << ": K=" << k << " is not a multiple of " << kMul << "; "
                             << (E::kElemsPerByte == 2 ? "packed " : "") << E::kName
                             << " rows must be multiples of 16 bytes for the 16-byte cp.async "
                                "copies: zero-pad K to "
                             << (k + kMul - 1) / kMul * kMul
                             << " (zero codes add nothing to the sums)");
  // |a·b| ≤ kMaxAbsProduct, so |Σ| ≤ kMaxAbsProduct·K ≤ 2^31 − kMaxAbsProduct·kKMultiple for
  // K ≤ 2^kKLimitLog2 − kKMultiple (the largest allowed multiple): no int32 partial sum can
  // overflow (s4: 64·K, K < 2^25; s8: 128·128·K, K < 2^17 = 131072).
  NB_CHECK(k < (int64_t{1} << E::kKLimitLog2),
           fn << ": K=" << k << " can reach |sum| = " << E::kMaxAbsProduct
              << "·K ≥ 2^31 and overflow the int32 accumulator; split K into chunks below 2^"
              << E::kKLimitLog2 << " = " << (int64_t{1} << E::kKLimitLog2)
              << " and add the partial results in int64");
  NB_CHECK((n + kTileN - 1) / kTileN <= 65535,
           fn << ": N=" << n << " needs more than 65535 CTA columns (" << kTileN
              << " each); split N into GEMMs of at most " << int64_t{65535} * kTileN << " columns");
  if (m == 0 || n == 0) return;
  NB_CHECK(out != nullptr, fn << ": the output pointer is null with M=" << m << ", N=" << n
                              << "; pass a device buffer of M·N elements");
  NB_CHECK(aligned(out, 16), fn << ": the output pointer " << out
                                << " is not 16-byte aligned; pass a cudaMalloc'd base or an "
                                   "offset that is a multiple of 16 bytes");
  if (k == 0) return;
  NB_CHECK(a != nullptr && b != nullptr,
           fn << ": " << (a == nullptr ? "A" : "B") << " is null with M, N, K > 0; pass "
              << (E::kElemsPerByte == 2 ? "packed " : "") << E::kName << " device buffers of M·"
              << E::kRowBytes << " and N·" << E::kRowBytes << " bytes");
  NB_CHECK(aligned(a, 16) && aligned(b, 16),
           fn << ": A (" << a << ") and B (" << b
              << ") must be 16-byte aligned for the cp.async copies; pass cudaMalloc'd bases "
                 "or offsets that are multiples of 16 bytes");
}

void check_epilogue(const char* fn, const EpiDequantBias& epi) {
  NB_CHECK(aligned(epi.scale_a, 4) && aligned(epi.scale_b, 4) && aligned(epi.bias, 4),
           fn << ": scale_a, scale_b and bias must be 4-byte aligned float pointers (or null)");
}

template <class E, class OutT>
void launch(const void* a, const void* b, int64_t m, int64_t n, int64_t k,
            const EpiDequantBias& epi, OutT* out, cudaStream_t stream) {
  if (m == 0 || n == 0) return;  // nothing to write, nothing queued
  Sm80Args args;
  args.a = static_cast<const uint8_t*>(a);
  args.b = static_cast<const uint8_t*>(b);
  args.m = m;
  args.n = n;
  args.k = k;
  const dim3 grid(static_cast<unsigned>((m + kTileM - 1) / kTileM),
                  static_cast<unsigned>((n + kTileN - 1) / kTileN));
  gemm_sm80_kernel<E, OutT><<<grid, kThreads, 0, stream>>>(args, epi, out);
  NB_CUDA_CHECK_LAUNCH();
}

// The three launchers of one element type (int32, bf16, f32 output), checks first.
template <class E>
void run_s32(const char* fn, const void* a, const void* b, int64_t m, int64_t n, int64_t k,
             int32_t* c, cudaStream_t stream) {
  check_params<E>(fn, a, b, m, n, k, c);
  // K = 0 goes through the kernel too: it writes acc = 0 without reading A or B.
  launch<E>(a, b, m, n, k, EpiDequantBias{}, c, stream);
}
template <class E, class OutT>
void run_dequant(const char* fn, const void* a, const void* b, int64_t m, int64_t n, int64_t k,
                 const EpiDequantBias& epi, OutT* y, cudaStream_t stream) {
  check_params<E>(fn, a, b, m, n, k, y);
  check_epilogue(fn, epi);
  launch<E>(a, b, m, n, k, epi, y, stream);
}

template <class E, class OutT>
GemmS4S4Sm80KernelInfo kernel_info(const char* fn) {
  GemmS4S4Sm80KernelInfo info;
  info.device_cc = checked_device_cc(fn, ref_hint<E>());
  cudaFuncAttributes attr{};
  NB_CUDA_CHECK(cudaFuncGetAttributes(&attr, gemm_sm80_kernel<E, OutT>));
  info.binary_cc = attr.binaryVersion;
  info.ptx_version = attr.ptxVersion;
  info.registers = attr.numRegs;
  info.local_bytes = static_cast<int64_t>(attr.localSizeBytes);
  info.static_smem_bytes = static_cast<int64_t>(attr.sharedSizeBytes);
  info.max_threads_per_block = attr.maxThreadsPerBlock;
  return info;
}

template <class E>
GemmS4S4Sm80KernelInfo kernel_info_of(const char* fn, GemmS4S4Out out) {
  switch (out) {
    case GemmS4S4Out::s32: return kernel_info<E, int32_t>(fn);
    case GemmS4S4Out::bf16: return kernel_info<E, __nv_bfloat16>(fn);
    case GemmS4S4Out::f32: return kernel_info<E, float>(fn);
  }
  NB_FAIL(fn << ": unknown output kind " << static_cast<int>(out));
}

// bf16_t and __nv_bfloat16 are both one 16-bit bfloat16 pattern.
static_assert(sizeof(bf16_t) == sizeof(__nv_bfloat16) && alignof(bf16_t) == alignof(__nv_bfloat16));

}  // namespace

// ---- s4 ------------------------------------------------------------------------------------

void gemm_s4s4_s32_tn_sm80(const GemmS4S4Params& p, int32_t* c, cudaStream_t stream) {
  run_s32<ElemS4>("gemm_s4s4_s32_tn_sm80", p.a, p.b, p.m, p.n, p.k, c, stream);
}

void gemm_s4s4_s32_tn_dequant_sm80(const GemmS4S4Params& p, const EpiDequantBias& epi, bf16_t* y,
                                   cudaStream_t stream) {
  run_dequant<ElemS4>("gemm_s4s4_s32_tn_dequant_sm80 (bf16)", p.a, p.b, p.m, p.n, p.k, epi,
                      reinterpret_cast<__nv_bfloat16*>(y), stream);
}

void gemm_s4s4_s32_tn_dequant_sm80(const GemmS4S4Params& p, const EpiDequantBias& epi, float* y,
                                   cudaStream_t stream) {
  run_dequant<ElemS4>("gemm_s4s4_s32_tn_dequant_sm80 (f32)", p.a, p.b, p.m, p.n, p.k, epi, y,
                      stream);
}

GemmS4S4Sm80KernelInfo gemm_s4s4_s32_tn_sm80_kernel_info(GemmS4S4Out out) {
  return kernel_info_of<ElemS4>("gemm_s4s4_s32_tn_sm80_kernel_info", out);
}

// ---- s8 ------------------------------------------------------------------------------------
// p.tile (a choice among the sm_90a kernel's configurations) does not apply here.

void gemm_s8s8_s32_tn_sm80(const GemmS8S8Params& p, int32_t* c, cudaStream_t stream) {
  run_s32<ElemS8>("gemm_s8s8_s32_tn_sm80", p.a, p.b, p.m, p.n, p.k, c, stream);
}

void gemm_s8s8_s32_tn_dequant_sm80(const GemmS8S8Params& p, const EpiDequantBias& epi, bf16_t* y,
                                   cudaStream_t stream) {
  run_dequant<ElemS8>("gemm_s8s8_s32_tn_dequant_sm80 (bf16)", p.a, p.b, p.m, p.n, p.k, epi,
                      reinterpret_cast<__nv_bfloat16*>(y), stream);
}

void gemm_s8s8_s32_tn_dequant_sm80(const GemmS8S8Params& p, const EpiDequantBias& epi, float* y,
                                   cudaStream_t stream) {
  run_dequant<ElemS8>("gemm_s8s8_s32_tn_dequant_sm80 (f32)", p.a, p.b, p.m, p.n, p.k, epi, y,
                      stream);
}

GemmS4S4Sm80KernelInfo gemm_s8s8_s32_tn_sm80_kernel_info(GemmS4S4Out out) {
  return kernel_info_of<ElemS8>("gemm_s8s8_s32_tn_sm80_kernel_info", out);
}

}  // namespace nibble::cuda
