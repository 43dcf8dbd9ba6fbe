#pragma once
// Internal to the CPU backend: what its vectorized paths share.
//  - Run-time CPU checks. The build never assumes an instruction set (no -march): a hot loop
//    has its plain C++ form (the reference) and, beside it, an AVX2 form in a function marked
//    NB_TARGET_AVX2 that runs where use_avx2() says so (a few have AVX-512 forms too: the
//    integer GEMM, and W4A4's fp64 sums). A vectorized form performs the same IEEE operations
//    on each element in the same order (AVX2 alone enables no FMA, so nothing is contracted;
//    see NB_TARGET_AVX512F for AVX-512), hence the same bits; tests/unit/
//    test_ref_vectorized.cpp compares the forms with set_simd_enabled.
//  - philox_uniforms: philox_uniform over a run of consecutive indices, one Philox call per
//    four indices (word w of block b is element 4b + w, rng.h), so the values are the same;
//    philox_uniforms16 likewise for philox_uniform16 (one call per eight indices).
#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "nibble/parallel.h"
#include "nibble/rng.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(NB_NO_X86_DISPATCH)
#define NB_HAVE_X86_DISPATCH 1
#define NB_TARGET_AVX2 __attribute__((target("avx2")))
// AVX-512F enables FMA, and GCC contracts a·b + c even when written with intrinsics: float
// code under this target uses the explicit-rounding intrinsics (_mm512_mul_round_pd, ...),
// which are never fused.
#define NB_TARGET_AVX512F __attribute__((target("avx512f")))
#include <immintrin.h>
#else
#define NB_TARGET_AVX2
#define NB_TARGET_AVX512F
#endif

#if defined(__GNUC__)
#define NB_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define NB_ALWAYS_INLINE inline
#endif

