#include "nibble/error.h"

#include <cstring>

namespace nibble::detail {

void throw_error(const char* file, int line, const std::string& msg) {
  // Keep only the path below src/ or tools/ so messages stay short and stable.
  const char* short_file = file;
  for (const char* marker : {"src/", "tools/", "include/"}) {
    if (const char* p = std::strstr(file, marker)) {
      short_file = p;
      break;
    }
  }
  throw Error("nibble: " + msg + " [" + short_file + ":" + std::to_string(line) + "]");
}

}  // namespace nibble::detail
