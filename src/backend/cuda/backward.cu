// The CUDA backward (SPEC.md "Backward") of one shard (the whole sequence on one GPU, or one
// rank's rows in the GPU ring), deterministic without floating-point atomics:
//   1. rows kernel: Dr = rowsum(dout * out) and lse in log2 units, per local (b, h, n);
//   2. passes, in order: per branch against the local keys, then (GPU ring) per received
//      block: a dK/dV kernel whose blocks own disjoint key tiles (a key tile of one (kv head,
//      offset) loops over the query heads and query tiles that see it) and a dQ kernel whose
//      blocks own disjoint query tiles; both add their tile into fp32 accumulators (dq:
//      [B][N_loc][heads][D]; dk, dv: the local ones, or a received block's gradient buffer)
//      (read-modify-write: no two blocks of a launch share a row, launches are ordered by
//      the stream); a block's gradients returned by the rank that used it are added in;
//   3. a cast kernel writes the accumulators into dq, dk, dv.

#include "src/backend/cuda/attention_cuda.h"
#include "src/backend/cuda/runtime.h"

namespace ringattn::cuda {

namespace {

struct BackwardArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  Strides3 q_st, dout_st;
  int64_t rows, row0, heads, kv_heads, head_dim;  // local rows n hold global rows row0 + n
  float scale, scale_log2, out_factor;
  bool causal;
  const Task* tasks;
  const int* heads_of;
  const float* lse2;  // [B][H][N_loc], log2 units
  const float* dr;    // [B][H][N_loc]
  float* acc_q;       // dq accumulator [B][N_loc][H][D]
  float* acc_k;       // base of the tasks' dk_dst
  float* acc_v;       // base of the tasks' dv_dst
};

// One warp per row (b, h, n): dr = sum_d dout * out, lse2 = lse * log2(e).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(const T* dout, Strides3 dout_st, const T* out, Strides3 out_st, const float* lse,
                Strides3 lse_st, int64_t batch, int64_t rows, int64_t heads, int64_t head_lo,
                int64_t head_hi, int64_t head_dim, float* lse2, float* dr) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t span = head_hi - head_lo;
  if (item >= batch * span * rows) return;
  const int64_t n = item % rows, h = head_lo + item / rows % span, b = item / rows / span;
  const int64_t row = (b * heads + h) * rows + n;
  const T* g = dout + b * dout_st.b + n * dout_st.n + h * dout_st.h;
  const T* o = out + b * out_st.b + n * out_st.n + h * out_st.h;
  float sum = 0.0f;
  for (int64_t d = lane; d < head_dim; d += 32) sum += to_float(g[d]) * to_float(o[d]);
  sum = warp_sum(sum);
  if (lane == 0) {
    dr[row] = sum;
    lse2[row] = lse[b * lse_st.b + n * lse_st.n + h * lse_st.h] * kLog2e;
  }
}

// Loads query tile [q0, q0 + nq) of head h (Q, dO, lse2, Dr; local rows) into shared memory.
template <typename T, int kDim>
__device__ void load_queries(const BackwardArgs& a, const BackwardLayout<T, kDim>& L, char* smem,
                             const Task& task, int64_t b, int64_t seg, int64_t h, int64_t q0,
                             int nq) {
  constexpr int BQ = BackwardLayout<T, kDim>::kBQ;
  const int64_t n0 = local_row(task, seg, q0, a.row0);
  load_rows(smem_at<T>(smem, L.q), L.ldt, BQ, L.dp,
            static_cast<const T*>(a.q) + b * a.q_st.b + n0 * a.q_st.n + h * a.q_st.h,
            task.r * a.q_st.n, nq, a.head_dim);
  load_rows(smem_at<T>(smem, L.dout), L.ldt, BQ, L.dp,
            static_cast<const T*>(a.dout) + b * a.dout_st.b + n0 * a.dout_st.n + h * a.dout_st.h,
            task.r * a.dout_st.n, nq, a.head_dim);
  float* lse2 = smem_at<float>(smem, L.lse2);
  float* dr = smem_at<float>(smem, L.dr);
  for (int i = threadIdx.x; i < BQ; i += kThreads) {
    const int64_t stat = (b * a.heads + h) * a.rows + n0 + i * task.r;
    lse2[i] = i < nq ? a.lse2[stat] : 0.0f;
    dr[i] = i < nq ? a.dr[stat] : 0.0f;
  }
}

