#include "src/plan/gpu_tasks.h"

#include <algorithm>

#include "src/base/check.h"
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

// A task over the local rows of p: every segment inside them, or the local part (before
// global row `row_end`) of the one segment that spans ranks; the local keys.
Task local_task(const Problem& p, int branch, int64_t offset, int64_t h, int64_t tile_rows,
                int64_t row_end = INT64_MAX) {
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
                                              std::min(p.shard_begin + p.shard_rows, row_end));
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

// The asker's balanced queries (problem `asker` of asker_problem) of (branch, offset, head h)
// against p's own keys of that segment (the same one: a balanced pair shares its segment).
Task answer_task(const Problem& p, const Problem& asker, int branch, int64_t offset, int64_t h,
                 int64_t tile_rows) {
  Task t = local_task(asker, branch, offset, h, tile_rows);
  const Task keys = local_task(p, branch, offset, h, tile_rows);
  t.k_lo = keys.k_lo;
  t.k_hi = keys.k_hi;
  t.k_src = keys.k_src;
  t.v_src = keys.v_src;
  t.dk_dst = keys.dk_dst;
  t.dv_dst = keys.dv_dst;
  return t;
}

// The task of (offset o, head h) of span sb's branch: the local queries before row_end
// against the block whose layout is `pieces`; false when it has nothing to do.
bool block_task(const Problem& p, const SpanningBranch& sb, const std::vector<BlockPiece>& pieces,
                int64_t o, int64_t h, int64_t tile_rows, int64_t row_end, Task& t) {
  const BlockPiece& x = pieces[static_cast<size_t>(sb.head_stream[h] * p.batch)];
  t = local_task(p, sb.branch, o, h, tile_rows, row_end);
  if (x.t_end == x.t_begin || t.q_hi <= t.q_lo) return false;
  use_block_keys(p, x, t);
  return true;
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

TaskList forward_tasks(const Problem& p, int64_t tile_rows) {
  TaskList list;
  for (int64_t h = 0; h < p.heads; ++h) {
    for (int hb = p.head_begin[static_cast<size_t>(h)];
         hb < p.head_begin[static_cast<size_t>(h) + 1]; ++hb) {
      const HeadBranch& x = p.head_branches[static_cast<size_t>(hb)];
      append(p, list, local_task(p, x.branch, x.offset, h, tile_rows), {static_cast<int>(h)});
    }
  }
  return list;
}

namespace {

// One forward task per head computing span `span`'s branch, in head order: `make(h, hb)`
// makes it, or returns false when the head has nothing to do.
template <typename Make>
TaskList span_tasks(const Problem& p, const RingPlan& plan, int span, Make&& make) {
  TaskList list;
  const SpanningBranch& sb = plan.spans[static_cast<size_t>(span)];
  for (int64_t h = 0; h < p.heads; ++h) {
    const int hb = p.head_branch(h, sb.branch);
    Task t;
    if (hb >= 0 && make(h, p.head_branches[static_cast<size_t>(hb)].offset, t)) {
      append(p, list, t, {static_cast<int>(h)});
    }
  }
  return list;
}

}  // namespace

TaskList block_tasks(const Problem& p, const RingPlan& plan, int span, int sender,
                     int64_t tile_rows, int64_t row_end) {
  const SpanningBranch& sb = plan.spans[static_cast<size_t>(span)];
  const std::vector<BlockPiece> pieces = plan.layout(p, span, sender);
  return span_tasks(p, plan, span, [&](int64_t h, int64_t offset, Task& t) {
    return block_task(p, sb, pieces, offset, h, tile_rows, row_end, t);
  });
}

TaskList answer_tasks(const Problem& p, const RingPlan& plan, int span, int asker,
                      int64_t tile_rows) {
  const SpanningBranch& sb = plan.spans[static_cast<size_t>(span)];
  const Problem f = asker_problem(p, plan, sb, nullptr, asker);
  return span_tasks(p, plan, span, [&](int64_t h, int64_t offset, Task& t) {
    t = answer_task(p, f, sb.branch, offset, h, tile_rows);
    return t.q_hi > t.q_lo && t.k_hi > t.k_lo;
  });
}

std::vector<int> head_begin(const Problem& p, const TaskList& list) {
  std::vector<int> begin(static_cast<size_t>(p.heads) + 1, 0);
  int64_t last = 0;
  for (const Task& t : list.tasks) {
    const int64_t h = list.heads[static_cast<size_t>(t.head_first)];
    if (t.head_count != 1 || h < last) {
      fail(ErrorCode::kInternal, "a forward task list is not in query-head order");
    }
    last = h;
    ++begin[static_cast<size_t>(h) + 1];
  }
  for (size_t h = 1; h < begin.size(); ++h) begin[h] += begin[h - 1];
  return begin;
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

// The backward tasks of `branch`, grouped as backward_tasks: `make(o, h, t)` makes the
// task of offset o whose first query head is h, or returns false when it has nothing to do.
template <typename Make>
TaskList backward_list(const Problem& p, int branch, int64_t tile_rows, bool by_key, Make&& make) {
  TaskList list;
  const int64_t group = p.heads / p.kv_heads;
  const int64_t rate = p.branches[static_cast<size_t>(branch)].rate;
  // A task for the heads `heads` (one (kv head, offset)), unless it has nothing to do.
  const auto add = [&](int64_t o, const std::vector<int>& heads) {
    Task t;
    if (!make(o, static_cast<int64_t>(heads.front()), t)) return;
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
  return backward_list(p, branch, tile_rows, by_key, [&](int64_t o, int64_t h, Task& t) {
    t = local_task(p, branch, o, h, tile_rows);
    return true;
  });
}

TaskList block_backward_tasks(const Problem& p, const RingPlan& plan, int span, int sender,
                              int64_t tile_rows, bool by_key, int64_t row_end) {
  const SpanningBranch& sb = plan.spans[static_cast<size_t>(span)];
  const std::vector<BlockPiece> pieces = plan.layout(p, span, sender);
  return backward_list(p, sb.branch, tile_rows, by_key, [&](int64_t o, int64_t h, Task& t) {
    return block_task(p, sb, pieces, o, h, tile_rows, row_end, t);
  });
}

TaskList answer_backward_tasks(const Problem& p, const RingPlan& plan, int span, int asker,
                               int64_t tile_rows, bool by_key) {
  const SpanningBranch& sb = plan.spans[static_cast<size_t>(span)];
  const Problem f = asker_problem(p, plan, sb, nullptr, asker);
  return backward_list(p, sb.branch, tile_rows, by_key, [&](int64_t o, int64_t h, Task& t) {
    t = answer_task(p, f, sb.branch, o, h, tile_rows);
    return t.q_hi > t.q_lo && t.k_hi > t.k_lo;
  });
}

std::vector<CopyRun> block_copies(const std::vector<PackRun>& runs, bool values, int64_t head_dim,
                                  bool into_block) {
  std::vector<CopyRun> copies;
  for (const PackRun& r : runs) {
    const int64_t local = values ? r.src_v : r.src_k, local_t = values ? r.src_v_t : r.src_k_t;
    const int64_t block = values ? r.dst_v : r.dst_k;
    copies.push_back(into_block ? CopyRun{local, local_t, block, head_dim, r.rows}
                                : CopyRun{block, head_dim, local, local_t, r.rows});
  }
  return copies;
}

std::vector<CopyRun> half_runs(const Problem& p, const RingPlan& plan, const Strides3& st,
                               int64_t h0, int64_t h1, int64_t row_elements) {
  const int64_t rows = plan.half_rows(p), heads = h1 - h0;
  const int64_t split_local = plan.split - p.shard_begin;
  std::vector<CopyRun> runs;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = h0; h < h1; ++h) {
      runs.push_back({b * st.b + split_local * st.n + h * st.h, st.n,
                      (b * rows * heads + h - h0) * row_elements, heads * row_elements, rows});
    }
  }
  return runs;
}

GpuRingForwardPlan plan_gpu_ring_forward(const Problem& p, const RingPlan& plan,
                                         int64_t tile_rows) {
  GpuRingForwardPlan f;
  f.local = forward_tasks(p, tile_rows);
  f.block.resize(plan.steps.size());
  f.answer.resize(plan.steps.size());
  f.partial_rows = f.local.part_rows;
  for (size_t e = 0; e < plan.steps.size(); ++e) {
    const RingStep& st = plan.steps[e];
    const bool balanced = plan.spans[static_cast<size_t>(st.span)].balanced;
    if (st.recv_from >= 0) {
      f.block[e] =
          block_tasks(p, plan, st.span, st.recv_from, tile_rows, balanced ? plan.split : INT64_MAX);
    }
    if (balanced && st.send_to >= 0) {
      f.answer[e] = answer_tasks(p, plan, st.span, st.send_to, tile_rows);
    }
    f.partial_rows = std::max({f.partial_rows, f.block[e].part_rows, f.answer[e].part_rows});
  }
  return f;
}

namespace {

// The K/V blocks of a ring (both directions): this rank's own and two inboxes at the size of
// the largest it receives.
int64_t block_bytes(const Problem& p, const RingPlan& plan) {
  int64_t own = 0;
  for (int s = 0; s < static_cast<int>(plan.spans.size()); ++s) {
    own += plan.block_elements(p, s, plan.rank);
  }
  return (own + 2 * plan.most_received_elements(p)) * static_cast<int64_t>(dtype_size(p.dtype));
}

}  // namespace

GpuBalanceBytes gpu_balance_bytes(const Problem& p, const RingPlan& plan, int64_t lse_bytes,
                                  int64_t partial) {
  GpuBalanceBytes g;
  const int64_t esize = static_cast<int64_t>(dtype_size(p.dtype));
  g.own_part.assign(plan.spans.size(), 0);
  g.own_lse.assign(plan.spans.size(), 0);
  for (const RingStep& st : plan.steps) {
    const SpanningBranch& sb = plan.spans[static_cast<size_t>(st.span)];
    if (!sb.balanced || st.recv_from < 0) continue;
    g.own_part[static_cast<size_t>(st.span)] = plan.query_elements(p, st.span) * esize;
    g.own_lse[static_cast<size_t>(st.span)] =
        p.batch * plan.half_rows(p) * (sb.head_end - sb.head_begin) * lse_bytes;
  }
  g.inbox_part = plan.most_answered_rows(p) * p.head_dim * esize;
  g.inbox_lse = plan.most_answered_rows(p) * lse_bytes;
  g.partial_out = plan.answers() ? partial : 0;
  g.partial_in = plan.asks() ? partial : 0;
  return g;
}

int64_t GpuBalanceBytes::total(int parts) const {
  int64_t own = 0;
  for (size_t s = 0; s < own_part.size(); ++s) own += parts * own_part[s] + own_lse[s];
  return own + parts * inbox_part + inbox_lse + 2 * partial_out + partial_in;
}

int64_t gpu_partial_bytes(const Problem& p, const RingPlan& plan, int span) {
  const SpanningBranch& sb = plan.spans[static_cast<size_t>(span)];
  return p.batch * plan.half_rows(p) * (sb.head_end - sb.head_begin) * (p.head_dim + 1) *
         static_cast<int64_t>(sizeof(float));
}

int64_t gpu_dq_bytes(const Problem& p, const RingPlan& plan) {
  return p.batch * plan.half_rows(p) * p.heads * p.head_dim * static_cast<int64_t>(sizeof(float));
}

GpuBalanceBytes gpu_forward_balance(const Problem& p, const RingPlan& plan) {
  int64_t partial = 0;
  for (int s = 0; s < static_cast<int>(plan.spans.size()); ++s) {
    partial = std::max(partial, gpu_partial_bytes(p, plan, s));
  }
  return gpu_balance_bytes(p, plan, 0, partial);
}

GpuRingMemory gpu_ring_memory(const Problem& p, const RingPlan& plan, const GpuRingForwardPlan& f) {
  GpuRingMemory m;
  const int64_t fp32 = sizeof(float);
  m.blocks = block_bytes(p, plan);
  m.accumulators = p.batch * p.shard_rows * p.heads * (p.head_dim + 1) * fp32;
  m.partials = f.partial_rows * (p.head_dim + 1) * fp32;
  m.balance = gpu_forward_balance(p, plan).total(1);
  return m;
}

GpuRingMemory gpu_ring_backward_memory(const Problem& p, const RingPlan& plan) {
  GpuRingMemory m;
  const int64_t fp32 = sizeof(float);
  m.blocks = block_bytes(p, plan);
  // dq, dk, dv and the row statistics (lse in log2 units, rowsum(dout * out)).
  m.accumulators =
      p.batch * p.shard_rows * ((p.heads + 2 * p.kv_heads) * p.head_dim + 2 * p.heads) * fp32;
  m.gradients = 2 * (plan.most_received_elements(p) + plan.most_sent_elements(p)) * fp32;
  // The answered queries' row statistics; then q, dout, out and the fp32 lse of the halves,
  // and their dq (two slots out, one in).
  if (plan.answers()) m.partials = 2 * p.batch * plan.half_rows(p) * p.heads * fp32;
  m.balance = gpu_balance_bytes(p, plan, fp32, gpu_dq_bytes(p, plan)).total(3);
  return m;
}

}  // namespace ringattn::cuda
