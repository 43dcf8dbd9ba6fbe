// The data layer: text files and their train/validation split, batches as pure functions of
// (seed, step), IDX image files (gzip and raw, every kind of corrupt file), the per-epoch
// shuffle, evaluation order, the built-in default corpus, and the real MNIST files when the
// shared data folder is there.
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>

#include "nibble/error.h"
#include "nibble/rng.h"
#include "train/data.h"
#include "train/tokenizer.h"

using namespace nibble;
using namespace nibble::train;
namespace fs = std::filesystem;

namespace {

template <class Fn>
void expect_error(Fn&& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected nibble::Error containing \"" << needle << "\"";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message: " << e.what() << "\nexpected to contain: " << needle;
  }
}

fs::path shared_data_dir() {
  const char* src = std::getenv("NIBBLE_SOURCE_DIR");
  return (src != nullptr ? fs::path(src) : fs::current_path()) / ".." / "shared" / "data";
}

// A fresh folder under the temp dir, removed at the end of the test.
class ScratchDir {
 public:
  ScratchDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() / ("nibble_data_" + std::to_string(::getpid()) + "_" +
                                         info->test_suite_name() + "_" + info->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void write_gz(const std::string& path, const std::string& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())),
            static_cast<int>(bytes.size()));
  ASSERT_EQ(gzclose(f), Z_OK);
}

std::string be32(uint32_t v) {
  return {static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8),
          static_cast<char>(v)};
}

// An IDX file: magic 0x0008 <ndims>, sizes, then the bytes.
std::string idx_bytes(const std::vector<uint32_t>& dims, const std::vector<uint8_t>& data) {
  std::string s = be32(0x0800u | static_cast<uint32_t>(dims.size()));
  for (const uint32_t d : dims) s += be32(d);
  s.append(data.begin(), data.end());
  return s;
}

std::vector<uint8_t> random_bytes(size_t n, uint64_t seed, uint32_t modulo = 256) {
  std::vector<uint8_t> v(n);
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(philox_u32(key, i) % modulo);
  return v;
}

// Tokens 0, 1, 2, ...: a token's value is its position, so windows can be located.
std::vector<int32_t> iota_tokens(int32_t n) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  std::iota(t.begin(), t.end(), 0);
  return t;
}

// Scoped environment variable.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    ::setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (had_) ::setenv(name_, old_.c_str(), 1);
    else ::unsetenv(name_);
  }

 private:
  const char* name_;
  std::string old_;
  bool had_ = false;
};

}  // namespace

// ---- text files and the split ---------------------------------------------------------

TEST(TextData, ReadTextFileErrors) {
  ScratchDir dir;
  expect_error([&] { read_text_file(dir.file("missing.txt")); }, "missing.txt does not exist");
  expect_error([&] { read_text_file(dir.str()); }, "is not a regular file");
  write_file(dir.file("empty.txt"), "");
  expect_error([&] { read_text_file(dir.file("empty.txt")); }, "empty.txt is empty");
  write_file(dir.file("a.txt"), "abc\n");
  EXPECT_EQ(read_text_file(dir.file("a.txt")), "abc\n");
}

TEST(TextData, SplitKeepsTheLastFractionForValidation) {
  const TextDataset d(iota_tokens(1000), 1000);  // default 10%
  ASSERT_EQ(d.train_tokens().size(), 900u);
  ASSERT_EQ(d.valid_tokens().size(), 100u);
  EXPECT_EQ(d.train_tokens().back(), 899);
  EXPECT_EQ(d.valid_tokens().front(), 900);
  const TextDataset q(iota_tokens(1001), 1001, 0.25);  // floor(250.25) = 250
  EXPECT_EQ(q.valid_tokens().size(), 250u);
  EXPECT_EQ(q.train_tokens().size(), 751u);
  const TextDataset none(iota_tokens(10), 10, 0.0);
  EXPECT_EQ(none.train_tokens().size(), 10u);
  EXPECT_TRUE(none.valid_tokens().empty());
  expect_error([] { TextDataset(iota_tokens(10), 10, 1.0); }, "must be in [0, 1)");
  expect_error([] { TextDataset(iota_tokens(10), 10, -0.1); }, "must be in [0, 1)");
  expect_error([] { TextDataset(iota_tokens(10), 9); }, "token 9 has id 9");
  expect_error([] { TextDataset({}, 9); }, "no tokens");
}

