// CUDA GRU cell, linear / cascaded heads and their epilogues (softmax stats, actor).
//
// Matrix-vector products are memory-bound: one warp owns one output row (or one GRU
// hidden unit, i.e. six rows) for a tile of batch items, lanes stride over the inputs
// so weight loads are coalesced, and the partial sums are combined with warp shuffles.
#include <cuda_runtime.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/argmax.h"
#include "../common/grid.h"
#include "../common/gates.h"
#include "../common/half.h"
#include "../common/interp.h"
#include "api.h"
#include "check.h"

namespace gfn::cuda {
namespace {

constexpr int kWarps = 8;          // warps per block
constexpr int kBatchTile = 8;      // batch items per warp
constexpr int kBlock = 32 * kWarps;

__device__ inline float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ inline float load_f(const float* p, int64_t i) { return p[i]; }
__device__ inline float load_f(const uint16_t* p, int64_t i) {
  return __half2float(__ushort_as_half(p[i]));  // exact, as half_to_float
}

// Vector loads of kVec consecutive elements (two float4 or one uint4 of halves). The caller
// guarantees 16-byte alignment (see vector_ok()).
constexpr int kVec = 8;

__device__ inline void load_vec(const float* p, float (&v)[kVec]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

__device__ inline void load_vec(const uint16_t* p, float (&v)[kVec]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // little endian: the low half is the earlier element
    v[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[i] & 0xFFFFu)));
    v[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[i] >> 16)));
  }
}

// Accumulates acc[g][b] += sum_c W[g * hidden + j, c] * v[b0 + b, c] over c < K for the
// three gate rows of hidden unit j; lanes stride over the inputs (vectors when VEC).
template <bool VEC, typename WT, typename VT>
__device__ inline void gate_dots(const WT* __restrict__ w, int64_t hidden, int64_t j, int64_t K,
                                 const VT* __restrict__ v, int64_t nb, int64_t b0, int lane,
                                 float (&acc)[3][kBatchTile]) {
  int64_t start = 0;
  if (VEC) {
    const int64_t nvec = K / kVec;
    for (int64_t q = lane; q < nvec; q += 32) {
      float wv[3][kVec];
#pragma unroll
      for (int g = 0; g < 3; ++g) load_vec(w + (g * hidden + j) * K + q * kVec, wv[g]);
#pragma unroll
      for (int b = 0; b < kBatchTile; ++b) {
        if (b0 + b >= nb) break;
        float xv[kVec];
        load_vec(v + (b0 + b) * K + q * kVec, xv);
#pragma unroll
        for (int g = 0; g < 3; ++g) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[g][b] += wv[g][e] * xv[e];
        }
      }
    }
    start = nvec * kVec;
  }
  for (int64_t c = start + lane; c < K; c += 32) {
    float xv[kBatchTile];
#pragma unroll
    for (int b = 0; b < kBatchTile; ++b) xv[b] = (b0 + b < nb) ? load_f(v, (b0 + b) * K + c) : 0.0f;
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      const float wv = load_f(w, (g * hidden + j) * K + c);
#pragma unroll
      for (int b = 0; b < kBatchTile; ++b) acc[g][b] += wv * xv[b];
    }
  }
}

bool aligned16(uintptr_t p) { return p % 16 == 0; }

