// MultiheadDilatedAttention: forward against a composed fp64 reference (fp64 projections and
// LayerNorms around the brute-force attention oracle), gradients against central finite
// differences, and bad input.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>

#include "src/backend/cpu/bf16_kernels.h"
#include "src/base/dtype.h"
#include "tests/support/layer_util.h"
#include "tests/support/oracle.h"
#include "tests/support/test_util.h"

namespace ringattn::test {
namespace {

// [rows, out] = x [rows, in] W^T + b, W [out, in] (b may be empty).
std::vector<double> linear(const std::vector<double>& x, int64_t rows, int64_t in,
                           const std::vector<float>& w, const std::vector<float>& b, int64_t out) {
  std::vector<double> y(static_cast<size_t>(rows * out));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      double s = b.empty() ? 0.0 : b[o];
      for (int64_t i = 0; i < in; ++i) s += x[r * in + i] * static_cast<double>(w[o * in + i]);
      y[r * out + o] = s;
    }
  }
  return y;
}

// LayerNorm over the f features of each row (the identity when w is empty).
std::vector<double> layer_norm(std::vector<double> x, int64_t rows, int64_t f,
                               const std::vector<float>& w, const std::vector<float>& b,
                               double eps) {
  if (w.empty()) return x;
  for (int64_t r = 0; r < rows; ++r) {
    double mean = 0.0, var = 0.0;
    for (int64_t j = 0; j < f; ++j) mean += x[r * f + j] / static_cast<double>(f);
    for (int64_t j = 0; j < f; ++j) {
      var += (x[r * f + j] - mean) * (x[r * f + j] - mean) / static_cast<double>(f);
    }
    for (int64_t j = 0; j < f; ++j) {
      x[r * f + j] = (x[r * f + j] - mean) / std::sqrt(var + eps) * w[j] + b[j];
    }
  }
  return x;
}

std::vector<double> to_f64(const std::vector<float>& v) {
  return {v.begin(), v.end()};
}

// The layer in fp64 (the attention inputs rounded to fp32 for the oracle, which reads them
// as such; it accumulates in fp64).
std::vector<double> composed_forward(const LayerCase& c, const MultiheadWeights& w,
                                     const std::vector<float>& xq, const std::vector<float>& xk,
                                     const std::vector<float>& xv) {
  const int64_t rows = c.B * c.N, D = c.E / c.H, fk = c.Hkv * D;
  const double eps = 1e-5f;
  const std::vector<double> q = layer_norm(linear(to_f64(xq), rows, c.E, w.wq, w.bq, c.E), rows,
                                           c.E, w.q_norm_weight, w.q_norm_bias, eps);
  const std::vector<double> k = layer_norm(linear(to_f64(xk), rows, c.E, w.wk, w.bk, fk), rows, fk,
                                           w.k_norm_weight, w.k_norm_bias, eps);
  const std::vector<double> v = linear(to_f64(xv), rows, c.E, w.wv, w.bv, fk);
  Tensor tq(DType::kF32, {c.B, c.N, c.H, D}), tk(DType::kF32, {c.B, c.N, c.Hkv, D}),
      tv(DType::kF32, {c.B, c.N, c.Hkv, D});
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < c.E; ++j) {
      tq.set(r / c.N, r % c.N, j / D, j % D, static_cast<float>(q[r * c.E + j]));
    }
    for (int64_t j = 0; j < fk; ++j) {
      tk.set(r / c.N, r % c.N, j / D, j % D, static_cast<float>(k[r * fk + j]));
      tv.set(r / c.N, r % c.N, j / D, j % D, static_cast<float>(v[r * fk + j]));
    }
  }
  const OracleResult attn = oracle_forward(c.config().attention, tq, tk, tv);
  const std::vector<double> o =
      layer_norm(attn.out, rows, c.E, w.out_norm_weight, w.out_norm_bias, eps);
  return linear(o, rows, c.E, w.wo, w.bo, c.E);
}

std::string describe(const LayerCase& c) {
  std::ostringstream os;
  os << "B=" << c.B << " N=" << c.N << " E=" << c.E << " H=" << c.H << " Hkv=" << c.Hkv << " "
     << mode_name(c.mode) << (c.causal ? " causal" : " full") << (c.bias ? " bias" : "")
     << (c.layer_norm ? " layer_norm" : "");
  return os.str();
}

