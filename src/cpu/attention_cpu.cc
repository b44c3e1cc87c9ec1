// The CPU forward driver: tasks over (batch, head, row block), OpenMP threads, per-thread
// scratch, and the final cast into the caller's output.

#include "attention_cpu.h"

#include <omp.h>

#include <hwy/aligned_allocator.h>
#include <algorithm>
#include <limits>
#include <vector>

#include "../dtype.h"
#include "../index_math.h"

namespace ringattn::cpu {

namespace {

using detail::KeySource;
using detail::KeySourceFn;
using detail::Scratch;
using detail::Tiles;

// Sequence rows per task for head h: enough that its sparsest branch still keeps
// kKeptRows query rows, so each packed key/value tile serves many queries.
int64_t head_row_block(const Problem& p, int64_t h) {
  constexpr int64_t kKeptRows = 256;
  int64_t max_rate = 1;
  for (int hb = p.head_begin[h]; hb < p.head_begin[h + 1]; ++hb) {
    max_rate = std::max(max_rate, p.branches[p.head_branches[hb].branch].rate);
  }
  return std::min(p.seq, std::min<int64_t>(kKeptRows * max_rate, 8 * kKeptRows));
}

struct Task {
  int64_t b, h, n0, n1;
};

// One thread's scratch, carved from a single aligned allocation.
class ThreadScratch {
 public:
  explicit ThreadScratch(const Tiles& t) {
    const int64_t dp = t.padded_dim, ld = t.ld_rows(), nk = Tiles::kKeyRows;
    const int64_t sizes[] = {
        dp * ld,          dp * ld,    ld, ld, nk * dp, nk * dp, nk * Tiles::kMaxPanel,
        t.row_block * dp, t.row_block};
    float** slots[] = {&s_.qt, &s_.ot, &s_.m, &s_.l, &s_.k, &s_.v, &s_.s, &s_.acc_o, &s_.acc_l};
    static_assert(std::size(sizes) == std::size(slots));
    int64_t total = 0;
    for (int64_t s : sizes) total += round_up(s, 16);
    mem_ = hwy::AllocateAligned<float>(static_cast<size_t>(total));
    std::fill_n(mem_.get(), total, 0.0f);
    float* next = mem_.get();
    for (size_t i = 0; i < std::size(slots); ++i) {
      *slots[i] = next;
      next += round_up(sizes[i], 16);
    }
  }
  const Scratch& get() const { return s_; }

 private:
  hwy::AlignedFreeUniquePtr<float[]> mem_;
  Scratch s_{};
};

template <typename T>
void write_rows(const Problem& p, const Tiles& t, int64_t b, int64_t h, int64_t n0, int64_t n1,
                const Scratch& sc) {
  T* out = static_cast<T*>(p.out);
  for (int64_t n = n0; n < n1; ++n) {
    const float* acc = sc.acc_o + (n - n0) * t.padded_dim;
    T* row = out + b * p.out_st.b + n * p.out_st.n + h * p.out_st.h;
    for (int64_t d = 0; d < p.head_dim; ++d) row[d] = from_f32<T>(acc[d] * p.out_factor);
    if (p.lse) p.lse[b * p.lse_st.b + n * p.lse_st.n + h * p.lse_st.h] = sc.acc_l[n - n0];
  }
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

void forward(const Problem& p, int num_threads) {
  std::vector<Task> tasks;
  Tiles tiles{round_up(p.head_dim, Tiles::kMicroRows), 0};
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t rows = head_row_block(p, h);
      tiles.row_block = std::max(tiles.row_block, rows);
      for (int64_t n0 = 0; n0 < p.seq; n0 += rows)
        tasks.push_back({b, h, n0, std::min(p.seq, n0 + rows)});
    }
  }
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const KeySourceFn sources = detail::local_keys(p);

  // Scratch is allocated up front so that nothing inside the parallel region can throw.
  std::vector<ThreadScratch> scratch;
  scratch.reserve(static_cast<size_t>(threads));
  for (int i = 0; i < threads; ++i) scratch.emplace_back(tiles);

#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (size_t i = 0; i < tasks.size(); ++i) {
    const Scratch& sc = scratch[static_cast<size_t>(omp_get_thread_num())].get();
    const auto [b, h, n0, n1] = tasks[i];
    std::fill_n(sc.acc_o, (n1 - n0) * tiles.padded_dim, 0.0f);
    std::fill_n(sc.acc_l, n1 - n0, -std::numeric_limits<float>::infinity());
    detail::forward_block(p, tiles, b, h, n0, n1, sources, sc);
    switch (p.dtype) {
      case DType::kF32:
        write_rows<float>(p, tiles, b, h, n0, n1, sc);
        break;
      case DType::kF16:
        write_rows<fp16_t>(p, tiles, b, h, n0, n1, sc);
        break;
      case DType::kBF16:
        write_rows<bf16_t>(p, tiles, b, h, n0, n1, sc);
        break;
    }
  }
}

}  // namespace ringattn::cpu
