// RingDilatedAttention: validate on every rank, agree, plan the ring, and run the backend's
// part of it (the CPU ring: src/backend/cpu/ring.cc; the GPU ring: src/backend/cuda/).

#include "ringattn/ring_attention.h"

#include <memory>
#include <utility>
#include <vector>

#include "src/backend/backend.h"
#include "src/base/agreement.h"
#include "src/base/check.h"
#include "src/plan/plan_cache.h"
#include "src/plan/problem.h"
#include "src/plan/ring_plan.h"
#include "src/ring/ring_run.h"

namespace ringattn {

namespace {

// The configuration, shapes and device every rank must agree on, field by field.
std::vector<AgreedField> agreement_fields(const DilatedConfig& c, const Problem& p, Device device) {
  std::vector<AgreedField> f = {{"device (0 = host, 1 = CUDA)", {static_cast<int64_t>(device)}},
                                {"mode (0 = groups, 1 = longnet)", {static_cast<int64_t>(c.mode)}},
                                {"causal", {c.causal}},
                                {"head_offset", {c.head_offset}},
                                {"total_heads", {c.total_heads}},
                                {"segment_lengths", c.segment_lengths},
                                {"dilation_rates", c.dilation_rates}};
  const std::vector<AgreedField> shapes = shape_fields(p);
  f.insert(f.begin() + 3, shapes.begin(), shapes.end());
  return f;
}

constexpr const char* kWhat = "the configuration, shapes and device of RingDilatedAttention";

}  // namespace

RingDilatedAttention::RingDilatedAttention(DilatedConfig config, Communicator& comm,
                                           ExecOptions options)
    : config_(std::move(config)),
      comm_(comm),
      options_(options),
      plans_(std::make_shared<detail::PlanCache<RingPlan>>()) {
  check_on_all_ranks(comm_, [&] {
    config_.validate();
    options_.validate();
    require_ring_backend(options_.backend, "RingDilatedAttention");
  });
}

void RingDilatedAttention::forward(const TensorView& q, const TensorView& k, const TensorView& v,
                                   const TensorView& out, const std::optional<TensorView>& lse) {
  const int rank = comm_.rank(), world = comm_.size();
  const AttentionBackend* backend = nullptr;
  Problem p;
  std::shared_ptr<const RingPlan> plan;
  ring_call(
      comm_, {"RingDilatedAttention::forward", kWhat, "the ring"}, stats_,
      [&] {
        backend = &select_backend(options_.backend, q);
        p = make_problem(config_, q, k, v, out, lse, backend->max_head_dim(), backend->name(),
                         Shard{rank, world}, backend->device());
        backend->check_forward_tensors(q, k, v, out, lse);
        return PreparedCall{agreement_fields(config_, p, backend->device()), std::nullopt};
      },
      [&](bool) {
        plan = plans_->get(p, rank, world, [&] { return plan_ring(p, rank, world); });
        return backend->ring_forward(p, *plan, options_);
      });
}

void RingDilatedAttention::backward(const TensorView& dout, const TensorView& q,
                                    const TensorView& k, const TensorView& v, const TensorView& out,
                                    const TensorView& lse, const TensorView& dq,
                                    const TensorView& dk, const TensorView& dv) {
  const int rank = comm_.rank(), world = comm_.size();
  const AttentionBackend* backend = nullptr;
  BackwardProblem bp;
  std::shared_ptr<const RingPlan> plan;
  ring_call(
      comm_, {"RingDilatedAttention::backward", kWhat, "the ring"}, stats_,
      [&] {
        backend = &select_backend(options_.backend, q);
        bp = make_backward_problem(config_, dout, q, k, v, out, lse, dq, dk, dv,
                                   backend->max_head_dim(), backend->name(), Shard{rank, world},
                                   backend->device());
        backend->check_backward_tensors(dout, q, k, v, out, lse, dq, dk, dv);
        return PreparedCall{agreement_fields(config_, bp.fwd, backend->device()),
                            backend->needs_precise_lse(bp.fwd)};
      },
      [&](bool precise) {
        plan = plans_->get(bp.fwd, rank, world, [&] { return plan_ring(bp.fwd, rank, world); });
        return backend->ring_backward(bp, *plan, options_, precise);
      });
}

}  // namespace ringattn
