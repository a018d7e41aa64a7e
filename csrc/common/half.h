// IEEE binary16 <-> binary32 conversion, usable on host and device.
//
// The host version is exact (round-to-nearest-even on narrowing), so CPU float16
// weights hold the same bits as the float16 weights uploaded to the GPU.
#pragma once

#include <cstdint>
#include <cstring>

#include "hd.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace gfn {

GFN_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

GFN_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

/// Converts float16 bits to float32 (exact: every half is a float).
GFN_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (man << 13));  // inf / nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return bits_to_float(sign);  // signed zero
  // Subnormal half: value = man * 2^-24.
  const float v = static_cast<float>(man) * 5.9604644775390625e-8f;
  return sign ? -v : v;
}

/// Converts float32 to float16 bits with round-to-nearest-even (as numpy / CUDA do).
GFN_HD uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t absu = u & 0x7FFFFFFFu;
  if (absu >= 0x7F800000u) {  // inf or nan
    return static_cast<uint16_t>(sign | 0x7C00u | (absu > 0x7F800000u ? 0x200u : 0u));
  }
  if (absu >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // overflow -> inf
  if (absu < 0x38800000u) {  // result is subnormal or zero
    if (absu < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25 rounds to zero
    const uint32_t exp = absu >> 23;
    const uint32_t man = (absu & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // 14..24
    uint32_t half_man = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (half_man & 1u))) ++half_man;
    return static_cast<uint16_t>(sign | half_man);
  }
  uint32_t r = absu - 0x38000000u;  // rebias exponent 127 -> 15
  const uint32_t rem = r & 0x1FFFu;
  r >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return static_cast<uint16_t>(sign | r);
}

/// Element ``off`` of a weight matrix stored as float32 (``F16 = false``) or IEEE half
/// (``F16 = true``), as float32: the scalar tail of the SIMD GEMV kernels.
template <bool F16>
inline float load_weight(const void* p, int64_t off) {
  if constexpr (F16) {
    return half_to_float(static_cast<const uint16_t*>(p)[off]);
  } else {
    return static_cast<const float*>(p)[off];
  }
}

}  // namespace gfn
