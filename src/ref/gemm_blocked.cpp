// Register-blocked integer GEMMs C[M, N] = A[M, K] · B[N, K]ᵀ (TN), bit-identical to the
// plain loops of gemm.cpp.
//
// Layout. Both operands are first copied into panels whose K axis is cut into groups of G
// consecutive k (G = 1 for the portable kernel, 2 for AVX2's int16 pairs, 4 for the byte
// kernel; K is padded with zero codes to a multiple of G, which adds exact zeros):
//   A tile t  (rows t·MR .. t·MR + MR − 1):  [K/G][MR][G]   G codes per (group, row)
//   B panel p (rows p·NR .. p·NR + NR − 1):  [K/G][NR][G]   NR words per group
// A micro-kernel keeps an MR × NR tile of C in registers; per k-group it loads NR words of
// B, broadcasts each row's word of A, and adds the G-term dot products lane by lane:
//   c[r, j] += Σ_{e < G} a[r, g·G + e] · b[j, g·G + e]
// so no horizontal reduction is needed. Rows and columns past M and N are padded tiles whose
// results are dropped.
//
// Exactness. Every kernel adds exact integer products in int32; only the order of the
// additions differs from the loops. The caller has checked K·max|a|·max|b| ≤ 2^31 − 1, which
// bounds every partial sum as well, so no order can overflow and the results are identical.
// The byte kernel (vpdpbusd multiplies unsigned by signed bytes) computes
// Σ (a + 128)·b − 128·Σ b with wrapping int32 adds: that equals Σ a·b modulo 2^32, and the
// true value fits int32, so it is exact too.
//
// Threads. Tasks are fixed blocks of kRowTiles tiles of rows of C whatever the thread count;
// each packs its rows of A and writes its own rows of C.
#include "ref/gemm_blocked.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "nibble/parallel.h"

#ifdef NB_HAVE_X86_DISPATCH  // ref/simd.h
#include <immintrin.h>
#endif

