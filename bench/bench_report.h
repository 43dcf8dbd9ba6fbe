#pragma once
// Small host helpers shared by the benchmarks: shape lists, the UTC date, the commit.
#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <sstream>
#include <string>
#include <vector>

#include "nibble/error.h"

// NIBBLE_GIT_COMMIT: written at build time into the build tree (cmake/write_git_commit.cmake)
#if __has_include("nibble_git_commit.h")
#include "nibble_git_commit.h"
#endif
#ifndef NIBBLE_GIT_COMMIT
#define NIBBLE_GIT_COMMIT "unknown"
#endif

namespace nibble::bench {

struct Shape {
  int64_t m = 0, n = 0, k = 0;
};

// "MxNxK,MxNxK,..." -> shapes; throws on anything else.
inline std::vector<Shape> parse_shapes(const std::string& arg) {
  std::vector<Shape> out;
  std::stringstream ss(arg);
  std::string item;
  while (std::getline(ss, item, ',')) {
    Shape s{};
    char x1 = 0, x2 = 0;
    std::stringstream is(item);
    NB_CHECK((is >> s.m >> x1 >> s.n >> x2 >> s.k) && x1 == 'x' && x2 == 'x' && s.m > 0 &&
                 s.n > 0 && s.k > 0,
             "--shapes: cannot parse '" << item << "'; write MxNxK with positive sizes, e.g. "
                                           "8192x8192x8192");
    out.push_back(s);
  }
  NB_CHECK(!out.empty(), "--shapes: no shape given; write MxNxK,MxNxK,...");
  return out;
}

inline std::string shape_label(const Shape& s) {
  return std::to_string(s.m) + "x" + std::to_string(s.n) + "x" + std::to_string(s.k);
}

inline std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  return buf;
}

// The commit the binary was built from ("+dirty": with uncommitted changes to tracked files);
// NIBBLE_GIT_COMMIT in the environment overrides it.
inline std::string git_commit() {
  const char* env = std::getenv("NIBBLE_GIT_COMMIT");
  return env ? env : NIBBLE_GIT_COMMIT;
}

}  // namespace nibble::bench
