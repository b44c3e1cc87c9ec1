#pragma once
// Several ranks in one process, one thread each: communicators of a "thread world" for
// tests of multi-rank protocols without mpirun, with the matching rules of either MPI or
// NCCL, deadlines and abort notices like the real ones.
//
//   kMpi:  a receive matches the first unmatched send with the same (source, tag); every
//          request completes on its own.
//   kNccl: isend / irecv only queue; wait() and the collectives start the queued
//          operations as one group (progress() starts nothing: the latest a communicator
//          may start them). Operations between two ranks match in posting
//          order whatever their tags; a group completes when every operation in it is
//          matched and the group before it (the rank's communication stream) completed,
//          and wait() blocks until the request's whole group completes. A protocol that
//          waits for a group holding a receive whose send the peer posts only later
//          deadlocks here as it would on NCCL: the wait ends at the deadline, in an Error.

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ringattn/comm.h"
#include "ringattn/error.h"

namespace ringattn::test {

enum class Matching { kMpi, kNccl };

// `size` communicators of one world (rank r at index r), each with timeout `timeout_s`.
std::vector<std::unique_ptr<Communicator>> make_thread_world(int size, Matching matching,
                                                             double timeout_s = 10.0);

// What one rank's function did: nothing thrown (ok), or the ringattn::Error it threw.
struct RankResult {
  bool ok = true;
  ErrorCode code = ErrorCode::kInternal;
  std::string message;
  double seconds = 0.0;  // how long the rank's function ran
};

// Runs fn(comm, rank) on a thread per rank and joins them. An exception other than
// ringattn::Error is reported as an Error of code kInternal.
std::vector<RankResult> run_ranks(const std::vector<std::unique_ptr<Communicator>>& comms,
                                  const std::function<void(Communicator&, int)>& fn);

}  // namespace ringattn::test
