// The CUDA backend: kernels on the current device, run on ExecOptions::cuda_stream.

#include "src/backend/backend.h"
#include "src/backend/cuda/attention_cuda.h"
#include "src/backend/cuda/layer_backend.h"
#include "src/backend/cuda/ring_run.h"
#include "src/base/check.h"

namespace ringattn::detail {

namespace {

class CudaBackend final : public AttentionBackend {
 public:
  Backend kind() const override { return Backend::kCuda; }
  Device device() const override { return Device::kCUDA; }
  int64_t max_head_dim() const override { return cuda::kMaxHeadDim; }
  bool runs_ring() const override { return true; }
  void check_tensors(
      std::initializer_list<std::pair<const char*, const TensorView*>> views) const override {
    cuda::check_device_tensors(views);
  }
  void forward(const Problem& p, const ExecOptions& options) const override {
    cuda::forward(p, options.cuda_stream, !options.cuda_async);
  }
  void backward(const BackwardProblem& bp, const ExecOptions& options) const override {
    cuda::backward(bp, options.cuda_stream, !options.cuda_async);
  }
  // The GPU ring recomputes no lse: precise is false on CUDA (needs_precise_lse).
  std::unique_ptr<RingRun> ring_forward(const Problem& p, const RingPlan& plan,
                                        const ExecOptions& options) const override {
    return cuda::ring_forward(p, plan, options);
  }
  std::unique_ptr<RingRun> ring_backward(BackwardProblem& bp, const RingPlan& plan,
                                         const ExecOptions& options, bool) const override {
    return cuda::ring_backward(bp, plan, options);
  }
  std::unique_ptr<RingRun> sparse_forward(const Problem& p, const BlockSparsePlan& plan,
                                          const ExecOptions& options) const override {
    return cuda::sparse_forward(p, plan, options);
  }
  std::unique_ptr<RingRun> sparse_backward(BackwardProblem& bp, const BlockSparsePlan& plan,
                                           const ExecOptions& options, bool) const override {
    return cuda::sparse_backward(bp, plan, options);
  }
  void check_sparse_ranks(int world) const override {
    if (world > 1) {
      fail(ErrorCode::kUnsupported, "q lives on a CUDA device but the communicator has ", world,
           " ranks; BlockSparseRingDilatedAttention runs CUDA tensors on one device only in "
           "this version: use a communicator of one rank, or pass host tensors");
    }
  }
  std::unique_ptr<LayerBackend> layer_backend(const ExecOptions& options) const override {
    return cuda::layer_backend(options.cuda_stream);
  }
};

}  // namespace

const AttentionBackend& cuda_backend() {
  static const CudaBackend backend;
  return backend;
}

}  // namespace ringattn::detail