TEST(TextData, LoadsWithEitherTokenizer) {
  ScratchDir dir;
  const std::string text = "To be, or not to be: that is the question.\n";
  std::string big;
  for (int i = 0; i < 20; ++i) big += text;
  write_file(dir.file("t.txt"), big);
  const CharTokenizer chars = CharTokenizer::from_text(big);
  const TextDataset d = TextDataset::load(dir.file("t.txt"), chars);
  EXPECT_EQ(d.vocab(), chars.vocab_size());
  EXPECT_EQ(d.train_tokens().size() + d.valid_tokens().size(), big.size());
  EXPECT_EQ(chars.decode(d.valid_tokens()), big.substr(big.size() - big.size() / 10));

  // A character the vocabulary lacks names the file and the offset.
  write_file(dir.file("other.txt"), "To be? Zounds!");
  expect_error([&] { TextDataset::load(dir.file("other.txt"), chars); }, "other.txt: character");

  const fs::path bpe_dir = shared_data_dir() / "gpt2-bpe";
  if (!fs::exists(bpe_dir / "encoder.json")) GTEST_SKIP() << "no GPT-2 vocabulary at " << bpe_dir;
  const Gpt2BpeTokenizer bpe = Gpt2BpeTokenizer::load(bpe_dir.string());
  const TextDataset b = TextDataset::load(dir.file("t.txt"), bpe);
  EXPECT_EQ(b.vocab(), 50257);
  std::vector<int32_t> all = b.train_tokens();
  all.insert(all.end(), b.valid_tokens().begin(), b.valid_tokens().end());
  EXPECT_EQ(bpe.decode(all), big);
  write_file(dir.file("latin1.txt"), "caf\xe9 au lait");
  expect_error([&] { TextDataset::load(dir.file("latin1.txt"), bpe); },
               "latin1.txt is not valid UTF-8: byte 3 (0xe9)");
}

// ---- text batches ---------------------------------------------------------------------

TEST(TextData, TrainBatchIsWindowsWithNextTokenTargets) {
  const TextDataset d(iota_tokens(5000), 5000);
  const int64_t B = 8, T = 16;
  for (const uint32_t step : {0u, 1u, 77u}) {
    const nn::Batch batch = d.train_batch(B, T, /*seed=*/5, step);
    ASSERT_EQ(batch.size, B);
    ASSERT_EQ(batch.seq, T);
    ASSERT_EQ(batch.tokens.size(), static_cast<size_t>(B * T));
    ASSERT_EQ(batch.targets.size(), static_cast<size_t>(B * T));
    for (int64_t b = 0; b < B; ++b) {
      const int32_t start = batch.tokens[static_cast<size_t>(b * T)];
      // The whole window, targets included, lies in the training split (positions < 4500).
      EXPECT_LT(start + T, 4500);
      for (int64_t t = 0; t < T; ++t) {
        EXPECT_EQ(batch.tokens[static_cast<size_t>(b * T + t)], start + t);
        EXPECT_EQ(batch.targets[static_cast<size_t>(b * T + t)], start + t + 1);
      }
    }
  }
}

