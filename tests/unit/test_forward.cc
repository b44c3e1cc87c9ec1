// The fast CPU backend against the fp64 reference (and the low-precision rule of SPEC.md).

#include <gtest/gtest.h>

#include <cmath>

#include "src/backend/ref/reference.h"
#include "src/plan/problem.h"
#include "tests/support/expect.h"
#include "tests/support/oracle.h"
#include "tests/support/test_util.h"

namespace ringattn::test {
namespace {

struct Inputs {
  Tensor q, k, v, out, lse;
  DilatedConfig cfg;
};

Inputs make_run(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  const bool bnh = !c.strided;
  const int64_t pad = c.strided ? 3 : 0;
  Inputs run{Tensor(c.dtype, {c.B, c.N, c.H, c.D}, bnh, pad),
             Tensor(c.dtype, {c.B, c.N, c.Hkv, c.D}, bnh, pad),
             Tensor(c.dtype, {c.B, c.N, c.Hkv, c.D}, bnh, pad),
             Tensor(c.dtype, {c.B, c.N, c.H, c.D}, bnh, pad),
             Tensor(DType::kF32, {c.B, c.H, c.N}, true, c.strided ? 1 : 0),
             DilatedConfig{c.s, c.r, c.mode, c.causal, std::nullopt}};
  run.q.fill_normal(rng);
  run.k.fill_normal(rng);
  run.v.fill_normal(rng);
  return run;
}

ReferenceResult reference_of(Inputs& run) {
  return reference_forward(make_problem(run.cfg, run.q.view(), run.k.view(), run.v.view(),
                                        run.out.view(), run.lse.view(), 1 << 20, "reference"));
}

void run_cpu(Inputs& run, int threads = 0) {
  DilatedAttention attn(run.cfg, ExecOptions{Backend::kCpu, threads});
  attn.forward(run.q.view(), run.k.view(), run.v.view(), run.out.view(), run.lse.view());
}

// Checks one case: fp32 within 1e-5 of the fp64 reference; fp16/bf16 within twice the error
// of the naive computation in the same precision. Inputs and outputs non-zero and finite.
void check_case(const Case& c, uint32_t seed) {
  SCOPED_TRACE(describe(c));
  Inputs run = make_run(c, seed);
  const ReferenceResult ref = reference_of(run);
  run_cpu(run);
  expect_forward_close(run.cfg, run.q, run.k, run.v, run.out, run.lse, ref);
}

TEST(CpuForward, SeedLikeConfigurations) {
  check_case({1, 256, 3, 3, 64, {64, 128, 256}, {1, 2, 4}, Mode::kGroups, true}, 10);
  check_case({2, 256, 3, 3, 64, {64, 128, 256}, {1, 2, 4}, Mode::kLongNet, true}, 11);
  check_case({1, 512, 2, 2, 128, {256, 512}, {1, 2}, Mode::kGroups, false}, 12);
}

TEST(CpuForward, HeadDims) {
  // D % 6 = 1, 4, 3, 5, 4, 2, 2, 4: every tail tile of the output product.
  uint32_t seed = 20;
  for (int64_t d : {1, 16, 33, 59, 64, 80, 128, 256}) {
    check_case({1, 192, 2, 1, d, {96, 192}, {1, 3}, Mode::kLongNet, true}, seed++);
    check_case({1, 192, 2, 2, d, {64, 192}, {2, 4}, Mode::kGroups, false}, seed++);
  }
}

TEST(CpuForward, LongSegmentsSpanManyTiles) {
  // Segments much longer than a key tile and a query tile; row blocks split segments.
  check_case({1, 1024, 2, 1, 32, {1024}, {1}, Mode::kGroups, true}, 30);
  check_case({1, 1024, 2, 2, 32, {512, 1024}, {1, 3}, Mode::kLongNet, false}, 31);
  check_case({1, 2048, 1, 1, 16, {2048}, {7}, Mode::kGroups, true}, 32);
  // Several row blocks (1024 kept rows per task) inside one segment, and across segments.
  check_case({1, 4096, 1, 1, 16, {4096}, {1}, Mode::kGroups, true}, 33);
  check_case({1, 4096, 2, 1, 16, {1024, 4096}, {1, 2}, Mode::kLongNet, false}, 34);
}

TEST(CpuForward, RandomisedConfigurations) {
  std::mt19937 rng(40);
  const DType dtypes[] = {DType::kF32, DType::kBF16, DType::kF16};
  for (int trial = 0; trial < 24; ++trial) {
    Case c = random_case(rng, {16, 64, 80, 128});
    c.dtype = dtypes[trial % 3];
    check_case(c, 100 + trial);
  }
}

TEST(CpuForward, AllDtypesAndStrides) {
  uint32_t seed = 50;
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (bool strided : {false, true}) {
      check_case({2, 128, 4, 2, 64, {32, 128}, {1, 2}, Mode::kGroups, true, dt, strided}, seed++);
      check_case({1, 128, 4, 1, 128, {32, 128}, {1, 4}, Mode::kLongNet, false, dt, strided},
                 seed++);
    }
  }
}

TEST(CpuForward, BitwiseDeterministicAcrossRunsAndThreadCounts) {
  const Case c{2, 512, 4, 2, 64, {128, 512}, {1, 4}, Mode::kLongNet, true};
  Inputs a = make_run(c, 60);
  Inputs b = make_run(c, 60);
  run_cpu(a, 1);
  run_cpu(b, 2);
  EXPECT_EQ(a.out.bytes(), b.out.bytes());
  EXPECT_EQ(a.lse.bytes(), b.lse.bytes());
  run_cpu(b, 2);
  EXPECT_EQ(a.out.bytes(), b.out.bytes());
  const Stats s = compare_bnhd(a.out, reference_of(a).out);
  EXPECT_GT(s.nonzero, 0);
  EXPECT_EQ(s.nonfinite, 0);
}

TEST(CpuForward, ReferenceBackendThroughPublicApi) {
  const Case c{1, 64, 2, 2, 16, {32, 64}, {1, 2}, Mode::kGroups, true};
  Inputs run = make_run(c, 70);
  DilatedAttention attn(run.cfg, ExecOptions{Backend::kReference, 0});
  attn.forward(run.q.view(), run.k.view(), run.v.view(), run.out.view(), run.lse.view());
  const OracleResult orc = oracle_forward(run.cfg, run.q, run.k, run.v);
  const Stats s = compare_bnhd(run.out, orc.out);
  EXPECT_LE(s.max_abs_err, 1e-6);
  EXPECT_GT(s.nonzero, 0);
  EXPECT_LE(compare_lse(run.lse, orc.lse).max_abs_err, 1e-5);
}

TEST(CpuForward, CustomScale) {
  Case c{1, 64, 2, 2, 16, {64}, {1}, Mode::kGroups, true};
  Inputs run = make_run(c, 80);
  run.cfg.scale = 0.7f;
  const ReferenceResult ref = reference_of(run);
  run_cpu(run);
  EXPECT_LE(compare_bnhd(run.out, ref.out).max_abs_err, 1e-5);
}

// World size 1 through the self communicator (no MPI): the ring is the single-device layer.
TEST(CpuForward, RingOnOneProcessEqualsDilatedAttention) {
  const Case c{2, 256, 4, 2, 64, {64, 256}, {1, 2}, Mode::kLongNet, true};
  Inputs a = make_run(c, 90), b = make_run(c, 90);
  run_cpu(a);
  const std::unique_ptr<Communicator> self = make_self_communicator();
  RingDilatedAttention ring(b.cfg, *self);
  ring.forward(b.q.view(), b.k.view(), b.v.view(), b.out.view(), b.lse.view());
  const Stats s = compare_bnhd(b.out, to_double(a.out));
  EXPECT_EQ(s.max_abs_err, 0.0);
  EXPECT_GT(s.nonzero, 0);
  EXPECT_EQ(ring.last_stats().bytes_sent, 0);
}

}  // namespace
}  // namespace ringattn::test
