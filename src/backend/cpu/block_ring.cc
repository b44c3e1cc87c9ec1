// The CPU backend's block-sparse ring (BlockSparseRingDilatedAttention on host tensors).
//
// A rank's query blocks attend first to its own key blocks, then, step by step, to the
// blocks fetched from the rank `distance` earlier; each pass is one online softmax per query
// row over the pass's keys, and the passes are merged (SPEC.md merge) into fp32
// accumulators, which is exactly one softmax over all listed keys.

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "src/backend/cpu/attention_cpu.h"
#include "src/backend/cpu/ring.h"
#include "src/base/dtype.h"
#include "src/base/fault.h"
#include "src/base/memory.h"
#include "src/ring/host_inboxes.h"
#include "src/ring/kv_ring.h"
#include "src/ring/ring_steps.h"

namespace ringattn::cpu {

namespace {

using detail::BackwardWork;
using detail::KeySource;

// This rank's K and V rows as [B][Hkv][N_loc][D] (the inputs' dtype): the kernels read each
// key row once per query block, and contiguous rows stream from memory several times faster
// than rows strided by the heads of a [B, N, Hkv, D] view.
struct LocalKv {
  std::vector<uint8_t> k, v;

  LocalKv(const Problem& p, int num_threads) {
    const size_t esize = dtype_size(p.dtype), row_bytes = esize * static_cast<size_t>(p.head_dim);
    const int64_t rows = p.batch * p.kv_heads * p.shard_rows;
    resize_buffer(k, static_cast<size_t>(rows) * row_bytes, "the block-sparse copy of K");
    resize_buffer(v, k.size(), "the block-sparse copy of V");
#pragma omp parallel for num_threads(num_threads > 0 ? num_threads : omp_get_max_threads())
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t n = i % p.shard_rows, hk = i / p.shard_rows % p.kv_heads;
      const int64_t b = i / p.shard_rows / p.kv_heads;
      std::memcpy(k.data() + static_cast<size_t>(i) * row_bytes,
                  static_cast<const uint8_t*>(p.k) +
                      esize * static_cast<size_t>(b * p.k_st.b + n * p.k_st.n + hk * p.k_st.h),
                  row_bytes);
      std::memcpy(v.data() + static_cast<size_t>(i) * row_bytes,
                  static_cast<const uint8_t*>(p.v) +
                      esize * static_cast<size_t>(b * p.v_st.b + n * p.v_st.n + hk * p.v_st.h),
                  row_bytes);
    }
  }
};

// Where the K/V rows of key blocks from one rank lie: this rank's LocalKv (set = null), or a
// message (K part, then V part).
struct KeyBlocks {
  const Problem& p;
  const BlockSparsePlan& plan;
  const BlockSet* set;
  const uint8_t* k;
  const uint8_t* v;

  KeyBlocks(const Problem& problem, const BlockSparsePlan& pl, const LocalKv& local)
      : p(problem), plan(pl), set(nullptr), k(local.k.data()), v(local.v.data()) {}
  KeyBlocks(const Problem& problem, const BlockSparsePlan& pl, const BlockSet& blocks,
            const uint8_t* msg)
      : p(problem), plan(pl), set(&blocks), k(msg), v(nullptr) {
    if (msg) v = msg + dtype_size(p.dtype) * static_cast<size_t>(part_elements());
  }

  // Elements from the start of the K (or V) part to the first row of block kb of (b, hk).
  int64_t offset(int64_t b, int64_t hk, int64_t kb) const {
    if (set == nullptr) {
      return ((b * p.kv_heads + hk) * p.shard_rows + kb * plan.bs - p.shard_begin) * p.head_dim;
    }
    return (b * set->slots() + set->slot(hk, kb)) * plan.bs * p.head_dim;
  }
  // Elements of the K part of a message.
  int64_t part_elements() const { return p.batch * set->slots() * plan.bs * p.head_dim; }

