// safetensors read/write: round trips, the exact HF byte layout, atomic writes, and one
// test per kind of corrupt file (each must give a nibble::Error naming the problem).
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "nibble/error.h"
#include "nibble/rng.h"
#include "nibble/safetensors.h"

using namespace nibble;
namespace fs = std::filesystem;

namespace {

// A fresh directory under the system temp dir, removed with everything in it at the end.
class ScratchDir {
 public:
  ScratchDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            ("nibble_st_" + std::to_string(::getpid()) + "_" + info->test_suite_name() + "_" +
             info->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::permissions(path_, fs::perms::owner_all, ec);
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }
  std::vector<std::string> listing() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(path_)) names.push_back(e.path().filename());
    std::sort(names.begin(), names.end());
    return names;
  }

 private:
  fs::path path_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void write_raw(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(uint64_t v) {
  std::string s;
  for (int i = 0; i < 8; ++i) s.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
  return s;
}

// A file whose header is exactly `header` (no padding) followed by `data`.
std::string st_file(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

// Random bytes from Philox: every bit pattern, NaN payloads included, must survive.
Tensor random_tensor(Shape shape, DType dt, uint64_t seed) {
  Tensor t = Tensor::empty(std::move(shape), dt);
  auto* p = t.data<uint8_t>();
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<uint8_t>(philox_u32(key, i));
  return t;
}

// Runs fn, expects a nibble::Error whose message contains every one of `parts`.
template <class Fn>
void expect_error(Fn fn, std::initializer_list<std::string> parts) {
  try {
    fn();
    ADD_FAILURE() << "no nibble::Error thrown; expected one mentioning '" << *parts.begin() << "'";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& part : parts)
      EXPECT_NE(msg.find(part), std::string::npos) << "message lacks '" << part << "': " << msg;
  }
}

// Reading `bytes` from a file must fail with a message naming the file and `problem`.
void expect_corrupt(const ScratchDir& dir, const std::string& bytes, const std::string& problem) {
  const std::string path = dir.file("corrupt.safetensors");
  write_raw(path, bytes);
  expect_error([&] { read_safetensors(path); }, {path, problem});
}

}  // namespace

TEST(SafetensorsRoundTrip, EveryDTypeWithRandomDataAndMetadata) {
  ScratchDir dir;
  // Odd element counts for s4 (a half-used last byte), a scalar, an empty tensor and
  // a 3-D shape, so offsets land on non-multiples of 8.
  struct Case { const char* name; Shape shape; DType dt; };
  const Case cases[] = {
      {"w.f64", {3, 5}, DType::f64},        {"w.f32", {17, 9}, DType::f32},
      {"w.f16", {2, 3, 7}, DType::f16},     {"w.bf16", {33}, DType::bf16},
      {"codes.s32", {4, 4}, DType::s32},    {"codes.s8", {5, 3}, DType::s8},
      {"codes.s4", {3, 7}, DType::s4},      {"scalar", {}, DType::f32},
      {"empty", {0, 3}, DType::bf16},       {"ünïcode名", {2}, DType::s8},
  };
  std::vector<NamedTensor> tensors;
  uint64_t seed = 1000;
  for (const auto& c : cases) tensors.push_back({c.name, random_tensor(c.shape, c.dt, seed++)});
  const std::map<std::string, std::string> meta = {
      {"format", "nibble"}, {"step", "12345"}, {"note", "quotes \" and \\ and ü"}};

  const std::string path = dir.file("model.safetensors");
  write_safetensors(path, tensors, meta);
  const SafetensorsFile f = read_safetensors(path);

  EXPECT_EQ(f.metadata, meta);
  ASSERT_EQ(f.tensors.size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& want = tensors[i];
    const auto& got = f.tensors[i];  // file order = the order written
    EXPECT_EQ(got.name, want.name);
    EXPECT_EQ(got.tensor.dtype(), want.tensor.dtype()) << want.name;
    EXPECT_EQ(got.tensor.shape(), want.tensor.shape()) << want.name;
    ASSERT_EQ(got.tensor.nbytes(), want.tensor.nbytes()) << want.name;
    EXPECT_EQ(std::memcmp(got.tensor.data<void>(), want.tensor.data<void>(), want.tensor.nbytes()),
              0)
        << want.name;
    ASSERT_NE(f.find(want.name), nullptr);
  }
  EXPECT_EQ(f.find("absent"), nullptr);
  // The header is padded so the data buffer starts 8-byte aligned.
  const std::string bytes = read_bytes(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[static_cast<size_t>(i)]);
  EXPECT_EQ(n % 8, 0u);
}

