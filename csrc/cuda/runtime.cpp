// Device discovery, buffers, streams and copies (host code, linked to static cudart).
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "api.h"
#include "check.h"
#include "scratch_rule.h"

namespace gfn::cuda {
namespace {

struct DeviceProbe {
  int count = 0;
  std::string error;
};

const DeviceProbe& probe() {
  static DeviceProbe result;
  static std::once_flag once;
  std::call_once(once, [] {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      result.count = 0;
      result.error = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    } else {
      result.count = n;
      if (n == 0) result.error = "the driver reports no CUDA device";
    }
  });
  return result;
}

}  // namespace

int device_count() { return probe().count; }

std::string device_error() { return probe().error; }

void require_device() {
  if (device_count() > 0) return;
  throw std::runtime_error("no usable CUDA device (" + device_error() +
                           "); use the CPU functions of gfnet_edge.ops instead");
}

namespace {
void check_device_index(int index) {
  if (index < 0 || index >= device_count()) {
    throw std::invalid_argument("device index " + std::to_string(index) + " out of range (" +
                                std::to_string(device_count()) + " devices)");
  }
}
}  // namespace

std::string device_name(int index) {
  require_device();
  check_device_index(index);
  cudaDeviceProp prop{};
  GFN_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major) +
         std::to_string(prop.minor) + ")";
}

DeviceProperties device_properties(int index) {
  require_device();
  check_device_index(index);
  cudaDeviceProp prop{};
  GFN_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
  DeviceProperties p;
  p.name = prop.name;
  p.major = prop.major;
  p.minor = prop.minor;
  p.total_memory = prop.totalGlobalMem;
  p.multiprocessors = prop.multiProcessorCount;
  p.integrated = prop.integrated != 0;
  return p;
}

void device_synchronize() {
  require_device();
  GFN_CUDA_CHECK(cudaDeviceSynchronize());
}

DeviceBuffer::DeviceBuffer(size_t nbytes) : nbytes_(nbytes) {
  require_device();
  if (nbytes > 0) GFN_CUDA_CHECK(cudaMalloc(&ptr_, nbytes));
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_ != nullptr) {
    (void)cudaFree(ptr_);  // destructors must not throw
    (void)cudaGetLastError();
  }
}

void DeviceBuffer::copy_from_host(const void* src, size_t nbytes, size_t offset,
                                  uintptr_t stream) {
  if (offset > nbytes_ || nbytes > nbytes_ - offset) {  // offset + nbytes may wrap around
    throw std::invalid_argument("copy of " + std::to_string(nbytes) + " bytes at offset " +
                                std::to_string(offset) + " overflows a buffer of " +
                                std::to_string(nbytes_) + " bytes");
  }
  if (nbytes == 0) return;
  GFN_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(ptr_) + offset, src, nbytes,
                                 cudaMemcpyHostToDevice, as_stream(stream)));
}

void DeviceBuffer::copy_to_host(void* dst, size_t nbytes, size_t offset, uintptr_t stream) const {
  if (offset > nbytes_ || nbytes > nbytes_ - offset) {  // offset + nbytes may wrap around
    throw std::invalid_argument("copy of " + std::to_string(nbytes) + " bytes at offset " +
                                std::to_string(offset) + " overruns a buffer of " +
                                std::to_string(nbytes_) + " bytes");
  }
  if (nbytes == 0) return;
  GFN_CUDA_CHECK(cudaMemcpyAsync(dst, static_cast<const char*>(ptr_) + offset, nbytes,
                                 cudaMemcpyDeviceToHost, as_stream(stream)));
  GFN_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream)));
}

void DeviceBuffer::zero(uintptr_t stream) {
  if (nbytes_ == 0) return;
  GFN_CUDA_CHECK(cudaMemsetAsync(ptr_, 0, nbytes_, as_stream(stream)));
}

Stream::Stream() {
  require_device();
  cudaStream_t s = nullptr;
  GFN_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  stream_ = s;
}

Stream::~Stream() {
  if (stream_ != nullptr) {
    (void)cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
    (void)cudaGetLastError();
  }
}

void Stream::synchronize() const {
  GFN_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)));
}

