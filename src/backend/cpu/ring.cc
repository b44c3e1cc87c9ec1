// The CPU backend's dilated ring (RingDilatedAttention on host tensors): the K/V blocks of
// the spanning branches travel the ring (KvRing), each step's block is attended by the local
// queries (ShardForward/ShardBackward passes, merged online into fp32 row accumulators), and
// causal spans are balanced: a rank's second-half queries are computed by the key owner and
// sent back as partial results (forward) or dq (backward).

#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "src/backend/cpu/attention_cpu.h"
#include "src/backend/cpu/ring.h"
#include "src/base/check.h"
#include "src/base/fault.h"
#include "src/base/index_math.h"
#include "src/base/memory.h"
#include "src/ring/kv_ring.h"
#include "src/ring/ring_steps.h"

namespace ringattn::cpu {

namespace {

// Copies this rank's kept K/V rows of span `s` into its packed block (layout of RingPlan).
void pack_block(const Problem& p, const RingPlan& plan, int s, std::vector<uint8_t>& block) {
  const SpanningBranch& sb = plan.spans[static_cast<size_t>(s)];
  const Branch br = p.branches[static_cast<size_t>(sb.branch)];
  const std::vector<BlockPiece> pieces = plan.layout(p, s, plan.rank);
  const size_t esize = dtype_size(p.dtype), row_bytes = esize * static_cast<size_t>(p.head_dim);
  resize_buffer(block, static_cast<size_t>(plan.block_elements(p, s, plan.rank)) * esize,
                "the ring's packed K/V block");
  const int64_t seg_start = p.shard_begin / br.segment * br.segment;
  for (size_t st = 0; st < sb.streams.size(); ++st) {
    const RingStream& stream = sb.streams[st];
    for (int64_t b = 0; b < p.batch; ++b) {
      const BlockPiece& x = pieces[st * static_cast<size_t>(p.batch) + static_cast<size_t>(b)];
      for (int64_t t = x.t_begin; t < x.t_end; ++t) {
        const int64_t row = seg_start + stream.offset + t * br.rate - p.shard_begin;
        const size_t at = static_cast<size_t>(t - x.t_begin) * row_bytes;
        std::memcpy(block.data() + static_cast<size_t>(x.k_offset) * esize + at,
                    static_cast<const uint8_t*>(p.k) +
                        esize * static_cast<size_t>(b * p.k_st.b + row * p.k_st.n +
                                                    stream.kv_head * p.k_st.h),
                    row_bytes);
        std::memcpy(block.data() + static_cast<size_t>(x.v_offset) * esize + at,
                    static_cast<const uint8_t*>(p.v) +
                        esize * static_cast<size_t>(b * p.v_st.b + row * p.v_st.n +
                                                    stream.kv_head * p.v_st.h),
                    row_bytes);
      }
    }
  }
}

// The blocks of the CPU ring in host memory: this rank's packed, and both inboxes at the
// size of the largest block this rank receives, all made before the ring starts.
class HostKvStore final : public KvStore {
 public:
  HostKvStore(const Problem& p, const RingPlan& plan) : own_(plan.spans.size()) {
    for (size_t s = 0; s < plan.spans.size(); ++s)
      pack_block(p, plan, static_cast<int>(s), own_[s]);
    const int64_t most = most_over_steps(
        plan, [](const RingStep& st) { return st.recv_from >= 0; },
        [&](const RingStep& st) { return plan.block_elements(p, st.span, st.recv_from); });
    for (std::vector<uint8_t>& buf : inbox_) {
      resize_buffer(buf, static_cast<size_t>(most) * dtype_size(p.dtype),
                    "the ring's K/V receive buffers");
    }
  }
  const void* own(int span) override { return own_[static_cast<size_t>(span)].data(); }
  void* inbox(int slot, size_t bytes) override {
    if (bytes > inbox_[slot].size()) {
      fail(ErrorCode::kInternal, "the ring's receive buffer holds ", inbox_[slot].size(),
           " bytes, but a block of ", bytes, " bytes arrives");
    }
    return inbox_[slot].data();
  }

