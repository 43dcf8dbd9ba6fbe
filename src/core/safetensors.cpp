#include "nibble/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "nibble/error.h"

// The file format stores little-endian data and nibble copies it byte for byte.
static_assert(std::endian::native == std::endian::little,
              "safetensors IO assumes a little-endian host");

namespace nibble {

namespace {

using ordered_json = nlohmann::ordered_json;

// A header this large is not a tensor index but a corrupt length field; the HF reader
// uses the same 100 MB limit.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// safetensors dtype spellings for the dtypes nibble holds. "I4" is nibble's own extension
// (not in the HF format): packed signed 4-bit codes, two per byte, element 2i in the low
// nibble (docs/formats.md). Other readers will reject such a file; nibble writes it only
// for s4 tensors.
struct DTypeName {
  const char* name;
  DType dtype;
};
constexpr DTypeName kDTypes[] = {{"F64", DType::f64}, {"F32", DType::f32},
                                 {"F16", DType::f16}, {"BF16", DType::bf16},
                                 {"I32", DType::s32}, {"I8", DType::s8},
                                 {"I4", DType::s4}};
constexpr const char* kSupported = "F64, F32, F16, BF16, I32, I8 and I4 (nibble's packed 4-bit)";

const char* safetensors_dtype_name(DType dt) {
  for (const auto& e : kDTypes)
    if (e.dtype == dt) return e.name;
  NB_FAIL("dtype " << dtype_name(dt) << " has no safetensors spelling");
}

bool safetensors_dtype(const std::string& name, DType* dt) {
  for (const auto& e : kDTypes)
    if (name == e.name) {
      *dt = e.dtype;
      return true;
    }
  return false;
}

// Closes a POSIX file descriptor on scope exit.
struct FileDescriptor {
  int fd = -1;
  FileDescriptor() = default;
  explicit FileDescriptor(int f) : fd(f) {}
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() {
    if (fd >= 0) ::close(fd);
  }
};

// Reads exactly n bytes at offset; the file size was checked before, so a short read
// means the file changed or the device failed.
void read_at(int fd, void* buf, size_t n, uint64_t offset, const std::string& path) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    const ssize_t got = ::pread(fd, p, n, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    NB_CHECK(got >= 0, path << ": read failed at byte " << offset << ": " << std::strerror(errno));
    NB_CHECK(got > 0, path << ": file ended early at byte " << offset
                           << " (truncated or changed while reading)");
    p += got;
    n -= static_cast<size_t>(got);
    offset += static_cast<uint64_t>(got);
  }
}

// A non-negative JSON integer, or an error naming the field.
uint64_t json_u64(const ordered_json& v, const std::string& path, const std::string& tensor,
                  const char* field) {
  NB_CHECK(v.is_number_unsigned(), path << ": tensor '" << tensor << "' has " << field << " entry "
                                        << v.dump() << "; expected a non-negative integer");
  return v.get<uint64_t>();
}

struct Entry {
  std::string name;
  DType dtype = DType::f32;
  Shape shape;
  uint64_t begin = 0, end = 0;
  size_t header_index = 0;
};

Entry parse_entry(const std::string& name, const ordered_json& v, size_t index,
                  const std::string& path) {
  NB_CHECK(v.is_object(), path << ": header entry '" << name << "' is " << v.dump()
                               << "; expected {\"dtype\", \"shape\", \"data_offsets\"}");
  Entry e;
  e.name = name;
  e.header_index = index;
  for (const char* field : {"dtype", "shape", "data_offsets"})
    NB_CHECK(v.contains(field),
             path << ": tensor '" << name << "' has no \"" << field << "\" field in the header");

  const auto& dt = v["dtype"];
  NB_CHECK(dt.is_string(), path << ": tensor '" << name << "' has dtype " << dt.dump()
                                << "; expected a string such as \"F32\"");
  const std::string dt_name = dt.get<std::string>();
  NB_CHECK(safetensors_dtype(dt_name, &e.dtype), path << ": tensor '" << name << "' has dtype '"
                                                      << dt_name << "', which nibble does not read; "
                                                      << "supported: " << kSupported);

  const auto& shape = v["shape"];
  NB_CHECK(shape.is_array(), path << ": tensor '" << name << "' has shape " << shape.dump()
                                  << "; expected an array of sizes");
  // numel must fit int64 (Tensor counts in int64); the byte-count check below then
  // bounds it by the file size.
  int64_t numel = 1;
  for (const auto& d : shape) {
    const uint64_t size = json_u64(d, path, name, "shape");
    NB_CHECK(size <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) &&
                 (size == 0 || numel <= std::numeric_limits<int64_t>::max() /
                                             static_cast<int64_t>(size)),
             path << ": tensor '" << name << "' has shape " << shape.dump()
                  << " whose element count overflows 64 bits");
    e.shape.push_back(static_cast<int64_t>(size));
    numel *= static_cast<int64_t>(size);
  }

