#pragma once
// Device building blocks shared by the forward and backward kernels: element types, tile
// shapes, shared-memory layouts, loading strided (dilated) rows and the block-wide tile
// products (tensor cores through WMMA for fp16/bf16, plain SIMT loops for fp32).
//
// Conventions: a block has kThreads threads; tiles live in shared memory, row-major with a
// padded leading dimension; every helper below is called by all threads of the block, and
// the caller places the __syncthreads() between steps.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "src/base/index_math.h"
#include "src/plan/gpu_tasks.h"
#include "src/plan/problem.h"

namespace ringattn::cuda {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

__device__ __forceinline__ float to_float(float x) {
  return x;
}
__device__ __forceinline__ float to_float(__half x) {
  return __half2float(x);
}
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    return __float2bfloat16_rn(x);
  }
}

// Tile rows: kBQ queries by kBK keys. kDim is 64, 128, or 0 for the generic path (any D up
// to 256, padded to a multiple of 16). fp32 (SIMT) uses smaller tiles so that every layout
// fits the 163 KiB of shared memory of an sm_80 block.
template <typename T, int kDim>
struct TileShape {
  static constexpr bool kF32 = std::is_same_v<T, float>;
  static constexpr int kBQ = kF32 ? (kDim == 0 ? 16 : 32) : (kDim == 0 ? 32 : 64);
  static constexpr int kBK = kF32 ? (kDim == 0 ? 16 : 32) : (kDim == 64 ? 64 : 32);
  static_assert(kBQ % 16 == 0 && kBK % 16 == 0, "tiles are made of 16x16 fragments");
};

// The padded head dim the kernels work with (a multiple of 16; zero columns past D).
RA_HD int padded_dim(int kDim, int64_t head_dim) {
  return kDim != 0 ? kDim : static_cast<int>(round_up(head_dim, 16));
}

// Leading dimensions: +16 bytes per row keeps every 16-row / 16-column fragment 32-byte
// aligned (WMMA's rule) and staggers shared-memory banks.
template <typename T>
RA_HD int ld_of(int cols) {
  return cols + 16 / static_cast<int>(sizeof(T));
}

// Byte offsets of buffers carved from one dynamic shared-memory block, 128-byte aligned.
struct Carver {
  int64_t used = 0;
  RA_HD int64_t take(int64_t bytes) {
    const int64_t at = used;
    used += round_up(bytes, 128);
    return at;
  }
};

// Forward kernel: Q [BQ][dp], K and V [BK][dp] (T), S [BQ][BK] (fp32), P [BQ][BK] (T),
// O [BQ][dp] (fp32), and per query row m, l (log2 units) and the rescale factor alpha.
template <typename T, int kDim>
struct ForwardLayout {
  static constexpr int kBQ = TileShape<T, kDim>::kBQ, kBK = TileShape<T, kDim>::kBK;
  int dp, ldt, lds, ldp, ldo;
  int64_t q, k, v, s, p, o, m, l, alpha, bytes;
  RA_HD explicit ForwardLayout(int64_t head_dim) {
    dp = padded_dim(kDim, head_dim);
    ldt = ld_of<T>(dp);
    lds = ld_of<float>(kBK);
    ldp = ld_of<T>(kBK);
    ldo = ld_of<float>(dp);
    Carver c;
    q = c.take(int64_t{kBQ} * ldt * sizeof(T));
    k = c.take(int64_t{kBK} * ldt * sizeof(T));
    v = c.take(int64_t{kBK} * ldt * sizeof(T));
    s = c.take(int64_t{kBQ} * lds * sizeof(float));
    p = c.take(int64_t{kBQ} * ldp * sizeof(T));
    o = c.take(int64_t{kBQ} * ldo * sizeof(float));
    m = c.take(kBQ * sizeof(float));
    l = c.take(kBQ * sizeof(float));
    alpha = c.take(kBQ * sizeof(float));
    bytes = c.used;
  }
};

