#include "ringattn/multihead.h"

#include <cmath>
#include <iterator>
#include <numbers>
#include <utility>

#include "src/backend/backend.h"
#include "src/base/check.h"
#include "src/layer/multihead_layer.h"
#include "src/plan/problem.h"

namespace ringattn {

void MultiheadConfig::validate() const {
  require(embed_dim >= 1, "embed_dim = ", embed_dim, "; it must be >= 1");
  require(num_heads >= 1, "num_heads = ", num_heads, "; it must be >= 1");
  require(embed_dim % num_heads == 0, "embed_dim = ", embed_dim,
          " is not a multiple of num_heads = ", num_heads,
          "; the head dim is embed_dim / num_heads: use an embed_dim that num_heads ",
          "divides (e.g. ", (embed_dim / num_heads + 1) * num_heads, ")");
  require(kv_heads >= 0, "kv_heads = ", kv_heads, "; it must be >= 1 (or 0 for num_heads)");
  require(num_heads % kv_heads_or_all() == 0, "kv_heads = ", kv_heads,
          " does not divide num_heads = ", num_heads,
          "; grouped-query attention needs num_heads to be a multiple of kv_heads");
  require(std::isfinite(layer_norm_eps) && layer_norm_eps > 0.0f,
          "layer_norm_eps = ", layer_norm_eps, "; it must be finite and > 0 (e.g. 1e-5)");
  require(std::isfinite(gamma_init), "gamma_init = ", gamma_init, "; it must be finite");
  require(attention.head_offset == 0 && attention.total_heads == 0,
          "attention.head_offset = ", attention.head_offset,
          " and attention.total_heads = ", attention.total_heads,
          "; leave both 0 (DistributedDilatedAttention sets them for its slice of heads)");
  attention.validate();
}

namespace {

uint64_t mix(uint64_t z) {  // splitmix64's finaliser
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A N(0, 1) sample that depends only on (seed, tensor, index): Box-Muller on a hash.
float normal_sample(uint64_t seed, uint64_t tensor, uint64_t index) {
  const uint64_t h = mix(mix(seed ^ mix(tensor)) + index);
  const double u1 = static_cast<double>((h >> 40) + 1) * 0x1p-24;  // (0, 1]
  const double u2 = static_cast<double>(h & 0xffffffu) * 0x1p-24;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2));
}

}  // namespace

MultiheadWeights MultiheadWeights::zeros(const MultiheadConfig& config) {
  config.validate();
  return detail::zero_weights(config, detail::LayerShape::of(config));
}

MultiheadWeights MultiheadWeights::xavier(const MultiheadConfig& config, uint64_t seed) {
  MultiheadWeights w = zeros(config);
  const int64_t e = config.embed_dim, fq = e, fk = config.kv_heads_or_all() * config.head_dim();
  // torch.nn.init.xavier_normal_ on a [out, in] weight: std = gain sqrt(2 / (in + out)).
  const struct {
    std::vector<float>& weight;
    int64_t out, in;
    float gain;
  } init[] = {{w.wq, fq, e, 1.0f},
              {w.wk, fk, e, 1.0f},
              {w.wv, fk, e, config.gamma_init},
              {w.wo, e, fq, config.gamma_init}};
  for (uint64_t t = 0; t < std::size(init); ++t) {
    const auto& x = init[t];
    const double std = x.gain * std::sqrt(2.0 / static_cast<double>(x.in + x.out));
    for (size_t i = 0; i < x.weight.size(); ++i) {
      x.weight[i] = static_cast<float>(std * normal_sample(seed, t, i));
    }
  }
  for (std::vector<float>* ones : {&w.q_norm_weight, &w.k_norm_weight, &w.out_norm_weight}) {
    ones->assign(ones->size(), 1.0f);
  }
  return w;
}

size_t MultiheadSaved::bytes() const {
  size_t n = 0;
  for (const std::vector<float>* buf :
       {&q, &k, &v, &q_n, &k_n, &attn, &attn_n, &lse, &q_stats, &k_stats, &attn_stats}) {
    n += buf->size();
  }
  return (n + static_cast<size_t>(device_floats)) * sizeof(float);
}

namespace {

// The layer of one object: its core holds copies of the attention and the options, so that
// the layer outlives nothing it uses.
std::shared_ptr<const detail::MultiheadLayer> make_layer(const MultiheadConfig& config,
                                                         const DilatedAttention& attention,
                                                         const ExecOptions& options) {
  detail::AttentionCore core;
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
  return std::make_shared<const detail::MultiheadLayer>(config, detail::LayerShape::of(config),
                                                        std::move(core), detail::HeadGroup{},
                                                        options.num_threads, options.cuda_stream);
}

}  // namespace

MultiheadDilatedAttention::MultiheadDilatedAttention(MultiheadConfig config, uint64_t seed,
                                                     ExecOptions options)
    : MultiheadDilatedAttention(config, MultiheadWeights::xavier(config, seed), options) {}

MultiheadDilatedAttention::MultiheadDilatedAttention(MultiheadConfig config,
                                                     MultiheadWeights weights, ExecOptions options)
    : config_((config.validate(), std::move(config))),
      options_(options),
      attention_(config_.attention, options),
      layer_(make_layer(config_, attention_, options_)) {
  set_weights(std::move(weights));
}

void MultiheadDilatedAttention::set_weights(MultiheadWeights weights) {
  detail::check_weights(config_, detail::LayerShape::of(config_), weights, "weights");
  weights_ = std::move(weights);
}

void MultiheadDilatedAttention::forward(const TensorView& x, const TensorView& y,
                                        MultiheadSaved* saved) const {
  forward(x, x, x, y, saved);
}

void MultiheadDilatedAttention::forward(const TensorView& query, const TensorView& key,
                                        const TensorView& value, const TensorView& y,
                                        MultiheadSaved* saved) const {
  guarded("MultiheadDilatedAttention::forward", [&] {
    const detail::ForwardCall call = detail::forward_call(config_.embed_dim, query, key, value, y);
    MultiheadSaved local;
    MultiheadSaved& s = saved ? *saved : local;
    layer_->prepare(call.in, s);
    layer_->forward(weights_, call.in, call.y, s);
    call.finish();
  });
}

void MultiheadDilatedAttention::backward(const TensorView& x, const TensorView& dy,
                                         const MultiheadSaved& saved, const TensorView& dx,
                                         MultiheadWeights& grads) const {
  backward(x, x, x, dy, saved, dx, dx, dx, grads);
}

void MultiheadDilatedAttention::backward(const TensorView& query, const TensorView& key,
                                         const TensorView& value, const TensorView& dy,
                                         const MultiheadSaved& saved, const TensorView& dquery,
                                         const TensorView& dkey, const TensorView& dvalue,
                                         MultiheadWeights& grads) const {
  guarded("MultiheadDilatedAttention::backward", [&] {
    const detail::BackwardCall call =
        detail::backward_call(config_.embed_dim, query, key, value, dy, dquery, dkey, dvalue);
    layer_->backward(weights_, call.in, call.dy, saved, call.dquery, call.dkey, call.dvalue, grads);
    call.finish();
  });
}

}  // namespace ringattn
