// CUDA pre-processing, glance and patch-crop kernels.
//
// The resize reuses the host plan of the CPU path (same int16 weights, same integer
// arithmetic), so the device output is bit-identical to the CPU output before the
// float16 conversion; the glance uses the shared float32 tap math.
#include <cuda_runtime.h>

#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "../common/gates.h"
#include "../common/grid.h"
#include "../common/half.h"
#include "../common/interp.h"
#include "../common/lru_cache.h"
#include "../common/resize_plan.h"
#include "api.h"
#include "check.h"

namespace gfn::cuda {
namespace {

constexpr int kThreads = 256;

// --------------------------------------------------------------- device tables ----

// Layout (int32): col_start[S] col_count[S] col_w[S*ht] row_start[S] row_count[S] row_w[S*vt]
struct DeviceTables {
  std::unique_ptr<DeviceBuffer> buf;
  int64_t htaps = 0, vtaps = 0;
  int hprec = 0, vprec = 0;
  int64_t row_lo = 0, nrows = 0;
  int64_t off_col_start = 0, off_col_count = 0, off_col_w = 0;
  int64_t off_row_start = 0, off_row_count = 0, off_row_w = 0;
};

// Copies the tables to a new device buffer and waits for the copy. Outside a capture on `s` (a
// pageable cudaMemcpy may return before its DMA lands, and a non-blocking stream is not ordered
// after the legacy stream: the copy is waited for before any stream may read it). While `s` is
// capturing, neither the copy nor the wait may join the graph (a graph replaying the copy would
// read a host vector freed by then, and waiting on a capturing stream ends the capture): the
// buffer is allocated in relaxed capture mode and filled on a private stream outside it.
std::unique_ptr<DeviceBuffer> upload(const std::vector<int32_t>& host, cudaStream_t s, bool in_capture) {
  const size_t nbytes = host.size() * sizeof(int32_t);
  if (!in_capture) {
    auto buf = std::make_unique<DeviceBuffer>(nbytes);
    GFN_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(buf->ptr()), host.data(), nbytes,
                                   cudaMemcpyHostToDevice, s));
    GFN_CUDA_CHECK(cudaStreamSynchronize(s));
    return buf;
  }
  const RelaxedCapture relaxed;
  struct PrivateStream {
    cudaStream_t s = nullptr;
    ~PrivateStream() {
      if (s != nullptr) (void)cudaStreamDestroy(s);
    }
  } up;
  auto buf = std::make_unique<DeviceBuffer>(nbytes);
  GFN_CUDA_CHECK(cudaStreamCreateWithFlags(&up.s, cudaStreamNonBlocking));
  GFN_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(buf->ptr()), host.data(), nbytes,
                                 cudaMemcpyHostToDevice, up.s));
  GFN_CUDA_CHECK(cudaStreamSynchronize(up.s));
  return buf;
}

// The tables of one frame size, resize and crop. Launches outside a capture share the 32 most
// recently used (an older one is freed when its last launch has let go of it). A graph bakes in
// the address of the tables its capture used and may replay at any time, so a table used while
// `s` is capturing is pinned: kept, never freed or reused, for the life of the process. A
// capture never drops a table either (a table it builds is pinned, not added to the LRU, whose
// eviction would cudaFree, a call a capture does not allow).
std::shared_ptr<const DeviceTables> device_tables(int64_t h, int64_t w, int64_t resize_short,
                                                  int64_t crop, Interp interp, cudaStream_t s) {
  using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int>;
  static std::mutex mu;
  static LruCache<Key, DeviceTables> cache(32);
  static std::map<Key, std::shared_ptr<DeviceTables>> pinned;
  int device = 0;
  GFN_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(device, h, w, resize_short, crop, static_cast<int>(interp));
  const bool in_capture = capturing(s);  // a failed query counts: the table is then only kept longer
  std::lock_guard<std::mutex> lk(mu);
  if (auto it = pinned.find(key); it != pinned.end()) return it->second;
  if (auto t = cache.get(key)) {
    if (in_capture) pinned.emplace(key, t);
    return t;
  }

  const ResizeCropTaps plan = plan_resize_crop(h, w, resize_short, crop, interp);
  const auto& hz = plan.horiz;
  const auto& vt = plan.vert;
  auto t = std::make_shared<DeviceTables>();
  const int64_t S = crop;
  t->htaps = hz.max_taps;
  t->vtaps = vt.max_taps;
  t->hprec = hz.precision;
  t->vprec = vt.precision;
  t->row_lo = plan.row_lo;
  t->nrows = plan.row_hi - plan.row_lo;
  t->off_col_start = 0;
  t->off_col_count = S;
  t->off_col_w = 2 * S;
  t->off_row_start = 2 * S + S * t->htaps;
  t->off_row_count = t->off_row_start + S;
  t->off_row_w = t->off_row_count + S;
  std::vector<int32_t> host(static_cast<size_t>(t->off_row_w + S * t->vtaps), 0);
  for (int64_t j = 0; j < S; ++j) {
    const int64_t src = j;  // crop column j (the taps start at g.left)
    host[t->off_col_start + j] = hz.start[src];
    host[t->off_col_count + j] = hz.count[src];
    for (int k = 0; k < hz.max_taps; ++k) {
      host[t->off_col_w + j * t->htaps + k] = hz.weight[src * hz.max_taps + k];
    }
  }
  for (int64_t i = 0; i < S; ++i) {
    const int64_t src = i;  // crop row i (the taps start at g.top)
    host[t->off_row_start + i] = vt.start[src];
    host[t->off_row_count + i] = vt.count[src];
    for (int k = 0; k < vt.max_taps; ++k) {
      host[t->off_row_w + i * t->vtaps + k] = vt.weight[src * vt.max_taps + k];
    }
  }
  t->buf = upload(host, s, in_capture);
  if (in_capture) {
    pinned.emplace(key, t);
  } else {
    // A dropped table's cudaFree (when its last holder lets go) synchronizes: no kernel reads it then.
    cache.put(key, t);
  }
  return t;
}

