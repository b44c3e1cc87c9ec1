#pragma once
// The work lists the CUDA kernels run, planned on the host from a Problem: one task per
// (branch, offset, kv head) and the query heads it serves. A kernel block runs one tile of
// one segment of one task for one batch entry.

#include <cstdint>
#include <vector>

#include "src/plan/problem.h"
#include "src/plan/ring_plan.h"

namespace ringattn::cuda {

// Where the rows a forward task reads lie: kept index t of batch b in its task's segment
// seg0 + seg (seg counted from the task's first segment) is at element
// off + b * b_st + seg * seg_st + t * t_st of the launch's base pointer (a local view, or a
// packed block received from another rank).
struct RowSource {
  int64_t off, b_st, seg_st, t_st;
};

struct Task {
  int64_t s, r, o;        // branch segment length, dilation rate and offset
  int64_t m;              // kept rows per segment: kept_count(s, r, o)
  int64_t segments;       // N / s
  int64_t tiles_per_seg;  // tiles per segment (see below)
  int64_t kv_head;
  int head_first, head_count;  // query heads heads[head_first .. head_first + head_count)
  // Forward partials: row (b, segment, t) of this task is part_row0 + b * rows_per_batch +
  // segment * m + t of the [rows][D] fp32 partial buffer.
  int64_t part_row0, rows_per_batch;
  // Segments seg0 .. seg0 + segments; the queries are kept indices [q_lo, q_hi) of each,
  // the keys [k_lo, k_hi) (causal compares kept indices, so keys from an earlier rank are
  // all visible); tiles_per_seg tiles of the queries (forward, backward dq pass) or of the
  // keys (backward dk/dv pass). Forward partial row (b, seg, t) is part_row0 +
  // b * rows_per_batch + seg * (q_hi - q_lo) + t - q_lo.
  int64_t seg0, q_lo, q_hi, k_lo, k_hi;
  RowSource q_src, k_src, v_src;
  // Backward: where the fp32 dk and dv accumulator rows of the keys lie, in elements from the
  // launch's accumulator base (the local [B][N_loc][Hkv][D] accumulators, or the gradient
  // buffer of a received block, which has the block's layout).
  RowSource dk_dst, dv_dst;
};

struct TaskList {
  std::vector<Task> tasks;
  std::vector<int> heads;
  int64_t max_tiles = 0;  // most blocks of any task (grid x)
  int64_t part_rows = 0;  // forward partial rows in all (per whole batch)
};

// Forward over the local rows of p (the whole sequence, or one rank's shard): one task per
// head-branch entry, in p.head_branches order (so that head h's entries are tasks
// p.head_begin[h] .. p.head_begin[h + 1]); tiles of `tile_rows` queries. A branch whose
// segments span ranks computes the shard's part of its segment against the shard's keys.
// Partial rows start at `part_row0`.
TaskList forward_tasks(const Problem& p, int64_t tile_rows, int64_t part_row0 = 0);

// Forward of the local queries of span `span` against the packed block of rank `sender`
// (RingPlan::layout): one task per head computing the span's branch whose stream has rows
// in the block, in head order. Partial rows start at `part_row0`.
TaskList block_tasks(const Problem& p, const RingPlan& plan, int span, int sender,
                     int64_t tile_rows, int64_t part_row0);

// The merge order of the forward partials of several launches: every task of `lists`,
// ordered by query head and, within a head, in list order (then task order). head_begin
// gets [H + 1] entries: head h's tasks are head_begin[h] .. head_begin[h + 1].
std::vector<Task> merge_order(const Problem& p, const std::vector<TaskList>& lists,
                              std::vector<int>& head_begin);

// One run of rows copied into a packed block: K and V rows t = 0 .. rows of batch b from
// the local views (element offsets src_k + t * src_k_t, src_v + t * src_v_t) to the block
// (dst_k + t * D, dst_v + t * D).
struct PackRun {
  int64_t src_k, src_k_t, src_v, src_v_t, dst_k, dst_v, rows;
};
// The runs that pack this rank's block of span `span` (RingPlan::layout of plan.rank), the
// local rows addressed with the strides k_st and v_st (p.k_st and p.v_st to pack the
// block; the accumulator strides to add the block's returned gradients).
std::vector<PackRun> pack_runs(const Problem& p, const RingPlan& plan, int span,
                               const Strides3& k_st, const Strides3& v_st);

// Backward over branch `branch`: the query heads using it, one task each (tiles of
// `tile_rows` queries; the dq pass), or grouped by (kv head, offset) (tiles of `tile_rows`
// keys; the dk/dv pass). Within one list no two tasks touch the same rows of dq (by_key =
// false) or of dk/dv (by_key = true), so blocks of one launch never write the same
// accumulator row. Tiles cover the queries [q_lo, q_hi) (dq pass) or the keys [k_lo, k_hi)
// (dk/dv pass) of each segment; on a shard, a branch whose segments span ranks computes the
// shard's part of its segment against the shard's keys.
TaskList backward_tasks(const Problem& p, int branch, int64_t tile_rows, bool by_key);

// Backward of the local queries of span `span` against the packed block of rank `sender`
// (RingPlan::layout), grouped as backward_tasks: keys, values and the dk/dv destinations
// (dk_dst, dv_dst: the block's layout) in the block; streams without rows in the block and
// heads without local queries get no task.
TaskList block_backward_tasks(const Problem& p, const RingPlan& plan, int span, int sender,
                              int64_t tile_rows, bool by_key);

}  // namespace ringattn::cuda