TEST(SafetensorsFormat, WritesTheHuggingFaceByteLayout) {
  ScratchDir dir;
  Tensor a = Tensor::empty({2}, DType::f32);
  a.data<float>()[0] = 1.0f;
  a.data<float>()[1] = -2.0f;
  Tensor b = Tensor::empty({3}, DType::s8);
  b.data<int8_t>()[0] = 1;
  b.data<int8_t>()[1] = -1;
  b.data<int8_t>()[2] = 127;
  const std::string path = dir.file("small.safetensors");
  write_safetensors(path, {{"a", a}, {"b", b}}, {{"format", "pt"}});

  // Built by hand; identical to what Hugging Face's safetensors 0.8.0 (Python,
  // safetensors.numpy.save) writes for the same two arrays and metadata.
  // 138 JSON bytes + 6 spaces of padding = 144 = 0x90.
  const std::string json =
      R"({"__metadata__":{"format":"pt"},)"
      R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"I8","shape":[3],"data_offsets":[8,11]}})";
  const char len[8] = {'\x90', 0, 0, 0, 0, 0, 0, 0};
  const char data[11] = {0, 0, '\x80', '\x3f',   // 1.0f
                         0, 0, 0, '\xc0',        // -2.0f
                         '\x01', '\xff', '\x7f'};  // 1, -1, 127
  const std::string expected =
      std::string(len, 8) + json + std::string(6, ' ') + std::string(data, 11);
  EXPECT_EQ(read_bytes(path), expected);

  // And a hand-built file reads back: tensors sorted by offset even when the header
  // lists them in another order.
  const std::string swapped =
      R"({"b":{"dtype":"I8","shape":[3],"data_offsets":[8,11]},)"
      R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  write_raw(path, st_file(swapped, std::string(data, 11)));
  const auto f = read_safetensors(path);
  ASSERT_EQ(f.tensors.size(), 2u);
  EXPECT_EQ(f.tensors[0].name, "a");
  EXPECT_EQ(f.tensors[0].tensor.data<float>()[1], -2.0f);
  EXPECT_EQ(f.tensors[1].tensor.data<int8_t>()[1], -1);
  EXPECT_TRUE(f.metadata.empty());
}

TEST(SafetensorsAtomicWrite, LeavesOnlyTheDestination) {
  ScratchDir dir;
  const std::string path = dir.file("out.safetensors");
  write_safetensors(path, {{"x", random_tensor({8, 8}, DType::f32, 7)}});
  write_safetensors(path, {{"y", random_tensor({4}, DType::f16, 8)}});  // replaces it
  EXPECT_EQ(dir.listing(), std::vector<std::string>{"out.safetensors"});
  EXPECT_EQ(read_safetensors(path).tensors.at(0).name, "y");
}

TEST(SafetensorsAtomicWrite, FailedWriteKeepsTheOldFileAndRemovesTheTemporary) {
  ScratchDir dir;
  const std::string path = dir.file("out.safetensors");
  write_file_atomic(path, "old contents");

  // Make write(2) fail halfway: a 1 KiB file-size limit, with SIGXFSZ ignored so the
  // failure arrives as EFBIG instead of killing the test. Works for root too (unlike a
  // read-only directory).
  rlimit old_limit{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit small = old_limit;
  small.rlim_cur = 1024;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  bool threw = false;
  std::string msg;
  try {
    write_safetensors(path, {{"big", random_tensor({4096}, DType::f32, 9)}});
  } catch (const Error& e) {
    threw = true;
    msg = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old_limit);
  std::signal(SIGXFSZ, old_handler);

  EXPECT_TRUE(threw);
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("write failed"), std::string::npos) << msg;
  EXPECT_EQ(read_bytes(path), "old contents");
  EXPECT_EQ(dir.listing(), std::vector<std::string>{"out.safetensors"});
}

