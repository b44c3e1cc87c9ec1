#include "src/ring/ring_protocol.h"

#include <cstdint>
#include <utility>

#include "src/base/fault.h"
#include "src/ring/kv_ring.h"
#include "src/ring/ring_steps.h"

namespace ringattn {

namespace {

// One rank's part of the protocol (ring_protocol.h), forward (fwd_ set) or backward (bwd_).
class Protocol final : public RingRun {
 public:
  Protocol(const Problem& p, const RingPlan& plan, std::unique_ptr<RingShard> shard,
           ForwardRingShard* fwd, BackwardRingShard* bwd)
      : p_(p), plan_(plan), tags_(tags_of(plan)), shard_(std::move(shard)), fwd_(fwd), bwd_(bwd) {}

  void run(Communicator& comm, RingStats& stats) override {
    KvRing ring(comm, kv_transfers(p_, plan_), stats, shard_->store());
    Run r{comm, stats, ring, [&comm] { comm.progress(); }, {}, {}, {}, {}};
    ask(r);
    shard_->attend_local(r.poll);
    for (size_t e = 0; e < plan_.steps.size(); ++e) {
      detail::fault_point("ring.step");
      const RingStep& st = plan_.steps[e];
      const bool balanced = plan_.spans[static_cast<size_t>(st.span)].balanced;
      if (balanced && st.send_to >= 0) answer(r, e);
      if (bwd_ != nullptr) ring.wait(r.grad_sends[e % 2], e);  // step e - 2's have left
      // A step's gradient receive is posted after its block arrived, so that no wait on the
      // block (which some communicators complete together with everything posted before
      // it) depends on the peer's gradients.
      const void* block = ring.receives(e) ? ring.receive(e) : nullptr;
      if (bwd_ != nullptr && st.send_to >= 0) {
        const Message m = bwd_->returned(e);
        r.grad_recvs[e % 2] = comm.irecv(m.data, m.bytes, st.send_to, tags_.grads(st));
      }
      if (block != nullptr) attend(r, e, block, balanced);
      comm.progress();
      ring.release(e);
      if (bwd_ != nullptr && e >= 1) add_returned(r, e - 1);
    }
    if (bwd_ != nullptr && !plan_.steps.empty()) add_returned(r, plan_.steps.size() - 1);
    const size_t end = plan_.steps.size();
    for (CommRequest* req :
         {&r.grad_sends[0], &r.grad_sends[1], &r.partial_sends[0], &r.partial_sends[1]}) {
      ring.wait(*req, end);
    }
    for (CommRequest& req : r.asks) ring.wait(req, end);
    ring.finish();
    shard_->write_output();
  }

 private:
  // The state of one run. Sends and receives of partial results and gradients use two
  // slots: step e's in slot e % 2, free again once step e - 2's completed.
  struct Run {
    Communicator& comm;
    RingStats& stats;
    KvRing& ring;
    Poll poll;
    std::vector<CommRequest> asks;
    CommRequest partial_sends[2], grad_sends[2], grad_recvs[2];
  };

  CommRequest send(Run& r, const Message& m, int to, int tag) {
    ++r.stats.messages_sent;
    return r.comm.isend(m.data, m.bytes, to, tag);
  }

  // Step 1: this rank's second half of each balanced span goes to every rank whose keys it
  // receives.
  void ask(Run& r) {
    for (size_t e = 0; e < plan_.steps.size(); ++e) {
      const RingStep& st = plan_.steps[e];
      if (!plan_.spans[static_cast<size_t>(st.span)].balanced || st.recv_from < 0) continue;
      for (const Message& m : shard_->own_queries(e)) {
        r.asks.push_back(send(r, m, st.recv_from, tags_.queries(st)));
      }
    }
  }

  // The later rank's second-half queries against this rank's keys; their result goes back.
  void answer(Run& r, size_t e) {
    const RingStep& st = plan_.steps[e];
    std::vector<CommRequest> reqs;
    for (const Message& m : shard_->query_inbox(e)) {
      reqs.push_back(r.comm.irecv(m.data, m.bytes, st.send_to, tags_.queries(st)));
    }
    for (CommRequest& req : reqs) r.ring.wait(req, e);
    r.ring.wait(r.partial_sends[e % 2], e);  // the send that used this slot two steps ago
    const Message out = shard_->answer(e, static_cast<int>(e % 2), r.poll);
    r.partial_sends[e % 2] = send(r, out, st.send_to, tags_.partial(st));
  }

  // The local queries against step e's block (the first half only on a balanced span: the
  // key owner answers the second); backward: the block's gradients go back. Then the
  // second half's partial result, on a balanced span.
  void attend(Run& r, size_t e, const void* block, bool balanced) {
    const RingStep& st = plan_.steps[e];
    const int64_t row_end = balanced ? plan_.split : INT64_MAX;
    if (bwd_ != nullptr) {
      const Message g = bwd_->block_grads(e, block, row_end, r.poll);
      r.grad_sends[e % 2] = send(r, g, st.recv_from, tags_.grads(st));
    } else {
      fwd_->attend_block(e, block, row_end, r.poll);
    }
    if (!balanced) return;
    const Message m = shard_->partial_inbox(e);
    CommRequest req = r.comm.irecv(m.data, m.bytes, st.recv_from, tags_.partial(st));
    r.ring.wait(req, e);
    shard_->merge_partial(e);
  }

  // The gradients of this rank's keys that step e's receiver sent back.
  void add_returned(Run& r, size_t e) {
    if (plan_.steps[e].send_to < 0) return;
    r.ring.wait(r.grad_recvs[e % 2], e);
    bwd_->add_returned(e);
  }

  const Problem& p_;
  const RingPlan& plan_;
  Tags tags_;
  std::unique_ptr<RingShard> shard_;
  ForwardRingShard* fwd_;
  BackwardRingShard* bwd_;
};

}  // namespace

std::unique_ptr<RingRun> ring_protocol(const Problem& p, const RingPlan& plan,
                                       std::unique_ptr<ForwardRingShard> shard) {
  ForwardRingShard* fwd = shard.get();
  return std::make_unique<Protocol>(p, plan, std::move(shard), fwd, nullptr);
}

std::unique_ptr<RingRun> ring_protocol(const Problem& p, const RingPlan& plan,
                                       std::unique_ptr<BackwardRingShard> shard) {
  BackwardRingShard* bwd = shard.get();
  return std::make_unique<Protocol>(p, plan, std::move(shard), nullptr, bwd);
}

}  // namespace ringattn
