#include "preprocess.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <tuple>
#include <utility>

#include "simd.h"
#include "threadpool.h"

namespace gfn::cpu {
namespace {

using PlanKey = std::tuple<int64_t, int64_t, int64_t, int64_t, int>;

std::shared_ptr<ResizePlan> build_plan(int64_t h, int64_t w, int64_t resize_short, int64_t crop,
                                       Interp interp) {
  auto plan = std::make_shared<ResizePlan>();
  ResizeCropTaps taps = plan_resize_crop(h, w, resize_short, crop, interp);
  plan->geo = taps.geo;
  plan->horiz = std::move(taps.horiz);
  plan->vert = std::move(taps.vert);
  plan->row_lo = taps.row_lo;
  plan->row_hi = taps.row_hi;
  const auto& hz = plan->horiz;
  const int groups = (hz.max_taps + 3) / 4;
  plan->groups = groups;
  plan->col_start.resize(crop);
  plan->col_wq.assign(static_cast<size_t>(crop) * groups * 16, 0);
  int64_t max_start = 0;
  for (int64_t j = 0; j < crop; ++j) {
    const int64_t src = j;  // crop column j (the taps start at g.left)
    const int32_t start = hz.start[src];
    plan->col_start[j] = start;
    max_start = std::max<int64_t>(max_start, start);
    const int16_t* wt = &hz.weight[static_cast<size_t>(src) * hz.max_taps];
    int16_t* dst = &plan->col_wq[static_cast<size_t>(j) * groups * 16];
    for (int k = 0; k < hz.count[src]; ++k) {
      // Group k/4, 128-bit lane (k%4)/2, element k%2 of each (R, G, B) pair.
      const int base = (k / 4) * 16 + ((k % 4) / 2) * 8 + (k % 2);
      dst[base + 0] = wt[k];
      dst[base + 2] = wt[k];
      dst[base + 4] = wt[k];
    }
  }
  // The AVX2 and NEON passes load 16 bytes at 3 * (start + 4 * group) for every group.
  plan->max_read = 3 * (max_start + 4 * (groups - 1)) + 16;
  return plan;
}

// Portable horizontal pass (same arithmetic as the AVX2 and NEON ones).
void hpass_row_generic(const uint8_t* row, const AxisWeights& hz, const ResizeCropGeometry& g,
                       uint8_t* out) {
  const int32_t half = hz.precision > 0 ? 1 << (hz.precision - 1) : 0;
  for (int64_t j = 0; j < g.crop; ++j) {
    const int64_t src = j;  // crop column j (the taps start at g.left)
    const int16_t* wt = &hz.weight[static_cast<size_t>(src) * hz.max_taps];
    const uint8_t* px = row + 3 * static_cast<int64_t>(hz.start[src]);
    int32_t a0 = half, a1 = half, a2 = half;
    for (int k = 0; k < hz.count[src]; ++k) {
      a0 += wt[k] * px[3 * k + 0];
      a1 += wt[k] * px[3 * k + 1];
      a2 += wt[k] * px[3 * k + 2];
    }
    out[3 * j + 0] = static_cast<uint8_t>(fixed_to_u8(a0, hz.precision));
    out[3 * j + 1] = static_cast<uint8_t>(fixed_to_u8(a1, hz.precision));
    out[3 * j + 2] = static_cast<uint8_t>(fixed_to_u8(a2, hz.precision));
  }
}

void vpass_row_generic(const uint8_t* const* rows, const int16_t* w, int count, int precision,
                       int64_t n, int32_t* acc, uint8_t* out) {
  const int32_t half = precision > 0 ? 1 << (precision - 1) : 0;
  for (int64_t v = 0; v < n; ++v) acc[v] = half;
  for (int k = 0; k < count; ++k) {
    const int32_t wk = w[k];
    const uint8_t* src = rows[k];
    for (int64_t v = 0; v < n; ++v) acc[v] += wk * static_cast<int32_t>(src[v]);
  }
  for (int64_t v = 0; v < n; ++v) out[v] = static_cast<uint8_t>(fixed_to_u8(acc[v], precision));
}

std::mutex plan_mu;
LruCache<PlanKey, ResizePlan> plan_cache(kResizePlanCacheSize);

}  // namespace

std::shared_ptr<const ResizePlan> get_resize_plan(int64_t h, int64_t w, int64_t resize_short,
                                                  int64_t crop, Interp interp) {
  const PlanKey key{h, w, resize_short, crop, static_cast<int>(interp)};
  {
    std::lock_guard<std::mutex> lk(plan_mu);
    if (auto plan = plan_cache.get(key)) return plan;
  }
  auto plan = build_plan(h, w, resize_short, crop, interp);
  std::lock_guard<std::mutex> lk(plan_mu);
  plan_cache.put(key, plan);
  return plan;
}

CacheInfo resize_plan_cache_info() {
  std::lock_guard<std::mutex> lk(plan_mu);
  return {plan_cache.hits(), plan_cache.misses(), plan_cache.capacity(), plan_cache.size()};
}

// One interleaved uint8 RGB (or BGR) row of S pixels -> the three planes' row (planes are
// ``plane`` floats apart), through the per-channel normalisation tables.
inline void normalise_row(const uint8_t* row, const float (&lut)[3][256], bool bgr, int64_t S,
                          float* out, int64_t plane) {
  for (int c = 0; c < 3; ++c) {
    const int cin = bgr ? 2 - c : c;
    const float* lc = lut[c];
    float* dst = out + c * plane;
    for (int64_t j = 0; j < S; ++j) dst[j] = lc[row[3 * j + cin]];
  }
}

// Per-channel table of the normalised value of each uint8 level (output channel order).
static void build_lut(const NormalizeParams& norm, float (&lut)[3][256]) {
  for (int c = 0; c < 3; ++c) {
    for (int v = 0; v < 256; ++v) {
      // Same float32 operations as torch: x / 255, then (x - mean) / std.
      const float x = static_cast<float>(v) / 255.0f;
      lut[c][v] = (x - norm.mean[c]) / norm.std[c];
    }
  }
}

void preprocess_frame(const uint8_t* frame, int64_t h, int64_t w, int64_t resize_short,
                      int64_t image_size, Interp interp, const NormalizeParams& norm, float* out,
                      float* glance_out, int64_t glance_size, Interp glance_interp, uint8_t* raw_out) {
  float lut[3][256];
  if (raw_out == nullptr) build_lut(norm, lut);
  const int64_t S = image_size;
  const int64_t plane = S * S;
  if (h == S && w == S && resize_short == S) {
    // Already S x S and no crop: torchvision's resize returns the image unchanged, so this is
    // the normalisation alone (one pass, no resampling).
    if (raw_out != nullptr) {
      std::memcpy(raw_out, frame, static_cast<size_t>(3 * plane));
      return;
    }
    parallel_for(S, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        normalise_row(frame + i * 3 * S, lut, norm.bgr, S, out + i * S, plane);
      }
    });
    if (glance_out != nullptr) glance(out, 1, 3, S, glance_out, glance_size, glance_interp);
    return;
  }
  const auto plan_ptr = get_resize_plan(h, w, resize_short, image_size, interp);
  const ResizePlan& plan = *plan_ptr;
  const auto& g = plan.geo;
  const int64_t row_bytes = 3 * w;
  const int64_t hstride = 3 * S + 16;  // one row of the horizontal result, padded
  const int64_t nrows = plan.row_hi - plan.row_lo;
  // Grow-only per-thread scratch: no allocation, page faults or zero-fill per frame (every
  // byte the vertical pass reads is written by the horizontal pass first).
  // (Workers see the caller's buffer through `hb`: a thread_local is per executing thread.)
  static thread_local std::vector<uint8_t> hbuf_cache;
  const size_t hbytes = static_cast<size_t>(std::max<int64_t>(nrows, 1) * hstride);
  if (hbuf_cache.size() < hbytes) hbuf_cache.resize(hbytes);
  uint8_t* const hb = hbuf_cache.data();
  const SimdKernels* const simd = simd_kernels();

  // Pass 1: horizontal filter of the source rows the crop needs (crop columns only).
  parallel_for(nrows, 16, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> padded;
    const int64_t seg_lo = 3 * static_cast<int64_t>(plan.col_start.empty() ? 0 : plan.col_start.front());
    const int64_t seg_hi = std::min<int64_t>(row_bytes, plan.max_read);
    for (int64_t r = b; r < e; ++r) {
      const int64_t y = plan.row_lo + r;
      const uint8_t* row = frame + y * row_bytes;
      if (r + 2 < e) {
        // Prefetch the crop's byte range of a row ahead (rows are 3 * w bytes apart).
        const uint8_t* ahead = row + 2 * row_bytes;
        for (int64_t off = seg_lo; off < seg_hi; off += 64) __builtin_prefetch(ahead + off, 0, 0);
      }
      uint8_t* dst = hb + r * hstride;
      if (simd == nullptr) {
        hpass_row_generic(row, plan.horiz, g, dst);
        continue;
      }
      if (y * row_bytes + plan.max_read > h * row_bytes) {
        // Near the end of the frame: copy the row so the 16-byte loads stay in bounds.
        padded.assign(static_cast<size_t>(std::max(row_bytes, plan.max_read)), 0);
        std::memcpy(padded.data(), row, static_cast<size_t>(row_bytes));
        row = padded.data();
      }
      simd->hpass_row(row, plan.col_start.data(), plan.col_wq.data(), plan.groups, S,
                      plan.horiz.precision, dst);
    }
  });

  // Pass 2: vertical filter, then scale + normalise into planar float output.
  const auto& vt = plan.vert;
  parallel_for(S, 8, [&](int64_t b, int64_t e) {
    std::vector<int32_t> acc(static_cast<size_t>(3 * S));
    std::vector<uint8_t> line(static_cast<size_t>(3 * S));
    std::vector<const uint8_t*> rows(static_cast<size_t>(vt.max_taps));
    for (int64_t i = b; i < e; ++i) {
      const int64_t src = i;  // crop row i (the taps start at g.top)
      const int count = vt.count[src];
      for (int k = 0; k < count; ++k) {
        rows[k] = hb + (vt.start[src] + k - plan.row_lo) * hstride;
      }
      const int16_t* wt = &vt.weight[static_cast<size_t>(src) * vt.max_taps];
      uint8_t* dst = raw_out != nullptr ? raw_out + i * 3 * S : line.data();
      if (simd != nullptr) {
        simd->vpass_row(rows.data(), wt, count, vt.precision, 3 * S, acc.data(), dst);
      } else {
        vpass_row_generic(rows.data(), wt, count, vt.precision, 3 * S, acc.data(), dst);
      }
      if (raw_out == nullptr) normalise_row(line.data(), lut, norm.bgr, S, out + i * S, plane);
    }
  });
  if (raw_out != nullptr) return;

  if (glance_out != nullptr) glance(out, 1, 3, S, glance_out, glance_size, glance_interp);
}

