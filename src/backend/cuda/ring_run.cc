// The CUDA backend's rings as RingRun: the protocol of the GPU ring over KvRing, and the
// block-sparse attention of one device.

#include "src/backend/cuda/ring_run.h"

#include "src/backend/cuda/block_sparse_cuda.h"
#include "src/backend/cuda/ring_cuda.h"
#include "src/base/fault.h"
#include "src/ring/kv_ring.h"
#include "src/ring/ring_steps.h"

namespace ringattn::cuda {

namespace {

// The GPU ring forward: the CPU ring's plan and K/V traffic, blocks in device memory, the
// CUDA forward kernel against the local keys and each received block, one merge at the end
// (local partials first, then the steps in order). No causal load balancing.
class GpuRingForward final : public RingRun {
 public:
  GpuRingForward(const Problem& p, const RingPlan& plan, const ExecOptions& options)
      : p_(p), plan_(plan), shard_(p, plan, options.cuda_stream) {}

  void run(Communicator& comm, RingStats& stats) override {
    KvRing ring(comm, p_, plan_, stats, shard_.store());
    shard_.attend_local();
    for (size_t e = 0; e < plan_.steps.size(); ++e) {
      detail::fault_point("ring.step");
      if (ring.receives(e)) shard_.attend_block(e, ring.receive(e));
      comm.progress();
      ring.release(e);
    }
    ring.finish();
    shard_.write_output();
  }

 private:
  const Problem& p_;
  const RingPlan& plan_;
  RingShard shard_;
};

// The GPU ring backward: the CPU ring's plan and K/V traffic (no causal load balancing),
// the CUDA backward passes against the local keys and each received block; the fp32
// gradients of a received block's keys go back to their owner, which adds them in step
// order (double-buffered, as on the CPU; the gradient receive posted after the step's
// block arrived, as there).
class GpuRingBackward final : public RingRun {
 public:
  GpuRingBackward(const BackwardProblem& bp, const RingPlan& plan, const ExecOptions& options)
      : p_(bp.fwd), plan_(plan), shard_(bp, plan, options.cuda_stream) {}

  void run(Communicator& comm, RingStats& stats) override {
    const Tags tags = tags_of(plan_);
    KvRing ring(comm, p_, plan_, stats, shard_.store());
    CommRequest grad_sends[2], grad_recvs[2];
    const auto add_returned = [&](size_t e) {
      if (plan_.steps[e].send_to < 0) return;
      ring.wait(grad_recvs[e % 2], e);
      shard_.add_returned(e);
    };
    shard_.launch_local();
    for (size_t e = 0; e < plan_.steps.size(); ++e) {
      detail::fault_point("ring.step");
      const RingStep& st = plan_.steps[e];
      ring.wait(grad_sends[e % 2], e);  // step e - 2's gradients have left
      const void* block = ring.receives(e) ? ring.receive(e) : nullptr;
      if (st.send_to >= 0) {
        grad_recvs[e % 2] =
            comm.irecv(shard_.returned(e), grad_bytes(st, plan_.rank), st.send_to, tags.grads(st));
      }
      if (block != nullptr) {
        grad_sends[e % 2] = comm.isend(shard_.block_grads(e, block), grad_bytes(st, st.recv_from),
                                       st.recv_from, tags.grads(st));
        ++stats.messages_sent;
      }
      comm.progress();
      ring.release(e);
      if (e >= 1) add_returned(e - 1);
    }
    if (!plan_.steps.empty()) add_returned(plan_.steps.size() - 1);
    for (CommRequest& req : grad_sends) ring.wait(req, plan_.steps.size());
    ring.finish();
    shard_.write_output();
  }

 private:
  size_t grad_bytes(const RingStep& st, int owner) const {
    return static_cast<size_t>(plan_.block_elements(p_, st.span, owner)) * sizeof(float);
  }

  const Problem& p_;
  const RingPlan& plan_;
  RingBackwardShard shard_;
};

// Block-sparse attention of one device: the pattern as the kernels' CSR, made up front.
class SparseForward final : public RingRun {
 public:
  SparseForward(const Problem& p, const BlockSparsePlan& plan, const ExecOptions& options)
      : p_(p),
        options_(options),
        by_query_(query_major_csr(plan.layouts, plan.head_layout, p.causal)) {}
  void run(Communicator&, RingStats&) override {
    block_sparse_forward(p_, by_query_, options_.cuda_stream, !options_.cuda_async);
  }

 private:
  const Problem& p_;
  ExecOptions options_;
  BlockCsr by_query_;
};

class SparseBackward final : public RingRun {
 public:
  SparseBackward(const BackwardProblem& bp, const BlockSparsePlan& plan, const ExecOptions& options)
      : bp_(bp),
        options_(options),
        by_query_(query_major_csr(plan.layouts, plan.head_layout, bp.fwd.causal)),
        by_key_(key_major_csr(plan.layouts, plan.head_layout, bp.fwd.causal)) {}
  void run(Communicator&, RingStats&) override {
    block_sparse_backward(bp_, by_query_, by_key_, options_.cuda_stream, !options_.cuda_async);
  }

 private:
  const BackwardProblem& bp_;
  ExecOptions options_;
  BlockCsr by_query_, by_key_;
};

}  // namespace

std::unique_ptr<RingRun> ring_forward(const Problem& p, const RingPlan& plan,
                                      const ExecOptions& options) {
  return std::make_unique<GpuRingForward>(p, plan, options);
}

std::unique_ptr<RingRun> ring_backward(const BackwardProblem& bp, const RingPlan& plan,
                                       const ExecOptions& options) {
  return std::make_unique<GpuRingBackward>(bp, plan, options);
}

std::unique_ptr<RingRun> sparse_forward(const Problem& p, const BlockSparsePlan& plan,
                                        const ExecOptions& options) {
  return std::make_unique<SparseForward>(p, plan, options);
}

std::unique_ptr<RingRun> sparse_backward(const BackwardProblem& bp, const BlockSparsePlan& plan,
                                         const ExecOptions& options) {
  return std::make_unique<SparseBackward>(bp, plan, options);
}

}  // namespace ringattn::cuda
