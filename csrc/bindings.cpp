// Python bindings of gfnet_edge._C (pybind11).
//
// Validation happens here as well as in gfnet_edge/ops.py: wrong dtypes raise TypeError,
// wrong shapes / non-contiguous arrays / out-of-range values raise ValueError, and no
// input can make the kernels read or write out of bounds. The GIL is released while the
// kernels run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/gates.h"
#include "common/interp.h"
#include "cpu/heads.h"
#include "cpu/membench.h"
#include "cpu/host_loop.h"
#include "cpu/preprocess.h"
#include "cpu/simd.h"
#include "cpu/threadpool.h"
#if defined(GFNET_EDGE_WITH_CUDA)
#include "cuda/api.h"
#endif

namespace py = pybind11;
using gfn::Interp;

#ifndef GFNET_EDGE_CUDA_ARCHS_STR
#define GFNET_EDGE_CUDA_ARCHS_STR ""
#endif

namespace {

// ------------------------------------------------------------------ validation ----

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    s += std::to_string(a.shape(i));
    if (a.ndim() == 1 || i + 1 < a.ndim()) s += ",";
    if (i + 1 < a.ndim()) s += " ";
  }
  return s + ")";
}

py::array as_ndarray(const py::handle& obj, const std::string& name) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(name + " must be a numpy.ndarray, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  return py::reinterpret_borrow<py::array>(obj);
}

template <typename T>
void check_dtype(const py::array& a, const std::string& name) {
  if (!a.dtype().is(py::dtype::of<T>())) {
    throw py::type_error(name + " must have dtype " + std::string(py::str(py::dtype::of<T>())) +
                         ", got " + std::string(py::str(a.dtype())));
  }
}

void check_contiguous(const py::array& a, const std::string& name) {
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(name + " must be C-contiguous (use numpy.ascontiguousarray)");
  }
}

void check_ndim(const py::array& a, py::ssize_t ndim, const std::string& name) {
  if (a.ndim() != ndim) {
    throw py::value_error(name + " must have " + std::to_string(ndim) + " dimensions, got shape " +
                          shape_str(a));
  }
}

template <typename T>
py::array checked(const py::handle& obj, py::ssize_t ndim, const std::string& name) {
  py::array a = as_ndarray(obj, name);
  check_dtype<T>(a, name);
  check_ndim(a, ndim, name);
  check_contiguous(a, name);
  return a;
}

void check_writeable(const py::array& a, const std::string& name) {
  if (!a.writeable()) throw py::value_error(name + " must be writeable");
}

/// Validates a caller-provided output array or allocates a new one.
template <typename T>
py::array output_array(const py::object& out, const std::vector<py::ssize_t>& shape,
                       const std::string& name) {
  if (out.is_none()) return py::array_t<T>(shape);
  py::array a = checked<T>(out, static_cast<py::ssize_t>(shape.size()), name);
  check_writeable(a, name);
  for (size_t i = 0; i < shape.size(); ++i) {
    if (a.shape(i) != shape[i]) {
      std::string want = "(";
      for (size_t k = 0; k < shape.size(); ++k) want += std::to_string(shape[k]) + (k + 1 < shape.size() ? ", " : "");
      throw py::value_error(name + " must have shape " + want + "), got " + shape_str(a));
    }
  }
  return a;
}

Interp parse_interp(const std::string& s, const std::string& name) {
  if (s == "bilinear") return Interp::kBilinear;
  if (s == "bicubic") return Interp::kBicubic;
  throw py::value_error(name + " must be 'bilinear' or 'bicubic', got '" + s + "'");
}

gfn::cpu::WType parse_wtype(const std::string& s) {
  if (s == "float32") return gfn::cpu::WType::kF32;
  if (s == "float16") return gfn::cpu::WType::kF16;
  throw py::value_error("weight_dtype must be 'float32' or 'float16', got '" + s + "'");
}

std::string wtype_name(gfn::cpu::WType t) { return t == gfn::cpu::WType::kF32 ? "float32" : "float16"; }

void check_positive(int64_t v, const std::string& name) {
  if (v <= 0) throw py::value_error(name + " must be positive, got " + std::to_string(v));
}

/// Positive sizes whose product (times `item` bytes) fits an int64 byte count; checked before
/// any size arithmetic (a kernel that divides by or multiplies sizes never sees 0 or an overflow).
void check_sizes(std::initializer_list<std::pair<int64_t, const char*>> sizes, int64_t item = 4) {
  int64_t total = item;
  for (const auto& s : sizes) {
    check_positive(s.first, s.second);
    if (total > INT64_MAX / s.first) {
      throw py::value_error(std::string("sizes too large: ") + s.second + " = " + std::to_string(s.first) +
                            " overflows the buffer size");
    }
    total *= s.first;
  }
}

std::array<float, 3> three_floats(const std::vector<double>& v, const std::string& name) {
  if (v.size() != 3) throw py::value_error(name + " must have 3 values, got " + std::to_string(v.size()));
  return {static_cast<float>(v[0]), static_cast<float>(v[1]), static_cast<float>(v[2])};
}

const float* opt_vector(const py::object& obj, int64_t n, const std::string& name, py::array& keep) {
  if (obj.is_none()) return nullptr;
  keep = checked<float>(obj, 1, name);
  if (keep.shape(0) != n) {
    throw py::value_error(name + " must have shape (" + std::to_string(n) + ",), got " + shape_str(keep));
  }
  return static_cast<const float*>(keep.data());
}

using gfn::cpu::row_pointers;

/// Batch of row vectors (B, K) float32, or (K,) promoted to B = 1.
py::array batch_matrix(const py::handle& obj, int64_t k, const std::string& name) {
  py::array a = as_ndarray(obj, name);
  check_dtype<float>(a, name);
  check_contiguous(a, name);
  if (a.ndim() != 2) throw py::value_error(name + " must have shape (batch, " + std::to_string(k) + "), got " + shape_str(a));
  if (a.shape(1) != k) {
    throw py::value_error(name + " must have " + std::to_string(k) + " columns, got shape " + shape_str(a));
  }
  if (a.shape(0) < 1) throw py::value_error(name + " must have at least one row");
  return a;
}

// ----------------------------------------------------------------------- CPU ops ----

gfn::cpu::NormalizeParams normalize_params(const std::vector<double>& mean, const std::vector<double>& std,
                                           bool bgr) {
  const auto m = three_floats(mean, "mean");
  const auto sd = three_floats(std, "std");
  gfn::cpu::NormalizeParams norm{};
  for (int c = 0; c < 3; ++c) {
    if (!(sd[c] != 0.0f)) throw py::value_error("std values must be non-zero");
    norm.mean[c] = m[c];
    norm.std[c] = sd[c];
  }
  norm.bgr = bgr;
  return norm;
}

/// A validated list of uint8 HWC frames of any sizes (arrays kept alive while in use).
struct FrameList {
  std::vector<py::array> keep;
  std::vector<const uint8_t*> ptrs;
  std::vector<int64_t> heights, widths;
  int64_t size() const { return static_cast<int64_t>(ptrs.size()); }
};

FrameList frame_list(const py::list& frames) {
  const int64_t n = static_cast<int64_t>(frames.size());
  if (n < 1) throw py::value_error("frames must not be empty");
  FrameList fl;
  for (int64_t i = 0; i < n; ++i) {
    const std::string name = "frames[" + std::to_string(i) + "]";
    py::array f = as_ndarray(frames[i], name);
    check_dtype<uint8_t>(f, name);
    if (f.ndim() != 3 || f.shape(2) != 3) {
      throw py::value_error(name + " must be an HxWx3 uint8 image, got shape " + shape_str(f));
    }
    check_contiguous(f, name);
    if (f.shape(0) < 1 || f.shape(1) < 1) throw py::value_error(name + " is empty");
    fl.keep.push_back(f);
    fl.ptrs.push_back(static_cast<const uint8_t*>(f.data()));
    fl.heights.push_back(f.shape(0));
    fl.widths.push_back(f.shape(1));
  }
  return fl;
}