void preprocess_frames(const uint8_t* const* frames, const int64_t* heights, const int64_t* widths,
                       int64_t n, int64_t resize_short, int64_t image_size, Interp interp,
                       const NormalizeParams& norm, float* out, float* glance, int64_t glance_size,
                       Interp glance_interp, uint8_t* raw_out) {
  const int64_t out_stride = 3 * image_size * image_size;
  const int64_t glance_stride = 3 * glance_size * glance_size;
  auto one = [&](int64_t i) {
    preprocess_frame(frames[i], heights[i], widths[i], resize_short, image_size, interp, norm,
                     out ? out + i * out_stride : nullptr, glance ? glance + i * glance_stride : nullptr,
                     glance_size, glance_interp, raw_out ? raw_out + i * out_stride : nullptr);
  };
  const int64_t threads = get_num_threads();
  if (threads > 1 && n >= 2 * threads) {
    parallel_tasks(n, one);  // the frames' own parallel regions then run inline
  } else {
    for (int64_t i = 0; i < n; ++i) one(i);
  }
}

namespace {

/// The glance's per-output taps along one axis (both axes are the same: square images).
struct GlanceTaps {
  int ntaps = 0;
  std::vector<int> ix;        ///< P x 4 clamped source indices
  std::vector<float> wx;      ///< P x 4 weights
  std::vector<int32_t> start; ///< first tap in the border-padded row (bicubic)

