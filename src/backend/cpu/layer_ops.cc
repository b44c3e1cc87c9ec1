#include "src/backend/cpu/layer_ops.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <vector>

#include "src/base/check.h"

#ifdef RINGATTN_OPENBLAS
extern "C" int openblas_get_num_threads(void);
extern "C" void openblas_set_num_threads(int num_threads);
#endif

namespace ringattn::cpu {

namespace {

// While alive, BLAS calls run on the calling thread only (OpenBLAS; the previous thread count
// is restored after). Returns false where the BLAS offers no such switch.
class SingleThreadedBlas {
 public:
#ifdef RINGATTN_OPENBLAS
  SingleThreadedBlas() : previous_(openblas_get_num_threads()) {
    openblas_set_num_threads(1);
  }
  ~SingleThreadedBlas() {
    openblas_set_num_threads(previous_);
  }
  static constexpr bool kAvailable = true;

 private:
  int previous_;
#else
  static constexpr bool kAvailable = false;
#endif
};

// Rows (or columns) of C per block below which one BLAS call does the whole product, and the
// blocks per OpenMP thread above it.
constexpr int64_t kMinGemmSplit = 64;
constexpr int kGemmBlocksPerThread = 4;

int resolve(int threads) {
  return threads > 0 ? threads : omp_get_max_threads();
}

int blas_int(int64_t value) {
  if (value > INT_MAX) {
    fail(ErrorCode::kUnsupported, "a projection GEMM dimension of ", value,
         " exceeds the BLAS's 32-bit int; use fewer rows per call (smaller B * N)");
  }
  return static_cast<int>(value);
}

// Columns per task of the column sums (a fixed split: the result is independent of threads).
constexpr int64_t kColumnBlock = 64;

}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc, int threads) {
  const auto call = [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    // Rows [i0, i1) and columns [j0, j1) of C.
    const float* a_part = a + (trans_a ? i0 : i0 * lda);
    const float* b_part = b + (trans_b ? j0 * ldb : j0);
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, blas_int(i1 - i0), blas_int(j1 - j0),
                blas_int(k), 1.0f, a_part, blas_int(lda), b_part, blas_int(ldb), beta,
                c + i0 * ldc + j0, blas_int(ldc));
  };
  // One thread pool: the OpenMP threads each multiply a block of C's rows (or columns) with a
  // single-threaded BLAS call, so that BLAS's own threads never spin against the OpenMP
  // threads of the attention kernels that run next.
  // A few blocks per thread, taken dynamically, so that a thread slowed down (by another
  // process on its core) holds up little.
  const bool by_rows = m >= n;
  const int64_t extent = by_rows ? m : n;
  const int t = resolve(threads);
  const int64_t parts = std::min<int64_t>(kGemmBlocksPerThread * t, extent / kMinGemmSplit);
  if (!SingleThreadedBlas::kAvailable) {
    call(0, m, 0, n);
    return;
  }
  const SingleThreadedBlas single;
  if (t == 1 || parts <= 1) {
    call(0, m, 0, n);
    return;
  }
#pragma omp parallel for num_threads(t) schedule(dynamic, 1)
  for (int64_t part = 0; part < parts; ++part) {
    const int64_t begin = extent * part / parts, end = extent * (part + 1) / parts;
    if (by_rows) {
      call(begin, end, 0, n);
    } else {
      call(0, m, begin, end);
    }
  }
}

void layer_norm_forward(const float* x, int64_t rows, int64_t features, int64_t total_features,
                        const float* w, const float* b, float eps, float* y, float* stats,
                        const FeatureSum& sum, int threads) {
  const double inv_f = 1.0 / static_cast<double>(total_features);
  std::vector<double> acc(static_cast<size_t>(rows));
  const auto sum_row = [&](int64_t r) {
    const float* row = x + r * features;
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < features; ++j) s += row[j];
    acc[r] = s;
  };
  const auto squares_row = [&](int64_t r) {
    const double mean = acc[r] * inv_f;
    const float* row = x + r * features;
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < features; ++j) {
      const double d = row[j] - mean;
      s += d * d;
    }
    stats[2 * r] = static_cast<float>(mean);
    acc[r] = s;
  };
  const auto normalize_row = [&](int64_t r) {
    const float mean = stats[2 * r];
    const float rstd = static_cast<float>(1.0 / std::sqrt(acc[r] * inv_f + eps));
    stats[2 * r + 1] = rstd;
    const float* row = x + r * features;
    float* out = y + r * features;
#pragma omp simd
    for (int64_t j = 0; j < features; ++j) out[j] = (row[j] - mean) * rstd * w[j] + b[j];
  };
  const int t = resolve(threads);
  if (!sum) {
#pragma omp parallel for num_threads(t) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      sum_row(r);
      squares_row(r);
      normalize_row(r);
    }
    return;
  }