template <bool VEC, typename WT, typename XT>
__global__ void gru_kernel(const WT* __restrict__ w_ih, const WT* __restrict__ w_hh,
                           const float* __restrict__ b_ih, const float* __restrict__ b_hh,
                           const XT* __restrict__ x, const float* __restrict__ h, int64_t nb,
                           int64_t input, int64_t hidden, float* __restrict__ h_out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Warps stride over the hidden units and blocks of y over the batch tiles (common/grid.h);
  // both loops are the same for every lane of a warp, as the shuffles of warp_sum need.
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kWarps + warp; j < hidden;
       j += static_cast<int64_t>(gridDim.x) * kWarps) {
    for (int64_t b0 = static_cast<int64_t>(blockIdx.y) * kBatchTile; b0 < nb;
         b0 += static_cast<int64_t>(gridDim.y) * kBatchTile) {
      float ai[3][kBatchTile], ah[3][kBatchTile];
#pragma unroll
      for (int g = 0; g < 3; ++g) {
#pragma unroll
        for (int b = 0; b < kBatchTile; ++b) ai[g][b] = ah[g][b] = 0.0f;
      }
      gate_dots<VEC>(w_ih, hidden, j, input, x, nb, b0, lane, ai);
      if (h != nullptr) gate_dots<VEC>(w_hh, hidden, j, hidden, h, nb, b0, lane, ah);
#pragma unroll
      for (int g = 0; g < 3; ++g) {
#pragma unroll
        for (int b = 0; b < kBatchTile; ++b) {
          ai[g][b] = warp_sum(ai[g][b]);
          ah[g][b] = warp_sum(ah[g][b]);
        }
      }
      if (lane == 0) {
#pragma unroll
        for (int b = 0; b < kBatchTile; ++b) {
          const int64_t bi = b0 + b;
          if (bi >= nb) continue;
          const float hprev = h != nullptr ? h[bi * hidden + j] : 0.0f;
          h_out[bi * hidden + j] =
              gru_unit(ai[0][b] + b_ih[j], ai[1][b] + b_ih[hidden + j], ai[2][b] + b_ih[2 * hidden + j],
                       ah[0][b] + b_hh[j], ah[1][b] + b_hh[hidden + j], ah[2][b] + b_hh[2 * hidden + j],
                       hprev);
        }
      }
    }
  }
}

// out[b, o] = sum_t sum_f W[o, t * F + f] * x_t[b, f] + bias[o]; x_t at
// (tnf ? (t * nb + b) : (b * steps + t)) * F. A plain linear layer is nseg = 1, F = K.
template <bool VEC, typename WT, typename XT>
__global__ void linear_kernel(const WT* __restrict__ w, const float* __restrict__ bias,
                              const XT* __restrict__ x, int64_t nb, int64_t rows, int64_t nseg,
                              int64_t feature_dim, int tnf, int64_t steps, int relu,
                              float* __restrict__ out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t k_total = nseg * feature_dim;
  // Warps stride over the output rows and blocks of y over the batch tiles (common/grid.h);
  // both loops are the same for every lane of a warp, as the shuffles of warp_sum need.
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * kWarps + warp; o < rows;
       o += static_cast<int64_t>(gridDim.x) * kWarps) {
    for (int64_t b0 = static_cast<int64_t>(blockIdx.y) * kBatchTile; b0 < nb;
         b0 += static_cast<int64_t>(gridDim.y) * kBatchTile) {
      float acc[kBatchTile];
#pragma unroll
      for (int b = 0; b < kBatchTile; ++b) acc[b] = 0.0f;
      for (int64_t t = 0; t < nseg; ++t) {
        const WT* wr = w + o * k_total + t * feature_dim;
        int64_t xoff[kBatchTile];
#pragma unroll
        for (int b = 0; b < kBatchTile; ++b) {
          const int64_t bi = b0 + b < nb ? b0 + b : nb - 1;
          xoff[b] = (tnf ? (t * nb + bi) : (bi * steps + t)) * feature_dim;
        }
        int64_t f0 = 0;
        if (VEC) {
          const int64_t nvec = feature_dim / kVec;
          for (int64_t q = lane; q < nvec; q += 32) {
            float wv[kVec];
            load_vec(wr + q * kVec, wv);
#pragma unroll
            for (int b = 0; b < kBatchTile; ++b) {
              if (b0 + b >= nb) break;
              float xv[kVec];
              load_vec(x + xoff[b] + q * kVec, xv);
#pragma unroll
              for (int e = 0; e < kVec; ++e) acc[b] += wv[e] * xv[e];
            }
          }
          f0 = nvec * kVec;
        }
        for (int64_t f = f0 + lane; f < feature_dim; f += 32) {
          const float wv = load_f(wr, f);
#pragma unroll
          for (int b = 0; b < kBatchTile; ++b) acc[b] += wv * load_f(x, xoff[b] + f);
        }
      }
#pragma unroll
      for (int b = 0; b < kBatchTile; ++b) acc[b] = warp_sum(acc[b]);
      if (lane == 0) {
#pragma unroll
        for (int b = 0; b < kBatchTile; ++b) {
          if (b0 + b >= nb) continue;
          const float v = acc[b] + bias[o];
          out[(b0 + b) * rows + o] = relu ? gfn::relu(v) : v;
        }
      }
    }
  }
}

