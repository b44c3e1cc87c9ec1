#pragma once
// The ring benchmark: RingDilatedAttention over the ranks of a communicator, every rank
// allocating only its shard of the sequence (N / P rows), so that per-rank memory falls as
// 1 / P.

#include <functional>
#include <optional>

#include "bench/dilated_bench.h"
#include "bench/harness.h"
#include "bench/tensors.h"
#include "ringattn/ring_attention.h"

namespace ringattn::bench {

// The --check pass of a ring row builds the whole-sequence tensors on every rank: only up to
// this size (q, k, v, out and lse together).
inline constexpr size_t kRingCheckMaxBytes = size_t{512} << 20;

// Throws std::invalid_argument when the row cannot be sharded over `ranks` (N % P != 0) or
// the backend cannot run the ring. (Whether every branch fits the shards is the library's
// check, at the first forward, on every rank.)
void validate_ring(const DilatedShape& shape, const RunOptions& options, int ranks);

// Collective over `comm`: every rank allocates its rows of q, k and v (tensors.h: the values
// one process would hold in those rows), times the forward (barrier before each iteration,
// an iteration's time is the slowest rank's) and reduces the per-rank numbers over the
// ranks. With `check`, each rank compares its rows of out and lse with DilatedAttention (cpu)
// over the whole sequence, outside the timed loop, when the whole-sequence tensors fit
// kRingCheckMaxBytes (otherwise rank 0 prints a # note and `wrong` stays empty). The record
// is the same on every rank.
Record run_ring(const DilatedShape& shape, const RunOptions& options, Communicator& comm);

// The calls a sharded row measures: forward and backward on this rank's views, the
// statistics of the last call, and (optional) the --check pass, whose count is the same on
// every rank (or empty when the pass does not apply).
struct ShardedCalls {
  std::function<void(const Views&)> forward;
  std::function<void(const Views&, const Gradients&)> backward;
  std::function<RingStats()> stats;
  std::function<std::optional<int64_t>(const Tensors&, const Gradients*)> check;
};

// Collective, like run_ring for any sharded attention: allocates this rank's rows, times
// the forward (or, with options.backward, one untimed forward then the backward) and reduces
// the per-rank numbers over the ranks; GFLOP/s from the row's dilated count (set_rates).
Record time_sharded(const DilatedShape& shape, const RunOptions& options, Communicator& comm,
                    const char* impl, const ShardedCalls& calls);

}  // namespace ringattn::bench
