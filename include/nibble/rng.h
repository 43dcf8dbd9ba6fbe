#pragma once
// Counter-based Philox-4x32-10 (Salmon et al., SC'11). Every random number nibble draws
// is a pure function of (seed, step, layer, role, element index), so the CPU reference
// and the CUDA kernels produce the same stream and any element can be drawn alone.
//
//   key     = {seed & 0xffffffff, seed >> 32}
//   counter = {index / 4 (low 32 bits), index / 4 (high 32 bits), step, layer << 8 | role}
//   value   = word (index % 4) of Philox(counter, key)
//
// Every function here is NB_HOST_DEVICE: the CUDA backend includes this header as is.
#include <cstdint>

#if defined(__CUDACC__)
#define NB_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NB_HOST_DEVICE inline
#endif

namespace nibble {

// Which tensor a random stream belongs to; part of the counter, so the streams of
// different tensors in one layer never overlap.
enum class RngRole : uint32_t {
  grad_output_rounding = 1,  // stochastic rounding of the low half of a bit-split dy
  sample_dw = 2,             // Bernoulli row sampling for dw = dyᵀ·x
  sample_dx = 3,             // Bernoulli row sampling for dx = dy·w
  rounding = 4,              // generic stochastic rounding (int8 backward, tests)
  dropout = 5,
  data = 6,
  init = 7,
  sample_dw_rounding = 8,    // stochastic re-quantization of the 1/p-weighted dw rows (sampled LSS)
};

struct PhiloxKey {
  uint64_t seed = 0;
  uint32_t step = 0;
  uint32_t layer = 0;  // < 2^24
  RngRole role = RngRole::rounding;
};

struct Philox4 { uint32_t v[4]; };

NB_HOST_DEVICE uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  // PTX mul.wide.u32: one IMAD.WIDE.U32 for both halves. (The 64-bit C++ product costs an
  // extra add per product in SASS, and __umulhi plus a 32-bit multiply is split into
  // IMAD.HI and IMAD by ptxas when registers are tight; sm_90a, nvcc 13.)
  uint64_t p;
  asm("mul.wide.u32 %0, %1, %2;" : "=l"(p) : "r"(a), "r"(b));
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Philox-4x32-10 of one stream with everything that depends only on the key precomputed:
// the ten round keys, and round 0's terms of the counter's constant words 2 and 3 (step, and
// layer << 8 | role). A kernel takes it as a by-value argument, so the round keys are
// constant-bank operands of the XORs instead of two adds per round and Philox block, and
// round 0 has one product instead of two (about 20 fewer instructions per block in the
// quantizers and the bit split; bench/README.md, "run S10"). These are the one definition of
// the rounds: philox4x32_10 below schedules its own key and counter words and runs them
// (tests/unit/test_core.cpp: the Random123 known answer, and Philox.ScheduledBlocksEqualTheRounds
// against a textbook ten-round loop on random keys and counters).
struct PhiloxSchedule {
  uint32_t k0[10];   // round r's key words: seed words + r·(Weyl constants), mod 2^32
  uint32_t k1[10];
  uint32_t r0_x0;    // round 0, output word 0 without the counter's word 1: hi(M1·step) ^ k0[0]
  uint32_t r0_x1;    // round 0, output word 1: lo(M1·step)
  uint32_t r0_x2;    // round 0, output word 2 without hi(M0·counter word 0):
                     //   (layer << 8 | role) ^ k1[0]
};

// The schedule of key words (k0, k1) and counter words 2, 3 (c2, c3).
NB_HOST_DEVICE PhiloxSchedule philox_schedule(uint32_t k0, uint32_t k1, uint32_t c2, uint32_t c3) {
  constexpr uint32_t kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  PhiloxSchedule s{};
  for (int r = 0; r < 10; ++r) {
    s.k0[r] = k0;
    s.k1[r] = k1;
    k0 += kW0;
    k1 += kW1;
  }
  uint32_t hi1;
  s.r0_x1 = philox_mulhilo(kM1, c2, &hi1);
  s.r0_x0 = hi1 ^ s.k0[0];
  s.r0_x2 = c3 ^ s.k1[0];
  return s;
}

// The schedule of a nibble stream: key = the seed's words; counter words 2, 3 = step and
// layer << 8 | role.
NB_HOST_DEVICE PhiloxSchedule philox_schedule(const PhiloxKey& key) {
  return philox_schedule(static_cast<uint32_t>(key.seed), static_cast<uint32_t>(key.seed >> 32),
                         key.step, (key.layer << 8) | static_cast<uint32_t>(key.role));
}

// Block `block` (the counter's words 0 and 1) of the stream whose schedule is s: the rounds of
// philox4x32_10 with round 0's constant terms and the round keys read from s.
NB_HOST_DEVICE Philox4 philox4x32_10_scheduled(const PhiloxSchedule& s, uint64_t block) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  uint32_t hi0;
  const uint32_t lo0 = philox_mulhilo(kM0, static_cast<uint32_t>(block), &hi0);
  Philox4 ctr{{s.r0_x0 ^ static_cast<uint32_t>(block >> 32), s.r0_x1, hi0 ^ s.r0_x2, lo0}};
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 1; r < 10; ++r) {
    uint32_t h0, h1;
    const uint32_t l0 = philox_mulhilo(kM0, ctr.v[0], &h0);
    const uint32_t l1 = philox_mulhilo(kM1, ctr.v[2], &h1);
    ctr = Philox4{{h1 ^ ctr.v[1] ^ s.k0[r], l1, h0 ^ ctr.v[3] ^ s.k1[r], l0}};
  }
  return ctr;
}