  // Keys of blocks [kb0, kb0 + count) of kv head hk in batch b.
  KeySource source(int64_t b, int64_t hk, int64_t kb0, int64_t count) const {
    const size_t at = dtype_size(p.dtype) * static_cast<size_t>(offset(b, hk, kb0));
    return {k + at, v + at, p.head_dim, p.head_dim, kb0 * plan.bs, (kb0 + count) * plan.bs};
  }
};

// Copies the K/V rows of `set` (this rank's blocks) into a message.
void pack_blocks(const Problem& p, const BlockSparsePlan& plan, const BlockSet& set,
                 std::vector<uint8_t>& msg) {
  const size_t esize = dtype_size(p.dtype), row_bytes = esize * static_cast<size_t>(p.head_dim);
  const KeyBlocks into(p, plan, set, nullptr);
  msg.resize(2 * static_cast<size_t>(into.part_elements()) * esize);
  const size_t v_part = static_cast<size_t>(into.part_elements()) * esize;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t hk = 0; hk < static_cast<int64_t>(set.blocks.size()); ++hk) {
      for (int64_t kb : set.blocks[static_cast<size_t>(hk)]) {
        const size_t at = static_cast<size_t>(into.offset(b, hk, kb)) * esize;
        for (int64_t r = 0; r < plan.bs; ++r) {
          const int64_t row = kb * plan.bs + r - p.shard_begin;
          const size_t dst = at + static_cast<size_t>(r) * row_bytes;
          std::memcpy(
              msg.data() + dst,
              static_cast<const uint8_t*>(p.k) +
                  esize * static_cast<size_t>(b * p.k_st.b + row * p.k_st.n + hk * p.k_st.h),
              row_bytes);
          std::memcpy(
              msg.data() + v_part + dst,
              static_cast<const uint8_t*>(p.v) +
                  esize * static_cast<size_t>(b * p.v_st.b + row * p.v_st.n + hk * p.v_st.h),
              row_bytes);
        }
      }
    }
  }
}

// The largest K/V message of the plan (in elements of one part, K or V), sent or received.
int64_t most_part_elements(const Problem& p, const BlockSparsePlan& plan, bool sent) {
  int64_t most = 0;
  for (const BlockSparsePlan::Step& st : plan.steps) {
    const BlockSet& set = sent ? st.send : st.recv;
    if (set.slots() > 0) most = std::max(most, KeyBlocks(p, plan, set, nullptr).part_elements());
  }
  return most;
}

// The block-sparse ring's messages in host memory: each step's key blocks packed into one of
// two send buffers when the step is posted, two receive buffers; all at the size of the
// largest message, made before the ring starts.
class BlockStore final : public KvStore {
 public:
  BlockStore(const Problem& p, const BlockSparsePlan& plan)
      : p_(p),
        plan_(plan),
        inboxes_(2 * static_cast<size_t>(most_part_elements(p, plan, false)) * dtype_size(p.dtype),
                 "the block-sparse K/V receive buffers") {
    for (std::vector<uint8_t>& buf : outbox_) {
      resize_buffer(
          buf, 2 * static_cast<size_t>(most_part_elements(p, plan, true)) * dtype_size(p.dtype),
          "the block-sparse K/V send buffers");
    }
  }
  const void* outgoing(size_t step, int slot) override {
    pack_blocks(p_, plan_, plan_.steps[step].send, outbox_[slot]);
    return outbox_[slot].data();
  }
  bool packs_per_step() const override { return true; }
  void* inbox(int slot, size_t bytes) override { return inboxes_.get(slot, bytes); }

 private:
  const Problem& p_;
  const BlockSparsePlan& plan_;
  HostInboxes inboxes_;
  std::vector<uint8_t> outbox_[2];
};

// One forward pass: every local query block of every (batch, head) against the key blocks
// of rank `src` that it lists.
void forward_pass(ShardForward& shard, const Problem& p, const BlockSparsePlan& plan, int src,
                  const KeyBlocks& keys, const std::function<void()>& poll) {
  const int64_t nbl = plan.local_blocks, first = p.shard_begin / plan.bs;
  shard.pass_rows(
      p.batch * p.heads * nbl,
      [&](int64_t t, const ShardForward::Attend& attend) {
        const int64_t qb = first + t % nbl, h = t / nbl % p.heads, b = t / nbl / p.heads;
        std::vector<KeySource> sources;
        plan.for_each_run(h, qb, src, [&](int64_t kb0, int64_t count) {
          sources.push_back(keys.source(b, p.kv_head(h), kb0, count));
        });
        if (sources.empty()) return;
        attend(b, h, qb * plan.bs, (qb + 1) * plan.bs, sources.data(),
               static_cast<int64_t>(sources.size()));
      },
      poll);
}

