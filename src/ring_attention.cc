#include "ringattn/ring_attention.h"

#include <cstring>
#include <utility>
#include <vector>

#include "agreement.h"
#include "check.h"
#include "cpu/attention_cpu.h"
#include "cpu/bf16_kernels.h"
#include "index_math.h"
#include "kv_ring.h"
#include "problem.h"
#include "ring_plan.h"
#if defined(RINGATTN_HAVE_CUDA)
#include "cuda/attention_cuda.h"
#include "cuda/ring_cuda.h"
#endif

namespace ringattn {

namespace {

// The configuration, shapes and device every rank must agree on.
std::vector<int64_t> agreement_values(const DilatedConfig& c, const Problem& p, Device device) {
  std::vector<int64_t> v = {static_cast<int64_t>(device),
                            static_cast<int64_t>(c.mode),
                            c.causal,
                            p.batch,
                            p.shard_rows,
                            p.heads,
                            p.kv_heads,
                            p.head_dim,
                            static_cast<int64_t>(p.dtype),
                            c.head_offset,
                            c.total_heads};
  uint32_t scale_bits;
  std::memcpy(&scale_bits, &p.scale, sizeof(scale_bits));
  v.push_back(scale_bits);
  v.push_back(static_cast<int64_t>(c.segment_lengths.size()));
  v.insert(v.end(), c.segment_lengths.begin(), c.segment_lengths.end());
  v.insert(v.end(), c.dilation_rates.begin(), c.dilation_rates.end());
  return v;
}

// Checks that every rank has the same configuration, shapes and device (an error on all
// ranks if not), then plans this rank's transfers.
RingPlan agree_and_plan(Communicator& comm, const DilatedConfig& config, const Problem& p,
                        Device device) {
  check_same_on_all_ranks(comm,
                          "the configuration, shapes and device (host or CUDA) of "
                          "RingDilatedAttention",
                          agreement_values(config, p, device));
  return plan_ring(p, comm.rank(), comm.size());
}

// Copies this rank's kept K/V rows of span `s` into its packed block (layout of RingPlan).
void pack_block(const Problem& p, const RingPlan& plan, int s, std::vector<uint8_t>& block) {
  const SpanningBranch& sb = plan.spans[static_cast<size_t>(s)];
  const Branch br = p.branches[static_cast<size_t>(sb.branch)];
  const std::vector<BlockPiece> pieces = plan.layout(p, s, plan.rank);
  const size_t esize = dtype_size(p.dtype), row_bytes = esize * static_cast<size_t>(p.head_dim);
  block.resize(static_cast<size_t>(plan.block_elements(p, s, plan.rank)) * esize);
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

// The blocks of the CPU ring in host memory: this rank's packed at the start.
class HostKvStore final : public KvStore {
 public:
  HostKvStore(const Problem& p, const RingPlan& plan) : own_(plan.spans.size()) {
    for (size_t s = 0; s < plan.spans.size(); ++s)
      pack_block(p, plan, static_cast<int>(s), own_[s]);
  }
  const void* own(int span) override { return own_[static_cast<size_t>(span)].data(); }
  void* inbox(int slot, size_t bytes) override {
    std::vector<uint8_t>& buf = inbox_[slot];
    buf.resize(bytes);
    return buf.data();
  }

 private:
  std::vector<std::vector<uint8_t>> own_;
  std::vector<uint8_t> inbox_[2];
};

// The key source of head h (head branch hb, batch b) in step e's block (the last received;
// read-only, safe from every thread).
bool block_keys(const KvRing& ring, const Problem& p, const RingPlan& plan, size_t e,
                const uint8_t* block, int64_t b, int64_t h, int hb, cpu::detail::KeySource& src) {
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

// Tags of the four kinds of message of a step: K/V blocks, their gradients, balanced
// queries and the partial results that answer them.
struct Tags {
  int stride;
  int kv(const RingStep& st) const { return st.tag; }
  int grads(const RingStep& st) const { return stride + st.tag; }
  int queries(const RingStep& st) const { return 2 * stride + st.tag; }
  int partial(const RingStep& st) const { return 3 * stride + st.tag; }
};

Tags tags_of(const RingPlan& plan) {
  return {static_cast<int>(plan.spans.size() + 1) * plan.world};
}

// Appends rows [split, end) of heads [h0, h1) of a [B, N_loc, heads, D] view (element size
// `esize`) to `buf` as [B][rows][h1 - h0][D].
void pack_half(const void* base, const Strides3& st, const Problem& p, int64_t split_local,
               int64_t h0, int64_t h1, size_t esize, std::vector<uint8_t>& buf) {
  const size_t row_bytes = esize * static_cast<size_t>(p.head_dim);
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t n = split_local; n < p.shard_rows; ++n) {
      for (int64_t h = h0; h < h1; ++h) {
        const auto* src = static_cast<const uint8_t*>(base) +
                          esize * static_cast<size_t>(b * st.b + n * st.n + h * st.h);
        buf.insert(buf.end(), src, src + row_bytes);
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

#if defined(RINGATTN_HAVE_CUDA)
// The GPU ring forward: the CPU ring's plan and K/V traffic, blocks in device memory, the
// CUDA forward kernel against the local keys and each received block, one merge at the end
// (local partials first, then the steps in order). No causal load balancing.
void forward_cuda(Communicator& comm, const Problem& p, const RingPlan& plan, void* stream,
                  RingStats& stats) {
  cuda::RingShard shard(p, plan, stream);
  KvRing ring(comm, p, plan, stats, shard.store());
  shard.attend_local();
  for (size_t e = 0; e < plan.steps.size(); ++e) {
    if (const void* block = ring.receive(e)) shard.attend_block(e, block);
    comm.progress();
    ring.release(e);
  }
  ring.finish();
  shard.write_output();
}

// The GPU ring backward: the CPU ring's plan and K/V traffic (no causal load balancing),
// the CUDA backward passes against the local keys and each received block; the fp32
// gradients of a received block's keys go back to their owner, which adds them in step
// order (double-buffered, as on the CPU).
void backward_cuda(Communicator& comm, const BackwardProblem& bp, const RingPlan& plan,
                   void* stream, RingStats& stats) {
  const Problem& p = bp.fwd;
  const Tags tags = tags_of(plan);
  cuda::RingBackwardShard shard(bp, plan, stream);
  KvRing ring(comm, p, plan, stats, shard.store());
  const auto grad_bytes = [&](const RingStep& st, int owner) {
    return static_cast<size_t>(plan.block_elements(p, st.span, owner)) * sizeof(float);
  };
  CommRequest grad_sends[2], grad_recvs[2];
  const auto add_returned = [&](size_t e) {
    if (plan.steps[e].send_to < 0) return;
    ring.wait(grad_recvs[e % 2]);
    shard.add_returned(e);
  };
  shard.launch_local();
  for (size_t e = 0; e < plan.steps.size(); ++e) {
    const RingStep& st = plan.steps[e];
    ring.wait(grad_sends[e % 2]);  // step e - 2's gradients have left
    if (st.send_to >= 0) {
      grad_recvs[e % 2] =
          comm.irecv(shard.returned(e), grad_bytes(st, plan.rank), st.send_to, tags.grads(st));
    }
    if (const void* block = ring.receive(e)) {
      grad_sends[e % 2] = comm.isend(shard.block_grads(e, block), grad_bytes(st, st.recv_from),
                                     st.recv_from, tags.grads(st));
      ++stats.messages_sent;
    }
    comm.progress();
    ring.release(e);
    if (e >= 1) add_returned(e - 1);
  }
  if (!plan.steps.empty()) add_returned(plan.steps.size() - 1);
  for (CommRequest& req : grad_sends) ring.wait(req);
  ring.finish();
  shard.write_output();
}
#endif

}  // namespace

RingDilatedAttention::RingDilatedAttention(DilatedConfig config, Communicator& comm,
                                           ExecOptions options)
    : config_(std::move(config)), comm_(comm), options_(options) {
  check_on_all_ranks(comm_, [&] {
    config_.validate();
    require_ring_backend(options_.backend, "RingDilatedAttention");
    if (options_.backend == Backend::kCpu) cpu::resolve_bf16(options_.cpu_bf16);
  });
}

void RingDilatedAttention::forward(const TensorView& q, const TensorView& k, const TensorView& v,
                                   const TensorView& out, const std::optional<TensorView>& lse) {
  const Clock::time_point t_start = Clock::now();
  const int rank = comm_.rank(), world = comm_.size();
  Problem p;
  Device device = Device::kCPU;
  check_on_all_ranks(comm_, [&] {
    device = call_device(options_.backend, q);
    p = make_problem(config_, q, k, v, out, lse, max_head_dim(device), backend_of(device),
                     Shard{rank, world}, device);
#if defined(RINGATTN_HAVE_CUDA)
    if (device == Device::kCUDA) cuda::check_forward_tensors(q, k, v, out, lse);
#endif
  });
  const RingPlan plan = agree_and_plan(comm_, config_, p, device);

  stats_ = RingStats{};
  const int64_t sent_before = comm_.bytes_sent();
#if defined(RINGATTN_HAVE_CUDA)
  if (device == Device::kCUDA) {
    forward_cuda(comm_, p, plan, options_.cuda_stream, stats_);
    stats_.bytes_sent = comm_.bytes_sent() - sent_before;
    stats_.total_ms = ms_since(t_start);
    return;
  }
#endif
  if (plan.steps.empty()) {
    // Nothing crosses the wire (one rank, or every segment inside this rank): the
    // single-device kernel writes the output directly, without the shard's fp32 accumulators.
    cpu::forward(p, options_);
    stats_.total_ms = ms_since(t_start);
    return;
  }
  const size_t esize = dtype_size(p.dtype);
  const Tags tags = tags_of(plan);
  cpu::ShardForward shard(p, options_, plan.split);
  HostKvStore store(p, plan);
  KvRing ring(comm_, p, plan, stats_, store);
  const auto poll = [this] { comm_.progress(); };
  const cpu::detail::KeySourceFn local = cpu::detail::local_keys(p);

  // Balanced spans: this rank's second-half queries go to every rank whose keys it gets.
  const int64_t half = plan.half_rows(p);
  std::vector<std::vector<uint8_t>> my_queries(plan.spans.size());
  std::vector<CommRequest> sends;
  for (const RingStep& st : plan.steps) {
    const SpanningBranch& sb = plan.spans[static_cast<size_t>(st.span)];
    if (!sb.balanced || st.recv_from < 0) continue;
    std::vector<uint8_t>& mine = my_queries[static_cast<size_t>(st.span)];
    if (mine.empty()) {
      pack_half(p.q, p.q_st, p, plan.split - p.shard_begin, sb.head_begin, sb.head_end, esize,
                mine);
    }
    sends.push_back(comm_.isend(mine.data(), mine.size(), st.recv_from, tags.queries(st)));
    ++stats_.messages_sent;
  }
  shard.pass(local, poll);

  std::vector<uint8_t> queries;
  std::vector<float> partial_out[2], partial_in;
  CommRequest partial_sends[2];
  for (size_t e = 0; e < plan.steps.size(); ++e) {
    const RingStep& st = plan.steps[e];
    const SpanningBranch& sb = plan.spans[static_cast<size_t>(st.span)];
    const int64_t heads = sb.head_end - sb.head_begin;
    const size_t partial_size = static_cast<size_t>(p.batch * heads * half * (p.head_dim + 1));
    if (sb.balanced && st.send_to >= 0) {
      // The later rank's second-half queries against this rank's keys.
      queries.resize(
          static_cast<size_t>(sb.head_begin * p.head_dim + plan.query_elements(p, st.span)) *
          esize);
      CommRequest req = comm_.irecv(queries.data() + sb.head_begin * p.head_dim * esize,
                                    queries.size() - sb.head_begin * p.head_dim * esize, st.send_to,
                                    tags.queries(st));
      ring.wait(req);
      const int64_t split = st.send_to * p.shard_rows + p.shard_rows / 2;
      const Problem f = foreign_queries(p, sb, queries.data(), split, half);
      cpu::ShardForward foreign(f, options_);
      foreign.pass(
          [&](int64_t b, int64_t h, int hb, int64_t seg, cpu::detail::KeySource& src) {
            return p.head_branches[hb].branch == sb.branch && local(b, h, hb, seg, src);
          },
          poll);
      std::vector<float>& out_buf = partial_out[e % 2];
      ring.wait(partial_sends[e % 2]);  // the send that used this buffer two steps ago
      out_buf.resize(partial_size);
      foreign.export_rows(sb.head_begin, sb.head_end, out_buf.data());
      partial_sends[e % 2] =
          comm_.isend(out_buf.data(), out_buf.size() * sizeof(float), st.send_to, tags.partial(st));
      ++stats_.messages_sent;
    }
    if (const auto* block = static_cast<const uint8_t*>(ring.receive(e))) {
      shard.pass(
          [&](int64_t b, int64_t h, int hb, int64_t, cpu::detail::KeySource& src) {
            return block_keys(ring, p, plan, e, block, b, h, hb, src);
          },
          poll, sb.balanced ? plan.split : INT64_MAX);
      if (sb.balanced) {
        partial_in.resize(partial_size);
        CommRequest req = comm_.irecv(partial_in.data(), partial_size * sizeof(float), st.recv_from,
                                      tags.partial(st));
        ring.wait(req);
        shard.merge_rows(sb.head_begin, sb.head_end, plan.split, half, partial_in.data());
      }
    }
    ring.release(e);
  }
  for (CommRequest& req : sends) ring.wait(req);
  for (CommRequest& req : partial_sends) ring.wait(req);
  ring.finish();
  shard.write_output();
  stats_.bytes_sent = comm_.bytes_sent() - sent_before;
  stats_.total_ms = ms_since(t_start);
}

void RingDilatedAttention::backward(const TensorView& dout, const TensorView& q,
                                    const TensorView& k, const TensorView& v, const TensorView& out,
                                    const TensorView& lse, const TensorView& dq,
                                    const TensorView& dk, const TensorView& dv) {
  const Clock::time_point t_start = Clock::now();
  const int rank = comm_.rank(), world = comm_.size();
  BackwardProblem bp;
  Device device = Device::kCPU;
  check_on_all_ranks(comm_, [&] {
    device = call_device(options_.backend, q);
    bp = make_backward_problem(config_, dout, q, k, v, out, lse, dq, dk, dv, max_head_dim(device),
                               backend_of(device), Shard{rank, world}, device);
#if defined(RINGATTN_HAVE_CUDA)
    if (device == Device::kCUDA) cuda::check_backward_tensors(dout, q, k, v, out, lse, dq, dk, dv);
#endif
  });
  const Problem& p = bp.fwd;
  const RingPlan plan = agree_and_plan(comm_, config_, p, device);

  stats_ = RingStats{};
  const int64_t sent_before = comm_.bytes_sent();
#if defined(RINGATTN_HAVE_CUDA)
  if (device == Device::kCUDA) {
    backward_cuda(comm_, bp, plan, options_.cuda_stream, stats_);
    stats_.bytes_sent = comm_.bytes_sent() - sent_before;
    stats_.total_ms = ms_since(t_start);
    return;
  }
#endif
  cpu::ShardBackward shard(bp, options_);
  HostKvStore store(p, plan);
  KvRing ring(comm_, p, plan, stats_, store);
  const auto poll = [this] { comm_.progress(); };
  const size_t esize = dtype_size(p.dtype);
  const int64_t half = plan.half_rows(p), D = p.head_dim, group = p.heads / p.kv_heads;
  const Tags tags = tags_of(plan);

  // Balanced spans: this rank's second-half q, dout, out and lse go to every rank whose keys
  // it gets (the order of the four messages is the receiver's order).
  struct Half {
    std::vector<uint8_t> q, dout, out;
    std::vector<float> lse;
  };
  std::vector<Half> mine(plan.spans.size());
  std::vector<CommRequest> sends;
  for (const RingStep& st : plan.steps) {
    const SpanningBranch& sb = plan.spans[static_cast<size_t>(st.span)];
    if (!sb.balanced || st.recv_from < 0) continue;
    Half& m = mine[static_cast<size_t>(st.span)];
    const int64_t split_local = plan.split - p.shard_begin;
    if (m.q.empty()) {
      pack_half(p.q, p.q_st, p, split_local, sb.head_begin, sb.head_end, esize, m.q);
      pack_half(bp.dout, bp.dout_st, p, split_local, sb.head_begin, sb.head_end, esize, m.dout);
      pack_half(p.out, p.out_st, p, split_local, sb.head_begin, sb.head_end, esize, m.out);
      for (int64_t b = 0; b < p.batch; ++b) {
        for (int64_t h = sb.head_begin; h < sb.head_end; ++h) {
          for (int64_t n = split_local; n < p.shard_rows; ++n) {
            m.lse.push_back(p.lse[b * p.lse_st.b + n * p.lse_st.n + h * p.lse_st.h]);
          }
        }
      }
    }
    for (const std::vector<uint8_t>* part : {&m.q, &m.dout, &m.out}) {
      sends.push_back(comm_.isend(part->data(), part->size(), st.recv_from, tags.queries(st)));
    }
    sends.push_back(
        comm_.isend(m.lse.data(), m.lse.size() * sizeof(float), st.recv_from, tags.queries(st)));
    stats_.messages_sent += 4;
  }
  std::vector<uint8_t> in_q, in_dout, in_out;
  std::vector<float> in_lse, dq_out[2], dq_in;
  CommRequest dq_sends[2];
  shard.local_passes(poll);

  // Step e: the gradients of the received keys go back to their owner (fp32, the block's
  // layout), and the gradients of this rank's keys come back from the rank it sent them to.
  // Both are double-buffered; returned gradients are added in step order (deterministic).
  std::vector<float> grads_out[2], grads_in[2];
  CommRequest grad_sends[2], grad_recvs[2];
  auto add_returned = [&](size_t e) {
    const RingStep& st = plan.steps[e];
    if (st.send_to < 0) return;
    ring.wait(grad_recvs[e % 2]);
    const SpanningBranch& sb = plan.spans[static_cast<size_t>(st.span)];
    const Branch br = p.branches[static_cast<size_t>(sb.branch)];
    const std::vector<BlockPiece> pieces = plan.layout(p, st.span, rank);
    const int64_t seg_start = p.shard_begin / br.segment * br.segment;
    for (size_t si = 0; si < sb.streams.size(); ++si) {
      for (int64_t b = 0; b < p.batch; ++b) {
        const BlockPiece& x = pieces[si * static_cast<size_t>(p.batch) + static_cast<size_t>(b)];
        for (int64_t t = x.t_begin; t < x.t_end; ++t) {
          const int64_t row = seg_start + sb.streams[si].offset + t * br.rate - p.shard_begin;
          float* dk_row = shard.dk_row(b, row, sb.streams[si].kv_head);
          float* dv_row = shard.dv_row(b, row, sb.streams[si].kv_head);
          const float* gk = grads_in[e % 2].data() + x.k_offset + (t - x.t_begin) * D;
          const float* gv = grads_in[e % 2].data() + x.v_offset + (t - x.t_begin) * D;
          for (int64_t d = 0; d < D; ++d) {
            dk_row[d] += gk[d];
            dv_row[d] += gv[d];
          }
        }
      }
    }
  };
  for (size_t e = 0; e < plan.steps.size(); ++e) {
    const RingStep& st = plan.steps[e];
    const SpanningBranch& span = plan.spans[static_cast<size_t>(st.span)];
    if (span.balanced && st.send_to >= 0) {
      // The later rank's second-half queries against this rank's keys: dq goes back, the
      // gradients of this rank's keys stay here.
      const int64_t lead = span.head_begin * D, elements = plan.query_elements(p, st.span);
      const int64_t lse_lead = span.head_begin * half;
      const size_t bytes = static_cast<size_t>(elements) * esize;
      for (std::vector<uint8_t>* buf : {&in_q, &in_dout, &in_out}) {
        buf->resize(static_cast<size_t>(lead) * esize + bytes);
      }
      in_lse.resize(
          static_cast<size_t>(lse_lead + p.batch * (span.head_end - span.head_begin) * half));
      CommRequest reqs[4] = {
          comm_.irecv(in_q.data() + lead * esize, bytes, st.send_to, tags.queries(st)),
          comm_.irecv(in_dout.data() + lead * esize, bytes, st.send_to, tags.queries(st)),
          comm_.irecv(in_out.data() + lead * esize, bytes, st.send_to, tags.queries(st)),
          comm_.irecv(in_lse.data() + lse_lead, (in_lse.size() - lse_lead) * sizeof(float),
                      st.send_to, tags.queries(st))};
      for (CommRequest& req : reqs) ring.wait(req);
      const int64_t split = st.send_to * p.shard_rows + p.shard_rows / 2;
      const int64_t heads = span.head_end - span.head_begin;
      BackwardProblem f = bp;
      f.fwd = foreign_queries(p, span, in_q.data(), split, half);
      f.fwd.out = in_out.data();
      f.fwd.out_st = f.fwd.q_st;
      f.fwd.lse = in_lse.data();
      f.fwd.lse_st = {heads * half, 1, half};
      f.dout = in_dout.data();
      f.dout_st = f.fwd.q_st;
      // Its dq goes back to the queries' owner and its keys' gradients into `shard`: none of
      // it lands in this rank's tensors, so it sums in accumulators of its own.
      f.dq = f.dk = f.dv = nullptr;
      cpu::ShardBackward foreign(f, options_);
      const Branch br = p.branches[static_cast<size_t>(span.branch)];
      const int64_t seg = split / br.segment;
      foreign.pass(
          p.batch * p.kv_heads,
          [&](int64_t t, std::vector<cpu::detail::BackwardWork>& works) {
            const int64_t b = t / p.kv_heads, hk = t % p.kv_heads;
            for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
              cpu::detail::BackwardWork w;
              const int hb = p.head_branch(h, span.branch);
              if (hb < 0 || !shard.local_key_work(b, h, hb, seg, w)) continue;
              const KeptSpan theirs =
                  kept_span_in_window(seg, br.segment, br.rate, w.offset, split, split + half);
              w.tq_begin = theirs.t_begin;
              w.tq_end = theirs.t_end;
              works.push_back(w);
            }
          },
          poll);
      std::vector<float>& dq_buf = dq_out[e % 2];
      ring.wait(dq_sends[e % 2]);  // the send that used this buffer two steps ago
      dq_buf.resize(static_cast<size_t>(elements));
      foreign.export_dq(span.head_begin, span.head_end, dq_buf.data());
      dq_sends[e % 2] =
          comm_.isend(dq_buf.data(), dq_buf.size() * sizeof(float), st.send_to, tags.partial(st));
      ++stats_.messages_sent;
    }
    ring.wait(grad_sends[e % 2]);  // step e - 2's returned gradients have left
    if (st.send_to >= 0) {
      std::vector<float>& in = grads_in[e % 2];
      in.resize(static_cast<size_t>(plan.block_elements(p, st.span, rank)));
      grad_recvs[e % 2] =
          comm_.irecv(in.data(), in.size() * sizeof(float), st.send_to, tags.grads(st));
    }
    if (const auto* block = static_cast<const uint8_t*>(ring.receive(e))) {
      const SpanningBranch& sb = plan.spans[static_cast<size_t>(st.span)];
      std::vector<float>& g = grads_out[e % 2];
      g.assign(static_cast<size_t>(plan.block_elements(p, st.span, st.recv_from)), 0.0f);
      // Balanced spans: only the first half's queries here (the key owner does the rest).
      const int64_t own_end = sb.balanced ? plan.split : p.shard_begin + p.shard_rows;
      shard.pass(
          p.batch * p.kv_heads,
          [&](int64_t t, std::vector<cpu::detail::BackwardWork>& works) {
            const int64_t b = t / p.kv_heads, hk = t % p.kv_heads;
            const Branch br = p.branches[static_cast<size_t>(sb.branch)];
            for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
              const int hb = p.head_branch(h, sb.branch);
              cpu::detail::BackwardWork w{
                  b, h, sb.branch, 0, p.shard_begin / br.segment, 0, 0, {}, nullptr, nullptr, D, D};
              if (hb < 0 || !block_keys(ring, p, plan, e, block, b, h, hb, w.keys)) continue;
              w.offset = p.head_branches[hb].offset;
              const KeptSpan own = kept_span_in_window(w.segment, br.segment, br.rate, w.offset,
                                                       p.shard_begin, own_end);
              w.tq_begin = own.t_begin;
              w.tq_end = own.t_end;
              const BlockPiece& x = ring.piece(sb.head_stream[h], b);
              w.dk = g.data() + x.k_offset;
              w.dv = g.data() + x.v_offset;
              works.push_back(w);
            }
          },
          poll);
      grad_sends[e % 2] =
          comm_.isend(g.data(), g.size() * sizeof(float), st.recv_from, tags.grads(st));
      ++stats_.messages_sent;
      if (sb.balanced) {
        dq_in.resize(static_cast<size_t>(plan.query_elements(p, st.span)));
        CommRequest req =
            comm_.irecv(dq_in.data(), dq_in.size() * sizeof(float), st.recv_from, tags.partial(st));
        ring.wait(req);
        shard.add_dq(sb.head_begin, sb.head_end, plan.split, half, dq_in.data());
      }
    }
    ring.release(e);
    if (e >= 1) add_returned(e - 1);
  }
  if (!plan.steps.empty()) add_returned(plan.steps.size() - 1);
  for (CommRequest* req : {&grad_sends[0], &grad_sends[1], &dq_sends[0], &dq_sends[1]}) {
    ring.wait(*req);
  }
  for (CommRequest& req : sends) ring.wait(req);
  ring.finish();
  shard.write_output();
  stats_.bytes_sent = comm_.bytes_sent() - sent_before;
  stats_.total_ms = ms_since(t_start);
}

}  // namespace ringattn
