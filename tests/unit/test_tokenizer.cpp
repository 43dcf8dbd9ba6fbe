// Tokenizers: the character tokenizer (vocabulary, round trips, checkpoint form, clear
// errors) and GPT-2's byte-level BPE (exact ids against an independent reference, the
// pre-tokenizer's pieces, UTF-8 checks, round trips, corrupt vocabulary files).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>

#include "nibble/error.h"
#include "nibble/rng.h"
#include "train/tokenizer.h"

using namespace nibble;
using namespace nibble::train;
namespace fs = std::filesystem;

namespace {

// Expects `fn` to throw nibble::Error whose message contains `needle`.
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

// The shared data folder: $NIBBLE_SOURCE_DIR/../shared/data (CTest sets NIBBLE_SOURCE_DIR to
// the repository root), else ../shared/data from the working directory.
fs::path shared_data_dir() {
  const char* src = std::getenv("NIBBLE_SOURCE_DIR");
  return (src != nullptr ? fs::path(src) : fs::current_path()) / ".." / "shared" / "data";
}

fs::path scratch_dir(const std::string& tag) {
  const fs::path p = fs::temp_directory_path() /
                     ("nibble_tok_" + std::to_string(::getpid()) + "_" + tag);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Random bytes drawn from `alphabet` (Philox, role data).
std::string random_text(const std::string& alphabet, size_t n, uint64_t seed) {
  std::string s(n, '\0');
  const PhiloxKey key{seed, 0, 0, RngRole::data};
  for (size_t i = 0; i < n; ++i) s[i] = alphabet[philox_u32(key, i) % alphabet.size()];
  return s;
}

}  // namespace

// ---- CharTokenizer ---------------------------------------------------------------------

TEST(CharTokenizer, VocabularyIsTheSortedSetOfBytes) {
  const CharTokenizer tok = CharTokenizer::from_text("hello, world\nhello!");
  EXPECT_EQ(tok.bytes(), std::string("\n !,dehlorw"));
  EXPECT_EQ(tok.vocab_size(), 11);
  EXPECT_EQ(tok.kind(), "char");
  const std::vector<int32_t> ids = tok.encode("hello");
  EXPECT_EQ(ids, (std::vector<int32_t>{6, 5, 7, 7, 8}));
}

TEST(CharTokenizer, RoundTripsRandomText) {
  // Every byte value, including NUL, '\\', 0x7f and UTF-8 lead/continuation bytes.
  std::string all(256, '\0');
  for (int b = 0; b < 256; ++b) all[static_cast<size_t>(b)] = static_cast<char>(b);
  for (const uint64_t seed : {11u, 12u, 13u}) {
    const std::string text = random_text(all.substr(seed * 7 % 64, 150), 5000, seed);
    const CharTokenizer tok = CharTokenizer::from_text(text);
    const std::vector<int32_t> ids = tok.encode(text);
    ASSERT_EQ(ids.size(), text.size());
    for (const int32_t id : ids) ASSERT_TRUE(id >= 0 && id < tok.vocab_size());
    EXPECT_EQ(tok.decode(ids), text);
  }
}

TEST(CharTokenizer, CheckpointStringRestoresTheVocabulary) {
  const std::string text = "Caf\xc3\xa6 \\ \"q\"\t\x01\x7f\xff end";
  const CharTokenizer tok = CharTokenizer::from_text(text);
  const std::string saved = tok.to_string();
  // Printable ASCII except the backslash, so it can go into JSON as is.
  for (const char c : saved) EXPECT_TRUE(c >= 0x20 && c <= 0x7e) << int(c);
  EXPECT_EQ(saved, "\\x01\\x09 \"C\\x5cadefnq\\x7f\\xa6\\xc3\\xff");
  const CharTokenizer back = CharTokenizer::from_string(saved);
  EXPECT_EQ(back.bytes(), tok.bytes());
  EXPECT_EQ(back.encode(text), tok.encode(text));
  const std::unique_ptr<Tokenizer> made = make_tokenizer("char", tok.state());
  EXPECT_EQ(made->encode(text), tok.encode(text));
  EXPECT_EQ(made->vocab_size(), tok.vocab_size());
}

TEST(CharTokenizer, UnknownCharacterIsAClearError) {
  const CharTokenizer tok = CharTokenizer::from_text("abc ");
  expect_error([&] { tok.encode("cab d"); }, "character 'd' (byte 0x64) at byte offset 4");
  expect_error([&] { tok.encode("a\xc3\xa9"); }, "(byte 0xc3) at byte offset 1");
  expect_error([&] { tok.decode(std::vector<int32_t>{0, 4}); }, "token id 4 at position 1");
  expect_error([&] { tok.decode(std::vector<int32_t>{-1}); }, "token id -1");
}

TEST(CharTokenizer, BadInputsAreRejected) {
  expect_error([] { CharTokenizer::from_text(""); }, "empty text");
  expect_error([] { CharTokenizer::from_string(""); }, "empty");
  expect_error([] { CharTokenizer::from_string("ba"); }, "not strictly increasing");
  expect_error([] { CharTokenizer::from_string("aa"); }, "not strictly increasing");
  expect_error([] { CharTokenizer::from_string("a\\x4"); }, "bad escape at position 1");
  expect_error([] { CharTokenizer::from_string("a\\q00"); }, "bad escape");
  expect_error([] { make_tokenizer("words", ""); }, "unknown tokenizer kind 'words'");
}

// ---- GPT-2 byte-level BPE -------------------------------------------------------------

namespace {

struct BpeCase {
  const char* text;
  std::vector<int32_t> ids;
};

// Expected ids produced by scripts/gpt2_bpe_reference.py, an independent Python implementation
// of GPT-2's encoder (bytes_to_unicode, GPT-2's regular expression with the `regex` module,
// merge ranks from vocab.bpe), run on ../shared/data/gpt2-bpe. Its output was also checked
// against OpenAI's tiktoken 0.14.0 built from the same two files (whose SHA-256 equal the ones
// tiktoken pins for "gpt2"): identical ids for all these strings and for the whole of
// tinyshakespeare. By hand from encoder.json: "Hello" = 15496, "\u0120world" = 995, "," = 11,
// "!" = 0, "\u0120" = 220, "\u010a" = 198.
const std::vector<BpeCase>& bpe_cases() {
  static const std::vector<BpeCase> cases = {
    {"Hello", {15496}},
    {" world", {995}},
    {"Hello, world!", {15496, 11, 995, 0}},
    {"The quick brown fox jumps over the lazy dog.", {464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13}},
    {"I'm sure they'll say it's what we'd've done; You'RE right, 'tis true.", {40, 1101, 1654, 484, 1183, 910, 340, 338, 644, 356, 1549, 1053, 1760, 26, 921, 6, 2200, 826, 11, 705, 48010, 2081, 13}},
    {"Numbers: 0, 42, 1234567, 3.14159 and -7e10.", {49601, 25, 657, 11, 5433, 11, 17031, 2231, 3134, 11, 513, 13, 1415, 19707, 290, 532, 22, 68, 940, 13}},
    {"   three leading spaces and two  inside", {220, 220, 1115, 3756, 9029, 290, 734, 220, 2641}},
    {"trailing spaces   ", {9535, 4386, 9029, 220, 220, 220}},
    {"line one\x0aline two\x0a\x0a\x09indented\x0d\x0a", {1370, 530, 198, 1370, 734, 628, 197, 521, 4714, 201, 198}},
    {"punctuation!!! ?!? ... (brackets) [x] {y} <z> @#$%^&*", {79, 16260, 2288, 10185, 5633, 22857, 2644, 357, 1671, 25180, 8, 685, 87, 60, 1391, 88, 92, 1279, 89, 29, 2488, 29953, 4, 61, 5, 9}},
    {"caf\xc3\xa9 na\xc3\xafve fa\xc3\xa7" "ade \xc3\x85ngstr\xc3\xb6m", {66, 1878, 2634, 41492, 24685, 16175, 671, 6184, 227, 782, 2536, 9101, 76}},
    {"\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\xe3\x81\xae\xe3\x83\x86\xe3\x82\xad\xe3\x82\xb9\xe3\x83\x88", {33768, 98, 17312, 105, 45739, 252, 5641, 24336, 25084, 43302}},
    {"\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82, \xd0\xbc\xd0\xb8\xd1\x80! \xce\x95\xce\xbb\xce\xbb\xce\xb7\xce\xbd\xce\xb9\xce\xba\xce\xac", {140, 253, 21169, 18849, 38857, 16843, 20375, 11, 12466, 120, 18849, 21169, 0, 7377, 243, 39377, 39377, 138, 115, 26180, 29945, 43000, 138, 105}},
    {"emoji \xf0\x9f\x98\x80\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd and \xe2\x9c\xa8 sparkles", {368, 31370, 30325, 222, 41840, 235, 8582, 237, 121, 290, 14519, 101, 9009, 829}},
    {"mixed123abc 4you \xc2\xb2\xc2\xb3 \xc2\xbd", {76, 2966, 10163, 39305, 604, 5832, 1587, 110, 126, 111, 25208}},
    {"a\xc2\xa0non-breaking space", {64, 1849, 13159, 12, 13395, 2272}},
    {"tabs\x09\x09" "and\xe3\x80\x80ideographic space", {8658, 82, 197, 197, 392, 5099, 222, 485, 6826, 2272}},
    {"<|endoftext|>", {27, 91, 437, 1659, 5239, 91, 29}},
    {"URLs like https://example.com/path?q=1&r=2", {21886, 82, 588, 3740, 1378, 20688, 13, 785, 14, 6978, 30, 80, 28, 16, 5, 81, 28, 17}},
    {"\xc3\x9cn\xc3\xaf" "c\xc3\xb6" "d\xc3\xa9 \xe1\xba\x9etra\xc3\x9f" "e \xe2\x80\x94 \xe2\x80\x9cquoted\xe2\x80\x9d \xe2\x80\x98text\xe2\x80\x99 \xe2\x80\xa6", {127, 250, 77, 26884, 66, 9101, 67, 2634, 28053, 118, 252, 9535, 39683, 68, 851, 564, 250, 421, 5191, 447, 251, 564, 246, 5239, 447, 247, 3926}},
    {" ", {220}},
    {"\x0a\x0a\x0a", {628, 198}},
    {"x  \x0a  y", {87, 220, 220, 198, 220, 331}},
  };
  return cases;
}

}  // namespace

class Gpt2Bpe : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = (shared_data_dir() / "gpt2-bpe").lexically_normal().string();
    if (fs::exists(fs::path(dir_) / "encoder.json") && fs::exists(fs::path(dir_) / "vocab.bpe"))
      tok_ = std::make_unique<Gpt2BpeTokenizer>(Gpt2BpeTokenizer::load(dir_));
  }
  static void TearDownTestSuite() { tok_.reset(); }
  void SetUp() override {
    if (!tok_) GTEST_SKIP() << "GPT-2 vocabulary not found in " << dir_
                            << " (encoder.json, vocab.bpe); set NIBBLE_SOURCE_DIR to the repository";
  }
  static inline std::string dir_;
  static inline std::unique_ptr<Gpt2BpeTokenizer> tok_;
};

