// Bit splitting, leverage scores and row selection on the GPU (twins of ref/bitsplit.cpp).
#include <cmath>
#include <cstdint>

#include "cuda/common/check.h"
#include "cuda/quant/bitsplit.h"
#include "cuda/quant/device_util.h"
#include "cuda/quant/launch_checks.h"
#include "cuda/quant/philox16.cuh"

namespace nibble::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 32;       // bitsplit / gather tiles: 32 rows × 128 columns
constexpr int kTileCols = 128;
constexpr int kPerLane = kTileCols / 32;
constexpr int kBlockThreads = 1024; // single-block kernels (fit_probabilities, row selection)
constexpr int kMaxGridStride = 1024;

// ---- bitsplit -------------------------------------------------------------------------------

// First pass: scale[1] = max(0, max_i |g_i|). Non-negative floats order like their bit
// patterns, so an unsigned atomicMax is an exact float max (scale[1] starts at +0), and so is
// an unsigned max of |g|'s bit patterns inside a thread (a bf16's pattern is the top half of
// its fp32 one: two of them at once by __vmaxu2).
//
// vec (g 16-byte aligned): each thread reads 16-byte vectors, four in flight per iteration
// (one 2-byte load per thread and step left the pass latency-bound: ~4 KB in flight per SM);
// a vector with a NaN/Inf (its largest |pattern| ≥ the infinity pattern) is re-read element by
// element to report them. The n % (16 / sizeof(T)) tail and unaligned g take the scalar loop.
template <class T>
__device__ __forceinline__ uint32_t abs_bits(T v) {
  return __float_as_uint(fabsf(detail::to_f32(v)));
}

template <class T>
__device__ __forceinline__ uint32_t vector_abs_max(const uint4& w) {
  if constexpr (sizeof(T) == 4) {
    return max(max(w.x & 0x7fffffffu, w.y & 0x7fffffffu),
               max(w.z & 0x7fffffffu, w.w & 0x7fffffffu));
  } else {
    const uint32_t m2 = __vmaxu2(__vmaxu2(w.x & 0x7fff7fffu, w.y & 0x7fff7fffu),
                                 __vmaxu2(w.z & 0x7fff7fffu, w.w & 0x7fff7fffu));
    return max(m2 & 0xffffu, m2 >> 16) << 16;
  }
}

template <class T>
__device__ __forceinline__ void absmax_scalar(const BitSplitParams<T>& p, int64_t i,
                                              uint32_t& m) {
  const uint32_t b = abs_bits(p.g[i]);
  if (b < 0x7f800000u) {
    m = max(m, b);
  } else {
    detail::report(p.status, StatusKind::nonfinite, static_cast<uint64_t>(i));
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) absmax_kernel(BitSplitParams<T> p, bool vec) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte vector
  constexpr int kInFlight = 4;
  __shared__ float warp_max[kWarps];
  const int64_t n = p.rows * p.cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  uint32_t mb = 0;  // max |g| bit pattern over the finite elements seen
  int64_t done = 0;  // elements [0, done) belong to the vector loop
  if (vec) {
    const int64_t nv = n / V;
    const uint4* gv = reinterpret_cast<const uint4*>(p.g);
    const auto take = [&](const uint4& w, int64_t v) {
      const uint32_t b = vector_abs_max<T>(w);
      if (b < 0x7f800000u) {
        mb = max(mb, b);
      } else {
        for (int e = 0; e < V; ++e) absmax_scalar(p, v * V + e, mb);
      }
    };
    int64_t v = tid;
    for (; v + (kInFlight - 1) * stride < nv; v += kInFlight * stride) {
      uint4 w[kInFlight];
#pragma unroll
      for (int k = 0; k < kInFlight; ++k) w[k] = gv[v + k * stride];
#pragma unroll
      for (int k = 0; k < kInFlight; ++k) take(w[k], v + k * stride);
    }
    for (; v < nv; v += stride) take(gv[v], v);
    done = nv * V;
  }
  for (int64_t i = done + tid; i < n; i += stride) absmax_scalar(p, i, mb);
  float m = __uint_as_float(mb);  // finite and ≥ 0: fmaxf below is exact
  m = detail::warp_max(m);
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) m = fmaxf(m, warp_max[w]);
    atomicMax(reinterpret_cast<unsigned int*>(p.scale + 1), __float_as_uint(m));
  }
}

// The first pass with column sums (col_partials set): block (x, y) reads rows
// [256·y, 256·y + 256) of columns [128·x, 128·x + 128); lane l holds columns 4l .. 4l + 3 and
// warp w adds rows w, w + 8, ... in fp64 (exact widening of each g), then the 8 warp sums are
// added in order: partials[y, c]. The max|g| bit pattern and the NaN/Inf reports are those of
// absmax_kernel (a 4-element vector with a non-finite pattern is re-read element by element).
template <class T>
__global__ void __launch_bounds__(kThreads) absmax_colsum_kernel(BitSplitParams<T> p) {
  __shared__ double sh[kWarps][kTileCols];
  __shared__ float warp_max[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileCols + 4 * lane;
  const int64_t rbeg = static_cast<int64_t>(blockIdx.y) * kBitSplitColumnChunkRows;
  const int64_t rend =
      rbeg + kBitSplitColumnChunkRows < p.rows ? rbeg + kBitSplitColumnChunkRows : p.rows;
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  uint32_t mb = 0;
  if (c < p.cols) {
    for (int64_t r = rbeg + warp; r < rend; r += kWarps) {
      const T* src = p.g + r * p.cols + c;
      float v[4];
      uint32_t b;
      if constexpr (sizeof(T) == 4) {
        const float4 w = *reinterpret_cast<const float4*>(src);
        v[0] = w.x, v[1] = w.y, v[2] = w.z, v[3] = w.w;
        b = max(max(__float_as_uint(w.x) & 0x7fffffffu, __float_as_uint(w.y) & 0x7fffffffu),
                max(__float_as_uint(w.z) & 0x7fffffffu, __float_as_uint(w.w) & 0x7fffffffu));
      } else {
        const uint2 w = *reinterpret_cast<const uint2*>(src);  // element 0 low
        v[0] = __uint_as_float(w.x << 16), v[1] = __uint_as_float(w.x & 0xffff0000u);
        v[2] = __uint_as_float(w.y << 16), v[3] = __uint_as_float(w.y & 0xffff0000u);
        const uint32_t m2 = __vmaxu2(w.x & 0x7fff7fffu, w.y & 0x7fff7fffu);
        b = max(m2 & 0xffffu, m2 >> 16) << 16;
      }
      if (b < 0x7f800000u) {
        mb = max(mb, b);
      } else {
        for (int k = 0; k < 4; ++k) absmax_scalar(p, r * p.cols + c + k, mb);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[k] = __dadd_rn(acc[k], static_cast<double>(v[k]));
    }
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) sh[warp][4 * lane + k] = acc[k];
  float m = detail::warp_max(__uint_as_float(mb));  // finite and ≥ 0: fmaxf is exact
  if (lane == 0) warp_max[warp] = m;
  __syncthreads();
  if (threadIdx.x < kTileCols) {
    const int64_t col = static_cast<int64_t>(blockIdx.x) * kTileCols + threadIdx.x;
    if (col < p.cols) {
      double total = 0.0;
      for (int w = 0; w < kWarps; ++w) total = __dadd_rn(total, sh[w][threadIdx.x]);
      p.col_partials[static_cast<int64_t>(blockIdx.y) * p.cols + col] = total;
    }
  }
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) m = fmaxf(m, warp_max[w]);
    atomicMax(reinterpret_cast<unsigned int*>(p.scale + 1), __float_as_uint(m));
  }
}

