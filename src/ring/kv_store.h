#pragma once
// Where a ring's K/V messages live (host or device memory); KvRing (kv_ring.h) moves them.
// Plain C++17, so that CUDA sources can implement it.

#include <cstddef>

namespace ringattn {

// The memory of a ring's messages.
class KvStore {
 public:
  virtual ~KvStore() = default;
  // The message this rank sends in step `step`, from send buffer `slot` (step % 2); called
  // when the step is posted, and read by the communicator until that send completed.
  virtual const void* outgoing(size_t step, int slot) = 0;
  // Whether outgoing() writes its slot (a message packed per step): the send of step - 2
  // from that slot then completes before it is called. A store of blocks packed once
  // before the ring starts (the dilated ring's) says no.
  virtual bool packs_per_step() const { return false; }
  // Incoming buffer `slot` (0 or 1), at least `bytes` long (bytes > 0). Called when the
  // message it held before is no longer needed (after done_reading(slot)); the store makes
  // sure nothing still reads it.
  virtual void* inbox(int slot, size_t bytes) = 0;
  // Everything that reads the message in `slot` has been issued (a GPU store records an
  // event on its stream: inbox() later waits for just that work).
  virtual void done_reading(int slot) { (void)slot; }
};

}  // namespace ringattn