#pragma omp parallel for num_threads(t) schedule(static)
  for (int64_t r = 0; r < rows; ++r) sum_row(r);
  sum(acc.data(), rows);
#pragma omp parallel for num_threads(t) schedule(static)
  for (int64_t r = 0; r < rows; ++r) squares_row(r);
  sum(acc.data(), rows);
#pragma omp parallel for num_threads(t) schedule(static)
  for (int64_t r = 0; r < rows; ++r) normalize_row(r);
}

void layer_norm_backward(const float* dy, const float* x, const float* stats, int64_t rows,
                         int64_t features, int64_t total_features, const float* w, float* dx,
                         float* dw, float* db, const FeatureSum& sum, int threads) {
  const double inv_f = 1.0 / static_cast<double>(total_features);
  // Per row: a = sum_j dy w, c = sum_j dy w xhat (over all features of the row).
  std::vector<double> acc(static_cast<size_t>(2 * rows));
  const auto xhat = [&](int64_t r, int64_t j) {
    return (x[r * features + j] - stats[2 * r]) * stats[2 * r + 1];
  };
  const auto sums_row = [&](int64_t r) {
    double a = 0.0, c = 0.0;
#pragma omp simd reduction(+ : a, c)
    for (int64_t j = 0; j < features; ++j) {
      const double g = static_cast<double>(dy[r * features + j]) * w[j];
      a += g;
      c += g * xhat(r, j);
    }
    acc[2 * r] = a;
    acc[2 * r + 1] = c;
  };
  const auto dx_row = [&](int64_t r) {
    const float a = static_cast<float>(acc[2 * r] * inv_f);
    const float c = static_cast<float>(acc[2 * r + 1] * inv_f);
    const float rstd = stats[2 * r + 1];
#pragma omp simd
    for (int64_t j = 0; j < features; ++j) {
      dx[r * features + j] = rstd * (dy[r * features + j] * w[j] - a - xhat(r, j) * c);
    }
  };
  // dw = sum_r dy xhat, db = sum_r dy: column blocks, rows in order (before dx, which may
  // overwrite dy).
  const int t = resolve(threads);
  const int64_t blocks = (features + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for num_threads(t) schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t j0 = blk * kColumnBlock, j1 = std::min(features, j0 + kColumnBlock);
    double sw[kColumnBlock] = {}, sb[kColumnBlock] = {};
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = j0; j < j1; ++j) {
        sw[j - j0] += static_cast<double>(dy[r * features + j]) * xhat(r, j);
        sb[j - j0] += dy[r * features + j];
      }
    }
    for (int64_t j = j0; j < j1; ++j) {
      dw[j] = static_cast<float>(sw[j - j0]);
      db[j] = static_cast<float>(sb[j - j0]);
    }
  }
  if (!sum) {
#pragma omp parallel for num_threads(t) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      sums_row(r);
      dx_row(r);
    }
  } else {
#pragma omp parallel for num_threads(t) schedule(static)
    for (int64_t r = 0; r < rows; ++r) sums_row(r);
    sum(acc.data(), 2 * rows);
#pragma omp parallel for num_threads(t) schedule(static)
    for (int64_t r = 0; r < rows; ++r) dx_row(r);
  }
}

void column_sums(const float* x, int64_t rows, int64_t cols, float* out, int threads) {
  const int64_t blocks = (cols + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for num_threads(resolve(threads)) schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t j0 = blk * kColumnBlock, j1 = std::min(cols, j0 + kColumnBlock);
    double s[kColumnBlock] = {};
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = j0; j < j1; ++j) s[j - j0] += x[r * cols + j];
    }
    for (int64_t j = j0; j < j1; ++j) out[j] = static_cast<float>(s[j - j0]);
  }
}

void add_rows(const float* bias, int64_t rows, int64_t cols, float* y, int threads) {
#pragma omp parallel for num_threads(resolve(threads)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) y[r * cols + j] += bias[j];
  }
}

}  // namespace ringattn::cpu
