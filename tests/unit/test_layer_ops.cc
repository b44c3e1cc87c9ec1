// The multihead layers' GEMM wrapper (every transpose, split over rows or columns across
// threads, leading dimensions with padding) against fp64 loops. (The LayerNorm split over a
// head group is checked by the head-parallel tests in tests/dist/test_distributed.cc.)

#include <gtest/gtest.h>

#include <cmath>

#include "src/backend/cpu/layer_ops.h"
#include "tests/support/layer_util.h"

namespace ringattn::test {
namespace {

TEST(LayerOps, GemmMatchesFp64) {
  struct Shape {
    int64_t m, n, k;
  };
  // Tall (split by rows), wide (split by columns), and small (one BLAS call).
  for (const Shape sh : {Shape{300, 40, 24}, Shape{24, 260, 40}, Shape{5, 7, 3}}) {
    for (const bool ta : {false, true}) {
      for (const bool tb : {false, true}) {
        for (const int threads : {1, 3}) {
          for (const float beta : {0.0f, 1.0f}) {
            SCOPED_TRACE(::testing::Message()
                         << "m=" << sh.m << " n=" << sh.n << " k=" << sh.k << " ta=" << ta
                         << " tb=" << tb << " threads=" << threads << " beta=" << beta);
            const int64_t lda = (ta ? sh.m : sh.k) + 3, ldb = (tb ? sh.k : sh.n) + 2,
                          ldc = sh.n + 5;
            const std::vector<float> a =
                normal_vector(static_cast<size_t>((ta ? sh.k : sh.m) * lda), 1);
            const std::vector<float> b =
                normal_vector(static_cast<size_t>((tb ? sh.n : sh.k) * ldb), 2);
            std::vector<float> c = normal_vector(static_cast<size_t>(sh.m * ldc), 3);
            const std::vector<float> c0 = c;
            cpu::gemm(ta, tb, sh.m, sh.n, sh.k, a.data(), lda, b.data(), ldb, beta, c.data(), ldc,
                      threads);
            double max_err = 0.0;
            for (int64_t i = 0; i < sh.m; ++i) {
              for (int64_t j = 0; j < sh.n; ++j) {
                double ref = beta * static_cast<double>(c0[i * ldc + j]);
                for (int64_t l = 0; l < sh.k; ++l) {
                  ref += static_cast<double>(ta ? a[l * lda + i] : a[i * lda + l]) *
                         (tb ? b[j * ldb + l] : b[l * ldb + j]);
                }
                max_err = std::max(max_err, std::abs(c[i * ldc + j] - ref));
              }
              // The padding of C is left alone.
              for (int64_t j = sh.n; j < ldc; ++j) EXPECT_EQ(c[i * ldc + j], c0[i * ldc + j]);
            }
            EXPECT_LE(max_err, 1e-4);
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace ringattn::test
