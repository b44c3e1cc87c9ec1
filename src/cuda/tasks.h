#pragma once
// The work lists the CUDA kernels run, planned on the host from a Problem: one task per
// (branch, offset, kv head) and the query heads it serves. A kernel block runs one tile of
// one segment of one task for one batch entry.

#include <cstdint>
#include <vector>

#include "../problem.h"

namespace ringattn::cuda {

struct Task {
  int64_t s, r, o;        // branch segment length, dilation rate and offset
  int64_t m;              // kept rows per segment: kept_count(s, r, o)
  int64_t segments;       // N / s
  int64_t tiles_per_seg;  // ceil(m / tile rows)
  int64_t kv_head;
  int head_first, head_count;  // query heads heads[head_first .. head_first + head_count)
  // Forward partials: row (b, segment, t) of this task is part_row0 + b * rows_per_batch +
  // segment * m + t of the [rows][D] fp32 partial buffer.
  int64_t part_row0, rows_per_batch;
};

struct TaskList {
  std::vector<Task> tasks;
  std::vector<int> heads;
  int64_t max_tiles = 0;  // most blocks of any task (grid x)
  int64_t part_rows = 0;  // forward partial rows in all (per whole batch)
};

// Forward: one task per head-branch entry, in p.head_branches order (so that head h's
// entries are tasks p.head_begin[h] .. p.head_begin[h + 1]); tiles of `tile_rows` queries.
TaskList forward_tasks(const Problem& p, int64_t tile_rows);

// Backward over branch `branch`: the query heads using it, one task each (tiles of
// `tile_rows` queries; the dq pass), or grouped by (kv head, offset) (tiles of `tile_rows`
// keys; the dk/dv pass). Within one list no two tasks touch the same rows of dq (by_key =
// false) or of dk/dv (by_key = true), so blocks of one launch never write the same
// accumulator row.
TaskList backward_tasks(const Problem& p, int branch, int64_t tile_rows, bool by_key);

}  // namespace ringattn::cuda
