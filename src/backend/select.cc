// The backend selector: the one place that knows which backends this build has and which
// backend runs a call.

#include "src/backend/backend.h"
#include "src/base/check.h"
#include "src/base/host_staging.h"

namespace ringattn {

namespace {

// The CUDA backend, or Error(kUnsupported) naming the rebuild (`why`: what needed it).
const AttentionBackend& cuda_or_fail(const char* why) {
#if defined(RINGATTN_HAVE_CUDA)
  (void)why;
  return detail::cuda_backend();
#else
  fail(ErrorCode::kUnsupported, why,
       " but this build of ringattn has no CUDA backend; rebuild with -DRINGATTN_WITH_CUDA=ON "
       "(needs nvcc) or pass host tensors with backend = cpu");
#endif
}

}  // namespace

void AttentionBackend::check_forward_tensors(const TensorView&, const TensorView&,
                                             const TensorView&, const TensorView&,
                                             const std::optional<TensorView>&) const {}

void AttentionBackend::check_backward_tensors(const TensorView&, const TensorView&,
                                              const TensorView&, const TensorView&,
                                              const TensorView&, const TensorView&,
                                              const TensorView&, const TensorView&,
                                              const TensorView&) const {}

const AttentionBackend& backend_of_kind(Backend kind) {
  switch (kind) {
    case Backend::kCpu:
      return detail::cpu_backend();
    case Backend::kReference:
      return detail::reference_backend();
    case Backend::kCuda:
      return cuda_or_fail("backend = cuda");
  }
  fail(ErrorCode::kInvalidArgument, "backend = ", static_cast<int>(kind),
       " is not a backend; use cpu, reference or cuda");
}

const AttentionBackend& select_backend(Backend requested, const TensorView& q) {
  if (q.device == Device::kCUDA) {
    if (requested == Backend::kReference) {
      fail(ErrorCode::kInvalidArgument,
           "backend = reference runs on the CPU but q lives on a CUDA device; pass host tensors "
           "or use backend = cuda");
    }
    return cuda_or_fail("q lives on a CUDA device");
  }
  require(requested != Backend::kCuda,
          "backend = cuda needs tensors on a CUDA device but q lives on the CPU; pass CUDA "
          "tensors (Device::kCUDA) or use backend = cpu");
  return backend_of_kind(requested);
}

void require_ring_backend(Backend requested, const char* what) {
  if (!backend_of_kind(requested).runs_ring()) {
    fail(ErrorCode::kUnsupported, "backend = ", backend_name(requested), " cannot run ", what,
         "; use backend = cpu (host tensors) or, in a build with CUDA, backend = cuda (CUDA "
         "tensors)");
  }
}

}  // namespace ringattn

#if !defined(RINGATTN_HAVE_CUDA)
// A build without CUDA has no device memory: nothing needs staging.
namespace ringattn::staging {

bool is_device_pointer(const void*) {
  return false;
}

void copy_to_host(void*, const void*, size_t) {
  fail(ErrorCode::kInternal, "host staging of a device buffer in a build without CUDA");
}

void copy_to_device(void*, const void*, size_t) {
  fail(ErrorCode::kInternal, "host staging of a device buffer in a build without CUDA");
}

}  // namespace ringattn::staging
#endif
