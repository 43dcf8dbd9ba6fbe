// Kernels of the linear layer's backward (hq_linear_kernels.h): the fused side-channel pass
// (STE mask, LSQ δ̃ sum, inverse block Hadamard), its deterministic finalisation, the codes'
// unpack-transpose for the dw GEMM, column sums for db, and the sampled variant's gathers and
// its dw re-quantization.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "cuda/common/check.h"
#include "cuda/linear/hadamard_warp.cuh"
#include "cuda/linear/hq_linear_kernels.h"
#include "cuda/quant/bitsplit.h"
#include "cuda/quant/device_util.h"
#include "cuda/quant/launch_checks.h"
#include "cuda/quant/philox16.cuh"

namespace nibble::cuda::linear_detail {
namespace {

constexpr int kTileRows = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

// ---- mask + δ̃ + Hadamard ----------------------------------------------------------------------

// Thread blocks walk the tiles of the E = 8 tiling (hadamard_warp.cuh) t = blockIdx.x,
// blockIdx.x + gridDim.x, ... (row-major tile order): a fixed grid of at most kMaxMaskBlocks
// blocks, independent of the device, so the partial sums (and dsx, dsw) are the same on every
// run and every GPU.
constexpr int64_t kMaxMaskBlocks = 2048;

int chunks8_for(int64_t block) {
  return block <= kChunkCols8 ? 1 : static_cast<int>(block / kChunkCols8);
}

int64_t mask_col_tiles(int64_t cols, int chunks) {
  return detail::ceil_div(cols, static_cast<int64_t>(kChunkCols8) * chunks);
}

int64_t mask_tiles(int64_t rows, int64_t cols, int chunks) {
  const int tile_rows = chunks == 1 ? kTileRows8<1> : (chunks == 2 ? kTileRows8<2> : kTileRows8<4>);
  return detail::ceil_div(rows, static_cast<int64_t>(tile_rows)) * mask_col_tiles(cols, chunks);
}

// One batch of a warp: R rows × J chunks of 8 gradients and their 8 codes and side-channel
// nibbles (one 32-bit word each).
template <int R, int J>
struct MaskBatch {
  float g[R][J][kLaneCols8];
  uint32_t qw[R][J], ew[R][J];
};

// The source of g (LsqMaskHadamardParams): dense f32, the sampled backward's gathered rows
// (g = hi row pos[r] + lo row pos[rows + r] of `gathered`, absent rows read 0), or an int32
// product dequantized here. B: the Hadamard block.
enum class MaskSource { dense, gathered, acc };

template <class OutT, int J, int B, MaskSource kSrc>
__global__ void __launch_bounds__(kThreads)
    lsq_mask_hadamard_kernel(LsqMaskHadamardParams<OutT> p, float norm, int64_t col_tiles,
                             int64_t tiles) {
  constexpr int R = kRowsPerBatch8<J>;
  constexpr int TR = kTileRows8<J>;
  constexpr bool kGathered = kSrc == MaskSource::gathered;
  constexpr bool kExact = kSrc == MaskSource::acc;
  __shared__ double warp_part[kWarps];
  __shared__ unsigned long long warp_exact[kWarps];
  // δ̃ as fp64, by table (no division per element): entry e + 8 (e in [−7, 7]) holds
  // float(e) / 14 (one IEEE fp32 division, the reference's), entry 24 + q the clipped δ = q.
  __shared__ double delta_tab[32];
  if (threadIdx.x < 32) {
    const int i = static_cast<int>(threadIdx.x);
    delta_tab[i] = i < 16 ? static_cast<double>(__fdiv_rn(static_cast<float>(i - 8),
                                                          static_cast<float>(kLsqResidualSteps)))
                          : static_cast<double>(i - 24);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t half_cols = p.cols / 2;
  double acc = 0.0;  // Σ g·δ̃ of this thread's elements, in its fixed visiting order
  // the acc source: Σ acc·w (exact; two's-complement wrap-around cancels, see the reference)
  unsigned long long exact = 0;
  // the dequant epilogue's scale sa·sb (one fp32 product)
  const float scale = kExact ? __fmul_rn(p.scale_a[0], p.scale_b[0]) : 0.0f;

  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t r0 = (t / col_tiles) * TR;
    const int64_t c0 = (t % col_tiles) * kChunkCols8 * J;
    bool in_cols[J];  // chunk j of this lane lies inside the matrix (8 | c and 16 | cols)
#pragma unroll
    for (int j = 0; j < J; ++j) in_cols[j] = c0 + kChunkCols8 * j + kLaneCols8 * lane < p.cols;
    // rows % 16 == 0 and R | 16: a batch whose first row is in range has all R rows in range
    const auto batch_in_range = [&](int rb) { return rb < TR && r0 + rb < p.rows; };
    const auto load_batch = [&](int rb, MaskBatch<R, J>& b) {
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int64_t row = r0 + rb + i;
        int32_t pa = -1, pb = -1;
        if constexpr (kGathered) {
          pa = p.pos[row];
          pb = p.pos[p.rows + row];
        }
#pragma unroll
        for (int j = 0; j < J; ++j) {
          const int64_t c = c0 + kChunkCols8 * j + kLaneCols8 * lane;
          b.qw[i][j] = 0;
          b.ew[i][j] = 0;
#pragma unroll
          for (int k = 0; k < kLaneCols8; ++k) b.g[i][j][k] = 0.0f;
          if (!in_cols[j]) continue;
          if constexpr (kExact) {
            // the int32 bits ride in the float slots until the arithmetic below
            uint32_t raw[kRawWords<float>];
            load_raw8(reinterpret_cast<const float*>(p.acc) + row * p.cols + c, raw);
            widen8(raw, b.g[i][j]);
          } else if constexpr (!kGathered) {
            uint32_t raw[kRawWords<float>];
            load_raw8(p.g_t + row * p.cols + c, raw);
            widen8(raw, b.g[i][j]);
          } else {
            // g_t = hi contribution + lo contribution (one fp32 addition; absent rows read 0)
            uint32_t ra[kRawWords<float>] = {}, rbw[kRawWords<float>] = {};
            if (pa >= 0) load_raw8(p.gathered + static_cast<int64_t>(pa) * p.cols + c, ra);
            if (pb >= 0) load_raw8(p.gathered + static_cast<int64_t>(pb) * p.cols + c, rbw);
#pragma unroll
            for (int k = 0; k < kLaneCols8; ++k)
              b.g[i][j][k] = __fadd_rn(__uint_as_float(ra[k]), __uint_as_float(rbw[k]));
          }
          const int64_t pidx = row * half_cols + c / 2;
          b.qw[i][j] = __ldg(reinterpret_cast<const uint32_t*>(p.q_packed + pidx));
          b.ew[i][j] = __ldg(reinterpret_cast<const uint32_t*>(p.e_packed + pidx));
        }
      }
    };

    MaskBatch<R, J> cur;
    int rb = warp * R;
    if (batch_in_range(rb)) load_batch(rb, cur);
#pragma unroll 1
    for (; batch_in_range(rb); rb += kWarps * R) {
      // the next batch's loads go out before this batch's arithmetic (the dense source; the
      // gathered one adds its two rows at load time, so it loads in turn)
      MaskBatch<R, J> next;
      if (!kGathered && batch_in_range(rb + kWarps * R)) load_batch(rb + kWarps * R, next);
      if (kGathered && rb != warp * R) load_batch(rb, cur);
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int64_t row = r0 + rb + i;
#pragma unroll
        for (int j = 0; j < J; ++j) {
          if (!in_cols[j]) continue;
#pragma unroll
          for (int k = 0; k < kLaneCols8; ++k) {
            const int e = nibble_at(cur.ew[i][j], k);
            const bool clipped = e == kLsqClipped;
            float g;
            if constexpr (kExact) {
              // g = float(acc)·(sa·sb), as the dequant epilogue; Σ acc·w exactly
              const int32_t a = __float_as_int(cur.g[i][j][k]);
              g = __fmul_rn(__int2float_rn(a), scale);
              const int w = clipped ? kLsqResidualSteps * nibble_at(cur.qw[i][j], k) : e;
              exact += static_cast<unsigned long long>(static_cast<long long>(a) * w);
            } else {
              g = cur.g[i][j][k];
              // Σ g·δ̃ in fp64 (the product of two fp32 values is exact in fp64)
              const double delta = delta_tab[clipped ? 24 + nibble_at(cur.qw[i][j], k) : e + 8];
              acc = __dadd_rn(acc, __dmul_rn(static_cast<double>(g), delta));
            }
            // STE: ∂v̂/∂v = 1[e ≠ −8]
            cur.g[i][j][k] = clipped ? 0.0f : g;
          }
        }
        // back to the original domain: ·Hᵀ = ·H (symmetric), then × 2^(−k/2)
        hadamard_warp<J, B>(cur.g[i], lane, B);
#pragma unroll
        for (int j = 0; j < J; ++j) {
          if (!in_cols[j]) continue;
#pragma unroll
          for (int k = 0; k < kLaneCols8; ++k) cur.g[i][j][k] = __fmul_rn(cur.g[i][j][k], norm);
          store8(p.out + row * p.cols + c0 + kChunkCols8 * j + kLaneCols8 * lane, cur.g[i][j]);
        }
      }
      if constexpr (!kGathered) cur = next;
    }
  }
  if constexpr (kExact) {
    exact = static_cast<unsigned long long>(detail::warp_sum(static_cast<long long>(exact)));
    if (lane == 0) warp_exact[warp] = exact;
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long total = 0;
      for (int w = 0; w < kWarps; ++w) total += warp_exact[w];
      p.exact_partials[blockIdx.x] = static_cast<int64_t>(total);
    }
  } else {
    acc = detail::warp_sum(acc);
    if (lane == 0) warp_part[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0.0;
      for (int w = 0; w < kWarps; ++w) total = __dadd_rn(total, warp_part[w]);
      p.partials[blockIdx.x] = total;
    }
  }
}

