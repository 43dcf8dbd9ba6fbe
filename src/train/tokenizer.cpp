#include "train/tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "nibble/error.h"
#include "train/unicode_tables.h"

namespace nibble::train {

namespace {

constexpr const char* kHexDigits = "0123456789abcdef";

std::string hex_byte(unsigned char b) {
  return std::string("0x") + kHexDigits[b >> 4] + kHexDigits[b & 15];
}

// Decodes the UTF-8 sequence at text[pos]; returns its length in bytes (1-4) and the code
// point, or 0 if the bytes there are not a valid, shortest-form sequence.
size_t decode_utf8(std::string_view text, size_t pos, uint32_t* cp) {
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char b0 = byte(pos);
  size_t len;
  uint32_t value, min_value;
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  } else if ((b0 & 0xE0) == 0xC0) {
    len = 2, value = b0 & 0x1Fu, min_value = 0x80;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3, value = b0 & 0x0Fu, min_value = 0x800;
  } else if ((b0 & 0xF8) == 0xF0) {
    len = 4, value = b0 & 0x07u, min_value = 0x10000;
  } else {
    return 0;  // a continuation byte or 0xF8-0xFF where a sequence should start
  }
  if (pos + len > text.size()) return 0;
  for (size_t i = 1; i < len; ++i) {
    const unsigned char b = byte(pos + i);
    if ((b & 0xC0) != 0x80) return 0;
    value = (value << 6) | (b & 0x3Fu);
  }
  if (value < min_value || value > 0x10FFFF || (value >= 0xD800 && value <= 0xDFFF)) return 0;
  *cp = value;
  return len;
}

bool in_table(uint32_t cp, std::span<const unicode::CodeRange> table) {
  // First range whose end is >= cp; the ranges are sorted and disjoint.
  const auto it = std::lower_bound(table.begin(), table.end(), cp,
                                   [](const unicode::CodeRange& r, uint32_t c) { return r.last < c; });
  return it != table.end() && it->first <= cp;
}

enum class CharClass : uint8_t { letter, number, space, other };

CharClass classify(uint32_t cp) {
  if (cp < 0x80) {  // ASCII without the tables: the overwhelmingly common case
    if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z') return CharClass::letter;
    if (cp >= '0' && cp <= '9') return CharClass::number;
    if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D)) return CharClass::space;
    return CharClass::other;
  }
  if (in_table(cp, unicode::kLetter)) return CharClass::letter;
  if (in_table(cp, unicode::kNumber)) return CharClass::number;
  if (in_table(cp, unicode::kWhiteSpace)) return CharClass::space;
  return CharClass::other;
}

// GPT-2's bytes_to_unicode: the 188 bytes that are printable Latin-1 characters ('!'..'~',
// 0xA1..0xAC, 0xAE..0xFF) map to that code point; the other 68 (controls, space, 0x7F-0xA0,
// the soft hyphen 0xAD) map to U+0100, U+0101, ... in byte order. encoder.json spells every
// token's bytes in this alphabet (a space is "Ġ" = U+0120).
std::array<uint32_t, 256> bytes_to_unicode() {
  std::array<uint32_t, 256> table{};
  uint32_t next_extra = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    table[b] = printable ? b : next_extra++;
  }
  return table;
}

