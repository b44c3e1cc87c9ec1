#include "src/layer/multihead_layer.h"

#include <omp.h>

#include <algorithm>
#include <deque>
#include <memory>
#include <string>
#include <utility>

#include "src/backend/backend.h"
#include "src/base/check.h"
#include "src/base/dtype.h"
#include "src/base/tensor_checks.h"

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

float* embed_rows(const TensorView& t, const char* name, int64_t embed, LayerInputs& call,
                  const char*& first, Staging& staging, bool written) {
  require(t.ndim == 3, name, " has ", t.ndim, " dimensions; it must be [B, N, E] with E = ", embed);
  require(t.data != nullptr, name, ".data is null; pass a buffer holding [B, N, E]");
  if (t.device == Device::kCUDA) {
    backend_of_device(t.device,
                      std::string(name) + " lives on a CUDA device");  // this build has it
  }
  if (t.dtype != DType::kF32 && t.device == Device::kCUDA) {
    fail(ErrorCode::kUnsupported, name, " is ", dtype_name(t.dtype),
         " on a CUDA device; the multihead layers take bf16 / fp16 host tensors (through fp32 "
         "copies) but only fp32 CUDA tensors: pass an fp32 tensor");
  }
  require(t.shape[2] == embed, name, ".shape[2] = ", t.shape[2], " but the layer's embed_dim is ",
          embed, "; pass [B, N, E] with E = ", embed);
  require(t.shape[0] >= 1 && t.shape[1] >= 1, name, " is [", t.shape[0], ", ", t.shape[1], ", ",
          t.shape[2], "]; B and N must be >= 1");
  require(t.strides[2] == 1 && t.strides[1] == embed && t.strides[0] == t.shape[1] * embed, name,
          " has strides [", t.strides[0], ", ", t.strides[1], ", ", t.strides[2],
          "]; it must be contiguous [B, N, E]: make a contiguous copy");
  if (first == nullptr) {
    first = name;
    call.batch = t.shape[0];
    call.seq = t.shape[1];
    call.device = t.device;
    call.dtype = t.dtype;
  }
  require(t.shape[0] == call.batch && t.shape[1] == call.seq, name, " is [", t.shape[0], ", ",
          t.shape[1], ", ", embed, "] but the call's first tensor is [", call.batch, ", ", call.seq,
          ", ", embed, "]; every tensor of one call has the same B and N");
  const auto where = [](Device d) { return d == Device::kCUDA ? "a CUDA device" : "the CPU"; };
  require(t.device == call.device, name, " lives on ", where(t.device), " but ", first, " on ",
          where(call.device),
          "; every tensor of one call lives on the same device: copy them to one");
  return t.dtype == DType::kF32 ? static_cast<float*>(t.data) : staging.fp32(t, written);
}

template <typename T>
void convert(const T* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = to_f32(src[i]);
}
template <typename T>
void convert(const float* src, T* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = from_f32<T>(src[i]);
}

// CUDA tensors: their memory must be the current device's.
void check_device_memory(std::initializer_list<std::pair<const char*, const TensorView*>> views) {
  const Device device = views.begin()->second->device;
  if (device == Device::kCUDA) {
    backend_of_device(device, "the inputs live on a CUDA device").check_tensors(views);
  }
}

}  // namespace

namespace {

// forward_call's checks but the device memory's; `y` is written (forward's y) or read
// (backward's dy).
ForwardCall forward_rows(int64_t embed, const TensorView& query, const TensorView& key,
                         const TensorView& value, const TensorView& y, const char* y_name,
                         bool y_written) {
  ForwardCall c;
  const char* first = nullptr;
  c.in.query = embed_rows(query, "query", embed, c.in, first, c.staging, false);
  c.in.key = embed_rows(key, "key", embed, c.in, first, c.staging, false);
  c.in.value = embed_rows(value, "value", embed, c.in, first, c.staging, false);
  c.y = embed_rows(y, y_name, embed, c.in, first, c.staging, y_written);
  return c;
}

}  // namespace

