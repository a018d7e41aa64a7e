// Row-blocked matrix x small-batch products for the GRU and linear heads (CPU).
//
// These products are memory-bound at batch 1 (the weights are streamed once), so the
// kernels read each weight row once for all batch items, keep the batch vectors in
// cache, and can stream float16 weights (half the bytes) converted on the fly.
#pragma once

#include <cstdint>

namespace gfn::cpu {

enum class WType : int { kF32 = 0, kF16 = 1 };

/// A row-major weight matrix: element (r, c) at data[r * ld + c] (float or float16 bits).
struct WeightView {
  const void* data = nullptr;
  WType type = WType::kF32;
  int64_t ld = 0;
};

/// out[b * ldo + r] = (accumulate ? out[b * ldo + r] : 0) + sum_k W[r, col0 + k] * x[b][k]
/// for r in [r0, r1) and b in [0, nb). Single-threaded: callers split the rows.
void gemm_rows(const WeightView& w, int64_t col0, int64_t k, int64_t r0, int64_t r1,
               const float* const* x, int64_t nb, float* out, int64_t ldo, bool accumulate);

/// AVX2/FMA/F16C implementation (x86_kernels.cpp); same contract as gemm_rows.
void gemm_rows_avx2(const WeightView& w, int64_t col0, int64_t k, int64_t r0, int64_t r1,
                    const float* const* x, int64_t nb, float* out, int64_t ldo, bool accumulate);

}  // namespace gfn::cpu