TEST_F(Gpt2Bpe, VocabularyShape) {
  EXPECT_EQ(tok_->vocab_size(), 50257);
  EXPECT_EQ(tok_->end_of_text(), 50256);
  EXPECT_EQ(tok_->kind(), "gpt2");
  EXPECT_EQ(tok_->token_bytes(15496), "Hello");
  EXPECT_EQ(tok_->token_bytes(995), " world");
  EXPECT_EQ(tok_->token_bytes(198), "\n");
  EXPECT_EQ(tok_->token_bytes(50256), "<|endoftext|>");
  expect_error([&] { tok_->token_bytes(50257); }, "outside the GPT-2 vocabulary");
}

TEST_F(Gpt2Bpe, MatchesReferenceIds) {
  ASSERT_EQ(bpe_cases().size(), 23u);
  for (const BpeCase& c : bpe_cases()) {
    EXPECT_EQ(tok_->encode(c.text), c.ids) << "text: \"" << c.text << "\"";
    EXPECT_EQ(tok_->decode(c.ids), c.text);
  }
}

TEST_F(Gpt2Bpe, MatchesReferenceOnTinyShakespeare) {
  const fs::path path = shared_data_dir() / "tinyshakespeare" / "input.txt";
  if (!fs::exists(path)) GTEST_SKIP() << path << " not found";
  std::ifstream f(path, std::ios::binary);
  const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  ASSERT_EQ(text.size(), 1115394u);
  const std::vector<int32_t> ids = tok_->encode(text);
  // Count, first ids and FNV-1a-64 of the ids (h ^= id; h *= 0x100000001b3) from
  // scripts/gpt2_bpe_reference.py on the same file (tiktoken gives the same ids).
  ASSERT_EQ(ids.size(), 338025u);
  EXPECT_EQ(std::vector<int32_t>(ids.begin(), ids.begin() + 12),
            (std::vector<int32_t>{5962, 22307, 25, 198, 8421, 356, 5120, 597, 2252, 11, 3285, 502}));
  uint64_t h = 0xcbf29ce484222325ull;
  for (const int32_t id : ids) h = (h ^ static_cast<uint64_t>(id)) * 0x100000001b3ull;
  EXPECT_EQ(h, 0xb547ad363c19676eull);
  EXPECT_EQ(tok_->decode(ids), text);
}

