// MultiheadDilatedAttention: the multihead layer with DilatedAttention as its core, built
// once per object.

#include "ringattn/multihead.h"

#include <cmath>
#include <memory>
#include <utility>

#include "src/base/check.h"
#include "src/layer/cores.h"
#include "src/layer/multihead_layer.h"

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

size_t MultiheadSaved::bytes() const {
  size_t n = 0;
  for (const std::vector<float>* buf :
       {&q, &k, &v, &q_n, &k_n, &attn, &attn_n, &lse, &q_stats, &k_stats, &attn_stats}) {
    n += buf->size();
  }
  return (n + static_cast<size_t>(device_floats)) * sizeof(float);
}

namespace {

std::shared_ptr<const detail::MultiheadLayer> make_layer(const MultiheadConfig& config,
                                                         const DilatedAttention& attention,
                                                         const ExecOptions& options) {
  return std::make_shared<const detail::MultiheadLayer>(
      config, detail::LayerShape::of(config), detail::dilated_core(attention, options),
      detail::HeadGroup{}, options.num_threads, options.cuda_stream);
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