// One block per row, blocks striding over the rows (int64 row index: any number of rows, more
// than the grid holds): max / argmax (common/argmax.h), then sum of exp; optional logits copy.
__global__ void softmax_stats_kernel(const float* __restrict__ logits, int64_t nb, int64_t classes,
                                     float* __restrict__ maxprob, int32_t* __restrict__ argmax,
                                     float* __restrict__ out_f32, uint16_t* __restrict__ out_f16) {
  __shared__ float s_val[kBlock];
  __shared__ int64_t s_idx[kBlock];
  for (int64_t row = blockIdx.x; row < nb; row += gridDim.x) {
    const float* l = logits + row * classes;
    float best = -INFINITY;
    int64_t best_i = classes;  // "none yet"
    for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) {
      const float v = l[c];
      if (out_f32) out_f32[row * classes + c] = v;
      if (out_f16) out_f16[row * classes + c] = float_to_half(v);
      if (best_i == classes || argmax_takes(v, c, best, best_i)) {
        best = v;
        best_i = c;
      }
    }
    s_val[threadIdx.x] = best;
    s_idx[threadIdx.x] = best_i;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) {
        const float ov = s_val[threadIdx.x + stride];
        const int64_t oi = s_idx[threadIdx.x + stride];
        const float mv = s_val[threadIdx.x];
        const int64_t mi = s_idx[threadIdx.x];
        // `classes` marks a thread that saw no column.
        const bool take = oi != classes && (mi == classes || argmax_takes(ov, oi, mv, mi));
        if (take) {
          s_val[threadIdx.x] = ov;
          s_idx[threadIdx.x] = oi;
        }
      }
      __syncthreads();
    }
    const float m = s_val[0];
    const int64_t am = s_idx[0];
    __syncthreads();
    float sum = 0.0f;
    for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) sum += expf(l[c] - m);
    s_val[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) s_val[threadIdx.x] += s_val[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      if (maxprob) maxprob[row] = 1.0f / s_val[0];
      if (argmax) argmax[row] = static_cast<int32_t>(am);
    }
    __syncthreads();  // thread 0 has read s_val[0] before the next row overwrites it
  }
}

// raw and action may be the same buffer (the fused actor step rewrites its raw outputs in
// place): each thread reads its element before writing it, so they carry no __restrict__.
__global__ void actor_kernel(const float* raw, int64_t n, int range, float* action,
                             int32_t* __restrict__ coords) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const float a = sigmoid(raw[i]);
    if (action) action[i] = a;
    if (coords) coords[i] = patch_coord(a, range);
  }
}

__global__ void to_half_kernel(const float* __restrict__ in, int64_t n, uint16_t* __restrict__ out) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    out[i] = float_to_half(in[i]);
  }
}

std::vector<uint16_t> to_half(const float* src, size_t n) {
  std::vector<uint16_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = float_to_half(src[i]);
  return out;
}

// Weight uploads go to a private non-blocking stream that is synchronized before the weights are
// used (finish_uploads): a non-blocking stream is not ordered after the legacy stream, and a
// device-wide cudaDeviceSynchronize is invalid while any stream of the device is being captured
// (a graph capture on another thread, e.g. a second Runtime).
class Uploads {
 public:
  Uploads() { GFN_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Uploads() {
    if (s_ != nullptr) (void)cudaStreamDestroy(s_);
    (void)cudaGetLastError();
  }
  Uploads(const Uploads&) = delete;
  Uploads& operator=(const Uploads&) = delete;
  // Waits for every upload (the host vectors of float16 conversions must outlive it).
  void finish() { GFN_CUDA_CHECK(cudaStreamSynchronize(s_)); }

  // float32 weights as float32 or float16.
  void weights(DeviceBuffer& buf, const float* src, size_t n, DType dtype) {
    if (n == 0) return;
    if (dtype == DType::kF32) {
      GFN_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(buf.ptr()), src, n * sizeof(float),
                                     cudaMemcpyHostToDevice, s_));
    } else {
      halves_.push_back(to_half(src, n));
      GFN_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(buf.ptr()), halves_.back().data(),
                                     n * sizeof(uint16_t), cudaMemcpyHostToDevice, s_));
    }
  }

  void bias(DeviceBuffer& buf, const float* src, size_t n) {
    if (n == 0) return;
    if (src == nullptr) {
      GFN_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(buf.ptr()), 0, n * sizeof(float), s_));
    } else {
      GFN_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(buf.ptr()), src, n * sizeof(float),
                                     cudaMemcpyHostToDevice, s_));
    }
  }

 private:
  cudaStream_t s_ = nullptr;
  std::vector<std::vector<uint16_t>> halves_;
};

