#pragma once
// The attention backend interface: what one device's kernels offer the public classes, the
// multihead layer and the ring executor. The reference (fp64 loops, host), CPU (threaded SIMD,
// host) and CUDA backends implement it; select_backend() (src/backend/select.cc) is the one
// home of the device rule, which backend runs a call.

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "ringattn/dilated_attention.h"
#include "ringattn/tensor.h"
#include "src/plan/problem.h"

namespace ringattn {

namespace detail {
class LayerBackend;  // src/backend/layer_backend.h
}
class RingRun;  // src/ring/ring_run.h
struct RingPlan;
struct BlockSparsePlan;

class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;

  // Capabilities.
  virtual Backend kind() const = 0;
  const char* name() const { return backend_name(kind()); }
  // Where the tensors it computes on live.
  virtual Device device() const = 0;
  // The largest head dim its kernels take (a larger one is Error(kUnsupported)).
  virtual int64_t max_head_dim() const = 0;
  // Whether it runs the ring (RingDilatedAttention, the block-sparse ring, the distributed
  // layer); the reference does not.
  virtual bool runs_ring() const = 0;

  // The checks of a call's tensors beyond shapes and strides (CUDA: every view points at
  // memory of the current device); throw Error naming the tensor. Host backends check nothing.
  virtual void check_tensors(
      std::initializer_list<std::pair<const char*, const TensorView*>> views) const;
  // check_tensors of the tensors of a forward / backward call (named as in the API).
  void check_forward_tensors(const TensorView& q, const TensorView& k, const TensorView& v,
                             const TensorView& out, const std::optional<TensorView>& lse) const;
  void check_backward_tensors(const TensorView& dout, const TensorView& q, const TensorView& k,
                              const TensorView& v, const TensorView& out, const TensorView& lse,
                              const TensorView& dq, const TensorView& dk,
                              const TensorView& dv) const;
  // The checks of ExecOptions this backend adds (CPU: the requested bf16 kernel exists here).
  virtual void check_options(const ExecOptions& options) const;
  // Whether bf16 inputs run on bf16 dot products here (the multihead layers then round their
  // fp32 projections to bf16 first, as those kernels would).
  virtual bool bf16_products(const ExecOptions& options) const;

  // Attention of one whole problem (a sequence, or a shard whose keys are all local).
  virtual void forward(const Problem& p, const ExecOptions& options) const = 0;
  virtual void backward(const BackwardProblem& bp, const ExecOptions& options) const = 0;

  // One rank's part of a ring call (RingDilatedAttention, BlockSparseRingDilatedAttention),
  // planned and allocated here, run later (RingRun). The backwards take `precise` (some
  // rank's needs_precise_lse: every rank runs the forward again for the lse in double first)
  // and may point bp.fwd at that lse. A backend that does not run rings throws kUnsupported.
  virtual std::unique_ptr<RingRun> ring_forward(const Problem& p, const RingPlan& plan,
                                                const ExecOptions& options) const;
  virtual std::unique_ptr<RingRun> ring_backward(BackwardProblem& bp, const RingPlan& plan,
                                                 const ExecOptions& options, bool precise) const;
  virtual std::unique_ptr<RingRun> sparse_forward(const Problem& p, const BlockSparsePlan& plan,
                                                  const ExecOptions& options) const;
  virtual std::unique_ptr<RingRun> sparse_backward(BackwardProblem& bp, const BlockSparsePlan& plan,
                                                   const ExecOptions& options, bool precise) const;
  // Whether a backward of p must first recompute the lse in double (its fp32 lse is too coarse
  // for the gradients: kPreciseLse).
  virtual bool needs_precise_lse(const Problem& p) const;
  // Error(kUnsupported) when the block-sparse ring cannot run on `world` ranks here.
  virtual void check_sparse_ranks(int world) const;

  // The dense operations of the multihead layer on this device.
  virtual std::unique_ptr<detail::LayerBackend> layer_backend(const ExecOptions& options) const = 0;
};

// The backend that runs a call with these options whose q is `q`: q's device decides (CUDA
// tensors run on the CUDA backend, for backend cpu or cuda); throws Error(kInvalidArgument)
// when the requested backend cannot take q's device and Error(kUnsupported) when this build
// lacks the backend the call needs.
const AttentionBackend& select_backend(Backend requested, const TensorView& q);
// The backend of a kind; Error(kUnsupported) naming the rebuild when this build lacks it.
const AttentionBackend& backend_of_kind(Backend kind);
// The backend that computes on tensors of `device` (host: cpu); Error(kUnsupported) naming
// the rebuild when this build lacks it (`what`: whose device, for the message, e.g. "x lives
// on a CUDA device").
const AttentionBackend& backend_of_device(Device device, const std::string& what);
// Whether bf16 host inputs of a call with these options run on bf16 dot products (the CPU
// backend's bf16_products; false for the other backends).
bool host_bf16_products(const ExecOptions& options);
// Error(kUnsupported) unless this build has `requested` and it runs the ring (`what` names
// the class, for the message).
void require_ring_backend(Backend requested, const char* what);

namespace detail {
// The backends themselves (select.cc is their one caller); cuda_backend() exists only in
// builds with CUDA.
const AttentionBackend& reference_backend();
const AttentionBackend& cpu_backend();
const AttentionBackend& cuda_backend();
}  // namespace detail

}  // namespace ringattn