TEST(Gpt2Pretokenizer, PiecesFollowGpt2Regex) {
  using Pieces = std::vector<std::string_view>;
  // Contractions are lower-case only and start a piece; a lone apostrophe is punctuation.
  EXPECT_EQ(Gpt2BpeTokenizer::pretokenize("I'm we'll 'tis X'S"),
            (Pieces{"I", "'m", " we", "'ll", " '", "tis", " X", "'", "S"}));
  // A whitespace run gives its last character to the next word; at the end it stays whole.
  EXPECT_EQ(Gpt2BpeTokenizer::pretokenize("a   b\n\n c  "),
            (Pieces{"a", "  ", " b", "\n\n", " c", "  "}));
  EXPECT_EQ(Gpt2BpeTokenizer::pretokenize("\t\tx \ny"), (Pieces{"\t", "\t", "x", " ", "\n", "y"}));
  // Letters, numbers and other characters form separate runs; only an ASCII space is taken
  // as the optional leading space (U+00A0 and U+3000 are whitespace on their own).
  EXPECT_EQ(Gpt2BpeTokenizer::pretokenize(" caf\xc3\xa9" "123 \xc2\xbd!? \xe6\x97\xa5\xe6\x9c\xac" "a"),
            (Pieces{" caf\xc3\xa9", "123", " \xc2\xbd", "!?", " \xe6\x97\xa5\xe6\x9c\xac" "a"}));
  EXPECT_EQ(Gpt2BpeTokenizer::pretokenize("x\xc2\xa0y\xe3\x80\x80z"),
            (Pieces{"x", "\xc2\xa0", "y", "\xe3\x80\x80", "z"}));
  // Greek, Cyrillic, Latin Extended letters; superscript digits and Roman numerals are \p{N};
  // emoji and combining marks are neither letters nor numbers.
  EXPECT_EQ(Gpt2BpeTokenizer::pretokenize("\xce\xb1\xce\xb2 \xd0\xb6\xc5\x91 x\xc2\xb2\xe2\x85\xa2"),
            (Pieces{"\xce\xb1\xce\xb2", " \xd0\xb6\xc5\x91", " x", "\xc2\xb2\xe2\x85\xa2"}));
  EXPECT_EQ(Gpt2BpeTokenizer::pretokenize("e\xcc\x81 \xf0\x9f\x98\x80\xf0\x9f\x91\x8d"),
            (Pieces{"e", "\xcc\x81", " \xf0\x9f\x98\x80\xf0\x9f\x91\x8d"}));
  EXPECT_TRUE(Gpt2BpeTokenizer::pretokenize("").empty());
}

