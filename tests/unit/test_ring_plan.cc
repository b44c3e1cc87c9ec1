// The ring plan of a causal branch that spans ranks (src/plan/ring_plan.h), as the CPU ring
// (src/backend/cpu/ring.cc) uses it, on simulated ranks: a rank attends its own keys, the
// first half of its queries (rows before plan.split) against each received block, and, for
// each rank it sends keys to, that rank's second half against its own keys. Every causal
// (query, key) pair must then be computed exactly once, and every rank must do the same work.

#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "src/plan/problem.h"
#include "src/plan/ring_plan.h"

namespace ringattn::test {
namespace {

// Problem of rank `rank` of P for one causal branch of rate 1 over the whole sequence.
Problem causal_problem(int P, int rank, int64_t n_loc, int64_t heads) {
  Problem p;
  p.batch = 1;
  p.heads = heads;
  p.kv_heads = 1;
  p.head_dim = 4;
  p.seq = P * n_loc;
  p.shard_rows = n_loc;
  p.shard_begin = rank * n_loc;
  p.causal = true;
  p.branches.push_back({P * n_loc, 1});
  assign_heads(Mode::kLongNet, p.branches, heads, p.head_begin, p.head_branches);
  return p;
}

TEST(RingPlan, BalancedCausalWorkCoversEveryPairOnceAndEvenly) {
  for (int P : {2, 3, 4, 7}) {
    for (int64_t n_loc : {2, 6, 8}) {
      SCOPED_TRACE(::testing::Message() << "P=" << P << " n_loc=" << n_loc);
      const int64_t N = P * n_loc;
      std::vector<int> count(static_cast<size_t>(N * N), 0);  // [query][key]
      std::vector<int64_t> work(static_cast<size_t>(P), 0);
      const auto attend = [&](int rank, int64_t q0, int64_t q1, int64_t k0, int64_t k1) {
        for (int64_t q = q0; q < q1; ++q) {
          for (int64_t k = k0; k < std::min(k1, q + 1); ++k) {
            ++count[static_cast<size_t>(q * N + k)];
            ++work[static_cast<size_t>(rank)];
          }
        }
      };
      for (int a = 0; a < P; ++a) {
        const Problem p = causal_problem(P, a, n_loc, 2);
        const RingPlan plan = plan_ring(p, a, P);
        ASSERT_EQ(plan.spans.size(), 1u);
        ASSERT_TRUE(plan.spans[0].balanced);
        EXPECT_EQ(plan.split, a * n_loc + n_loc / 2);
        attend(a, a * n_loc, (a + 1) * n_loc, a * n_loc, (a + 1) * n_loc);
        for (const RingStep& st : plan.steps) {
          if (st.recv_from >= 0) {
            EXPECT_LT(st.recv_from, a) << "a causal rank receives only earlier keys";
            attend(a, a * n_loc, plan.split, st.recv_from * n_loc, (st.recv_from + 1) * n_loc);
          }
          if (st.send_to >= 0) {
            EXPECT_GT(st.send_to, a);
            const int64_t split = st.send_to * n_loc + n_loc / 2;
            attend(a, split, (st.send_to + 1) * n_loc, a * n_loc, (a + 1) * n_loc);
          }
        }
      }
      for (int64_t q = 0; q < N; ++q) {
        for (int64_t k = 0; k <= q; ++k) {
          ASSERT_EQ(count[static_cast<size_t>(q * N + k)], 1) << "query " << q << ", key " << k;
        }
      }
      const auto [least, most] = std::minmax_element(work.begin(), work.end());
      EXPECT_EQ(*least, *most) << "every rank does the same number of pairs";
    }
  }
}

}  // namespace
}  // namespace ringattn::test
