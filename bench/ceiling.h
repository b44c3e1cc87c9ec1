#pragma once
// The machine's own FLOP/s ceiling, measured in the same run as the rows it is compared
// with: a large sgemm through the BLAS of the build, and a peak-FMA loop on the widest
// SIMD the CPU has (the physical limit; a BLAS pinned to a narrower core type misses it).

#include <algorithm>
#include <string>

namespace ringattn::bench {

struct Ceiling {
  double sgemm_gflops = 0;
  std::string blas;  // the BLAS and its core type, e.g. "OpenBLAS core Haswell"
  double fma_gflops = 0;
  std::string fma_isa;  // e.g. "AVX2+FMA"
  int fma_lanes = 0;    // fp32 lanes per FMA instruction

  double gflops() const { return std::max(sgemm_gflops, fma_gflops); }
};

// sgemm 4096^3: best of 3 after a warm-up.
inline constexpr int kSgemmSize = 4096;
// Independent FMA chains per thread in the peak loop (enough to hide the FMA latency).
inline constexpr int kFmaChains = 12;

// Both measurements on `threads` threads (resolved, >= 1).
Ceiling measure_ceiling(int threads);

}  // namespace ringattn::bench
