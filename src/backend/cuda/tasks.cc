#include "src/backend/cuda/tasks.h"

#include <algorithm>

#include "src/base/index_math.h"

namespace ringattn::cuda {

namespace {

// The strides of the contiguous fp32 dk/dv accumulators [B][N_loc][Hkv][D].
Strides3 accumulator_strides(const Problem& p) {
  return {p.shard_rows * p.kv_heads * p.head_dim, p.kv_heads * p.head_dim, p.head_dim};
}

// Kept index t of segment seg0 + seg of (branch, offset, head) in a local view of p.
RowSource local_source(const Problem& p, const Branch& br, int64_t offset, const Strides3& st,
                       int64_t head) {
  const int64_t seg0 = p.shard_begin / br.segment;
  return {(seg0 * br.segment + offset - p.shard_begin) * st.n + head * st.h, st.b,
          br.segment * st.n, br.rate * st.n};
}

// A task over the local rows of p: every segment inside them, or the local part of the one
// segment that spans ranks; the local keys.
Task local_task(const Problem& p, int branch, int64_t offset, int64_t h, int64_t tile_rows) {
  const Branch br = p.branches[static_cast<size_t>(branch)];
  Task t{};
  t.s = br.segment;
  t.r = br.rate;
  t.o = offset;
  t.m = kept_count(br.segment, br.rate, offset);
  t.kv_head = p.kv_head(h);
  t.seg0 = p.shard_begin / br.segment;
  if (br.segment <= p.shard_rows) {
    t.segments = p.shard_rows / br.segment;
    t.q_lo = 0;
    t.q_hi = t.m;
  } else {
    t.segments = 1;
    const KeptSpan span = kept_span_in_window(t.seg0, br.segment, br.rate, offset, p.shard_begin,
                                              p.shard_begin + p.shard_rows);
    t.q_lo = span.t_begin;
    t.q_hi = span.t_end;
  }
  t.k_lo = t.q_lo;
  t.k_hi = t.q_hi;
  t.tiles_per_seg = ceil_div(t.q_hi - t.q_lo, tile_rows);
  t.rows_per_batch = t.segments * (t.q_hi - t.q_lo);
  t.q_src = local_source(p, br, offset, p.q_st, h);
  t.k_src = local_source(p, br, offset, p.k_st, t.kv_head);
  t.v_src = local_source(p, br, offset, p.v_st, t.kv_head);
  t.dk_dst = local_source(p, br, offset, accumulator_strides(p), t.kv_head);
  t.dv_dst = t.dk_dst;
  return t;
}

// Points t's keys, values and their gradients at piece x of a packed block.
void use_block_keys(const Problem& p, const BlockPiece& x, Task& t) {
  const int64_t rows = x.t_end - x.t_begin;
  t.k_lo = x.t_begin;
  t.k_hi = x.t_end;
  t.k_src = {x.k_offset - x.t_begin * p.head_dim, 2 * rows * p.head_dim, 0, p.head_dim};
  t.v_src = {x.v_offset - x.t_begin * p.head_dim, 2 * rows * p.head_dim, 0, p.head_dim};
  t.dk_dst = t.k_src;
  t.dv_dst = t.v_src;
}

// Appends `t`, serving query heads `heads`, with its partial rows after the list's.
void append(const Problem& p, TaskList& list, Task t, const std::vector<int>& heads) {
  t.head_first = static_cast<int>(list.heads.size());
  t.head_count = static_cast<int>(heads.size());
  t.part_row0 = list.part_rows;
  list.part_rows += p.batch * t.rows_per_batch;
  list.heads.insert(list.heads.end(), heads.begin(), heads.end());
  list.max_tiles = std::max(list.max_tiles, t.segments * t.tiles_per_seg);
  list.tasks.push_back(t);
}

}  // namespace

TaskList forward_tasks(const Problem& p, int64_t tile_rows, int64_t part_row0) {
  TaskList list;
  list.part_rows = part_row0;
  for (int64_t h = 0; h < p.heads; ++h) {
    for (int hb = p.head_begin[static_cast<size_t>(h)];
         hb < p.head_begin[static_cast<size_t>(h) + 1]; ++hb) {
      const HeadBranch& x = p.head_branches[static_cast<size_t>(hb)];
      append(p, list, local_task(p, x.branch, x.offset, h, tile_rows), {static_cast<int>(h)});
    }
  }
  return list;
}

TaskList block_tasks(const Problem& p, const RingPlan& plan, int span, int sender,
                     int64_t tile_rows, int64_t part_row0) {
  TaskList list;
  list.part_rows = part_row0;
  const SpanningBranch& sb = plan.spans[static_cast<size_t>(span)];
  const std::vector<BlockPiece> pieces = plan.layout(p, span, sender);
  for (int64_t h = 0; h < p.heads; ++h) {
    const int hb = p.head_branch(h, sb.branch);
    if (hb < 0) continue;
    const BlockPiece& x = pieces[static_cast<size_t>(sb.head_stream[h] * p.batch)];
    Task t =
        local_task(p, sb.branch, p.head_branches[static_cast<size_t>(hb)].offset, h, tile_rows);
    if (x.t_end == x.t_begin || t.q_hi == t.q_lo) continue;
    use_block_keys(p, x, t);
    append(p, list, t, {static_cast<int>(h)});
  }
  return list;
}

std::vector<Task> merge_order(const Problem& p, const std::vector<TaskList>& lists,
                              std::vector<int>& head_begin) {
  std::vector<Task> order;
  head_begin.assign(1, 0);
  for (int64_t h = 0; h < p.heads; ++h) {
    for (const TaskList& list : lists) {
      for (const Task& t : list.tasks) {
        if (list.heads[static_cast<size_t>(t.head_first)] == h) order.push_back(t);
      }
    }
    head_begin.push_back(static_cast<int>(order.size()));
  }
  return order;
}

std::vector<PackRun> pack_runs(const Problem& p, const RingPlan& plan, int span,
                               const Strides3& k_st, const Strides3& v_st) {
  const SpanningBranch& sb = plan.spans[static_cast<size_t>(span)];
  const Branch br = p.branches[static_cast<size_t>(sb.branch)];
  const std::vector<BlockPiece> pieces = plan.layout(p, span, plan.rank);
  const int64_t seg_start = p.shard_begin / br.segment * br.segment;
  std::vector<PackRun> runs;
  for (size_t si = 0; si < sb.streams.size(); ++si) {
    const RingStream& st = sb.streams[si];
    for (int64_t b = 0; b < p.batch; ++b) {
      const BlockPiece& x = pieces[si * static_cast<size_t>(p.batch) + static_cast<size_t>(b)];
      if (x.t_end == x.t_begin) continue;
      const int64_t row = seg_start + st.offset + x.t_begin * br.rate - p.shard_begin;
      runs.push_back({b * k_st.b + row * k_st.n + st.kv_head * k_st.h, br.rate * k_st.n,
                      b * v_st.b + row * v_st.n + st.kv_head * v_st.h, br.rate * v_st.n, x.k_offset,
                      x.v_offset, x.t_end - x.t_begin});
    }
  }
  return runs;
}

namespace {

// backward_tasks, with the keys of the block `pieces` (of span `sb`) when it is given.
TaskList backward_list(const Problem& p, int branch, int64_t tile_rows, bool by_key,
                       const SpanningBranch* sb, const std::vector<BlockPiece>* pieces) {
  TaskList list;
  const int64_t group = p.heads / p.kv_heads;
  const int64_t rate = p.branches[static_cast<size_t>(branch)].rate;
  // A task for the heads `heads` (one (kv head, offset)), unless it has nothing to do.
  const auto add = [&](int64_t o, const std::vector<int>& heads) {
    Task t = local_task(p, branch, o, heads.front(), tile_rows);
    if (pieces != nullptr) {
      const BlockPiece& x = (*pieces)[static_cast<size_t>(
          sb->head_stream[static_cast<size_t>(heads.front())] * p.batch)];
      if (x.t_end == x.t_begin || t.q_hi == t.q_lo) return;
      use_block_keys(p, x, t);
    }
    if (by_key) t.tiles_per_seg = ceil_div(t.k_hi - t.k_lo, tile_rows);
    append(p, list, t, heads);
  };
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
          add(o, {static_cast<int>(h)});
        }
      }
      if (by_key && !heads.empty()) add(o, heads);
    }
  }
  return list;
}

}  // namespace

TaskList backward_tasks(const Problem& p, int branch, int64_t tile_rows, bool by_key) {
  return backward_list(p, branch, tile_rows, by_key, nullptr, nullptr);
}

TaskList block_backward_tasks(const Problem& p, const RingPlan& plan, int span, int sender,
                              int64_t tile_rows, bool by_key) {
  const SpanningBranch& sb = plan.spans[static_cast<size_t>(span)];
  const std::vector<BlockPiece> pieces = plan.layout(p, span, sender);
  return backward_list(p, sb.branch, tile_rows, by_key, &sb, &pieces);
}

}  // namespace ringattn::cuda
