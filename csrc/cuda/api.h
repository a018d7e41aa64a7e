// CUDA entry points of the extension, declared without any CUDA header so that
// csrc/bindings/ compiles with the host compiler alone.
//
// Every pointer is a device address passed as an integer (from DeviceBuffer.ptr,
// cuda-python, pycuda, CuPy or torch's data_ptr()); every entry point takes a stream
// handle (0 = the legacy default stream) and only enqueues work, unless documented.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../common/interp.h"

namespace gfn::cuda {

enum class DType : int { kF32 = 0, kF16 = 1 };

/// Bytes of one element of `t`.
inline size_t elem_size(DType t) { return t == DType::kF32 ? 4 : 2; }

/// Number of CUDA devices; 0 when there is no driver or no device (never throws).
int device_count();

/// Why device_count() is 0 ("" when it is not).
std::string device_error();

/// Name and compute capability of device `index`, e.g. "NVIDIA H100 (sm_90)".
std::string device_name(int index);

/// Properties of device `index`: name, compute capability, memory, SM count.
struct DeviceProperties {
  std::string name;
  int major = 0, minor = 0;
  size_t total_memory = 0;
  int multiprocessors = 0;
  bool integrated = false;
};
DeviceProperties device_properties(int index);

/// Blocks until all work on the current device is done.
void device_synchronize();

/// Throws std::runtime_error with a clear message when no device is usable.
void require_device();

/// Owning device allocation (cudaMalloc / cudaFree).
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t nbytes);
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  uintptr_t ptr() const { return reinterpret_cast<uintptr_t>(ptr_); }
  size_t nbytes() const { return nbytes_; }
  /// Copies host memory in (asynchronous on `stream`). Pageable memory is staged before the call
  /// returns and may be reused at once; page-locked memory (PinnedBuffer, cudaMallocHost) is read
  /// by the DMA when `stream` reaches the copy and must stay unchanged until then.
  void copy_from_host(const void* src, size_t nbytes, size_t offset, uintptr_t stream);
  /// Copies to host memory and synchronizes `stream` before returning.
  void copy_to_host(void* dst, size_t nbytes, size_t offset, uintptr_t stream) const;
  void zero(uintptr_t stream);

 private:
  void* ptr_ = nullptr;
  size_t nbytes_ = 0;
};

/// Owning non-blocking CUDA stream.
class Stream {
 public:
  Stream();
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  uintptr_t handle() const { return reinterpret_cast<uintptr_t>(stream_); }
  void synchronize() const;

 private:
  void* stream_ = nullptr;
};

void stream_synchronize(uintptr_t stream);
/// Whether work enqueued on `stream` now would be recorded into a graph (a capture open on the
/// stream or one it has joined); a call that allocates or waits must not be made then.
bool stream_capturing(uintptr_t stream);
/// Host -> device copy (asynchronous; pageable sources are staged before returning, page-locked
/// ones are read when `stream` reaches the copy and must stay unchanged until then).
void memcpy_htod(uintptr_t dst, const void* src, size_t nbytes, uintptr_t stream);
/// Device -> host copy; synchronizes `stream`.
void memcpy_dtoh(void* dst, uintptr_t src, size_t nbytes, uintptr_t stream);

/// Device -> device copy (asynchronous on `stream`).
void memcpy_dtod(uintptr_t dst, uintptr_t src, size_t nbytes, uintptr_t stream);

/// Throws std::invalid_argument when `ptr` is null or plain (unregistered) host memory.
void check_device_pointer(uintptr_t ptr, const char* name);
/// The same, and also when `ptr` is not a multiple of `align` bytes (the size of the elements a
/// kernel reads or writes there: a misaligned access is a sticky error that ends the context).
void check_device_pointer(uintptr_t ptr, const char* name, size_t align);

/// Pre-process n contiguous uint8 HWC frames of h x w on the device into out (n, 3, S, S) and,
/// when glance != 0, their glance (n, 3, P, P) computed from the float32 values: one launch of
/// each pass for the batch.
void preprocess(uintptr_t frames, int64_t n, int64_t h, int64_t w, bool bgr, int64_t resize_short,
                int64_t image_size, Interp interp, const float mean[3], const float std[3],
                uintptr_t out, DType out_dtype, uintptr_t glance, int64_t glance_size,
                Interp glance_interp, DType glance_dtype, uintptr_t stream);