template <typename WT, typename XT>
void launch_linear(uintptr_t w, uintptr_t bias, uintptr_t x, int64_t nb, int64_t rows, int64_t nseg,
                   int64_t feature_dim, bool tnf, int64_t steps, bool relu, float* out,
                   cudaStream_t s) {
  const dim3 grid(capped_blocks(rows, kWarps), capped_blocks(nb, kBatchTile));
  const bool vec = feature_dim % kVec == 0 && aligned16(w) && aligned16(x);
  auto kernel = vec ? linear_kernel<true, WT, XT> : linear_kernel<false, WT, XT>;
  kernel<<<grid, kBlock, 0, s>>>(
      reinterpret_cast<const WT*>(w), reinterpret_cast<const float*>(bias),
      reinterpret_cast<const XT*>(x), nb, rows, nseg, feature_dim, tnf ? 1 : 0, steps,
      relu ? 1 : 0, out);
  GFN_CUDA_CHECK_LAUNCH();
}

void linear_dispatch(DType wt, DType xt, uintptr_t w, uintptr_t bias, uintptr_t x, int64_t nb,
                     int64_t rows, int64_t nseg, int64_t feature_dim, bool tnf, int64_t steps,
                     bool relu, float* out, cudaStream_t s) {
  if (nb <= 0 || rows <= 0) return;
  if (wt == DType::kF32 && xt == DType::kF32) {
    launch_linear<float, float>(w, bias, x, nb, rows, nseg, feature_dim, tnf, steps, relu, out, s);
  } else if (wt == DType::kF32) {
    launch_linear<float, uint16_t>(w, bias, x, nb, rows, nseg, feature_dim, tnf, steps, relu, out, s);
  } else if (xt == DType::kF32) {
    launch_linear<uint16_t, float>(w, bias, x, nb, rows, nseg, feature_dim, tnf, steps, relu, out, s);
  } else {
    launch_linear<uint16_t, uint16_t>(w, bias, x, nb, rows, nseg, feature_dim, tnf, steps, relu, out, s);
  }
}

// Writes a float32 result to `out` in `dtype` (a copy or a conversion).
void store_result(const float* src, int64_t n, uintptr_t out, DType dtype, cudaStream_t s) {
  if (n <= 0) return;
  if (dtype == DType::kF32) {
    GFN_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(out), src, n * sizeof(float),
                                   cudaMemcpyDeviceToDevice, s));
  } else {
    to_half_kernel<<<capped_blocks(n, 256), 256, 0, s>>>(
        src, n, reinterpret_cast<uint16_t*>(out));
    GFN_CUDA_CHECK_LAUNCH();
  }
}

struct GruArgs {
  uintptr_t w_ih, w_hh;
  const float *b_ih, *b_hh;
  uintptr_t x;
  const float* h;
  int64_t nb, input, hidden;
  float* h_out;
};

template <typename WT, typename XT>
void launch_gru(const dim3& grid, bool vec, const GruArgs& a, cudaStream_t s) {
  auto kernel = vec ? gru_kernel<true, WT, XT> : gru_kernel<false, WT, XT>;
  kernel<<<grid, kBlock, 0, s>>>(reinterpret_cast<const WT*>(a.w_ih), reinterpret_cast<const WT*>(a.w_hh),
                                 a.b_ih, a.b_hh, reinterpret_cast<const XT*>(a.x), a.h, a.nb, a.input,
                                 a.hidden, a.h_out);
}

void check_batch(int64_t nb) {
  if (nb < 1) throw std::invalid_argument("batch size must be >= 1, got " + std::to_string(nb));
}

// A cascaded layer reads k features of feature_dim from a buffer of `steps` steps.
void check_segments(int64_t in, int64_t k, int64_t steps, int64_t feature_dim) {
  if (k < 1 || k > steps || k * feature_dim != in) {
    throw std::invalid_argument("cascaded layer expects " + std::to_string(in) +
                                " inputs, got k=" + std::to_string(k) + " features of " +
                                std::to_string(feature_dim) + " (buffer holds " +
                                std::to_string(steps) + " steps)");
  }
}

// The checks of a cascaded layer's call on `steps` step features of `feature_dim`.
void check_segment_call(int64_t in, uintptr_t features, DType x_dtype, int64_t steps, int64_t nb,
                        int64_t feature_dim, int64_t k) {
  require_device();
  check_batch(nb);
  check_segments(in, k, steps, feature_dim);
  check_device_pointer(features, "features", elem_size(x_dtype));
}

