// The fp64 reference against the brute-force oracle and against SPEC.md's worked cases.

#include <gtest/gtest.h>

#include <cmath>

#include "src/backend/ref/reference.h"
#include "src/plan/problem.h"
#include "tests/support/oracle.h"
#include "tests/support/test_util.h"

namespace ringattn::test {
namespace {

// fp32 q [B, N, H, D] and k, v [B, N, Hkv, D] drawn from `rng` (in that order), and an out.
struct RandomInputs {
  Tensor q, k, v, out;
  RandomInputs(std::mt19937& rng, int64_t B, int64_t N, int64_t H, int64_t Hkv, int64_t D)
      : q(DType::kF32, {B, N, H, D}),
        k(DType::kF32, {B, N, Hkv, D}),
        v(DType::kF32, {B, N, Hkv, D}),
        out(DType::kF32, {B, N, H, D}) {
    q.fill_normal(rng);
    k.fill_normal(rng);
    v.fill_normal(rng);
  }
};

ReferenceResult run_reference(const DilatedConfig& cfg, const RandomInputs& in) {
  return reference_forward(make_problem(cfg, in.q.view(), in.k.view(), in.v.view(), in.out.view(),
                                        std::nullopt, 1 << 20, "reference"));
}

void expect_close(const std::vector<double>& a, const std::vector<double>& b, double tol) {
  ASSERT_EQ(a.size(), b.size());
  int64_t nonzero = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(b[i])) {
      EXPECT_EQ(a[i], b[i]) << "at " << i;
    } else {
      EXPECT_NEAR(a[i], b[i], tol) << "at " << i;
    }
    nonzero += a[i] != 0.0;
  }
  EXPECT_GT(nonzero, 0);
}

TEST(Reference, MatchesBruteForceOracle) {
  const std::vector<Case> cases = {
      {1, 16, 4, 4, 8, {4, 8}, {1, 2}, Mode::kGroups, false},
      {2, 24, 3, 1, 5, {6, 12, 24}, {1, 2, 3}, Mode::kGroups, true},
      {1, 24, 5, 5, 4, {8, 24}, {3, 5}, Mode::kGroups, false},  // r does not divide s
      {1, 16, 4, 2, 8, {4, 8}, {1, 2}, Mode::kLongNet, false},
      {2, 24, 3, 3, 6, {6, 12, 24}, {1, 2, 4}, Mode::kLongNet, true},
      {1, 30, 4, 1, 3, {10, 30}, {3, 7}, Mode::kLongNet, true},
  };
  std::mt19937 rng(1);
  for (const Case& c : cases) {
    SCOPED_TRACE(testing::Message() << "N=" << c.N << " H=" << c.H << " mode=" << mode_name(c.mode)
                                    << " causal=" << c.causal);
    DilatedConfig cfg{c.s, c.r, c.mode, c.causal, std::nullopt};
    const RandomInputs in(rng, c.B, c.N, c.H, c.Hkv, c.D);
    const ReferenceResult ref = run_reference(cfg, in);
    const OracleResult orc = oracle_forward(cfg, in.q, in.k, in.v);
    expect_close(ref.out, orc.out, 1e-12);
    expect_close(ref.lse, orc.lse, 1e-12);
  }
}