// Block 0 finalises a, block 1 finalises b. fp: thread t adds partials t, t + 256, ... in
// order, then a fixed butterfly and the 8 warp totals in order: out = float(g · Σ). exact: the
// same walk in int64 (any order is exact), out = float(g · ((S · T) / 14)). g = 1/sqrt(qmax·n).
__global__ void __launch_bounds__(kThreads)
    lsq_finalize_kernel(LsqSumParts a, LsqSumParts b, int32_t qmax) {
  __shared__ double warp_part[kWarps];
  __shared__ unsigned long long warp_exact[kWarps];
  const LsqSumParts& s = blockIdx.x == 0 ? a : b;
  double acc = 0.0;
  unsigned long long exact = 0;
  for (int64_t i = threadIdx.x; i < s.count; i += kThreads) {
    if (s.exact != nullptr) exact += static_cast<unsigned long long>(s.exact[i]);
    else acc = __dadd_rn(acc, s.fp[i]);
  }
  acc = detail::warp_sum(acc);
  exact = static_cast<unsigned long long>(detail::warp_sum(static_cast<long long>(exact)));
  if ((threadIdx.x & 31) == 0) {
    warp_part[threadIdx.x >> 5] = acc;
    warp_exact[threadIdx.x >> 5] = exact;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    unsigned long long total_exact = 0;
    for (int w = 0; w < kWarps; ++w) {
      total = __dadd_rn(total, warp_part[w]);
      total_exact += warp_exact[w];
    }
    if (s.exact != nullptr) {
      // (double(S) · double(T)) / 14, ref::lsq_backward_exact's expression
      const float scale = __fmul_rn(s.scale_a[0], s.scale_b[0]);
      total = __ddiv_rn(__dmul_rn(static_cast<double>(scale),
                                  static_cast<double>(static_cast<long long>(total_exact))),
                        static_cast<double>(kLsqResidualSteps));
    }
    // g = 1 / sqrt(qmax · numel), the reference's fp64 expression
    const double g = __ddiv_rn(1.0, __dsqrt_rn(__dmul_rn(static_cast<double>(qmax),
                                                         static_cast<double>(s.numel))));
    *s.out = __double2float_rn(__dmul_rn(g, total));
  }
}