void check_resize(int64_t image_size, int64_t resize_short) {
  check_positive(image_size, "image_size");
  if (resize_short < image_size) {
    throw py::value_error("resize size " + std::to_string(resize_short) +
                          " must be >= image_size " + std::to_string(image_size) + " (crop_pct <= 1)");
  }
}

py::tuple cpu_preprocess(const py::list& frames, int64_t image_size, int64_t resize_short,
                         const std::string& interpolation, bool bgr,
                         const std::vector<double>& mean, const std::vector<double>& std,
                         const py::object& out, int64_t glance_size,
                         const std::string& glance_interpolation, const py::object& glance_out) {
  check_resize(image_size, resize_short);
  const Interp interp = parse_interp(interpolation, "interpolation");
  const Interp ginterp = parse_interp(glance_interpolation, "glance_interpolation");
  const gfn::cpu::NormalizeParams norm = normalize_params(mean, std, bgr);
  const FrameList fl = frame_list(frames);
  const int64_t n = fl.size();
  py::array o = output_array<float>(out, {n, 3, image_size, image_size}, "out");
  py::object g = py::none();
  float* gptr = nullptr;
  if (glance_size > 0) {
    if (glance_size > image_size) {
      // Allowed by interpolate (upsampling), but never what GFNet does: keep it an error.
      throw py::value_error("glance_size must be <= image_size");
    }
    py::array ga = output_array<float>(glance_out, {n, 3, glance_size, glance_size}, "glance_out");
    gptr = static_cast<float*>(ga.mutable_data());
    g = ga;
  } else if (glance_size < 0) {
    throw py::value_error("glance_size must be >= 0");
  }
  float* optr = static_cast<float*>(o.mutable_data());
  {
    py::gil_scoped_release release;
    gfn::cpu::preprocess_frames(fl.ptrs.data(), fl.heights.data(), fl.widths.data(), n, resize_short,
                                image_size, interp, norm, optr, gptr, glance_size, ginterp);
  }
  return py::make_tuple(o, g);
}

py::array cpu_resize_crop(const py::list& frames, int64_t image_size, int64_t resize_short,
                          const std::string& interpolation, const py::object& out) {
  check_resize(image_size, resize_short);
  const Interp interp = parse_interp(interpolation, "interpolation");
  const FrameList fl = frame_list(frames);
  const int64_t n = fl.size();
  py::array o = output_array<uint8_t>(out, {n, image_size, image_size, 3}, "out");
  uint8_t* optr = static_cast<uint8_t*>(o.mutable_data());
  {
    py::gil_scoped_release release;
    gfn::cpu::preprocess_frames(fl.ptrs.data(), fl.heights.data(), fl.widths.data(), n, resize_short,
                                image_size, interp, gfn::cpu::NormalizeParams{}, nullptr, nullptr, 0,
                                interp, optr);
  }
  return o;
}

/// uint8 (N, S, S, 3) frames, N >= 1, S >= 1.
py::array square_frames(const py::object& frames) {
  py::array a = checked<uint8_t>(frames, 4, "frames");
  if (a.shape(1) != a.shape(2) || a.shape(3) != 3) {
    throw py::value_error("frames must be uint8 (N, S, S, 3), got " + shape_str(a));
  }
  if (a.shape(0) < 1 || a.shape(1) < 1) throw py::value_error("frames must not be empty, got " + shape_str(a));
  return a;
}

py::array cpu_glance_u8(const py::object& frames, int64_t size, const std::string& interpolation,
                        const std::vector<double>& mean, const std::vector<double>& std, bool bgr,
                        const py::object& out) {
  py::array a = square_frames(frames);
  const int64_t n = a.shape(0), s = a.shape(1);
  check_positive(size, "patch_size");
  const Interp mode = parse_interp(interpolation, "interpolation");
  const gfn::cpu::NormalizeParams norm = normalize_params(mean, std, bgr);
  py::array o = output_array<float>(out, {n, 3, size, size}, "out");
  const uint8_t* src = static_cast<const uint8_t*>(a.data());
  float* dst = static_cast<float*>(o.mutable_data());
  {
    py::gil_scoped_release release;
    gfn::cpu::glance_u8(src, n, s, norm, dst, size, mode);
  }
  return o;
}

py::array cpu_glance(const py::object& images, int64_t size, const std::string& interpolation,
                     const py::object& out) {
  py::array a = checked<float>(images, 4, "images");
  const int64_t n = a.shape(0), c = a.shape(1), s = a.shape(2);
  if (a.shape(3) != s) throw py::value_error("images must be square (N, C, S, S), got " + shape_str(a));
  if (n < 1 || c < 1 || s < 1) throw py::value_error("images must not be empty, got " + shape_str(a));
  check_sizes({{n, "N"}, {c, "C"}, {size, "patch_size"}, {size, "patch_size"}});
  const Interp mode = parse_interp(interpolation, "interpolation");
  py::array o = output_array<float>(out, {n, c, size, size}, "out");
  const float* src = static_cast<const float*>(a.data());
  float* dst = static_cast<float*>(o.mutable_data());
  {
    py::gil_scoped_release release;
    gfn::cpu::glance(src, n, c, s, dst, size, mode);
  }
  return o;
}

/// Validated (n, 2) int32 patch coordinates, each in [0, s - patch].
py::array crop_coords(const py::object& coords, int64_t n, int64_t s, int64_t patch) {
  check_positive(patch, "patch_size");
  if (patch > s) {
    throw py::value_error("patch_size " + std::to_string(patch) + " exceeds the image size " + std::to_string(s));
  }
  py::array k = checked<int32_t>(coords, 2, "coords");
  if (k.shape(0) != n || k.shape(1) != 2) {
    throw py::value_error("coords must have shape (" + std::to_string(n) + ", 2), got " + shape_str(k));
  }
  const int32_t* kp = static_cast<const int32_t*>(k.data());
  for (int64_t i = 0; i < n; ++i) {
    for (int d = 0; d < 2; ++d) {
      const int64_t v = kp[2 * i + d];
      if (v < 0 || v > s - patch) {
        throw py::value_error("coords[" + std::to_string(i) + "] = (" + std::to_string(kp[2 * i]) + ", " +
                              std::to_string(kp[2 * i + 1]) + ") is out of range: each must lie in [0, " +
                              std::to_string(s - patch) + "]");
      }
    }
  }
  return k;
}

/// Optional (m,) int64 image index per patch, each in [0, n); m is the number of patches.
/// Returns m (n when there is no index) and sets `ptr` (null without an index).
int64_t crop_index(const py::object& index, int64_t n, py::array& keep, const int64_t*& ptr) {
  ptr = nullptr;
  if (index.is_none()) return n;
  keep = checked<int64_t>(index, 1, "index");
  const int64_t m = keep.shape(0);
  if (m < 1) throw py::value_error("index must not be empty");
  ptr = static_cast<const int64_t*>(keep.data());
  for (int64_t i = 0; i < m; ++i) {
    if (ptr[i] < 0 || ptr[i] >= n) {
      throw py::value_error("index[" + std::to_string(i) + "] = " + std::to_string(ptr[i]) +
                            " is out of range: images has " + std::to_string(n));
    }
  }
  return m;
}

py::array cpu_crop(const py::object& images, const py::object& coords, int64_t patch,
                   const py::object& out, const py::object& index) {
  py::array a = checked<float>(images, 4, "images");
  const int64_t n = a.shape(0), c = a.shape(1), s = a.shape(2);
  if (a.shape(3) != s) throw py::value_error("images must be square (N, C, S, S), got " + shape_str(a));
  if (n < 1 || c < 1 || s < 1) throw py::value_error("images must not be empty, got " + shape_str(a));
  py::array keep_index;
  const int64_t* ip = nullptr;
  const int64_t m = crop_index(index, n, keep_index, ip);
  py::array k = crop_coords(coords, m, s, patch);
  const int32_t* kp = static_cast<const int32_t*>(k.data());
  py::array o = output_array<float>(out, {m, c, patch, patch}, "out");
  const float* src = static_cast<const float*>(a.data());
  float* dst = static_cast<float*>(o.mutable_data());
  {
    py::gil_scoped_release release;
    gfn::cpu::crop_patches(src, m, c, s, kp, dst, patch, ip);
  }
  return o;
}

