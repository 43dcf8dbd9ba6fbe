#include "train/data.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "nibble/error.h"
#include "nibble/rng.h"

namespace nibble::train {

namespace fs = std::filesystem;

namespace {

// Philox streams of the data layer (the `layer` field of the key, under RngRole::data).
constexpr uint32_t kTextOffsetStream = 0;
constexpr uint32_t kShuffleStream = 1;

// A uniform 64-bit number from Philox words 2i and 2i+1 of `key`. Reduced mod m (< 2^40 for
// any data set here) its bias is below m / 2^64, far under anything a training run could see;
// a single 32-bit word would be biased by up to m / 2^32 (1e-4 for a 1M-token corpus).
uint64_t philox_u64(const PhiloxKey& key, uint64_t i) {
  return (static_cast<uint64_t>(philox_u32(key, 2 * i)) << 32) | philox_u32(key, 2 * i + 1);
}

void check_batch_shape(int64_t batch, int64_t seq) {
  NB_CHECK(batch > 0, "batch size " << batch << " must be positive");
  NB_CHECK(seq > 0, "sequence length " << seq << " must be positive");
}

}  // namespace

// ---- files ----------------------------------------------------------------------------

std::string read_text_file(const std::string& path) {
  std::error_code ec;
  NB_CHECK(fs::exists(path, ec), "text file " << path << " does not exist; check the path "
                                                         "(--data) or omit it for the built-in "
                                                         "default corpus");
  NB_CHECK(fs::is_regular_file(path, ec),
           "text file " << path << " is not a regular file (a folder?); pass a UTF-8 text file");
  std::ifstream in(path, std::ios::binary);
  NB_CHECK(in, "cannot open text file " << path << ": " << std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  NB_CHECK(!in.bad(), "reading text file " << path << " failed");
  std::string text = ss.str();
  NB_CHECK(!text.empty(), "text file " << path << " is empty; a corpus needs text to train on");
  return text;
}

std::string find_data_file(const std::string& name) {
  std::vector<fs::path> dirs;
  if (const char* env = std::getenv("NIBBLE_DATA_DIR"); env != nullptr && *env != '\0')
    dirs.emplace_back(env);
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const fs::path exe_dir = exe.parent_path();
    dirs.push_back(exe_dir / "data");
    dirs.push_back(exe_dir / ".." / "data");
    dirs.push_back(exe_dir / ".." / "share" / "nibble" / "data");
  }
#ifdef NIBBLE_SOURCE_DIR
  dirs.push_back(fs::path(NIBBLE_SOURCE_DIR) / "data");
#endif
  std::string found, tried;
  for (const fs::path& dir : dirs) {
    const std::string candidate = (dir / name).lexically_normal().string();
    if (fs::is_regular_file(candidate, ec)) {
      found = candidate;
      break;
    }
    tried += (tried.empty() ? "" : ", ") + candidate;
  }
  NB_CHECK(!found.empty(), "cannot find data file " << name << " (looked in: " << tried
                                                    << "); set NIBBLE_DATA_DIR to the "
                                                       "repository's data/ folder");
  return found;
}

std::string default_corpus_path() { return find_data_file("kjv_excerpt.txt"); }

// ---- text -----------------------------------------------------------------------------

TextDataset::TextDataset(std::vector<int32_t> tokens, int64_t vocab, double valid_fraction)
    : vocab_(vocab) {
  NB_CHECK(vocab > 0, "vocabulary size " << vocab << " must be positive");
  NB_CHECK(valid_fraction >= 0.0 && valid_fraction < 1.0,
           "validation fraction " << valid_fraction << " must be in [0, 1), e.g. 0.1");
  NB_CHECK(!tokens.empty(), "the corpus has no tokens; pass a non-empty text");
  for (size_t i = 0; i < tokens.size(); ++i)
    NB_CHECK(tokens[i] >= 0 && tokens[i] < vocab,
             "token " << i << " has id " << tokens[i] << ", outside the vocabulary [0, " << vocab
                      << "); encode the text with the tokenizer whose vocabulary size you pass");
  const auto n = static_cast<int64_t>(tokens.size());
  const auto n_valid = static_cast<int64_t>(static_cast<double>(n) * valid_fraction);
  valid_.assign(tokens.end() - n_valid, tokens.end());
  tokens.resize(static_cast<size_t>(n - n_valid));
  train_ = std::move(tokens);
}

TextDataset TextDataset::from_text(std::string_view text, const Tokenizer& tokenizer,
                                   double valid_fraction) {
  return TextDataset(tokenizer.encode(text), tokenizer.vocab_size(), valid_fraction);
}

TextDataset TextDataset::load(const std::string& path, const Tokenizer& tokenizer,
                              double valid_fraction) {
  const std::string text = read_text_file(path);
  if (tokenizer.kind() == "gpt2") check_utf8(text, "text file " + path);
  try {
    return from_text(text, tokenizer, valid_fraction);
  } catch (const Error& e) {
    // Say which file; the inner message keeps its own source location.
    std::string inner = e.what();
    if (inner.rfind("nibble: ", 0) == 0) inner.erase(0, 8);
    throw Error("nibble: text file " + path + ": " + inner);
  }
}

nn::Batch TextDataset::train_batch(int64_t batch, int64_t seq, uint64_t seed, uint32_t step) const {
  check_batch_shape(batch, seq);
  const auto n = static_cast<int64_t>(train_.size());
  NB_CHECK(n > seq, "the training split has " << n << " tokens, too few for one window of "
                                              << seq + 1 << " (sequence length + 1); use a "
                                                 "longer text or a shorter context");
  const auto starts = static_cast<uint64_t>(n - seq);  // window start s needs s + seq < n
  const PhiloxKey key{seed, step, kTextOffsetStream, RngRole::data};
  nn::Batch out;
  out.size = batch;
  out.seq = seq;
  out.tokens.resize(static_cast<size_t>(batch * seq));
  out.targets.resize(static_cast<size_t>(batch * seq));
  for (int64_t b = 0; b < batch; ++b) {
    const auto start = static_cast<int64_t>(philox_u64(key, static_cast<uint64_t>(b)) % starts);
    const int32_t* window = train_.data() + start;
    std::copy(window, window + seq, out.tokens.begin() + b * seq);
    std::copy(window + 1, window + seq + 1, out.targets.begin() + b * seq);
  }
  return out;
}

int64_t TextDataset::valid_window_count(int64_t seq) const {
  NB_CHECK(seq > 0, "sequence length " << seq << " must be positive");
  const auto n = static_cast<int64_t>(valid_.size());
  // Window w covers tokens [w·seq, w·seq + seq]; it fits if w·seq + seq < n.
  return n > seq ? (n - 1) / seq : 0;
}

std::vector<nn::Batch> TextDataset::valid_batches(int64_t batch, int64_t seq,
                                                  int64_t max_windows) const {
  check_batch_shape(batch, seq);
  NB_CHECK(max_windows >= 0, "max_windows " << max_windows << " must be >= 0 (0 = all)");
  const int64_t all = valid_window_count(seq);
  NB_CHECK(all > 0, "the validation split has " << valid_.size() << " tokens, too few for one "
                                                << "window of " << seq + 1 << "; raise the "
                                                   "validation fraction or use a longer text");
  const int64_t used = max_windows > 0 ? std::min(max_windows, all) : all;
  std::vector<nn::Batch> batches;
  for (int64_t first = 0; first < used; first += batch) {
    const int64_t rows = std::min(batch, used - first);
    nn::Batch out;
    out.size = rows;
    out.seq = seq;
    out.tokens.resize(static_cast<size_t>(rows * seq));
    out.targets.resize(static_cast<size_t>(rows * seq));
    for (int64_t r = 0; r < rows; ++r) {
      // Window k of `used` evenly spread over the `all` windows: w = floor(k·all / used).
      const int64_t w = (first + r) * all / used;
      const int32_t* window = valid_.data() + w * seq;
      std::copy(window, window + seq, out.tokens.begin() + r * seq);
      std::copy(window + 1, window + seq + 1, out.targets.begin() + r * seq);
    }
    batches.push_back(std::move(out));
  }
  return batches;
}

// ---- IDX files --------------------------------------------------------------------------

namespace {

// A zlib file handle closed on scope exit. gzopen reads raw files as they are, so one path
// serves both .gz and uncompressed IDX files.
struct GzFile {
  gzFile f = nullptr;
  explicit GzFile(const std::string& path) : f(gzopen(path.c_str(), "rb")) {}
  GzFile(const GzFile&) = delete;
  GzFile& operator=(const GzFile&) = delete;
  ~GzFile() {
    if (f != nullptr) gzclose(f);
  }
};

// Reads up to n bytes; returns how many were read (< n only at the end of the data).
size_t gz_read(GzFile& file, void* buf, size_t n, const std::string& path) {
  auto* p = static_cast<unsigned char*>(buf);
  size_t done = 0;
  while (done < n) {
    // gzread takes an unsigned count: read in 1 GiB pieces.
    const auto want = static_cast<unsigned>(std::min<size_t>(n - done, size_t{1} << 30));
    const int got = gzread(file.f, p + done, want);
    if (got < 0) {
      int code = 0;
      const char* msg = gzerror(file.f, &code);
      NB_FAIL(path << ": corrupt compressed data after " << done << " bytes of its contents ("
                   << (msg != nullptr ? msg : "zlib error") << "); download the file again");
    }
    if (got == 0) break;
    done += static_cast<size_t>(got);
  }
  return done;
}

uint32_t big_endian_u32(const unsigned char* b) {
  return (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | uint32_t{b[3]};
}

const char* idx_kind(int dims) {
  return dims == 3 ? "image file (magic 2051)" : dims == 1 ? "label file (magic 2049)" : "IDX file";
}

}  // namespace

IdxArray read_idx(const std::string& path, int expected_dims) {
  NB_CHECK(expected_dims >= 1 && expected_dims <= 4,
           "IDX arrays here have 1 to 4 dimensions, not " << expected_dims);
  std::error_code ec;
  NB_CHECK(fs::exists(path, ec), "IDX file " << path << " does not exist; pass the folder with "
                                                     "the MNIST files (train-images-idx3-ubyte.gz, ...)");
  NB_CHECK(fs::is_regular_file(path, ec), "IDX file " << path << " is not a regular file");
  GzFile file(path);
  NB_CHECK(file.f != nullptr, "cannot open IDX file " << path << ": " << std::strerror(errno));

  unsigned char magic[4];
  const size_t got_magic = gz_read(file, magic, 4, path);
  NB_CHECK(got_magic == 4, path << " is too short to be an IDX file (" << got_magic
                                << " bytes); expected an MNIST " << idx_kind(expected_dims));
  const uint32_t magic_value = big_endian_u32(magic);
  const uint32_t expected_magic = 0x0800u | static_cast<uint32_t>(expected_dims);
  if (magic_value != expected_magic) {
    std::ostringstream hint;
    if (magic_value == 0x0803 || magic_value == 0x0801)
      hint << "it is an IDX " << idx_kind(static_cast<int>(magic_value & 0xFF))
           << "; are the image and label files swapped?";
    else if (magic[0] == 0 && magic[1] == 0 && magic[2] != 0x08)
      hint << "its element type 0x" << std::hex << int{magic[2]} << std::dec
           << " is not unsigned byte (0x08), the only type MNIST uses";
    else
      hint << "it is not an IDX file";
    NB_FAIL(path << ": wrong magic number " << magic_value << " (0x" << std::hex << magic_value
                 << std::dec << ") for an MNIST " << idx_kind(expected_dims) << "; " << hint.str());
  }

  IdxArray out;
  uint64_t total = 1;
  // A corrupt header could claim terabytes; real IDX sets are far below 4 GiB.
  constexpr uint64_t kMaxBytes = uint64_t{1} << 32;
  for (int d = 0; d < expected_dims; ++d) {
    unsigned char size_bytes[4];
    NB_CHECK(gz_read(file, size_bytes, 4, path) == 4,
             path << " is truncated inside its header (dimension " << d << " of "
                  << expected_dims << "); download the file again");
    const uint32_t size = big_endian_u32(size_bytes);
    NB_CHECK(size > 0, path << ": dimension " << d << " is 0; the file holds no data");
    total *= size;
    NB_CHECK(total <= kMaxBytes, path << ": header sizes multiply to more than 4 GiB; the "
                                         "header is corrupt");
    out.dims.push_back(static_cast<int64_t>(size));
  }
  out.data.resize(static_cast<size_t>(total));
  const size_t got = gz_read(file, out.data.data(), out.data.size(), path);
  NB_CHECK(got == out.data.size(),
           path << " is truncated: its header promises " << total << " bytes of data ("
                << shape_str(out.dims) << ") but only " << got << " follow; download the file "
                                                                   "again");
  unsigned char extra;
  NB_CHECK(gz_read(file, &extra, 1, path) == 0,
           path << " has data after the " << shape_str(out.dims)
                << " array its header describes; the header's sizes are wrong or the file is "
                   "not one IDX array");
  return out;
}

// ---- images ---------------------------------------------------------------------------

ImageDataset::ImageDataset(int64_t count, int64_t height, int64_t width,
                           std::vector<uint8_t> pixels, std::vector<uint8_t> labels)
    : count_(count), height_(height), width_(width) {
  NB_CHECK(count > 0 && height > 0 && width > 0,
           "image set of " << count << " images of " << height << "x" << width
                           << " is empty; every size must be positive");
  NB_CHECK(static_cast<int64_t>(pixels.size()) == count * height * width,
           "image set has " << pixels.size() << " pixel bytes, expected " << count << "·" << height
                            << "·" << width << " = " << count * height * width);
  NB_CHECK(static_cast<int64_t>(labels.size()) == count,
           "image set has " << count << " images but " << labels.size()
                            << " labels; the image and label files must come from the same split");
  images_.resize(pixels.size());
  for (size_t i = 0; i < pixels.size(); ++i) images_[i] = static_cast<float>(pixels[i]) / 255.0f;
  labels_.assign(labels.begin(), labels.end());
  classes_ = 1 + *std::max_element(labels_.begin(), labels_.end());
}

ImageDataset ImageDataset::load(const std::string& images_path, const std::string& labels_path) {
  IdxArray images = read_idx(images_path, 3);
  IdxArray labels = read_idx(labels_path, 1);
  NB_CHECK(images.dims[0] == labels.dims[0],
           images_path << " holds " << images.dims[0] << " images but " << labels_path << " holds "
                       << labels.dims[0] << " labels; use the image and label files of one split");
  return ImageDataset(images.dims[0], images.dims[1], images.dims[2], std::move(images.data),
                      std::move(labels.data));
}

ImageDataset ImageDataset::load_mnist(const std::string& dir, const std::string& split) {
  NB_CHECK(split == "train" || split == "test",
           "MNIST split '" << split << "' is unknown; use 'train' or 'test'");
  std::error_code ec;
  NB_CHECK(fs::is_directory(dir, ec),
           "MNIST folder " << dir << " does not exist; pass the folder holding "
                                     "train-images-idx3-ubyte.gz and its siblings");
  const std::string prefix = split == "train" ? "train" : "t10k";
  // The .gz file if present, else the uncompressed one.
  const auto pick = [&](const std::string& stem) {
    const fs::path gz = fs::path(dir) / (stem + ".gz");
    const fs::path raw = fs::path(dir) / stem;
    if (fs::is_regular_file(gz, ec)) return gz.string();
    NB_CHECK(fs::is_regular_file(raw, ec),
             "MNIST folder " << dir << " has neither " << gz.filename().string() << " nor "
                             << raw.filename().string() << "; it needs the " << split
                             << " images and labels in IDX format");
    return raw.string();
  };
  return load(pick(prefix + "-images-idx3-ubyte"), pick(prefix + "-labels-idx1-ubyte"));
}

nn::Batch ImageDataset::gather(std::span<const int64_t> indices) const {
  NB_CHECK(!indices.empty(), "an image batch needs at least one index");
  const int64_t pixels = height_ * width_;
  nn::Batch out;
  out.size = static_cast<int64_t>(indices.size());
  out.height = height_;
  out.width = width_;
  out.images.resize(indices.size() * static_cast<size_t>(pixels));
  out.labels.resize(indices.size());
  for (size_t r = 0; r < indices.size(); ++r) {
    const int64_t i = indices[r];
    NB_CHECK(i >= 0 && i < count_, "image index " << i << " is outside [0, " << count_ << ")");
    std::copy(images_.begin() + i * pixels, images_.begin() + (i + 1) * pixels,
              out.images.begin() + static_cast<int64_t>(r) * pixels);
    out.labels[r] = labels_[static_cast<size_t>(i)];
  }
  return out;
}

int64_t ImageDataset::eval_batch_count(int64_t batch) const {
  NB_CHECK(batch > 0, "batch size " << batch << " must be positive");
  return (count_ + batch - 1) / batch;
}

nn::Batch ImageDataset::eval_batch(int64_t batch, int64_t index) const {
  const int64_t n_batches = eval_batch_count(batch);
  NB_CHECK(index >= 0 && index < n_batches,
           "evaluation batch " << index << " is outside [0, " << n_batches << ")");
  const int64_t first = index * batch;
  const int64_t rows = std::min(batch, count_ - first);
  std::vector<int64_t> indices(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) indices[static_cast<size_t>(r)] = first + r;
  return gather(indices);
}

// ---- shuffling --------------------------------------------------------------------------

std::vector<int64_t> epoch_permutation(int64_t count, uint64_t seed, uint32_t epoch) {
  NB_CHECK(count > 0, "cannot shuffle " << count << " items");
  std::vector<int64_t> order(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) order[static_cast<size_t>(i)] = i;
  const PhiloxKey key{seed, epoch, kShuffleStream, RngRole::data};
  for (int64_t i = count - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(philox_u64(key, static_cast<uint64_t>(i)) %
                                        static_cast<uint64_t>(i + 1));
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(j)]);
  }
  return order;
}

EpochShuffler::EpochShuffler(int64_t count, int64_t batch, uint64_t seed)
    : count_(count), batch_(batch), seed_(seed) {
  NB_CHECK(batch > 0, "batch size " << batch << " must be positive");
  NB_CHECK(count >= batch, "the training set has " << count << " items, fewer than one batch of "
                                                   << batch << "; use a smaller batch");
}

std::vector<int64_t> EpochShuffler::batch_indices(uint64_t step) {
  const auto per_epoch = static_cast<uint64_t>(batches_per_epoch());
  const uint64_t epoch = step / per_epoch;
  NB_CHECK(epoch <= std::numeric_limits<uint32_t>::max(),
           "step " << step << " is past epoch 2^32; the shuffle key holds 32-bit epochs");
  if (static_cast<int64_t>(epoch) != cached_epoch_) {
    order_ = epoch_permutation(count_, seed_, static_cast<uint32_t>(epoch));
    cached_epoch_ = static_cast<int64_t>(epoch);
  }
  const auto first = static_cast<int64_t>(step % per_epoch) * batch_;
  return std::vector<int64_t>(order_.begin() + first, order_.begin() + first + batch_);
}

}  // namespace nibble::train