// softmax_stats without the pointer checks (its callers here have made them).
void launch_softmax_stats(uintptr_t logits_f32, int64_t nb, int64_t classes, uintptr_t maxprob,
                          uintptr_t argmax, uintptr_t logits_out, DType out_dtype, uintptr_t stream) {
  require_device();
  check_batch(nb);
  check_classes(classes);
  const cudaStream_t s = as_stream(stream);
  float* out32 = (logits_out != 0 && out_dtype == DType::kF32) ? reinterpret_cast<float*>(logits_out) : nullptr;
  uint16_t* out16 = (logits_out != 0 && out_dtype == DType::kF16) ? reinterpret_cast<uint16_t*>(logits_out) : nullptr;
  softmax_stats_kernel<<<capped_blocks(nb, 1), kBlock, 0, s>>>(
      reinterpret_cast<const float*>(logits_f32), nb, classes, reinterpret_cast<float*>(maxprob),
      reinterpret_cast<int32_t*>(argmax), out32, out16);
  GFN_CUDA_CHECK_LAUNCH();
}

// Float32 logits from `produce(out)`, with max prob / argmax: written straight into the
// caller's float32 logits (nothing allocated: the step can be captured into a graph), else
// into stream-ordered scratch that softmax_stats converts into the caller's dtype.
template <typename Produce>
void logits_step(Produce produce, int64_t nb, int64_t classes, uintptr_t logits,
                 DType logits_dtype, uintptr_t maxprob, uintptr_t argmax, uintptr_t stream) {
  if (logits != 0) check_device_pointer(logits, "logits", elem_size(logits_dtype));
  if (maxprob != 0) check_device_pointer(maxprob, "maxprob", sizeof(float));
  if (argmax != 0) check_device_pointer(argmax, "argmax", sizeof(int32_t));
  if (logits != 0 && logits_dtype == DType::kF32) {
    produce(logits);
    if (maxprob != 0 || argmax != 0) {
      launch_softmax_stats(logits, nb, classes, maxprob, argmax, 0, DType::kF32, stream);
    }
    return;
  }
  Scratch raw(static_cast<size_t>(nb * classes) * sizeof(float), stream);
  produce(raw.ptr());
  launch_softmax_stats(raw.ptr(), nb, classes, maxprob, argmax, logits, logits_dtype, stream);
}

}  // namespace

// ------------------------------------------------------------------ LinearWeights ----

LinearWeights::LinearWeights(const float* w, const float* b, int64_t out_features,
                             int64_t in_features, DType dtype)
    : out_(out_features),
      in_(in_features),
      dtype_(dtype),
      w_(static_cast<size_t>(out_features * in_features) * elem_size(dtype)),
      b_(static_cast<size_t>(out_features) * sizeof(float)) {
  Uploads up;
  up.weights(w_, w, static_cast<size_t>(out_features * in_features), dtype);
  up.bias(b_, b, static_cast<size_t>(out_features));
  up.finish();
}

void LinearWeights::forward(uintptr_t x, DType x_dtype, int64_t nb, uintptr_t out,
                            DType out_dtype, bool relu, uintptr_t stream) const {
  require_device();
  check_batch(nb);
  check_device_pointer(x, "x", elem_size(x_dtype));
  check_device_pointer(out, "out", elem_size(out_dtype));
  if (out_dtype == DType::kF32) {
    forward_f32(x, x_dtype, nb, out, relu, stream);
    return;
  }
  Scratch tmp(static_cast<size_t>(nb * out_) * sizeof(float), stream);
  forward_f32(x, x_dtype, nb, tmp.ptr(), relu, stream);
  store_result(reinterpret_cast<float*>(tmp.ptr()), nb * out_, out, out_dtype, as_stream(stream));
}

void LinearWeights::forward_f32(uintptr_t x, DType x_dtype, int64_t nb, uintptr_t out, bool relu,
                                uintptr_t stream) const {
  linear_dispatch(dtype_, x_dtype, w_.ptr(), b_.ptr(), x, nb, out_, 1, in_, true, 1, relu,
                  reinterpret_cast<float*>(out), as_stream(stream));
}