std::string read_whole_file(const std::string& path, const char* what) {
  NB_CHECK(std::filesystem::exists(path),
           what << " " << path << " does not exist; pass the folder that holds GPT-2's encoder.json "
                   "and vocab.bpe");
  std::ifstream in(path, std::ios::binary);
  NB_CHECK(in, "cannot open " << what << " " << path << "; check its permissions");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

void check_utf8(std::string_view text, const std::string& what) {
  size_t pos = 0;
  while (pos < text.size()) {
    uint32_t cp;
    const size_t len = decode_utf8(text, pos, &cp);
    NB_CHECK(len > 0, what << " is not valid UTF-8: byte " << pos << " ("
                           << hex_byte(static_cast<unsigned char>(text[pos]))
                           << ") does not start a valid character; convert the text to UTF-8 "
                              "(e.g. iconv -f latin1 -t utf-8) or use the character tokenizer");
    pos += len;
  }
}

// ---- CharTokenizer ------------------------------------------------------------------

CharTokenizer::CharTokenizer(std::string sorted_bytes) : bytes_(std::move(sorted_bytes)) {
  id_of_byte_.fill(-1);
  for (size_t i = 0; i < bytes_.size(); ++i)
    id_of_byte_[static_cast<unsigned char>(bytes_[i])] = static_cast<int32_t>(i);
}

CharTokenizer CharTokenizer::from_text(std::string_view text) {
  NB_CHECK(!text.empty(), "cannot build a character vocabulary from empty text; pass the "
                          "training text");
  std::array<bool, 256> seen{};
  for (const char c : text) seen[static_cast<unsigned char>(c)] = true;
  std::string bytes;
  for (int b = 0; b < 256; ++b)
    if (seen[static_cast<size_t>(b)]) bytes += static_cast<char>(b);
  return CharTokenizer(std::move(bytes));
}

std::string CharTokenizer::to_string() const {
  std::string out;
  for (const char c : bytes_) {
    const auto b = static_cast<unsigned char>(c);
    if (b >= 0x20 && b <= 0x7E && b != '\\') {
      out += c;
    } else {
      out += "\\x";
      out += kHexDigits[b >> 4];
      out += kHexDigits[b & 15];
    }
  }
  return out;
}

CharTokenizer CharTokenizer::from_string(std::string_view vocabulary) {
  const auto hex_value = [](char h) -> int {
    if (h >= '0' && h <= '9') return h - '0';
    if (h >= 'a' && h <= 'f') return h - 'a' + 10;
    if (h >= 'A' && h <= 'F') return h - 'A' + 10;
    return -1;
  };
  std::string bytes;
  for (size_t i = 0; i < vocabulary.size();) {
    if (vocabulary[i] == '\\') {
      const bool ok = i + 3 < vocabulary.size() && vocabulary[i + 1] == 'x' &&
                      hex_value(vocabulary[i + 2]) >= 0 && hex_value(vocabulary[i + 3]) >= 0;
      NB_CHECK(ok, "character vocabulary '" << vocabulary << "' has a bad escape at position " << i
                                            << "; write bytes outside 0x20-0x7e and '\\' as \\xHH");
      bytes += static_cast<char>(hex_value(vocabulary[i + 2]) * 16 + hex_value(vocabulary[i + 3]));
      i += 4;
    } else {
      bytes += vocabulary[i];
      i += 1;
    }
  }
  NB_CHECK(!bytes.empty(), "character vocabulary is empty; a checkpoint's tokenizer state must "
                           "list at least one byte");
  for (size_t i = 1; i < bytes.size(); ++i)
    NB_CHECK(static_cast<unsigned char>(bytes[i - 1]) < static_cast<unsigned char>(bytes[i]),
             "character vocabulary '" << vocabulary << "' is not strictly increasing at byte " << i
                                      << "; it must be the sorted set of bytes written by "
                                         "CharTokenizer::to_string()");
  return CharTokenizer(std::move(bytes));
}

std::vector<int32_t> CharTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    const auto b = static_cast<unsigned char>(text[i]);
    const int32_t id = id_of_byte_[b];
    if (id < 0) {
      const std::string shown = (b >= 0x20 && b <= 0x7E) ? std::string("'") + text[i] + "' " : "";
      NB_FAIL("character " << shown << "(byte " << hex_byte(b) << ") at byte offset " << i
                           << " is not in the vocabulary of " << bytes_.size()
                           << " characters learned from the training text; use a text whose "
                              "characters the model was trained on");
    }
    ids[i] = id;
  }
  return ids;
}

std::string CharTokenizer::decode(std::span<const int32_t> ids) const {
  std::string out(ids.size(), '\0');
  for (size_t i = 0; i < ids.size(); ++i) {
    NB_CHECK(ids[i] >= 0 && ids[i] < vocab_size(),
             "token id " << ids[i] << " at position " << i << " is outside the character vocabulary "
                         << "[0, " << vocab_size() << "); was it made by another tokenizer?");
    out[i] = bytes_[static_cast<size_t>(ids[i])];
  }
  return out;
}

