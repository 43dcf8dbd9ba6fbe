#pragma once
// The sm_90a INT8 GEMM with the HQ backward's dx epilogue fused in (EpiMaskHadamard,
// gemm_params.h): a CUTLASS epilogue-visitor node that dequantizes, applies the straight-through
// mask, adds the LSQ step-gradient terms g·δ̃ and runs the block Hadamard on the accumulators
// of each epilogue subtile while they are in registers, before the one store of dx. It replaces
// a [M, N] fp32 round trip through memory (the GEMM's store, the mask pass's load) and the
// mask pass itself. Device-only header (sm_90a translation units).
//
// Where the work happens (the collective epilogue's callbacks, sm90_epilogue_tma_warpspecialized):
//   visit()   g = float(acc)·s, element by element, fragment by fragment;
//   reduce()  with the whole subtile's g of this thread in hand: load the e/q nibbles, mask,
//             Σ g·δ̃, the butterfly (in-thread pairs in registers, cross-thread pairs by
//             shuffles), × norm — then CUTLASS converts, stages in shared memory and stores;
//   end()     the warp's fp64 sum goes to its own slot of `partials` (no atomics: the sum
//             order is fixed, so dsx is the same on every run).
//
// Which element of a thread's fragment holds which column is read off the epilogue's
// coordinate tensor at compile time (its layout is static): butterfly partners inside a
// thread are found from those coordinates, and a compile-time check confirms that the pairs
// across threads are exactly column bits 1 and 2, which the wgmma accumulator layout (PTX ISA,
// "wgmma .m64nNk32 register fragment": lane l holds columns 8i + 2(l mod 4) + {0, 1}) puts in
// lanes l ^ 1 and l ^ 2.
// The kernel header first: it brings CUTLASS's epilogue headers in the order they need.
#include "cuda/gemm/gemm_s8s8_sm90_kernel.cuh"

#include <array>
#include <cstdint>
#include <utility>

#include "cuda/gemm/gemm_params.h"
#include "cuda/gemm/gemm_sm90_host.h"

namespace nibble::cuda::sm90 {

namespace mask_detail {

// Row (mode 0) and column (mode 1) of fragment element k, for a static coordinate layout L.
template <class L, int... K>
constexpr std::array<int, sizeof...(K)> coords_of(std::integer_sequence<int, K...>, int mode) {
  return {(mode == 0 ? static_cast<int>(cute::get<0>(L{}(cute::Int<K>{})))
                     : static_cast<int>(cute::get<1>(L{}(cute::Int<K>{}))))...};
}

// The fragment's static geometry: per element its (row, col) relative to the thread's first
// element, and for each butterfly stage h = 2^b (b < 5) the in-thread partner (−1: none).
template <class L>
struct Fragment {
  static constexpr int kSize = decltype(cute::size(L{}))::value;
  static constexpr auto kRows = coords_of<L>(std::make_integer_sequence<int, kSize>{}, 0);
  static constexpr auto kCols = coords_of<L>(std::make_integer_sequence<int, kSize>{}, 1);

