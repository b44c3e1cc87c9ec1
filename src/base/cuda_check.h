#pragma once
// Every CUDA runtime / cuBLAS call and every kernel launch is checked; a failure becomes
// ringattn::Error(kDevice) naming the call, file:line and the library's error string.

#include <cuda_runtime.h>

namespace ringattn::cuda {

// Throws Error(kDevice) when `status` is not cudaSuccess.
void check_cuda(cudaError_t status, const char* call, const char* file, int line);

}  // namespace ringattn::cuda

#define RA_CUDA_CHECK(call) ::ringattn::cuda::check_cuda((call), #call, __FILE__, __LINE__)
// After a <<<...>>> launch: configuration errors are reported at once, faults in the kernel
// at the next synchronizing call (also checked).
#define RA_CUDA_CHECK_LAUNCH(name) \
  ::ringattn::cuda::check_cuda(cudaGetLastError(), "launch of " name, __FILE__, __LINE__)
