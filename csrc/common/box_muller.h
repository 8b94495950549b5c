// Standard normals from regops' Philox words (regops.hessian.reference.box_muller): each pair of 32-bit words
// gives two normals, r (cos, sin), with r = sqrt(-2 ln u1), u1 = ((w0 >> 8) + 1) 2^-24 and the angle 2 pi u2,
// u2 = (w1 >> 8) 2^-24. ln, cos and sin are float32 polynomials built from correctly rounded operations in the
// reference's order (the build uses -ffp-contract=off), so every backend gives the same bits.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace regops {
namespace normal {

constexpr float kLn2 = 0x1.62e43p-1f;     // float32(ln 2)
constexpr int32_t kSqrt2Bits = 0x3FB504F3;  // float32(sqrt 2), as its bits
constexpr float kTwoPi = 0x1.921fb6p+2f;  // float32(2 pi)
constexpr float kTwoPowM24 = 0x1p-24f;

// 1/11, 1/9, 1/7, 1/5, 1/3 and (-1)^n / (2n+1)!, n = 7 .. 1, rounded from double to float32 as numpy rounds them.
constexpr float kLogCoeffs[5] = {static_cast<float>(1.0 / 11), static_cast<float>(1.0 / 9),
                                 static_cast<float>(1.0 / 7), static_cast<float>(1.0 / 5),
                                 static_cast<float>(1.0 / 3)};
constexpr float kSinCoeffs[7] = {static_cast<float>(-1.0 / 1307674368000.0), static_cast<float>(1.0 / 6227020800.0),
                                 static_cast<float>(-1.0 / 39916800.0),      static_cast<float>(1.0 / 362880.0),
                                 static_cast<float>(-1.0 / 5040.0),          static_cast<float>(1.0 / 120.0),
                                 static_cast<float>(-1.0 / 6.0)};

// ln(k 2^-24) for k in [1, 2^24] (regops.hessian.reference.log_unit).
inline float log_unit(uint32_t k) {
  // Branch-free, so that loops over it vectorize on every ISA (a select of floating-point results is a branch to
  // GCC unless the CPU has masked vector operations); each floating-point operation is the reference's, in order.
  const float u = static_cast<float>(static_cast<int32_t>(k)) * kTwoPowM24;
  int32_t bits;
  std::memcpy(&bits, &u, 4);
  const int32_t mbits = (bits & 0x7FFFFF) | 0x3F800000;
  const int32_t big = mbits > kSqrt2Bits;      // m > sqrt 2: positive floats order as their bits
  const int32_t halved = mbits - (big << 23);  // m / 2 (exact, m is normal), in integers
  float m;
  std::memcpy(&m, &halved, 4);
  const float ef = static_cast<float>((bits >> 23) - 127 + big);
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = s2 * kLogCoeffs[0] + kLogCoeffs[1];
  for (int i = 2; i < 5; ++i) p = p * s2 + kLogCoeffs[i];
  p = p * s2 + 1.0f;
  return ef * kLn2 + (s + s) * p;
}

// sqrt(-2 ln u1) as the reference computes it (in double, rounded to float): a float32 square root of the
// float32 -2 ln u1 gives the same bits (-2 ln u1 is exact in float32, and a double square root rounded to float
// is the correctly rounded float square root: double has more than 2 x 24 + 2 bits), and vectorizes twice as wide.
inline float radius(float log_u1) { return std::sqrt(log_u1 * -2.0f); }

inline float sin_poly(float x) {
  const float x2 = x * x;
  float p = x2 * kSinCoeffs[0] + kSinCoeffs[1];
  for (int i = 2; i < 7; ++i) p = p * x2 + kSinCoeffs[i];
  p = p * x2 + 1.0f;
  return x * p;
}

// The two normals of the word pair (wa, wb).
inline void box_muller(uint32_t wa, uint32_t wb, float* z_cos, float* z_sin) {
  const float r = radius(log_unit((wa >> 8) + 1));
  const float u = static_cast<float>(static_cast<int32_t>(wb >> 8)) * kTwoPowM24;
  const float t = u >= 0.5f ? u - 1.0f : u;
  const float a = std::fabs(t);
  const float bc = (0.25f - a) * kTwoPi;
  const float bs = (a <= 0.25f ? t : (t > 0.0f ? 0.5f - t : -0.5f - t)) * kTwoPi;
  *z_cos = r * sin_poly(bc);
  *z_sin = r * sin_poly(bs);
}

}  // namespace normal
}  // namespace regops