const LayerCase kCases[] = {
    {2, 32, 32, 4, 2, {8, 16}, {1, 2}, Mode::kGroups, true},
    {1, 32, 24, 3, 3, {16, 32}, {2, 4}, Mode::kLongNet, false},
    {2, 16, 32, 4, 1, {16}, {1}, Mode::kGroups, true, false, true},
    {1, 32, 32, 8, 4, {8, 32}, {1, 3}, Mode::kLongNet, true, true, false},
    {1, 16, 16, 2, 2, {8}, {2}, Mode::kGroups, false, false, false},
    {2, 64, 32, 4, 2, {16, 64}, {1, 2}, Mode::kLongNet, true},  // 128 rows: threaded GEMMs
};

TEST(Multihead, ForwardMatchesComposedReference) {
  for (const LayerCase& c : kCases) {
    for (const bool self : {true, false}) {
      SCOPED_TRACE(describe(c) + (self ? " self" : " cross"));
      const MultiheadConfig config = c.config();
      const MultiheadWeights w = random_weights(config, 7);
      const MultiheadDilatedAttention layer(config, w, {Backend::kCpu, 2});
      const size_t n = static_cast<size_t>(c.B * c.N * c.E);
      const std::vector<float> xq = normal_vector(n, 1);
      const std::vector<float> xk = self ? xq : normal_vector(n, 2);
      const std::vector<float> xv = self ? xq : normal_vector(n, 3);
      std::vector<float> y(n, std::nanf(""));
      if (self) {
        layer.forward(bne(xq, c.B, c.N, c.E), bne(y, c.B, c.N, c.E));
      } else {
        layer.forward(bne(xq, c.B, c.N, c.E), bne(xk, c.B, c.N, c.E), bne(xv, c.B, c.N, c.E),
                      bne(y, c.B, c.N, c.E));
      }
      const std::vector<double> ref = composed_forward(c, w, xq, xk, xv);
      double max_err = 0.0, max_ref = 0.0;
      int64_t missing = 0;  // exact zeros where the reference is clearly not zero
      for (size_t i = 0; i < n; ++i) {
        max_err = std::max(max_err, std::abs(y[i] - ref[i]));
        max_ref = std::max(max_ref, std::abs(ref[i]));
        missing += y[i] == 0.0f && std::abs(ref[i]) > kClearlyNonZero;
        ASSERT_TRUE(std::isfinite(y[i])) << "y[" << i << "]";
      }
      EXPECT_EQ(missing, 0);
      EXPECT_GT(max_ref, 0.1);
      EXPECT_LE(max_err, 5e-6 * (1.0 + max_ref)) << "max |ref| = " << max_ref;
    }
  }
}

// Loss = sum(y * g): its gradient with respect to y is g.
double loss(const MultiheadDilatedAttention& layer, const LayerCase& c,
            const std::vector<float>& xq, const std::vector<float>& xk,
            const std::vector<float>& xv, const std::vector<float>& g) {
  std::vector<float> y(g.size());
  layer.forward(bne(xq, c.B, c.N, c.E), bne(xk, c.B, c.N, c.E), bne(xv, c.B, c.N, c.E),
                bne(y, c.B, c.N, c.E));
  double s = 0.0;
  for (size_t i = 0; i < y.size(); ++i) s += static_cast<double>(y[i]) * g[i];
  return s;
}

// |analytic - central difference| within the fp32 forward's noise over 2 eps. `zero`: the
// exact gradient is 0 (a bias added to every key shifts all scores of a query alike).
void expect_close_fd(const std::vector<float>& analytic, const std::vector<double>& fd,
                     const std::string& what, bool zero = false) {
  ASSERT_EQ(analytic.size(), fd.size()) << what;
  double max_fd = 0.0;
  for (double x : fd) max_fd = std::max(max_fd, std::abs(x));
  int64_t bad = 0, nonzero = 0;
  for (size_t i = 0; i < fd.size(); ++i) {
    nonzero += analytic[i] != 0.0f;
    if (std::abs(analytic[i] - fd[i]) > 1e-3 * (1.0 + max_fd) + 1e-2 * std::abs(fd[i])) {
      if (bad++ < 3) ADD_FAILURE() << what << "[" << i << "]: " << analytic[i] << " vs " << fd[i];
    }
  }
  EXPECT_EQ(bad, 0) << what;
  if (zero) return;
  EXPECT_GT(nonzero, static_cast<int64_t>(fd.size()) / 2) << what;
  EXPECT_GT(max_fd, 1e-2) << what;
}

