// The CPU forward driver: tasks over (batch, head, row block), OpenMP threads, per-thread
// scratch, and the final cast into the caller's output.

#include "src/backend/cpu/attention_cpu.h"

#include <omp.h>

#include <hwy/aligned_allocator.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "src/backend/cpu/bf16_kernels.h"
#include "src/backend/cpu/task_errors.h"
#include "src/base/dtype.h"
#include "src/base/index_math.h"
#include "src/base/memory.h"

namespace ringattn::cpu {

namespace {

using detail::KeySource;
using detail::KeySourceFn;
using detail::Scratch;
using detail::Tiles;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Sequence rows per task for head h: enough that its sparsest branch still keeps
// kKeptRows query rows, so each packed key/value tile serves many queries.
int64_t head_row_block(const Problem& p, int64_t h) {
  constexpr int64_t kKeptRows = 1024;
  int64_t max_rate = 1;
  for (int hb = p.head_begin[h]; hb < p.head_begin[h + 1]; ++hb) {
    max_rate = std::max(max_rate, p.branches[p.head_branches[hb].branch].rate);
  }
  return std::min(p.shard_rows, std::min<int64_t>(kKeptRows * max_rate, Tiles::kMaxRowBlock));
}

struct Task {
  int64_t b, h, n0, n1;
};

// Zeroed fp32 buffers carved from one aligned allocation: slots[i] gets sizes[i] floats.
class Arena {
 public:
  Arena(std::initializer_list<int64_t> sizes, std::initializer_list<float**> slots) {
    int64_t total = 0;
    for (int64_t s : sizes) total += round_up(s, 16);
    mem_ = aligned_floats(static_cast<size_t>(total), "the CPU kernel's per-thread scratch");
    std::fill_n(mem_.get(), total, 0.0f);
    float* next = mem_.get();
    auto size = sizes.begin();
    for (float** slot : slots) {
      *slot = next;
      next += round_up(*size++, 16);
    }
  }

 private:
  hwy::AlignedFreeUniquePtr<float[]> mem_;
};

// Floats that hold a bf16 kernel's scratch (none for the fp32 products). The size functions
// are compiled for the bf16 instructions, so they only run when the kernel is one of them.
template <typename T>
int64_t bf16_floats(const T& tiles, int64_t (*bytes)(const T&)) {
  return tiles.kernel == CpuBf16::kWiden
             ? 0
             : ceil_div(bytes(tiles), static_cast<int64_t>(sizeof(float)));
}

// One thread's forward scratch: the fp32 products' tiles, or the bf16 kernel's bytes.
class ThreadScratch {
 public:
  explicit ThreadScratch(const Tiles& t)
      : arena_(
            {fp32(t) * t.padded_dim * t.ld_rows(), t.padded_dim * t.ld_rows(), t.ld_rows(),
             t.ld_rows(), fp32(t) * Tiles::kKeyRows * t.padded_dim,
             fp32(t) * Tiles::kKeyRows * t.padded_dim, fp32(t) * Tiles::kKeyRows * Tiles::kMaxPanel,
             t.row_block * t.padded_dim, bf16_floats(t, detail::bf16_forward_scratch_bytes)},
            {&s_.qt, &s_.ot, &s_.m, &s_.l, &s_.k, &s_.v, &s_.s, &s_.acc_o, &bf16_}) {
    s_.bf16 = bf16_;
    resize_buffer(acc_l_, static_cast<size_t>(t.row_block), "the CPU kernel's per-thread scratch");
    s_.acc_l = acc_l_.data();
  }
  const Scratch& get() const { return s_; }

