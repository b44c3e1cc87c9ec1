#pragma once
// Building error messages: fail(code, parts...) streams its parts into the message.
// require(ok, parts...) evaluates every part even when ok holds: pass only values that
// are valid to compute then (no index that the check itself guards).

#include <exception>
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

// A limit of a backend, not a wrong argument: Error(kUnsupported).
template <typename... Parts>
void require_supported(bool ok, Parts&&... parts) {
  if (!ok) fail(ErrorCode::kUnsupported, std::forward<Parts>(parts)...);
}

// The Error an exception becomes at the library's surface: a ringattn::Error as it is,
// std::bad_alloc as kOutOfMemory, any other exception as kInternal. `context` names the call.
Error as_error(const std::exception_ptr& error, const char* context);

// Runs fn; any exception other than ringattn::Error leaves as as_error(..., context).
template <typename Fn>
decltype(auto) guarded(const char* context, Fn&& fn) {
  try {
    return std::forward<Fn>(fn)();
  } catch (const Error&) {
    throw;
  } catch (...) {
    throw as_error(std::current_exception(), context);
  }
}

}  // namespace ringattn