// One backward pass: tasks (batch, kv head) own dq of their heads and the gradients of their
// keys; inside, heads, query blocks and runs go in order (deterministic). The gradients of
// local keys go to the shard's accumulators, those of a message's keys to `grads` (fp32, the
// message's layout).
void backward_pass(ShardBackward& shard, const Problem& p, const BlockSparsePlan& plan, int src,
                   const KeyBlocks& keys, float* grads, const std::function<void()>& poll) {
  const int64_t first = p.shard_begin / plan.bs, D = p.head_dim;
  shard.pass(
      p.batch * p.kv_heads,
      [&](int64_t t, std::vector<BackwardWork>& works) {
        const int64_t b = t / p.kv_heads, hk = t % p.kv_heads;
        for (int64_t h = hk * plan.group; h < (hk + 1) * plan.group; ++h) {
          for (int64_t qb = first; qb < first + plan.local_blocks; ++qb) {
            plan.for_each_run(h, qb, src, [&](int64_t kb0, int64_t count) {
              BackwardWork w{b,
                             h,
                             0,
                             0,
                             0,
                             qb * plan.bs,
                             (qb + 1) * plan.bs,
                             keys.source(b, hk, kb0, count),
                             nullptr,
                             nullptr,
                             D,
                             D};
              if (grads == nullptr) {
                shard.key_grads(w, b, kb0 * plan.bs - p.shard_begin, hk, 1);
              } else {
                w.dk = grads + keys.offset(b, hk, kb0);
                w.dv = w.dk + keys.part_elements();
              }
              works.push_back(w);
            });
          }
        }
      },
      poll);
}

// One rank of the CPU block-sparse forward: the local K/V copy and the block traffic's
// buffers are made by the constructor (inside the ranks' agreement); run() is the protocol.
class CpuBlockForward final : public RingRun {
 public:
  CpuBlockForward(const Problem& p, const BlockSparsePlan& plan, const ExecOptions& options)
      : p_(p), plan_(plan), shard_(p, options), local_(p, options.num_threads), store_(p, plan) {}

  void run(Communicator& comm, RingStats& stats) override {
    const auto poll = [&comm] { comm.progress(); };
    KvRing ring(comm, block_transfers(p_, plan_), stats, store_);
    forward_pass(shard_, p_, plan_, plan_.rank, KeyBlocks(p_, plan_, local_), poll);
    for (size_t e = 0; e < plan_.steps.size(); ++e) {
      ringattn::detail::fault_point("ring.step");
      const BlockSparsePlan::Step& st = plan_.steps[e];
      if (ring.receives(e)) {
        const auto* msg = static_cast<const uint8_t*>(ring.receive(e));
        forward_pass(shard_, p_, plan_, st.recv_from, KeyBlocks(p_, plan_, st.recv, msg), poll);
      }
      ring.release(e);
    }
    ring.finish();
    shard_.write_output();
  }

 private:
  const Problem& p_;
  const BlockSparsePlan& plan_;
  ShardForward shard_;
  const LocalKv local_;
  BlockStore store_;
};

// One rank of the CPU block-sparse backward, made like CpuBlockForward.
class CpuBlockBackward final : public RingRun {
 public:
  CpuBlockBackward(const BackwardProblem& bp, const BlockSparsePlan& plan,
                   const ExecOptions& options)
      : bp_(bp),
        plan_(plan),
        shard_(bp, options, std::max<int64_t>(1, kRunRows / plan.bs) * plan.bs),
        local_(bp.fwd, options.num_threads),
        store_(bp.fwd, plan),
        grads_in_(plan.steps.size()),
        grads_out_(plan.steps.size()) {
    for (size_t e = 0; e < plan.steps.size(); ++e) {
      const BlockSparsePlan::Step& st = plan.steps[e];
      if (st.send.slots() > 0) {
        resize_buffer(
            grads_in_[e],
            2 * static_cast<size_t>(KeyBlocks(bp.fwd, plan, st.send, nullptr).part_elements()),
            "the block-sparse returned fp32 K/V gradients");
      }
      if (st.recv.slots() > 0) {
        resize_buffer(
            grads_out_[e],
            2 * static_cast<size_t>(KeyBlocks(bp.fwd, plan, st.recv, nullptr).part_elements()),
            "the block-sparse fp32 K/V gradients");
      }
    }
  }

