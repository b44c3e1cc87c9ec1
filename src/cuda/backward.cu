// The CUDA backward (SPEC.md "Backward"), deterministic without floating-point atomics:
//   1. rows kernel: Dr = rowsum(dout * out) and lse in log2 units, per (b, h, n);
//   2. per branch, in order: a dK/dV kernel whose blocks own disjoint key tiles (a key tile of
//      one (kv head, offset) loops over the query heads and query tiles that see it) and a dQ
//      kernel whose blocks own disjoint query tiles; both add their tile into fp32
//      accumulators [B][N][heads][D] (read-modify-write: no two blocks of a launch share a
//      row, launches are ordered by the stream);
//   3. a cast kernel writes the accumulators into dq, dk, dv.

#include "attention_cuda.h"
#include "runtime.h"

namespace ringattn::cuda {

namespace {

struct BackwardArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  Strides3 q_st, k_st, v_st, dout_st;
  int64_t seq, heads, kv_heads, head_dim;
  float scale, scale_log2, out_factor;
  bool causal;
  const Task* tasks;
  const int* heads_of;
  const float* lse2;  // [B][H][N], log2 units
  const float* dr;    // [B][H][N]
  float* acc_q;       // dq accumulator [B][N][H][D]
  float* acc_k;       // dk accumulator [B][N][Hkv][D]
  float* acc_v;       // dv accumulator [B][N][Hkv][D]
};

// One warp per row (b, h, n): dr = sum_d dout * out, lse2 = lse * log2(e).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(const T* dout, Strides3 dout_st, const T* out, Strides3 out_st, const float* lse,
                Strides3 lse_st, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim,
                float* lse2, float* dr) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (row >= batch * heads * seq) return;
  const int64_t n = row % seq, h = row / seq % heads, b = row / seq / heads;
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

// For query tile [q0, q0 + nq) and key tile [k0, k0 + nk) (kept indices; Q, dO, K, V and the
// row statistics in shared memory): P = exp2(S scale_log2 - lse2) on visible pairs (0
// elsewhere) and dS = P (f dP - Dr), where S = Q K^T and dP = dO V^T. Writes P and dS (T).
template <typename T, int kDim>
__device__ void probabilities(const BackwardArgs& a, const BackwardLayout<T, kDim>& L, char* smem,
                              int64_t q0, int nq, int64_t k0, int nk) {
  constexpr int BQ = BackwardLayout<T, kDim>::kBQ, BK = BackwardLayout<T, kDim>::kBK;
  float* ss = smem_at<float>(smem, L.s);
  float* dps = smem_at<float>(smem, L.dp_tile);
  gemm_tile<T, false, true>(smem_at<T>(smem, L.q), L.ldt, smem_at<T>(smem, L.k), L.ldt, ss, L.lds,
                            BQ, BK, L.dp, false);
  gemm_tile<T, false, true>(smem_at<T>(smem, L.dout), L.ldt, smem_at<T>(smem, L.v), L.ldt, dps,
                            L.lds, BQ, BK, L.dp, false);
  __syncthreads();
  const float* lse2 = smem_at<float>(smem, L.lse2);
  const float* dr = smem_at<float>(smem, L.dr);
  T* ps = smem_at<T>(smem, L.p);
  T* dss = smem_at<T>(smem, L.ds);
  for (int idx = threadIdx.x; idx < BQ * BK; idx += kThreads) {
    const int i = idx / BK, j = idx % BK;
    const bool visible = i < nq && j < nk && (!a.causal || k0 + j <= q0 + i) && lse2[i] != kNegInf;
    const float p = visible ? exp2f(ss[i * L.lds + j] * a.scale_log2 - lse2[i]) : 0.0f;
    const float ds = visible ? p * (a.out_factor * dps[i * L.lds + j] - dr[i]) : 0.0f;
    ps[i * L.ldp + j] = from_float<T>(p);
    dss[i * L.ldp + j] = from_float<T>(ds);
  }
}