// The splitting arithmetic replaces rounding and int <-> float conversion instructions (FRND,
// F2I, I2F) by adds and bit operations (the pass is issue-bound); each replacement is exact.
// hi's magic: 1.5·2^23 + 32 (even, ulp 1 in [2^23, 2^24)): v + kHiMagic = rint(v) + kHiMagic
// for |v| ≤ 2^21, whose bit pattern is 0x4B400020 + rint(v). The +32 makes the combined code's
// byte come out of one multiply-add (see bitsplit_kernel).
constexpr float kHiMagic = 12582944.0f;
constexpr uint32_t kHiMagicBits = 0x4B400020u;

// The low bytes of a, b, c, d as one little-endian word (two byte permutes).
__device__ __forceinline__ uint32_t pack_bytes(int a, int b, int c, int d) {
  const uint32_t ab = __byte_perm(static_cast<uint32_t>(a), static_cast<uint32_t>(b), 0x0040);
  const uint32_t cd = __byte_perm(static_cast<uint32_t>(c), static_cast<uint32_t>(d), 0x0040);
  return __byte_perm(ab, cd, 0x5410);
}

// Byte 2 of a, b, c, d as one little-endian word (three byte permutes).
__device__ __forceinline__ uint32_t pack_bytes2(uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  const uint32_t ac = __byte_perm(a, c, 0x0062);  // bytes 0, 1: a.b2, c.b2
  const uint32_t bd = __byte_perm(b, d, 0x0062);  // bytes 0, 1: b.b2, d.b2
  return __byte_perm(ac, bd, 0x5140);
}

// The code scale of the second pass from scale[1] = max|g| (the first pass):
//   m = max(|min − 1e-8|, |max + 1e-8|) = max|g| + 1e-8 (fp32 rounding is monotonic),
//   scale1 = 196 / (2m) (one IEEE division per thread, none per element); `writer` (one thread
//   of the grid) also stores s = 2m / 196 in scale[0] for dequantization.
__device__ __forceinline__ float split_scale1(float* scale, bool writer) {
  const float m = __fadd_rn(scale[1], 1e-8f);
  const float m2 = __fmul_rn(2.0f, m);
  const float scale1 = __fdiv_rn(static_cast<float>(kBitSplitLevels), m2);
  if (writer) scale[0] = __fdiv_rn(m2, static_cast<float>(kBitSplitLevels));
  return scale1;
}

// One element's split as bit patterns (ref::bitsplit; U = 192 + u, philox16.cuh):
//   hb = bits(hm) = 0x4B400020 + hi,  yb = bits(y) with yb >> 16 = 0x4340 + lo,
//   comb: byte 2 is the combined code 14·hi + lo (see below).
struct SplitBits {
  uint32_t hb, yb, comb;
};
__device__ __forceinline__ SplitBits split_element(float g, float scale1, float U) {
  const float half = static_cast<float>(kBitSplitHalf);
  const float t = __fmul_rn(g, scale1);
  // clamp(rint(q), −6, 6) = rint(clamp(q, −6, 6)) (monotonic, integers fixed; NaN → −6):
  // a magic add instead of FRND/F2I; bits(hm) = 0x4B400020 + hi
  const float hm = __fadd_rn(fminf(fmaxf(__fmul_rn(t, kBitSplitInvBase), -half), half), kHiMagic);
  const float h = __fsub_rn(hm, kHiMagic);  // exact
  // ρ = T − 14·hi, exact (as the reference's t − 14·h)
  const float rho = __fmaf_rn(-static_cast<float>(kBitSplitBase), h, t);
  // 192 + floor(ρ + u) by one add rounded down (|ρ| ≤ 15), clamped to 192 ± 6 (floor and
  // clamp commute); bits(y) >> 16 = 0x4340 + lo (philox16.cuh)
  const float y = fminf(fmaxf(__fadd_rd(rho, U), 186.0f), 198.0f);
  SplitBits b;
  b.hb = __float_as_uint(hm);
  b.yb = __float_as_uint(y);
  // byte 2 of bits(y) + 14·bits(hm)·2^16 is (64 + lo) + 14·(32 + hi) = 14·hi + lo + 512
  // (mod 256): the combined code; nothing carries into byte 2 from below
  b.comb = b.yb + (b.hb * static_cast<uint32_t>(kBitSplitBase) << 16);
  return b;
}
__device__ __forceinline__ int hi_code(uint32_t hb) { return static_cast<int>(hb - kHiMagicBits); }
__device__ __forceinline__ int lo_code(uint32_t yb) { return static_cast<int>(yb >> 16) - 0x4340; }

// row_sumsq[row] += Σ over the warp of sum_hi, row_sumsq[rows + row] += Σ sum_lo: integer sums,
// exact and order-independent across the column tiles (every lane of the warp calls it:
// shuffles).
template <class T>
__device__ __forceinline__ void add_row_sumsq(const BitSplitParams<T>& p, int64_t row, int sum_hi,
                                              int sum_lo, int lane) {
  const long long h = detail::warp_sum(static_cast<long long>(sum_hi));
  const long long l = detail::warp_sum(static_cast<long long>(sum_lo));
  if (lane == 0) {
    atomicAdd(reinterpret_cast<unsigned long long*>(p.row_sumsq + row),
              static_cast<unsigned long long>(h));
    atomicAdd(reinterpret_cast<unsigned long long*>(p.row_sumsq + p.rows + row),
              static_cast<unsigned long long>(l));
  }
}