  void run(Communicator& comm, RingStats& stats) override {
    const Problem& p = bp_.fwd;
    const int world = plan_.world;
    const auto poll = [&comm] { comm.progress(); };
    // The gradients of this rank's blocks come back from every rank they went to (fp32, the
    // message's layout), added in step order at the end. Step e's receive is posted after
    // step e's blocks arrived, so that no wait on a block (which some communicators complete
    // together with everything posted before it) depends on a peer's gradients.
    const size_t steps = plan_.steps.size();
    std::vector<CommRequest> grad_recvs(steps), grad_sends(steps);
    KvRing ring(comm, block_transfers(p, plan_), stats, store_);
    backward_pass(shard_, p, plan_, plan_.rank, KeyBlocks(p, plan_, local_), nullptr, poll);
    for (size_t e = 0; e < steps; ++e) {
      ringattn::detail::fault_point("ring.step");
      const BlockSparsePlan::Step& st = plan_.steps[e];
      const auto* msg = ring.receives(e) ? static_cast<const uint8_t*>(ring.receive(e)) : nullptr;
      if (st.send.slots() > 0) {
        grad_recvs[e] = comm.irecv(grads_in_[e].data(), grads_in_[e].size() * sizeof(float),
                                   st.send_to, world + st.tag);
      }
      if (msg != nullptr) {
        const KeyBlocks keys(p, plan_, st.recv, msg);
        std::fill(grads_out_[e].begin(), grads_out_[e].end(), 0.0f);
        backward_pass(shard_, p, plan_, st.recv_from, keys, grads_out_[e].data(), poll);
        grad_sends[e] = comm.isend(grads_out_[e].data(), grads_out_[e].size() * sizeof(float),
                                   st.recv_from, world + st.tag);
        ++stats.messages_sent;
      }
      ring.release(e);
    }
    for (size_t e = 0; e < steps; ++e) {
      if (plan_.steps[e].send.slots() == 0) continue;
      ring.wait(grad_recvs[e], e);
      add_returned(plan_.steps[e], grads_in_[e].data());
    }
    for (CommRequest& req : grad_sends) ring.wait(req, steps);
    ring.finish();
    shard_.write_output();
  }

 private:
  // Adds the gradients of this rank's blocks `st.send` that their receiver sent back.
  void add_returned(const BlockSparsePlan::Step& st, const float* grads) {
    const Problem& p = bp_.fwd;
    const int64_t D = p.head_dim;
    const KeyBlocks from(p, plan_, st.send, nullptr);
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t hk = 0; hk < p.kv_heads; ++hk) {
        for (int64_t kb : st.send.blocks[static_cast<size_t>(hk)]) {
          const float* gk = grads + from.offset(b, hk, kb);
          const float* gv = gk + from.part_elements();
          for (int64_t r = 0; r < plan_.bs; ++r) {
            float* dk_row = shard_.dk_row(b, kb * plan_.bs + r - p.shard_begin, hk);
            float* dv_row = shard_.dv_row(b, kb * plan_.bs + r - p.shard_begin, hk);
            for (int64_t d = 0; d < D; ++d) {
              dk_row[d] += gk[r * D + d];
              dv_row[d] += gv[r * D + d];
            }
          }
        }
      }
    }
  }

  const BackwardProblem& bp_;
  const BlockSparsePlan& plan_;
  ShardBackward shard_;
  const LocalKv local_;
  BlockStore store_;
  std::vector<std::vector<float>> grads_in_, grads_out_;
};

}  // namespace

std::unique_ptr<RingRun> sparse_forward(const Problem& p, const BlockSparsePlan& plan,
                                        const ExecOptions& options) {
  return std::make_unique<CpuBlockForward>(p, plan, options);
}

std::unique_ptr<RingRun> sparse_backward(BackwardProblem& bp, const BlockSparsePlan& plan,
                                         const ExecOptions& options, bool precise) {
  return with_precise_lse(
      bp, precise,
      [&](const Problem& f) { return std::make_unique<CpuBlockForward>(f, plan, options); },
      std::make_unique<CpuBlockBackward>(bp, plan, options));
}

}  // namespace ringattn::cpu
