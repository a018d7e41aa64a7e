// Where a Scratch allocation (api.h) comes from, decided on the host without a CUDA header
// (so that a CPU build can test the rule).
//
// A stream being captured into a CUDA graph records the work enqueued on it; cudaMalloc and
// cudaFree are not allowed then (in the global and thread-local capture modes the call fails and
// invalidates the capture), while cudaMallocAsync / cudaFreeAsync from a memory pool are: the
// graph gets mem_alloc / mem_free nodes. So scratch comes from the device's pool where the device
// has memory pools, from plain cudaMalloc only outside a capture, and is refused otherwise.
#pragma once

#include <cstddef>
#include <string>

namespace gfn::cuda {

enum class ScratchSource { kPool, kMalloc, kRefused };

/// The source of a scratch allocation on a device with (`pools`) or without memory pools, on a
/// stream that is (`capturing`) or is not being captured.
inline ScratchSource scratch_source(bool pools, bool capturing) {
  if (pools) return ScratchSource::kPool;
  return capturing ? ScratchSource::kRefused : ScratchSource::kMalloc;
}

/// The message of a refused allocation of `nbytes`.
inline std::string scratch_refusal(size_t nbytes) {
  return "this call needs " + std::to_string(nbytes) +
         " bytes of scratch memory while its stream is captured into a CUDA graph, and this device "
         "has no memory pools (cudaMallocAsync): cudaMalloc is not allowed during a capture. Make "
         "the call outside the capture, or give it the buffers it would allocate";
}

}  // namespace gfn::cuda
