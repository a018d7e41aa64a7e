// NEON (Advanced SIMD) kernels for aarch64, the CPU of every Jetson.
//
// Advanced SIMD is part of the base aarch64 architecture, so these are compiled whenever the
// target is aarch64 and need no run-time CPU check. Each kernel does the portable loop's
// arithmetic in the same order (integer sums in the resize passes; separate multiplies and
// adds, never fused, in the float ones; the module is built with -ffp-contract=off), so its
// results are bit-identical to the portable path's; the aarch64 check compares the two
// (tools/aarch64_parity.py, tests/test_simd_paths.py).
#include <cstring>

#include "../common/half.h"
#include "../common/interp.h"
#include "gemm.h"
#include "simd.h"

#if defined(__aarch64__) && defined(__ARM_NEON)
#define GFN_HAVE_NEON_KERNELS 1
#include <arm_neon.h>
#else
#define GFN_HAVE_NEON_KERNELS 0
#endif

namespace gfn::cpu {

#if GFN_HAVE_NEON_KERNELS
namespace {

// ---------------------------------------------------------------- resize passes ----

// Horizontal pass, with the weight layout of ResizePlan::col_wq (built for AVX2): a group of
// 4 taps is 16 int16, [w0 w1 w0 w1 w0 w1 0 0 | w2 w3 w2 w3 w2 w3 0 0]. One 16-byte load holds
// the group's 4 RGB pixels; a table lookup widens them to the matching int16 layout
// [R0 R1 G0 G1 B0 B1 0 0 | R2 R3 G2 G3 B2 B3 0 0], and widening multiply-adds accumulate the
// products in two int32x4 ([R0w0 R1w1 G0w0 G1w1] and [B0w0 B1w1 0 0] and the same for pixels
// 2, 3). A pairwise add then gives [R G B 0]. Integer sums: any order gives the same result.
struct HpassTables {
  uint8x16_t lo, hi;
};

inline HpassTables hpass_tables() {
  // byte i of the result = px[idx[i]]; 0xFF (out of range) gives 0, the high byte of an int16
  static const uint8_t lo[16] = {0, 0xFF, 3, 0xFF, 1, 0xFF, 4, 0xFF, 2, 0xFF, 5, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF};
  static const uint8_t hi[16] = {6, 0xFF, 9, 0xFF, 7, 0xFF, 10, 0xFF, 8, 0xFF, 11, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF};
  return {vld1q_u8(lo), vld1q_u8(hi)};
}

inline void hpass_group(const uint8_t* px, const int16_t* w, const HpassTables& t, int32x4_t& a0,
                        int32x4_t& a1) {
  const uint8x16_t raw = vld1q_u8(px);
  const int16x8_t p01 = vreinterpretq_s16_u8(vqtbl1q_u8(raw, t.lo));
  const int16x8_t p23 = vreinterpretq_s16_u8(vqtbl1q_u8(raw, t.hi));
  const int16x8_t w01 = vld1q_s16(w);
  const int16x8_t w23 = vld1q_s16(w + 8);
  a0 = vmlal_s16(a0, vget_low_s16(p01), vget_low_s16(w01));
  a1 = vmlal_high_s16(a1, p01, w01);
  a0 = vmlal_s16(a0, vget_low_s16(p23), vget_low_s16(w23));
  a1 = vmlal_high_s16(a1, p23, w23);
}

/// Rounds, shifts (arithmetic: floor) and saturates [R G B 0] to uint8, as fixed_to_u8.
inline uint32_t hpass_finish(int32x4_t a0, int32x4_t a1, int32x4_t half, int32x4_t shift) {
  const int32x4_t s = vshlq_s32(vaddq_s32(vpaddq_s32(a0, a1), half), shift);
  const uint8x8_t b = vqmovn_u16(vcombine_u16(vqmovun_s32(s), vdup_n_u16(0)));
  return vget_lane_u32(vreinterpret_u32_u8(b), 0);
}

template <int G>
inline uint32_t hpass_column(const uint8_t* row, const int32_t* starts, const int16_t* wq, int groups,
                             int64_t j, const HpassTables& t, int32x4_t half, int32x4_t shift) {
  const uint8_t* p = row + 3 * static_cast<int64_t>(starts[j]);
  const int ng = G > 0 ? G : groups;
  const int16_t* w = wq + j * ng * 16;
  int32x4_t a0 = vdupq_n_s32(0), a1 = a0;
#pragma GCC unroll 8
  for (int g = 0; g < ng; ++g) hpass_group(p + 12 * g, w + 16 * g, t, a0, a1);
  return hpass_finish(a0, a1, half, shift);
}

/// G > 0: that many groups (the loop fully unrolled); G == 0: `groups`.
template <int G>
void hpass_cols(const uint8_t* row, const int32_t* starts, const int16_t* wq, int groups, int64_t ncols,
                int precision, uint8_t* out) {
  const HpassTables t = hpass_tables();
  const int32x4_t half = vdupq_n_s32(precision > 0 ? 1 << (precision - 1) : 0);
  const int32x4_t shift = vdupq_n_s32(-precision);
  for (int64_t j = 0; j < ncols; ++j) {
    const uint32_t rgb0 = hpass_column<G>(row, starts, wq, groups, j, t, half, shift);
    std::memcpy(out + 3 * j, &rgb0, 4);  // the 4th byte is overwritten next, or is row padding
  }
}

void hpass_row_neon(const uint8_t* row, const int32_t* starts, const int16_t* wq, int groups, int64_t ncols,
                    int precision, uint8_t* out) {
  switch (groups) {
    case 1: return hpass_cols<1>(row, starts, wq, groups, ncols, precision, out);
    case 2: return hpass_cols<2>(row, starts, wq, groups, ncols, precision, out);
    case 3: return hpass_cols<3>(row, starts, wq, groups, ncols, precision, out);
    case 4: return hpass_cols<4>(row, starts, wq, groups, ncols, precision, out);
    default: return hpass_cols<0>(row, starts, wq, groups, ncols, precision, out);
  }
}

// Vertical pass: 16 bytes per iteration, widened to int16 and multiplied-accumulated into four
// int32x4 with the tap's weight.
void vpass_row_neon(const uint8_t* const* rows, const int16_t* w, int count, int precision, int64_t n,
                    int32_t* acc, uint8_t* out) {
  (void)acc;
  const int32_t half = precision > 0 ? 1 << (precision - 1) : 0;
  const int32x4_t shift = vdupq_n_s32(-precision);
  int64_t v = 0;
  for (; v + 16 <= n; v += 16) {
    int32x4_t a0 = vdupq_n_s32(half), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < count; ++k) {
      const uint8x16_t r = vld1q_u8(rows[k] + v);
      const int16x8_t lo = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(r)));
      const int16x8_t hi = vreinterpretq_s16_u16(vmovl_high_u8(r));
      const int16_t wk = w[k];
      a0 = vmlal_n_s16(a0, vget_low_s16(lo), wk);
      a1 = vmlal_high_n_s16(a1, lo, wk);
      a2 = vmlal_n_s16(a2, vget_low_s16(hi), wk);
      a3 = vmlal_high_n_s16(a3, hi, wk);
    }
    const uint16x8_t s01 = vcombine_u16(vqmovun_s32(vshlq_s32(a0, shift)), vqmovun_s32(vshlq_s32(a1, shift)));
    const uint16x8_t s23 = vcombine_u16(vqmovun_s32(vshlq_s32(a2, shift)), vqmovun_s32(vshlq_s32(a3, shift)));
    vst1q_u8(out + v, vcombine_u8(vqmovn_u16(s01), vqmovn_u16(s23)));
  }
  for (; v < n; ++v) {
    int32_t a = half;
    for (int k = 0; k < count; ++k) a += w[k] * static_cast<int32_t>(rows[k][v]);
    out[v] = static_cast<uint8_t>(fixed_to_u8(a, precision));
  }
}

