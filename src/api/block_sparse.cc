// BlockSparseRingDilatedAttention: the plan (which key blocks each rank fetches from which),
// the block exchange over the ring, and the passes on the CPU kernels.
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
#include <string>
#include <utility>
#include <vector>

#include "ringattn/block_sparse.h"
#include "src/backend/backend.h"
#include "src/backend/cpu/attention_cpu.h"
#include "src/base/agreement.h"
#include "src/base/check.h"
#include "src/base/dtype.h"
#include "src/base/fault.h"
#include "src/base/memory.h"
#include "src/plan/problem.h"
#include "src/ring/ring_timing.h"
#if defined(RINGATTN_HAVE_CUDA)
#include "src/backend/cuda/attention_cuda.h"
#include "src/backend/cuda/block_sparse_cuda.h"
#endif

namespace ringattn {

namespace {

using cpu::detail::BackwardWork;
using cpu::detail::KeySource;

// Rows of consecutive key blocks one kernel call takes at most (bounds backward scratch).
constexpr int64_t kRunRows = 1024;

// Key blocks one rank sends another, by kv head. In a message (K/V in the inputs' dtype, or
// their fp32 gradients), the rows of slot i of batch b start at element (b * slots + i) * bs * D
// of the K part; the V part follows the K part.
struct BlockSet {
  std::vector<std::vector<int64_t>> blocks;  // [kv_heads] sorted key blocks
  std::vector<int64_t> base;                 // [kv_heads + 1] first slot of each kv head

  int64_t slots() const { return base.back(); }
  int64_t slot(int64_t hk, int64_t kb) const {
    const std::vector<int64_t>& x = blocks[static_cast<size_t>(hk)];
    return base[static_cast<size_t>(hk)] + (std::lower_bound(x.begin(), x.end(), kb) - x.begin());
  }
};

struct Plan {
  int64_t bs = 0, blocks = 0, local_blocks = 0, group = 1;
  int rank = 0, world = 1;
  bool causal = false;
  std::vector<BlockLayout> layouts;  // one per pattern
  std::vector<size_t> head_layout;   // [heads]
  // Step e (distance e + 1): send to rank + distance what it needs from this rank, receive
  // from rank - distance what this rank needs from it. Empty sets move nothing.
  struct Step {
    int send_to, recv_from, tag;
    BlockSet send, recv;
  };
  std::vector<Step> steps;

  const BlockLayout& layout(int64_t h) const {
    return layouts[head_layout[static_cast<size_t>(h)]];
  }
  int owner(int64_t kb) const { return static_cast<int>(kb / local_blocks); }

  // Calls fn(kb0, count) for the runs of consecutive key blocks that query block qb of head h
  // lists, owned by rank `src` (with causal: kb <= qb), at most kRunRows rows each.
  template <typename Fn>
  void for_each_run(int64_t h, int64_t qb, int src, Fn&& fn) const {
    const BlockLayout& l = layout(h);
    const int64_t max_blocks = std::max<int64_t>(1, kRunRows / bs);
    int64_t kb0 = -1, count = 0;
    for (int64_t i = l.row_ptr[qb]; i < l.row_ptr[qb + 1]; ++i) {
      const int64_t kb = l.cols[static_cast<size_t>(i)];
      if (owner(kb) != src || (causal && kb > qb)) continue;
      if (count > 0 && kb == kb0 + count && count < max_blocks) {
        ++count;
        continue;
      }
      if (count > 0) fn(kb0, count);
      kb0 = kb;
      count = 1;
    }
    if (count > 0) fn(kb0, count);
  }

  // The key blocks owned by `src` that the query blocks of rank `dst` list.
  BlockSet needed(int dst, int src, int64_t kv_heads) const {
    BlockSet s;
    s.blocks.resize(static_cast<size_t>(kv_heads));
    s.base.assign(1, 0);
    std::vector<char> mark(static_cast<size_t>(blocks));
    for (int64_t hk = 0; hk < kv_heads; ++hk) {
      std::fill(mark.begin(), mark.end(), 0);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t qb = dst * local_blocks; qb < (dst + 1) * local_blocks; ++qb) {
          for_each_run(h, qb, src, [&](int64_t kb0, int64_t count) {
            std::fill_n(mark.begin() + kb0, count, 1);
          });
        }
      }
      std::vector<int64_t>& x = s.blocks[static_cast<size_t>(hk)];
      for (int64_t kb = src * local_blocks; kb < (src + 1) * local_blocks; ++kb) {
        if (mark[static_cast<size_t>(kb)]) x.push_back(kb);
      }
      s.base.push_back(s.base.back() + static_cast<int64_t>(x.size()));
    }
    return s;
  }
};