// --------------------------------------------------------------------- kernels ----

struct Norm {
  float mean[3];
  float std[3];
  int bgr;
};

// The three channels' exact int32 sums, from `half` (the rounding), for output position `t` of
// a pass: its taps' start, count and weights come from the table `tab`, its pixels are
// interleaved RGB, tap `start + k` at `base + (start + k - origin) * stride` (stride 3 along a
// row, a row's bytes down a column).
__device__ inline void tap_sums3(const int32_t* __restrict__ tab, int64_t off_start, int64_t off_count,
                                 int64_t off_w, int64_t taps, int64_t t, const uint8_t* base, int64_t origin,
                                 int64_t stride, int32_t half, int32_t acc[3]) {
  const int32_t start = tab[off_start + t];
  const int32_t count = tab[off_count + t];
  const int32_t* wt = tab + off_w + t * taps;
  const uint8_t* px = base + (start - origin) * stride;
  acc[0] = acc[1] = acc[2] = half;
  for (int k = 0; k < count; ++k) {
    const uint8_t* p = px + k * stride;
    const int32_t wk = wt[k];
    acc[0] += wk * p[0];
    acc[1] += wk * p[1];
    acc[2] += wk * p[2];
  }
}

// One thread per (needed source row, crop column), striding by the grid: 3 channels, exact
// int32 sums. Frame `first + blockIdx.y` of contiguous h x w frames (`frame_bytes` apart) into
// its own rows of hbuf.
__global__ void hpass_kernel(const uint8_t* __restrict__ frames, int64_t frame_bytes, int64_t first,
                             int64_t w, int64_t row_lo,
                             int64_t nrows, int64_t S, const int32_t* __restrict__ tab,
                             int64_t off_start, int64_t off_count, int64_t off_w, int64_t taps,
                             int prec, uint8_t* __restrict__ hbufs) {
  const int64_t f = first + blockIdx.y;
  const uint8_t* frame = frames + f * frame_bytes;
  uint8_t* hbuf = hbufs + f * nrows * 3 * S;
  const int32_t half = prec > 0 ? 1 << (prec - 1) : 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < nrows * S; idx += step) {
    const int64_t r = idx / S, j = idx % S;
    int32_t acc[3];
    tap_sums3(tab, off_start, off_count, off_w, taps, j, frame + (row_lo + r) * w * 3, 0, 3, half, acc);
    uint8_t* o = hbuf + r * 3 * S + 3 * j;
    for (int c = 0; c < 3; ++c) o[c] = static_cast<uint8_t>(fixed_to_u8(acc[c], prec));
  }
}

template <typename OT>
__device__ inline void store_as(OT* p, float v);
template <>
__device__ inline void store_as<float>(float* p, float v) { *p = v; }
template <>
__device__ inline void store_as<uint16_t>(uint16_t* p, float v) { *p = float_to_half(v); }