  static constexpr int partner(int k, int h) {
    for (int j = 0; j < kSize; ++j)
      if (kRows[j] == kRows[k] && kCols[j] == (kCols[k] ^ h)) return j;
    return -1;
  }
  // Stage h pairs inside the thread for every element, or for none.
  static constexpr bool in_thread(int h) {
    for (int k = 0; k < kSize; ++k)
      if (partner(k, h) < 0) return false;
    return true;
  }
  static constexpr bool across_threads(int h) {
    for (int k = 0; k < kSize; ++k)
      if (partner(k, h) >= 0 || (kCols[k] & h) != 0) return false;
    return true;
  }
  // rows {0, 8} and columns 8i + b (i < 4, b < 2) relative to the thread's first element
  static constexpr bool rows_cols_ok() {
    for (int k = 0; k < kSize; ++k)
      if ((kRows[k] != 0 && kRows[k] != 8) || kCols[k] < 0 || kCols[k] >= 32) return false;
    return true;
  }
  static constexpr bool layout_ok() {
    return in_thread(1) && across_threads(2) && across_threads(4) && in_thread(8) &&
           in_thread(16) && rows_cols_ok();
  }
};

}  // namespace mask_detail

// The node: nullary over its child (the accumulator fetch), so Sm90EVT<Node, Sm90AccFetch>.
struct Sm90MaskHadamardNode {
  struct SharedStorage {};
  struct Arguments {
    EpiMaskHadamard epi;
    int n = 0;          // N (columns of the output)
    int half_cols = 0;  // N / 2: bytes per packed row
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args,
                                                  void*) {
    return args;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const&) {
    return true;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*,
                                              cudaStream_t, cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_HOST_DEVICE Sm90MaskHadamardNode() {}
  CUTLASS_HOST_DEVICE Sm90MaskHadamardNode(Params const& params, SharedStorage const&)
      : params(params) {}

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(
      cutlass::epilogue::fusion::detail::ProducerLoadArgs<Args...> const&) {
    return cutlass::epilogue::fusion::EmptyProducerLoadCallbacks{};
  }

  Params params;

  template <class CTensor, class ThrResidue, int kWarps, int kTileN>
  struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::EmptyConsumerStoreCallbacks {
    // (R2S, R2S_M, R2S_N): one subtile's fragment of this thread
    using SubLayout = decltype(cute::take<0, 3>(std::declval<CTensor>().layout()));
    static_assert(cute::is_static<SubLayout>::value, "the subtile fragment layout must be static");
    using Frag = mask_detail::Fragment<SubLayout>;
    static_assert(Frag::layout_ok(),
                  "EpiMaskHadamard assumes the wgmma accumulator layout: columns 8i + 2t + b "
                  "with b and i in the thread, t across lanes");

    // The state kept across the tile is small on purpose: next to 128 int32 accumulators
    // a first version with 64-bit pointers and sizes in registers spilled ~120 bytes per
    // thread, and each spill reload went to L2 (shared memory leaves little L1) on the
    // epilogue's critical path: 2x the GEMM's time. Sizes and pointers are read from the
    // kernel parameters (params is a reference into them) where they are used.
    CUTLASS_DEVICE ConsumerStoreCallbacks(CTensor tCcD, ThrResidue residue, int row_off,
                                          int base_n, float s, int slot, Params const& params)
        : tCcD(tCcD), residue(residue), row_off(row_off), base_n(base_n), s(s), slot(slot),
          params(params) {}

    CTensor tCcD;  // (R2S, R2S_M, R2S_N, EPI_M, EPI_N) coordinates relative to element 0
    ThrResidue residue;
    int row_off;           // element 0's row · N/2: its packed row's byte offset
    int base_n;            // element 0's column
    float s;               // scale_a · scale_b
    int slot;              // this warp's slot in partials, −1 for a tile outside the output
    Params const& params;
    int64_t lsq = 0;       // Σ acc·w of this thread (exact)
    uint32_t words[2][2];  // the subtile's packed nibbles [e, q][row 0, 8] (begin_loop)
    uint32_t ahead[2][2];  // the next subtile's, as loaded (load_words)
    int ahead_m = -1, ahead_n = -1;  // which subtile `ahead` holds

    // Before the subtile loop: pull the tile's packed rows into L2, one prefetch per 32-byte
    // sector, spread over the quad that shares the rows (a tile row of codes is kTileN / 2
    // bytes), and load the first subtile's words. Without the prefetch every subtile waited
    // for DRAM at its first load, on the critical path of the epilogue.
    CUTLASS_DEVICE void begin() {
      const int lane_t = static_cast<int>(threadIdx.x & 3);
      if (32 * lane_t < kTileN / 2) prefetch_tile(lane_t);
      load_words(0, 0, ahead);
      ahead_m = 0;
      ahead_n = 0;
    }
    CUTLASS_DEVICE void prefetch_tile(int lane_t) const {
      constexpr int kEpiM = decltype(cute::size<3>(std::declval<CTensor>()))::value;
      CUTLASS_PRAGMA_UNROLL
      for (int em = 0; em < kEpiM; ++em) {
        const auto c = tCcD(0, 0, 0, em, 0);
        const int seg_col = (base_n + cute::get<1>(c)) & ~31;
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
          const int row = cute::get<0>(c) + 8 * h;
          if (row >= cute::get<0>(residue)) continue;
          const int off = row_off + row * params.half_cols + seg_col / 2 + 32 * lane_t;
          asm volatile("prefetch.global.L2 [%0];" ::"l"(params.epi.e_packed + off));
          asm volatile("prefetch.global.L2 [%0];" ::"l"(params.epi.q_packed + off));
        }
      }
    }

    // g = float(acc) · s (the dequant epilogue's fma(float(acc), sa·sb, 0), the same rounding)
    template <typename ElementAccumulator, typename ElementInput, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<float, FragmentSize> visit(
        cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m, int epi_n,
        cutlass::Array<ElementInput, FragmentSize> const& frg_acc) {
      auto tC = tCcD(cute::_, cute::_, cute::_, epi_m, epi_n);
      const auto c0 = tC(0);
      cutlass::Array<float, FragmentSize> v;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        // g = float(acc) · s (the dequant epilogue's fma(float(acc), sa·sb, 0): the same value)
        const float g = __fmul_rn(__int2float_rn(static_cast<int32_t>(frg_acc[i])), s);
        // column 8j + 2t + b of row 8h (relative): nibble b of byte j of words[·][h]
        const auto c = tC(epi_v * FragmentSize + i);
        const int dr = cute::get<0>(c) - cute::get<0>(c0);
        const int dc = cute::get<1>(c) - cute::get<1>(c0);
        const int shift = 8 * (dc >> 3) + 4 * (dc & 1);
        const uint32_t we = dr >= 8 ? words[0][1] : words[0][0];
        const uint32_t wq = dr >= 8 ? words[1][1] : words[1][0];
        const int e = static_cast<int>(static_cast<int32_t>(we << (28 - shift)) >> 28);
        const int q = static_cast<int>(static_cast<int32_t>(wq << (28 - shift)) >> 28);
        const bool clipped = e == kEpiClippedNibble;
        // Σ acc·w, w = 14·δ̃ (e in range, q clipped: an integer), exact in int64 and so the
        // same in any order (docs/formats.md, "LSQ step sums"); elements outside the output
        // have acc = 0 and codes 0
        const int w = clipped ? kEpiResidualSteps * q : e;
        // (one IMAD.WIDE: written as C++, ptxas kept extra 64-bit temporaries and spilled
        // 44 bytes next to the 128 accumulators)
        asm("mad.wide.s32 %0, %1, %2, %0;" : "+l"(lsq) : "r"(static_cast<int32_t>(frg_acc[i])), "r"(w));
        v[i] = clipped ? 0.0f : g;  // STE: ∂v̂/∂v = 1[e ≠ −8]
      }
      return v;
    }

