#pragma once
// The multihead layer's computation, shared by MultiheadDilatedAttention (all heads, one
// process) and DistributedDilatedAttention (a slice of the heads, a shard of the rows):
// projections, LayerNorms, the attention core, and their gradients.

#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "ringattn/multihead.h"
#include "src/backend/layer_backend.h"

namespace ringattn::detail {

// The heads one layer object computes: [heads, kv_heads] of [total_heads, total_kv_heads].
struct LayerShape {
  int64_t embed = 0, head_dim = 0;
  int64_t heads = 0, kv_heads = 0;
  int64_t total_heads = 0, total_kv_heads = 0;

  // All heads of `config` (head_ranks = 1), or one of `head_ranks` equal slices.
  static LayerShape of(const MultiheadConfig& config, int head_ranks = 1);
  int64_t q_features() const { return heads * head_dim; }
  int64_t kv_features() const { return kv_heads * head_dim; }
};

// One parameter buffer of MultiheadWeights and its size for a LayerShape.
struct ParamSpec {
  std::vector<float> MultiheadWeights::*member;
  const char* name;
  int64_t size;
};
// The buffers present for `config` (biases with `bias`, norms with `layer_norm`).
std::vector<ParamSpec> param_specs(const MultiheadConfig& config, const LayerShape& shape);

MultiheadWeights zero_weights(const MultiheadConfig& config, const LayerShape& shape);
// Throws Error(kInvalidArgument) naming a buffer whose size is not its spec's.
void check_weights(const MultiheadConfig& config, const LayerShape& shape,
                   const MultiheadWeights& weights, const char* what);

// The attention core (DilatedAttention, or RingDilatedAttention over the sequence ranks),
// with its own validation (run before any compute).
struct AttentionCore {
  std::function<void(const TensorView&q, const TensorView&k, const TensorView&v,
                     const TensorView&out, const TensorView&lse)>
      check, forward;
  std::function<void(const TensorView& dout, const TensorView& q, const TensorView& k,
                     const TensorView& v, const TensorView& out, const TensorView& lse,
                     const TensorView& dq, const TensorView& dk, const TensorView& dv)>
      backward;
  // The core multiplies bf16 tensors with the CPU's bf16 products (ExecOptions::cpu_bf16
  // resolves to dot or amx): a call on bf16 host tensors then runs it on bf16 copies of q,
  // k, v (rounded once) and widens its results, as a bf16 training step would.
  bool bf16_products = false;
};

// How the layer meets the ranks holding the other heads (all empty on one process).
struct HeadGroup {
  FeatureSum sum_norm_stats;                        // LayerNorm row sums
  std::function<void(float* data, int64_t n)> sum;  // y and dx partial sums
};

// The [B, N, E] inputs of one call (query, key, value: the same pointer for self-attention),
// on `device` (every tensor of the call lives there).
struct LayerInputs {
  const float* query = nullptr;
  const float* key = nullptr;
  const float* value = nullptr;
  int64_t batch = 0, seq = 0;
  Device device = Device::kCPU;
  DType dtype = DType::kF32;  // of the caller's first tensor (bf16 / fp16 ones are staged)
};

// The bf16 / fp16 host tensors of a call as fp32 copies: one copy per distinct tensor (a
// tensor passed twice, as in self-attention, stays one buffer), converted in once the call
// reads it; finish() converts the copies of the tensors the call writes back into them.
class Staging {
 public:
  Staging() = default;
  Staging(Staging&&) = default;
  Staging& operator=(Staging&&) = default;
  float* fp32(const TensorView& t, bool written);
  void finish() const;

