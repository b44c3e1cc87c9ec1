// The CPU forward driver: tasks over (batch, head, row block), OpenMP threads, per-thread
// scratch, and the final cast into the caller's output.

#include "attention_cpu.h"

#include <omp.h>

#include <hwy/aligned_allocator.h>
#include <algorithm>
#include <vector>

#include "../dtype.h"
#include "../index_math.h"

namespace ringattn::cpu {

namespace {

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

  // Scratch is allocated up front so that nothing inside the parallel region can throw.
  std::vector<ThreadScratch> scratch;
  scratch.reserve(static_cast<size_t>(threads));
  for (int i = 0; i < threads; ++i) scratch.emplace_back(tiles);

#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (size_t i = 0; i < tasks.size(); ++i) {
    const Scratch& sc = scratch[static_cast<size_t>(omp_get_thread_num())].get();
    const auto [b, h, n0, n1] = tasks[i];
    detail::forward_block(p, tiles, b, h, n0, n1, sc);
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
