#pragma once
// Wall-clock accounting of the ring classes (RingStats): elapsed milliseconds, and waits on
// communication requests counted as time not hidden behind compute.

#include <chrono>

#include "ringattn/comm.h"
#include "ringattn/ring_attention.h"

namespace ringattn {

using Clock = std::chrono::steady_clock;

inline double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Waits for req, adding the time spent to stats.comm_wait_ms.
inline void timed_wait(Communicator& comm, CommRequest& req, RingStats& stats) {
  const Clock::time_point t0 = Clock::now();
  comm.wait(req);
  stats.comm_wait_ms += ms_since(t0);
}

}  // namespace ringattn