namespace nibble::ref::detail {

inline bool cpu_has_avx2() {
#ifdef NB_HAVE_X86_DISPATCH
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

inline bool cpu_has_avx512f() {
#ifdef NB_HAVE_X86_DISPATCH
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

inline bool cpu_has_avx512_vnni() {
#ifdef NB_HAVE_X86_DISPATCH
  static const bool has =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

// Tests switch the vectorized forms off to compare them with the plain loops (default on).
inline std::atomic<bool>& simd_enabled_flag() {
  static std::atomic<bool> enabled{true};
  return enabled;
}
inline void set_simd_enabled(bool on) { simd_enabled_flag().store(on); }
inline bool use_avx2() {
  return cpu_has_avx2() && simd_enabled_flag().load(std::memory_order_relaxed);
}
inline bool use_avx512f() {
  return cpu_has_avx512f() && simd_enabled_flag().load(std::memory_order_relaxed);
}

#ifdef NB_HAVE_X86_DISPATCH
// Stores the 32 int32 lanes of v[0..3] (each in [−128, 127]) as 32 int8 in lane order.
NB_TARGET_AVX2 inline void store_s8x32(int8_t* dst, const __m256i v[4]) {
  // packs work per 128-bit half: the dwords come out as a0-3 b0-3 c0-3 d0-3 a4-7 b4-7 ...
  const __m256i ab = _mm256_packs_epi32(v[0], v[1]);
  const __m256i cd = _mm256_packs_epi32(v[2], v[3]);
  const __m256i abcd = _mm256_packs_epi16(ab, cd);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm256_permutevar8x32_epi32(abcd, order));
}
// std::clamp(v, lo, hi) on 8 lanes, for lo ≤ hi and v not NaN: the same value (on a tie
// v == lo it returns lo, which could differ from v only in the sign of a zero bound).
NB_TARGET_AVX2 inline __m256 clamp_ps(__m256 v, __m256 lo, __m256 hi) {
  return _mm256_min_ps(_mm256_max_ps(v, lo), hi);
}
// nearbyint on 8 lanes: the current rounding mode (half to even by default), no exceptions.
NB_TARGET_AVX2 inline __m256 nearbyint_ps(__m256 v) {
  return _mm256_round_ps(v, _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
}
#endif

// The Philox uniform of word w of a block: (word >> 8)·2^-24, exact in fp32.
NB_ALWAYS_INLINE float philox_word_uniform(uint32_t word) {
  return static_cast<float>(word >> 8) * (1.0f / 16777216.0f);
}

#ifdef NB_HAVE_X86_DISPATCH
// lo and hi halves of the 32×32 -> 64-bit products m·x on 8 lanes (mul_epu32 takes the even
// lanes; the odd ones are shifted down for a second multiply).
NB_TARGET_AVX2 inline void mulhilo8(__m256i m, __m256i x, __m256i* lo, __m256i* hi) {
  const __m256i even = _mm256_mul_epu32(m, x);
  const __m256i odd = _mm256_mul_epu32(m, _mm256_srli_epi64(x, 32));
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// words[0..3] = the four words of the 8 blocks block0 .. block0 + 7 (whose low 32 bits must
// not wrap) in stream order (word w of block b at position 4(b − block0) + w): philox4x32_10
// of rng.h on 8 counters at once.
NB_TARGET_AVX2 inline void philox_words_x32(uint64_t block0, uint32_t step, uint32_t stream,
                                            uint32_t k0, uint32_t k1, __m256i words[4]) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int32_t>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int32_t>(0xCD9E8D57u));
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(block0)),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int32_t>(block0 >> 32));
  __m256i c2 = _mm256_set1_epi32(static_cast<int32_t>(step));
  __m256i c3 = _mm256_set1_epi32(static_cast<int32_t>(stream));
  for (int r = 0; r < 10; ++r) {
    __m256i lo0, hi0, lo1, hi1;
    mulhilo8(m0, c0, &lo0, &hi0);
    mulhilo8(m1, c2, &lo1, &hi1);
    const __m256i vk0 = _mm256_set1_epi32(static_cast<int32_t>(k0));
    const __m256i vk1 = _mm256_set1_epi32(static_cast<int32_t>(k1));
    // ctr = {hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0}
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), vk0);
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), vk1);
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // Transpose [word][block] to [block][word].
  const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
  const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
  const __m256i b04 = _mm256_unpacklo_epi64(t0, t2), b15 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i b26 = _mm256_unpacklo_epi64(t1, t3), b37 = _mm256_unpackhi_epi64(t1, t3);
  words[0] = _mm256_permute2x128_si256(b04, b15, 0x20);
  words[1] = _mm256_permute2x128_si256(b26, b37, 0x20);
  words[2] = _mm256_permute2x128_si256(b04, b15, 0x31);
  words[3] = _mm256_permute2x128_si256(b26, b37, 0x31);
}

// u[0..31] = philox_uniform of the 32 elements of blocks block0 .. block0 + 7 (element 4b + w
// is word w of block b).
NB_TARGET_AVX2 inline void philox_uniforms_x32(uint64_t block0, uint32_t step, uint32_t stream,
                                               uint32_t k0, uint32_t k1, float* u) {
  __m256i words[4];
  philox_words_x32(block0, step, stream, k0, k1, words);
  const __m256 scale = _mm256_set1_ps(1.0f / 16777216.0f);
  for (int k = 0; k < 4; ++k) {
    // (word >> 8) < 2^24 converts exactly, and the scaling by 2^-24 is exact
    const __m256 v = _mm256_cvtepi32_ps(_mm256_srli_epi32(words[k], 8));
    _mm256_storeu_ps(u + 8 * k, _mm256_mul_ps(v, scale));
  }
}

// u[0..63] = philox_uniform16 of the 64 elements of blocks block0 .. block0 + 7: element
// 8b + 2w + h is half h (low 16 bits for h = 0) of word w of block b, i.e. element 2j + h of
// the run is half h of stream word j.
NB_TARGET_AVX2 inline void philox_uniforms16_x64(uint64_t block0, uint32_t step, uint32_t stream,
                                                 uint32_t k0, uint32_t k1, float* u) {
  __m256i words[4];
  philox_words_x32(block0, step, stream, k0, k1, words);
  const __m256 scale = _mm256_set1_ps(1.0f / 65536.0f);
  const __m256i low16 = _mm256_set1_epi32(0xffff);
  for (int k = 0; k < 4; ++k) {
    const __m256i lo = _mm256_and_si256(words[k], low16);
    const __m256i hi = _mm256_srli_epi32(words[k], 16);
    // per 128-bit lane: (lo0, hi0, lo1, hi1) and (lo2, hi2, lo3, hi3)
    const __m256i a = _mm256_unpacklo_epi32(lo, hi), b = _mm256_unpackhi_epi32(lo, hi);
    const __m256i first = _mm256_permute2x128_si256(a, b, 0x20);   // words 0..3 of the 8
    const __m256i second = _mm256_permute2x128_si256(a, b, 0x31);  // words 4..7
    _mm256_storeu_ps(u + 16 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(first), scale));
    _mm256_storeu_ps(u + 16 * k + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(second), scale));
  }
}
#endif

