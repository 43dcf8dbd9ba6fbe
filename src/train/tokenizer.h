#pragma once
// Tokenizers for the GPT trainer: text (UTF-8 bytes) <-> token ids.
//
// CharTokenizer: one token per byte value seen in the training text, ids in byte order. For
// ASCII text (tinyshakespeare) that is one token per character; a multi-byte UTF-8 character
// becomes several tokens, and decoding restores the exact bytes.
//
// Gpt2BpeTokenizer: GPT-2's byte-level BPE read from its encoder.json and vocab.bpe. It
// reproduces GPT-2's tokenization: pre-tokenization by GPT-2's regular expression
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// (matched by hand over code points; \p{L}, \p{N} and \s from full Unicode tables generated
// from the Python `regex` module, see src/train/unicode_tables.h), then the merges of
// vocab.bpe applied to each pre-token's UTF-8 bytes, lowest rank first. "<|endoftext|>" in
// the text is encoded as ordinary text (as GPT-2's own encoder does); append
// end_of_text() yourself where a document boundary is wanted.
// Limits: the Unicode tables are those of the `regex` module that generated them (see the
// header); a character assigned in a later Unicode version counts as "other" punctuation.
// Text must be valid UTF-8 (GPT-2 works on Python strings, which cannot hold invalid bytes).
// BPE of one pre-token is quadratic in its length, as in GPT-2: a megabyte without a space
// or letter/number boundary is slow.
#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace nibble::train {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::string kind() const = 0;  // "char" or "gpt2"
  virtual int64_t vocab_size() const = 0;
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // The bytes of the tokens, concatenated. May end inside a UTF-8 character when the ids
  // were cut at an arbitrary place (sampling); the caller decides how to print that.
  virtual std::string decode(std::span<const int32_t> ids) const = 0;
  // What a checkpoint stores to rebuild this tokenizer with make_tokenizer(kind(), state()):
  // CharTokenizer: its vocabulary (to_string()); Gpt2BpeTokenizer: the folder it was read from.
  virtual std::string state() const = 0;
};

// Rebuilds a tokenizer from Tokenizer::kind() and Tokenizer::state().
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& kind, const std::string& state);

class CharTokenizer final : public Tokenizer {
 public:
  // The vocabulary is the sorted set of byte values in `text` (which must not be empty).
  static CharTokenizer from_text(std::string_view text);
  // Inverse of to_string().
  static CharTokenizer from_string(std::string_view vocabulary);

  std::string kind() const override { return "char"; }
  int64_t vocab_size() const override { return static_cast<int64_t>(bytes_.size()); }
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(std::span<const int32_t> ids) const override;
  std::string state() const override { return to_string(); }

  // The vocabulary as printable ASCII, ids in order: bytes 0x20-0x7e other than '\' stand
  // for themselves, every other byte is written \xHH (lower-case hex). Safe in JSON.
  std::string to_string() const;
  // The vocabulary's bytes; token id i is byte bytes()[i].
  const std::string& bytes() const { return bytes_; }

 private:
  explicit CharTokenizer(std::string sorted_bytes);
  std::string bytes_;
  std::array<int32_t, 256> id_of_byte_{};  // -1 where the byte is not in the vocabulary
};

class Gpt2BpeTokenizer final : public Tokenizer {
 public:
  // Reads `dir`/encoder.json and `dir`/vocab.bpe.
  static Gpt2BpeTokenizer load(const std::string& dir);
  Gpt2BpeTokenizer(const std::string& encoder_json_path, const std::string& vocab_bpe_path);

  std::string kind() const override { return "gpt2"; }
  int64_t vocab_size() const override { return static_cast<int64_t>(token_bytes_.size()); }
  // Throws nibble::Error naming the byte offset if `text` is not valid UTF-8.
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(std::span<const int32_t> ids) const override;
  std::string state() const override { return dir_; }

  // The id of "<|endoftext|>" (50256 in GPT-2's vocabulary).
  int32_t end_of_text() const { return end_of_text_; }
  // The raw bytes token `id` stands for.
  const std::string& token_bytes(int32_t id) const;

  // GPT-2's pre-tokenization of UTF-8 text into pieces (their concatenation is `text`).
  static std::vector<std::string_view> pretokenize(std::string_view text);

 private:
  // BPE of one pre-token: its bytes' tokens merged pair by pair, lowest rank first.
  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const;

  struct Merge {
    int32_t rank;
    int32_t merged;  // the id of the concatenated token
  };
  std::string dir_;
  std::vector<std::string> token_bytes_;  // id -> raw bytes
  std::array<int32_t, 256> byte_token_{};  // byte -> id of its one-byte token
  std::unordered_map<uint64_t, Merge> merges_;  // (left id << 32 | right id) -> merge
  int32_t end_of_text_ = -1;
};

// Checks that `text` is valid UTF-8 (no overlong forms, surrogates or code points above
// U+10FFFF); throws nibble::Error naming `what` and the first bad byte offset.
void check_utf8(std::string_view text, const std::string& what);

}  // namespace nibble::train