void LinearWeights::forward_segments_f32(uintptr_t features, DType x_dtype, bool tnf,
                                         int64_t steps, int64_t nb, int64_t feature_dim,
                                         int64_t k, uintptr_t out, uintptr_t stream) const {
  linear_dispatch(dtype_, x_dtype, w_.ptr(), b_.ptr(), features, nb, out_, k, feature_dim, tnf,
                  steps, false, reinterpret_cast<float*>(out), as_stream(stream));
}

void LinearWeights::forward_segments(uintptr_t features, DType x_dtype, bool tnf, int64_t steps,
                                     int64_t nb, int64_t feature_dim, int64_t k, uintptr_t out,
                                     DType out_dtype, uintptr_t stream) const {
  check_segment_call(in_, features, x_dtype, steps, nb, feature_dim, k);
  check_device_pointer(out, "out", elem_size(out_dtype));
  if (out_dtype == DType::kF32) {
    forward_segments_f32(features, x_dtype, tnf, steps, nb, feature_dim, k, out, stream);
    return;
  }
  Scratch tmp(static_cast<size_t>(nb * out_) * sizeof(float), stream);
  forward_segments_f32(features, x_dtype, tnf, steps, nb, feature_dim, k, tmp.ptr(), stream);
  store_result(reinterpret_cast<float*>(tmp.ptr()), nb * out_, out, out_dtype, as_stream(stream));
}

// --------------------------------------------------------------------- GruWeights ----

GruWeights::GruWeights(const float* w_ih, const float* w_hh, const float* b_ih,
                       const float* b_hh, int64_t input, int64_t hidden, DType dtype)
    : input_(input),
      hidden_(hidden),
      dtype_(dtype),
      w_ih_(static_cast<size_t>(3 * hidden * input) * elem_size(dtype)),
      w_hh_(static_cast<size_t>(3 * hidden * hidden) * elem_size(dtype)),
      b_ih_(static_cast<size_t>(3 * hidden) * sizeof(float)),
      b_hh_(static_cast<size_t>(3 * hidden) * sizeof(float)) {
  Uploads up;
  up.weights(w_ih_, w_ih, static_cast<size_t>(3 * hidden * input), dtype);
  up.weights(w_hh_, w_hh, static_cast<size_t>(3 * hidden * hidden), dtype);
  up.bias(b_ih_, b_ih, static_cast<size_t>(3 * hidden));
  up.bias(b_hh_, b_hh, static_cast<size_t>(3 * hidden));
  up.finish();
}

void GruWeights::step(uintptr_t x, DType x_dtype, uintptr_t h, int64_t nb, uintptr_t h_out,
                      uintptr_t stream) const {
  require_device();
  check_batch(nb);
  check_device_pointer(x, "x", elem_size(x_dtype));
  check_device_pointer(h_out, "h_out", sizeof(float));
  if (h != 0) {
    check_device_pointer(h, "h", sizeof(float));
    if (h == h_out) throw std::invalid_argument("h_out must not alias h");
  }
  const cudaStream_t s = as_stream(stream);
  const dim3 grid(capped_blocks(hidden_, kWarps), capped_blocks(nb, kBatchTile));
  const float* hp = reinterpret_cast<const float*>(h);
  float* ho = reinterpret_cast<float*>(h_out);
  const float* bi = reinterpret_cast<const float*>(b_ih_.ptr());
  const float* bh = reinterpret_cast<const float*>(b_hh_.ptr());
  const bool vec = input_ % kVec == 0 && hidden_ % kVec == 0 && aligned16(w_ih_.ptr()) &&
                   aligned16(w_hh_.ptr()) && aligned16(x) && (h == 0 || aligned16(h));
  const auto args = GruArgs{w_ih_.ptr(), w_hh_.ptr(), bi, bh, x, hp, nb, input_, hidden_, ho};
  if (dtype_ == DType::kF32 && x_dtype == DType::kF32) {
    launch_gru<float, float>(grid, vec, args, s);
  } else if (dtype_ == DType::kF32) {
    launch_gru<float, uint16_t>(grid, vec, args, s);
  } else if (x_dtype == DType::kF32) {
    launch_gru<uint16_t, float>(grid, vec, args, s);
  } else {
    launch_gru<uint16_t, uint16_t>(grid, vec, args, s);
  }
  GFN_CUDA_CHECK_LAUNCH();
}

// ------------------------------------------------------------------ epilogues ----