// Loads key tile [k0, k0 + nk) of the task's kv head (K, V; the task's row sources) into
// shared memory.
template <typename T, int kDim>
__device__ void load_keys(const BackwardArgs& a, const BackwardLayout<T, kDim>& L, char* smem,
                          const Task& task, int64_t b, int64_t seg, int64_t k0, int nk) {
  constexpr int BK = BackwardLayout<T, kDim>::kBK;
  load_rows(smem_at<T>(smem, L.k), L.ldt, BK, L.dp,
            static_cast<const T*>(a.k) + source_offset(task.k_src, b, seg, k0), task.k_src.t_st, nk,
            a.head_dim);
  load_rows(smem_at<T>(smem, L.v), L.ldt, BK, L.dp,
            static_cast<const T*>(a.v) + source_offset(task.v_src, b, seg, k0), task.v_src.t_st, nk,
            a.head_dim);
}

// Adds factor * tile rows [0, rows) to the fp32 accumulator rows acc + i * row_stride.
__device__ void add_tile(float* acc, int64_t row_stride, int rows, int64_t head_dim,
                         const float* tile, int ld, float factor) {
  for (int idx = threadIdx.x; idx < rows * head_dim; idx += kThreads) {
    const int i = idx / static_cast<int>(head_dim), d = idx % static_cast<int>(head_dim);
    acc[i * row_stride + d] += factor * tile[i * ld + d];
  }
}

// One block: key tile [k0, k0 + BK) of [k_lo, k_hi) of segment `seg` of task blockIdx.y (a kv
// head and offset), batch blockIdx.z; every query head of the task, every query tile of
// [q_lo, q_hi) that sees it.
template <typename T, int kDim>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(BackwardArgs a) {
  using Layout = BackwardLayout<T, kDim>;
  constexpr int BQ = Layout::kBQ, BK = Layout::kBK;
  const Task task = a.tasks[blockIdx.y];
  const int64_t b = blockIdx.z;
  TaskTile tt;
  if (!task_tile(task, task.k_lo, task.k_hi, BK, tt)) return;
  const int64_t seg = tt.seg, k0 = tt.t0;
  const int nk = tt.n;

  extern __shared__ __align__(128) char smem[];
  const Layout L(a.head_dim, true);
  float* dks = smem_at<float>(smem, L.acc1);
  float* dvs = smem_at<float>(smem, L.acc2);
  load_keys(a, L, smem, task, b, seg, k0, nk);
  fill_tile(dks, L.lda, BK, L.dp, 0.0f);
  fill_tile(dvs, L.lda, BK, L.dp, 0.0f);
  // Causal: query tiles ending before k0 see none of these keys.
  const int64_t q_begin =
      a.causal && k0 > task.q_lo ? task.q_lo + (k0 - task.q_lo) / BQ * BQ : task.q_lo;
  for (int hi = 0; hi < task.head_count; ++hi) {
    const int64_t h = a.heads_of[task.head_first + hi];
    for (int64_t q0 = q_begin; q0 < task.q_hi; q0 += BQ) {
      const int nq = static_cast<int>(min64(BQ, task.q_hi - q0));
      __syncthreads();  // the previous products are done with Q, dO, P and dS
      load_queries(a, L, smem, task, b, seg, h, q0, nq);
      __syncthreads();
      probabilities(L, smem, q0, nq, k0, nk, a.causal, a.scale_log2, a.out_factor);
      __syncthreads();
      // dV += P^T dO, dK += dS^T Q (scale and the output factor are applied at the end).
      gemm_tile<T, true, false>(smem_at<T>(smem, L.p), L.ldp, smem_at<T>(smem, L.dout), L.ldt, dvs,
                                L.lda, BK, L.dp, BQ, true);
      gemm_tile<T, true, false>(smem_at<T>(smem, L.ds), L.ldp, smem_at<T>(smem, L.q), L.ldt, dks,
                                L.lda, BK, L.dp, BQ, true);
    }
  }
  __syncthreads();
  add_tile(a.acc_k + source_offset(task.dk_dst, b, seg, k0), task.dk_dst.t_st, nk, a.head_dim, dks,
           L.lda, a.scale);
  add_tile(a.acc_v + source_offset(task.dv_dst, b, seg, k0), task.dv_dst.t_st, nk, a.head_dim, dvs,
           L.lda, a.out_factor);
}

