#pragma once
// The names of the public enums (one table per enum, in declaration order) and the parse that
// reads a name back; its error lists the accepted names.

#include <cstddef>
#include <string>

#include "src/base/check.h"

namespace ringattn {

// names[value]; "unknown" for a value outside the enum (a cast from a bad integer).
template <typename Enum, size_t N>
const char* enum_name(Enum value, const char* const (&names)[N]) {
  const auto i = static_cast<size_t>(value);
  return i < N ? names[i] : "unknown";
}

// The value among 0..last whose name(value) is `text`; else Error(kInvalidArgument):
// "<param> = '<text>' is not <what>; use '<name 0>', ... or '<name last>'".
template <typename Enum>
Enum parse_enum(const char* param, const char* what, const std::string& text,
                const char* (*name)(Enum), Enum last) {
  const int n = static_cast<int>(last) + 1;
  std::string choices;
  for (int i = 0; i < n; ++i) {
    const char* candidate = name(static_cast<Enum>(i));
    if (text == candidate) return static_cast<Enum>(i);
    choices += (i == 0 ? "'" : i + 1 == n ? " or '" : ", '") + std::string(candidate) + "'";
  }
  fail(ErrorCode::kInvalidArgument, param, " = '", text, "' is not ", what, "; use ", choices);
}

}  // namespace ringattn
