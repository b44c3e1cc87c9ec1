// Gradients at large scores (max |score| up to 1e20): as accurate against the fp64 reference
// as the forward, and finite whenever it is. An fp32 lse is rounded by |lse| * 2^-24, which
// exp(s - lse) turns into a relative error of every probability (7% at 1e6): the backward
// recomputes the lse in double where |lse| >= kPreciseLse (on one device, over a ring and in
// block-sparse attention).

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "ringattn/ringattn.h"
#include "src/backend/cpu/bf16_kernels.h"
#include "src/backend/ref/reference.h"
#include "src/plan/problem.h"
#include "tests/support/block_sparse_oracle.h"
#include "tests/support/test_util.h"
#include "tests/support/thread_world.h"

namespace ringattn::test {
namespace {

double max_abs(const Tensor& t) {
  double m = 0.0;
  for (double x : to_double(t)) m = std::max(m, std::abs(x));
  return m;
}

// Inputs whose scores reach about `magnitude`: q and k with entries of size
// sqrt(magnitude / sqrt(D)), scale 1 (so nearly every softmax row is one-hot).
struct LargeCase {
  int64_t B = 1, N = 64, H = 2, Hkv = 1, D = 16;
  double magnitude;
  Tensor q, k, v, dout, out, lse, dq, dk, dv;
  explicit LargeCase(double mag, uint32_t seed = 1)
      : magnitude(mag),
        q(DType::kF32, {B, N, H, D}),
        k(DType::kF32, {B, N, Hkv, D}),
        v(DType::kF32, {B, N, Hkv, D}),
        dout(DType::kF32, {B, N, H, D}),
        out(DType::kF32, {B, N, H, D}),
        lse(DType::kF32, {B, H, N}),
        dq(DType::kF32, {B, N, H, D}),
        dk(DType::kF32, {B, N, Hkv, D}),
        dv(DType::kF32, {B, N, Hkv, D}) {
    std::mt19937 rng(seed);
    const float size = static_cast<float>(std::sqrt(mag / std::sqrt(static_cast<double>(D))));
    q.fill_normal(rng, size);
    k.fill_normal(rng, size);
    v.fill_normal(rng);
    dout.fill_normal(rng);
  }

  // dv within fp32 rounding of the reference; dq and dk, whose reference is ~0 where the
  // softmax is one-hot (dS = P (dP - rowsum(dO O)) cancels exactly), within the rounding of
  // their terms: scale x D x max|v| x max|dout| x max|k| (dq) or x max|q| x the kept rows of a
  // segment (dk, a sum over the queries); all finite.
  void expect_grads(const ReferenceGrads& ref, int64_t kept) const {
    const double terms = static_cast<double>(D) * max_abs(v) * max_abs(dout);
    const struct {
      const Tensor& x;
      const std::vector<double>& r;
      double slack;
      const char* name;
    } grads[] = {{dv, ref.dv, 0.0, "dv"},
                 {dq, ref.dq, terms * max_abs(k), "dq"},
                 {dk, ref.dk, terms * max_abs(q) * static_cast<double>(kept), "dk"}};
    for (const auto& g : grads) {
      const Stats s = compare_bnhd(g.x, g.r);
      EXPECT_EQ(s.nonfinite, 0) << g.name;
      EXPECT_LE(s.max_abs_err, 2e-5 * std::max(1.0, s.max_ref) + 1e-6 * g.slack)
          << g.name << " at magnitude " << magnitude << " (max |ref| " << s.max_ref << ")";
    }
    EXPECT_GT(compare_bnhd(dv, ref.dv).nonzero, 0);
  }

