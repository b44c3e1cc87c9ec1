#pragma once
// Wall-clock accounting of the ring classes (RingStats): elapsed milliseconds, and waits on
// communication requests counted as time not hidden behind compute.

#include <chrono>
#include <string>

#include "ringattn/comm.h"
#include "ringattn/error.h"
#include "ringattn/ring_attention.h"

namespace ringattn {

using Clock = std::chrono::steady_clock;

inline double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Waits for req, adding the time spent to stats.comm_wait_ms. A communication error names
// the ring step (`step` = the number of steps: the end of the ring).
inline void timed_wait(Communicator& comm, CommRequest& req, RingStats& stats, size_t step) {
  const Clock::time_point t0 = Clock::now();
  try {
    comm.wait(req);
  } catch (const Error& e) {
    throw Error(e.code(), e.message() + " (in step " + std::to_string(step) + " of the ring)");
  }
  stats.comm_wait_ms += ms_since(t0);
}

}  // namespace ringattn
