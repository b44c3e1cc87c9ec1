#include "tests/gpu/gpu_util.h"

#include <cstdlib>

namespace ringattn::test {

namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
  }
}

}  // namespace

bool gpu_required() {
  const char* value = std::getenv("RINGATTN_REQUIRE_GPU");
  return value != nullptr && std::string(value) == "1";
}

std::string no_gpu_reason() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    return std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(status);
  }
  if (count == 0) return "cudaGetDeviceCount reports 0 devices";
  return "";
}

DeviceCopy::DeviceCopy(const Tensor& host) : bytes_(host.bytes().size()), view_(host.view()) {
  check(cudaMalloc(&ptr_, bytes_), "cudaMalloc");
  check(cudaMemcpy(ptr_, host.bytes().data(), bytes_, cudaMemcpyHostToDevice), "cudaMemcpy");
  view_.data = ptr_;
  view_.device = Device::kCUDA;
}

DeviceCopy::~DeviceCopy() {
  (void)cudaFree(ptr_);
}

void DeviceCopy::download(Tensor& host) const {
  if (host.bytes().size() != bytes_) throw std::runtime_error("download: size mismatch");
  check(cudaMemcpy(host.view().data, ptr_, bytes_, cudaMemcpyDeviceToHost), "cudaMemcpy");
}

}  // namespace ringattn::test
