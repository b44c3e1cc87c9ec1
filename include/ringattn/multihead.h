#pragma once
// MultiheadDilatedAttention: the attention layer of a LongNet transformer block on one device.
//
//   q = query Wq^T + bq         [B, N, H*D]      (E = H * D)
//   k = key   Wk^T + bk         [B, N, Hkv*D]
//   v = value Wv^T + bv         [B, N, Hkv*D]
//   q = LayerNorm_q(q), k = LayerNorm_k(k)             (layer_norm: over the H*D / Hkv*D features)
//   o = DilatedAttention(q, k, v)  [B, N, H, D] = [B, N, H*D]
//   o = LayerNorm_o(o)                                 (layer_norm: the sub-LayerNorm, over H*D)
//   y = o Wo^T + bo             [B, N, E]
//
// The math is fp32 (weights, gradients, every intermediate). Host tensors may also be bf16 or
// fp16: such a tensor is converted into an fp32 copy for the call, and the outputs computed
// in fp32 are rounded once into it. On host tensors the four projections go through the BLAS the
// library was built with (CMake's FindBLAS; OpenBLAS by default), the attention through the fused
// CPU kernel of DilatedAttention. On CUDA tensors (Device::kCUDA, builds with the CUDA backend)
// everything runs on the current device: the projections through cuBLAS SGEMM (fp32, no
// TF32), LayerNorms, biases and their gradients as deterministic kernels, the attention
// through DilatedAttention's CUDA backend; the weights stay host vectors (uploaded for each
// call) and gradients come back into host vectors.

#include <cstdint>
#include <memory>
#include <vector>

#include "ringattn/config.h"
#include "ringattn/dilated_attention.h"
#include "ringattn/tensor.h"

namespace ringattn {

namespace detail {
class MultiheadLayer;  // internal (src/layer/multihead_layer.h)
}  // namespace detail

struct MultiheadConfig {
  int64_t embed_dim = 0;  // E
  int64_t num_heads = 0;  // H; the head dim is D = E / H
  int64_t kv_heads = 0;   // Hkv (grouped-query attention); 0 = num_heads
  // Segments, dilation rates, mode, causal and scale of the attention core. head_offset and
  // total_heads must stay 0 (the distributed layer sets them for its slice of heads).
  DilatedConfig attention;
  bool bias = true;        // bq, bk, bv and bo
  bool layer_norm = true;  // LayerNorm_q, LayerNorm_k and the sub-LayerNorm LayerNorm_o
  float layer_norm_eps = 1e-5f;
  // Gain of the Xavier-normal initialisation of Wv and Wo (MAGNETO; Wq and Wk use gain 1).
  float gamma_init = 1.0f;

  // Checks E % H == 0, H % Hkv == 0, positive sizes, eps > 0, finite gamma_init and the
  // attention configuration. Throws Error(kInvalidArgument) naming the field.
  void validate() const;
  int64_t head_dim() const { return embed_dim / num_heads; }
  int64_t kv_heads_or_all() const { return kv_heads > 0 ? kv_heads : num_heads; }
};

// The parameters of the layer (or, for DistributedDilatedAttention, of one rank's slice of
// heads: H and Hkv are then the rank's heads), fp32, row-major, in the layout of
// torch.nn.Linear (weight [out, in]) and torch.nn.LayerNorm, so that a PyTorch state dict
// copies straight in. The same struct holds gradients.
//   wq [H*D, E]    bq [H*D]       q_norm_weight, q_norm_bias   [H*D]
//   wk [Hkv*D, E]  bk [Hkv*D]     k_norm_weight, k_norm_bias   [Hkv*D]
//   wv [Hkv*D, E]  bv [Hkv*D]
//   wo [E, H*D]    bo [E]         out_norm_weight, out_norm_bias [H*D]
// Biases are empty without `bias`, the norm parameters empty without `layer_norm`.
struct MultiheadWeights {
  std::vector<float> wq, bq, wk, bk, wv, bv, wo, bo;
  std::vector<float> q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias;
  std::vector<float> out_norm_weight, out_norm_bias;

