#pragma once
// The CUDA backend: the same (O, lse) partials over strided (dilated) rows and the same
// merges as the CPU backend, as kernels. Only in builds with RINGATTN_HAVE_CUDA; this
// header is plain C++ (no CUDA types) so that host code can include it.

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

#include "src/plan/problem.h"

namespace ringattn::cuda {

// Head dims: 64 and 128 have their own kernels, every other D up to 256 a generic one.
constexpr int64_t kMaxHeadDim = 256;

// Throws Error(kDevice) when no CUDA device is usable, and Error(kInvalidArgument) naming
// the tensor when a view marked Device::kCUDA does not point at memory of the current device.
void check_device_tensors(std::initializer_list<std::pair<const char*, const TensorView*>> views);
// Computes p.out (and p.lse when set) on `stream` (a cudaStream_t; nullptr = the default
// stream) and, when `wait`, waits for it. p describes one whole sequence on the current device.
void forward(const Problem& p, void* stream, bool wait);

// Computes bp.dq, bp.dk, bp.dv (SPEC.md backward, deterministic: no floating-point atomics)
// from the saved out and lse, on `stream`, and, when `wait`, waits for it.
void backward(const BackwardProblem& bp, void* stream, bool wait);

}  // namespace ringattn::cuda
