// The linear layer's fused forward quantizer: block Hadamard + LSQ codes + the LSQ residual
// side channel in one pass over x (hq_linear.h, hq_lsq_quantize).
//
// Work split (the layout of src/cuda/quant/hadamard.cu, see hadamard_warp.cuh): a thread block
// of 8 warps owns 32 rows × W columns, W = 128·J, J = max(1, block/128); a warp transforms
// R = max(1, 4/J) rows at a time, their loads issued together. Per lane and chunk, 4 codes
// leave as one 32-bit word (q), two 16-bit words of packed nibbles (q and e), and (with q_t) a
// word in the shared tile from which the transposed codes are stored as 4-row column segments.
// The kernel is issue-bound (ncu: ~80% of issue slots), so the code counts instructions: a
// multiply by 1/s per element (no division), one Philox block per 8 elements shared by lane
// pairs (16-bit uniforms, philox16.cuh), no rounding/conversion instructions (magic-number
// adds, a rounded-down fma for the side channel's floor), byte permutes for the packing, no
// branches in the common path, the Hadamard block a template parameter (bench/README.md,
// "Quantization passes").
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

using linear_detail::kChunk;

constexpr int kTileRows = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

template <int J>
constexpr int kRowsPerBatch = J <= 2 ? 4 / J : 1;

// The side-channel nibble of r whose code is already known (ref::lsq_residual_encode):
//   −8 when !(qmin ≤ r ≤ qmax) (±Inf and NaN included), else
//   floor(14·(rint(r) − r) + u)  of the exact sum, in [−7, 7] (|δ| ≤ 1/2, u < 1)
// Arguments: clamped = clamp(r, qmin, qmax), so r is in range iff clamped == r (false for NaN
// and ±Inf); rint_r = rint(clamped) (= rint(r) in range); U = 192 + u (philox16::kMagicBits).
// One fma rounded down gives 192 + e in [185, 200) (philox16.cuh), so e's nibble is bits
// 16..19 of the result (0x4340 + e, and 0x4340 ≡ 0 mod 16). Returns a word whose bits 16..19
// hold the nibble (the caller gathers byte 2 of four of them); out of range 0x00080000 (−8).
// Branch-free: out of range the arithmetic runs on whatever r is and the select discards it.
__device__ __forceinline__ uint32_t residual_word(float r, float clamped, float rint_r, float U) {
  const float delta = __fsub_rn(rint_r, r);
  const uint32_t y =
      __float_as_uint(__fmaf_rd(static_cast<float>(kLsqResidualSteps), delta, U));
  return clamped == r ? y : (static_cast<uint32_t>(kLsqClipped) & 0xfu) << 16;
}

// The low nibbles of byte 2 of x[k], k = 0..3, packed as one 16-bit value (element k in bits
// 4k .. 4k+3): two byte gathers and a merge.
__device__ __forceinline__ uint32_t pack_nibbles_b2(uint32_t x0, uint32_t x1, uint32_t x2,
                                                    uint32_t x3) {
  const uint32_t even = __byte_perm(x0, x2, 0x0062);  // bytes 0, 1: x0.b2, x2.b2
  const uint32_t odd = __byte_perm(x1, x3, 0x0062);   // bytes 0, 1: x1.b2, x3.b2
  return (even & 0x0f0fu) | ((odd << 4) & 0xf0f0u);
}