TEST(Multihead, GradientsMatchFiniteDifferences) {
  const LayerCase cases[] = {
      {1, 8, 8, 2, 1, {4, 8}, {1, 2}, Mode::kGroups, true},
      {2, 8, 12, 3, 3, {8}, {2}, Mode::kLongNet, false},
  };
  constexpr float kEps = 1e-2f;
  for (const LayerCase& c : cases) {
    for (const bool self : {true, false}) {
      SCOPED_TRACE(describe(c) + (self ? " self" : " cross"));
      const MultiheadConfig config = c.config();
      const MultiheadWeights w0 = random_weights(config, 11);
      MultiheadDilatedAttention layer(config, w0, {Backend::kCpu, 1});
      const size_t n = static_cast<size_t>(c.B * c.N * c.E);
      std::vector<float> xq = normal_vector(n, 4), xk = self ? xq : normal_vector(n, 5),
                         xv = self ? xq : normal_vector(n, 6);
      const std::vector<float> g = normal_vector(n, 7);

      MultiheadSaved saved;
      std::vector<float> y(n), dq(n), dk(n), dv(n);
      MultiheadWeights grads;
      layer.forward(bne(xq, c.B, c.N, c.E), bne(xk, c.B, c.N, c.E), bne(xv, c.B, c.N, c.E),
                    bne(y, c.B, c.N, c.E), &saved);
      if (self) {
        layer.backward(bne(xq, c.B, c.N, c.E), bne(g, c.B, c.N, c.E), saved, bne(dq, c.B, c.N, c.E),
                       grads);
      } else {
        layer.backward(bne(xq, c.B, c.N, c.E), bne(xk, c.B, c.N, c.E), bne(xv, c.B, c.N, c.E),
                       bne(g, c.B, c.N, c.E), saved, bne(dq, c.B, c.N, c.E), bne(dk, c.B, c.N, c.E),
                       bne(dv, c.B, c.N, c.E), grads);
      }

      // Central differences of every parameter.
      const auto central = [&](float& x) {
        const float keep = x;
        x = keep + kEps;
        const double up = loss(layer, c, xq, self ? xq : xk, self ? xq : xv, g);
        x = keep - kEps;
        const double down = loss(layer, c, xq, self ? xq : xk, self ? xq : xv, g);
        x = keep;
        return (up - down) / (2.0 * kEps);
      };
      using W = MultiheadWeights;
      for (const auto& [member, name] : kWeightParams) {
        MultiheadWeights w = w0;
        std::vector<double> fd((w.*member).size());
        for (size_t i = 0; i < fd.size(); ++i) {
          fd[i] = [&] {
            const float keep = (w.*member)[i];
            const auto at = [&](float value) {
              (w.*member)[i] = value;
              layer.set_weights(w);
              return loss(layer, c, xq, self ? xq : xk, self ? xq : xv, g);
            };
            const double d = (at(keep + kEps) - at(keep - kEps)) / (2.0 * kEps);
            (w.*member)[i] = keep;
            return d;
          }();
        }
        layer.set_weights(w0);
        expect_close_fd(grads.*member, fd, name, member == &W::k_norm_bias);
      }
      // The inputs.
      std::vector<std::pair<std::vector<float>*, const std::vector<float>*>> inputs = {{&xq, &dq}};
      if (!self) inputs.insert(inputs.end(), {{&xk, &dk}, {&xv, &dv}});
      for (auto [x, dx] : inputs) {
        std::vector<double> fd(n);
        for (size_t i = 0; i < n; ++i) fd[i] = central((*x)[i]);
        expect_close_fd(*dx, fd, x == &xq ? "dquery" : x == &xk ? "dkey" : "dvalue");
      }
    }
  }
}