  GlanceTaps(Interp mode, int64_t in_size, int64_t P)
      : ix(static_cast<size_t>(P) * 4), wx(static_cast<size_t>(P) * 4), start(static_cast<size_t>(P)) {
    for (int64_t i = 0; i < P; ++i) {
      ntaps = glance_taps(mode, static_cast<int>(i), static_cast<int>(in_size), static_cast<int>(P),
                          &ix[i * 4], &wx[i * 4]);
      start[i] = ix[i * 4 + 1];  // the unclamped centre tap: taps are clamp(start - 1 + j)
    }
  }
};

/// Horizontal glance pass of one vertically filtered row. `vpad` holds the row at
/// vpad[1 .. S] with room for one border value before and two after (filled here).
inline void glance_hrow(float* vpad, int64_t S, const GlanceTaps& t, int64_t P, const SimdKernels* simd,
                        float* o) {
  float* const v = vpad + 1;
  if (t.ntaps == 4) {
    vpad[0] = v[0];
    v[S] = v[S + 1] = v[S - 1];
    int64_t x = simd != nullptr ? simd->glance_hpass4(vpad, t.start.data(), t.wx.data(), P, o) : 0;
    for (; x < P; ++x) {
      const float* p = vpad + t.start[x];
      const float* w = &t.wx[x * 4];
      o[x] = (p[0] * w[0] + p[1] * w[1]) + (p[2] * w[2] + p[3] * w[3]);
    }
  } else {
    for (int64_t x = 0; x < P; ++x) {
      o[x] = v[t.ix[x * 4]] * t.wx[x * 4] + v[t.ix[x * 4 + 1]] * t.wx[x * 4 + 1];
    }
  }
}

/// Tasks for `units` independent images or planes of P output rows: bands of rows, enough to
/// keep every thread busy (one image has only 3 planes).
inline int64_t glance_bands(int64_t units, int64_t P) {
  return std::min<int64_t>(P, (4 * get_num_threads() + units - 1) / units);
}

}  // namespace

