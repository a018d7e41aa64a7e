// Bindings of the CUDA kernels on device pointers: row gather, softmax statistics,
// pre-processing, glance, patch crop, and the heads with weights on the device. Sizes,
// dtype names and modes are checked here before anything is launched; pointers are checked
// by the kernels' entry points (csrc/cuda).
#if defined(GFNET_EDGE_WITH_CUDA)
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bindings/common.h"
#include "common/argmax.h"
#include "cuda/api.h"

namespace gfn::bind {
namespace gc = gfn::cuda;

namespace {

gc::DType parse_dtype(const std::string& s, const std::string& name) {
  if (s == "float32") return gc::DType::kF32;
  if (s == "float16") return gc::DType::kF16;
  throw py::value_error(name + " must be 'float32' or 'float16', got '" + s + "'");
}

struct CudaGruHead {
  std::unique_ptr<gc::GruHead> impl;
};

struct CudaLinear {
  std::unique_ptr<gc::LinearWeights> impl;
};

}  // namespace

void bind_cuda_kernels(py::module_& m) {
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
        check_classes(classes);
        const auto od = parse_dtype(out_dtype, "out_dtype");
        py::gil_scoped_release release;
        gc::require_device();
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
         const std::string& glance_dtype, uintptr_t stream, int64_t n) {
        check_sizes({{n, "n"}, {height, "height"}, {width, "width"}}, 3);
        check_sizes({{n, "n"}, {image_size, "image_size"}, {image_size, "image_size"}, {3, "channels"}});
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
        gc::preprocess(frame, n, height, width, bgr, resize_short, image_size, interp, m3.data(),
                       s3.data(), out, od, glance, glance_size, ginterp, gd, stream);
      },
      py::arg("frame"), py::arg("height"), py::arg("width"), py::arg("image_size"),
      py::arg("resize_short"), py::arg("interpolation"), py::arg("bgr"), py::arg("mean"),
      py::arg("std"), py::arg("out"), py::arg("out_dtype") = "float32", py::arg("glance") = 0,
      py::arg("glance_size") = 0, py::arg("glance_interpolation") = "bicubic",
      py::arg("glance_dtype") = "float32", py::arg("stream") = 0, py::arg("n") = 1,
      "Pre-processes n contiguous uint8 (h, w, 3) device frames into (n, 3, S, S) (+ their glance).");

  m.def(
      "normalise_frames",
      [](uintptr_t frames, int64_t n, int64_t image_size, bool bgr, const std::vector<double>& mean,
         const std::vector<double>& std, uintptr_t out, uintptr_t glance, int64_t glance_size,
         const std::string& glance_interpolation, uintptr_t stream) {
        check_sizes({{n, "n"}, {image_size, "image_size"}, {image_size, "image_size"}, {3, "channels"}});
        const auto m3 = three_floats(mean, "mean");
        const auto s3 = three_floats(std, "std");
        for (float v : s3) {
          if (!(v != 0.0f)) throw py::value_error("std values must be non-zero");
        }
        const Interp ginterp = parse_interp(glance_interpolation, "glance_interpolation");
        if (glance != 0 && (glance_size < 1 || glance_size > image_size)) {
          throw py::value_error("glance_size must be in [1, image_size]");
        }
        py::gil_scoped_release release;
        gc::normalise_frames(frames, n, image_size, bgr, m3.data(), s3.data(), out, glance, glance_size, ginterp,
                             stream);
      },
      py::arg("frames"), py::arg("n"), py::arg("image_size"), py::arg("bgr"), py::arg("mean"), py::arg("std"),
      py::arg("out"), py::arg("glance") = 0, py::arg("glance_size") = 0,
      py::arg("glance_interpolation") = "bicubic", py::arg("stream") = 0,
      "Normalises n contiguous uint8 (S, S, 3) device frames into float32 (n, 3, S, S) (+ their glance).");

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

}  // namespace gfn::bind
#endif  // GFNET_EDGE_WITH_CUDA
