// Status checking for CUDA runtime calls.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace gfn::cuda {

/// Throws std::runtime_error naming the failed call, its location and the CUDA error.
[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file,
                                          int line) {
  (void)cudaGetLastError();  // clear a non-sticky error so later calls can proceed
  throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ") in `" + expr + "` at " + file + ":" +
                           std::to_string(line));
}

inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

/// Whether work enqueued on `s` now is recorded into a graph: a capture open on the stream, or
/// one it has joined. A failed query (the legacy stream while a blocking stream captures) counts
/// as capturing.
inline bool capturing(cudaStream_t s) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(s, &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return true;
  }
  return status != cudaStreamCaptureStatusNone;
}

/// This thread in relaxed capture mode for the life of the object (the previous mode restored
/// however the scope ends): a call that a capture does not record (an allocation, a copy on a
/// private stream) then leaves a capture this thread has open on another stream valid.
struct RelaxedCapture {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  RelaxedCapture() { (void)cudaThreadExchangeStreamCaptureMode(&mode); }
  ~RelaxedCapture() { (void)cudaThreadExchangeStreamCaptureMode(&mode); }
  RelaxedCapture(const RelaxedCapture&) = delete;
  RelaxedCapture& operator=(const RelaxedCapture&) = delete;
};

}  // namespace gfn::cuda

/// Checks a CUDA runtime call; throws std::runtime_error with file/line on failure.
#define GFN_CUDA_CHECK(expr)                                                   \
  do {                                                                         \
    const cudaError_t gfn_err_ = (expr);                                       \
    if (gfn_err_ != cudaSuccess) {                                             \
      ::gfn::cuda::throw_cuda_error(gfn_err_, #expr, __FILE__, __LINE__);      \
    }                                                                          \
  } while (0)

/// Checks the launch of the kernel just enqueued.
#define GFN_CUDA_CHECK_LAUNCH() GFN_CUDA_CHECK(cudaGetLastError())