 private:
  static int64_t fp32(const Tiles& t) { return t.kernel == CpuBf16::kWiden ? 1 : 0; }
  Scratch s_{};
  float* bf16_ = nullptr;
  Arena arena_;
  std::vector<double> acc_l_;
};

template <typename T>
void write_rows(const Problem& p, int64_t b, int64_t h, int64_t n0, int64_t n1, const float* acc_o,
                int64_t ld, const double* acc_l) {
  T* out = static_cast<T*>(p.out);
  for (int64_t n = n0; n < n1; ++n) {
    const float* acc = acc_o + (n - n0) * ld;
    const int64_t local = n - p.shard_begin;
    const double lse = acc_l[n - n0];
    if (out != nullptr) {
      T* row = out + b * p.out_st.b + local * p.out_st.n + h * p.out_st.h;
      if (lse == -kInfD) {  // no key seen: 0 (the accumulator row was never written)
        std::fill_n(row, p.head_dim, from_f32<T>(0.0f));
      } else {
        for (int64_t d = 0; d < p.head_dim; ++d) row[d] = from_f32<T>(acc[d] * p.out_factor);
      }
    }
    if (p.lse) {
      p.lse[b * p.lse_st.b + local * p.lse_st.n + h * p.lse_st.h] = static_cast<float>(lse);
    }
    if (p.lse_precise) {
      const Strides3& st = p.lse_precise_st;
      p.lse_precise[b * st.b + local * st.n + h * st.h] = lse;
    }
  }
}

// Casts finished accumulator rows into p.out (times out_factor), p.lse and p.lse_precise.
void write_block(const Problem& p, const Task& t, const float* acc_o, int64_t ld,
                 const double* acc_l) {
  switch (p.dtype) {
    case DType::kF32:
      write_rows<float>(p, t.b, t.h, t.n0, t.n1, acc_o, ld, acc_l);
      break;
    case DType::kF16:
      write_rows<fp16_t>(p, t.b, t.h, t.n0, t.n1, acc_o, ld, acc_l);
      break;
    case DType::kBF16:
      write_rows<bf16_t>(p, t.b, t.h, t.n0, t.n1, acc_o, ld, acc_l);
      break;
  }
}

// (query, key) pairs of task t against the local keys: its cost, for the schedule.
int64_t task_pairs(const Problem& p, const Task& t) {
  int64_t pairs = 0;
  for (int hb = p.head_begin[t.h]; hb < p.head_begin[t.h + 1]; ++hb) {
    const Branch br = p.branches[p.head_branches[hb].branch];
    const int64_t o = p.head_branches[hb].offset;
    for (int64_t seg = t.n0 / br.segment; seg * br.segment < t.n1; ++seg) {
      const KeptSpan q = kept_span_in_window(seg, br.segment, br.rate, o, t.n0, t.n1);
      const KeptSpan k = kept_span_in_window(seg, br.segment, br.rate, o, p.shard_begin,
                                             p.shard_begin + p.shard_rows);
      const int64_t rows = q.t_end - q.t_begin;
      // Causal: query t sees keys [k.t_begin, t], at most the local ones.
      pairs += p.causal ? rows * max64(0, min64(k.t_end, (q.t_begin + q.t_end + 1) / 2) - k.t_begin)
                        : rows * (k.t_end - k.t_begin);
    }
  }
  return pairs;
}

// Tasks over (batch, head, row block of the shard) and the tile geometry they need, the
// costliest first (so that the dynamic schedule does not end on one long task).
// Blocks never straddle `split` (a global row; none when outside the shard).
// The products: bf16 ones only for bf16 tensors (fp16 and fp32 take the fp32 products).
CpuBf16 kernel_of(const Problem& p, const ExecOptions& options) {
  return p.dtype == DType::kBF16 ? resolve_bf16(options.cpu_bf16) : CpuBf16::kWiden;
}

std::vector<Task> make_tasks(const Problem& p, CpuBf16 kernel, Tiles& tiles, int64_t split = -1) {
  std::vector<Task> tasks;
  const int64_t dim_step = kernel == CpuBf16::kWiden ? Tiles::kMicroRows : 32;
  tiles = Tiles{round_up(p.head_dim, dim_step), 0, kernel};
  const int64_t end = p.shard_begin + p.shard_rows;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t rows = head_row_block(p, h);
      tiles.row_block = std::max(tiles.row_block, rows);
      for (int64_t n0 = p.shard_begin; n0 < end;) {
        int64_t n1 = std::min(end, n0 + rows);
        if (n0 < split && split < n1) n1 = split;
        tasks.push_back({b, h, n0, n1});
        n0 = n1;
      }
    }
  }
  std::vector<int64_t> cost(tasks.size());
  for (size_t i = 0; i < tasks.size(); ++i) cost[i] = task_pairs(p, tasks[i]);
  std::vector<size_t> order(tasks.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t c) { return cost[a] > cost[c]; });
  std::vector<Task> sorted;
  sorted.reserve(tasks.size());
  for (size_t i : order) sorted.push_back(tasks[i]);
  return sorted;
}