// u[i] = philox_uniform(key, first + i) for 0 ≤ i < count.
inline void philox_uniforms(const PhiloxKey& key, uint64_t first, int64_t count, float* u) {
  const uint32_t k0 = static_cast<uint32_t>(key.seed), k1 = static_cast<uint32_t>(key.seed >> 32);
  const uint32_t stream = (key.layer << 8) | static_cast<uint32_t>(key.role);
  [[maybe_unused]] const bool avx2 = use_avx2();
  uint64_t index = first;
  int64_t i = 0;
  while (i < count) {
    const uint64_t block = index >> 2;
#ifdef NB_HAVE_X86_DISPATCH
    // 8 whole blocks at a time when they start at word 0 and their counters do not carry
    // into the high word.
    if (avx2 && (index & 3) == 0 && count - i >= 32 &&
        (block & 0xffffffffu) <= 0xffffffffu - 7) {
      philox_uniforms_x32(block, key.step, stream, k0, k1, u + i);
      i += 32;
      index += 32;
      continue;
    }
#endif
    const Philox4 ctr{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), key.step,
                       stream}};
    const Philox4 out = philox4x32_10(ctr, k0, k1);
    // The words of this block from index's own word on (the first block may start mid-way).
    for (uint64_t w = index & 3; w < 4 && i < count; ++w, ++i, ++index)
      u[i] = philox_word_uniform(out.v[w]);
  }
}

// u[i] = philox_uniform16(key, first + i) for 0 ≤ i < count (one Philox call per 8 indices).
inline void philox_uniforms16(const PhiloxKey& key, uint64_t first, int64_t count, float* u) {
  const uint32_t k0 = static_cast<uint32_t>(key.seed), k1 = static_cast<uint32_t>(key.seed >> 32);
  const uint32_t stream = (key.layer << 8) | static_cast<uint32_t>(key.role);
  [[maybe_unused]] const bool avx2 = use_avx2();
  uint64_t index = first;
  int64_t i = 0;
  while (i < count) {
    const uint64_t block = index >> 3;
#ifdef NB_HAVE_X86_DISPATCH
    if (avx2 && (index & 7) == 0 && count - i >= 64 &&
        (block & 0xffffffffu) <= 0xffffffffu - 7) {
      philox_uniforms16_x64(block, key.step, stream, k0, k1, u + i);
      i += 64;
      index += 64;
      continue;
    }
#endif
    const Philox4 ctr{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), key.step,
                       stream}};
    const Philox4 out = philox4x32_10(ctr, k0, k1);
    for (uint64_t e = index & 7; e < 8 && i < count; ++e, ++i, ++index)
      u[i] = static_cast<float>((out.v[e >> 1] >> (16 * (e & 1))) & 0xffffu) * (1.0f / 65536.0f);
  }
}

// A heap array of a trivial T that starts uninitialized, for outputs that are written in
// full (a GEMM's int32 accumulators), where std::vector would first zero every byte.
template <class T>
class UninitBuffer {
 public:
  explicit UninitBuffer(int64_t n)
      : data_(std::make_unique_for_overwrite<T[]>(static_cast<size_t>(n))),
        size_(static_cast<size_t>(n)) {}
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  T& operator[](size_t i) { return data_[i]; }
  const T& operator[](size_t i) const { return data_[i]; }
  size_t size() const { return size_; }

 private:
  std::unique_ptr<T[]> data_;
  size_t size_;
};

