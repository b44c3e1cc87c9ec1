#pragma once
// The dense operations of the multihead layer on one device, behind one interface: the CPU's
// (BLAS GEMMs, OpenMP loops: cpu/layer_ops.h) and the CUDA backend's (cuBLAS SGEMM, small
// deterministic kernels: cuda/layer_backend.h). MultiheadLayer runs the same math over
// either; the device of the call's tensors chooses. All fp32, row-major; the semantics of
// each operation are those of the cpu:: function of the same name.

#include <cstdint>
#include <functional>
#include <memory>

#include "ringattn/tensor.h"

namespace ringattn {

// Adds n per-row partial sums over the ranks that hold the other features of each row (the
// ranks of a head-parallel group); empty when one process holds every feature.
using FeatureSum = std::function<void(double* sums, int64_t n)>;

}  // namespace ringattn

namespace ringattn::detail {

class LayerBackend {
 public:
  virtual ~LayerBackend() = default;
  // Where the buffers this backend computes on live.
  virtual Device device() const = 0;
  // n floats in that memory, contents undefined.
  virtual std::shared_ptr<float[]> allocate(int64_t n) const = 0;
  // Copies n floats from the host into this backend's memory, and back.
  virtual void upload(float* dst, const float* host, int64_t n) const = 0;
  virtual void download(float* host, const float* src, int64_t n) const = 0;
  // Waits until every operation issued so far has finished.
  virtual void finish() const = 0;

  virtual void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
                    int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                    int64_t ldc) const = 0;
  virtual void layer_norm_forward(const float* x, int64_t rows, int64_t features,
                                  int64_t total_features, const float* w, const float* b, float eps,
                                  float* y, float* stats, const FeatureSum& sum) const = 0;
  virtual void layer_norm_backward(const float* dy, const float* x, const float* stats,
                                   int64_t rows, int64_t features, int64_t total_features,
                                   const float* w, float* dx, float* dw, float* db,
                                   const FeatureSum& sum) const = 0;
  virtual void column_sums(const float* x, int64_t rows, int64_t cols, float* out) const = 0;
  virtual void add_rows(const float* bias, int64_t rows, int64_t cols, float* y) const = 0;
};

// The CPU backend with `threads` OpenMP threads (0 = the default).
std::unique_ptr<LayerBackend> cpu_layer_backend(int threads);

}  // namespace ringattn::detail
