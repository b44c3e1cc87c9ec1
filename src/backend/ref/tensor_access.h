#pragma once
// Element access through a dtype known only at run time (reference and tests; the fast
// kernels dispatch on dtype once and use typed pointers).

#include "src/base/dtype.h"
#include "src/plan/problem.h"

namespace ringattn {

inline float load_f32(const void* base, DType dtype, int64_t offset) {
  switch (dtype) {
    case DType::kF32:
      return static_cast<const float*>(base)[offset];
    case DType::kF16:
      return to_f32(static_cast<const fp16_t*>(base)[offset]);
    case DType::kBF16:
      return to_f32(static_cast<const bf16_t*>(base)[offset]);
  }
  return 0.0f;
}

inline void store_f32(void* base, DType dtype, int64_t offset, float value) {
  switch (dtype) {
    case DType::kF32:
      static_cast<float*>(base)[offset] = value;
      break;
    case DType::kF16:
      static_cast<fp16_t*>(base)[offset] = from_f32<fp16_t>(value);
      break;
    case DType::kBF16:
      static_cast<bf16_t*>(base)[offset] = from_f32<bf16_t>(value);
      break;
  }
}

inline int64_t offset_of(const Strides3& st, int64_t b, int64_t n, int64_t h) {
  return b * st.b + n * st.n + h * st.h;
}

}  // namespace ringattn
