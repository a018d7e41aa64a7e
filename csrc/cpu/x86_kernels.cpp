// AVX2 / FMA / F16C kernels, compiled with per-function target attributes so the rest of
// the module stays portable; simd.cpp only calls them when the CPU supports them.
#include <cstdlib>
#include <cstring>

#include "../common/half.h"
#include "../common/interp.h"
#include "gemm.h"
#include "simd.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define GFN_HAVE_X86_KERNELS 1
#include <immintrin.h>
#define GFN_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define GFN_HAVE_X86_KERNELS 0
#endif

namespace gfn::cpu {

bool x86_kernels_compiled() { return GFN_HAVE_X86_KERNELS != 0; }

bool x86_cpu_has_avx2() {
#if GFN_HAVE_X86_KERNELS
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

#if GFN_HAVE_X86_KERNELS

// ---------------------------------------------------------------- resize passes ----

// Each output column j filters `groups` x 4 source pixels starting at starts[j]. A group
// is one 16-byte load (4 RGB pixels + 4 spare bytes) broadcast to both 128-bit lanes;
// the shuffle makes (R0,R1),(G0,G1),(B0,B1) int16 pairs in lane 0 and pixels 2,3 in lane
// 1, and one madd with (w0,w1)x3 | (w2,w3)x3 accumulates exact int32 sums per channel.
// Two columns are filtered per iteration (independent chains), with the group count a
// template parameter so the group loop is fully unrolled.
GFN_AVX2 inline __m256i hpass_group(const uint8_t* px, const int16_t* w, __m256i shuf) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(px));
  const __m256i pix = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(raw), shuf);
  return _mm256_madd_epi16(pix, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}

// Rounds, shifts and saturates [R G B x | R G B x] sums; stores 4 bytes per column.
GFN_AVX2 inline void hpass_store2(__m256i acc0, __m256i acc1, __m256i half, int precision,
                                  uint8_t* out) {
  const __m256i lo = _mm256_permute2x128_si256(acc0, acc1, 0x20);
  const __m256i hi = _mm256_permute2x128_si256(acc0, acc1, 0x31);
  __m256i s = _mm256_srai_epi32(_mm256_add_epi32(_mm256_add_epi32(lo, hi), half), precision);
  s = _mm256_packus_epi16(_mm256_packs_epi32(s, s), s);
  const int32_t v0 = _mm256_extract_epi32(s, 0);
  const int32_t v1 = _mm256_extract_epi32(s, 4);
  std::memcpy(out, &v0, 4);      // writes one spare byte, overwritten next
  std::memcpy(out + 3, &v1, 4);
}

// Rounds, shifts and saturates four columns' sums and stores their 12 bytes with one
// 16-byte store (the 4 spare bytes are overwritten by the next store or land in the
// row's padding).
GFN_AVX2 inline void hpass_store4(__m256i a0, __m256i a1, __m256i a2, __m256i a3, __m256i half,
                                  int precision, uint8_t* out) {
  const __m256i s01 = _mm256_add_epi32(_mm256_permute2x128_si256(a0, a1, 0x20),
                                       _mm256_permute2x128_si256(a0, a1, 0x31));
  const __m256i s23 = _mm256_add_epi32(_mm256_permute2x128_si256(a2, a3, 0x20),
                                       _mm256_permute2x128_si256(a2, a3, 0x31));
  const __m256i r01 = _mm256_srai_epi32(_mm256_add_epi32(s01, half), precision);
  const __m256i r23 = _mm256_srai_epi32(_mm256_add_epi32(s23, half), precision);
  // int16 per lane: [c0 c2 | c1 c3]; as bytes, dwords [c0 c2 0 0 | c1 c3 0 0].
  const __m256i p8 = _mm256_packus_epi16(_mm256_packs_epi32(r01, r23), _mm256_setzero_si256());
  const __m256i ordered = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
  const __m128i rgb = _mm_shuffle_epi8(_mm256_castsi256_si128(ordered),
                                       _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), rgb);
}

template <int G>
GFN_AVX2 inline __m256i hpass_column(const uint8_t* row, const int32_t* starts, const int16_t* wq,
                                     int64_t j, __m256i shuf) {
  const uint8_t* p = row + 3 * static_cast<int64_t>(starts[j]);
  const int16_t* w = wq + j * G * 16;
  __m256i a = hpass_group(p, w, shuf);
#pragma GCC unroll 16
  for (int g = 1; g < G; ++g) a = _mm256_add_epi32(a, hpass_group(p + 12 * g, w + 16 * g, shuf));
  return a;
}

