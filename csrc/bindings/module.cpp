// The extension module gfnet_edge._C: its settings and availability queries, and the
// bindings of each area (see common.h). Python code uses it through gfnet_edge.ops.
#include <string>

#include "bindings/common.h"
#include "cpu/membench.h"
#include "cpu/simd.h"
#include "cpu/threadpool.h"
#if defined(GFNET_EDGE_WITH_CUDA)
#include "cuda/api.h"
#endif

#ifndef GFNET_EDGE_CUDA_ARCHS_STR
#define GFNET_EDGE_CUDA_ARCHS_STR ""
#endif

namespace gfn::bind {
namespace {

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

void bind_system(py::module_& m) {
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
    if (n < 1) throw py::value_error("n must be >= 1, got " + std::to_string(n) + " (the number of threads)");
    gfn::cpu::set_num_threads(n);
  }, py::arg("n"));
  m.def("simd_level", &gfn::cpu::simd_level, "The SIMD path the CPU kernels use now ('avx2', 'neon', or 'generic' without one).");
  m.def("set_simd_enabled", &gfn::cpu::set_simd_enabled, py::arg("enabled"),
        "Turns the SIMD kernels off/on (results are identical; for tests and benchmarks).");
  m.def("read_pass_seconds", [](int64_t nbytes, int reps) {
    check_positive(nbytes, "nbytes");
    check_positive(reps, "reps");
    py::gil_scoped_release release;
    return gfn::cpu::read_pass_seconds(static_cast<size_t>(nbytes), reps);
  }, py::arg("nbytes"), py::arg("reps") = 10,
        "Best time of a parallel read of nbytes (the memory roofline of the bandwidth-bound kernels).");
}

}  // namespace gfn::bind

PYBIND11_MODULE(GFNET_EDGE_EXT_NAME, m) {
  namespace bind = gfn::bind;
  m.doc() = "gfnet-edge native kernels (CPU, and CUDA when built with nvcc). Use gfnet_edge.ops.";
  bind::bind_system(m);
  bind::bind_image(m);
  bind::bind_heads(m);
  bind::bind_host_loop(m);
  pybind11::module_ cuda = m.def_submodule("cuda", "CUDA kernels (device pointers as ints, stream handles).");
  cuda.def("device_count", &bind::cuda_device_count);
  bind::bind_cuda(cuda);
}