// Second pass over 32 × 128 tiles. Lane l holds the 4 consecutive columns 4l .. 4l+3 of a tile
// row; each warp loads 4 rows at once. vec: cols % 4 == 0 and aligned pointers, so a lane reads
// 4 gradients in one load and stores 4 codes as one word; otherwise the same mapping with
// scalar accesses. pair16 (vec and cols % 8 == 0): lanes 2m, 2m + 1 hold the 8 elements of one
// philox_uniform16 block per row, so each lane computes one block per two rows
// (philox16::pair); vec alone: one block per lane and row, half of it used; neither: one per
// element. Per element (ref::bitsplit):
//   s = 2m / 196 (returned), scale1 = 196 / (2m), m = max|g| + 1e-8;  T = g·scale1
//   hi = clamp(rint(T·fl(1/14)), −6, 6);  lo = clamp(floor(T − 14·hi + u), −6, 6) (exact sum)
//   combined = 14·hi + lo
template <class T>
__global__ void __launch_bounds__(kThreads)
    bitsplit_kernel(BitSplitParams<T> p, PhiloxSchedule sched, bool vec, bool pair16, bool vec_t,
                    bool vec16_t) {
  constexpr int kRowsPerWarp = kTileRows / kWarps;
  static_assert(kRowsPerWarp % 2 == 0, "rows come in pairs for philox16::pair");
  __shared__ __align__(16) int8_t tile[kTileRows][kTileCols + 4];  // +4: conflict-free columns
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileCols;
  const int64_t c = c0 + 4 * lane;  // this lane's first column
  const float scale1 =
      split_scale1(p.scale, blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0);

  const int rb = warp * kRowsPerWarp;
  float g[kRowsPerWarp][4];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t row = r0 + rb + i;
    if (row >= p.rows) break;
    const T* gr = p.g + row * p.cols;
    if (vec && c < p.cols) {
      if constexpr (sizeof(T) == 4) {
        const float4 v = *reinterpret_cast<const float4*>(gr + c);
        g[i][0] = v.x, g[i][1] = v.y, g[i][2] = v.z, g[i][3] = v.w;
      } else {
        const uint2 v = *reinterpret_cast<const uint2*>(gr + c);  // 4 bf16, element 0 low
        g[i][0] = __uint_as_float(v.x << 16), g[i][1] = __uint_as_float(v.x & 0xffff0000u);
        g[i][2] = __uint_as_float(v.y << 16), g[i][3] = __uint_as_float(v.y & 0xffff0000u);
      }
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) g[i][k] = c + k < p.cols ? detail::to_f32(gr[c + k]) : 0.0f;
    }
  }
  // The stream words of every row's 4 elements (rows past the end compute unused words).
  uint32_t words[kRowsPerWarp][2];
  if (pair16) {  // uniform
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; i += 2) {
      const uint64_t ia = static_cast<uint64_t>((r0 + rb + i) * p.cols + c);
      philox16::pair(sched, ia, ia + static_cast<uint64_t>(p.cols), (lane & 1) != 0, words[i],
                     words[i + 1]);
    }
  } else if (vec) {
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i)
      philox16::own(sched, static_cast<uint64_t>((r0 + rb + i) * p.cols + c), words[i]);
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t row = r0 + rb + i;
    if (row >= p.rows) break;  // whole warp
    const int64_t idx = row * p.cols + c;
    float U[4];  // 192 + u_k (philox16.cuh)
    if (vec) {
      philox16::magic_uniforms4(words[i], U);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k)
        U[k] = __uint_as_float(philox16::kMagicBits |
                               philox_bits16(p.key, static_cast<uint64_t>(idx + k)));
    }
    uint32_t hb[4], yb[4], comb[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const SplitBits b = split_element(g[i][k], scale1, U[k]);
      hb[k] = b.hb, yb[k] = b.yb, comb[k] = b.comb;
    }
    // 4 codes per word, element k in byte k; hi and lo only when asked for (uniform)
    const uint32_t word_comb = pack_bytes2(comb[0], comb[1], comb[2], comb[3]);
    const uint32_t word_hi =
        p.hi != nullptr ? pack_bytes(hi_code(hb[0]), hi_code(hb[1]), hi_code(hb[2]), hi_code(hb[3]))
                        : 0u;
    const uint32_t word_lo =
        p.lo != nullptr ? pack_bytes(lo_code(yb[0]), lo_code(yb[1]), lo_code(yb[2]), lo_code(yb[3]))
                        : 0u;
    if (p.combined_t != nullptr)  // uniform across the block
      *reinterpret_cast<uint32_t*>(&tile[rb + i][4 * lane]) = word_comb;
    if (vec && c < p.cols) {
      if (p.hi != nullptr) *reinterpret_cast<uint32_t*>(p.hi + idx) = word_hi;
      if (p.lo != nullptr) *reinterpret_cast<uint32_t*>(p.lo + idx) = word_lo;
      if (p.combined != nullptr) *reinterpret_cast<uint32_t*>(p.combined + idx) = word_comb;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (c + k >= p.cols) break;
        if (p.hi != nullptr) p.hi[idx + k] = static_cast<int8_t>(word_hi >> (8 * k));
        if (p.lo != nullptr) p.lo[idx + k] = static_cast<int8_t>(word_lo >> (8 * k));
        if (p.combined != nullptr) p.combined[idx + k] = static_cast<int8_t>(word_comb >> (8 * k));
      }
    }
    if (p.row_sumsq != nullptr) {  // uniform; only the sampled backward asks for the sums
      int lane_hi = 0, lane_lo = 0;  // ≤ 4·36 each
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (c + k < p.cols) {  // padding columns are 0 and give 0 codes, but keep sums clean
          lane_hi += hi_code(hb[k]) * hi_code(hb[k]);
          lane_lo += lo_code(yb[k]) * lo_code(yb[k]);
        }
      }
      add_row_sumsq(p, row, lane_hi, lane_lo, lane);
    }
  }
  if (p.combined_t == nullptr) return;  // uniform across the block
  __syncthreads();
  if (vec16_t) {
    // thread = 2·column + half: combined_t[c, r0 + 16·half .. +15] as one 16-byte store, so a
    // warp writes 16 columns × 32 contiguous bytes per instruction (rows % 16 == 0: the 16 rows
    // are all in range or all out). The byte reads hit distinct banks (rows 16 apart are 2112
    // bytes = 16 banks apart).
    static_assert(kThreads == 2 * kTileCols, "one thread per column half");
    const int cc = threadIdx.x >> 1;
    const int rh = 16 * (threadIdx.x & 1);
    const int64_t col = c0 + cc;
    const int64_t row = r0 + rh;
    if (col < p.cols && row < p.rows) {
      uint32_t w[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        w[q] = static_cast<uint8_t>(tile[rh + 4 * q][cc]) |
               (static_cast<uint32_t>(static_cast<uint8_t>(tile[rh + 4 * q + 1][cc])) << 8) |
               (static_cast<uint32_t>(static_cast<uint8_t>(tile[rh + 4 * q + 2][cc])) << 16) |
               (static_cast<uint32_t>(static_cast<uint8_t>(tile[rh + 4 * q + 3][cc])) << 24);
      }
      *reinterpret_cast<uint4*>(p.combined_t + col * p.rows + row) =
          make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else if (vec_t) {
    // lane = 8·(column within a group of 4) + q: combined_t[c, r0 + 4q .. 4q+3] as one word
    const int q = lane & 7;
    const int64_t row = r0 + 4 * q;
    for (int cb = warp * 4; cb < kTileCols; cb += kWarps * 4) {
      const int cc = cb + (lane >> 3);
      const int64_t col = c0 + cc;
      if (col < p.cols && row < p.rows) {
        const uint32_t word =
            static_cast<uint8_t>(tile[4 * q][cc]) |
            (static_cast<uint32_t>(static_cast<uint8_t>(tile[4 * q + 1][cc])) << 8) |
            (static_cast<uint32_t>(static_cast<uint8_t>(tile[4 * q + 2][cc])) << 16) |
            (static_cast<uint32_t>(static_cast<uint8_t>(tile[4 * q + 3][cc])) << 24);
        *reinterpret_cast<uint32_t*>(p.combined_t + col * p.rows + row) = word;
      }
    }
  } else {
    // combined_t[c, r0 + lane] = tile[lane][c − c0]: one byte per lane
    const int64_t row = r0 + lane;
    for (int cc = warp; cc < kTileCols; cc += kWarps) {
      const int64_t col = c0 + cc;
      if (col >= p.cols) break;
      if (row < p.rows) p.combined_t[col * p.rows + row] = tile[lane][cc];
    }
  }
}

// The second pass when rows and cols are multiples of 16, g is 16-byte and hi, lo, combined
// 8-byte aligned (the layer's backward, both variants): bitsplit_kernel's arithmetic on the
// 8-column lanes of the forward quantizer (hq_linear_quant.cu), because the pass is
// issue-bound (ncu: 46 instructions per element in bitsplit_kernel). A block owns 64 rows ×
// 256 columns; lane l holds columns 8l .. 8l + 7, so its 8 uniforms are one whole Philox block
// (index r·cols + c, a multiple of 8); a warp walks 4 batches of 2 rows, each batch's loads
// issued before the previous batch is computed; the per-thread set-up (two IEEE divisions) is
// spread over 64 elements; codes leave as 8-byte words and the transpose as 4 × 4 byte blocks;
// row_sumsq adds one warp's integer sums per row and 256-column tile (exact, any order).
constexpr int kSplitTileRows = 64;
constexpr int kSplitTileCols = 256;
constexpr int kSplitBatchRows = 2;

template <class T>
__global__ void __launch_bounds__(kThreads)
    bitsplit_lanes8_kernel(BitSplitParams<T> p, PhiloxSchedule sched, int64_t col_tiles) {
  constexpr int R = kSplitBatchRows;
  constexpr int kWords = detail::kRawWords<T>;
  __shared__ __align__(16) int8_t tile[kSplitTileRows][kSplitTileCols + 4];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const float scale1 = split_scale1(p.scale, blockIdx.x == 0 && threadIdx.x == 0);
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) / col_tiles) * kSplitTileRows;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) % col_tiles) * kSplitTileCols;
  const int64_t c = c0 + 8 * lane;
  const bool in_cols = c < p.cols;  // 8 | c and 16 | cols: all 8 columns or none
  // rows % 16 == 0: a batch whose first row is in range has both rows in range
  const auto batch_in_range = [&](int rb) { return rb < kSplitTileRows && r0 + rb < p.rows; };
  const auto load_batch = [&](int rb, uint32_t (&raw)[R][kWords]) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      if (in_cols) detail::load_raw8(p.g + (r0 + rb + i) * p.cols + c, raw[i]);
    }
  };

  uint32_t raw[R][kWords];
  int rb = warp * R;
  if (batch_in_range(rb)) load_batch(rb, raw);