TEST(TextData, TrainBatchIsAPureFunctionOfSeedAndStep) {
  const TextDataset d(iota_tokens(100000), 100000);
  const nn::Batch a = d.train_batch(4, 32, 9, 123);
  d.train_batch(4, 32, 9, 5);  // no hidden state in between
  const TextDataset again(iota_tokens(100000), 100000);
  const nn::Batch b = again.train_batch(4, 32, 9, 123);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.targets, b.targets);
  EXPECT_NE(a.tokens, d.train_batch(4, 32, 9, 124).tokens);
  EXPECT_NE(a.tokens, d.train_batch(4, 32, 10, 123).tokens);
  // The offsets are Philox draws of the documented stream.
  const PhiloxKey key{9, 123, 0, RngRole::data};
  const uint64_t u1 = (uint64_t{philox_u32(key, 2)} << 32) | philox_u32(key, 3);
  EXPECT_EQ(a.tokens[32], static_cast<int32_t>(u1 % (90000 - 32)));
}

TEST(TextData, TrainOffsetsAreUniform) {
  // 50 possible starts (n_train 66, seq 16), 16,000 draws over seeds 1-2 and 1,000 steps:
  // each start expects 320 with sd sqrt(320·49/50) = 17.7; the bound is 5 sd = 89.
  const TextDataset d(iota_tokens(66), 66, 0.0);
  std::vector<int64_t> counts(50, 0);
  for (const uint64_t seed : {1u, 2u})
    for (uint32_t step = 0; step < 1000; ++step) {
      const nn::Batch batch = d.train_batch(8, 16, seed, step);
      for (int64_t b = 0; b < 8; ++b) ++counts[static_cast<size_t>(batch.tokens[static_cast<size_t>(b * 16)])];
    }
  for (size_t s = 0; s < counts.size(); ++s) EXPECT_NEAR(static_cast<double>(counts[s]), 320.0, 89.0) << "start " << s;
}

TEST(TextData, TrainBatchNeedsEnoughTokens) {
  const TextDataset d(iota_tokens(20), 20, 0.0);
  EXPECT_NO_THROW(d.train_batch(2, 19, 1, 0));
  expect_error([&] { d.train_batch(2, 20, 1, 0); }, "too few for one window of 21");
  expect_error([&] { d.train_batch(0, 4, 1, 0); }, "batch size 0");
  expect_error([&] { d.train_batch(2, 0, 1, 0); }, "sequence length 0");
}

TEST(TextData, ValidationBatchesAreAFixedOrderedSet) {
  const TextDataset d(iota_tokens(1000), 1000, 0.1);  // validation tokens 900..999
  const int64_t T = 8;
  EXPECT_EQ(d.valid_window_count(T), 12);  // windows at 0, 8, ..., 88 (the last ends at 96)
  const std::vector<nn::Batch> all = d.valid_batches(5, T);
  ASSERT_EQ(all.size(), 3u);
  EXPECT_EQ(all[0].size, 5);
  EXPECT_EQ(all[2].size, 2);
  std::vector<int32_t> targets;
  for (const nn::Batch& b : all) {
    EXPECT_EQ(b.seq, T);
    for (size_t i = 0; i < b.tokens.size(); ++i) EXPECT_EQ(b.targets[i], b.tokens[i] + 1);
    targets.insert(targets.end(), b.targets.begin(), b.targets.end());
  }
  // Every validation token from the second on is a target exactly once, in order.
  std::vector<int32_t> expected(96);
  std::iota(expected.begin(), expected.end(), 901);
  EXPECT_EQ(targets, expected);
  // Deterministic, and a subset is spread evenly: 4 of 12 windows -> windows 0, 3, 6, 9.
  EXPECT_EQ(d.valid_batches(5, T)[1].tokens, all[1].tokens);
  const std::vector<nn::Batch> some = d.valid_batches(4, T, 4);
  ASSERT_EQ(some.size(), 1u);
  for (int r = 0; r < 4; ++r) EXPECT_EQ(some[0].tokens[static_cast<size_t>(r * T)], 900 + 24 * r);
  EXPECT_EQ(d.valid_batches(4, T, 100).size(), 3u);  // capped at all 12
  expect_error([&] { d.valid_batches(4, 100); }, "too few for one window of 101");
  const TextDataset none(iota_tokens(100), 100, 0.0);
  expect_error([&] { none.valid_batches(4, 8); }, "validation split has 0 tokens");
}