// B: the Hadamard block at compile time (hadamard_warp's B; 128·J when J > 1).
template <class T, int J, int B>
__global__ void __launch_bounds__(kThreads)
    hq_lsq_quantize_kernel(HqLsqQuantizeParams<T> p, float norm, int64_t col_tiles,
                           int64_t tiles) {
  constexpr int W = kChunk * J;
  constexpr int R = kRowsPerBatch<J>;
  // +4 bytes per row: the column reads of the transpose fall in distinct banks.
  __shared__ __align__(16) int8_t tile[kTileRows][W + 4];
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
  const int64_t half_cols = p.cols / 2;

  // Tiles t = blockIdx.x, blockIdx.x + gridDim.x, ... (one tile per block in practice).
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t r0 = (t / col_tiles) * kTileRows;
    const int64_t c0 = (t % col_tiles) * W;
    for (int rb = warp * R; rb < kTileRows; rb += kWarps * R) {
      if (r0 + rb >= p.rows) break;  // rows % 16 == 0 and R | 16: the R rows are all in range
      // All R·J loads first, then the NaN/Inf test: the status atomics could alias x for the
      // compiler, so a check between two loads would serialise them.
      float v[R][J][4];
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int64_t row = r0 + rb + i;
#pragma unroll
        for (int j = 0; j < J; ++j) {
          const int64_t c = c0 + kChunk * j + 4 * lane;
          if (c < p.cols) {
            linear_detail::load4(p.x + row * p.cols + c, v[i][j]);
          } else {
            // a whole Hadamard block past the end (block | cols): never mixes with real columns
#pragma unroll
            for (int k = 0; k < 4; ++k) v[i][j][k] = 0.0f;
          }
        }
      }
      bool bad = false;  // one branch per batch; the per-element reports only when taken
#pragma unroll
      for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < J; ++j)
#pragma unroll
          for (int k = 0; k < 4; ++k) bad |= !detail::is_finite(v[i][j][k]);
      if (bad) {
        for (int i = 0; i < R; ++i) {
          for (int j = 0; j < J; ++j) {
            const int64_t c = c0 + kChunk * j + 4 * lane;
            for (int k = 0; k < 4; ++k) {
              if (c < p.cols && !detail::is_finite(v[i][j][k]))
                detail::report(p.status, StatusKind::nonfinite,
                               static_cast<uint64_t>((r0 + rb + i) * p.cols + c + k));
            }
          }
        }
      }
      // The side channel's 16-bit uniforms (philox16.cuh): groups g = i·J + j in pairs, one
      // Philox block per lane and pair. Indices of the even lane are multiples of 8: cols % 16
      // == 0, c0 % 128 == 0 and index_base % 8 == 0 (checked on the host).
      constexpr int G = R * J;
      static_assert(G % 2 == 0, "groups come in pairs");
      uint32_t words[G][2];
      if (p.e_packed != nullptr) {  // uniform
#pragma unroll
        for (int g = 0; g < G; g += 2) {
          const auto index_of = [&](int gg) {
            return p.index_base +
                   static_cast<uint64_t>((r0 + rb + gg / J) * p.cols + c0 + kChunk * (gg % J) +
                                         4 * lane);
          };
          philox16::pair(p.key, index_of(g), index_of(g + 1), (lane & 1) != 0, words[g],
                         words[g + 1]);
        }
      }
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int64_t row = r0 + rb + i;
        linear_detail::hadamard_warp<J, B>(v[i], lane, block);
