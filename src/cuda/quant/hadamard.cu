// Block-Hadamard transform, HQ quantizer and LSQ init on the GPU (twins of ref/hadamard.cpp).
//
// Work split: a thread block of 8 warps owns a tile of 32 rows × W columns, W = 128·J with
// J = max(1, block/128) chunks; a warp transforms R = max(1, 4/J) rows of the tile at a time
// (their loads are issued together, to keep enough bytes in flight). In each chunk j, lane l
// holds the 4 consecutive columns 128j + 4l + k, k < 4 — one 8/16-byte load and one 4-byte
// code store per lane when cols % 4 == 0 and the pointers are aligned (else scalar accesses
// with the same mapping). Butterfly stages then pair:
//   h = 1, 2       registers k and k ^ h of the lane,
//   h = 4 .. 64    lane l and lane l ^ (h/4) (a shuffle),
//   h = 128 .. 512 chunks j and j ^ (h/128).
// Tiles start at multiples of W, and block divides W, so every Hadamard block lies inside one
// warp row. The transposed codes go through shared memory (32 rows × W int8) and leave as
// column segments of q_t: 4 rows (4 bytes) per lane when rows % 4 == 0, else 1.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/common/check.h"
#include "cuda/quant/device_util.h"
#include "cuda/quant/hadamard.h"
#include "cuda/quant/launch_checks.h"

namespace nibble::cuda {
namespace {

constexpr int kTileRows = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 128;  // columns per warp-wide chunk: 32 lanes × 4
constexpr int64_t kMaxBlock = 1024;

// Rows a warp loads at once: 4 / J, so that R·J·4 = 16 floats (32 for J = 8) stay in registers.
template <int J>
constexpr int kRowsPerBatch = J <= 2 ? 4 / J : 1;

// In-register fast Walsh–Hadamard butterfly of one warp row, unnormalised, stages in the
// reference's order h = 1, 2, ..., block/2. Each stage maps the lower element a (column bit h
// clear) and its partner b to (a + b, a − b); a lane holding b computes a − b from the
// shuffled a, so every value is the same single fp32 operation as on the CPU.
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
        const float other = __shfl_xor_sync(detail::kFullMask, v[j][k], m);
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

// Four consecutive elements widened to fp32: one 16-byte (f32) or 8-byte (bf16) load when
// `vec` (c % 4 == 0, aligned, c + 3 < cols), else up to four scalar loads; columns past
// `cols` read as 0 (their whole Hadamard block is past the end, so they never mix with real
// columns).
__device__ __forceinline__ void load4(const float* xr, int64_t c, int64_t cols, bool vec,
                                      float (&out)[4]) {
  if (vec && c < cols) {
    const float4 v = *reinterpret_cast<const float4*>(xr + c);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = c + k < cols ? xr[c + k] : 0.0f;
  }
}
__device__ __forceinline__ void load4(const bf16_t* xr, int64_t c, int64_t cols, bool vec,
                                      float (&out)[4]) {
  if (vec && c < cols) {
    const uint2 v = *reinterpret_cast<const uint2*>(xr + c);  // little endian: element 0 low
    out[0] = __uint_as_float(v.x << 16), out[1] = __uint_as_float(v.x & 0xffff0000u);
    out[2] = __uint_as_float(v.y << 16), out[3] = __uint_as_float(v.y & 0xffff0000u);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = c + k < cols ? detail::to_f32(xr[c + k]) : 0.0f;
  }
}

// (x is not __restrict__: hadamard_blocks may run in place, y == x.)
// Raw loads of one tile row, reporting NaN/Inf inputs by flat index.
template <class T, int J>
__device__ __forceinline__ void load_row(const T* x, int64_t row, int64_t cols, int64_t c0,
                                         int lane, bool vec, uint64_t* status,
                                         float (&v)[J][4]) {
  const T* xr = x + row * cols;
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int64_t c = c0 + kChunk * j + 4 * lane;
    load4(xr, c, cols, vec, v[j]);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (!detail::is_finite(v[j][k])) {
        detail::report(status, StatusKind::nonfinite, static_cast<uint64_t>(row * cols + c + k));
      }
    }
  }
}