// Backward kernels: Q and dO [BQ][dp], K and V [BK][dp] (T); S and dP [BQ][BK] (fp32);
// P and dS [BQ][BK] (T); lse (log2 units) and Dr per query row; accumulators acc1 and
// acc2 [acc_rows][dp] (fp32): dQ (acc1, BQ rows) or dK and dV (BK rows each).
template <typename T, int kDim>
struct BackwardLayout {
  static constexpr int kBQ = TileShape<T, kDim>::kBQ, kBK = TileShape<T, kDim>::kBK;
  int dp, ldt, lds, ldp, lda;
  int64_t q, dout, k, v, s, dp_tile, p, ds, lse2, dr, acc1, acc2, bytes;
  RA_HD BackwardLayout(int64_t head_dim, bool by_key) {
    dp = padded_dim(kDim, head_dim);
    ldt = ld_of<T>(dp);
    lds = ld_of<float>(kBK);
    ldp = ld_of<T>(kBK);
    lda = ld_of<float>(dp);
    const int64_t acc_rows = by_key ? kBK : kBQ;
    Carver c;
    q = c.take(int64_t{kBQ} * ldt * sizeof(T));
    dout = c.take(int64_t{kBQ} * ldt * sizeof(T));
    k = c.take(int64_t{kBK} * ldt * sizeof(T));
    v = c.take(int64_t{kBK} * ldt * sizeof(T));
    s = c.take(int64_t{kBQ} * lds * sizeof(float));
    dp_tile = c.take(int64_t{kBQ} * lds * sizeof(float));
    p = c.take(int64_t{kBQ} * ldp * sizeof(T));
    ds = c.take(int64_t{kBQ} * ldp * sizeof(T));
    lse2 = c.take(kBQ * sizeof(float));
    dr = c.take(kBQ * sizeof(float));
    acc1 = c.take(acc_rows * lda * sizeof(float));
    acc2 = by_key ? c.take(acc_rows * lda * sizeof(float)) : acc1;
    bytes = c.used;
  }
};

template <typename U>
__device__ __forceinline__ U* smem_at(char* base, int64_t offset) {
  return reinterpret_cast<U*>(base + offset);
}

// dst[i][d] (i < rows, d < dp, leading dimension ld) = row i of a strided sequence of rows
// (row i at src + i * row_stride elements) for i < valid and d < head_dim; 0 elsewhere, so
// that padded rows and columns never carry garbage into a product.
template <typename T>
__device__ void load_rows(T* dst, int ld, int rows, int dp, const T* src, int64_t row_stride,
                          int valid, int64_t head_dim) {
  for (int idx = threadIdx.x; idx < rows * dp; idx += kThreads) {
    const int i = idx / dp, d = idx % dp;
    dst[i * ld + d] = (i < valid && d < head_dim) ? src[i * row_stride + d] : from_float<T>(0.0f);
  }
}

// Fills rows x cols fp32 entries of a tile (leading dimension ld) with `value`.
__device__ inline void fill_tile(float* dst, int ld, int rows, int cols, float value) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
    dst[(idx / cols) * ld + idx % cols] = value;
  }
}

