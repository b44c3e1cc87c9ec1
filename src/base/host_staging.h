#pragma once
// Host staging of CUDA device buffers for communicators that move host memory (mpi): plain
// C++ so that comm/ code can include it. Defined by the CUDA backend in builds with CUDA,
// by the backend selector (no device memory exists) in builds without.

#include <cstddef>

namespace ringattn::staging {

// True when `p` points at memory of a CUDA device (cudaMemoryTypeDevice; managed memory is
// host-accessible and needs no staging). False for host or unknown pointers.
bool is_device_pointer(const void* p);
// Synchronous copies: the bytes are in place (for every stream) on return; failures throw
// Error(kDevice).
void copy_to_host(void* host, const void* device, size_t bytes);
void copy_to_device(void* device, const void* host, size_t bytes);

}  // namespace ringattn::staging
