// The CPU backend's bf16 kernels (ExecOptions::cpu_bf16): each one this CPU has against the
// fp64 reference under SPEC.md's low-precision rule, on random and adversarial inputs, in
// every place the kernel serves (dilated attention, the ring on one process, block-sparse),
// forward and backward, and bitwise determinism. A kernel the CPU lacks is skipped with the
// reason (AMX-BF16: Intel Sapphire Rapids and later; AVX512_BF16: also AMD Zen 4 and later).

#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "src/backend/cpu/bf16_kernels.h"
#include "src/backend/ref/reference.h"
#include "tests/support/block_sparse_oracle.h"
#include "tests/support/expect.h"

namespace ringattn::test {
namespace {

bool available(CpuBf16 kernel) {
  try {
    cpu::resolve_bf16(kernel);
    return true;
  } catch (const Error&) {
    return false;
  }
}

class CpuBf16Kernel : public ::testing::TestWithParam<CpuBf16> {
 protected:
  void SetUp() override {
    if (!available(GetParam())) {
      GTEST_SKIP() << "cpu_bf16 = " << cpu_bf16_name(GetParam()) << " is not on this CPU";
    }
  }
  ExecOptions options(int threads = 0) const {
    ExecOptions o;
    o.num_threads = threads;
    o.cpu_bf16 = GetParam();
    return o;
  }

  // q and k of `in` drawn again (from seed + 1000) with standard deviation `stddev`.
  static void redraw_qk(CaseTensors& in, uint32_t seed, float stddev) {
    std::mt19937 rng(seed + 1000);
    in.q.fill_normal(rng, stddev);
    in.k.fill_normal(rng, stddev);
  }

  // Forward of `c` (bf16) on inputs drawn with standard deviation `stddev` (q and k; v is
  // N(0, 1)) against the fp64 reference: within twice the naive bf16 computation's error.
  void check_forward(Case c, uint32_t seed, float stddev = 1.0f,
                     std::optional<float> scale = std::nullopt) {
    c.dtype = DType::kBF16;
    SCOPED_TRACE(describe(c) + " stddev " + std::to_string(stddev));
    CaseTensors in(c, seed);
    redraw_qk(in, seed, stddev);
    DilatedConfig cfg = c.config();
    cfg.scale = scale;
    DilatedAttention(cfg, options())
        .forward(in.q.view(), in.k.view(), in.v.view(), in.out.view(), in.lse.view());
    const ReferenceResult ref =
        reference_forward(make_problem(cfg, in.q.view(), in.k.view(), in.v.view(), in.out.view(),
                                       in.lse.view(), 1 << 20, "reference"));
    expect_forward_close(cfg, in.q, in.k, in.v, in.out, in.lse, ref);
  }

  // Forward then backward of `c` (bf16) against the fp64 reference gradients.
  void check_backward(Case c, uint32_t seed, float stddev = 1.0f) {
    c.dtype = DType::kBF16;
    SCOPED_TRACE(describe(c) + " stddev " + std::to_string(stddev));
    CaseTensors in(c, seed);
    redraw_qk(in, seed, stddev);
    const DilatedAttention attn(c.config(), options());
    attn.forward(in.q.view(), in.k.view(), in.v.view(), in.out.view(), in.lse.view());
    attn.backward(in.dout.view(), in.q.view(), in.k.view(), in.v.view(), in.out.view(),
                  in.lse.view(), in.dq.view(), in.dk.view(), in.dv.view());
    expect_grads_close(DType::kBF16, in.dq, in.dk, in.dv, reference_backward(in.problem()));
  }