  const auto& off = v["data_offsets"];
  NB_CHECK(off.is_array() && off.size() == 2,
           path << ": tensor '" << name << "' has data_offsets " << off.dump()
                << "; expected [begin, end]");
  e.begin = json_u64(off[0], path, name, "data_offsets");
  e.end = json_u64(off[1], path, name, "data_offsets");
  NB_CHECK(e.end >= e.begin, path << ": tensor '" << name << "' has data_offsets [" << e.begin
                                  << ", " << e.end << "] with end before begin");
  // Bytes the dtype and shape need: numel * size, or rows·ceil(cols / 2) for packed s4.
  // numel < 2^63 but numel * 8 may not fit 64 bits; such a tensor cannot match any
  // real file, so an overflow reads as a mismatch.
  const auto n = static_cast<uint64_t>(numel);
  const auto elem_bytes = static_cast<uint64_t>(dtype_bits(e.dtype) / 8);
  const bool overflow = elem_bytes > 0 && n > std::numeric_limits<uint64_t>::max() / elem_bytes;
  const uint64_t need = e.dtype == DType::s4 ? storage_bytes(DType::s4, e.shape) : n * elem_bytes;
  NB_CHECK(!overflow && need == e.end - e.begin,
           path << ": tensor '" << name << "' is " << dt_name << shape_str(e.shape) << " = "
                << (overflow ? std::string("over 2^64") : std::to_string(need)) << " bytes, but its data_offsets [" << e.begin
                << ", " << e.end << "] span " << (e.end - e.begin) << " bytes");
  return e;
}

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xFF);
  return s;
}

}  // namespace

const Tensor* SafetensorsFile::find(const std::string& name) const {
  for (const auto& t : tensors)
    if (t.name == name) return &t.tensor;
  return nullptr;
}

