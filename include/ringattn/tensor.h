#pragma once
// A non-owning view of a tensor: data pointer, dtype, shape and element strides.
// The last dimension must be contiguous (stride 1); the others may have any stride.

#include <array>
#include <cstdint>
#include <initializer_list>

namespace ringattn {

enum class DType { kF32, kF16, kBF16 };
enum class Device { kCPU, kCUDA };

const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);

struct TensorView {
  static constexpr int kMaxDims = 4;

  void* data = nullptr;
  DType dtype = DType::kF32;
  Device device = Device::kCPU;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> strides{};  // in elements, not bytes

  // A row-major (contiguous) view of `shape`.
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                               Device device = Device::kCPU);
  // A view with explicit element strides (same length as shape).
  static TensorView strided(void* data, DType dtype, std::initializer_list<int64_t> shape,
                            std::initializer_list<int64_t> strides, Device device = Device::kCPU);

  int64_t numel() const;
};

}  // namespace ringattn