/// Normalises n contiguous uint8 (S, S, 3) frames (no resize: preprocess() at crop_pct 1, bit
/// for bit) into float32 out (n, 3, S, S) and, when glance != 0, their float32 glance
/// (n, 3, P, P), in two launches for the whole batch.
void normalise_frames(uintptr_t frames, int64_t n, int64_t image_size, bool bgr, const float mean[3],
                      const float std[3], uintptr_t out, uintptr_t glance, int64_t glance_size,
                      Interp glance_interp, uintptr_t stream);

/// (n, 3, S, S) -> (n, 3, P, P), align_corners=True.
void glance(uintptr_t in, DType in_dtype, int64_t n, int64_t channels, int64_t in_size,
            uintptr_t out, DType out_dtype, int64_t out_size, Interp mode, uintptr_t stream);

/// Gathers (n, C, P, P) patches at device int32 coords (n, 2). Out-of-range coordinates
/// never cause an out-of-bounds read: that sample's patch is zero-filled and *error_flag
/// (a device int32 the caller zeroed) is set to 1. With error_flag == 0 the call uses an
/// internal flag, synchronizes `stream` and throws std::invalid_argument on a bad coordinate.
/// With rows != 0 (a device int32 array (n,)), patch i is cut from image rows[i] of the
/// `image_rows` images at `images` (a row outside [0, image_rows) is handled like a bad
/// coordinate); with rows == 0 from image i.
void crop_patches(uintptr_t images, DType dtype, int64_t n, int64_t channels, int64_t size,
                  uintptr_t coords, uintptr_t out, int64_t patch, uintptr_t error_flag,
                  uintptr_t stream, uintptr_t rows = 0, int64_t image_rows = 0);

/// Row gather: dst[i] = src[idx[i]] for i < n, rows of `row_bytes` bytes, idx a device int32
/// array (n,). src holds `src_rows` rows; src and dst must not overlap (std::invalid_argument).
/// An index outside [0, src_rows) never causes an out-of-bounds read: that row of dst is
/// zero-filled and *error_flag (a device int32 the caller zeroed) is set to 1. With
/// error_flag == 0 the call uses an internal flag, synchronizes `stream` and throws
/// std::invalid_argument on a bad index. Rows are copied 16 or 4 bytes at a time when the
/// row size and both pointers allow it, else byte by byte.
void gather_rows(uintptr_t src, int64_t src_rows, uintptr_t idx, uintptr_t dst, int64_t n,
                 int64_t row_bytes, uintptr_t error_flag, uintptr_t stream);

/// Row gather with host indices: validated here (std::invalid_argument), copied into
/// stream-ordered scratch memory, then gathered; asynchronous (the host array, pageable or
/// page-locked, may be reused as soon as the call returns: it is read once, when the call is made).
void gather_rows_host(uintptr_t src, int64_t src_rows, const int32_t* idx, uintptr_t dst,
                      int64_t n, int64_t row_bytes, uintptr_t stream);

/// Weights of a linear layer on the device (float32 or float16 storage, float32 bias).
class LinearWeights {
 public:
  LinearWeights(const float* w, const float* b, int64_t out_features, int64_t in_features,
                DType dtype);
  int64_t out_features() const { return out_; }
  int64_t in_features() const { return in_; }
  DType dtype() const { return dtype_; }
  uintptr_t weight_ptr() const { return w_.ptr(); }
  uintptr_t bias_ptr() const { return b_.ptr(); }

  /// out (nb, out_features) = x (nb, in_features) W^T + b (optionally ReLU).
  void forward(uintptr_t x, DType x_dtype, int64_t nb, uintptr_t out, DType out_dtype, bool relu,
               uintptr_t stream) const;

  /// Cascaded head: logits = W [f_0, ..., f_{k-1}] + b with the features in a (T, N, F)
  /// (tnf) or (N, T, F) buffer; k * F must equal in_features.
  void forward_segments(uintptr_t features, DType x_dtype, bool tnf, int64_t steps, int64_t nb,
                        int64_t feature_dim, int64_t k, uintptr_t out, DType out_dtype,
                        uintptr_t stream) const;

