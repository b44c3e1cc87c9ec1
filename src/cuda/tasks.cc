#include "tasks.h"

#include <algorithm>

#include "../index_math.h"

namespace ringattn::cuda {

namespace {

void add_task(const Problem& p, TaskList& list, int branch, int64_t offset, int64_t kv_head,
              const std::vector<int>& heads, int64_t tile_rows) {
  const Branch br = p.branches[static_cast<size_t>(branch)];
  Task t{};
  t.s = br.segment;
  t.r = br.rate;
  t.o = offset;
  t.m = kept_count(br.segment, br.rate, offset);
  t.segments = p.seq / br.segment;
  t.tiles_per_seg = ceil_div(t.m, tile_rows);
  t.kv_head = kv_head;
  t.head_first = static_cast<int>(list.heads.size());
  t.head_count = static_cast<int>(heads.size());
  t.rows_per_batch = t.segments * t.m;
  t.part_row0 = list.part_rows;
  list.part_rows += p.batch * t.rows_per_batch;
  list.heads.insert(list.heads.end(), heads.begin(), heads.end());
  list.max_tiles = std::max(list.max_tiles, t.segments * t.tiles_per_seg);
  list.tasks.push_back(t);
}

}  // namespace

TaskList forward_tasks(const Problem& p, int64_t tile_rows) {
  TaskList list;
  for (int64_t h = 0; h < p.heads; ++h) {
    for (int hb = p.head_begin[static_cast<size_t>(h)];
         hb < p.head_begin[static_cast<size_t>(h) + 1]; ++hb) {
      const HeadBranch& x = p.head_branches[static_cast<size_t>(hb)];
      add_task(p, list, x.branch, x.offset, p.kv_head(h), {static_cast<int>(h)}, tile_rows);
    }
  }
  return list;
}

TaskList backward_tasks(const Problem& p, int branch, int64_t tile_rows, bool by_key) {
  TaskList list;
  const int64_t group = p.heads / p.kv_heads;
  const int64_t rate = p.branches[static_cast<size_t>(branch)].rate;
  for (int64_t hk = 0; hk < p.kv_heads; ++hk) {
    // Offsets in ascending order; the heads of one (kv head, offset) in ascending order.
    for (int64_t o = 0; o < rate; ++o) {
      std::vector<int> heads;
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const int hb = p.head_branch(h, branch);
        if (hb < 0 || p.head_branches[static_cast<size_t>(hb)].offset != o) continue;
        if (by_key) {
          heads.push_back(static_cast<int>(h));
        } else {
          add_task(p, list, branch, o, hk, {static_cast<int>(h)}, tile_rows);
        }
      }
      if (by_key && !heads.empty()) add_task(p, list, branch, o, hk, heads, tile_rows);
    }
  }
  return list;
}

}  // namespace ringattn::cuda