    // The packed nibbles of subtile (epi_m, epi_n) for this thread's 2 rows × 4 column pairs,
    // 4 per subtile per array, as loaded (raw; transpose_words puts them in visit()'s order).
    // The four lanes of a quad share the rows (wgmma layout) and together need the row's 16
    // packed bytes of the subtile, bytes 4i + t for lane t: each lane loads word t (one
    // coalesced 16-byte access per quad and row). Loading them as bytes measured 3× slower:
    // the compiler, short of registers next to 128 accumulators, reused one destination
    // register and serialized the loads.
    CUTLASS_DEVICE void load_words(int epi_m, int epi_n, uint32_t (&w)[2][2]) const {
      const int lane_t = static_cast<int>(threadIdx.x & 3);
      auto tC = tCcD(cute::_, cute::_, cute::_, epi_m, epi_n);
      const auto c0 = tC(0);  // the thread's element with relative (row, col) = (0, 0)
      static_assert(Frag::kRows[0] == 0 && Frag::kCols[0] == 0);
      const int row0 = cute::get<0>(c0);  // relative to element 0's row (epi_m's offset)
      const int seg_col = (base_n + cute::get<1>(c0)) & ~31;  // the subtile's first column
      const bool word_in = seg_col + 8 * lane_t < params.n;
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        const bool in = word_in && row0 + 8 * h < cute::get<0>(residue);
        const int off = row_off + (row0 + 8 * h) * params.half_cols + seg_col / 2 + 4 * lane_t;
        w[0][h] = in ? __ldg(reinterpret_cast<const uint32_t*>(params.epi.e_packed + off)) : 0u;
        w[1][h] = in ? __ldg(reinterpret_cast<const uint32_t*>(params.epi.q_packed + off)) : 0u;
      }
    }

