#pragma once
// The layer benchmarks: MultiheadDilatedAttention in one process and
// DistributedDilatedAttention (sequence parallel over the ranks of a communicator), on the
// rows' shapes with E = H * D (fp32, bias and LayerNorms on, as the layers' defaults).
//
// A multihead row also times, in the same run and on the same shapes, the attention core
// alone (DilatedAttention) and the projection GEMMs alone (through the same BLAS: the four
// of forward, or the eight of backward), and reports multihead / (core + 1.2 x GEMMs): the
// layer's cost beyond its math (target <= 1).

#include <nlohmann/json.hpp>

#include "bench/dilated_bench.h"
#include "bench/harness.h"
#include "ringattn/comm.h"

namespace ringattn::bench {

// Throws std::invalid_argument for a row the layers cannot run (a dtype other than fp32, a
// backend other than cpu, or, for distributed on `ranks` ranks, a --head-ranks that does not
// divide the ranks, H and Hkv, or N not splitting over the sequence ranks).
void validate_layer(const DilatedShape& shape, const RunOptions& options, const std::string& impl,
                    int ranks);

// Times layer forward (or, with options.backward, backward after one forward) on [B, N, E]
// input, then the core and the GEMMs; `extra` receives core_ms, gemm_ms and overhead_ratio
// (also JSON keys of the row). With `check`, compares batch 0 of y with the layer run with
// the reference attention backend (forward) outside the timed loop.
Record run_multihead(const DilatedShape& shape, const RunOptions& options,
                     nlohmann::ordered_json& extra);

// Collective over `comm` (the world): with options.head_ranks = 1, sequence parallel over all
// P ranks (each holds N / P rows); with T = head_ranks > 1, a grid (make_mpi_grid): P / T
// sequence ranks x T head ranks. With `check`, each rank compares its rows of y with
// MultiheadDilatedAttention on the whole sequence (forward, when it fits kRingCheckMaxBytes).
Record run_distributed(const DilatedShape& shape, const RunOptions& options, Communicator& comm);

// The "# multihead ..." line of `extra` (rank 0 prints it under the row).
void print_layer_overhead(const Record& r, const nlohmann::ordered_json& extra);

}  // namespace ringattn::bench
