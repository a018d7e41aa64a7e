// CPU pre-processing: uint8 HWC frame -> resize (antialiased) + centre crop + normalise,
// optionally followed by the glance resize, plus the glance and patch-crop kernels.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "../common/interp.h"
#include "../common/lru_cache.h"
#include "../common/resize_plan.h"

namespace gfn::cpu {

/// Everything about a resize + crop that depends only on the sizes (cached).
struct ResizePlan {
  ResizeCropGeometry geo;
  AxisWeights horiz;  ///< width in_w -> out_w, crop columns [left, left + crop)
  AxisWeights vert;   ///< height in_h -> out_h, crop rows [top, top + crop)
  int groups = 0;                  ///< 4-tap groups per output column (AVX2 layout)
  std::vector<int32_t> col_start;  ///< per crop column: first source column
  std::vector<int16_t> col_wq;     ///< per crop column: groups * 16 int16 (AVX2 layout)
  int64_t row_lo = 0, row_hi = 0;  ///< source rows the crop needs: [row_lo, row_hi)
  int64_t max_read = 0;            ///< bytes the AVX2 pass may read from a row start
};

/// Resize plans kept, one per (frame size, resize, crop, interpolation); the least recently
/// used is dropped when a new one does not fit.
constexpr std::size_t kResizePlanCacheSize = 16;

/// Lookups of the resize plan cache: hits, misses, capacity and entries held.
struct CacheInfo {
  std::size_t hits = 0, misses = 0, maxsize = 0, currsize = 0;
};
CacheInfo resize_plan_cache_info();

/// Returns the (cached) plan for a frame of h x w resized to `resize_short` and cropped.
std::shared_ptr<const ResizePlan> get_resize_plan(int64_t h, int64_t w, int64_t resize_short,
                                                  int64_t crop, Interp interp);

struct NormalizeParams {
  float mean[3];
  float std[3];
  bool bgr;  ///< input channel order is B, G, R
};

/// Pre-processes one frame into `out` (3 x S x S float32) and, when `glance` is not
/// null, also writes the glance (3 x P x P, align_corners=True resize of `out`). With
/// `raw_out` (S x S x 3 uint8) it writes the resized and cropped levels there instead, in the
/// frame's channel order, and neither normalises nor computes the glance (`out`, `norm` and
/// `glance` unused): the same bytes the normalisation would read.
void preprocess_frame(const uint8_t* frame, int64_t h, int64_t w, int64_t resize_short,
                      int64_t image_size, Interp interp, const NormalizeParams& norm, float* out,
                      float* glance, int64_t glance_size, Interp glance_interp,
                      uint8_t* raw_out = nullptr);

/// preprocess_frame for n frames into consecutive (3, S, S) / (3, P, P) slots of `out` and
/// `glance` (null: none). Batches of at least twice the thread count run one frame per task
/// (each frame single-threaded, no per-frame dispatches); smaller ones parallelise inside
/// each frame. Results do not depend on the split.
void preprocess_frames(const uint8_t* const* frames, const int64_t* heights, const int64_t* widths,
                       int64_t n, int64_t resize_short, int64_t image_size, Interp interp,
                       const NormalizeParams& norm, float* out, float* glance, int64_t glance_size,
                       Interp glance_interp, uint8_t* raw_out = nullptr);

/// Glance: (n, c, S, S) -> (n, c, P, P), align_corners=True bilinear or bicubic.
void glance(const float* in, int64_t n, int64_t channels, int64_t in_size, float* out,
            int64_t out_size, Interp mode);

/// Glance of uint8 frames (n, S, S, 3), normalised: (n, 3, P, P) float32 equal to the glance
/// of the normalised images up to float rounding (resampled levels, then (v / 255 - mean) /
/// std). Output channels are R, G, B (`norm.bgr`: the frames are B, G, R).
void glance_u8(const uint8_t* frames, int64_t n, int64_t size, const NormalizeParams& norm,
               float* out, int64_t out_size, Interp mode);

/// Patch crop of uint8 frames (., S, S, 3) with the normalisation fused: bit-identical to
/// cropping the normalised images of preprocess_frame. Coordinates and `index` as for
/// crop_patches.
void crop_patches_u8(const uint8_t* frames, int64_t n, int64_t size, const int32_t* coords,
                     const NormalizeParams& norm, float* out, int64_t patch,
                     const int64_t* index = nullptr);

/// Patch crop of n patches: out[i] = images[k, :, r:r+P, c:c+P] with (r, c) = coords[i] and
/// k = index[i] (k = i when `index` is null: the loop picks the images still running without
/// copying them). Coordinates and indices must already be validated (0 <= r, c <= S - P).
void crop_patches(const float* images, int64_t n, int64_t channels, int64_t size,
                  const int32_t* coords, float* out, int64_t patch, const int64_t* index = nullptr);

}  // namespace gfn::cpu
