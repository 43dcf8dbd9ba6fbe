#pragma once
// Training data: text corpora for the GPT, MNIST-style IDX image sets for the ViT.
//
// Every training batch is a pure function of (seed, step): nothing about the data stream has
// to be saved in a checkpoint, and resuming at step k draws exactly the batch a straight run
// would have drawn. The random numbers come from the counter-based Philox of
// include/nibble/rng.h under RngRole::data, so they never overlap the model's streams:
//   text window offsets of step k:   PhiloxKey{seed, k, layer 0, RngRole::data}
//   image shuffle of epoch e:        PhiloxKey{seed, e, layer 1, RngRole::data}
// Evaluation batches are fixed (no randomness) so that validation losses of different runs
// and precisions are measured on the same tokens or images.
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "nibble/nn.h"
#include "train/tokenizer.h"

namespace nibble::train {

// ---- files ----------------------------------------------------------------------------

// The whole file as bytes; throws nibble::Error if it is missing, not a regular file,
// unreadable or empty.
std::string read_text_file(const std::string& path);

// The built-in default corpus of `make demo` (data/kjv_excerpt.txt: six books of the King
// James Bible, public domain; see data/README.md). Looked for, in order, in $NIBBLE_DATA_DIR,
// next to the running executable (<exe dir>/data, <exe dir>/../data,
// <exe dir>/../share/nibble/data) and in the source tree the library was built from. Throws,
// listing the places tried, if it is in none.
std::string default_corpus_path();
// Same search for any file name under data/.
std::string find_data_file(const std::string& name);

// ---- text -----------------------------------------------------------------------------

class TextDataset {
 public:
  // Splits `tokens` (ids in [0, vocab)): the last floor(n · valid_fraction) tokens are the
  // validation split, the rest the training split. valid_fraction is in [0, 1).
  TextDataset(std::vector<int32_t> tokens, int64_t vocab, double valid_fraction = 0.1);
  // Encodes `text` with `tokenizer` (the GPT-2 tokenizer first checks it is UTF-8) and splits.
  static TextDataset from_text(std::string_view text, const Tokenizer& tokenizer,
                               double valid_fraction = 0.1);
  // read_text_file(path), then from_text; errors name the file.
  static TextDataset load(const std::string& path, const Tokenizer& tokenizer,
                          double valid_fraction = 0.1);

  int64_t vocab() const { return vocab_; }
  const std::vector<int32_t>& train_tokens() const { return train_; }
  const std::vector<int32_t>& valid_tokens() const { return valid_; }

  // Training batch number `step`: `batch` windows of seq+1 consecutive training tokens,
  // window b starting at offset u_b mod (n_train - seq), where u_b is the 64-bit number made of
  // Philox words 2b and 2b+1 of {seed, step, 0, data}. tokens = the first seq tokens of each
  // window, targets = the last seq (the next token of each input).
  nn::Batch train_batch(int64_t batch, int64_t seq, uint64_t seed, uint32_t step) const;

  // The validation set: windows of seq+1 tokens starting at 0, seq, 2·seq, ... (every
  // validation token is a target once), all that fit, or `max_windows` of them spread evenly
  // over the split when max_windows > 0; grouped in order into batches of `batch` (the last
  // one may be smaller).
  std::vector<nn::Batch> valid_batches(int64_t batch, int64_t seq, int64_t max_windows = 0) const;
  // How many windows valid_batches(…, seq, 0) uses.
  int64_t valid_window_count(int64_t seq) const;

 private:
  std::vector<int32_t> train_, valid_;
  int64_t vocab_ = 0;
};

// ---- images (MNIST, Fashion-MNIST: the IDX format) -------------------------------------

// An IDX file of unsigned bytes: magic 0x00 0x00 0x08 <ndims>, ndims big-endian uint32
// sizes, then the bytes in row-major order. gzip-compressed or raw (zlib reads both).
struct IdxArray {
  std::vector<int64_t> dims;
  std::vector<uint8_t> data;
};
// Reads an IDX file with `expected_dims` dimensions (3 for images, magic 2051; 1 for labels,
// magic 2049). Throws on a missing file, a wrong magic number, a truncated file or bytes
// after the end of the array.
IdxArray read_idx(const std::string& path, int expected_dims);

class ImageDataset {
 public:
  // Reads an image file (magic 2051, [count, height, width]) and a label file (magic 2049,
  // [count]) and checks that the counts agree. Pixels become floats p/255 in [0, 1].
  static ImageDataset load(const std::string& images_path, const std::string& labels_path);
  // The MNIST file names in `dir`: train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]
  // (split "train") or t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] (split
  // "test"). Fashion-MNIST uses the same names.
  static ImageDataset load_mnist(const std::string& dir, const std::string& split);
  // From memory: `pixels` [count, height, width] bytes, `labels` [count].
  ImageDataset(int64_t count, int64_t height, int64_t width, std::vector<uint8_t> pixels,
               std::vector<uint8_t> labels);

  int64_t count() const { return count_; }
  int64_t height() const { return height_; }
  int64_t width() const { return width_; }
  int64_t classes() const { return classes_; }  // largest label + 1
  const std::vector<float>& images() const { return images_; }  // [count, height, width]
  const std::vector<int32_t>& labels() const { return labels_; }

  // The images and labels at `indices`, in that order.
  nn::Batch gather(std::span<const int64_t> indices) const;
  // Evaluation: every image once, in file order, `batch` at a time (the last batch may be
  // smaller). eval_batch_count = ceil(count / batch).
  int64_t eval_batch_count(int64_t batch) const;
  nn::Batch eval_batch(int64_t batch, int64_t index) const;

 private:
  ImageDataset() = default;
  int64_t count_ = 0, height_ = 0, width_ = 0, classes_ = 0;
  std::vector<float> images_;
  std::vector<int32_t> labels_;
};

// Training order for a set of `count` items: epoch e visits the items in the order of a
// Fisher-Yates shuffle keyed by (seed, e); each epoch has floor(count / batch) full batches
// and the last count mod batch items of that epoch's order sit it out (a different set every
// epoch). Step k is batch k mod batches_per_epoch() of epoch k / batches_per_epoch(), so
// batch_indices(k) is a pure function of (count, batch, seed, k); the object only caches the
// current epoch's order.
class EpochShuffler {
 public:
  EpochShuffler(int64_t count, int64_t batch, uint64_t seed);
  int64_t batches_per_epoch() const { return count_ / batch_; }
  std::vector<int64_t> batch_indices(uint64_t step);

 private:
  int64_t count_, batch_;
  uint64_t seed_;
  int64_t cached_epoch_ = -1;
  std::vector<int64_t> order_;
};

// The permutation of 0..count-1 for epoch `epoch`: for i = count-1 down to 1, swap i with
// j = u_i mod (i+1), u_i the 64-bit number made of Philox words 2i and 2i+1 of
// {seed, epoch, 1, data}.
std::vector<int64_t> epoch_permutation(int64_t count, uint64_t seed, uint32_t epoch);

}  // namespace nibble::train