TEST(Multihead, BadConfigurations) {
  const LayerCase c{1, 16, 32, 4, 2, {8, 16}, {1, 2}, Mode::kGroups, true};
  const auto code_of = [](MultiheadConfig config) {
    return error_of([&] { MultiheadDilatedAttention layer(config, 1); });
  };
  MultiheadConfig bad = c.config();
  bad.num_heads = 5;  // E % H
  Error e = code_of(bad);
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(std::string(e.what()).find("embed_dim = 32 is not a multiple of num_heads = 5"),
            std::string::npos)
      << e.what();
  bad = c.config();
  bad.kv_heads = 3;  // H % Hkv
  e = code_of(bad);
  EXPECT_NE(std::string(e.what()).find("kv_heads = 3 does not divide num_heads = 4"),
            std::string::npos)
      << e.what();
  bad = c.config();
  bad.layer_norm_eps = 0.0f;
  EXPECT_NE(std::string(code_of(bad).what()).find("layer_norm_eps"), std::string::npos);
  bad = c.config();
  bad.attention.dilation_rates = {1};
  EXPECT_NE(std::string(code_of(bad).what()).find("dilation_rates"), std::string::npos);
  bad = c.config();
  bad.attention.total_heads = 8;
  EXPECT_NE(std::string(code_of(bad).what()).find("total_heads"), std::string::npos);

  // Weights of the wrong size, or present where the layer has none.
  MultiheadWeights w = MultiheadWeights::xavier(c.config(), 1);
  w.wk.pop_back();
  e = error_of([&] { MultiheadDilatedAttention layer(c.config(), w); });
  EXPECT_NE(std::string(e.what()).find("weights.wk has 511 elements but must have 512"),
            std::string::npos)
      << e.what();
  MultiheadConfig no_bias = c.config();
  no_bias.bias = false;
  e = error_of(
      [&] { MultiheadDilatedAttention layer(no_bias, MultiheadWeights::xavier(c.config(), 1)); });
  EXPECT_NE(std::string(e.what()).find("bias = false"), std::string::npos) << e.what();
}

TEST(Multihead, BadInputsFailBeforeCompute) {
  const LayerCase c{1, 16, 32, 4, 2, {8, 16}, {1, 2}, Mode::kGroups, true};
  const MultiheadDilatedAttention layer(c.config(), 3);
  const std::vector<float> x = normal_vector(16 * 32, 1);
  std::vector<float> y(16 * 32, 42.0f);
  const auto message = [&](const TensorView& in, const TensorView& out) {
    const Error e = error_of([&] { layer.forward(in, out); });
    for (float v : y) EXPECT_EQ(v, 42.0f);  // nothing written
    return std::pair(e.code(), std::string(e.what()));
  };
  const TensorView good = bne(x, 1, 16, 32), out = bne(y, 1, 16, 32);
  auto [code, what] = message(bne(x, 1, 16, 16), bne(y, 1, 16, 16));
  EXPECT_NE(what.find("query.shape[2] = 16 but the layer's embed_dim is 32"), std::string::npos)
      << what;
  std::tie(code, what) = message(good, bne(y, 1, 8, 32));
  EXPECT_NE(what.find("y is [1, 8, 32] but the call's first tensor is [1, 16, 32]"),
            std::string::npos)
      << what;
  // bf16 host tensors are staged through fp32 (LowPrecisionHostTensorsComputeInFp32); on a
  // CUDA device only fp32 is taken (or, without CUDA, no device tensor at all).
  TensorView bf16_device = good;
  bf16_device.dtype = DType::kBF16;
  bf16_device.device = Device::kCUDA;
  std::tie(code, what) = message(bf16_device, out);
  EXPECT_EQ(code, ErrorCode::kUnsupported);
  EXPECT_NE(what.find("CUDA"), std::string::npos) << what;
  const TensorView strided =
      TensorView::strided(const_cast<float*>(x.data()), DType::kF32, {1, 8, 32}, {512, 64, 1});
  std::tie(code, what) = message(strided, bne(y, 1, 8, 32));
  EXPECT_NE(what.find("contiguous"), std::string::npos) << what;
  // N = 12 is not a multiple of the segment lengths: the attention's own check, before the
  // projections run.
  std::tie(code, what) = message(bne(x, 1, 12, 32), bne(y, 1, 12, 32));
  EXPECT_NE(what.find("does not divide the sequence length N = 12"), std::string::npos) << what;

  // Backward with a saved state of another shape.
  MultiheadSaved saved;
  std::vector<float> y2(16 * 32), dx(8 * 32);
  layer.forward(good, bne(y2, 1, 16, 32), &saved);
  MultiheadWeights grads;
  const Error e = error_of([&] {
    layer.backward(bne(x, 1, 8, 32), bne(y2, 1, 8, 32), saved, bne(dx, 1, 8, 32), grads);
  });
  EXPECT_NE(std::string(e.what()).find("saved holds a forward of B = 1, N = 16"), std::string::npos)
      << e.what();
}