py::array cpu_crop_u8(const py::object& frames, const py::object& coords, int64_t patch,
                      const std::vector<double>& mean, const std::vector<double>& std, bool bgr,
                      const py::object& out, const py::object& index) {
  py::array a = square_frames(frames);
  const int64_t n = a.shape(0), s = a.shape(1);
  py::array keep_index;
  const int64_t* ip = nullptr;
  const int64_t m = crop_index(index, n, keep_index, ip);
  py::array k = crop_coords(coords, m, s, patch);
  const gfn::cpu::NormalizeParams norm = normalize_params(mean, std, bgr);
  py::array o = output_array<float>(out, {m, 3, patch, patch}, "out");
  const uint8_t* src = static_cast<const uint8_t*>(a.data());
  const int32_t* kp = static_cast<const int32_t*>(k.data());
  float* dst = static_cast<float*>(o.mutable_data());
  {
    py::gil_scoped_release release;
    gfn::cpu::crop_patches_u8(src, m, s, kp, norm, dst, patch, ip);
  }
  return o;
}

py::array cpu_linear(const py::object& x, const py::object& w, const py::object& b, bool relu) {
  py::array wa = checked<float>(w, 2, "w");
  const int64_t rows = wa.shape(0), cols = wa.shape(1);
  if (rows < 1 || cols < 1) throw py::value_error("w must not be empty");
  py::array xa = batch_matrix(x, cols, "x");
  py::array keep_b;
  const float* bp = opt_vector(b, rows, "b", keep_b);
  const int64_t nb = xa.shape(0);
  py::array_t<float> out({nb, rows});
  gfn::cpu::WeightView view;
  view.data = wa.data();
  view.type = gfn::cpu::WType::kF32;
  view.ld = cols;
  const auto xs = row_pointers(static_cast<const float*>(xa.data()), nb, cols);
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    gfn::cpu::linear_forward(view, rows, cols, bp, xs.data(), nb, op, relu);
  }
  return out;
}

py::tuple cpu_softmax_stats(const py::object& logits) {
  py::array l = checked<float>(logits, 2, "logits");
  const int64_t nb = l.shape(0), c = l.shape(1);
  if (c < 1) throw py::value_error("logits must have at least one column");
  py::array_t<float> maxprob(nb);
  py::array_t<int32_t> argmax(nb);
  gfn::cpu::softmax_stats(static_cast<const float*>(l.data()), nb, c, maxprob.mutable_data(),
                          argmax.mutable_data());
  return py::make_tuple(maxprob, argmax);
}

// CPU classes exposed to Python.
struct PyGRUCell {
  gfn::cpu::GruCell cell;
};

PyGRUCell make_gru_cell(const py::object& w_ih, const py::object& w_hh, const py::object& b_ih,
                        const py::object& b_hh, const std::string& dtype) {
  py::array wi = checked<float>(w_ih, 2, "w_ih");
  py::array wh = checked<float>(w_hh, 2, "w_hh");
  const int64_t three_h = wi.shape(0), input = wi.shape(1);
  if (three_h < 3 || three_h % 3 != 0) {
    throw py::value_error("w_ih must have shape (3 * hidden, input), got " + shape_str(wi));
  }
  const int64_t hidden = three_h / 3;
  if (input < 1) throw py::value_error("w_ih must have at least one column");
  if (wh.shape(0) != three_h || wh.shape(1) != hidden) {
    throw py::value_error("w_hh must have shape (" + std::to_string(three_h) + ", " + std::to_string(hidden) +
                          "), got " + shape_str(wh));
  }
  py::array kb1, kb2;
  const float* bi = opt_vector(b_ih, three_h, "b_ih", kb1);
  const float* bh = opt_vector(b_hh, three_h, "b_hh", kb2);
  const auto type = parse_wtype(dtype);
  PyGRUCell c;
  const float* wip = static_cast<const float*>(wi.data());
  const float* whp = static_cast<const float*>(wh.data());
  {
    py::gil_scoped_release release;
    c.cell = gfn::cpu::GruCell(wip, whp, bi, bh, input, hidden, type);
  }
  return c;
}

py::array gru_step(const PyGRUCell& self, const py::object& x, const py::object& h) {
  const auto& cell = self.cell;
  py::array xa = batch_matrix(x, cell.input_size(), "x");
  const int64_t nb = xa.shape(0);
  const float* hp = nullptr;
  py::array ha;
  if (!h.is_none()) {
    ha = batch_matrix(h, cell.hidden_size(), "h");
    if (ha.shape(0) != nb) {
      throw py::value_error("h has " + std::to_string(ha.shape(0)) + " rows but x has " + std::to_string(nb));
    }
    hp = static_cast<const float*>(ha.data());
  }
  py::array_t<float> out({nb, cell.hidden_size()});
  const float* xp = static_cast<const float*>(xa.data());
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    cell.step(xp, hp, nb, op);
  }
  return out;
}

struct PyLinear {
  gfn::cpu::Linear layer;
};

PyLinear make_linear(const py::object& w, const py::object& b, const std::string& dtype) {
  py::array wa = checked<float>(w, 2, "w");
  const int64_t rows = wa.shape(0), cols = wa.shape(1);
  if (rows < 1 || cols < 1) throw py::value_error("w must not be empty, got shape " + shape_str(wa));
  py::array kb;
  const float* bp = opt_vector(b, rows, "b", kb);
  const auto type = parse_wtype(dtype);
  PyLinear l;
  const float* wp = static_cast<const float*>(wa.data());
  {
    py::gil_scoped_release release;
    l.layer = gfn::cpu::Linear(wp, bp, rows, cols, type);
  }
  return l;
}

py::array linear_forward(const PyLinear& self, const py::object& x, bool relu) {
  py::array xa = batch_matrix(x, self.layer.in_features(), "x");
  const int64_t nb = xa.shape(0);
  py::array_t<float> out({nb, self.layer.out_features()});
  const auto xs = row_pointers(static_cast<const float*>(xa.data()), nb, self.layer.in_features());
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    self.layer.forward(xs.data(), nb, op, relu);
  }
  return out;
}

/// Validates a (T, N, F) / (N, T, F) feature buffer for k steps; returns (tnf, T, N, F).
std::tuple<bool, int64_t, int64_t, int64_t> feature_buffer(const py::array& f, int64_t k,
                                                           int64_t in_features,
                                                           const std::string& layout) {
  bool tnf;
  if (layout == "tnf") {
    tnf = true;
  } else if (layout == "ntf") {
    tnf = false;
  } else {
    throw py::value_error("layout must be 'tnf' or 'ntf', got '" + layout + "'");
  }
  const int64_t steps = tnf ? f.shape(0) : f.shape(1);
  const int64_t nb = tnf ? f.shape(1) : f.shape(0);
  const int64_t fd = f.shape(2);
  if (k < 1 || k > steps) {
    throw py::value_error("k must be in [1, " + std::to_string(steps) + "] for a buffer of shape " +
                          shape_str(f) + ", got " + std::to_string(k));
  }
  if (k * fd != in_features) {
    throw py::value_error("this layer takes " + std::to_string(in_features) + " inputs but k=" + std::to_string(k) +
                          " features of size " + std::to_string(fd) + " give " + std::to_string(k * fd));
  }
  if (nb < 1) throw py::value_error("features must hold at least one sample");
  return {tnf, steps, nb, fd};
}

