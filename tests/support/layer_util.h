#pragma once
// Shared by the multihead and distributed layer tests: configurations, weights with every
// parameter non-trivial, and [B, N, E] inputs.

#include <cstring>
#include <random>
#include <vector>

#include "ringattn/ringattn.h"
#include "src/base/dtype.h"

namespace ringattn::test {

struct LayerCase {
  int64_t B, N, E, H, Hkv;
  std::vector<int64_t> s, r;
  Mode mode;
  bool causal;
  bool bias = true, layer_norm = true;

  MultiheadConfig config() const {
    MultiheadConfig c;
    c.embed_dim = E;
    c.num_heads = H;
    c.kv_heads = Hkv;
    c.attention.segment_lengths = s;
    c.attention.dilation_rates = r;
    c.attention.mode = mode;
    c.attention.causal = causal;
    c.bias = bias;
    c.layer_norm = layer_norm;
    return c;
  }
};

// Every parameter of MultiheadWeights with its name, for loops over weights or gradients.
struct WeightParam {
  std::vector<float> MultiheadWeights::*member;
  const char* name;
};
inline constexpr WeightParam kWeightParams[] = {
    {&MultiheadWeights::wq, "wq"},
    {&MultiheadWeights::bq, "bq"},
    {&MultiheadWeights::wk, "wk"},
    {&MultiheadWeights::bk, "bk"},
    {&MultiheadWeights::wv, "wv"},
    {&MultiheadWeights::bv, "bv"},
    {&MultiheadWeights::wo, "wo"},
    {&MultiheadWeights::bo, "bo"},
    {&MultiheadWeights::q_norm_weight, "q_norm_weight"},
    {&MultiheadWeights::q_norm_bias, "q_norm_bias"},
    {&MultiheadWeights::k_norm_weight, "k_norm_weight"},
    {&MultiheadWeights::k_norm_bias, "k_norm_bias"},
    {&MultiheadWeights::out_norm_weight, "out_norm_weight"},
    {&MultiheadWeights::out_norm_bias, "out_norm_bias"}};

// Xavier weights from `seed`, with random biases and LayerNorm parameters (all non-zero, so
// that each one matters in forward).
inline MultiheadWeights random_weights(const MultiheadConfig& config, uint64_t seed) {
  MultiheadWeights w = MultiheadWeights::xavier(config, seed);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::normal_distribution<float> small(0.0f, 0.3f);
  for (std::vector<float>* b :
       {&w.bq, &w.bk, &w.bv, &w.bo, &w.q_norm_bias, &w.k_norm_bias, &w.out_norm_bias}) {
    for (float& x : *b) x = small(rng);
  }
  for (std::vector<float>* g : {&w.q_norm_weight, &w.k_norm_weight, &w.out_norm_weight}) {
    for (float& x : *g) x = 1.0f + small(rng);
  }
  return w;
}

// n N(0, 1) samples.
inline std::vector<float> normal_vector(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

inline TensorView bne(const std::vector<float>& data, int64_t B, int64_t N, int64_t E) {
  return TensorView::contiguous(const_cast<float*>(data.data()), DType::kF32, {B, N, E});
}

// x rounded to bf16 or fp16: the elements' bits and the fp32 values they hold.
struct Rounded {
  std::vector<uint16_t> bits;
  std::vector<float> values;
};
inline Rounded round_to(DType dtype, const std::vector<float>& x) {
  Rounded r;
  for (float v : x) {
    uint16_t bits;
    if (dtype == DType::kBF16) {
      const bf16_t h = from_f32<bf16_t>(v);
      std::memcpy(&bits, &h, sizeof bits);
      r.values.push_back(to_f32(h));
    } else {
      const fp16_t h = from_f32<fp16_t>(v);
      std::memcpy(&bits, &h, sizeof bits);
      r.values.push_back(to_f32(h));
    }
    r.bits.push_back(bits);
  }
  return r;
}

}  // namespace ringattn::test
