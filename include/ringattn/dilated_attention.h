#pragma once
// DilatedAttention: LongNet-style dilated attention on one device.

#include <optional>

#include "ringattn/config.h"
#include "ringattn/tensor.h"

namespace ringattn {

enum class Backend {
  kCpu,        // the fused, threaded, SIMD CPU kernel
  kReference,  // plain loops with fp64 accumulation: slow, obviously correct
  kCuda,       // CUDA kernels (builds with RINGATTN_HAVE_CUDA); tensors on Device::kCUDA
};

const char* backend_name(Backend backend);
// Parses "cpu", "reference" or "cuda"; throws Error(kInvalidArgument) otherwise.
Backend parse_backend(const std::string& text);

struct ExecOptions {
  Backend backend = Backend::kCpu;
  int num_threads = 0;  // CPU threads; 0 = OpenMP's default (OMP_NUM_THREADS or all cores)
  // CUDA: the cudaStream_t to run on (nullptr = the default stream). forward and backward
  // return once their results are written (they synchronize this stream), unless cuda_async.
  void* cuda_stream = nullptr;
  // CUDA, DilatedAttention and BlockSparseRingDilatedAttention on one device: true = forward
  // and backward return once their work is queued on cuda_stream, without waiting for it
  // (as a PyTorch operator does): the results are written when the stream gets there, so
  // the caller orders what reads them on the same stream (or waits for it), and keeps the
  // tensors alive until then. Temporary device memory is freed in stream order. Errors the
  // kernels meet while running surface at the caller's next synchronization. Calls that must
  // wait anyway still do: the GPU ring (transfers between kernels) and the multihead layers
  // (they return host gradients).
  bool cuda_async = false;

  // A known backend and num_threads >= 0; throws Error(kInvalidArgument) naming the field.
  void validate() const;
};

// Tensors on Device::kCUDA run on the CUDA backend (backend cpu or cuda; reference runs on
// the CPU only); every tensor of a call must be on the same device. Backend kCuda with host
// tensors, or CUDA tensors in a build without CUDA, is an error.
class DilatedAttention {
 public:
  // Validates the configuration; throws Error(kInvalidArgument) on a bad one.
  explicit DilatedAttention(DilatedConfig config, ExecOptions options = {});

  // q:   [B, N, H, D]    read
  // k,v: [B, N, Hkv, D]  read; H % Hkv == 0, query head h reads kv head h / (H / Hkv)
  // out: [B, N, H, D]    written (same dtype as q)
  // lse: [B, H, N] fp32  written when given: natural-log log-sum-exp of the scaled scores
  //                      (-inf for a row that attends to nothing)
  // q, k, v and out share one dtype (fp32, fp16 or bf16); accumulation is fp32.
  // Every rule of SPEC.md is checked before any compute; a violation throws Error.
  void forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
               const std::optional<TensorView>& lse = std::nullopt) const;

  // The exact gradient of forward (SPEC.md "Backward").
  // dout:    [B, N, H, D]    read: gradient of the loss with respect to out
  // q, k, v: as in forward   read
  // out:     [B, N, H, D]    read: forward's output
  // lse:     [B, H, N] fp32  read: forward's lse
  // dq:      [B, N, H, D]    written
  // dk, dv:  [B, N, Hkv, D]  written (summed over the query heads sharing a kv head)
  // All tensors but lse share q's dtype; accumulation is fp32 and deterministic.
  void backward(const TensorView& dout, const TensorView& q, const TensorView& k,
                const TensorView& v, const TensorView& out, const TensorView& lse,
                const TensorView& dq, const TensorView& dk, const TensorView& dv) const;

  const DilatedConfig& config() const { return config_; }
  const ExecOptions& options() const { return options_; }

 private:
  void run_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& out, const std::optional<TensorView>& lse) const;
  void run_backward(const TensorView& dout, const TensorView& q, const TensorView& k,
                    const TensorView& v, const TensorView& out, const TensorView& lse,
                    const TensorView& dq, const TensorView& dk, const TensorView& dv) const;

  DilatedConfig config_;
  ExecOptions options_;
};

}  // namespace ringattn