  /// forward / forward_segments into a float32 ``out`` with no pointer checks and no
  /// temporary allocation: for the fused heads, whose buffers are checked once by the caller
  /// and which must stay capturable into CUDA graphs (a graph that allocates cannot be the body
  /// of a conditional node, and a pointer it allocates is not valid until the graph runs).
  void forward_f32(uintptr_t x, DType x_dtype, int64_t nb, uintptr_t out, bool relu,
                   uintptr_t stream) const;
  void forward_segments_f32(uintptr_t features, DType x_dtype, bool tnf, int64_t steps,
                            int64_t nb, int64_t feature_dim, int64_t k, uintptr_t out,
                            uintptr_t stream) const;

 private:
  int64_t out_ = 0, in_ = 0;
  DType dtype_ = DType::kF32;
  DeviceBuffer w_, b_;
};

/// PyTorch GRU cell weights on the device (gate order r, z, n).
class GruWeights {
 public:
  GruWeights(const float* w_ih, const float* w_hh, const float* b_ih, const float* b_hh,
             int64_t input, int64_t hidden, DType dtype);
  int64_t input_size() const { return input_; }
  int64_t hidden_size() const { return hidden_; }
  DType dtype() const { return dtype_; }

  /// h_out (nb, H) float32 = GRUCell(x (nb, I), h (nb, H) float32 or 0 for zeros).
  /// h_out must not alias h.
  void step(uintptr_t x, DType x_dtype, uintptr_t h, int64_t nb, uintptr_t h_out,
            uintptr_t stream) const;

 private:
  int64_t input_ = 0, hidden_ = 0;
  DType dtype_ = DType::kF32;
  DeviceBuffer w_ih_, w_hh_, b_ih_, b_hh_;
};

/// Softmax max probability (float32) and argmax (int32) per row of float32 logits; when
/// logits_out != 0 the logits are also written there in `out_dtype`. More classes than an
/// int32 indexes (common/argmax.h, kMaxClasses) are refused (std::invalid_argument), as by
/// every classifier step.
void softmax_stats(uintptr_t logits_f32, int64_t nb, int64_t classes, uintptr_t maxprob,
                   uintptr_t argmax, uintptr_t logits_out, DType out_dtype, uintptr_t stream);

/// Actor epilogue: action = sigmoid(raw) (nb, 2) float32 and coords = floor(action * (S-P))
/// (nb, 2) int32.
void actor_epilogue(uintptr_t raw_f32, int64_t nb, int64_t range, uintptr_t action,
                    uintptr_t coords, uintptr_t stream);

/// A CUDA graph made by capturing the work enqueued on a stream (cudaStreamBeginCapture in
/// thread-local mode, cudaStreamEndCapture, cudaGraphInstantiate) and replayed with
/// cudaGraphLaunch. Every address the captured work used is baked in.
class Graph {
 public:
  /// std::runtime_error without a usable device (like every other CUDA object).
  Graph();
  ~Graph();
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  /// Starts capturing `stream` (std::runtime_error if this graph was captured already).
  void begin_capture(uintptr_t stream);
  /// Ends the capture started by begin_capture and instantiates the graph; on a capture
  /// that was invalidated (an unsupported call while capturing) throws std::runtime_error
  /// naming the CUDA error, and the stream is no longer capturing.
  void end_capture();
  /// Abandons a capture in progress (no-op when none is).
  void abort_capture();
  /// Enqueues one replay on `stream`.
  void launch(uintptr_t stream) const;
  bool ready() const { return exec_ != nullptr; }
  /// Number of nodes of the captured graph (0 before end_capture).
  size_t nodes() const { return nodes_; }
  /// The captured cudaGraph_t (0 before end_capture), e.g. to add it as a child graph node.
  uintptr_t handle() const { return reinterpret_cast<uintptr_t>(graph_); }
  /// The kind of each top-level node ("kernel", "memcpy", "memset", "mem_alloc", "mem_free",
  /// "graph", "empty", "conditional", "event", "other"): a graph with "mem_alloc" or
  /// "mem_free" nodes cannot be a child graph node or a conditional node's body.
  std::vector<std::string> node_kinds() const;

 private:
  void* graph_ = nullptr;  // cudaGraph_t
  void* exec_ = nullptr;   // cudaGraphExec_t
  uintptr_t capturing_ = 0;
  bool is_capturing_ = false;
  size_t nodes_ = 0;
};

