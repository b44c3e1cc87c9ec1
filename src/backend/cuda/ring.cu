// The GPU ring of one rank: device-side K/V blocks (a pack kernel gathers the kept rows of
// each stream); forward: the forward kernel and merge of forward.cu over the local keys and
// over each received block; backward: the passes of backward.cu over the same, the
// gradients of each received block's keys kept in fp32 buffers of the block's layout.

#include <algorithm>

#include "src/backend/cuda/ring_cuda.h"
#include "src/backend/cuda/runtime.h"

namespace ringattn::cuda {

namespace {

// Copies the rows of run blockIdx.y into the packed block, in 2-byte units (every dtype's
// row is a whole number of them).
__global__ void __launch_bounds__(kThreads)
    pack_kernel(const PackRun* runs, const uint16_t* k, const uint16_t* v, uint16_t* block,
                int64_t units_per_elem, int64_t head_dim) {
  const PackRun run = runs[blockIdx.y];
  const int64_t row_units = head_dim * units_per_elem;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
       idx < run.rows * row_units; idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t t = idx / row_units, u = idx % row_units;
    block[(run.dst_k + t * head_dim) * units_per_elem + u] =
        k[(run.src_k + t * run.src_k_t) * units_per_elem + u];
    block[(run.dst_v + t * head_dim) * units_per_elem + u] =
        v[(run.src_v + t * run.src_v_t) * units_per_elem + u];
  }
}

// Blocks in device memory: this rank's packed once at the start, two incoming buffers.
class DeviceKvStore final : public KvStore {
 public:
  DeviceKvStore(const Problem& p, const RingPlan& plan, cudaStream_t stream) : stream_(stream) {
    const size_t esize = dtype_size(p.dtype);
    for (int s = 0; s < static_cast<int>(plan.spans.size()); ++s) {
      own_.emplace_back(static_cast<size_t>(plan.block_elements(p, s, plan.rank)) * esize, stream);
      const std::vector<PackRun> runs = pack_runs(p, plan, s, p.k_st, p.v_st);
      if (runs.empty()) continue;
      require(runs.size() <= 65535, "the GPU ring packs at most 65535 (stream, batch) runs per ",
              "block, but this call has ", runs.size(), "; split the batch");
      const DeviceBuffer dev_runs = upload(runs, stream);
      pack_kernel<<<dim3(64, static_cast<unsigned>(runs.size())), kThreads, 0, stream>>>(
          dev_runs.as<PackRun>(), static_cast<const uint16_t*>(p.k),
          static_cast<const uint16_t*>(p.v), own_.back().as<uint16_t>(),
          static_cast<int64_t>(esize / 2), p.head_dim);
      RA_CUDA_CHECK_LAUNCH("pack_kernel");
    }
    // Both inboxes at the size of the largest block this rank receives.
    size_t most = 0;
    for (const RingStep& st : plan.steps) {
      if (st.recv_from >= 0) {
        most = std::max(most,
                        static_cast<size_t>(plan.block_elements(p, st.span, st.recv_from)) * esize);
      }
    }
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

  const void* own(int span) override { return own_[static_cast<size_t>(span)].as<void>(); }
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
  cudaStream_t stream_;
  std::vector<DeviceBuffer> own_;
  std::unique_ptr<DeviceBuffer> inbox_[2];
  size_t inbox_bytes_[2] = {0, 0};
  cudaEvent_t read_[2] = {nullptr, nullptr};
  bool recorded_[2] = {false, false};
};

}  // namespace

struct RingShard::Impl {
  Impl(const Problem& problem, const RingPlan& ring_plan, cudaStream_t s)
      : p(problem), plan(ring_plan), stream(s), store(problem, ring_plan, s) {
    const int64_t tile_rows = forward_tile_rows(p);
    lists.push_back(forward_tasks(p, tile_rows));
    list_of_step.assign(plan.steps.size(), 0);
    for (size_t e = 0; e < plan.steps.size(); ++e) {
      const RingStep& st = plan.steps[e];
      if (st.recv_from < 0) continue;
      list_of_step[e] = lists.size();
      lists.push_back(
          block_tasks(p, plan, st.span, st.recv_from, tile_rows, lists.back().part_rows));
    }
    const int64_t rows = lists.back().part_rows;
    part_o = std::make_unique<DeviceBuffer>(static_cast<size_t>(rows * p.head_dim) * sizeof(float),
                                            stream);
    part_lse = std::make_unique<DeviceBuffer>(static_cast<size_t>(rows) * sizeof(float), stream);
  }
  void launch(size_t list, const void* k, const void* v) {
    launch_forward(p, lists[list], k, v, part_o->as<float>(), part_lse->as<float>(), stream);
  }