 private:
  std::vector<std::vector<uint8_t>> own_;
  std::vector<uint8_t> inbox_[2];
};

// The key source of head h (head branch hb, batch b) in step e's block (the last received;
// read-only, safe from every thread).
bool block_keys(const KvRing& ring, const Problem& p, const RingPlan& plan, size_t e,
                const uint8_t* block, int64_t b, int64_t h, int hb, detail::KeySource& src) {
  const RingStep& st = plan.steps[e];
  const SpanningBranch& sb = plan.spans[static_cast<size_t>(st.span)];
  if (p.head_branches[hb].branch != sb.branch) return false;
  const BlockPiece& x = ring.piece(sb.head_stream[h], b);
  if (x.t_end == x.t_begin) return false;
  const size_t esize = dtype_size(p.dtype);
  src = {block + esize * static_cast<size_t>(x.k_offset),
         block + esize * static_cast<size_t>(x.v_offset),
         p.head_dim,
         p.head_dim,
         x.t_begin,
         x.t_end};
  return true;
}

// Rows [split, end) of heads [h0, h1) of a [B, N_loc, heads, D] view (element size `esize`)
// as [B][rows][h1 - h0][D] in `buf`.
void pack_half(const void* base, const Strides3& st, const Problem& p, int64_t split_local,
               int64_t h0, int64_t h1, size_t esize, std::vector<uint8_t>& buf) {
  const size_t row_bytes = esize * static_cast<size_t>(p.head_dim);
  resize_buffer(buf,
                static_cast<size_t>(p.batch * (p.shard_rows - split_local) * (h1 - h0)) * row_bytes,
                "the ring's balanced queries");
  uint8_t* out = buf.data();
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t n = split_local; n < p.shard_rows; ++n) {
      for (int64_t h = h0; h < h1; ++h, out += row_bytes) {
        std::memcpy(out,
                    static_cast<const uint8_t*>(base) +
                        esize * static_cast<size_t>(b * st.b + n * st.n + h * st.h),
                    row_bytes);
      }
    }
  }
}

// The problem of another rank's balanced queries, held in `queries` ([B][rows][heads of the
// span][D], after head_begin * D slack elements so that head h sits at h * D): the rows
// [split, split + rows) of the sequence, computed here against this rank's own keys.
Problem foreign_queries(const Problem& p, const SpanningBranch& sb, const void* queries,
                        int64_t split, int64_t rows) {
  Problem f = p;
  const int64_t heads = sb.head_end - sb.head_begin;
  f.q = queries;
  f.q_st = {rows * heads * p.head_dim, heads * p.head_dim, p.head_dim};
  f.shard_begin = split;
  f.shard_rows = rows;
  f.out = nullptr;
  f.lse = nullptr;
  return f;
}

// Whether this rank answers balanced queries in some step (it owns the keys they need), and
// whether it sends its own (it receives keys of a balanced span); then the most elements
// (heads of the span x rows x D, plus the slack) such queries take.
bool answers_queries(const RingPlan& plan) {
  for (const RingStep& st : plan.steps) {
    if (plan.spans[static_cast<size_t>(st.span)].balanced && st.send_to >= 0) return true;
  }
  return false;
}
bool asks_queries(const RingPlan& plan) {
  for (const RingStep& st : plan.steps) {
    if (plan.spans[static_cast<size_t>(st.span)].balanced && st.recv_from >= 0) return true;
  }
  return false;
}
int64_t most_query_elements(const Problem& p, const RingPlan& plan) {
  return most_over_steps(
      plan,
      [&](const RingStep& st) {
        return plan.spans[static_cast<size_t>(st.span)].balanced && st.send_to >= 0;
      },
      [&](const RingStep& st) {
        return plan.spans[static_cast<size_t>(st.span)].head_begin * p.head_dim +
               plan.query_elements(p, st.span);
      });
}

