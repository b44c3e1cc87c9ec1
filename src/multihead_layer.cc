#include "multihead_layer.h"

#include <algorithm>
#include <memory>

#include "check.h"

namespace ringattn::detail {

LayerShape LayerShape::of(const MultiheadConfig& config, int head_ranks) {
  LayerShape s;
  s.embed = config.embed_dim;
  s.head_dim = config.head_dim();
  s.total_heads = config.num_heads;
  s.total_kv_heads = config.kv_heads_or_all();
  s.heads = s.total_heads / head_ranks;
  s.kv_heads = s.total_kv_heads / head_ranks;
  return s;
}

std::vector<ParamSpec> param_specs(const MultiheadConfig& config, const LayerShape& s) {
  const int64_t e = s.embed, fq = s.q_features(), fk = s.kv_features();
  using W = MultiheadWeights;
  std::vector<ParamSpec> specs = {{&W::wq, "wq", fq * e},
                                  {&W::wk, "wk", fk * e},
                                  {&W::wv, "wv", fk * e},
                                  {&W::wo, "wo", e * fq}};
  if (config.bias) {
    specs.insert(specs.end(),
                 {{&W::bq, "bq", fq}, {&W::bk, "bk", fk}, {&W::bv, "bv", fk}, {&W::bo, "bo", e}});
  }
  if (config.layer_norm) {
    specs.insert(specs.end(), {{&W::q_norm_weight, "q_norm_weight", fq},
                               {&W::q_norm_bias, "q_norm_bias", fq},
                               {&W::k_norm_weight, "k_norm_weight", fk},
                               {&W::k_norm_bias, "k_norm_bias", fk},
                               {&W::out_norm_weight, "out_norm_weight", fq},
                               {&W::out_norm_bias, "out_norm_bias", fq}});
  }
  return specs;
}

namespace {

// Every buffer of MultiheadWeights (as with bias and layer_norm), sized for `shape`.
std::vector<ParamSpec> every_param(MultiheadConfig config, const LayerShape& shape) {
  config.bias = config.layer_norm = true;
  return param_specs(config, shape);
}

}  // namespace

MultiheadWeights zero_weights(const MultiheadConfig& config, const LayerShape& shape) {
  MultiheadWeights w;
  for (const ParamSpec& p : param_specs(config, shape)) {
    (w.*p.member).assign(static_cast<size_t>(p.size), 0.0f);
  }
  return w;
}

void check_weights(const MultiheadConfig& config, const LayerShape& shape,
                   const MultiheadWeights& weights, const char* what) {
  const std::vector<ParamSpec> specs = param_specs(config, shape);
  for (const ParamSpec& p : every_param(config, shape)) {  // those absent must be empty
    const bool present = std::any_of(specs.begin(), specs.end(),
                                     [&](const ParamSpec& x) { return x.member == p.member; });
    const size_t size = (weights.*p.member).size();
    const int64_t want = present ? p.size : 0;
    require(static_cast<int64_t>(size) == want, what, ".", p.name, " has ", size,
            " elements but must have ", want,
            present            ? " (see MultiheadWeights for the layout)"
            : p.name[0] == 'b' ? " (the layer has bias = false; leave it empty)"
                               : " (the layer has layer_norm = false; leave it empty)");
  }
}

namespace {

float* embed_rows(const TensorView& t, const char* name, int64_t embed, int64_t& batch,
                  int64_t& seq) {
  require(t.ndim == 3, name, " has ", t.ndim, " dimensions; it must be [B, N, E] with E = ", embed);
  require(t.data != nullptr, name, ".data is null; pass a buffer holding [B, N, E]");
  require(t.device == Device::kCPU, name,
          " lives on a CUDA device, but the multihead layers run on the CPU; pass a host buffer");
  if (t.dtype != DType::kF32) {
    fail(ErrorCode::kUnsupported, name, " is ", dtype_name(t.dtype),
         "; the multihead layers compute in fp32: pass fp32 tensors");
  }
  require(t.shape[2] == embed, name, ".shape[2] = ", t.shape[2], " but the layer's embed_dim is ",
          embed, "; pass [B, N, E] with E = ", embed);
  require(t.shape[0] >= 1 && t.shape[1] >= 1, name, " is [", t.shape[0], ", ", t.shape[1], ", ",
          t.shape[2], "]; B and N must be >= 1");
  require(t.strides[2] == 1 && t.strides[1] == embed && t.strides[0] == t.shape[1] * embed, name,
          " has strides [", t.strides[0], ", ", t.strides[1], ", ", t.strides[2],
          "]; it must be contiguous [B, N, E]: make a contiguous copy");
  if (batch == 0) {
    batch = t.shape[0];
    seq = t.shape[1];
  }
  require(t.shape[0] == batch && t.shape[1] == seq, name, " is [", t.shape[0], ", ", t.shape[1],
          ", ", embed, "] but the call's first tensor is [", batch, ", ", seq, ", ", embed,
          "]; every tensor of one call has the same B and N");
  return static_cast<float*>(t.data);
}

}  // namespace

ForwardCall forward_call(int64_t embed, const TensorView& query, const TensorView& key,
                         const TensorView& value, const TensorView& y, const char* y_name) {
  ForwardCall c;
  c.in.query = embed_rows(query, "query", embed, c.in.batch, c.in.seq);
  c.in.key = embed_rows(key, "key", embed, c.in.batch, c.in.seq);
  c.in.value = embed_rows(value, "value", embed, c.in.batch, c.in.seq);
  c.y = embed_rows(y, y_name, embed, c.in.batch, c.in.seq);
  return c;
}

BackwardCall backward_call(int64_t embed, const TensorView& query, const TensorView& key,
                           const TensorView& value, const TensorView& dy, const TensorView& dquery,
                           const TensorView& dkey, const TensorView& dvalue) {
  BackwardCall c;
  const ForwardCall f = forward_call(embed, query, key, value, dy, "dy");
  c.in = f.in;
  c.dy = f.y;
  c.dquery = embed_rows(dquery, "dquery", embed, c.in.batch, c.in.seq);
  c.dkey = embed_rows(dkey, "dkey", embed, c.in.batch, c.in.seq);
  c.dvalue = embed_rows(dvalue, "dvalue", embed, c.in.batch, c.in.seq);
  return c;
}

namespace {

TensorView bnhd(const float* data, int64_t b, int64_t n, int64_t h, int64_t d) {
  return TensorView::contiguous(const_cast<float*>(data), DType::kF32, {b, n, h, d});
}

}  // namespace

MultiheadLayer::Views MultiheadLayer::attention_views(MultiheadSaved& s) const {
  const int64_t b = s.batch, n = s.seq, d = shape_.head_dim;
  const bool ln = config_.layer_norm;
  return {bnhd(ln ? s.q_n.data() : s.q.data(), b, n, shape_.heads, d),
          bnhd(ln ? s.k_n.data() : s.k.data(), b, n, shape_.kv_heads, d),
          bnhd(s.v.data(), b, n, shape_.kv_heads, d), bnhd(s.attn.data(), b, n, shape_.heads, d),
          TensorView::contiguous(s.lse.data(), DType::kF32, {b, shape_.heads, n})};
}

void MultiheadLayer::prepare(const LayerInputs& in, MultiheadSaved& s) const {
  s.batch = in.batch;
  s.seq = in.seq;
  const size_t rows = static_cast<size_t>(in.batch * in.seq);
  const size_t fq = static_cast<size_t>(shape_.q_features());
  const size_t fk = static_cast<size_t>(shape_.kv_features());
  const bool ln = config_.layer_norm;
  s.q.resize(rows * fq);
  s.k.resize(rows * fk);
  s.v.resize(rows * fk);
  s.attn.resize(rows * fq);
  s.lse.resize(rows * static_cast<size_t>(shape_.heads));
  s.q_n.resize(ln ? rows * fq : 0);
  s.k_n.resize(ln ? rows * fk : 0);
  s.attn_n.resize(ln ? rows * fq : 0);
  for (std::vector<float>* stats : {&s.q_stats, &s.k_stats, &s.attn_stats}) {
    stats->resize(ln ? 2 * rows : 0);
  }
  const Views v = attention_views(s);
  core_.check(v.q, v.k, v.v, v.out, v.lse);
}

void MultiheadLayer::forward(const MultiheadWeights& w, const LayerInputs& in, float* y,
                             MultiheadSaved& s) const {
  const int64_t rows = in.batch * in.seq, e = shape_.embed, d = shape_.head_dim;
  const int64_t fq = shape_.q_features(), fk = shape_.kv_features();
  const auto project = [&](const float* x, const std::vector<float>& weight,
                           const std::vector<float>& bias, int64_t f, float* out) {
    cpu::gemm(false, true, rows, f, e, x, e, weight.data(), e, 0.0f, out, f, threads_);
    if (config_.bias) cpu::add_rows(bias.data(), rows, f, out, threads_);
  };
  project(in.query, w.wq, w.bq, fq, s.q.data());
  project(in.key, w.wk, w.bk, fk, s.k.data());
  project(in.value, w.wv, w.bv, fk, s.v.data());
  const float eps = config_.layer_norm_eps;
  if (config_.layer_norm) {
    cpu::layer_norm_forward(s.q.data(), rows, fq, shape_.total_heads * d, w.q_norm_weight.data(),
                            w.q_norm_bias.data(), eps, s.q_n.data(), s.q_stats.data(),
                            group_.sum_norm_stats, threads_);
    cpu::layer_norm_forward(s.k.data(), rows, fk, shape_.total_kv_heads * d, w.k_norm_weight.data(),
                            w.k_norm_bias.data(), eps, s.k_n.data(), s.k_stats.data(),
                            group_.sum_norm_stats, threads_);
  }
  const Views v = attention_views(s);
  core_.forward(v.q, v.k, v.v, v.out, v.lse);
  if (config_.layer_norm) {
    cpu::layer_norm_forward(s.attn.data(), rows, fq, shape_.total_heads * d,
                            w.out_norm_weight.data(), w.out_norm_bias.data(), eps, s.attn_n.data(),
                            s.attn_stats.data(), group_.sum_norm_stats, threads_);
  }
  const float* o = config_.layer_norm ? s.attn_n.data() : s.attn.data();
  cpu::gemm(false, true, rows, e, fq, o, fq, w.wo.data(), fq, 0.0f, y, e, threads_);
  if (group_.sum) group_.sum(y, rows * e);  // row-parallel output projection
  if (config_.bias) cpu::add_rows(w.bo.data(), rows, e, y, threads_);
}

void MultiheadLayer::check_saved(const LayerInputs& in, const MultiheadSaved& saved) const {
  const int64_t rows = in.batch * in.seq;
  require(saved.batch == in.batch && saved.seq == in.seq &&
              static_cast<int64_t>(saved.q.size()) == rows * shape_.q_features() &&
              saved.q_n.size() == (config_.layer_norm ? saved.q.size() : 0),
          "saved holds a forward of B = ", saved.batch, ", N = ", saved.seq,
          " but backward's inputs have B = ", in.batch, ", N = ", in.seq,
          "; pass the MultiheadSaved that this layer's forward filled for these inputs");
}

void MultiheadLayer::backward(const MultiheadWeights& w, const LayerInputs& in, const float* dy,
                              const MultiheadSaved& saved, float* dquery, float* dkey,
                              float* dvalue, MultiheadWeights& grads) const {
  const int64_t rows = in.batch * in.seq, e = shape_.embed, d = shape_.head_dim;
  const int64_t fq = shape_.q_features(), fk = shape_.kv_features();
  check_saved(in, saved);
  for (const ParamSpec& p : every_param(config_, shape_)) (grads.*p.member).clear();
  for (const ParamSpec& p : param_specs(config_, shape_)) {
    (grads.*p.member).resize(static_cast<size_t>(p.size));
  }
  const bool ln = config_.layer_norm;
  MultiheadSaved& s = const_cast<MultiheadSaved&>(saved);  // views only; nothing is written

  // Output projection and the sub-LayerNorm.
  if (config_.bias) cpu::column_sums(dy, rows, e, grads.bo.data(), threads_);
  const float* o = ln ? s.attn_n.data() : s.attn.data();
  cpu::gemm(true, false, e, fq, rows, dy, e, o, fq, 0.0f, grads.wo.data(), fq, threads_);
  // Scratch, fully written before it is read (not zero-filled).
  const auto scratch = [](int64_t n) { return std::make_unique_for_overwrite<float[]>(n); };
  const std::unique_ptr<float[]> d_attn = scratch(rows * fq);
  cpu::gemm(false, false, rows, fq, e, dy, e, w.wo.data(), fq, 0.0f, d_attn.get(), fq, threads_);
  if (ln) {
    cpu::layer_norm_backward(d_attn.get(), s.attn.data(), s.attn_stats.data(), rows, fq,
                             shape_.total_heads * d, w.out_norm_weight.data(), d_attn.get(),
                             grads.out_norm_weight.data(), grads.out_norm_bias.data(),
                             group_.sum_norm_stats, threads_);
  }

  // Attention.
  const std::unique_ptr<float[]> dq = scratch(rows * fq), dk = scratch(rows * fk),
                                 dv = scratch(rows * fk);
  const Views v = attention_views(s);
  core_.backward(bnhd(d_attn.get(), in.batch, in.seq, shape_.heads, d), v.q, v.k, v.v, v.out, v.lse,
                 bnhd(dq.get(), in.batch, in.seq, shape_.heads, d),
                 bnhd(dk.get(), in.batch, in.seq, shape_.kv_heads, d),
                 bnhd(dv.get(), in.batch, in.seq, shape_.kv_heads, d));
  if (ln) {
    cpu::layer_norm_backward(dq.get(), s.q.data(), s.q_stats.data(), rows, fq,
                             shape_.total_heads * d, w.q_norm_weight.data(), dq.get(),
                             grads.q_norm_weight.data(), grads.q_norm_bias.data(),
                             group_.sum_norm_stats, threads_);
    cpu::layer_norm_backward(dk.get(), s.k.data(), s.k_stats.data(), rows, fk,
                             shape_.total_kv_heads * d, w.k_norm_weight.data(), dk.get(),
                             grads.k_norm_weight.data(), grads.k_norm_bias.data(),
                             group_.sum_norm_stats, threads_);
  }

  // Input projections: weight and bias gradients, and the inputs' gradients (accumulated
  // where two of dquery, dkey, dvalue are the same buffer).
  const struct {
    const float* grad;
    const float* x;
    const std::vector<float>& weight;
    std::vector<float>& dweight;
    std::vector<float>& dbias;
    int64_t f;
    float* dx;
  } projections[] = {{dq.get(), in.query, w.wq, grads.wq, grads.bq, fq, dquery},
                     {dk.get(), in.key, w.wk, grads.wk, grads.bk, fk, dkey},
                     {dv.get(), in.value, w.wv, grads.wv, grads.bv, fk, dvalue}};
  std::vector<float*> written;  // in the same order on every rank (the sums below)
  for (const auto& p : projections) {
    cpu::gemm(true, false, p.f, e, rows, p.grad, p.f, p.x, e, 0.0f, p.dweight.data(), e, threads_);
    if (config_.bias) cpu::column_sums(p.grad, rows, p.f, p.dbias.data(), threads_);
    const bool again = std::find(written.begin(), written.end(), p.dx) != written.end();
    cpu::gemm(false, false, rows, e, p.f, p.grad, p.f, p.weight.data(), e, again ? 1.0f : 0.0f,
              p.dx, e, threads_);
    if (!again) written.push_back(p.dx);
  }
  // Column-parallel input projections: the inputs' gradients are sums over the head slices.
  if (group_.sum) {
    for (float* dx : written) group_.sum(dx, rows * e);
  }
}

}  // namespace ringattn::detail