// Runs fn(task, scratch) for every task on `threads` OpenMP threads (dynamic schedule);
// the calling thread also runs `poll` between its tasks. The first exception of any task
// (or of poll) is rethrown after the region, the tasks after it skipped.
template <typename Fn>
void run_tasks(const std::vector<Task>& tasks, const std::vector<ThreadScratch>& scratch,
               const std::function<void()>& poll, Fn&& fn) {
  const int threads = static_cast<int>(scratch.size());
  TaskErrors errors;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (size_t i = 0; i < tasks.size(); ++i) {
    errors.run([&] {
      const int thread = omp_get_thread_num();
      fn(tasks[i], scratch[static_cast<size_t>(thread)].get());
      if (thread == 0 && poll) poll();
    });
  }
  errors.rethrow();
}

std::vector<ThreadScratch> make_scratch(const Tiles& tiles, int num_threads) {
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  std::vector<ThreadScratch> scratch;
  scratch.reserve(static_cast<size_t>(threads));
  for (int i = 0; i < threads; ++i) scratch.emplace_back(tiles);
  return scratch;
}

}  // namespace

KeySourceFn detail::local_keys(const Problem& p) {
  return [&p](int64_t b, int64_t h, int hb, int64_t seg, KeySource& src) {
    const Branch br = p.branches[p.head_branches[hb].branch];
    const int64_t o = p.head_branches[hb].offset, hk = p.kv_head(h);
    const KeptSpan span = kept_span_in_window(seg, br.segment, br.rate, o, p.shard_begin,
                                              p.shard_begin + p.shard_rows);
    if (span.t_end == span.t_begin) return false;
    const int64_t row = span.seg_start + o + span.t_begin * br.rate - p.shard_begin;
    const int64_t esize = static_cast<int64_t>(dtype_size(p.dtype));
    src.k = static_cast<const char*>(p.k) + esize * (b * p.k_st.b + row * p.k_st.n + hk * p.k_st.h);
    src.v = static_cast<const char*>(p.v) + esize * (b * p.v_st.b + row * p.v_st.n + hk * p.v_st.h);
    src.k_stride = br.rate * p.k_st.n;
    src.v_stride = br.rate * p.v_st.n;
    src.t_begin = span.t_begin;
    src.t_end = span.t_end;
    return true;
  };
}

void detail::forward_block(const Problem& p, const Tiles& tiles, int64_t b, int64_t h, int64_t n0,
                           int64_t n1, const KeySourceFn& sources, const Scratch& sc) {
  const char* q_base = static_cast<const char*>(p.q);
  const int64_t esize = static_cast<int64_t>(dtype_size(p.dtype)), dp = tiles.padded_dim;
  for (int hb = p.head_begin[h]; hb < p.head_begin[h + 1]; ++hb) {
    const Branch br = p.branches[p.head_branches[hb].branch];
    const int64_t o = p.head_branches[hb].offset, r = br.rate;
    for (int64_t seg = n0 / br.segment; seg * br.segment < n1; ++seg) {
      // The piece: kept rows t in [t0, t0 + rows) of this segment inside the block.
      const KeptSpan span = kept_span_in_window(seg, br.segment, r, o, n0, n1);
      const int64_t row0 = span.seg_start + o;  // global row of kept index 0
      const int64_t t0 = span.t_begin;
      KeySource src;
      if (span.t_end == t0 || !sources(b, h, hb, seg, src)) continue;
      const int64_t q_row = row0 + t0 * r - p.shard_begin;  // local row of the first query
      const detail::QueryRows qr{q_base + esize * (b * p.q_st.b + q_row * p.q_st.n + h * p.q_st.h),
                                 r * p.q_st.n,
                                 t0,
                                 span.t_end,
                                 sc.acc_o + (row0 + t0 * r - n0) * dp,
                                 sc.acc_l + (row0 + t0 * r - n0),
                                 r};
      forward_rows(p, tiles, qr, &src, 1, sc);
    }
  }
}

