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
#include "src/check.h"

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

namespace {

constexpr size_t kInlineValues = 16;

// What each rank contributes to check_same_on_all_ranks (fixed size for allgather).
struct Summary {
  int64_t count = 0;
  uint64_t hash = 0;
  std::array<int64_t, kInlineValues> values{};  // the first values, zero padded
};

uint64_t mix64(uint64_t x) {  // splitmix64 finalizer
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t hash_values(const std::vector<int64_t>& values) {
  uint64_t h = mix64(values.size());
  for (int64_t v : values) h = mix64(h ^ static_cast<uint64_t>(v));
  return h;
}

bool same(const Summary& a, const Summary& b) {
  return a.count == b.count && a.hash == b.hash && a.values == b.values;
}

std::string format_values(const Summary& s) {
  std::ostringstream os;
  os << '[';
  const size_t shown = std::min(static_cast<size_t>(s.count), kInlineValues);
  for (size_t i = 0; i < shown; ++i) os << (i ? "," : "") << s.values[i];
  if (static_cast<size_t>(s.count) > shown) {
    os << ",...] (" << s.count << " values, hash 0x" << std::hex << s.hash << std::dec << ')';
  } else {
    os << ']';
  }
  return os.str();
}

// "rank 3" or "ranks 0-2,5".
std::string format_ranks(const std::vector<int>& ranks) {
  std::ostringstream os;
  os << (ranks.size() == 1 ? "rank " : "ranks ");
  for (size_t i = 0; i < ranks.size();) {
    size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    os << (i ? "," : "") << ranks[i];
    if (j > i) os << '-' << ranks[j];
    i = j + 1;
  }
  return os.str();
}

}  // namespace

void check_same_on_all_ranks(Communicator& comm, const std::string& what,
                             const std::vector<int64_t>& values) {
  Summary mine;
  mine.count = static_cast<int64_t>(values.size());
  mine.hash = hash_values(values);
  std::copy_n(values.begin(), std::min(values.size(), kInlineValues), mine.values.begin());

  // The only collective: every rank makes it, then every rank decides from the same data.
  const int size = comm.size();
  std::vector<Summary> all(static_cast<size_t>(size));
  comm.allgather(&mine, all.data(), sizeof(Summary));

  const bool agree =
      std::all_of(all.begin(), all.end(), [&](const Summary& s) { return same(s, all[0]); });
  if (agree) return;

  // Group the ranks by what they hold, in order of each group's first rank.
  std::vector<std::vector<int>> groups;
  std::vector<int> group_of(static_cast<size_t>(size), -1);
  for (int r = 0; r < size; ++r) {
    for (size_t g = 0; g < groups.size(); ++g) {
      if (same(all[static_cast<size_t>(r)], all[static_cast<size_t>(groups[g][0])])) {
        group_of[static_cast<size_t>(r)] = static_cast<int>(g);
        groups[g].push_back(r);
        break;
      }
    }
    if (group_of[static_cast<size_t>(r)] < 0) groups.push_back({r});
  }
  std::ostringstream os;
  os << "ranks disagree on " << what << ": ";
  for (size_t g = 0; g < groups.size(); ++g) {
    os << (g ? ", " : "") << format_ranks(groups[g]) << (groups[g].size() == 1 ? " has " : " have ")
       << format_values(all[static_cast<size_t>(groups[g][0])]);
  }
  os << "; pass the same configuration on every rank";
  fail(ErrorCode::kCommunication, os.str());
}

}  // namespace ringattn