float* Staging::fp32(const TensorView& t, bool written) {
  auto it = std::find_if(copies_.begin(), copies_.end(),
                         [&](const Copy& c) { return c.view.data == t.data; });
  if (it == copies_.end()) {
    copies_.push_back({t, std::vector<float>(static_cast<size_t>(t.numel())), false, false});
    it = copies_.end() - 1;
  }
  // Only what the call reads is converted in (the layer overwrites what it writes).
  if (!written && !it->read) {
    if (t.dtype == DType::kBF16)
      convert(static_cast<const bf16_t*>(t.data), it->data.data(), it->data.size());
    if (t.dtype == DType::kF16)
      convert(static_cast<const fp16_t*>(t.data), it->data.data(), it->data.size());
    it->read = true;
  }
  it->written = it->written || written;
  return it->data.data();
}

void Staging::finish() const {
  for (const Copy& c : copies_) {
    if (!c.written) continue;
    if (c.view.dtype == DType::kBF16)
      convert(c.data.data(), static_cast<bf16_t*>(c.view.data), c.data.size());
    if (c.view.dtype == DType::kF16)
      convert(c.data.data(), static_cast<fp16_t*>(c.view.data), c.data.size());
  }
}

ForwardCall forward_call(int64_t embed, const TensorView& query, const TensorView& key,
                         const TensorView& value, const TensorView& y, const char* y_name) {
  ForwardCall c = forward_rows(embed, query, key, value, y, y_name, true);
  check_outputs_disjoint({{y_name, &y}}, {{"query", &query}, {"key", &key}, {"value", &value}});
  check_device_memory({{"query", &query}, {"key", &key}, {"value", &value}, {y_name, &y}});
  return c;
}

BackwardCall backward_call(int64_t embed, const TensorView& query, const TensorView& key,
                           const TensorView& value, const TensorView& dy, const TensorView& dquery,
                           const TensorView& dkey, const TensorView& dvalue) {
  BackwardCall c;
  ForwardCall f = forward_rows(embed, query, key, value, dy, "dy", false);
  c.in = f.in;
  c.dy = f.y;
  c.staging = std::move(f.staging);
  const char* first = "query";
  c.dquery = embed_rows(dquery, "dquery", embed, c.in, first, c.staging, true);
  c.dkey = embed_rows(dkey, "dkey", embed, c.in, first, c.staging, true);
  c.dvalue = embed_rows(dvalue, "dvalue", embed, c.in, first, c.staging, true);
  // Self-attention passes one gradient (dx) as dquery, dkey and dvalue: identical views are
  // one output; outputs that only partly overlap are errors.
  std::vector<NamedView> outputs = {{"dquery", &dquery}};
  if (!same_view(dkey, dquery)) outputs.push_back({"dkey", &dkey});
  if (!same_view(dvalue, dquery) && !same_view(dvalue, dkey))
    outputs.push_back({"dvalue", &dvalue});
  check_outputs_disjoint(outputs,
                         {{"query", &query}, {"key", &key}, {"value", &value}, {"dy", &dy}});
  check_device_memory({{"query", &query},
                       {"key", &key},
                       {"value", &value},
                       {"dy", &dy},
                       {"dquery", &dquery},
                       {"dkey", &dkey},
                       {"dvalue", &dvalue}});
  return c;
}

namespace {

TensorView bnhd(const float* data, int64_t b, int64_t n, int64_t h, int64_t d, Device device) {
  return TensorView::contiguous(const_cast<float*>(data), DType::kF32, {b, n, h, d}, device);
}

using SavedMember = std::vector<float> MultiheadSaved::*;

// bf16 copies of the contiguous fp32 host views of one attention-core call (AttentionCore::
// bf16_products): inputs rounded in once, outputs widened back into their fp32 views.
class Bf16Core {
 public:
  explicit Bf16Core(int threads) : threads_(threads > 0 ? threads : omp_get_max_threads()) {}
  TensorView in(const TensorView& x) { return copy(x, true); }
  TensorView out(const TensorView& x) { return copy(x, false); }
  void finish() const {
    for (const Copy& c : copies_) {
      if (c.read) continue;
      float* dst = static_cast<float*>(c.fp32.data);
      const int64_t n = static_cast<int64_t>(c.data.size());
#pragma omp parallel for num_threads(threads_)
      for (int64_t i = 0; i < n; ++i) dst[i] = to_f32(c.data[static_cast<size_t>(i)]);
    }
  }