void detail::merge_queries(const Problem& p, const Tiles& tiles, const QueryRows& qr,
                           const float* ot, const float* m, const float* l, double m_scale) {
  constexpr double kLn2 = 0.6931471805599453;
  const int64_t D = p.head_dim, dp = tiles.padded_dim, ld = tiles.ld_rows();
  for (int64_t i = 0; i < qr.t_end - qr.t_begin; ++i) {
    if (!(l[i] > 0.0f)) continue;  // no visible key: nothing to merge
    // The lse in double: l sums 2^((s - m) m_scale) with this very m (an exact score), so
    // m m_scale + log2(l) holds to the double's precision for scores of any size (what
    // Problem::lse_precise keeps).
    const double lse =
        (static_cast<double>(m[i]) * m_scale + std::log2(static_cast<double>(l[i]))) * kLn2;
    float* acc = qr.acc_o + i * qr.acc_step * dp;
    double& acc_l = qr.acc_l[i * qr.acc_step];
    const double prev = acc_l;
    if (prev == -kInfD) {  // the row's first result (its acc_o row is not read)
      const float a = 1.0f / l[i];
      for (int64_t c = 0; c < D; ++c) acc[c] = a * ot[c * ld + i];
      acc_l = lse;
      continue;
    }
    const double mx = prev > lse ? prev : lse;
    const double w_prev = std::exp(prev - mx), w_part = std::exp(lse - mx);
    const double total = w_prev + w_part;
    const float a_prev = static_cast<float>(w_prev / total);
    const float a_part = static_cast<float>(w_part / (total * l[i]));
    for (int64_t c = 0; c < D; ++c) acc[c] = a_prev * acc[c] + a_part * ot[c * ld + i];
    acc_l = mx + std::log(total);
  }
}

void forward(const Problem& p, const ExecOptions& options) {
  Tiles tiles;
  const std::vector<Task> tasks = make_tasks(p, kernel_of(p, options), tiles);
  // Allocated up front so that nothing inside the parallel region can throw.
  const std::vector<ThreadScratch> scratch = make_scratch(tiles, options.num_threads);
  const KeySourceFn sources = detail::local_keys(p);
  run_tasks(tasks, scratch, nullptr, [&](const Task& t, const Scratch& sc) {
    std::fill_n(sc.acc_l, t.n1 - t.n0, -kInfD);  // acc_o rows are written by their first merge
    detail::forward_block(p, tiles, t.b, t.h, t.n0, t.n1, sources, sc);
    write_block(p, t, sc.acc_o, tiles.padded_dim, sc.acc_l);
  });
}

struct ShardForward::State {
  std::vector<Task> tasks;
  int64_t split = -1;
  Tiles tiles;
  std::vector<ThreadScratch> scratch;
  hwy::AlignedFreeUniquePtr<float[]> acc_o;  // [B][H][shard_rows][padded_dim]
  std::vector<double> acc_l;                 // [B][H][shard_rows]
};

ShardForward::ShardForward(const Problem& p, const ExecOptions& options, int64_t split)
    : p_(p), s_(new State) {
  s_->split = split;
  s_->tasks = make_tasks(p, kernel_of(p, options), s_->tiles, split);
  s_->scratch = make_scratch(s_->tiles, options.num_threads);
  const int64_t rows = p.batch * p.heads * p.shard_rows;
  s_->acc_o = aligned_floats(static_cast<size_t>(rows * s_->tiles.padded_dim),
                             "the shard's fp32 output accumulators [B, H, N_loc, D]");
  std::fill_n(s_->acc_o.get(), rows * s_->tiles.padded_dim, 0.0f);
  assign_buffer(s_->acc_l, static_cast<size_t>(rows), -kInfD,
                "the shard's lse accumulators [B, H, N_loc]");
}

ShardForward::~ShardForward() = default;

void ShardForward::restart() {
  Tiles tiles;
  s_->tasks = make_tasks(p_, s_->tiles.kernel, tiles, s_->split);
  const int64_t rows = p_.batch * p_.heads * p_.shard_rows;
  std::fill_n(s_->acc_o.get(), rows * s_->tiles.padded_dim, 0.0f);
  std::fill(s_->acc_l.begin(), s_->acc_l.end(), -kInfD);
}

int64_t ShardForward::row_index(int64_t b, int64_t h, int64_t n) const {
  return (b * p_.heads + h) * p_.shard_rows + (n - p_.shard_begin);
}