// Checks the configuration against the problem and plans this rank's transfers.
Plan make_plan(const BlockSparseConfig& config, const Problem& p, int rank, int world) {
  Plan plan;
  plan.bs = config.patterns[0].block_size;
  require(config.patterns.size() == 1 || static_cast<int64_t>(config.patterns.size()) == p.heads,
          "BlockSparseConfig has ", config.patterns.size(), " patterns but q has H = ", p.heads,
          " heads; give one pattern (shared by every head) or one per head");
  require(p.shard_rows % plan.bs == 0, "N_loc = ", p.shard_rows,
          " rows per rank is not a multiple of block_size = ", plan.bs,
          "; every rank must hold whole blocks: make N_loc (N = ", world,
          " x N_loc) a multiple of ", plan.bs);
  for (const BlockPattern& pattern : config.patterns) plan.layouts.push_back(pattern.layout(p.seq));
  plan.blocks = p.seq / plan.bs;
  plan.local_blocks = p.shard_rows / plan.bs;
  plan.group = p.heads / p.kv_heads;
  plan.rank = rank;
  plan.world = world;
  plan.causal = config.causal;
  for (int64_t h = 0; h < p.heads; ++h) {
    plan.head_layout.push_back(config.patterns.size() == 1 ? 0 : static_cast<size_t>(h));
  }
  for (int d = 1; d < world; ++d) {
    Plan::Step st{(rank + d) % world, (rank - d + world) % world, d, {}, {}};
    st.send = plan.needed(st.send_to, rank, p.kv_heads);
    st.recv = plan.needed(rank, st.recv_from, p.kv_heads);
    plan.steps.push_back(std::move(st));
  }
  return plan;
}

// What every rank must agree on, field by field: the patterns, shapes and options.
std::vector<AgreedField> agreement_fields(const BlockSparseConfig& c, const Problem& p) {
  std::vector<AgreedField> f = shape_fields(p);
  f.insert(f.begin(), {"causal", {c.causal}});
  f.push_back({"the number of patterns", {static_cast<int64_t>(c.patterns.size())}});
  for (size_t i = 0; i < c.patterns.size(); ++i) {
    const BlockPattern& x = c.patterns[i];
    const std::string name = "patterns[" + std::to_string(i) + "]";
    f.push_back({name + " (kind, block_size, window, global_blocks)",
                 {static_cast<int64_t>(x.kind), x.block_size, x.window, x.global_blocks}});
    f.push_back({name + ".rates", x.rates});
    f.push_back({name + ".row_ptr", x.row_ptr});
    f.push_back({name + ".cols", x.cols});
  }
  return f;
}

