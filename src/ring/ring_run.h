#pragma once
// One rank's part of a ring call, as a backend prepares it: everything sized by the problem
// is planned and allocated when it is made (inside the ranks' agreement, so that running out
// of memory on one rank fails every rank there); run() is the protocol.

#include <memory>
#include <optional>
#include <vector>

#include "ringattn/comm.h"
#include "ringattn/ring_attention.h"
#include "src/base/agreement.h"
#include "src/base/check.h"
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

// What a ring call's preparation hands on: the fields every rank must agree on and, for a
// backward, whether this rank's lse is too large for its fp32 rounding (then every rank runs
// the forward again for the lse in double first).
struct PreparedCall {
  std::vector<AgreedField> fields;
  std::optional<bool> needs_precise_lse;  // none: a forward
};

// Names in a ring call's errors: the call, what the ranks agree on, and the run.
struct RingCallNames {
  const char* call;
  const char* agreed;
  const char* run;
};

// One collective call of a public ring class, the same steps on every rank: prepare() on all
// ranks together (select the backend, validate, make the problem: a PreparedCall), the ranks'
// agreement, then start(precise) on all ranks together (plan and allocate: the RingRun;
// precise: some rank needs the lse in double), then the run, into `stats`.
template <typename Prepare, typename Start>
void ring_call(Communicator& comm, const RingCallNames& names, RingStats& stats, Prepare&& prepare,
               Start&& start) {
  guarded(names.call, [&] {
    const Clock::time_point t_start = Clock::now();
    PreparedCall prepared;
    check_on_all_ranks(comm, [&] { prepared = prepare(); });
    check_same_on_all_ranks(comm, names.agreed, prepared.fields);
    int64_t precise = prepared.needs_precise_lse.value_or(false) ? 1 : 0;
    if (prepared.needs_precise_lse) comm.allreduce_max(&precise, 1);
    std::unique_ptr<RingRun> run;
    check_on_all_ranks(comm, [&] { run = start(precise != 0); });
    run_ring(comm, *run, names.run, stats, t_start);
  });
}

}  // namespace ringattn