// ------------------------------------------------------------------- glance pass ----

// Four outputs per iteration: out[x] = (t0 + t1) + (t2 + t3), as two rounds of pairwise adds
// of the four products of each output.
int64_t glance_hpass4_neon(const float* vpad, const int32_t* start, const float* w, int64_t n, float* out) {
  int64_t x = 0;
  for (; x + 4 <= n; x += 4) {
    float32x4_t m[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) m[q] = vmulq_f32(vld1q_f32(vpad + start[x + q]), vld1q_f32(w + 4 * (x + q)));
    // [t0+t1, t2+t3] of outputs x, x+1, then x+2, x+3; then their sums in order
    vst1q_f32(out + x, vpaddq_f32(vpaddq_f32(m[0], m[1]), vpaddq_f32(m[2], m[3])));
  }
  return x;
}

inline float32x4_t u8_to_f32(uint16x4_t v) { return vcvtq_f32_u32(vmovl_u16(v)); }

int64_t glance_vpass_u8_neon(const uint8_t* const* rows, const float* w, int ntaps, int64_t n, float* v) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const uint16x8_t r0 = vmovl_u8(vld1_u8(rows[0] + c));
    const float32x4_t w0 = vdupq_n_f32(w[0]);
    float32x4_t lo = vmulq_f32(u8_to_f32(vget_low_u16(r0)), w0);
    float32x4_t hi = vmulq_f32(u8_to_f32(vget_high_u16(r0)), w0);
    for (int a = 1; a < ntaps; ++a) {
      const uint16x8_t ra = vmovl_u8(vld1_u8(rows[a] + c));
      const float32x4_t wa = vdupq_n_f32(w[a]);
      lo = vaddq_f32(lo, vmulq_f32(u8_to_f32(vget_low_u16(ra)), wa));
      hi = vaddq_f32(hi, vmulq_f32(u8_to_f32(vget_high_u16(ra)), wa));
    }
    vst1q_f32(v + c, lo);
    vst1q_f32(v + c + 4, hi);
  }
  return c;
}

