// fp16/bf16 conversions against the compiler's _Float16 and an independent bf16 rounding.

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "src/base/dtype.h"

namespace ringattn {
namespace {

TEST(DType, Fp16RoundTripsEveryBitPattern) {
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const fp16_t h{static_cast<uint16_t>(bits)};
    _Float16 ref;
    std::memcpy(&ref, &bits, 2);
    const float f = to_f32(h);
    if (std::isnan(static_cast<float>(ref))) {
      EXPECT_TRUE(std::isnan(f));
      continue;
    }
    EXPECT_EQ(f, static_cast<float>(ref)) << bits;
    EXPECT_EQ(from_f32<fp16_t>(f).bits, bits) << bits;
  }
}

// Calls fn(f) on `count` floats of random bit patterns (NaNs included) drawn from `seed`;
// stops at a fatal failure.
template <typename Fn>
void for_random_floats(uint32_t seed, int count, Fn&& fn) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < count && !::testing::Test::HasFatalFailure(); ++i) {
    const uint32_t u = any(rng);
    float f;
    std::memcpy(&f, &u, 4);
    fn(f);
  }
}

TEST(DType, Fp16RoundsLikeTheCompiler) {
  for_random_floats(1, 2000000, [](float f) {
    if (std::isnan(f)) return;
    const _Float16 ref = static_cast<_Float16>(f);
    uint16_t ref_bits;
    std::memcpy(&ref_bits, &ref, 2);
    ASSERT_EQ(from_f32<fp16_t>(f).bits, ref_bits) << f;
  });
}

TEST(DType, Bf16RoundsToNearestEven) {
  for_random_floats(2, 1000000, [](float f) {
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(to_f32(from_f32<bf16_t>(f))));
      return;
    }
    const float r = to_f32(from_f32<bf16_t>(f));
    // r is a bf16 value; the neighbours of r in bf16 are no closer to f.
    const double err = std::abs(double(r) - double(f));
    uint32_t rb;
    std::memcpy(&rb, &r, 4);
    EXPECT_EQ(rb & 0xffffu, 0u);
    for (int step : {-1, 1}) {
      const uint32_t nb = rb + static_cast<uint32_t>(step) * 0x10000u;
      float n;
      std::memcpy(&n, &nb, 4);
      if (std::isfinite(n) && std::isfinite(r)) {
        ASSERT_LE(err, std::abs(double(n) - double(f))) << f;
      }
    }
  });
}

}  // namespace
}  // namespace ringattn
