// The CUDA block-sparse kernels (block_sparse_cuda.h). Rows are global sequence rows; a
// query tile is BQ rows of one query block, a key tile BK rows of one key block (block sizes
// that are not multiples of the tiles end in a partial tile). Scores are in log2 units.

#include "src/backend/cuda/attention_cuda.h"
#include "src/backend/cuda/block_sparse_cuda.h"
#include "src/backend/cuda/runtime.h"

namespace ringattn::cuda {

namespace {

struct SparseArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  void* out;   // forward: out (T); backward: dq (T)
  float* lse;  // forward: lse, optional
  void* dk;
  void* dv;
  Strides3 q_st, k_st, v_st, dout_st, out_st, lse_st, dk_st, dv_st;
  int64_t seq, heads, group, head_dim, bs;
  float scale, scale_log2;
  bool causal;
  const int* ptr;  // the CSR (query-major, or key-major for dK/dV)
  const int* idx;
  const int* head;
  const float* lse2;  // backward: [B][H][N] lse in log2 units
  const float* dr;    // backward: [B][H][N] rowsum(dout * out)
};

// The element offset of row n of head h in a [B, N, heads, D] view.
__device__ __forceinline__ int64_t row_at(const Strides3& st, int64_t b, int64_t n, int64_t h) {
  return b * st.b + n * st.n + h * st.h;
}

// The entries [begin, end) of CSR row `row` of head h.
__device__ __forceinline__ int2 csr_row(const SparseArgs& a, int64_t h, int64_t row) {
  const int at = a.head[h] + static_cast<int>(row);
  return make_int2(a.ptr[at], a.ptr[at + 1]);
}

// Whether causal attention hides the whole key tile [k0, ...) from queries before q_end.
__device__ __forceinline__ bool tile_hidden(const SparseArgs& a, int64_t q_end, int64_t k0) {
  return a.causal && k0 >= q_end;
}

// Loads K and V rows [k0, k0 + nk) of kv head hk into the tiles ks, vs.
template <typename T>
__device__ void load_kv(const SparseArgs& a, T* ks, T* vs, int ld, int rows, int dp, int64_t b,
                        int64_t hk, int64_t k0, int nk) {
  load_rows(ks, ld, rows, dp, static_cast<const T*>(a.k) + row_at(a.k_st, b, k0, hk), a.k_st.n, nk,
            a.head_dim);
  load_rows(vs, ld, rows, dp, static_cast<const T*>(a.v) + row_at(a.v_st, b, k0, hk), a.v_st.n, nk,
            a.head_dim);
}

// The rows [t0, t0 + n) of block `blk` that block blockIdx.x computes when every block of
// bs rows is cut into tiles of `tile` rows.
struct BlockTile {
  int64_t blk, t0;
  int n;
};
__device__ inline BlockTile block_tile(int64_t bs, int tile) {
  const int64_t tiles = ceil_div(bs, tile);
  const int64_t blk = blockIdx.x / tiles, t0 = blk * bs + (blockIdx.x % tiles) * tile;
  return {blk, t0, static_cast<int>(min64(tile, (blk + 1) * bs - t0))};
}

// Forward, one block: query tile [q0, q0 + nq) of query block blockIdx.x / tiles, head
// blockIdx.y, batch blockIdx.z, against every key tile of the key blocks it lists.
template <typename T, int kDim>
__global__ void __launch_bounds__(kThreads) sparse_forward_kernel(SparseArgs a) {
  using Layout = ForwardLayout<T, kDim>;
  constexpr int BQ = Layout::kBQ, BK = Layout::kBK;
  const BlockTile bt = block_tile(a.bs, BQ);
  const int64_t qb = bt.blk, q0 = bt.t0, h = blockIdx.y, b = blockIdx.z;
  const int nq = bt.n;

  extern __shared__ __align__(128) char smem[];
  FlashTile<T, kDim> f(smem, a.head_dim);
  const Layout& L = f.L;
  load_rows(f.qs, L.ldt, BQ, L.dp, static_cast<const T*>(a.q) + row_at(a.q_st, b, q0, h), a.q_st.n,
            nq, a.head_dim);
  f.reset();

  const int2 list = csr_row(a, h, qb);
  for (int e = list.x; e < list.y; ++e) {
    const int64_t kb = a.idx[e];
    for (int64_t k0 = kb * a.bs; k0 < (kb + 1) * a.bs && !tile_hidden(a, q0 + nq, k0); k0 += BK) {
      const int nk = static_cast<int>(min64(BK, (kb + 1) * a.bs - k0));
      __syncthreads();  // the previous tile's products are done with K, V and P
      load_kv(a, f.ks, f.vs, L.ldt, BK, L.dp, b, h / a.group, k0, nk);
      __syncthreads();
      f.attend(nq, nk, q0, k0, a.causal, a.scale_log2);
    }
  }
  __syncthreads();  // the final reads see the initial values when no key tile was visible

  T* out = static_cast<T*>(a.out);
  for (int idx = threadIdx.x; idx < nq * a.head_dim; idx += kThreads) {
    const int i = idx / static_cast<int>(a.head_dim), d = idx % static_cast<int>(a.head_dim);
    out[row_at(a.out_st, b, q0 + i, h) + d] = from_float<T>(f.out(i, d));
  }
  if (a.lse == nullptr) return;
  for (int i = threadIdx.x; i < nq; i += kThreads) a.lse[row_at(a.lse_st, b, q0 + i, h)] = f.lse(i);
}

// One warp per row (b, h, n): dr = sum_d dout * out, lse2 = lse * log2(e).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sparse_rows_kernel(const T* dout, Strides3 dout_st, const T* out, Strides3 out_st,
                       const float* lse, Strides3 lse_st, int64_t batch, int64_t seq, int64_t heads,
                       int64_t head_dim, float* lse2, float* dr) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (row >= batch * heads * seq) return;
  const int64_t n = row % seq, h = row / seq % heads, b = row / seq / heads;
  const T* g = dout + row_at(dout_st, b, n, h);
  const T* o = out + row_at(out_st, b, n, h);
  float sum = 0.0f;
  for (int64_t d = lane; d < head_dim; d += 32) sum += to_float(g[d]) * to_float(o[d]);
  sum = warp_sum(sum);
  if (lane == 0) {
    dr[row] = sum;
    lse2[row] = lse[row_at(lse_st, b, n, h)] * kLog2e;
  }
}

