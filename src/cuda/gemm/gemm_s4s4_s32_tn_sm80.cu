// Native INT4 tensor-core GEMM for Ampere/Ada: C[M, N] = A[M, K] · B[N, K]ᵀ on packed s4
// operands with mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32, written by hand (inline
// PTX, no CUTLASS), with an int32 or a fused dequantizing (bf16 / f32) epilogue.
// Built for every CUDA architecture of the build (80 86 89 90a): on sm_90a the s4 mma.sync is
// emulated, which is slow but exact, and is how the GPU tests run on H100/H200.
// docs/gemm_sm80.md explains the tiling, the fragment layouts and what was verified where.
//
// Kernel layout (one CTA = 8 warps = 256 threads):
//   CTA tile    128 (M) × 128 (N), K in steps of 128 elements = 64 bytes of each packed row;
//   warp tile    64 (M) ×  32 (N): 2 × 4 warps; per warp 4 × 4 mma tiles of 16 × 8;
//   pipeline    3 shared-memory stages filled by cp.async.cg (16 bytes per copy), so that two
//               K-steps are in flight while the tensor cores work on the third;
//   fragments   ldmatrix.x4 (b16 view of the packed bytes), 2 mma K-steps (64 elements each)
//               per stage;
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
constexpr int kTileKBytes = 64;  // 128 s4 elements of a row per stage
constexpr int kStages = 3;
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 4;
constexpr int kThreads = 32 * kWarpsM * kWarpsN;  // 256
constexpr int kWarpM = kTileM / kWarpsM;          // 64
constexpr int kWarpN = kTileN / kWarpsN;          // 32
constexpr int kMmaM = 16;
constexpr int kMmaN = 8;
constexpr int kMmaKBytes = 32;                // m16n8k64: 64 s4 elements = 32 bytes
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
// which add nothing to the int32 sums (a 32-element K tail fills half an m16n8k64 step).
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
// bytes 4(l%4) … 4(l%4)+3 of a 16-byte row, i.e. s4 elements 8(l%4) … 8(l%4)+7, in memory
// order (element 2i in the low nibble, as the mma reads them).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// d += a · b for one 16 × 8 × 64 tile, exact int32 (no saturation: the launcher bounds K).
__device__ __forceinline__ void mma_m16n8k64_s4(int32_t (&d)[4], const uint32_t (&a)[4],
                                                uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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

// OutT = int32_t: c = acc. OutT = float or __nv_bfloat16: the EpiDequantBias epilogue.
// blockIdx.x walks M tiles (so consecutive CTAs share a B tile in L2), blockIdx.y N tiles.
template <class OutT>
__global__ void __launch_bounds__(kThreads)
    gemm_s4s4_s32_tn_sm80_kernel(GemmS4S4Params p, EpiDequantBias epi, OutT* out) {
  __shared__ alignas(128) uint8_t smem[kSmemBytes];

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int warp_m = warp / kWarpsN;  // 0..1
  const int warp_n = warp % kWarpsN;  // 0..3
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int64_t row_bytes = p.k / 2;
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
  // order a0 a1 a2 a3 of the m16n8k64 A fragment: a0 = (row g, K 0-31 of the 64), a1 = (row
  // g+8, K 0-31), a2 = (row g, K 32-63), a3 = (row g+8, K 32-63); g = lane / 4.
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
          mma_m16n8k64_s4(acc[i][j], a_frag[i], b_frag[j][0], b_frag[j][1]);
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
    // operations in the same order (gemm_s8s8_sm90_kernel.cuh), so one test bound covers both.
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
int checked_device_cc(const char* fn) {
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
        // All three kernels come from this file's fatbinary, so one query answers for all.
        cudaFuncAttributes attr{};
        s.image = cudaFuncGetAttributes(&attr, gemm_s4s4_s32_tn_sm80_kernel<int32_t>);
        if (s.image != cudaSuccess) (void)cudaGetLastError();  // clear the sticky error
      }
      it = states.emplace(device, s).first;
    }
    state = it->second;
  }
  NB_CHECK(state.cc >= 80, fn << " needs a GPU of compute capability 8.0 or higher (mma.sync "
                              << "with s4 operands: A100, RTX 30xx/40xx, L4, H100); this device "
                              << "is " << state.cc / 10 << "." << state.cc % 10
                              << "; use the reference backend (ref::gemm_s4s4_s32_tn)");
  NB_CHECK(state.image == cudaSuccess,
           fn << ": this build has no kernel image for compute capability " << state.cc / 10
              << "." << state.cc % 10 << " (" << cudaGetErrorString(state.image)
              << "; built for " << kBuiltArchs << "); re-run cmake with "
              << "-DCMAKE_CUDA_ARCHITECTURES including " << state.cc
              << (state.cc == 90 ? "a" : "") << " and rebuild");
  return state.cc;
}