// C[M][N] (fp32, ldc) = (accumulate ? C : 0) + A[M][K] * B[K][N] where
//   A(i, k) = kTransA ? a[k * lda + i] : a[i * lda + k]
//   B(k, j) = kTransB ? b[j * ldb + k] : b[k * ldb + j]
// M, N and K are multiples of 16. Each 16x16 block of C belongs to one warp.
template <typename T, bool kTransA, bool kTransB>
__device__ void gemm_tile(const T* a, int lda, const T* b, int ldb, float* c, int ldc, int M, int N,
                          int K, bool accumulate) {
  if constexpr (std::is_same_v<T, float>) {
    for (int idx = threadIdx.x; idx < M * N; idx += kThreads) {
      const int i = idx / N, j = idx % N;
      float sum = accumulate ? c[i * ldc + j] : 0.0f;
      for (int k = 0; k < K; ++k) {
        const float x = kTransA ? a[k * lda + i] : a[i * lda + k];
        const float y = kTransB ? b[j * ldb + k] : b[k * ldb + j];
        sum += x * y;
      }
      c[i * ldc + j] = sum;
    }
  } else {
    namespace wmma = nvcuda::wmma;
    using LayoutA = std::conditional_t<kTransA, wmma::col_major, wmma::row_major>;
    using LayoutB = std::conditional_t<kTransB, wmma::col_major, wmma::row_major>;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int blocks_n = N / 16;
    for (int blk = warp; blk < (M / 16) * blocks_n; blk += kWarps) {
      const int i0 = (blk / blocks_n) * 16, j0 = (blk % blocks_n) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      if (accumulate) {
        wmma::load_matrix_sync(acc, c + i0 * ldc + j0, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(acc, 0.0f);
      }
      for (int k0 = 0; k0 < K; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb;
        wmma::load_matrix_sync(fa, kTransA ? a + k0 * lda + i0 : a + i0 * lda + k0, lda);
        wmma::load_matrix_sync(fb, kTransB ? b + j0 * ldb + k0 : b + k0 * ldb + j0, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(c + i0 * ldc + j0, acc, ldc, wmma::mem_row_major);
    }
  }
}

// Butterfly reductions: every lane of the warp gets the result.
__device__ __forceinline__ float warp_max(float x) {
  for (int step = 16; step > 0; step /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, step));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int step = 16; step > 0; step /= 2) x += __shfl_xor_sync(0xffffffffu, x, step);
  return x;
}

// The local row (of a view holding global rows row0 ..) of kept index t of segment
// task.seg0 + seg of task `task`.
__device__ __forceinline__ int64_t local_row(const Task& task, int64_t seg, int64_t t,
                                             int64_t row0) {
  return (task.seg0 + seg) * task.s + task.o + t * task.r - row0;
}

// The element offset of kept index t of batch b, segment seg of a task's row source.
__device__ __forceinline__ int64_t source_offset(const RowSource& src, int64_t b, int64_t seg,
                                                 int64_t t) {
  return src.off + b * src.b_st + seg * src.seg_st + t * src.t_st;
}

// The rows [t0, t0 + n) of segment `seg` that block blockIdx.x computes when a range
// [lo, hi) of every segment of `task` is cut into tiles of `tile` rows (tiles_per_seg per
// segment); false for a block past the task's tiles.
struct TaskTile {
  int64_t seg, t0;
  int n;
};
__device__ inline bool task_tile(const Task& task, int64_t lo, int64_t hi, int tile,
                                 TaskTile& out) {
  if (static_cast<int64_t>(blockIdx.x) >= task.segments * task.tiles_per_seg) return false;
  out.seg = blockIdx.x / task.tiles_per_seg;
  out.t0 = lo + (blockIdx.x % task.tiles_per_seg) * tile;
  out.n = static_cast<int>(min64(tile, hi - out.t0));
  return true;
}

// The shared-memory state of one query tile of the flash forward (ForwardLayout): Q, K, V
// tiles, S, P, the fp32 output accumulator O and per query row the running max m, sum l (log2
// units) and rescale factor alpha. Used by every forward kernel; all threads call each step.
template <typename T, int kDim>
struct FlashTile {
  using Layout = ForwardLayout<T, kDim>;
  static constexpr int BQ = Layout::kBQ, BK = Layout::kBK;
  Layout L;
  T *qs, *ks, *vs, *ps;
  float *ss, *os, *ms, *ls, *alphas;

  __device__ FlashTile(char* smem, int64_t head_dim)
      : L(head_dim),
        qs(smem_at<T>(smem, L.q)),
        ks(smem_at<T>(smem, L.k)),
        vs(smem_at<T>(smem, L.v)),
        ps(smem_at<T>(smem, L.p)),
        ss(smem_at<float>(smem, L.s)),
        os(smem_at<float>(smem, L.o)),
        ms(smem_at<float>(smem, L.m)),
        ls(smem_at<float>(smem, L.l)),
        alphas(smem_at<float>(smem, L.alpha)) {}

  // O = 0, m = -inf, l = 0.
  __device__ void reset() {
    fill_tile(os, L.ldo, BQ, L.dp, 0.0f);
    for (int i = threadIdx.x; i < BQ; i += kThreads) {
      ms[i] = kNegInf;
      ls[i] = 0.0f;
    }
  }

  // One key tile, K and V already in shared memory (the caller syncs after loading them):
  // S = Q K^T; per query row (one warp each) the online-softmax update in log2 units with
  // SPEC.md's m_ref guard, hiding rows i >= nq, keys j >= nk and, with causal, keys after the
  // query (kept index k0 + j > q0 + i); then O = alpha O + P V. Ends after the P V product:
  // the caller syncs before it overwrites K or V.
  __device__ void attend(int nq, int nk, int64_t q0, int64_t k0, bool causal, float scale_log2) {
    const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
    gemm_tile<T, false, true>(qs, L.ldt, ks, L.ldt, ss, L.lds, BQ, BK, L.dp, false);  // S = QK^T
    __syncthreads();
    constexpr int kPerLane = (BK + 31) / 32;
    for (int i = warp; i < BQ; i += kWarps) {
      float sv[kPerLane];
      float mx = kNegInf;
      for (int c = 0; c < kPerLane; ++c) {
        const int j = lane + 32 * c;
        const bool visible = i < nq && j < nk && (!causal || k0 + j <= q0 + i);
        sv[c] = visible ? ss[i * L.lds + j] * scale_log2 : kNegInf;
        mx = fmaxf(mx, sv[c]);
      }
      mx = warp_max(mx);
      const float m_old = ms[i];
      const float m_new = fmaxf(m_old, mx);
      const float m_ref = m_new == kNegInf ? 0.0f : m_new;
      float sum = 0.0f;
      for (int c = 0; c < kPerLane; ++c) {
        const int j = lane + 32 * c;
        const float p = exp2f(sv[c] - m_ref);  // 0 for hidden keys
        if (j < BK) ps[i * L.ldp + j] = from_float<T>(p);
        sum += p;
      }
      sum = warp_sum(sum);
      __syncwarp();  // every lane has read ms[i] before lane 0 updates it
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_ref);
        alphas[i] = alpha;
        ls[i] = ls[i] * alpha + sum;
        ms[i] = m_new;
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < BQ * L.dp; idx += kThreads) {
      os[(idx / L.dp) * L.ldo + idx % L.dp] *= alphas[idx / L.dp];
    }
    __syncthreads();
    gemm_tile<T, false, false>(ps, L.ldp, vs, L.ldt, os, L.ldo, BQ, L.dp, BK, true);  // O += PV
  }

  // Row i's normalised output entry d and its lse (natural log): 0 and -inf for a row that
  // saw no key.
  __device__ float out(int i, int d) const {
    return ls[i] > 0.0f ? os[i * L.ldo + d] / ls[i] : 0.0f;
  }
  __device__ float lse(int i) const {
    return ls[i] > 0.0f ? (ms[i] + log2f(ls[i])) * kLn2 : kNegInf;
  }
};

