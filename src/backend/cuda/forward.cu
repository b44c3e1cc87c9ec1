// The CUDA forward: a flash-style kernel computing one (O, lse) partial per (batch, head-branch
// entry, segment, query tile) over the kept (dilated) rows, then a merge kernel that combines
// each row's branch partials (SPEC.md merge) and writes out and lse.

#include "src/backend/cuda/attention_cuda.h"
#include "src/backend/cuda/runtime.h"

namespace ringattn::cuda {

namespace {

struct ForwardArgs {
  const void* q;
  const void* k;  // base pointers of the tasks' row sources
  const void* v;
  int64_t head_dim;
  float scale_log2;  // scale * log2(e): scores in log2 units
  bool causal;
  const Task* tasks;
  float* part_o;    // [part_rows][head_dim]
  float* part_lse;  // [part_rows], natural log
};

// One block: query tile [q0, q0 + BQ) (kept indices) of segment `seg` of task blockIdx.y,
// batch blockIdx.z, against every key tile of [k_lo, k_hi) it can see (causal: tiles past
// the last query are skipped, the diagonal tile is masked).
template <typename T, int kDim>
__global__ void __launch_bounds__(kThreads) forward_kernel(ForwardArgs a) {
  using Layout = ForwardLayout<T, kDim>;
  constexpr int BQ = Layout::kBQ, BK = Layout::kBK;
  const Task task = a.tasks[blockIdx.y];
  const int64_t b = blockIdx.z;
  TaskTile tt;
  if (!task_tile(task, task.q_lo, task.q_hi, BQ, tt)) return;
  const int64_t seg = tt.seg, q0 = tt.t0;
  const int nq = tt.n;

  extern __shared__ __align__(128) char smem[];
  FlashTile<T, kDim> f(smem, a.head_dim);
  const Layout& L = f.L;
  load_rows(f.qs, L.ldt, BQ, L.dp,
            static_cast<const T*>(a.q) + source_offset(task.q_src, b, seg, q0), task.q_src.t_st, nq,
            a.head_dim);
  f.reset();

  const int64_t k_end = a.causal ? min64(task.k_hi, q0 + nq) : task.k_hi;
  for (int64_t k0 = task.k_lo; k0 < k_end; k0 += BK) {
    const int nk = static_cast<int>(min64(BK, task.k_hi - k0));
    load_rows(f.ks, L.ldt, BK, L.dp,
              static_cast<const T*>(a.k) + source_offset(task.k_src, b, seg, k0), task.k_src.t_st,
              nk, a.head_dim);
    load_rows(f.vs, L.ldt, BK, L.dp,
              static_cast<const T*>(a.v) + source_offset(task.v_src, b, seg, k0), task.v_src.t_st,
              nk, a.head_dim);
    __syncthreads();
    f.attend(nq, nk, q0, k0, a.causal, a.scale_log2);
    __syncthreads();
  }
  __syncthreads();  // the final reads see the initial values when no key tile was visible

  const int64_t row0 =
      task.part_row0 + b * task.rows_per_batch + seg * (task.q_hi - task.q_lo) + q0 - task.q_lo;
  for (int idx = threadIdx.x; idx < nq * a.head_dim; idx += kThreads) {
    const int i = idx / static_cast<int>(a.head_dim), d = idx % static_cast<int>(a.head_dim);
    a.part_o[(row0 + i) * a.head_dim + d] = f.out(i, d);
  }
  for (int i = threadIdx.x; i < nq; i += kThreads) a.part_lse[row0 + i] = f.lse(i);
}

struct MergeArgs {
  const Task* tasks;      // optional
  const int* head_begin;  // [H + 1]: head h's tasks are head_begin[h] .. head_begin[h + 1]
  const float* part_o;
  const float* part_lse;
  RowsF32 in[2];  // rows merged before the tasks' partials, in order
  int num_in;
  bool to_f32;  // write dst, else out (times out_factor) and lse
  RowsF32 dst;
  void* out;
  Strides3 out_st;
  float* lse;  // optional
  Strides3 lse_st;
  int64_t batch, rows, row0, head_lo, head_hi, head_dim;  // rows n are global rows row0 + n
  float out_factor;
};

// The partial row of task `t` holding global row n of batch b, or -1 if t does not keep n.
__device__ __forceinline__ int64_t partial_row(const Task& t, int64_t b, int64_t n) {
  const int64_t kept = kept_index_of_row(n, t.s, t.r, t.o);
  if (kept < t.q_lo || kept >= t.q_hi) return -1;  // also kept < 0: not kept
  return t.part_row0 + b * t.rows_per_batch + (n / t.s - t.seg0) * (t.q_hi - t.q_lo) + kept -
         t.q_lo;
}

// Source i of row (b, n, h) of a merge (the rows `in` first, then head h's tasks): its lse
// and O row, or false when it holds nothing for the row.
__device__ __forceinline__ bool merge_source(const MergeArgs& a, int i, int64_t b, int64_t n,
                                             int64_t h, float& lse, const float*& o) {
  if (i < a.num_in) {
    const RowsF32& v = a.in[i];
    lse = *v.lse_at(b, n, h);
    o = v.o_at(b, n, h);
  } else {
    const int64_t pr = partial_row(a.tasks[a.head_begin[h] + i - a.num_in], b, a.row0 + n);
    if (pr < 0) return false;
    lse = a.part_lse[pr];
    o = a.part_o + pr * a.head_dim;
  }
  return lse != kNegInf;
}

// One warp per row (b, n, h); lanes over D. Sources are merged in order:
// L = log sum_i exp(L_i), O = sum_i exp(L_i - L) O_i (a row no source holds: 0 and -inf).
// dst may be in[0] (an accumulator merged in place).
template <typename T>
__global__ void __launch_bounds__(kThreads) merge_kernel(MergeArgs a) {
  constexpr int kPerLane = static_cast<int>(kMaxHeadDim / 32);
  const int64_t heads = a.head_hi - a.head_lo;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (row >= a.batch * a.rows * heads) return;
  const int64_t h = a.head_lo + row % heads, n = row / heads % a.rows, b = row / heads / a.rows;
  const int sources = a.num_in + (a.tasks != nullptr ? a.head_begin[h + 1] - a.head_begin[h] : 0);

  float mx = kNegInf, lse = 0.0f;
  const float* o = nullptr;
  for (int i = 0; i < sources; ++i) {
    if (merge_source(a, i, b, n, h, lse, o)) mx = fmaxf(mx, lse);
  }
  float acc[kPerLane] = {};
  float sum = 0.0f;
  if (mx != kNegInf) {
    for (int i = 0; i < sources; ++i) {
      if (!merge_source(a, i, b, n, h, lse, o)) continue;
      const float w = expf(lse - mx);
      sum += w;
      for (int c = 0; c < kPerLane; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < a.head_dim) acc[c] += w * o[d];
      }
    }
  }
  __syncwarp();  // every lane has read the sources before dst (maybe one of them) is written
  const float merged = sum > 0.0f ? mx + logf(sum) : kNegInf;
  if (a.to_f32) {
    float* out = a.dst.o_at(b, n, h);
    for (int c = 0; c < kPerLane; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < a.head_dim) out[d] = sum > 0.0f ? acc[c] / sum : 0.0f;
    }
    if (lane == 0) *a.dst.lse_at(b, n, h) = merged;
    return;
  }
  const float factor = sum > 0.0f ? a.out_factor / sum : 0.0f;
  T* out = static_cast<T*>(a.out) + b * a.out_st.b + n * a.out_st.n + h * a.out_st.h;
  for (int c = 0; c < kPerLane; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < a.head_dim) out[d] = from_float<T>(acc[c] * factor);
  }
  if (a.lse != nullptr && lane == 0)
    a.lse[b * a.lse_st.b + n * a.lse_st.n + h * a.lse_st.h] = merged;
}

