// Host-side planning of the antialiased resize + centre crop (shared by CPU and CUDA).
//
// Reproduces torchvision's `resize(img_uint8, size, antialias=True)` on CPU, which runs
// PyTorch's uint8 kernel (the same algorithm as PIL's ImagingResample): per dimension,
// filter weights in double precision, normalised, then scaled to int16 with a common
// precision; a horizontal pass rounds to uint8, then a vertical pass rounds again.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "interp.h"

namespace gfn {

/// Int16 filter taps of one resized dimension, for the output positions [first, first + n):
/// entry k of `start`, `count` and `weight` is output position first + k.
struct AxisWeights {
  int64_t in_size = 0;
  int64_t out_size = 0;
  int64_t first = 0;   ///< the first output position stored
  int max_taps = 0;    ///< taps stored per output position (zero padded)
  int precision = 0;   ///< weights are scaled by 2^precision
  std::vector<int32_t> start;   ///< first source index per output position
  std::vector<int32_t> count;   ///< number of valid taps per output position
  std::vector<int16_t> weight;  ///< n * max_taps
};

/// The int16 precision PyTorch's uint8 antialiased resize gives taps whose largest weight is
/// `wt_max`: the first precision at which that weight, scaled by 2^(precision + 1), no longer
/// fits an int16. Non-increasing in `wt_max`.
inline int int16_weight_precision(double wt_max) {
  int precision = 0;
  for (precision = 0; precision < 22; ++precision) {
    const int next = static_cast<int>(0.5 + wt_max * (1 << (precision + 1)));
    if (next >= (1 << 15)) break;
  }
  return precision;
}

/// Computes the antialiased taps for resizing one dimension in_size -> out_size, stored for the
/// `n` output positions from `first` (n < 0: all). The int16 precision follows the largest
/// weight over every output position, as in the full resize, so the stored taps are those of the
/// full table; memory is O(n) however large out_size is (a long thin frame's resize).
///
/// Time is O(out_size) when downsampling (out_size <= in_size). When upsampling, out_size can be
/// hundreds of times in_size (a 1 x 10^6 frame resized to a shorter side of 256 has 2.6 x 10^8
/// output columns), so only the positions whose filter the image border cuts, and the stored
/// ones, are computed: every other position's normalised weights are those of a whole filter,
/// which sums to 1 over unit-spaced taps (triangle and Keys cubic alike) and peaks at 1, so its
/// largest weight is at most 1 (to rounding). Where that bound cannot change the precision the
/// computed positions give, they decide it; otherwise every position is computed.
inline AxisWeights compute_axis_weights(int64_t in_size, int64_t out_size, Interp mode,
                                        int64_t first = 0, int64_t n = -1) {
  if (in_size <= 0 || out_size <= 0) throw std::invalid_argument("resize sizes must be positive");
  if (n < 0) n = out_size - first;
  if (first < 0 || n < 0 || first + n > out_size) {
    throw std::invalid_argument("resize window outside the output");
  }
  AxisWeights aw;
  aw.in_size = in_size;
  aw.out_size = out_size;
  aw.first = first;
  const double interp_size = mode == Interp::kBilinear ? 2.0 : 4.0;
  const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
  const double support = scale >= 1.0 ? (interp_size * 0.5) * scale : interp_size * 0.5;
  const int max_taps = static_cast<int>(std::ceil(support)) * 2 + 1;
  const double invscale = scale >= 1.0 ? 1.0 / scale : 1.0;
  aw.max_taps = max_taps;
  aw.start.resize(n);
  aw.count.resize(n);
  std::vector<double> w(static_cast<size_t>(n) * max_taps, 0.0);
  std::vector<double> wi(max_taps);
  double wt_max = 0.0;
  // Output position i's normalised taps into wi; stores them when i is in the window.
  auto position = [&](int64_t i) {
    const double center = scale * (static_cast<double>(i) + 0.5);
    const int64_t xmin = std::max(static_cast<int64_t>(center - support + 0.5), int64_t{0});
    int64_t xsize = std::min(static_cast<int64_t>(center + support + 0.5), in_size) - xmin;
    xsize = std::clamp(xsize, int64_t{0}, static_cast<int64_t>(max_taps));
    double total = 0.0;
    for (int64_t j = 0; j < xsize; ++j) {
      const double x = (static_cast<double>(j + xmin) - center + 0.5) * invscale;
      const double v = mode == Interp::kBilinear ? aa_filter_bilinear(x) : aa_filter_bicubic(x);
      wi[j] = v;
      total += v;
    }
    if (total != 0.0) {
      for (int64_t j = 0; j < xsize; ++j) {
        wi[j] /= total;
        wt_max = std::max(wt_max, wi[j]);
      }
    }
    if (i < first || i >= first + n) return;
    const int64_t k = i - first;
    std::copy(wi.begin(), wi.begin() + xsize, w.begin() + k * max_taps);
    aw.start[k] = static_cast<int32_t>(xmin);
    aw.count[k] = static_cast<int32_t>(xsize);
  };
  auto positions = [&](int64_t lo, int64_t hi) {
    for (int64_t i = std::max<int64_t>(lo, 0); i < std::min(hi, out_size); ++i) position(i);
  };
  bool all = true;
  if (scale < 1.0) {
    // Positions whose window starts below source pixel 1 or ends past pixel in_size - 1 (a pixel
    // and two positions of margin beyond where the border cuts the filter).
    const double left_end = std::ceil((support + 0.5) / scale) + 2.0;
    const double right_start = std::floor((static_cast<double>(in_size) - support - 1.5) / scale) - 2.0;
    const int64_t lo_end = left_end >= static_cast<double>(out_size) ? out_size : static_cast<int64_t>(left_end);
    const int64_t hi_start = right_start <= 0.0 ? 0 : std::min(static_cast<int64_t>(right_start), out_size);
    if (lo_end < hi_start) {
      positions(0, lo_end);
      positions(hi_start, out_size);
      positions(std::max(first, lo_end), std::min(first + n, hi_start));
      const double whole_filter_bound = 1.001;  // 1 / (sum of the taps), rounding included
      all = int16_weight_precision(wt_max) != int16_weight_precision(std::max(wt_max, whole_filter_bound));
    }
  }
  if (all) {
    wt_max = 0.0;
    positions(0, out_size);
  }
  const int precision = int16_weight_precision(wt_max);
  aw.precision = precision;
  aw.weight.resize(w.size());
  for (size_t k = 0; k < w.size(); ++k) {
    const double v = w[k] * (1 << precision);
    aw.weight[k] = static_cast<int16_t>(v < 0 ? static_cast<int>(-0.5 + v) : static_cast<int>(0.5 + v));
  }
  return aw;
}

/// Geometry of "resize shorter side to `resize_short`, then centre crop `crop` x `crop`".
struct ResizeCropGeometry {
  int64_t in_h = 0, in_w = 0;    ///< frame size
  int64_t out_h = 0, out_w = 0;  ///< resized size
  int64_t top = 0, left = 0;     ///< crop offset inside the resized image
  int64_t crop = 0;
};

/// Python's round() for x / 2 (half to even), as torchvision's centre crop uses.
inline int64_t half_round_even(int64_t d) {
  if (d % 2 == 0) return d / 2;
  const int64_t k = (d - 1) / 2;  // d = 2k + 1 > 0
  return (k % 2 == 0) ? k : k + 1;
}

/// Largest resize_short * (longer frame side): up to 2^53 the product is an exact double, so the
/// resized longer side below is exactly Python's int(size * long / short) (ops.image.resized_hw).
constexpr int64_t kMaxResizeProduct = int64_t{1} << 53;

/// Largest enlargement of a frame side by the resize (resize_short / shorter frame side). When
/// upsampling, compute_axis_weights visits the positions whose filter the frame border cuts,
/// about 4 x the enlargement per axis: bounding the enlargement bounds the plan's time (a few
/// milliseconds at this limit) however large the resized frame.
constexpr int64_t kMaxResizeEnlargement = 65536;

/// torchvision Resize(int) output size then CenterCrop anchor. Refuses (std::invalid_argument)
/// a resize past kMaxResizeProduct or kMaxResizeEnlargement.
inline ResizeCropGeometry plan_geometry(int64_t h, int64_t w, int64_t resize_short, int64_t crop) {
  if (h <= 0 || w <= 0) throw std::invalid_argument("frame height and width must be positive");
  if (resize_short <= 0 || crop <= 0) throw std::invalid_argument("sizes must be positive");
  if (resize_short < crop) {
    throw std::invalid_argument("resize size " + std::to_string(resize_short) +
                                " is smaller than the crop size " + std::to_string(crop));
  }
  ResizeCropGeometry g;
  g.in_h = h;
  g.in_w = w;
  g.crop = crop;
  const int64_t shortest = std::min(h, w), longest = std::max(h, w);
  const std::string frame = std::to_string(h) + " x " + std::to_string(w) + " frame";
  if (resize_short > kMaxResizeProduct / longest) {
    throw std::invalid_argument("resize size " + std::to_string(resize_short) + " is too large for a " + frame +
                                " (resize size x longer side must be at most 2^53)");
  }
  if (shortest <= kMaxResizeProduct / kMaxResizeEnlargement && resize_short > kMaxResizeEnlargement * shortest) {
    throw std::invalid_argument("resize size " + std::to_string(resize_short) + " enlarges the " + frame +
                                " more than " + std::to_string(kMaxResizeEnlargement) +
                                " times (planning a resize takes time in proportion to the enlargement;"
                                " a larger crop_pct enlarges less)");
  }
  // Python: int(size * long / short) with a true (double) division.
  const int64_t new_long = static_cast<int64_t>(static_cast<double>(resize_short * longest) /
                                                static_cast<double>(shortest));
  if (w <= h) {
    g.out_w = resize_short;
    g.out_h = new_long;
  } else {
    g.out_h = resize_short;
    g.out_w = new_long;
  }
  g.top = half_round_even(g.out_h - crop);
  g.left = half_round_even(g.out_w - crop);
  return g;
}

/// The sizes-only part of a resize + centre crop, shared by the CPU plan and the CUDA tables:
/// the geometry, both axes' taps for the crop's positions (entry j is crop column / row j),
/// and the source rows the crop reads, [row_lo, row_hi).
struct ResizeCropTaps {
  ResizeCropGeometry geo;
  AxisWeights horiz;  ///< width in_w -> out_w, crop columns [left, left + crop)
  AxisWeights vert;   ///< height in_h -> out_h, crop rows [top, top + crop)
  int64_t row_lo = 0, row_hi = 0;
};

inline ResizeCropTaps plan_resize_crop(int64_t h, int64_t w, int64_t resize_short, int64_t crop,
                                       Interp interp) {
  ResizeCropTaps t;
  t.geo = plan_geometry(h, w, resize_short, crop);
  t.horiz = compute_axis_weights(w, t.geo.out_w, interp, t.geo.left, crop);
  t.vert = compute_axis_weights(h, t.geo.out_h, interp, t.geo.top, crop);
  int64_t lo = h, hi = 0;
  for (int64_t i = 0; i < crop; ++i) {
    lo = std::min<int64_t>(lo, t.vert.start[i]);
    hi = std::max<int64_t>(hi, t.vert.start[i] + t.vert.count[i]);
  }
  t.row_lo = std::min(lo, hi);
  t.row_hi = hi;
  return t;
}

}  // namespace gfn
