// Shared declarations of the Python bindings (gfnet_edge._C): the argument checks every
// binding uses, the Python-side head objects, and one bind_* function per area.
//
// The bindings are the one layer that validates what Python passes: wrong dtypes raise
// TypeError; wrong shapes, non-contiguous arrays and out-of-range values raise ValueError,
// before any kernel runs, so that no input can make a kernel read or write out of bounds.
// The GIL is released while the kernels run.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "common/interp.h"
#include "cpu/heads.h"
#include "cpu/preprocess.h"

namespace gfn::bind {

namespace py = pybind11;
using gfn::Interp;

// ------------------------------------------------------------------ argument checks ----

/// "(2, 3)" / "(4,)": an array's shape as numpy prints it.
std::string shape_str(const py::array& a);
/// `obj` as a numpy array (TypeError naming `name` otherwise).
py::array as_ndarray(const py::handle& obj, const std::string& name);
void check_contiguous(const py::array& a, const std::string& name);
void check_ndim(const py::array& a, py::ssize_t ndim, const std::string& name);
void check_writeable(const py::array& a, const std::string& name);
/// Raises ValueError when the bytes of output `out` overlap those of input `in` (both
/// C-contiguous): a kernel would read values it has already overwritten.
void check_disjoint(const py::array& out, const std::string& out_name, const py::array& in,
                    const std::string& in_name);
void check_positive(int64_t v, const std::string& name);
/// Positive sizes whose product (times `item` bytes) fits an int64 byte count; checked before
/// any size arithmetic (a kernel that divides by or multiplies sizes never sees 0 or an overflow).
void check_sizes(std::initializer_list<std::pair<int64_t, const char*>> sizes, int64_t item = 4);
Interp parse_interp(const std::string& s, const std::string& name);
gfn::cpu::WType parse_wtype(const std::string& s);
std::string wtype_name(gfn::cpu::WType t);
std::array<float, 3> three_floats(const std::vector<double>& v, const std::string& name);
/// Mean / std (3 values each, std non-zero) and the channel order of a normalisation.
gfn::cpu::NormalizeParams normalize_params(const std::vector<double>& mean, const std::vector<double>& std,
                                           bool bgr);
/// Optional (n,) float32 vector: its data, or null for None (`keep` holds the array).
const float* opt_vector(const py::object& obj, int64_t n, const std::string& name, py::array& keep);
/// Batch of row vectors (N, k) float32, C-contiguous, N >= 1.
py::array batch_matrix(const py::handle& obj, int64_t k, const std::string& name);
/// (n, cols) float32 C-contiguous rows; cols < 0 accepts any width.
py::array rows_f32(const py::object& obj, int64_t n, int64_t cols, const std::string& name);

template <typename T>
void check_dtype(const py::array& a, const std::string& name) {
  if (!a.dtype().is(py::dtype::of<T>())) {
    throw py::type_error(name + " must have dtype " + std::string(py::str(py::dtype::of<T>())) +
                         ", got " + std::string(py::str(a.dtype())));
  }
}

/// A numpy array of dtype T with `ndim` dimensions, C-contiguous.
template <typename T>
py::array checked(const py::handle& obj, py::ssize_t ndim, const std::string& name) {
  py::array a = as_ndarray(obj, name);
  check_dtype<T>(a, name);
  check_ndim(a, ndim, name);
  check_contiguous(a, name);
  return a;
}

/// Validates a caller-provided output array, or allocates a new one when `out` is None.
template <typename T>
py::array output_array(const py::object& out, const std::vector<py::ssize_t>& shape, const std::string& name) {
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

// ------------------------------------------------------------------- CPU head objects ----

/// gfn::cpu::GruCell as a Python object.
struct PyGRUCell {
  gfn::cpu::GruCell cell;
};

/// gfn::cpu::Linear as a Python object.
struct PyLinear {
  gfn::cpu::Linear layer;
};

/// Raises ValueError unless `head` takes the GRU's hidden state.
void check_head_fits(const PyGRUCell& cell, const PyLinear& head);

// --------------------------------------------------------------------------- areas ----

void bind_system(py::module_& m);     // threads, SIMD path, memory probe, CUDA availability
void bind_image(py::module_& m);      // CPU pre-processing, glance, crop
void bind_heads(py::module_& m);      // CPU linear, GRU, classifier / actor / cascaded steps
void bind_host_loop(py::module_& m);  // the host loop's per-step engine
void bind_cuda(py::module_& m);       // the `cuda` submodule (memory, streams, events, graphs)
#if defined(GFNET_EDGE_WITH_CUDA)
void bind_cuda_kernels(py::module_& m);  // its kernels and device heads (called by bind_cuda)
#endif

}  // namespace gfn::bind