py::tuple cascaded_step(const PyLinear& self, const py::object& features, int64_t k,
                        const std::string& layout) {
  py::array f = checked<float>(features, 3, "features");
  const auto [tnf, steps, nb, fd] = feature_buffer(f, k, self.layer.in_features(), layout);
  const int64_t classes = self.layer.out_features();
  py::array_t<float> logits({nb, classes});
  py::array_t<float> maxprob(nb);
  py::array_t<int32_t> argmax(nb);
  const float* fp = static_cast<const float*>(f.data());
  float* lp = logits.mutable_data();
  float* mp = maxprob.mutable_data();
  int32_t* ap = argmax.mutable_data();
  {
    py::gil_scoped_release release;
    gfn::cpu::cascaded_forward(self.layer, k, fp, tnf, steps, nb, fd, lp);
    gfn::cpu::softmax_stats(lp, nb, classes, mp, ap);
  }
  return py::make_tuple(logits, maxprob, argmax);
}

void check_head_fits(const PyGRUCell& cell, const PyLinear& head) {
  if (head.layer.in_features() != cell.cell.hidden_size()) {
    throw py::value_error("head takes " + std::to_string(head.layer.in_features()) +
                          " inputs but the GRU hidden size is " + std::to_string(cell.cell.hidden_size()));
  }
}

py::tuple gru_classifier_step(const PyGRUCell& cell, const PyLinear& head, const py::object& x,
                              const py::object& h) {
  check_head_fits(cell, head);
  py::array hn = gru_step(cell, x, h);
  const int64_t nb = hn.shape(0), classes = head.layer.out_features();
  py::array_t<float> logits({nb, classes});
  py::array_t<float> maxprob(nb);
  py::array_t<int32_t> argmax(nb);
  const float* hp = static_cast<const float*>(hn.data());
  float* lp = logits.mutable_data();
  float* mp = maxprob.mutable_data();
  int32_t* ap = argmax.mutable_data();
  {
    py::gil_scoped_release release;
    gfn::cpu::classifier_head(head.layer, hp, nb, lp, mp, ap);
  }
  return py::make_tuple(hn, logits, maxprob, argmax);
}

py::tuple gru_actor_step(const PyGRUCell& cell, const PyLinear& head, const py::object& x,
                         const py::object& h, int64_t image_size, int64_t patch_size) {
  check_head_fits(cell, head);
  if (head.layer.out_features() != 2) {
    throw py::value_error("an actor head has 2 outputs, got " + std::to_string(head.layer.out_features()));
  }
  check_positive(patch_size, "patch_size");
  if (patch_size > image_size) throw py::value_error("patch_size must be <= image_size");
  py::array hn = gru_step(cell, x, h);
  const int64_t nb = hn.shape(0);
  py::array_t<float> action({nb, int64_t{2}});
  py::array_t<int32_t> coords({nb, int64_t{2}});
  const float* hp = static_cast<const float*>(hn.data());
  float* act = action.mutable_data();
  int32_t* cp = coords.mutable_data();
  {
    py::gil_scoped_release release;
    gfn::cpu::actor_head(head.layer, hp, nb, static_cast<int>(image_size - patch_size), act, cp);
  }
  return py::make_tuple(hn, action, coords);
}

// ------------------------------------------------------------------ host loop step ----

/// gfn::cpu::HostLoop with the Python head objects it points into kept alive.
struct PyHostLoop {
  py::object keep;  // (actor cell, actor head, classifier cell, classifier head, cascaded layers)
  gfn::cpu::HostLoop loop;
  py::object images = py::none();  // the batch being run (None between batches)
  int64_t feature_dim = 0;
  int64_t steps, image_size, patch_size, state_dim;
  explicit PyHostLoop(const gfn::cpu::HostLoopModel& m)
      : loop(m), steps(m.steps), image_size(m.image_size), patch_size(m.patch_size),
        state_dim(m.actor_cell->input_size()) {}
};

PyHostLoop* make_host_loop(const py::object& actor_cell, const py::object& actor_head, const py::object& cls_cell,
                           const py::object& cls_head, const py::dict& cascaded, int64_t steps, int64_t image_size,
                           int64_t patch_size, bool step0_backbone, const std::vector<double>& mean,
                           const std::vector<double>& std) {
  check_positive(steps, "steps");
  check_positive(patch_size, "patch_size");
  if (patch_size > image_size) throw py::value_error("patch_size must be <= image_size");
  gfn::cpu::HostLoopModel m;
  m.steps = steps;
  m.image_size = image_size;
  m.patch_size = patch_size;
  m.step0_backbone = step0_backbone;
  const auto& ac = actor_cell.cast<const PyGRUCell&>();
  const auto& ah = actor_head.cast<const PyLinear&>();
  check_head_fits(ac, ah);
  if (ah.layer.out_features() != 2) throw py::value_error("the actor head must have 2 outputs");
  m.actor_cell = &ac.cell;
  m.actor_head = &ah.layer;
  if (!cls_cell.is_none()) {
    const auto& cc = cls_cell.cast<const PyGRUCell&>();
    const auto& ch = cls_head.cast<const PyLinear&>();
    check_head_fits(cc, ch);
    m.cls_cell = &cc.cell;
    m.cls_head = &ch.layer;
  } else {
    if (!step0_backbone) throw py::value_error("a cascaded classifier takes its step-0 logits from the glance graph");
    m.cascaded.assign(static_cast<size_t>(steps + 1), nullptr);
    for (int64_t k = 2; k <= steps; ++k) {
      if (!cascaded.contains(py::int_(k))) {
        throw py::value_error("cascaded classifier layer for k=" + std::to_string(k) + " is missing");
      }
      m.cascaded[k] = &cascaded[py::int_(k)].cast<const PyLinear&>().layer;
    }
  }
  m.norm = normalize_params(mean, std, false);
  auto* h = new PyHostLoop(m);
  h->keep = py::make_tuple(actor_cell, actor_head, cls_cell, cls_head, cascaded);
  return h;
}

py::array rows_f32(const py::object& obj, int64_t n, int64_t cols, const std::string& name) {
  py::array a = checked<float>(obj, 2, name);
  if (a.shape(0) != n || (cols >= 0 && a.shape(1) != cols)) {
    throw py::value_error(name + " must have shape (" + std::to_string(n) + ", " +
                          (cols >= 0 ? std::to_string(cols) : std::string("F")) + "), got " + shape_str(a));
  }
  return a;
}

/// The patches of the next focus step (a view of the loop's buffer, valid until its next
/// call), or None when the batch is done.
py::object host_loop_patches(py::object self_obj, PyHostLoop& self, int64_t m) {
  if (m == 0) {
    self.images = py::none();
    return py::none();
  }
  const int64_t p = self.patch_size;
  return py::array_t<float>({m, int64_t{3}, p, p}, self.loop.patches().data(), self_obj);
}

py::object host_loop_begin(py::object self_obj, const py::object& images, const py::object& feature,
                           const py::object& state, const py::object& logits, const py::object& thresholds) {
  auto& self = self_obj.cast<PyHostLoop&>();
  const int64_t image_size = self.image_size, steps = self.steps, state_dim = self.state_dim;
  py::array im = as_ndarray(images, "images");
  check_contiguous(im, "images");
  bool u8;
  if (im.dtype().is(py::dtype::of<uint8_t>())) {
    u8 = true;
    if (im.ndim() != 4 || im.shape(1) != image_size || im.shape(2) != image_size || im.shape(3) != 3) {
      throw py::value_error("uint8 images must have shape (N, " + std::to_string(image_size) + ", " +
                            std::to_string(image_size) + ", 3), got " + shape_str(im));
    }
  } else if (im.dtype().is(py::dtype::of<float>())) {
    u8 = false;
    if (im.ndim() != 4 || im.shape(1) != 3 || im.shape(2) != image_size || im.shape(3) != image_size) {
      throw py::value_error("float32 images must have shape (N, 3, " + std::to_string(image_size) + ", " +
                            std::to_string(image_size) + "), got " + shape_str(im));
    }
  } else {
    throw py::type_error("images must be uint8 frames or float32 images, got " + std::string(py::str(im.dtype())));
  }
  const int64_t n = im.shape(0);
  if (n < 1) throw py::value_error("images must not be empty");
  py::array f = rows_f32(feature, n, -1, "feature");
  py::array s = rows_f32(state, n, state_dim, "state");
  py::array l;
  const float* lp = nullptr;
  int64_t classes = 0;
  if (!logits.is_none()) {
    l = rows_f32(logits, n, -1, "logits");
    lp = static_cast<const float*>(l.data());
    classes = l.shape(1);
  }
  py::array th;
  const float* tp = nullptr;
  if (!thresholds.is_none()) {
    th = checked<float>(thresholds, 1, "thresholds");
    if (th.shape(0) != steps) throw py::value_error("thresholds must have " + std::to_string(steps) + " values");
    tp = static_cast<const float*>(th.data());
  }
  self.images = im;
  self.feature_dim = f.shape(1);
  int64_t m;
  {
    py::gil_scoped_release release;
    m = self.loop.begin(im.data(), u8, n, static_cast<const float*>(f.data()), f.shape(1),
                        static_cast<const float*>(s.data()), state_dim, lp, classes, tp);
  }
  return host_loop_patches(self_obj, self, m);
}