// SPEC.md's example: N=16, H=4, s=[4,8], r=[1,2].
TEST(Reference, WorkedExampleFromSpec) {
  std::mt19937 rng(2);
  DilatedConfig cfg{{4, 8}, {1, 2}, Mode::kGroups, false, std::nullopt};
  const int64_t N = 16, H = 4, D = 4;
  const RandomInputs in(rng, 1, N, H, H, D);
  const ReferenceResult ref = run_reference(cfg, in);
  auto at = [&](int64_t n, int64_t h, int64_t d) { return ref.out[((n * H) + h) * D + d]; };
  // Heads 2-3 are zero at even rows; at odd rows they are non-zero.
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 2; h < 4; ++h)
      for (int64_t d = 0; d < D; ++d) {
        if (n % 2 == 0) {
          EXPECT_EQ(at(n, h, d), 0.0);
        } else {
          EXPECT_NE(at(n, h, d), 0.0);
        }
      }
  // Head 0, row 5 attends to rows {4..7} only: recompute by hand, then halve.
  const int64_t h = 0, n = 5;
  double w[4], sum = 0.0;
  for (int64_t j = 0; j < 4; ++j) {
    double dot = 0.0;
    for (int64_t d = 0; d < D; ++d) dot += double(in.q.get(0, n, h, d)) * in.k.get(0, 4 + j, h, d);
    w[j] = std::exp(dot * 0.5);
    sum += w[j];
  }
  for (int64_t d = 0; d < D; ++d) {
    double o = 0.0;
    for (int64_t j = 0; j < 4; ++j) o += w[j] / sum * in.v.get(0, 4 + j, h, d);
    EXPECT_NEAR(at(n, h, d), o / 2.0, 1e-12);
  }
  // Head 3, row 9 attends to rows {9, 11, 13, 15} (offset 1, second segment).
  double w3[4], sum3 = 0.0;
  for (int64_t j = 0; j < 4; ++j) {
    double dot = 0.0;
    for (int64_t d = 0; d < D; ++d)
      dot += double(in.q.get(0, 9, 3, d)) * in.k.get(0, 9 + 2 * j, 3, d);
    w3[j] = std::exp(dot * 0.5);
    sum3 += w3[j];
  }
  for (int64_t d = 0; d < D; ++d) {
    double o = 0.0;
    for (int64_t j = 0; j < 4; ++j) o += w3[j] / sum3 * in.v.get(0, 9 + 2 * j, 3, d);
    EXPECT_NEAR(at(9, 3, d), o / 2.0, 1e-12);
  }
}

// Plain dense softmax attention written out directly: [N, D] per (b, h).
std::vector<double> dense_attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                    int64_t block) {
  const TensorView qv = q.view();
  const int64_t B = qv.shape[0], N = qv.shape[1], H = qv.shape[2], D = qv.shape[3];
  const int64_t Hkv = k.view().shape[2];
  std::vector<double> out(static_cast<size_t>(B * N * H * D));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t n = 0; n < N; ++n) {
        const int64_t lo = n / block * block, hi = causal ? n + 1 : lo + block;
        std::vector<double> s;
        double mx = -1e300;
        for (int64_t j = lo; j < hi; ++j) {
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d)
            dot += double(q.get(b, n, h, d)) * k.get(b, j, h / (H / Hkv), d);
          s.push_back(dot * double(1.0f / std::sqrt(float(D))));
          mx = std::max(mx, s.back());
        }
        double sum = 0.0;
        for (double& x : s) sum += (x = std::exp(x - mx));
        for (int64_t d = 0; d < D; ++d) {
          double o = 0.0;
          for (int64_t j = lo; j < hi; ++j) o += s[j - lo] / sum * v.get(b, j, h / (H / Hkv), d);
          out[((b * N + n) * H + h) * D + d] = o;
        }
      }
  return out;
}

TEST(Reference, FullSegmentRateOneIsDenseAttention) {
  std::mt19937 rng(3);
  for (bool causal : {false, true}) {
    DilatedConfig cfg{{32}, {1}, Mode::kGroups, causal, std::nullopt};
    const RandomInputs in(rng, 2, 32, 4, 2, 8);
    expect_close(run_reference(cfg, in).out, dense_attention(in.q, in.k, in.v, causal, 32), 1e-12);
  }
}

TEST(Reference, RateOneShortSegmentIsBlockDiagonal) {
  std::mt19937 rng(4);
  DilatedConfig cfg{{8}, {1}, Mode::kGroups, false, std::nullopt};
  const RandomInputs in(rng, 1, 32, 2, 2, 8);
  expect_close(run_reference(cfg, in).out, dense_attention(in.q, in.k, in.v, false, 8), 1e-12);
}

// longnet with two identical branches: every key counts twice, which is the same softmax
// as one branch (multiplicity cancels), and lse grows by log(2).
TEST(Reference, LongNetIsOneSoftmaxOverTheMultisetOfKeys) {
  std::mt19937 rng(5);
  const RandomInputs in(rng, 1, 16, 2, 2, 4);
  DilatedConfig once{{8}, {1}, Mode::kLongNet, true, std::nullopt};
  DilatedConfig twice{{8, 8}, {1, 1}, Mode::kLongNet, true, std::nullopt};
  const ReferenceResult a = run_reference(once, in);
  const ReferenceResult b = run_reference(twice, in);
  expect_close(b.out, a.out, 1e-12);
  for (size_t i = 0; i < a.lse.size(); ++i) EXPECT_NEAR(b.lse[i], a.lse[i] + std::log(2.0), 1e-12);
}

}  // namespace
}  // namespace ringattn::test