TEST(SafetensorsAtomicWrite, DestinationThatIsADirectoryIsLeftAlone) {
  ScratchDir dir;
  const std::string target = dir.file("taken");
  fs::create_directory(target);
  write_raw(target + "/inside", "keep me");
  expect_error([&] { write_safetensors(target, {{"x", random_tensor({3}, DType::f32, 1)}}); },
               {target, "directory"});
  EXPECT_TRUE(fs::is_directory(target));
  EXPECT_EQ(read_bytes(target + "/inside"), "keep me");
  EXPECT_EQ(dir.listing(), std::vector<std::string>{"taken"});
}

TEST(SafetensorsAtomicWrite, MissingDirectoryFailsCleanly) {
  ScratchDir dir;
  const std::string missing = dir.file("no/such/dir/out.safetensors");
  expect_error([&] { write_safetensors(missing, {{"x", random_tensor({3}, DType::f32, 2)}}); },
               {missing, "cannot create temporary file", "No such file"});
  EXPECT_EQ(dir.listing(), std::vector<std::string>{});
}

TEST(SafetensorsAtomicWrite, ReadOnlyDirectoryKeepsTheOldFile) {
  // Permissions do not stop root; FailedWriteKeepsTheOldFile... covers that case for root.
  if (::geteuid() == 0) GTEST_SKIP() << "running as root: a read-only directory is writable";
  ScratchDir dir;
  const std::string ro = dir.file("ro");
  fs::create_directory(ro);
  write_file_atomic(ro + "/out.safetensors", "old");
  fs::permissions(ro, fs::perms::owner_read | fs::perms::owner_exec);
  expect_error([&] { write_file_atomic(ro + "/out.safetensors", "new"); },
               {"cannot create temporary file", "Permission denied"});
  fs::permissions(ro, fs::perms::owner_all);
  EXPECT_EQ(read_bytes(ro + "/out.safetensors"), "old");
}

TEST(SafetensorsAtomicWrite, RejectsUnwritableTensorSets) {
  ScratchDir dir;
  const std::string path = dir.file("x.safetensors");
  const Tensor t = random_tensor({2, 2}, DType::f32, 3);
  expect_error([&] { write_safetensors(path, {{"a", t}, {"a", t}}); }, {"'a' given twice"});
  expect_error([&] { write_safetensors(path, {{"__metadata__", t}}); }, {"reserved"});
  TensorView strided = t.view();
  strided.shape = {2, 1};
  strided.strides = {2, 2};  // every other element: not contiguous
  expect_error([&] { write_safetensors(path, {{"s", Tensor::borrow(strided)}}); },
               {"not contiguous"});
  expect_error([&] { write_safetensors(path, {{"bad\xff", t}}); }, {"UTF-8"});
  EXPECT_FALSE(fs::exists(path));
  EXPECT_EQ(dir.listing(), std::vector<std::string>{});
}

// ---- corrupt files: one case per problem, each message names the file and the problem ----

TEST(SafetensorsRead, MissingFileOrDirectory) {
  ScratchDir dir;
  const std::string missing = dir.file("absent.safetensors");
  expect_error([&] { read_safetensors(missing); }, {missing, "No such file"});
  expect_error([&] { read_safetensors(dir.path().string()); }, {"is a directory"});
}

TEST(SafetensorsRead, FileShorterThanTheLengthField) {
  ScratchDir dir;
  expect_corrupt(dir, "", "shorter than the 8-byte header length");
  expect_corrupt(dir, std::string("\x10\0\0\0", 4), "shorter than the 8-byte header length");
}

