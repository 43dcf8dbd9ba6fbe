#pragma once
// One exception type for every error nibble reports. Messages say what was wrong
// and what to do about it; NB_CHECK builds them with stream syntax.
#include <sstream>
#include <stdexcept>
#include <string>

namespace nibble {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
[[noreturn]] void throw_error(const char* file, int line, const std::string& msg);
}  // namespace detail

}  // namespace nibble

// NB_CHECK(cond, "x has " << n << " columns; pass a tensor with K = " << k);
#define NB_CHECK(cond, msg)                                                 \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::ostringstream nb_check_os_;                                      \
      nb_check_os_ << msg;                                                  \
      ::nibble::detail::throw_error(__FILE__, __LINE__, nb_check_os_.str()); \
    }                                                                       \
  } while (0)

#define NB_FAIL(msg) NB_CHECK(false, msg)
