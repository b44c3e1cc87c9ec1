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
#include "tests/support/test_util.h"

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

// The whole-sequence tensors of a forward and backward: [B, N, heads, D]; lse [B, H, N].
struct AttentionTensors {
  const Tensor &q, &k, &v, &dout, &out, &lse, &dq, &dk, &dv;
};

// Forward then backward of a `Ring` (RingDilatedAttention or BlockSparseRingDilatedAttention)
// under `cfg` on P thread ranks of one world (one kernel thread each): rank r reads and writes
// rows [r n_loc, (r + 1) n_loc) of every tensor of `t`. Returns what each rank did.
template <typename Ring, typename Config>
std::vector<RankResult> run_ring_on_threads(int P, Matching matching, const Config& cfg,
                                            int64_t n_loc, const AttentionTensors& t) {
  const auto comms = make_thread_world(P, matching);
  return run_ranks(comms, [&](Communicator& comm, int rank) {
    const int64_t r0 = rank * n_loc;
    const auto rows = [&](const Tensor& x) { return rows_of(x, r0, n_loc, 1); };
    const TensorView lse = rows_of(t.lse, r0, n_loc, 2);
    ExecOptions opt;
    opt.num_threads = 1;
    Ring ring(cfg, comm, opt);
    ring.forward(rows(t.q), rows(t.k), rows(t.v), rows(t.out), lse);
    ring.backward(rows(t.dout), rows(t.q), rows(t.k), rows(t.v), rows(t.out), lse, rows(t.dq),
                  rows(t.dk), rows(t.dv));
  });
}

}  // namespace ringattn::test