// Ten rounds of Philox-4x32 with the published multipliers and Weyl constants on counter ctr
// and key (k0, k1): the scheduled rounds above, which are the one definition of the rounds.
NB_HOST_DEVICE Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  return philox4x32_10_scheduled(philox_schedule(k0, k1, ctr.v[2], ctr.v[3]),
                                 ctr.v[0] | (static_cast<uint64_t>(ctr.v[1]) << 32));
}

// The 32-bit random word for element `index` of the stream named by `key`.
NB_HOST_DEVICE uint32_t philox_u32(const PhiloxKey& key, uint64_t index) {
  const Philox4 out = philox4x32_10_scheduled(philox_schedule(key), index >> 2);
  return out.v[index & 3];
}

// Uniform in [0, 1) on a 2^-24 grid: exactly representable in fp32, so CPU and GPU agree.
NB_HOST_DEVICE float philox_uniform(const PhiloxKey& key, uint64_t index) {
  return static_cast<float>(philox_u32(key, index) >> 8) * (1.0f / 16777216.0f);
}

// 16-bit uniforms, one Philox block per 8 consecutive indices (the LSQ side channel and the
// bit split's low-half rounding: docs/formats.md "Random streams"). Same key layout as
// philox_u32, but element `index` reads
//   counter = {index / 8 (low 32 bits), index / 8 (high 32 bits), step, layer << 8 | role}
//   bits    = word (index % 8) / 2 of Philox(counter, key), its low 16 bits for even index and
//             its high 16 bits for odd index
// so elements 8b .. 8b + 7 share block b. A role uses either this form or philox_u32, never
// both (block b of one form is not block b of the other's indices).
NB_HOST_DEVICE uint32_t philox_bits16(const PhiloxKey& key, uint64_t index) {
  const Philox4 out = philox4x32_10_scheduled(philox_schedule(key), index >> 3);
  return (out.v[(index >> 1) & 3] >> (16 * (index & 1))) & 0xffffu;
}

// u = bits·2^-16: uniform in [0, 1) on a 2^-16 grid, exact in fp32. For any real t,
// E_u[floor(t + u)] = floor(2^16·t)·2^-16 (Hermite's identity), i.e. t − 2^-16 < E ≤ t.
NB_HOST_DEVICE float philox_uniform16(const PhiloxKey& key, uint64_t index) {
  return static_cast<float>(philox_bits16(key, index)) * (1.0f / 65536.0f);
}

// Standard normal by Box-Muller on two uniforms of the stream (elements 2i, 2i+1).
// Used for initialisation and test data, never where CPU/GPU bit-equality matters.
float philox_normal(const PhiloxKey& key, uint64_t index);

}  // namespace nibble
