#pragma once
// One rank's part of the GPU ring (RingDilatedAttention on CUDA tensors), forward and
// backward: the same plan and K/V traffic as the CPU ring (KvRing), with blocks packed and
// kept in device memory and the CUDA kernels run against each received block. Plain C++
// (no CUDA types); only in builds with RINGATTN_HAVE_CUDA.

#include <memory>

#include "src/plan/problem.h"
#include "src/plan/ring_plan.h"
#include "src/ring/kv_store.h"

namespace ringattn::cuda {

class RingShard {
 public:
  // Plans every launch, allocates the fp32 partials of all of them and packs this rank's
  // blocks on `stream` (a cudaStream_t; nullptr = the default stream).
  RingShard(const Problem& p, const RingPlan& plan, void* stream);
  ~RingShard();
  RingShard(const RingShard&) = delete;
  RingShard& operator=(const RingShard&) = delete;

  // The device memory of the ring's blocks.
  KvStore& store();
  // Launches the local queries against the local keys.
  void attend_local();
  // Launches the local queries against the block received in step `step` (device memory).
  void attend_block(size_t step, const void* block);
  // Merges every partial (local first, then the steps in order; SPEC.md's merge) into
  // p.out and p.lse, and waits for the stream.
  void write_output();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The backward of one rank of the GPU ring: dq of the local queries accumulated over the
// local keys and every received block in step order; dk and dv (fp32) of each received
// block's keys computed here and sent back to their owner, which adds them in step order.
class RingBackwardShard {
 public:
  // Packs this rank's blocks, allocates the accumulators and the gradient buffers and
  // computes the row statistics on `stream` (a cudaStream_t; nullptr = the default stream).
  RingBackwardShard(const BackwardProblem& bp, const RingPlan& plan, void* stream);
  ~RingBackwardShard();
  RingBackwardShard(const RingBackwardShard&) = delete;
  RingBackwardShard& operator=(const RingBackwardShard&) = delete;

  // The device memory of the ring's blocks.
  KvStore& store();
  // Launches every branch against the local keys.
  void launch_local();
  // The local queries against the block received in step `step` (device memory): dq
  // accumulated, and the fp32 gradients of the block's keys (device memory, the block's
  // layout; complete when this returns, valid until step + 2) to send back to its owner.
  const void* block_grads(size_t step, const void* block);
  // Device memory for the gradients of this rank's block of step `step`, sent back by the
  // rank that received it (free once add_returned(step - 2) was called).
  void* returned(size_t step);
  // Adds those gradients into the dk and dv accumulators (call in step order).
  void add_returned(size_t step);
  // Writes dq, dk and dv and waits for the stream.
  void write_output();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ringattn::cuda