namespace nibble::ref::detail {
namespace {

constexpr int64_t kRowTiles = 16;  // tiles of MR rows per task

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One 32-bit word of a panel: G codes of type T.
uint32_t load_word(const void* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

// X[rows, K] int8 -> panels [ceil(rows/R)][K/G][R][G] of T, each code plus kOffset (A is
// packed with R = MR, B with R = NR and no offset). Padding (rows ≥ `rows`, k ≥ K) holds
// code 0, i.e. kOffset. Every element is written, so the buffer starts uninitialized.
template <class T, int64_t R, int64_t G, int32_t kOffset>
std::unique_ptr<T[]> pack_panels(const int8_t* x, int64_t rows, int64_t k) {
  const int64_t panels = ceil_div(rows, R), groups = ceil_div(k, G), full = k / G;
  auto out = std::make_unique_for_overwrite<T[]>(static_cast<size_t>(panels * groups * R * G));
  const T pad = static_cast<T>(kOffset);
  for (int64_t p = 0; p < panels; ++p) {
    T* dst = out.get() + p * groups * R * G;
    for (int64_t r = 0; r < R; ++r) {
      if (p * R + r >= rows) {
        for (int64_t g = 0; g < groups; ++g)
          for (int64_t e = 0; e < G; ++e) dst[(g * R + r) * G + e] = pad;
        continue;
      }
      const int8_t* src = x + (p * R + r) * k;
      if constexpr (sizeof(T) == 1 && G == 4) {
        // Four codes as one word; + 128 on a byte in two's complement is a flip of its top
        // bit, which turns the signed code into the unsigned (a + 128).
        static_assert(kOffset == 0 || kOffset == 128);
        const uint32_t flip = kOffset == 128 ? 0x80808080u : 0u;
        for (int64_t g = 0; g < full; ++g) {
          const uint32_t w = load_word(src + 4 * g) ^ flip;
          std::memcpy(dst + (g * R + r) * 4, &w, sizeof w);
        }
      } else {
        for (int64_t g = 0; g < full; ++g)
          for (int64_t e = 0; e < G; ++e)
            dst[(g * R + r) * G + e] = static_cast<T>(src[g * G + e] + kOffset);
      }
      for (int64_t e = 0; full < groups && e < G; ++e) {
        const int64_t i = full * G + e;
        dst[(full * R + r) * G + e] = i < k ? static_cast<T>(src[i] + kOffset) : pad;
      }
    }
  }
  return out;
}

// Where a micro-kernel writes its MR × NR tile: straight into C when the tile lies inside,
// else into a scratch tile that finish() cuts to `rows` × `cols`.
template <int64_t MR, int64_t NR>
class TileOut {
 public:
  TileOut(int32_t* c, int64_t ldc, int64_t rows, int64_t cols)
      : c_(c), ldc_(ldc), rows_(rows), cols_(cols) {}
  bool full() const { return rows_ == MR && cols_ == NR; }
  int32_t* row(int64_t r) { return full() ? c_ + r * ldc_ : scratch_ + r * NR; }
  void finish() {
    if (full()) return;
    for (int64_t r = 0; r < rows_; ++r)
      for (int64_t j = 0; j < cols_; ++j) c_[r * ldc_ + j] = scratch_[r * NR + j];
  }

 private:
  int32_t* c_;
  int64_t ldc_, rows_, cols_;
  int32_t scratch_[MR * NR];  // written in full by the kernel before finish() reads it
};

// The blocked driver. B is packed once, on the calling thread (N·K bytes, a small fraction
// of the M·N·K multiply-adds); then one parallel loop runs over blocks of kRowTiles·MR rows
// of C, each packing its own rows of A and running `kernel` on every (tile, panel) of its
// rows. One fork/join per product, which matters on a busy machine.
// Kernel(const TA* a_tile, const TB* b_panel, int64_t groups, const int32_t* corr,
//        TileOut<MR, NR>& out); corr points at the panel's NR correction terms (or null).
template <class TA, class TB, int64_t MR, int64_t NR, int64_t G, int32_t kOffset, class Kernel>
void gemm_blocked(const int8_t* a, const int8_t* b, int64_t m, int64_t n, int64_t k, int32_t* c,
                  Kernel kernel) {
  constexpr int64_t kBlockRows = kRowTiles * MR;
  const int64_t groups = ceil_div(k, G), panels = ceil_div(n, NR);
  const std::unique_ptr<TB[]> bp = pack_panels<TB, NR, G, 0>(b, n, k);
  // corr[j] = kOffset·Σ_k b[j, k] modulo 2^32, in wrapping uint32 like the kernel's adds
  // (with small codes K may be large enough for the true value to leave int32).
  std::vector<int32_t> corr(kOffset != 0 ? static_cast<size_t>(panels * NR) : 0, 0);
  for (int64_t j = 0; kOffset != 0 && j < n; ++j) {
    uint32_t sum = 0;
    for (int64_t i = 0; i < k; ++i)
      sum += static_cast<uint32_t>(static_cast<int32_t>(b[j * k + i]));
    corr[static_cast<size_t>(j)] = static_cast<int32_t>(sum * static_cast<uint32_t>(kOffset));
  }
  const int64_t row_blocks = ceil_div(m, kBlockRows);
  parallel_rows(row_blocks, m * n * k, [&](int64_t block) {
    const int64_t r0 = block * kBlockRows, rows = std::min(kBlockRows, m - r0);
    const std::unique_ptr<TA[]> ap = pack_panels<TA, MR, G, kOffset>(a + r0 * k, rows, k);
    const int64_t tiles = ceil_div(rows, MR);
    // The panel stays in cache while the block's tiles stream past it.
    for (int64_t p = 0; p < panels; ++p) {
      const TB* b_panel = bp.get() + p * groups * NR * G;
      const int32_t* panel_corr = corr.empty() ? nullptr : corr.data() + p * NR;
      for (int64_t t = 0; t < tiles; ++t) {
        TileOut<MR, NR> out(c + (r0 + t * MR) * n + p * NR, n, std::min(MR, rows - t * MR),
                            std::min(NR, n - p * NR));
        kernel(ap.get() + t * groups * MR * G, b_panel, groups, panel_corr, out);
        out.finish();
      }
    }
  });
}

// ---- portable: int16 panels, G = 1, 4 × 16 tiles -----------------------------------------
// One k per step: compilers vectorize the j loop as a widening int16 multiply (SSE2 has
// one), which a G = 2 pairing defeats.
constexpr int64_t kMR16 = 4, kNR16 = 16;

void kernel_portable(const int16_t* a, const int16_t* b, int64_t groups, const int32_t*,
                     TileOut<kMR16, kNR16>& out) {
  int32_t acc[kMR16][kNR16] = {};
  for (int64_t g = 0; g < groups; ++g) {
    const int16_t* ag = a + g * kMR16;
    const int16_t* bg = b + g * kNR16;
    for (int64_t r = 0; r < kMR16; ++r) {
      const int32_t ar = ag[r];
      // c[r, j] += a[r, g]·b[j, g]
      for (int64_t j = 0; j < kNR16; ++j) acc[r][j] += ar * static_cast<int32_t>(bg[j]);
    }
  }
  for (int64_t r = 0; r < kMR16; ++r) std::memcpy(out.row(r), acc[r], sizeof acc[r]);
}

#ifdef NB_HAVE_X86_DISPATCH
// ---- AVX2: int16 pairs, G = 2, 4 × 16 tiles; vpmaddwd forms each lane's two-term sum -
__attribute__((target("avx2"))) void kernel_avx2(const int16_t* a, const int16_t* b,
                                                 int64_t groups, const int32_t*,
                                                 TileOut<kMR16, kNR16>& out) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00;
  __m256i c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  for (int64_t g = 0; g < groups; ++g) {
    const int16_t* bg = b + g * kNR16 * 2;
    const int16_t* ag = a + g * kMR16 * 2;
    // b0: lanes j = 0..7 as (b[j, 2g], b[j, 2g+1]); b1: j = 8..15
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bg));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bg + 16));
    __m256i av = _mm256_set1_epi32(static_cast<int32_t>(load_word(ag)));
    c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(av, b0));
    c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(av, b1));
    av = _mm256_set1_epi32(static_cast<int32_t>(load_word(ag + 2)));
    c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(av, b0));
    c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(av, b1));
    av = _mm256_set1_epi32(static_cast<int32_t>(load_word(ag + 4)));
    c20 = _mm256_add_epi32(c20, _mm256_madd_epi16(av, b0));
    c21 = _mm256_add_epi32(c21, _mm256_madd_epi16(av, b1));
    av = _mm256_set1_epi32(static_cast<int32_t>(load_word(ag + 6)));
    c30 = _mm256_add_epi32(c30, _mm256_madd_epi16(av, b0));
    c31 = _mm256_add_epi32(c31, _mm256_madd_epi16(av, b1));
  }
  const __m256i rows[kMR16][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
  for (int64_t r = 0; r < kMR16; ++r) {
    auto* dst = reinterpret_cast<__m256i*>(out.row(r));
    _mm256_storeu_si256(dst, rows[r][0]);
    _mm256_storeu_si256(dst + 1, rows[r][1]);
  }
}

