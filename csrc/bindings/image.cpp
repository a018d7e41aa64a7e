// Bindings of the CPU image kernels: pre-processing (resize, centre crop, normalise), the
// glance and the patch crop, for float32 images and for uint8 frames normalised on the fly.
#include <cstdint>
#include <string>
#include <vector>

#include "bindings/common.h"
#include "common/resize_plan.h"
#include "cpu/preprocess.h"

namespace gfn::bind {
namespace {

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

/// Raises ValueError when `out` overlaps any of the frames.
void check_disjoint_frames(const py::array& out, const std::string& name, const FrameList& fl) {
  for (size_t i = 0; i < fl.keep.size(); ++i) {
    check_disjoint(out, name, fl.keep[i], "frames[" + std::to_string(i) + "]");
  }
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
  check_disjoint_frames(o, "out", fl);
  py::object g = py::none();
  float* gptr = nullptr;
  if (glance_size > 0) {
    if (glance_size > image_size) {
      // Allowed by interpolate (upsampling), but never what GFNet does: keep it an error.
      throw py::value_error("glance_size must be <= image_size");
    }
    py::array ga = output_array<float>(glance_out, {n, 3, glance_size, glance_size}, "glance_out");
    check_disjoint(ga, "glance_out", o, "out");
    check_disjoint_frames(ga, "glance_out", fl);
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
  check_disjoint_frames(o, "out", fl);
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
  check_disjoint(o, "out", a, "frames");
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
  check_disjoint(o, "out", a, "images");
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
  check_disjoint(o, "out", a, "images");
  check_disjoint(o, "out", k, "coords");
  if (ip != nullptr) check_disjoint(o, "out", keep_index, "index");
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
  check_disjoint(o, "out", a, "frames");
  check_disjoint(o, "out", k, "coords");
  if (ip != nullptr) check_disjoint(o, "out", keep_index, "index");
  const uint8_t* src = static_cast<const uint8_t*>(a.data());
  const int32_t* kp = static_cast<const int32_t*>(k.data());
  float* dst = static_cast<float*>(o.mutable_data());
  {
    py::gil_scoped_release release;
    gfn::cpu::crop_patches_u8(src, m, s, kp, norm, dst, patch, ip);
  }
  return o;
}

}  // namespace

void bind_image(py::module_& m) {
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
  // The resize limits of gfn::plan_geometry, which ops.image.resized_hw applies too.
  m.attr("RESIZE_MAX_PRODUCT") = gfn::kMaxResizeProduct;
  m.attr("RESIZE_MAX_ENLARGEMENT") = gfn::kMaxResizeEnlargement;
  m.def("resize_plan_cache_info", [] {
    const gfn::cpu::CacheInfo c = gfn::cpu::resize_plan_cache_info();
    return py::make_tuple(c.hits, c.misses, c.maxsize, c.currsize);
  });
  m.def("crop_patches_u8", &cpu_crop_u8, py::arg("frames"), py::arg("coords"), py::arg("patch_size"),
        py::arg("mean"), py::arg("std"), py::arg("bgr") = false, py::arg("out") = py::none(),
        py::arg("index") = py::none());
}

}  // namespace gfn::bind