void ShardForward::pass(const KeySourceFn& sources, const std::function<void()>& poll,
                        int64_t row_end) {
  const int64_t dp = s_->tiles.padded_dim;
  run_tasks(s_->tasks, s_->scratch, poll, [&](const Task& t, const Scratch& sc) {
    if (t.n1 > row_end) return;
    Scratch mine = sc;
    mine.acc_o = s_->acc_o.get() + row_index(t.b, t.h, t.n0) * dp;
    mine.acc_l = s_->acc_l.data() + row_index(t.b, t.h, t.n0);
    detail::forward_block(p_, s_->tiles, t.b, t.h, t.n0, t.n1, sources, mine);
  });
}

void ShardForward::export_rows(int64_t h0, int64_t h1, float* dst) const {
  const Problem& p = p_;
  const int64_t rows = p.shard_rows, D = p.head_dim, dp = s_->tiles.padded_dim;
  float* lse = dst + p.batch * (h1 - h0) * rows * D;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t at = (b * (h1 - h0) + h - h0) * rows;
      for (int64_t n = 0; n < rows; ++n) {
        const float* src = s_->acc_o.get() + row_index(b, h, p.shard_begin + n) * dp;
        std::copy_n(src, D, dst + (at + n) * D);
        split_double(s_->acc_l[static_cast<size_t>(row_index(b, h, p.shard_begin + n))],
                     lse + 2 * (at + n));
      }
    }
  }
}

void ShardForward::merge_rows(int64_t h0, int64_t h1, int64_t row0, int64_t rows,
                              const float* src) {
  const Problem& p = p_;
  const int64_t D = p.head_dim, dp = s_->tiles.padded_dim;
  const float* lse = src + p.batch * (h1 - h0) * rows * D;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t at = (b * (h1 - h0) + h - h0) * rows;
      for (int64_t n = 0; n < rows; ++n) {
        const double l_b = join_double(lse + 2 * (at + n));
        if (l_b == -kInfD) continue;
        const int64_t i = row_index(b, h, row0 + n);
        double& l_a = s_->acc_l[static_cast<size_t>(i)];
        const double m = std::max(l_a, l_b);
        const double w_a = std::exp(l_a - m), w_b = std::exp(l_b - m), sum = w_a + w_b;
        const float a = static_cast<float>(w_a / sum), c = static_cast<float>(w_b / sum);
        float* o = s_->acc_o.get() + i * dp;
        const float* o_b = src + (at + n) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = a * o[d] + c * o_b[d];
        l_a = m + std::log(sum);
      }
    }
  }
}

void ShardForward::pass_rows(int64_t tasks,
                             const std::function<void(int64_t task, const Attend& attend)>& task,
                             const std::function<void()>& poll) {
  const Tiles& tiles = s_->tiles;
  const int64_t esize = static_cast<int64_t>(dtype_size(p_.dtype)), dp = tiles.padded_dim;
  const int threads = static_cast<int>(s_->scratch.size());
  TaskErrors errors;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t t = 0; t < tasks; ++t) {
    errors.run([&] {
      const int thread = omp_get_thread_num();
      const Scratch& sc = s_->scratch[static_cast<size_t>(thread)].get();
      task(t, [&](int64_t b, int64_t h, int64_t n0, int64_t n1, const KeySource* sources,
                  int64_t num_sources) {
        for (int64_t r0 = n0; r0 < n1; r0 += tiles.row_block) {
          const int64_t local = r0 - p_.shard_begin;
          const detail::QueryRows rows{
              static_cast<const char*>(p_.q) +
                  esize * (b * p_.q_st.b + local * p_.q_st.n + h * p_.q_st.h),
              p_.q_st.n,
              r0,
              std::min(n1, r0 + tiles.row_block),
              s_->acc_o.get() + row_index(b, h, r0) * dp,
              s_->acc_l.data() + row_index(b, h, r0),
              1};
          detail::forward_rows(p_, tiles, rows, sources, num_sources, sc);
        }
      });
      if (thread == 0 && poll) poll();
    });
  }
  errors.rethrow();
}

void ShardForward::write_output() const {
  const int64_t dp = s_->tiles.padded_dim;
  run_tasks(s_->tasks, s_->scratch, nullptr, [&](const Task& t, const Scratch&) {
    write_block(p_, t, s_->acc_o.get() + row_index(t.b, t.h, t.n0) * dp, dp,
                s_->acc_l.data() + row_index(t.b, t.h, t.n0));
  });
}