// For query tile [q0, q0 + nq) and key tile [k0, k0 + nk) of the flash backward (Q, dO, K,
// V, lse2 and Dr in shared memory, BackwardLayout): P = exp2(S scale_log2 - lse2) on visible
// pairs (0 elsewhere: rows i >= nq or with lse -inf, keys j >= nk, with causal keys after
// the query) and dS = P (out_factor dP - Dr), where S = Q K^T and dP = dO V^T. Writes P and
// dS (T). All threads call it.
template <typename T, int kDim>
__device__ void probabilities(const BackwardLayout<T, kDim>& L, char* smem, int64_t q0, int nq,
                              int64_t k0, int nk, bool causal, float scale_log2, float out_factor) {
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
    const bool visible = i < nq && j < nk && (!causal || k0 + j <= q0 + i) && lse2[i] != kNegInf;
    // (P <= 1, as it is exactly: at large scores the fp32 lse's rounding could push the
    // exponent above 0 and the gradients to inf.)
    const float p = visible ? exp2f(fminf(ss[i * L.lds + j] * scale_log2 - lse2[i], 0.0f)) : 0.0f;
    const float ds = visible ? p * (out_factor * dps[i * L.lds + j] - dr[i]) : 0.0f;
    ps[i * L.ldp + j] = from_float<T>(p);
    dss[i * L.ldp + j] = from_float<T>(ds);
  }
}

}  // namespace ringattn::cuda
