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

// How the CPU backend computes the two products of attention on bf16 tensors (fp32 and fp16
// tensors always take the fp32 products). The softmax state, the accumulators and the merge
// are fp32 in every choice; kDot and kAmx round the probabilities P (and, in backward, dS)
// to bf16 for the second product, as FlashAttention does on GPUs.
enum class CpuBf16 {
  kAuto,   // kAmx where the CPU has AMX-BF16 and the OS grants it, else kDot, else kWiden
  kWiden,  // widened to fp32 while packing, fp32 FMA products (every CPU)
  kDot,    // AVX512_BF16 dot products (vdpbf16ps)
  kAmx,    // AMX-BF16 tile products (TDPBF16PS); Linux grants the tile state per process
};

const char* cpu_bf16_name(CpuBf16 kernel);
// Parses "auto", "widen", "dot" or "amx"; throws Error(kInvalidArgument) otherwise.
CpuBf16 parse_cpu_bf16(const std::string& text);

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
  // kDot or kAmx on a CPU without them is Error(kUnsupported) at construction. Results of
  // one choice are bitwise reproducible; different choices differ by bf16 rounding.
  CpuBf16 cpu_bf16 = CpuBf16::kAuto;

  // A known backend, num_threads >= 0 and a known cpu_bf16; throws Error(kInvalidArgument)
  // naming the field, or Error(kUnsupported) for a cpu_bf16 this CPU lacks (backend cpu).
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