// ---- unpack + transpose ---------------------------------------------------------------------

constexpr int kTileCols = 128;

// out_t[c, r] from packed[r, c/2] over 128 × 64 tiles: lane 8w + l of a warp unpacks one
// 32-bit word (8 codes, columns 8l .. 8l + 7) of row 4·(warp step) + w, then the tile leaves
// as 4 × 4 byte blocks; each column gets 128 contiguous bytes per tile (a whole cache line:
// the 32-row tiles of before wrote 32-byte pieces and reached 30% of DRAM bandwidth, ncu).
constexpr int kUnpackRows = 128;
constexpr int kUnpackCols = 64;

__global__ void __launch_bounds__(kThreads)
    unpack_s4_transpose_kernel(const uint8_t* __restrict__ packed, int64_t rows, int64_t cols,
                               int8_t* __restrict__ out_t) {
  __shared__ __align__(16) int8_t tile[kUnpackRows][kUnpackCols + 4];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kUnpackRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kUnpackCols;
  const int64_t c = c0 + 8 * (lane & 7);  // cols % 16 == 0: all 8 columns or none
#pragma unroll
  for (int rr = warp * 4 + (lane >> 3); rr < kUnpackRows; rr += kWarps * 4) {
    const int64_t row = r0 + rr;
    uint32_t lo = 0, hi = 0;
    if (row < rows && c < cols) {
      const uint32_t w =
          __ldg(reinterpret_cast<const uint32_t*>(packed + row * (cols / 2) + c / 2));
      lo = unpack_s4x4(w & 0xffffu);
      hi = unpack_s4x4(w >> 16);
    }
    auto* dst = reinterpret_cast<uint32_t*>(&tile[rr][8 * (lane & 7)]);
    dst[0] = lo;
    dst[1] = hi;
  }
  __syncthreads();
  detail::store_tile_transposed<kUnpackRows, kUnpackCols, kThreads>(tile, r0, c0, rows, cols,
                                                                    out_t);
}