  // `trials` random configurations (D from 16 to 128) drawn from `rng_seed`, the inputs of
  // trial t from seed0 + t: forward, or with `backward` forward and backward.
  void check_random(uint32_t rng_seed, int trials, uint32_t seed0, bool backward) {
    std::mt19937 rng(rng_seed);
    for (int trial = 0; trial < trials; ++trial) {
      const Case c = random_case(rng, {16, 32, 64, 80, 128});
      const uint32_t seed = seed0 + static_cast<uint32_t>(trial);
      if (backward) {
        check_backward(c, seed);
      } else {
        check_forward(c, seed);
      }
    }
  }
};

TEST_P(CpuBf16Kernel, ForwardRandomisedConfigurations) {
  check_random(1, 16, 100, false);
}

TEST_P(CpuBf16Kernel, ForwardHeadDimsScalesAndStrides) {
  uint32_t seed = 200;
  for (int64_t d : {1, 2, 31, 64, 80, 256}) {
    check_forward({1, 192, 2, 1, d, {96, 192}, {1, 3}, Mode::kLongNet, true}, seed++);
    check_forward({1, 192, 2, 2, d, {64, 192}, {2, 4}, Mode::kGroups, false, {}, true}, seed++);
  }
  // A negative scale (folded into the sign of Q) and a custom positive one.
  check_forward({1, 256, 2, 1, 64, {128, 256}, {1, 2}, Mode::kLongNet, true}, seed++, 1.0f, -0.3f);
  check_forward({2, 128, 4, 2, 48, {32, 128}, {1, 2}, Mode::kGroups, false, {}, true}, seed++, 1.0f,
                0.7f);
}

// Large score ranges: q and k with standard deviation 4 give scores of standard deviation 16
// (D = 64), so each softmax spans e^50 and a few keys dominate every row.
TEST_P(CpuBf16Kernel, ForwardLargeScoreRanges) {
  check_forward({1, 512, 2, 1, 64, {128, 512}, {1, 2}, Mode::kLongNet, true}, 300, 4.0f);
  check_forward({2, 256, 4, 2, 64, {64, 256}, {1, 4}, Mode::kGroups, false, {}, true}, 301, 4.0f);
  check_forward({1, 256, 2, 2, 128, {256}, {1}, Mode::kGroups, true}, 302, 8.0f);
}

// Long rows: every query of a dense 2048-row segment attends to up to 2048 keys, so the
// rounding of P to bf16 is summed over many terms.
TEST_P(CpuBf16Kernel, ForwardLongRows) {
  check_forward({1, 2048, 1, 1, 64, {2048}, {1}, Mode::kGroups, false}, 400);
  check_forward({1, 2048, 1, 1, 64, {2048}, {1}, Mode::kGroups, true}, 401, 2.0f);
}

TEST_P(CpuBf16Kernel, BackwardRandomisedConfigurations) {
  check_random(2, 10, 500, true);
}

TEST_P(CpuBf16Kernel, BackwardHeadDimsStridesAndAdversarialInputs) {
  uint32_t seed = 600;
  for (int64_t d : {1, 31, 64, 256}) {
    check_backward({1, 96, 2, 1, d, {48, 96}, {1, 5}, Mode::kLongNet, true}, seed++);
  }
  check_backward({2, 128, 4, 2, 64, {32, 128}, {1, 2}, Mode::kGroups, true, {}, true}, seed++);
  check_backward({1, 512, 2, 1, 64, {128, 512}, {1, 2}, Mode::kLongNet, true}, seed++, 3.0f);
  check_backward({1, 2048, 1, 1, 64, {2048}, {1}, Mode::kGroups, false}, seed++);
}

TEST_P(CpuBf16Kernel, BitwiseDeterministicAcrossRunsAndThreadCounts) {
  const Case c{2, 512, 4, 2, 64, {128, 512}, {1, 4}, Mode::kLongNet, true, DType::kBF16};
  CaseTensors a(c, 700), b(c, 700);
  const auto run = [&](CaseTensors& in, int threads) {
    const DilatedAttention attn(c.config(), options(threads));
    attn.forward(in.q.view(), in.k.view(), in.v.view(), in.out.view(), in.lse.view());
    attn.backward(in.dout.view(), in.q.view(), in.k.view(), in.v.view(), in.out.view(),
                  in.lse.view(), in.dq.view(), in.dk.view(), in.dv.view());
  };
  run(a, 1);
  for (int round = 0; round < 2; ++round) {
    run(b, 2);
    EXPECT_EQ(a.out.bytes(), b.out.bytes());
    EXPECT_EQ(a.lse.bytes(), b.lse.bytes());
    EXPECT_EQ(a.dq.bytes(), b.dq.bytes());
    EXPECT_EQ(a.dk.bytes(), b.dk.bytes());
    EXPECT_EQ(a.dv.bytes(), b.dv.bytes());
  }
  const Stats s = compare_bnhd(a.dk, reference_backward(a.problem()).dk);
  EXPECT_GT(s.nonzero, 0);
  EXPECT_EQ(s.nonfinite, 0);
}

// The ring on one process (no communication: the single-device kernel) and with a split
// (fp32 shard accumulators, several passes) against the fp64 reference and DilatedAttention.
TEST_P(CpuBf16Kernel, RingOnOneProcess) {
  const Case c{2, 256, 4, 2, 64, {64, 256}, {1, 2}, Mode::kLongNet, true, DType::kBF16};
  CaseTensors a(c, 800), b(c, 800);
  const DilatedAttention attn(c.config(), options());
  attn.forward(a.q.view(), a.k.view(), a.v.view(), a.out.view(), a.lse.view());
  const std::unique_ptr<Communicator> self = make_self_communicator();
  RingDilatedAttention ring(c.config(), *self, options());
  ring.forward(b.q.view(), b.k.view(), b.v.view(), b.out.view(), b.lse.view());
  EXPECT_EQ(a.out.bytes(), b.out.bytes());
  ring.backward(b.dout.view(), b.q.view(), b.k.view(), b.v.view(), b.out.view(), b.lse.view(),
                b.dq.view(), b.dk.view(), b.dv.view());
  expect_grads_close(DType::kBF16, b.dq, b.dk, b.dv, reference_backward(b.problem()));
}

TEST_P(CpuBf16Kernel, BlockSparseForwardAndBackward) {
  const int64_t bs = 32, N = 256;
  const BlockSparseConfig cfg{
      {BlockPattern::local_window(bs, bs + 1), BlockPattern::dilated(bs, {2, 3}),
       BlockPattern::global_local(bs, 1, bs / 2), BlockPattern::local_window(bs, N)},
      true,
      {}};
  auto comm = make_self_communicator();
  BlockSparseRingDilatedAttention attn(cfg, *comm, options());
  SparseInputs in(DType::kBF16, 1, N, 4, 2, 64, 900);
  in.forward(attn);
  in.backward(attn);
  const SparseOracle ref = sparse_oracle(cfg, in.q, in.k, in.v, &in.dout);
  expect_close(compare_bnhd(in.out, ref.out), out_tol(DType::kBF16), "out");
  const Stats l = compare_lse(in.lse, ref.lse);
  EXPECT_EQ(l.nonfinite, 0);
  EXPECT_LE(l.max_abs_err, 1e-4 * std::max(1.0, l.max_ref)) << "lse";
  for (auto [x, r, name] :
       {std::tuple<const Tensor*, const std::vector<double>*, const char*>{&in.dq, &ref.dq, "dq"},
        {&in.dk, &ref.dk, "dk"},
        {&in.dv, &ref.dv, "dv"}}) {
    expect_close(compare_bnhd(*x, *r), grad_tol(DType::kBF16), name);
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, CpuBf16Kernel,
                         ::testing::Values(CpuBf16::kWiden, CpuBf16::kDot, CpuBf16::kAmx),
                         [](const ::testing::TestParamInfo<CpuBf16>& param) {
                           return std::string(cpu_bf16_name(param.param));
                         });

// A kernel the CPU lacks is an Error at construction naming the option; one it has runs; the
// names parse back.
TEST(CpuBf16Options, UnavailableKernelsAreClearErrorsAndNamesParse) {
  const DilatedConfig cfg{{64}, {1}, Mode::kGroups, true, std::nullopt};
  for (CpuBf16 k : {CpuBf16::kAuto, CpuBf16::kWiden, CpuBf16::kDot, CpuBf16::kAmx}) {
    EXPECT_EQ(parse_cpu_bf16(cpu_bf16_name(k)), k);
    ExecOptions o;
    o.cpu_bf16 = k;
    if (available(k)) {
      EXPECT_NO_THROW(DilatedAttention(cfg, o));
      EXPECT_NE(cpu::resolve_bf16(k), CpuBf16::kAuto);
      continue;
    }
    const Error e = error_of([&] { DilatedAttention attn(cfg, o); });
    EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
    EXPECT_NE(std::string(e.what()).find(std::string("cpu_bf16 = ") + cpu_bf16_name(k)),
              std::string::npos)
        << e.what();
  }
  EXPECT_TRUE(available(CpuBf16::kWiden));
  EXPECT_TRUE(available(CpuBf16::kAuto));
  EXPECT_EQ(error_of([] { parse_cpu_bf16("avx"); }).code(), ErrorCode::kInvalidArgument);
}

}  // namespace
}  // namespace ringattn::test