// v = (x·H_k) · 2^(−k/2) in place; a finite input can still overflow in the butterfly (the
// reference checks v too). A NaN/Inf input also lands here for its whole block, but its own
// `nonfinite` report ranks first.
template <int J>
__device__ __forceinline__ void transform_row(float (&v)[J][4], int64_t row, int64_t cols,
                                              int64_t c0, int lane, int block, float norm,
                                              uint64_t* status) {
  hadamard_warp<J>(v, lane, block);
#pragma unroll
  for (int j = 0; j < J; ++j) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[j][k] = __fmul_rn(v[j][k], norm);
      const int64_t c = c0 + kChunk * j + 4 * lane + k;
      if (c < cols && !detail::is_finite(v[j][k])) {
        detail::report(status, StatusKind::overflow, static_cast<uint64_t>(row * cols + c));
      }
    }
  }
}

// Calls body(i, row, v) for the rows of this warp, R at a time: the R rows' loads are issued
// before any of them is transformed. Rows past the end are skipped (warp-uniform).
template <class T, int J, class Body>
__device__ __forceinline__ void for_each_row(const T* x, int64_t rows, int64_t cols, int64_t r0,
                                             int64_t c0, int lane, int warp, int block,
                                             float norm, bool vec, uint64_t* status,
                                             Body&& body) {
  constexpr int R = kRowsPerBatch<J>;
  for (int rb = warp * R; rb < kTileRows; rb += kWarps * R) {
    if (r0 + rb >= rows) break;
    float v[R][J][4];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      if (r0 + rb + i < rows) load_row<T, J>(x, r0 + rb + i, cols, c0, lane, vec, status, v[i]);
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t row = r0 + rb + i;
      if (row < rows) {
        transform_row<J>(v[i], row, cols, c0, lane, block, norm, status);
        body(rb + i, row, v[i]);
      }
    }
  }
}

template <class T, int J>
__global__ void __launch_bounds__(kThreads)
    hadamard_blocks_kernel(HadamardParams<T> p, float norm, bool vec) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kChunk * J;
  for_each_row<T, J>(p.x, p.rows, p.cols, r0, c0, lane, warp, static_cast<int>(p.block), norm,
                     vec, p.status, [&](int, int64_t row, float(&v)[J][4]) {
    float* yr = p.y + row * p.cols;
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int64_t c = c0 + kChunk * j + 4 * lane;
      if (vec && c < p.cols) {
        *reinterpret_cast<float4*>(yr + c) = make_float4(v[j][0], v[j][1], v[j][2], v[j][3]);
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (c + k < p.cols) yr[c + k] = v[j][k];
        }
      }
    }
  });
}