void stream_synchronize(uintptr_t stream) {
  require_device();
  GFN_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream)));
}

bool stream_capturing(uintptr_t stream) {
  require_device();
  return capturing(as_stream(stream));
}

void memcpy_htod(uintptr_t dst, const void* src, size_t nbytes, uintptr_t stream) {
  require_device();
  check_device_pointer(dst, "dst");
  if (nbytes == 0) return;
  GFN_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(dst), src, nbytes,
                                 cudaMemcpyHostToDevice, as_stream(stream)));
}

void memcpy_dtoh(void* dst, uintptr_t src, size_t nbytes, uintptr_t stream) {
  require_device();
  check_device_pointer(src, "src");
  if (nbytes == 0) return;
  GFN_CUDA_CHECK(cudaMemcpyAsync(dst, reinterpret_cast<const void*>(src), nbytes,
                                 cudaMemcpyDeviceToHost, as_stream(stream)));
  GFN_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream)));
}

void memcpy_dtod(uintptr_t dst, uintptr_t src, size_t nbytes, uintptr_t stream) {
  require_device();
  check_device_pointer(dst, "dst");
  check_device_pointer(src, "src");
  if (nbytes == 0) return;
  GFN_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                                 nbytes, cudaMemcpyDeviceToDevice, as_stream(stream)));
}

void check_device_pointer(uintptr_t ptr, const char* name) {
  if (ptr == 0) throw std::invalid_argument(std::string(name) + " is a null device pointer");
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr));
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::invalid_argument(std::string(name) + " is not a valid CUDA pointer (" +
                                cudaGetErrorString(err) + ")");
  }
  if (attr.type == cudaMemoryTypeUnregistered) {
    throw std::invalid_argument(std::string(name) +
                                " points to ordinary host memory, not device memory");
  }
}

void check_device_pointer(uintptr_t ptr, const char* name, size_t align) {
  if (align > 1 && ptr % align != 0) {
    throw std::invalid_argument(std::string(name) + " must be aligned to its element size (" +
                                std::to_string(align) + " bytes)");
  }
  check_device_pointer(ptr, name);
}

namespace {

constexpr int kMaxDevices = 64;
// Per device: 0 not known yet, 1 stream-ordered scratch (threshold raised), 2 plain cudaMalloc.
std::atomic<int> g_scratch_mode[kMaxDevices];

// Whether `device` takes stream-ordered scratch (cudaMallocAsync from its default pool),
// decided once per device. The default pool hands its free memory back to the system at every
// synchronisation (release threshold 0), so a caller that synchronises after each call would
// have every Scratch map fresh pages: the first decision raises the threshold (the pool then
// keeps at most the peak of the scratch in use at once). Pool attributes cannot be set while a
// capture is open on the stream, so that call waits for one that is not; it runs in relaxed
// capture mode, so that a capture this thread has open elsewhere is not invalidated.
bool stream_ordered(int device, cudaStream_t stream) {
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached) {
    const int mode = g_scratch_mode[device].load(std::memory_order_acquire);
    if (mode != 0) return mode == 1;
  }
  int pools = 0;
  if (cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device) != cudaSuccess) {
    (void)cudaGetLastError();
    pools = 0;
  }
  if (pools == 0) {
    if (cached) g_scratch_mode[device].store(2, std::memory_order_release);
    return false;
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) {
    (void)cudaGetLastError();
    return true;  // the threshold at a later call
  }
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  (void)cudaThreadExchangeStreamCaptureMode(&mode);
  cudaMemPool_t pool = nullptr;
  if (cudaDeviceGetDefaultMemPool(&pool, device) == cudaSuccess) {
    uint64_t keep = UINT64_MAX;
    (void)cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
  }
  (void)cudaThreadExchangeStreamCaptureMode(&mode);
  (void)cudaGetLastError();  // an optimisation only: its failure changes nothing else
  if (cached) g_scratch_mode[device].store(1, std::memory_order_release);
  return true;
}

}  // namespace