// One block: query tile [q0, q0 + BQ) of [q_lo, q_hi) of segment `seg` of task blockIdx.y
// (one query head), batch blockIdx.z, against every key tile of [k_lo, k_hi) it sees.
template <typename T, int kDim>
__global__ void __launch_bounds__(kThreads) dq_kernel(BackwardArgs a) {
  using Layout = BackwardLayout<T, kDim>;
  constexpr int BQ = Layout::kBQ, BK = Layout::kBK;
  const Task task = a.tasks[blockIdx.y];
  const int64_t b = blockIdx.z;
  TaskTile tt;
  if (!task_tile(task, task.q_lo, task.q_hi, BQ, tt)) return;
  const int64_t seg = tt.seg, q0 = tt.t0;
  const int nq = tt.n;
  const int64_t h = a.heads_of[task.head_first];

  extern __shared__ __align__(128) char smem[];
  const Layout L(a.head_dim, false);
  float* dqs = smem_at<float>(smem, L.acc1);
  load_queries(a, L, smem, task, b, seg, h, q0, nq);
  fill_tile(dqs, L.lda, BQ, L.dp, 0.0f);
  const int64_t k_end = a.causal ? min64(task.k_hi, q0 + nq) : task.k_hi;
  for (int64_t k0 = task.k_lo; k0 < k_end; k0 += BK) {
    const int nk = static_cast<int>(min64(BK, task.k_hi - k0));
    __syncthreads();  // the previous product is done with K and dS
    load_keys(a, L, smem, task, b, seg, k0, nk);
    __syncthreads();
    probabilities(L, smem, q0, nq, k0, nk, a.causal, a.scale_log2, a.out_factor);
    __syncthreads();
    gemm_tile<T, false, false>(smem_at<T>(smem, L.ds), L.ldp, smem_at<T>(smem, L.k), L.ldt, dqs,
                               L.lda, BQ, L.dp, BK, true);  // dQ += dS K
  }
  __syncthreads();
  const int64_t n0 = local_row(task, seg, q0, a.row0);
  add_tile(a.acc_q + ((b * a.rows + n0) * a.heads + h) * a.head_dim, task.r * a.heads * a.head_dim,
           nq, a.head_dim, dqs, L.lda, a.scale);
}

// dst rows += src rows of run blockIdx.y (fp32; disjoint destination rows).
__global__ void __launch_bounds__(kThreads)
    add_copy_kernel(const CopyRun* runs, const float* src, float* dst, int64_t row_elements) {
  const CopyRun run = runs[blockIdx.y];
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
       idx < run.rows * row_elements; idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t t = idx / row_elements, d = idx % row_elements;
    dst[run.dst + t * run.dst_t + d] += src[run.src + t * run.src_t + d];
  }
}