#pragma unroll 1
  for (; batch_in_range(rb); rb += kWarps * R) {
    float g[R][8];
#pragma unroll
    for (int i = 0; i < R; ++i) detail::widen8(raw[i], g[i]);
    // the next batch's loads go out before this batch's arithmetic, into `raw` (dead once
    // widened): no second buffer to copy back per batch
    if (batch_in_range(rb + kWarps * R)) load_batch(rb + kWarps * R, raw);
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t row = r0 + rb + i;
      int sum_hi = 0, sum_lo = 0;  // Σ hi², Σ lo² of the lane's 8 codes, ≤ 8·36 each
      if (in_cols) {
        const int64_t idx = row * p.cols + c;
        float U[8];
        philox16::magic_uniforms8(philox16::block(sched, static_cast<uint64_t>(idx) >> 3), U);
        uint32_t comb[8], hb[8], yb[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const SplitBits b = split_element(g[i][k], scale1, U[k]);
          hb[k] = b.hb, yb[k] = b.yb, comb[k] = b.comb;
        }
        uint32_t even, odd;  // the codes sit in byte 2
        detail::gather_even_odd<2>(comb, even, odd);
        const uint32_t lo = __byte_perm(even, odd, 0x5140);  // codes 0..3
        const uint32_t hi = __byte_perm(even, odd, 0x7362);  // codes 4..7
        if (p.combined != nullptr) *reinterpret_cast<uint2*>(p.combined + idx) = make_uint2(lo, hi);
        if (p.hi != nullptr || p.lo != nullptr || p.row_sumsq != nullptr) {  // uniform
          uint32_t hc[8], lc[8];
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            const int h = hi_code(hb[k]);
            const int l = lo_code(yb[k]);
            hc[k] = static_cast<uint32_t>(h);
            lc[k] = static_cast<uint32_t>(l);
            sum_hi += h * h;
            sum_lo += l * l;
          }
          uint32_t e, o;
          if (p.hi != nullptr) {
            detail::gather_even_odd<0>(hc, e, o);
            *reinterpret_cast<uint2*>(p.hi + idx) =
                make_uint2(__byte_perm(e, o, 0x5140), __byte_perm(e, o, 0x7362));
          }
          if (p.lo != nullptr) {
            detail::gather_even_odd<0>(lc, e, o);
            *reinterpret_cast<uint2*>(p.lo + idx) =
                make_uint2(__byte_perm(e, o, 0x5140), __byte_perm(e, o, 0x7362));
          }
        }
        if (p.combined_t != nullptr) {
          auto* dst = reinterpret_cast<uint32_t*>(&tile[rb + i][8 * lane]);
          dst[0] = lo;
          dst[1] = hi;
        }
      }
      // every lane of the warp (shuffles), those past the columns with zeros
      if (p.row_sumsq != nullptr) add_row_sumsq(p, row, sum_hi, sum_lo, lane);
    }
  }
  if (p.combined_t == nullptr) return;  // uniform across the block
  __syncthreads();
  detail::store_tile_transposed<kSplitTileRows, kSplitTileCols, kThreads>(tile, r0, c0, p.rows,
                                                                          p.cols, p.combined_t);
}

// ---- row norms and leverage scores --------------------------------------------------------------