// One rank of the CPU ring forward: everything sized by the problem is allocated by the
// constructor (inside the ranks' agreement, so that running out of memory on one rank fails
// every rank there); run() is the protocol.
class CpuRingForward final : public RingRun {
 public:
  CpuRingForward(const Problem& p, const RingPlan& plan, const ExecOptions& options)
      : p_(p),
        plan_(plan),
        tags_(tags_of(plan)),
        shard_(p, options, plan.split),
        store_(p, plan),
        mine_(plan.spans.size()) {
    const size_t esize = dtype_size(p.dtype);
    const int64_t half = plan.half_rows(p);
    for (const RingStep& st : plan.steps) {
      const SpanningBranch& sb = plan.spans[static_cast<size_t>(st.span)];
      if (!sb.balanced || st.recv_from < 0 || !mine_[static_cast<size_t>(st.span)].empty()) {
        continue;
      }
      pack_half(p.q, p.q_st, p, plan.split - p.shard_begin, sb.head_begin, sb.head_end, esize,
                mine_[static_cast<size_t>(st.span)]);
    }
    // Balanced partial results, (O, lse as two floats) for at most every head of the second
    // half.
    const size_t partial = static_cast<size_t>(p.batch * p.heads * half * (p.head_dim + 2));
    if (asks_queries(plan)) {
      resize_buffer(partial_in_, partial, "the ring's balanced partial results");
    }
    if (answers_queries(plan)) {
      for (std::vector<float>& buf : partial_out_) {
        resize_buffer(buf, partial, "the ring's balanced partial results");
      }
      resize_buffer(queries_, static_cast<size_t>(most_query_elements(p, plan)) * esize,
                    "the ring's received balanced queries");
      const SpanningBranch& sb = plan.spans[0];
      foreign_p_ = foreign_queries(p, sb, queries_.data(), 0, half);
      foreign_ = std::make_unique<ShardForward>(foreign_p_, options);
    }
  }

  void run(Communicator& comm, RingStats& stats) override {
    const Problem& p = p_;
    const RingPlan& plan = plan_;
    const size_t esize = dtype_size(p.dtype);
    const int64_t half = plan.half_rows(p);
    const auto poll = [&comm] { comm.progress(); };
    const detail::KeySourceFn local = detail::local_keys(p);
    KvRing ring(comm, p, plan, stats, store_);

    // Balanced spans: this rank's second-half queries go to every rank whose keys it gets.
    std::vector<CommRequest> sends;
    for (const RingStep& st : plan.steps) {
      const SpanningBranch& sb = plan.spans[static_cast<size_t>(st.span)];
      if (!sb.balanced || st.recv_from < 0) continue;
      const std::vector<uint8_t>& mine = mine_[static_cast<size_t>(st.span)];
      sends.push_back(comm.isend(mine.data(), mine.size(), st.recv_from, tags_.queries(st)));
      ++stats.messages_sent;
    }
    shard_.pass(local, poll);

    CommRequest partial_sends[2];
    for (size_t e = 0; e < plan.steps.size(); ++e) {
      ringattn::detail::fault_point("ring.step");
      const RingStep& st = plan.steps[e];
      const SpanningBranch& sb = plan.spans[static_cast<size_t>(st.span)];
      const int64_t heads = sb.head_end - sb.head_begin;
      const size_t partial_size = static_cast<size_t>(p.batch * heads * half * (p.head_dim + 2));
      if (sb.balanced && st.send_to >= 0) {
        // The later rank's second-half queries against this rank's keys.
        const size_t lead = static_cast<size_t>(sb.head_begin * p.head_dim) * esize;
        const size_t bytes = static_cast<size_t>(plan.query_elements(p, st.span)) * esize;
        CommRequest req = comm.irecv(queries_.data() + lead, bytes, st.send_to, tags_.queries(st));
        ring.wait(req, e);
        const int64_t split = st.send_to * p.shard_rows + p.shard_rows / 2;
        foreign_p_ = foreign_queries(p, sb, queries_.data(), split, half);
        foreign_->restart();
        foreign_->pass(
            [&](int64_t b, int64_t h, int hb, int64_t seg, detail::KeySource& src) {
              return p.head_branches[hb].branch == sb.branch && local(b, h, hb, seg, src);
            },
            poll);
        std::vector<float>& out_buf = partial_out_[e % 2];
        ring.wait(partial_sends[e % 2], e);  // the send that used this buffer two steps ago
        foreign_->export_rows(sb.head_begin, sb.head_end, out_buf.data());
        partial_sends[e % 2] =
            comm.isend(out_buf.data(), partial_size * sizeof(float), st.send_to, tags_.partial(st));
        ++stats.messages_sent;
      }
      if (ring.receives(e)) {
        const auto* block = static_cast<const uint8_t*>(ring.receive(e));
        shard_.pass(
            [&](int64_t b, int64_t h, int hb, int64_t, detail::KeySource& src) {
              return block_keys(ring, p, plan, e, block, b, h, hb, src);
            },
            poll, sb.balanced ? plan.split : INT64_MAX);
        if (sb.balanced) {
          CommRequest req = comm.irecv(partial_in_.data(), partial_size * sizeof(float),
                                       st.recv_from, tags_.partial(st));
          ring.wait(req, e);
          shard_.merge_rows(sb.head_begin, sb.head_end, plan.split, half, partial_in_.data());
        }
      }
      ring.release(e);
    }
    for (CommRequest& req : sends) ring.wait(req, plan.steps.size());
    for (CommRequest& req : partial_sends) ring.wait(req, plan.steps.size());
    ring.finish();
    shard_.write_output();
  }

