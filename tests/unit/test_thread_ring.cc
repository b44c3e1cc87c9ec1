// Multi-rank protocols on ranks that are threads of this process (tests/support/thread_world):
// the rings under NCCL's matching rules (a group completes only when its peers posted the
// matching operations), blocks that hold no rows, deadlines, and ranks that fail mid-call.

#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <random>

#include "ringattn/ringattn.h"
#include "src/plan/problem.h"
#include "src/plan/ring_plan.h"
#include "tests/support/fault_injection.h"
#include "tests/support/test_util.h"
#include "tests/support/thread_world.h"

namespace ringattn::test {
namespace {

struct RingSetup {
  int P;
  int64_t B, n_loc, H, Hkv, D;
  DilatedConfig cfg;
};

// The ring's out, dq, dk, dv (`ring`) against one process's (`one`): finite, no zeros where
// one's are not, within fp32 rounding; out non-zero, and with `grads_nonzero` the gradients
// too.
void expect_outputs_match(const AttentionTensors& ring, const AttentionTensors& one,
                          bool grads_nonzero) {
  for (const auto& [ring_t, one_t] : {std::pair<const Tensor*, const Tensor*>{&ring.out, &one.out},
                                      {&ring.dq, &one.dq},
                                      {&ring.dk, &one.dk},
                                      {&ring.dv, &one.dv}}) {
    const Stats st = compare_bnhd(*ring_t, to_double(*one_t));
    EXPECT_EQ(st.nonfinite, 0);
    EXPECT_EQ(st.missing, 0);
    if (ring_t == &ring.out || grads_nonzero) {
      EXPECT_GT(st.nonzero, 0);
    }
    EXPECT_LE(st.max_abs_err, 2e-5 * std::max(1.0, st.max_ref));
  }
}

// Forward and backward of the ring on P thread ranks against one process on the whole
// sequence: every rank's rows of out, lse, dq, dk, dv within fp32 rounding of it.
void expect_ring_matches_single(const RingSetup& s, Matching matching) {
  const int64_t N = s.P * s.n_loc;
  std::mt19937 rng(7);
  Tensor q(DType::kF32, {s.B, N, s.H, s.D}), k(DType::kF32, {s.B, N, s.Hkv, s.D}),
      v(DType::kF32, {s.B, N, s.Hkv, s.D}), dout(DType::kF32, {s.B, N, s.H, s.D});
  for (Tensor* t : {&q, &k, &v, &dout}) t->fill_normal(rng);
  Tensor out(DType::kF32, {s.B, N, s.H, s.D}), lse(DType::kF32, {s.B, s.H, N}),
      dq(DType::kF32, {s.B, N, s.H, s.D}), dk(DType::kF32, {s.B, N, s.Hkv, s.D}),
      dv(DType::kF32, {s.B, N, s.Hkv, s.D});
  DilatedAttention one(s.cfg);
  one.forward(q.view(), k.view(), v.view(), out.view(), lse.view());
  one.backward(dout.view(), q.view(), k.view(), v.view(), out.view(), lse.view(), dq.view(),
               dk.view(), dv.view());

  Tensor r_out(DType::kF32, {s.B, N, s.H, s.D}), r_lse(DType::kF32, {s.B, s.H, N}),
      r_dq(DType::kF32, {s.B, N, s.H, s.D}), r_dk(DType::kF32, {s.B, N, s.Hkv, s.D}),
      r_dv(DType::kF32, {s.B, N, s.Hkv, s.D});
  const AttentionTensors ring{q, k, v, dout, r_out, r_lse, r_dq, r_dk, r_dv};
  const std::vector<RankResult> results =
      run_ring_on_threads<RingDilatedAttention>(s.P, matching, s.cfg, s.n_loc, ring);
  for (int r = 0; r < s.P; ++r)
    ASSERT_TRUE(results[static_cast<size_t>(r)].ok) << results[r].message;
  // Gradients may be exactly 0 (one key per query): only out must be non-zero.
  expect_outputs_match(ring, {q, k, v, dout, out, lse, dq, dk, dv}, false);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t n = 0; n < N; ++n) {
        const double a = r_lse.get(b, h, n), e = lse.get(b, h, n);
        if (std::isinf(e)) {
          EXPECT_EQ(a, e);
        } else {
          EXPECT_NEAR(a, e, 2e-5);
        }
      }
}

TEST(ThreadWorld, NcclMatchingCompletesWholeGroupsInPostingOrder) {
  // Rank 0 posts a receive and waits on it; rank 1 waits on a receive of its own before it
  // sends. Under MPI's rules both complete; under NCCL's, rank 0's group also holds its
  // send, which only completes when rank 1's receive is posted: fine too. But if rank 1's
  // send is posted only after a wait that needs rank 0's *later* send, both time out.
  for (Matching m : {Matching::kMpi, Matching::kNccl}) {
    const auto comms = make_thread_world(2, m, 1.0);
    const std::vector<RankResult> res = run_ranks(comms, [](Communicator& c, int rank) {
      int in = -1, out = rank;
      const int peer = 1 - rank;
      CommRequest send = c.isend(&out, sizeof(int), peer, 0);
      CommRequest recv = c.irecv(&in, sizeof(int), peer, 0);
      c.wait(recv);
      c.wait(send);
      if (in != peer) throw Error(ErrorCode::kInternal, "wrong value");
    });
    for (const RankResult& r : res) EXPECT_TRUE(r.ok) << r.message;
  }
  const auto comms = make_thread_world(2, Matching::kNccl, 0.5);
  const std::vector<RankResult> res = run_ranks(comms, [](Communicator& c, int rank) {
    int a = 0, b = 0;
    if (rank == 0) {
      CommRequest r1 = c.irecv(&a, sizeof(int), 1, 1);  // grouped with r2
      CommRequest r2 = c.irecv(&b, sizeof(int), 1, 2);
      c.wait(r1);
      CommRequest s = c.isend(&a, sizeof(int), 1, 3);
      c.wait(s);
    } else {
      CommRequest s1 = c.isend(&a, sizeof(int), 0, 1);
      CommRequest r = c.irecv(&b, sizeof(int), 0, 3);  // needs rank 0's send, after its wait
      c.wait(r);
      CommRequest s2 = c.isend(&b, sizeof(int), 0, 2);
      c.wait(s2);
    }
  });
  for (const RankResult& r : res) {
    EXPECT_FALSE(r.ok);
    EXPECT_EQ(r.code, ErrorCode::kCommunication);
    EXPECT_NE(r.message.find("did not complete within the deadline"), std::string::npos)
        << r.message;
  }
}

// One ring object per rank serves calls of several shapes, one after another (its plans
// are kept per shape): every call matches one process on its whole sequence, the third
// (the first's shape again) as well as the first.
TEST(ThreadRing, OneObjectServesCallsOfSeveralShapes) {
  const int P = 2;
  const int64_t H = 2, D = 8;
  const DilatedConfig cfg{{8, 32}, {1, 1}, Mode::kGroups, true, std::nullopt};
  struct Shape {
    int64_t B, n_loc;
    Tensor q, k, v, out, lse, ring_out;
    Shape(const DilatedConfig& c, int64_t b, int64_t n, std::mt19937& rng)
        : B(b),
          n_loc(n),
          q(DType::kF32, {b, P * n, H, D}),
          k(DType::kF32, {b, P * n, H, D}),
          v(DType::kF32, {b, P * n, H, D}),
          out(DType::kF32, {b, P * n, H, D}),
          lse(DType::kF32, {b, H, P * n}),
          ring_out(DType::kF32, {b, P * n, H, D}) {
      for (Tensor* t : {&q, &k, &v}) t->fill_normal(rng);
      DilatedAttention(c).forward(q.view(), k.view(), v.view(), out.view(), lse.view());
    }
  };
  std::mt19937 rng(11);
  std::vector<std::unique_ptr<Shape>> shapes;
  shapes.push_back(std::make_unique<Shape>(cfg, 1, 16, rng));
  shapes.push_back(std::make_unique<Shape>(cfg, 2, 32, rng));
  shapes.push_back(std::make_unique<Shape>(cfg, 1, 16, rng));
  const auto comms = make_thread_world(P, Matching::kMpi);
  const std::vector<RankResult> results = run_ranks(comms, [&](Communicator& comm, int rank) {
    ExecOptions opt;
    opt.num_threads = 1;
    RingDilatedAttention ring(cfg, comm, opt);
    for (const std::unique_ptr<Shape>& s : shapes) {
      const int64_t r0 = rank * s->n_loc, n = s->n_loc;
      ring.forward(rows_of(s->q, r0, n), rows_of(s->k, r0, n), rows_of(s->v, r0, n),
                   rows_of(s->ring_out, r0, n), std::nullopt);
    }
  });
  for (int r = 0; r < P; ++r) ASSERT_TRUE(results[static_cast<size_t>(r)].ok) << results[r].message;
  for (const std::unique_ptr<Shape>& s : shapes) {
    const Stats st = compare_bnhd(s->ring_out, to_double(s->out));
    EXPECT_EQ(st.missing, 0) << "B = " << s->B;
    EXPECT_GT(st.nonzero, 0);
    EXPECT_LE(st.max_abs_err, 2e-5 * std::max(1.0, st.max_ref)) << "B = " << s->B;
  }
}

TEST(ThreadRing, RingsFollowNcclMatchingRules) {
  // Non-causal spanning branches return gradients in every step: the protocol must not wait
  // for a group holding a gradient receive whose send the peer posts after its own wait.
  for (int P : {2, 3}) {
    for (bool causal : {false, true}) {
      SCOPED_TRACE("P=" + std::to_string(P) + (causal ? " causal" : " full"));
      const RingSetup s{P,
                        1,
                        32,
                        2,
                        1,
                        16,
                        DilatedConfig{{16, 32 * P}, {1, 2}, Mode::kLongNet, causal, std::nullopt}};
      expect_ring_matches_single(s, Matching::kNccl);
    }
  }
}

TEST(ThreadRing, BranchesWithRanksThatHoldNoKeptRow) {
  // A dilation rate above N_loc: some ranks hold no kept row of a spanning branch (a block of
  // 0 rows): nothing moves to or from them, and the backward returns.
  expect_ring_matches_single(
      {4, 1, 64, 2, 1, 8, DilatedConfig{{64, 256}, {1, 128}, Mode::kGroups, false, std::nullopt}},
      Matching::kMpi);
  expect_ring_matches_single(
      {2, 1, 2, 2, 2, 8, DilatedConfig{{4}, {4}, Mode::kLongNet, false, std::nullopt}},
      Matching::kMpi);
  expect_ring_matches_single(
      {4, 1, 16, 4, 2, 8, DilatedConfig{{16, 64}, {1, 32}, Mode::kLongNet, true, std::nullopt}},
      Matching::kNccl);
}

TEST(ThreadRing, BlockSparseRingFollowsNcclMatchingRules) {
  const int P = 3;
  const int64_t n_loc = 32, N = P * n_loc, H = 2, D = 8;
  BlockSparseConfig cfg;
  cfg.patterns = {BlockPattern::local_window(8, 24)};
  std::mt19937 rng(9);
  Tensor q(DType::kF32, {1, N, H, D}), k(DType::kF32, {1, N, H, D}), v(DType::kF32, {1, N, H, D}),
      dout(DType::kF32, {1, N, H, D}), out(DType::kF32, {1, N, H, D}), lse(DType::kF32, {1, H, N}),
      dq(DType::kF32, {1, N, H, D}), dk(DType::kF32, {1, N, H, D}), dv(DType::kF32, {1, N, H, D});
  for (Tensor* t : {&q, &k, &v, &dout}) t->fill_normal(rng);
  {
    auto self = make_self_communicator();
    BlockSparseRingDilatedAttention one(cfg, *self);
    one.forward(q.view(), k.view(), v.view(), out.view(), lse.view());
    one.backward(dout.view(), q.view(), k.view(), v.view(), out.view(), lse.view(), dq.view(),
                 dk.view(), dv.view());
  }
  Tensor r_out(DType::kF32, {1, N, H, D}), r_lse(DType::kF32, {1, H, N}),
      r_dq(DType::kF32, {1, N, H, D}), r_dk(DType::kF32, {1, N, H, D}),
      r_dv(DType::kF32, {1, N, H, D});
  const AttentionTensors ring{q, k, v, dout, r_out, r_lse, r_dq, r_dk, r_dv};
  const std::vector<RankResult> res =
      run_ring_on_threads<BlockSparseRingDilatedAttention>(P, Matching::kNccl, cfg, n_loc, ring);
  for (const RankResult& r : res) ASSERT_TRUE(r.ok) << r.message;
  expect_outputs_match(ring, {q, k, v, dout, out, lse, dq, dk, dv}, true);
}

// Every planned transfer between simulated ranks has its partner: a send of span s in step k
// to rank b is a receive of span s from a in b's plan, with the same tag and a non-empty
// block of the same size; nothing is planned to a rank that holds no queries.
TEST(RingPlan, EveryTransferHasItsPartnerAndIsNotEmpty) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 300; ++trial) {
    const int P = 1 + static_cast<int>(rng() % 6);
    const int64_t n_loc = 1 + rng() % 12, H = 1 + rng() % 4;
    const Mode mode = rng() % 2 ? Mode::kLongNet : Mode::kGroups;
    const bool causal = rng() % 2;
    std::vector<int64_t> s, r;
    const int64_t g = 1 + rng() % 3;
    for (int64_t i = 0; i < g; ++i) {
      const int64_t seg = rng() % 2 ? n_loc : n_loc * (1 + rng() % P);
      if (P % (seg / n_loc) != 0) continue;
      s.push_back(seg);
      r.push_back(1 + static_cast<int64_t>(rng() % seg));
    }
    if (s.empty() || (mode == Mode::kGroups && H < static_cast<int64_t>(s.size()))) continue;
    Problem p;
    p.batch = 1;
    p.heads = H;
    p.kv_heads = 1;
    p.head_dim = 4;
    p.shard_rows = n_loc;
    p.seq = P * n_loc;
    p.causal = causal;
    for (size_t i = 0; i < s.size(); ++i) p.branches.push_back({s[i], r[i]});
    assign_heads(mode, p.branches, H, p.head_begin, p.head_branches);
    std::vector<RingPlan> plans;
    for (int a = 0; a < P; ++a) {
      Problem pa = p;
      pa.shard_begin = a * n_loc;
      plans.push_back(plan_ring(pa, a, P));
    }
    for (int a = 0; a < P; ++a) {
      Problem pa = p;
      pa.shard_begin = a * n_loc;
      for (const RingStep& st : plans[static_cast<size_t>(a)].steps) {
        if (st.send_to < 0) continue;
        const int64_t bytes = plans[static_cast<size_t>(a)].block_elements(pa, st.span, a);
        EXPECT_GT(bytes, 0);
        EXPECT_GT(plans[static_cast<size_t>(a)].block_elements(pa, st.span, st.send_to), 0)
            << "a block to a rank without queries";
        const auto& theirs = plans[static_cast<size_t>(st.send_to)].steps;
        const auto it = std::find_if(theirs.begin(), theirs.end(), [&](const RingStep& x) {
          return x.recv_from == a && x.tag == st.tag && x.span == st.span;
        });
        ASSERT_NE(it, theirs.end()) << "rank " << a << " sends to " << st.send_to << " with tag "
                                    << st.tag << " but nobody receives it";
      }
      for (const RingStep& st : plans[static_cast<size_t>(a)].steps) {
        if (st.recv_from < 0) continue;
        const auto& theirs = plans[static_cast<size_t>(st.recv_from)].steps;
        EXPECT_NE(std::find_if(theirs.begin(), theirs.end(),
                               [&](const RingStep& x) {
                                 return x.send_to == a && x.tag == st.tag && x.span == st.span;
                               }),
                  theirs.end());
      }
    }
  }
}

