#pragma once
// The K/V traffic of a ring, shared by the CPU and GPU rings, forward and backward: every
// rank's packed blocks of the spanning branches go out per RingPlan; step e's incoming block
// lands in one of two buffers while the previous one is being computed on (double
// buffering). Where the blocks live (host or device memory) is the KvStore's business.

#include <vector>

#include "ringattn/comm.h"
#include "ringattn/ring_attention.h"
#include "src/plan/problem.h"
#include "src/plan/ring_plan.h"
#include "src/ring/kv_store.h"
#include "src/ring/ring_timing.h"

namespace ringattn {

class KvRing {
 public:
  KvRing(Communicator& comm, const Problem& p, const RingPlan& plan, RingStats& stats,
         KvStore& store)
      : comm_(comm), p_(p), plan_(plan), stats_(stats), store_(store), recvs_(plan.steps.size()) {
    post(0);
    post(1);
  }

  // Whether step e receives a block (it then has at least one row).
  bool receives(size_t e) const { return plan_.steps[e].recv_from >= 0; }
  // Waits for step e's block (call only when receives(e)). Call for e = 0, 1, ... in order,
  // each followed by release(e) (also for steps that receive nothing).
  const void* receive(size_t e) {
    wait(recvs_[e], e);
    return inbox_[e % 2];
  }
  // Step e's buffer is free again (everything reading it is issued): post step e + 2 into it.
  void release(size_t e) {
    if (receives(e)) store_.done_reading(static_cast<int>(e % 2));
    post(e + 2);
  }

  void wait(CommRequest& req, size_t step) { timed_wait(comm_, req, stats_, step); }
  void finish() {
    for (CommRequest& req : sends_) wait(req, plan_.steps.size());
  }

 private:
  size_t block_bytes(int span, int sender) const {
    return static_cast<size_t>(plan_.block_elements(p_, span, sender)) * dtype_size(p_.dtype);
  }
  void post(size_t e) {
    if (e >= plan_.steps.size()) return;
    const RingStep& st = plan_.steps[e];
    if (st.recv_from >= 0) {
      const size_t bytes = block_bytes(st.span, st.recv_from);
      inbox_[e % 2] = store_.inbox(static_cast<int>(e % 2), bytes);
      recvs_[e] = comm_.irecv(inbox_[e % 2], bytes, st.recv_from, st.tag);
    }
    if (st.send_to >= 0) {
      sends_.push_back(
          comm_.isend(store_.own(st.span), block_bytes(st.span, plan_.rank), st.send_to, st.tag));
      ++stats_.messages_sent;
    }
  }

  Communicator& comm_;
  const Problem& p_;
  const RingPlan& plan_;
  RingStats& stats_;
  KvStore& store_;
  void* inbox_[2] = {nullptr, nullptr};
  std::vector<CommRequest> sends_, recvs_;
};

}  // namespace ringattn
