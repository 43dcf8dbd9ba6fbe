#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <set>
#include <vector>

#include "nibble/dtype.h"
#include "nibble/error.h"
#include "nibble/rng.h"
#include "nibble/tensor.h"

using namespace nibble;

TEST(Philox, MatchesPublishedKnownAnswer) {
  // Known-answer vector from the Random123 distribution (kat_vectors, philox4x32_10,
  // counter = key = 0): 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
  Philox4 out = philox4x32_10(Philox4{{0, 0, 0, 0}}, 0, 0);
  EXPECT_EQ(out.v[0], 0x6627e8d5u);
  EXPECT_EQ(out.v[1], 0xe169c58du);
  EXPECT_EQ(out.v[2], 0xbc57ac4cu);
  EXPECT_EQ(out.v[3], 0x9b00dbd8u);
}

TEST(Philox, StreamIsAPureFunctionOfItsKey) {
  PhiloxKey a{42, 3, 7, RngRole::rounding};
  PhiloxKey b = a;
  b.step = 4;
  PhiloxKey c = a;
  c.role = RngRole::sample_dw;
  EXPECT_EQ(philox_u32(a, 12345), philox_u32(a, 12345));
  EXPECT_NE(philox_u32(a, 12345), philox_u32(b, 12345));
  EXPECT_NE(philox_u32(a, 12345), philox_u32(c, 12345));
  std::set<uint32_t> seen;
  for (uint64_t i = 0; i < 1000; ++i) seen.insert(philox_u32(a, i));
  EXPECT_GT(seen.size(), 995u);
}

namespace {
// Philox-4x32-10 as Salmon et al. write it (64-bit products, the keys bumped per round): the
// oracle of the scheduled form, which rng.h uses for every draw.
Philox4 textbook_philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t{0xD2511F53u} * ctr.v[0];
    const uint64_t p1 = uint64_t{0xCD9E8D57u} * ctr.v[2];
    ctr = Philox4{{static_cast<uint32_t>(p1 >> 32) ^ ctr.v[1] ^ k0, static_cast<uint32_t>(p1),
                   static_cast<uint32_t>(p0 >> 32) ^ ctr.v[3] ^ k1, static_cast<uint32_t>(p0)}};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return ctr;
}
}  // namespace

TEST(Philox, ScheduledBlocksEqualTheRounds) {
  // The kernels' form (round keys and round 0's constant terms precomputed per stream) against
  // philox4x32_10 and the textbook rounds on fresh random keys, counters with both halves of
  // the block index set, and the extremes of every key field.
  const Philox4 kat = textbook_philox4x32_10(Philox4{{0, 0, 0, 0}}, 0, 0);
  ASSERT_EQ(kat.v[0], 0x6627e8d5u);  // the Random123 vector of MatchesPublishedKnownAnswer
  ASSERT_EQ(kat.v[3], 0x9b00dbd8u);
  Philox4 gen = philox4x32_10(Philox4{{11, 22, 33, 44}}, 55, 66);
  const auto next = [&] {
    gen = philox4x32_10(gen, 0x9e3779b9u, 0x7f4a7c15u);
    return (static_cast<uint64_t>(gen.v[0]) << 32) | gen.v[1];
  };
  std::vector<PhiloxKey> keys = {
      PhiloxKey{0, 0, 0, RngRole::rounding},
      PhiloxKey{~uint64_t{0}, ~0u, (1u << 24) - 1, RngRole::sample_dw_rounding}};
  for (int i = 0; i < 30; ++i) {
    keys.push_back(PhiloxKey{next(), static_cast<uint32_t>(next()),
                             static_cast<uint32_t>(next() & 0xffffffu),
                             static_cast<RngRole>(1 + next() % 8)});
  }
  for (const PhiloxKey& k : keys) {
    const PhiloxSchedule s = philox_schedule(k);
    for (int j = 0; j < 64; ++j) {
      // 0, all ones, 2^33, 2^34 (high word set), then random
      const uint64_t block =
          j == 0 ? 0 : (j == 1 ? ~uint64_t{0} : (j < 4 ? uint64_t{1} << (31 + j) : next()));
      const Philox4 want = philox4x32_10(
          Philox4{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), k.step,
                   (k.layer << 8) | static_cast<uint32_t>(k.role)}},
          static_cast<uint32_t>(k.seed), static_cast<uint32_t>(k.seed >> 32));
      const Philox4 got = philox4x32_10_scheduled(s, block);
      const Philox4 oracle = textbook_philox4x32_10(
          Philox4{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), k.step,
                   (k.layer << 8) | static_cast<uint32_t>(k.role)}},
          static_cast<uint32_t>(k.seed), static_cast<uint32_t>(k.seed >> 32));
      for (int w = 0; w < 4; ++w) {
        ASSERT_EQ(got.v[w], want.v[w]) << "seed " << k.seed << " block " << block << " word " << w;
        ASSERT_EQ(got.v[w], oracle.v[w]) << "seed " << k.seed << " block " << block << " word " << w;
      }
    }
  }
}