// Every precondition listed in gemm_s4s4_s32_tn_sm80.h, before anything is queued.
void check_params(const char* fn, const GemmS4S4Params& p, const void* out) {
  checked_device_cc(fn);
  NB_CHECK(p.m >= 0 && p.n >= 0 && p.k >= 0,
           fn << ": negative size M=" << p.m << ", N=" << p.n << ", K=" << p.k);
  NB_CHECK(p.m < (int64_t{1} << 31) && p.n < (int64_t{1} << 31),
           fn << ": M=" << p.m << ", N=" << p.n
              << " exceeds 2^31 - 1; split the GEMM into smaller ones");
  NB_CHECK(p.k % 32 == 0, fn << ": K=" << p.k
                             << " is not a multiple of 32; packed s4 rows must be multiples of "
                                "16 bytes for the 16-byte cp.async copies: zero-pad K to "
                             << (p.k + 31) / 32 * 32 << " (zero codes add nothing to the sums)");
  // |a·b| ≤ 64, so |Σ| ≤ 64·K ≤ 2^31 − 64 for K ≤ 2^25 − 32 (the largest multiple of 32 below
  // 2^25): no int32 partial sum can overflow.
  NB_CHECK(p.k < (int64_t{1} << 25),
           fn << ": K=" << p.k << " can reach |sum| = 64·K ≥ 2^31 and overflow the int32 "
              << "accumulator; split K into chunks below 2^25 = 33554432 and add the partial "
                 "results in int64");
  NB_CHECK((p.n + kTileN - 1) / kTileN <= 65535,
           fn << ": N=" << p.n << " needs more than 65535 CTA columns (" << kTileN
              << " each); split N into GEMMs of at most " << int64_t{65535} * kTileN << " columns");
  if (p.m == 0 || p.n == 0) return;
  NB_CHECK(out != nullptr, fn << ": the output pointer is null with M=" << p.m << ", N=" << p.n
                              << "; pass a device buffer of M·N elements");
  NB_CHECK(aligned(out, 16), fn << ": the output pointer " << out
                                << " is not 16-byte aligned; pass a cudaMalloc'd base or an "
                                   "offset that is a multiple of 16 bytes");
  if (p.k == 0) return;
  NB_CHECK(p.a != nullptr && p.b != nullptr,
           fn << ": " << (p.a == nullptr ? "A" : "B")
              << " is null with M, N, K > 0; pass packed s4 device buffers of M·K/2 and N·K/2 "
                 "bytes");
  NB_CHECK(aligned(p.a, 16) && aligned(p.b, 16),
           fn << ": A (" << static_cast<const void*>(p.a) << ") and B ("
              << static_cast<const void*>(p.b)
              << ") must be 16-byte aligned for the cp.async copies; pass cudaMalloc'd bases "
                 "or offsets that are multiples of 16 bytes");
}

void check_epilogue(const char* fn, const EpiDequantBias& epi) {
  NB_CHECK(aligned(epi.scale_a, 4) && aligned(epi.scale_b, 4) && aligned(epi.bias, 4),
           fn << ": scale_a, scale_b and bias must be 4-byte aligned float pointers (or null)");
}

template <class OutT>
void launch(const GemmS4S4Params& p, const EpiDequantBias& epi, OutT* out, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return;  // nothing to write, nothing queued
  const dim3 grid(static_cast<unsigned>((p.m + kTileM - 1) / kTileM),
                  static_cast<unsigned>((p.n + kTileN - 1) / kTileN));
  gemm_s4s4_s32_tn_sm80_kernel<OutT><<<grid, kThreads, 0, stream>>>(p, epi, out);
  NB_CUDA_CHECK_LAUNCH();
}

template <class OutT>
GemmS4S4Sm80KernelInfo kernel_info(const char* fn) {
  GemmS4S4Sm80KernelInfo info;
  info.device_cc = checked_device_cc(fn);
  cudaFuncAttributes attr{};
  NB_CUDA_CHECK(cudaFuncGetAttributes(&attr, gemm_s4s4_s32_tn_sm80_kernel<OutT>));
  info.binary_cc = attr.binaryVersion;
  info.ptx_version = attr.ptxVersion;
  info.registers = attr.numRegs;
  info.local_bytes = static_cast<int64_t>(attr.localSizeBytes);
  info.static_smem_bytes = static_cast<int64_t>(attr.sharedSizeBytes);
  info.max_threads_per_block = attr.maxThreadsPerBlock;
  return info;
}

}  // namespace

void gemm_s4s4_s32_tn_sm80(const GemmS4S4Params& p, int32_t* c, cudaStream_t stream) {
  check_params("gemm_s4s4_s32_tn_sm80", p, c);
  // K = 0 goes through the kernel too: it writes acc = 0 without reading A or B.
  launch(p, EpiDequantBias{}, c, stream);
}

void gemm_s4s4_s32_tn_dequant_sm80(const GemmS4S4Params& p, const EpiDequantBias& epi, bf16_t* y,
                                   cudaStream_t stream) {
  // bf16_t and __nv_bfloat16 are both one 16-bit bfloat16 pattern.
  static_assert(sizeof(bf16_t) == sizeof(__nv_bfloat16) && alignof(bf16_t) == alignof(__nv_bfloat16));
  const char* fn = "gemm_s4s4_s32_tn_dequant_sm80 (bf16)";
  check_params(fn, p, y);
  check_epilogue(fn, epi);
  launch(p, epi, reinterpret_cast<__nv_bfloat16*>(y), stream);
}

void gemm_s4s4_s32_tn_dequant_sm80(const GemmS4S4Params& p, const EpiDequantBias& epi, float* y,
                                   cudaStream_t stream) {
  const char* fn = "gemm_s4s4_s32_tn_dequant_sm80 (f32)";
  check_params(fn, p, y);
  check_epilogue(fn, epi);
  launch(p, epi, y, stream);
}

GemmS4S4Sm80KernelInfo gemm_s4s4_s32_tn_sm80_kernel_info(GemmS4S4Out out) {
  const char* fn = "gemm_s4s4_s32_tn_sm80_kernel_info";
  switch (out) {
    case GemmS4S4Out::s32: return kernel_info<int32_t>(fn);
    case GemmS4S4Out::bf16: return kernel_info<__nv_bfloat16>(fn);
    case GemmS4S4Out::f32: return kernel_info<float>(fn);
  }
  NB_FAIL(fn << ": unknown output kind " << static_cast<int>(out));
}

}  // namespace nibble::cuda
