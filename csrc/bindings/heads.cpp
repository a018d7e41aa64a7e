// Bindings of the CPU heads: linear layers, GRU cells, the classifier / actor steps and the
// cascaded classifiers (weights packed once, float32 or float16 storage).
#include <cstdint>
#include <string>
#include <tuple>

#include "bindings/common.h"
#include "common/argmax.h"
#include "cpu/heads.h"

namespace gfn::bind {
namespace {

using gfn::cpu::row_pointers;

/// The new output arrays of a classifier step and their data pointers: logits (nb, classes),
/// maxprob (nb,) float32, argmax (nb,) int32; a class count an int32 argmax cannot index is
/// refused before anything is allocated or computed.
struct ClassifierOutputs {
  py::array_t<float> logits, maxprob;
  py::array_t<int32_t> argmax;
  float *lp, *mp;
  int32_t* ap;
  ClassifierOutputs(int64_t nb, int64_t classes)
      : logits({nb, check_classes(classes)}), maxprob(nb), argmax(nb), lp(logits.mutable_data()),
        mp(maxprob.mutable_data()), ap(argmax.mutable_data()) {}
};

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
  ClassifierOutputs o(nb, classes);
  const float* fp = static_cast<const float*>(f.data());
  {
    py::gil_scoped_release release;
    gfn::cpu::cascaded_forward(self.layer, k, fp, tnf, steps, nb, fd, o.lp);
    gfn::cpu::softmax_stats(o.lp, nb, classes, o.mp, o.ap);
  }
  return py::make_tuple(o.logits, o.maxprob, o.argmax);
}

py::tuple gru_classifier_step(const PyGRUCell& cell, const PyLinear& head, const py::object& x,
                              const py::object& h) {
  check_head_fits(cell, head);
  check_classes(head.layer.out_features());  // before the GRU step, as every classifier call
  py::array hn = gru_step(cell, x, h);
  const int64_t nb = hn.shape(0);
  ClassifierOutputs o(nb, head.layer.out_features());
  const float* hp = static_cast<const float*>(hn.data());
  {
    py::gil_scoped_release release;
    gfn::cpu::classifier_head(head.layer, hp, nb, o.lp, o.mp, o.ap);
  }
  return py::make_tuple(hn, o.logits, o.maxprob, o.argmax);
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

}  // namespace

void bind_heads(py::module_& m) {
  m.def("linear", &cpu_linear, py::arg("x"), py::arg("w"), py::arg("b") = py::none(), py::arg("relu") = false);
  m.def("softmax_stats", &cpu_softmax_stats, py::arg("logits"));
  m.def("check_classes", [](int64_t classes) { check_classes(classes); }, py::arg("classes"),
        "ValueError unless 1 <= classes <= 2^31 - 1 (the predictions are int32), as every argmax checks.");

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
}

}  // namespace gfn::bind