void glance(const float* in, int64_t n, int64_t channels, int64_t in_size, float* out,
            int64_t out_size, Interp mode) {
  const int64_t P = out_size;
  const GlanceTaps taps(mode, in_size, P);
  const SimdKernels* const simd = simd_kernels();
  // Separable: the vertical pass combines whole source rows into the P output rows
  // (contiguous, vectorised by the compiler), then each of those rows is filtered
  // horizontally (P outputs of ntaps taps; bicubic sums (t0 + t1) + (t2 + t3), 8 outputs per
  // AVX2 iteration or 4 per NEON one, the same expression in plain code). Tasks are bands of output rows of one
  // plane. Results differ from F.interpolate's and the GPU's summation order only by float
  // rounding.
  const int64_t S = in_size;
  const int64_t in_plane = S * S;
  const int64_t planes = n * channels;
  const int64_t bands = glance_bands(planes, P);
  parallel_tasks(planes * bands, [&](int64_t task) {
    const int64_t plane_index = task / bands, band = task % bands;
    const float* src = in + plane_index * in_plane;
    float* dst = out + plane_index * P * P;
    std::vector<float> vpad(static_cast<size_t>(S + 3));
    float* const v = vpad.data() + 1;
    for (int64_t y = band * P / bands; y < (band + 1) * P / bands; ++y) {
      const float* r0 = src + static_cast<int64_t>(taps.ix[y * 4]) * S;
      const float w0 = taps.wx[y * 4];
      for (int64_t c = 0; c < S; ++c) v[c] = r0[c] * w0;
      for (int a = 1; a < taps.ntaps; ++a) {
        const float* ra = src + static_cast<int64_t>(taps.ix[y * 4 + a]) * S;
        const float wa = taps.wx[y * 4 + a];
        for (int64_t c = 0; c < S; ++c) v[c] += ra[c] * wa;
      }
      glance_hrow(vpad.data(), S, taps, P, simd, dst + y * P);
    }
  });
}