// Loads query tile [q0, q0 + nq) of head h (Q, dO, lse2, Dr) into shared memory.
template <typename T, int kDim>
__device__ void load_queries(const BackwardArgs& a, const BackwardLayout<T, kDim>& L, char* smem,
                             const Task& task, int64_t b, int64_t seg, int64_t h, int64_t q0,
                             int nq) {
  constexpr int BQ = BackwardLayout<T, kDim>::kBQ;
  load_rows(smem_at<T>(smem, L.q), L.ldt, BQ, L.dp,
            static_cast<const T*>(a.q) + kept_row_offset(task, a.q_st, b, seg, q0, h),
            task.r * a.q_st.n, nq, a.head_dim);
  load_rows(smem_at<T>(smem, L.dout), L.ldt, BQ, L.dp,
            static_cast<const T*>(a.dout) + kept_row_offset(task, a.dout_st, b, seg, q0, h),
            task.r * a.dout_st.n, nq, a.head_dim);
  float* lse2 = smem_at<float>(smem, L.lse2);
  float* dr = smem_at<float>(smem, L.dr);
  for (int i = threadIdx.x; i < BQ; i += kThreads) {
    const int64_t n = seg * task.s + task.o + (q0 + i) * task.r;
    const int64_t stat = (b * a.heads + h) * a.seq + n;
    lse2[i] = i < nq ? a.lse2[stat] : 0.0f;
    dr[i] = i < nq ? a.dr[stat] : 0.0f;
  }
}

// Loads key tile [k0, k0 + nk) of the task's kv head (K, V) into shared memory.
template <typename T, int kDim>
__device__ void load_keys(const BackwardArgs& a, const BackwardLayout<T, kDim>& L, char* smem,
                          const Task& task, int64_t b, int64_t seg, int64_t k0, int nk) {
  constexpr int BK = BackwardLayout<T, kDim>::kBK;
  load_rows(smem_at<T>(smem, L.k), L.ldt, BK, L.dp,
            static_cast<const T*>(a.k) + kept_row_offset(task, a.k_st, b, seg, k0, task.kv_head),
            task.r * a.k_st.n, nk, a.head_dim);
  load_rows(smem_at<T>(smem, L.v), L.ldt, BK, L.dp,
            static_cast<const T*>(a.v) + kept_row_offset(task, a.v_st, b, seg, k0, task.kv_head),
            task.r * a.v_st.n, nk, a.head_dim);
}

// Adds factor * tile rows [0, rows) to the fp32 accumulator rows of kept indices t0 + i
// (accumulator [B][N][heads][D], head `head`).
__device__ void add_tile(float* acc, int64_t heads, int64_t seq, int64_t head_dim, const Task& task,
                         int64_t b, int64_t seg, int64_t t0, int rows, int64_t head,
                         const float* tile, int ld, float factor) {
  for (int idx = threadIdx.x; idx < rows * head_dim; idx += kThreads) {
    const int i = idx / static_cast<int>(head_dim), d = idx % static_cast<int>(head_dim);
    const int64_t n = seg * task.s + task.o + (t0 + i) * task.r;
    acc[((b * seq + n) * heads + head) * head_dim + d] += factor * tile[i * ld + d];
  }
}

// One block: key tile [k0, k0 + BK) of segment `seg` of task blockIdx.y (a kv head and
// offset), batch blockIdx.z; every query head of the task, every query tile that sees it.
template <typename T, int kDim>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(BackwardArgs a) {
  using Layout = BackwardLayout<T, kDim>;
  constexpr int BQ = Layout::kBQ, BK = Layout::kBK;
  const Task task = a.tasks[blockIdx.y];
  const int64_t b = blockIdx.z;
  if (static_cast<int64_t>(blockIdx.x) >= task.segments * task.tiles_per_seg) return;
  const int64_t seg = blockIdx.x / task.tiles_per_seg;
  const int64_t k0 = (blockIdx.x % task.tiles_per_seg) * BK;
  const int nk = static_cast<int>(min64(BK, task.m - k0));

  extern __shared__ __align__(128) char smem[];
  const Layout L(a.head_dim, true);
  float* dks = smem_at<float>(smem, L.acc1);
  float* dvs = smem_at<float>(smem, L.acc2);
  load_keys(a, L, smem, task, b, seg, k0, nk);
  fill_tile(dks, L.lda, BK, L.dp, 0.0f);
  fill_tile(dvs, L.lda, BK, L.dp, 0.0f);
  // Causal: query tiles ending before k0 see none of these keys.
  const int64_t q_begin = a.causal ? (k0 / BQ) * BQ : 0;
  for (int hi = 0; hi < task.head_count; ++hi) {
    const int64_t h = a.heads_of[task.head_first + hi];
    for (int64_t q0 = q_begin; q0 < task.m; q0 += BQ) {
      const int nq = static_cast<int>(min64(BQ, task.m - q0));
      __syncthreads();  // the previous products are done with Q, dO, P and dS
      load_queries(a, L, smem, task, b, seg, h, q0, nq);
      __syncthreads();
      probabilities(a, L, smem, q0, nq, k0, nk);
      __syncthreads();
      // dV += P^T dO, dK += dS^T Q (scale and the output factor are applied at the end).
      gemm_tile<T, true, false>(smem_at<T>(smem, L.p), L.ldp, smem_at<T>(smem, L.dout), L.ldt, dvs,
                                L.lda, BK, L.dp, BQ, true);
      gemm_tile<T, true, false>(smem_at<T>(smem, L.ds), L.ldp, smem_at<T>(smem, L.q), L.ldt, dks,
                                L.lda, BK, L.dp, BQ, true);
    }
  }
  __syncthreads();
  add_tile(a.acc_k, a.kv_heads, a.seq, a.head_dim, task, b, seg, k0, nk, task.kv_head, dks, L.lda,
           a.scale);
  add_tile(a.acc_v, a.kv_heads, a.seq, a.head_dim, task, b, seg, k0, nk, task.kv_head, dvs, L.lda,
           a.out_factor);
}

