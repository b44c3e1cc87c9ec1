#pragma once
// The block-sparse benchmark: BlockSparseRingDilatedAttention with local_window patterns of
// several densities on one shape, and the dense kernel (one branch s = N, r = 1) on the same
// shape in the same run, so that time / dense time can be read against density.

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench/dilated_bench.h"
#include "bench/harness.h"

namespace ringattn::bench {

struct SparseOptions {
  int64_t block_size = 128;                                     // --block-size
  std::vector<double> densities = {0.05, 0.1, 0.25, 0.5, 1.0};  // --densities (targets)
};

// Throws std::invalid_argument when the row cannot run: N not split into equal shards of
// whole blocks, a density outside (0, 1], a backend other than cpu.
void validate_blocksparse(const DilatedShape& shape, const RunOptions& options,
                          const SparseOptions& sparse, int ranks);

// Collective over `comm` (each rank holds N / P rows): the dense kernel first (DilatedAttention
// on one rank, RingDilatedAttention on several), then for each target density the local_window
// whose density is closest, timed like a ring row. GFLOP/s count 4 * D per computed
// (query, key) pair (2.5x that for backward), so the dense row's count is SPEC.md's.
std::vector<MeasuredRow> run_blocksparse(const DilatedShape& shape, const RunOptions& options,
                                         const SparseOptions& sparse, Communicator& comm);

}  // namespace ringattn::bench
