// Interpolation weights shared by the CPU loops and the CUDA kernels.
//
// Two families:
//  * Glance (`torch.nn.functional.interpolate(..., align_corners=True)` on float32):
//    bilinear (2 taps) and bicubic (4 taps, Keys a = -0.75, border indices clamped), with
//    float32 index arithmetic exactly as PyTorch's CPU kernels compute it.
//  * Antialiased resize filters (PIL / torchvision `antialias=True`): triangle for
//    bilinear and Keys a = -0.5 for bicubic, evaluated in double precision.
#pragma once

#include <cmath>
#include <cstdint>

#include "half.h"
#include "hd.h"

namespace gfn {

enum class Interp : int { kBilinear = 0, kBicubic = 1 };

/// Keys cubic convolution kernel for |x| <= 1.
template <typename T>
GFN_HD T cubic_conv1(T x, T a) {
  return ((a + T(2)) * x - (a + T(3))) * x * x + T(1);
}

/// Keys cubic convolution kernel for 1 < |x| < 2.
template <typename T>
GFN_HD T cubic_conv2(T x, T a) {
  return ((a * x - T(5) * a) * x + T(8) * a) * x - T(4) * a;
}

/// The four bicubic coefficients for a fractional offset t in [0, 1] (a = -0.75).
GFN_HD void cubic_coeffs(float t, float w[4]) {
  const float a = -0.75f;
  w[0] = cubic_conv2<float>(t + 1.0f, a);
  w[1] = cubic_conv1<float>(t, a);
  const float t2 = 1.0f - t;
  w[2] = cubic_conv1<float>(t2, a);
  w[3] = cubic_conv2<float>(t2 + 1.0f, a);
}

/// Source taps of output index `i` for an align_corners=True resize in_size -> out_size.
///
/// Writes `ntaps` (2 for bilinear, 4 for bicubic) clamped source indices and weights and
/// returns ntaps. Mirrors PyTorch: scale = float(in - 1) / (out - 1), src = scale * i,
/// index = min(floor(src), in - 1), t = clamp(src - index, 0, 1).
GFN_HD int glance_taps(Interp mode, int i, int in_size, int out_size, int idx[4], float w[4]) {
  const float scale =
      out_size > 1 ? static_cast<float>(in_size - 1) / static_cast<float>(out_size - 1) : 0.0f;
  const float src = scale * static_cast<float>(i);
  int index = static_cast<int>(floorf(src));
  if (index > in_size - 1) index = in_size - 1;
  float t = src - static_cast<float>(index);
  t = t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t);
  if (mode == Interp::kBilinear) {
    if (in_size == out_size) {  // PyTorch copies when the sizes match
      idx[0] = idx[1] = i;
      w[0] = 1.0f;
      w[1] = 0.0f;
      return 2;
    }
    idx[0] = index;
    idx[1] = index + (index < in_size - 1 ? 1 : 0);
    w[1] = t;
    w[0] = 1.0f - t;
    return 2;
  }
  cubic_coeffs(t, w);
  for (int j = 0; j < 4; ++j) {
    int k = index - 1 + j;
    k = k < 0 ? 0 : (k > in_size - 1 ? in_size - 1 : k);
    idx[j] = k;
  }
  return 4;
}

GFN_HD float to_float(float v) { return v; }
GFN_HD float to_float(uint16_t half_bits) { return half_to_float(half_bits); }

/// Horizontal part of one glance output: sum_b wx[b] * row[ix[b]], accumulated from the
/// first tap as PyTorch's CPU kernel does (row: float32 or float16 bits).
template <typename T>
GFN_HD float glance_row(const T* row, int ntaps, const int* ix, const float* wx) {
  float t = to_float(row[ix[0]]) * wx[0];
  for (int b = 1; b < ntaps; ++b) t += to_float(row[ix[b]]) * wx[b];
  return t;
}

/// One output value of a separable align_corners=True resize of a row-major plane:
/// rows outer, columns inner (glance_row), each sum starting from its first tap.
template <typename T>
GFN_HD float glance_sample(const T* plane, int width, int ntaps, const int* iy, const float* wy,
                           const int* ix, const float* wx) {
  float out = glance_row(plane + static_cast<int64_t>(iy[0]) * width, ntaps, ix, wx) * wy[0];
  for (int a = 1; a < ntaps; ++a) {
    out += glance_row(plane + static_cast<int64_t>(iy[a]) * width, ntaps, ix, wx) * wy[a];
  }
  return out;
}

/// Antialias filter of PIL's bilinear ("triangle") resampling.
GFN_HD double aa_filter_bilinear(double x) {
  x = x < 0.0 ? -x : x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

/// Antialias filter of PIL's bicubic resampling (Keys, a = -0.5).
GFN_HD double aa_filter_bicubic(double x) {
  x = x < 0.0 ? -x : x;
  if (x < 1.0) return cubic_conv1<double>(x, -0.5);
  if (x < 2.0) return cubic_conv2<double>(x, -0.5);
  return 0.0;
}

/// Rounds a fixed-point accumulator (weights scaled by 2^precision, the +0.5 already
/// added) to a pixel value, saturating to [0, 255] like PIL and PyTorch do.
GFN_HD int fixed_to_u8(int32_t acc, int precision) {
  const int v = acc >> precision;  // arithmetic shift: floor for negative sums
  return v < 0 ? 0 : (v > 255 ? 255 : v);
}

}  // namespace gfn
