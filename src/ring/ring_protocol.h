#pragma once
// The ring protocol of RingDilatedAttention, written once for every backend: one rank's part
// of the forward and of the backward as named steps over the verbs of a backend's shard (the
// CPU's in host memory, the GPU's in device memory). The steps, per RingPlan:
//   1. ask:     this rank's second-half queries of each balanced (causal) span go to the
//               owner of the keys they need;
//   2. local:   the local queries attend to the local keys;
//   3. for each step e in order:
//      answer:  (balanced, this rank owns the keys) the asker's queries attend to this rank's
//               keys and their partial result (forward: O and lse; backward: dq) goes back;
//      attend:  the block received in step e is attended by the local queries (of the first
//               half only on a balanced span); backward: the gradients of its keys go back
//               to their owner, which adds them in step order;
//      merge:   (balanced) the partial result of this rank's second half comes back and is
//               merged into the row accumulators (forward: SPEC.md's merge, fixed order);
//   4. write:   the accumulators become the outputs.
// K/V blocks travel double-buffered (KvRing), so a rank holds at most two received blocks
// and two blocks' partial results at a time: memory O(N / P) whatever the number of ranks.

#include <memory>

#include "src/plan/ring_plan.h"
#include "src/ring/ring_run.h"
#include "src/ring/ring_shard.h"

namespace ringattn {

// One rank's part of the ring forward or backward over `shard` (made inside the ranks'
// agreement, like every RingRun). The problem and the plan outlive the run.
std::unique_ptr<RingRun> ring_protocol(const Problem& p, const RingPlan& plan,
                                       std::unique_ptr<ForwardRingShard> shard);
std::unique_ptr<RingRun> ring_protocol(const Problem& p, const RingPlan& plan,
                                       std::unique_ptr<BackwardRingShard> shard);

}  // namespace ringattn
