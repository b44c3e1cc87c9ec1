// The GPU ring shards of one rank (the verbs of src/ring/ring_protocol.h on device memory):
// K/V blocks packed by a kernel that gathers the kept rows of each stream; forward: the
// forward kernel of forward.cu over the local keys, each received block and the balanced
// queries a rank answers, each launch's partials merged at once into fp32 row accumulators
// (so memory stays O(N / P)); backward: the passes of backward.cu over the same, the
// gradients of each received block's keys in fp32 buffers of the block's layout.

#include <algorithm>

#include "src/backend/cuda/ring_cuda.h"
#include "src/backend/cuda/runtime.h"
#include "src/plan/gpu_tasks.h"

namespace ringattn::cuda {

namespace {

// Copies the rows of run blockIdx.y (CopyRun, in `units` 2-byte units per element).
__global__ void __launch_bounds__(kThreads)
    copy_kernel(const CopyRun* runs, const uint16_t* src, uint16_t* dst, int64_t row_units,
                int64_t units) {
  const CopyRun run = runs[blockIdx.y];
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
       idx < run.rows * row_units; idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t t = idx / row_units, u = idx % row_units;
    dst[(run.dst + t * run.dst_t) * units + u] = src[(run.src + t * run.src_t) * units + u];
  }
}

// Blocks in device memory: this rank's packed once at the start, two incoming buffers.
class DeviceKvStore final : public KvStore {
 public:
  DeviceKvStore(const Problem& p, const RingPlan& plan, cudaStream_t stream)
      : plan_(plan), stream_(stream) {
    const size_t esize = dtype_size(p.dtype);
    for (int s = 0; s < static_cast<int>(plan.spans.size()); ++s) {
      own_.emplace_back(static_cast<size_t>(plan.block_elements(p, s, plan.rank)) * esize, stream);
      const std::vector<PackRun> runs = pack_runs(p, plan, s, p.k_st, p.v_st);
      launch_copy(block_copies(runs, false, p.head_dim, true), p.k, own_.back().as<void>(),
                  p.head_dim, esize, stream);
      launch_copy(block_copies(runs, true, p.head_dim, true), p.v, own_.back().as<void>(),
                  p.head_dim, esize, stream);
    }
    // Both inboxes at the size of the largest block this rank receives.
    const size_t most = static_cast<size_t>(plan.most_received_elements(p)) * esize;
    for (int slot = 0; slot < 2; ++slot) {
      inbox_[slot] = std::make_unique<DeviceBuffer>(most, stream);
      RA_CUDA_CHECK(cudaEventCreateWithFlags(&read_[slot], cudaEventDisableTiming));
      inbox_bytes_[slot] = most;
    }
    // The communicator reads the blocks from other streams (or through host staging), and
    // writes the inboxes from them.
    RA_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  ~DeviceKvStore() override {
    for (cudaEvent_t e : read_) {
      if (e != nullptr) (void)cudaEventDestroy(e);
    }
  }
  DeviceKvStore(const DeviceKvStore&) = delete;
  DeviceKvStore& operator=(const DeviceKvStore&) = delete;

  const void* outgoing(size_t step, int) override {
    return own_[static_cast<size_t>(plan_.steps[step].span)].as<void>();
  }
  void* inbox(int slot, size_t bytes) override {
    if (bytes > inbox_bytes_[slot]) {
      fail(ErrorCode::kInternal, "the GPU ring's receive buffer holds ", inbox_bytes_[slot],
           " bytes, but a block of ", bytes, " bytes arrives");
    }
    // The kernels that read this buffer (done_reading recorded them) finish before it is
    // written again; later work on the stream goes on.
    if (recorded_[slot]) RA_CUDA_CHECK(cudaEventSynchronize(read_[slot]));
    return inbox_[slot]->as<void>();
  }
  void done_reading(int slot) override {
    RA_CUDA_CHECK(cudaEventRecord(read_[slot], stream_));
    recorded_[slot] = true;
  }

 private:
  const RingPlan& plan_;
  cudaStream_t stream_;
  std::vector<DeviceBuffer> own_;  // per span
  std::unique_ptr<DeviceBuffer> inbox_[2];
  size_t inbox_bytes_[2] = {0, 0};
  cudaEvent_t read_[2] = {nullptr, nullptr};
  bool recorded_[2] = {false, false};
};

// fp32 rows [B][rows][heads][D] of O and [B][rows][heads] of lse from `base`, heads from h0.
RowsF32 rows_at(float* base, int64_t batch, int64_t rows, int64_t heads, int64_t head_dim,
                int64_t h0) {
  return {base,
          base + batch * rows * heads * head_dim,
          {rows * heads * head_dim, heads * head_dim, head_dim},
          {rows * heads, heads, 1},
          h0};
}

// Packs the rows [split, end) of heads [h0, h1) of a tensor (`element_bytes` each, rows of
// `row` elements, strides st) into `dst` (asker_problem's layout).
void pack_half(const Problem& p, const RingPlan& plan, const void* src, const Strides3& st,
               const SpanningBranch& sb, int64_t row, size_t element_bytes, DeviceBuffer& dst,
               cudaStream_t stream) {
  launch_copy(half_runs(p, plan, st, sb.head_begin, sb.head_end, row), src, dst.as<void>(), row,
              element_bytes, stream);
}

std::vector<DeviceBuffer> buffers(const std::vector<int64_t>& bytes, cudaStream_t stream) {
  std::vector<DeviceBuffer> out;
  for (int64_t b : bytes) out.emplace_back(static_cast<size_t>(b), stream);
  return out;
}

// One rank's forward shard of the GPU ring: everything is planned (plan_gpu_ring_forward) and
// allocated (gpu_ring_memory's buffers) when it is made.
class GpuForwardShard final : public ForwardRingShard {
 public:
  GpuForwardShard(const Problem& p, const RingPlan& plan, cudaStream_t stream)
      : p_(p),
        plan_(plan),
        stream_(stream),
        store_(p, plan, stream),
        f_(plan_gpu_ring_forward(p, plan, forward_tile_rows(p))),
        bal_(gpu_forward_balance(p, plan)),
        acc_(bytes(p.batch * p.shard_rows * p.heads * (p.head_dim + 1)), stream),
        part_(bytes(f_.partial_rows * (p.head_dim + 1)), stream),
        own_(buffers(bal_.own_part, stream)),
        inbox_(static_cast<size_t>(bal_.inbox_part), stream),
        partial_out_(buffers({bal_.partial_out, bal_.partial_out}, stream)),
        partial_in_(static_cast<size_t>(bal_.partial_in), stream) {
    for (size_t s = 0; s < plan.spans.size(); ++s) {
      if (bal_.own_part[s] == 0) continue;
      pack_half(p, plan, p.q, p.q_st, plan.spans[s], p.head_dim, dtype_size(p.dtype), own_[s],
                stream);
    }
    // The communicator reads and writes these from other streams (or through the host).
    RA_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  KvStore& store() override { return store_; }
  void attend_local(const Poll&) override { attend(f_.local, p_.k, p_.v, true); }
  // (The plan's block lists stop at the split already.)
  void attend_block(size_t step, const void* block, int64_t, const Poll&) override {
    attend(f_.block[step], block, block, false);
  }
  std::vector<Message> own_queries(size_t step) override {
    const size_t span = static_cast<size_t>(plan_.steps[step].span);
    return {{own_[span].as<void>(), static_cast<size_t>(bal_.own_part[span])}};
  }
  std::vector<Message> query_inbox(size_t step) override {
    const int span = plan_.steps[step].span;
    const int64_t lead = plan_.spans[static_cast<size_t>(span)].head_begin * p_.head_dim;
    const size_t esize = dtype_size(p_.dtype);
    return {{inbox_.as<char>() + static_cast<size_t>(lead) * esize,
             static_cast<size_t>(plan_.query_elements(p_, span)) * esize}};
  }
  Message answer(size_t step, int slot, const Poll&) override {
    const RingStep& st = plan_.steps[step];
    const SpanningBranch& sb = plan_.spans[static_cast<size_t>(st.span)];
    const Problem asker = asker_problem(p_, plan_, sb, inbox_.as<void>(), st.send_to);
    const TaskList& list = f_.answer[step];
    launch_forward(asker, list, p_.k, p_.v, part_o(), part_lse(), stream_);
    const RowsF32 dst = partial_rows(partial_out_[static_cast<size_t>(slot)], sb);
    MergeSpec m = list_merge(list);
    m.dst = &dst;
    m.rows = asker.shard_rows;
    m.row0 = asker.shard_begin;
    m.head_lo = sb.head_begin;
    m.head_hi = sb.head_end;
    launch_merge(asker, m, stream_);
    RA_CUDA_CHECK(cudaStreamSynchronize(stream_));  // complete before the send reads it
    return {partial_out_[static_cast<size_t>(slot)].as<void>(),
            static_cast<size_t>(gpu_partial_bytes(p_, plan_, st.span))};
  }
  Message partial_inbox(size_t step) override {
    return {partial_in_.as<void>(),
            static_cast<size_t>(gpu_partial_bytes(p_, plan_, plan_.steps[step].span))};
  }
  void merge_partial(size_t step) override {
    const SpanningBranch& sb = plan_.spans[static_cast<size_t>(plan_.steps[step].span)];
    const int64_t split_local = plan_.split - p_.shard_begin;
    RowsF32 acc = acc_rows();
    acc.o += split_local * acc.o_st.n;
    acc.lse += split_local * acc.lse_st.n;
    MergeSpec m;
    m.in = {acc, partial_rows(partial_in_, sb)};
    m.dst = &acc;
    m.rows = plan_.half_rows(p_);
    m.row0 = plan_.split;
    m.head_lo = sb.head_begin;
    m.head_hi = sb.head_end;
    launch_merge(p_, m, stream_);
    RA_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the inbox is free again
  }
  void write_output() override {
    MergeSpec m;
    m.in = {acc_rows()};
    launch_merge(p_, m, stream_);
    RA_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

 private:
  static size_t bytes(int64_t floats) { return static_cast<size_t>(floats) * sizeof(float); }
  float* part_o() const { return part_.as<float>(); }
  float* part_lse() const { return part_.as<float>() + f_.partial_rows * p_.head_dim; }
  RowsF32 acc_rows() const {
    return rows_at(acc_.as<float>(), p_.batch, p_.shard_rows, p_.heads, p_.head_dim, 0);
  }
  // A balanced span's partial result in `buf` ([B][half][heads of sb][D + 1]).
  RowsF32 partial_rows(const DeviceBuffer& buf, const SpanningBranch& sb) const {
    return rows_at(buf.as<float>(), p_.batch, plan_.half_rows(p_), sb.head_end - sb.head_begin,
                   p_.head_dim, sb.head_begin);
  }
  MergeSpec list_merge(const TaskList& list) const {
    MergeSpec m;
    m.list = &list;
    m.part_o = part_o();
    m.part_lse = part_lse();
    return m;
  }
  // The local queries of `list` against the keys and values at k and v (the base pointers
  // of its row sources), merged into the row accumulators (the first launch writes every
  // row).
  void attend(const TaskList& list, const void* k, const void* v, bool first) {
    launch_forward(p_, list, k, v, part_o(), part_lse(), stream_);
    const RowsF32 acc = acc_rows();
    MergeSpec m = list_merge(list);
    if (!first) m.in = {acc};
    m.dst = &acc;
    launch_merge(p_, m, stream_);
  }

  const Problem& p_;
  const RingPlan& plan_;
  cudaStream_t stream_;
  DeviceKvStore store_;
  GpuRingForwardPlan f_;
  GpuBalanceBytes bal_;
  DeviceBuffer acc_;   // [B][N_loc][H][D] O, then [B][N_loc][H] lse
  DeviceBuffer part_;  // the partials of one launch: [rows][D] O, then [rows] lse
  std::vector<DeviceBuffer> own_;
  DeviceBuffer inbox_;
  std::vector<DeviceBuffer> partial_out_;
  DeviceBuffer partial_in_;
};

// One rank's backward shard of the GPU ring, made like GpuForwardShard
// (gpu_ring_backward_memory's buffers).
class GpuBackwardShard final : public BackwardRingShard {
 public:
  GpuBackwardShard(const BackwardProblem& bp, const RingPlan& plan, cudaStream_t stream)
      : bp_(bp),
        p_(bp.fwd),
        plan_(plan),
        stream_(stream),
        store_(bp.fwd, plan, stream),
        shard_(bp, stream),
        bal_(gpu_balance_bytes(bp.fwd, plan, sizeof(float), gpu_dq_bytes(bp.fwd, plan))),
        sent_(buffers({fp32_bytes(plan.most_received_elements(p_)),
                       fp32_bytes(plan.most_received_elements(p_))},
                      stream)),
        returned_(buffers(
            {fp32_bytes(plan.most_sent_elements(p_)), fp32_bytes(plan.most_sent_elements(p_))},
            stream)),
        stats_(plan.answers() ? 2 * static_cast<size_t>(p_.batch * plan.half_rows(p_) * p_.heads) *
                                    sizeof(float)
                              : 0,
               stream),
        own_q_(buffers(bal_.own_part, stream)),
        own_dout_(buffers(bal_.own_part, stream)),
        own_out_(buffers(bal_.own_part, stream)),
        own_lse_(buffers(bal_.own_lse, stream)),
        inbox_(
            buffers({bal_.inbox_part, bal_.inbox_part, bal_.inbox_part, bal_.inbox_lse}, stream)),
        partial_out_(buffers({bal_.partial_out, bal_.partial_out}, stream)),
        partial_in_(static_cast<size_t>(bal_.partial_in), stream) {
    const size_t esize = dtype_size(p_.dtype);
    for (size_t s = 0; s < plan.spans.size(); ++s) {
      if (bal_.own_part[s] == 0) continue;
      const SpanningBranch& sb = plan.spans[s];
      pack_half(p_, plan, p_.q, p_.q_st, sb, p_.head_dim, esize, own_q_[s], stream);
      pack_half(p_, plan, bp.dout, bp.dout_st, sb, p_.head_dim, esize, own_dout_[s], stream);
      pack_half(p_, plan, p_.out, p_.out_st, sb, p_.head_dim, esize, own_out_[s], stream);
      pack_half(p_, plan, p_.lse, p_.lse_st, sb, 1, sizeof(float), own_lse_[s], stream);
    }
    // Allocated and packed before the communicator uses them from another stream or the host.
    RA_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  KvStore& store() override { return store_; }
  void attend_local(const Poll&) override { shard_.local_passes(); }
  Message block_grads(size_t step, const void* block, int64_t row_end, const Poll&) override {
    const RingStep& st = plan_.steps[step];
    DeviceBuffer& grads = sent_[step % 2];
    shard_.block_pass(plan_, st.span, st.recv_from, block, grads.as<float>(), row_end);
    RA_CUDA_CHECK(cudaStreamSynchronize(stream_));  // complete before the send reads it
    return {grads.as<void>(), block_grad_bytes(st, st.recv_from)};
  }
  Message returned(size_t step) override {
    // add_returned(step - 2), which read this buffer, is done before it is written again.
    RA_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return {returned_[step % 2].as<void>(), block_grad_bytes(plan_.steps[step], plan_.rank)};
  }
  void add_returned(size_t step) override {
    shard_.add_returned(plan_, plan_.steps[step].span, returned_[step % 2].as<float>());
  }
  std::vector<Message> own_queries(size_t step) override {
    const size_t s = static_cast<size_t>(plan_.steps[step].span);
    const size_t part = static_cast<size_t>(bal_.own_part[s]);
    return {{own_q_[s].as<void>(), part},
            {own_dout_[s].as<void>(), part},
            {own_out_[s].as<void>(), part},
            {own_lse_[s].as<void>(), static_cast<size_t>(bal_.own_lse[s])}};
  }
  std::vector<Message> query_inbox(size_t step) override {
    const int span = plan_.steps[step].span;
    const SpanningBranch& sb = plan_.spans[static_cast<size_t>(span)];
    const size_t esize = dtype_size(p_.dtype);
    const size_t lead = static_cast<size_t>(sb.head_begin * p_.head_dim) * esize;
    const size_t bytes = static_cast<size_t>(plan_.query_elements(p_, span)) * esize;
    const size_t lse =
        static_cast<size_t>(p_.batch * plan_.half_rows(p_) * (sb.head_end - sb.head_begin)) *
        sizeof(float);
    std::vector<Message> in;
    for (size_t i = 0; i < 3; ++i) in.push_back({inbox_[i].as<char>() + lead, bytes});
    in.push_back({inbox_[3].as<float>() + sb.head_begin, lse});
    return in;
  }
  Message answer(size_t step, int slot, const Poll&) override {
    const RingStep& st = plan_.steps[step];
    const SpanningBranch& sb = plan_.spans[static_cast<size_t>(st.span)];
    BackwardProblem asker = bp_;
    asker.fwd = asker_problem(p_, plan_, sb, inbox_[0].as<void>(), st.send_to);
    asker.fwd.out = inbox_[2].as<void>();
    asker.fwd.out_st = asker.fwd.q_st;
    const int64_t heads = sb.head_end - sb.head_begin;
    asker.fwd.lse = inbox_[3].as<float>();
    asker.fwd.lse_st = {plan_.half_rows(p_) * heads, heads, 1};
    asker.dout = inbox_[1].as<void>();
    asker.dout_st = asker.fwd.q_st;
    asker.dq = asker.dk = asker.dv = nullptr;
    DeviceBuffer& dq = partial_out_[static_cast<size_t>(slot)];
    shard_.answer_pass(plan_, st.span, st.send_to, asker, stats_.as<float>(), dq.as<float>());
    RA_CUDA_CHECK(cudaStreamSynchronize(stream_));  // complete before the send reads it
    return {dq.as<void>(), static_cast<size_t>(gpu_dq_bytes(p_, plan_))};
  }
  Message partial_inbox(size_t) override {
    return {partial_in_.as<void>(), static_cast<size_t>(gpu_dq_bytes(p_, plan_))};
  }
  void merge_partial(size_t step) override {
    shard_.add_dq(plan_, plan_.steps[step].span, partial_in_.as<float>());
    RA_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the inbox is free again
  }
  void write_output() override { shard_.write_output(); }

 private:
  size_t block_grad_bytes(const RingStep& st, int owner) const {
    return static_cast<size_t>(plan_.block_elements(p_, st.span, owner)) * sizeof(float);
  }
  static int64_t fp32_bytes(int64_t elements) {
    return elements * static_cast<int64_t>(sizeof(float));
  }

  const BackwardProblem& bp_;
  const Problem& p_;
  const RingPlan& plan_;
  cudaStream_t stream_;
  DeviceKvStore store_;
  BackwardShard shard_;
  GpuBalanceBytes bal_;
  std::vector<DeviceBuffer> sent_, returned_;  // slot e % 2 serves step e
  DeviceBuffer stats_;                         // the answered queries' row statistics
  std::vector<DeviceBuffer> own_q_, own_dout_, own_out_, own_lse_;  // [spans]
  std::vector<DeviceBuffer> inbox_;                                 // q, dout, out, lse
  std::vector<DeviceBuffer> partial_out_;                           // dq answered, 2 slots
  DeviceBuffer partial_in_;                                         // dq of this rank's half
};

}  // namespace

void launch_copy(const std::vector<CopyRun>& runs, const void* src, void* dst, int64_t row_elements,
                 size_t element_bytes, cudaStream_t stream) {
  if (runs.empty()) return;
  const dim3 grid = run_grid(runs.size(), "copies");
  const int64_t units = static_cast<int64_t>(element_bytes / 2);
  const DeviceBuffer dev_runs = upload(runs, stream);
  copy_kernel<<<grid, kThreads, 0, stream>>>(
      dev_runs.as<CopyRun>(), static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst),
      row_elements * units, units);
  RA_CUDA_CHECK_LAUNCH("copy_kernel");
}

std::unique_ptr<ForwardRingShard> forward_ring_shard(const Problem& p, const RingPlan& plan,
                                                     void* stream) {
  return std::make_unique<GpuForwardShard>(p, plan, static_cast<cudaStream_t>(stream));
}

std::unique_ptr<BackwardRingShard> backward_ring_shard(const BackwardProblem& bp,
                                                       const RingPlan& plan, void* stream) {
  return std::make_unique<GpuBackwardShard>(bp, plan, static_cast<cudaStream_t>(stream));
}

}  // namespace ringattn::cuda