 private:
  struct Copy {
    TensorView fp32;
    std::vector<bf16_t> data;
    bool read;
  };
  TensorView copy(const TensorView& x, bool read) {
    copies_.push_back({x, std::vector<bf16_t>(static_cast<size_t>(x.numel())), read});
    Copy& c = copies_.back();
    if (read) {
      const float* src = static_cast<const float*>(x.data);
      const int64_t n = x.numel();
#pragma omp parallel for num_threads(threads_)
      for (int64_t i = 0; i < n; ++i) c.data[static_cast<size_t>(i)] = from_f32<bf16_t>(src[i]);
    }
    TensorView v = x;
    v.data = c.data.data();
    v.dtype = DType::kBF16;
    return v;
  }
  int threads_;
  std::deque<Copy> copies_;  // stable addresses
};

// The buffers of MultiheadSaved with their sizes for `rows` rows, in the order of the device
// allocation.
std::vector<std::pair<SavedMember, int64_t>> saved_layout(const LayerShape& shape, bool ln,
                                                          int64_t rows) {
  using S = MultiheadSaved;
  const int64_t fq = rows * shape.q_features(), fk = rows * shape.kv_features();
  const int64_t norm = ln ? 1 : 0;
  return {{&S::q, fq},
          {&S::k, fk},
          {&S::v, fk},
          {&S::q_n, norm * fq},
          {&S::k_n, norm * fk},
          {&S::attn, fq},
          {&S::attn_n, norm * fq},
          {&S::lse, rows * shape.heads},
          {&S::q_stats, norm * 2 * rows},
          {&S::k_stats, norm * 2 * rows},
          {&S::attn_stats, norm * 2 * rows}};
}

// The parameter buffers of `specs` where `ops` computes: the host vectors of `host`
// themselves on the CPU; on CUDA one device allocation (uploaded from `host` when `upload`).
class ParamBuffers {
 public:
  ParamBuffers(const LayerBackend& ops, const std::vector<ParamSpec>& specs,
               const MultiheadWeights& host, bool upload) {
    int64_t total = 0;
    for (const ParamSpec& p : specs) total += p.size;
    if (ops.device() != Device::kCPU) storage_ = ops.allocate(total);
    int64_t at = 0;
    for (const ParamSpec& p : specs) {
      const std::vector<float>& h = host.*p.member;
      float* ptr = storage_ ? storage_.get() + at : const_cast<float*>(h.data());
      if (storage_ && upload) ops.upload(ptr, h.data(), p.size);
      buffers_.push_back({p.member, ptr, p.size});
      at += p.size;
    }
  }
  // The buffer of `member` (nullptr when the layer has none).
  float* operator[](std::vector<float> MultiheadWeights::*member) const {
    for (const Buffer& b : buffers_) {
      if (b.member == member) return b.data;
    }
    return nullptr;
  }
  // On CUDA: copies every buffer into the (sized) host vectors of `host`.
  void download(const LayerBackend& ops, MultiheadWeights& host) const {
    if (!storage_) return;
    for (const Buffer& b : buffers_) ops.download((host.*b.member).data(), b.data, b.size);
  }

 private:
  struct Buffer {
    std::vector<float> MultiheadWeights::*member;
    float* data;
    int64_t size;
  };
  std::shared_ptr<float[]> storage_;
  std::vector<Buffer> buffers_;
};

}  // namespace

const LayerBackend& MultiheadLayer::backend(Device device) const {
  if (device == Device::kCUDA && (group_.sum || group_.sum_norm_stats)) {
    fail(ErrorCode::kUnsupported,
         "head parallelism on CUDA tensors is not available (the head group's sums move host "
         "memory); pass host tensors");
  }
  const std::lock_guard<std::mutex> lock(backends_mutex_);
  std::unique_ptr<LayerBackend>& made = backends_[device == Device::kCUDA ? 1 : 0];
  if (!made) {
    ExecOptions options;
    options.num_threads = threads_;
    options.cuda_stream = cuda_stream_;
    made = backend_of_device(device, "the inputs live on a CUDA device").layer_backend(options);
  }
  return *made;
}