TEST(ThreadRing, ACallOnOneRankOnlyEndsAtTheDeadline) {
  const auto comms = make_thread_world(3, Matching::kMpi, 0.5);
  Tensor q(DType::kF32, {1, 16, 2, 8}), out(DType::kF32, {1, 16, 2, 8});
  std::mt19937 rng(1);
  q.fill_normal(rng);
  const std::vector<RankResult> res = run_ranks(comms, [&](Communicator& comm, int rank) {
    if (rank != 0) return;  // the others never call
    // The constructor's agreement is the first collective: it waits for the others.
    RingDilatedAttention ring(DilatedConfig{{48}, {1}, Mode::kGroups, false, std::nullopt}, comm);
    ring.forward(q.view(), q.view(), q.view(), out.view());
  });
  EXPECT_FALSE(res[0].ok);
  EXPECT_EQ(res[0].code, ErrorCode::kCommunication);
  EXPECT_NE(res[0].message.find("within the deadline of 0.5 s"), std::string::npos)
      << res[0].message;
  EXPECT_LT(res[0].seconds, 5.0);
  EXPECT_TRUE(comms[0]->broken());
  EXPECT_TRUE(res[1].ok && res[2].ok);
}

// Runs a 3-rank ring forward + backward in which rank 1 fails at its n-th visit of `site`.
std::vector<RankResult> ring_with_fault(const char* site, int n, bool bad_alloc) {
  const FaultHookScope hook;
  const int P = 3;
  const int64_t n_loc = 16;
  const DilatedConfig cfg{{16, 48}, {1, 2}, Mode::kLongNet, false, std::nullopt};
  const auto comms = make_thread_world(P, Matching::kMpi, 30.0);
  return run_ranks(comms, [&](Communicator& comm, int rank) {
    std::mt19937 rng(static_cast<uint32_t>(rank));
    Tensor q(DType::kF32, {1, n_loc, 2, 8}), out(DType::kF32, {1, n_loc, 2, 8}),
        lse(DType::kF32, {1, 2, n_loc}), dq(DType::kF32, {1, n_loc, 2, 8}),
        dk(DType::kF32, {1, n_loc, 2, 8}), dv(DType::kF32, {1, n_loc, 2, 8});
    q.fill_normal(rng);
    ExecOptions opt;
    opt.num_threads = 1;
    RingDilatedAttention ring(cfg, comm, opt);
    if (rank == 1) arm_fault(site, n, bad_alloc);
    ring.forward(q.view(), q.view(), q.view(), out.view(), lse.view());
    ring.backward(q.view(), q.view(), q.view(), q.view(), out.view(), lse.view(), dq.view(),
                  dk.view(), dv.view());
  });
}

