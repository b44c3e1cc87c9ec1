// The reference backend: plain loops with fp64 accumulation on the host.

#include "src/backend/backend.h"
#include "src/backend/layer_backend.h"
#include "src/backend/ref/reference.h"

namespace ringattn::detail {

namespace {

class ReferenceBackend final : public AttentionBackend {
 public:
  Backend kind() const override { return Backend::kReference; }
  Device device() const override { return Device::kCPU; }
  // The CPU backend's limit, so that the reference takes exactly the inputs the CPU does.
  int64_t max_head_dim() const override { return 256; }
  bool runs_ring() const override { return false; }
  void forward(const Problem& p, const ExecOptions&) const override { reference_forward_into(p); }
  void backward(const BackwardProblem& bp, const ExecOptions&) const override {
    reference_backward_into(bp);
  }
  std::unique_ptr<LayerBackend> layer_backend(const ExecOptions& options) const override {
    return cpu_layer_backend(options.num_threads);
  }
};

}  // namespace

const AttentionBackend& reference_backend() {
  static const ReferenceBackend backend;
  return backend;
}

}  // namespace ringattn::detail
