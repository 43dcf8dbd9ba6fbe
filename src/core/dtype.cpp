#include "nibble/dtype.h"

#include <cmath>
#include <cstring>

#include "nibble/error.h"

namespace nibble {

int dtype_bits(DType dt) {
  switch (dt) {
    case DType::f64: return 64;
    case DType::f32: return 32;
    case DType::f16: return 16;
    case DType::bf16: return 16;
    case DType::s32: return 32;
    case DType::s8: return 8;
    case DType::s4: return 4;
  }
  NB_FAIL("unknown dtype " << static_cast<int>(dt));
}

size_t storage_bytes(DType dt, int64_t n) {
  NB_CHECK(n >= 0, "negative element count " << n);
  return static_cast<size_t>((n * dtype_bits(dt) + 7) / 8);
}

const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::f64: return "f64";
    case DType::f32: return "f32";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
    case DType::s32: return "s32";
    case DType::s8: return "s8";
    case DType::s4: return "s4";
  }
  return "?";
}

DType dtype_from_name(const std::string& name) {
  struct Entry { const char* a; const char* b; DType dt; };
  static const Entry table[] = {
      {"f64", "F64", DType::f64}, {"f32", "F32", DType::f32},   {"f16", "F16", DType::f16},
      {"bf16", "BF16", DType::bf16}, {"s32", "I32", DType::s32}, {"s8", "I8", DType::s8},
      {"s4", "I4", DType::s4}};
  for (const auto& e : table)
    if (name == e.a || name == e.b) return e.dt;
  NB_FAIL("unknown dtype '" << name
                            << "'; nibble reads F64, F32, F16, BF16, I32, I8 and I4 (packed)");
}

bool is_float(DType dt) {
  return dt == DType::f64 || dt == DType::f32 || dt == DType::f16 || dt == DType::bf16;
}

static uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F) return bits_f32(sign | 0x7F800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    if (mant == 0) return bits_f32(sign);
    // subnormal: value = mant · 2^-24, exact in fp32
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) return sign | (abs > 0x7F800000u ? 0x7E00u : 0x7C00u);
  if (abs >= 0x477FF000u) return sign | 0x7C00u;  // rounds to >= 65520 -> inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero): value / 2^-24, rounded half to even.
    const float scaled = bits_f32(abs) * 16777216.0f;  // exact (power of two)
    const float r = std::nearbyint(scaled);
    return sign | static_cast<uint16_t>(r);
  }
  // Normal: rebias, round the 13 dropped bits half to even (carry may bump the exponent).
  uint32_t v = abs - (112u << 23);
  const uint32_t rest = v & 0x1FFFu;
  v >>= 13;
  if (rest > 0x1000u || (rest == 0x1000u && (v & 1u))) ++v;
  return sign | static_cast<uint16_t>(v);
}

float bf16_to_f32(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }

uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  const uint32_t rounding = 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

}  // namespace nibble