template <int G>
GFN_AVX2 void hpass_fixed(const uint8_t* row, const int32_t* starts, const int16_t* wq,
                          int64_t ncols, int precision, uint8_t* out, __m256i shuf) {
  const __m256i half = _mm256_set1_epi32(precision > 0 ? 1 << (precision - 1) : 0);
  int64_t j = 0;
  // Four columns per iteration (independent chains) while the 16-byte store stays inside
  // the row; the output row is padded by 16 bytes (see preprocess.cpp).
  for (; j + 4 <= ncols; j += 4) {
    hpass_store4(hpass_column<G>(row, starts, wq, j, shuf), hpass_column<G>(row, starts, wq, j + 1, shuf),
                 hpass_column<G>(row, starts, wq, j + 2, shuf), hpass_column<G>(row, starts, wq, j + 3, shuf),
                 half, precision, out + 3 * j);
  }
  for (; j < ncols; ++j) {
    const __m256i a = hpass_column<G>(row, starts, wq, j, shuf);
    uint8_t tmp[8];
    hpass_store2(a, a, half, precision, tmp);
    std::memcpy(out + 3 * j, tmp, 3);
  }
}

GFN_AVX2 void hpass_any(const uint8_t* row, const int32_t* starts, const int16_t* wq, int groups,
                        int64_t ncols, int precision, uint8_t* out, __m256i shuf) {
  const __m256i half = _mm256_set1_epi32(precision > 0 ? 1 << (precision - 1) : 0);
  for (int64_t j = 0; j < ncols; ++j) {
    const uint8_t* px = row + 3 * static_cast<int64_t>(starts[j]);
    const int16_t* w = wq + j * groups * 16;
    __m256i acc = _mm256_setzero_si256();
    for (int g = 0; g < groups; ++g) acc = _mm256_add_epi32(acc, hpass_group(px + 12 * g, w + 16 * g, shuf));
    uint8_t tmp[8];
    hpass_store2(acc, acc, half, precision, tmp);
    std::memcpy(out + 3 * j, tmp, 3);
  }
}

GFN_AVX2 void hpass_row_avx2(const uint8_t* row, const int32_t* starts, const int16_t* wq,
                             int groups, int64_t ncols, int precision, uint8_t* out) {
  const __m256i shuf = _mm256_setr_epi8(0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1,
                                        6, -1, 9, -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1, -1);
  switch (groups) {
    case 1: return hpass_fixed<1>(row, starts, wq, ncols, precision, out, shuf);
    case 2: return hpass_fixed<2>(row, starts, wq, ncols, precision, out, shuf);
    case 3: return hpass_fixed<3>(row, starts, wq, ncols, precision, out, shuf);
    case 4: return hpass_fixed<4>(row, starts, wq, ncols, precision, out, shuf);
    case 5: return hpass_fixed<5>(row, starts, wq, ncols, precision, out, shuf);
    case 6: return hpass_fixed<6>(row, starts, wq, ncols, precision, out, shuf);
    default: return hpass_any(row, starts, wq, groups, ncols, precision, out, shuf);
  }
}

GFN_AVX2 void vpass_row_avx2(const uint8_t* const* rows, const int16_t* w, int count,
                             int precision, int64_t n, int32_t* acc, uint8_t* out) {
  const int32_t half = precision > 0 ? 1 << (precision - 1) : 0;
  int64_t v = 0;
  for (; v + 16 <= n; v += 16) {
    __m256i a0 = _mm256_set1_epi32(half), a1 = a0;
    int k = 0;
    for (; k + 2 <= count; k += 2) {
      // Interleave two source rows byte-wise and use madd with the (w_k, w_k+1) pair.
      const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[k] + v));
      const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[k + 1] + v));
      const __m256i lo = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(r0, r1));
      const __m256i hi = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(r0, r1));
      const int32_t pair = static_cast<int32_t>(static_cast<uint16_t>(w[k])) |
                           (static_cast<int32_t>(static_cast<uint16_t>(w[k + 1])) << 16);
      const __m256i wp = _mm256_set1_epi32(pair);
      a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(lo, wp));
      a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(hi, wp));
    }
    if (k < count) {
      const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[k] + v));
      const __m256i lo = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(r0, _mm_setzero_si128()));
      const __m256i hi = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(r0, _mm_setzero_si128()));
      const __m256i wp = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint16_t>(w[k])));
      a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(lo, wp));
      a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(hi, wp));
    }
    a0 = _mm256_srai_epi32(a0, precision);
    a1 = _mm256_srai_epi32(a1, precision);
    // packs/packus work per 128-bit lane: fix the order with a permute.
    __m256i p16 = _mm256_packs_epi32(a0, a1);
    p16 = _mm256_permute4x64_epi64(p16, 0xD8);
    __m128i p8 = _mm_packus_epi16(_mm256_castsi256_si128(p16), _mm256_extracti128_si256(p16, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + v), p8);
  }
  for (; v < n; ++v) {
    int32_t a = half;
    for (int k = 0; k < count; ++k) a += w[k] * static_cast<int32_t>(rows[k][v]);
    out[v] = static_cast<uint8_t>(fixed_to_u8(a, precision));
  }
  (void)acc;
}

