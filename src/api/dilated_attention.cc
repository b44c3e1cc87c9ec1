#include "ringattn/dilated_attention.h"

#include <utility>

#include "src/backend/backend.h"
#include "src/base/check.h"
#include "src/plan/problem.h"

namespace ringattn {

DilatedAttention::DilatedAttention(DilatedConfig config, ExecOptions options)
    : config_(std::move(config)), options_(options) {
  config_.validate();
  options_.validate();
  backend_of_kind(options_.backend);  // Error(kUnsupported) when this build lacks it
}

void DilatedAttention::forward(const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& out, const std::optional<TensorView>& lse) const {
  guarded("DilatedAttention::forward", [&] { run_forward(q, k, v, out, lse); });
}

void DilatedAttention::run_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                                   const TensorView& out,
                                   const std::optional<TensorView>& lse) const {
  const AttentionBackend& backend = select_backend(options_.backend, q);
  const Problem p = make_problem(config_, q, k, v, out, lse, backend.max_head_dim(), backend.name(),
                                 Shard{}, q.device);
  backend.check_forward_tensors(q, k, v, out, lse);
  backend.forward(p, options_);
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
  const AttentionBackend& backend = select_backend(options_.backend, q);
  const BackwardProblem bp =
      make_backward_problem(config_, dout, q, k, v, out, lse, dq, dk, dv, backend.max_head_dim(),
                            backend.name(), Shard{}, q.device);
  backend.check_backward_tensors(dout, q, k, v, out, lse, dq, dk, dv);
  backend.backward(bp, options_);
}

}  // namespace ringattn
