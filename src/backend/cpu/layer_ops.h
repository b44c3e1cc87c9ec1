#pragma once
// The dense pieces of the multihead layers on the CPU: GEMMs through the BLAS of the build,
// LayerNorm forward and backward over the features of each row (optionally split over ranks),
// column sums and bias broadcasts. All fp32, row-major; OpenMP threads `threads` (0 = the
// default); results do not depend on the thread count.

#include <cstdint>

#include "src/backend/layer_backend.h"

namespace ringattn::cpu {

// C[m, n] = A' B' + beta C with A' = A [m, k] (or A^T for A [k, m] when trans_a), B' = B [k, n]
// (or B^T for B [n, k] when trans_b); leading dimensions are the row lengths as stored.
// With OpenBLAS, the `threads` OpenMP threads split C into blocks and make single-threaded BLAS
// calls (BLAS's own thread count is set to 1 meanwhile and restored after); with another BLAS,
// one call with that BLAS's own threading. Throws Error(kUnsupported) when a size exceeds the
// BLAS's int.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc, int threads);

// y[r, :] = (x[r, :] - mean_r) * rstd_r * w + b over `features` local features of
// `total_features` (the others on the ranks `sum` reaches). x, y: [rows, features];
// w, b: [features]; stats: [rows, 2] written (mean, rstd).
void layer_norm_forward(const float* x, int64_t rows, int64_t features, int64_t total_features,
                        const float* w, const float* b, float eps, float* y, float* stats,
                        const FeatureSum& sum, int threads);

// The gradient of layer_norm_forward: dx [rows, features] written from dy, x and stats
// (dx may be dy); dw, db [features] written (sums over the rows).
void layer_norm_backward(const float* dy, const float* x, const float* stats, int64_t rows,
                         int64_t features, int64_t total_features, const float* w, float* dx,
                         float* dw, float* db, const FeatureSum& sum, int threads);

// out[j] = sum_r x[r, j] (x: [rows, cols]), in a fixed order.
void column_sums(const float* x, int64_t rows, int64_t cols, float* out, int threads);

// y[r, :] += bias for every row (y: [rows, cols]).
void add_rows(const float* bias, int64_t rows, int64_t cols, float* y, int threads);

}  // namespace ringattn::cpu
