#pragma once
// The two receive buffers of a ring's messages in host memory (a KvStore's inboxes), made at
// the size of the largest message before the ring starts.

#include <cstdint>
#include <vector>

#include "src/base/check.h"
#include "src/base/memory.h"

namespace ringattn {

class HostInboxes {
 public:
  // `what` names the buffers in errors ("the ring's K/V receive buffers").
  HostInboxes(size_t bytes, const char* what) : what_(what) {
    for (std::vector<uint8_t>& buf : buf_) resize_buffer(buf, bytes, what);
  }
  // Buffer `slot` (0 or 1) for a message of `bytes`.
  void* get(int slot, size_t bytes) {
    if (bytes > buf_[slot].size()) {
      fail(ErrorCode::kInternal, what_, " hold ", buf_[slot].size(),
           " bytes each, but a message of ", bytes, " bytes arrives");
    }
    return buf_[slot].data();
  }

 private:
  const char* what_;
  std::vector<uint8_t> buf_[2];
};

}  // namespace ringattn