// ---- AVX-512 VNNI: byte panels, G = 4, 4 × 32 tiles -------------------------------------
constexpr int64_t kMR8 = 4, kNR8 = 32;

__attribute__((target("avx512f,avx512vnni"))) void kernel_avx512_vnni(
    const uint8_t* a, const int8_t* b, int64_t groups, const int32_t* corr,
    TileOut<kMR8, kNR8>& out) {
  __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00;
  __m512i c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* bg = b + g * kNR8 * 4;
    const uint8_t* ag = a + g * kMR8 * 4;
    // b0: lanes j = 0..15 as b[j, 4g .. 4g+3]; b1: j = 16..31
    const __m512i b0 = _mm512_loadu_si512(bg);
    const __m512i b1 = _mm512_loadu_si512(bg + 64);
    // c[r, j] += Σ_e (a[r, 4g+e] + 128)·b[j, 4g+e]   (wrapping int32 adds)
    __m512i av = _mm512_set1_epi32(static_cast<int32_t>(load_word(ag)));
    c00 = _mm512_dpbusd_epi32(c00, av, b0);
    c01 = _mm512_dpbusd_epi32(c01, av, b1);
    av = _mm512_set1_epi32(static_cast<int32_t>(load_word(ag + 4)));
    c10 = _mm512_dpbusd_epi32(c10, av, b0);
    c11 = _mm512_dpbusd_epi32(c11, av, b1);
    av = _mm512_set1_epi32(static_cast<int32_t>(load_word(ag + 8)));
    c20 = _mm512_dpbusd_epi32(c20, av, b0);
    c21 = _mm512_dpbusd_epi32(c21, av, b1);
    av = _mm512_set1_epi32(static_cast<int32_t>(load_word(ag + 12)));
    c30 = _mm512_dpbusd_epi32(c30, av, b0);
    c31 = _mm512_dpbusd_epi32(c31, av, b1);
  }
  // c −= 128·Σ_k b[j, k]
  const __m512i k0 = _mm512_loadu_si512(corr), k1 = _mm512_loadu_si512(corr + 16);
  const __m512i rows[kMR8][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
  for (int64_t r = 0; r < kMR8; ++r) {
    int32_t* dst = out.row(r);
    _mm512_storeu_si512(dst, _mm512_sub_epi32(rows[r][0], k0));
    _mm512_storeu_si512(dst + 16, _mm512_sub_epi32(rows[r][1], k1));
  }
}
#endif  // NB_HAVE_X86_DISPATCH

}  // namespace

void gemm_s8s8_blocked(const int8_t* a, const int8_t* b, int64_t m, int64_t n, int64_t k,
                       int32_t* c) {
  gemm_blocked<int16_t, int16_t, kMR16, kNR16, 1, 0>(a, b, m, n, k, c, kernel_portable);
}

#ifdef NB_HAVE_X86_DISPATCH
void gemm_s8s8_blocked_avx2(const int8_t* a, const int8_t* b, int64_t m, int64_t n, int64_t k,
                            int32_t* c) {
  gemm_blocked<int16_t, int16_t, kMR16, kNR16, 2, 0>(a, b, m, n, k, c, kernel_avx2);
}

void gemm_s8s8_blocked_avx512_vnni(const int8_t* a, const int8_t* b, int64_t m, int64_t n,
                                   int64_t k, int32_t* c) {
  gemm_blocked<uint8_t, int8_t, kMR8, kNR8, 4, 128>(a, b, m, n, k, c, kernel_avx512_vnni);
}
#else
// Never called off x86 (cpu_has_* is false); they keep the link complete.
void gemm_s8s8_blocked_avx2(const int8_t* a, const int8_t* b, int64_t m, int64_t n, int64_t k,
                            int32_t* c) {
  gemm_s8s8_blocked(a, b, m, n, k, c);
}
void gemm_s8s8_blocked_avx512_vnni(const int8_t* a, const int8_t* b, int64_t m, int64_t n,
                                   int64_t k, int32_t* c) {
  gemm_s8s8_blocked(a, b, m, n, k, c);
}
#endif

}  // namespace nibble::ref::detail