// ---- the built-in corpus ----------------------------------------------------------------

TEST(DataFiles, DefaultCorpusIsFoundAndSmall) {
  const std::string path = default_corpus_path();
  EXPECT_EQ(fs::path(path).filename(), "kjv_excerpt.txt");
  const std::string text = read_text_file(path);
  EXPECT_GT(text.size(), 100000u);
  EXPECT_LE(text.size(), 200000u);
  const CharTokenizer tok = CharTokenizer::from_text(text);
  EXPECT_LT(tok.vocab_size(), 80);
  const TextDataset d = TextDataset::from_text(text, tok);
  EXPECT_GT(d.valid_window_count(64), 200);
  EXPECT_EQ(text.substr(0, 6), "RUTH\n\n");
}

TEST(DataFiles, SearchOrderAndErrors) {
  ScratchDir dir;
  write_file(dir.file("kjv_excerpt.txt"), "mine\n");
  {
    const ScopedEnv env("NIBBLE_DATA_DIR", dir.str());
    EXPECT_EQ(default_corpus_path(), fs::path(dir.file("kjv_excerpt.txt")).lexically_normal().string());
    expect_error([] { find_data_file("no_such_file.bin"); }, "cannot find data file no_such_file.bin");
    expect_error([] { find_data_file("no_such_file.bin"); }, dir.str());
  }
}

// ---- IDX files ------------------------------------------------------------------------

TEST(IdxFiles, RawAndGzipLoadTheSameImages) {
  ScratchDir dir;
  const uint32_t n = 37, h = 5, w = 4;
  const std::vector<uint8_t> pixels = random_bytes(n * h * w, 21);
  const std::vector<uint8_t> labels = random_bytes(n, 22, 10);
  write_file(dir.file("img"), idx_bytes({n, h, w}, pixels));
  write_file(dir.file("lab"), idx_bytes({n}, labels));
  write_gz(dir.file("img.gz"), idx_bytes({n, h, w}, pixels));
  write_gz(dir.file("lab.gz"), idx_bytes({n}, labels));
  const ImageDataset raw = ImageDataset::load(dir.file("img"), dir.file("lab"));
  const ImageDataset gz = ImageDataset::load(dir.file("img.gz"), dir.file("lab.gz"));
  for (const ImageDataset* d : {&raw, &gz}) {
    ASSERT_EQ(d->count(), 37);
    EXPECT_EQ(d->height(), 5);
    EXPECT_EQ(d->width(), 4);
    EXPECT_EQ(d->classes(), 1 + *std::max_element(labels.begin(), labels.end()));
    ASSERT_EQ(d->images().size(), pixels.size());
    for (size_t i = 0; i < pixels.size(); ++i)
      ASSERT_EQ(d->images()[i], static_cast<float>(pixels[i]) / 255.0f) << i;  // exact: same op
    for (size_t i = 0; i < labels.size(); ++i) ASSERT_EQ(d->labels()[i], labels[i]);
  }
  const auto [lo, hi] = std::minmax_element(raw.images().begin(), raw.images().end());
  EXPECT_GE(*lo, 0.0f);
  EXPECT_LE(*hi, 1.0f);
  const IdxArray a = read_idx(dir.file("img.gz"), 3);
  EXPECT_EQ(a.dims, (std::vector<int64_t>{37, 5, 4}));
  EXPECT_EQ(a.data, pixels);
}

