#pragma once
// The CUDA backend of BlockSparseRingDilatedAttention on one device: one thread block per
// (batch, head, query tile) loops over the key blocks its query block lists (one joint online
// softmax per query row); backward computes dQ the same way and dK/dV per (batch, kv head,
// key tile) over the query blocks that list the key block (the transposed pattern), summing
// the query heads of the kv head in a fixed order: deterministic, no floating-point atomics.
// Blocks not listed are never read. Plain C++17 (no CUDA types, no C++20 headers): host code
// and the .cu include it.

#include <cstddef>
#include <cstdint>
#include <vector>

#include "src/plan/problem.h"

namespace ringattn {
struct BlockLayout;  // ringattn/block_sparse.h
}

namespace ringattn::cuda {

// A block pattern per head as int32 CSR, the form the kernels read: row r of head h lists
// idx[ptr[head[h] + r] .. ptr[head[h] + r + 1]) in ascending order. Heads sharing a layout
// share rows (head[h] = layout * (blocks + 1)).
struct BlockCsr {
  int64_t blocks = 0;
  std::vector<int> ptr;   // [layouts * (blocks + 1)]
  std::vector<int> idx;   // [ptr.back()]
  std::vector<int> head;  // [heads]
};

// Rows = query blocks, entries = the key blocks each lists (with causal, only kb <= qb).
BlockCsr query_major_csr(const std::vector<BlockLayout>& layouts,
                         const std::vector<size_t>& head_layout, bool causal);
// Rows = key blocks, entries = the query blocks listing each (with causal, only qb >= kb):
// the transposed pattern, which dK/dV loop over.
BlockCsr key_major_csr(const std::vector<BlockLayout>& layouts,
                       const std::vector<size_t>& head_layout, bool causal);

// Computes p.out (and p.lse when set) for the whole sequence on the current device, query
// block qb of head h attending to the key blocks by_query lists for it, on `stream` (a
// cudaStream_t; nullptr = the default stream), and, when `wait`, waits for it. p is one dense
// LongNet branch over the sequence (scale and causal set; by_query built with the same causal).
void block_sparse_forward(const Problem& p, const BlockCsr& by_query, void* stream, bool wait);

// Computes bp.dq, bp.dk, bp.dv of block_sparse_forward from its out and lse (by_key: the
// key-major CSR of the same layouts), and, when `wait`, waits for it.
void block_sparse_backward(const BackwardProblem& bp, const BlockCsr& by_query,
                           const BlockCsr& by_key, void* stream, bool wait);

}  // namespace ringattn::cuda