// ------------------------------------------------------------------- glance pass ----

// Eight outputs per iteration: each 256-bit product holds the 4 taps of two outputs (their
// weights are adjacent in `w`), two rounds of hadd reduce them, a permute restores the order.
// Only whole groups of 8: the caller computes the rest with the same (t0 + t1) + (t2 + t3)
// (plain code, so no FMA contraction makes it differ).
GFN_AVX2 int64_t glance_hpass4_avx2(const float* vpad, const int32_t* start, const float* w, int64_t n,
                                    float* out) {
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t x = 0;
  for (; x + 8 <= n; x += 8) {
    __m256 m[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const __m256 taps = _mm256_loadu2_m128(vpad + start[x + 2 * q + 1], vpad + start[x + 2 * q]);
      m[q] = _mm256_mul_ps(taps, _mm256_loadu_ps(w + 4 * (x + 2 * q)));
    }
    // lane 0: outputs x, x+2, x+4, x+6; lane 1: x+1, x+3, x+5, x+7.
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(m[0], m[1]), _mm256_hadd_ps(m[2], m[3]));
    _mm256_storeu_ps(out + x, _mm256_permutevar8x32_ps(s, order));
  }
  return x;
}

// 8 uint8 values as floats.
GFN_AVX2 inline __m256 load8_u8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

GFN_AVX2 int64_t glance_vpass_u8_avx2(const uint8_t* const* rows, const float* w, int ntaps, int64_t n,
                                      float* v) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    __m256 acc = _mm256_mul_ps(load8_u8(rows[0] + c), _mm256_set1_ps(w[0]));
    for (int a = 1; a < ntaps; ++a) {
      acc = _mm256_add_ps(acc, _mm256_mul_ps(load8_u8(rows[a] + c), _mm256_set1_ps(w[a])));
    }
    _mm256_storeu_ps(v + c, acc);
  }
  return c;
}

// ------------------------------------------------------------------------- gemm ----

template <bool F16>
GFN_AVX2 inline __m256 load8(const void* p, int64_t off) {
  if constexpr (F16) {
    return _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + off)));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(p) + off);
  }
}

GFN_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R weight rows x NB batch vectors; each weight vector is loaded once per tile. With PF,
// the next tile's rows are prefetched (R x 8 weights per step, in address order): for short
// rows the R interleaved streams of a tile end before the hardware prefetcher ramps up
// (the policy GRU's 256 x 256 step, cold after a backbone run); for long rows it
// keeps up by itself and the extra instructions cost bandwidth, so PF is off there.
template <int R, int NB, bool F16, bool PF>
GFN_AVX2 inline void tile(const void* w, int64_t ld, int64_t col0, int64_t k, int64_t r,
                          const float* const* x, float* out, int64_t ldo, bool accumulate) {
  __m256 acc[R][NB];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) acc[i][b] = _mm256_setzero_ps();
  }
  const int64_t base = r * ld + col0;
  constexpr int64_t kEsize = F16 ? 2 : 4;
  const char* next = static_cast<const char*>(w) + (base + R * ld) * kEsize;
  int64_t c = 0;
  for (; c + 8 <= k; c += 8) {
    if constexpr (PF) {
#pragma GCC unroll 16
      for (int64_t o = 0; o < R * 8 * kEsize; o += 64) _mm_prefetch(next + c * R * kEsize + o, _MM_HINT_T1);
    }
    __m256 xv[NB];
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) xv[b] = _mm256_loadu_ps(x[b] + c);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const __m256 wv = load8<F16>(w, base + i * ld + c);
#pragma GCC unroll 16
      for (int b = 0; b < NB; ++b) acc[i][b] = _mm256_fmadd_ps(wv, xv[b], acc[i][b]);
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int b = 0; b < NB; ++b) {
      float s = hsum(acc[i][b]);
      for (int64_t cc = c; cc < k; ++cc) s += load_weight<F16>(w, base + i * ld + cc) * x[b][cc];
      float* o = out + b * ldo + r + i;
      *o = accumulate ? *o + s : s;
    }
  }
}

