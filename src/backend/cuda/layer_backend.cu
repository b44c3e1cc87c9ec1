#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>

#include "src/backend/cuda/layer_backend.h"
#include "src/base/check.h"
#include "src/base/cuda_check.h"

namespace ringattn::cuda {

namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;              // per block; LayerNorm kernels: one warp per row
constexpr int64_t kMinRowsPerChunk = 256;  // rows of one partial column sum
constexpr int64_t kMaxChunks = 65535;      // gridDim.y

unsigned blocks(int64_t items, int64_t per_block) {
  return static_cast<unsigned>((items + per_block - 1) / per_block);
}

// The sum over a warp, the same in every lane (a butterfly: each pair adds in both lanes).
__device__ double warp_sum(double v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

__global__ void layer_norm_forward_kernel(const float* x, int64_t rows, int64_t features,
                                          double inv_f, double eps, const float* w, const float* b,
                                          float* y, float* stats) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp;
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  if (r >= rows) return;  // whole warps leave together
  const float* row = x + r * features;
  double s = 0.0;
  for (int64_t j = lane; j < features; j += kWarp) s += row[j];
  const double mean = warp_sum(s) * inv_f;
  double sq = 0.0;
  for (int64_t j = lane; j < features; j += kWarp) {
    const double d = row[j] - mean;
    sq += d * d;
  }
  const float rstd = static_cast<float>(1.0 / sqrt(warp_sum(sq) * inv_f + eps));
  const float m = static_cast<float>(mean);
  for (int64_t j = lane; j < features; j += kWarp) {
    y[r * features + j] = (row[j] - m) * rstd * w[j] + b[j];
  }
  if (lane == 0) {
    stats[2 * r] = m;
    stats[2 * r + 1] = rstd;
  }
}

// LayerNorm's input gradient (dx may be dy: each element is read, then written, by one lane).
__global__ void layer_norm_dx_kernel(const float* dy, const float* x, const float* stats,
                                     int64_t rows, int64_t features, double inv_f, const float* w,
                                     float* dx) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp;
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  if (r >= rows) return;
  const float mean = stats[2 * r], rstd = stats[2 * r + 1];
  const int64_t at = r * features;
  double a = 0.0, c = 0.0;
  for (int64_t j = lane; j < features; j += kWarp) {
    const double g = static_cast<double>(dy[at + j]) * w[j];
    a += g;
    c += g * ((x[at + j] - mean) * rstd);
  }
  const float af = static_cast<float>(warp_sum(a) * inv_f);
  const float cf = static_cast<float>(warp_sum(c) * inv_f);
  for (int64_t j = lane; j < features; j += kWarp) {
    const float xhat = (x[at + j] - mean) * rstd;
    dx[at + j] = rstd * (dy[at + j] * w[j] - af - xhat * cf);
  }
}

// The values a column sum adds up: x[r, j], and LayerNorm's dy[r, j] * xhat[r, j].
struct Element {
  const float* x;
  int64_t cols;
  __device__ double operator()(int64_t r, int64_t j) const { return x[r * cols + j]; }
};
struct TimesXhat {
  const float* dy;
  const float* x;
  const float* stats;
  int64_t cols;
  __device__ double operator()(int64_t r, int64_t j) const {
    const float xhat = (x[r * cols + j] - stats[2 * r]) * stats[2 * r + 1];
    return static_cast<double>(dy[r * cols + j]) * xhat;
  }
};

// partial[c, j] = sum of value(r, j) over the rows of chunk c = blockIdx.y, in order.
template <typename Value>
__global__ void column_partials_kernel(Value value, int64_t rows, int64_t cols,
                                       int64_t rows_per_chunk, double* partial) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= cols) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = min(rows, r0 + rows_per_chunk);
  double s = 0.0;
  for (int64_t r = r0; r < r1; ++r) s += value(r, j);
  partial[static_cast<int64_t>(blockIdx.y) * cols + j] = s;
}

// out[j] = sum over the chunks, in order.
__global__ void column_finish_kernel(const double* partial, int64_t chunks, int64_t cols,
                                     float* out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= cols) return;
  double s = 0.0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * cols + j];
  out[j] = static_cast<float>(s);
}

__global__ void add_rows_kernel(const float* bias, int64_t rows, int64_t cols, float* y) {
  const int64_t n = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    y[i] += bias[i % cols];
  }
}

void check_cublas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    fail(ErrorCode::kDevice, call, " failed: ", cublasGetStatusName(status), " (",
         cublasGetStatusString(status), ")");
  }
}

int cublas_int(int64_t value) {
  if (value > INT_MAX) {
    fail(ErrorCode::kUnsupported, "a projection GEMM dimension of ", value,
         " exceeds cuBLAS's 32-bit int; use fewer rows per call (smaller B * N)");
  }
  return static_cast<int>(value);
}

void require_local(const FeatureSum& sum) {
  if (sum) {
    fail(ErrorCode::kUnsupported,
         "LayerNorm over features split across ranks (head parallelism) is not available on "
         "CUDA tensors; pass host tensors");
  }
}