// One thread per output pixel (i, j), striding by the grid: vertical pass + scale + normalise,
// of frame `first + blockIdx.y` (its hbuf rows, its (3, S, S) output).
template <typename OT>
__global__ void vpass_kernel(const uint8_t* __restrict__ hbufs, int64_t nrows, int64_t first,
                             int64_t row_lo, int64_t S,
                             const int32_t* __restrict__ tab, int64_t off_start,
                             int64_t off_count, int64_t off_w, int64_t taps, int prec, Norm norm,
                             OT* __restrict__ outs, float* __restrict__ outs_f32) {
  const int64_t f = first + blockIdx.y;
  const uint8_t* hbuf = hbufs + f * nrows * 3 * S;
  OT* out = outs + f * 3 * S * S;
  float* out_f32 = outs_f32 != nullptr ? outs_f32 + f * 3 * S * S : nullptr;
  const int32_t half = prec > 0 ? 1 << (prec - 1) : 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < S * S; idx += step) {
    const int64_t i = idx / S, j = idx % S;
    int32_t acc[3];
    tap_sums3(tab, off_start, off_count, off_w, taps, i, hbuf + 3 * j, row_lo, 3 * S, half, acc);
    for (int c = 0; c < 3; ++c) {
      const int cin = norm.bgr ? 2 - c : c;
      const float x = static_cast<float>(fixed_to_u8(acc[cin], prec)) / 255.0f;
      const float v = (x - norm.mean[c]) / norm.std[c];
      store_as<OT>(out + c * S * S + idx, v);
      if (out_f32 != nullptr) out_f32[c * S * S + idx] = v;
    }
  }
}

// One thread per pixel of n contiguous S x S frames (no resize), striding by the grid: the
// three channels scaled, normalised and written planar, with the vertical pass's arithmetic
// (so the result equals preprocess() of each frame at crop_pct 1 bit for bit).
__global__ void normalise_kernel(const uint8_t* __restrict__ frames, int64_t n, int64_t S, Norm norm,
                                 float* __restrict__ out) {
  const int64_t per_image = S * S;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n * per_image;
       idx += step) {
    const int64_t i = idx / per_image, p = idx % per_image;
    const uint8_t* px = frames + idx * 3;
    float* o = out + i * 3 * per_image + p;
    for (int c = 0; c < 3; ++c) {
      const int cin = norm.bgr ? 2 - c : c;
      const float x = static_cast<float>(px[cin]) / 255.0f;
      o[c * per_image] = (x - norm.mean[c]) / norm.std[c];
    }
  }
}

template <typename IT, typename OT>
__global__ void glance_kernel(const IT* __restrict__ in, int64_t planes, int in_size,
                              OT* __restrict__ out, int out_size, int mode) {
  const int64_t per_plane = static_cast<int64_t>(out_size) * out_size;
  const Interp m = static_cast<Interp>(mode);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < planes * per_plane;
       idx += step) {
    const int64_t p = idx / per_plane;
    const int y = static_cast<int>((idx % per_plane) / out_size);
    const int x = static_cast<int>(idx % out_size);
    int iy[4], ix[4];
    float wy[4], wx[4];
    const int ntaps = glance_taps(m, y, in_size, out_size, iy, wy);
    glance_taps(m, x, in_size, out_size, ix, wx);
    const IT* plane = in + p * static_cast<int64_t>(in_size) * in_size;
    store_as<OT>(out + idx, glance_sample<IT>(plane, in_size, ntaps, iy, wy, ix, wx));
  }
}

template <typename T>
__global__ void crop_kernel(const T* __restrict__ images, int64_t n, int64_t channels,
                            int64_t size, const int32_t* __restrict__ coords, T* __restrict__ out,
                            int64_t patch, int* __restrict__ error_flag,
                            const int32_t* __restrict__ rows, int64_t image_rows) {
  const int64_t per_sample = channels * patch * patch;
  const int64_t limit = size - patch;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n * per_sample;
       idx += step) {
    const int64_t i = idx / per_sample;
    const int64_t rem = idx % per_sample;
    const int64_t c = rem / (patch * patch);
    const int64_t y = (rem / patch) % patch;
    const int64_t x = rem % patch;
    const int64_t r0 = coords[2 * i], c0 = coords[2 * i + 1];
    const int64_t src = rows != nullptr ? static_cast<int64_t>(rows[i]) : i;
    if (r0 < 0 || c0 < 0 || r0 > limit || c0 > limit || src < 0 || (rows != nullptr && src >= image_rows)) {
      if (rem == 0) *error_flag = 1;
      out[idx] = T(0);
      continue;
    }
    out[idx] = images[((src * channels + c) * size + r0 + y) * size + c0 + x];
  }
}

