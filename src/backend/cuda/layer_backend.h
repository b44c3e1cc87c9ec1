#pragma once
// The CUDA LayerBackend of the multihead layer: projections through cuBLAS SGEMM (fp32, no
// TF32: CUBLAS_DEFAULT_MATH), LayerNorm forward/backward, bias broadcasts and column sums as
// small kernels, deterministic (fixed reduction orders, fp64 accumulators, no atomics).
// Only in builds with RINGATTN_HAVE_CUDA; plain C++ so that host code can include it.

#include <memory>

#include "src/backend/layer_backend.h"

namespace ringattn::cuda {

// A backend issuing its work on `stream` (a cudaStream_t; nullptr = the default stream) of
// the current device, with a cuBLAS handle of its own. Its allocations are cudaMalloc'd and
// cudaFree'd (they may outlive the stream: MultiheadSaved keeps one).
std::unique_ptr<detail::LayerBackend> layer_backend(void* stream);

}  // namespace ringattn::cuda