// fn(begin, end) over [0, n) in chunks of `chunk` indices (the last may be shorter), run in
// parallel. The chunks depend on n and chunk only, never on the thread count; fn must write
// only outputs of its own indices. One std::function call per chunk, not per index.
template <class Fn>
void parallel_chunks(int64_t n, int64_t chunk, int64_t work_per_index, Fn&& fn) {
  if (n <= 0) return;
  const int64_t chunks = (n + chunk - 1) / chunk;
  parallel_for(
      chunks, [&](int64_t i) { fn(i * chunk, std::min(n, (i + 1) * chunk)); },
      chunk * work_per_index);
}

// fn(begin, end) over runs of `run` values for a cheap scan (one vectorized pass, about a
// nanosecond per 8 values): on the calling thread up to 2^22 values, since a fork/join
// costs more than that on a busy 2-core machine; in parallel above.
template <class Fn>
void scan_runs(int64_t n, int64_t run, Fn&& fn) {
  if (n <= (int64_t{1} << 22)) {
    for (int64_t i0 = 0; i0 < n; i0 += run) fn(i0, std::min(n, i0 + run));
    return;
  }
  parallel_chunks(n, run, int64_t{1} << 16, fn);
}

// The classic 8 × 8 byte transpose on 64-bit words (byte c of word r is element (r, c)):
// three rounds exchange the off-diagonal 4 × 4, 2 × 2 and 1 × 1 blocks.
NB_ALWAYS_INLINE void transpose8x8_bytes(uint64_t w[8]) {
  auto swap = [](uint64_t& a, uint64_t& b, int shift, uint64_t mask) {
    const uint64_t t = ((a >> shift) ^ b) & mask;
    a ^= t << shift;
    b ^= t;
  };
  for (int r = 0; r < 4; ++r) swap(w[r], w[r + 4], 32, 0x00000000FFFFFFFFull);
  for (int r : {0, 1, 4, 5}) swap(w[r], w[r + 2], 16, 0x0000FFFF0000FFFFull);
  for (int r : {0, 2, 4, 6}) swap(w[r], w[r + 1], 8, 0x00FF00FF00FF00FFull);
}

// out[cols, rows] = in[rows, cols]ᵀ (bytes): 8 × 8 blocks through transpose8x8_bytes, the
// ragged edges element by element; parallel over blocks of output rows.
inline void transpose_s8(const int8_t* in, int64_t rows, int64_t cols, int8_t* out) {
  // Byte c of a loaded word holds column c only on a little-endian machine.
  static_assert(std::endian::native == std::endian::little);
  parallel_chunks(cols, 64, rows, [&](int64_t j0, int64_t j1) {
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
      int64_t i = 0;
      for (; i + 8 <= rows; i += 8) {
        uint64_t w[8];
        for (int r = 0; r < 8; ++r) std::memcpy(&w[r], in + (i + r) * cols + j, 8);
        transpose8x8_bytes(w);
        for (int r = 0; r < 8; ++r) std::memcpy(out + (j + r) * rows + i, &w[r], 8);
      }
      for (; i < rows; ++i)
        for (int64_t jj = j; jj < j + 8; ++jj) out[jj * rows + i] = in[i * cols + jj];
    }
    for (; j < j1; ++j)
      for (int64_t i = 0; i < rows; ++i) out[j * rows + i] = in[i * cols + j];
  });
}

// db[col] = Σ_r dy[r, col] in fp64, rows in index order per column. The sweep goes along
// rows of dy (contiguous) for a chunk of columns at a time; each column still adds its
// values in row order, so the sums are those of a column-by-column loop.
inline void column_sums(const float* dy, int64_t n, int64_t c, float* db) {
  detail::parallel_chunks(c, 256, n, [&](int64_t j0, int64_t j1) {
    std::vector<double> acc(static_cast<size_t>(j1 - j0), 0.0);
    for (int64_t r = 0; r < n; ++r) {
      const float* row = dy + r * c + j0;
      for (int64_t j = 0; j < j1 - j0; ++j) acc[static_cast<size_t>(j)] += row[j];
    }
    for (int64_t j = j0; j < j1; ++j) db[j] = static_cast<float>(acc[static_cast<size_t>(j - j0)]);
  });
}

}  // namespace nibble::ref::detail
