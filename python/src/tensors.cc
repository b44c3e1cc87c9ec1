#include "python/src/tensors.h"

#include "src/base/check.h"

namespace ringattn::python {

namespace {

namespace dl = nanobind::dlpack;

const char* framework_dtype(const dl::dtype& d) {
  if (d.code == static_cast<uint8_t>(dl::dtype_code::Float) && d.bits == 64) return "float64";
  if (d.code == static_cast<uint8_t>(dl::dtype_code::Int)) return "a signed integer type";
  if (d.code == static_cast<uint8_t>(dl::dtype_code::UInt)) return "an unsigned integer type";
  if (d.code == static_cast<uint8_t>(dl::dtype_code::Bool)) return "bool";
  if (d.code == static_cast<uint8_t>(dl::dtype_code::Complex)) return "a complex type";
  return "an unsupported type";
}

}  // namespace

TensorView view_of(const char* name, const ArrayInfo& a) {
  TensorView v;
  const dl::dtype& d = a.dtype;
  const bool scalar = d.lanes == 1;
  if (scalar && d.code == static_cast<uint8_t>(dl::dtype_code::Float) && d.bits == 32) {
    v.dtype = DType::kF32;
  } else if (scalar && d.code == static_cast<uint8_t>(dl::dtype_code::Float) && d.bits == 16) {
    v.dtype = DType::kF16;
  } else if (scalar && d.code == static_cast<uint8_t>(dl::dtype_code::Bfloat) && d.bits == 16) {
    v.dtype = DType::kBF16;
  } else {
    fail(ErrorCode::kInvalidArgument, name, " has dtype ", framework_dtype(d), " (",
         static_cast<int>(d.bits),
         " bits); ringattn takes float32, bfloat16 or float16: cast it first (e.g. ", name,
         ".float())");
  }
  if (a.device_type == nanobind::device::cpu::value) {
    v.device = Device::kCPU;
  } else if (a.device_type == nanobind::device::cuda::value) {
    v.device = Device::kCUDA;
  } else {
    fail(ErrorCode::kInvalidArgument, name, " lives on DLPack device type ", a.device_type,
         "; ringattn takes CPU or CUDA tensors: move it with .cpu() or .cuda()");
  }
  require(a.ndim <= static_cast<size_t>(TensorView::kMaxDims), name, " has ", a.ndim,
          " dimensions; it must be [B, N, H, D] (lse: [B, H, N])");
  v.data = const_cast<void*>(a.data);
  v.ndim = static_cast<int>(a.ndim);
  for (size_t i = 0; i < a.ndim; ++i) {
    v.shape[i] = a.shape[i];
    // A dimension of size 1 is never stepped over: its stride is whatever the framework chose.
    v.strides[i] = a.shape[i] == 1 && i + 1 == a.ndim ? 1 : a.strides[i];
  }
  return v;
}

}  // namespace ringattn::python
