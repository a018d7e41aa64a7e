// SIMD dispatch for the CPU kernels.
//
// The module is compiled for the baseline ISA (portable). On x86-64, kernels that benefit
// from AVX2/FMA/F16C are compiled with per-function target attributes and chosen at run time
// when the CPU has them (x86_kernels.cpp). On aarch64, Advanced SIMD (NEON) is part of the
// base architecture, so the NEON kernels (neon_kernels.cpp) are chosen at compile time and
// always supported. GFNET_EDGE_SIMD=0 in the environment, or set_simd_enabled(false), forces
// the portable loops (the tests compare both paths).
#pragma once

#include <cstdint>
#include <string>

#include "gemm.h"

namespace gfn::cpu {

/// The fast kernels of one instruction set. Each entry has the contract of the declaration
/// of its AVX2 version below; the dispatch points call them instead of the portable loops.
struct SimdKernels {
  const char* name;  ///< "avx2" or "neon" (simd_level())
  void (*hpass_row)(const uint8_t*, const int32_t*, const int16_t*, int, int64_t, int, uint8_t*);
  void (*vpass_row)(const uint8_t* const*, const int16_t*, int, int, int64_t, int32_t*, uint8_t*);
  int64_t (*glance_hpass4)(const float*, const int32_t*, const float*, int64_t, float*);
  int64_t (*glance_vpass_u8)(const uint8_t* const*, const float*, int, int64_t, float*);
  void (*gemm_rows)(const WeightView&, int64_t, int64_t, int64_t, int64_t, const float* const*, int64_t,
                    float*, int64_t, bool);
  float (*sum)(const float*, int64_t);
};

/// The fast kernels to use now, or nullptr for the portable loops (none compiled for this
/// architecture, not supported by this CPU, or disabled).
const SimdKernels* simd_kernels();

/// True when the AVX2 kernels are compiled in, supported by this CPU and enabled.
bool use_avx2();

/// Enables or disables the SIMD kernels (for testing the portable fallback).
void set_simd_enabled(bool enabled);

/// "avx2", "neon" or "generic": what the kernels will use now.
std::string simd_level();

// ---- Kernels with an AVX2 implementation (defined in x86_kernels.cpp) ----

/// Horizontal antialiased pass of one RGB row (see preprocess.cpp for the layout); writes
/// 3 * ncols bytes and may scribble on the 4 bytes after them.
void hpass_row_avx2(const uint8_t* row, const int32_t* starts, const int16_t* wq, int groups,
                    int64_t ncols, int precision, uint8_t* out);

/// Vertical antialiased pass producing one row of `n` interleaved uint8 values.
void vpass_row_avx2(const uint8_t* const* rows, const int16_t* w, int count, int precision,
                    int64_t n, int32_t* acc, uint8_t* out);

/// Horizontal 4-tap (bicubic) glance pass of one row: out[x] = (t0 + t1) + (t2 + t3) with
/// t_j = w[4x+j] * vpad[start[x]+j] (the taps of each output are contiguous in `vpad`, the row
/// with its clamped borders materialised). Does whole groups of 8 outputs and returns how
/// many it wrote; the caller does the rest with the same expression.
int64_t glance_hpass4_avx2(const float* vpad, const int32_t* start, const float* w, int64_t n, float* out);

/// Vertical glance pass over uint8 rows: v[c] = float(rows[0][c]) * w[0], then
/// v[c] += float(rows[a][c]) * w[a] for a = 1 .. ntaps - 1 (no fused multiply-add; the plain
/// code does the same operations). Does whole groups of 8 values and returns how many.
int64_t glance_vpass_u8_avx2(const uint8_t* const* rows, const float* w, int ntaps, int64_t n, float* v);

/// Sum of n floats (x86_kernels.cpp; used by the bandwidth probe).
float sum_avx2(const float* p, int64_t n);

/// The NEON kernels (neon_kernels.cpp), or nullptr where they are not compiled (not aarch64).
/// Unlike AVX2's, the NEON kernels do the portable loops' operations in the same order, with
/// no fused multiply-add, so their results are bit-identical to the portable path.
const SimdKernels* neon_kernels();

}  // namespace gfn::cpu
