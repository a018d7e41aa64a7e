// Argument checks shared by the bindings (see common.h).
#include <climits>
#include <cstdint>
#include <string>

#include "bindings/common.h"

namespace gfn::bind {

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

void check_writeable(const py::array& a, const std::string& name) {
  if (!a.writeable()) throw py::value_error(name + " must be writeable");
}

void check_disjoint(const py::array& out, const std::string& out_name, const py::array& in,
                    const std::string& in_name) {
  if (out.nbytes() == 0 || in.nbytes() == 0) return;
  const auto o = reinterpret_cast<uintptr_t>(out.data());
  const auto i = reinterpret_cast<uintptr_t>(in.data());
  if (o < i + static_cast<uintptr_t>(in.nbytes()) && i < o + static_cast<uintptr_t>(out.nbytes())) {
    throw py::value_error(out_name + " must not overlap " + in_name + " (the kernel does not work in place)");
  }
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

void check_sizes(std::initializer_list<std::pair<int64_t, const char*>> sizes, int64_t item) {
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

py::array batch_matrix(const py::handle& obj, int64_t k, const std::string& name) {
  py::array a = as_ndarray(obj, name);
  check_dtype<float>(a, name);
  if (a.ndim() != 2 || a.shape(1) != k) {
    throw py::value_error(name + " must have shape (N, " + std::to_string(k) + "), got " + shape_str(a));
  }
  if (a.shape(0) < 1) throw py::value_error(name + " must have at least one row, got shape " + shape_str(a));
  check_contiguous(a, name);
  return a;
}

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

py::array rows_f32(const py::object& obj, int64_t n, int64_t cols, const std::string& name) {
  py::array a = checked<float>(obj, 2, name);
  if (a.shape(0) != n || (cols >= 0 && a.shape(1) != cols)) {
    throw py::value_error(name + " must have shape (" + std::to_string(n) + ", " +
                          (cols >= 0 ? std::to_string(cols) : std::string("F")) + "), got " + shape_str(a));
  }
  return a;
}

void check_head_fits(const PyGRUCell& cell, const PyLinear& head) {
  if (head.layer.in_features() != cell.cell.hidden_size()) {
    throw py::value_error("head takes " + std::to_string(head.layer.in_features()) +
                          " inputs but the GRU hidden size is " + std::to_string(cell.cell.hidden_size()));
  }
}

}  // namespace gfn::bind
