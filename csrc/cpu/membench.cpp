#include "membench.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <vector>

#include "large_pages.h"
#include "simd.h"
#include "threadpool.h"

namespace gfn::cpu {

double read_pass_seconds(size_t nbytes, int reps) {
  const int64_t n = static_cast<int64_t>(std::max<size_t>(nbytes / sizeof(float), 64));
  // Same allocator as the packed weights (huge pages), so the roofline is comparable.
  std::vector<float, LargePageAllocator<float>> data(static_cast<size_t>(n), 1.0f);
  std::atomic<int64_t> sink{0};
  const SimdKernels* const simd = simd_kernels();
  double best = 1e30;
  for (int r = 0; r < std::max(reps, 1); ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) {
      float s = 0.0f;
      if (simd != nullptr) {
        s = simd->sum(data.data() + b, e - b);
      } else {
        float acc[16] = {};
        int64_t i = b;
        for (; i + 16 <= e; i += 16) {
          for (int l = 0; l < 16; ++l) acc[l] += data[i + l];
        }
        for (; i < e; ++i) acc[0] += data[i];
        for (float a : acc) s += a;
      }
      sink.fetch_add(static_cast<int64_t>(s), std::memory_order_relaxed);
    });
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, dt);
  }
  return sink.load() == -1 ? 0.0 : best;
}

}  // namespace gfn::cpu