template <int R, int NB, bool F16, bool PF>
GFN_AVX2 inline void rows_tiled(const void* w, int64_t ld, int64_t col0, int64_t k, int64_t& r,
                                int64_t r1, const float* const* x, int64_t nb, float* out,
                                int64_t ldo, bool accumulate) {
  for (; r + R <= r1; r += R) {
    int64_t b = 0;
    for (; b + NB <= nb; b += NB) tile<R, NB, F16, PF>(w, ld, col0, k, r, x + b, out + b * ldo, ldo, accumulate);
    for (; b < nb; ++b) tile<R, 1, F16, PF>(w, ld, col0, k, r, x + b, out + b * ldo, ldo, accumulate);
  }
}

template <bool F16, bool PF>
GFN_AVX2 void gemm_impl(const void* w, int64_t ld, int64_t col0, int64_t k, int64_t r0,
                        int64_t r1, const float* const* x, int64_t nb, float* out, int64_t ldo,
                        bool accumulate) {
  int64_t r = r0;
  if (nb == 1) {
    rows_tiled<8, 1, F16, PF>(w, ld, col0, k, r, r1, x, nb, out, ldo, accumulate);
  } else if (nb == 2) {
    rows_tiled<4, 2, F16, PF>(w, ld, col0, k, r, r1, x, nb, out, ldo, accumulate);
  } else if (nb == 3) {
    rows_tiled<4, 3, F16, PF>(w, ld, col0, k, r, r1, x, nb, out, ldo, accumulate);
  } else {
    rows_tiled<3, 4, F16, PF>(w, ld, col0, k, r, r1, x, nb, out, ldo, accumulate);
  }
  rows_tiled<1, 4, F16, PF>(w, ld, col0, k, r, r1, x, nb, out, ldo, accumulate);
}

GFN_AVX2 float sum_avx2(const float* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
  }
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += p[i];
  return s;
}

void gemm_rows_avx2(const WeightView& w, int64_t col0, int64_t k, int64_t r0, int64_t r1,
                    const float* const* x, int64_t nb, float* out, int64_t ldo, bool accumulate) {
  const bool f16 = w.type == WType::kF16;
  const bool short_rows = k * (f16 ? 2 : 4) <= 2048;  // see tile()
  if (f16) {
    if (short_rows) {
      gemm_impl<true, true>(w.data, w.ld, col0, k, r0, r1, x, nb, out, ldo, accumulate);
    } else {
      gemm_impl<true, false>(w.data, w.ld, col0, k, r0, r1, x, nb, out, ldo, accumulate);
    }
  } else if (short_rows) {
    gemm_impl<false, true>(w.data, w.ld, col0, k, r0, r1, x, nb, out, ldo, accumulate);
  } else {
    gemm_impl<false, false>(w.data, w.ld, col0, k, r0, r1, x, nb, out, ldo, accumulate);
  }
}

#else  // no x86 kernels: these are never called (use_avx2() is false)

void hpass_row_avx2(const uint8_t*, const int32_t*, const int16_t*, int, int64_t, int, uint8_t*) {
  std::abort();
}
void vpass_row_avx2(const uint8_t* const*, const int16_t*, int, int, int64_t, int32_t*, uint8_t*) {
  std::abort();
}
void gemm_rows_avx2(const WeightView&, int64_t, int64_t, int64_t, int64_t, const float* const*,
                    int64_t, float*, int64_t, bool) {
  std::abort();
}
int64_t glance_hpass4_avx2(const float*, const int32_t*, const float*, int64_t, float*) { std::abort(); }
int64_t glance_vpass_u8_avx2(const uint8_t* const*, const float*, int, int64_t, float*) { std::abort(); }
float sum_avx2(const float*, int64_t) { std::abort(); }

#endif

}  // namespace gfn::cpu