namespace {

// One thread's backward scratch: the fp32 products' tiles, or the bf16 kernel's bytes.
class BackwardThreadScratch {
 public:
  explicit BackwardThreadScratch(const detail::BackwardTiles& t)
      : arena_({seg(t), seg(t), seg(t), seg(t), f(t) * t.head_dim * QB, f(t) * QR * t.padded_dim,
                f(t) * t.head_dim * QB, f(t) * QR * t.padded_dim, f(t) * KB * QR, f(t) * KB * QR,
                f(t) * QB, f(t) * QB, f(t) * QB, f(t) * QR * t.padded_dim,
                bf16_floats(t, detail::bf16_backward_scratch_bytes)},
               {&s_.k, &s_.v, &s_.dk, &s_.dv, &s_.qt, &s_.q, &s_.dot, &s_.dout, &s_.p, &s_.ds,
                &s_.lse2, &s_.lse2_lo, &s_.dr, &s_.dq, &bf16_}) {
    s_.bf16 = bf16_;
  }
  const detail::BackwardScratch& get() const { return s_; }

 private:
  static constexpr int64_t KB = detail::BackwardTiles::kKeyBlock;
  static constexpr int64_t QB = detail::BackwardTiles::kQueryBlock;
  static constexpr int64_t QR = detail::BackwardTiles::kQueryRows;
  static int64_t f(const detail::BackwardTiles& t) { return t.kernel == CpuBf16::kWiden ? 1 : 0; }
  static int64_t seg(const detail::BackwardTiles& t) {
    return f(t) * round_up(t.max_kept, KB) * t.padded_dim;
  }
  detail::BackwardScratch s_{};
  float* bf16_ = nullptr;
  Arena arena_;
};

// fn(row, src) for every [D] row of a strided [B][rows][heads][D] view, with src the same
// row of a contiguous fp32 array (nullptr when there is none), on `threads` threads. (fn
// must not throw.)
template <typename T, typename Fn>
void for_each_grad_row(T* base, const Strides3& st, const float* contiguous, int64_t batch,
                       int64_t rows, int64_t heads, int64_t dim, int threads, Fn&& fn) {
#pragma omp parallel for collapse(2) num_threads(threads)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t n = 0; n < rows; ++n) {
      for (int64_t h = 0; h < heads; ++h) {
        fn(base + b * st.b + n * st.n + h * st.h,
           contiguous ? contiguous + ((b * rows + n) * heads + h) * dim : nullptr);
      }
    }
  }
}

// Casts a contiguous fp32 accumulator into a bf16 or fp16 view.
template <typename T>
void write_grad(const float* acc, void* dst, const Strides3& st, int64_t batch, int64_t rows,
                int64_t heads, int64_t dim, int threads) {
  for_each_grad_row(static_cast<T*>(dst), st, acc, batch, rows, heads, dim, threads,
                    [dim](T* row, const float* src) {
                      for (int64_t d = 0; d < dim; ++d) row[d] = from_f32<T>(src[d]);
                    });
}

}  // namespace

struct ShardBackward::State {
  int threads = 1;
  detail::BackwardTiles tiles;
  std::vector<BackwardThreadScratch> scratch;
  // fp32 [B][shard_rows][heads][D] unless the tensor is fp32 (allocated once, zeroed by
  // restart on the kernel's threads: page faults and zeroing of a large accumulator on one
  // thread cost a bf16 backward 5-8% of its time).
  hwy::AlignedFreeUniquePtr<float[]> dq_acc, dk_acc, dv_acc;
  detail::GradRows dq, dk, dv;  // where the sums live
};

namespace {

// The rows gradients are summed in, zeroed: the caller's tensor when it is fp32, else `acc`
// (contiguous; also when there is no tensor), allocated on the first call.
detail::GradRows grad_rows(const Problem& p, void* dst, const Strides3& st, int64_t heads,
                           int threads, hwy::AlignedFreeUniquePtr<float[]>& acc) {
  const int64_t dim = p.head_dim;
  detail::GradRows rows{static_cast<float*>(dst), st};
  if (p.dtype != DType::kF32 || dst == nullptr) {
    if (!acc) {
      acc = aligned_floats(static_cast<size_t>(p.batch * p.shard_rows * heads * dim),
                           "the backward's fp32 gradient accumulators");
    }
    rows = {acc.get(), {p.shard_rows * heads * dim, heads * dim, dim}};
  }
  for_each_grad_row(rows.base, rows.st, nullptr, p.batch, p.shard_rows, heads, dim, threads,
                    [dim](float* row, const float*) { std::fill_n(row, dim, 0.0f); });
  return rows;
}

}  // namespace

