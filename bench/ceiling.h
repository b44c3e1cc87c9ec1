#pragma once
// The machine's own FLOP/s ceiling, measured in the same run as the rows it is compared
// with: a large sgemm through the BLAS of the build, and a peak-FMA loop on the widest
// SIMD the CPU has (the physical limit; a BLAS pinned to a narrower core type misses it).
// Rows whose products run on bf16 instructions compare with those instructions' own peak:
// a vdpbf16ps loop (AVX512_BF16) and a TDPBF16PS loop (AMX-BF16), where the CPU has them.

#include <algorithm>
#include <string>

namespace ringattn::bench {

struct Ceiling {
  double sgemm_gflops = 0;
  std::string blas;  // the BLAS and its core type, e.g. "OpenBLAS core Haswell"
  double fma_gflops = 0;
  std::string fma_isa;  // e.g. "AVX2+FMA"
  int fma_lanes = 0;    // fp32 lanes per FMA instruction

  double dot_bf16_gflops = 0;  // vdpbf16ps peak (0: no AVX512_BF16)
  double amx_bf16_gflops = 0;  // TDPBF16PS peak (0: no AMX-BF16, or the OS refused it)

  double gflops() const { return std::max(sgemm_gflops, fma_gflops); }
  // The ceiling of a row whose products are `products` (Record::products): the bf16
  // instructions' peak for "dot" and "amx", gflops() for fp32 products.
  double gflops_for(const std::string& products) const {
    if (products == "dot") return dot_bf16_gflops;
    if (products == "amx") return amx_bf16_gflops;
    return gflops();
  }
};

// sgemm 4096^3: best of 3 after a warm-up.
inline constexpr int kSgemmSize = 4096;
// Independent FMA chains per thread in the peak loop (enough to hide the FMA latency).
inline constexpr int kFmaChains = 12;

// Both measurements on `threads` threads (resolved, >= 1).
Ceiling measure_ceiling(int threads);

}  // namespace ringattn::bench
