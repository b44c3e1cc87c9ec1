#include "ringattn/dilated_attention.h"

#include <utility>

#include "cpu/attention_cpu.h"
#include "problem.h"
#include "reference.h"

namespace ringattn {

DilatedAttention::DilatedAttention(DilatedConfig config, ExecOptions options)
    : config_(std::move(config)), options_(options) {
  config_.validate();
}

void DilatedAttention::forward(const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& out, const std::optional<TensorView>& lse) const {
  const Problem p =
      make_problem(config_, q, k, v, out, lse, cpu::kMaxHeadDim, backend_name(options_.backend));
  if (options_.backend == Backend::kReference) {
    reference_forward_into(p);
  } else {
    cpu::forward(p, options_.num_threads);
  }
}

void DilatedAttention::backward(const TensorView& dout, const TensorView& q, const TensorView& k,
                                const TensorView& v, const TensorView& out, const TensorView& lse,
                                const TensorView& dq, const TensorView& dk,
                                const TensorView& dv) const {
  const BackwardProblem bp =
      make_backward_problem(config_, dout, q, k, v, out, lse, dq, dk, dv, cpu::kMaxHeadDim,
                            backend_name(options_.backend));
  if (options_.backend == Backend::kReference) {
    reference_backward_into(bp);
  } else {
    cpu::backward(bp, options_.num_threads);
  }
}

}  // namespace ringattn
