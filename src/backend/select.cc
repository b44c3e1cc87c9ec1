// The backend selector: the one place that knows which backends this build has and which
// backend runs a call.

#include "src/backend/backend.h"
#include "src/base/check.h"
#include "src/base/host_staging.h"
#include "src/ring/ring_run.h"

namespace ringattn {

namespace {

// The CUDA backend, or Error(kUnsupported) naming the rebuild (`why`: what needed it).
const AttentionBackend& cuda_or_fail(const std::string& why) {
#if defined(RINGATTN_HAVE_CUDA)
  (void)why;
  return detail::cuda_backend();
#else
  fail(ErrorCode::kUnsupported, why,
       " but this build of ringattn has no CUDA backend; rebuild with -DRINGATTN_WITH_CUDA=ON "
       "(needs nvcc) or pass host tensors with backend = cpu");
#endif
}

// Error(kUnsupported): backend `b` does not run `what` (a ring).
[[noreturn]] void no_ring(const AttentionBackend& b, const char* what = "the ring") {
  fail(ErrorCode::kUnsupported, "backend = ", b.name(), " cannot run ", what,
       "; use backend = cpu (host tensors) or, in a build with CUDA, backend = cuda (CUDA "
       "tensors)");
}

}  // namespace

std::unique_ptr<RingRun> AttentionBackend::ring_forward(const Problem&, const RingPlan&,
                                                        const ExecOptions&) const {
  no_ring(*this);
}

std::unique_ptr<RingRun> AttentionBackend::ring_backward(BackwardProblem&, const RingPlan&,
                                                         const ExecOptions&, bool) const {
  no_ring(*this);
}

std::unique_ptr<RingRun> AttentionBackend::sparse_forward(const Problem&, const BlockSparsePlan&,
                                                          const ExecOptions&) const {
  no_ring(*this);
}

std::unique_ptr<RingRun> AttentionBackend::sparse_backward(BackwardProblem&, const BlockSparsePlan&,
                                                           const ExecOptions&, bool) const {
  no_ring(*this);
}

bool AttentionBackend::needs_precise_lse(const Problem&) const {
  return false;
}

void AttentionBackend::check_sparse_ranks(int) const {}

void AttentionBackend::check_tensors(
    std::initializer_list<std::pair<const char*, const TensorView*>>) const {}

void AttentionBackend::check_forward_tensors(const TensorView& q, const TensorView& k,
                                             const TensorView& v, const TensorView& out,
                                             const std::optional<TensorView>& lse) const {
  check_tensors({{"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}});
  if (lse) check_tensors({{"lse", &*lse}});
}

void AttentionBackend::check_backward_tensors(const TensorView& dout, const TensorView& q,
                                              const TensorView& k, const TensorView& v,
                                              const TensorView& out, const TensorView& lse,
                                              const TensorView& dq, const TensorView& dk,
                                              const TensorView& dv) const {
  check_tensors({{"dout", &dout},
                 {"q", &q},
                 {"k", &k},
                 {"v", &v},
                 {"out", &out},
                 {"lse", &lse},
                 {"dq", &dq},
                 {"dk", &dk},
                 {"dv", &dv}});
}

void AttentionBackend::check_options(const ExecOptions&) const {}

bool AttentionBackend::bf16_products(const ExecOptions&) const {
  return false;
}

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

const AttentionBackend& backend_of_device(Device device, const std::string& what) {
  return device == Device::kCUDA ? cuda_or_fail(what) : detail::cpu_backend();
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

bool host_bf16_products(const ExecOptions& options) {
  return options.backend == Backend::kCpu && detail::cpu_backend().bf16_products(options);
}

void require_ring_backend(Backend requested, const char* what) {
  const AttentionBackend& backend = backend_of_kind(requested);
  if (!backend.runs_ring()) no_ring(backend, what);
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