// bf16 / fp16 host tensors with cpu_bf16 = widen (fp16: always): the layer computes in fp32
// on their values, so y and the input gradients are the fp32 layer's (on the widened inputs
// and dy) rounded once, and the weight gradients are the fp32 ones, bit for bit;
// self-attention's x and dx stay one buffer each.
TEST(Multihead, LowPrecisionHostTensorsComputeInFp32) {
  const LayerCase c{2, 16, 32, 4, 2, {8, 16}, {1, 2}, Mode::kGroups, true};
  ExecOptions widen;
  widen.cpu_bf16 = CpuBf16::kWiden;
  const MultiheadDilatedAttention layer(c.config(), random_weights(c.config(), 7), widen);
  const size_t n = static_cast<size_t>(c.B * c.N * c.E);
  for (const DType dtype : {DType::kBF16, DType::kF16}) {
    const auto expect_rounded = [&](const std::vector<uint16_t>& got,
                                    const std::vector<float>& fp32, const char* name) {
      const std::vector<uint16_t> want = round_to(dtype, fp32).bits;
      size_t wrong = 0;
      for (size_t j = 0; j < n; ++j) wrong += got[j] != want[j];
      EXPECT_EQ(wrong, 0u) << name << " (" << dtype_name(dtype) << ")";
    };
    // query, key, value, dy: low-precision bits and the fp32 values they hold.
    std::vector<uint16_t> low[4];
    std::vector<float> wide[4];
    for (int i = 0; i < 4; ++i) {
      Rounded r = round_to(dtype, normal_vector(n, static_cast<uint32_t>(10 + i)));
      low[i] = std::move(r.bits);
      wide[i] = std::move(r.values);
    }
    const auto view = [&](const void* data, DType t) {
      return TensorView::contiguous(const_cast<void*>(data), t, {c.B, c.N, c.E});
    };
    for (const bool self : {true, false}) {
      SCOPED_TRACE(self ? "self-attention" : "query, key, value");
      std::vector<float> y32(n), dq32(n), dk32(n), dv32(n);
      std::vector<uint16_t> y(n), dq(n), dk(n), dv(n);
      MultiheadSaved saved32, saved;
      MultiheadWeights g32, g;
      const auto f32 = [&](int i) { return view(wide[i].data(), DType::kF32); };
      const auto lp = [&](int i) { return view(low[i].data(), dtype); };
      if (self) {
        layer.forward(f32(0), view(y32.data(), DType::kF32), &saved32);
        layer.forward(lp(0), view(y.data(), dtype), &saved);
        layer.backward(f32(0), f32(3), saved32, view(dq32.data(), DType::kF32), g32);
        layer.backward(lp(0), lp(3), saved, view(dq.data(), dtype), g);
      } else {
        layer.forward(f32(0), f32(1), f32(2), view(y32.data(), DType::kF32), &saved32);
        layer.forward(lp(0), lp(1), lp(2), view(y.data(), dtype), &saved);
        layer.backward(f32(0), f32(1), f32(2), f32(3), saved32, view(dq32.data(), DType::kF32),
                       view(dk32.data(), DType::kF32), view(dv32.data(), DType::kF32), g32);
        layer.backward(lp(0), lp(1), lp(2), lp(3), saved, view(dq.data(), dtype),
                       view(dk.data(), dtype), view(dv.data(), dtype), g);
        expect_rounded(dk, dk32, "dkey");
        expect_rounded(dv, dv32, "dvalue");
      }
      expect_rounded(y, y32, "y");
      expect_rounded(dq, dq32, self ? "dx" : "dquery");
      for (const auto& [member, name] : kWeightParams) EXPECT_EQ(g.*member, g32.*member) << name;
    }
  }
}