/// A CUDA event with timing, recorded on a stream (device-time profiling without
/// synchronizing the stream per stage).
class Event {
 public:
  Event();
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(uintptr_t stream);
  /// Makes later work on `stream` wait for this event (cudaStreamWaitEvent; the host does not wait).
  void wait(uintptr_t stream) const;
  void synchronize() const;
  /// Milliseconds from `start` to this event (both recorded; waits for this one).
  float elapsed_since(const Event& start) const;

 private:
  void* event_ = nullptr;
};

/// Page-locked host memory (cudaMallocHost): device -> host copies into it are direct DMA.
class PinnedBuffer {
 public:
  explicit PinnedBuffer(size_t nbytes);
  ~PinnedBuffer();
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void* data() const { return ptr_; }
  size_t nbytes() const { return nbytes_; }

 private:
  void* ptr_ = nullptr;
  size_t nbytes_ = 0;
};

/// Stream-ordered scratch allocation: cudaMallocAsync from the device's memory pool where the
/// device has pools (legal while `stream` is captured into a graph, which then holds mem_alloc /
/// mem_free nodes), else cudaMalloc, which a capture does not allow: on such a device a Scratch
/// made while `stream` captures throws std::runtime_error naming the rule (scratch_rule.h)
/// before any CUDA call that would invalidate the capture.
class Scratch {
 public:
  Scratch(size_t nbytes, uintptr_t stream);
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  uintptr_t ptr() const { return reinterpret_cast<uintptr_t>(ptr_); }

 private:
  void* ptr_ = nullptr;
  uintptr_t stream_ = 0;
  bool async_ = false;
};

/// A kernel's device error flag (int32): the caller's (``given`` != 0, asynchronous: the caller
/// reads it), or an owned zeroed scratch flag that :meth:`raise_if_set` reads back after the
/// launch (synchronous), throwing std::invalid_argument with ``message`` when it was set.
class ErrorFlag {
 public:
  ErrorFlag(uintptr_t given, uintptr_t stream);
  int* get() const { return flag_; }
  void raise_if_set(const std::string& message) const;

 private:
  std::unique_ptr<Scratch> own_;
  int* flag_ = nullptr;
  uintptr_t stream_ = 0;
};

/// A GRU cell fused with its Linear head (classifier or actor) on the device.
class GruHead {
 public:
  GruHead(const float* w_ih, const float* w_hh, const float* b_ih, const float* b_hh,
          int64_t input, int64_t hidden, const float* w_out, const float* b_out,
          int64_t out_features, DType dtype);
  int64_t input_size() const { return gru_.input_size(); }
  int64_t hidden_size() const { return gru_.hidden_size(); }
  int64_t out_features() const { return head_.out_features(); }

  /// h_out = GRU(x, h); logits = W h_out + b (float32 or float16), maxprob float32 and
  /// argmax int32 per row (maxprob / argmax may be 0 to skip them). With float32 logits the
  /// step allocates nothing (it can be captured into a graph).
  void step_classifier(uintptr_t x, DType x_dtype, uintptr_t h, int64_t nb, uintptr_t h_out,
                       uintptr_t logits, DType logits_dtype, uintptr_t maxprob,
                       uintptr_t argmax, uintptr_t stream) const;

  /// h_out = GRU(x, h); action = sigmoid(W h_out + b) (nb, 2) float32;
  /// coords = floor(action * (image_size - patch_size)) (nb, 2) int32. With an ``action``
  /// buffer the step allocates nothing (it can be captured into a graph); without one it takes
  /// stream-ordered scratch for the raw outputs.
  void step_actor(uintptr_t x, DType x_dtype, uintptr_t h, int64_t nb, uintptr_t h_out,
                  uintptr_t action, uintptr_t coords, int64_t image_size, int64_t patch_size,
                  uintptr_t stream) const;

 private:
  GruWeights gru_;
  LinearWeights head_;
};

/// Cascaded classifier step: logits = layer([f_0, ..., f_{k-1}]) plus max prob / argmax.
/// With float32 logits it allocates nothing (it can be captured into a graph).
void cascaded_step(const LinearWeights& layer, uintptr_t features, DType x_dtype, bool tnf,
                   int64_t steps, int64_t nb, int64_t feature_dim, int64_t k, uintptr_t logits,
                   DType logits_dtype, uintptr_t maxprob, uintptr_t argmax, uintptr_t stream);

}  // namespace gfn::cuda
