#include "ringattn/ring_attention.h"

#include <chrono>
#include <cstring>
#include <utility>
#include <vector>

#include "agreement.h"
#include "check.h"
#include "cpu/attention_cpu.h"
#include "problem.h"
#include "ring_plan.h"

namespace ringattn {

namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// The configuration and shapes every rank must agree on.
std::vector<int64_t> agreement_values(const DilatedConfig& c, const Problem& p) {
  std::vector<int64_t> v = {static_cast<int64_t>(c.mode),
                            c.causal,
                            p.batch,
                            p.shard_rows,
                            p.heads,
                            p.kv_heads,
                            p.head_dim,
                            static_cast<int64_t>(p.dtype)};
  uint32_t scale_bits;
  std::memcpy(&scale_bits, &p.scale, sizeof(scale_bits));
  v.push_back(scale_bits);
  v.push_back(static_cast<int64_t>(c.segment_lengths.size()));
  v.insert(v.end(), c.segment_lengths.begin(), c.segment_lengths.end());
  v.insert(v.end(), c.dilation_rates.begin(), c.dilation_rates.end());
  return v;
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

}  // namespace

RingDilatedAttention::RingDilatedAttention(DilatedConfig config, Communicator& comm,
                                           ExecOptions options)
    : config_(std::move(config)), comm_(comm), options_(options) {
  check_on_all_ranks(comm_, [&] {
    config_.validate();
    if (options_.backend != Backend::kCpu) {
      fail(ErrorCode::kUnsupported, "backend = ", backend_name(options_.backend),
           " cannot run RingDilatedAttention; use backend = cpu");
    }
  });
}

void RingDilatedAttention::forward(const TensorView& q, const TensorView& k, const TensorView& v,
                                   const TensorView& out, const std::optional<TensorView>& lse) {
  const Clock::time_point t_start = Clock::now();
  const int rank = comm_.rank(), world = comm_.size();
  Problem p;
  check_on_all_ranks(comm_, [&] {
    p = make_problem(config_, q, k, v, out, lse, cpu::kMaxHeadDim, "cpu", Shard{rank, world});
  });
  check_same_on_all_ranks(comm_, "the configuration and shapes of RingDilatedAttention",
                          agreement_values(config_, p));
  const RingPlan plan = plan_ring(p, rank, world);

  cpu::ShardForward shard(p, options_.num_threads);
  const size_t esize = dtype_size(p.dtype);
  std::vector<std::vector<uint8_t>> own(plan.spans.size());
  for (size_t s = 0; s < plan.spans.size(); ++s) pack_block(p, plan, static_cast<int>(s), own[s]);

  // Double-buffered receives: step e lands in inbox[e % 2] while step e - 1 is computed.
  std::vector<uint8_t> inbox[2];
  std::vector<CommRequest> sends, recvs(plan.steps.size());
  const int64_t sent_before = comm_.bytes_sent();
  stats_ = RingStats{};
  auto post = [&](size_t e) {
    if (e >= plan.steps.size()) return;
    const RingStep& st = plan.steps[e];
    if (st.recv_from >= 0) {
      std::vector<uint8_t>& buf = inbox[e % 2];
      buf.resize(static_cast<size_t>(plan.block_elements(p, st.span, st.recv_from)) * esize);
      recvs[e] = comm_.irecv(buf.data(), buf.size(), st.recv_from, st.tag);
    }
    if (st.send_to >= 0) {
      const std::vector<uint8_t>& blk = own[static_cast<size_t>(st.span)];
      sends.push_back(comm_.isend(blk.data(), blk.size(), st.send_to, st.tag));
      ++stats_.messages_sent;
    }
  };
  auto wait = [&](CommRequest& req) {
    const Clock::time_point t0 = Clock::now();
    comm_.wait(req);
    stats_.comm_wait_ms += ms_since(t0);
  };

  post(0);
  post(1);
  const auto poll = [this] { comm_.progress(); };
  shard.pass(cpu::detail::local_keys(p), poll);
  for (size_t e = 0; e < plan.steps.size(); ++e) {
    const RingStep& st = plan.steps[e];
    if (st.recv_from >= 0) {
      wait(recvs[e]);
      const SpanningBranch& sb = plan.spans[static_cast<size_t>(st.span)];
      const std::vector<BlockPiece> pieces = plan.layout(p, st.span, st.recv_from);
      const uint8_t* base = inbox[e % 2].data();
      shard.pass(
          [&](int64_t b, int64_t h, int hb, int64_t, cpu::detail::KeySource& src) {
            if (p.head_branches[hb].branch != sb.branch) return false;
            const BlockPiece& x = pieces[static_cast<size_t>(sb.head_stream[h] * p.batch + b)];
            if (x.t_end == x.t_begin) return false;
            src = {base + esize * static_cast<size_t>(x.k_offset),
                   base + esize * static_cast<size_t>(x.v_offset),
                   p.head_dim,
                   p.head_dim,
                   x.t_begin,
                   x.t_end};
            return true;
          },
          poll);
    }
    post(e + 2);
  }
  for (CommRequest& req : sends) wait(req);
  shard.write_output();
  stats_.bytes_sent = comm_.bytes_sent() - sent_before;
  stats_.total_ms = ms_since(t_start);
}

}  // namespace ringattn
