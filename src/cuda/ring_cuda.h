#pragma once
// One rank's part of the GPU ring forward (RingDilatedAttention on CUDA tensors): the same
// plan and K/V traffic as the CPU ring (KvRing), with blocks packed and kept in device
// memory and the CUDA forward kernel run against each received block. Plain C++ (no CUDA
// types); only in builds with RINGATTN_HAVE_CUDA.

#include <memory>

#include "../kv_store.h"
#include "../problem.h"
#include "../ring_plan.h"

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

}  // namespace ringattn::cuda