// vec: cols % 4 == 0 and x, q, r aligned for 4-element accesses. vec_t: rows % 4 == 0 (and
// q_t aligned), so a lane can store 4 rows of a q_t column as one 32-bit word.
template <class T, int J>
__global__ void __launch_bounds__(kThreads)
    hq_quantize_kernel(HqQuantizeParams<T> p, float norm, bool vec, bool vec_t) {
  constexpr int W = kChunk * J;
  // +4 bytes per row: the column reads of the transpose fall in distinct banks.
  __shared__ __align__(16) int8_t tile[kTileRows][W + 4];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * W;
  const float s = *p.step;
  // r = v·(1/s): one IEEE division per thread, a multiply per element (ref::lsq_quantize)
  const float inv_s = __fdiv_rn(1.0f, s);
  if (!(s > 0.0f && detail::is_finite(s) && detail::is_finite(inv_s)) && threadIdx.x == 0 &&
      blockIdx.x == 0 && blockIdx.y == 0) {
    detail::report(p.status, StatusKind::bad_scale, 0);
  }
  const float qmin = static_cast<float>(p.range.qmin);
  const float qmax = static_cast<float>(p.range.qmax);

  for_each_row<T, J>(p.x, p.rows, p.cols, r0, c0, lane, warp, static_cast<int>(p.block), norm,
                     vec, p.status, [&](int rr, int64_t row, float(&v)[J][4]) {
    const int64_t base = row * p.cols;
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int64_t c = c0 + kChunk * j + 4 * lane;
      float ri[4];
      uint32_t word = 0;  // the 4 codes, element k in byte k
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        // r = v·inv_s;  q = clamp(rint(r), qmin, qmax)  (clamped in fp32: r may be ±Inf)
        ri[k] = __fmul_rn(v[j][k], inv_s);
        const int code = static_cast<int>(fminf(fmaxf(rintf(ri[k]), qmin), qmax));
        word |= (static_cast<uint32_t>(code) & 0xffu) << (8 * k);
      }
      *reinterpret_cast<uint32_t*>(&tile[rr][kChunk * j + 4 * lane]) = word;
      if (vec && c < p.cols) {
        *reinterpret_cast<uint32_t*>(p.q + base + c) = word;
        if (p.r != nullptr) {
          *reinterpret_cast<float4*>(p.r + base + c) = make_float4(ri[0], ri[1], ri[2], ri[3]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (c + k < p.cols) {
            p.q[base + c + k] = static_cast<int8_t>(word >> (8 * k));
            if (p.r != nullptr) p.r[base + c + k] = ri[k];
          }
        }
      }
    }
  });
  if (p.q_t == nullptr) return;  // uniform across the block
  __syncthreads();
  if (vec_t) {
    // lane = 8·(column within a group of 4) + m: q_t[c, r0 + 4m .. 4m+3] = tile[4m .. 4m+3][cc]
    const int m = lane & 7;
    const int64_t row = r0 + 4 * m;
    for (int cb = warp * 4; cb < W; cb += kWarps * 4) {
      const int cc = cb + (lane >> 3);
      const int64_t c = c0 + cc;
      if (c < p.cols && row < p.rows) {
        const uint32_t word = static_cast<uint8_t>(tile[4 * m][cc]) |
                              (static_cast<uint32_t>(static_cast<uint8_t>(tile[4 * m + 1][cc])) << 8) |
                              (static_cast<uint32_t>(static_cast<uint8_t>(tile[4 * m + 2][cc])) << 16) |
                              (static_cast<uint32_t>(static_cast<uint8_t>(tile[4 * m + 3][cc])) << 24);
        *reinterpret_cast<uint32_t*>(p.q_t + c * p.rows + row) = word;
      }
    }
  } else {
    // q_t[c, r0 + lane] = tile[lane][c − c0]: one byte per lane
    const int64_t row = r0 + lane;
    for (int cc = warp; cc < W; cc += kWarps) {
      const int64_t c = c0 + cc;
      if (c >= p.cols) break;
      if (row < p.rows) p.q_t[c * p.rows + row] = tile[lane][cc];
    }
  }
}

// Per-block fp64 partial of Σ|v| over the tiles blockIdx.x, blockIdx.x + gridDim.x, ...
template <class T, int J>
__global__ void __launch_bounds__(kThreads)
    lsq_abs_sum_kernel(LsqInitParams<T> p, float norm, bool vec, int64_t col_tiles,
                       int64_t tiles) {
  __shared__ double warp_sums[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  double acc = 0.0;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t r0 = (t / col_tiles) * kTileRows;
    const int64_t c0 = (t % col_tiles) * kChunk * J;
    for_each_row<T, J>(p.x, p.rows, p.cols, r0, c0, lane, warp, static_cast<int>(p.block), norm,
                       vec, p.status, [&](int, int64_t, float(&v)[J][4]) {
#pragma unroll
      for (int j = 0; j < J; ++j) {
#pragma unroll
        for (int k = 0; k < 4; ++k) acc = __dadd_rn(acc, fabs(static_cast<double>(v[j][k])));
      }
    });
  }
  acc = detail::warp_sum(acc);
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total = __dadd_rn(total, warp_sums[w]);
    p.scratch[blockIdx.x] = total;
  }
}

