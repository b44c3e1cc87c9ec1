#include "src/backend/cuda/attention_cuda.h"
#include "src/backend/cuda/runtime.h"
#include "src/base/host_staging.h"

namespace ringattn::cuda {

void check_cuda(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  fail(ErrorCode::kDevice, call, " failed at ", file, ":", line, ": ", cudaGetErrorName(status),
       " (", cudaGetErrorString(status), ")");
}

void check_device_tensors(std::initializer_list<std::pair<const char*, const TensorView*>> views) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    fail(ErrorCode::kDevice, "the tensors are on a CUDA device but no CUDA device is usable (",
         cudaGetErrorString(status), "); run on a machine with a GPU or pass host tensors");
  }
  int device = 0;
  RA_CUDA_CHECK(cudaGetDevice(&device));
  for (const auto& [name, view] : views) {
    if (view->data == nullptr) continue;  // make_problem names the null pointer
    cudaPointerAttributes attr{};
    RA_CUDA_CHECK(cudaPointerGetAttributes(&attr, view->data));
    require(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged, name,
            ".data is not CUDA device memory (it is marked Device::kCUDA); allocate it with "
            "cudaMalloc / cudaMallocManaged or mark it Device::kCPU");
    require(attr.device == device, name, ".data lives on CUDA device ", attr.device,
            " but the current device is ", device, "; call cudaSetDevice(", attr.device,
            ") first or move the tensor");
  }
}

void allow_shared_memory(const void* kernel, int64_t bytes, const char* what) {
  int device = 0, limit = 0;
  RA_CUDA_CHECK(cudaGetDevice(&device));
  RA_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (bytes > limit) {
    fail(ErrorCode::kUnsupported, what, " needs ", bytes,
         " bytes of shared memory per block but device ", device, " offers ", limit,
         "; use a GPU of compute capability 8.0 or newer, or a smaller head dim");
  }
  RA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(bytes)));
}

dim3 run_grid(size_t runs, const char* what) {
  require_supported(runs <= 65535, "the GPU ring ", what, " at most 65535 runs at once, but this ",
                    "call has ", runs, "; split the batch");
  return dim3(64, static_cast<unsigned>(runs));
}

dim3 task_grid(const TaskList& list, int64_t batch) {
  require_supported(list.tasks.size() <= 65535 && batch <= 65535,
                    "the CUDA backend runs at most 65535 ",
                    "head-branch tasks and batch entries per call, but this call has ",
                    list.tasks.size(), " tasks and B = ", batch, "; split the batch or the heads");
  return dim3(static_cast<unsigned>(list.max_tiles), static_cast<unsigned>(list.tasks.size()),
              static_cast<unsigned>(batch));
}

}  // namespace ringattn::cuda

// The host staging of src/base/host_staging.h, for communicators that move host memory.
namespace ringattn::staging {

bool is_device_pointer(const void* p) {
  cudaPointerAttributes attr{};
  if (p == nullptr || cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    (void)cudaGetLastError();  // an unknown pointer is a host pointer here
    return false;
  }
  return attr.type == cudaMemoryTypeDevice;
}

void copy_to_host(void* host, const void* device, size_t bytes) {
  RA_CUDA_CHECK(cudaMemcpy(host, device, bytes, cudaMemcpyDeviceToHost));
}

void copy_to_device(void* device, const void* host, size_t bytes) {
  RA_CUDA_CHECK(cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice));
  // From pageable memory, cudaMemcpy may return before the DMA has reached the device; a
  // kernel on a non-blocking stream would not wait for it. The copy runs on the legacy
  // default stream: waiting for that stream makes the bytes visible to every stream.
  RA_CUDA_CHECK(cudaStreamSynchronize(cudaStreamLegacy));
}

}  // namespace ringattn::staging
