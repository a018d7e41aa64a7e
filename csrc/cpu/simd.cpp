#include "simd.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace gfn::cpu {

bool x86_kernels_compiled();  // x86_kernels.cpp
bool x86_cpu_has_avx2();      // x86_kernels.cpp

namespace {

bool env_enabled() {
  const char* v = std::getenv("GFNET_EDGE_SIMD");
  return !(v != nullptr && (std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0));
}

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> flag{env_enabled()};
  return flag;
}

const SimdKernels kAvx2{"avx2",          hpass_row_avx2, vpass_row_avx2, glance_hpass4_avx2,
                        glance_vpass_u8_avx2, gemm_rows_avx2, sum_avx2};

/// The best kernel set this build and CPU support (nullptr: none).
const SimdKernels* supported() {
  static const SimdKernels* const best = [] {
    if (x86_kernels_compiled() && x86_cpu_has_avx2()) return &kAvx2;
    return neon_kernels();
  }();
  return best;
}

}  // namespace

const SimdKernels* simd_kernels() {
  return enabled_flag().load(std::memory_order_relaxed) ? supported() : nullptr;
}

bool use_avx2() { return simd_kernels() == &kAvx2; }

void set_simd_enabled(bool enabled) { enabled_flag().store(enabled); }

std::string simd_level() {
  const SimdKernels* k = simd_kernels();
  return k != nullptr ? k->name : "generic";
}

}  // namespace gfn::cpu