TEST_F(Gpt2Bpe, RoundTripsRandomUnicode) {
  // Pieces of many classes: ASCII, whitespace kinds, Latin-1, Greek, CJK, emoji, digits.
  const std::vector<std::string> atoms = {
      "a", "Z", "q", " ", " ", "  ", "\n", "\t", "\r\n", "'", "'s", "7", "42", ".", "!?", "-",
      "\xc3\xa9", "\xc3\x9f", "\xce\xbb", "\xd0\x96", "\xe6\x97\xa5", "\xe3\x81\xae",
      "\xf0\x9f\x98\x80", "\xc2\xa0", "\xe3\x80\x80", "\xc2\xbd", "\xe2\x80\x94"};
  for (const uint64_t seed : {101u, 102u, 103u, 104u}) {
    const PhiloxKey key{seed, 0, 0, RngRole::data};
    std::string text;
    for (uint64_t i = 0; i < 3000; ++i) text += atoms[philox_u32(key, i) % atoms.size()];
    const std::vector<int32_t> ids = tok_->encode(text);
    EXPECT_LT(ids.size(), 3000u * 3);
    EXPECT_EQ(tok_->decode(ids), text) << "seed " << seed;
    // Pieces tile the text exactly.
    std::string joined;
    for (const std::string_view p : Gpt2BpeTokenizer::pretokenize(text)) joined += p;
    EXPECT_EQ(joined, text);
  }
}