// ------------------------------------------------------------------------- gemm ----

// The portable kernel keeps 8 partial sums per (row, batch item) over columns c = 8m + l,
// adds them as ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)), then the tail columns one by
// one. Here the 8 partial sums are two float32x4 and the reduction is two pairwise adds, so
// every sum is the same; what differs is that a tile of R rows x NB batch items reads each
// weight vector once for all NB items, and float16 weights are widened by the hardware.
template <bool F16>
inline float32x4_t load4(const void* p, int64_t off) {
  if constexpr (F16) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(static_cast<const uint16_t*>(p) + off)));
  } else {
    return vld1q_f32(static_cast<const float*>(p) + off);
  }
}

template <int R, int NB, bool F16>
inline void tile(const void* w, int64_t ld, int64_t col0, int64_t k, int64_t r, const float* const* x,
                 float* out, int64_t ldo, bool accumulate) {
  float32x4_t lo[R][NB], hi[R][NB];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) lo[i][b] = hi[i][b] = vdupq_n_f32(0.0f);
  }
  const int64_t base = r * ld + col0;
  int64_t c = 0;
  for (; c + 8 <= k; c += 8) {
    float32x4_t xl[NB], xh[NB];
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) {
      xl[b] = vld1q_f32(x[b] + c);
      xh[b] = vld1q_f32(x[b] + c + 4);
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const float32x4_t wl = load4<F16>(w, base + i * ld + c);
      const float32x4_t wh = load4<F16>(w, base + i * ld + c + 4);
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) {
        lo[i][b] = vaddq_f32(lo[i][b], vmulq_f32(wl, xl[b]));
        hi[i][b] = vaddq_f32(hi[i][b], vmulq_f32(wh, xh[b]));
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int b = 0; b < NB; ++b) {
      const float32x4_t p = vpaddq_f32(lo[i][b], hi[i][b]);  // a0+a1, a2+a3, a4+a5, a6+a7
      const float32x4_t q = vpaddq_f32(p, p);
      float s = vgetq_lane_f32(q, 0) + vgetq_lane_f32(q, 1);
      for (int64_t cc = c; cc < k; ++cc) s += load_weight<F16>(w, base + i * ld + cc) * x[b][cc];
      float* o = out + b * ldo + r + i;
      *o = accumulate ? *o + s : s;
    }
  }
}

