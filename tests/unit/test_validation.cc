// Every validation rule of SPEC.md raises ringattn::Error naming the parameter and the fix.

#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "tests/support/test_util.h"

namespace ringattn::test {
namespace {

struct Shapes {
  int64_t B = 1, N = 16, H = 4, Hkv = 2, D = 8;
};

void forward_with(const DilatedConfig& cfg, const Shapes& s, DType kdt = DType::kF32,
                  std::vector<int64_t> out_shape = {}, std::vector<int64_t> lse_shape = {},
                  DType lse_dt = DType::kF32) {
  Tensor q(DType::kF32, {s.B, s.N, s.H, s.D}), k(kdt, {s.B, s.N, s.Hkv, s.D}),
      v(kdt, {s.B, s.N, s.Hkv, s.D});
  Tensor out(DType::kF32, out_shape.empty() ? std::vector<int64_t>{s.B, s.N, s.H, s.D} : out_shape);
  Tensor lse(lse_dt, lse_shape.empty() ? std::vector<int64_t>{s.B, s.H, s.N} : lse_shape);
  std::mt19937 rng(1);
  q.fill_normal(rng);
  k.fill_normal(rng);
  v.fill_normal(rng);
  out.fill(12345.0f);
  DilatedAttention attn(cfg);
  try {
    attn.forward(q.view(), k.view(), v.view(), out.view(), lse.view());
  } catch (...) {
    // Nothing may be written before validation finishes.
    EXPECT_EQ(out.get(0, 0, 0, 0), 12345.0f);
    throw;
  }
}

DilatedConfig good() {
  return {{8, 16}, {1, 2}, Mode::kGroups, false, std::nullopt};
}

TEST(Validation, ConfigRules) {
  expect_error(
      [] {
        DilatedAttention a({{}, {}, Mode::kGroups, false, std::nullopt});
      },
      ErrorCode::kInvalidArgument, {"segment_lengths", "at least one"});
  expect_error(
      [] {
        DilatedAttention a({{8, 16}, {1}, Mode::kGroups, false, std::nullopt});
      },
      ErrorCode::kInvalidArgument, {"dilation_rates", "1", "one dilation rate per"});
  expect_error(
      [] {
        DilatedAttention a({{0}, {1}, Mode::kGroups, false, std::nullopt});
      },
      ErrorCode::kInvalidArgument, {"segment_lengths[0] = 0", ">= 1"});
  expect_error(
      [] {
        DilatedAttention a({{8}, {0}, Mode::kGroups, false, std::nullopt});
      },
      ErrorCode::kInvalidArgument, {"dilation_rates[0] = 0", ">= 1"});
  expect_error(
      [] {
        DilatedAttention a({{8, 4}, {1, 5}, Mode::kGroups, false, std::nullopt});
      },
      ErrorCode::kInvalidArgument, {"dilation_rates[1] = 5", "segment_lengths[1] = 4"});
  expect_error(
      [] {
        DilatedAttention a({{8}, {1}, Mode::kGroups, false, NAN});
      },
      ErrorCode::kInvalidArgument, {"scale", "finite"});
  expect_error([] { parse_mode("dense"); }, ErrorCode::kInvalidArgument, {"dense", "longnet"});
}

TEST(Validation, SequenceMustBeMultipleOfEverySegment) {
  Shapes s;
  s.N = 24;
  expect_error([&] { forward_with(good(), s); }, ErrorCode::kInvalidArgument,
               {"segment_lengths[1] = 16", "N = 24", "multiple of 16", "N = 32"});
  DilatedConfig c{{6, 8}, {1, 2}, Mode::kGroups, false, std::nullopt};
  s.N = 36;
  expect_error([&] { forward_with(c, s); }, ErrorCode::kInvalidArgument,
               {"segment_lengths[1] = 8", "least common multiple", "24", "N = 48"});
}

TEST(Validation, ShapesAndDtypes) {
  Shapes s;
  s.Hkv = 3;
  expect_error([&] { forward_with(good(), s); }, ErrorCode::kInvalidArgument,
               {"H = 4", "Hkv = 3", "multiple"});
  expect_error([&] { forward_with(good(), Shapes{}, DType::kBF16); }, ErrorCode::kInvalidArgument,
               {"dtype", "bf16", "one dtype"});
  expect_error(
      [&] {
        forward_with(good(), Shapes{}, DType::kF32, {1, 16, 4, 4});
      },
      ErrorCode::kInvalidArgument, {"out", "shape of q"});
  expect_error(
      [&] {
        forward_with(good(), Shapes{}, DType::kF32, {}, {1, 16, 4});
      },
      ErrorCode::kInvalidArgument, {"lse", "[B, H, N]"});
  expect_error([&] { forward_with(good(), Shapes{}, DType::kF32, {}, {}, DType::kBF16); },
               ErrorCode::kInvalidArgument, {"lse", "fp32"});
  Shapes big;
  big.D = 300;
  expect_error([&] { forward_with(good(), big); }, ErrorCode::kUnsupported,
               {"head dim D = 300", "at most 256"});
  Shapes few;
  few.H = 2;
  few.Hkv = 2;
  DilatedConfig three{{4, 8, 16}, {1, 2, 4}, Mode::kGroups, false, std::nullopt};
  expect_error([&] { forward_with(three, few); }, ErrorCode::kInvalidArgument,
               {"H = 2", "G = 3", "longnet"});
  three.mode = Mode::kLongNet;
  EXPECT_NO_THROW(forward_with(three, few));
}

TEST(Validation, LayoutRules) {
  std::vector<float> buf(16 * 4 * 8 * 2, 1.0f);
  TensorView q = TensorView::strided(buf.data(), DType::kF32, {1, 16, 4, 8}, {512, 32, 8, 2});
  TensorView ok = TensorView::contiguous(buf.data(), DType::kF32, {1, 16, 4, 8});
  DilatedAttention attn(good());
  expect_error([&] { attn.forward(q, ok, ok, ok); }, ErrorCode::kInvalidArgument,
               {"q.strides[3] = 2", "contiguous"});
  TensorView three = TensorView::contiguous(buf.data(), DType::kF32, {16, 4, 8});
  expect_error([&] { attn.forward(three, ok, ok, ok); }, ErrorCode::kInvalidArgument,
               {"q has 3 dimensions", "[B, N, H, D]"});
  TensorView null_q = ok;
  null_q.data = nullptr;
  expect_error([&] { attn.forward(null_q, ok, ok, ok); }, ErrorCode::kInvalidArgument,
               {"q.data is null"});
  TensorView gpu = ok;
  gpu.device = Device::kCUDA;
  expect_error([&] { attn.forward(ok, gpu, ok, ok); }, ErrorCode::kInvalidArgument,
               {"k lives on a CUDA device but this call runs on the CPU"});
}

}  // namespace
}  // namespace ringattn::test