// Σ_c q[r, c]² of one row by one warp (exact integer sum).
__device__ __forceinline__ long long row_sumsq_warp(const int8_t* q, int64_t cols, int lane) {
  long long acc = 0;
  for (int64_t c = lane; c < cols; c += 32) {
    const int v = q[c];
    acc += v * v;
  }
  return detail::warp_sum(acc);
}

// float(sqrt(Σ)) with the reference's fp64 sqrt (both correctly rounded) and one rounding.
__device__ __forceinline__ float norm_from_sumsq(long long sumsq) {
  return __double2float_rn(__dsqrt_rn(static_cast<double>(sumsq)));
}

__global__ void __launch_bounds__(kThreads) row_norms_kernel(RowNormsParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= p.rows) return;
  const long long sumsq = row_sumsq_warp(p.q + row * p.cols, p.cols, lane);
  if (lane == 0) {
    float norm = norm_from_sumsq(sumsq);
    if (p.scale != nullptr) norm = __fmul_rn(norm, p.scale[0]);
    p.norms[row] = norm;
  }
}

__global__ void __launch_bounds__(kThreads) leverage_kernel(LeverageParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= p.rows) return;
  long long sum_hi, sum_lo;
  if (p.row_sumsq != nullptr) {
    sum_hi = p.row_sumsq[row];
    sum_lo = p.row_sumsq[p.rows + row];
  } else {
    sum_hi = row_sumsq_warp(p.hi + row * p.cols, p.cols, lane);
    sum_lo = row_sumsq_warp(p.lo + row * p.cols, p.cols, lane);
  }
  if (lane != 0) return;
  const float s = p.scale[0];
  if (row == 0 && !(s > 0.0f && detail::is_finite(s))) {
    detail::report(p.status, StatusKind::bad_scale, 0);
  }
  // a = ‖hi_r‖·(14·s), e = ‖lo_r‖·s, then × x_norm[r] for dw (fp32 products, ref order)
  const float hi_scale = __fmul_rn(static_cast<float>(kBitSplitBase), s);
  float a = __fmul_rn(norm_from_sumsq(sum_hi), hi_scale);
  float e = __fmul_rn(norm_from_sumsq(sum_lo), s);
  if (p.x_norm != nullptr) {
    const float xn = p.x_norm[row];
    if (!detail::is_finite(xn)) {
      detail::report(p.status, StatusKind::nonfinite, static_cast<uint64_t>(row));
    } else if (xn < 0.0f) {
      detail::report(p.status, StatusKind::out_of_range, static_cast<uint64_t>(row));
    }
    a = __fmul_rn(a, xn);
    e = __fmul_rn(e, xn);
  }
  p.scores[row] = a;
  p.scores[p.rows + row] = e;
}

// ---- single-block reductions ------------------------------------------------------------------

// Sum over a 1024-thread block; every thread gets the same (bitwise) total: commutativity
// makes the butterfly lanes agree, and every warp folds the 32 warp totals in one order.
template <class V>
__device__ __forceinline__ V block_sum(V v, V* shared32) {
  v = detail::warp_sum(v);
  __syncthreads();  // the previous call's readers are done with shared32
  if ((threadIdx.x & 31) == 0) shared32[threadIdx.x >> 5] = v;
  __syncthreads();
  return detail::warp_sum(shared32[threadIdx.x & 31]);
}

// Reports a score that is NaN/Inf (nonfinite) or negative (out_of_range).
__device__ __forceinline__ void check_score(float c, int64_t i, uint64_t* status) {
  if (!detail::is_finite(c)) {
    detail::report(status, StatusKind::nonfinite, static_cast<uint64_t>(i));
  } else if (c < 0.0f) {
    detail::report(status, StatusKind::out_of_range, static_cast<uint64_t>(i));
  }
}

// The reference's saturation loop, one thread block. While it runs, p doubles as the
// saturated set (p[i] == 1 ⇔ i ∈ F, everything else 0); each thread only touches its own
// indices i ≡ threadIdx.x (mod 1024), so no p value crosses threads.
// Block b runs fit b (q0 or q1): fit_probabilities_pair runs two independent fits in one launch.
__global__ void __launch_bounds__(kBlockThreads)
    fit_probabilities_kernel(FitProbabilitiesParams q0, FitProbabilitiesParams q1) {
  const FitProbabilitiesParams q = blockIdx.x == 0 ? q0 : q1;
  __shared__ long long count_sh[32];
  __shared__ double sum_sh[32];
  const int64_t n = q.n;
  long long nonzero = 0;
  for (int64_t i = threadIdx.x; i < n; i += kBlockThreads) {
    const float c = q.scores[i];
    check_score(c, i, q.status);
    nonzero += c > 0.0f ? 1 : 0;
  }
  nonzero = block_sum(nonzero, count_sh);
  // The budget covers every non-zero row: keep them all.
  if (static_cast<double>(nonzero) <= q.budget) {
    for (int64_t i = threadIdx.x; i < n; i += kBlockThreads) q.p[i] = q.scores[i] > 0.0f ? 1.0f : 0.0f;
    return;
  }
  for (int64_t i = threadIdx.x; i < n; i += kBlockThreads) q.p[i] = 0.0f;
  long long n_saturated = 0;
  for (;;) {
    double rest = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += kBlockThreads) {
      if (q.p[i] != 1.0f) rest = __dadd_rn(rest, static_cast<double>(q.scores[i]));
    }
    rest = block_sum(rest, sum_sh);
    if (rest <= 0.0) return;  // unreachable (see ref); p already holds 1[i ∈ F]
    // λ = (budget − |F|) / Σ_{i∉F} c_i;  p_i = c_i·λ
    const double lambda = __ddiv_rn(q.budget - static_cast<double>(n_saturated), rest);
    long long grew = 0;
    for (int64_t i = threadIdx.x; i < n; i += kBlockThreads) {
      if (q.p[i] != 1.0f && __dmul_rn(static_cast<double>(q.scores[i]), lambda) >= 1.0) {
        q.p[i] = 1.0f;
        ++grew;
      }
    }
    grew = block_sum(grew, count_sh);
    n_saturated += grew;
    if (grew == 0) {
      for (int64_t i = threadIdx.x; i < n; i += kBlockThreads) {
        if (q.p[i] != 1.0f) {
          q.p[i] = __double2float_rn(__dmul_rn(static_cast<double>(q.scores[i]), lambda));
        }
      }
      return;
    }
  }
}