// One block: query tile [q0, q0 + BQ) of segment `seg` of task blockIdx.y (one query head),
// batch blockIdx.z, against every key tile it sees.
template <typename T, int kDim>
__global__ void __launch_bounds__(kThreads) dq_kernel(BackwardArgs a) {
  using Layout = BackwardLayout<T, kDim>;
  constexpr int BQ = Layout::kBQ, BK = Layout::kBK;
  const Task task = a.tasks[blockIdx.y];
  const int64_t b = blockIdx.z;
  if (static_cast<int64_t>(blockIdx.x) >= task.segments * task.tiles_per_seg) return;
  const int64_t seg = blockIdx.x / task.tiles_per_seg;
  const int64_t q0 = (blockIdx.x % task.tiles_per_seg) * BQ;
  const int nq = static_cast<int>(min64(BQ, task.m - q0));
  const int64_t h = a.heads_of[task.head_first];

  extern __shared__ __align__(128) char smem[];
  const Layout L(a.head_dim, false);
  float* dqs = smem_at<float>(smem, L.acc1);
  load_queries(a, L, smem, task, b, seg, h, q0, nq);
  fill_tile(dqs, L.lda, BQ, L.dp, 0.0f);
  const int64_t k_end = a.causal ? min64(task.m, q0 + nq) : task.m;
  for (int64_t k0 = 0; k0 < k_end; k0 += BK) {
    const int nk = static_cast<int>(min64(BK, task.m - k0));
    __syncthreads();  // the previous product is done with K and dS
    load_keys(a, L, smem, task, b, seg, k0, nk);
    __syncthreads();
    probabilities(a, L, smem, q0, nq, k0, nk);
    __syncthreads();
    gemm_tile<T, false, false>(smem_at<T>(smem, L.ds), L.ldp, smem_at<T>(smem, L.k), L.ldt, dqs,
                               L.lda, BQ, L.dp, BK, true);  // dQ += dS K
  }
  __syncthreads();
  add_tile(a.acc_q, a.heads, a.seq, a.head_dim, task, b, seg, q0, nq, h, dqs, L.lda, a.scale);
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
struct Backward {
  static void run(const BackwardProblem& bp, cudaStream_t stream) {
    const Problem& p = bp.fwd;
    using Shape = TileShape<T, kDim>;
    const int64_t rows = p.batch * p.heads * p.seq;
    const int64_t q_elems = p.batch * p.seq * p.heads * p.head_dim;
    const int64_t kv_elems = p.batch * p.seq * p.kv_heads * p.head_dim;
    const DeviceBuffer lse2(static_cast<size_t>(rows) * sizeof(float), stream);
    const DeviceBuffer dr(static_cast<size_t>(rows) * sizeof(float), stream);
    const DeviceBuffer acc_q(static_cast<size_t>(q_elems) * sizeof(float), stream);
    const DeviceBuffer acc_k(static_cast<size_t>(kv_elems) * sizeof(float), stream);
    const DeviceBuffer acc_v(static_cast<size_t>(kv_elems) * sizeof(float), stream);
    RA_CUDA_CHECK(cudaMemsetAsync(acc_q.as<float>(), 0,
                                  static_cast<size_t>(q_elems) * sizeof(float), stream));
    RA_CUDA_CHECK(cudaMemsetAsync(acc_k.as<float>(), 0,
                                  static_cast<size_t>(kv_elems) * sizeof(float), stream));
    RA_CUDA_CHECK(cudaMemsetAsync(acc_v.as<float>(), 0,
                                  static_cast<size_t>(kv_elems) * sizeof(float), stream));

    rows_kernel<T><<<blocks_for(rows, kWarps), kThreads, 0, stream>>>(
        static_cast<const T*>(bp.dout), bp.dout_st, static_cast<const T*>(p.out), p.out_st, p.lse,
        p.lse_st, p.batch, p.seq, p.heads, p.head_dim, lse2.as<float>(), dr.as<float>());
    RA_CUDA_CHECK_LAUNCH("rows_kernel");

    const int64_t smem_dkdv = BackwardLayout<T, kDim>(p.head_dim, true).bytes;
    const int64_t smem_dq = BackwardLayout<T, kDim>(p.head_dim, false).bytes;
    allow_shared_memory(reinterpret_cast<const void*>(&dkdv_kernel<T, kDim>), smem_dkdv,
                        "the CUDA dK/dV kernel");
    allow_shared_memory(reinterpret_cast<const void*>(&dq_kernel<T, kDim>), smem_dq,
                        "the CUDA dQ kernel");
    BackwardArgs args{p.q,
                      p.k,
                      p.v,
                      bp.dout,
                      p.q_st,
                      p.k_st,
                      p.v_st,
                      bp.dout_st,
                      p.seq,
                      p.heads,
                      p.kv_heads,
                      p.head_dim,
                      p.scale,
                      p.scale * kLog2e,
                      p.out_factor,
                      p.causal,
                      nullptr,
                      nullptr,
                      lse2.as<float>(),
                      dr.as<float>(),
                      acc_q.as<float>(),
                      acc_k.as<float>(),
                      acc_v.as<float>()};
    for (int branch = 0; branch < static_cast<int>(p.branches.size()); ++branch) {
      const TaskList by_key = backward_tasks(p, branch, Shape::kBK, true);
      const DeviceBuffer key_tasks = upload(by_key.tasks, stream);
      const DeviceBuffer key_heads = upload(by_key.heads, stream);
      args.tasks = key_tasks.as<Task>();
      args.heads_of = key_heads.as<int>();
      dkdv_kernel<T, kDim>
          <<<task_grid(by_key, p.batch), kThreads, static_cast<size_t>(smem_dkdv), stream>>>(args);
      RA_CUDA_CHECK_LAUNCH("dkdv_kernel");

      const TaskList by_query = backward_tasks(p, branch, Shape::kBQ, false);
      const DeviceBuffer query_tasks = upload(by_query.tasks, stream);
      const DeviceBuffer query_heads = upload(by_query.heads, stream);
      args.tasks = query_tasks.as<Task>();
      args.heads_of = query_heads.as<int>();
      dq_kernel<T, kDim>
          <<<task_grid(by_query, p.batch), kThreads, static_cast<size_t>(smem_dq), stream>>>(args);
      RA_CUDA_CHECK_LAUNCH("dq_kernel");
    }
    cast_into<T>(acc_q.as<float>(), bp.dq, bp.dq_st, p.batch, p.seq, p.heads, p.head_dim, stream);
    cast_into<T>(acc_k.as<float>(), bp.dk, bp.dk_st, p.batch, p.seq, p.kv_heads, p.head_dim,
                 stream);
    cast_into<T>(acc_v.as<float>(), bp.dv, bp.dv_st, p.batch, p.seq, p.kv_heads, p.head_dim,
                 stream);
    RA_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
};

}  // namespace

void backward(const BackwardProblem& bp, void* stream) {
  require(bp.fwd.shard_begin == 0 && bp.fwd.shard_rows == bp.fwd.seq,
          "the CUDA backend runs whole sequences on one device (no shards)");
  dispatch<Backward>(bp.fwd.dtype, bp.fwd.head_dim, bp, static_cast<cudaStream_t>(stream));
}

}  // namespace ringattn::cuda
