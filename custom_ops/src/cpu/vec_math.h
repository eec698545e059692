// Elementwise math for the CPU kernels, written so that GCC and Clang vectorise loops calling it: no library calls,
// no branches (selects only), bit casts through memcpy. Accuracy is a few float32 ulp, well inside the tolerance the
// tests hold the ops to against float64 references.
#pragma once

#include <cstdint>
#include <cstring>

#include "mamba_export_ops/cpu_kernels.h"

namespace mamba_export_ops {
namespace vec {

static inline float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint32_t as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// exp(x): x = k ln2 + r with |r| <= ln2/2, exp(r) by the Cephes expf polynomial, 2^k through the exponent bits as
// 2^(k-1) * 2 (both exact below overflow, so the bits of e * 2^k), which lets k reach 128: x is clamped to [lo, hi],
// hi just above log(FLT_MAX), so that exp overflows to +inf from there on as std::exp's does (it used to saturate at
// exp(88.37) ~ 2.4e38); below lo (where 2^(k-1) would not be a normal float) the result is 0. NaN propagates.
static inline float exp(float x) {
  const float hi = 88.72283935546875f, lo = -86.9f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, kept in the low mantissa bits
  float kf = xc * 1.44269504088896341f + magic;
  int32_t k = static_cast<int32_t>(as_bits(kf)) - static_cast<int32_t>(as_bits(magic));
  kf -= magic;
  float r = xc - kf * 0.693359375f;  // ln2 split in two for an exact first product
  r = r - kf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float e = p * r * r + r + 1.0f;
  float scaled = e * as_float(static_cast<uint32_t>(k + 126) << 23) * 2.0f;
  return x < lo ? 0.0f : scaled;
}

// log(x) for normal positive x: x = 2^k m with m in [sqrt(1/2), sqrt(2)), log(m) by the Cephes logf polynomial.
static inline float log_positive(float x) {
  uint32_t bits = as_bits(x);
  int32_t k = static_cast<int32_t>((bits >> 23) & 0xff) - 126;
  float m = as_float((bits & 0x007fffffu) | 0x3f000000u);  // in [0.5, 1)
  bool small = m < 0.707106781186547524f;
  k = small ? k - 1 : k;
  m = small ? m + m - 1.0f : m - 1.0f;
  float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  float kf = static_cast<float>(k);
  float y = m * z * p + kf * -2.12194440e-4f - 0.5f * z;
  return m + y + kf * 0.693359375f;
}

// softplus as torch computes it (threshold 20): x > 20 ? x : log1p(exp(x)), with log1p(t) = log(1+t) * t / ((1+t)-1)
// so that a tiny exp(x) keeps its relative accuracy.
static inline float softplus(float x) {
  float t = exp(x);
  float w = 1.0f + t;
  float l1p = w == 1.0f ? t : log_positive(w) * t / (w - 1.0f);
  return x > 20.0f ? x : l1p;
}

static inline float silu(float x) { return x / (1.0f + exp(-x)); }

// binary16 <-> float32 (round to nearest even), after F. Giesen's branch-free conversions.
static inline float to_float(float x) { return x; }
static inline float to_float(int8_t x) { return float(x); }

static inline float to_float(half_t h) {
  uint32_t em = h.bits & 0x7fffu;
  uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  float magnitude = as_float(em << 13) * 5.192296858534828e33f;  // * 2^112 rebiases normals and subnormals alike
  magnitude = em >= 0x7c00u ? as_float((em << 13) | 0x7f800000u) : magnitude;  // inf, NaN
  return as_float(as_bits(magnitude) | sign);
}

template <typename T>
static inline T from_float(float x);

template <>
inline float from_float<float>(float x) {
  return x;
}

template <>
inline half_t from_float<half_t>(float x) {
  const uint32_t f32_inf = 255u << 23, f16_overflow = (127u + 16u) << 23, smallest_normal = 113u << 23;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t bits = as_bits(x);
  uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  uint32_t special = bits > f32_inf ? 0x7e00u : 0x7c00u;
  uint32_t subnormal = as_bits(as_float(bits) + as_float(denorm_magic)) - denorm_magic;
  uint32_t normal = (bits + ((15u - 127u) << 23) + 0xfffu + ((bits >> 13) & 1u)) >> 13;
  uint32_t out = bits >= f16_overflow ? special : (bits < smallest_normal ? subnormal : normal);
  return half_t{static_cast<uint16_t>(out | (sign >> 16))};
}

}  // namespace vec
}  // namespace mamba_export_ops
