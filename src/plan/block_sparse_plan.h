#pragma once
// The plan of BlockSparseRingDilatedAttention (pure host data): which key blocks each query
// block lists, and, for every ring step (distance d = 1 .. world - 1), the key blocks this
// rank sends to rank + d and receives from rank - d.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ringattn/block_sparse.h"
#include "src/plan/problem.h"

namespace ringattn {

// Rows of consecutive key blocks one kernel call takes at most (bounds backward scratch).
constexpr int64_t kRunRows = 1024;

// Key blocks one rank sends another, by kv head. In a message (K/V in the inputs' dtype, or
// their fp32 gradients), the rows of slot i of batch b start at element (b * slots + i) * bs * D
// of the K part; the V part follows the K part.
struct BlockSet {
  std::vector<std::vector<int64_t>> blocks;  // [kv_heads] sorted key blocks
  std::vector<int64_t> base;                 // [kv_heads + 1] first slot of each kv head

  int64_t slots() const { return base.back(); }
  int64_t slot(int64_t hk, int64_t kb) const {
    const std::vector<int64_t>& x = blocks[static_cast<size_t>(hk)];
    return base[static_cast<size_t>(hk)] + (std::lower_bound(x.begin(), x.end(), kb) - x.begin());
  }
};

struct BlockSparsePlan {
  int64_t bs = 0, blocks = 0, local_blocks = 0, group = 1;
  int rank = 0, world = 1;
  bool causal = false;
  std::vector<BlockLayout> layouts;  // one per pattern
  std::vector<size_t> head_layout;   // [heads]
  // Step e (distance e + 1): send to rank + distance what it needs from this rank, receive
  // from rank - distance what this rank needs from it. Empty sets move nothing.
  struct Step {
    int send_to, recv_from, tag;
    BlockSet send, recv;
  };
  std::vector<Step> steps;

  const BlockLayout& layout(int64_t h) const {
    return layouts[head_layout[static_cast<size_t>(h)]];
  }
  int owner(int64_t kb) const { return static_cast<int>(kb / local_blocks); }

  // Calls fn(kb0, count) for the runs of consecutive key blocks that query block qb of head h
  // lists, owned by rank `src` (with causal: kb <= qb), at most kRunRows rows each.
  template <typename Fn>
  void for_each_run(int64_t h, int64_t qb, int src, Fn&& fn) const {
    const BlockLayout& l = layout(h);
    const int64_t max_blocks = std::max<int64_t>(1, kRunRows / bs);
    int64_t kb0 = -1, count = 0;
    for (int64_t i = l.row_ptr[qb]; i < l.row_ptr[qb + 1]; ++i) {
      const int64_t kb = l.cols[static_cast<size_t>(i)];
      if (owner(kb) != src || (causal && kb > qb)) continue;
      if (count > 0 && kb == kb0 + count && count < max_blocks) {
        ++count;
        continue;
      }
      if (count > 0) fn(kb0, count);
      kb0 = kb;
      count = 1;
    }
    if (count > 0) fn(kb0, count);
  }

  // The key blocks owned by `src` that the query blocks of rank `dst` list.
  BlockSet needed(int dst, int src, int64_t kv_heads) const;
};

// Checks the configuration against the problem (one dense branch over the sequence, sharded
// over `world` ranks) and plans this rank's transfers.
BlockSparsePlan plan_block_sparse(const BlockSparseConfig& config, const Problem& p, int rank,
                                  int world);

}  // namespace ringattn
