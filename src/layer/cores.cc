// The attention cores and head groups of the layer classes, and the distributed layer's
// configuration agreement and weight-gradient sum.

#include "src/layer/cores.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>

#include "src/backend/backend.h"
#include "src/base/agreement.h"
#include "src/base/check.h"
#include "src/plan/problem.h"
#include "src/plan/ring_plan.h"

namespace ringattn::detail {

AttentionCore dilated_core(const DilatedAttention& attention, const ExecOptions& options) {
  AttentionCore core;
  core.check = [attention, options](const TensorView& q, const TensorView& k, const TensorView& v,
                                    const TensorView& out, const TensorView& lse) {
    // DilatedAttention's rule: the tensors' device picks the backend.
    const AttentionBackend& backend = select_backend(options.backend, q);
    make_problem(attention.config(), q, k, v, out, lse, backend.max_head_dim(), backend.name());
  };
  core.forward = [attention](const TensorView& q, const TensorView& k, const TensorView& v,
                             const TensorView& out,
                             const TensorView& lse) { attention.forward(q, k, v, out, lse); };
  core.backward = [attention](const TensorView& dout, const TensorView& q, const TensorView& k,
                              const TensorView& v, const TensorView& out, const TensorView& lse,
                              const TensorView& dq, const TensorView& dk, const TensorView& dv) {
    attention.backward(dout, q, k, v, out, lse, dq, dk, dv);
  };
  core.bf16_products = host_bf16_products(options);
  return core;
}

AttentionCore ring_core(std::shared_ptr<RingDilatedAttention> ring, Communicator& seq,
                        const ExecOptions& options) {
  AttentionCore core;
  core.check = [ring, &seq, options](const TensorView& q, const TensorView& k, const TensorView& v,
                                     const TensorView& out, const TensorView& lse) {
    const AttentionBackend& backend = select_backend(options.backend, q);
    const Problem p = make_problem(ring->config(), q, k, v, out, lse, backend.max_head_dim(),
                                   backend.name(), Shard{seq.rank(), seq.size()});
    plan_ring(p, seq.rank(), seq.size());  // every branch fits the shards
  };
  core.forward = [ring](const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& out,
                        const TensorView& lse) { ring->forward(q, k, v, out, lse); };
  core.backward = [ring](const TensorView& dout, const TensorView& q, const TensorView& k,
                         const TensorView& v, const TensorView& out, const TensorView& lse,
                         const TensorView& dq, const TensorView& dk, const TensorView& dv) {
    ring->backward(dout, q, k, v, out, lse, dq, dk, dv);
  };
  core.bf16_products = host_bf16_products(options);
  return core;
}

std::shared_ptr<RingDilatedAttention> head_slice_ring(const MultiheadConfig& config,
                                                      Communicator& seq, Communicator& head,
                                                      const ExecOptions& options) {
  DilatedConfig c = config.attention;
  c.total_heads = config.num_heads;
  c.head_offset = head.rank() * (config.num_heads / head.size());
  return std::make_shared<RingDilatedAttention>(std::move(c), seq, options);
}

std::shared_ptr<const MultiheadLayer> distributed_layer(
    const MultiheadConfig& config, const std::shared_ptr<RingDilatedAttention>& ring,
    Communicator& seq, Communicator& head, const ExecOptions& options) {
  return std::make_shared<const MultiheadLayer>(config, LayerShape::of(config, head.size()),
                                                ring_core(ring, seq, options), head_group(head),
                                                options.num_threads);
}

HeadGroup head_group(Communicator& head) {
  HeadGroup group;
  if (head.size() > 1) {
    group.sum_norm_stats = [&head](double* data, int64_t n) {
      head.allreduce_sum(data, static_cast<size_t>(n));
    };
    group.sum = [&head](float* data, int64_t n) {
      head.allreduce_sum(data, static_cast<size_t>(n));
    };
  }
  return group;
}

namespace {

int64_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

}  // namespace

MultiheadConfig agreed_config(MultiheadConfig config, Communicator& seq, Communicator& head,
                              const DistributedOptions& distributed, const ExecOptions& options) {
  check_on_grid(seq, head, [&] {
    config.validate();
    if (options.backend != Backend::kCpu) {
      fail(ErrorCode::kUnsupported, "backend = ", backend_name(options.backend),
           " cannot run DistributedDilatedAttention; use backend = cpu");
    }
    const int hp = head.size();
    require(config.num_heads % hp == 0 && config.kv_heads_or_all() % hp == 0, "head_comm has ", hp,
            " ranks, which must divide num_heads = ", config.num_heads,
            " and kv_heads = ", config.kv_heads_or_all(),
            "; use a head group size that divides both");
  });
  const DilatedConfig& a = config.attention;
  const std::vector<AgreedField> fields = {
      {"embed_dim", {config.embed_dim}},
      {"num_heads", {config.num_heads}},
      {"kv_heads", {config.kv_heads_or_all()}},
      {"bias", {config.bias}},
      {"layer_norm", {config.layer_norm}},
      {"layer_norm_eps (fp32 bits)", {float_bits(config.layer_norm_eps)}},
      {"gamma_init (fp32 bits)", {float_bits(config.gamma_init)}},
      {"attention.mode (0 = groups, 1 = longnet)", {static_cast<int64_t>(a.mode)}},
      {"attention.causal", {a.causal}},
      {"attention.scale (fp32 bits, -1 = unset)", {a.scale ? float_bits(*a.scale) : -1}},
      {"reduce_weight_grads", {distributed.reduce_weight_grads}},
      {"seq_comm size", {seq.size()}},
      {"head_comm size", {head.size()}},
      {"attention.segment_lengths", a.segment_lengths},
      {"attention.dilation_rates", a.dilation_rates}};
  agree_on_grid(seq, head, "the configuration of DistributedDilatedAttention", fields);
  return config;
}

void sum_weight_grads(const MultiheadConfig& config, const LayerShape& shape,
                      MultiheadWeights& grads, Communicator& seq) {
  const std::vector<ParamSpec> specs = param_specs(config, shape);
  std::vector<float> packed;
  for (const ParamSpec& p : specs) {
    packed.insert(packed.end(), (grads.*p.member).begin(), (grads.*p.member).end());
  }
  seq.allreduce_sum(packed.data(), packed.size());
  size_t at = 0;
  for (const ParamSpec& p : specs) {
    std::vector<float>& g = grads.*p.member;
    std::copy(packed.begin() + static_cast<std::ptrdiff_t>(at),
              packed.begin() + static_cast<std::ptrdiff_t>(at + g.size()), g.begin());
    at += g.size();
  }
}

}  // namespace ringattn::detail