#pragma unroll
        for (int j = 0; j < J; ++j) {
          const int64_t c = c0 + kChunk * j + 4 * lane;
          if (c >= p.cols) continue;
          const int64_t idx = row * p.cols + c;
          // v = (x·H_k)·2^(−k/2);  r = v·inv_s  (one multiply per element, kept in r[])
          float r[4];
          bool overflow = false;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float vk = __fmul_rn(v[i][j][k], norm);
            overflow |= !detail::is_finite(vk);
            r[k] = __fmul_rn(vk, inv_s);
          }
          if (overflow) {
            for (int k = 0; k < 4; ++k) {
              if (!detail::is_finite(__fmul_rn(v[i][j][k], norm)))
                detail::report(p.status, StatusKind::overflow, static_cast<uint64_t>(idx + k));
            }
          }
          // q = clamp(rint(r), qmin, qmax) = rint(clamp(r, qmin, qmax)) (qmin, qmax integers;
          // NaN → qmin either way, fmaxf drops it): one magic add, no rint/convert; the low
          // byte of the sum's bit pattern is the code.
          float clamped[4], mq[4];
          uint32_t mb[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            clamped[k] = fminf(fmaxf(r[k], qmin), qmax);
            mq[k] = __fadd_rn(clamped[k], linear_detail::kRoundMagic);
            mb[k] = __float_as_uint(mq[k]);
          }
          const int64_t pidx = row * half_cols + c / 2;
          if (p.e_packed != nullptr) {  // uniform
            float U[4];
            philox16::magic_uniforms4(words[i * J + j], U);
            uint32_t y[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              const float rint_r = __fsub_rn(mq[k], linear_detail::kRoundMagic);
              y[k] = residual_word(r[k], clamped[k], rint_r, U[k]);
            }
            *reinterpret_cast<uint16_t*>(p.e_packed + pidx) =
                static_cast<uint16_t>(pack_nibbles_b2(y[0], y[1], y[2], y[3]));
          }
          // the 4 code bytes as one word (element k in byte k) and as 4 nibbles, from the
          // same two gathers: even = (code0, code2), odd = (code1, code3) in bytes 0, 1
          const uint32_t even = __byte_perm(mb[0], mb[2], 0x0040);
          const uint32_t odd = __byte_perm(mb[1], mb[3], 0x0040);
          const uint32_t word = __byte_perm(even, odd, 0x5140);
          if (p.q_t != nullptr)  // uniform across the block
            *reinterpret_cast<uint32_t*>(&tile[rb + i][kChunk * j + 4 * lane]) = word;
          if (p.q != nullptr) *reinterpret_cast<uint32_t*>(p.q + idx) = word;
          if (p.q_packed != nullptr)
            *reinterpret_cast<uint16_t*>(p.q_packed + pidx) =
                static_cast<uint16_t>((even & 0x0f0fu) | ((odd << 4) & 0xf0f0u));
        }
      }
    }
    if (p.q_t == nullptr) continue;  // uniform across the block
    __syncthreads();
    // lane = 8·(column within a group of 4) + m: q_t[c, r0 + 4m .. 4m+3] = tile[4m .. 4m+3][cc]
    const int m = lane & 7;
    const int64_t row = r0 + 4 * m;
    for (int cb = warp * 4; cb < W; cb += kWarps * 4) {
      const int cc = cb + (lane >> 3);
      const int64_t c = c0 + cc;
      if (c < p.cols && row < p.rows) {
        const uint32_t word =
            static_cast<uint8_t>(tile[4 * m][cc]) |
            (static_cast<uint32_t>(static_cast<uint8_t>(tile[4 * m + 1][cc])) << 8) |
            (static_cast<uint32_t>(static_cast<uint8_t>(tile[4 * m + 2][cc])) << 16) |
            (static_cast<uint32_t>(static_cast<uint8_t>(tile[4 * m + 3][cc])) << 24);
        *reinterpret_cast<uint32_t*>(p.q_t + c * p.rows + row) = word;
      }
    }
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
  // 2^(−k/2): the same expression as ref::hadamard_norm (fp64, one rounding to fp32)
  const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.block)));
  const auto launch = [&](auto jc, auto bc) {
    constexpr int J = decltype(jc)::value;
    constexpr int B = decltype(bc)::value;
    const int64_t col_tiles = detail::ceil_div(p.cols, kChunk * J);
    const int64_t tiles = detail::ceil_div(p.rows, kTileRows) * col_tiles;
    // One tile per block: the kernel is bound by its arithmetic (an eighth of a Philox block
    // per element, the butterfly, the codes), and measured 10% slower with one wave of blocks
    // walking several tiles each (bench/README.md); the tile loop stays for grids capped
    // by the CUDA limit.
    detail::check_grid_extent(tiles, fn, "the tiling");
    const int64_t blocks = tiles;
    hq_lsq_quantize_kernel<T, J, B><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        q, norm, col_tiles, tiles);
  };
  using std::integral_constant;
  constexpr integral_constant<int, 1> one{};
  switch (p.block) {  // a power of two in [1, 1024] (checked above)
    case 1: launch(one, integral_constant<int, 1>{}); break;
    case 2: launch(one, integral_constant<int, 2>{}); break;
    case 4: launch(one, integral_constant<int, 4>{}); break;
    case 8: launch(one, integral_constant<int, 8>{}); break;
    case 16: launch(one, integral_constant<int, 16>{}); break;
    case 32: launch(one, integral_constant<int, 32>{}); break;
    case 64: launch(one, integral_constant<int, 64>{}); break;
    case 128: launch(one, integral_constant<int, 128>{}); break;
    case 256: launch(integral_constant<int, 2>{}, integral_constant<int, 256>{}); break;
    case 512: launch(integral_constant<int, 4>{}, integral_constant<int, 512>{}); break;
    default: launch(integral_constant<int, 8>{}, integral_constant<int, 1024>{}); break;
  }
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