std::unique_lock<std::mutex> MultiheadLayer::device_call(Device device) const {
  return device == Device::kCUDA ? std::unique_lock<std::mutex>(cuda_calls_)
                                 : std::unique_lock<std::mutex>();
}

MultiheadLayer::SavedBuffers MultiheadLayer::saved_buffers(const MultiheadSaved& s) const {
  const auto layout = saved_layout(shape_, config_.layer_norm, s.batch * s.seq);
  const auto ptr = [&](SavedMember member) {
    if (s.device == Device::kCPU) return const_cast<float*>((s.*member).data());
    int64_t at = 0;
    for (const auto& [m, size] : layout) {
      if (m == member) break;
      at += size;
    }
    return s.device_buffer.get() + at;
  };
  using S = MultiheadSaved;
  return {ptr(&S::q),       ptr(&S::k),       ptr(&S::v),         ptr(&S::q_n),
          ptr(&S::k_n),     ptr(&S::attn),    ptr(&S::attn_n),    ptr(&S::lse),
          ptr(&S::q_stats), ptr(&S::k_stats), ptr(&S::attn_stats)};
}

MultiheadLayer::Views MultiheadLayer::attention_views(const MultiheadSaved& s) const {
  const int64_t b = s.batch, n = s.seq, d = shape_.head_dim;
  const bool ln = config_.layer_norm;
  const SavedBuffers p = saved_buffers(s);
  return {bnhd(ln ? p.q_n : p.q, b, n, shape_.heads, d, s.device),
          bnhd(ln ? p.k_n : p.k, b, n, shape_.kv_heads, d, s.device),
          bnhd(p.v, b, n, shape_.kv_heads, d, s.device),
          bnhd(p.attn, b, n, shape_.heads, d, s.device),
          TensorView::contiguous(p.lse, DType::kF32, {b, shape_.heads, n}, s.device)};
}

void MultiheadLayer::prepare(const LayerInputs& in, MultiheadSaved& s) const {
  const LayerBackend& ops = backend(in.device);
  s.batch = in.batch;
  s.seq = in.seq;
  s.device = in.device;
  const auto layout = saved_layout(shape_, config_.layer_norm, in.batch * in.seq);
  int64_t total = 0;
  for (const auto& [member, size] : layout) {
    if (in.device == Device::kCPU) {
      (s.*member).resize(static_cast<size_t>(size));
    } else {
      s.*member = {};
    }
    total += size;
  }
  if (in.device == Device::kCPU) {
    s.device_buffer.reset();
    s.device_floats = 0;
  } else if (!s.device_buffer || s.device_floats != total) {
    s.device_buffer.reset();
    s.device_buffer = ops.allocate(total);
    s.device_floats = total;
  }
  const Views v = attention_views(s);
  core_.check(v.q, v.k, v.v, v.out, v.lse);
}