// dst (strided [B, N, heads, D] view) = the contiguous fp32 accumulator src.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    cast_kernel(const float* src, T* dst, Strides3 st, int64_t batch, int64_t seq, int64_t heads,
                int64_t head_dim) {
  const int64_t total = batch * seq * heads * head_dim;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t d = i % head_dim, h = i / head_dim % heads, n = i / head_dim / heads % seq;
    const int64_t b = i / head_dim / heads / seq;
    dst[b * st.b + n * st.n + h * st.h + d] = from_float<T>(src[i]);
  }
}

template <typename T>
void cast_into(const float* src, void* dst, const Strides3& st, int64_t batch, int64_t seq,
               int64_t heads, int64_t head_dim, cudaStream_t stream) {
  const int64_t total = batch * seq * heads * head_dim;
  const unsigned blocks = static_cast<unsigned>(min64(ceil_div(total, kThreads), 65535));
  cast_kernel<T>
      <<<blocks, kThreads, 0, stream>>>(src, static_cast<T*>(dst), st, batch, seq, heads, head_dim);
  RA_CUDA_CHECK_LAUNCH("cast_kernel");
}

template <typename T, int kDim>
struct BackwardTiles {
  static void run(int64_t& tile_q, int64_t& tile_k) {
    tile_q = TileShape<T, kDim>::kBQ;
    tile_k = TileShape<T, kDim>::kBK;
  }
};

template <typename T, int kDim>
struct LaunchRows {
  static void run(const BackwardProblem& bp, int64_t head_lo, int64_t head_hi, float* lse2,
                  float* dr, cudaStream_t stream) {
    const Problem& p = bp.fwd;
    const int64_t items = p.batch * (head_hi - head_lo) * p.shard_rows;
    if (items == 0) return;
    rows_kernel<T><<<blocks_for(items, kWarps), kThreads, 0, stream>>>(
        static_cast<const T*>(bp.dout), bp.dout_st, static_cast<const T*>(p.out), p.out_st, p.lse,
        p.lse_st, p.batch, p.shard_rows, p.heads, head_lo, head_hi, p.head_dim, lse2, dr);
    RA_CUDA_CHECK_LAUNCH("rows_kernel");
  }
};

// One pass: the dK/dV kernel over `by_key`, then the dQ kernel over `by_query` (keys and
// values at k and v, dk and dv accumulated at acc_k and acc_v per the tasks' sources).
template <typename T, int kDim>
struct LaunchPass {
  static void run(const BackwardProblem& bp, const TaskList& by_key, const TaskList& by_query,
                  const void* k, const void* v, const float* lse2, const float* dr, float* acc_q,
                  float* acc_k, float* acc_v, cudaStream_t stream) {
    const Problem& p = bp.fwd;
    BackwardArgs args{p.q,
                      k,
                      v,
                      bp.dout,
                      p.q_st,
                      bp.dout_st,
                      p.shard_rows,
                      p.shard_begin,
                      p.heads,
                      p.kv_heads,
                      p.head_dim,
                      p.scale,
                      p.scale * kLog2e,
                      p.out_factor,
                      p.causal,
                      nullptr,
                      nullptr,
                      lse2,
                      dr,
                      acc_q,
                      acc_k,
                      acc_v};
    // Kernel `kernel` over the tasks of `list`, with the shared memory of its layout.
    const auto launch = [&](const TaskList& list, bool by_key_layout, auto kernel, const char* what,
                            const char* launch_name) {
      if (list.tasks.empty() || list.max_tiles == 0) return;
      const int64_t smem = BackwardLayout<T, kDim>(p.head_dim, by_key_layout).bytes;
      allow_shared_memory(reinterpret_cast<const void*>(kernel), smem, what);
      const DeviceBuffer tasks = upload(list.tasks, stream);
      const DeviceBuffer heads = upload(list.heads, stream);
      args.tasks = tasks.as<Task>();
      args.heads_of = heads.as<int>();
      kernel<<<task_grid(list, p.batch), kThreads, static_cast<size_t>(smem), stream>>>(args);
      check_cuda(cudaGetLastError(), launch_name, __FILE__, __LINE__);
    };
    launch(by_key, true, &dkdv_kernel<T, kDim>, "the CUDA dK/dV kernel", "launch of dkdv_kernel");
    launch(by_query, false, &dq_kernel<T, kDim>, "the CUDA dQ kernel", "launch of dq_kernel");
  }
};