TEST(Philox, UniformMeanAndRange) {
  PhiloxKey k{7, 0, 0, RngRole::data};
  double sum = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    float u = philox_uniform(k, static_cast<uint64_t>(i));
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    sum += u;
  }
  // Var(U) = 1/12: the mean's standard error is sqrt(1/12/n) ~ 6.5e-4; allow 5 sigma.
  EXPECT_NEAR(sum / n, 0.5, 5 * std::sqrt(1.0 / 12 / n));
}

TEST(Philox, Uniform16KnownAnswerAndLayout) {
  // Expected words from an independent Python Philox-4x32-10 (checked against the Random123
  // vector above): element i reads block i/8, word (i%8)/2, low half for even i, high for odd.
  const PhiloxKey k{0x0123456789abcdefull, 7, 3, RngRole::rounding};
  const uint64_t index[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15, (uint64_t{1} << 35) + 13};
  const uint32_t want[] = {0x03c8, 0xc824, 0x4af6, 0xb69d, 0xfd1a, 0x5f97,
                           0xaa21, 0xb778, 0x211d, 0xe225, 0x8409, 0xb1b7};
  for (size_t j = 0; j < std::size(index); ++j) {
    EXPECT_EQ(philox_bits16(k, index[j]), want[j]) << "index " << index[j];
    EXPECT_EQ(philox_uniform16(k, index[j]), float(want[j]) / 65536.0f) << "index " << index[j];
  }
  // The same key layout as philox_u32: block b of the 16-bit stream is the block of the 32-bit
  // stream's indices 4b .. 4b + 3, so its halves are those words split in two.
  for (uint64_t i = 0; i < 4096; i += 7) {
    const uint32_t word = philox_u32(k, 4 * (i / 8) + (i % 8) / 2);
    ASSERT_EQ(philox_bits16(k, i), (word >> (16 * (i % 2))) & 0xffffu) << i;
  }
  // u on the 2^-16 grid in [0, 1) with mean 1/2 − 2^-17 (bits·2^-16, bits uniform).
  double sum = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const float u = philox_uniform16(k, static_cast<uint64_t>(i));
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    ASSERT_EQ(u * 65536.0f, std::floor(u * 65536.0f));
    sum += u;
  }
  EXPECT_NEAR(sum / n, 0.5 - 0.5 / 65536.0, 5 * std::sqrt(1.0 / 12 / n));
}

TEST(HalfFloat, RoundTripsAndRoundsToNearestEven) {
  for (float f : {0.0f, 1.0f, -2.5f, 65504.0f, 6.1035156e-05f, 5.9604645e-08f}) {
    EXPECT_EQ(f16_to_f32(f32_to_f16(f)), f) << f;
  }
  // 1 + 2^-11 is exactly half way between two f16 values: ties go to even (1.0).
  EXPECT_EQ(f16_to_f32(f32_to_f16(1.0f + 0.00048828125f)), 1.0f);
  EXPECT_EQ(f16_to_f32(f32_to_f16(1.0f + 3 * 0.00048828125f)), 1.0f + 4 * 0.00048828125f);
  EXPECT_TRUE(std::isinf(f16_to_f32(f32_to_f16(70000.0f))));
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(NAN))));
  // bf16: 1 + 2^-8 is half way between 1 and 1 + 2^-7: ties to even.
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 0.00390625f)), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(-3.0f)), -3.0f);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}

TEST(Tensor, ShapesAndChecks) {
  Tensor t = Tensor::zeros({3, 5}, DType::f32);
  EXPECT_EQ(t.numel(), 15);
  EXPECT_EQ(t.size(-1), 5);
  // Packed s4 rows pack on their own: 3 rows of ceil(5/2) = 3 bytes.
  EXPECT_EQ(Tensor::empty({3, 5}, DType::s4).nbytes(), 9u);
  EXPECT_EQ(Tensor::empty({4, 6}, DType::s4).nbytes(), 12u);
  EXPECT_THROW(check_shape(t, {5, 3}, "x"), Error);
  EXPECT_THROW(t.reshape({4, 4}), Error);
  t.data<float>()[7] = NAN;
  try {
    check_finite(t, "x");
    FAIL() << "NaN not caught";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("NaN at flat index 7"), std::string::npos) << e.what();
  }
}

TEST(DType, Names) {
  EXPECT_EQ(dtype_from_name("BF16"), DType::bf16);
  EXPECT_EQ(dtype_from_name("f32"), DType::f32);
  EXPECT_THROW(dtype_from_name("F8_E4M3"), Error);
}