TEST(IdxFiles, CorruptFilesAreClearErrors) {
  ScratchDir dir;
  const std::vector<uint8_t> pixels = random_bytes(10 * 3 * 3, 31);
  const std::vector<uint8_t> labels = random_bytes(10, 32, 10);
  const std::string images = idx_bytes({10, 3, 3}, pixels);
  const std::string label_file = idx_bytes({10}, labels);
  write_file(dir.file("img"), images);
  write_file(dir.file("lab"), label_file);

  expect_error([&] { read_idx(dir.file("nope.gz"), 3); }, "nope.gz does not exist");
  expect_error([&] { read_idx(dir.str(), 3); }, "is not a regular file");
  // Swapped files: the magic number says which kind each is.
  expect_error([&] { ImageDataset::load(dir.file("lab"), dir.file("img")); }, "are the image and label files swapped?");
  write_file(dir.file("text"), "hello, this is not an IDX file at all");
  expect_error([&] { read_idx(dir.file("text"), 3); }, "wrong magic number");
  write_file(dir.file("float"), be32(0x0D03) + be32(1) + be32(1) + be32(1) + "abcd");
  expect_error([&] { read_idx(dir.file("float"), 3); }, "element type 0xd");
  write_file(dir.file("short"), std::string("\x00\x00", 2));
  expect_error([&] { read_idx(dir.file("short"), 3); }, "too short to be an IDX file (2 bytes)");
  write_file(dir.file("header"), images.substr(0, 10));
  expect_error([&] { read_idx(dir.file("header"), 3); }, "truncated inside its header (dimension 1");
  write_file(dir.file("cut"), images.substr(0, images.size() - 7));
  expect_error([&] { read_idx(dir.file("cut"), 3); }, "promises 90 bytes of data ([10, 3, 3]) but only 83");
  write_file(dir.file("long"), images + "xy");
  expect_error([&] { read_idx(dir.file("long"), 3); }, "has data after the [10, 3, 3] array");
  write_file(dir.file("zero"), idx_bytes({0, 3, 3}, {}));
  expect_error([&] { read_idx(dir.file("zero"), 3); }, "dimension 0 is 0");
  write_file(dir.file("huge"), idx_bytes({1u << 20, 1u << 10, 1u << 10}, {}));
  expect_error([&] { read_idx(dir.file("huge"), 3); }, "more than 4 GiB");

  // A gzip stream cut in the middle, and one whose CRC does not match.
  write_gz(dir.file("img.gz"), images);
  const std::string gz = read_file(dir.file("img.gz"));
  write_file(dir.file("cut.gz"), gz.substr(0, gz.size() / 2));
  expect_error([&] { read_idx(dir.file("cut.gz"), 3); }, "cut.gz");
  std::string bad_crc = gz;
  bad_crc[bad_crc.size() - 6] = static_cast<char>(bad_crc[bad_crc.size() - 6] ^ 0x55);  // CRC32 field
  write_file(dir.file("crc.gz"), bad_crc);
  expect_error([&] { read_idx(dir.file("crc.gz"), 3); }, "corrupt compressed data");

  // Counts that disagree between images and labels.
  write_file(dir.file("lab9"), idx_bytes({9}, random_bytes(9, 33, 10)));
  expect_error([&] { ImageDataset::load(dir.file("img"), dir.file("lab9")); }, "holds 10 images but");
  expect_error([&] { ImageDataset::load(dir.file("img"), dir.file("lab9")); }, "holds 9 labels");
}

TEST(IdxFiles, LoadMnistFindsGzipOrRawNames) {
  ScratchDir dir;
  const std::vector<uint8_t> train_px = random_bytes(12 * 28 * 28, 41);
  const std::vector<uint8_t> test_px = random_bytes(5 * 28 * 28, 42);
  write_gz(dir.file("train-images-idx3-ubyte.gz"), idx_bytes({12, 28, 28}, train_px));
  write_gz(dir.file("train-labels-idx1-ubyte.gz"), idx_bytes({12}, random_bytes(12, 43, 10)));
  write_file(dir.file("t10k-images-idx3-ubyte"), idx_bytes({5, 28, 28}, test_px));
  write_file(dir.file("t10k-labels-idx1-ubyte"), idx_bytes({5}, random_bytes(5, 44, 10)));
  EXPECT_EQ(ImageDataset::load_mnist(dir.str(), "train").count(), 12);
  EXPECT_EQ(ImageDataset::load_mnist(dir.str(), "test").count(), 5);
  expect_error([&] { ImageDataset::load_mnist(dir.str(), "valid"); }, "split 'valid' is unknown");
  expect_error([&] { ImageDataset::load_mnist(dir.file("none"), "train"); }, "does not exist");
  fs::remove(dir.file("t10k-labels-idx1-ubyte"));
  expect_error([&] { ImageDataset::load_mnist(dir.str(), "test"); },
               "neither t10k-labels-idx1-ubyte.gz nor t10k-labels-idx1-ubyte");
}

