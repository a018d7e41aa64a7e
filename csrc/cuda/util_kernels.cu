// Small CUDA utilities of the device-resident runtime loop: the row gather that compacts
// the surviving samples of a batch between GFNet steps.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/grid.h"
#include "api.h"
#include "check.h"

namespace gfn::cuda {
namespace {

constexpr int kThreads = 256;

// dst[i, w] = src[idx[i], w] over rows of `row_words` words of type W. A bad index
// zero-fills the row and raises the flag (once per row); nothing is read out of bounds.
template <typename W>
__global__ void gather_rows_kernel(const W* __restrict__ src, int64_t src_rows,
                                   const int32_t* __restrict__ idx, W* __restrict__ dst,
                                   int64_t n, int64_t row_words, int* __restrict__ error_flag) {
  const int64_t total = n * row_words;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += step) {
    const int64_t i = k / row_words;
    const int64_t w = k - i * row_words;
    const int64_t r = idx[i];
    if (r < 0 || r >= src_rows) {
      dst[k] = W{};
      if (w == 0 && error_flag != nullptr) *error_flag = 1;
      continue;
    }
    dst[k] = src[r * row_words + w];
  }
}

template <typename W>
void launch_gather(uintptr_t src, int64_t src_rows, uintptr_t idx, uintptr_t dst, int64_t n,
                   int64_t row_bytes, int* flag, cudaStream_t s) {
  const int64_t row_words = row_bytes / static_cast<int64_t>(sizeof(W));
  const int64_t total = n * row_words;
  gather_rows_kernel<W><<<capped_blocks(total, kThreads), kThreads, 0, s>>>(
      reinterpret_cast<const W*>(src), src_rows, reinterpret_cast<const int32_t*>(idx),
      reinterpret_cast<W*>(dst), n, row_words, flag);
  GFN_CUDA_CHECK_LAUNCH();
}

// Validates sizes and pointers shared by both entry points.
void check_gather_args(uintptr_t src, int64_t src_rows, uintptr_t dst, int64_t n,
                       int64_t row_bytes) {
  if (n < 1) throw std::invalid_argument("n must be >= 1, got " + std::to_string(n));
  if (src_rows < 1) {
    throw std::invalid_argument("src_rows must be >= 1, got " + std::to_string(src_rows));
  }
  if (row_bytes < 1) {
    throw std::invalid_argument("row_bytes must be >= 1, got " + std::to_string(row_bytes));
  }
  const int64_t rows = std::max(n, src_rows);
  if (row_bytes > std::numeric_limits<int64_t>::max() / rows) {
    throw std::invalid_argument("gather size overflows: " + std::to_string(rows) + " rows of " +
                                std::to_string(row_bytes) + " bytes");
  }
  check_device_pointer(src, "src");
  check_device_pointer(dst, "dst");
  // [src, src + src_rows * row_bytes) and [dst, dst + n * row_bytes) must be disjoint.
  const uintptr_t src_end = src + static_cast<uintptr_t>(src_rows * row_bytes);
  const uintptr_t dst_end = dst + static_cast<uintptr_t>(n * row_bytes);
  if (src < dst_end && dst < src_end) {
    throw std::invalid_argument("gather_rows: src and dst overlap (the gather is not in place)");
  }
}

void dispatch_gather(uintptr_t src, int64_t src_rows, uintptr_t idx, uintptr_t dst, int64_t n,
                     int64_t row_bytes, int* flag, cudaStream_t s) {
  if (row_bytes % 16 == 0 && src % 16 == 0 && dst % 16 == 0) {
    launch_gather<uint4>(src, src_rows, idx, dst, n, row_bytes, flag, s);
  } else if (row_bytes % 4 == 0 && src % 4 == 0 && dst % 4 == 0) {
    launch_gather<uint32_t>(src, src_rows, idx, dst, n, row_bytes, flag, s);
  } else {
    launch_gather<uint8_t>(src, src_rows, idx, dst, n, row_bytes, flag, s);
  }
}

}  // namespace

void gather_rows(uintptr_t src, int64_t src_rows, uintptr_t idx, uintptr_t dst, int64_t n,
                 int64_t row_bytes, uintptr_t error_flag, uintptr_t stream) {
  require_device();
  check_gather_args(src, src_rows, dst, n, row_bytes);
  check_device_pointer(idx, "idx", sizeof(int32_t));
  const cudaStream_t s = as_stream(stream);
  const ErrorFlag flag(error_flag, stream);
  dispatch_gather(src, src_rows, idx, dst, n, row_bytes, flag.get(), s);
  flag.raise_if_set("gather_rows: row index out of range: every index must lie in [0, " +
                    std::to_string(src_rows - 1) + "]");
}

void gather_rows_host(uintptr_t src, int64_t src_rows, const int32_t* idx, uintptr_t dst,
                      int64_t n, int64_t row_bytes, uintptr_t stream) {
  require_device();
  check_gather_args(src, src_rows, dst, n, row_bytes);
  if (idx == nullptr) throw std::invalid_argument("gather_rows: idx is null");
  // The indices are read once, into a private pageable copy that is checked and uploaded:
  // cudaMemcpyAsync stages pageable memory before it returns, while it would read a page-locked
  // caller array (ops.pinned_empty) only when the stream reaches the copy, after the caller may
  // have changed it (and after the check).
  const std::vector<int32_t> host_idx(idx, idx + n);
  for (int64_t i = 0; i < n; ++i) {
    if (host_idx[i] < 0 || host_idx[i] >= src_rows) {
      throw std::invalid_argument("gather_rows: idx[" + std::to_string(i) + "] = " +
                                  std::to_string(host_idx[i]) + " is outside [0, " +
                                  std::to_string(src_rows - 1) + "]");
    }
  }
  const cudaStream_t s = as_stream(stream);
  if (capturing(s)) {  // a graph would copy them again at each replay, from memory the call does not own
    throw std::invalid_argument(
        "gather_rows: host indices are read when the call is made, and a stream being captured would copy them "
        "again at each replay from memory the call does not own: pass the indices in device memory");
  }
  const size_t idx_bytes = static_cast<size_t>(n) * sizeof(int32_t);
  // Stream-ordered scratch: freed after the kernel without a host synchronization. The
  // pageable copy is staged by cudaMemcpyAsync before it returns.
  Scratch dev_idx(idx_bytes, stream);
  GFN_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(dev_idx.ptr()), host_idx.data(), idx_bytes,
                                 cudaMemcpyHostToDevice, s));
  dispatch_gather(src, src_rows, dev_idx.ptr(), dst, n, row_bytes, nullptr, s);
}

}  // namespace gfn::cuda