void MultiheadLayer::forward(const MultiheadWeights& weights, const LayerInputs& in, float* y,
                             MultiheadSaved& s) const {
  const std::unique_lock<std::mutex> serial = device_call(in.device);
  const LayerBackend& ops = backend(in.device);
  const ParamBuffers w(ops, param_specs(config_, shape_), weights, true);
  const SavedBuffers b = saved_buffers(s);
  const int64_t rows = in.batch * in.seq, e = shape_.embed, d = shape_.head_dim;
  const int64_t fq = shape_.q_features(), fk = shape_.kv_features();
  using W = MultiheadWeights;
  const auto project = [&](const float* x, std::vector<float> W::*weight,
                           std::vector<float> W::*bias, int64_t f, float* out) {
    ops.gemm(false, true, rows, f, e, x, e, w[weight], e, 0.0f, out, f);
    if (config_.bias) ops.add_rows(w[bias], rows, f, out);
  };
  project(in.query, &W::wq, &W::bq, fq, b.q);
  project(in.key, &W::wk, &W::bk, fk, b.k);
  project(in.value, &W::wv, &W::bv, fk, b.v);
  const float eps = config_.layer_norm_eps;
  if (config_.layer_norm) {
    ops.layer_norm_forward(b.q, rows, fq, shape_.total_heads * d, w[&W::q_norm_weight],
                           w[&W::q_norm_bias], eps, b.q_n, b.q_stats, group_.sum_norm_stats);
    ops.layer_norm_forward(b.k, rows, fk, shape_.total_kv_heads * d, w[&W::k_norm_weight],
                           w[&W::k_norm_bias], eps, b.k_n, b.k_stats, group_.sum_norm_stats);
  }
  const Views v = attention_views(s);
  if (bf16_core(in)) {
    Bf16Core c(threads_);
    core_.forward(c.in(v.q), c.in(v.k), c.in(v.v), c.out(v.out), v.lse);
    c.finish();
  } else {
    core_.forward(v.q, v.k, v.v, v.out, v.lse);
  }
  if (config_.layer_norm) {
    ops.layer_norm_forward(b.attn, rows, fq, shape_.total_heads * d, w[&W::out_norm_weight],
                           w[&W::out_norm_bias], eps, b.attn_n, b.attn_stats,
                           group_.sum_norm_stats);
  }
  const float* o = config_.layer_norm ? b.attn_n : b.attn;
  ops.gemm(false, true, rows, e, fq, o, fq, w[&W::wo], fq, 0.0f, y, e);
  if (group_.sum) group_.sum(y, rows * e);  // row-parallel output projection
  if (config_.bias) ops.add_rows(w[&W::bo], rows, e, y);
  ops.finish();
}

void MultiheadLayer::check_saved(const LayerInputs& in, const MultiheadSaved& saved) const {
  const auto layout = saved_layout(shape_, config_.layer_norm, in.batch * in.seq);
  int64_t total = 0;
  bool sizes = true;
  for (const auto& [member, size] : layout) {
    total += size;
    sizes = sizes && static_cast<int64_t>((saved.*member).size()) ==
                         (saved.device == Device::kCPU ? size : 0);
  }
  if (saved.device != Device::kCPU) sizes = sizes && saved.device_floats == total;
  require(saved.batch == in.batch && saved.seq == in.seq && saved.device == in.device && sizes,
          "saved holds a forward of B = ", saved.batch, ", N = ", saved.seq, " on ",
          saved.device == Device::kCUDA ? "CUDA" : "CPU",
          " tensors but backward's inputs have B = ", in.batch, ", N = ", in.seq, " on ",
          in.device == Device::kCUDA ? "CUDA" : "CPU",
          " tensors; pass the MultiheadSaved that this layer's forward filled for these inputs");
}

