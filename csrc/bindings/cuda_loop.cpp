// Bindings of the batch-1 loop graph (cuda/loop_graph.h) and of its exit rule
// (common/exit_rule.h). The host versions of the rule and of the exit step are bound in every
// build, so that CPU tests compare them with the Python loop's.
#include <cstdint>
#include <string>
#include <vector>

#include "bindings/common.h"
#include "common/exit_rule.h"
#if defined(GFNET_EDGE_WITH_CUDA)
#include "cuda/loop_graph.h"
#endif

namespace gfn::bind {

void bind_cuda_loop(py::module_& m) {
  m.def(
      "exits_at",
      [](const py::object& maxprob, float threshold) {
        py::array a = checked<float>(maxprob, 1, "maxprob");
        const auto* p = static_cast<const float*>(a.data());
        py::array_t<bool> out(a.shape(0));
        bool* o = out.mutable_data();
        for (py::ssize_t i = 0; i < a.shape(0); ++i) o[i] = gfn::exits_at(p[i], threshold);
        return out;
      },
      py::arg("maxprob"), py::arg("threshold"),
      "The exit rule of common/exit_rule.h per float32 max probability (bool array).");
  m.def("loop_result_words", [](int steps) {
    check_positive(steps, "steps");
    return gfn::loop_result_words(steps);
  }, py::arg("steps"), "Words (int32) of the batch-1 loop graph's result block for `steps` steps.");
  m.def(
      "loop_exit_step",
      [](const py::object& stats, const py::object& thresholds, const py::object& result, int t, int steps) {
        check_positive(steps, "steps");
        if (t < 0 || t >= steps) {
          throw py::value_error("t must lie in [0, " + std::to_string(steps - 1) + "], got " + std::to_string(t));
        }
        py::array s = checked<int32_t>(stats, 1, "stats");
        py::array th = checked<float>(thresholds, 1, "thresholds");
        py::array r = checked<int32_t>(result, 1, "result");
        check_writeable(r, "result");
        if (s.shape(0) < gfn::kStepBlockWords) {
          throw py::value_error("stats must hold " + std::to_string(gfn::kStepBlockWords) + " words, got " +
                                shape_str(s));
        }
        if (th.shape(0) != steps) throw py::value_error("thresholds must hold `steps` values, got " + shape_str(th));
        if (r.shape(0) != gfn::loop_result_words(steps)) {
          throw py::value_error("result must hold " + std::to_string(gfn::loop_result_words(steps)) +
                                " words, got " + shape_str(r));
        }
        return gfn::loop_exit_step(static_cast<const int32_t*>(s.data()), static_cast<const float*>(th.data()),
                                   static_cast<int32_t*>(r.mutable_data()), t, steps);
      },
      py::arg("stats"), py::arg("thresholds"), py::arg("result"), py::arg("t"), py::arg("steps"),
      "Host version of the loop graph's exit step t: records the step's block (int32 maxprob bits, "
      "argmax, row, col, flag) in `result`; True when step t + 1 runs.");

#if defined(GFNET_EDGE_WITH_CUDA)
  namespace gc = gfn::cuda;
  m.def(
      "conditional_support",
      [] {
        gc::ConditionalSupport s;
        {
          py::gil_scoped_release release;
          s = gc::conditional_support();
        }
        return py::make_tuple(s.compiled, s.driver, s.runtime, s.error);
      },
      "(compiled, driver version, runtime version, error): whether conditional graph nodes are usable "
      "(error is '' when they are). Probed once.");
  py::class_<gc::LoopGraph>(m, "LoopGraph", "The focus steps of a batch-1 run on CUDA conditional nodes.")
      .def(py::init<const std::vector<uintptr_t>&, uintptr_t, uintptr_t, uintptr_t>(), py::arg("focus"),
           py::arg("stats"), py::arg("thresholds"), py::arg("result"), py::call_guard<py::gil_scoped_release>())
      .def("launch", &gc::LoopGraph::launch, py::arg("stream"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("steps", &gc::LoopGraph::steps);
#else
  m.def("conditional_support", [] {
    return py::make_tuple(false, 0, 0, std::string("gfnet_edge._C was built without CUDA"));
  });
#endif
}

}  // namespace gfn::bind