template <int R, int NB, bool F16>
inline void rows_tiled(const void* w, int64_t ld, int64_t col0, int64_t k, int64_t& r, int64_t r1,
                       const float* const* x, int64_t nb, float* out, int64_t ldo, bool accumulate) {
  for (; r + R <= r1; r += R) {
    int64_t b = 0;
    for (; b + NB <= nb; b += NB) tile<R, NB, F16>(w, ld, col0, k, r, x + b, out + b * ldo, ldo, accumulate);
    for (; b < nb; ++b) tile<R, 1, F16>(w, ld, col0, k, r, x + b, out + b * ldo, ldo, accumulate);
  }
}

// Tiles sized so that everything stays in the 32 vector registers (no fused multiply-add, so
// each product needs a register of its own too): two accumulators per (row, item), two per
// item for the batch vectors. A weight vector is read once for every item of its tile, the
// batch vectors once per row (from L1).
template <bool F16>
void gemm_impl(const void* w, int64_t ld, int64_t col0, int64_t k, int64_t r0, int64_t r1,
               const float* const* x, int64_t nb, float* out, int64_t ldo, bool accumulate) {
  int64_t r = r0;
  if (nb == 1) {
    rows_tiled<4, 1, F16>(w, ld, col0, k, r, r1, x, nb, out, ldo, accumulate);
  } else if (nb == 2) {
    rows_tiled<2, 2, F16>(w, ld, col0, k, r, r1, x, nb, out, ldo, accumulate);
  } else if (nb == 3) {
    rows_tiled<1, 3, F16>(w, ld, col0, k, r, r1, x, nb, out, ldo, accumulate);
  }
  rows_tiled<1, 4, F16>(w, ld, col0, k, r, r1, x, nb, out, ldo, accumulate);
}

void gemm_rows_neon(const WeightView& w, int64_t col0, int64_t k, int64_t r0, int64_t r1, const float* const* x,
                    int64_t nb, float* out, int64_t ldo, bool accumulate) {
  if (w.type == WType::kF16) {
    gemm_impl<true>(w.data, w.ld, col0, k, r0, r1, x, nb, out, ldo, accumulate);
  } else {
    gemm_impl<false>(w.data, w.ld, col0, k, r0, r1, x, nb, out, ldo, accumulate);
  }
}

float sum_neon(const float* p, int64_t n) {
  float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 = vaddq_f32(a0, vld1q_f32(p + i));
    a1 = vaddq_f32(a1, vld1q_f32(p + i + 4));
    a2 = vaddq_f32(a2, vld1q_f32(p + i + 8));
    a3 = vaddq_f32(a3, vld1q_f32(p + i + 12));
  }
  float s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
  for (; i < n; ++i) s += p[i];
  return s;
}

const SimdKernels kNeon{"neon",          hpass_row_neon, vpass_row_neon, glance_hpass4_neon,
                        glance_vpass_u8_neon, gemm_rows_neon, sum_neon};

}  // namespace

const SimdKernels* neon_kernels() { return &kNeon; }

#else

const SimdKernels* neon_kernels() { return nullptr; }

#endif

}  // namespace gfn::cpu
