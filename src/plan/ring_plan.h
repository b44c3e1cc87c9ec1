#pragma once
// The ring planner: which branches need other ranks' keys, what each rank sends (only the
// kept rows of the heads that need them) and the order of the transfers. Pure host code.

#include <vector>

#include "src/plan/problem.h"

namespace ringattn {

// One packed stream of keys/values: the rows a (kv head, offset) keeps in a branch.
struct RingStream {
  int64_t kv_head;
  int64_t offset;
};

// A branch whose segments cover several ranks (s > N_loc).
struct SpanningBranch {
  int branch;
  int64_t group;                         // ranks per segment, s / N_loc
  std::vector<RingStream> streams;       // distinct (kv head, offset) of the heads computing it
  std::vector<int> head_stream;          // [H]: stream of head h, or -1 if h skips this branch
  int64_t head_begin = 0, head_end = 0;  // the heads computing it, [head_begin, head_end)
  // Causal, rate 1: the later rank of each pair would do all of the block of its queries
  // and the earlier rank's keys. Instead, the queries of its second half (rows from
  // `split`) travel to the key owner, which computes them against its own keys and sends
  // the partial result back; every rank then does the same work.
  bool balanced = false;
};

// Where the rows of one stream and batch lie in a packed block: K rows then V rows, each
// row D elements, kept indices [t_begin, t_end) of the segment.
struct BlockPiece {
  int64_t t_begin, t_end;
  int64_t k_offset, v_offset;  // in elements from the block start
};

// One transfer step of a spanning branch: this rank sends its block to `send_to` and
// receives the block of `recv_from` (-1 = nothing; a block that moves is never empty).
// Steps run in this order.
struct RingStep {
  int span;  // index into RingPlan::spans
  int send_to;
  int recv_from;
  int tag;
};

struct RingPlan {
  int rank = 0, world = 1;
  int64_t split = 0;  // the first global row of this rank's second half (balanced spans)
  std::vector<SpanningBranch> spans;
  std::vector<RingStep> steps;

  // The layout of the block `sender` packs for span `s`: pieces[stream * B + b].
  std::vector<BlockPiece> layout(const Problem& p, int s, int sender) const;
  // Elements of that block (for K and V together).
  int64_t block_elements(const Problem& p, int s, int sender) const;
  // Whether the block of `sender` travels to `receiver` in span s: it holds keys, and the
  // receiver holds queries (its own block is not empty: queries and keys of a branch are
  // the same kept rows).
  bool moves(const Problem& p, int s, int sender, int receiver) const;
  // Rows of a rank's second half, and elements of its queries there for span `s`
  // ([B][rows][heads of s][D]).
  int64_t half_rows(const Problem& p) const { return p.shard_rows - p.shard_rows / 2; }
  // The first global row of rank r's second half.
  int64_t split_of(const Problem& p, int r) const { return r * p.shard_rows + p.shard_rows / 2; }
  int64_t query_elements(const Problem& p, int s) const;
  // Whether this rank sends balanced queries (it receives keys of a balanced span), and
  // whether it answers some (it owns keys another rank's balanced queries need).
  bool asks() const;
  bool answers() const;
  // The most (row, head) pairs of the balanced queries this rank answers in one step, plus
  // the head_begin slack of asker_problem's layout (times D: the elements of its inbox).
  int64_t most_answered_rows(const Problem& p) const;
  // The most elements of a block this rank receives, and of one of its own that it sends
  // (K and V together; 0 when it has none): the sizes of the rings' double buffers.
  int64_t most_received_elements(const Problem& p) const;
  int64_t most_sent_elements(const Problem& p) const;
};

// The problem of rank `asker`'s balanced queries of span sb, as its key owner computes them:
// the rows [split, split + half_rows) of the sequence, held in `queries` as
// [B][rows][heads of sb][D] after head_begin * D elements of slack, so that head h sits at
// h * D (the layout the asker packs them in). Output pointers are unset.
Problem asker_problem(const Problem& p, const RingPlan& plan, const SpanningBranch& sb,
                      const void* queries, int asker);

// Checks that every branch fits the shards (throws the same Error on every rank, since all
// ranks agree on the inputs by then) and plans the transfers of `rank`.
RingPlan plan_ring(const Problem& p, int rank, int world);

}  // namespace ringattn