// Row selection + compaction, one thread block, rounds of 8192 consecutive rows: thread t of
// a round decides rows 8t .. 8t+7 (in sampling mode from two Philox blocks: the 4 consecutive
// indices 4b .. 4b+3 are the 4 words of block b, rng.h philox_u32), a block-wide exclusive scan
// of the per-thread counts (warp shuffles, then warp 0 over the 32 warp totals) gives each thread
// its first output slot, and `base` carries the running count between rounds. The list is in
// increasing row order. nonzero_mode: keep = score > 0 (p = 1/0); otherwise keep =
// philox_uniform(key, i) < p_i. Why 8 rows per thread: with one row and one Philox block per
// thread the kernel took 68 µs for 2N = 32768 on an H200 (32 dependent rounds of one block).
struct SelectArgs {
  bool nonzero_mode = false;
  const float* values = nullptr;  // p (sampling) or scores (nonzero)
  int64_t n = 0;
  PhiloxKey key{};
  float* p_out = nullptr;         // nonzero mode: optional 0/1 p
  uint8_t* keep = nullptr;
  int32_t* kept_index = nullptr;
  int32_t* kept_count = nullptr;
  uint64_t* status = nullptr;
};

// Block b runs selection b (a0 or a1): sample_rows_pair runs two in one launch.
__global__ void __launch_bounds__(kBlockThreads) select_rows_kernel(SelectArgs a0, SelectArgs a1) {
  const SelectArgs a = blockIdx.x == 0 ? a0 : a1;
  constexpr int kRowsPerThread = 8;
  constexpr int64_t kRoundRows = static_cast<int64_t>(kBlockThreads) * kRowsPerThread;
  __shared__ int warp_incl[32];  // inclusive scan of the warp totals
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int64_t base = 0;
  for (int64_t start = 0; start < a.n; start += kRoundRows) {
    const int64_t i0 = start + static_cast<int64_t>(threadIdx.x) * kRowsPerThread;  // % 8 == 0
    unsigned mask = 0;  // bit r: row i0 + r kept
    if (i0 < a.n) {
      Philox4 w[2];
      if (!a.nonzero_mode) {
        w[0] = philox16::block(a.key, static_cast<uint64_t>(i0) >> 2);
        w[1] = philox16::block(a.key, static_cast<uint64_t>(i0 + 4) >> 2);
      }
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        const int64_t i = i0 + r;
        if (i >= a.n) break;
        const float v = a.values[i];
        bool kept;
        if (a.nonzero_mode) {
          check_score(v, i, a.status);
          kept = v > 0.0f;
          if (a.p_out != nullptr) a.p_out[i] = kept ? 1.0f : 0.0f;
        } else {
          if (!(v >= 0.0f && v <= 1.0f)) {
            detail::report(a.status, StatusKind::out_of_range, static_cast<uint64_t>(i));
          }
          // keep_i = u_i < p_i, u_i = philox_uniform(key, i) = (word >> 8)·2^-24 (on the 2^-24
          // grid: p = 1 always keeps, p = 0 never)
          const float u = static_cast<float>(w[r / 4].v[r % 4] >> 8) * (1.0f / 16777216.0f);
          kept = u < v;
        }
        if (a.keep != nullptr) a.keep[i] = kept ? 1 : 0;
        mask |= (kept ? 1u : 0u) << r;
      }
    }
    const int count = __popc(mask);
    int incl = count;  // inclusive scan over the warp's lanes
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(detail::kFullMask, incl, o);
      if (lane >= o) incl += y;
    }
    if (lane == 31) warp_incl[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int t = warp_incl[lane];
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(detail::kFullMask, t, o);
        if (lane >= o) t += y;
      }
      warp_incl[lane] = t;
    }
    __syncthreads();
    if (a.kept_index != nullptr && mask != 0) {
      int64_t slot = base + (warp > 0 ? warp_incl[warp - 1] : 0) + (incl - count);
      for (int r = 0; r < kRowsPerThread; ++r)
        if (mask & (1u << r)) a.kept_index[slot++] = static_cast<int32_t>(i0 + r);
    }
    base += warp_incl[31];
    __syncthreads();  // warp_incl is rewritten next round
  }
  const int64_t padded_n = (a.n + kKeptRowsMultiple - 1) / kKeptRowsMultiple * kKeptRowsMultiple;
  if (a.kept_index != nullptr) {
    for (int64_t j = base + threadIdx.x; j < padded_n; j += kBlockThreads) a.kept_index[j] = -1;
  }
  if (threadIdx.x == 0 && a.kept_count != nullptr) {
    a.kept_count[0] = static_cast<int32_t>(base);
    a.kept_count[1] = static_cast<int32_t>((base + kKeptRowsMultiple - 1) / kKeptRowsMultiple *
                                           kKeptRowsMultiple);
  }
}

// out[c, j] = q[index[j], c] (0 for index −1), through a 32 × 128 shared tile.
__global__ void __launch_bounds__(kThreads) gather_rows_t_kernel(GatherRowsParams p) {
  __shared__ int8_t tile[kTileRows][kTileCols + 4];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileCols;
  for (int jj = warp; jj < kTileRows; jj += kWarps) {
    const int64_t j = j0 + jj;
    if (j >= p.k) break;
    const int64_t src = p.index[j];
    const bool valid = src >= 0 && src < p.rows;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int64_t c = c0 + lane + 32 * e;
      tile[jj][lane + 32 * e] = (valid && c < p.cols) ? p.q[src * p.cols + c] : int8_t{0};
    }
  }
  __syncthreads();
  const int64_t j = j0 + lane;
  for (int cc = warp; cc < kTileCols; cc += kWarps) {
    const int64_t c = c0 + cc;
    if (c >= p.cols) break;
    if (j < p.k) p.out[c * p.k + j] = tile[lane][cc];
  }
}

// ---- host side ------------------------------------------------------------------------------

unsigned grid_stride_blocks(int64_t n) {
  const int64_t blocks = detail::ceil_div(n, kThreads);
  return static_cast<unsigned>(blocks < kMaxGridStride ? blocks : kMaxGridStride);
}

dim3 tile_grid(int64_t rows, int64_t cols) {
  return dim3(static_cast<unsigned>(detail::ceil_div(rows, kTileRows)),
              static_cast<unsigned>(detail::ceil_div(cols, kTileCols)));
}

void check_tile_grid(int64_t rows, int64_t cols, const char* fn) {
  detail::check_grid_extent(detail::ceil_div(rows, kTileRows), fn, "the row tiling");
  NB_CHECK(detail::ceil_div(cols, kTileCols) <= 65535,
           fn << ": " << cols << " columns need more than 65535 column tiles of " << kTileCols
              << "; split the tensor");
}

void check_list_length(int64_t n, const char* fn) {
  NB_CHECK(n > 0, fn << ": n = " << n << " must be positive");
  NB_CHECK(n < (int64_t{1} << 31) - kKeptRowsMultiple,
           fn << ": n = " << n << " rows do not fit the int32 kept-row indices; split the batch");
}

