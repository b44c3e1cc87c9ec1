// The backend selector: the one place that knows which backends this build has.

#include "src/base/host_staging.h"

#if !defined(RINGATTN_HAVE_CUDA)
#include "src/base/check.h"

// A build without CUDA has no device memory: nothing needs staging.
namespace ringattn::staging {

bool is_device_pointer(const void*) { return false; }

void copy_to_host(void*, const void*, size_t) {
  fail(ErrorCode::kInternal, "host staging of a device buffer in a build without CUDA");
}

void copy_to_device(void*, const void*, size_t) {
  fail(ErrorCode::kInternal, "host staging of a device buffer in a build without CUDA");
}

}  // namespace ringattn::staging
#endif