// ---- column sums --------------------------------------------------------------------------------

// out[c] = float(Σ_chunks partials[chunk, c]): a block finalises 32 columns; warp w adds the
// chunks w, w + 8, ... of column 32·blockIdx.x + lane in order, then thread `lane` adds the 8
// warp sums in order (a fixed order: deterministic). Before, one thread per column walked
// all chunks in one dependent chain (16 blocks at C = 4096: 9.8 µs for a 2 MB read, ncu).
__global__ void __launch_bounds__(kThreads)
    column_finalize_kernel(const double* __restrict__ partials, int64_t chunks, int64_t cols,
                           float* __restrict__ out) {
  __shared__ double sh[kWarps][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  double total = 0.0;
  if (col < cols) {
    for (int64_t ch = warp; ch < chunks; ch += kWarps)
      total = __dadd_rn(total, partials[ch * cols + col]);
  }
  sh[warp][lane] = total;
  __syncthreads();
  if (warp == 0 && col < cols) {
    double sum = 0.0;
    for (int w = 0; w < kWarps; ++w) sum = __dadd_rn(sum, sh[w][lane]);
    out[col] = __double2float_rn(sum);
  }
}

// ---- sampled-LSS helpers ---------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    row_norms_packed_kernel(const uint8_t* __restrict__ packed, int64_t rows, int64_t cols,
                            const float* scale, float* __restrict__ norms) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const uint8_t* pr = packed + row * (cols / 2);
  long long sum = 0;
  for (int64_t b = lane; b < cols / 2; b += 32) {
    const int lo = nibble_at(pr[b], 0), hi = nibble_at(pr[b], 1);
    sum += lo * lo + hi * hi;
  }
  sum = detail::warp_sum(sum);
  if (lane == 0) {
    // float(sqrt(Σ)) (fp64 sqrt, one rounding), then × scale in fp32: ref::row_norms_s8 · sx
    float nrm = __double2float_rn(__dsqrt_rn(static_cast<double>(sum)));
    if (scale != nullptr) nrm = __fmul_rn(nrm, scale[0]);
    norms[row] = nrm;
  }
}

// f_i = float(β_i) / p_i of split row i (β = 14 for hi rows i < n, 1 for lo rows): one IEEE
// division, as ref::requantize_sampled_rows.
__device__ __forceinline__ float split_weight(int64_t i, int64_t n, const float* p) {
  return __fdiv_rn(i < n ? static_cast<float>(kBitSplitBase) : 1.0f, p[i]);
}