// The dilated problem the kernels run: one dense branch over the whole sequence (key index =
// global row), so the shapes, dtypes and strides are validated as for dilated attention.
DilatedConfig dense_config(const BlockSparseConfig& c, const TensorView& q, int world) {
  DilatedConfig d;
  // (make_problem rejects a q.shape[1] that overflows N; until then, any valid length.)
  const int64_t rows = q.shape[1] >= 1 && q.shape[1] <= INT64_MAX / world ? q.shape[1] : 1;
  d.segment_lengths = {world * rows};
  d.dilation_rates = {1};
  d.mode = Mode::kLongNet;
  d.causal = c.causal;
  d.scale = c.scale;
  return d;
}

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
  const Plan& plan;
  const BlockSet* set;
  const uint8_t* k;
  const uint8_t* v;

  KeyBlocks(const Problem& problem, const Plan& pl, const LocalKv& local)
      : p(problem), plan(pl), set(nullptr), k(local.k.data()), v(local.v.data()) {}
  KeyBlocks(const Problem& problem, const Plan& pl, const BlockSet& blocks, const uint8_t* msg)
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
void pack_blocks(const Problem& p, const Plan& plan, const BlockSet& set,
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
int64_t most_part_elements(const Problem& p, const Plan& plan, bool sent) {
  int64_t most = 0;
  for (const Plan::Step& st : plan.steps) {
    const BlockSet& set = sent ? st.send : st.recv;
    if (set.slots() > 0) most = std::max(most, KeyBlocks(p, plan, set, nullptr).part_elements());
  }
  return most;
}

// The K/V block traffic, shared by forward and backward: step e's message lands in one of
// two buffers while the previous one is computed on (double buffering); steps with an empty
// set send or receive nothing. The buffers are made (at the size of the largest message)
// before the ring starts.
class BlockRing {
 public:
  BlockRing(const Problem& p, const Plan& plan) : p_(p), plan_(plan) {
    const size_t esize = dtype_size(p.dtype);
    for (int i = 0; i < 2; ++i) {
      resize_buffer(inbox_[i], 2 * static_cast<size_t>(most_part_elements(p, plan, false)) * esize,
                    "the block-sparse K/V receive buffers");
      resize_buffer(outbox_[i], 2 * static_cast<size_t>(most_part_elements(p, plan, true)) * esize,
                    "the block-sparse K/V send buffers");
    }
  }

  // Posts steps 0 and 1; then receive(e) / release(e) for e = 0, 1, ...
  void start(Communicator& comm, RingStats& stats) {
    comm_ = &comm;
    stats_ = &stats;
    post(0);
    post(1);
  }
  // Waits for step e's blocks (nullptr when the step receives nothing).
  const uint8_t* receive(size_t e) {
    if (plan_.steps[e].recv.slots() == 0) return nullptr;
    wait(recvs_[e % 2], e);
    return inbox_[e % 2].data();
  }
  // Step e is done: its buffers take step e + 2.
  void release(size_t e) {
    wait(sends_[e % 2], e);
    post(e + 2);
  }
  void wait(CommRequest& req, size_t step) { timed_wait(*comm_, req, *stats_, step); }
  void finish() {
    for (CommRequest& req : sends_) wait(req, plan_.steps.size());
  }

 private:
  void post(size_t e) {
    if (e >= plan_.steps.size()) return;
    const Plan::Step& st = plan_.steps[e];
    const size_t esize = dtype_size(p_.dtype);
    if (st.recv.slots() > 0) {
      const size_t bytes =
          2 * static_cast<size_t>(KeyBlocks(p_, plan_, st.recv, nullptr).part_elements()) * esize;
      recvs_[e % 2] = comm_->irecv(inbox_[e % 2].data(), bytes, st.recv_from, st.tag);
    }
    if (st.send.slots() > 0) {
      pack_blocks(p_, plan_, st.send, outbox_[e % 2]);
      sends_[e % 2] =
          comm_->isend(outbox_[e % 2].data(), outbox_[e % 2].size(), st.send_to, st.tag);
      ++stats_->messages_sent;
    }
  }

  const Problem& p_;
  const Plan& plan_;
  Communicator* comm_ = nullptr;
  RingStats* stats_ = nullptr;
  std::vector<uint8_t> inbox_[2], outbox_[2];
  CommRequest sends_[2], recvs_[2];
};

// One forward pass: every local query block of every (batch, head) against the key blocks
// of rank `src` that it lists.
void forward_pass(cpu::ShardForward& shard, const Problem& p, const Plan& plan, int src,
                  const KeyBlocks& keys, const std::function<void()>& poll) {
  const int64_t nbl = plan.local_blocks, first = p.shard_begin / plan.bs;
  shard.pass_rows(
      p.batch * p.heads * nbl,
      [&](int64_t t, const cpu::ShardForward::Attend& attend) {
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
void backward_pass(cpu::ShardBackward& shard, const Problem& p, const Plan& plan, int src,
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

// The backend a call runs on (select_backend); CUDA tensors on one device only (world size 1).
const AttentionBackend& sparse_backend(const TensorView& q, Backend requested, int world) {
  const AttentionBackend& backend = select_backend(requested, q);
  if (backend.device() == Device::kCUDA && world > 1) {
    fail(ErrorCode::kUnsupported, "q lives on a CUDA device but the communicator has ", world,
         " ranks; BlockSparseRingDilatedAttention runs CUDA tensors on one device only in this "
         "version: use a communicator of one rank, or pass host tensors");
  }
  return backend;
}

// One rank of the CPU block-sparse forward: the local K/V copy and the block traffic's
// buffers are made by the constructor (inside the ranks' agreement); run() is the protocol.
class CpuBlockForward {
 public:
  CpuBlockForward(const Problem& p, const Plan& plan, const ExecOptions& options)
      : p_(p), plan_(plan), shard_(p, options), local_(p, options.num_threads), ring_(p, plan) {}

  void run(Communicator& comm, RingStats& stats) {
    const auto poll = [&comm] { comm.progress(); };
    ring_.start(comm, stats);
    forward_pass(shard_, p_, plan_, plan_.rank, KeyBlocks(p_, plan_, local_), poll);
    for (size_t e = 0; e < plan_.steps.size(); ++e) {
      detail::fault_point("ring.step");
      const Plan::Step& st = plan_.steps[e];
      if (const uint8_t* msg = ring_.receive(e)) {
        forward_pass(shard_, p_, plan_, st.recv_from, KeyBlocks(p_, plan_, st.recv, msg), poll);
      }
      ring_.release(e);
    }
    ring_.finish();
    shard_.write_output();
  }

 private:
  const Problem& p_;
  const Plan& plan_;
  cpu::ShardForward shard_;
  const LocalKv local_;
  BlockRing ring_;
};

// One rank of the CPU block-sparse backward, made like CpuBlockForward.
class CpuBlockBackward {
 public:
  CpuBlockBackward(const BackwardProblem& bp, const Plan& plan, const ExecOptions& options)
      : bp_(bp),
        plan_(plan),
        shard_(bp, options, std::max<int64_t>(1, kRunRows / plan.bs) * plan.bs),
        local_(bp.fwd, options.num_threads),
        ring_(bp.fwd, plan),
        grads_in_(plan.steps.size()),
        grads_out_(plan.steps.size()) {
    for (size_t e = 0; e < plan.steps.size(); ++e) {
      const Plan::Step& st = plan.steps[e];
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

  void run(Communicator& comm, RingStats& stats) {
    const Problem& p = bp_.fwd;
    const int world = plan_.world;
    const auto poll = [&comm] { comm.progress(); };
    // The gradients of this rank's blocks come back from every rank they went to (fp32, the
    // message's layout), added in step order at the end. Step e's receive is posted after
    // step e's blocks arrived, so that no wait on a block (which some communicators complete
    // together with everything posted before it) depends on a peer's gradients.
    const size_t steps = plan_.steps.size();
    std::vector<CommRequest> grad_recvs(steps), grad_sends(steps);
    ring_.start(comm, stats);
    backward_pass(shard_, p, plan_, plan_.rank, KeyBlocks(p, plan_, local_), nullptr, poll);
    for (size_t e = 0; e < steps; ++e) {
      detail::fault_point("ring.step");
      const Plan::Step& st = plan_.steps[e];
      const uint8_t* msg = ring_.receive(e);
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
      ring_.release(e);
    }
    for (size_t e = 0; e < steps; ++e) {
      if (plan_.steps[e].send.slots() == 0) continue;
      ring_.wait(grad_recvs[e], e);
      add_returned(plan_.steps[e], grads_in_[e].data());
    }
    for (CommRequest& req : grad_sends) ring_.wait(req, steps);
    ring_.finish();
    shard_.write_output();
  }

 private:
  // Adds the gradients of this rank's blocks `st.send` that their receiver sent back.
  void add_returned(const Plan::Step& st, const float* grads) {
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
  const Plan& plan_;
  cpu::ShardBackward shard_;
  const LocalKv local_;
  BlockRing ring_;
  std::vector<std::vector<float>> grads_in_, grads_out_;
};

constexpr const char* kWhat = "the patterns, shapes and options of BlockSparseRingDilatedAttention";

}  // namespace

BlockSparseRingDilatedAttention::BlockSparseRingDilatedAttention(BlockSparseConfig config,
                                                                 Communicator& comm,
                                                                 ExecOptions options)
    : config_(std::move(config)), comm_(comm), options_(options) {
  check_on_all_ranks(comm_, [&] {
    config_.validate();
    options_.validate();
    require_ring_backend(options_.backend, "BlockSparseRingDilatedAttention");
  });
}

void BlockSparseRingDilatedAttention::forward(const TensorView& q, const TensorView& k,
                                              const TensorView& v, const TensorView& out,
                                              const std::optional<TensorView>& lse) {
  guarded("BlockSparseRingDilatedAttention::forward", [&] {
    const Clock::time_point t_start = Clock::now();
    const int rank = comm_.rank(), world = comm_.size();
    Problem p;
    Device device = Device::kCPU;
    check_on_all_ranks(comm_, [&] {
      const AttentionBackend& backend = sparse_backend(q, options_.backend, world);
      device = backend.device();
      p = make_problem(dense_config(config_, q, world), q, k, v, out, lse, backend.max_head_dim(),
                       backend.name(), Shard{rank, world}, device);
#if defined(RINGATTN_HAVE_CUDA)
      if (device == Device::kCUDA) cuda::check_forward_tensors(q, k, v, out, lse);
#endif
    });
    check_same_on_all_ranks(comm_, kWhat, agreement_fields(config_, p));
    Plan plan;
    std::unique_ptr<CpuBlockForward> cpu;
    check_on_all_ranks(comm_, [&] {
      plan = make_plan(config_, p, rank, world);
      if (device == Device::kCPU) cpu = std::make_unique<CpuBlockForward>(p, plan, options_);
    });

    stats_ = RingStats{};
    const int64_t sent_before = comm_.bytes_sent();
    run_or_abort(comm_, "block-sparse attention", [&] {
#if defined(RINGATTN_HAVE_CUDA)
      if (device == Device::kCUDA) {
        return cuda::block_sparse_forward(
            p, cuda::query_major_csr(plan.layouts, plan.head_layout, p.causal),
            options_.cuda_stream, !options_.cuda_async);
      }
#endif
      cpu->run(comm_, stats_);
    });
    stats_.bytes_sent = comm_.bytes_sent() - sent_before;
    stats_.total_ms = ms_since(t_start);
  });
}

void BlockSparseRingDilatedAttention::backward(const TensorView& dout, const TensorView& q,
                                               const TensorView& k, const TensorView& v,
                                               const TensorView& out, const TensorView& lse,
                                               const TensorView& dq, const TensorView& dk,
                                               const TensorView& dv) {
  guarded("BlockSparseRingDilatedAttention::backward", [&] {
    const Clock::time_point t_start = Clock::now();
    const int rank = comm_.rank(), world = comm_.size();
    BackwardProblem bp;
    Device device = Device::kCPU;
    check_on_all_ranks(comm_, [&] {
      const AttentionBackend& backend = sparse_backend(q, options_.backend, world);
      device = backend.device();
      bp = make_backward_problem(dense_config(config_, q, world), dout, q, k, v, out, lse, dq, dk,
                                 dv, backend.max_head_dim(), backend.name(), Shard{rank, world},
                                 device);
#if defined(RINGATTN_HAVE_CUDA)
      if (device == Device::kCUDA) {
        cuda::check_backward_tensors(dout, q, k, v, out, lse, dq, dk, dv);
      }
#endif
    });
    const Problem& p = bp.fwd;
    check_same_on_all_ranks(comm_, kWhat, agreement_fields(config_, p));
    // An lse too large for its fp32 rounding (kPreciseLse) on any rank: every rank runs the
    // forward again for the lse in double first.
    int64_t precise = device == Device::kCPU && cpu::needs_precise_lse(p) ? 1 : 0;
    comm_.allreduce_max(&precise, 1);
    Plan plan;
    std::unique_ptr<CpuBlockBackward> cpu;
    std::unique_ptr<cpu::PreciseLse> precise_lse;
    std::unique_ptr<CpuBlockForward> again;
    check_on_all_ranks(comm_, [&] {
      plan = make_plan(config_, p, rank, world);
      if (device != Device::kCPU) return;
      cpu = std::make_unique<CpuBlockBackward>(bp, plan, options_);
      if (precise != 0) {
        precise_lse = std::make_unique<cpu::PreciseLse>(p);
        again = std::make_unique<CpuBlockForward>(precise_lse->forward_problem(), plan, options_);
      }
    });

    stats_ = RingStats{};
    const int64_t sent_before = comm_.bytes_sent();
    run_or_abort(comm_, "block-sparse attention", [&] {
#if defined(RINGATTN_HAVE_CUDA)
      if (device == Device::kCUDA) {
        return cuda::block_sparse_backward(
            bp, cuda::query_major_csr(plan.layouts, plan.head_layout, p.causal),
            cuda::key_major_csr(plan.layouts, plan.head_layout, p.causal), options_.cuda_stream,
            !options_.cuda_async);
      }
#endif
      if (again) {
        again->run(comm_, stats_);
        precise_lse->attach(bp.fwd);
      }
      cpu->run(comm_, stats_);
    });
    stats_.bytes_sent = comm_.bytes_sent() - sent_before;
    stats_.total_ms = ms_since(t_start);
  });
}

}  // namespace ringattn