 private:
  const Problem& p_;
  const RingPlan& plan_;
  Tags tags_;
  ShardForward shard_;
  HostKvStore store_;
  std::vector<std::vector<uint8_t>> mine_;  // per balanced span: this rank's second half
  std::vector<uint8_t> queries_;            // another rank's balanced queries
  std::vector<float> partial_out_[2], partial_in_;
  Problem foreign_p_;
  std::unique_ptr<ShardForward> foreign_;  // those queries against this rank's keys
};

// This rank's second-half q, dout, out and lse of a balanced span (the receiver's order).
struct Half {
  std::vector<uint8_t> q, dout, out;
  std::vector<double> lse;  // in double: lse_precise where the backward recomputed it
};

// One rank of the CPU ring backward, made like CpuRingForward.
class CpuRingBackward final : public RingRun {
 public:
  CpuRingBackward(const BackwardProblem& bp, const RingPlan& plan, const ExecOptions& options)
      : bp_(bp),
        plan_(plan),
        tags_(tags_of(plan)),
        shard_(bp, options),
        store_(bp.fwd, plan),
        mine_(plan.spans.size()) {
    const Problem& p = bp.fwd;
    const size_t esize = dtype_size(p.dtype);
    const int64_t half = plan.half_rows(p), split_local = plan.split - p.shard_begin;
    for (const RingStep& st : plan.steps) {
      const SpanningBranch& sb = plan.spans[static_cast<size_t>(st.span)];
      Half& m = mine_[static_cast<size_t>(st.span)];
      if (!sb.balanced || st.recv_from < 0 || !m.q.empty()) continue;
      pack_half(p.q, p.q_st, p, split_local, sb.head_begin, sb.head_end, esize, m.q);
      pack_half(bp.dout, bp.dout_st, p, split_local, sb.head_begin, sb.head_end, esize, m.dout);
      pack_half(p.out, p.out_st, p, split_local, sb.head_begin, sb.head_end, esize, m.out);
      resize_buffer(m.lse, static_cast<size_t>(p.batch * (sb.head_end - sb.head_begin) * half),
                    "the ring's balanced lse");
    }
    // Gradients of received blocks (sent back) and of this rank's (returned), fp32.
    const int64_t most_sent = most_over_steps(
        plan, [](const RingStep& st) { return st.recv_from >= 0; },
        [&](const RingStep& st) { return plan.block_elements(p, st.span, st.recv_from); });
    const int64_t most_returned = most_over_steps(
        plan, [](const RingStep& st) { return st.send_to >= 0; },
        [&](const RingStep& st) { return plan.block_elements(p, st.span, plan.rank); });
    for (int i = 0; i < 2; ++i) {
      resize_buffer(grads_out_[i], static_cast<size_t>(most_sent), "the ring's fp32 K/V gradients");
      resize_buffer(grads_in_[i], static_cast<size_t>(most_returned),
                    "the ring's returned fp32 K/V gradients");
    }
    if (answers_queries(plan)) {
      const size_t most = static_cast<size_t>(most_query_elements(p, plan));
      for (std::vector<uint8_t>* buf : {&in_q_, &in_dout_, &in_out_}) {
        resize_buffer(*buf, most * esize, "the ring's received balanced queries");
      }
      resize_buffer(in_lse_, static_cast<size_t>(p.heads * half * p.batch),
                    "the ring's received balanced lse (double)");
      for (std::vector<float>& buf : dq_out_) {
        resize_buffer(buf, most, "the ring's balanced dq results");
      }
      foreign_ = bp;
      foreign_.fwd = foreign_queries(p, plan.spans[0], in_q_.data(), 0, half);
      // Its dq goes back to the queries' owner and its keys' gradients into shard_: none of
      // it lands in this rank's tensors, so it sums in accumulators of its own.
      foreign_.dq = foreign_.dk = foreign_.dv = nullptr;
      foreign_shard_ = std::make_unique<ShardBackward>(foreign_, options);
    }
    if (asks_queries(plan)) {
      resize_buffer(dq_in_, static_cast<size_t>(p.batch * p.heads * half * p.head_dim),
                    "the ring's returned balanced dq");
    }
  }

