#pragma once
// The CPU backend's rings, one rank's part each (RingRun): the dilated ring of
// RingDilatedAttention (ring.cc: K/V blocks of the spanning branches, causal load balance)
// and the block-sparse ring (block_ring.cc). The backwards take `precise`: run the forward
// again first for the lse in double (PreciseLse; some rank's lse needs it).

#include <functional>
#include <memory>

#include "ringattn/dilated_attention.h"
#include "src/plan/block_sparse_plan.h"
#include "src/plan/problem.h"
#include "src/plan/ring_plan.h"
#include "src/ring/ring_run.h"

namespace ringattn::cpu {

std::unique_ptr<RingRun> ring_forward(const Problem& p, const RingPlan& plan,
                                      const ExecOptions& options);
std::unique_ptr<RingRun> ring_backward(BackwardProblem& bp, const RingPlan& plan,
                                       const ExecOptions& options, bool precise);
std::unique_ptr<RingRun> sparse_forward(const Problem& p, const BlockSparsePlan& plan,
                                        const ExecOptions& options);
std::unique_ptr<RingRun> sparse_backward(BackwardProblem& bp, const BlockSparsePlan& plan,
                                         const ExecOptions& options, bool precise);

// `backward`, preceded (when `precise`) by the ring forward that `make_forward` makes for the
// problem of the lse in double, whose result bp.fwd then points at.
std::unique_ptr<RingRun> with_precise_lse(
    BackwardProblem& bp, bool precise,
    const std::function<std::unique_ptr<RingRun>(const Problem&)>& make_forward,
    std::unique_ptr<RingRun> backward);

}  // namespace ringattn::cpu