// Loads query rows [q0, q0 + nq) of head h: Q, dO, lse2 and Dr.
template <typename T, int kDim>
__device__ void load_query_tile(const SparseArgs& a, const BackwardLayout<T, kDim>& L, char* smem,
                                int64_t b, int64_t h, int64_t q0, int nq) {
  constexpr int BQ = BackwardLayout<T, kDim>::kBQ;
  load_rows(smem_at<T>(smem, L.q), L.ldt, BQ, L.dp,
            static_cast<const T*>(a.q) + row_at(a.q_st, b, q0, h), a.q_st.n, nq, a.head_dim);
  load_rows(smem_at<T>(smem, L.dout), L.ldt, BQ, L.dp,
            static_cast<const T*>(a.dout) + row_at(a.dout_st, b, q0, h), a.dout_st.n, nq,
            a.head_dim);
  float* lse2 = smem_at<float>(smem, L.lse2);
  float* dr = smem_at<float>(smem, L.dr);
  for (int i = threadIdx.x; i < BQ; i += kThreads) {
    const int64_t stat = (b * a.heads + h) * a.seq + q0 + i;
    lse2[i] = i < nq ? a.lse2[stat] : 0.0f;
    dr[i] = i < nq ? a.dr[stat] : 0.0f;
  }
}