ShardBackward::ShardBackward(const BackwardProblem& bp, const ExecOptions& options,
                             int64_t max_key_rows)
    : bp_(bp), local_(detail::local_keys(bp.fwd)), s_(new State) {
  const Problem& p = bp.fwd;
  s_->tiles = {round_up(p.head_dim, Tiles::kMaxPanel), p.head_dim, 0, kernel_of(p, options)};
  for (const Branch& br : p.branches) {
    s_->tiles.max_kept = std::max(s_->tiles.max_kept, kept_count(br.segment, br.rate, 0));
  }
  if (max_key_rows > 0) s_->tiles.max_kept = std::min(s_->tiles.max_kept, max_key_rows);
  s_->threads = options.num_threads > 0 ? options.num_threads : omp_get_max_threads();
  s_->scratch.reserve(static_cast<size_t>(s_->threads));
  for (int i = 0; i < s_->threads; ++i) s_->scratch.emplace_back(s_->tiles);
  restart();
}

ShardBackward::~ShardBackward() = default;

void ShardBackward::restart() {
  const Problem& p = bp_.fwd;
  const int threads = s_->threads;
  s_->dq = grad_rows(p, bp_.dq, bp_.dq_st, p.heads, threads, s_->dq_acc);
  s_->dk = grad_rows(p, bp_.dk, bp_.dk_st, p.kv_heads, threads, s_->dk_acc);
  s_->dv = grad_rows(p, bp_.dv, bp_.dv_st, p.kv_heads, threads, s_->dv_acc);
}

float* ShardBackward::dk_row(int64_t b, int64_t local_row, int64_t kv_head) {
  return s_->dk.row(b, local_row, kv_head);
}

float* ShardBackward::dv_row(int64_t b, int64_t local_row, int64_t kv_head) {
  return s_->dv.row(b, local_row, kv_head);
}

void ShardBackward::key_grads(detail::BackwardWork& w, int64_t b, int64_t local_row,
                              int64_t kv_head, int64_t rate) const {
  w.dk = s_->dk.row(b, local_row, kv_head);
  w.dv = s_->dv.row(b, local_row, kv_head);
  w.dk_stride = rate * s_->dk.st.n;
  w.dv_stride = rate * s_->dv.st.n;
}

void ShardBackward::export_dq(int64_t h0, int64_t h1, float* dst) const {
  const Problem& p = bp_.fwd;
  const int64_t rows = p.shard_rows, D = p.head_dim;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t n = 0; n < rows; ++n) {
        std::copy_n(s_->dq.row(b, n, h), D, dst + ((b * (h1 - h0) + h - h0) * rows + n) * D);
      }
    }
  }
}

void ShardBackward::add_dq(int64_t h0, int64_t h1, int64_t row0, int64_t rows, const float* src) {
  const Problem& p = bp_.fwd;
  const int64_t D = p.head_dim;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t n = 0; n < rows; ++n) {
        float* dq = s_->dq.row(b, row0 - p.shard_begin + n, h);
        const float* x = src + ((b * (h1 - h0) + h - h0) * rows + n) * D;
        for (int64_t d = 0; d < D; ++d) dq[d] += x[d];
      }
    }
  }
}

void ShardBackward::pass(int64_t tasks, const WorkFn& works, const std::function<void()>& poll) {
  const int threads = static_cast<int>(s_->scratch.size());
  TaskErrors errors;
#pragma omp parallel num_threads(threads)
  {
    std::vector<detail::BackwardWork> list;
    const detail::BackwardScratch& sc =
        s_->scratch[static_cast<size_t>(omp_get_thread_num())].get();
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      errors.run([&] {
        list.clear();
        works(t, list);
        for (const detail::BackwardWork& w : list) {
          detail::backward_piece(bp_, s_->tiles, w, sc, s_->dq);
        }
        if (omp_get_thread_num() == 0 && poll) poll();
      });
    }
  }
  errors.rethrow();
}