template <class T>
void bitsplit_impl(const BitSplitParams<T>& p, cudaStream_t stream) {
  const char* fn = "cuda::bitsplit";
  NB_CHECK(p.rows > 0 && p.cols > 0,
           fn << ": shape [" << p.rows << ", " << p.cols << "] must have positive rows and cols");
  check_tile_grid(p.rows, p.cols, fn);
  const int64_t n = p.rows * p.cols;
  detail::check_device_pointer(p.g, n, fn, "g");
  detail::check_device_pointer(p.scale, 2, fn, "scale (2 floats: s and max|g|)");
  NB_CHECK(p.hi != nullptr || p.lo != nullptr || p.combined != nullptr ||
               p.combined_t != nullptr || p.row_sumsq != nullptr,
           fn << ": no output requested; set at least one of hi, lo, combined, combined_t, "
              << "row_sumsq");
  if (p.hi != nullptr) detail::check_device_pointer(p.hi, n, fn, "hi");
  if (p.lo != nullptr) detail::check_device_pointer(p.lo, n, fn, "lo");
  if (p.combined != nullptr) detail::check_device_pointer(p.combined, n, fn, "combined");
  if (p.combined_t != nullptr) detail::check_device_pointer(p.combined_t, n, fn, "combined_t");
  if (p.row_sumsq != nullptr) detail::check_device_pointer(p.row_sumsq, 2 * p.rows, fn, "row_sumsq");
  if (p.status != nullptr) detail::check_device_pointer(p.status, 1, fn, "status");

  NB_CUDA_CHECK(cudaMemsetAsync(p.scale + 1, 0, sizeof(float), stream));  // max|g| starts at +0
  if (p.row_sumsq != nullptr) {
    NB_CUDA_CHECK(cudaMemsetAsync(p.row_sumsq, 0, static_cast<size_t>(2 * p.rows) * sizeof(int64_t),
                                  stream));
  }
  auto aligned4 = [](const void* ptr, size_t bytes) {
    return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
  };
  if (p.col_partials != nullptr) {
    const int64_t chunks = bitsplit_column_chunks(p.rows);
    detail::check_device_pointer(p.col_partials, chunks * p.cols, fn,
                                 "col_partials [bitsplit_column_chunks(rows), cols]");
    NB_CHECK(p.cols % 4 == 0 && aligned4(p.g, 4 * sizeof(T)),
             fn << ": col_partials needs cols % 4 == 0 (got " << p.cols
                << ") and g aligned to 4 elements; sum the columns separately otherwise");
    const int64_t col_blocks = detail::ceil_div(p.cols, static_cast<int64_t>(kTileCols));
    detail::check_grid_extent(col_blocks, fn, "the column tiling");
    NB_CHECK(chunks <= 65535, fn << ": " << p.rows << " rows need " << chunks
                                 << " row chunks, above the grid's 65535 in y");
    absmax_colsum_kernel<T><<<dim3(static_cast<unsigned>(col_blocks),
                                   static_cast<unsigned>(chunks)),
                              kThreads, 0, stream>>>(p);
  } else {
    absmax_kernel<T><<<grid_stride_blocks(n), kThreads, 0, stream>>>(p, aligned4(p.g, 16));
  }
  NB_CUDA_CHECK_LAUNCH();
  const bool vec = p.cols % 4 == 0 && aligned4(p.g, 4 * sizeof(T)) && aligned4(p.hi, 4) &&
                   aligned4(p.lo, 4) && aligned4(p.combined, 4);
  const bool pair16 = vec && p.cols % 8 == 0;  // lane pairs start at multiples of 8
  const bool vec_t = p.rows % 4 == 0 && aligned4(p.combined_t, 4);
  const bool vec16_t = p.rows % 16 == 0 && aligned4(p.combined_t, 16);
  // the stream's round keys, once per launch (rng.h philox_schedule): constant-bank operands
  const PhiloxSchedule sched = philox_schedule(p.key);
  if (p.rows % 16 == 0 && p.cols % 16 == 0 && aligned4(p.g, 16) && aligned4(p.hi, 8) &&
      aligned4(p.lo, 8) && aligned4(p.combined, 8) && aligned4(p.combined_t, 4)) {
    const int64_t col_tiles = detail::ceil_div(p.cols, static_cast<int64_t>(kSplitTileCols));
    const int64_t tiles =
        detail::ceil_div(p.rows, static_cast<int64_t>(kSplitTileRows)) * col_tiles;
    detail::check_grid_extent(tiles, fn, "the tiling");
    bitsplit_lanes8_kernel<T>
        <<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(p, sched, col_tiles);
  } else {
    bitsplit_kernel<T><<<tile_grid(p.rows, p.cols), kThreads, 0, stream>>>(p, sched, vec, pair16,
                                                                            vec_t, vec16_t);
  }
  NB_CUDA_CHECK_LAUNCH();
}

}  // namespace

int64_t bitsplit_column_chunks(int64_t rows) {
  return detail::ceil_div(rows, kBitSplitColumnChunkRows);
}

void bitsplit(const BitSplitParams<float>& p, cudaStream_t stream) { bitsplit_impl(p, stream); }
void bitsplit(const BitSplitParams<bf16_t>& p, cudaStream_t stream) { bitsplit_impl(p, stream); }

void row_norms_s8(const RowNormsParams& p, cudaStream_t stream) {
  const char* fn = "cuda::row_norms_s8";
  NB_CHECK(p.rows > 0 && p.cols > 0,
           fn << ": shape [" << p.rows << ", " << p.cols << "] must have positive rows and cols");
  detail::check_device_pointer(p.q, p.rows * p.cols, fn, "q");
  detail::check_device_pointer(p.norms, p.rows, fn, "norms");
  if (p.scale != nullptr) detail::check_device_pointer(p.scale, 1, fn, "scale");
  const int64_t blocks = detail::ceil_div(p.rows, kWarps);
  detail::check_grid_extent(blocks, fn, "the row tiling");
  row_norms_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  NB_CUDA_CHECK_LAUNCH();
}

void leverage_scores(const LeverageParams& p, cudaStream_t stream) {
  const char* fn = "cuda::leverage_scores";
  NB_CHECK(p.rows > 0 && p.cols > 0,
           fn << ": shape [" << p.rows << ", " << p.cols << "] must have positive rows and cols");
  if (p.row_sumsq != nullptr) {
    detail::check_device_pointer(p.row_sumsq, 2 * p.rows, fn, "row_sumsq");
  } else {
    detail::check_device_pointer(p.hi, p.rows * p.cols, fn, "hi (or pass row_sumsq)");
    detail::check_device_pointer(p.lo, p.rows * p.cols, fn, "lo (or pass row_sumsq)");
  }
  detail::check_device_pointer(p.scale, 1, fn, "scale (the bit-split s)");
  if (p.x_norm != nullptr) detail::check_device_pointer(p.x_norm, p.rows, fn, "x_norm");
  detail::check_device_pointer(p.scores, 2 * p.rows, fn, "scores");
  if (p.status != nullptr) detail::check_device_pointer(p.status, 1, fn, "status");
  const int64_t blocks = detail::ceil_div(p.rows, kWarps);
  detail::check_grid_extent(blocks, fn, "the row tiling");
  leverage_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  NB_CUDA_CHECK_LAUNCH();
}

