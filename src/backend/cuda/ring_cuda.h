#pragma once
// One rank's shard of the GPU ring (RingDilatedAttention on CUDA tensors), forward and
// backward: the verbs of the ring protocol (src/ring/ring_shard.h) with blocks, partial
// results and accumulators in device memory and the CUDA kernels run at each step. Plain
// C++ (no CUDA types); only in builds with RINGATTN_HAVE_CUDA.

#include <memory>

#include "src/plan/problem.h"
#include "src/plan/ring_plan.h"
#include "src/ring/ring_shard.h"

namespace ringattn::cuda {

// Plans every launch, allocates the buffers (gpu_ring_memory) and packs this rank's blocks
// and balanced queries on `stream` (a cudaStream_t; nullptr = the default stream).
std::unique_ptr<ForwardRingShard> forward_ring_shard(const Problem& p, const RingPlan& plan,
                                                     void* stream);
// The same for the backward (gpu_ring_backward_memory), computing the row statistics too.
std::unique_ptr<BackwardRingShard> backward_ring_shard(const BackwardProblem& bp,
                                                       const RingPlan& plan, void* stream);

}  // namespace ringattn::cuda
