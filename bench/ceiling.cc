// The ceiling: sgemm through the BLAS of the build and a peak-FMA loop (x86-64).

#include "ceiling.h"

#include <cblas.h>
#include <immintrin.h>

#include <cstdint>
#include <iterator>
#include <numeric>
#include <vector>

#include "harness.h"

#ifdef RINGATTN_BENCH_OPENBLAS
extern "C" char* openblas_get_corename(void);
extern "C" void openblas_set_num_threads(int num_threads);
#endif

namespace ringattn::bench {
namespace {

constexpr int kRepeats = 3;
constexpr int64_t kFmaIters = int64_t{1} << 26;  // per thread: ~0.1 s on a 3 GHz AVX2 core

// Keeps the FMA loops' results alive.
volatile float g_sink;

// Each kernel runs kFmaChains independent chains acc = acc * mul + add for `iters` steps.
// mul + add = 1 keeps the values near 1 (no overflow, no denormals).
__attribute__((target("avx512f"))) float fma_chains_avx512(int64_t iters) {
  __m512 acc[kFmaChains];
  for (__m512& a : acc) a = _mm512_set1_ps(1.0f);
  const __m512 mul = _mm512_set1_ps(0.999f), add = _mm512_set1_ps(0.001f);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (__m512& a : acc) a = _mm512_fmadd_ps(a, mul, add);
  }
  __m512 sum = _mm512_setzero_ps();
  for (const __m512& a : acc) sum = _mm512_add_ps(sum, a);
  float lanes[16];
  _mm512_storeu_ps(lanes, sum);
  return std::accumulate(std::begin(lanes), std::end(lanes), 0.0f);
}

__attribute__((target("avx2,fma"))) float fma_chains_avx2(int64_t iters) {
  __m256 acc[kFmaChains];
  for (__m256& a : acc) a = _mm256_set1_ps(1.0f);
  const __m256 mul = _mm256_set1_ps(0.999f), add = _mm256_set1_ps(0.001f);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (__m256& a : acc) a = _mm256_fmadd_ps(a, mul, add);
  }
  __m256 sum = _mm256_setzero_ps();
  for (const __m256& a : acc) sum = _mm256_add_ps(sum, a);
  float lanes[8];
  _mm256_storeu_ps(lanes, sum);
  return std::accumulate(std::begin(lanes), std::end(lanes), 0.0f);
}

// The x86-64 baseline has no FMA: a multiply and an add (still 2 FLOPs per lane).
float fma_chains_sse2(int64_t iters) {
  __m128 acc[kFmaChains];
  for (__m128& a : acc) a = _mm_set1_ps(1.0f);
  const __m128 mul = _mm_set1_ps(0.999f), add = _mm_set1_ps(0.001f);
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (__m128& a : acc) a = _mm_add_ps(_mm_mul_ps(a, mul), add);
  }
  __m128 sum = _mm_setzero_ps();
  for (const __m128& a : acc) sum = _mm_add_ps(sum, a);
  float lanes[4];
  _mm_storeu_ps(lanes, sum);
  return std::accumulate(std::begin(lanes), std::end(lanes), 0.0f);
}

struct FmaKernel {
  const char* isa;
  int lanes;
  float (*run)(int64_t iters);
};

FmaKernel widest_fma_kernel() {
  if (__builtin_cpu_supports("avx512f")) return {"AVX-512", 16, fma_chains_avx512};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return {"AVX2+FMA", 8, fma_chains_avx2};
  }
  return {"SSE2 mul+add", 4, fma_chains_sse2};
}

double fma_gflops(const FmaKernel& kernel, int threads) {
  float sink = 0.0f;
  int team = 0;
  const auto run = [&] {
    team = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink, team)
    {
      sink += kernel.run(kFmaIters);
      team += 1;
    }
  };
  const double seconds = time_calls(run, 1, kRepeats).min_ms * 1e-3;
  g_sink = sink;
  const double flops = 2.0 * kernel.lanes * kFmaChains * static_cast<double>(kFmaIters) * team;
  return flops / seconds * 1e-9;
}

double sgemm_gflops(int threads) {
#ifdef RINGATTN_BENCH_OPENBLAS
  openblas_set_num_threads(threads);
#else
  (void)threads;  // the BLAS picks its own thread count
#endif
  const int n = kSgemmSize;
  const size_t elems = static_cast<size_t>(n) * n;
  std::vector<float> a(elems), b(elems), c(elems);
  for (size_t i = 0; i < elems; ++i) {
    a[i] = static_cast<float>(i % 17) * 0.0625f - 0.5f;
    b[i] = static_cast<float>(i % 13) * 0.0625f - 0.375f;
  }
  const auto run = [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(), n,
                0.0f, c.data(), n);
  };
  const double seconds = time_calls(run, 1, kRepeats).min_ms * 1e-3;
  return 2.0 * n * n * static_cast<double>(n) / seconds * 1e-9;
}

std::string blas_name() {
#ifdef RINGATTN_BENCH_OPENBLAS
  return std::string("OpenBLAS core ") + openblas_get_corename();
#else
  return "BLAS (not OpenBLAS; core type unknown)";
#endif
}

}  // namespace

Ceiling measure_ceiling(int threads) {
  Ceiling c;
  // sgemm first: the FMA loop's warm-up then covers the time OpenBLAS threads keep spinning.
  c.sgemm_gflops = sgemm_gflops(threads);
  c.blas = blas_name();
  const FmaKernel kernel = widest_fma_kernel();
  c.fma_gflops = fma_gflops(kernel, threads);
  c.fma_isa = kernel.isa;
  c.fma_lanes = kernel.lanes;
  return c;
}

}  // namespace ringattn::bench
