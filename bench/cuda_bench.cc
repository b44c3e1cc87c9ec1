#include "bench/cuda_bench.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench/tensors.h"

namespace ringattn::bench {

namespace {

void check(cudaError_t status, const char* call) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(call) + " failed: " + cudaGetErrorString(status));
  }
}

void check(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string(call) + " failed: " + cublasGetStatusString(status));
  }
}

struct CudaFree {
  void operator()(void* p) const { (void)cudaFree(p); }
};
using DevicePtr = std::unique_ptr<void, CudaFree>;

DevicePtr device_alloc(size_t bytes) {
  void* p = nullptr;
  check(cudaMalloc(&p, std::max<size_t>(bytes, 1)), "cudaMalloc");
  return DevicePtr(p);
}

// A device copy of a host view (same shape and strides; the view must be contiguous).
struct DeviceView {
  DevicePtr ptr;
  TensorView view;
  size_t bytes;

  explicit DeviceView(const TensorView& host)
      : ptr(device_alloc(static_cast<size_t>(host.numel()) * dtype_size(host.dtype))),
        view(host),
        bytes(static_cast<size_t>(host.numel()) * dtype_size(host.dtype)) {
    check(cudaMemcpy(ptr.get(), host.data, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
    view.data = ptr.get();
    view.device = Device::kCUDA;
  }
  void download(const TensorView& host) const {
    check(cudaMemcpy(host.data, ptr.get(), bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
  }
};

size_t device_used_bytes() {
  size_t free = 0, total = 0;
  check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
  return total - free;
}

}  // namespace

Ceiling measure_cuda_ceiling() {
  const size_t n = kCudaGemmSize, elems = n * n;
  // Inputs: bf16 values in [-1, 1) from a fixed LCG (zeros would flatter the GPU's power).
  std::vector<uint16_t> host(elems);
  uint32_t state = 12345;
  for (uint16_t& x : host) {
    state = state * 1664525u + 1013904223u;
    const float f = static_cast<float>(state >> 8) / 8388608.0f - 1.0f;
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    x = static_cast<uint16_t>(bits >> 16);
  }
  const DevicePtr a = device_alloc(elems * 2), b = device_alloc(elems * 2),
                  c = device_alloc(elems * 2);
  check(cudaMemcpy(a.get(), host.data(), elems * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
  check(cudaMemcpy(b.get(), host.data(), elems * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
  cublasHandle_t handle = nullptr;
  check(cublasCreate(&handle), "cublasCreate");
  const std::unique_ptr<cublasContext, decltype(&cublasDestroy)> owner(handle, &cublasDestroy);
  cudaEvent_t start = nullptr, stop = nullptr;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  const float alpha = 1.0f, beta = 0.0f;
  const int dim = static_cast<int>(n);
  float best_ms = 1e30f;
  for (int rep = 0; rep < 7; ++rep) {
    check(cudaEventRecord(start), "cudaEventRecord");
    check(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, dim, dim, dim, &alpha, a.get(),
                       CUDA_R_16BF, dim, b.get(), CUDA_R_16BF, dim, &beta, c.get(), CUDA_R_16BF,
                       dim, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx");
    check(cudaEventRecord(stop), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0.0f;
    check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    if (rep >= 2) best_ms = std::min(best_ms, ms);  // the first two are warm-ups
  }
  (void)cudaEventDestroy(start);
  (void)cudaEventDestroy(stop);

  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  Ceiling ceiling;
  ceiling.sgemm_gflops = 2.0 * static_cast<double>(n) * n * n / (best_ms * 1e-3) * 1e-9;
  ceiling.blas = format("cuBLAS bf16 GEMM on %s (sm_%d%d)", prop.name, prop.major, prop.minor);
  return ceiling;
}

void print_cuda_ceiling(const Ceiling& c) {
  std::printf("# ceiling %s, %d^3, fp32 accumulation: %.1f GFLOP/s\n", c.blas.c_str(),
              kCudaGemmSize, c.sgemm_gflops);
  std::printf("# ceiling_gflops %.1f (%%ceil is against it)\n#\n", c.gflops());
}

Record run_dilated_cuda(const DilatedShape& s, const RunOptions& options) {
  const DilatedAttention attention(s.config(), {Backend::kCuda, options.threads});
  const size_t used_before = device_used_bytes();
  const Tensors host(s, {0, s.seq}, options.threads);
  const Views& hv = host.views();
  const DeviceView q(hv.q), k(hv.k), v(hv.v), out(hv.out), lse(hv.lse);
  std::optional<Gradients> hg;
  std::vector<DeviceView> dg;  // dout, dq, dk, dv
  if (options.backward) {
    hg.emplace(s, RowRange{0, s.seq}, options.threads);
    for (const TensorView& t : {hg->dout, hg->dq, hg->dk, hg->dv}) dg.emplace_back(t);
  }

  Record r = describe(s, options, "dilated");
  if (hg) {
    attention.forward(q.view, k.view, v.view, out.view, lse.view);
    r.timing = time_calls(
        [&] {
          attention.backward(dg[0].view, q.view, k.view, v.view, out.view, lse.view, dg[1].view,
                             dg[2].view, dg[3].view);
        },
        options.warmup, options.iters);
  } else {
    r.timing = time_calls([&] { attention.forward(q.view, k.view, v.view, out.view, lse.view); },
                          options.warmup, options.iters);
  }
  r.peak_mb =
      static_cast<double>(device_used_bytes() - std::min(used_before, device_used_bytes())) / kMiB;
  r.io_mb = static_cast<double>(host.bytes() + (hg ? hg->bytes() : 0)) / kMiB;
  set_rates(r, s);
  if (options.check) {
    out.download(hv.out);
    lse.download(hv.lse);
    if (hg) {
      dg[1].download(hg->dq);
      dg[2].download(hg->dk);
      dg[3].download(hg->dv);
      r.wrong = count_wrong_grads(s, hv, *hg);
    } else {
      r.wrong = count_wrong(s, hv);
    }
  }
  return r;
}

DeviceViews::DeviceViews(const Views& host) : views_(host) {
  for (TensorView* t : {&views_.q, &views_.k, &views_.v, &views_.out, &views_.lse}) *t = copy(*t);
}

TensorView DeviceViews::copy(const TensorView& t) {
  const size_t bytes = static_cast<size_t>(t.numel()) * dtype_size(t.dtype);
  buffers_.push_back(device_alloc(bytes).release());
  check(cudaMemcpy(buffers_.back(), t.data, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
  TensorView d = t;
  d.data = buffers_.back();
  d.device = Device::kCUDA;
  return d;
}

const std::array<TensorView, 4>& DeviceViews::gradients(const Gradients& g) {
  if (!has_grads_) {
    grads_ = {copy(g.dout), copy(g.dq), copy(g.dk), copy(g.dv)};
    has_grads_ = true;
  }
  return grads_;
}

DeviceViews::~DeviceViews() {
  for (void* p : buffers_) (void)cudaFree(p);
}

void DeviceViews::download_outputs(const Views& host) const {
  for (const auto& [dev, dst] :
       {std::pair{&views_.out, &host.out}, std::pair{&views_.lse, &host.lse}}) {
    check(
        cudaMemcpy(dst->data, dev->data, static_cast<size_t>(dev->numel()) * dtype_size(dev->dtype),
                   cudaMemcpyDeviceToHost),
        "cudaMemcpy");
  }
}

}  // namespace ringattn::bench