template <typename IT>
void launch_glance_out(const IT* in, int64_t planes, int64_t in_size, uintptr_t out,
                       DType out_dtype, int64_t out_size, Interp mode, cudaStream_t s) {
  const int64_t total = planes * out_size * out_size;
  if (total == 0) return;
  if (out_dtype == DType::kF32) {
    glance_kernel<IT, float><<<capped_blocks(total, kThreads), kThreads, 0, s>>>(
        in, planes, static_cast<int>(in_size), reinterpret_cast<float*>(out),
        static_cast<int>(out_size), static_cast<int>(mode));
  } else {
    glance_kernel<IT, uint16_t><<<capped_blocks(total, kThreads), kThreads, 0, s>>>(
        in, planes, static_cast<int>(in_size), reinterpret_cast<uint16_t*>(out),
        static_cast<int>(out_size), static_cast<int>(mode));
  }
  GFN_CUDA_CHECK_LAUNCH();
}

void check_positive(int64_t v, const char* name) {
  if (v <= 0) throw std::invalid_argument(std::string(name) + " must be positive");
}

}  // namespace

void preprocess(uintptr_t frames, int64_t n, int64_t h, int64_t w, bool bgr, int64_t resize_short,
                int64_t image_size, Interp interp, const float mean[3], const float std[3],
                uintptr_t out, DType out_dtype, uintptr_t glance_out, int64_t glance_size,
                Interp glance_interp, DType glance_dtype, uintptr_t stream) {
  require_device();
  check_positive(n, "n");
  check_positive(h, "frame height");
  check_positive(w, "frame width");
  check_positive(image_size, "image_size");
  check_device_pointer(frames, "frame");
  check_device_pointer(out, "out", elem_size(out_dtype));
  if (glance_out != 0) {
    check_device_pointer(glance_out, "glance", elem_size(glance_dtype));
    check_positive(glance_size, "glance_size");
  }
  const cudaStream_t s = as_stream(stream);
  const auto tab = device_tables(h, w, resize_short, image_size, interp, s);
  const int64_t S = image_size;
  const int32_t* tp = reinterpret_cast<const int32_t*>(tab->buf->ptr());
  Scratch hbuf(static_cast<size_t>(n * tab->nrows * 3 * S), stream);
  Norm norm{};
  for (int c = 0; c < 3; ++c) {
    norm.mean[c] = mean[c];
    norm.std[c] = std[c];
  }
  norm.bgr = bgr ? 1 : 0;
  // The glance is computed from float32 values; with a float16 output keep a float32 copy.
  const bool need_f32_copy = glance_out != 0 && out_dtype != DType::kF32;
  Scratch f32_copy(need_f32_copy ? static_cast<size_t>(n * 3 * S * S) * sizeof(float) : 16, stream);
  float* copy_ptr = need_f32_copy ? reinterpret_cast<float*>(f32_copy.ptr()) : nullptr;
  const auto* src = reinterpret_cast<const uint8_t*>(frames);
  auto* hb = reinterpret_cast<uint8_t*>(hbuf.ptr());
  const int64_t hthreads = tab->nrows * S;
  // One launch of each pass per group of frames (grid.y: a frame of the group).
  for (int64_t first = 0; first < n; first += kMaxGridBlocks) {
    const dim3 hgrid(capped_blocks(hthreads, kThreads), capped_blocks(n - first, 1));
    const dim3 vgrid(capped_blocks(S * S, kThreads), capped_blocks(n - first, 1));
    if (hthreads > 0) {
      hpass_kernel<<<hgrid, kThreads, 0, s>>>(src, h * w * 3, first, w, tab->row_lo, tab->nrows, S, tp,
                                             tab->off_col_start, tab->off_col_count, tab->off_col_w,
                                             tab->htaps, tab->hprec, hb);
      GFN_CUDA_CHECK_LAUNCH();
    }
    if (out_dtype == DType::kF32) {
      vpass_kernel<float><<<vgrid, kThreads, 0, s>>>(
          hb, tab->nrows, first, tab->row_lo, S, tp, tab->off_row_start,
          tab->off_row_count, tab->off_row_w, tab->vtaps, tab->vprec, norm,
          reinterpret_cast<float*>(out), nullptr);
    } else {
      vpass_kernel<uint16_t><<<vgrid, kThreads, 0, s>>>(
          hb, tab->nrows, first, tab->row_lo, S, tp, tab->off_row_start,
          tab->off_row_count, tab->off_row_w, tab->vtaps, tab->vprec, norm,
          reinterpret_cast<uint16_t*>(out), copy_ptr);
    }
    GFN_CUDA_CHECK_LAUNCH();
  }
  if (glance_out != 0) {
    const float* gsrc = need_f32_copy ? copy_ptr : reinterpret_cast<const float*>(out);
    launch_glance_out<float>(gsrc, n * 3, S, glance_out, glance_dtype, glance_size, glance_interp, s);
  }
}

