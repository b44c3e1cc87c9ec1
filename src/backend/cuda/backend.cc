// The CUDA backend: kernels on the current device, run on ExecOptions::cuda_stream.

#include "src/backend/backend.h"
#include "src/backend/cuda/attention_cuda.h"
#include "src/backend/cuda/layer_backend.h"

namespace ringattn::detail {

namespace {

class CudaBackend final : public AttentionBackend {
 public:
  Backend kind() const override { return Backend::kCuda; }
  Device device() const override { return Device::kCUDA; }
  int64_t max_head_dim() const override { return cuda::kMaxHeadDim; }
  bool runs_ring() const override { return true; }
  void check_forward_tensors(const TensorView& q, const TensorView& k, const TensorView& v,
                             const TensorView& out,
                             const std::optional<TensorView>& lse) const override {
    cuda::check_forward_tensors(q, k, v, out, lse);
  }
  void check_backward_tensors(const TensorView& dout, const TensorView& q, const TensorView& k,
                              const TensorView& v, const TensorView& out, const TensorView& lse,
                              const TensorView& dq, const TensorView& dk,
                              const TensorView& dv) const override {
    cuda::check_backward_tensors(dout, q, k, v, out, lse, dq, dk, dv);
  }
  void forward(const Problem& p, const ExecOptions& options) const override {
    cuda::forward(p, options.cuda_stream, !options.cuda_async);
  }
  void backward(const BackwardProblem& bp, const ExecOptions& options) const override {
    cuda::backward(bp, options.cuda_stream, !options.cuda_async);
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