TEST_F(Gpt2Bpe, RejectsInvalidUtf8AndIds) {
  expect_error([&] { tok_->encode("ok \xc0\xaf"); }, "byte 3 (0xc0)");          // overlong '/'
  expect_error([&] { tok_->encode("\xed\xa0\x80"); }, "byte 0 (0xed)");         // surrogate
  expect_error([&] { tok_->encode("ab\xe6\x97"); }, "byte 2 (0xe6)");           // cut short
  expect_error([&] { tok_->encode("\x80"); }, "byte 0 (0x80)");                 // continuation
  expect_error([&] { tok_->encode("x\xf4\x90\x80\x80"); }, "byte 1 (0xf4)");    // > U+10FFFF
  expect_error([&] { tok_->encode("\xff"); }, "not valid UTF-8");
  expect_error([&] { tok_->decode(std::vector<int32_t>{15496, 50257}); }, "token id 50257 at position 1");
  expect_error([&] { tok_->decode(std::vector<int32_t>{-3}); }, "token id -3");
}

TEST_F(Gpt2Bpe, RebuildsFromState) {
  const std::unique_ptr<Tokenizer> made = make_tokenizer("gpt2", tok_->state());
  EXPECT_EQ(made->encode("Hello, world!"), (std::vector<int32_t>{15496, 11, 995, 0}));
}

TEST(Gpt2BpeFiles, CorruptFilesAreClearErrors) {
  const fs::path dir = scratch_dir("corrupt");
  expect_error([&] { Gpt2BpeTokenizer::load((dir / "nowhere").string()); }, "does not exist");
  expect_error([&] { Gpt2BpeTokenizer::load(dir.string()); }, "encoder.json does not exist");

  // A toy vocabulary: the 256 byte tokens spelled in bytes_to_unicode's alphabet, plus "ab".
  std::string encoder = "{";
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    const int cp = printable ? b : 256 + extra++;
    std::string utf8;
    if (cp < 0x80) utf8 = std::string(1, static_cast<char>(cp));
    else {
      utf8 += static_cast<char>(0xC0 | (cp >> 6));
      utf8 += static_cast<char>(0x80 | (cp & 0x3F));
    }
    if (utf8 == "\"" || utf8 == "\\") utf8 = "\\" + utf8;
    encoder += "\"" + utf8 + "\": " + std::to_string(b) + ", ";
  }
  encoder += "\"ab\": 256, \"abb\": 257}";
  write_file(dir / "encoder.json", encoder);
  write_file(dir / "vocab.bpe", "#version: 0.2\na b\nab b\n");
  const Gpt2BpeTokenizer toy = Gpt2BpeTokenizer::load(dir.string());
  EXPECT_EQ(toy.vocab_size(), 258);
  EXPECT_EQ(toy.end_of_text(), -1);
  // "abab abb": pieces "abab", " abb"; merges a+b (rank 0) then ab+b (rank 1).
  EXPECT_EQ(toy.encode("abab abb"), (std::vector<int32_t>{256, 256, ' ', 257}));

  write_file(dir / "vocab.bpe", "#version: 0.2\na b\nab c\n");
  expect_error([&] { Gpt2BpeTokenizer::load(dir.string()); }, "line 3");
  write_file(dir / "vocab.bpe", "#version: 0.2\nab\n");
  expect_error([&] { Gpt2BpeTokenizer::load(dir.string()); }, "is not a merge");
  write_file(dir / "vocab.bpe", "#version: 0.2\n");
  expect_error([&] { Gpt2BpeTokenizer::load(dir.string()); }, "holds no merges");
  write_file(dir / "encoder.json", "{\"a\": 0,");
  expect_error([&] { Gpt2BpeTokenizer::load(dir.string()); }, "is not valid JSON");
  write_file(dir / "encoder.json", "{\"a\": 0, \"b\": 1}");
  expect_error([&] { Gpt2BpeTokenizer::load(dir.string()); }, "has no token for byte 0x00");
  write_file(dir / "encoder.json", "{\"a\": 0, \"b\": 0}");
  expect_error([&] { Gpt2BpeTokenizer::load(dir.string()); }, "out of range or repeated");
  write_file(dir / "encoder.json", "[1, 2]");
  expect_error([&] { Gpt2BpeTokenizer::load(dir.string()); }, "is not a JSON object");
  fs::remove_all(dir);
}
