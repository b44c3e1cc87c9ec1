// The CPU LayerBackend: cpu/layer_ops.h with a fixed thread count, on host memory.

#include <cstring>

#include "src/backend/cpu/layer_ops.h"
#include "src/backend/layer_backend.h"

namespace ringattn::detail {

namespace {

class CpuLayerBackend final : public LayerBackend {
 public:
  explicit CpuLayerBackend(int threads) : threads_(threads) {}

  Device device() const override { return Device::kCPU; }
  std::shared_ptr<float[]> allocate(int64_t n) const override {
    return std::make_shared_for_overwrite<float[]>(static_cast<size_t>(n));
  }
  void upload(float* dst, const float* host, int64_t n) const override {
    std::memcpy(dst, host, static_cast<size_t>(n) * sizeof(float));
  }
  void download(float* host, const float* src, int64_t n) const override {
    std::memcpy(host, src, static_cast<size_t>(n) * sizeof(float));
  }
  void finish() const override {}

  void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
            int64_t lda, const float* b, int64_t ldb, float beta, float* c,
            int64_t ldc) const override {
    cpu::gemm(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc, threads_);
  }
  void layer_norm_forward(const float* x, int64_t rows, int64_t features, int64_t total_features,
                          const float* w, const float* b, float eps, float* y, float* stats,
                          const FeatureSum& sum) const override {
    cpu::layer_norm_forward(x, rows, features, total_features, w, b, eps, y, stats, sum, threads_);
  }
  void layer_norm_backward(const float* dy, const float* x, const float* stats, int64_t rows,
                           int64_t features, int64_t total_features, const float* w, float* dx,
                           float* dw, float* db, const FeatureSum& sum) const override {
    cpu::layer_norm_backward(dy, x, stats, rows, features, total_features, w, dx, dw, db, sum,
                             threads_);
  }
  void column_sums(const float* x, int64_t rows, int64_t cols, float* out) const override {
    cpu::column_sums(x, rows, cols, out, threads_);
  }
  void add_rows(const float* bias, int64_t rows, int64_t cols, float* y) const override {
    cpu::add_rows(bias, rows, cols, y, threads_);
  }

 private:
  int threads_;
};

}  // namespace

std::unique_ptr<LayerBackend> cpu_layer_backend(int threads) {
  return std::make_unique<CpuLayerBackend>(threads);
}

}  // namespace ringattn::detail