// One warp per kept-list entry j (index −1: padding, skipped): m = max_c |code_i[c]|, then
// dw_scale[0] = max over rows of f_i·m (atomicMax on the bit pattern: a ≥ 0 orders like an
// unsigned). fp32 rounding is monotonic, so f·max|code| = max|f·code|: the reference's max
// over the elements a_i[c].
__global__ void __launch_bounds__(kThreads)
    dw_row_max_kernel(const int8_t* __restrict__ hi, const int8_t* __restrict__ lo, int64_t n,
                      int64_t cols, const int32_t* __restrict__ index, int64_t k,
                      const float* __restrict__ p, float* dw_scale) {
  const int lane = threadIdx.x & 31;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (j >= k) return;  // whole warps leave together
  const int64_t i = index[j];
  if (i < 0) return;
  const int8_t* row = i < n ? hi + i * cols : lo + (i - n) * cols;  // 16-byte aligned rows
  int m = 0;
  for (int64_t c = 16 * lane; c < cols; c += 16 * 32) {
    const uint4 w = *reinterpret_cast<const uint4*>(row + c);
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      const int v = static_cast<int8_t>(words[b / 4] >> (8 * (b % 4)));
      m = max(m, v < 0 ? -v : v);
    }
  }
  for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(detail::kFullMask, m, o));
  if (lane == 0) {
    const float a = __fmul_rn(split_weight(i, n, p), static_cast<float>(m));
    atomicMax(reinterpret_cast<unsigned int*>(dw_scale), __float_as_uint(a));
  }
}

// t = max|a| / 127 (IEEE division; 1 when no row is kept), and t·s for the GEMM epilogue.
__global__ void dw_scale_finalize_kernel(const float* __restrict__ split_scale, float* dw_scale,
                                         uint64_t* status) {
  const float a_max = dw_scale[0];
  const float t = a_max > 0.0f ? __fdiv_rn(a_max, 127.0f) : 1.0f;
  // β/p overflowed fp32 (a kept row with a vanishing p): the reference throws here
  if (!detail::is_finite(t)) detail::report(status, StatusKind::bad_scale, 1);
  dw_scale[0] = t;
  dw_scale[1] = __fmul_rn(t, split_scale[0]);
}

// Transposed gathers through a 32 (kept rows j) × 128 (columns) tile, in the layout of
// unpack_s4_transpose_kernel: a lane reads 4 consecutive columns c .. c+3 of a kept row (one
// 32-bit word of codes, or one 16-bit word of packed nibbles) and writes them to the tile as one
// word; then 4-row column segments leave as 32-bit words (k % 4 == 0: k is a multiple of 16).
// kind 0: split row i re-quantized with its 1/p weight (ref::requantize_sampled_rows):
//           q = clamp(floor(f_i·code / t + u), −127, 127),  u = philox_uniform(key, i·cols + c)
//         (u is indexed by the split element, so it does not depend on the compaction). The
//         4 indices i·cols + c .. +3 (c % 4 == 0, cols % 16 == 0) are the 4 words of one
//         Philox block (rng.h philox_u32), so a lane runs one block per 4 elements: measured
//         with one block per element the kernel was issue-bound on the Philox rounds.
// kind 1: x codes from packed s4 (row i mod n).
template <int kKind>
__global__ void __launch_bounds__(kThreads)
    gather_t_kernel(const int8_t* __restrict__ hi, const int8_t* __restrict__ lo,
                    const uint8_t* __restrict__ x_packed, int64_t n, int64_t cols,
                    const int32_t* __restrict__ index, int64_t k, const float* __restrict__ p,
                    const float* __restrict__ dw_scale, PhiloxSchedule sched,
                    int8_t* __restrict__ out) {
  __shared__ __align__(16) int8_t tile[kTileRows][kTileCols + 4];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileCols;
  const int64_t c = c0 + 4 * lane;  // cols % 16 == 0: the 4 columns are all in range or none
  float t = 1.0f;
  if constexpr (kKind == 0) t = dw_scale[0];
  for (int jj = warp; jj < kTileRows; jj += kWarps) {
    const int64_t j = j0 + jj;
    const int64_t src = j < k ? index[j] : -1;
    uint32_t word = 0;
    if (src >= 0 && c < cols) {
      if constexpr (kKind == 0) {
        const float f = split_weight(src, n, p);
        const int8_t* row = src < n ? hi + src * cols : lo + (src - n) * cols;
        const uint32_t codes = *reinterpret_cast<const uint32_t*>(row + c);
        const Philox4 r = philox16::block(sched, static_cast<uint64_t>(src * cols + c) >> 2);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int code = static_cast<int8_t>(codes >> (8 * e));
          // a = f·code, then floor(a / t + u): each an IEEE fp32 operation, no contraction;
          // u = (word >> 8)·2^-24, philox_uniform's grid
          const float a = __fmul_rn(f, static_cast<float>(code));
          const float u = static_cast<float>(r.v[e] >> 8) * (1.0f / 16777216.0f);
          const float v = floorf(__fadd_rn(__fdiv_rn(a, t), u));
          const int q = static_cast<int>(fminf(fmaxf(v, -127.0f), 127.0f));
          word |= (static_cast<uint32_t>(q) & 0xffu) << (8 * e);
        }
      } else {
        const int64_t r = src < n ? src : src - n;
        word = unpack_s4x4(*reinterpret_cast<const uint16_t*>(x_packed + r * (cols / 2) + c / 2));
      }
    }
    *reinterpret_cast<uint32_t*>(&tile[jj][4 * lane]) = word;
  }
  __syncthreads();
  // out is [cols, k]
  detail::store_tile_transposed<kTileRows, kTileCols, kThreads>(tile, j0, c0, k, cols, out);
}