  const Problem& p;
  const RingPlan& plan;
  cudaStream_t stream;
  DeviceKvStore store;
  std::vector<TaskList> lists;  // [0]: local keys; then one per receiving step
  std::vector<size_t> list_of_step;
  std::unique_ptr<DeviceBuffer> part_o, part_lse;
};

RingShard::RingShard(const Problem& p, const RingPlan& plan, void* stream)
    : impl_(std::make_unique<Impl>(p, plan, static_cast<cudaStream_t>(stream))) {}

RingShard::~RingShard() = default;

KvStore& RingShard::store() {
  return impl_->store;
}

void RingShard::attend_local() {
  impl_->launch(0, impl_->p.k, impl_->p.v);
}

void RingShard::attend_block(size_t step, const void* block) {
  impl_->launch(impl_->list_of_step[step], block, block);
}

void RingShard::write_output() {
  std::vector<int> head_begin;
  const std::vector<Task> order = merge_order(impl_->p, impl_->lists, head_begin);
  launch_merge(impl_->p, order, head_begin, impl_->part_o->as<float>(),
               impl_->part_lse->as<float>(), impl_->stream);
  RA_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
}

namespace {

// The largest of `elements(step)` over the steps, in fp32 bytes.
template <typename F>
size_t most_grad_bytes(const RingPlan& plan, F elements) {
  int64_t most = 0;
  for (const RingStep& st : plan.steps) most = std::max(most, elements(st));
  return static_cast<size_t>(most) * sizeof(float);
}

}  // namespace

struct RingBackwardShard::Impl {
  Impl(const BackwardProblem& problem, const RingPlan& ring_plan, cudaStream_t s)
      : bp(problem),
        plan(ring_plan),
        stream(s),
        store(problem.fwd, ring_plan, s),
        shard(problem, s),
        sent{DeviceBuffer(sent_bytes(), s), DeviceBuffer(sent_bytes(), s)},
        returned{DeviceBuffer(returned_bytes(), s), DeviceBuffer(returned_bytes(), s)} {
    // Allocated before the communicator uses them from another stream or the host.
    RA_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  // The gradients of a received block (its sender's layout), and of this rank's own.
  size_t sent_bytes() const {
    return most_grad_bytes(plan, [&](const RingStep& st) {
      return st.recv_from < 0 ? 0 : plan.block_elements(bp.fwd, st.span, st.recv_from);
    });
  }
  size_t returned_bytes() const {
    return most_grad_bytes(plan, [&](const RingStep& st) {
      return st.send_to < 0 ? 0 : plan.block_elements(bp.fwd, st.span, plan.rank);
    });
  }

  const BackwardProblem& bp;
  const RingPlan& plan;
  cudaStream_t stream;
  DeviceKvStore store;
  BackwardShard shard;
  DeviceBuffer sent[2], returned[2];  // slot e % 2 serves step e
};

RingBackwardShard::RingBackwardShard(const BackwardProblem& bp, const RingPlan& plan, void* stream)
    : impl_(std::make_unique<Impl>(bp, plan, static_cast<cudaStream_t>(stream))) {}

RingBackwardShard::~RingBackwardShard() = default;

KvStore& RingBackwardShard::store() {
  return impl_->store;
}

void RingBackwardShard::launch_local() {
  impl_->shard.local_passes();
}

const void* RingBackwardShard::block_grads(size_t step, const void* block) {
  const RingStep& st = impl_->plan.steps[step];
  float* grads = impl_->sent[step % 2].as<float>();
  impl_->shard.block_pass(impl_->plan, st.span, st.recv_from, block, grads);
  RA_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));  // complete before the send reads it
  return grads;
}

void* RingBackwardShard::returned(size_t step) {
  // add_returned(step - 2), which read this buffer, is done before it is written again.
  RA_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
  return impl_->returned[step % 2].as<void>();
}

void RingBackwardShard::add_returned(size_t step) {
  impl_->shard.add_returned(impl_->plan, impl_->plan.steps[step].span,
                            impl_->returned[step % 2].as<float>());
}

void RingBackwardShard::write_output() {
  impl_->shard.write_output();
}

}  // namespace ringattn::cuda