void glance_u8(const uint8_t* frames, int64_t n, int64_t size, const NormalizeParams& norm,
               float* out, int64_t out_size, Interp mode) {
  const int64_t P = out_size, S = size, row = 3 * S;
  const GlanceTaps taps(mode, S, P);
  const SimdKernels* const simd = simd_kernels();
  // The glance of the raw levels, normalised at the end: resampling weights sum to one, so
  // this equals the glance of the normalised image up to float rounding (a few 1e-6 here), and reads the uint8
  // frame (a quarter of the bytes) instead of a normalised float copy. The vertical pass runs
  // on the interleaved row; its result is split into three border-padded planar rows for the
  // horizontal pass.
  float scale[3], shift[3];  // (v / 255 - mean) / std as one multiply and one add
  for (int c = 0; c < 3; ++c) {
    scale[c] = static_cast<float>(1.0 / (255.0 * norm.std[c]));
    shift[c] = static_cast<float>(-static_cast<double>(norm.mean[c]) / norm.std[c]);
  }
  const int64_t bands = glance_bands(n, P);
  parallel_tasks(n * bands, [&](int64_t task) {
    const int64_t img = task / bands, band = task % bands;
    const uint8_t* src = frames + img * S * row;
    std::vector<float> vrow(static_cast<size_t>(row));
    std::vector<float> vpad(static_cast<size_t>(S + 3));
    const uint8_t* rows[4];
    for (int64_t y = band * P / bands; y < (band + 1) * P / bands; ++y) {
      for (int a = 0; a < taps.ntaps; ++a) rows[a] = src + static_cast<int64_t>(taps.ix[y * 4 + a]) * row;
      const float* w = &taps.wx[y * 4];
      int64_t c = simd != nullptr ? simd->glance_vpass_u8(rows, w, taps.ntaps, row, vrow.data()) : 0;
      for (; c < row; ++c) {
        float acc = static_cast<float>(rows[0][c]) * w[0];
        for (int a = 1; a < taps.ntaps; ++a) acc += static_cast<float>(rows[a][c]) * w[a];
        vrow[c] = acc;
      }
      for (int ch = 0; ch < 3; ++ch) {
        const int cout = norm.bgr ? 2 - ch : ch;
        for (int64_t j = 0; j < S; ++j) vpad[1 + j] = vrow[3 * j + ch];
        float* o = out + ((img * 3 + cout) * P + y) * P;
        glance_hrow(vpad.data(), S, taps, P, simd, o);
        for (int64_t x = 0; x < P; ++x) o[x] = o[x] * scale[cout] + shift[cout];
      }
    }
  });
}

void crop_patches_u8(const uint8_t* frames, int64_t n, int64_t size, const int32_t* coords,
                     const NormalizeParams& norm, float* out, int64_t patch, const int64_t* index) {
  float lut[3][256];
  build_lut(norm, lut);
  const int64_t S = size, P = patch;
  parallel_for(n * P, 32, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t i = r / P, y = r % P;
      const int64_t k = index != nullptr ? index[i] : i;
      const uint8_t* src = frames + ((k * S + coords[2 * i] + y) * S + coords[2 * i + 1]) * 3;
      normalise_row(src, lut, norm.bgr, P, out + i * 3 * P * P + y * P, P * P);
    }
  });
}

void crop_patches(const float* images, int64_t n, int64_t channels, int64_t size,
                  const int32_t* coords, float* out, int64_t patch, const int64_t* index) {
  const int64_t rows = n * channels * patch;
  parallel_for(rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t i = r / (channels * patch);
      const int64_t c = (r / patch) % channels;
      const int64_t y = r % patch;
      const int64_t row0 = coords[2 * i], col0 = coords[2 * i + 1];
      const int64_t k = index != nullptr ? index[i] : i;
      const float* src = images + ((k * channels + c) * size + row0 + y) * size + col0;
      std::memcpy(out + r * patch, src, static_cast<size_t>(patch) * sizeof(float));
    }
  });
}

}  // namespace gfn::cpu
