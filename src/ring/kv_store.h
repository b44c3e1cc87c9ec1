#pragma once
// Where a ring's K/V blocks live (host or device memory); KvRing (kv_ring.h) moves them.
// Plain C++17, so that CUDA sources can implement it.

#include <cstddef>

namespace ringattn {

// The memory of a ring's blocks.
class KvStore {
 public:
  virtual ~KvStore() = default;
  // This rank's packed block of span `span` (RingPlan::layout; packed and readable by the
  // communicator when the ring starts, until it finishes).
  virtual const void* own(int span) = 0;
  // Incoming buffer `slot` (0 or 1), at least `bytes` long (bytes > 0). Called when the
  // block it held before is no longer needed (after done_reading(slot)); the store makes
  // sure nothing still reads it.
  virtual void* inbox(int slot, size_t bytes) = 0;
  // Everything that reads the block in `slot` has been issued (a GPU store records an event
  // on its stream: inbox() later waits for just that work).
  virtual void done_reading(int slot) { (void)slot; }
};

}  // namespace ringattn
