#pragma once
// Host-side helpers of the CUDA backend: stream-ordered device buffers, dispatch over
// dtype and head dim, and launch checks.

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "ringattn/tensor.h"
#include "src/backend/cuda/tiles.cuh"
#include "src/base/check.h"
#include "src/base/cuda_check.h"

namespace ringattn::cuda {

// A device allocation made and freed in stream order (cudaMallocAsync / cudaFreeAsync).
class DeviceBuffer {
 public:
  DeviceBuffer(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes > 0) RA_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream_));
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) (void)cudaFreeAsync(ptr_, stream_);  // never throws from a destructor
  }
  DeviceBuffer(DeviceBuffer&& other) noexcept : ptr_(other.ptr_), stream_(other.stream_) {
    other.ptr_ = nullptr;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(DeviceBuffer&&) = delete;
  template <typename U>
  U* as() const {
    return static_cast<U*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// A copy of `host` on the device. (A copy from pageable memory has read `host` when
// cudaMemcpyAsync returns, so the vector may go at once.)
template <typename U>
DeviceBuffer upload(const std::vector<U>& host, cudaStream_t stream) {
  DeviceBuffer buf(host.size() * sizeof(U), stream);
  if (!host.empty()) {
    RA_CUDA_CHECK(cudaMemcpyAsync(buf.as<U>(), host.data(), host.size() * sizeof(U),
                                  cudaMemcpyHostToDevice, stream));
  }
  return buf;
}

// Runs Op<T, kDim>::run(args...) for the storage type T of `dtype` and the kernel family
// kDim of `head_dim` (64, 128, or 0 = generic up to kMaxHeadDim).
template <template <typename, int> class Op, typename... Args>
void dispatch(DType dtype, int64_t head_dim, Args&&... args) {
  const int dim = head_dim == 64 ? 64 : head_dim == 128 ? 128 : 0;
  switch (dtype) {
    case DType::kF32:
      if (dim == 64) return Op<float, 64>::run(args...);
      if (dim == 128) return Op<float, 128>::run(args...);
      return Op<float, 0>::run(args...);
    case DType::kF16:
      if (dim == 64) return Op<__half, 64>::run(args...);
      if (dim == 128) return Op<__half, 128>::run(args...);
      return Op<__half, 0>::run(args...);
    case DType::kBF16:
      if (dim == 64) return Op<__nv_bfloat16, 64>::run(args...);
      if (dim == 128) return Op<__nv_bfloat16, 128>::run(args...);
      return Op<__nv_bfloat16, 0>::run(args...);
  }
}

// Allows `kernel` `bytes` of dynamic shared memory, or throws Error(kUnsupported) when the
// current device has less per block.
void allow_shared_memory(const void* kernel, int64_t bytes, const char* what);

// Blocks of kWarps warps covering `items` work items, one per thread (or per warp).
inline unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(ceil_div(items, per_block));
}

// The grid of a task list: x = tiles (segments x tiles per segment), y = task, z = batch.
dim3 task_grid(const TaskList& list, int64_t batch);

// fp32 rows (b, n, h) of O (D floats each) and of lse: an accumulator or a partial result
// for another rank. Row (b, n, h) is at o + b * o_st.b + n * o_st.n + (h - head0) * o_st.h.
struct RowsF32 {
  float* o;
  float* lse;
  Strides3 o_st, lse_st;
  int64_t head0;
  __host__ __device__ float* o_at(int64_t b, int64_t n, int64_t h) const {
    return o + b * o_st.b + n * o_st.n + (h - head0) * o_st.h;
  }
  __host__ __device__ float* lse_at(int64_t b, int64_t n, int64_t h) const {
    return lse + b * lse_st.b + n * lse_st.n + (h - head0) * lse_st.h;
  }
};

// One merge (SPEC.md's): for rows n of [0, rows) (global rows row0 + n) and heads
// [head_lo, head_hi), the rows `in` (at most two) and then the partials of `list`, in that
// order, into `dst` (fp32 rows; may be in[0]) or, without dst, into p.out (times
// p.out_factor) and p.lse. rows < 0: p.shard_rows; row0 < 0: p.shard_begin; head_hi < 0:
// p.heads.
struct MergeSpec {
  const TaskList* list = nullptr;
  const float* part_o = nullptr;
  const float* part_lse = nullptr;
  std::vector<RowsF32> in;
  const RowsF32* dst = nullptr;
  int64_t rows = -1, row0 = -1, head_lo = 0, head_hi = -1;
};

// Forward building blocks (forward.cu), shared by the single-GPU forward and the GPU ring.
// The query tile rows of p's forward kernel (the tile_rows of forward_tasks / block_tasks).
int64_t forward_tile_rows(const Problem& p);
// Launches the forward kernel over `list` (queries p.q; keys and values at the base
// pointers k and v of the tasks' row sources), writing fp32 (O, lse) partial rows.
void launch_forward(const Problem& p, const TaskList& list, const void* k, const void* v,
                    float* part_o, float* part_lse, cudaStream_t stream);
// Launches a merge (MergeSpec).
void launch_merge(const Problem& p, const MergeSpec& merge, cudaStream_t stream);
// The grid of a kernel over runs (blockIdx.y: the run), or Error(kUnsupported) for more
// runs than a grid holds; `what` names the work ("copies") in the message.
dim3 run_grid(size_t runs, const char* what);
// Launches the copy of `runs` (CopyRun, in elements of `element_bytes`, an even number;
// rows of `row_elements` contiguous elements) from src to dst.
void launch_copy(const std::vector<CopyRun>& runs, const void* src, void* dst, int64_t row_elements,
                 size_t element_bytes, cudaStream_t stream);
// Launches dst rows += src rows of `runs` (fp32; the destination rows disjoint).
void launch_add(const std::vector<CopyRun>& runs, const float* src, float* dst,
                int64_t row_elements, cudaStream_t stream);

// The backward of one shard (backward.cu), shared by the single-GPU backward and the GPU
// ring: fp32 accumulators of dq, dk, dv over the local rows, filled by passes launched in
// order on one stream (deterministic: no floating-point atomics), then written out.
class BackwardShard {
 public:
  // Allocates and zeroes the accumulators and computes the row statistics on `stream`.
  BackwardShard(const BackwardProblem& bp, cudaStream_t stream);
  // Every branch, the local queries against the local keys.
  void local_passes();
  // The local queries before global row `row_end` of span `span` against the block of
  // `sender` (device memory, `block`): dq into the local accumulator, dk and dv of the
  // block's keys into `grads` (fp32, the block's layout; zeroed first).
  void block_pass(const RingPlan& plan, int span, int sender, const void* block, float* grads,
                  int64_t row_end);
  // Rank `asker`'s balanced queries of span `span` (`asker_bp`: their q, out, dout and fp32
  // lse in asker_problem's layout) against this shard's keys: their dq into `acc_q`
  // ([B][rows][H][D] fp32, zeroed first), their row statistics in `stats` (2 x
  // [B][H][rows] floats), the keys' dk and dv into this shard's accumulators.
  void answer_pass(const RingPlan& plan, int span, int asker, const BackwardProblem& asker_bp,
                   float* stats, float* acc_q);
  // Adds `dq` ([B][rows][H][D] fp32, the answer to this rank's balanced queries of span
  // `span`) into the dq accumulator of rows [split, end).
  void add_dq(const RingPlan& plan, int span, const float* dq);
  // Adds `grads` (fp32 gradients of this rank's block of span `span`, the block's layout)
  // into the dk and dv accumulators.
  void add_returned(const RingPlan& plan, int span, const float* grads);
  // Writes the accumulators into bp.dq, bp.dk, bp.dv and, when `wait`, waits for the stream.
  void write_output(bool wait = true);

 private:
  const BackwardProblem& bp_;
  cudaStream_t stream_;
  int64_t tile_q_ = 0, tile_k_ = 0;
  DeviceBuffer lse2_, dr_, acc_q_, acc_k_, acc_v_;
};

}  // namespace ringattn::cuda