void normalise_frames(uintptr_t frames, int64_t n, int64_t image_size, bool bgr, const float mean[3],
                      const float std[3], uintptr_t out, uintptr_t glance_out, int64_t glance_size,
                      Interp glance_interp, uintptr_t stream) {
  require_device();
  check_positive(n, "n");
  check_positive(image_size, "image_size");
  check_device_pointer(frames, "frames");
  check_device_pointer(out, "out", sizeof(float));
  if (glance_out != 0) {
    check_device_pointer(glance_out, "glance", sizeof(float));
    check_positive(glance_size, "glance_size");
  }
  const cudaStream_t s = as_stream(stream);
  const int64_t S = image_size;
  Norm norm{};
  for (int c = 0; c < 3; ++c) {
    norm.mean[c] = mean[c];
    norm.std[c] = std[c];
  }
  norm.bgr = bgr ? 1 : 0;
  normalise_kernel<<<capped_blocks(n * S * S, kThreads), kThreads, 0, s>>>(
      reinterpret_cast<const uint8_t*>(frames), n, S, norm, reinterpret_cast<float*>(out));
  GFN_CUDA_CHECK_LAUNCH();
  if (glance_out != 0) {
    launch_glance_out<float>(reinterpret_cast<const float*>(out), n * 3, S, glance_out, DType::kF32, glance_size,
                             glance_interp, s);
  }
}

void glance(uintptr_t in, DType in_dtype, int64_t n, int64_t channels, int64_t in_size,
            uintptr_t out, DType out_dtype, int64_t out_size, Interp mode, uintptr_t stream) {
  require_device();
  check_device_pointer(in, "images", elem_size(in_dtype));
  check_device_pointer(out, "out", elem_size(out_dtype));
  check_positive(in_size, "image size");
  check_positive(out_size, "glance size");
  const cudaStream_t s = as_stream(stream);
  if (in_dtype == DType::kF32) {
    launch_glance_out<float>(reinterpret_cast<const float*>(in), n * channels, in_size, out,
                             out_dtype, out_size, mode, s);
  } else {
    launch_glance_out<uint16_t>(reinterpret_cast<const uint16_t*>(in), n * channels, in_size,
                                out, out_dtype, out_size, mode, s);
  }
}

void crop_patches(uintptr_t images, DType dtype, int64_t n, int64_t channels, int64_t size,
                  uintptr_t coords, uintptr_t out, int64_t patch, uintptr_t error_flag,
                  uintptr_t stream, uintptr_t rows, int64_t image_rows) {
  require_device();
  const size_t esize = elem_size(dtype);
  check_device_pointer(images, "images", esize);
  check_device_pointer(coords, "coords", sizeof(int32_t));
  check_device_pointer(out, "out", esize);
  if (rows != 0) {
    check_device_pointer(rows, "rows", sizeof(int32_t));
    check_positive(image_rows, "image_rows");
  }
  check_positive(patch, "patch_size");
  if (patch > size) {
    throw std::invalid_argument("patch_size " + std::to_string(patch) +
                                " is larger than the image size " + std::to_string(size));
  }
  const cudaStream_t s = as_stream(stream);
  const int64_t total = n * channels * patch * patch;
  if (total == 0) return;
  const ErrorFlag flag(error_flag, stream);
  if (dtype == DType::kF32) {
    crop_kernel<float><<<capped_blocks(total, kThreads), kThreads, 0, s>>>(
        reinterpret_cast<const float*>(images), n, channels, size,
        reinterpret_cast<const int32_t*>(coords), reinterpret_cast<float*>(out), patch, flag.get(),
        reinterpret_cast<const int32_t*>(rows), image_rows);
  } else {
    crop_kernel<uint16_t><<<capped_blocks(total, kThreads), kThreads, 0, s>>>(
        reinterpret_cast<const uint16_t*>(images), n, channels, size,
        reinterpret_cast<const int32_t*>(coords), reinterpret_cast<uint16_t*>(out), patch, flag.get(),
        reinterpret_cast<const int32_t*>(rows), image_rows);
  }
  GFN_CUDA_CHECK_LAUNCH();
  flag.raise_if_set("patch coordinates out of range: every (row, col) must lie in [0, " +
                    std::to_string(size - patch) + "]" +
                    (rows != 0 ? " and every image row in [0, " + std::to_string(image_rows) + ")" : ""));
}

}  // namespace gfn::cuda
