#pragma once
// ringattn_bench --backend cuda (builds with CUDA only): the GPU's ceiling, a cuBLAS bf16
// GEMM measured in the same run, and the dilated rows with their tensors on the GPU.

#include <array>
#include <vector>

#include "bench/ceiling.h"
#include "bench/dilated_bench.h"
#include "bench/tensors.h"

namespace ringattn::bench {

// bf16 GEMM n x n x n (fp32 accumulation, cublasGemmEx): best of 5 after 2 warm-ups, timed
// with CUDA events.
inline constexpr int kCudaGemmSize = 8192;

// The current GPU's ceiling: sgemm_gflops holds the cuBLAS bf16 GEMM rate, blas names it and
// the GPU; fma_gflops is 0 (no CPU loop on this path).
Ceiling measure_cuda_ceiling();
void print_cuda_ceiling(const Ceiling& ceiling);

// run_dilated on the current CUDA device: the host tensors' values are copied to device
// buffers, the timed calls run there (each call returns when its results are written), and
// --check copies the results back and compares them with the fp64 reference. peak_mb is
// device memory (cudaMemGetInfo) in use at the end above that before the row's tensors.
Record run_dilated_cuda(const DilatedShape& shape, const RunOptions& options);

// Device copies of one row's host views (q, k, v, out, lse) and, for a backward, of its
// gradients (dout, dq, dk, dv), for --impl ring --backend cuda.
class DeviceViews {
 public:
  explicit DeviceViews(const Views& host);
  ~DeviceViews();
  DeviceViews(const DeviceViews&) = delete;
  DeviceViews& operator=(const DeviceViews&) = delete;
  const Views& views() const { return views_; }
  // Device copies of g's dout, dq, dk, dv (made on the first call, for the same g after).
  const std::array<TensorView, 4>& gradients(const Gradients& g);
  // Copies out and lse back into `host` (the views this was made from).
  void download_outputs(const Views& host) const;

 private:
  // A device copy of `t` (kept in buffers_).
  TensorView copy(const TensorView& t);

  std::vector<void*> buffers_;
  Views views_;
  std::array<TensorView, 4> grads_{};
  bool has_grads_ = false;
};

}  // namespace ringattn::bench
