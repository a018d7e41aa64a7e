#include "gemm.h"

#include "../common/half.h"
#include "simd.h"

namespace gfn::cpu {
namespace {

// Portable kernel: R rows x 1 batch item, 8 partial sums per row so the compiler can
// vectorise without reassociating floating-point additions.
template <int R, typename WT>
void tile_generic(const WT* w, int64_t ld, int64_t k, const float* x, float* sums) {
  float acc[R][8] = {};
  int64_t c = 0;
  for (; c + 8 <= k; c += 8) {
    for (int i = 0; i < R; ++i) {
      const WT* wr = w + i * ld + c;
      for (int l = 0; l < 8; ++l) {
        float wv;
        if constexpr (sizeof(WT) == 2) {
          wv = half_to_float(wr[l]);
        } else {
          wv = wr[l];
        }
        acc[i][l] += wv * x[c + l];
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    float s = ((acc[i][0] + acc[i][1]) + (acc[i][2] + acc[i][3])) +
              ((acc[i][4] + acc[i][5]) + (acc[i][6] + acc[i][7]));
    for (int64_t cc = c; cc < k; ++cc) {
      float wv;
      if constexpr (sizeof(WT) == 2) {
        wv = half_to_float(w[i * ld + cc]);
      } else {
        wv = w[i * ld + cc];
      }
      s += wv * x[cc];
    }
    sums[i] = s;
  }
}

template <typename WT>
void gemm_rows_generic(const WT* w, int64_t ld, int64_t col0, int64_t k, int64_t r0, int64_t r1,
                       const float* const* x, int64_t nb, float* out, int64_t ldo,
                       bool accumulate) {
  float sums[4];
  for (int64_t r = r0; r < r1;) {
    const int rows = (r1 - r >= 4) ? 4 : 1;
    for (int64_t b = 0; b < nb; ++b) {
      const WT* wr = w + r * ld + col0;
      if (rows == 4) {
        tile_generic<4>(wr, ld, k, x[b], sums);
      } else {
        tile_generic<1>(wr, ld, k, x[b], sums);
      }
      for (int i = 0; i < rows; ++i) {
        float* o = out + b * ldo + r + i;
        *o = accumulate ? *o + sums[i] : sums[i];
      }
    }
    r += rows;
  }
}

}  // namespace

void gemm_rows(const WeightView& w, int64_t col0, int64_t k, int64_t r0, int64_t r1,
               const float* const* x, int64_t nb, float* out, int64_t ldo, bool accumulate) {
  if (r1 <= r0 || nb <= 0) return;
  if (const SimdKernels* simd = simd_kernels()) {
    simd->gemm_rows(w, col0, k, r0, r1, x, nb, out, ldo, accumulate);
    return;
  }
  if (w.type == WType::kF32) {
    gemm_rows_generic(static_cast<const float*>(w.data), w.ld, col0, k, r0, r1, x, nb, out, ldo,
                      accumulate);
  } else {
    gemm_rows_generic(static_cast<const uint16_t*>(w.data), w.ld, col0, k, r0, r1, x, nb, out,
                      ldo, accumulate);
  }
}

}  // namespace gfn::cpu