TEST(SafetensorsRead, HeaderLengthLargerThanTheFileOrTheLimit) {
  ScratchDir dir;
  expect_corrupt(dir, le64(100) + "{}", "only 2 bytes after it");
  expect_corrupt(dir, le64(uint64_t{1} << 40) + "{}", "100000000-byte limit");
  expect_corrupt(dir, le64(~uint64_t{0}) + "{}", "100000000-byte limit");
}

TEST(SafetensorsRead, HeaderThatIsNotAJsonObject) {
  ScratchDir dir;
  expect_corrupt(dir, st_file("{\"a\": {\"dtype\": ", ""), "not valid JSON");
  expect_corrupt(dir, st_file("{\"a\":1}\xff", ""), "not valid JSON");
  expect_corrupt(dir, st_file("[1, 2]", ""), "expected an object");
  expect_corrupt(dir, st_file(R"({"a": 5})", ""), "header entry 'a' is 5");
}

TEST(SafetensorsRead, MissingFields) {
  ScratchDir dir;
  expect_corrupt(dir, st_file(R"({"a":{"shape":[1],"data_offsets":[0,4]}})", "0123"),
                 "'a' has no \"dtype\" field");
  expect_corrupt(dir, st_file(R"({"a":{"dtype":"F32","data_offsets":[0,4]}})", "0123"),
                 "'a' has no \"shape\" field");
  expect_corrupt(dir, st_file(R"({"a":{"dtype":"F32","shape":[1]}})", "0123"),
                 "'a' has no \"data_offsets\" field");
}

TEST(SafetensorsRead, MalformedFieldValues) {
  ScratchDir dir;
  expect_corrupt(dir, st_file(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", "0123"),
                 "non-negative integer");
  expect_corrupt(dir, st_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", "0123"),
                 "expected [begin, end]");
  expect_corrupt(dir, st_file(R"({"a":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", "0123"),
                 "expected a string");
  expect_corrupt(dir, st_file(R"({"__metadata__":{"k":1}})", ""), "metadata values must be strings");
  expect_corrupt(dir,
                 st_file(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],)"
                         R"("data_offsets":[0,4]}})",
                         "0123"),
                 "overflows 64 bits");
}

TEST(SafetensorsRead, UnknownDTypeListsTheSupportedOnes) {
  ScratchDir dir;
  expect_corrupt(dir, st_file(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", "0123"),
                 "dtype 'U8', which nibble does not read; supported: F64, F32, F16, BF16, I32, I8");
}

TEST(SafetensorsRead, OffsetsOutOfRangeReversedOrOverlapping) {
  ScratchDir dir;
  expect_corrupt(dir, st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", "0123"),
                 "past the end of the 4-byte data buffer");
  expect_corrupt(dir, st_file(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}})", "0123"),
                 "end before begin");
  expect_corrupt(dir,
                 st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                         std::string(12, 'x')),
                 "overlap");
  // An empty tensor sitting inside another one's range touches no bytes: accepted.
  write_raw(dir.file("ok.safetensors"),
            st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                    R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
                    std::string(8, 'x')));
  EXPECT_EQ(read_safetensors(dir.file("ok.safetensors")).tensors.size(), 2u);
}

TEST(SafetensorsRead, ByteCountMustMatchShapeAndDType) {
  ScratchDir dir;
  expect_corrupt(dir, st_file(R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})",
                              std::string(24, 'x')),
                 "F32[2, 3] = 24 bytes, but its data_offsets [0, 20] span 20 bytes");
  // Packed I4: 5 codes take 3 bytes.
  expect_corrupt(dir, st_file(R"({"a":{"dtype":"I4","shape":[5],"data_offsets":[0,5]}})",
                              std::string(5, 'x')),
                 "I4[5] = 3 bytes");
}

TEST(SafetensorsRead, DuplicateTensorNames) {
  ScratchDir dir;
  expect_corrupt(dir,
                 st_file(R"({"a":{"dtype":"I8","shape":[1],"data_offsets":[0,1]},)"
                         R"("a":{"dtype":"I8","shape":[1],"data_offsets":[1,2]}})",
                         "xy"),
                 "'a' appears twice");
}
