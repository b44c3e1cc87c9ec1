#pragma once
// One rank's part of a ring call, as a backend prepares it: everything sized by the problem
// is planned and allocated when it is made (inside the ranks' agreement, so that running out
// of memory on one rank fails every rank there); run() is the protocol.

#include "ringattn/comm.h"
#include "ringattn/ring_attention.h"
#include "src/base/agreement.h"
#include "src/ring/ring_timing.h"

namespace ringattn {

class RingRun {
 public:
  virtual ~RingRun() = default;
  // Runs this rank's part (every rank calls it, inside run_or_abort), adding to `stats`.
  virtual void run(Communicator& comm, RingStats& stats) = 0;
};

// Runs `run` on every rank (each has made its part; a failure on one stops them all, as
// run_or_abort), into fresh `stats`: the bytes this rank sent, the time since `t_start`.
inline void run_ring(Communicator& comm, RingRun& run, const char* context, RingStats& stats,
                     Clock::time_point t_start) {
  stats = RingStats{};
  const int64_t sent_before = comm.bytes_sent();
  run_or_abort(comm, context, [&] { run.run(comm, stats); });
  stats.bytes_sent = comm.bytes_sent() - sent_before;
  stats.total_ms = ms_since(t_start);
}

}  // namespace ringattn
