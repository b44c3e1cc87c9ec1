#pragma once
// Building error messages: fail(code, parts...) streams its parts into the message.

#include <sstream>
#include <utility>

#include "ringattn/error.h"

namespace ringattn {

template <typename... Parts>
[[noreturn]] void fail(ErrorCode code, Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  throw Error(code, os.str());
}

template <typename... Parts>
void require(bool ok, Parts&&... parts) {
  if (!ok) fail(ErrorCode::kInvalidArgument, std::forward<Parts>(parts)...);
}

}  // namespace ringattn
