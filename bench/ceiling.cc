// The ceiling: sgemm through the BLAS of the build and a peak-FMA loop (x86-64).

#include "bench/ceiling.h"

#include <cblas.h>
#include <immintrin.h>

#include <cstdint>
#include <iterator>
#include <numeric>
#include <vector>

#include "bench/harness.h"
#include "src/backend/cpu/bf16_kernels.h"

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

// kFmaChains chains acc += a . b of vdpbf16ps (32 bf16 products per instruction, 64 FLOPs).
// a holds pairs (1, 1) and b pairs (2^-20, 0): acc grows by 2^-20 per step, no overflow.
__attribute__((target("avx512f,avx512bf16"))) float dot_bf16_chains(int64_t iters) {
  __m512 acc[kFmaChains];
  for (__m512& a : acc) a = _mm512_set1_ps(1.0f);
  const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(0x3f803f80));
  const __m512bh b = reinterpret_cast<__m512bh>(_mm512_set1_epi32(0x00003580));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (__m512& x : acc) x = _mm512_dpbf16_ps(x, a, b);
  }
  __m512 sum = _mm512_setzero_ps();
  for (const __m512& x : acc) sum = _mm512_add_ps(sum, x);
  float lanes[16];
  _mm512_storeu_ps(lanes, sum);
  return std::accumulate(std::begin(lanes), std::end(lanes), 0.0f);
}

constexpr int64_t kAmxFlops = 16 * 16 * 32 * 2;  // one TDPBF16PS: 16 x 16 x 32 products

// Four independent accumulator tiles, each C += A B per step (A and B loaded once).
__attribute__((target("amx-tile,amx-bf16,avx512f"))) float amx_bf16_chains(int64_t iters) {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
  } config;
  alignas(64) uint16_t ab[16 * 32];
  alignas(64) float c[16 * 16];
  for (uint16_t& x : ab) x = 0x3580;  // 2^-20
  _tile_loadconfig(&config);
  _tile_loadd(4, ab, 64);
  _tile_loadd(5, ab, 64);
  _tile_loadd(6, ab, 64);
  _tile_loadd(7, ab, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 64);
  _tile_release();
  return std::accumulate(std::begin(c), std::end(c), 0.0f);
}

// FLOP/s of `run(iters)` on `threads` threads at once, `flops_per_iter` per thread and step.
double peak_gflops(float (*run)(int64_t), int64_t iters, double flops_per_iter, int threads) {
  float sink = 0.0f;
  int team = 0;
  const auto all = [&] {
    team = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink, team)
    {
      sink += run(iters);
      team += 1;
    }
  };
  const double seconds = time_calls(all, 1, kRepeats).min_ms * 1e-3;
  g_sink = sink;
  return flops_per_iter * static_cast<double>(iters) * team / seconds * 1e-9;
}

// Whether the library runs bf16 products on `kernel` here (auto picks AMX over dot products).
bool has_kernel(CpuBf16 kernel) {
  const CpuBf16 best = cpu::resolve_bf16(CpuBf16::kAuto);
  return best == kernel || (kernel == CpuBf16::kDot && best == CpuBf16::kAmx);
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
  return peak_gflops(kernel.run, kFmaIters, 2.0 * kernel.lanes * kFmaChains, threads);
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
  if (has_kernel(CpuBf16::kDot)) {
    c.dot_bf16_gflops = peak_gflops(dot_bf16_chains, kFmaIters / 4, 64.0 * kFmaChains, threads);
  }
  if (has_kernel(CpuBf16::kAmx)) {
    c.amx_bf16_gflops = peak_gflops(amx_bf16_chains, kFmaIters / 64, 4.0 * kAmxFlops, threads);
  }
  return c;
}

}  // namespace ringattn::bench