// ---- Gpt2BpeTokenizer ---------------------------------------------------------------

Gpt2BpeTokenizer Gpt2BpeTokenizer::load(const std::string& dir) {
  NB_CHECK(std::filesystem::is_directory(dir),
           "GPT-2 BPE folder " << dir << " does not exist; pass the folder that holds encoder.json "
                               "and vocab.bpe");
  Gpt2BpeTokenizer tok((std::filesystem::path(dir) / "encoder.json").string(),
                       (std::filesystem::path(dir) / "vocab.bpe").string());
  tok.dir_ = dir;
  return tok;
}

Gpt2BpeTokenizer::Gpt2BpeTokenizer(const std::string& encoder_json_path,
                                   const std::string& vocab_bpe_path)
    : dir_(std::filesystem::path(encoder_json_path).parent_path().string()) {
  // Token strings in encoder.json are spelled in bytes_to_unicode's alphabet; map that
  // alphabet back to raw bytes so that BPE runs on bytes and decode is concatenation.
  const std::array<uint32_t, 256> b2u = bytes_to_unicode();
  std::unordered_map<uint32_t, unsigned char> u2b;
  for (uint32_t b = 0; b < 256; ++b) u2b[b2u[b]] = static_cast<unsigned char>(b);
  // A token spelled in that alphabet -> its raw bytes; false if it has another character.
  const auto unspell = [&u2b](std::string_view spelled, std::string& bytes) {
    bytes.clear();
    for (size_t pos = 0; pos < spelled.size();) {
      uint32_t cp = 0;
      const size_t len = decode_utf8(spelled, pos, &cp);
      const auto it = len > 0 ? u2b.find(cp) : u2b.end();
      if (it == u2b.end()) return false;
      bytes += static_cast<char>(it->second);
      pos += len;
    }
    return true;
  };

  nlohmann::json encoder;
  try {
    encoder = nlohmann::json::parse(read_whole_file(encoder_json_path, "GPT-2 encoder.json"));
  } catch (const nlohmann::json::exception& e) {
    NB_FAIL(encoder_json_path << " is not valid JSON (" << e.what()
                              << "); use GPT-2's encoder.json");
  }
  NB_CHECK(encoder.is_object() && !encoder.empty(),
           encoder_json_path << " is not a JSON object of token -> id; use GPT-2's encoder.json");

  token_bytes_.assign(encoder.size(), std::string());
  std::vector<bool> assigned(encoder.size(), false);
  std::unordered_map<std::string, int32_t> id_of_bytes;
  id_of_bytes.reserve(encoder.size());
  for (const auto& [token, value] : encoder.items()) {
    NB_CHECK(value.is_number_integer(),
             encoder_json_path << ": the id of token \"" << token << "\" is not an integer");
    const int64_t id = value.get<int64_t>();
    NB_CHECK(id >= 0 && id < static_cast<int64_t>(encoder.size()) && !assigned[static_cast<size_t>(id)],
             encoder_json_path << ": token \"" << token << "\" has id " << id
                               << ", which is out of range or repeated; ids must be 0.."
                               << encoder.size() - 1 << ", each once");
    assigned[static_cast<size_t>(id)] = true;
    std::string bytes;
    NB_CHECK(unspell(token, bytes), encoder_json_path << ": token \"" << token
                                                      << "\" has a character outside GPT-2's "
                                                         "byte alphabet; use GPT-2's encoder.json");
    NB_CHECK(id_of_bytes.emplace(bytes, static_cast<int32_t>(id)).second,
             encoder_json_path << ": two tokens stand for the same bytes as \"" << token << "\"");
    token_bytes_[static_cast<size_t>(id)] = std::move(bytes);
  }
  end_of_text_ = id_of_bytes.count("<|endoftext|>") ? id_of_bytes.at("<|endoftext|>") : -1;
  for (int b = 0; b < 256; ++b) {
    const auto it = id_of_bytes.find(std::string(1, static_cast<char>(b)));
    NB_CHECK(it != id_of_bytes.end(), encoder_json_path << " has no token for byte "
                                                        << hex_byte(static_cast<unsigned char>(b))
                                                        << "; byte-level BPE needs all 256");
    byte_token_[static_cast<size_t>(b)] = it->second;
  }

  // vocab.bpe: a "#version" line, then one merge "left right" per line, in rank order.
  const std::string merges_text = read_whole_file(vocab_bpe_path, "GPT-2 vocab.bpe");
  std::istringstream lines(merges_text);
  std::string line;
  int64_t line_no = 0;
  int32_t rank = 0;
  std::string bytes;
  const auto token_id = [&](std::string_view spelled, bool& ok) -> int32_t {
    ok = unspell(spelled, bytes);
    const auto found = ok ? id_of_bytes.find(bytes) : id_of_bytes.end();
    ok = found != id_of_bytes.end();
    return ok ? found->second : -1;
  };
  while (std::getline(lines, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
    const size_t space = line.find(' ');
    NB_CHECK(space != std::string::npos && space > 0 && space + 1 < line.size() &&
                 line.find(' ', space + 1) == std::string::npos,
             vocab_bpe_path << " line " << line_no << " is not a merge \"left right\": \"" << line
                            << "\"; use GPT-2's vocab.bpe");
    bool ok_left = false, ok_right = false, ok_merged = false;
    const int32_t left = token_id(std::string_view(line).substr(0, space), ok_left);
    const int32_t right = token_id(std::string_view(line).substr(space + 1), ok_right);
    const int32_t merged =
        token_id(line.substr(0, space) + line.substr(space + 1), ok_merged);
    NB_CHECK(ok_left && ok_right && ok_merged,
             vocab_bpe_path << " line " << line_no << " (\"" << line
                            << "\") names a token that encoder.json lacks; the two files must "
                               "come from the same GPT-2 vocabulary");
    const uint64_t key = (static_cast<uint64_t>(left) << 32) | static_cast<uint32_t>(right);
    // A repeated pair keeps its first (lowest) rank, as a rank table built line by line would.
    merges_.emplace(key, Merge{rank, merged});
    ++rank;
  }
  NB_CHECK(!merges_.empty(), vocab_bpe_path << " holds no merges; use GPT-2's vocab.bpe");
}

const std::string& Gpt2BpeTokenizer::token_bytes(int32_t id) const {
  NB_CHECK(id >= 0 && id < vocab_size(),
           "token id " << id << " is outside the GPT-2 vocabulary [0, " << vocab_size() << ")");
  return token_bytes_[static_cast<size_t>(id)];
}

std::vector<std::string_view> Gpt2BpeTokenizer::pretokenize(std::string_view text) {
  check_utf8(text, "text for the GPT-2 tokenizer");
  // Code points with their byte offsets; offsets[n] = text.size().
  std::vector<uint32_t> cps;
  std::vector<size_t> offsets;
  cps.reserve(text.size());
  offsets.reserve(text.size() + 1);
  for (size_t pos = 0; pos < text.size();) {
    uint32_t cp = 0;
    const size_t len = decode_utf8(text, pos, &cp);
    cps.push_back(cp);
    offsets.push_back(pos);
    pos += len;
  }
  offsets.push_back(text.size());
  std::vector<CharClass> cls(cps.size());
  for (size_t i = 0; i < cps.size(); ++i) cls[i] = classify(cps[i]);

  const size_t n = cps.size();
  std::vector<std::string_view> pieces;
  size_t i = 0;
  // The end of the run of class c starting at j.
  const auto run_end = [&](size_t j, CharClass c) {
    while (j < n && cls[j] == c) ++j;
    return j;
  };
  while (i < n) {
    size_t end = i;
    const uint32_t c = cps[i];
    // 's|'t|'re|'ve|'m|'ll|'d  (case-sensitive, tried first at every position)
    if (c == '\'' && i + 1 < n) {
      const uint32_t c1 = cps[i + 1];
      const uint32_t c2 = i + 2 < n ? cps[i + 2] : 0;
      if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd')
        end = i + 2;
      else if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l'))
        end = i + 3;
    }
    if (end == i) {
      // ` ?X+` for X = \p{L}, \p{N}, [^\s\p{L}\p{N}]: an optional ASCII space, then a run of one
      // class. A space followed by whitespace (or the end) falls through to the \s rules.
      const size_t start = (c == ' ' && i + 1 < n) ? i + 1 : i;
      if (cls[start] != CharClass::space) {
        end = run_end(start, cls[start]);
      } else {
        // \s+(?!\S): the whitespace run, less its last character when a non-space follows
        // (that one then joins the next piece as its optional space, or stands alone);
        // \s+: a single whitespace character before a non-space.
        const size_t ws_end = run_end(i, CharClass::space);
        end = (ws_end == n || ws_end - i == 1) ? ws_end : ws_end - 1;
      }
    }
    pieces.push_back(text.substr(offsets[i], offsets[end] - offsets[i]));
    i = end;
  }
  return pieces;
}

void Gpt2BpeTokenizer::encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
  std::vector<int32_t> symbols(piece.size());
  for (size_t i = 0; i < piece.size(); ++i)
    symbols[i] = byte_token_[static_cast<unsigned char>(piece[i])];
  std::vector<int32_t> next;
  next.reserve(symbols.size());
  const auto pair_key = [](int32_t a, int32_t b) {
    return (static_cast<uint64_t>(a) << 32) | static_cast<uint32_t>(b);
  };
  while (symbols.size() > 1) {
    // The adjacent pair of lowest rank ...
    const Merge* best = nullptr;
    uint64_t best_key = 0;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      const auto it = merges_.find(pair_key(symbols[i], symbols[i + 1]));
      if (it != merges_.end() && (best == nullptr || it->second.rank < best->rank)) {
        best = &it->second;
        best_key = it->first;
      }
    }
    if (best == nullptr) break;
    // ... is merged wherever it occurs, scanning left to right without overlaps (so "aaa"
    // with the merge "a a" becomes "aa a").
    next.clear();
    for (size_t i = 0; i < symbols.size();) {
      if (i + 1 < symbols.size() && pair_key(symbols[i], symbols[i + 1]) == best_key) {
        next.push_back(best->merged);
        i += 2;
      } else {
        next.push_back(symbols[i]);
        i += 1;
      }
    }
    symbols.swap(next);
  }
  out.insert(out.end(), symbols.begin(), symbols.end());
}

