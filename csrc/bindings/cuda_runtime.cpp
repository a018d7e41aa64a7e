// Bindings of the CUDA runtime pieces: device memory, pinned host memory, streams, events,
// graphs and device queries (the `cuda` submodule). Without CUDA the names exist and raise
// RuntimeError, so that callers get a clear error rather than AttributeError.
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "bindings/common.h"
#if defined(GFNET_EDGE_WITH_CUDA)
#include "cuda/api.h"
#endif

namespace gfn::bind {

void bind_cuda_loop(py::module_& m);  // cuda_loop.cpp: the batch-1 loop graph and its exit rule

#if defined(GFNET_EDGE_WITH_CUDA)
namespace gc = gfn::cuda;

namespace {

py::array host_bytes(const py::object& obj, const std::string& name) {
  py::array a = as_ndarray(obj, name);
  check_contiguous(a, name);
  return a;
}

}  // namespace

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
      .def_property_readonly("nodes", &gc::Graph::nodes)
      .def_property_readonly("handle", &gc::Graph::handle, "The captured cudaGraph_t as an int (0 before end_capture).")
      .def_property_readonly("node_kinds", &gc::Graph::node_kinds, "The kind of each top-level node of the captured graph.");

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
  m.def("stream_capturing", &gc::stream_capturing, py::arg("stream"),
        "Whether work enqueued on `stream` now is recorded into a graph being captured.");
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
  bind_cuda_kernels(m);
  bind_cuda_loop(m);
}
#else
void bind_cuda(py::module_& m) {
  // Built without CUDA: keep the names so callers get a clear error, not AttributeError.
  auto unavailable = [](py::args, py::kwargs) -> py::object {
    throw std::runtime_error("gfnet_edge._C was built without CUDA (nvcc was not found or GFNET_EDGE_CUDA=0)");
  };
  for (const char* name : {"DeviceBuffer", "Stream", "device_name", "device_properties", "synchronize", "stream_synchronize",
                           "stream_capturing", "memcpy_htod", "memcpy_dtoh", "memcpy_dtod", "gather_rows", "softmax_stats",
                           "preprocess", "normalise_frames", "glance", "crop_patches",
                           "GRUHead", "Linear", "Graph", "Event", "PinnedBuffer", "LoopGraph"}) {
    m.def(name, unavailable);
  }
  bind_cuda_loop(m);
}
#endif

}  // namespace gfn::bind
