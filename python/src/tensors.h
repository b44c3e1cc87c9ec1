#pragma once
// DLPack arrays (torch tensors, numpy arrays, ... through nanobind's ndarray) as TensorViews.

#include <nanobind/ndarray.h>

#include <cstdint>

#include "ringattn/tensor.h"

namespace ringattn::python {

// Read arrays (q, k, v, dout, ...): any dtype, device and strides; checked by view_of.
using InArray = nanobind::ndarray<nanobind::ro>;
// Written arrays (out, lse, gradients).
using OutArray = nanobind::ndarray<>;

// What view_of needs of an array, whatever its nanobind type.
struct ArrayInfo {
  const void* data;
  nanobind::dlpack::dtype dtype;
  int device_type;
  size_t ndim;
  const int64_t* shape;
  const int64_t* strides;
};

template <typename Array>
ArrayInfo info_of(const Array& a) {
  return {a.data(), a.dtype(), a.device_type(), a.ndim(), a.shape_ptr(), a.stride_ptr()};
}

// A view of `a` (named `name` in errors). Throws Error(kInvalidArgument) for what a TensorView
// cannot describe (a dtype other than float32 / bfloat16 / float16, more than 4 dimensions, a
// device other than the CPU or CUDA); everything else (shapes, strides, devices against the
// build) is left to the library's own checks.
TensorView view_of(const char* name, const ArrayInfo& a);

template <typename Array>
TensorView view_of(const char* name, const Array& a) {
  return view_of(name, info_of(a));
}

}  // namespace ringattn::python