  void run(Communicator& comm, RingStats& stats) override {
    const Problem& p = bp_.fwd;
    const RingPlan& plan = plan_;
    const int64_t half = plan.half_rows(p), D = p.head_dim, group = p.heads / p.kv_heads;
    const auto poll = [&comm] { comm.progress(); };
    KvRing ring(comm, p, plan, stats, store_);

    std::vector<CommRequest> sends;
    for (const RingStep& st : plan.steps) {
      const SpanningBranch& sb = plan.spans[static_cast<size_t>(st.span)];
      if (!sb.balanced || st.recv_from < 0) continue;
      Half& m = mine_[static_cast<size_t>(st.span)];
      pack_lse(sb, m.lse);
      for (const std::vector<uint8_t>* part : {&m.q, &m.dout, &m.out}) {
        sends.push_back(comm.isend(part->data(), part->size(), st.recv_from, tags_.queries(st)));
      }
      sends.push_back(
          comm.isend(m.lse.data(), m.lse.size() * sizeof(double), st.recv_from, tags_.queries(st)));
      stats.messages_sent += 4;
    }
    shard_.local_passes(poll);

    // Step e: the gradients of the received keys go back to their owner (fp32, the block's
    // layout), and the gradients of this rank's keys come back from the rank it sent them
    // to. Both are double-buffered; returned gradients are added in step order
    // (deterministic). A step's gradient receive is posted after its block arrived, so that
    // no wait on the block (which some communicators complete together with everything
    // posted before it) depends on the peer's gradients.
    CommRequest grad_sends[2], grad_recvs[2], dq_sends[2];
    for (size_t e = 0; e < plan.steps.size(); ++e) {
      ringattn::detail::fault_point("ring.step");
      const RingStep& st = plan.steps[e];
      const SpanningBranch& sb = plan.spans[static_cast<size_t>(st.span)];
      if (sb.balanced && st.send_to >= 0) answer_queries(comm, ring, stats, e, dq_sends[e % 2]);
      ring.wait(grad_sends[e % 2], e);  // step e - 2's returned gradients have left
      const uint8_t* block =
          ring.receives(e) ? static_cast<const uint8_t*>(ring.receive(e)) : nullptr;
      if (st.send_to >= 0) {
        grad_recvs[e % 2] = comm.irecv(
            grads_in_[e % 2].data(),
            static_cast<size_t>(plan.block_elements(p, st.span, plan.rank)) * sizeof(float),
            st.send_to, tags_.grads(st));
      }
      if (block != nullptr) {
        float* g = grads_out_[e % 2].data();
        const size_t g_size = static_cast<size_t>(plan.block_elements(p, st.span, st.recv_from));
        std::fill_n(g, g_size, 0.0f);
        // Balanced spans: only the first half's queries here (the key owner does the rest).
        const int64_t own_end = sb.balanced ? plan.split : p.shard_begin + p.shard_rows;
        const Branch br = p.branches[static_cast<size_t>(sb.branch)];
        shard_.pass(
            p.batch * p.kv_heads,
            [&](int64_t t, std::vector<detail::BackwardWork>& works) {
              const int64_t b = t / p.kv_heads, hk = t % p.kv_heads;
              for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
                const int hb = p.head_branch(h, sb.branch);
                detail::BackwardWork w{};
                if (hb < 0 || !block_keys(ring, p, plan, e, block, b, h, hb, w.keys)) continue;
                w.b = b;
                w.h = h;
                w.branch = sb.branch;
                w.offset = p.head_branches[hb].offset;
                w.segment = p.shard_begin / br.segment;
                const KeptSpan own = kept_span_in_window(w.segment, br.segment, br.rate, w.offset,
                                                         p.shard_begin, own_end);
                w.tq_begin = own.t_begin;
                w.tq_end = own.t_end;
                const BlockPiece& x = ring.piece(sb.head_stream[h], b);
                w.dk = g + x.k_offset;
                w.dv = g + x.v_offset;
                w.dk_stride = w.dv_stride = D;
                works.push_back(w);
              }
            },
            poll);
        grad_sends[e % 2] = comm.isend(g, g_size * sizeof(float), st.recv_from, tags_.grads(st));
        ++stats.messages_sent;
        if (sb.balanced) {
          const size_t bytes = static_cast<size_t>(plan.query_elements(p, st.span)) * sizeof(float);
          CommRequest req = comm.irecv(dq_in_.data(), bytes, st.recv_from, tags_.partial(st));
          ring.wait(req, e);
          shard_.add_dq(sb.head_begin, sb.head_end, plan.split, half, dq_in_.data());
        }
      }
      ring.release(e);
      if (e >= 1) add_returned(ring, e - 1, grad_recvs[(e - 1) % 2]);
    }
    if (!plan.steps.empty()) {
      add_returned(ring, plan.steps.size() - 1, grad_recvs[(plan.steps.size() - 1) % 2]);
    }
    for (CommRequest* req : {&grad_sends[0], &grad_sends[1], &dq_sends[0], &dq_sends[1]}) {
      ring.wait(*req, plan.steps.size());
    }
    for (CommRequest& req : sends) ring.wait(req, plan.steps.size());
    ring.finish();
    shard_.write_output();
  }

 private:
  // This rank's second-half lse of span sb, [B][heads of sb][rows], in double: the
  // recomputed lse where the backward made one (lse_precise), else the caller's.
  void pack_lse(const SpanningBranch& sb, std::vector<double>& out) const {
    const Problem& p = bp_.fwd;
    double* lse = out.data();
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t h = sb.head_begin; h < sb.head_end; ++h) {
        for (int64_t n = plan_.split - p.shard_begin; n < p.shard_rows; ++n) {
          *lse++ = p.lse_precise != nullptr
                       ? p.lse_precise[b * p.lse_precise_st.b + n * p.lse_precise_st.n +
                                       h * p.lse_precise_st.h]
                       : p.lse[b * p.lse_st.b + n * p.lse_st.n + h * p.lse_st.h];
        }
      }
    }
  }

  // Step e of a balanced span whose keys this rank owns: the later rank's second-half
  // queries against them. Their dq goes back; the gradients of these keys stay here.
  void answer_queries(Communicator& comm, KvRing& ring, RingStats& stats, size_t e,
                      CommRequest& dq_send) {
    const Problem& p = bp_.fwd;
    const RingStep& st = plan_.steps[e];
    const SpanningBranch& span = plan_.spans[static_cast<size_t>(st.span)];
    const size_t esize = dtype_size(p.dtype);
    const int64_t half = plan_.half_rows(p), D = p.head_dim, group = p.heads / p.kv_heads;
    const int64_t heads = span.head_end - span.head_begin;
    const size_t lead = static_cast<size_t>(span.head_begin * D) * esize;
    const int64_t elements = plan_.query_elements(p, st.span);
    const size_t bytes = static_cast<size_t>(elements) * esize;
    const size_t lse_lead = static_cast<size_t>(span.head_begin * half);
    CommRequest reqs[4] = {comm.irecv(in_q_.data() + lead, bytes, st.send_to, tags_.queries(st)),
                           comm.irecv(in_dout_.data() + lead, bytes, st.send_to, tags_.queries(st)),
                           comm.irecv(in_out_.data() + lead, bytes, st.send_to, tags_.queries(st)),
                           comm.irecv(in_lse_.data() + lse_lead,
                                      static_cast<size_t>(p.batch * heads * half) * sizeof(double),
                                      st.send_to, tags_.queries(st))};
    for (CommRequest& req : reqs) ring.wait(req, e);
    const int64_t split = st.send_to * p.shard_rows + p.shard_rows / 2;
    foreign_.fwd = foreign_queries(p, span, in_q_.data(), split, half);
    foreign_.fwd.out = in_out_.data();
    foreign_.fwd.out_st = foreign_.fwd.q_st;
    foreign_.fwd.lse = nullptr;
    foreign_.fwd.lse_precise = in_lse_.data();
    foreign_.fwd.lse_precise_st = {heads * half, 1, half};
    foreign_.dout = in_dout_.data();
    foreign_.dout_st = foreign_.fwd.q_st;
    foreign_shard_->restart();
    const Branch br = p.branches[static_cast<size_t>(span.branch)];
    const int64_t seg = split / br.segment;
    foreign_shard_->pass(
        p.batch * p.kv_heads,
        [&](int64_t t, std::vector<detail::BackwardWork>& works) {
          const int64_t b = t / p.kv_heads, hk = t % p.kv_heads;
          for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
            detail::BackwardWork w;
            const int hb = p.head_branch(h, span.branch);
            if (hb < 0 || !shard_.local_key_work(b, h, hb, seg, w)) continue;
            const KeptSpan theirs =
                kept_span_in_window(seg, br.segment, br.rate, w.offset, split, split + half);
            w.tq_begin = theirs.t_begin;
            w.tq_end = theirs.t_end;
            works.push_back(w);
          }
        },
        [&comm] { comm.progress(); });
    std::vector<float>& dq_buf = dq_out_[e % 2];
    ring.wait(dq_send, e);  // the send that used this buffer two steps ago
    foreign_shard_->export_dq(span.head_begin, span.head_end, dq_buf.data());
    dq_send = comm.isend(dq_buf.data(), static_cast<size_t>(elements) * sizeof(float), st.send_to,
                         tags_.partial(st));
    ++stats.messages_sent;
  }

  // Adds the gradients of this rank's keys that step e's receiver sent back.
  void add_returned(KvRing& ring, size_t e, CommRequest& recv) {
    const Problem& p = bp_.fwd;
    const RingStep& st = plan_.steps[e];
    if (st.send_to < 0) return;
    ring.wait(recv, e);
    const SpanningBranch& sb = plan_.spans[static_cast<size_t>(st.span)];
    const Branch br = p.branches[static_cast<size_t>(sb.branch)];
    const std::vector<BlockPiece> pieces = plan_.layout(p, st.span, plan_.rank);
    const int64_t seg_start = p.shard_begin / br.segment * br.segment, D = p.head_dim;
    const float* grads = grads_in_[e % 2].data();
    for (size_t si = 0; si < sb.streams.size(); ++si) {
      for (int64_t b = 0; b < p.batch; ++b) {
        const BlockPiece& x = pieces[si * static_cast<size_t>(p.batch) + static_cast<size_t>(b)];
        for (int64_t t = x.t_begin; t < x.t_end; ++t) {
          const int64_t row = seg_start + sb.streams[si].offset + t * br.rate - p.shard_begin;
          float* dk_row = shard_.dk_row(b, row, sb.streams[si].kv_head);
          float* dv_row = shard_.dv_row(b, row, sb.streams[si].kv_head);
          const float* gk = grads + x.k_offset + (t - x.t_begin) * D;
          const float* gv = grads + x.v_offset + (t - x.t_begin) * D;
          for (int64_t d = 0; d < D; ++d) {
            dk_row[d] += gk[d];
            dv_row[d] += gv[d];
          }
        }
      }
    }
  }

  const BackwardProblem& bp_;
  const RingPlan& plan_;
  Tags tags_;
  ShardBackward shard_;
  HostKvStore store_;
  std::vector<Half> mine_;  // per balanced span
  std::vector<float> grads_out_[2], grads_in_[2];
  std::vector<uint8_t> in_q_, in_dout_, in_out_;
  std::vector<double> in_lse_;
  std::vector<float> dq_out_[2], dq_in_;
  BackwardProblem foreign_;
  std::unique_ptr<ShardBackward> foreign_shard_;
};