py::object host_loop_next(py::object self_obj, const py::object& feature, const py::object& state) {
  auto& self = self_obj.cast<PyHostLoop&>();
  const int64_t state_dim = self.state_dim;
  if (self.images.is_none()) throw py::value_error("next() without a running batch: call begin() first");
  const auto m = static_cast<int64_t>(self.loop.active().size());
  py::array f = rows_f32(feature, m, self.feature_dim, "feature");
  py::array s = rows_f32(state, m, state_dim, "state");
  int64_t next;
  {
    py::gil_scoped_release release;
    next = self.loop.next(static_cast<const float*>(f.data()), static_cast<const float*>(s.data()));
  }
  return host_loop_patches(self_obj, self, next);
}

// ---------------------------------------------------------------------- CUDA ops ----

#if defined(GFNET_EDGE_WITH_CUDA)
namespace gc = gfn::cuda;

gc::DType parse_dtype(const std::string& s, const std::string& name) {
  if (s == "float32") return gc::DType::kF32;
  if (s == "float16") return gc::DType::kF16;
  throw py::value_error(name + " must be 'float32' or 'float16', got '" + s + "'");
}

py::array host_bytes(const py::object& obj, const std::string& name) {
  py::array a = as_ndarray(obj, name);
  check_contiguous(a, name);
  return a;
}

struct CudaGruHead {
  std::unique_ptr<gc::GruHead> impl;
};

struct CudaLinear {
  std::unique_ptr<gc::LinearWeights> impl;
};