SafetensorsFile read_safetensors(const std::string& path) {
  FileDescriptor file(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  NB_CHECK(file.fd >= 0, path << ": cannot open: " << std::strerror(errno)
                              << (errno == ENOENT ? "; check the path" : ""));
  struct stat st {};
  NB_CHECK(::fstat(file.fd, &st) == 0, path << ": cannot stat: " << std::strerror(errno));
  NB_CHECK(!S_ISDIR(st.st_mode), path << ": is a directory, not a .safetensors file");
  const auto file_size = static_cast<uint64_t>(st.st_size);
  NB_CHECK(file_size >= 8, path << ": file is " << file_size
                                << " bytes, shorter than the 8-byte header length; "
                                << "not a safetensors file (or truncated)");

  unsigned char len_bytes[8];
  read_at(file.fd, len_bytes, 8, 0, path);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  NB_CHECK(header_len <= kMaxHeaderBytes,
           path << ": header length field says " << header_len << " bytes, more than the "
                << kMaxHeaderBytes << "-byte limit; the file is corrupt or not safetensors");
  NB_CHECK(header_len <= file_size - 8,
           path << ": header length field says " << header_len << " bytes, but the file has only "
                << (file_size - 8) << " bytes after it (truncated file?)");
  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = file_size - data_start;

  std::string header(header_len, '\0');
  read_at(file.fd, header.data(), header.size(), 8, path);

  // nlohmann keeps the last of two equal keys silently; the callback sees every key, so
  // duplicate tensor names (keys of the top-level object, depth 1) are caught here.
  std::set<std::string> seen;
  std::string duplicate;
  const ordered_json::parser_callback_t on_event =
      [&](int depth, ordered_json::parse_event_t event, ordered_json& parsed) {
        if (event == ordered_json::parse_event_t::key && depth == 1 && duplicate.empty()) {
          const auto key = parsed.get<std::string>();
          if (!seen.insert(key).second) duplicate = key;
        }
        return true;
      };
  ordered_json h;
  try {
    h = ordered_json::parse(header.begin(), header.end(), on_event);
  } catch (const ordered_json::exception& e) {
    NB_FAIL(path << ": header is not valid JSON (" << e.what() << ")");
  }
  NB_CHECK(h.is_object(), path << ": header is a JSON " << h.type_name()
                               << ", expected an object {name: {dtype, shape, data_offsets}}");
  NB_CHECK(duplicate.empty(), path << ": tensor name '" << duplicate
                                   << "' appears twice in the header; names must be unique");

  SafetensorsFile out;
  std::vector<Entry> entries;
  size_t index = 0;
  for (const auto& [key, value] : h.items()) {
    if (key == "__metadata__") {
      NB_CHECK(value.is_object(), path << ": __metadata__ is " << value.type_name()
                                       << "; expected an object of string values");
      for (const auto& [mk, mv] : value.items()) {
        NB_CHECK(mv.is_string(), path << ": __metadata__ entry '" << mk << "' is " << mv.dump()
                                      << "; safetensors metadata values must be strings");
        out.metadata[mk] = mv.get<std::string>();
      }
      continue;
    }
    entries.push_back(parse_entry(key, value, index++, path));
  }

  // "File order" is the order of the data: by begin offset, the header order on ties.
  std::stable_sort(entries.begin(), entries.end(),
                   [](const Entry& a, const Entry& b) { return a.begin < b.begin; });
  const Entry* prev = nullptr;
  for (const Entry& e : entries) {
    NB_CHECK(e.end <= data_size, path << ": tensor '" << e.name << "' has data_offsets ["
                                      << e.begin << ", " << e.end << "] past the end of the "
                                      << data_size << "-byte data buffer (truncated file?)");
    // Empty tensors occupy no bytes, so they cannot overlap anything.
    if (e.begin == e.end) continue;
    NB_CHECK(prev == nullptr || e.begin >= prev->end,
             path << ": tensors '" << prev->name << "' [" << prev->begin << ", " << prev->end
                  << ") and '" << e.name << "' [" << e.begin << ", " << e.end
                  << ") overlap in the data buffer");
    prev = &e;
  }
  // Gaps between tensors and trailing bytes are tolerated (the HF reader rejects them);
  // they waste space but cannot make a tensor read the wrong bytes.

  for (const Entry& e : entries) {
    Tensor t = Tensor::empty(e.shape, e.dtype);
    if (e.end > e.begin) read_at(file.fd, t.data<void>(), e.end - e.begin, data_start + e.begin, path);
    out.tensors.push_back({e.name, std::move(t)});
  }
  return out;
}

void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  ordered_json h = ordered_json::object();
  // The HF writer puts __metadata__ first; doing the same keeps small files byte-identical.
  if (!metadata.empty()) {
    ordered_json m = ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    h["__metadata__"] = std::move(m);
  }
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const auto& nt : tensors) {
    const TensorView v = nt.tensor.view();
    NB_CHECK(nt.name != "__metadata__",
             path << ": a tensor may not be named __metadata__ (reserved by the format)");
    NB_CHECK(names.insert(nt.name).second,
             path << ": tensor name '" << nt.name << "' given twice; names must be unique");
    NB_CHECK(v.device == Device::cpu,
             path << ": tensor '" << nt.name << "' is on the GPU; copy it to the host first");
    NB_CHECK(v.is_contiguous(), path << ": tensor '" << nt.name << "' (" << v.describe()
                                     << ") is not contiguous; write a contiguous copy");
    NB_CHECK(v.data != nullptr || v.numel() == 0,
             path << ": tensor '" << nt.name << "' has no data (undefined tensor)");
    const uint64_t bytes = storage_bytes(v.dtype, v.shape);
    ordered_json e = ordered_json::object();
    e["dtype"] = safetensors_dtype_name(v.dtype);
    e["shape"] = v.shape;
    e["data_offsets"] = {offset, offset + bytes};
    h[nt.name] = std::move(e);
    offset += bytes;
  }

  std::string header;
  try {
    header = h.dump();
  } catch (const ordered_json::exception& e) {
    // dump() rejects strings that are not valid UTF-8 (names or metadata).
    NB_FAIL(path << ": cannot encode the header (" << e.what()
                 << "); tensor names and metadata must be valid UTF-8");
  }
  // The data buffer starts 8-byte aligned in the file, as in the HF writer: pad with spaces.
  header.append((8 - header.size() % 8) % 8, ' ');

  std::string bytes;
  bytes.reserve(8 + header.size() + offset);
  bytes += le64(header.size());
  bytes += header;
  for (const auto& nt : tensors)
    bytes.append(nt.tensor.data<const char>(), nt.tensor.nbytes());
  write_file_atomic(path, bytes);
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  NB_CHECK(!path.empty(), "write_file_atomic: empty path; pass the file to write");
  // The temporary lives in the destination's directory so rename() stays on one
  // filesystem and is atomic; the pid keeps concurrent writers apart.
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  FileDescriptor file(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666));
  NB_CHECK(file.fd >= 0, path << ": cannot create temporary file " << tmp << ": "
                              << std::strerror(errno)
                              << "; check that the directory exists and is writable");

  // Any failure below removes the temporary and reports errno of the failed call.
  auto fail = [&](const char* what) {
    const int err = errno;
    ::close(file.fd);
    file.fd = -1;
    ::unlink(tmp.c_str());
    NB_FAIL(path << ": " << what << ": " << std::strerror(err));
  };

  const char* p = bytes.data();
  size_t left = bytes.size();
  while (left > 0) {
    const ssize_t n = ::write(file.fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail("write failed (disk full or file size limit?)");
    p += n;
    left -= static_cast<size_t>(n);
  }
  if (::fsync(file.fd) != 0) fail("fsync failed");
  const int fd = file.fd;
  file.fd = -1;
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    NB_FAIL(path << ": close failed: " << std::strerror(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    NB_FAIL(path << ": cannot replace the destination: " << std::strerror(err)
                 << (err == EISDIR ? " (the path is a directory)" : ""));
  }
  // Make the rename itself durable. Best effort: some filesystems refuse fsync on a
  // directory, and the data is already safely in place either way.
  const auto slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  FileDescriptor d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (d.fd >= 0) (void)::fsync(d.fd);
}

}  // namespace nibble
