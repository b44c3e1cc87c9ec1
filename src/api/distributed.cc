#include "ringattn/distributed.h"

#include <cstring>
#include <initializer_list>
#include <utility>

#include "src/backend/backend.h"
#include "src/base/agreement.h"
#include "src/base/check.h"
#include "src/layer/multihead_layer.h"
#include "src/plan/problem.h"
#include "src/plan/ring_plan.h"

namespace ringattn {

namespace {

// Runs `check` on every rank of the grid; an Error on any rank is thrown on every rank (the
// seq_comm agreement spreads it along the sequence, the head_comm one across the heads).
void check_on_grid(Communicator& seq, Communicator& head, const std::function<void()>& check) {
  check_on_all_ranks(head, [&] { check_on_all_ranks(seq, check); });
}

// check_same_on_all_ranks over both communicators, failing on every rank of the grid.
void agree_on_grid(Communicator& seq, Communicator& head, const std::string& what,
                   const std::vector<AgreedField>& fields) {
  check_on_all_ranks(head, [&] { check_same_on_all_ranks(seq, what, fields); });
  check_on_all_ranks(seq, [&] { check_same_on_all_ranks(head, what, fields); });
}

// Runs the layer's communicating part: a failure on this rank breaks both communicators and
// tells the other ranks of both (Communicator::abort).
template <typename Fn>
void run_on_grid(Communicator& seq, Communicator& head, Fn&& fn) {
  run_or_abort(head, "the distributed layer",
               [&] { run_or_abort(seq, "the distributed layer", std::forward<Fn>(fn)); });
}

int64_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Validates the configuration on every rank and checks that the ranks agree on it.
MultiheadConfig agreed(MultiheadConfig config, Communicator& seq, Communicator& head,
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

// The attention configuration of this rank's slice of heads.
DilatedConfig head_slice(const MultiheadConfig& config, const Communicator& head) {
  DilatedConfig c = config.attention;
  c.total_heads = config.num_heads;
  c.head_offset = head.rank() * (config.num_heads / head.size());
  return c;
}

}  // namespace

DistributedDilatedAttention::DistributedDilatedAttention(MultiheadConfig config,
                                                         Communicator& seq_comm,
                                                         Communicator& head_comm, uint64_t seed,
                                                         DistributedOptions distributed,
                                                         ExecOptions options)
    : config_(agreed(std::move(config), seq_comm, head_comm, distributed, options)),
      seq_comm_(seq_comm),
      head_comm_(head_comm),
      distributed_(distributed),
      options_(options),
      ring_(head_slice(config_, head_comm), seq_comm, options),
      weights_(shard_weights(config_, MultiheadWeights::xavier(config_, seed), head_comm.rank(),
                             head_comm.size())) {}

DistributedDilatedAttention::DistributedDilatedAttention(
    MultiheadConfig config, Communicator& seq_comm, Communicator& head_comm,
    MultiheadWeights weights, DistributedOptions distributed, ExecOptions options)
    : config_(agreed(std::move(config), seq_comm, head_comm, distributed, options)),
      seq_comm_(seq_comm),
      head_comm_(head_comm),
      distributed_(distributed),
      options_(options),
      ring_(head_slice(config_, head_comm), seq_comm, options) {
  check_on_grid(seq_comm_, head_comm_, [&] { set_weights(std::move(weights)); });
}

MultiheadWeights DistributedDilatedAttention::shard_weights(const MultiheadConfig& config,
                                                            const MultiheadWeights& whole,
                                                            int head_rank, int head_ranks) {
  config.validate();
  require(head_ranks >= 1 && head_rank >= 0 && head_rank < head_ranks, "head_rank = ", head_rank,
          " of head_ranks = ", head_ranks, "; need 0 <= head_rank < head_ranks");
  require(config.num_heads % head_ranks == 0 && config.kv_heads_or_all() % head_ranks == 0,
          "head_ranks = ", head_ranks, " must divide num_heads = ", config.num_heads,
          " and kv_heads = ", config.kv_heads_or_all());
  detail::check_weights(config, detail::LayerShape::of(config), whole, "whole");
  const detail::LayerShape s = detail::LayerShape::of(config, head_ranks);
  const int64_t e = s.embed, fq = s.q_features(), fk = s.kv_features();
  const int64_t q0 = head_rank * fq, k0 = head_rank * fk;
  const auto range = [](const std::vector<float>& v, int64_t begin, int64_t count) {
    if (v.empty()) return std::vector<float>();
    return std::vector<float>(v.begin() + begin, v.begin() + begin + count);
  };
  MultiheadWeights w;
  w.wq = range(whole.wq, q0 * e, fq * e);  // rows [q0, q0 + fq) of [H*D, E]
  w.wk = range(whole.wk, k0 * e, fk * e);
  w.wv = range(whole.wv, k0 * e, fk * e);
  for (int64_t r = 0; r < e; ++r) {  // columns [q0, q0 + fq) of wo [E, H*D]
    const std::vector<float> cols = range(whole.wo, r * config.embed_dim + q0, fq);
    w.wo.insert(w.wo.end(), cols.begin(), cols.end());
  }
  w.bq = range(whole.bq, q0, fq);
  w.bk = range(whole.bk, k0, fk);
  w.bv = range(whole.bv, k0, fk);
  w.bo = whole.bo;
  w.q_norm_weight = range(whole.q_norm_weight, q0, fq);
  w.q_norm_bias = range(whole.q_norm_bias, q0, fq);
  w.k_norm_weight = range(whole.k_norm_weight, k0, fk);
  w.k_norm_bias = range(whole.k_norm_bias, k0, fk);
  w.out_norm_weight = range(whole.out_norm_weight, q0, fq);
  w.out_norm_bias = range(whole.out_norm_bias, q0, fq);
  return w;
}

void DistributedDilatedAttention::set_weights(MultiheadWeights weights) {
  detail::check_weights(config_, detail::LayerShape::of(config_, head_comm_.size()), weights,
                        "weights");
  weights_ = std::move(weights);
}

namespace {

// The head group's sums move host memory (head parallel), and the CUDA layer around the GPU
// ring (sequence parallel; both of its directions exist) has no test on a device yet: the
// distributed layer takes host tensors only.
void reject_cuda(std::initializer_list<const TensorView*> views) {
  for (const TensorView* t : views) {
    if (t->device == Device::kCUDA) {
      fail(ErrorCode::kUnsupported,
           "DistributedDilatedAttention runs on host tensors only: the head-parallel sums "
           "move host memory and the sequence-parallel layer is not enabled on CUDA tensors "
           "yet; pass host tensors (MultiheadDilatedAttention takes CUDA tensors on one GPU, "
           "RingDilatedAttention on several)");
    }
  }
}

detail::MultiheadLayer make_layer(const MultiheadConfig& config, RingDilatedAttention& ring,
                                  Communicator& seq, Communicator& head,
                                  const ExecOptions& options) {
  detail::AttentionCore core;
  core.check = [&](const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& out, const TensorView& lse) {
    const AttentionBackend& backend = select_backend(options.backend, q);
    const Problem p = make_problem(ring.config(), q, k, v, out, lse, backend.max_head_dim(),
                                   backend.name(), Shard{seq.rank(), seq.size()});
    plan_ring(p, seq.rank(), seq.size());  // every branch fits the shards
  };
  core.forward = [&](const TensorView& q, const TensorView& k, const TensorView& v,
                     const TensorView& out,
                     const TensorView& lse) { ring.forward(q, k, v, out, lse); };
  core.backward = [&](const TensorView& dout, const TensorView& q, const TensorView& k,
                      const TensorView& v, const TensorView& out, const TensorView& lse,
                      const TensorView& dq, const TensorView& dk,
                      const TensorView& dv) { ring.backward(dout, q, k, v, out, lse, dq, dk, dv); };
  core.bf16_products = host_bf16_products(options);
  detail::HeadGroup group;
  if (head.size() > 1) {
    group.sum_norm_stats = [&head](double* data, int64_t n) {
      head.allreduce_sum(data, static_cast<size_t>(n));
    };
    group.sum = [&head](float* data, int64_t n) {
      head.allreduce_sum(data, static_cast<size_t>(n));
    };
  }
  return detail::MultiheadLayer(config, detail::LayerShape::of(config, head.size()),
                                std::move(core), std::move(group), options.num_threads);
}

}  // namespace

void DistributedDilatedAttention::forward(const TensorView& x, const TensorView& y,
                                          MultiheadSaved* saved) {
  forward(x, x, x, y, saved);
}

void DistributedDilatedAttention::forward(const TensorView& query, const TensorView& key,
                                          const TensorView& value, const TensorView& y,
                                          MultiheadSaved* saved) {
  guarded("DistributedDilatedAttention::forward",
          [&] { run_forward(query, key, value, y, saved); });
}

void DistributedDilatedAttention::run_forward(const TensorView& query, const TensorView& key,
                                              const TensorView& value, const TensorView& y,
                                              MultiheadSaved* saved) {
  MultiheadSaved local;
  MultiheadSaved& s = saved ? *saved : local;
  const detail::MultiheadLayer layer = make_layer(config_, ring_, seq_comm_, head_comm_, options_);
  detail::ForwardCall call;
  check_on_grid(seq_comm_, head_comm_, [&] {
    reject_cuda({&query, &key, &value, &y});
    call = detail::forward_call(config_.embed_dim, query, key, value, y);
    layer.prepare(call.in, s);
  });
  agree_on_grid(seq_comm_, head_comm_, "the shapes of DistributedDilatedAttention::forward",
                {{"B", {call.in.batch}}, {"N_loc", {call.in.seq}}});
  run_on_grid(seq_comm_, head_comm_, [&] {
    layer.forward(weights_, call.in, call.y, s);
    call.finish();
  });
}

void DistributedDilatedAttention::backward(const TensorView& x, const TensorView& dy,
                                           const MultiheadSaved& saved, const TensorView& dx,
                                           MultiheadWeights& grads) {
  backward(x, x, x, dy, saved, dx, dx, dx, grads);
}

void DistributedDilatedAttention::backward(const TensorView& query, const TensorView& key,
                                           const TensorView& value, const TensorView& dy,
                                           const MultiheadSaved& saved, const TensorView& dquery,
                                           const TensorView& dkey, const TensorView& dvalue,
                                           MultiheadWeights& grads) {
  guarded("DistributedDilatedAttention::backward",
          [&] { run_backward(query, key, value, dy, saved, dquery, dkey, dvalue, grads); });
}

void DistributedDilatedAttention::run_backward(const TensorView& query, const TensorView& key,
                                               const TensorView& value, const TensorView& dy,
                                               const MultiheadSaved& saved,
                                               const TensorView& dquery, const TensorView& dkey,
                                               const TensorView& dvalue, MultiheadWeights& grads) {
  const detail::MultiheadLayer layer = make_layer(config_, ring_, seq_comm_, head_comm_, options_);
  detail::BackwardCall call;
  check_on_grid(seq_comm_, head_comm_, [&] {
    reject_cuda({&query, &key, &value, &dy, &dquery, &dkey, &dvalue});
    call = detail::backward_call(config_.embed_dim, query, key, value, dy, dquery, dkey, dvalue);
    layer.check_saved(call.in, saved);
  });
  agree_on_grid(seq_comm_, head_comm_, "the shapes of DistributedDilatedAttention::backward",
                {{"B", {call.in.batch}}, {"N_loc", {call.in.seq}}});
  run_on_grid(seq_comm_, head_comm_, [&] {
    layer.backward(weights_, call.in, call.dy, saved, call.dquery, call.dkey, call.dvalue, grads);
    call.finish();
    if (distributed_.reduce_weight_grads && seq_comm_.size() > 1) reduce_weight_grads(grads);
  });
}

void DistributedDilatedAttention::reduce_weight_grads(MultiheadWeights& grads) {
  // One allreduce for every gradient buffer, in param_specs order.
  const std::vector<detail::ParamSpec> specs =
      detail::param_specs(config_, detail::LayerShape::of(config_, head_comm_.size()));
  std::vector<float> packed;
  for (const detail::ParamSpec& p : specs) {
    packed.insert(packed.end(), (grads.*p.member).begin(), (grads.*p.member).end());
  }
  seq_comm_.allreduce_sum(packed.data(), packed.size());
  size_t at = 0;
  for (const detail::ParamSpec& p : specs) {
    std::vector<float>& g = grads.*p.member;
    std::copy(packed.begin() + static_cast<std::ptrdiff_t>(at),
              packed.begin() + static_cast<std::ptrdiff_t>(at + g.size()), g.begin());
    at += g.size();
  }
}

}  // namespace ringattn