void bind_cuda(py::module_& m) {
  py::class_<gc::DeviceBuffer>(m, "DeviceBuffer", "Owning device allocation (cudaMalloc).")
      .def(py::init<size_t>(), py::arg("nbytes"))
      .def_property_readonly("ptr", &gc::DeviceBuffer::ptr, "Device address as an int.")
      .def_property_readonly("nbytes", &gc::DeviceBuffer::nbytes)
      .def("__int__", &gc::DeviceBuffer::ptr)
      .def(
          "copy_from_host",
          [](gc::DeviceBuffer& self, const py::object& arr, uintptr_t stream, size_t offset) {
            py::array a = host_bytes(arr, "array");
            const size_t n = static_cast<size_t>(a.nbytes());
            const void* p = a.data();
            py::gil_scoped_release release;
            self.copy_from_host(p, n, offset, stream);
          },
          py::arg("array"), py::arg("stream") = 0, py::arg("offset") = 0,
          "Copies a C-contiguous numpy array in (asynchronous on `stream`).")
      .def(
          "copy_to_host",
          [](const gc::DeviceBuffer& self, const py::object& arr, uintptr_t stream, size_t offset) {
            py::array a = host_bytes(arr, "array");
            check_writeable(a, "array");
            const size_t n = static_cast<size_t>(a.nbytes());
            void* p = a.mutable_data();
            py::gil_scoped_release release;
            self.copy_to_host(p, n, offset, stream);
          },
          py::arg("array"), py::arg("stream") = 0, py::arg("offset") = 0,
          "Fills a C-contiguous numpy array from the buffer; synchronizes `stream`.")
      .def("zero", &gc::DeviceBuffer::zero, py::arg("stream") = 0);

  py::class_<gc::Graph>(m, "Graph", "A CUDA graph captured from a stream and replayed on one.")
      .def(py::init<>())
      .def("begin_capture", &gc::Graph::begin_capture, py::arg("stream"))
      .def("end_capture", &gc::Graph::end_capture, py::call_guard<py::gil_scoped_release>())
      .def("abort_capture", &gc::Graph::abort_capture)
      .def("launch", &gc::Graph::launch, py::arg("stream"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("ready", &gc::Graph::ready)
      .def_property_readonly("nodes", &gc::Graph::nodes);

  py::class_<gc::Event>(m, "Event", "A timing CUDA event.")
      .def(py::init<>())
      .def("record", &gc::Event::record, py::arg("stream"))
      .def("wait", &gc::Event::wait, py::arg("stream"), "Later work on `stream` waits for this event.")
      .def("synchronize", &gc::Event::synchronize, py::call_guard<py::gil_scoped_release>())
      .def("elapsed_since", &gc::Event::elapsed_since, py::arg("start"),
           py::call_guard<py::gil_scoped_release>(), "Milliseconds from `start` to this event.");

  py::class_<gc::PinnedBuffer, std::shared_ptr<gc::PinnedBuffer>>(m, "PinnedBuffer",
                                                                  "Page-locked host memory.")
      .def(py::init<size_t>(), py::arg("nbytes"))
      .def_property_readonly("nbytes", &gc::PinnedBuffer::nbytes)
      .def(
          "array",
          [](const std::shared_ptr<gc::PinnedBuffer>& self) {
            // A uint8 numpy view that keeps the allocation alive.
            auto* keep = new std::shared_ptr<gc::PinnedBuffer>(self);
            py::capsule owner(keep, [](void* p) { delete static_cast<std::shared_ptr<gc::PinnedBuffer>*>(p); });
            return py::array(py::dtype::of<uint8_t>(), {static_cast<py::ssize_t>(self->nbytes())},
                             {static_cast<py::ssize_t>(1)}, static_cast<uint8_t*>(self->data()), owner);
          },
          "The memory as a writable uint8 numpy array (it keeps the buffer alive).");

  py::class_<gc::Stream>(m, "Stream", "Owning non-blocking CUDA stream.")
      .def(py::init<>())
      .def_property_readonly("handle", &gc::Stream::handle, "cudaStream_t as an int.")
      .def("__int__", &gc::Stream::handle)
      .def("synchronize", &gc::Stream::synchronize, py::call_guard<py::gil_scoped_release>());

  m.def("device_name", &gc::device_name, py::arg("index") = 0);
  m.def(
      "device_properties",
      [](int index) {
        const auto p = gc::device_properties(index);
        py::dict d;
        d["name"] = p.name;
        d["major"] = p.major;
        d["minor"] = p.minor;
        d["total_memory"] = p.total_memory;
        d["multiprocessors"] = p.multiprocessors;
        d["integrated"] = p.integrated;
        return d;
      },
      py::arg("index") = 0);
  m.def("synchronize", &gc::device_synchronize, py::call_guard<py::gil_scoped_release>());
  m.def("stream_synchronize", &gc::stream_synchronize, py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def(
      "memcpy_htod",
      [](uintptr_t dst, const py::object& arr, uintptr_t stream) {
        py::array a = host_bytes(arr, "array");
        const size_t n = static_cast<size_t>(a.nbytes());
        const void* p = a.data();
        py::gil_scoped_release release;
        gc::memcpy_htod(dst, p, n, stream);
      },
      py::arg("dst"), py::arg("array"), py::arg("stream") = 0);
  m.def(
      "memcpy_dtoh",
      [](const py::object& arr, uintptr_t src, uintptr_t stream) {
        py::array a = host_bytes(arr, "array");
        check_writeable(a, "array");
        const size_t n = static_cast<size_t>(a.nbytes());
        void* p = a.mutable_data();
        py::gil_scoped_release release;
        gc::memcpy_dtoh(p, src, n, stream);
      },
      py::arg("array"), py::arg("src"), py::arg("stream") = 0);

  m.def(
      "memcpy_dtod",
      [](uintptr_t dst, uintptr_t src, size_t nbytes, uintptr_t stream) {
        py::gil_scoped_release release;
        gc::memcpy_dtod(dst, src, nbytes, stream);
      },
      py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("stream") = 0,
      "Device -> device copy of nbytes (asynchronous on `stream`).");

  m.def(
      "gather_rows",
      [](uintptr_t src, int64_t src_rows, const py::object& idx, uintptr_t dst, int64_t n,
         int64_t row_bytes, uintptr_t error_flag, uintptr_t stream) {
        check_sizes({{src_rows, "src_rows"}, {row_bytes, "row_bytes"}}, 1);
        check_sizes({{n, "n"}, {row_bytes, "row_bytes"}}, 1);
        if (py::isinstance<py::array>(idx)) {
          py::array a = checked<int32_t>(idx, 1, "idx");
          if (a.shape(0) != n) {
            throw py::value_error("idx must have shape (" + std::to_string(n) + ",), got " + shape_str(a));
          }
          const int32_t* p = static_cast<const int32_t*>(a.data());
          py::gil_scoped_release release;
          gc::gather_rows_host(src, src_rows, p, dst, n, row_bytes, stream);
          return;
        }
        if (idx.is_none()) throw py::value_error("idx must be a device pointer or an int32 array, got None");
        const uintptr_t dev_idx = idx.cast<uintptr_t>();
        py::gil_scoped_release release;
        gc::gather_rows(src, src_rows, dev_idx, dst, n, row_bytes, error_flag, stream);
      },
      py::arg("src"), py::arg("src_rows"), py::arg("idx"), py::arg("dst"), py::arg("n"),
      py::arg("row_bytes"), py::arg("error_flag") = 0, py::arg("stream") = 0,
      "dst[i] = src[idx[i]] for rows of row_bytes; idx is a device int32 pointer or a host "
      "int32 numpy array (validated, then uploaded on `stream`).");

  m.def(
      "softmax_stats",
      [](uintptr_t logits, int64_t batch, int64_t classes, uintptr_t maxprob, uintptr_t argmax,
         uintptr_t logits_out, const std::string& out_dtype, uintptr_t stream) {
        check_sizes({{batch, "batch"}, {classes, "classes"}});
        const auto od = parse_dtype(out_dtype, "out_dtype");
        py::gil_scoped_release release;
        gc::require_device();
        gc::check_device_pointer(logits, "logits");
        if (maxprob != 0) gc::check_device_pointer(maxprob, "maxprob");
        if (argmax != 0) gc::check_device_pointer(argmax, "argmax");
        if (logits_out != 0) gc::check_device_pointer(logits_out, "logits_out");
        gc::softmax_stats(logits, batch, classes, maxprob, argmax, logits_out, od, stream);
      },
      py::arg("logits"), py::arg("batch"), py::arg("classes"), py::arg("maxprob"),
      py::arg("argmax"), py::arg("logits_out") = 0, py::arg("out_dtype") = "float32",
      py::arg("stream") = 0,
      "Softmax max probability (float32) and argmax (int32) per row of float32 device logits.");

  m.def(
      "preprocess",
      [](uintptr_t frame, int64_t height, int64_t width, int64_t image_size, int64_t resize_short,
         const std::string& interpolation, bool bgr, const std::vector<double>& mean,
         const std::vector<double>& std, uintptr_t out, const std::string& out_dtype,
         uintptr_t glance, int64_t glance_size, const std::string& glance_interpolation,
         const std::string& glance_dtype, uintptr_t stream) {
        check_sizes({{height, "height"}, {width, "width"}}, 3);
        check_sizes({{image_size, "image_size"}, {image_size, "image_size"}, {3, "channels"}});
        if (resize_short < image_size) throw py::value_error("resize size must be >= image_size");
        const auto m3 = three_floats(mean, "mean");
        const auto s3 = three_floats(std, "std");
        for (float v : s3) {
          if (!(v != 0.0f)) throw py::value_error("std values must be non-zero");
        }
        const Interp interp = parse_interp(interpolation, "interpolation");
        const Interp ginterp = parse_interp(glance_interpolation, "glance_interpolation");
        const gc::DType od = parse_dtype(out_dtype, "out_dtype");
        const gc::DType gd = parse_dtype(glance_dtype, "glance_dtype");
        if (glance != 0 && (glance_size < 1 || glance_size > image_size)) {
          throw py::value_error("glance_size must be in [1, image_size]");
        }
        py::gil_scoped_release release;
        gc::preprocess(frame, height, width, bgr, resize_short, image_size, interp, m3.data(),
                       s3.data(), out, od, glance, glance_size, ginterp, gd, stream);
      },
      py::arg("frame"), py::arg("height"), py::arg("width"), py::arg("image_size"),
      py::arg("resize_short"), py::arg("interpolation"), py::arg("bgr"), py::arg("mean"),
      py::arg("std"), py::arg("out"), py::arg("out_dtype") = "float32", py::arg("glance") = 0,
      py::arg("glance_size") = 0, py::arg("glance_interpolation") = "bicubic",
      py::arg("glance_dtype") = "float32", py::arg("stream") = 0);

  m.def(
      "glance",
      [](uintptr_t images, const std::string& in_dtype, int64_t n, int64_t channels,
         int64_t in_size, uintptr_t out, const std::string& out_dtype, int64_t out_size,
         const std::string& interpolation, uintptr_t stream) {
        check_sizes({{n, "n"}, {channels, "channels"}, {in_size, "in_size"}, {in_size, "in_size"}});
        check_sizes({{n, "n"}, {channels, "channels"}, {out_size, "out_size"}, {out_size, "out_size"}});
        const auto id = parse_dtype(in_dtype, "in_dtype");
        const auto od = parse_dtype(out_dtype, "out_dtype");
        const Interp mode = parse_interp(interpolation, "interpolation");
        py::gil_scoped_release release;
        gc::glance(images, id, n, channels, in_size, out, od, out_size, mode, stream);
      },
      py::arg("images"), py::arg("in_dtype"), py::arg("n"), py::arg("channels"), py::arg("in_size"),
      py::arg("out"), py::arg("out_dtype"), py::arg("out_size"), py::arg("interpolation"),
      py::arg("stream") = 0);

  m.def(
      "crop_patches",
      [](uintptr_t images, const std::string& dtype, int64_t n, int64_t channels, int64_t size,
         uintptr_t coords, uintptr_t out, int64_t patch, uintptr_t error_flag, uintptr_t stream,
         uintptr_t rows, int64_t image_rows) {
        check_sizes({{n, "n"}, {channels, "channels"}, {size, "size"}, {size, "size"}});
        check_positive(patch, "patch_size");
        if (patch > size) throw py::value_error("patch_size must be <= size");
        if (rows != 0) check_sizes({{image_rows, "image_rows"}});
        const auto d = parse_dtype(dtype, "dtype");
        py::gil_scoped_release release;
        gc::crop_patches(images, d, n, channels, size, coords, out, patch, error_flag, stream, rows, image_rows);
      },
      py::arg("images"), py::arg("dtype"), py::arg("n"), py::arg("channels"), py::arg("size"),
      py::arg("coords"), py::arg("out"), py::arg("patch_size"), py::arg("error_flag") = 0,
      py::arg("stream") = 0, py::arg("rows") = 0, py::arg("image_rows") = 0);

  py::class_<CudaGruHead>(m, "GRUHead", "GRU cell + Linear head with weights on the device.")
      .def(py::init([](const py::object& w_ih, const py::object& w_hh, const py::object& b_ih,
                       const py::object& b_hh, const py::object& w_out, const py::object& b_out,
                       const std::string& weight_dtype) {
             py::array wi = checked<float>(w_ih, 2, "w_ih");
             py::array wh = checked<float>(w_hh, 2, "w_hh");
             const int64_t three_h = wi.shape(0), input = wi.shape(1);
             if (three_h < 3 || three_h % 3 != 0 || input < 1) {
               throw py::value_error("w_ih must have shape (3 * hidden, input), got " + shape_str(wi));
             }
             const int64_t hidden = three_h / 3;
             if (wh.shape(0) != three_h || wh.shape(1) != hidden) {
               throw py::value_error("w_hh must have shape (3 * hidden, hidden), got " + shape_str(wh));
             }
             py::array k1, k2, k3;
             const float* bi = opt_vector(b_ih, three_h, "b_ih", k1);
             const float* bh = opt_vector(b_hh, three_h, "b_hh", k2);
             py::array wo = checked<float>(w_out, 2, "w_out");
             if (wo.shape(1) != hidden || wo.shape(0) < 1) {
               throw py::value_error("w_out must have shape (out, " + std::to_string(hidden) + "), got " + shape_str(wo));
             }
             const float* bo = opt_vector(b_out, wo.shape(0), "b_out", k3);
             const auto dt = parse_dtype(weight_dtype, "weight_dtype");
             CudaGruHead h;
             h.impl = std::make_unique<gc::GruHead>(
                 static_cast<const float*>(wi.data()), static_cast<const float*>(wh.data()), bi, bh,
                 input, hidden, static_cast<const float*>(wo.data()), bo, wo.shape(0), dt);
             return h;
           }),
           py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("w_out"),
           py::arg("b_out"), py::arg("weight_dtype") = "float32")
      .def_property_readonly("input_size", [](const CudaGruHead& s) { return s.impl->input_size(); })
      .def_property_readonly("hidden_size", [](const CudaGruHead& s) { return s.impl->hidden_size(); })
      .def_property_readonly("out_features", [](const CudaGruHead& s) { return s.impl->out_features(); })
      .def(
          "step_classifier",
          [](const CudaGruHead& s, uintptr_t x, uintptr_t h, uintptr_t h_out, int64_t batch,
             uintptr_t logits, uintptr_t maxprob, uintptr_t argmax, const std::string& x_dtype,
             const std::string& logits_dtype, uintptr_t stream) {
            const auto xd = parse_dtype(x_dtype, "x_dtype");
            const auto ld = parse_dtype(logits_dtype, "logits_dtype");
            py::gil_scoped_release release;
            s.impl->step_classifier(x, xd, h, batch, h_out, logits, ld, maxprob, argmax, stream);
          },
          py::arg("x"), py::arg("h"), py::arg("h_out"), py::arg("batch"), py::arg("logits"),
          py::arg("maxprob") = 0, py::arg("argmax") = 0, py::arg("x_dtype") = "float32",
          py::arg("logits_dtype") = "float32", py::arg("stream") = 0)
      .def(
          "step_actor",
          [](const CudaGruHead& s, uintptr_t x, uintptr_t h, uintptr_t h_out, int64_t batch,
             uintptr_t action, uintptr_t coords, int64_t image_size, int64_t patch_size,
             const std::string& x_dtype, uintptr_t stream) {
            const auto xd = parse_dtype(x_dtype, "x_dtype");
            py::gil_scoped_release release;
            s.impl->step_actor(x, xd, h, batch, h_out, action, coords, image_size, patch_size, stream);
          },
          py::arg("x"), py::arg("h"), py::arg("h_out"), py::arg("batch"), py::arg("action"),
          py::arg("coords"), py::arg("image_size"), py::arg("patch_size"),
          py::arg("x_dtype") = "float32", py::arg("stream") = 0);

  py::class_<CudaLinear>(m, "Linear", "Linear layer with weights on the device.")
      .def(py::init([](const py::object& w, const py::object& b, const std::string& weight_dtype) {
             py::array wa = checked<float>(w, 2, "w");
             if (wa.shape(0) < 1 || wa.shape(1) < 1) throw py::value_error("w must not be empty");
             py::array kb;
             const float* bp = opt_vector(b, wa.shape(0), "b", kb);
             CudaLinear l;
             l.impl = std::make_unique<gc::LinearWeights>(static_cast<const float*>(wa.data()), bp,
                                                          wa.shape(0), wa.shape(1),
                                                          parse_dtype(weight_dtype, "weight_dtype"));
             return l;
           }),
           py::arg("w"), py::arg("b") = py::none(), py::arg("weight_dtype") = "float32")
      .def_property_readonly("in_features", [](const CudaLinear& s) { return s.impl->in_features(); })
      .def_property_readonly("out_features", [](const CudaLinear& s) { return s.impl->out_features(); })
      .def(
          "forward",
          [](const CudaLinear& s, uintptr_t x, uintptr_t out, int64_t batch, bool relu,
             const std::string& x_dtype, const std::string& out_dtype, uintptr_t stream) {
            const auto xd = parse_dtype(x_dtype, "x_dtype");
            const auto od = parse_dtype(out_dtype, "out_dtype");
            py::gil_scoped_release release;
            s.impl->forward(x, xd, batch, out, od, relu, stream);
          },
          py::arg("x"), py::arg("out"), py::arg("batch"), py::arg("relu") = false,
          py::arg("x_dtype") = "float32", py::arg("out_dtype") = "float32", py::arg("stream") = 0)
      .def(
          "cascaded_step",
          [](const CudaLinear& s, uintptr_t features, const std::string& layout, int64_t steps,
             int64_t batch, int64_t feature_dim, int64_t k, uintptr_t logits, uintptr_t maxprob,
             uintptr_t argmax, const std::string& x_dtype, const std::string& logits_dtype,
             uintptr_t stream) {
            if (layout != "tnf" && layout != "ntf") throw py::value_error("layout must be 'tnf' or 'ntf'");
            const auto xd = parse_dtype(x_dtype, "x_dtype");
            const auto ld = parse_dtype(logits_dtype, "logits_dtype");
            py::gil_scoped_release release;
            gc::cascaded_step(*s.impl, features, xd, layout == "tnf", steps, batch, feature_dim, k,
                              logits, ld, maxprob, argmax, stream);
          },
          py::arg("features"), py::arg("layout"), py::arg("steps"), py::arg("batch"),
          py::arg("feature_dim"), py::arg("k"), py::arg("logits"), py::arg("maxprob") = 0,
          py::arg("argmax") = 0, py::arg("x_dtype") = "float32", py::arg("logits_dtype") = "float32",
          py::arg("stream") = 0);
}
#else
void bind_cuda(py::module_& m) {
  // Built without CUDA: keep the names so callers get a clear error, not AttributeError.
  auto unavailable = [](py::args, py::kwargs) -> py::object {
    throw std::runtime_error("gfnet_edge._C was built without CUDA (nvcc was not found or GFNET_EDGE_CUDA=0)");
  };
  for (const char* name : {"DeviceBuffer", "Stream", "device_name", "device_properties", "synchronize", "stream_synchronize",
                           "memcpy_htod", "memcpy_dtoh", "memcpy_dtod", "gather_rows", "softmax_stats",
                           "preprocess", "glance", "crop_patches",
                           "GRUHead", "Linear", "Graph", "Event", "PinnedBuffer"}) {
    m.def(name, unavailable);
  }
}
#endif

int cuda_device_count() {
#if defined(GFNET_EDGE_WITH_CUDA)
  return gfn::cuda::device_count();
#else
  return 0;
#endif
}

std::string cuda_device_error() {
#if defined(GFNET_EDGE_WITH_CUDA)
  return gfn::cuda::device_error();
#else
  return "built without CUDA";
#endif
}

}  // namespace

PYBIND11_MODULE(GFNET_EDGE_EXT_NAME, m) {
  m.doc() = "gfnet-edge native kernels (CPU, and CUDA when built with nvcc). Use gfnet_edge.ops.";

  m.def("has_cuda_build", [] {
#if defined(GFNET_EDGE_WITH_CUDA)
    return true;
#else
    return false;
#endif
  }, "True when the CUDA kernels were compiled into this module.");
  m.def("cuda_device_count", &cuda_device_count, "Number of usable CUDA devices (0 without a driver).");
  m.def("cuda_device_error", &cuda_device_error, "Why cuda_device_count() is 0, or ''.");
  m.def("cuda_archs", [] { return std::string(GFNET_EDGE_CUDA_ARCHS_STR); },
        "CUDA architectures compiled in (','-separated), '' without CUDA.");
  m.def("get_num_threads", &gfn::cpu::get_num_threads);
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("number of threads must be >= 1");
    gfn::cpu::set_num_threads(n);
  }, py::arg("n"));
  m.def("simd_level", &gfn::cpu::simd_level, "'avx2' or 'generic': what the CPU kernels use now.");
  m.def("set_simd_enabled", &gfn::cpu::set_simd_enabled, py::arg("enabled"),
        "Turns the AVX2 kernels off/on (results are identical; for tests and benchmarks).");

  m.def("_read_pass_seconds", [](size_t nbytes, int reps) {
    py::gil_scoped_release release;
    return gfn::cpu::read_pass_seconds(nbytes, reps);
  }, py::arg("nbytes"), py::arg("reps") = 10,
        "Benchmark helper: best time of a parallel read of nbytes (memory roofline).");
  m.def("preprocess", &cpu_preprocess, py::arg("frames"), py::arg("image_size"), py::arg("resize_short"),
        py::arg("interpolation"), py::arg("bgr"), py::arg("mean"), py::arg("std"), py::arg("out") = py::none(),
        py::arg("glance_size") = 0, py::arg("glance_interpolation") = "bicubic",
        py::arg("glance_out") = py::none());
  m.def("glance", &cpu_glance, py::arg("images"), py::arg("size"), py::arg("interpolation"),
        py::arg("out") = py::none());
  m.def("crop_patches", &cpu_crop, py::arg("images"), py::arg("coords"), py::arg("patch_size"),
        py::arg("out") = py::none(), py::arg("index") = py::none());
  m.def("resize_crop", &cpu_resize_crop, py::arg("frames"), py::arg("image_size"), py::arg("resize_short"),
        py::arg("interpolation"), py::arg("out") = py::none());
  m.def("glance_u8", &cpu_glance_u8, py::arg("frames"), py::arg("size"), py::arg("interpolation"),
        py::arg("mean"), py::arg("std"), py::arg("bgr") = false, py::arg("out") = py::none());
  m.def("crop_patches_u8", &cpu_crop_u8, py::arg("frames"), py::arg("coords"), py::arg("patch_size"),
        py::arg("mean"), py::arg("std"), py::arg("bgr") = false, py::arg("out") = py::none(),
        py::arg("index") = py::none());
  m.def("linear", &cpu_linear, py::arg("x"), py::arg("w"), py::arg("b") = py::none(), py::arg("relu") = false);
  m.def("softmax_stats", &cpu_softmax_stats, py::arg("logits"));

  py::class_<PyGRUCell>(m, "GRUCell", "PyTorch-layout GRU cell with packed CPU weights.")
      .def(py::init(&make_gru_cell), py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih") = py::none(),
           py::arg("b_hh") = py::none(), py::arg("weight_dtype") = "float32")
      .def_property_readonly("input_size", [](const PyGRUCell& s) { return s.cell.input_size(); })
      .def_property_readonly("hidden_size", [](const PyGRUCell& s) { return s.cell.hidden_size(); })
      .def_property_readonly("nbytes", [](const PyGRUCell& s) { return s.cell.nbytes(); })
      .def_property_readonly("weight_dtype", [](const PyGRUCell& s) { return wtype_name(s.cell.type()); })
      .def("step", &gru_step, py::arg("x"), py::arg("h") = py::none());

  py::class_<PyLinear>(m, "Linear", "Linear layer with packed CPU weights.")
      .def(py::init(&make_linear), py::arg("w"), py::arg("b") = py::none(), py::arg("weight_dtype") = "float32")
      .def_property_readonly("in_features", [](const PyLinear& s) { return s.layer.in_features(); })
      .def_property_readonly("out_features", [](const PyLinear& s) { return s.layer.out_features(); })
      .def_property_readonly("weight_dtype", [](const PyLinear& s) { return wtype_name(s.layer.type()); })
      .def("forward", &linear_forward, py::arg("x"), py::arg("relu") = false)
      .def("cascaded_step", &cascaded_step, py::arg("features"), py::arg("k"), py::arg("layout") = "tnf");

  m.def("gru_classifier_step", &gru_classifier_step, py::arg("cell"), py::arg("head"), py::arg("x"),
        py::arg("h") = py::none());
  m.def("gru_actor_step", &gru_actor_step, py::arg("cell"), py::arg("head"), py::arg("x"), py::arg("h"),
        py::arg("image_size"), py::arg("patch_size"));
  py::class_<PyHostLoop>(m, "HostLoop",
                         "The work between two backbone runs of the host loop (heads, exit test, compaction, "
                         "policy, crop) in one call; see gfnet_edge/runtime/driver.py.")
      .def(py::init(&make_host_loop), py::arg("actor_cell"), py::arg("actor_head"), py::arg("cls_cell"),
           py::arg("cls_head"), py::arg("cascaded"), py::arg("steps"), py::arg("image_size"), py::arg("patch_size"),
           py::arg("step0_backbone"), py::arg("mean"), py::arg("std"))
      .def("begin", &host_loop_begin, py::arg("images"), py::arg("feature"), py::arg("state"), py::arg("logits"),
           py::arg("thresholds"))
      .def("next", &host_loop_next, py::arg("feature"), py::arg("state"))
      .def_property(
          "profile", [](const PyHostLoop& s) { return s.loop.profile(); },
          [](PyHostLoop& s, bool on) { s.loop.set_profile(on); },
          "time the parts of each call (part_seconds); off by default")
      .def(
          "part_seconds",
          [](const PyHostLoop& s) {
            const auto& p = s.loop.part_seconds();
            return py::make_tuple(p[gfn::cpu::HostLoop::kHeads], p[gfn::cpu::HostLoop::kExit],
                                  p[gfn::cpu::HostLoop::kPolicy], p[gfn::cpu::HostLoop::kCrop]);
          },
          "(heads, exit, policy, crop) seconds of the last begin() / next() while profile is on; -1 for a part "
          "the call did not run (every part when profile is off)")
      .def("logits", [](const PyHostLoop& s) {
        const auto& l = s.loop.logits();
        const int64_t c = s.loop.classes(), m = c ? static_cast<int64_t>(l.size()) / c : 0;
        py::array_t<float> out({m, c});
        std::memcpy(out.mutable_data(), l.data(), l.size() * sizeof(float));
        return out;
      })
      .def("active", [](const PyHostLoop& s) {
        const auto& a = s.loop.active();
        py::array_t<int64_t> out(static_cast<py::ssize_t>(a.size()));
        std::memcpy(out.mutable_data(), a.data(), a.size() * sizeof(int64_t));
        return out;
      })
      .def("outputs", [](const PyHostLoop& s) {
        const int64_t n = static_cast<int64_t>(s.loop.prediction().size());
        py::array_t<int64_t> pred(n), ex(n);
        py::array_t<float> conf(n);
        py::array_t<int32_t> coords({std::max<int64_t>(s.steps - 1, 0), n, int64_t{2}});
        std::memcpy(pred.mutable_data(), s.loop.prediction().data(), n * sizeof(int64_t));
        std::memcpy(ex.mutable_data(), s.loop.exit_step().data(), n * sizeof(int64_t));
        std::memcpy(conf.mutable_data(), s.loop.confidence().data(), n * sizeof(float));
        std::memcpy(coords.mutable_data(), s.loop.coords().data(), s.loop.coords().size() * sizeof(int32_t));
        return py::make_tuple(pred, conf, ex, coords);
      });

  py::module_ cuda = m.def_submodule("cuda", "CUDA kernels (device pointers as ints, stream handles).");
  cuda.def("device_count", &cuda_device_count);
  bind_cuda(cuda);
}
