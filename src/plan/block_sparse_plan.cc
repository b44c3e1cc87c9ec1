// The block-sparse plan: the transfers of every ring step.

#include "src/plan/block_sparse_plan.h"

#include <utility>

#include "src/base/check.h"

namespace ringattn {

BlockSet BlockSparsePlan::needed(int dst, int src, int64_t kv_heads) const {
  BlockSet s;
  s.blocks.resize(static_cast<size_t>(kv_heads));
  s.base.assign(1, 0);
  std::vector<char> mark(static_cast<size_t>(blocks));
  for (int64_t hk = 0; hk < kv_heads; ++hk) {
    std::fill(mark.begin(), mark.end(), 0);
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      for (int64_t qb = dst * local_blocks; qb < (dst + 1) * local_blocks; ++qb) {
        for_each_run(h, qb, src, [&](int64_t kb0, int64_t count) {
          std::fill_n(mark.begin() + kb0, count, 1);
        });
      }
    }
    std::vector<int64_t>& x = s.blocks[static_cast<size_t>(hk)];
    for (int64_t kb = src * local_blocks; kb < (src + 1) * local_blocks; ++kb) {
      if (mark[static_cast<size_t>(kb)]) x.push_back(kb);
    }
    s.base.push_back(s.base.back() + static_cast<int64_t>(x.size()));
  }
  return s;
}

BlockSparsePlan plan_block_sparse(const BlockSparseConfig& config, const Problem& p, int rank,
                                  int world) {
  BlockSparsePlan plan;
  plan.bs = config.patterns[0].block_size;
  require(config.patterns.size() == 1 || static_cast<int64_t>(config.patterns.size()) == p.heads,
          "BlockSparseConfig has ", config.patterns.size(), " patterns but q has H = ", p.heads,
          " heads; give one pattern (shared by every head) or one per head");
  require(p.shard_rows % plan.bs == 0, "N_loc = ", p.shard_rows,
          " rows per rank is not a multiple of block_size = ", plan.bs,
          "; every rank must hold whole blocks: make N_loc (N = ", world,
          " x N_loc) a multiple of ", plan.bs);
  for (const BlockPattern& pattern : config.patterns) plan.layouts.push_back(pattern.layout(p.seq));
  plan.blocks = p.seq / plan.bs;
  plan.local_blocks = p.shard_rows / plan.bs;
  plan.group = p.heads / p.kv_heads;
  plan.rank = rank;
  plan.world = world;
  plan.causal = config.causal;
  for (int64_t h = 0; h < p.heads; ++h) {
    plan.head_layout.push_back(config.patterns.size() == 1 ? 0 : static_cast<size_t>(h));
  }
  for (int d = 1; d < world; ++d) {
    BlockSparsePlan::Step st{(rank + d) % world, (rank - d + world) % world, d, {}, {}};
    st.send = plan.needed(st.send_to, rank, p.kv_heads);
    st.recv = plan.needed(rank, st.recv_from, p.kv_heads);
    plan.steps.push_back(std::move(st));
  }
  return plan;
}

}  // namespace ringattn