namespace {

void check_fit(const FitProbabilitiesParams& p, const char* fn) {
  check_list_length(p.n, fn);
  NB_CHECK(std::isfinite(p.budget) && p.budget >= 0.0,
           fn << ": budget = " << p.budget << " must be finite and >= 0 (the expected kept count)");
  detail::check_device_pointer(p.scores, p.n, fn, "scores");
  detail::check_device_pointer(p.p, p.n, fn, "p");
  if (p.status != nullptr) detail::check_device_pointer(p.status, 1, fn, "status");
}

// [a, a + a_bytes) and [b, b + b_bytes) overlap (nulls never do).
bool overlap(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  if (a == nullptr || b == nullptr) return false;
  const auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return x < y + b_bytes && y < x + a_bytes;
}

}  // namespace

void fit_probabilities(const FitProbabilitiesParams& p, cudaStream_t stream) {
  check_fit(p, "cuda::fit_probabilities");
  fit_probabilities_kernel<<<1, kBlockThreads, 0, stream>>>(p, p);
  NB_CUDA_CHECK_LAUNCH();
}

void fit_probabilities_pair(const FitProbabilitiesParams& a, const FitProbabilitiesParams& b,
                            cudaStream_t stream) {
  const char* fn = "cuda::fit_probabilities_pair";
  check_fit(a, fn);
  check_fit(b, fn);
  NB_CHECK(!overlap(a.p, static_cast<size_t>(a.n) * sizeof(float), b.p,
                    static_cast<size_t>(b.n) * sizeof(float)),
           fn << ": the two fits write overlapping p arrays; give each its own");
  fit_probabilities_kernel<<<2, kBlockThreads, 0, stream>>>(a, b);
  NB_CUDA_CHECK_LAUNCH();
}

namespace {

void check_selection_outputs(int64_t n, const uint8_t* keep, const int32_t* kept_index,
                             const int32_t* kept_count, uint64_t* status, const char* fn) {
  const int64_t padded = detail::ceil_div(n, kKeptRowsMultiple) * kKeptRowsMultiple;
  if (keep != nullptr) detail::check_device_pointer(keep, n, fn, "keep");
  if (kept_index != nullptr) detail::check_device_pointer(kept_index, padded, fn, "kept_index");
  if (kept_count != nullptr) detail::check_device_pointer(kept_count, 2, fn, "kept_count");
  if (status != nullptr) detail::check_device_pointer(status, 1, fn, "status");
}

SelectArgs checked_sampling(const SampleRowsParams& p, const char* fn) {
  check_list_length(p.n, fn);
  detail::check_device_pointer(p.p, p.n, fn, "p");
  NB_CHECK(p.keep != nullptr || p.kept_index != nullptr || p.kept_count != nullptr,
           fn << ": no output requested; set keep, kept_index or kept_count");
  check_selection_outputs(p.n, p.keep, p.kept_index, p.kept_count, p.status, fn);
  SelectArgs a;
  a.nonzero_mode = false;
  a.values = p.p;
  a.n = p.n;
  a.key = p.key;
  a.keep = p.keep;
  a.kept_index = p.kept_index;
  a.kept_count = p.kept_count;
  a.status = p.status;
  return a;
}

}  // namespace

void sample_rows(const SampleRowsParams& p, cudaStream_t stream) {
  const SelectArgs a = checked_sampling(p, "cuda::sample_rows");
  select_rows_kernel<<<1, kBlockThreads, 0, stream>>>(a, a);
  NB_CUDA_CHECK_LAUNCH();
}

void sample_rows_pair(const SampleRowsParams& a, const SampleRowsParams& b, cudaStream_t stream) {
  const char* fn = "cuda::sample_rows_pair";
  const SelectArgs sa = checked_sampling(a, fn), sb = checked_sampling(b, fn);
  const auto list_bytes = [](int64_t n) {
    return static_cast<size_t>(detail::ceil_div(n, kKeptRowsMultiple) * kKeptRowsMultiple) *
           sizeof(int32_t);
  };
  NB_CHECK(!overlap(a.keep, static_cast<size_t>(a.n), b.keep, static_cast<size_t>(b.n)) &&
               !overlap(a.kept_index, list_bytes(a.n), b.kept_index, list_bytes(b.n)) &&
               !overlap(a.kept_count, 2 * sizeof(int32_t), b.kept_count, 2 * sizeof(int32_t)),
           fn << ": the two samplings write overlapping outputs (keep, kept_index or "
                 "kept_count); give each its own");
  select_rows_kernel<<<2, kBlockThreads, 0, stream>>>(sa, sb);
  NB_CUDA_CHECK_LAUNCH();
}

void keep_nonzero_rows(const KeepNonzeroParams& p, cudaStream_t stream) {
  const char* fn = "cuda::keep_nonzero_rows";
  check_list_length(p.n, fn);
  detail::check_device_pointer(p.scores, p.n, fn, "scores");
  NB_CHECK(p.p != nullptr || p.keep != nullptr || p.kept_index != nullptr ||
               p.kept_count != nullptr,
           fn << ": no output requested; set p, keep, kept_index or kept_count");
  if (p.p != nullptr) detail::check_device_pointer(p.p, p.n, fn, "p");
  check_selection_outputs(p.n, p.keep, p.kept_index, p.kept_count, p.status, fn);
  SelectArgs a;
  a.nonzero_mode = true;
  a.values = p.scores;
  a.n = p.n;
  a.p_out = p.p;
  a.keep = p.keep;
  a.kept_index = p.kept_index;
  a.kept_count = p.kept_count;
  a.status = p.status;
  select_rows_kernel<<<1, kBlockThreads, 0, stream>>>(a, a);
  NB_CUDA_CHECK_LAUNCH();
}

void gather_rows_t_s8(const GatherRowsParams& p, cudaStream_t stream) {
  const char* fn = "cuda::gather_rows_t_s8";
  detail::check_shape(p.rows, p.cols, fn);
  NB_CHECK(p.k >= 0, fn << ": k = " << p.k << " must be >= 0");
  check_tile_grid(p.k, p.cols, fn);
  detail::check_device_pointer(p.q, p.rows * p.cols, fn, "q");
  detail::check_device_pointer(p.index, p.k, fn, "index");
  detail::check_device_pointer(p.out, p.cols * p.k, fn, "out");
  if (p.k == 0 || p.cols == 0) return;
  gather_rows_t_kernel<<<tile_grid(p.k, p.cols), kThreads, 0, stream>>>(p);
  NB_CUDA_CHECK_LAUNCH();
}

}  // namespace nibble::cuda
