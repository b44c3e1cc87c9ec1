// The CUDA backend's host-side plan (src/cuda/tasks.h) and the index math its kernels use,
// checked on the CPU (no GPU needed): every kept row of every head-branch entry is computed
// exactly once, partial rows are distinct, and no two blocks of one backward launch write
// the same accumulator row (the determinism argument of the kernels without atomics).

#include <gtest/gtest.h>

#include <set>
#include <tuple>

#include "src/cuda/tasks.h"
#include "src/index_math.h"
#include "src/problem.h"
#include "tests/test_util.h"

namespace ringattn::test {
namespace {

Problem problem_of(const Case& c, Tensor& q, Tensor& k, Tensor& out) {
  return make_problem(c.config(), q.view(), k.view(), k.view(), out.view(), std::nullopt, 1 << 20,
                      "cuda");
}

TEST(CudaPlan, KeptIndexOfRowInvertsTheKeptRows) {
  for (int64_t s : {1, 7, 16, 48}) {
    for (int64_t r = 1; r <= std::min<int64_t>(s, 5); ++r) {
      for (int64_t o = 0; o < r; ++o) {
        std::set<int64_t> kept;
        for (int64_t seg = 0; seg < 3; ++seg) {
          for (int64_t t = 0; t < kept_count(s, r, o); ++t) kept.insert(seg * s + o + t * r);
        }
        for (int64_t n = 0; n < 3 * s; ++n) {
          const int64_t t = kept_index_of_row(n, s, r, o);
          EXPECT_EQ(t >= 0, kept.count(n) == 1) << "s=" << s << " r=" << r << " o=" << o;
          if (t >= 0) {
            EXPECT_EQ((n / s) * s + o + t * r, n);
          }
        }
      }
    }
  }
}

TEST(CudaPlan, ForwardTasksCoverEveryKeptRowOnce) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 30; ++trial) {
    const Case c = random_case(rng, {16, 64});
    SCOPED_TRACE(describe(c));
    Tensor q(DType::kF32, {c.B, c.N, c.H, c.D}), k(DType::kF32, {c.B, c.N, c.Hkv, c.D});
    Tensor out(DType::kF32, {c.B, c.N, c.H, c.D});
    const Problem p = problem_of(c, q, k, out);
    for (int64_t tile : {16, 32, 64}) {
      const cuda::TaskList list = cuda::forward_tasks(p, tile);
      ASSERT_EQ(list.tasks.size(), p.head_branches.size());
      std::vector<int> seen(static_cast<size_t>(list.part_rows), 0);
      for (int64_t h = 0; h < p.heads; ++h) {
        for (int hb = p.head_begin[h]; hb < p.head_begin[h + 1]; ++hb) {
          const cuda::Task& t = list.tasks[static_cast<size_t>(hb)];
          const Branch br = p.branches[static_cast<size_t>(p.head_branches[hb].branch)];
          ASSERT_EQ(t.head_count, 1);
          EXPECT_EQ(list.heads[static_cast<size_t>(t.head_first)], h);
          EXPECT_EQ(t.kv_head, p.kv_head(h));
          EXPECT_EQ(t.s, br.segment);
          EXPECT_EQ(t.r, br.rate);
          EXPECT_EQ(t.o, p.head_branches[hb].offset);
          EXPECT_GE(t.tiles_per_seg * tile, t.m);
          EXPECT_LT((t.tiles_per_seg - 1) * tile, t.m);
          EXPECT_LE(t.segments * t.tiles_per_seg, list.max_tiles);
          // The merge kernel's lookup: every kept row maps to its own partial row.
          for (int64_t b = 0; b < p.batch; ++b) {
            for (int64_t n = 0; n < p.seq; ++n) {
              const int64_t kept = kept_index_of_row(n, t.s, t.r, t.o);
              if (kept < 0) continue;
              const int64_t row = t.part_row0 + b * t.rows_per_batch + (n / t.s) * t.m + kept;
              ASSERT_GE(row, 0);
              ASSERT_LT(row, list.part_rows);
              ++seen[static_cast<size_t>(row)];
            }
          }
        }
      }
      for (int count : seen) ASSERT_EQ(count, 1);
    }
  }
}

TEST(CudaPlan, BackwardTasksOwnDisjointRows) {
  std::mt19937 rng(6);
  for (int trial = 0; trial < 30; ++trial) {
    const Case c = random_case(rng, {16});
    SCOPED_TRACE(describe(c));
    Tensor q(DType::kF32, {c.B, c.N, c.H, c.D}), k(DType::kF32, {c.B, c.N, c.Hkv, c.D});
    Tensor out(DType::kF32, {c.B, c.N, c.H, c.D});
    const Problem p = problem_of(c, q, k, out);
    for (int branch = 0; branch < static_cast<int>(p.branches.size()); ++branch) {
      std::set<int64_t> users;  // heads computing this branch
      for (int64_t h = 0; h < p.heads; ++h) {
        if (p.head_branch(h, branch) >= 0) users.insert(h);
      }
      for (bool by_key : {false, true}) {
        const cuda::TaskList list = cuda::backward_tasks(p, branch, 32, by_key);
        std::multiset<int64_t> heads;
        std::set<std::tuple<int64_t, int64_t>> rows;  // (accumulator head, row) written
        for (const cuda::Task& t : list.tasks) {
          for (int i = 0; i < t.head_count; ++i) {
            const int64_t h = list.heads[static_cast<size_t>(t.head_first + i)];
            heads.insert(h);
            EXPECT_EQ(p.kv_head(h), t.kv_head);
            EXPECT_EQ(p.head_branches[p.head_branch(h, branch)].offset, t.o);
          }
          if (!by_key) {
            ASSERT_EQ(t.head_count, 1);
          }
          const int64_t owner = by_key ? t.kv_head : list.heads[static_cast<size_t>(t.head_first)];
          for (int64_t seg = 0; seg < t.segments; ++seg) {
            for (int64_t i = 0; i < t.m; ++i) {
              EXPECT_TRUE(rows.insert({owner, seg * t.s + t.o + i * t.r}).second)
                  << "two tasks write row " << seg * t.s + t.o + i * t.r << " of head " << owner;
            }
          }
        }
        EXPECT_EQ(std::set<int64_t>(heads.begin(), heads.end()), users);
        EXPECT_EQ(heads.size(), users.size()) << "a head appears in two tasks";
      }
    }
  }
}

}  // namespace
}  // namespace ringattn::test