  // Zero-filled buffers of the sizes above for the layer's heads [H heads, Hkv kv heads].
  static MultiheadWeights zeros(const MultiheadConfig& config);
  // Xavier-normal weights (std = gain * sqrt(2 / (fan_in + fan_out)); gain 1 for Wq and Wk,
  // gamma_init for Wv and Wo), zero biases, LayerNorm weights 1 and biases 0. The values are
  // a function of (seed, tensor, element) only (a counter-based generator), the same on every
  // machine and build.
  static MultiheadWeights xavier(const MultiheadConfig& config, uint64_t seed);
};

// What forward saves for backward (treat as opaque): the projected and normalised q, k and v,
// the attention output and lse, and the LayerNorm statistics. Sized by forward; reusing one
// object across calls reuses its memory.
struct MultiheadSaved {
  int64_t batch = 0, seq = 0;
  std::vector<float> q, k, v;       // projections [B*N, H*D], [B*N, Hkv*D] (before the norms)
  std::vector<float> q_n, k_n;      // normalised q and k (layer_norm only)
  std::vector<float> attn, attn_n;  // attention output [B, N, H, D] and its sub-LayerNorm
  std::vector<float> lse;           // [B, H, N]
  std::vector<float> q_stats, k_stats, attn_stats;  // [B*N, 2] mean and 1/std per row
  // Of a forward on CUDA tensors: the buffers above live on the device, in the order listed,
  // in one allocation of device_floats floats (the vectors stay empty; a copy of this struct
  // shares that allocation).
  Device device = Device::kCPU;
  std::shared_ptr<float[]> device_buffer;
  int64_t device_floats = 0;
  size_t bytes() const;
};

class MultiheadDilatedAttention {
 public:
  // Xavier-normal weights from `seed` (MultiheadWeights::xavier). Validates the configuration.
  MultiheadDilatedAttention(MultiheadConfig config, uint64_t seed, ExecOptions options = {});
  // The caller's weights (sizes checked as in set_weights).
  MultiheadDilatedAttention(MultiheadConfig config, MultiheadWeights weights,
                            ExecOptions options = {});

  // Self-attention. x: [B, N, E] contiguous, read. y: [B, N, E] contiguous, written. fp32,
  // or bf16 / fp16 on the CPU (see above). Every tensor of a call lives on the CPU, or every one on
  // the current CUDA device (ExecOptions::cuda_stream; the call waits for its work); mixing throws.
  // `saved` (optional) is filled for backward. Every shape, dtype and attention rule
  // (DilatedAttention's: N % s_i, ...) is checked before any compute; a violation throws.
  void forward(const TensorView& x, const TensorView& y, MultiheadSaved* saved = nullptr) const;
  // query, key, value: [B, N, E] each, read (same B and N).
  void forward(const TensorView& query, const TensorView& key, const TensorView& value,
               const TensorView& y, MultiheadSaved* saved = nullptr) const;

  // The exact gradient of forward. x (or query, key, value) must be forward's inputs and
  // `saved` what forward filled. dy: [B, N, E] read. dx (or dquery, dkey, dvalue): [B, N, E]
  // written. grads: every weight and bias gradient, overwritten (resized like weights()).
  void backward(const TensorView& x, const TensorView& dy, const MultiheadSaved& saved,
                const TensorView& dx, MultiheadWeights& grads) const;
  void backward(const TensorView& query, const TensorView& key, const TensorView& value,
                const TensorView& dy, const MultiheadSaved& saved, const TensorView& dquery,
                const TensorView& dkey, const TensorView& dvalue, MultiheadWeights& grads) const;

  const MultiheadWeights& weights() const { return weights_; }
  // Replaces the weights; throws Error(kInvalidArgument) naming a buffer of the wrong size.
  void set_weights(MultiheadWeights weights);
  const MultiheadConfig& config() const { return config_; }

 private:
  MultiheadConfig config_;
  ExecOptions options_;
  DilatedAttention attention_;
  std::shared_ptr<const detail::MultiheadLayer> layer_;  // made once, shared by copies
  MultiheadWeights weights_;
};

}  // namespace ringattn