// bf16 host tensors with the CPU's bf16 products (cpu_bf16 = dot or amx, where the CPU has
// them): the attention core runs on q, k, v rounded to bf16. y against the composed fp64
// reference and every gradient against the fp32 layer's (on the widened inputs and dy),
// within bf16 tolerances; finite, non-zero.
TEST(Multihead, Bf16TensorsWithBf16Products) {
  const LayerCase c{2, 64, 64, 4, 2, {32, 64}, {1, 2}, Mode::kLongNet, true};
  const MultiheadWeights w = random_weights(c.config(), 7);
  const size_t n = static_cast<size_t>(c.B * c.N * c.E);
  const Rounded x = round_to(DType::kBF16, normal_vector(n, 21));
  const Rounded dy = round_to(DType::kBF16, normal_vector(n, 22));
  const auto view = [&](const void* data, DType t) {
    return TensorView::contiguous(const_cast<void*>(data), t, {c.B, c.N, c.E});
  };
  // Within 3e-2 of max(scale, max |want|).
  const auto expect_near = [&](const std::vector<float>& got, const std::vector<double>& want,
                               const char* name, double scale = 1.0) -> double {
    double err = 0.0, max_ref = 0.0;
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_TRUE(std::isfinite(got[i])) << name << "[" << i << "]";
      err = std::max(err, std::abs(got[i] - want[i]));
      max_ref = std::max(max_ref, std::abs(want[i]));
    }
    EXPECT_LE(err, 3e-2 * std::max(scale, max_ref)) << name << " max |ref| " << max_ref;
    return max_ref;
  };
  const auto widened = [](const std::vector<uint16_t>& bits) {
    std::vector<float> v(bits.size());
    for (size_t i = 0; i < bits.size(); ++i) v[i] = to_f32(bf16_t{bits[i]});
    return v;
  };
  ExecOptions widen;
  widen.cpu_bf16 = CpuBf16::kWiden;
  const MultiheadDilatedAttention fp32_layer(c.config(), w, widen);
  std::vector<float> dx32(n);
  MultiheadSaved saved32;
  MultiheadWeights g32;
  std::vector<float> y32(n);
  fp32_layer.forward(view(x.values.data(), DType::kF32), view(y32.data(), DType::kF32), &saved32);
  fp32_layer.backward(view(x.values.data(), DType::kF32), view(dy.values.data(), DType::kF32),
                      saved32, view(dx32.data(), DType::kF32), g32);
  const std::vector<double> ref = composed_forward(c, w, x.values, x.values, x.values);
  int ran = 0;
  for (const CpuBf16 kernel : {CpuBf16::kDot, CpuBf16::kAmx}) {
    ExecOptions o;
    o.cpu_bf16 = kernel;
    try {
      cpu::resolve_bf16(kernel);
    } catch (const Error&) {
      continue;  // not on this CPU
    }
    ++ran;
    SCOPED_TRACE(cpu_bf16_name(kernel));
    const MultiheadDilatedAttention layer(c.config(), w, o);
    std::vector<uint16_t> y(n), dx(n);
    MultiheadSaved saved;
    MultiheadWeights g;
    layer.forward(view(x.bits.data(), DType::kBF16), view(y.data(), DType::kBF16), &saved);
    layer.backward(view(x.bits.data(), DType::kBF16), view(dy.bits.data(), DType::kBF16), saved,
                   view(dx.data(), DType::kBF16), g);
    EXPECT_GT(expect_near(widened(y), ref, "y"), 0.1);
    EXPECT_GT(expect_near(widened(dx), std::vector<double>(dx32.begin(), dx32.end()), "dx"), 0.1);
    // The k-norm bias's exact gradient is 0 (it shifts every score of a query alike): with
    // dS rounded to bf16 it is rounding noise on terms of the k-norm weight gradient's size.
    const std::vector<float>& gk = g32.k_norm_weight;
    double k_scale = 1.0;
    for (float v : gk) k_scale = std::max(k_scale, static_cast<double>(std::abs(v)));
    for (const auto& [member, name] : kWeightParams) {
      const std::vector<float>& want = g32.*member;
      expect_near(g.*member, std::vector<double>(want.begin(), want.end()), name,
                  member == &MultiheadWeights::k_norm_bias ? k_scale : 1.0);
    }
  }
  if (ran == 0) GTEST_SKIP() << "this CPU has neither AVX512_BF16 nor AMX-BF16";
}

