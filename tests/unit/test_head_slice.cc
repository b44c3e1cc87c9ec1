// DilatedConfig::head_offset / total_heads: a slice of the heads computed alone equals the same
// heads of the whole computation (forward and backward), in both modes; bad slices are errors.

#include <gtest/gtest.h>

#include "ringattn/ringattn.h"
#include "tests/support/test_util.h"

namespace ringattn::test {
namespace {

// Heads [h0, h0 + count) of a [B, N, H, D] tensor (or lse [B, H, N], heads_dim = 1) as a view.
TensorView heads_of(const Tensor& t, int64_t h0, int64_t count, int heads_dim = 2) {
  TensorView v = t.view();
  v.data = static_cast<uint8_t*>(v.data) +
           static_cast<size_t>(h0 * v.strides[heads_dim]) * dtype_size(v.dtype);
  v.shape[heads_dim] = count;
  return v;
}

TEST(HeadSlice, SlicesEqualTheWhole) {
  std::mt19937 rng(3);
  // H = 6 heads cut into two slices of 3: in groups mode (3 groups of 2) each slice straddles
  // a group; in longnet mode the offsets h % r depend on the global head index.
  const Case cases[] = {
      {1, 32, 6, 6, 8, {8, 16, 32}, {1, 2, 4}, Mode::kGroups, true},
      {2, 32, 6, 6, 8, {16, 32}, {3, 2}, Mode::kLongNet, false},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(describe(c));
    Tensor q(DType::kF32, {c.B, c.N, c.H, c.D}), k(DType::kF32, {c.B, c.N, c.Hkv, c.D}),
        v(DType::kF32, {c.B, c.N, c.Hkv, c.D}), dout(DType::kF32, {c.B, c.N, c.H, c.D});
    for (Tensor* t : {&q, &k, &v, &dout}) t->fill_normal(rng);
    Tensor out(DType::kF32, {c.B, c.N, c.H, c.D}), lse(DType::kF32, {c.B, c.H, c.N});
    Tensor dq(DType::kF32, {c.B, c.N, c.H, c.D}), dk(DType::kF32, {c.B, c.N, c.Hkv, c.D}),
        dv(DType::kF32, {c.B, c.N, c.Hkv, c.D});
    const DilatedAttention whole(c.config());
    whole.forward(q.view(), k.view(), v.view(), out.view(), lse.view());
    whole.backward(dout.view(), q.view(), k.view(), v.view(), out.view(), lse.view(), dq.view(),
                   dk.view(), dv.view());

    Tensor s_out(DType::kF32, {c.B, c.N, c.H, c.D}), s_lse(DType::kF32, {c.B, c.H, c.N});
    Tensor s_dq(DType::kF32, {c.B, c.N, c.H, c.D}), s_dk(DType::kF32, {c.B, c.N, c.Hkv, c.D}),
        s_dv(DType::kF32, {c.B, c.N, c.Hkv, c.D});
    for (int64_t h0 : {0, 3}) {
      DilatedConfig config = c.config();
      config.head_offset = h0;
      config.total_heads = c.H;
      const DilatedAttention slice(config);
      const auto qh = [&](const Tensor& t) { return heads_of(t, h0, 3); };
      slice.forward(qh(q), qh(k), qh(v), qh(s_out), heads_of(s_lse, h0, 3, 1));
      slice.backward(qh(dout), qh(q), qh(k), qh(v), qh(s_out), heads_of(s_lse, h0, 3, 1), qh(s_dq),
                     qh(s_dk), qh(s_dv));
    }
    // The kernels compute each head alone: the slices are bitwise the whole.
    EXPECT_EQ(s_out.bytes(), out.bytes());
    EXPECT_EQ(s_lse.bytes(), lse.bytes());
    EXPECT_EQ(s_dq.bytes(), dq.bytes());
    EXPECT_EQ(s_dk.bytes(), dk.bytes());
    EXPECT_EQ(s_dv.bytes(), dv.bytes());
    // The second slice differs from running those heads as a layer of their own.
    Tensor alone(DType::kF32, {c.B, c.N, c.H, c.D});
    DilatedAttention(c.config())
        .forward(heads_of(q, 3, 3), heads_of(k, 3, 3), heads_of(v, 3, 3), heads_of(alone, 3, 3));
    int64_t differ = 0;
    for (int64_t b = 0; b < c.B; ++b) {
      for (int64_t n = 0; n < c.N; ++n) {
        for (int64_t h = 3; h < c.H; ++h) {
          for (int64_t d = 0; d < c.D; ++d) differ += alone.get(b, n, h, d) != out.get(b, n, h, d);
        }
      }
    }
    EXPECT_GT(differ, 0);
  }
}

TEST(HeadSlice, BadSlices) {
  Tensor q(DType::kF32, {1, 16, 2, 8}), out(DType::kF32, {1, 16, 2, 8});
  DilatedConfig config{{8}, {1}, Mode::kGroups, false, std::nullopt};
  config.head_offset = 3;
  config.total_heads = 4;
  Error e =
      error_of([&] { DilatedAttention(config).forward(q.view(), q.view(), q.view(), out.view()); });
  EXPECT_NE(std::string(e.what()).find("head_offset = 3 plus the H = 2 heads of q exceeds "
                                       "total_heads = 4"),
            std::string::npos)
      << e.what();
  config.head_offset = -1;
  e = error_of([&] { DilatedAttention{config}; });
  EXPECT_NE(std::string(e.what()).find("head_offset = -1"), std::string::npos) << e.what();
}

}  // namespace
}  // namespace ringattn::test
