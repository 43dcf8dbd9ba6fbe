#pragma once
// Element types. s4 is packed: two signed 4-bit values per byte, element 2i in the
// low nibble and 2i+1 in the high nibble (docs/formats.md).
#include <cstddef>
#include <cstdint>
#include <string>

namespace nibble {

enum class DType : uint8_t { f64, f32, f16, bf16, s32, s8, s4 };

// Bytes needed for n elements of dtype (s4 rounds up to whole bytes).
size_t storage_bytes(DType dt, int64_t n);
// Size of one element in bits (4 for s4).
int dtype_bits(DType dt);
const char* dtype_name(DType dt);
// Parses "f32", "bf16", ... and the safetensors spellings "F32", "BF16", "I8", ...
// Throws nibble::Error on an unknown name.
DType dtype_from_name(const std::string& name);
bool is_float(DType dt);

// IEEE half and bfloat16 storage with round-to-nearest-even conversion, bit-identical
// to CUDA's __float2half_rn / __float2bfloat16_rn (NaN stays NaN).
struct f16_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
float bf16_to_f32(uint16_t b);
uint16_t f32_to_bf16(float f);

}  // namespace nibble
