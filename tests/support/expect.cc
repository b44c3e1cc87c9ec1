#include "tests/support/expect.h"

#include <algorithm>
#include <cmath>

#include "src/base/dtype.h"
#include "tests/support/oracle.h"

namespace ringattn::test {
namespace {

double round_to(DType dtype, double x) {
  const float f = static_cast<float>(x);
  switch (dtype) {
    case DType::kF16:
      return to_f32(from_f32<fp16_t>(f));
    case DType::kBF16:
      return to_f32(from_f32<bf16_t>(f));
    case DType::kF32:
      break;
  }
  return f;
}

}  // namespace

void expect_forward_close(const DilatedConfig& cfg, const Tensor& q, const Tensor& k,
                          const Tensor& v, const Tensor& out, const Tensor& lse,
                          const ReferenceResult& ref) {
  const double bound = forward_error_bound(cfg, q, k, v, ref);
  // In low precision an exact zero within the allowed error is a rounded cancellation, not
  // skipped work.
  const Stats so = compare_bnhd(out, ref.out, q.dtype() == DType::kF32 ? kClearlyNonZero : bound);
  const Stats sl = compare_lse(lse, ref.lse);
  EXPECT_EQ(so.nonfinite, 0);
  EXPECT_EQ(sl.nonfinite, 0);
  EXPECT_GT(so.ref_nonzero, 0);
  EXPECT_EQ(so.missing, 0) << "zeros where the reference is not";
  EXPECT_GT(so.max_ref, 0.05);
  EXPECT_LE(sl.max_abs_err, 2e-5 * std::max(1.0, sl.max_ref));
  EXPECT_LE(so.max_abs_err, bound) << dtype_name(q.dtype());
}

double forward_error_bound(const DilatedConfig& cfg, const Tensor& q, const Tensor& k,
                           const Tensor& v, const ReferenceResult& ref) {
  const DType dtype = q.dtype();
  if (dtype == DType::kF32) return 1e-5;
  const OracleResult naive =
      oracle_forward(cfg, q, k, v, [&](double x) { return round_to(dtype, x); });
  double naive_err = 0.0;
  for (size_t i = 0; i < ref.out.size(); ++i) {
    naive_err = std::max(naive_err, std::abs(naive.out[i] - ref.out[i]));
  }
  EXPECT_GT(naive_err, 0.0) << "the naive " << dtype_name(dtype) << " computation is exact";
  return 2.0 * naive_err;
}

void expect_grads_close(DType dtype, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                        const ReferenceGrads& ref) {
  const double tol = dtype == DType::kF32 ? 2e-5 : dtype == DType::kF16 ? 4e-3 : 3e-2;
  const struct {
    const Tensor& x;
    const std::vector<double>& ref;
    const char* name;
  } grads[] = {{dq, ref.dq, "dq"}, {dk, ref.dk, "dk"}, {dv, ref.dv, "dv"}};
  for (const auto& g : grads) expect_close(compare_bnhd(g.x, g.ref), tol, g.name);
}

void expect_close(const Stats& s, double tol, const char* name) {
  EXPECT_EQ(s.nonfinite, 0) << name;
  EXPECT_GT(s.ref_nonzero, 0) << name;
  EXPECT_EQ(s.missing, 0) << name << ": zeros where the reference is not";
  EXPECT_LE(s.max_abs_err, tol * std::max(1.0, s.max_ref)) << name << " max |ref| " << s.max_ref;
}

ShardStats compare_shard(const Tensor& out, const Tensor& lse, int64_t row0, const Tensor& single,
                         const ReferenceResult& ref) {
  const auto& sh = out.view().shape;
  const int64_t B = sh[0], rows = sh[1], H = sh[2], D = sh[3], N = single.view().shape[1];
  ShardStats s;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < rows; ++n)
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t d = 0; d < D; ++d) {
          const double x = out.get(b, n, h, d), y = single.get(b, row0 + n, h, d);
          const double r = ref.out[static_cast<size_t>(((b * N + row0 + n) * H + h) * D + d)];
          s.bad += !std::isfinite(x);
          s.missing += x == 0.0 && std::abs(r) > kClearlyNonZero;
          s.ref_nonzero += r != 0.0;
          s.err = std::max(s.err, std::abs(x - r));
          s.single_err = std::max(s.single_err, std::abs(y - r));
          s.vs_single = std::max(s.vs_single, std::abs(x - y));
          s.max_ref = std::max(s.max_ref, std::abs(r));
        }
        const double lr = ref.lse[static_cast<size_t>((b * H + h) * N + row0 + n)];
        const double lx = lse.get(b, h, n);
        if (std::isinf(lr)) {
          s.bad += lx != lr;
        } else {
          s.lse_err = std::max(s.lse_err, std::abs(lx - lr));
          s.max_lse = std::max(s.max_lse, std::abs(lr));
        }
      }
  return s;
}

}  // namespace ringattn::test