template <typename T, int kDim>
struct TileRows {
  static void run(int64_t& rows) { rows = TileShape<T, kDim>::kBQ; }
};

template <typename T, int kDim>
struct LaunchForward {
  static void run(const Problem& p, const TaskList& list, const void* k, const void* v,
                  float* part_o, float* part_lse, cudaStream_t stream) {
    if (list.tasks.empty() || list.max_tiles == 0) return;
    const DeviceBuffer tasks = upload(list.tasks, stream);
    const ForwardArgs fa{
        p.q, k, v, p.head_dim, p.scale * kLog2e, p.causal, tasks.as<Task>(), part_o, part_lse};
    const int64_t smem = ForwardLayout<T, kDim>(p.head_dim).bytes;
    allow_shared_memory(reinterpret_cast<const void*>(&forward_kernel<T, kDim>), smem,
                        "the CUDA forward kernel");
    forward_kernel<T, kDim>
        <<<task_grid(list, p.batch), kThreads, static_cast<size_t>(smem), stream>>>(fa);
    RA_CUDA_CHECK_LAUNCH("forward_kernel");
  }
};

template <typename T, int kDim>
struct LaunchMerge {
  static void run(const Problem& p, const MergeSpec& m, cudaStream_t stream) {
    require(m.in.size() <= 2, "a merge reads at most two row sets before its tasks");
    const int64_t rows = m.rows < 0 ? p.shard_rows : m.rows;
    const int64_t head_hi = m.head_hi < 0 ? p.heads : m.head_hi;
    const std::vector<Task> none;
    const DeviceBuffer tasks = upload(m.list != nullptr ? m.list->tasks : none, stream);
    const DeviceBuffer begin =
        upload(m.list != nullptr ? head_begin(p, *m.list) : std::vector<int>{}, stream);
    MergeArgs ma{};
    ma.tasks = tasks.as<Task>();  // null without tasks
    ma.head_begin = begin.as<int>();
    ma.part_o = m.part_o;
    ma.part_lse = m.part_lse;
    ma.num_in = static_cast<int>(m.in.size());
    for (size_t i = 0; i < m.in.size(); ++i) ma.in[i] = m.in[i];
    ma.to_f32 = m.dst != nullptr;
    if (m.dst != nullptr) ma.dst = *m.dst;
    ma.out = p.out;
    ma.out_st = p.out_st;
    ma.lse = p.lse;
    ma.lse_st = p.lse_st;
    ma.batch = p.batch;
    ma.rows = rows;
    ma.row0 = m.row0 < 0 ? p.shard_begin : m.row0;
    ma.head_lo = m.head_lo;
    ma.head_hi = head_hi;
    ma.head_dim = p.head_dim;
    ma.out_factor = p.out_factor;
    const int64_t items = p.batch * rows * (head_hi - m.head_lo);
    if (items == 0) return;
    merge_kernel<T><<<blocks_for(items, kWarps), kThreads, 0, stream>>>(ma);
    RA_CUDA_CHECK_LAUNCH("merge_kernel");
  }
};

}  // namespace