std::vector<int32_t> Gpt2BpeTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 1);
  // Words repeat a lot in real text; a cache local to this call keeps encode() const and
  // safe to call from several threads.
  std::unordered_map<std::string_view, std::pair<size_t, size_t>> seen;  // piece -> ids span
  for (const std::string_view piece : pretokenize(text)) {
    const auto it = seen.find(piece);
    if (it != seen.end()) {
      const auto [first, count] = it->second;
      for (size_t k = 0; k < count; ++k) {
        const int32_t id = ids[first + k];
        ids.push_back(id);
      }
      continue;
    }
    const size_t first = ids.size();
    encode_piece(piece, ids);
    seen.emplace(piece, std::make_pair(first, ids.size() - first));
  }
  return ids;
}

std::string Gpt2BpeTokenizer::decode(std::span<const int32_t> ids) const {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) {
    NB_CHECK(ids[i] >= 0 && ids[i] < vocab_size(),
             "token id " << ids[i] << " at position " << i << " is outside the GPT-2 vocabulary [0, "
                         << vocab_size() << "); was it made by another tokenizer?");
    out += token_bytes_[static_cast<size_t>(ids[i])];
  }
  return out;
}

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& kind, const std::string& state) {
  if (kind == "char") return std::make_unique<CharTokenizer>(CharTokenizer::from_string(state));
  if (kind == "gpt2") return std::make_unique<Gpt2BpeTokenizer>(Gpt2BpeTokenizer::load(state));
  NB_FAIL("unknown tokenizer kind '" << kind << "'; use 'char' or 'gpt2'");
}

}  // namespace nibble::train