    // A 4 × 4 byte transpose over the quad (two shuffles): byte i of word[a][h] becomes column
    // pair i of this lane.
    CUTLASS_DEVICE static void transpose_words(uint32_t (&w)[2][2]) {
      const int lane_t = static_cast<int>(threadIdx.x & 3);
      CUTLASS_PRAGMA_UNROLL
      for (int a = 0; a < 2; ++a) {
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
          // stage 1 (lanes t, t ^ 1): even t keeps bytes 0, 2 of both words, odd t bytes 1, 3
          const uint32_t x = w[a][h];
          const uint32_t y = __shfl_xor_sync(0xffffffffu, x, 1);
          const uint32_t u = (lane_t & 1) ? __byte_perm(x, y, 0x3715) : __byte_perm(x, y, 0x6240);
          // stage 2 (lanes t, t ^ 2): byte i of the result is byte t of lane i's word
          const uint32_t v = __shfl_xor_sync(0xffffffffu, u, 2);
          w[a][h] = (lane_t & 2) ? __byte_perm(u, v, 0x3276) : __byte_perm(u, v, 0x5410);
        }
      }
    }

    // Start of a subtile: its nibbles (loaded one subtile ahead, so that the load's latency
    // hides under the previous subtile's work: the dx GEMM at 16384×4096² went 527 → 484 µs;
    // loading 2, 3 or 4 subtiles ahead measured the same as 1, bench/README.md run S11), and
    // the next subtile's loads. The collective visits epi_m fastest, then epi_n
    // (sm90_epilogue_tma_warpspecialized); another order would only cost the prefetch.
    CUTLASS_DEVICE void begin_loop(int epi_m, int epi_n) {
      constexpr int kEpiM = decltype(cute::size<3>(std::declval<CTensor>()))::value;
      constexpr int kEpiN = decltype(cute::size<4>(std::declval<CTensor>()))::value;
      if (epi_m != ahead_m || epi_n != ahead_n) load_words(epi_m, epi_n, ahead);
      CUTLASS_PRAGMA_UNROLL
      for (int a = 0; a < 2; ++a) {
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) words[a][h] = ahead[a][h];
      }
      transpose_words(words);
      ahead_m = epi_m + 1 < kEpiM ? epi_m + 1 : 0;
      ahead_n = epi_m + 1 < kEpiM ? epi_n : epi_n + 1;
      if (ahead_n < kEpiN) load_words(ahead_m, ahead_n, ahead);
    }

    template <class STensor, class SyncFn, class VTensor>
    CUTLASS_DEVICE void reduce(STensor&&, SyncFn const&, int epi_m, int epi_n, bool,
                               VTensor visit_results) {
      constexpr int V = Frag::kSize;
      using FragArray = typename cute::remove_cvref_t<VTensor>::value_type;
      constexpr int F = FragArray::kElements;
      static_assert(V % F == 0);
      float v[V];
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < V; ++k) v[k] = visit_results(k / F)[k % F];

      // block Hadamard, stages h = 1, 2, ..., B/2 (the reference's order and operations)
      cute::for_each(cute::make_int_sequence<5>{}, [&](auto bc) {
        constexpr int h = 1 << decltype(bc)::value;
        static_assert(h < kEpiMaskMaxBlock);
        if (h >= params.epi.block) return;
        if constexpr (Frag::in_thread(h)) {
          cute::for_each(cute::make_int_sequence<V>{}, [&](auto kc) {
            constexpr int k = decltype(kc)::value;
            if constexpr ((Frag::kCols[k] & h) == 0) {
              constexpr int j = Frag::partner(k, h);
              const float a = v[k], b = v[j];
              v[k] = __fadd_rn(a, b);
              v[j] = __fsub_rn(a, b);
            }
          });
        } else {
          // columns c and c ^ h sit in lanes l and l ^ (h/2); the lower column holds a
          const bool upper = (base_n & h) != 0;
          CUTLASS_PRAGMA_UNROLL
          for (int k = 0; k < V; ++k) {
            const float o = __shfl_xor_sync(0xffffffffu, v[k], h >> 1);
            v[k] = upper ? __fsub_rn(o, v[k]) : __fadd_rn(v[k], o);
          }
        }
      });
      // × 2^(−k/2): ref::hadamard_norm's fp64 expression rounded once to fp32
      const float norm = __double2float_rn(__drcp_rn(__dsqrt_rn(static_cast<double>(params.epi.block))));
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < V; ++k) visit_results(k / F)[k % F] = __fmul_rn(v[k], norm);
    }

    CUTLASS_DEVICE void end() {
      // the warp's sum (integer: any order gives the same), then lane 0 writes the warp's slot
      int64_t t = lsq;
      CUTLASS_PRAGMA_UNROLL
      for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
      if (slot >= 0 && (threadIdx.x & 31) == 0) params.epi.partials[slot] = t;
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(
      cutlass::epilogue::fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    auto [M, N, K, L] = args.problem_shape_mnkl;
    auto [m_coord, n_coord, k_coord, l_coord] = args.tile_coord_mnkl;
    constexpr int kTileM = decltype(cute::size<0>(args.tile_shape_mnk))::value;
    constexpr int kTileN = decltype(cute::size<1>(args.tile_shape_mnk))::value;
    constexpr int kWarps = decltype(cute::size(args.tiled_mma))::value / 32;
    const int64_t tiles_n = (static_cast<int64_t>(N) + kTileN - 1) / kTileN;
    // A cluster may hold a CTA whose tile lies wholly outside the output: it writes no slot.
    const bool inside = static_cast<int64_t>(m_coord) * kTileM < M &&
                        static_cast<int64_t>(n_coord) * kTileN < N;
    const int slot = inside ? static_cast<int>((static_cast<int64_t>(m_coord) * tiles_n + n_coord) *
                                                   kWarps + args.thread_idx / 32)
                            : -1;
    const int base_m = static_cast<int>(M) - static_cast<int>(cute::get<0>(args.residue_tCcD));
    const int base_n = static_cast<int>(N) - static_cast<int>(cute::get<1>(args.residue_tCcD));
    const float s = __fmul_rn(params.epi.scale_a[0], params.epi.scale_b[0]);
    return ConsumerStoreCallbacks<decltype(args.tCcD), decltype(args.residue_tCcD), kWarps,
                                  kTileN>(args.tCcD, args.residue_tCcD, base_m * params.half_cols,
                                          base_n, s, slot, params);
  }
};