// out[j, :] = hi[i, :] | lo[i − n, :] | 0, 16 bytes per thread.
__global__ void __launch_bounds__(kThreads)
    gather_split_rows_kernel(const int8_t* __restrict__ hi, const int8_t* __restrict__ lo,
                             int64_t n, int64_t cols, const int32_t* __restrict__ index, int64_t k,
                             int8_t* __restrict__ out) {
  const int64_t vecs = cols / 16;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= k * vecs) return;
  const int64_t j = t / vecs, v = t % vecs;
  const int64_t src = index[j];
  uint4 val = make_uint4(0, 0, 0, 0);
  if (src >= 0) {
    const int8_t* row = src < n ? hi + src * cols : lo + (src - n) * cols;
    val = *reinterpret_cast<const uint4*>(row + 16 * v);
  }
  *reinterpret_cast<uint4*>(out + j * cols + 16 * v) = val;
}

__global__ void dx_coefs_kernel(const int32_t* __restrict__ index, int64_t k,
                                const float* __restrict__ p, const float* __restrict__ split_scale,
                                int64_t n, float* __restrict__ coef, int32_t* __restrict__ pos) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k) return;
  const int64_t i = index[j];
  if (i < 0) {
    coef[j] = 0.0f;
    return;
  }
  // row_scale / p in fp64 (the reference's wh, wl), rounded once to fp32
  const double s = static_cast<double>(split_scale[0]);
  const double row_scale = i < n ? static_cast<double>(kBitSplitBase) * s : s;
  coef[j] = __double2float_rn(__ddiv_rn(row_scale, static_cast<double>(p[i])));
  pos[i] = static_cast<int32_t>(j);
}

__global__ void check_sample_capacity_kernel(const int32_t* __restrict__ counts, int64_t capacity,
                                             uint64_t* status) {
  const int64_t k = counts[0] > counts[2] ? counts[0] : counts[2];
  if (k > capacity) detail::report(status, StatusKind::capacity, static_cast<uint64_t>(k));
}

unsigned blocks_for(int64_t count, int threads) {
  return static_cast<unsigned>(detail::ceil_div(count, threads));
}

}  // namespace

int64_t lsq_partials_count(int64_t rows, int64_t cols, int64_t block) {
  return std::min(mask_tiles(rows, cols, chunks8_for(block)), kMaxMaskBlocks);
}

