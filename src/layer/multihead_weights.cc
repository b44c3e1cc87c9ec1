// The layer's parameters as the public API makes them: zeros, torch's Xavier initialisation
// (from a counter-based generator, so the same on every machine and rank), and a head
// group's slice of whole weights.

#include <cmath>
#include <iterator>
#include <numbers>

#include "ringattn/distributed.h"
#include "ringattn/multihead.h"
#include "src/base/check.h"
#include "src/layer/multihead_layer.h"

namespace ringattn {

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

}  // namespace ringattn
