#pragma once
// The dilated-attention benchmark: the seed's configurations, SPEC.md's FLOP count, and the
// measurement of one row (allocation, timing, peak memory, the check against the reference).

#include <cstdint>
#include <string>
#include <vector>

#include "bench/harness.h"
#include "ringattn/ringattn.h"

namespace ringattn::bench {

// One dilated forward to measure. The defaults are the seed's "small" configuration with
// 8 heads of dimension 64 in fp32; "custom" rows start from them.
struct DilatedShape {
  std::string name = "custom";  // preset name, or "custom"
  int64_t batch = 1, seq = 2048, heads = 8, kv_heads = 8, head_dim = 64;
  std::vector<int64_t> segments = {1024, 2048}, dilations = {1, 2};
  Mode mode = Mode::kGroups;
  bool causal = true;
  DType dtype = DType::kF32;

  DilatedConfig config() const;
};

// "small", "medium", "large" (the seed's, BENCHMARKS.md); "dense" (one dense segment:
// B=1, N=8192, s=2048, r=1, not causal; the dense-segment kernel target); "dense-ring" (one
// causal branch over the whole sequence, B=1, N=s=16384, r=1: every rank needs every
// earlier rank's keys); "1m" (B=1, N=1048576, s=2048,8192,32768,131072, r=1,2,4,8, causal:
// the long-sequence ring target, 2 GiB of q, k, v and out per tensor in fp32); "sparse" (B=1,
// N=16384, one branch s=N, r=1, not causal: the --impl blocksparse shape and its dense row).
const std::vector<std::string>& preset_names();
DilatedShape preset(const std::string& name);

// SPEC.md's forward count: per head and segment with m kept rows, 4*m*m*D (2*m*(m+1)*D
// causal), summed over the branches each head computes, segments, heads and batch.
double forward_flops(const DilatedShape& shape);

struct RunOptions {
  Backend backend = Backend::kCpu;
  int threads = 0;  // --threads: 0 = OpenMP's default
  int warmup = 3, iters = 10;
  bool check = false;
  bool backward = false;  // --backward 1: time the backward (SPEC.md: 2.5x forward's FLOPs)
  int head_ranks = 1;     // --head-ranks: --impl distributed's head-parallel group size
  CpuBf16 cpu_bf16 = CpuBf16::kAuto;  // --cpu-bf16: the CPU products of bf16 rows
};

// The library's execution options of a row.
inline ExecOptions exec_options(const RunOptions& o) {
  ExecOptions e;
  e.backend = o.backend;
  e.num_threads = o.threads;
  e.cpu_bf16 = o.cpu_bf16;
  return e;
}

// Runs the library's own checks of the row (configuration, shapes, dtype, head dim) without
// allocating or computing anything, so that a bad flag fails before any measurement.
// Throws ringattn::Error.
void validate(const DilatedShape& shape, Backend backend);

// A record with the row's description (impl, config, shape, backend, threads per rank)
// filled in; the caller adds the measurements, then set_rates().
Record describe(const DilatedShape& shape, const RunOptions& options, const char* impl);
// tokens/s and GFLOP/s of the whole problem (forward or backward count), from
// r.timing.mean_ms.
void set_rates(Record& r, const DilatedShape& shape);

// Allocates the row's tensors (tensors.h), times the forward (or, with options.backward, one
// untimed forward then the backward) and, with `check`, compares batch 0 of out and lse (or
// dq, dk, dv) with the fp64 reference outside the timed loop.
Record run_dilated(const DilatedShape& shape, const RunOptions& options);

struct Views;
class Gradients;
// Elements of batch 0 of out and lse (of dq, dk and dv) in host views outside the tolerance
// of the fp64 reference forward (backward).
int64_t count_wrong(const DilatedShape& shape, const Views& views);
int64_t count_wrong_grads(const DilatedShape& shape, const Views& views, const Gradients& g);

}  // namespace ringattn::bench