// s = 2·(Σ|v| / n) / sqrt(qmax) in fp64 (the reference's expression), rounded once to fp32;
// s = 1 when that is 0. One warp adds the partials in a fixed order.
__global__ void lsq_init_finalize_kernel(const double* __restrict__ partials, int count,
                                         int64_t n, int qmax, float* step) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < count; i += 32) acc = __dadd_rn(acc, partials[i]);
  acc = detail::warp_sum(acc);
  if (threadIdx.x == 0) {
    const double s = __ddiv_rn(__dmul_rn(2.0, __ddiv_rn(acc, static_cast<double>(n))),
                               __dsqrt_rn(static_cast<double>(qmax)));
    const float s32 = __double2float_rn(s);
    *step = s32 > 0.0f ? s32 : 1.0f;
  }
}

// ---- host side ------------------------------------------------------------------------------

bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// The same expression as ref::hadamard_norm: 1/sqrt(block) in fp64, rounded once to fp32.
float hadamard_norm_f32(int64_t block) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));
}

// Chunks of 128 columns per tile: 1 up to block 128, then block/128.
int chunks_per_tile(int64_t block) { return block <= kChunk ? 1 : static_cast<int>(block / kChunk); }

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

void check_transform_shape(int64_t rows, int64_t cols, int64_t block, const char* fn) {
  detail::check_shape(rows, cols, fn);
  NB_CHECK(is_power_of_two(block) && block <= kMaxBlock,
           fn << ": hadamard block " << block << " is not a power of two in [1, 1024]; "
              << "use 1, 2, 4, ..., 1024");
  NB_CHECK(cols % block == 0, fn << ": K = " << cols << " is not a multiple of the hadamard block "
                                 << block << "; pick a block (power of two) that divides K");
  const int64_t w = kChunk * static_cast<int64_t>(chunks_per_tile(block));
  NB_CHECK(detail::ceil_div(cols, w) <= 65535,
           fn << ": K = " << cols << " needs more than 65535 column tiles of " << w
              << "; split the tensor along K");
  detail::check_grid_extent(detail::ceil_div(rows, kTileRows), fn, "the row tiling");
}

void check_lsq_range(QRange range, const char* fn) {
  NB_CHECK(range.qmin < 0 && range.qmax > 0,
           fn << ": LSQ needs a signed code range with qmin < 0 < qmax, got [" << range.qmin
              << ", " << range.qmax << "]; use [-7, 7] (paper) or [-8, 7] (released code)");
  detail::check_range_s8(range, fn);
}

dim3 tile_grid(int64_t rows, int64_t cols, int chunks) {
  return dim3(static_cast<unsigned>(detail::ceil_div(rows, kTileRows)),
              static_cast<unsigned>(detail::ceil_div(cols, kChunk * static_cast<int64_t>(chunks))));
}

