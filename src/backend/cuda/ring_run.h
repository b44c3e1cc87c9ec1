#pragma once
// The CUDA backend's rings, one rank's part each (RingRun): the dilated ring over RingShard /
// RingBackwardShard (ring_cuda.h) and the block-sparse attention on one device. Host C++20
// (the .cu files do not include it).

#include <memory>

#include "ringattn/dilated_attention.h"
#include "src/plan/block_sparse_plan.h"
#include "src/plan/problem.h"
#include "src/plan/ring_plan.h"
#include "src/ring/ring_run.h"

namespace ringattn::cuda {

std::unique_ptr<RingRun> ring_forward(const Problem& p, const RingPlan& plan,
                                      const ExecOptions& options);
std::unique_ptr<RingRun> ring_backward(const BackwardProblem& bp, const RingPlan& plan,
                                       const ExecOptions& options);
// One device only (plan.world == 1).
std::unique_ptr<RingRun> sparse_forward(const Problem& p, const BlockSparsePlan& plan,
                                        const ExecOptions& options);
std::unique_ptr<RingRun> sparse_backward(const BackwardProblem& bp, const BlockSparsePlan& plan,
                                         const ExecOptions& options);

}  // namespace ringattn::cuda
