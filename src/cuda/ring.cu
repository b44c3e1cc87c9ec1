// The GPU ring forward of one rank: device-side K/V blocks (a pack kernel gathers the kept
// rows of each stream), and the forward kernel and merge of forward.cu over the local keys
// and over each received block.

#include "ring_cuda.h"
#include "runtime.h"

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
      const std::vector<PackRun> runs = pack_runs(p, plan, s);
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
    // The communicator reads the blocks from other streams (or through host staging).
    RA_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  const void* own(int span) override { return own_[static_cast<size_t>(span)].as<void>(); }
  void* inbox(int slot, size_t bytes) override {
    // The kernels of the step that read this buffer are done before it is written again.
    RA_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (bytes > inbox_bytes_[slot]) {
      inbox_[slot] = std::make_unique<DeviceBuffer>(bytes, stream_);
      inbox_bytes_[slot] = bytes;
      RA_CUDA_CHECK(cudaStreamSynchronize(stream_));  // allocated before another stream uses it
    }
    return inbox_[slot] ? inbox_[slot]->as<void>() : nullptr;
  }

 private:
  cudaStream_t stream_;
  std::vector<DeviceBuffer> own_;
  std::unique_ptr<DeviceBuffer> inbox_[2];
  size_t inbox_bytes_[2] = {0, 0};
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

}  // namespace ringattn::cuda
