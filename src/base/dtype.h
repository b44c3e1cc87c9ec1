#pragma once
// Scalar conversions between fp32 and the 16-bit storage types (round to nearest even).

#include <cstdint>
#include <cstring>

#include "src/base/host_device.h"

namespace ringattn {

struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

RA_HD uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
RA_HD float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

RA_HD float to_f32(float x) {
  return x;
}
RA_HD float to_f32(bf16_t x) {
  return f32_from_bits(static_cast<uint32_t>(x.bits) << 16);
}
RA_HD float to_f32(fp16_t x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu;
  uint32_t mant = x.bits & 0x3ffu;
  if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp != 0) return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return f32_from_bits(sign);
  // Subnormal: normalise.
  int e = -1;
  do {
    ++e;
    mant <<= 1;
  } while ((mant & 0x400u) == 0);
  return f32_from_bits(sign | ((112u - static_cast<uint32_t>(e)) << 23) | ((mant & 0x3ffu) << 13));
}

template <typename T>
RA_HD T from_f32(float f);

template <>
RA_HD float from_f32<float>(float f) {
  return f;
}
template <>
RA_HD bf16_t from_f32<bf16_t>(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>((u + rounding) >> 16)};
}
template <>
RA_HD fp16_t from_f32<fp16_t>(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return fp16_t{static_cast<uint16_t>(sign | 0x7e00u)};   // nan
  if (a >= 0x477ff000u) return fp16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (a < 0x38800000u) {
    // Result is subnormal (or zero): value = a_float * 2^24 rounded to an integer.
    if (a < 0x33000000u) return fp16_t{sign};  // below half the smallest subnormal
    const uint32_t e = a >> 23;
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14 + (113 - e) - 1 ... keeps 24-bit mantissa aligned
    const uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return fp16_t{static_cast<uint16_t>(sign | r)};
  }
  const uint32_t rounding = 0xfffu + ((a >> 13) & 1u);
  return fp16_t{static_cast<uint16_t>(sign | ((a - 0x38000000u + rounding) >> 13))};
}

inline constexpr double kInfD = __builtin_inf();

// A double carried as two floats, hi (the float nearest x) + lo (the rest): about 48 bits of
// x in a message of floats (the ring's partial results carry lse so). Infinities: lo = 0.
inline void split_double(double x, float* out) {
  out[0] = static_cast<float>(x);
  out[1] = __builtin_isfinite(x) ? static_cast<float>(x - out[0]) : 0.0f;
}
inline double join_double(const float* in) {
  return static_cast<double>(in[0]) + in[1];
}

}  // namespace ringattn