template <class OutT>
static void lsq_mask_hadamard_impl(const LsqMaskHadamardParams<OutT>& p, cudaStream_t stream) {
  const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.block)));
  dispatch_block8(p.block, [&](auto jc, auto bc) {
    constexpr int J = decltype(jc)::value;
    constexpr int B = decltype(bc)::value;
    const int64_t col_tiles = mask_col_tiles(p.cols, J);
    const int64_t tiles = mask_tiles(p.rows, p.cols, J);
    const auto blocks = static_cast<unsigned>(std::min(tiles, kMaxMaskBlocks));
    if (p.gathered != nullptr) {
      lsq_mask_hadamard_kernel<OutT, J, B, MaskSource::gathered>
          <<<blocks, kThreads, 0, stream>>>(p, norm, col_tiles, tiles);
    } else if (p.acc != nullptr) {
      lsq_mask_hadamard_kernel<OutT, J, B, MaskSource::acc>
          <<<blocks, kThreads, 0, stream>>>(p, norm, col_tiles, tiles);
    } else {
      lsq_mask_hadamard_kernel<OutT, J, B, MaskSource::dense>
          <<<blocks, kThreads, 0, stream>>>(p, norm, col_tiles, tiles);
    }
  });
  NB_CUDA_CHECK_LAUNCH();
}
void lsq_mask_hadamard(const LsqMaskHadamardParams<float>& p, cudaStream_t stream) {
  lsq_mask_hadamard_impl(p, stream);
}
void lsq_mask_hadamard(const LsqMaskHadamardParams<bf16_t>& p, cudaStream_t stream) {
  lsq_mask_hadamard_impl(p, stream);
}

void lsq_finalize(const LsqSumParts& a, const LsqSumParts& b, int32_t qmax, cudaStream_t stream) {
  for (const LsqSumParts* s : {&a, &b}) {
    NB_CHECK(s->out != nullptr && s->count > 0 && s->numel > 0 &&
                 (s->fp != nullptr) != (s->exact != nullptr) &&
                 (s->exact == nullptr || (s->scale_a != nullptr && s->scale_b != nullptr)),
             "lsq_finalize: each sum needs out, a positive count and numel, and exactly one of "
             "fp and exact partials (exact with scale_a and scale_b)");
  }
  lsq_finalize_kernel<<<2, kThreads, 0, stream>>>(a, b, qmax);
  NB_CUDA_CHECK_LAUNCH();
}

void unpack_s4_transpose(const uint8_t* packed, int64_t rows, int64_t cols, int8_t* out_t,
                         cudaStream_t stream) {
  NB_CHECK(rows > 0 && cols > 0 && rows % 4 == 0 && cols % 16 == 0,
           "linear_detail::unpack_s4_transpose: shape [" << rows << ", " << cols
               << "] needs rows % 4 == 0 and cols % 16 == 0");
  const int64_t row_tiles = detail::ceil_div(rows, static_cast<int64_t>(kUnpackRows));
  const int64_t col_tiles = detail::ceil_div(cols, static_cast<int64_t>(kUnpackCols));
  NB_CHECK(row_tiles <= 2147483647 && col_tiles <= 65535,
           "linear_detail::unpack_s4_transpose: shape [" << rows << ", " << cols
                                                         << "] exceeds the grid limits");
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
  unpack_s4_transpose_kernel<<<grid, kThreads, 0, stream>>>(packed, rows, cols, out_t);
  NB_CUDA_CHECK_LAUNCH();
}

void column_sums_finalize(const double* partials, int64_t chunks, int64_t cols, float* out,
                          cudaStream_t stream) {
  const char* fn = "linear_detail::column_sums_finalize";
  NB_CHECK(chunks > 0 && cols > 0,
           fn << ": partials [" << chunks << ", " << cols << "] must have positive extents");
  detail::check_device_pointer(partials, chunks * cols, fn, "partials [chunks, cols]");
  detail::check_device_pointer(out, cols, fn, "out [cols]");
  const int64_t blocks = detail::ceil_div(cols, int64_t{32});
  detail::check_grid_extent(blocks, fn, "the column tiling");
  column_finalize_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(partials, chunks,
                                                                               cols, out);
  NB_CUDA_CHECK_LAUNCH();
}

void row_norms_packed(const uint8_t* packed, int64_t rows, int64_t cols, const float* scale,
                      float* norms, cudaStream_t stream) {
  row_norms_packed_kernel<<<blocks_for(rows, kWarps), kThreads, 0, stream>>>(packed, rows, cols,
                                                                             scale, norms);
  NB_CUDA_CHECK_LAUNCH();
}