// ---- image batches and the shuffle -------------------------------------------------------

TEST(ImageData, GatherAndEvalBatchesInFileOrder) {
  const int64_t n = 23;
  const std::vector<uint8_t> px = random_bytes(n * 2 * 3, 51);
  const std::vector<uint8_t> lab = random_bytes(n, 52, 10);
  const ImageDataset d(n, 2, 3, px, lab);
  const std::vector<int64_t> idx = {7, 0, 22, 7};
  const nn::Batch g = d.gather(idx);
  ASSERT_EQ(g.size, 4);
  EXPECT_EQ(g.height, 2);
  EXPECT_EQ(g.width, 3);
  for (size_t r = 0; r < idx.size(); ++r) {
    EXPECT_EQ(g.labels[r], lab[static_cast<size_t>(idx[r])]);
    for (int64_t p = 0; p < 6; ++p)
      EXPECT_EQ(g.images[r * 6 + static_cast<size_t>(p)], d.images()[static_cast<size_t>(idx[r] * 6 + p)]);
  }
  expect_error([&] { d.gather(std::vector<int64_t>{23}); }, "image index 23 is outside [0, 23)");

  ASSERT_EQ(d.eval_batch_count(10), 3);
  std::vector<int32_t> labels;
  for (int64_t i = 0; i < 3; ++i) {
    const nn::Batch b = d.eval_batch(10, i);
    EXPECT_EQ(b.size, i < 2 ? 10 : 3);
    labels.insert(labels.end(), b.labels.begin(), b.labels.end());
  }
  EXPECT_EQ(labels, d.labels());
  expect_error([&] { d.eval_batch(10, 3); }, "evaluation batch 3 is outside [0, 3)");
  expect_error([&] { ImageDataset(3, 2, 3, px, lab); }, "pixel bytes");
  expect_error([&] { ImageDataset(n, 2, 3, px, std::vector<uint8_t>(5)); }, "23 images but 5 labels");
}

TEST(Shuffle, EpochPermutationIsDeterministicAndDiffers) {
  const std::vector<int64_t> p = epoch_permutation(1000, 7, 0);
  std::vector<int64_t> sorted = p;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> ident(1000);
  std::iota(ident.begin(), ident.end(), 0);
  EXPECT_EQ(sorted, ident);
  EXPECT_NE(p, ident);
  EXPECT_EQ(p, epoch_permutation(1000, 7, 0));
  EXPECT_NE(p, epoch_permutation(1000, 7, 1));
  EXPECT_NE(p, epoch_permutation(1000, 8, 0));
  EXPECT_EQ(epoch_permutation(1, 7, 0), std::vector<int64_t>{0});
  expect_error([] { epoch_permutation(0, 7, 0); }, "cannot shuffle 0 items");
}

TEST(Shuffle, EpochPermutationIsUniform) {
  // 8 items over 4,000 epochs (seeds 3 and 4, 2,000 each): each (position, item) cell expects
  // 500 with sd sqrt(500·7/8) = 20.9; the bound is 5 sd = 105.
  std::vector<int64_t> counts(64, 0);
  for (const uint64_t seed : {3u, 4u})
    for (uint32_t e = 0; e < 2000; ++e) {
      const std::vector<int64_t> p = epoch_permutation(8, seed, e);
      for (size_t pos = 0; pos < 8; ++pos) ++counts[pos * 8 + static_cast<size_t>(p[pos])];
    }
  for (size_t c = 0; c < 64; ++c) EXPECT_NEAR(static_cast<double>(counts[c]), 500.0, 105.0) << "cell " << c;
}