bool ShardBackward::local_key_work(int64_t b, int64_t h, int hb, int64_t segment,
                                   detail::BackwardWork& w) const {
  const Problem& p = bp_.fwd;
  const HeadBranch& x = p.head_branches[static_cast<size_t>(hb)];
  const Branch br = p.branches[static_cast<size_t>(x.branch)];
  w = {b, h, x.branch, x.offset, segment, 0, 0, {}, nullptr, nullptr, 0, 0};
  if (!local_(b, h, hb, segment, w.keys)) return false;
  const int64_t row = segment * br.segment + x.offset + w.keys.t_begin * br.rate - p.shard_begin;
  key_grads(w, b, row, p.kv_head(h), br.rate);
  return true;
}

void ShardBackward::local_passes(const std::function<void()>& poll) {
  const Problem& p = bp_.fwd;
  const int64_t end = p.shard_begin + p.shard_rows, group = p.heads / p.kv_heads;
  // One pass per branch, in order: inside a pass, tasks (batch, kv head, segment) own
  // disjoint rows of dq, dk and dv, so the sums are deterministic without atomics.
  for (int i = 0; i < static_cast<int>(p.branches.size()); ++i) {
    const int64_t s = p.branches[static_cast<size_t>(i)].segment;
    const int64_t first = p.shard_begin / s, segments = ceil_div(end, s) - first;
    pass(
        p.batch * p.kv_heads * segments,
        [&](int64_t t, std::vector<detail::BackwardWork>& out) {
          const int64_t seg = first + t % segments, b = t / segments / p.kv_heads;
          const int64_t hk = t / segments % p.kv_heads;
          for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
            detail::BackwardWork w;
            const int hb = p.head_branch(h, i);
            if (hb < 0 || !local_key_work(b, h, hb, seg, w)) continue;
            w.tq_begin = w.keys.t_begin;  // local queries are the local keys' rows
            w.tq_end = w.keys.t_end;
            out.push_back(w);
          }
        },
        poll);
  }
}

void ShardBackward::write_output() const {
  const Problem& p = bp_.fwd;
  if (p.dtype == DType::kF32) return;  // summed in the tensors themselves
  const int threads = s_->threads;
  const auto cast = [&](const hwy::AlignedFreeUniquePtr<float[]>& acc, void* dst,
                        const Strides3& st, int64_t heads) {
    if (p.dtype == DType::kBF16) {
      write_grad<bf16_t>(acc.get(), dst, st, p.batch, p.shard_rows, heads, p.head_dim, threads);
    } else {
      write_grad<fp16_t>(acc.get(), dst, st, p.batch, p.shard_rows, heads, p.head_dim, threads);
    }
  };
  cast(s_->dq_acc, bp_.dq, bp_.dq_st, p.heads);
  cast(s_->dk_acc, bp_.dk, bp_.dk_st, p.kv_heads);
  cast(s_->dv_acc, bp_.dv, bp_.dv_st, p.kv_heads);
}

bool needs_precise_lse(const Problem& p) {
  if (p.lse == nullptr || p.lse_precise != nullptr) return false;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.heads; ++h)
      for (int64_t n = 0; n < p.shard_rows; ++n) {
        const float lse = p.lse[b * p.lse_st.b + n * p.lse_st.n + h * p.lse_st.h];
        if (std::isfinite(lse) && std::fabs(lse) >= kPreciseLse) return true;
      }
  return false;
}

PreciseLse::PreciseLse(const Problem& p) : forward_(p) {
  resize_buffer(lse_, static_cast<size_t>(p.batch * p.heads * p.shard_rows),
                "the lse in double that the backward recomputes");
  forward_.out = nullptr;
  forward_.lse = nullptr;
  forward_.lse_precise = lse_.data();
  forward_.lse_precise_st = {p.heads * p.shard_rows, 1, p.shard_rows};
}

void PreciseLse::attach(Problem& p) const {
  p.lse_precise = forward_.lse_precise;
  p.lse_precise_st = forward_.lse_precise_st;
}

void backward(const BackwardProblem& bp, const ExecOptions& options) {
  if (needs_precise_lse(bp.fwd)) {
    const PreciseLse precise(bp.fwd);
    forward(precise.forward_problem(), options);
    BackwardProblem with = bp;
    precise.attach(with.fwd);
    return backward(with, options);
  }
  ShardBackward shard(bp, options);
  shard.local_passes();
  shard.write_output();
}

}  // namespace ringattn::cpu