int64_t forward_tile_rows(const Problem& p) {
  int64_t rows = 0;
  dispatch<TileRows>(p.dtype, p.head_dim, rows);
  return rows;
}

void launch_forward(const Problem& p, const TaskList& list, const void* k, const void* v,
                    float* part_o, float* part_lse, cudaStream_t stream) {
  dispatch<LaunchForward>(p.dtype, p.head_dim, p, list, k, v, part_o, part_lse, stream);
}

void launch_merge(const Problem& p, const MergeSpec& merge, cudaStream_t stream) {
  dispatch<LaunchMerge>(p.dtype, p.head_dim, p, merge, stream);
}

void forward(const Problem& p, void* stream, bool wait) {
  require(p.shard_begin == 0 && p.shard_rows == p.seq,
          "the CUDA backend runs whole sequences on one device (no shards)");
  const auto s = static_cast<cudaStream_t>(stream);
  const TaskList list = forward_tasks(p, forward_tile_rows(p));
  const DeviceBuffer part_o(static_cast<size_t>(list.part_rows * p.head_dim) * sizeof(float), s);
  const DeviceBuffer part_lse(static_cast<size_t>(list.part_rows) * sizeof(float), s);
  launch_forward(p, list, p.k, p.v, part_o.as<float>(), part_lse.as<float>(), s);
  MergeSpec merge;
  merge.list = &list;
  merge.part_o = part_o.as<float>();
  merge.part_lse = part_lse.as<float>();
  launch_merge(p, merge, s);
  if (wait) RA_CUDA_CHECK(cudaStreamSynchronize(s));
}

}  // namespace ringattn::cuda