TEST(Shuffle, BatchesArePureFunctionsOfTheStep) {
  EpochShuffler s(103, 10, 17);  // 10 batches per epoch, 3 items sit out each epoch
  ASSERT_EQ(s.batches_per_epoch(), 10);
  const std::vector<int64_t> e0 = epoch_permutation(103, 17, 0);
  const std::vector<int64_t> e2 = epoch_permutation(103, 17, 2);
  EXPECT_EQ(s.batch_indices(3), std::vector<int64_t>(e0.begin() + 30, e0.begin() + 40));
  EXPECT_EQ(s.batch_indices(25), std::vector<int64_t>(e2.begin() + 50, e2.begin() + 60));
  // Any call order gives the same batches (resume needs no loader state).
  EpochShuffler fresh(103, 10, 17);
  EXPECT_EQ(fresh.batch_indices(25), s.batch_indices(25));
  EXPECT_EQ(fresh.batch_indices(3), s.batch_indices(3));
  // Within an epoch the batches are disjoint.
  std::set<int64_t> seen;
  for (uint64_t k = 10; k < 20; ++k)
    for (const int64_t i : s.batch_indices(k)) EXPECT_TRUE(seen.insert(i).second) << i;
  EXPECT_EQ(seen.size(), 100u);
  expect_error([] { EpochShuffler(5, 10, 1); }, "fewer than one batch of 10");
}

// ---- real data (skipped where the shared folder is absent) -----------------------------

TEST(ImageData, RealMnist) {
  const fs::path dir = shared_data_dir() / "mnist";
  if (!fs::exists(dir / "train-images-idx3-ubyte.gz")) GTEST_SKIP() << "no MNIST at " << dir;
  const ImageDataset train = ImageDataset::load_mnist(dir.string(), "train");
  const ImageDataset test = ImageDataset::load_mnist(dir.string(), "test");
  EXPECT_EQ(train.count(), 60000);
  EXPECT_EQ(test.count(), 10000);
  EXPECT_EQ(train.height(), 28);
  EXPECT_EQ(train.width(), 28);
  EXPECT_EQ(train.classes(), 10);
  // The published class counts of MNIST's training and test sets.
  const std::vector<int64_t> train_counts = {5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949};
  const std::vector<int64_t> test_counts = {980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009};
  std::vector<int64_t> tc(10, 0), ec(10, 0);
  for (const int32_t l : train.labels()) ++tc[static_cast<size_t>(l)];
  for (const int32_t l : test.labels()) ++ec[static_cast<size_t>(l)];
  EXPECT_EQ(tc, train_counts);
  EXPECT_EQ(ec, test_counts);
  EXPECT_EQ(train.labels()[0], 5);
  EXPECT_EQ(test.labels()[0], 7);
  const auto [lo, hi] = std::minmax_element(train.images().begin(), train.images().end());
  EXPECT_EQ(*lo, 0.0f);
  EXPECT_EQ(*hi, 1.0f);
}

TEST(ImageData, RealFashionMnistIfInstalled) {
  const fs::path dir = "/usr/share/datasets/fashion-mnist";
  if (!fs::exists(dir / "t10k-images-idx3-ubyte.gz"))
    GTEST_SKIP() << "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)";
  const ImageDataset test = ImageDataset::load_mnist(dir.string(), "test");
  EXPECT_EQ(test.count(), 10000);
  std::vector<int64_t> counts(10, 0);
  for (const int32_t l : test.labels()) ++counts[static_cast<size_t>(l)];
  EXPECT_EQ(counts, std::vector<int64_t>(10, 1000));  // Fashion-MNIST is balanced
}