class CudaLayerBackend final : public detail::LayerBackend {
 public:
  explicit CudaLayerBackend(void* stream) : stream_(static_cast<cudaStream_t>(stream)) {
    check_cublas(cublasCreate(&handle_), "cublasCreate");
    const cublasStatus_t status = cublasSetStream(handle_, stream_);
    if (status != CUBLAS_STATUS_SUCCESS) (void)cublasDestroy(handle_);
    check_cublas(status, "cublasSetStream");
  }
  ~CudaLayerBackend() override { (void)cublasDestroy(handle_); }
  CudaLayerBackend(const CudaLayerBackend&) = delete;
  CudaLayerBackend& operator=(const CudaLayerBackend&) = delete;

  Device device() const override { return Device::kCUDA; }
  std::shared_ptr<float[]> allocate(int64_t n) const override {
    void* p = nullptr;
    RA_CUDA_CHECK(cudaMalloc(&p, static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float)));
    return std::shared_ptr<float[]>(static_cast<float*>(p), [](float* q) { (void)cudaFree(q); });
  }
  void upload(float* dst, const float* host, int64_t n) const override {
    RA_CUDA_CHECK(cudaMemcpyAsync(dst, host, static_cast<size_t>(n) * sizeof(float),
                                  cudaMemcpyHostToDevice, stream_));
  }
  void download(float* host, const float* src, int64_t n) const override {
    RA_CUDA_CHECK(cudaMemcpyAsync(host, src, static_cast<size_t>(n) * sizeof(float),
                                  cudaMemcpyDeviceToHost, stream_));
    finish();
  }
  void finish() const override { RA_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  // Row-major C = A' B' is column-major C^T = B'^T A'^T: cuBLAS multiplies B' by A'.
  void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
            int64_t lda, const float* b, int64_t ldb, float beta, float* c,
            int64_t ldc) const override {
    const float one = 1.0f;
    check_cublas(cublasSgemm(handle_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                             trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, cublas_int(n), cublas_int(m),
                             cublas_int(k), &one, b, cublas_int(ldb), a, cublas_int(lda), &beta, c,
                             cublas_int(ldc)),
                 "cublasSgemm");
  }

  void layer_norm_forward(const float* x, int64_t rows, int64_t features, int64_t total_features,
                          const float* w, const float* b, float eps, float* y, float* stats,
                          const FeatureSum& sum) const override {
    require_local(sum);
    layer_norm_forward_kernel<<<blocks(rows, kThreads / kWarp), kThreads, 0, stream_>>>(
        x, rows, features, 1.0 / static_cast<double>(total_features), eps, w, b, y, stats);
    RA_CUDA_CHECK_LAUNCH("layer_norm_forward_kernel");
  }

  void layer_norm_backward(const float* dy, const float* x, const float* stats, int64_t rows,
                           int64_t features, int64_t total_features, const float* w, float* dx,
                           float* dw, float* db, const FeatureSum& sum) const override {
    require_local(sum);
    // dw and db first: dx may overwrite dy.
    column_sums_of(TimesXhat{dy, x, stats, features}, rows, features, dw);
    column_sums(dy, rows, features, db);
    layer_norm_dx_kernel<<<blocks(rows, kThreads / kWarp), kThreads, 0, stream_>>>(
        dy, x, stats, rows, features, 1.0 / static_cast<double>(total_features), w, dx);
    RA_CUDA_CHECK_LAUNCH("layer_norm_dx_kernel");
  }

  void column_sums(const float* x, int64_t rows, int64_t cols, float* out) const override {
    column_sums_of(Element{x, cols}, rows, cols, out);
  }

  void add_rows(const float* bias, int64_t rows, int64_t cols, float* y) const override {
    const unsigned grid = std::min<unsigned>(blocks(rows * cols, kThreads), 1u << 16);
    add_rows_kernel<<<grid, kThreads, 0, stream_>>>(bias, rows, cols, y);
    RA_CUDA_CHECK_LAUNCH("add_rows_kernel");
  }

 private:
  // out[j] = sum_r value(r, j): fp64 partial sums over fixed chunks of rows, then over the
  // chunks, in a fixed order (the result does not depend on the launch).
  template <typename Value>
  void column_sums_of(Value value, int64_t rows, int64_t cols, float* out) const {
    const int64_t rows_per_chunk = std::max(kMinRowsPerChunk, (rows + kMaxChunks - 1) / kMaxChunks);
    const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
    double* partial = nullptr;
    RA_CUDA_CHECK(
        cudaMallocAsync(&partial, static_cast<size_t>(chunks * cols) * sizeof(double), stream_));
    const dim3 grid(blocks(cols, kThreads), static_cast<unsigned>(chunks));
    column_partials_kernel<<<grid, kThreads, 0, stream_>>>(value, rows, cols, rows_per_chunk,
                                                           partial);
    const cudaError_t launched = cudaGetLastError();
    if (launched == cudaSuccess) {
      column_finish_kernel<<<blocks(cols, kThreads), kThreads, 0, stream_>>>(partial, chunks, cols,
                                                                             out);
    }
    const cudaError_t finished = launched == cudaSuccess ? cudaGetLastError() : launched;
    (void)cudaFreeAsync(partial, stream_);
    check_cuda(finished, "launch of the column sum kernels", __FILE__, __LINE__);
  }

  cudaStream_t stream_;
  cublasHandle_t handle_ = nullptr;
};

}  // namespace

std::unique_ptr<detail::LayerBackend> layer_backend(void* stream) {
  return std::make_unique<CudaLayerBackend>(stream);
}

}  // namespace ringattn::cuda
