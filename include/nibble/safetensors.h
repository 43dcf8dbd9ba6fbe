#pragma once
// safetensors (Hugging Face): an 8-byte little-endian header length, a JSON header
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then raw little-endian data. Writes are atomic: a temporary file, fsync, rename.
#include <map>
#include <string>
#include <vector>

#include "nibble/tensor.h"

namespace nibble {

struct NamedTensor {
  std::string name;
  Tensor tensor;
};

struct SafetensorsFile {
  std::vector<NamedTensor> tensors;           // in file order
  std::map<std::string, std::string> metadata;
  const Tensor* find(const std::string& name) const;
};

// Throws nibble::Error naming the file and what is wrong (missing, truncated, bad JSON,
// offsets out of range or overlapping, unknown dtype, shape/size mismatch).
SafetensorsFile read_safetensors(const std::string& path);
void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Writes bytes to path atomically (path.tmp.<pid>, fsync, rename). Used by every writer.
void write_file_atomic(const std::string& path, const std::string& bytes);

}  // namespace nibble
