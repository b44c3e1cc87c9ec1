// The CPU forward driver: tasks over (batch, head, row block), OpenMP threads, per-thread
// scratch, and the final cast into the caller's output.

#include "attention_cpu.h"

#include <omp.h>

#include <algorithm>
#include <hwy/aligned_allocator.h>
#include <vector>

#include "../dtype.h"
#include "../index_math.h"

namespace ringattn::cpu {

namespace {

using detail::Scratch;
using detail::Tiles;

Tiles make_tiles(const Problem& p) {
  Tiles t;
  t.padded_dim = round_up(p.head_dim, 2 * Tiles::kMaxVecFloats);
  int64_t max_rate = 1;
  for (const Branch& b : p.branches) max_rate = std::max(max_rate, b.rate);
  // Enough rows that the sparsest branch still fills most of a query tile.
  t.row_block = std::min(p.seq, std::clamp<int64_t>(64 * max_rate, 256, 2048));
  return t;
}

// One thread's scratch, carved from a single aligned allocation.
class ThreadScratch {
 public:
  explicit ThreadScratch(const Tiles& t) {
    const int64_t dp = t.padded_dim, mq = Tiles::kQueryTile, nk = Tiles::kKeyTile;
    const int64_t sizes[] = {mq * dp, nk * dp, nk * dp, mq * nk, mq * dp,
                             mq,      mq,      mq,      t.row_block * dp, t.row_block};
    int64_t total = 0;
    for (int64_t s : sizes) total += round_up(s, 16);
    mem_ = hwy::AllocateAligned<float>(static_cast<size_t>(total));
    float* next = mem_.get();
    float** slots[] = {&s_.q, &s_.kt, &s_.v, &s_.s, &s_.o, &s_.m, &s_.l, &s_.alpha, &s_.acc_o,
                       &s_.acc_l};
    for (int i = 0; i < 10; ++i) {
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
  const Tiles tiles = make_tiles(p);
  const int64_t blocks = ceil_div(p.seq, tiles.row_block);
  const int64_t tasks = p.batch * p.heads * blocks;
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();

  // Scratch is allocated up front so that nothing inside the parallel region can throw.
  std::vector<ThreadScratch> scratch;
  scratch.reserve(static_cast<size_t>(threads));
  for (int i = 0; i < threads; ++i) scratch.emplace_back(tiles);

#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const Scratch& sc = scratch[static_cast<size_t>(omp_get_thread_num())].get();
    const int64_t blk = task % blocks, bh = task / blocks;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const int64_t n0 = blk * tiles.row_block, n1 = std::min(p.seq, n0 + tiles.row_block);
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
