// The Communicator base class and helpers shared by every implementation.

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <thread>

#include "ringattn/comm.h"
#include "ringattn/error.h"
#include "src/base/check.h"

namespace ringattn {

namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// RINGATTN_TIMEOUT_S, or the default.
double timeout_from_environment() {
  const char* text = std::getenv("RINGATTN_TIMEOUT_S");
  if (text == nullptr || *text == '\0') return Communicator::kDefaultTimeoutSeconds;
  char* end = nullptr;
  const double seconds = std::strtod(text, &end);
  require(end != text && *end == '\0' && std::isfinite(seconds) && seconds > 0.0,
          "the environment variable RINGATTN_TIMEOUT_S = '", text,
          "' is not a positive number of seconds; set it to e.g. 300, or unset it for the "
          "default of ",
          Communicator::kDefaultTimeoutSeconds, " s");
  return seconds;
}

}  // namespace

Communicator::Communicator() : timeout_s_(timeout_from_environment()) {}

Communicator::~Communicator() = default;

void Communicator::set_timeout(double seconds) {
  require(std::isfinite(seconds) && seconds > 0.0, "set_timeout: seconds = ", seconds,
          "; pass a positive, finite number of seconds");
  timeout_s_ = seconds;
}

void Communicator::check_usable(const char* call) const {
  if (broken()) {
    fail(ErrorCode::kCommunication, call, ": the ", name(), " communicator is broken (",
         broken_reason_, "); it cannot be used again: make a new communicator on every rank");
  }
}

bool Communicator::wait_needed(const CommRequest& req) const {
  if (req.complete()) return false;
  check_usable("wait");
  require(req.owner() == this,
          "wait: the request belongs to another communicator; wait on it with the "
          "communicator that made it");
  return true;
}

void Communicator::mark_broken(const std::string& reason) noexcept {
  if (!broken()) {
    try {
      broken_reason_ = reason.empty() ? "broken" : reason;
    } catch (...) {  // out of memory for the reason: still broken
    }
  }
}

void Communicator::abort(const std::string& reason) noexcept {
  const bool first = !broken();
  mark_broken("rank " + std::to_string(rank()) + " aborted: " + reason);
  if (first) notify_abort(reason);
}

void Communicator::fail_timeout(const std::string& what) {
  std::ostringstream os;
  os << what << " did not complete within the deadline of " << timeout_s_
     << " s (set_timeout() or RINGATTN_TIMEOUT_S); a peer is slower than that, failed, or did "
        "not make the matching call";
  mark_broken(os.str());
  fail(ErrorCode::kCommunication, os.str());
}

Deadline::Deadline(double seconds)
    : end_ns_(now_ns() + static_cast<int64_t>(std::min(seconds, 1e9) * 1e9)) {}

bool Deadline::passed() const {
  return now_ns() > end_ns_;
}

void Deadline::pause() {
  // About 20 microseconds of spinning keep short waits fast; then sleeps, growing to 1 ms,
  // leave the core to compute threads and other ranks.
  constexpr int kSpins = 2000;
  if (++polls_ <= kSpins) return;
  const int64_t us = std::min<int64_t>(1000, int64_t{1} << std::min(polls_ - kSpins, 10));
  std::this_thread::sleep_for(std::chrono::microseconds(us));
}

void Communicator::wait_all(std::span<CommRequest> reqs) {
  for (CommRequest& req : reqs) wait(req);
}

void Communicator::check_transfer_args(const char* call, const void* buf, size_t bytes, int peer,
                                       int tag) const {
  require(peer >= 0 && peer < size(), call, ": peer = ", peer, " is outside [0, ", size(),
          "); pass a rank of this communicator");
  require(tag >= 0 && tag <= max_tag(), call, ": tag = ", tag, " is outside [0, ", max_tag(),
          "]; pass a non-negative tag no larger than max_tag()");
  require(buf != nullptr || bytes == 0, call, ": buf is null but bytes = ", bytes,
          "; pass a buffer of at least that many bytes");
}

void Communicator::check_allgather_args(const void* send, const void* recv,
                                        size_t bytes_per_rank) const {
  require((send != nullptr && recv != nullptr) || bytes_per_rank == 0,
          "allgather: send or recv is null with bytes_per_rank = ", bytes_per_rank,
          "; pass buffers of bytes_per_rank and size() * bytes_per_rank bytes");
}

void Communicator::check_broadcast_args(const void* buf, size_t bytes, int root) const {
  require(root >= 0 && root < size(), "broadcast: root = ", root, " is outside [0, ", size(),
          "); pass a rank of this communicator");
  require(buf != nullptr || bytes == 0, "broadcast: buf is null but bytes = ", bytes,
          "; pass a buffer of at least that many bytes");
}

}  // namespace ringattn