void softmax_stats(uintptr_t logits_f32, int64_t nb, int64_t classes, uintptr_t maxprob,
                   uintptr_t argmax, uintptr_t logits_out, DType out_dtype, uintptr_t stream) {
  check_device_pointer(logits_f32, "logits", sizeof(float));
  if (maxprob != 0) check_device_pointer(maxprob, "maxprob", sizeof(float));
  if (argmax != 0) check_device_pointer(argmax, "argmax", sizeof(int32_t));
  if (logits_out != 0) check_device_pointer(logits_out, "logits_out", elem_size(out_dtype));
  launch_softmax_stats(logits_f32, nb, classes, maxprob, argmax, logits_out, out_dtype, stream);
}

void actor_epilogue(uintptr_t raw_f32, int64_t nb, int64_t range, uintptr_t action,
                    uintptr_t coords, uintptr_t stream) {
  require_device();
  check_batch(nb);
  const int64_t n = 2 * nb;
  actor_kernel<<<capped_blocks(n, 256), 256, 0, as_stream(stream)>>>(
      reinterpret_cast<const float*>(raw_f32), n, static_cast<int>(range),
      reinterpret_cast<float*>(action), reinterpret_cast<int32_t*>(coords));
  GFN_CUDA_CHECK_LAUNCH();
}

// ------------------------------------------------------------------ fused heads ----

GruHead::GruHead(const float* w_ih, const float* w_hh, const float* b_ih, const float* b_hh,
                 int64_t input, int64_t hidden, const float* w_out, const float* b_out,
                 int64_t out_features, DType dtype)
    : gru_(w_ih, w_hh, b_ih, b_hh, input, hidden, dtype),
      head_(w_out, b_out, out_features, hidden, dtype) {}

void GruHead::step_classifier(uintptr_t x, DType x_dtype, uintptr_t h, int64_t nb,
                              uintptr_t h_out, uintptr_t logits, DType logits_dtype,
                              uintptr_t maxprob, uintptr_t argmax, uintptr_t stream) const {
  check_classes(head_.out_features());
  gru_.step(x, x_dtype, h, nb, h_out, stream);  // checks x, h, h_out
  logits_step([&](uintptr_t out) { head_.forward_f32(h_out, DType::kF32, nb, out, false, stream); },
              nb, head_.out_features(), logits, logits_dtype, maxprob, argmax, stream);
}

void GruHead::step_actor(uintptr_t x, DType x_dtype, uintptr_t h, int64_t nb, uintptr_t h_out,
                         uintptr_t action, uintptr_t coords, int64_t image_size,
                         int64_t patch_size, uintptr_t stream) const {
  if (head_.out_features() != 2) {
    throw std::invalid_argument("an actor head has 2 outputs, this one has " +
                                std::to_string(head_.out_features()));
  }
  if (patch_size < 1 || patch_size > image_size) {
    throw std::invalid_argument("need 1 <= patch_size <= image_size");
  }
  if (action != 0) check_device_pointer(action, "action", sizeof(float));
  if (coords != 0) check_device_pointer(coords, "coords", sizeof(int32_t));
  gru_.step(x, x_dtype, h, nb, h_out, stream);
  // The raw outputs go to the caller's action buffer, which the epilogue then rewrites in
  // place (one element per thread); without one, to stream-ordered scratch.
  std::unique_ptr<Scratch> scratch;
  if (action == 0) scratch = std::make_unique<Scratch>(static_cast<size_t>(nb * 2) * sizeof(float), stream);
  const uintptr_t raw = action != 0 ? action : scratch->ptr();
  head_.forward_f32(h_out, DType::kF32, nb, raw, false, stream);
  actor_epilogue(raw, nb, image_size - patch_size, action, coords, stream);
}

void cascaded_step(const LinearWeights& layer, uintptr_t features, DType x_dtype, bool tnf,
                   int64_t steps, int64_t nb, int64_t feature_dim, int64_t k, uintptr_t logits,
                   DType logits_dtype, uintptr_t maxprob, uintptr_t argmax, uintptr_t stream) {
  check_classes(layer.out_features());
  check_segment_call(layer.in_features(), features, x_dtype, steps, nb, feature_dim, k);
  logits_step([&](uintptr_t out) {
                layer.forward_segments_f32(features, x_dtype, tnf, steps, nb, feature_dim, k, out, stream);
              },
              nb, layer.out_features(), logits, logits_dtype, maxprob, argmax, stream);
}

}  // namespace gfn::cuda