// Writes factor * tile rows [0, rows) into rows [n0, n0 + rows) of head h of a [B, N, H, D]
// view (T).
template <typename T>
__device__ void store_tile(const SparseArgs& a, void* dst, const Strides3& st, int64_t b,
                           int64_t n0, int rows, int64_t h, const float* tile, int ld,
                           float factor) {
  for (int idx = threadIdx.x; idx < rows * a.head_dim; idx += kThreads) {
    const int i = idx / static_cast<int>(a.head_dim), d = idx % static_cast<int>(a.head_dim);
    static_cast<T*>(dst)[row_at(st, b, n0 + i, h) + d] = from_float<T>(factor * tile[i * ld + d]);
  }
}

// dQ, one block: query tile [q0, q0 + nq) of query block blockIdx.x / tiles, head
// blockIdx.y, batch blockIdx.z, over the key tiles of the key blocks it lists.
template <typename T, int kDim>
__global__ void __launch_bounds__(kThreads) sparse_dq_kernel(SparseArgs a) {
  using Layout = BackwardLayout<T, kDim>;
  constexpr int BQ = Layout::kBQ, BK = Layout::kBK;
  const BlockTile bt = block_tile(a.bs, BQ);
  const int64_t qb = bt.blk, q0 = bt.t0, h = blockIdx.y, b = blockIdx.z;
  const int nq = bt.n;

  extern __shared__ __align__(128) char smem[];
  const Layout L(a.head_dim, false);
  float* dqs = smem_at<float>(smem, L.acc1);
  load_query_tile(a, L, smem, b, h, q0, nq);
  fill_tile(dqs, L.lda, BQ, L.dp, 0.0f);
  const int2 list = csr_row(a, h, qb);
  for (int e = list.x; e < list.y; ++e) {
    const int64_t kb = a.idx[e];
    for (int64_t k0 = kb * a.bs; k0 < (kb + 1) * a.bs && !tile_hidden(a, q0 + nq, k0); k0 += BK) {
      const int nk = static_cast<int>(min64(BK, (kb + 1) * a.bs - k0));
      __syncthreads();  // the previous product is done with K and dS
      load_kv(a, smem_at<T>(smem, L.k), smem_at<T>(smem, L.v), L.ldt, BK, L.dp, b, h / a.group, k0,
              nk);
      __syncthreads();
      probabilities(L, smem, q0, nq, k0, nk, a.causal, a.scale_log2, 1.0f);
      __syncthreads();
      gemm_tile<T, false, false>(smem_at<T>(smem, L.ds), L.ldp, smem_at<T>(smem, L.k), L.ldt, dqs,
                                 L.lda, BQ, L.dp, BK, true);  // dQ += dS K
    }
  }
  __syncthreads();
  store_tile<T>(a, a.out, a.out_st, b, q0, nq, h, dqs, L.lda, a.scale);
}

