#pragma once
// The work lists the CUDA kernels run, planned on the host from a Problem: one task per
// (branch, offset, kv head) and the query heads it serves. A kernel block runs one tile of
// one segment of one task for one batch entry. Pure host code, compiled and unit-tested in
// every build (tests/unit/test_gpu_plan.cc), CUDA or not.

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
TaskList forward_tasks(const Problem& p, int64_t tile_rows);

// Forward of the local queries before global row `row_end` of span `span` against the
// packed block of rank `sender` (RingPlan::layout): one task per head computing the span's
// branch whose stream has rows in the block, in head order.
TaskList block_tasks(const Problem& p, const RingPlan& plan, int span, int sender,
                     int64_t tile_rows, int64_t row_end = INT64_MAX);

// Forward of rank `asker`'s balanced queries of span `span` (asker_problem: the queries'
// base pointer is the received buffer) against this rank's keys of that span: one task per
// head computing the span's branch, in head order. Partial row (b, t) of a task covers the
// asker's rows, row0 = RingPlan::split_of(asker).
TaskList answer_tasks(const Problem& p, const RingPlan& plan, int span, int asker,
                      int64_t tile_rows);

// Where each query head's tasks start in a forward list (one head per task, in head order,
// as forward_tasks, block_tasks and answer_tasks make them): [H + 1] entries, head h's
// tasks are [begin[h], begin[h + 1]), the order its partials are merged in.
std::vector<int> head_begin(const Problem& p, const TaskList& list);

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

// Backward of the local queries before global row `row_end` of span `span` against the
// packed block of rank `sender` (RingPlan::layout), grouped as backward_tasks: keys, values
// and the dk/dv destinations (dk_dst, dv_dst: the block's layout) in the block; streams
// without rows in the block and heads without local queries get no task.
TaskList block_backward_tasks(const Problem& p, const RingPlan& plan, int span, int sender,
                              int64_t tile_rows, bool by_key, int64_t row_end = INT64_MAX);

// Backward of rank `asker`'s balanced queries of span `span` (asker_problem) against this
// rank's keys, grouped as backward_tasks: dq rows local to the asker's rows, dk/dv into this
// rank's accumulators.
TaskList answer_backward_tasks(const Problem& p, const RingPlan& plan, int span, int asker,
                               int64_t tile_rows, bool by_key);

// One run of rows copied between two row-major views, in elements: rows t = 0 .. rows of
// `row_elements` contiguous elements from src + t * src_t to dst + t * dst_t.
struct CopyRun {
  int64_t src, src_t, dst, dst_t, rows;
};
// The K (values = false) or V half of pack runs as copies of `head_dim`-element rows: from
// the local rows into the block (into_block), or from the block's rows back onto the local
// rows (adding a block's returned gradients).
std::vector<CopyRun> block_copies(const std::vector<PackRun>& runs, bool values, int64_t head_dim,
                                  bool into_block);
// The runs that pack the rows [split, end) of this rank's shard, heads [h0, h1), of a
// [B, N_loc, heads, row] view with strides `st` into [B][rows][h1 - h0][row] (asker_problem's
// layout, which the receiver places after h0 * row_elements of slack).
std::vector<CopyRun> half_runs(const Problem& p, const RingPlan& plan, const Strides3& st,
                               int64_t h0, int64_t h1, int64_t row_elements);

// The launches of one rank's part of the GPU ring forward: the local list, then per step the
// list of its received block (queries before the split on a balanced span) and the list of
// the queries it answers (balanced spans). Each list's partials are merged into the row
// accumulators right after it ran, so one partial buffer, as large as the largest list's,
// serves them all.
struct GpuRingForwardPlan {
  TaskList local;
  std::vector<TaskList> block, answer;  // [steps]; empty where the step has none
  int64_t partial_rows = 0;
};
GpuRingForwardPlan plan_gpu_ring_forward(const Problem& p, const RingPlan& plan, int64_t tile_rows);

// The device memory, in bytes, one rank's GPU ring allocates besides its inputs and outputs
// (the kernels' task lists aside): K/V blocks (its own, two inboxes), fp32 accumulators and
// partials, the balanced spans' queries and partial results, and (backward) the gradients
// of two blocks each way. The shards allocate exactly these.
struct GpuRingMemory {
  int64_t blocks = 0, accumulators = 0, partials = 0, balance = 0, gradients = 0;
  int64_t total() const { return blocks + accumulators + partials + balance + gradients; }
};
GpuRingMemory gpu_ring_memory(const Problem& p, const RingPlan& plan, const GpuRingForwardPlan& f);
GpuRingMemory gpu_ring_backward_memory(const Problem& p, const RingPlan& plan);

// The balanced spans' buffers of one rank, in bytes (0 where it has none): per span, its
// packed second half (each part: q, and for the backward dout and out; then the lse at
// `lse_bytes` per row and head), the inbox of the queries it answers (each part, the lse),
// and the partial results it sends (two slots) and receives (one).
struct GpuBalanceBytes {
  std::vector<int64_t> own_part, own_lse;  // [spans]
  int64_t inbox_part = 0, inbox_lse = 0, partial_out = 0, partial_in = 0;
  int64_t total(int parts) const;
};
GpuBalanceBytes gpu_balance_bytes(const Problem& p, const RingPlan& plan, int64_t lse_bytes,
                                  int64_t partial);
// The forward's: queries only, partial results of gpu_partial_bytes.
GpuBalanceBytes gpu_forward_balance(const Problem& p, const RingPlan& plan);

// The balanced spans' message sizes in bytes: the forward's partial result (O and lse of the
// asker's rows, fp32, [B][rows][heads of the span][D + 1]) and the backward's dq of them
// (fp32, [B][rows][H][D]).
int64_t gpu_partial_bytes(const Problem& p, const RingPlan& plan, int span);
int64_t gpu_dq_bytes(const Problem& p, const RingPlan& plan);

}  // namespace ringattn::cuda
