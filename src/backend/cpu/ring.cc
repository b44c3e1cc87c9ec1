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
#include "src/ring/host_inboxes.h"
#include "src/ring/ring_protocol.h"
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
  HostKvStore(const Problem& p, const RingPlan& plan)
      : plan_(plan),
        own_(plan.spans.size()),
        inboxes_(static_cast<size_t>(plan.most_received_elements(p)) * dtype_size(p.dtype),
                 "the ring's K/V receive buffers") {
    for (size_t s = 0; s < plan.spans.size(); ++s) {
      pack_block(p, plan, static_cast<int>(s), own_[s]);
    }
  }
  const void* outgoing(size_t step, int) override {
    return own_[static_cast<size_t>(plan_.steps[step].span)].data();
  }
  void* inbox(int slot, size_t bytes) override { return inboxes_.get(slot, bytes); }

 private:
  const RingPlan& plan_;
  std::vector<std::vector<uint8_t>> own_;  // per span
  HostInboxes inboxes_;
};

// The key source of head h (head branch hb, batch b) in a received block of span sb whose
// layout is `pieces` (read-only, safe from every thread).
bool block_keys(const Problem& p, const SpanningBranch& sb, const std::vector<BlockPiece>& pieces,
                const uint8_t* block, int64_t b, int64_t h, int hb, detail::KeySource& src) {
  if (p.head_branches[hb].branch != sb.branch) return false;
  const BlockPiece& x = pieces[static_cast<size_t>(sb.head_stream[h] * p.batch + b)];
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

// One rank's forward shard of the CPU ring: everything sized by the problem is allocated by
// the constructor (inside the ranks' agreement, so that running out of memory on one rank
// fails every rank there); the verbs are the steps of the protocol (ring_protocol.h).
class CpuForwardShard final : public ForwardRingShard {
 public:
  CpuForwardShard(const Problem& p, const RingPlan& plan, const ExecOptions& options)
      : p_(p),
        plan_(plan),
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
    if (plan.asks()) {
      resize_buffer(partial_in_, partial, "the ring's balanced partial results");
    }
    if (plan.answers()) {
      for (std::vector<float>& buf : partial_out_) {
        resize_buffer(buf, partial, "the ring's balanced partial results");
      }
      resize_buffer(queries_, static_cast<size_t>(plan.most_answered_rows(p) * p.head_dim) * esize,
                    "the ring's received balanced queries");
      foreign_p_ = asker_problem(p, plan, plan.spans[0], queries_.data(), 0);
      foreign_ = std::make_unique<ShardForward>(foreign_p_, options);
    }
  }

  KvStore& store() override { return store_; }
  void attend_local(const Poll& poll) override { shard_.pass(detail::local_keys(p_), poll); }
  void attend_block(size_t step, const void* block, int64_t row_end, const Poll& poll) override {
    const RingStep& st = plan_.steps[step];
    const std::vector<BlockPiece> pieces = plan_.layout(p_, st.span, st.recv_from);
    shard_.pass(
        [&](int64_t b, int64_t h, int hb, int64_t, detail::KeySource& src) {
          return block_keys(p_, plan_.spans[static_cast<size_t>(st.span)], pieces,
                            static_cast<const uint8_t*>(block), b, h, hb, src);
        },
        poll, row_end);
  }
  std::vector<Message> own_queries(size_t step) override {
    const int span = plan_.steps[step].span;
    std::vector<uint8_t>& mine = mine_[static_cast<size_t>(span)];
    return {{mine.data(), mine.size()}};
  }
  std::vector<Message> query_inbox(size_t step) override {
    const int span = plan_.steps[step].span;
    const size_t esize = dtype_size(p_.dtype);
    const size_t lead =
        static_cast<size_t>(plan_.spans[static_cast<size_t>(span)].head_begin * p_.head_dim);
    return {{queries_.data() + lead * esize,
             static_cast<size_t>(plan_.query_elements(p_, span)) * esize}};
  }
  Message answer(size_t step, int slot, const Poll& poll) override {
    const int span = plan_.steps[step].span, asker = plan_.steps[step].send_to;
    const SpanningBranch& sb = plan_.spans[static_cast<size_t>(span)];
    const detail::KeySourceFn local = detail::local_keys(p_);
    foreign_p_ = asker_problem(p_, plan_, sb, queries_.data(), asker);
    foreign_->restart();
    foreign_->pass(
        [&](int64_t b, int64_t h, int hb, int64_t seg, detail::KeySource& src) {
          return p_.head_branches[hb].branch == sb.branch && local(b, h, hb, seg, src);
        },
        poll);
    std::vector<float>& out = partial_out_[slot];
    foreign_->export_rows(sb.head_begin, sb.head_end, out.data());
    return {out.data(), partial_bytes(span)};
  }
  Message partial_inbox(size_t step) override {
    return {partial_in_.data(), partial_bytes(plan_.steps[step].span)};
  }
  void merge_partial(size_t step) override {
    const int span = plan_.steps[step].span;
    const SpanningBranch& sb = plan_.spans[static_cast<size_t>(span)];
    shard_.merge_rows(sb.head_begin, sb.head_end, plan_.split, plan_.half_rows(p_),
                      partial_in_.data());
  }
  void write_output() override { shard_.write_output(); }

 private:
  size_t partial_bytes(int span) const {
    const SpanningBranch& sb = plan_.spans[static_cast<size_t>(span)];
    return static_cast<size_t>(p_.batch * (sb.head_end - sb.head_begin) * plan_.half_rows(p_) *
                               (p_.head_dim + 2)) *
           sizeof(float);
  }

  const Problem& p_;
  const RingPlan& plan_;
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

// One rank's backward shard of the CPU ring, made like CpuForwardShard.
class CpuBackwardShard final : public BackwardRingShard {
 public:
  CpuBackwardShard(const BackwardProblem& bp, const RingPlan& plan, const ExecOptions& options)
      : bp_(bp), plan_(plan), shard_(bp, options), store_(bp.fwd, plan), mine_(plan.spans.size()) {
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
    const int64_t most_sent = plan.most_received_elements(p);
    const int64_t most_returned = plan.most_sent_elements(p);
    for (int i = 0; i < 2; ++i) {
      resize_buffer(grads_out_[i], static_cast<size_t>(most_sent), "the ring's fp32 K/V gradients");
      resize_buffer(grads_in_[i], static_cast<size_t>(most_returned),
                    "the ring's returned fp32 K/V gradients");
    }
    if (plan.answers()) {
      const size_t most = static_cast<size_t>(plan.most_answered_rows(p) * p.head_dim);
      for (std::vector<uint8_t>* buf : {&in_q_, &in_dout_, &in_out_}) {
        resize_buffer(*buf, most * esize, "the ring's received balanced queries");
      }
      resize_buffer(in_lse_, static_cast<size_t>(p.heads * half * p.batch),
                    "the ring's received balanced lse (double)");
      for (std::vector<float>& buf : dq_out_) {
        resize_buffer(buf, most, "the ring's balanced dq results");
      }
      foreign_ = bp;
      foreign_.fwd = asker_problem(p, plan, plan.spans[0], in_q_.data(), 0);
      // Its dq goes back to the queries' owner and its keys' gradients into shard_: none of
      // it lands in this rank's tensors, so it sums in accumulators of its own.
      foreign_.dq = foreign_.dk = foreign_.dv = nullptr;
      foreign_shard_ = std::make_unique<ShardBackward>(foreign_, options);
    }
    if (plan.asks()) {
      resize_buffer(dq_in_, static_cast<size_t>(p.batch * p.heads * half * p.head_dim),
                    "the ring's returned balanced dq");
    }
  }

  KvStore& store() override { return store_; }
  void attend_local(const Poll& poll) override { shard_.local_passes(poll); }
  std::vector<Message> own_queries(size_t step) override {
    const int span = plan_.steps[step].span;
    Half& m = mine_[static_cast<size_t>(span)];
    pack_lse(plan_.spans[static_cast<size_t>(span)], m.lse);  // lse_precise is set by now
    return {{m.q.data(), m.q.size()},
            {m.dout.data(), m.dout.size()},
            {m.out.data(), m.out.size()},
            {m.lse.data(), m.lse.size() * sizeof(double)}};
  }
  std::vector<Message> query_inbox(size_t step) override {
    const int span = plan_.steps[step].span;
    const Problem& p = bp_.fwd;
    const SpanningBranch& sb = plan_.spans[static_cast<size_t>(span)];
    const size_t esize = dtype_size(p.dtype);
    const int64_t half = plan_.half_rows(p);
    const size_t lead = static_cast<size_t>(sb.head_begin * p.head_dim) * esize;
    const size_t bytes = static_cast<size_t>(plan_.query_elements(p, span)) * esize;
    return {{in_q_.data() + lead, bytes},
            {in_dout_.data() + lead, bytes},
            {in_out_.data() + lead, bytes},
            {in_lse_.data() + sb.head_begin * half,
             static_cast<size_t>(p.batch * (sb.head_end - sb.head_begin) * half) * sizeof(double)}};
  }
  Message answer(size_t step, int slot, const Poll& poll) override;
  Message partial_inbox(size_t step) override {
    return {dq_in_.data(), dq_bytes(plan_.steps[step].span)};
  }
  void merge_partial(size_t step) override {
    const int span = plan_.steps[step].span;
    const SpanningBranch& sb = plan_.spans[static_cast<size_t>(span)];
    shard_.add_dq(sb.head_begin, sb.head_end, plan_.split, plan_.half_rows(bp_.fwd), dq_in_.data());
  }
  Message block_grads(size_t step, const void* block, int64_t row_end, const Poll& poll) override;
  Message returned(size_t step) override {
    const RingStep& st = plan_.steps[step];
    return {
        grads_in_[step % 2].data(),
        static_cast<size_t>(plan_.block_elements(bp_.fwd, st.span, plan_.rank)) * sizeof(float)};
  }
  void add_returned(size_t step) override;
  void write_output() override { shard_.write_output(); }

 private:
  size_t dq_bytes(int span) const {
    return static_cast<size_t>(plan_.query_elements(bp_.fwd, span)) * sizeof(float);
  }
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
  // The work of head h's queries (kv head group of task t) for span `span` against keys
  // that `keys(b, h, hb, w)` sets up, the queries kept indices `queries(w)` of them.
  template <typename Keys, typename Queries>
  void span_pass(int span, Keys&& keys, Queries&& queries, const Poll& poll, ShardBackward& shard) {
    const Problem& p = bp_.fwd;
    const int branch = plan_.spans[static_cast<size_t>(span)].branch;
    const int64_t group = p.heads / p.kv_heads;
    shard.pass(
        p.batch * p.kv_heads,
        [&](int64_t t, std::vector<detail::BackwardWork>& works) {
          const int64_t b = t / p.kv_heads, hk = t % p.kv_heads;
          for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
            detail::BackwardWork w{};
            const int hb = p.head_branch(h, branch);
            if (hb < 0 || !keys(b, h, hb, w)) continue;
            const KeptSpan q = queries(w);
            w.tq_begin = q.t_begin;
            w.tq_end = q.t_end;
            works.push_back(w);
          }
        },
        poll);
  }

  const BackwardProblem& bp_;
  const RingPlan& plan_;
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

// The asker's second-half queries against this rank's keys of the span: their dq goes
// back; the gradients of these keys stay here.
Message CpuBackwardShard::answer(size_t step, int slot, const Poll& poll) {
  const int span = plan_.steps[step].span, asker = plan_.steps[step].send_to;
  const Problem& p = bp_.fwd;
  const SpanningBranch& sb = plan_.spans[static_cast<size_t>(span)];
  const int64_t half = plan_.half_rows(p), heads = sb.head_end - sb.head_begin;
  const int64_t split = plan_.split_of(p, asker);
  foreign_.fwd = asker_problem(p, plan_, sb, in_q_.data(), asker);
  foreign_.fwd.out = in_out_.data();
  foreign_.fwd.out_st = foreign_.fwd.q_st;
  foreign_.fwd.lse = nullptr;
  foreign_.fwd.lse_precise = in_lse_.data();
  foreign_.fwd.lse_precise_st = {heads * half, 1, half};
  foreign_.dout = in_dout_.data();
  foreign_.dout_st = foreign_.fwd.q_st;
  foreign_shard_->restart();
  const Branch br = p.branches[static_cast<size_t>(sb.branch)];
  const int64_t seg = split / br.segment;
  span_pass(
      span,
      [&](int64_t b, int64_t h, int hb, detail::BackwardWork& w) {
        return shard_.local_key_work(b, h, hb, seg, w);
      },
      [&](const detail::BackwardWork& w) {
        return kept_span_in_window(seg, br.segment, br.rate, w.offset, split, split + half);
      },
      poll, *foreign_shard_);
  std::vector<float>& dq = dq_out_[slot];
  foreign_shard_->export_dq(sb.head_begin, sb.head_end, dq.data());
  return {dq.data(), dq_bytes(span)};
}

// The local queries before row_end against step e's block: dq here, the block's key
// gradients into a fresh fp32 buffer of its layout.
Message CpuBackwardShard::block_grads(size_t step, const void* block, int64_t row_end,
                                      const Poll& poll) {
  const Problem& p = bp_.fwd;
  const RingStep& st = plan_.steps[step];
  const SpanningBranch& sb = plan_.spans[static_cast<size_t>(st.span)];
  const std::vector<BlockPiece> pieces = plan_.layout(p, st.span, st.recv_from);
  float* g = grads_out_[step % 2].data();
  const size_t g_size = static_cast<size_t>(plan_.block_elements(p, st.span, st.recv_from));
  std::fill_n(g, g_size, 0.0f);
  const int64_t own_end = std::min(row_end, p.shard_begin + p.shard_rows);
  const Branch br = p.branches[static_cast<size_t>(sb.branch)];
  const int64_t seg = p.shard_begin / br.segment;
  span_pass(
      st.span,
      [&](int64_t b, int64_t h, int hb, detail::BackwardWork& w) {
        if (!block_keys(p, sb, pieces, static_cast<const uint8_t*>(block), b, h, hb, w.keys)) {
          return false;
        }
        w.b = b;
        w.h = h;
        w.branch = sb.branch;
        w.offset = p.head_branches[hb].offset;
        w.segment = seg;
        const BlockPiece& x = pieces[static_cast<size_t>(sb.head_stream[h] * p.batch + b)];
        w.dk = g + x.k_offset;
        w.dv = g + x.v_offset;
        w.dk_stride = w.dv_stride = p.head_dim;
        return true;
      },
      [&](const detail::BackwardWork& w) {
        return kept_span_in_window(seg, br.segment, br.rate, w.offset, p.shard_begin, own_end);
      },
      poll, shard_);
  return {g, g_size * sizeof(float)};
}

// Adds the gradients of this rank's keys that step e's receiver sent back.
void CpuBackwardShard::add_returned(size_t step) {
  const Problem& p = bp_.fwd;
  const RingStep& st = plan_.steps[step];
  const SpanningBranch& sb = plan_.spans[static_cast<size_t>(st.span)];
  const Branch br = p.branches[static_cast<size_t>(sb.branch)];
  const std::vector<BlockPiece> pieces = plan_.layout(p, st.span, plan_.rank);
  const int64_t seg_start = p.shard_begin / br.segment * br.segment, D = p.head_dim;
  const float* grads = grads_in_[step % 2].data();
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
  return ring_protocol(p, plan, std::make_unique<CpuForwardShard>(p, plan, options));
}

std::unique_ptr<RingRun> ring_backward(BackwardProblem& bp, const RingPlan& plan,
                                       const ExecOptions& options, bool precise) {
  return with_precise_lse(
      bp, precise, [&](const Problem& f) { return ring_forward(f, plan, options); },
      ring_protocol(bp.fwd, plan, std::make_unique<CpuBackwardShard>(bp, plan, options)));
}

}  // namespace ringattn::cpu