Scratch::Scratch(size_t nbytes, uintptr_t stream) : stream_(stream) {
  if (nbytes == 0) nbytes = 16;
  int device = 0;
  GFN_CUDA_CHECK(cudaGetDevice(&device));
  const cudaStream_t s = as_stream(stream);
  const bool pools = stream_ordered(device, s);
  switch (scratch_source(pools, !pools && capturing(s))) {
    case ScratchSource::kPool:
      async_ = true;
      GFN_CUDA_CHECK(cudaMallocAsync(&ptr_, nbytes, s));
      break;
    case ScratchSource::kMalloc: {
      const RelaxedCapture relaxed;  // a capture this thread has open on another stream stays valid
      GFN_CUDA_CHECK(cudaMalloc(&ptr_, nbytes));
      break;
    }
    case ScratchSource::kRefused:
      throw std::runtime_error(scratch_refusal(nbytes));
  }
}

Scratch::~Scratch() {
  if (ptr_ == nullptr) return;
  if (async_) {
    (void)cudaFreeAsync(ptr_, as_stream(stream_));
  } else {
    const RelaxedCapture relaxed;
    (void)cudaStreamSynchronize(as_stream(stream_));
    (void)cudaFree(ptr_);
  }
  (void)cudaGetLastError();
}

ErrorFlag::ErrorFlag(uintptr_t given, uintptr_t stream) : stream_(stream) {
  if (given != 0) {
    check_device_pointer(given, "error_flag", sizeof(int));
    flag_ = reinterpret_cast<int*>(given);
    return;
  }
  // Without the caller's flag the call waits for the stream to read its own back, and a
  // captured stream cannot be waited for: refused before anything is enqueued.
  if (capturing(as_stream(stream))) {
    throw std::invalid_argument(
        "a call without error_flag waits for its stream to report bad indices or coordinates, which a stream "
        "being captured does not allow: pass a zeroed device int32 error_flag (and read it after the replay)");
  }
  own_ = std::make_unique<Scratch>(sizeof(int), stream);
  flag_ = reinterpret_cast<int*>(own_->ptr());
  GFN_CUDA_CHECK(cudaMemsetAsync(flag_, 0, sizeof(int), as_stream(stream)));
}

void ErrorFlag::raise_if_set(const std::string& message) const {
  if (!own_) return;  // the caller's flag: read by the caller
  int host_flag = 0;
  const cudaStream_t s = as_stream(stream_);
  GFN_CUDA_CHECK(cudaMemcpyAsync(&host_flag, flag_, sizeof(int), cudaMemcpyDeviceToHost, s));
  GFN_CUDA_CHECK(cudaStreamSynchronize(s));
  if (host_flag != 0) throw std::invalid_argument(message);
}

// ------------------------------------------------------------------------------ graphs
Graph::~Graph() {
  abort_capture();
  if (exec_ != nullptr) (void)cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
  if (graph_ != nullptr) (void)cudaGraphDestroy(static_cast<cudaGraph_t>(graph_));
  (void)cudaGetLastError();
}

Graph::Graph() { require_device(); }

void Graph::begin_capture(uintptr_t stream) {
  require_device();
  // graph_ without exec_: a capture whose instantiation failed (a second capture would leak it)
  if (is_capturing_ || graph_ != nullptr || exec_ != nullptr) {
    throw std::runtime_error("this graph was captured already; make a new one");
  }
  if (stream == 0 || stream == reinterpret_cast<uintptr_t>(cudaStreamLegacy)) {
    throw std::invalid_argument("graph capture needs a created stream, not the legacy default stream (" +
                                std::to_string(stream) + ")");
  }
  GFN_CUDA_CHECK(cudaStreamBeginCapture(as_stream(stream), cudaStreamCaptureModeThreadLocal));
  capturing_ = stream;
  is_capturing_ = true;
}

void Graph::abort_capture() {
  if (!is_capturing_) return;
  cudaGraph_t g = nullptr;
  (void)cudaStreamEndCapture(as_stream(capturing_), &g);
  if (g != nullptr) (void)cudaGraphDestroy(g);
  (void)cudaGetLastError();
  is_capturing_ = false;
}