void sampled_dw_scale(const int8_t* hi, const int8_t* lo, int64_t n, int64_t cols,
                      const int32_t* index, int64_t k, const float* p, const float* split_scale,
                      float* dw_scale, uint64_t* status, cudaStream_t stream) {
  NB_CUDA_CHECK(cudaMemsetAsync(dw_scale, 0, sizeof(float), stream));  // max|a| starts at +0
  if (k > 0) {
    dw_row_max_kernel<<<blocks_for(k, kWarps), kThreads, 0, stream>>>(hi, lo, n, cols, index, k,
                                                                      p, dw_scale);
    NB_CUDA_CHECK_LAUNCH();
  }
  dw_scale_finalize_kernel<<<1, 1, 0, stream>>>(split_scale, dw_scale, status);
  NB_CUDA_CHECK_LAUNCH();
}

void gather_weighted_split_t(const int8_t* hi, const int8_t* lo, int64_t n, int64_t cols,
                             const int32_t* index, int64_t k, const float* p,
                             const float* dw_scale, const PhiloxKey& key, int8_t* out,
                             cudaStream_t stream) {
  NB_CHECK(k % 16 == 0 && cols % 16 == 0, "gather_weighted_split_t: k = " << k << " and cols = "
                                              << cols << " must be multiples of 16");
  if (k == 0) return;
  const dim3 grid(static_cast<unsigned>(detail::ceil_div(k, kTileRows)),
                  static_cast<unsigned>(detail::ceil_div(cols, kTileCols)));
  // the stream's round keys, once per launch (rng.h philox_schedule): constant-bank operands
  gather_t_kernel<0><<<grid, kThreads, 0, stream>>>(hi, lo, nullptr, n, cols, index, k, p,
                                                    dw_scale, philox_schedule(key), out);
  NB_CUDA_CHECK_LAUNCH();
}

void gather_x_t(const uint8_t* x_packed, int64_t n, int64_t d, const int32_t* index, int64_t k,
                int8_t* out, cudaStream_t stream) {
  NB_CHECK(k % 16 == 0 && d % 16 == 0,
           "gather_x_t: k = " << k << " and d = " << d << " must be multiples of 16");
  if (k == 0) return;
  const dim3 grid(static_cast<unsigned>(detail::ceil_div(k, kTileRows)),
                  static_cast<unsigned>(detail::ceil_div(d, kTileCols)));
  gather_t_kernel<1><<<grid, kThreads, 0, stream>>>(nullptr, nullptr, x_packed, n, d, index, k,
                                                    nullptr, nullptr, PhiloxSchedule{}, out);
  NB_CUDA_CHECK_LAUNCH();
}

void gather_split_rows(const int8_t* hi, const int8_t* lo, int64_t n, int64_t cols,
                       const int32_t* index, int64_t k, int8_t* out, cudaStream_t stream) {
  if (k == 0) return;
  gather_split_rows_kernel<<<blocks_for(k * (cols / 16), kThreads), kThreads, 0, stream>>>(
      hi, lo, n, cols, index, k, out);
  NB_CUDA_CHECK_LAUNCH();
}

void dx_coefs(const int32_t* index, int64_t k, const float* p, const float* split_scale, int64_t n,
              float* coef, int32_t* pos, cudaStream_t stream) {
  NB_CUDA_CHECK(cudaMemsetAsync(pos, 0xff, static_cast<size_t>(2 * n) * sizeof(int32_t), stream));
  if (k == 0) return;
  dx_coefs_kernel<<<blocks_for(k, kThreads), kThreads, 0, stream>>>(index, k, p, split_scale, n,
                                                                    coef, pos);
  NB_CUDA_CHECK_LAUNCH();
}

void check_sample_capacity(const int32_t* counts, int64_t capacity, uint64_t* status,
                           cudaStream_t stream) {
  if (status == nullptr) return;
  check_sample_capacity_kernel<<<1, 1, 0, stream>>>(counts, capacity, status);
  NB_CUDA_CHECK_LAUNCH();
}

}  // namespace nibble::cuda::linear_detail
