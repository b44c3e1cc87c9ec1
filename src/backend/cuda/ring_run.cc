// The CUDA backend's rings as RingRun: the ring protocol over the GPU shards, and the
// block-sparse attention of one device.

#include "src/backend/cuda/ring_run.h"

#include "src/backend/cuda/block_sparse_cuda.h"
#include "src/backend/cuda/ring_cuda.h"
#include "src/ring/ring_protocol.h"

namespace ringattn::cuda {

namespace {

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
  return ring_protocol(p, plan, forward_ring_shard(p, plan, options.cuda_stream));
}

std::unique_ptr<RingRun> ring_backward(const BackwardProblem& bp, const RingPlan& plan,
                                       const ExecOptions& options) {
  return ring_protocol(bp.fwd, plan, backward_ring_shard(bp, plan, options.cuda_stream));
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