// A shard whose keys are all local (one rank, or every segment inside this rank): the
// single-device kernel writes the output directly, without the shard's accumulators.
class LocalForward final : public RingRun {
 public:
  LocalForward(const Problem& p, const ExecOptions& options) : p_(p), options_(options) {}
  void run(Communicator&, RingStats&) override { forward(p_, options_); }

 private:
  const Problem& p_;
  ExecOptions options_;
};

// The backward after the forward for the lse in double.
class PreciseBackward final : public RingRun {
 public:
  PreciseBackward(BackwardProblem& bp, std::unique_ptr<PreciseLse> lse,
                  std::unique_ptr<RingRun> forward, std::unique_ptr<RingRun> backward)
      : bp_(bp),
        lse_(std::move(lse)),
        forward_(std::move(forward)),
        backward_(std::move(backward)) {}
  void run(Communicator& comm, RingStats& stats) override {
    forward_->run(comm, stats);
    lse_->attach(bp_.fwd);
    backward_->run(comm, stats);
  }

 private:
  BackwardProblem& bp_;
  std::unique_ptr<PreciseLse> lse_;
  std::unique_ptr<RingRun> forward_, backward_;
};

}  // namespace

std::unique_ptr<RingRun> with_precise_lse(
    BackwardProblem& bp, bool precise,
    const std::function<std::unique_ptr<RingRun>(const Problem&)>& make_forward,
    std::unique_ptr<RingRun> backward) {
  if (!precise) return backward;
  auto lse = std::make_unique<PreciseLse>(bp.fwd);
  std::unique_ptr<RingRun> again = make_forward(lse->forward_problem());
  return std::make_unique<PreciseBackward>(bp, std::move(lse), std::move(again),
                                           std::move(backward));
}

std::unique_ptr<RingRun> ring_forward(const Problem& p, const RingPlan& plan,
                                      const ExecOptions& options) {
  if (plan.steps.empty()) return std::make_unique<LocalForward>(p, options);
  return std::make_unique<CpuRingForward>(p, plan, options);
}

std::unique_ptr<RingRun> ring_backward(BackwardProblem& bp, const RingPlan& plan,
                                       const ExecOptions& options, bool precise) {
  return with_precise_lse(
      bp, precise, [&](const Problem& f) { return ring_forward(f, plan, options); },
      std::make_unique<CpuRingBackward>(bp, plan, options));
}

}  // namespace ringattn::cpu