TEST(ThreadRing, ARankThatFailsMidRingStopsEveryRankAtOnce) {
  for (bool bad_alloc : {false, true}) {
    SCOPED_TRACE(bad_alloc ? "std::bad_alloc" : "ringattn::Error");
    const std::vector<RankResult> res = ring_with_fault("ring.step", 2, bad_alloc);
    EXPECT_FALSE(res[1].ok);
    EXPECT_EQ(res[1].code, bad_alloc ? ErrorCode::kOutOfMemory : ErrorCode::kDevice)
        << res[1].message;
    for (int r : {0, 2}) {
      EXPECT_FALSE(res[static_cast<size_t>(r)].ok);
      EXPECT_EQ(res[static_cast<size_t>(r)].code, ErrorCode::kCommunication);
      EXPECT_NE(res[static_cast<size_t>(r)].message.find("rank 1 of this communicator failed"),
                std::string::npos)
          << res[static_cast<size_t>(r)].message;
      EXPECT_LT(res[static_cast<size_t>(r)].seconds, 10.0) << "the others waited for the deadline";
    }
  }
}

TEST(ThreadRing, AnAllocationFailureOnOneRankIsAnErrorOnEveryRank) {
  // Everything the ring allocates is made inside the ranks' agreement: the third allocation
  // of the forward's buffers (its lse accumulators) fails on rank 1, and every rank throws
  // kOutOfMemory before anything moves.
  const std::vector<RankResult> res = ring_with_fault("alloc", 3, true);
  for (size_t r = 0; r < res.size(); ++r) {
    EXPECT_FALSE(res[r].ok);
    EXPECT_EQ(res[r].code, ErrorCode::kOutOfMemory) << res[r].message;
  }
  EXPECT_NE(res[1].message.find("could not allocate"), std::string::npos) << res[1].message;
  EXPECT_NE(res[0].message.find("rank 1 of 3 rejected its input"), std::string::npos)
      << res[0].message;
}

}  // namespace
}  // namespace ringattn::test