void MultiheadLayer::backward(const MultiheadWeights& weights, const LayerInputs& in,
                              const float* dy, const MultiheadSaved& saved, float* dquery,
                              float* dkey, float* dvalue, MultiheadWeights& grads) const {
  const int64_t rows = in.batch * in.seq, e = shape_.embed, d = shape_.head_dim;
  const int64_t fq = shape_.q_features(), fk = shape_.kv_features();
  check_saved(in, saved);
  const std::unique_lock<std::mutex> serial = device_call(in.device);
  const LayerBackend& ops = backend(in.device);
  const std::vector<ParamSpec> specs = param_specs(config_, shape_);
  for (const ParamSpec& p : every_param(config_, shape_)) (grads.*p.member).clear();
  for (const ParamSpec& p : specs) (grads.*p.member).resize(static_cast<size_t>(p.size));
  const ParamBuffers w(ops, specs, weights, true);
  const ParamBuffers g(ops, specs, grads, false);
  const bool ln = config_.layer_norm;
  const SavedBuffers s = saved_buffers(saved);  // read only
  using W = MultiheadWeights;

  // Output projection and the sub-LayerNorm.
  if (config_.bias) ops.column_sums(dy, rows, e, g[&W::bo]);
  const float* o = ln ? s.attn_n : s.attn;
  ops.gemm(true, false, e, fq, rows, dy, e, o, fq, 0.0f, g[&W::wo], fq);
  // Scratch, fully written before it is read (not zero-filled).
  const std::shared_ptr<float[]> d_attn = ops.allocate(rows * fq);
  ops.gemm(false, false, rows, fq, e, dy, e, w[&W::wo], fq, 0.0f, d_attn.get(), fq);
  if (ln) {
    ops.layer_norm_backward(d_attn.get(), s.attn, s.attn_stats, rows, fq, shape_.total_heads * d,
                            w[&W::out_norm_weight], d_attn.get(), g[&W::out_norm_weight],
                            g[&W::out_norm_bias], group_.sum_norm_stats);
  }

  // Attention.
  const std::shared_ptr<float[]> dq = ops.allocate(rows * fq), dk = ops.allocate(rows * fk),
                                 dv = ops.allocate(rows * fk);
  const Views v = attention_views(saved);
  const Device dev = in.device;
  const TensorView d_out = bnhd(d_attn.get(), in.batch, in.seq, shape_.heads, d, dev);
  const TensorView d_q = bnhd(dq.get(), in.batch, in.seq, shape_.heads, d, dev);
  const TensorView d_k = bnhd(dk.get(), in.batch, in.seq, shape_.kv_heads, d, dev);
  const TensorView d_v = bnhd(dv.get(), in.batch, in.seq, shape_.kv_heads, d, dev);
  if (bf16_core(in)) {
    Bf16Core c(threads_);
    core_.backward(c.in(d_out), c.in(v.q), c.in(v.k), c.in(v.v), c.in(v.out), v.lse, c.out(d_q),
                   c.out(d_k), c.out(d_v));
    c.finish();
  } else {
    core_.backward(d_out, v.q, v.k, v.v, v.out, v.lse, d_q, d_k, d_v);
  }
  if (ln) {
    ops.layer_norm_backward(dq.get(), s.q, s.q_stats, rows, fq, shape_.total_heads * d,
                            w[&W::q_norm_weight], dq.get(), g[&W::q_norm_weight],
                            g[&W::q_norm_bias], group_.sum_norm_stats);
    ops.layer_norm_backward(dk.get(), s.k, s.k_stats, rows, fk, shape_.total_kv_heads * d,
                            w[&W::k_norm_weight], dk.get(), g[&W::k_norm_weight],
                            g[&W::k_norm_bias], group_.sum_norm_stats);
  }

  // Input projections: weight and bias gradients, and the inputs' gradients (accumulated
  // where two of dquery, dkey, dvalue are the same buffer).
  const struct {
    const float* grad;
    const float* x;
    std::vector<float> W::*weight;
    std::vector<float> W::*bias;
    int64_t f;
    float* dx;
  } projections[] = {{dq.get(), in.query, &W::wq, &W::bq, fq, dquery},
                     {dk.get(), in.key, &W::wk, &W::bk, fk, dkey},
                     {dv.get(), in.value, &W::wv, &W::bv, fk, dvalue}};
  std::vector<float*> written;  // in the same order on every rank (the sums below)
  for (const auto& p : projections) {
    ops.gemm(true, false, p.f, e, rows, p.grad, p.f, p.x, e, 0.0f, g[p.weight], e);
    if (config_.bias) ops.column_sums(p.grad, rows, p.f, g[p.bias]);
    const bool again = std::find(written.begin(), written.end(), p.dx) != written.end();
    ops.gemm(false, false, rows, e, p.f, p.grad, p.f, w[p.weight], e, again ? 1.0f : 0.0f, p.dx, e);
    if (!again) written.push_back(p.dx);
  }
  // Column-parallel input projections: the inputs' gradients are sums over the head slices.
  if (group_.sum) {
    for (float* dx : written) group_.sum(dx, rows * e);
  }
  g.download(ops, grads);
  ops.finish();
}

}  // namespace ringattn::detail