 private:
  struct Copy {
    TensorView view;
    std::vector<float> data;
    bool read, written;
  };
  std::vector<Copy> copies_;
};

// The tensors of a forward or backward call, each checked: [B, N, E] contiguous, one B and
// N and one device for all (CUDA: only in builds with the CUDA backend, else
// Error(kUnsupported); the memory must be the current device's); fp32, or bf16 / fp16 on
// the CPU (staged). Throws Error naming the tensor. Call finish() after the layer has run.
struct ForwardCall {
  LayerInputs in;
  float* y = nullptr;
  Staging staging;
  void finish() const { staging.finish(); }
};
ForwardCall forward_call(int64_t embed, const TensorView& query, const TensorView& key,
                         const TensorView& value, const TensorView& y, const char* y_name = "y");
struct BackwardCall {
  LayerInputs in;
  const float* dy = nullptr;
  float *dquery = nullptr, *dkey = nullptr, *dvalue = nullptr;
  Staging staging;
  void finish() const { staging.finish(); }
};
BackwardCall backward_call(int64_t embed, const TensorView& query, const TensorView& key,
                           const TensorView& value, const TensorView& dy, const TensorView& dquery,
                           const TensorView& dkey, const TensorView& dvalue);

// Made once per public layer object and shared by its copies: its backends are made on first
// use, one per device; calls on CUDA inputs run one at a time (they share the backend's
// cuBLAS handle and stream), calls on host inputs concurrently.
class MultiheadLayer {
 public:
  // threads: the CPU backend's OpenMP threads; cuda_stream: the CUDA backend's stream (a
  // cudaStream_t, nullptr = the default stream). The inputs' device picks the backend.
  MultiheadLayer(const MultiheadConfig& config, const LayerShape& shape, AttentionCore core,
                 HeadGroup group, int threads, void* cuda_stream = nullptr)
      : config_(config),
        shape_(shape),
        core_(std::move(core)),
        group_(std::move(group)),
        threads_(threads),
        cuda_stream_(cuda_stream) {}

  // Sizes `saved` for the inputs (host vectors, or one device allocation for CUDA inputs)
  // and runs every check (the attention core's too). No compute.
  void prepare(const LayerInputs& in, MultiheadSaved& saved) const;
  // After prepare(): y [B, N, E] written. On CUDA inputs the weights are uploaded for the
  // call (one device allocation) and the call waits for its work before returning.
  void forward(const MultiheadWeights& w, const LayerInputs& in, float* y,
               MultiheadSaved& saved) const;
  // Checks that `saved` holds a forward of these inputs' shape. Throws Error.
  void check_saved(const LayerInputs& in, const MultiheadSaved& saved) const;
  // The gradient of forward: dquery, dkey, dvalue [B, N, E] written (pointers that are
  // equal receive the sum of their gradients); grads overwritten (sized by the caller).
  // Checks that `saved` matches the inputs first. On CUDA inputs the gradients are computed
  // on the device and copied into the host vectors of `grads`.
  void backward(const MultiheadWeights& w, const LayerInputs& in, const float* dy,
                const MultiheadSaved& saved, float* dquery, float* dkey, float* dvalue,
                MultiheadWeights& grads) const;

 private:
  // Pointers to the buffers of a MultiheadSaved (host vectors or the device allocation).
  struct SavedBuffers {
    float *q, *k, *v, *q_n, *k_n, *attn, *attn_n, *lse, *q_stats, *k_stats, *attn_stats;
  };
  SavedBuffers saved_buffers(const MultiheadSaved& saved) const;
  struct Views {
    TensorView q, k, v, out, lse;
  };
  Views attention_views(const MultiheadSaved& saved) const;
  bool bf16_core(const LayerInputs& in) const {
    return core_.bf16_products && in.dtype == DType::kBF16 && in.device == Device::kCPU;
  }
  // The backend of `device`, made on first use. Throws Error(kUnsupported) for CUDA inputs
  // with a head group (the group's sums move host memory) or without the CUDA backend.
  const LayerBackend& backend(Device device) const;
  // Held for the whole of a call on `device`: a lock of the CUDA calls, none for the host.
  std::unique_lock<std::mutex> device_call(Device device) const;

  MultiheadConfig config_;
  LayerShape shape_;
  AttentionCore core_;
  HeadGroup group_;
  int threads_;
  void* cuda_stream_;
  mutable std::mutex backends_mutex_, cuda_calls_;
  mutable std::unique_ptr<LayerBackend> backends_[2];  // host, CUDA
};

}  // namespace ringattn::detail
