#pragma once
// Errors raised by every ringattn entry point. Library code never exits or aborts:
// each failure is a ringattn::Error whose message names the parameter, the value
// and the fix. No other exception leaves the library: a failed allocation is an Error
// of code kOutOfMemory, never std::bad_alloc.

#include <stdexcept>
#include <string>

namespace ringattn {

enum class ErrorCode {
  kInvalidArgument,  // a parameter, shape, stride or dtype the caller can fix
  kUnsupported,      // valid input this build or backend cannot run (never a silent fallback)
  kCommunication,    // a communicator failed or ranks disagree
  kDevice,           // a device (CUDA) call failed
  kInternal,         // a bug in ringattn: please report it
  kOutOfMemory,      // an allocation failed (the message names the buffer and its size)
};

const char* error_code_name(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message);
  ErrorCode code() const { return code_; }
  // The message without the "ringattn: <code>: " prefix of what().
  const std::string& message() const { return message_; }

 private:
  ErrorCode code_;
  std::string message_;
};

}  // namespace ringattn
