#include "ringattn/dilated_attention.h"

#include <utility>

#include "src/backend/cpu/attention_cpu.h"
#include "src/backend/ref/reference.h"
#include "src/base/check.h"
#include "src/plan/problem.h"
#if defined(RINGATTN_HAVE_CUDA)
#include "src/backend/cuda/attention_cuda.h"
#endif

namespace ringattn {

namespace {

// The backend a call runs on: q's device decides (CUDA tensors run on the CUDA backend).
Backend effective_backend(Backend requested, const TensorView& q) {
  return call_device(requested, q) == Device::kCUDA ? Backend::kCuda : requested;
}

}  // namespace

DilatedAttention::DilatedAttention(DilatedConfig config, ExecOptions options)
    : config_(std::move(config)), options_(options) {
  config_.validate();
  options_.validate();
#if !defined(RINGATTN_HAVE_CUDA)
  if (options_.backend == Backend::kCuda) {
    fail(ErrorCode::kUnsupported,
         "backend = cuda, but this build of ringattn has no CUDA backend; rebuild with "
         "-DRINGATTN_WITH_CUDA=ON (needs nvcc) or use backend = cpu");
  }
#endif
}

void DilatedAttention::forward(const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& out, const std::optional<TensorView>& lse) const {
  guarded("DilatedAttention::forward", [&] { run_forward(q, k, v, out, lse); });
}

void DilatedAttention::run_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                                   const TensorView& out,
                                   const std::optional<TensorView>& lse) const {
  const Backend backend = effective_backend(options_.backend, q);
  const Problem p = make_problem(config_, q, k, v, out, lse, max_head_dim(q.device),
                                 backend_name(backend), Shard{}, q.device);
  switch (backend) {
    case Backend::kReference:
      return reference_forward_into(p);
    case Backend::kCpu:
      return cpu::forward(p, options_);
    case Backend::kCuda:
#if defined(RINGATTN_HAVE_CUDA)
      cuda::check_forward_tensors(q, k, v, out, lse);
      return cuda::forward(p, options_.cuda_stream, !options_.cuda_async);
#endif
      break;
  }
  fail(ErrorCode::kInternal, "no backend ran the forward");
}

void DilatedAttention::backward(const TensorView& dout, const TensorView& q, const TensorView& k,
                                const TensorView& v, const TensorView& out, const TensorView& lse,
                                const TensorView& dq, const TensorView& dk,
                                const TensorView& dv) const {
  guarded("DilatedAttention::backward", [&] { run_backward(dout, q, k, v, out, lse, dq, dk, dv); });
}

void DilatedAttention::run_backward(const TensorView& dout, const TensorView& q,
                                    const TensorView& k, const TensorView& v, const TensorView& out,
                                    const TensorView& lse, const TensorView& dq,
                                    const TensorView& dk, const TensorView& dv) const {
  const Backend backend = effective_backend(options_.backend, q);
  const BackwardProblem bp =
      make_backward_problem(config_, dout, q, k, v, out, lse, dq, dk, dv, max_head_dim(q.device),
                            backend_name(backend), Shard{}, q.device);
  switch (backend) {
    case Backend::kReference:
      return reference_backward_into(bp);
    case Backend::kCpu:
      return cpu::backward(bp, options_);
    case Backend::kCuda:
#if defined(RINGATTN_HAVE_CUDA)
      cuda::check_backward_tensors(dout, q, k, v, out, lse, dq, dk, dv);
      return cuda::backward(bp, options_.cuda_stream, !options_.cuda_async);
#endif
      break;
  }
  fail(ErrorCode::kInternal, "no backend ran the backward");
}

}  // namespace ringattn
