#include "src/plan/ring_plan.h"

#include <algorithm>

#include "src/base/check.h"
#include "src/base/index_math.h"

namespace ringattn {

RingPlan plan_ring(const Problem& p, int rank, int world) {
  RingPlan plan;
  plan.rank = rank;
  plan.world = world;
  plan.split = p.shard_begin + p.shard_rows / 2;
  const int64_t n_loc = p.shard_rows;
  for (size_t i = 0; i < p.branches.size(); ++i) {
    const int64_t s = p.branches[i].segment;
    if (s <= n_loc) {
      require(n_loc % s == 0, "segment_lengths[", i, "] = ", s, " does not divide the ", n_loc,
              " rows each of the ", world, " ranks holds, so its segments straddle ranks; use ",
              "a sequence length per rank that is a multiple of ", s, " (or a segment length ",
              "that divides ", n_loc, " or is a multiple of it)");
      continue;
    }
    require(s % n_loc == 0, "segment_lengths[", i, "] = ", s, " is not a multiple of the ", n_loc,
            " rows each of the ", world, " ranks holds, so its segments do not start at a rank ",
            "boundary; use a segment length that is a multiple of ", n_loc, " or divides it");
    SpanningBranch sb;
    sb.branch = static_cast<int>(i);
    sb.group = s / n_loc;
    sb.head_stream.assign(static_cast<size_t>(p.heads), -1);
    for (int64_t h = 0; h < p.heads; ++h) {
      const int hb = p.head_branch(h, sb.branch);
      if (hb >= 0) {
        const RingStream st{p.kv_head(h), p.head_branches[hb].offset};
        auto it = std::find_if(sb.streams.begin(), sb.streams.end(), [&](const RingStream& x) {
          return x.kv_head == st.kv_head && x.offset == st.offset;
        });
        if (it == sb.streams.end()) it = sb.streams.insert(sb.streams.end(), st);
        sb.head_stream[h] = static_cast<int>(it - sb.streams.begin());
      }
    }
    if (sb.streams.empty()) continue;  // no head computes this branch
    sb.head_begin = p.heads;
    for (int64_t h = 0; h < p.heads; ++h) {
      if (sb.head_stream[h] < 0) continue;
      sb.head_begin = std::min(sb.head_begin, h);
      sb.head_end = h + 1;
    }
    // Groups mode keeps a branch's heads contiguous; longnet uses all of them.
    bool contiguous = true;
    for (int64_t h = sb.head_begin; h < sb.head_end; ++h) contiguous &= sb.head_stream[h] >= 0;
    sb.balanced = p.causal && p.branches[i].rate == 1 && contiguous && n_loc >= 2;
    plan.spans.push_back(std::move(sb));
  }

  // Step k of a branch: send to the rank k places later in the segment's group and receive
  // from the one k places earlier (around the group; with causal, only forward in it). A
  // block moves only when it holds keys and its receiver holds queries of the branch (with
  // a dilation rate above N_loc, some ranks hold neither); both sides decide that from the
  // same data, so every send has its receive.
  for (size_t si = 0; si < plan.spans.size(); ++si) {
    const int g = static_cast<int>(plan.spans[si].group);
    const int base = rank / g * g, a = rank - base;
    const int s = static_cast<int>(si);
    for (int k = 1; k < g; ++k) {
      RingStep st{s, -1, -1, s * world + k};
      if (p.causal) {
        if (a + k < g) st.send_to = base + a + k;
        if (a - k >= 0) st.recv_from = base + a - k;
      } else {
        st.send_to = base + (a + k) % g;
        st.recv_from = base + (a - k + g) % g;
      }
      if (st.send_to >= 0 && !plan.moves(p, s, rank, st.send_to)) st.send_to = -1;
      if (st.recv_from >= 0 && !plan.moves(p, s, st.recv_from, rank)) st.recv_from = -1;
      if (st.send_to >= 0 || st.recv_from >= 0) plan.steps.push_back(st);
    }
  }
  return plan;
}

bool RingPlan::moves(const Problem& p, int s, int sender, int receiver) const {
  return block_elements(p, s, sender) > 0 && block_elements(p, s, receiver) > 0;
}

std::vector<BlockPiece> RingPlan::layout(const Problem& p, int s, int sender) const {
  const SpanningBranch& sb = spans[static_cast<size_t>(s)];
  const Branch br = p.branches[static_cast<size_t>(sb.branch)];
  const int64_t n0 = sender * p.shard_rows, n1 = n0 + p.shard_rows, seg = n0 / br.segment;
  std::vector<BlockPiece> pieces;
  int64_t at = 0;
  for (const RingStream& st : sb.streams) {
    const KeptSpan span = kept_span_in_window(seg, br.segment, br.rate, st.offset, n0, n1);
    const int64_t rows = span.t_end - span.t_begin;
    for (int64_t b = 0; b < p.batch; ++b) {
      pieces.push_back({span.t_begin, span.t_end, at, at + rows * p.head_dim});
      at += 2 * rows * p.head_dim;
    }
  }
  return pieces;
}

Problem asker_problem(const Problem& p, const RingPlan& plan, const SpanningBranch& sb,
                      const void* queries, int asker) {
  Problem f = p;
  const int64_t heads = sb.head_end - sb.head_begin, rows = plan.half_rows(p);
  f.q = queries;
  f.q_st = {rows * heads * p.head_dim, heads * p.head_dim, p.head_dim};
  f.shard_begin = plan.split_of(p, asker);
  f.shard_rows = rows;
  f.out = nullptr;
  f.lse = nullptr;
  return f;
}

bool RingPlan::asks() const {
  return std::any_of(steps.begin(), steps.end(), [&](const RingStep& st) {
    return spans[static_cast<size_t>(st.span)].balanced && st.recv_from >= 0;
  });
}

bool RingPlan::answers() const {
  return std::any_of(steps.begin(), steps.end(), [&](const RingStep& st) {
    return spans[static_cast<size_t>(st.span)].balanced && st.send_to >= 0;
  });
}

int64_t RingPlan::most_answered_rows(const Problem& p) const {
  int64_t most = 0;
  for (const RingStep& st : steps) {
    const SpanningBranch& sb = spans[static_cast<size_t>(st.span)];
    if (sb.balanced && st.send_to >= 0) {
      most = std::max(most, sb.head_begin + p.batch * half_rows(p) * (sb.head_end - sb.head_begin));
    }
  }
  return most;
}

int64_t RingPlan::most_received_elements(const Problem& p) const {
  int64_t most = 0;
  for (const RingStep& st : steps) {
    if (st.recv_from >= 0) most = std::max(most, block_elements(p, st.span, st.recv_from));
  }
  return most;
}

int64_t RingPlan::most_sent_elements(const Problem& p) const {
  int64_t most = 0;
  for (const RingStep& st : steps) {
    if (st.send_to >= 0) most = std::max(most, block_elements(p, st.span, rank));
  }
  return most;
}

int64_t RingPlan::query_elements(const Problem& p, int s) const {
  const SpanningBranch& sb = spans[static_cast<size_t>(s)];
  return p.batch * half_rows(p) * (sb.head_end - sb.head_begin) * p.head_dim;
}

int64_t RingPlan::block_elements(const Problem& p, int s, int sender) const {
  const std::vector<BlockPiece> pieces = layout(p, s, sender);
  int64_t total = 0;
  for (const BlockPiece& x : pieces) total += 2 * (x.t_end - x.t_begin) * p.head_dim;
  return total;
}

}  // namespace ringattn