TEST(Multihead, XavierInitialisation) {
  MultiheadConfig config = LayerCase{1, 16, 64, 4, 2, {16}, {1}, Mode::kGroups, true}.config();
  config.gamma_init = 0.5f;
  const MultiheadWeights a = MultiheadWeights::xavier(config, 5);
  EXPECT_EQ(a.wq, MultiheadWeights::xavier(config, 5).wq);  // a function of the seed
  EXPECT_NE(a.wq, MultiheadWeights::xavier(config, 6).wq);
  const auto std_of = [](const std::vector<float>& v) {
    double s = 0.0;
    for (float x : v) s += static_cast<double>(x) * x;
    return std::sqrt(s / static_cast<double>(v.size()));
  };
  // std = gain sqrt(2 / (fan_in + fan_out)): wq [64, 64], wk [32, 64], wv (gain 0.5), wo.
  EXPECT_NEAR(std_of(a.wq), std::sqrt(2.0 / 128), 0.01);
  EXPECT_NEAR(std_of(a.wk), std::sqrt(2.0 / 96), 0.01);
  EXPECT_NEAR(std_of(a.wv), 0.5 * std::sqrt(2.0 / 96), 0.01);
  EXPECT_NEAR(std_of(a.wo), 0.5 * std::sqrt(2.0 / 128), 0.01);
  for (float b : a.bq) EXPECT_EQ(b, 0.0f);
  for (float g : a.out_norm_weight) EXPECT_EQ(g, 1.0f);
}

// The layer an object builds once is shared by its copies and owns what it uses: a copy
// whose original is gone computes what the original did, on shapes that change call by call
// (make() makes the original, and a fresh object with the same weights).
template <typename Make>
void expect_copy_outlives_original(const LayerCase& c, Make make) {
  auto original = make();
  auto copy = *original;
  const auto fresh = make();
  for (const int64_t n : {int64_t{16}, int64_t{32}, int64_t{16}}) {
    const size_t size = static_cast<size_t>(c.B * n * c.E);
    const std::vector<float> x = normal_vector(size, static_cast<uint32_t>(n));
    std::vector<float> want(size), got(size);
    const auto view = [&](const std::vector<float>& t) {
      return TensorView::contiguous(const_cast<float*>(t.data()), DType::kF32, {c.B, n, c.E});
    };
    if (original) {
      original->forward(view(x), view(want));
      original.reset();  // the copy goes on alone
    } else {
      fresh->forward(view(x), view(want));
    }
    copy.forward(view(x), view(got));
    EXPECT_EQ(got, want) << "N = " << n;
    EXPECT_GT(std::count_if(got.begin(), got.end(), [](float v) { return v != 0.0f; }), 0);
  }
}

const LayerCase kCopyCase{2, 16, 32, 4, 2, {8, 16}, {1, 2}, Mode::kGroups, true};

TEST(Multihead, ACopyOutlivesItsOriginalAcrossShapes) {
  const MultiheadWeights w = random_weights(kCopyCase.config(), 3);
  expect_copy_outlives_original(kCopyCase, [&] {
    return std::make_unique<MultiheadDilatedAttention>(kCopyCase.config(), w);
  });
}

// The distributed layer (its ring and layer made once, shared by copies) on a 1 x 1 grid.
TEST(Distributed, ACopyOutlivesItsOriginalAcrossShapes) {
  const MultiheadWeights w = random_weights(kCopyCase.config(), 4);
  const std::unique_ptr<Communicator> seq = make_self_communicator();
  const std::unique_ptr<Communicator> head = make_self_communicator();
  expect_copy_outlives_original(kCopyCase, [&] {
    return std::make_unique<DistributedDilatedAttention>(kCopyCase.config(), *seq, *head, w);
  });
}

}  // namespace
}  // namespace ringattn::test
