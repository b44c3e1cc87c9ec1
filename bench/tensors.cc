#include "bench/tensors.h"

#include <cmath>
#include <numbers>

#include "bench/dilated_bench.h"
#include "bench/harness.h"
#include "src/backend/ref/tensor_access.h"

namespace ringattn::bench {
namespace {

constexpr uint64_t kInputSeed = 20241201;  // the same inputs in every run

// SplitMix64's output function: a bijective mix of all 64 bits.
uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9;
  x = (x ^ (x >> 27)) * 0x94d049bb133111eb;
  return x ^ (x >> 31);
}

// Sample `index` of the N(0,1) stream `key`: Box-Muller on the two 32-bit halves of a hash.
float normal_sample(uint64_t key, uint64_t index) {
  const uint64_t bits = splitmix64(key + index);
  const double u1 = (static_cast<double>(bits >> 32) + 0.5) * 0x1p-32;  // (0, 1)
  const double u2 = static_cast<double>(bits & 0xffffffffu) * 0x1p-32;  // [0, 1)
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2));
}

size_t bytes_of(DType dtype, int64_t elements) {
  return static_cast<size_t>(elements) * dtype_size(dtype);
}

}  // namespace

void fill_normal(const TensorView& t, int id, int64_t seq, RowRange rows, int threads) {
  const uint64_t key = splitmix64(kInputSeed + static_cast<uint64_t>(id));
  const int64_t batch = t.shape[0], row_elements = t.shape[2] * t.shape[3];
#pragma omp parallel for collapse(2) schedule(static) num_threads(resolved_threads(threads))
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t n = 0; n < rows.count; ++n) {
      const int64_t local = (b * rows.count + n) * row_elements;
      const int64_t global = (b * seq + rows.begin + n) * row_elements;
      for (int64_t e = 0; e < row_elements; ++e) {
        store_f32(t.data, t.dtype, local + e,
                  normal_sample(key, static_cast<uint64_t>(global + e)));
      }
    }
  }
}

Views make_views(const DilatedShape& s, int64_t rows, void* q, void* k, void* v, void* out,
                 float* lse) {
  const int64_t b = s.batch, h = s.heads, hkv = s.kv_heads, d = s.head_dim;
  return {TensorView::contiguous(q, s.dtype, {b, rows, h, d}),
          TensorView::contiguous(k, s.dtype, {b, rows, hkv, d}),
          TensorView::contiguous(v, s.dtype, {b, rows, hkv, d}),
          TensorView::contiguous(out, s.dtype, {b, rows, h, d}),
          TensorView::contiguous(lse, DType::kF32, {b, h, rows})};
}

Tensors::Tensors(const DilatedShape& s, RowRange rows, int threads)
    : rows_(rows),
      q_(bytes_of(s.dtype, s.batch * rows.count * s.heads * s.head_dim)),
      k_(bytes_of(s.dtype, s.batch * rows.count * s.kv_heads * s.head_dim)),
      v_(k_.size()),
      out_(q_.size()),
      lse_(static_cast<size_t>(s.batch * s.heads * rows.count)),
      views_(make_views(s, rows.count, q_.data(), k_.data(), v_.data(), out_.data(), lse_.data())) {
  int id = 0;
  for (const TensorView& t : {views_.q, views_.k, views_.v}) {
    fill_normal(t, id++, s.seq, rows, threads);
  }
}

Gradients::Gradients(const DilatedShape& s, RowRange rows, int threads)
    : dout_(bytes_of(s.dtype, s.batch * rows.count * s.heads * s.head_dim)),
      dq_(dout_.size()),
      dk_(bytes_of(s.dtype, s.batch * rows.count * s.kv_heads * s.head_dim)),
      dv_(dk_.size()) {
  const int64_t b = s.batch, n = rows.count, h = s.heads, hkv = s.kv_heads, d = s.head_dim;
  dout = TensorView::contiguous(dout_.data(), s.dtype, {b, n, h, d});
  dq = TensorView::contiguous(dq_.data(), s.dtype, {b, n, h, d});
  dk = TensorView::contiguous(dk_.data(), s.dtype, {b, n, hkv, d});
  dv = TensorView::contiguous(dv_.data(), s.dtype, {b, n, hkv, d});
  fill_normal(dout, 3, s.seq, rows, threads);
}

size_t Tensors::bytes() const {
  return q_.size() + k_.size() + v_.size() + out_.size() + lse_.size() * sizeof(float);
}

size_t Tensors::full_bytes(const DilatedShape& s) {
  const int64_t rows = s.batch * s.seq;
  return bytes_of(s.dtype, rows * (2 * s.heads + 2 * s.kv_heads) * s.head_dim) +
         bytes_of(DType::kF32, rows * s.heads);
}

Tolerance out_tolerance(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return {1e-5, 1e-5};
    case DType::kBF16:
      return {1e-2, 1e-2};
    case DType::kF16:
      return {2e-3, 2e-3};
  }
  return {0.0, 0.0};
}

Tolerance grad_tolerance(DType dtype) {
  const Tolerance out = out_tolerance(dtype);
  return {10.0 * out.abs, 10.0 * out.rel};
}

bool within(double x, double ref, Tolerance tol) {
  if (std::isinf(ref)) return x == ref;
  return std::abs(x - ref) <= tol.abs + tol.rel * std::abs(ref);  // false for NaN
}

}  // namespace ringattn::bench