void Graph::end_capture() {
  if (!is_capturing_) throw std::runtime_error("end_capture without begin_capture");
  cudaGraph_t g = nullptr;
  const cudaError_t err = cudaStreamEndCapture(as_stream(capturing_), &g);
  is_capturing_ = false;
  if (err != cudaSuccess || g == nullptr) {
    if (g != nullptr) (void)cudaGraphDestroy(g);
    throw_cuda_error(err != cudaSuccess ? err : cudaErrorStreamCaptureInvalidated,
                     "cudaStreamEndCapture (a call made while capturing cannot be captured)", __FILE__,
                     __LINE__);
  }
  graph_ = g;
  size_t count = 0;
  GFN_CUDA_CHECK(cudaGraphGetNodes(g, nullptr, &count));
  nodes_ = count;
  cudaGraphExec_t exec = nullptr;
  GFN_CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
  exec_ = exec;
}

std::vector<std::string> Graph::node_kinds() const {
  std::vector<std::string> kinds;
  if (graph_ == nullptr) return kinds;
  const cudaGraph_t g = static_cast<cudaGraph_t>(graph_);
  size_t count = 0;
  GFN_CUDA_CHECK(cudaGraphGetNodes(g, nullptr, &count));
  std::vector<cudaGraphNode_t> nodes(count);
  if (count > 0) GFN_CUDA_CHECK(cudaGraphGetNodes(g, nodes.data(), &count));
  for (size_t i = 0; i < count; ++i) {
    cudaGraphNodeType type{};
    GFN_CUDA_CHECK(cudaGraphNodeGetType(nodes[i], &type));
    switch (type) {
      case cudaGraphNodeTypeKernel: kinds.emplace_back("kernel"); break;
      case cudaGraphNodeTypeMemcpy: kinds.emplace_back("memcpy"); break;
      case cudaGraphNodeTypeMemset: kinds.emplace_back("memset"); break;
      case cudaGraphNodeTypeMemAlloc: kinds.emplace_back("mem_alloc"); break;
      case cudaGraphNodeTypeMemFree: kinds.emplace_back("mem_free"); break;
      case cudaGraphNodeTypeGraph: kinds.emplace_back("graph"); break;
      case cudaGraphNodeTypeEmpty: kinds.emplace_back("empty"); break;
#if CUDART_VERSION >= 12030  // conditional nodes (and this enumerator) came with CUDA 12.3
      case cudaGraphNodeTypeConditional: kinds.emplace_back("conditional"); break;
#endif
      case cudaGraphNodeTypeEventRecord:
      case cudaGraphNodeTypeWaitEvent: kinds.emplace_back("event"); break;
      default: kinds.emplace_back("other"); break;
    }
  }
  return kinds;
}

void Graph::launch(uintptr_t stream) const {
  if (exec_ == nullptr) throw std::runtime_error("graph launched before it was captured");
  GFN_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_), as_stream(stream)));
}

// ------------------------------------------------------------------------------ events
Event::Event() {
  require_device();
  cudaEvent_t e = nullptr;
  GFN_CUDA_CHECK(cudaEventCreate(&e));
  event_ = e;
}

Event::~Event() {
  if (event_ != nullptr) (void)cudaEventDestroy(static_cast<cudaEvent_t>(event_));
  (void)cudaGetLastError();
}

void Event::record(uintptr_t stream) {
  GFN_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(event_), as_stream(stream)));
}

void Event::wait(uintptr_t stream) const {
  GFN_CUDA_CHECK(cudaStreamWaitEvent(as_stream(stream), static_cast<cudaEvent_t>(event_), 0));
}

void Event::synchronize() const {
  GFN_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(event_)));
}

float Event::elapsed_since(const Event& start) const {
  start.synchronize();  // may have been recorded on another stream: cudaEventElapsedTime needs both done
  synchronize();
  float ms = 0.0f;
  GFN_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start.event_),
                                      static_cast<cudaEvent_t>(event_)));
  return ms;
}

// ---------------------------------------------------------------------- pinned memory
PinnedBuffer::PinnedBuffer(size_t nbytes) : nbytes_(nbytes) {
  require_device();
  GFN_CUDA_CHECK(cudaMallocHost(&ptr_, nbytes > 0 ? nbytes : 1));
}

PinnedBuffer::~PinnedBuffer() {
  if (ptr_ != nullptr) (void)cudaFreeHost(ptr_);
  (void)cudaGetLastError();
}

}  // namespace gfn::cuda