  // Forward then backward under `cfg` on one device.
  void run(const DilatedConfig& cfg) {
    const DilatedAttention a(cfg);
    a.forward(q.view(), k.view(), v.view(), out.view(), lse.view());
    a.backward(dout.view(), q.view(), k.view(), v.view(), out.view(), lse.view(), dq.view(),
               dk.view(), dv.view());
  }
};

TEST(LargeScores, GradientsMatchTheReferenceOnOneDevice) {
  for (Mode mode : {Mode::kGroups, Mode::kLongNet}) {
    for (bool causal : {false, true}) {
      for (double mag : {1e2, 1e4, 1e6}) {
        SCOPED_TRACE(std::string(mode_name(mode)) + (causal ? " causal" : "") + " magnitude " +
                     std::to_string(mag));
        LargeCase c(mag);
        DilatedConfig cfg{{32, 64}, {1, 2}, mode, causal, 1.0f};
        c.run(cfg);
        const ReferenceGrads ref = reference_backward(make_backward_problem(
            cfg, c.dout.view(), c.q.view(), c.k.view(), c.v.view(), c.out.view(), c.lse.view(),
            c.dq.view(), c.dk.view(), c.dv.view(), 1 << 20, "reference"));
        c.expect_grads(ref, 32);
      }
    }
  }
}

TEST(LargeScores, GradientsStayFiniteAtAnyMagnitude) {
  for (Mode mode : {Mode::kGroups, Mode::kLongNet}) {
    for (double mag : {1e8, 1e12, 1e20}) {
      LargeCase c(mag);
      c.run(DilatedConfig{{32, 64}, {1, 2}, mode, false, 1.0f});
      for (const Tensor* t : {&c.out, &c.dq, &c.dk, &c.dv}) {
        const std::vector<double> x = to_double(*t);
        EXPECT_TRUE(std::all_of(x.begin(), x.end(), [](double y) { return std::isfinite(y); }))
            << mode_name(mode) << " magnitude " << mag;
      }
    }
  }
}

TEST(LargeScores, Bf16GradientsStayFiniteOnEveryProductKernel) {
  for (CpuBf16 kernel : {CpuBf16::kWiden, CpuBf16::kDot, CpuBf16::kAmx}) {
    try {
      cpu::resolve_bf16(kernel);
    } catch (const Error&) {
      continue;  // not on this CPU
    }
    for (double mag : {1e4, 1e8, 1e20}) {
      const int64_t N = 64, H = 2, D = 32;
      std::mt19937 rng(2);
      const float size = static_cast<float>(std::sqrt(mag / std::sqrt(static_cast<double>(D))));
      Tensor q(DType::kBF16, {1, N, H, D}), k(DType::kBF16, {1, N, H, D}),
          v(DType::kBF16, {1, N, H, D}), dout(DType::kBF16, {1, N, H, D}),
          out(DType::kBF16, {1, N, H, D}), lse(DType::kF32, {1, H, N}),
          dq(DType::kBF16, {1, N, H, D}), dk(DType::kBF16, {1, N, H, D}),
          dv(DType::kBF16, {1, N, H, D});
      q.fill_normal(rng, size);
      k.fill_normal(rng, size);
      v.fill_normal(rng);
      dout.fill_normal(rng);
      ExecOptions opt;
      opt.cpu_bf16 = kernel;
      const DilatedAttention a(DilatedConfig{{32, 64}, {1, 2}, Mode::kLongNet, true, 1.0f}, opt);
      a.forward(q.view(), k.view(), v.view(), out.view(), lse.view());
      a.backward(dout.view(), q.view(), k.view(), v.view(), out.view(), lse.view(), dq.view(),
                 dk.view(), dv.view());
      const char* names[] = {"out", "dq", "dk", "dv"};
      int i = 0;
      for (const Tensor* t : {&out, &dq, &dk, &dv}) {
        const std::vector<double> x = to_double(*t);
        EXPECT_TRUE(std::all_of(x.begin(), x.end(), [](double y) { return std::isfinite(y); }))
            << cpu_bf16_name(kernel) << " magnitude " << mag << " " << names[i];
        ++i;
      }
    }
  }
}

TEST(LargeScores, RingGradientsMatchTheReference) {
  // Over 2 and 3 thread ranks, with a causal rate-1 branch spanning them (balanced: the later
  // rank's queries travel with their lse in double).
  for (int P : {2, 3}) {
    for (Mode mode : {Mode::kGroups, Mode::kLongNet}) {
      SCOPED_TRACE("P=" + std::to_string(P) + " " + mode_name(mode));
      const int64_t n_loc = 32, N = P * n_loc;
      Tensor q(DType::kF32, {1, N, 2, 16}), k(DType::kF32, {1, N, 1, 16}),
          v(DType::kF32, {1, N, 1, 16}), dout(DType::kF32, {1, N, 2, 16});
      std::mt19937 rng(3);
      const float size = static_cast<float>(std::sqrt(1e6 / 4.0));
      q.fill_normal(rng, size);
      k.fill_normal(rng, size);
      v.fill_normal(rng);
      dout.fill_normal(rng);
      const DilatedConfig cfg{{16, N}, {1, 1}, mode, true, 1.0f};
      Tensor out(DType::kF32, {1, N, 2, 16}), lse(DType::kF32, {1, 2, N}),
          dq(DType::kF32, {1, N, 2, 16}), dk(DType::kF32, {1, N, 1, 16}),
          dv(DType::kF32, {1, N, 1, 16});
      const std::vector<RankResult> res = run_ring_on_threads<RingDilatedAttention>(
          P, Matching::kMpi, cfg, n_loc, {q, k, v, dout, out, lse, dq, dk, dv});
      for (const RankResult& r : res) ASSERT_TRUE(r.ok) << r.message;
      const ReferenceGrads ref = reference_backward(
          make_backward_problem(cfg, dout.view(), q.view(), k.view(), v.view(), out.view(),
                                lse.view(), dq.view(), dk.view(), dv.view(), 1 << 20, "reference"));
      const Stats s = compare_bnhd(dv, ref.dv);
      EXPECT_EQ(s.nonfinite, 0);
      EXPECT_LE(s.max_abs_err, 2e-5 * std::max(1.0, s.max_ref));
      for (const Tensor* t : {&dq, &dk}) {
        const std::vector<double> x = to_double(*t);
        EXPECT_TRUE(std::all_of(x.begin(), x.end(), [](double y) { return std::isfinite(y); }));
      }
    }
  }
}

TEST(LargeScores, BlockSparseGradientsMatchTheReference) {
  const int64_t N = 64, H = 2, D = 16;
  std::mt19937 rng(5);
  const float size = static_cast<float>(std::sqrt(1e6 / 4.0));
  Tensor q(DType::kF32, {1, N, H, D}), k(DType::kF32, {1, N, H, D}), v(DType::kF32, {1, N, H, D}),
      dout(DType::kF32, {1, N, H, D}), out(DType::kF32, {1, N, H, D}), lse(DType::kF32, {1, H, N}),
      dq(DType::kF32, {1, N, H, D}), dk(DType::kF32, {1, N, H, D}), dv(DType::kF32, {1, N, H, D});
  q.fill_normal(rng, size);
  k.fill_normal(rng, size);
  v.fill_normal(rng);
  dout.fill_normal(rng);
  BlockSparseConfig cfg;
  cfg.patterns = {BlockPattern::local_window(8, 16)};
  cfg.causal = true;
  cfg.scale = 1.0f;
  auto comm = make_self_communicator();
  BlockSparseRingDilatedAttention a(cfg, *comm);
  a.forward(q.view(), k.view(), v.view(), out.view(), lse.view());
  a.backward(dout.view(), q.view(), k.view(), v.view(), out.view(), lse.view(), dq.view(),
             dk.view(), dv.view());
  const SparseOracle o = sparse_oracle(cfg, q, k, v, &dout);
  const Stats s = compare_bnhd(dv, o.dv);
  EXPECT_EQ(s.nonfinite, 0);
  EXPECT_GT(s.nonzero, 0);
  EXPECT_LE(s.max_abs_err, 2e-5 * std::max(1.0, s.max_ref));
}

}  // namespace
}  // namespace ringattn::test