template <typename T, int kDim>
struct CastOutput {
  static void run(const BackwardProblem& bp, const float* acc_q, const float* acc_k,
                  const float* acc_v, cudaStream_t stream) {
    const Problem& p = bp.fwd;
    cast_into<T>(acc_q, bp.dq, bp.dq_st, p.batch, p.shard_rows, p.heads, p.head_dim, stream);
    cast_into<T>(acc_k, bp.dk, bp.dk_st, p.batch, p.shard_rows, p.kv_heads, p.head_dim, stream);
    cast_into<T>(acc_v, bp.dv, bp.dv_st, p.batch, p.shard_rows, p.kv_heads, p.head_dim, stream);
  }
};

size_t q_bytes(const Problem& p) {
  return static_cast<size_t>(p.batch * p.shard_rows * p.heads * p.head_dim) * sizeof(float);
}
size_t kv_bytes(const Problem& p) {
  return static_cast<size_t>(p.batch * p.shard_rows * p.kv_heads * p.head_dim) * sizeof(float);
}
size_t stat_bytes(const Problem& p) {
  return static_cast<size_t>(p.batch * p.heads * p.shard_rows) * sizeof(float);
}

}  // namespace

BackwardShard::BackwardShard(const BackwardProblem& bp, cudaStream_t stream)
    : bp_(bp),
      stream_(stream),
      lse2_(stat_bytes(bp.fwd), stream),
      dr_(stat_bytes(bp.fwd), stream),
      acc_q_(q_bytes(bp.fwd), stream),
      acc_k_(kv_bytes(bp.fwd), stream),
      acc_v_(kv_bytes(bp.fwd), stream) {
  const Problem& p = bp.fwd;
  dispatch<BackwardTiles>(p.dtype, p.head_dim, tile_q_, tile_k_);
  RA_CUDA_CHECK(cudaMemsetAsync(acc_q_.as<float>(), 0, q_bytes(p), stream));
  RA_CUDA_CHECK(cudaMemsetAsync(acc_k_.as<float>(), 0, kv_bytes(p), stream));
  RA_CUDA_CHECK(cudaMemsetAsync(acc_v_.as<float>(), 0, kv_bytes(p), stream));
  dispatch<LaunchRows>(p.dtype, p.head_dim, bp, int64_t{0}, p.heads, lse2_.as<float>(),
                       dr_.as<float>(), stream);
}

void BackwardShard::local_passes() {
  const Problem& p = bp_.fwd;
  for (int branch = 0; branch < static_cast<int>(p.branches.size()); ++branch) {
    dispatch<LaunchPass>(p.dtype, p.head_dim, bp_, backward_tasks(p, branch, tile_k_, true),
                         backward_tasks(p, branch, tile_q_, false), p.k, p.v, lse2_.as<float>(),
                         dr_.as<float>(), acc_q_.as<float>(), acc_k_.as<float>(),
                         acc_v_.as<float>(), stream_);
  }
}

void BackwardShard::block_pass(const RingPlan& plan, int span, int sender, const void* block,
                               float* grads, int64_t row_end) {
  const Problem& p = bp_.fwd;
  const size_t bytes = static_cast<size_t>(plan.block_elements(p, span, sender)) * sizeof(float);
  if (bytes > 0) RA_CUDA_CHECK(cudaMemsetAsync(grads, 0, bytes, stream_));
  dispatch<LaunchPass>(
      p.dtype, p.head_dim, bp_, block_backward_tasks(p, plan, span, sender, tile_k_, true, row_end),
      block_backward_tasks(p, plan, span, sender, tile_q_, false, row_end), block, block,
      lse2_.as<float>(), dr_.as<float>(), acc_q_.as<float>(), grads, grads, stream_);
}

