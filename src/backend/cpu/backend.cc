// The CPU backend: threaded SIMD kernels on the host (attention_cpu.h).

#include "src/backend/backend.h"
#include "src/backend/cpu/attention_cpu.h"
#include "src/backend/layer_backend.h"

namespace ringattn::detail {

namespace {

class CpuBackend final : public AttentionBackend {
 public:
  Backend kind() const override { return Backend::kCpu; }
  Device device() const override { return Device::kCPU; }
  int64_t max_head_dim() const override { return cpu::kMaxHeadDim; }
  bool runs_ring() const override { return true; }
  void forward(const Problem& p, const ExecOptions& options) const override {
    cpu::forward(p, options);
  }
  void backward(const BackwardProblem& bp, const ExecOptions& options) const override {
    cpu::backward(bp, options);
  }
  std::unique_ptr<LayerBackend> layer_backend(const ExecOptions& options) const override {
    return cpu_layer_backend(options.num_threads);
  }
};

}  // namespace

const AttentionBackend& cpu_backend() {
  static const CpuBackend backend;
  return backend;
}

}  // namespace ringattn::detail
