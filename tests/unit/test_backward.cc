// Backward: the fp64 reference against central finite differences of the reference forward,
// and the fast CPU backward against the reference.

#include <gtest/gtest.h>

#include <cmath>

#include "src/backend/ref/reference.h"
#include "src/plan/problem.h"
#include "tests/support/expect.h"
#include "tests/support/test_util.h"

namespace ringattn::test {
namespace {

// loss = sum(dout * out), computed by the fp64 reference forward.
double loss(const CaseTensors& in) {
  const ReferenceResult r = reference_forward(in.problem().fwd);
  const std::vector<double> dout = to_double(in.dout);
  double l = 0.0;
  for (size_t i = 0; i < r.out.size(); ++i) l += dout[i] * r.out[i];
  return l;
}

// d loss / d x at element (b, n, h, d) by central differences on the fp32 inputs.
double finite_difference(CaseTensors& in, Tensor& x, int64_t b, int64_t n, int64_t h, int64_t d) {
  const float x0 = x.get(b, n, h, d), step = 1e-3f;
  x.set(b, n, h, d, x0 + step);
  const double up = loss(in);
  const double x_up = x.get(b, n, h, d);
  x.set(b, n, h, d, x0 - step);
  const double down = loss(in);
  const double x_down = x.get(b, n, h, d);
  x.set(b, n, h, d, x0);
  return (up - down) / (x_up - x_down);
}

TEST(Backward, ReferenceMatchesFiniteDifferences) {
  const std::vector<Case> cases = {
      {1, 12, 2, 2, 4, {6, 12}, {1, 2}, Mode::kGroups, false},
      {1, 12, 3, 1, 4, {4, 12}, {1, 3}, Mode::kGroups, true},
      {2, 12, 2, 1, 3, {6, 12}, {2, 4}, Mode::kLongNet, false},
      {1, 16, 4, 2, 4, {8, 16}, {1, 3}, Mode::kLongNet, true},
  };
  std::mt19937 pick(7);
  uint32_t seed = 1;
  for (const Case& c : cases) {
    SCOPED_TRACE(describe(c));
    CaseTensors in(c, seed++);
    const ReferenceGrads g = reference_backward(in.problem());
    struct Target {
      Tensor& x;
      const std::vector<double>& grad;
      int64_t heads;
    } targets[] = {{in.q, g.dq, c.H}, {in.k, g.dk, c.Hkv}, {in.v, g.dv, c.Hkv}};
    for (Target& t : targets) {
      double max_grad = 0.0;
      for (double x : t.grad) max_grad = std::max(max_grad, std::abs(x));
      EXPECT_GT(max_grad, 0.01);
      for (int trial = 0; trial < 12; ++trial) {
        const int64_t b = pick() % c.B, n = pick() % c.N, h = pick() % t.heads, d = pick() % c.D;
        const double fd = finite_difference(in, t.x, b, n, h, d);
        const double an = t.grad[static_cast<size_t>(((b * c.N + n) * t.heads + h) * c.D + d)];
        EXPECT_NEAR(an, fd, 2e-5 * std::max(1.0, max_grad))
            << "at " << b << "," << n << "," << h << "," << d;
      }
    }
  }
}

// Runs forward then backward with the CPU backend and compares with the reference.
void check_case(const Case& c, uint32_t seed) {
  SCOPED_TRACE(describe(c));
  CaseTensors in(c, seed);
  const DilatedAttention attn(in.c.config());
  attn.forward(in.q.view(), in.k.view(), in.v.view(), in.out.view(), in.lse.view());
  attn.backward(in.dout.view(), in.q.view(), in.k.view(), in.v.view(), in.out.view(), in.lse.view(),
                in.dq.view(), in.dk.view(), in.dv.view());
  expect_grads_close(c.dtype, in.dq, in.dk, in.dv, reference_backward(in.problem()));
}

TEST(Backward, CpuMatchesReference) {
  check_case({1, 256, 3, 3, 64, {64, 128, 256}, {1, 2, 4}, Mode::kGroups, true}, 10);
  check_case({2, 256, 4, 2, 64, {64, 256}, {1, 4}, Mode::kLongNet, true}, 11);
  check_case({1, 192, 2, 1, 128, {96, 192}, {1, 3}, Mode::kLongNet, false}, 12);
  check_case({1, 200, 2, 2, 80, {200}, {1}, Mode::kGroups, true}, 13);    // dense, partial blocks
  check_case({1, 2048, 1, 1, 16, {2048}, {1}, Mode::kGroups, true}, 14);  // many blocks
}

TEST(Backward, HeadDimsDtypesAndStrides) {
  uint32_t seed = 20;
  for (int64_t d : {1, 16, 64, 128, 256}) {
    check_case({1, 96, 2, 1, d, {48, 96}, {1, 5}, Mode::kLongNet, true}, seed++);
  }
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (bool strided : {false, true}) {
      check_case({2, 128, 4, 2, 64, {32, 128}, {1, 2}, Mode::kGroups, true, dt, strided}, seed++);
      check_case({1, 128, 2, 1, 32, {64, 128}, {2, 3}, Mode::kLongNet, false, dt, strided}, seed++);
    }
  }
}

TEST(Backward, RandomisedConfigurations) {
  std::mt19937 rng(30);
  for (int trial = 0; trial < 10; ++trial)
    check_case(random_case(rng, {16, 32, 48, 64, 80}), 100 + trial);
}

TEST(Backward, BitwiseDeterministicAcrossRunsAndThreadCounts) {
  const Case c{2, 256, 4, 2, 64, {64, 256}, {1, 2}, Mode::kLongNet, true};
  CaseTensors a(c, 40), b(c, 40);
  for (auto [in, threads] : {std::pair<CaseTensors*, int>{&a, 1}, {&b, 2}}) {
    const DilatedAttention attn(in->c.config(), ExecOptions{Backend::kCpu, threads});
    attn.forward(in->q.view(), in->k.view(), in->v.view(), in->out.view(), in->lse.view());
    attn.backward(in->dout.view(), in->q.view(), in->k.view(), in->v.view(), in->out.view(),
                  in->lse.view(), in->dq.view(), in->dk.view(), in->dv.view());
  }
  EXPECT_EQ(a.dq.bytes(), b.dq.bytes());
  EXPECT_EQ(a.dk.bytes(), b.dk.bytes());
  EXPECT_EQ(a.dv.bytes(), b.dv.bytes());
  EXPECT_GT(compare_bnhd(a.dk, std::vector<double>(a.dk.view().numel(), 0.0)).nonzero, 0);
}

TEST(Backward, ValidatesGradientShapes) {
  const Case c{1, 16, 2, 2, 8, {16}, {1}, Mode::kGroups, false};
  CaseTensors in(c, 50);
  Tensor wrong(DType::kF32, {1, 16, 2, 4});
  const DilatedAttention attn(in.c.config());
  try {
    attn.backward(in.dout.view(), in.q.view(), in.k.view(), in.v.view(), in.out.view(),
                  in.lse.view(), in.dq.view(), wrong.view(), in.dv.view());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("dk"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("shape of k"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ringattn::test
