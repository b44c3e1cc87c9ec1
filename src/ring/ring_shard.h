#pragma once
// The verbs of one rank's shard of the ring (host memory on the CPU backend, device memory on
// the CUDA backend), as the ring protocol (ring_protocol.h) calls them. Plain C++17, so that
// CUDA sources can implement it.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "src/ring/kv_store.h"

namespace ringattn {

// Runs on the calling thread between pieces of work, to progress communication meanwhile.
using Poll = std::function<void()>;

// Memory a message is sent from or received into (host or device memory, as the
// communicator allows).
struct Message {
  void* data;
  size_t bytes;
};

// The verbs of one rank's shard that both directions share. Everything is planned and
// allocated when the shard is made; a verb only launches work (a GPU shard may return before
// its kernels finish, except where a verb says the result is complete).
class RingShard {
 public:
  virtual ~RingShard() = default;
  // The memory of the ring's K/V blocks.
  virtual KvStore& store() = 0;
  // The local queries against the local keys, every branch.
  virtual void attend_local(const Poll& poll) = 0;
  // The verbs of balanced (causal) spans, for step `step` of the plan:
  // this rank's second-half messages (queries; backward also dout, out and lse), packed
  // when the shard was made, sent to the step's recv_from; and where the step's send_to's
  // arrive.
  virtual std::vector<Message> own_queries(size_t step) = 0;
  virtual std::vector<Message> query_inbox(size_t step) = 0;
  // The queries received from send_to against this rank's keys; their partial result
  // (forward: O and lse; backward: dq) in buffer `slot` (0 or 1), complete when this returns
  // (the caller sends it, and reuses the slot two steps later).
  virtual Message answer(size_t step, int slot, const Poll& poll) = 0;
  // Where the partial result of this rank's second half arrives from recv_from, and merging
  // it (forward: into the row accumulators; backward: added to dq). The inbox is free again
  // when merge_partial returns.
  virtual Message partial_inbox(size_t step) = 0;
  virtual void merge_partial(size_t step) = 0;
  // The accumulators into the outputs (waits for the device, if any).
  virtual void write_output() = 0;
};

class ForwardRingShard : public RingShard {
 public:
  // The local queries before global row `row_end` against the block received in step
  // `step` (read-only until the step's buffer is released).
  virtual void attend_block(size_t step, const void* block, int64_t row_end, const Poll& poll) = 0;
};

class BackwardRingShard : public RingShard {
 public:
  // As attend_block, accumulating dq; returns the fp32 gradients of the block's keys (the
  // block's layout), complete when this returns and kept until step + 2.
  virtual Message block_grads(size_t step, const void* block, int64_t row_end,
                              const Poll& poll) = 0;
  // Where the gradients of this rank's block of step `step` arrive from the rank that
  // received it (free once add_returned(step - 2) was called), and adding them into the dk
  // and dv accumulators (called in step order).
  virtual Message returned(size_t step) = 0;
  virtual void add_returned(size_t step) = 0;
};

}  // namespace ringattn
