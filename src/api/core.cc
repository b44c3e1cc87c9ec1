// Small public helpers: errors, dtypes, tensor views, config parsing and checks.

#include <cmath>

#include "ringattn/config.h"
#include "ringattn/dilated_attention.h"
#include "ringattn/error.h"
#include "ringattn/tensor.h"
#include "ringattn/version.h"
#include "src/backend/backend.h"
#include "src/base/check.h"
#include "src/base/enum_names.h"

namespace ringattn {

const char* version() {
  return RINGATTN_VERSION;
}

const char* error_code_name(ErrorCode code) {
  static const char* const names[] = {"invalid argument", "unsupported", "communication",
                                      "device",           "internal",    "out of memory"};
  return enum_name(code, names);
}

Error::Error(ErrorCode code, const std::string& message)
    : std::runtime_error(std::string("ringattn: ") + error_code_name(code) + ": " + message),
      code_(code),
      message_(message) {}

const char* dtype_name(DType dtype) {
  static const char* const names[] = {"fp32", "fp16", "bf16"};
  return enum_name(dtype, names);
}

size_t dtype_size(DType dtype) {
  return dtype == DType::kF32 ? 4 : 2;
}

TensorView TensorView::contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                                  Device device) {
  require(shape.size() >= 1 && shape.size() <= static_cast<size_t>(kMaxDims),
          "TensorView::contiguous: shape has ", shape.size(), " dimensions; use 1 to ", kMaxDims);
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t extent : shape) t.shape[i++] = extent;
  int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.strides[d] = stride;
    require(t.shape[d] >= 0 && !__builtin_mul_overflow(stride, t.shape[d], &stride),
            "TensorView::contiguous: shape[", d, "] = ", t.shape[d],
            (t.shape[d] < 0 ? " is negative" : " makes more than 2^63 elements"),
            "; pass the extents of the buffer you have");
  }
  return t;
}

TensorView TensorView::strided(void* data, DType dtype, std::initializer_list<int64_t> shape,
                               std::initializer_list<int64_t> strides, Device device) {
  require(strides.size() == shape.size(), "TensorView::strided: ", strides.size(), " strides for ",
          shape.size(), " dimensions; give one stride per dimension");
  TensorView t = contiguous(data, dtype, shape, device);
  int i = 0;
  for (int64_t s : strides) t.strides[i++] = s;
  return t;
}

int64_t TensorView::numel() const {
  require(ndim >= 0 && ndim <= kMaxDims, "TensorView::numel: ndim = ", ndim, " is outside [0, ",
          kMaxDims, "]");
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) {
    require(shape[d] >= 0 && !__builtin_mul_overflow(n, shape[d], &n), "TensorView::numel: shape[",
            d, "] = ", shape[d], " makes a negative count or more than 2^63 elements");
  }
  return n;
}

const char* mode_name(Mode mode) {
  static const char* const names[] = {"groups", "longnet"};
  return enum_name(mode, names);
}

Mode parse_mode(const std::string& text) {
  return parse_enum("mode", "a mode", text, mode_name, Mode::kLongNet);
}

const char* backend_name(Backend backend) {
  static const char* const names[] = {"cpu", "reference", "cuda"};
  return enum_name(backend, names);
}

Backend parse_backend(const std::string& text) {
  return parse_enum("backend", "a backend", text, backend_name, Backend::kCuda);
}

void ExecOptions::validate() const {
  const int b = static_cast<int>(backend);
  require(b >= 0 && b <= static_cast<int>(Backend::kCuda), "ExecOptions.backend = ", b,
          " is not a Backend; use Backend::kCpu, kReference or kCuda");
  require(num_threads >= 0, "ExecOptions.num_threads = ", num_threads,
          "; use a positive thread count, or 0 for OpenMP's default");
  const int k = static_cast<int>(cpu_bf16);
  require(k >= 0 && k <= static_cast<int>(CpuBf16::kAmx), "ExecOptions.cpu_bf16 = ", k,
          " is not a CpuBf16; use CpuBf16::kAuto, kWiden, kDot or kAmx");
  if (backend != Backend::kCuda) backend_of_kind(backend).check_options(*this);
}

const char* cpu_bf16_name(CpuBf16 kernel) {
  static const char* const names[] = {"auto", "widen", "dot", "amx"};
  return enum_name(kernel, names);
}

CpuBf16 parse_cpu_bf16(const std::string& text) {
  return parse_enum("cpu_bf16", "a CPU bf16 kernel", text, cpu_bf16_name, CpuBf16::kAmx);
}

void DilatedConfig::validate() const {
  require(mode == Mode::kGroups || mode == Mode::kLongNet, "mode = ", static_cast<int>(mode),
          " is not a Mode; use Mode::kGroups or Mode::kLongNet");
  const size_t g = segment_lengths.size();
  require(g >= 1,
          "segment_lengths is empty; give at least one branch, e.g. segment_lengths = "
          "{2048} and dilation_rates = {1}");
  require(dilation_rates.size() == g, "segment_lengths has ", g, " entries but dilation_rates has ",
          dilation_rates.size(), "; give one dilation rate per segment length");
  for (size_t i = 0; i < g; ++i) {
    require(segment_lengths[i] >= 1, "segment_lengths[", i, "] = ", segment_lengths[i],
            "; segment lengths must be >= 1");
    require(dilation_rates[i] >= 1, "dilation_rates[", i, "] = ", dilation_rates[i],
            "; dilation rates must be >= 1");
    require(dilation_rates[i] <= segment_lengths[i], "dilation_rates[", i,
            "] = ", dilation_rates[i], " exceeds segment_lengths[", i, "] = ", segment_lengths[i],
            "; use a dilation rate <= its segment length");
  }
  if (scale) {
    require(std::isfinite(*scale) && *scale != 0.0f, "scale = ", *scale,
            "; use a finite, non-zero scale (or leave it unset for 1/sqrt(head_dim))");
  }
  require(head_offset >= 0 && total_heads >= 0, "head_offset = ", head_offset,
          " and total_heads = ", total_heads,
          "; both must be >= 0 (total_heads = 0: the tensors hold every head)");
}

}  // namespace ringattn
