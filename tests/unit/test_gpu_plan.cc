// The CUDA backend's host-side plan (src/plan/gpu_tasks.h) and the index math its kernels use,
// checked on the CPU (no GPU needed): every kept row of every head-branch entry is computed
// exactly once, partial rows are distinct, and no two blocks of one backward launch write
// the same accumulator row (the determinism argument of the kernels without atomics).

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>
#include <tuple>

#include "src/base/index_math.h"
#include "src/plan/gpu_tasks.h"
#include "src/plan/problem.h"
#include "src/plan/ring_plan.h"
#include "tests/support/test_util.h"

namespace ringattn::test {
namespace {

Problem problem_of(const Case& c, Tensor& q, Tensor& k, Tensor& out) {
  return make_problem(c.config(), q.view(), k.view(), k.view(), out.view(), std::nullopt, 1 << 20,
                      "cuda");
}

TEST(GpuPlan, KeptIndexOfRowInvertsTheKeptRows) {
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

TEST(GpuPlan, ForwardTasksCoverEveryKeptRowOnce) {
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

TEST(GpuPlan, BackwardTasksOwnDisjointRows) {
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

// The GPU ring's host plan, simulated on the CPU for every rank of a ring: the local tasks
// (forward_tasks of a shard), the tasks of every received block (block_tasks), of every
// balanced step answered (answer_tasks) and the packing of the blocks (pack_runs) and of the
// balanced queries (half_runs) address exactly the (query row, key row) pairs of SPEC.md's
// dilated attention, each once: query and key rows are decoded from the element offsets the
// kernels compute (packed data through the sender's runs).
struct Coord {
  int64_t b, n, h;  // batch, global row, head (of q, or kv head of k/v)
};

// Decodes an element offset into a contiguous [B, N_loc, heads, D] shard of rank `rank`.
Coord decode(int64_t off, int64_t n_loc, int64_t heads, int64_t D, int rank) {
  EXPECT_EQ(off % D, 0);
  const int64_t row = off / D;
  return {row / heads / n_loc, rank * n_loc + row / heads % n_loc, row % heads};
}

// The rows `runs` copy (the kernels' copy runs): block element offset -> the coordinates of
// the local row on rank `rank` it comes from (into_block) or is added onto.
std::map<int64_t, Coord> copied(const std::vector<cuda::CopyRun>& runs, bool into_block,
                                int64_t n_loc, int64_t heads, int64_t D, int rank) {
  std::map<int64_t, Coord> at;
  for (const cuda::CopyRun& run : runs) {
    for (int64_t t = 0; t < run.rows; ++t) {
      const int64_t src = run.src + t * run.src_t, dst = run.dst + t * run.dst_t;
      at[into_block ? dst : src] = decode(into_block ? src : dst, n_loc, heads, D, rank);
    }
  }
  return at;
}

// (b, h, query row, key row, s, r, o): a pair of a head-branch entry.
using Pairs =
    std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>, int>;

// `pairs` holds every pair SPEC.md's dilated attention has over the whole sequence (p0 is
// any rank's problem), each once, and nothing else.
void expect_every_pair_once(const Problem& p0, bool causal, Pairs& pairs) {
  size_t expected = 0;
  for (int64_t b = 0; b < p0.batch; ++b)
    for (int64_t h = 0; h < p0.heads; ++h)
      for (int hb = p0.head_begin[h]; hb < p0.head_begin[h + 1]; ++hb) {
        const Branch br = p0.branches[static_cast<size_t>(p0.head_branches[hb].branch)];
        const int64_t o = p0.head_branches[hb].offset;
        for (int64_t n = 0; n < p0.seq; ++n) {
          if (kept_index_of_row(n, br.segment, br.rate, o) < 0) continue;
          for (int64_t m = n / br.segment * br.segment; m < (n / br.segment + 1) * br.segment;
               ++m) {
            if (kept_index_of_row(m, br.segment, br.rate, o) < 0 || (causal && m > n)) continue;
            ++expected;
            EXPECT_EQ((pairs[{b, h, n, m, br.segment, br.rate, o}]), 1)
                << "b=" << b << " h=" << h << " n=" << n << " m=" << m;
          }
        }
      }
  EXPECT_EQ(pairs.size(), expected);
}

// The ring configurations of the plan tests: P ranks of n_loc rows, a branch inside a rank
// and one spanning ranks (or one spanning all), both modes, causal on and off.
template <typename F>
void for_each_ring_case(int64_t n_loc, F check) {
  for (int P : {2, 3, 4}) {
    const int64_t N = P * n_loc;
    for (const auto& [s, r] : std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>>{
             {{4, N}, {1, 2}}, {{8, N}, {2, 3}}, {{n_loc * P}, {1}}}) {
      for (Mode mode : {Mode::kGroups, Mode::kLongNet}) {
        for (bool causal : {false, true}) {
          SCOPED_TRACE(::testing::Message() << "P=" << P << " s.back()=" << s.back() << " "
                                            << mode_name(mode) << " causal=" << causal);
          check(P, DilatedConfig{s, r, mode, causal, std::nullopt});
        }
      }
    }
  }
}

// Every rank's problem and ring plan of a ring case (the ranks' tensors differ in content
// only, so one set of host tensors serves them all).
struct RingProblems {
  RingProblems(const DilatedConfig& cfg, int P, int64_t B, int64_t n_loc, int64_t H, int64_t Hkv,
               int64_t D)
      : q(DType::kF32, {B, n_loc, H, D}),
        k(DType::kF32, {B, n_loc, Hkv, D}),
        out(DType::kF32, {B, n_loc, H, D}) {
    for (int rank = 0; rank < P; ++rank) {
      ps.push_back(make_problem(cfg, q.view(), k.view(), k.view(), out.view(), std::nullopt,
                                1 << 20, "cuda", Shard{rank, P}));
      plans.push_back(plan_ring(ps.back(), rank, P));
    }
  }
  Tensor q, k, out;
  std::vector<Problem> ps;
  std::vector<RingPlan> plans;
};

// Where rank `asker`'s balanced queries of span `span` sit in the inbox of their key owner:
// element offset -> query coordinates, from the asker's own packing (half_runs, placed
// after head_begin * D elements of slack).
std::map<int64_t, Coord> answered_queries(const RingProblems& ring, int asker, int span,
                                          int64_t n_loc, int64_t H, int64_t D) {
  const Problem& ap = ring.ps[static_cast<size_t>(asker)];
  const RingPlan& aplan = ring.plans[static_cast<size_t>(asker)];
  const SpanningBranch& sb = aplan.spans[static_cast<size_t>(span)];
  std::map<int64_t, Coord> at;
  for (const cuda::CopyRun& run :
       cuda::half_runs(ap, aplan, ap.q_st, sb.head_begin, sb.head_end, D)) {
    for (int64_t t = 0; t < run.rows; ++t) {
      at[sb.head_begin * D + run.dst + t * run.dst_t] =
          decode(run.src + t * run.src_t, n_loc, H, D, asker);
    }
  }
  return at;
}

// The GPU ring forward's launches (plan_gpu_ring_forward), simulated on the CPU for every
// rank: the local list, every received block's list (the queries before the split on a
// balanced span) and every answered step's list (the asker's second half, read from the
// inbox its packing fills, against the local keys) compute every pair of SPEC.md once; the
// partial rows of one launch are distinct (each launch is merged before the next).
TEST(GpuPlan, RingTasksComputeEveryPairOnce) {
  const int64_t B = 2, H = 4, Hkv = 2, D = 8, n_loc = 8, tile = 4;
  for_each_ring_case(n_loc, [&](int P, const DilatedConfig& cfg) {
    const bool causal = cfg.causal;
    const RingProblems ring(cfg, P, B, n_loc, H, Hkv, D);
    // (b, h, query row, key row, s, r, o) computed by any rank.
    Pairs pairs;
    for (int rank = 0; rank < P; ++rank) {
      const Problem& p = ring.ps[static_cast<size_t>(rank)];
      const RingPlan& plan = ring.plans[static_cast<size_t>(rank)];
      const cuda::GpuRingForwardPlan fp = cuda::plan_gpu_ring_forward(p, plan, tile);
      // The launches: the local list (sender and asker -1), then per step its block's list
      // and the list it answers.
      struct Launch {
        const cuda::TaskList* list;
        int sender, asker, span;
      };
      std::vector<Launch> launches = {{&fp.local, -1, -1, -1}};
      for (size_t e = 0; e < plan.steps.size(); ++e) {
        const RingStep& st = plan.steps[e];
        if (st.recv_from >= 0) {
          EXPECT_TRUE(!causal || st.recv_from < rank);
          launches.push_back({&fp.block[e], st.recv_from, -1, st.span});
        }
        if (!fp.answer[e].tasks.empty()) {
          ASSERT_TRUE(plan.spans[static_cast<size_t>(st.span)].balanced);
          launches.push_back({&fp.answer[e], -1, st.send_to, st.span});
        }
      }
      for (const Launch& launch : launches) {
        const cuda::TaskList& list = *launch.list;
        EXPECT_LE(list.part_rows, fp.partial_rows);
        std::vector<int> seen(static_cast<size_t>(list.part_rows), 0);
        // Block element offset -> the sender's K (or V) coordinates, from its copy runs.
        std::map<int64_t, Coord> block_k, block_v, queries;
        if (launch.sender >= 0) {
          const Problem& sp = ring.ps[static_cast<size_t>(launch.sender)];
          const RingPlan& splan = ring.plans[static_cast<size_t>(launch.sender)];
          const std::vector<cuda::PackRun> packs =
              cuda::pack_runs(sp, splan, launch.span, sp.k_st, sp.v_st);
          block_k =
              copied(cuda::block_copies(packs, false, D, true), true, n_loc, Hkv, D, launch.sender);
          block_v =
              copied(cuda::block_copies(packs, true, D, true), true, n_loc, Hkv, D, launch.sender);
        }
        if (launch.asker >= 0)
          queries = answered_queries(ring, launch.asker, launch.span, n_loc, H, D);
        for (const cuda::Task& t : list.tasks) {
          const int64_t h = list.heads[static_cast<size_t>(t.head_first)];
          EXPECT_EQ(t.tiles_per_seg, ceil_div(t.q_hi - t.q_lo, tile));
          EXPECT_LE(t.segments * t.tiles_per_seg, list.max_tiles);
          for (int64_t b = 0; b < B; ++b)
            for (int64_t seg = 0; seg < t.segments; ++seg)
              for (int64_t tq = t.q_lo; tq < t.q_hi; ++tq) {
                const int64_t n = (t.seg0 + seg) * t.s + t.o + tq * t.r;
                const auto at = [&](const cuda::RowSource& x, int64_t row) {
                  return x.off + b * x.b_st + seg * x.seg_st + row * x.t_st;
                };
                Coord qc;
                if (launch.asker >= 0) {
                  ASSERT_EQ(queries.count(at(t.q_src, tq)), 1u) << "query " << n;
                  qc = queries[at(t.q_src, tq)];
                } else {
                  qc = decode(at(t.q_src, tq), n_loc, H, D, rank);
                }
                ASSERT_TRUE(qc.b == b && qc.n == n && qc.h == h) << "query " << n;
                const int64_t row =
                    t.part_row0 + b * t.rows_per_batch + seg * (t.q_hi - t.q_lo) + tq - t.q_lo;
                ASSERT_GE(row, 0);
                ASSERT_LT(row, list.part_rows);
                ++seen[static_cast<size_t>(row)];
                for (int64_t tk = t.k_lo; tk < t.k_hi; ++tk) {
                  if (causal && tk > tq) continue;
                  Coord kc, vc;
                  if (launch.sender < 0) {
                    kc = decode(at(t.k_src, tk), n_loc, Hkv, D, rank);
                    vc = decode(at(t.v_src, tk), n_loc, Hkv, D, rank);
                  } else {
                    ASSERT_EQ(block_k.count(at(t.k_src, tk)), 1u);
                    ASSERT_EQ(block_v.count(at(t.v_src, tk)), 1u);
                    kc = block_k[at(t.k_src, tk)];
                    vc = block_v[at(t.v_src, tk)];
                  }
                  const int64_t m = (t.seg0 + seg) * t.s + t.o + tk * t.r;
                  ASSERT_TRUE(kc.b == b && kc.n == m && kc.h == p.kv_head(h)) << "key " << m;
                  ASSERT_TRUE(vc.b == b && vc.n == m && vc.h == p.kv_head(h)) << "value " << m;
                  ++pairs[{b, h, n, m, t.s, t.r, t.o}];
                }
              }
        }
        // Partial rows of one launch are distinct: its queries never overlap.
        EXPECT_EQ(std::count_if(seen.begin(), seen.end(), [](int x) { return x > 1; }), 0);
        // The merge finds head h's tasks at [begin[h], begin[h + 1]).
        const std::vector<int> begin = cuda::head_begin(p, list);
        ASSERT_EQ(begin.size(), static_cast<size_t>(H + 1));
        EXPECT_EQ(begin.back(), static_cast<int>(list.tasks.size()));
        for (int64_t h = 0; h < H; ++h) {
          for (int i = begin[h]; i < begin[h + 1]; ++i) {
            const cuda::Task& t = list.tasks[static_cast<size_t>(i)];
            EXPECT_EQ(list.heads[static_cast<size_t>(t.head_first)], h);
          }
        }
      }
    }
    expect_every_pair_once(ring.ps[0], causal, pairs);
  });
}

// The GPU ring's extra device memory per rank (gpu_ring_memory, gpu_ring_backward_memory:
// what its shards allocate), for a fixed shard as the ring grows from 2 to 64 ranks with
// one segment over the whole sequence: it does not grow with the number of ranks (each
// step's partials are merged at once; two blocks in flight). And its causal work (the
// (query, key) pairs of every launch) is the same on every rank, within a tile's rounding.
TEST(GpuPlan, RingMemoryStaysBoundedAndCausalWorkIsBalanced) {
  const int64_t B = 1, H = 2, Hkv = 1, D = 8, n_loc = 16, tile = 4;
  struct Ring {
    int64_t most_fwd = 0, most_bwd = 0, least_work = INT64_MAX, most_work = 0;
  };
  const auto measure = [&](int P) {
    const DilatedConfig cfg{{n_loc * P}, {1}, Mode::kGroups, true, std::nullopt};
    const RingProblems ring(cfg, P, B, n_loc, H, Hkv, D);
    Ring r;
    for (int rank = 0; rank < P; ++rank) {
      const Problem& p = ring.ps[static_cast<size_t>(rank)];
      const RingPlan& plan = ring.plans[static_cast<size_t>(rank)];
      EXPECT_TRUE(plan.spans.size() == 1 && plan.spans[0].balanced);
      const cuda::GpuRingForwardPlan fp = cuda::plan_gpu_ring_forward(p, plan, tile);
      r.most_fwd = std::max(r.most_fwd, cuda::gpu_ring_memory(p, plan, fp).total());
      r.most_bwd = std::max(r.most_bwd, cuda::gpu_ring_backward_memory(p, plan).total());
      int64_t work = 0;
      std::vector<const cuda::TaskList*> lists = {&fp.local};
      for (size_t e = 0; e < plan.steps.size(); ++e) {
        lists.push_back(&fp.block[e]);
        lists.push_back(&fp.answer[e]);
      }
      for (const cuda::TaskList* list : lists) {
        for (const cuda::Task& t : list->tasks) {
          for (int64_t tq = t.q_lo; tq < t.q_hi; ++tq) {
            work += std::max<int64_t>(0, std::min(t.k_hi, tq + 1) - t.k_lo);
          }
        }
      }
      r.least_work = std::min(r.least_work, work);
      r.most_work = std::max(r.most_work, work);
    }
    return r;
  };
  // From 4 ranks on, some rank both sends its second half and answers another's: the most
  // any rank holds.
  const Ring at4 = measure(4);
  ASSERT_GT(at4.most_fwd, 0);
  for (int P = 2; P <= 64; P *= 2) {
    SCOPED_TRACE(::testing::Message() << "P=" << P);
    const Ring r = measure(P);
    EXPECT_LE(r.most_fwd, at4.most_fwd) << "forward bytes per rank grow with the ranks";
    EXPECT_LE(r.most_bwd, at4.most_bwd) << "backward bytes per rank grow with the ranks";
    // Unbalanced, the last rank would do P times the first's work.
    EXPECT_LE(static_cast<double>(r.most_work), 1.1 * static_cast<double>(r.least_work))
        << "causal work per rank from " << r.least_work << " to " << r.most_work << " pairs";
  }
}

// The GPU ring backward's host plan, simulated on the CPU for every rank: the dq passes
// (backward_tasks / block_backward_tasks by query) and the dk/dv passes (by key) against the
// local keys and every received block each compute every (query row, key row) pair of
// SPEC.md's dilated attention once; no two blocks of one launch write the same accumulator
// row; and the dk/dv rows a block's pass writes (in the block's layout) are added, by the
// owner's add (pack_runs with the accumulator strides), into the owner's rows of those keys.
TEST(GpuPlan, RingBackwardTasksComputeEveryPairOnce) {
  const int64_t B = 2, H = 4, Hkv = 2, D = 8, n_loc = 8, tile = 4;
  const Strides3 acc_st{n_loc * Hkv * D, Hkv * D, D};
  for_each_ring_case(n_loc, [&](int P, const DilatedConfig& cfg) {
    const RingProblems ring(cfg, P, B, n_loc, H, Hkv, D);
    Pairs dq_pairs, dkv_pairs;
    for (int rank = 0; rank < P; ++rank) {
      const Problem& p = ring.ps[static_cast<size_t>(rank)];
      const RingPlan& plan = ring.plans[static_cast<size_t>(rank)];
      for (bool by_key : {false, true}) {
        // The launches in stream order: each branch against the local keys (span -1), then
        // each received block (its queries before the split on a balanced span) and each
        // answered step (the asker's second half against the local keys).
        struct Launch {
          cuda::TaskList list;
          int sender, span, asker;
        };
        std::vector<Launch> launches;
        for (int branch = 0; branch < static_cast<int>(p.branches.size()); ++branch) {
          launches.push_back({cuda::backward_tasks(p, branch, tile, by_key), rank, -1, -1});
        }
        for (const RingStep& st : plan.steps) {
          const bool balanced = plan.spans[static_cast<size_t>(st.span)].balanced;
          if (balanced && st.send_to >= 0) {
            launches.push_back(
                {cuda::answer_backward_tasks(p, plan, st.span, st.send_to, tile, by_key), rank, -1,
                 st.send_to});
          }
          if (st.recv_from < 0) continue;
          EXPECT_TRUE(!cfg.causal || st.recv_from < rank);
          launches.push_back({cuda::block_backward_tasks(p, plan, st.span, st.recv_from, tile,
                                                         by_key, balanced ? plan.split : INT64_MAX),
                              st.recv_from, st.span, -1});
        }
        for (const Launch& launch : launches) {
          const bool local = launch.span < 0;
          // The rows of the queries: this rank's, or the asker's half (its dq buffer
          // [B][half][H][D]).
          const int64_t q_row0 = launch.asker >= 0 ? plan.split_of(p, launch.asker) : p.shard_begin;
          const int64_t q_rows = launch.asker >= 0 ? plan.half_rows(p) : n_loc;
          // Block element offset -> the sender's K (V) row packed there, and the sender's
          // dk (dv) accumulator row the gradient written there is added to.
          std::map<int64_t, Coord> block_k, block_v, owner_k, owner_v;
          if (!local) {
            const Problem& sp = ring.ps[static_cast<size_t>(launch.sender)];
            const RingPlan& splan = ring.plans[static_cast<size_t>(launch.sender)];
            const std::vector<cuda::PackRun> packs =
                cuda::pack_runs(sp, splan, launch.span, sp.k_st, sp.v_st);
            const std::vector<cuda::PackRun> adds =
                cuda::pack_runs(sp, splan, launch.span, acc_st, acc_st);
            ASSERT_EQ(packs.size(), adds.size());
            block_k = copied(cuda::block_copies(packs, false, D, true), true, n_loc, Hkv, D,
                             launch.sender);
            block_v = copied(cuda::block_copies(packs, true, D, true), true, n_loc, Hkv, D,
                             launch.sender);
            owner_k = copied(cuda::block_copies(adds, false, D, false), false, n_loc, Hkv, D,
                             launch.sender);
            owner_v = copied(cuda::block_copies(adds, true, D, false), false, n_loc, Hkv, D,
                             launch.sender);
          }
          const cuda::TaskList& list = launch.list;
          std::set<std::tuple<int, int64_t>> written;  // (accumulator, element offset)
          for (const cuda::Task& t : list.tasks) {
            EXPECT_EQ(t.tiles_per_seg, ceil_div(by_key ? t.k_hi - t.k_lo : t.q_hi - t.q_lo, tile));
            EXPECT_LE(t.segments * t.tiles_per_seg, list.max_tiles);
            if (!by_key) {
              ASSERT_EQ(t.head_count, 1);
            }
            for (int64_t b = 0; b < B; ++b)
              for (int64_t seg = 0; seg < t.segments; ++seg) {
                const auto at = [&](const cuda::RowSource& x, int64_t kept) {
                  return x.off + b * x.b_st + seg * x.seg_st + kept * x.t_st;
                };
                const auto row_of = [&](int64_t kept) {
                  return (t.seg0 + seg) * t.s + t.o + kept * t.r;
                };
                for (int64_t tq = t.q_lo; tq < t.q_hi; ++tq) {
                  const int64_t n_local = row_of(tq) - q_row0;
                  ASSERT_TRUE(n_local >= 0 && n_local < q_rows) << "query " << row_of(tq);
                  const int64_t h = list.heads[static_cast<size_t>(t.head_first)];
                  if (!by_key) {
                    EXPECT_TRUE(written.insert({0, ((b * q_rows + n_local) * H + h) * D}).second)
                        << "two blocks write dq row " << row_of(tq) << " of head " << h;
                  }
                }
                for (int64_t tk = t.k_lo; tk < t.k_hi; ++tk) {
                  const int64_t m = row_of(tk);
                  Coord kv[4];  // K, V, dK destination, dV destination
                  if (local) {
                    kv[0] = decode(at(t.k_src, tk), n_loc, Hkv, D, rank);
                    kv[1] = decode(at(t.v_src, tk), n_loc, Hkv, D, rank);
                    kv[2] = decode(at(t.dk_dst, tk), n_loc, Hkv, D, rank);
                    kv[3] = decode(at(t.dv_dst, tk), n_loc, Hkv, D, rank);
                  } else {
                    ASSERT_EQ(block_k.count(at(t.k_src, tk)), 1u);
                    ASSERT_EQ(block_v.count(at(t.v_src, tk)), 1u);
                    ASSERT_EQ(owner_k.count(at(t.dk_dst, tk)), 1u);
                    ASSERT_EQ(owner_v.count(at(t.dv_dst, tk)), 1u);
                    kv[0] = block_k[at(t.k_src, tk)];
                    kv[1] = block_v[at(t.v_src, tk)];
                    kv[2] = owner_k[at(t.dk_dst, tk)];
                    kv[3] = owner_v[at(t.dv_dst, tk)];
                  }
                  for (const Coord& c : kv) {
                    ASSERT_TRUE(c.b == b && c.n == m && c.h == t.kv_head) << "key " << m;
                  }
                  if (by_key) {
                    // Local: two accumulators; a block: dk and dv share its gradient buffer.
                    EXPECT_TRUE(written.insert({1, at(t.dk_dst, tk)}).second) << "dk row " << m;
                    EXPECT_TRUE(written.insert({local ? 2 : 1, at(t.dv_dst, tk)}).second)
                        << "dv row " << m;
                  }
                  for (int i = 0; i < t.head_count; ++i) {
                    const int64_t h = list.heads[static_cast<size_t>(t.head_first + i)];
                    EXPECT_EQ(p.kv_head(h), t.kv_head);
                    for (int64_t tq = t.q_lo; tq < t.q_hi; ++tq) {
                      if (cfg.causal && tk > tq) continue;
                      ++(by_key ? dkv_pairs : dq_pairs)[{b, h, row_of(tq), m, t.s, t.r, t.o}];
                    }
                  }
                }
              }
          }
        }
      }
    }
    expect_every_pair_once(ring.ps[0], cfg.causal, dq_pairs);
    expect_every_pair_once(ring.ps[0], cfg.causal, dkv_pairs);
  });
}

}  // namespace
}  // namespace ringattn::test