void BackwardShard::answer_pass(const RingPlan& plan, int span, int asker,
                                const BackwardProblem& asker_bp, float* stats, float* acc_q) {
  const Problem& p = bp_.fwd;
  const Problem& f = asker_bp.fwd;
  const SpanningBranch& sb = plan.spans[static_cast<size_t>(span)];
  const int64_t rows = f.batch * f.heads * f.shard_rows;
  RA_CUDA_CHECK(
      cudaMemsetAsync(acc_q, 0, static_cast<size_t>(rows * f.head_dim) * sizeof(float), stream_));
  dispatch<LaunchRows>(p.dtype, p.head_dim, asker_bp, sb.head_begin, sb.head_end, stats,
                       stats + rows, stream_);
  dispatch<LaunchPass>(p.dtype, p.head_dim, asker_bp,
                       answer_backward_tasks(p, plan, span, asker, tile_k_, true),
                       answer_backward_tasks(p, plan, span, asker, tile_q_, false), p.k, p.v, stats,
                       stats + rows, acc_q, acc_k_.as<float>(), acc_v_.as<float>(), stream_);
}

void BackwardShard::add_dq(const RingPlan& plan, int span, const float* dq) {
  const Problem& p = bp_.fwd;
  const SpanningBranch& sb = plan.spans[static_cast<size_t>(span)];
  const int64_t rows = plan.half_rows(p), D = p.head_dim;
  // Per (b, h): the asker's rows n of [B][rows][H][D] onto local rows split + n.
  std::vector<CopyRun> runs;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = sb.head_begin; h < sb.head_end; ++h) {
      runs.push_back({(b * rows * p.heads + h) * D, p.heads * D,
                      ((b * p.shard_rows + plan.split - p.shard_begin) * p.heads + h) * D,
                      p.heads * D, rows});
    }
  }
  launch_add(runs, dq, acc_q_.as<float>(), D, stream_);
}

void BackwardShard::add_returned(const RingPlan& plan, int span, const float* grads) {
  const Problem& p = bp_.fwd;
  const Strides3 acc_st{p.shard_rows * p.kv_heads * p.head_dim, p.kv_heads * p.head_dim,
                        p.head_dim};
  const std::vector<PackRun> runs = pack_runs(p, plan, span, acc_st, acc_st);
  launch_add(block_copies(runs, false, p.head_dim, false), grads, acc_k_.as<float>(), p.head_dim,
             stream_);
  launch_add(block_copies(runs, true, p.head_dim, false), grads, acc_v_.as<float>(), p.head_dim,
             stream_);
}

void launch_add(const std::vector<CopyRun>& runs, const float* src, float* dst,
                int64_t row_elements, cudaStream_t stream) {
  if (runs.empty()) return;
  const dim3 grid = run_grid(runs.size(), "adds");
  const DeviceBuffer dev_runs = upload(runs, stream);
  add_copy_kernel<<<grid, kThreads, 0, stream>>>(dev_runs.as<CopyRun>(), src, dst, row_elements);
  RA_CUDA_CHECK_LAUNCH("add_copy_kernel");
}

void BackwardShard::write_output(bool wait) {
  const Problem& p = bp_.fwd;
  dispatch<CastOutput>(p.dtype, p.head_dim, bp_, acc_q_.as<float>(), acc_k_.as<float>(),
                       acc_v_.as<float>(), stream_);
  if (wait) RA_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void backward(const BackwardProblem& bp, void* stream, bool wait) {
  require(bp.fwd.shard_begin == 0 && bp.fwd.shard_rows == bp.fwd.seq,
          "the CUDA backend runs whole sequences on one device (no shards)");
  BackwardShard shard(bp, static_cast<cudaStream_t>(stream));
  shard.local_passes();
  shard.write_output(wait);
}

}  // namespace ringattn::cuda
