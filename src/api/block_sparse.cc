// BlockSparseRingDilatedAttention: validate on every rank, agree, plan the block transfers
// (src/plan/block_sparse_plan.h), and run the backend's part (the CPU block ring:
// src/backend/cpu/block_ring.cc; one CUDA device: src/backend/cuda/).

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ringattn/block_sparse.h"
#include "src/backend/backend.h"
#include "src/base/agreement.h"
#include "src/base/check.h"
#include "src/plan/block_sparse_plan.h"
#include "src/plan/plan_cache.h"
#include "src/plan/problem.h"
#include "src/ring/ring_run.h"

namespace ringattn {

namespace {

// What every rank must agree on, field by field: the patterns, shapes and options.
std::vector<AgreedField> agreement_fields(const BlockSparseConfig& c, const Problem& p) {
  std::vector<AgreedField> f = shape_fields(p);
  f.insert(f.begin(), {"causal", {c.causal}});
  f.push_back({"the number of patterns", {static_cast<int64_t>(c.patterns.size())}});
  for (size_t i = 0; i < c.patterns.size(); ++i) {
    const BlockPattern& x = c.patterns[i];
    const std::string name = "patterns[" + std::to_string(i) + "]";
    f.push_back({name + " (kind, block_size, window, global_blocks)",
                 {static_cast<int64_t>(x.kind), x.block_size, x.window, x.global_blocks}});
    f.push_back({name + ".rates", x.rates});
    f.push_back({name + ".row_ptr", x.row_ptr});
    f.push_back({name + ".cols", x.cols});
  }
  return f;
}

// The dilated problem the kernels run: one dense branch over the whole sequence (key index =
// global row), so the shapes, dtypes and strides are validated as for dilated attention.
DilatedConfig dense_config(const BlockSparseConfig& c, const TensorView& q, int world) {
  DilatedConfig d;
  // (make_problem rejects a q.shape[1] that overflows N; until then, any valid length.)
  const int64_t rows = q.shape[1] >= 1 && q.shape[1] <= INT64_MAX / world ? q.shape[1] : 1;
  d.segment_lengths = {world * rows};
  d.dilation_rates = {1};
  d.mode = Mode::kLongNet;
  d.causal = c.causal;
  d.scale = c.scale;
  return d;
}

constexpr const char* kWhat = "the patterns, shapes and options of BlockSparseRingDilatedAttention";

// The backend that runs a call (select_backend), if it runs the block-sparse ring on `world`
// ranks.
const AttentionBackend& sparse_backend(const TensorView& q, Backend requested, int world) {
  const AttentionBackend& backend = select_backend(requested, q);
  backend.check_sparse_ranks(world);
  return backend;
}

}  // namespace

BlockSparseRingDilatedAttention::BlockSparseRingDilatedAttention(BlockSparseConfig config,
                                                                 Communicator& comm,
                                                                 ExecOptions options)
    : config_(std::move(config)),
      comm_(comm),
      options_(options),
      plans_(std::make_shared<detail::PlanCache<BlockSparsePlan>>()) {
  check_on_all_ranks(comm_, [&] {
    config_.validate();
    options_.validate();
    require_ring_backend(options_.backend, "BlockSparseRingDilatedAttention");
  });
}

void BlockSparseRingDilatedAttention::forward(const TensorView& q, const TensorView& k,
                                              const TensorView& v, const TensorView& out,
                                              const std::optional<TensorView>& lse) {
  const int rank = comm_.rank(), world = comm_.size();
  const AttentionBackend* backend = nullptr;
  Problem p;
  std::shared_ptr<const BlockSparsePlan> plan;
  ring_call(
      comm_, {"BlockSparseRingDilatedAttention::forward", kWhat, "block-sparse attention"}, stats_,
      [&] {
        backend = &sparse_backend(q, options_.backend, world);
        p = make_problem(dense_config(config_, q, world), q, k, v, out, lse,
                         backend->max_head_dim(), backend->name(), Shard{rank, world},
                         backend->device());
        backend->check_forward_tensors(q, k, v, out, lse);
        return PreparedCall{agreement_fields(config_, p), std::nullopt};
      },
      [&](bool) {
        plan =
            plans_->get(p, rank, world, [&] { return plan_block_sparse(config_, p, rank, world); });
        return backend->sparse_forward(p, *plan, options_);
      });
}

void BlockSparseRingDilatedAttention::backward(const TensorView& dout, const TensorView& q,
                                               const TensorView& k, const TensorView& v,
                                               const TensorView& out, const TensorView& lse,
                                               const TensorView& dq, const TensorView& dk,
                                               const TensorView& dv) {
  const int rank = comm_.rank(), world = comm_.size();
  const AttentionBackend* backend = nullptr;
  BackwardProblem bp;
  std::shared_ptr<const BlockSparsePlan> plan;
  ring_call(
      comm_, {"BlockSparseRingDilatedAttention::backward", kWhat, "block-sparse attention"}, stats_,
      [&] {
        backend = &sparse_backend(q, options_.backend, world);
        bp = make_backward_problem(dense_config(config_, q, world), dout, q, k, v, out, lse, dq, dk,
                                   dv, backend->max_head_dim(), backend->name(), Shard{rank, world},
                                   backend->device());
        backend->check_backward_tensors(dout, q, k, v, out, lse, dq, dk, dv);
        return PreparedCall{agreement_fields(config_, bp.fwd), backend->needs_precise_lse(bp.fwd)};
      },
      [&](bool precise) {
        plan = plans_->get(bp.fwd, rank, world,
                           [&] { return plan_block_sparse(config_, bp.fwd, rank, world); });
        return backend->sparse_backward(bp, *plan, options_, precise);
      });
}

}  // namespace ringattn