// Calls f(std::integral_constant<int, J>) for the tile width of `block`.
template <class F>
void dispatch_chunks(int64_t block, F&& f) {
  switch (chunks_per_tile(block)) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// 4-element vector accesses need cols % 4 == 0 and bases aligned to 4 elements.
template <class T>
bool vector_access(int64_t cols, const T* x) {
  return cols % 4 == 0 && aligned(x, 4 * sizeof(T));
}

template <class T>
void hadamard_blocks_impl(const HadamardParams<T>& p, cudaStream_t stream) {
  const char* fn = "cuda::hadamard_blocks";
  check_transform_shape(p.rows, p.cols, p.block, fn);
  const int64_t n = p.rows * p.cols;
  detail::check_device_pointer(p.x, n, fn, "x");
  detail::check_device_pointer(p.y, n, fn, "y");
  if (p.status != nullptr) detail::check_device_pointer(p.status, 1, fn, "status");
  if (n == 0) return;
  const float norm = hadamard_norm_f32(p.block);
  const bool vec = vector_access(p.cols, p.x) && aligned(p.y, 16);
  dispatch_chunks(p.block, [&](auto chunks) {
    constexpr int J = decltype(chunks)::value;
    hadamard_blocks_kernel<T, J><<<tile_grid(p.rows, p.cols, J), kThreads, 0, stream>>>(p, norm, vec);
  });
  NB_CUDA_CHECK_LAUNCH();
}

template <class T>
void hq_quantize_impl(const HqQuantizeParams<T>& p, cudaStream_t stream) {
  const char* fn = "cuda::hq_quantize";
  check_transform_shape(p.rows, p.cols, p.block, fn);
  check_lsq_range(p.range, fn);
  const int64_t n = p.rows * p.cols;
  detail::check_device_pointer(p.x, n, fn, "x");
  detail::check_device_pointer(p.q, n, fn, "q (the [rows, cols] codes)");
  detail::check_device_pointer(p.step, 1, fn, "step (the device step size s)");
  if (p.q_t != nullptr) detail::check_device_pointer(p.q_t, n, fn, "q_t");
  if (p.r != nullptr) detail::check_device_pointer(p.r, n, fn, "r");
  if (p.status != nullptr) detail::check_device_pointer(p.status, 1, fn, "status");
  if (n == 0) return;
  const float norm = hadamard_norm_f32(p.block);
  const bool vec = vector_access(p.cols, p.x) && aligned(p.q, 4) &&
                   (p.r == nullptr || aligned(p.r, 16));
  const bool vec_t = p.q_t != nullptr && p.rows % 4 == 0 && aligned(p.q_t, 4);
  dispatch_chunks(p.block, [&](auto chunks) {
    constexpr int J = decltype(chunks)::value;
    hq_quantize_kernel<T, J><<<tile_grid(p.rows, p.cols, J), kThreads, 0, stream>>>(p, norm, vec,
                                                                                    vec_t);
  });
  NB_CUDA_CHECK_LAUNCH();
}

template <class T>
void lsq_init_scale_impl(const LsqInitParams<T>& p, cudaStream_t stream) {
  const char* fn = "cuda::lsq_init_scale";
  check_transform_shape(p.rows, p.cols, p.block, fn);
  const int64_t n = p.rows * p.cols;
  NB_CHECK(n > 0, fn << ": needs at least one value (got a [" << p.rows << ", " << p.cols
                     << "] tensor)");
  NB_CHECK(p.range.qmax > 0, fn << ": qmax = " << p.range.qmax << " must be positive; use [-7, 7]");
  detail::check_device_pointer(p.x, n, fn, "x");
  detail::check_device_pointer(p.step, 1, fn, "step (the output)");
  detail::check_device_pointer(p.scratch, kLsqInitScratch, fn, "scratch");
  if (p.status != nullptr) detail::check_device_pointer(p.status, 1, fn, "status");
  const float norm = hadamard_norm_f32(p.block);
  const bool vec = vector_access(p.cols, p.x);
  dispatch_chunks(p.block, [&](auto chunks) {
    constexpr int J = decltype(chunks)::value;
    const int64_t col_tiles = detail::ceil_div(p.cols, kChunk * J);
    const int64_t tiles = detail::ceil_div(p.rows, kTileRows) * col_tiles;
    const int blocks = static_cast<int>(tiles < kLsqInitScratch ? tiles : kLsqInitScratch);
    lsq_abs_sum_kernel<T, J><<<blocks, kThreads, 0, stream>>>(p, norm, vec, col_tiles, tiles);
    NB_CUDA_CHECK_LAUNCH();
    lsq_init_finalize_kernel<<<1, 32, 0, stream>>>(p.scratch, blocks, n, p.range.qmax, p.step);
  });
  NB_CUDA_CHECK_LAUNCH();
}

}  // namespace

void hadamard_blocks(const HadamardParams<float>& p, cudaStream_t stream) {
  hadamard_blocks_impl(p, stream);
}
void hadamard_blocks(const HadamardParams<bf16_t>& p, cudaStream_t stream) {
  hadamard_blocks_impl(p, stream);
}
void hq_quantize(const HqQuantizeParams<float>& p, cudaStream_t stream) {
  hq_quantize_impl(p, stream);
}
void hq_quantize(const HqQuantizeParams<bf16_t>& p, cudaStream_t stream) {
  hq_quantize_impl(p, stream);
}
void lsq_init_scale(const LsqInitParams<float>& p, cudaStream_t stream) {
  lsq_init_scale_impl(p, stream);
}
void lsq_init_scale(const LsqInitParams<bf16_t>& p, cudaStream_t stream) {
  lsq_init_scale_impl(p, stream);
}

}  // namespace nibble::cuda
