// The linear layer's fused forward quantizer: block Hadamard + LSQ codes + the LSQ residual
// side channel in one pass over x (hq_linear.h, hq_lsq_quantize).
//
// Work split: the E = 8 tiling of hadamard_warp.cuh (lane l holds the 8 consecutive columns
// 256j + 8l + k of chunk j; a block owns TR rows × W = 256·J columns; a warp walks batches of
// R rows), each batch's loads issued before the previous batch is computed. Per lane and row
// chunk, 8 codes leave as one 8-byte word (q), two 32-bit words of packed nibbles (q and e),
// and (with q_t) two words in the shared tile, which leaves transposed as 4 × 4 byte blocks
// (detail::store_tile_transposed).
// The kernel is bound by instruction issue and by the ALU pipe (ncu; bench/README.md, "run
// S10"), so the code counts instructions: 8 elements per lane make the lane's 8 side-channel
// uniforms exactly one Philox block (no exchange between lanes; its round keys come from the
// launch's PhiloxSchedule), put three butterfly stages in registers, and halve the load and
// store instructions; a warp walking several batches spreads the per-thread set-up (the step's
// division, the tile's indices) over 64 elements; finiteness is tested once, after the
// transform (a NaN/Inf input makes its whole Hadamard block non-finite, so the slow path that
// classifies and reports runs only then); a multiply by 1/s per element (no division); no
// rounding/conversion instructions (magic-number adds, a rounded-down fma for the side
// channel's floor); byte permutes for the packing; the Hadamard block a template parameter
// (bench/README.md, "Quantization passes").
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/common/check.h"
#include "cuda/linear/hadamard_warp.cuh"
#include "cuda/linear/hq_linear.h"
#include "cuda/quant/device_util.h"
#include "cuda/quant/launch_checks.h"
#include "cuda/quant/philox16.cuh"

