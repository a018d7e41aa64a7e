// Allocator for the packed weight matrices: large blocks are 2 MiB aligned and marked for
// transparent huge pages, so streaming a policy GRU's weights back in after a backbone run
// costs one TLB miss per 2 MiB rather than one per 4 KiB (figures in docs/kernels.md). A block
// of 256 KiB or more is rounded up to whole 2 MiB pages: at most 2 MiB more memory per matrix.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

#if defined(_WIN32)
#include <malloc.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace gfn::cpu {

template <typename T>
struct LargePageAllocator {
  using value_type = T;
  static constexpr size_t kHugePage = size_t{2} << 20;
  static constexpr size_t kThreshold = size_t{256} << 10;  ///< smaller blocks: plain new

  LargePageAllocator() noexcept = default;
  template <typename U>
  LargePageAllocator(const LargePageAllocator<U>&) noexcept {}

  T* allocate(size_t n) {
    const size_t bytes = n * sizeof(T);
    if (bytes < kThreshold) return static_cast<T*>(::operator new(bytes));
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
#if defined(_WIN32)
    void* p = _aligned_malloc(rounded, kHugePage);
#else
    void* p = std::aligned_alloc(kHugePage, rounded);
#endif
    if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, rounded, MADV_HUGEPAGE);  // advisory: failure only costs TLB misses
#endif
    return static_cast<T*>(p);
  }

  void deallocate(T* p, size_t n) noexcept {
    if (n * sizeof(T) < kThreshold) {
      ::operator delete(p);
    } else {
#if defined(_WIN32)
      _aligned_free(p);
#else
      std::free(p);
#endif
    }
  }

  template <typename U>
  bool operator==(const LargePageAllocator<U>&) const noexcept { return true; }
  template <typename U>
  bool operator!=(const LargePageAllocator<U>&) const noexcept { return false; }
};

}  // namespace gfn::cpu
