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

bool supported() {
  static const bool ok = x86_kernels_compiled() && x86_cpu_has_avx2();
  return ok;
}

}  // namespace

bool use_avx2() { return supported() && enabled_flag().load(std::memory_order_relaxed); }

void set_simd_enabled(bool enabled) { enabled_flag().store(enabled); }

std::string simd_level() { return use_avx2() ? "avx2" : "generic"; }

}  // namespace gfn::cpu