namespace nibble::cuda {
namespace {

using linear_detail::kChunkCols8;
using linear_detail::kLaneCols8;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

// The side-channel nibble of r whose code is already known (ref::lsq_residual_encode):
//   −8 when !(qmin ≤ r ≤ qmax) (±Inf and NaN included), else
//   floor(14·(rint(r) − r) + u)  of the exact sum, in [−7, 7] (|δ| ≤ 1/2, u < 1)
// Arguments: clamped = clamp(r, qmin, qmax), so r is in range iff clamped == r (false for NaN
// and ±Inf); rint_r = rint(clamped) (= rint(r) in range); U = 192 + u (philox16::kMagicBits).
// One fma rounded down gives 192 + e in [185, 200) (philox16.cuh), so e's nibble is bits
// 16..19 of the result (0x4340 + e, and 0x4340 ≡ 0 mod 16). Returns a word whose bits 16..19
// hold the nibble (the caller gathers byte 2 of eight of them); out of range 0x00080000 (−8).
// Branch-free: out of range the arithmetic runs on whatever r is and the select discards it.
__device__ __forceinline__ uint32_t residual_word(float r, float clamped, float rint_r, float U) {
  const float delta = __fsub_rn(rint_r, r);
  const uint32_t y =
      __float_as_uint(__fmaf_rd(static_cast<float>(kLsqResidualSteps), delta, U));
  return clamped == r ? y : (static_cast<uint32_t>(kLsqClipped) & 0xfu) << 16;
}

// B: the Hadamard block at compile time (hadamard_warp's B; 256·J when J > 1). kSide: the side
// channel e is written (training); without it (inference) the kernel has no Philox rounds and
// no residual arithmetic at all.
// Blocks of kThreads per SM that ptxas budgets registers for (65536 / (256·n) per thread); 0
// leaves the choice to ptxas, as for every configuration but one: the bf16 side-channel kernel
// at J = 2 (block 512) dropped to 64 registers and spilled 16 bytes once the Philox schedule
// freed registers (S10), so it is held at 3 blocks (80 registers, no spill), as before.
template <class T, int J, bool kSide>
constexpr int quantize_min_blocks() {
  return sizeof(T) == 2 && J == 2 && kSide ? 3 : 0;
}

template <class T, int J, int B, bool kSide>
__global__ void __launch_bounds__(kThreads, quantize_min_blocks<T, J, kSide>())
    hq_lsq_quantize_kernel(HqLsqQuantizeParams<T> p, PhiloxSchedule sched, float norm,
                           int64_t col_tiles, int64_t tiles) {
  constexpr int W = kChunkCols8 * J;
  constexpr int R = linear_detail::kRowsPerBatch8<J>;
  constexpr int TR = linear_detail::kTileRows8<J>;
  constexpr int kWords = linear_detail::kRawWords<T>;
  // +4 bytes per row: the column reads of the transpose spread over the banks.
  __shared__ __align__(16) int8_t tile[TR][W + 4];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const float s = *p.step;
  // r = v·(1/s): one IEEE division per thread, none per element (docs/formats.md)
  const float inv_s = __fdiv_rn(1.0f, s);
  if (!(s > 0.0f && detail::is_finite(s) && detail::is_finite(inv_s)) && threadIdx.x == 0 &&
      blockIdx.x == 0) {
    detail::report(p.status, StatusKind::bad_scale, 0);
  }
  const float qmin = static_cast<float>(p.range.qmin);
  const float qmax = static_cast<float>(p.range.qmax);
  const int block = static_cast<int>(p.block);

  // Tiles t = blockIdx.x, blockIdx.x + gridDim.x, ... (one tile per block in practice).
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t r0 = (t / col_tiles) * TR;
    const int64_t c0 = (t % col_tiles) * W;
    bool in_cols[J];  // chunk j of this lane lies inside the matrix (8 | c and 16 | cols)
#pragma unroll
    for (int j = 0; j < J; ++j) in_cols[j] = c0 + kChunkCols8 * j + kLaneCols8 * lane < p.cols;
    // rows % 16 == 0 and R | 16: a batch whose first row is in range has all R rows in range
    const auto batch_in_range = [&](int rb) { return rb < TR && r0 + rb < p.rows; };
    // Flat indices: the lane's first element of a batch's row 0, chunk 0 is bidx; row i, chunk
    // j adds i·cols + 256·j; the next batch adds `step`. (One running index instead of a
    // 64-bit row·cols product per batch and output.)
    const int64_t step = static_cast<int64_t>(kWarps) * R * p.cols;
    const auto load_batch = [&](int64_t bidx, uint32_t (&raw)[R][J][kWords]) {
#pragma unroll
      for (int i = 0; i < R; ++i) {
#pragma unroll
        for (int j = 0; j < J; ++j) {
          if (in_cols[j]) {
            linear_detail::load_raw8(p.x + bidx + i * p.cols + kChunkCols8 * j, raw[i][j]);
          } else {
            // a whole Hadamard block past the end (block | cols): never mixes with real columns
#pragma unroll
            for (int w = 0; w < kWords; ++w) raw[i][j][w] = 0u;
          }
        }
      }
    };

    uint32_t raw[R][J][kWords];
    int rb = warp * R;
    int64_t bidx = (r0 + rb) * p.cols + c0 + kLaneCols8 * lane;
    if (batch_in_range(rb)) load_batch(bidx, raw);
#pragma unroll 1
    for (; batch_in_range(rb); rb += kWarps * R, bidx += step) {
      // v = (x·H_k)·2^(−k/2), tested for NaN/Inf once per batch
      float v[R][J][kLaneCols8];
#pragma unroll
      for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < J; ++j) linear_detail::widen8(raw[i][j], v[i][j]);
      // The next batch's loads go out before this batch's arithmetic, into `raw` (dead once
      // widened): no second buffer to copy back per batch (16 register moves per batch at
      // bf16, J = 1, in SASS) and fewer live registers.
      if (batch_in_range(rb + kWarps * R)) load_batch(bidx + step, raw);
      bool finite = true;
#pragma unroll
      for (int i = 0; i < R; ++i) {
        linear_detail::hadamard_warp<J, B>(v[i], lane, block);
#pragma unroll
        for (int j = 0; j < J; ++j)
#pragma unroll
          for (int k = 0; k < kLaneCols8; ++k) {
            v[i][j][k] = __fmul_rn(v[i][j][k], norm);
            finite &= detail::is_finite(v[i][j][k]);
          }
      }
      // The slow path: report every non-finite input (StatusKind::nonfinite) and every
      // non-finite v (StatusKind::overflow) of the batch, the reports of the element-wise
      // reference. Inline and fully unrolled so that v stays in registers on the fast path.
      if (!finite) {
#pragma unroll
        for (int i = 0; i < R; ++i)
#pragma unroll
          for (int j = 0; j < J; ++j) {
            const int64_t idx = bidx + i * p.cols + kChunkCols8 * j;
#pragma unroll
            for (int k = 0; k < kLaneCols8; ++k) {
              if (!in_cols[j]) continue;
              if (!detail::is_finite(detail::to_f32(p.x[idx + k])))
                detail::report(p.status, StatusKind::nonfinite, static_cast<uint64_t>(idx + k));
              if (!detail::is_finite(v[i][j][k]))
                detail::report(p.status, StatusKind::overflow, static_cast<uint64_t>(idx + k));
            }
          }
      }

#pragma unroll
      for (int i = 0; i < R; ++i) {
#pragma unroll
        for (int j = 0; j < J; ++j) {
          if (!in_cols[j]) continue;
          const int64_t idx = bidx + i * p.cols + kChunkCols8 * j;
          const int64_t pidx = idx / 2;  // packed bytes: [rows, cols/2], cols even
          // r = v·inv_s;  q = clamp(rint(r), qmin, qmax) = rint(clamp(r, qmin, qmax)) (qmin,
          // qmax integers; NaN → qmin either way, fmaxf drops it): one magic add, no
          // rint/convert; the low byte of the sum's bit pattern is the code.
          float r[kLaneCols8], clamped[kLaneCols8], mq[kLaneCols8];
          uint32_t mb[kLaneCols8];
#pragma unroll
          for (int k = 0; k < kLaneCols8; ++k) {
            r[k] = __fmul_rn(v[i][j][k], inv_s);
            clamped[k] = fminf(fmaxf(r[k], qmin), qmax);
            mq[k] = __fadd_rn(clamped[k], linear_detail::kRoundMagic);
            mb[k] = __float_as_uint(mq[k]);
          }
          if constexpr (kSide) {
            // u_k = philox_uniform16(index_base + idx + k): idx + index_base is a multiple of
            // 8 (8 | c, 16 | cols, 8 | index_base), so the 8 uniforms are one whole block
            float U[kLaneCols8];
            philox16::magic_uniforms8(
                philox16::block(sched, (p.index_base + static_cast<uint64_t>(idx)) >> 3), U);
            uint32_t y[kLaneCols8];
#pragma unroll
            for (int k = 0; k < kLaneCols8; ++k) {
              const float rint_r = __fsub_rn(mq[k], linear_detail::kRoundMagic);
              y[k] = residual_word(r[k], clamped[k], rint_r, U[k]);
            }
            uint32_t even, odd;
            detail::gather_even_odd<2>(y, even, odd);  // the nibbles sit in byte 2
            *reinterpret_cast<uint32_t*>(p.e_packed + pidx) = detail::pack_nibbles8(even, odd);
          }
          // the 8 code bytes as two words (element k in byte k % 4 of word k / 4) and as 8
          // nibbles, from the same gathers
          uint32_t even, odd;  // codes (0, 2, 4, 6), (1, 3, 5, 7)
          detail::gather_even_odd<0>(mb, even, odd);
          const uint32_t lo = __byte_perm(even, odd, 0x5140);  // codes 0..3
          const uint32_t hi = __byte_perm(even, odd, 0x7362);  // codes 4..7
          if (p.q_t != nullptr) {  // uniform across the block
            auto* dst =
                reinterpret_cast<uint32_t*>(&tile[rb + i][kChunkCols8 * j + kLaneCols8 * lane]);
            dst[0] = lo;
            dst[1] = hi;
          }
          if (p.q != nullptr) *reinterpret_cast<uint2*>(p.q + idx) = make_uint2(lo, hi);
          if (p.q_packed != nullptr)
            *reinterpret_cast<uint32_t*>(p.q_packed + pidx) = detail::pack_nibbles8(even, odd);
        }
      }
    }
    if (p.q_t == nullptr) continue;  // uniform across the block
    __syncthreads();
    detail::store_tile_transposed<TR, W, kThreads>(tile, r0, c0, p.rows, p.cols, p.q_t);
    __syncthreads();  // the next tile rewrites `tile`
  }
}

bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <class T>
void hq_lsq_quantize_impl(const HqLsqQuantizeParams<T>& p, cudaStream_t stream) {
  const char* fn = "cuda::hq_lsq_quantize";
  NB_CHECK(p.rows > 0 && p.cols > 0 && p.rows % 16 == 0 && p.cols % 16 == 0,
           fn << ": shape [" << p.rows << ", " << p.cols
              << "] must have positive multiples of 16 for rows and cols; zero-pad to ["
              << (p.rows + 15) / 16 * 16 << ", " << (p.cols + 15) / 16 * 16 << "]");
  NB_CHECK(is_power_of_two(p.block) && p.block <= 1024 && p.cols % p.block == 0,
           fn << ": hadamard block " << p.block << " must be a power of two in [1, 1024] "
              << "dividing cols = " << p.cols);
  NB_CHECK(p.range.qmin < 0 && p.range.qmax > 0 && p.range.qmin >= -8 && p.range.qmax <= 7,
           fn << ": code range [" << p.range.qmin << ", " << p.range.qmax
              << "] must be signed (qmin < 0 < qmax) and inside [-8, 7] (the codes are packed "
                 "s4); use [-7, 7] or [-8, 7]");
  NB_CHECK(p.index_base % 8 == 0, fn << ": index_base " << p.index_base
                                     << " must be a multiple of 8 (one Philox block per 8 "
                                        "elements, philox_uniform16)");
  NB_CHECK(p.q != nullptr || p.q_t != nullptr || p.q_packed != nullptr || p.e_packed != nullptr,
           fn << ": no output requested; set q, q_t, q_packed or e_packed");
  const int64_t n = p.rows * p.cols;
  detail::check_device_pointer(p.x, n, fn, "x");
  detail::check_device_pointer(p.step, 1, fn, "step");
  for (const void* ptr : {static_cast<const void*>(p.x), static_cast<const void*>(p.q),
                          static_cast<const void*>(p.q_t), static_cast<const void*>(p.q_packed),
                          static_cast<const void*>(p.e_packed)}) {
    NB_CHECK(ptr == nullptr || aligned16(ptr),
             fn << ": every tensor must start on a 16-byte boundary (cudaMalloc bases); got "
                << ptr);
  }
  if (p.q != nullptr) detail::check_device_pointer(p.q, n, fn, "q");
  if (p.q_t != nullptr) detail::check_device_pointer(p.q_t, n, fn, "q_t");
  if (p.q_packed != nullptr) detail::check_device_pointer(p.q_packed, n / 2, fn, "q_packed");
  if (p.e_packed != nullptr) detail::check_device_pointer(p.e_packed, n / 2, fn, "e_packed");
  if (p.status != nullptr) detail::check_device_pointer(p.status, 1, fn, "status");

  HqLsqQuantizeParams<T> q = p;
  q.key.role = RngRole::rounding;
  // the stream's round keys, once per launch (rng.h philox_schedule): constant-bank operands
  const PhiloxSchedule sched = philox_schedule(q.key);
  // 2^(−k/2): the same expression as ref::hadamard_norm (fp64, one rounding to fp32)
  const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.block)));
  const auto launch = [&](auto jc, auto bc) {
    constexpr int J = decltype(jc)::value;
    constexpr int B = decltype(bc)::value;
    const int64_t col_tiles = detail::ceil_div(p.cols, kChunkCols8 * J);
    const int64_t tiles = detail::ceil_div(p.rows, linear_detail::kTileRows8<J>) * col_tiles;
    // One tile per block (each warp walks the tile's batches): an earlier version measured
    // 10% slower with one wave of blocks walking several tiles each (bench/README.md); the
    // tile loop stays for grids capped by the CUDA limit.
    detail::check_grid_extent(tiles, fn, "the tiling");
    const int64_t blocks = tiles;
    const auto grid = static_cast<unsigned>(blocks);
    if (q.e_packed != nullptr) {
      hq_lsq_quantize_kernel<T, J, B, true>
          <<<grid, kThreads, 0, stream>>>(q, sched, norm, col_tiles, tiles);
    } else {
      hq_lsq_quantize_kernel<T, J, B, false>
          <<<grid, kThreads, 0, stream>>>(q, sched, norm, col_tiles, tiles);
    }
  };
  linear_detail::dispatch_block8(p.block, launch);  // a power of two in [1, 1024] (checked above)
  NB_CUDA_CHECK_LAUNCH();
}

}  // namespace

void hq_lsq_quantize(const HqLsqQuantizeParams<float>& p, cudaStream_t stream) {
  hq_lsq_quantize_impl(p, stream);
}
void hq_lsq_quantize(const HqLsqQuantizeParams<bf16_t>& p, cudaStream_t stream) {
  hq_lsq_quantize_impl(p, stream);
}

}  // namespace nibble::cuda