// dK and dV, one block: key tile [k0, k0 + nk) of key block blockIdx.x / tiles, kv head
// blockIdx.y, batch blockIdx.z; the query heads of the kv head in order, each over the query
// tiles of the query blocks listing the key block (key-major CSR), in order.
template <typename T, int kDim>
__global__ void __launch_bounds__(kThreads) sparse_dkdv_kernel(SparseArgs a) {
  using Layout = BackwardLayout<T, kDim>;
  constexpr int BQ = Layout::kBQ, BK = Layout::kBK;
  const BlockTile bt = block_tile(a.bs, BK);
  const int64_t kb = bt.blk, k0 = bt.t0, hk = blockIdx.y, b = blockIdx.z;
  const int nk = bt.n;

  extern __shared__ __align__(128) char smem[];
  const Layout L(a.head_dim, true);
  float* dks = smem_at<float>(smem, L.acc1);
  float* dvs = smem_at<float>(smem, L.acc2);
  load_kv(a, smem_at<T>(smem, L.k), smem_at<T>(smem, L.v), L.ldt, BK, L.dp, b, hk, k0, nk);
  fill_tile(dks, L.lda, BK, L.dp, 0.0f);
  fill_tile(dvs, L.lda, BK, L.dp, 0.0f);
  for (int64_t h = hk * a.group; h < (hk + 1) * a.group; ++h) {
    const int2 list = csr_row(a, h, kb);
    for (int e = list.x; e < list.y; ++e) {
      const int64_t qb = a.idx[e];
      for (int64_t q0 = qb * a.bs; q0 < (qb + 1) * a.bs; q0 += BQ) {
        const int nq = static_cast<int>(min64(BQ, (qb + 1) * a.bs - q0));
        if (tile_hidden(a, q0 + nq, k0)) continue;
        __syncthreads();  // the previous products are done with Q, dO, P and dS
        load_query_tile(a, L, smem, b, h, q0, nq);
        __syncthreads();
        probabilities(L, smem, q0, nq, k0, nk, a.causal, a.scale_log2, 1.0f);
        __syncthreads();
        // dV += P^T dO, dK += dS^T Q (the scale is applied at the end).
        gemm_tile<T, true, false>(smem_at<T>(smem, L.p), L.ldp, smem_at<T>(smem, L.dout), L.ldt,
                                  dvs, L.lda, BK, L.dp, BQ, true);
        gemm_tile<T, true, false>(smem_at<T>(smem, L.ds), L.ldp, smem_at<T>(smem, L.q), L.ldt, dks,
                                  L.lda, BK, L.dp, BQ, true);
      }
    }
  }
  __syncthreads();
  store_tile<T>(a, a.dk, a.dk_st, b, k0, nk, hk, dks, L.lda, a.scale);
  store_tile<T>(a, a.dv, a.dv_st, b, k0, nk, hk, dvs, L.lda, 1.0f);
}

// The CSR of `csr` on the device, pointed to by args.
struct DeviceCsr {
  DeviceBuffer ptr, idx, head;
  DeviceCsr(const BlockCsr& csr, SparseArgs& args, cudaStream_t stream)
      : ptr(upload(csr.ptr, stream)), idx(upload(csr.idx, stream)), head(upload(csr.head, stream)) {
    args.ptr = ptr.as<int>();
    args.idx = idx.as<int>();
    args.head = head.as<int>();
  }
};

// Arguments common to every kernel of p (the CSR and backward fields are set by the caller).
SparseArgs base_args(const Problem& p, int64_t bs) {
  SparseArgs a{};
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.out = p.out;
  a.lse = p.lse;
  a.q_st = p.q_st;
  a.k_st = p.k_st;
  a.v_st = p.v_st;
  a.out_st = p.out_st;
  a.lse_st = p.lse_st;
  a.seq = p.seq;
  a.heads = p.heads;
  a.group = p.heads / p.kv_heads;
  a.head_dim = p.head_dim;
  a.bs = bs;
  a.scale = p.scale;
  a.scale_log2 = p.scale * kLog2e;
  a.causal = p.causal;
  return a;
}

// The grid of (row tiles of every block, heads, batch).
dim3 sparse_grid(int64_t blocks, int64_t bs, int64_t tile_rows, int64_t heads, int64_t batch) {
  const int64_t x = blocks * ceil_div(bs, tile_rows);
  require_supported(
      x < (int64_t{1} << 31) && heads <= 65535 && batch <= 65535,
      "the CUDA block-sparse kernels run at most 65535 heads and batch entries and 2^31 "
      "tiles per call, but this call has H = ",
      heads, ", B = ", batch, " and ", x, " tiles; split the batch or the heads");
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(heads), static_cast<unsigned>(batch));
}