using MaskHadamardTree =
    cutlass::epilogue::fusion::Sm90EVT<Sm90MaskHadamardNode, cutlass::epilogue::fusion::Sm90AccFetch>;

}  // namespace nibble::cuda::sm90

// The collective epilogue keeps visit() results in registers of the callbacks' ElementCompute,
// which a bare visitor tree leaves void (= the int32 accumulator type): the butterfly needs
// fp32 between visit() and the store, so the tree declares it.
template <>
struct cutlass::epilogue::fusion::FusionCallbacksTraits<nibble::cuda::sm90::MaskHadamardTree> {
  using DispatchPolicy = void;
  using Callbacks = nibble::cuda::sm90::MaskHadamardTree;
  using Operation = FusionOperation;
  using CtaTile_MNK = void;
  using EpilogueTile_MN = void;
  using ElementCompute = float;
};

namespace nibble::cuda::sm90 {

// The epilogue description GemmS8S8Sm90 takes (as EpiDequantBiasTo in the kernel header).
template <class OutT>
struct EpiMaskHadamardTo {
  using ElementD = OutT;
  using ElementCompute = float;
  template <class TileShape>
  using Fusion = MaskHadamardTree;

  template <class FusionArguments>
  static void fill(FusionArguments& args, const EpiMaskHadamard& epi, int64_t n) {
    auto& [acc_args, node_args] = args;
    (void)acc_args;
    node_args.epi = epi;
    node_args.n = static_cast<int>(n);
    node_args.half_cols = static_cast<int>(n / 2);
  }
};

// Slots of `partials` one call writes: kWarps per CTA tile (gemm_s8s8_mask_hadamard_partials).
template <class Config>
int64_t mask_hadamard_slots(int64_t m, int64_t n) {
  using Gemm = GemmS8S8Sm90<Config, EpiMaskHadamardTo<float>>;
  constexpr int kTileM = decltype(cute::size<0>(typename Config::TileShape{}))::value;
  constexpr int kTileN = decltype(cute::size<1>(typename Config::TileShape{}))::value;
  constexpr int kWarps = decltype(cute::size(typename Gemm::Kernel::TiledMma{}))::value / 32;
  return ((m + kTileM - 1) / kTileM) * ((n + kTileN - 1) / kTileN) * kWarps;
}

void check_mask_hadamard(const char* fn, const GemmS8S8Params& p, const EpiMaskHadamard& epi);

// Checks, then runs the 128×128 ping-pong tile with the cluster choose_tile picks for the plain
// GEMM (2×1, or 1×2 where A multicast along N measured faster); both have the same tiles, so
// mask_hadamard_slots is the same for either.
template <class OutT>
void run_mask_hadamard(const char* fn, const GemmS8S8Params& p, const EpiMaskHadamard& epi,
                       OutT* y, cudaStream_t stream) {
  check_gemm_params(fn, p, y, static_cast<int>(sizeof(OutT)));
  check_mask_hadamard(fn, p, epi);
  const auto run = [&]<class Config>() {
    using Epi = EpiMaskHadamardTo<OutT>;
    using Gemm = GemmS8S8Sm90<Config, Epi>;
    auto args = Gemm::make_arguments(p, y, SchedulerKnobs{});
    Epi::fill(args.epilogue.thread, epi, p.n);
    Gemm::run(args, stream);
  };
  if (choose_tile(p) == GemmTile::pingpong_128x128_c1x2)
    run.template operator()<PingpongConfig<128, 128, 1, 2>>();
  else
    run.template operator()<PingpongConfig<128, 128, 2, 1>>();
}

}  // namespace nibble::cuda::sm90
