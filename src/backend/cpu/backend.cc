// The CPU backend: threaded SIMD kernels on the host (attention_cpu.h).

#include "src/backend/backend.h"
#include "ringattn/version.h"
#include "src/backend/cpu/attention_cpu.h"
#include "src/backend/cpu/bf16_kernels.h"
#include "src/backend/cpu/ring.h"
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
  std::unique_ptr<RingRun> ring_forward(const Problem& p, const RingPlan& plan,
                                        const ExecOptions& options) const override {
    return cpu::ring_forward(p, plan, options);
  }
  std::unique_ptr<RingRun> ring_backward(BackwardProblem& bp, const RingPlan& plan,
                                         const ExecOptions& options, bool precise) const override {
    return cpu::ring_backward(bp, plan, options, precise);
  }
  std::unique_ptr<RingRun> sparse_forward(const Problem& p, const BlockSparsePlan& plan,
                                          const ExecOptions& options) const override {
    return cpu::sparse_forward(p, plan, options);
  }
  std::unique_ptr<RingRun> sparse_backward(BackwardProblem& bp, const BlockSparsePlan& plan,
                                           const ExecOptions& options,
                                           bool precise) const override {
    return cpu::sparse_backward(bp, plan, options, precise);
  }
  bool needs_precise_lse(const Problem& p) const override { return cpu::needs_precise_lse(p); }
  void check_options(const ExecOptions& options) const override {
    cpu::resolve_bf16(options.cpu_bf16);
  }
  bool bf16_products(const ExecOptions& options) const override {
    return cpu::resolve_bf16(options.cpu_bf16) != CpuBf16::kWiden;
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

namespace ringattn {

const char* cpu_simd_target() {
  return cpu::simd_target();
}

}  // namespace ringattn
