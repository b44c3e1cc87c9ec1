#pragma once
// The K/V traffic of a ring, shared by every ring (the CPU and GPU dilated rings, the
// block-sparse ring), forward and backward: step e's message goes out to one rank while
// another's lands in one of two buffers, the previous one being computed on (double
// buffering). Where the messages live (host or device memory) is the KvStore's business.

#include <utility>
#include <vector>

#include "ringattn/comm.h"
#include "ringattn/ring_attention.h"
#include "src/ring/kv_store.h"
#include "src/ring/ring_timing.h"

namespace ringattn {

// One step of a ring's traffic: this rank's message to send_to and another's from recv_from
// (-1: none; a message that moves is never empty), with `tag`.
struct Transfer {
  int send_to, recv_from, tag;
  size_t send_bytes, recv_bytes;
};

class KvRing {
 public:
  KvRing(Communicator& comm, std::vector<Transfer> steps, RingStats& stats, KvStore& store)
      : comm_(comm),
        steps_(std::move(steps)),
        stats_(stats),
        store_(store),
        sends_(steps_.size()),
        recvs_(steps_.size()) {
    post(0);
    post(1);
  }

  // Whether step e receives a message.
  bool receives(size_t e) const { return steps_[e].recv_from >= 0; }
  // Waits for step e's message (call only when receives(e)). Call for e = 0, 1, ... in
  // order, each followed by release(e) (also for steps that receive nothing).
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
    for (size_t e = 0; e < sends_.size(); ++e) wait(sends_[e], steps_.size());
  }

 private:
  void post(size_t e) {
    if (e >= steps_.size()) return;
    const Transfer& st = steps_[e];
    const int slot = static_cast<int>(e % 2);
    if (st.recv_from >= 0) {
      inbox_[slot] = store_.inbox(slot, st.recv_bytes);
      recvs_[e] = comm_.irecv(inbox_[slot], st.recv_bytes, st.recv_from, st.tag);
    }
    if (st.send_to >= 0) {
      if (store_.packs_per_step() && e >= 2) wait(sends_[e - 2], e);
      sends_[e] = comm_.isend(store_.outgoing(e, slot), st.send_bytes, st.send_to, st.tag);
      ++stats_.messages_sent;
    }
  }

  Communicator& comm_;
  std::vector<Transfer> steps_;
  RingStats& stats_;
  KvStore& store_;
  void* inbox_[2] = {nullptr, nullptr};
  std::vector<CommRequest> sends_, recvs_;
};

}  // namespace ringattn