template <typename T, int kDim>
struct SparseForward {
  static void run(const Problem& p, const BlockCsr& csr, cudaStream_t stream, bool wait) {
    const int64_t bs = p.seq / csr.blocks;
    SparseArgs args = base_args(p, bs);
    const DeviceCsr on_device(csr, args, stream);
    const int64_t smem = ForwardLayout<T, kDim>(p.head_dim).bytes;
    allow_shared_memory(reinterpret_cast<const void*>(&sparse_forward_kernel<T, kDim>), smem,
                        "the CUDA block-sparse forward kernel");
    sparse_forward_kernel<T, kDim>
        <<<sparse_grid(csr.blocks, bs, TileShape<T, kDim>::kBQ, p.heads, p.batch), kThreads,
           static_cast<size_t>(smem), stream>>>(args);
    RA_CUDA_CHECK_LAUNCH("sparse_forward_kernel");
    if (wait) RA_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
};

template <typename T, int kDim>
struct SparseBackward {
  static void run(const BackwardProblem& bp, const BlockCsr& by_query, const BlockCsr& by_key,
                  cudaStream_t stream, bool wait) {
    const Problem& p = bp.fwd;
    const int64_t bs = p.seq / by_query.blocks, rows = p.batch * p.heads * p.seq;
    const DeviceBuffer lse2(static_cast<size_t>(rows) * sizeof(float), stream);
    const DeviceBuffer dr(static_cast<size_t>(rows) * sizeof(float), stream);
    sparse_rows_kernel<T><<<blocks_for(rows, kWarps), kThreads, 0, stream>>>(
        static_cast<const T*>(bp.dout), bp.dout_st, static_cast<const T*>(p.out), p.out_st, p.lse,
        p.lse_st, p.batch, p.seq, p.heads, p.head_dim, lse2.as<float>(), dr.as<float>());
    RA_CUDA_CHECK_LAUNCH("sparse_rows_kernel");

    SparseArgs args = base_args(p, bs);
    args.dout = bp.dout;
    args.dout_st = bp.dout_st;
    args.out = bp.dq;
    args.out_st = bp.dq_st;
    args.lse = nullptr;
    args.dk = bp.dk;
    args.dk_st = bp.dk_st;
    args.dv = bp.dv;
    args.dv_st = bp.dv_st;
    args.lse2 = lse2.as<float>();
    args.dr = dr.as<float>();
    const int64_t smem_dq = BackwardLayout<T, kDim>(p.head_dim, false).bytes;
    const int64_t smem_dkdv = BackwardLayout<T, kDim>(p.head_dim, true).bytes;
    allow_shared_memory(reinterpret_cast<const void*>(&sparse_dq_kernel<T, kDim>), smem_dq,
                        "the CUDA block-sparse dQ kernel");
    allow_shared_memory(reinterpret_cast<const void*>(&sparse_dkdv_kernel<T, kDim>), smem_dkdv,
                        "the CUDA block-sparse dK/dV kernel");
    {
      const DeviceCsr on_device(by_query, args, stream);
      sparse_dq_kernel<T, kDim>
          <<<sparse_grid(by_query.blocks, bs, TileShape<T, kDim>::kBQ, p.heads, p.batch), kThreads,
             static_cast<size_t>(smem_dq), stream>>>(args);
      RA_CUDA_CHECK_LAUNCH("sparse_dq_kernel");
    }
    const DeviceCsr on_device(by_key, args, stream);
    sparse_dkdv_kernel<T, kDim>
        <<<sparse_grid(by_key.blocks, bs, TileShape<T, kDim>::kBK, p.kv_heads, p.batch), kThreads,
           static_cast<size_t>(smem_dkdv), stream>>>(args);
    RA_CUDA_CHECK_LAUNCH("sparse_dkdv_kernel");
    if (wait) RA_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
};

void require_whole_sequence(const Problem& p) {
  require(p.shard_begin == 0 && p.shard_rows == p.seq,
          "the CUDA block-sparse backend runs whole sequences on one device (no shards)");
}

}  // namespace

void block_sparse_forward(const Problem& p, const BlockCsr& by_query, void* stream, bool wait) {
  require_whole_sequence(p);
  dispatch<SparseForward>(p.dtype, p.head_dim, p, by_query, static_cast<cudaStream_t>(stream),
                          wait);
}

void block_sparse_backward(const BackwardProblem& bp, const BlockCsr& by_query,
                           const BlockCsr& by_key, void* stream, bool wait) {
  require_whole_sequence(bp.fwd);
  dispatch<SparseBackward>(bp.fwd.dtype, bp.fwd.head_dim, bp, by_query, by_key,
                           static_cast<cudaStream_t>(stream), wait);
}

}  // namespace ringattn::cuda
