// Bindings of the host loop's per-step engine (gfn::cpu::HostLoop): the heads, the exit
// test, the compaction, the policy step and the next crop between two backbone runs.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings/common.h"
#include "cpu/host_loop.h"

namespace gfn::bind {
namespace {

/// gfn::cpu::HostLoop with the Python head objects it points into kept alive.
struct PyHostLoop {
  py::object keep;  // (actor cell, actor head, classifier cell, classifier head, cascaded layers)
  gfn::cpu::HostLoop loop;
  py::object images = py::none();  // the batch being run (None between batches)
  int64_t feature_dim = 0;
  int64_t steps, image_size, patch_size, state_dim;
  bool busy = false;  // a begin() / next() runs (with the GIL released); read and set under the GIL
  explicit PyHostLoop(const gfn::cpu::HostLoopModel& m)
      : loop(m), steps(m.steps), image_size(m.image_size), patch_size(m.patch_size),
        state_dim(m.actor_cell->input_size()) {}
};

/// Raises unless no begin() / next() of this loop runs in another thread: the loop's buffers
/// change during those calls, which run with the GIL released.
const PyHostLoop& idle(const PyHostLoop& self) {
  if (self.busy) {
    throw std::runtime_error("this HostLoop is running begin() or next() in another thread; "
                             "use one HostLoop per thread");
  }
  return self;
}

/// Marks the loop busy for one begin() / next() (constructed and destroyed with the GIL held).
class BusyScope {
 public:
  explicit BusyScope(PyHostLoop& self) : self_(self) {
    idle(self);
    self_.busy = true;
  }
  ~BusyScope() { self_.busy = false; }
  BusyScope(const BusyScope&) = delete;
  BusyScope& operator=(const BusyScope&) = delete;

 private:
  PyHostLoop& self_;
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
  py::list layers;  // cascaded layers k = 2 .. steps
  if (!cls_cell.is_none()) {
    const auto& cc = cls_cell.cast<const PyGRUCell&>();
    const auto& ch = cls_head.cast<const PyLinear&>();
    check_head_fits(cc, ch);
    m.cls_cell = &cc.cell;
    m.cls_head = &ch.layer;
  } else {
    if (!step0_backbone) throw py::value_error("a cascaded classifier takes its step-0 logits from the glance graph");
    // The layer objects themselves are kept (not the caller's dict, which may change later).
    m.cascaded.assign(static_cast<size_t>(steps + 1), nullptr);
    for (int64_t k = 2; k <= steps; ++k) {
      if (!cascaded.contains(py::int_(k))) {
        throw py::value_error("cascaded classifier layer for k=" + std::to_string(k) + " is missing");
      }
      py::object layer = cascaded[py::int_(k)];
      m.cascaded[k] = &layer.cast<const PyLinear&>().layer;
      layers.append(layer);
    }
  }
  m.norm = normalize_params(mean, std, false);
  auto* h = new PyHostLoop(m);
  h->keep = py::make_tuple(actor_cell, actor_head, cls_cell, cls_head, layers);
  return h;
}

/// The patches of the next focus step (a view of the loop's buffer: its contents are those of
/// this step until the loop's next call; the view keeps the memory itself alive), or None when
/// the batch is done.
py::object host_loop_patches(PyHostLoop& self, int64_t m) {
  if (m == 0) {
    self.images = py::none();
    return py::none();
  }
  const int64_t p = self.patch_size;
  auto* keep = new std::shared_ptr<const std::vector<float>>(self.loop.patch_buffer());
  py::capsule owner(keep, [](void* k) { delete static_cast<std::shared_ptr<const std::vector<float>>*>(k); });
  return py::array_t<float>({m, int64_t{3}, p, p}, (*keep)->data(), owner);
}

py::object host_loop_begin(py::object self_obj, const py::object& images, const py::object& feature,
                           const py::object& state, const py::object& logits, const py::object& thresholds) {
  auto& self = self_obj.cast<PyHostLoop&>();
  const BusyScope busy(self);
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
  // No batch runs until begin() succeeds: a refused begin() may leave the loop half set up,
  // pointing at `im` or at the previous batch's images, which `self.images` no longer holds.
  self.images = py::none();
  int64_t m;
  {
    py::gil_scoped_release release;
    m = self.loop.begin(im.data(), u8, n, static_cast<const float*>(f.data()), f.shape(1),
                        static_cast<const float*>(s.data()), state_dim, lp, classes, tp);
  }
  self.images = im;
  self.feature_dim = f.shape(1);
  return host_loop_patches(self, m);
}

py::object host_loop_next(py::object self_obj, const py::object& feature, const py::object& state) {
  auto& self = self_obj.cast<PyHostLoop&>();
  const BusyScope busy(self);
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
  return host_loop_patches(self, next);
}

}  // namespace

void bind_host_loop(py::module_& m) {
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
          "profile", [](const PyHostLoop& s) { return idle(s).loop.profile(); },
          [](PyHostLoop& s, bool on) {
            idle(s);
            s.loop.set_profile(on);
          },
          "time the parts of each call (part_seconds); off by default")
      .def(
          "part_seconds",
          [](const PyHostLoop& s) {
            const auto& p = idle(s).loop.part_seconds();
            return py::make_tuple(p[gfn::cpu::HostLoop::kHeads], p[gfn::cpu::HostLoop::kExit],
                                  p[gfn::cpu::HostLoop::kPolicy], p[gfn::cpu::HostLoop::kCrop]);
          },
          "(heads, exit, policy, crop) seconds of the last begin() / next() while profile is on; -1 for a part "
          "the call did not run (every part when profile is off)")
      .def("logits", [](const PyHostLoop& s) {
        const auto& l = idle(s).loop.logits();
        const int64_t c = s.loop.classes(), m = c ? static_cast<int64_t>(l.size()) / c : 0;
        py::array_t<float> out({m, c});
        std::memcpy(out.mutable_data(), l.data(), l.size() * sizeof(float));
        return out;
      })
      .def("active", [](const PyHostLoop& s) {
        const auto& a = idle(s).loop.active();
        py::array_t<int64_t> out(static_cast<py::ssize_t>(a.size()));
        std::memcpy(out.mutable_data(), a.data(), a.size() * sizeof(int64_t));
        return out;
      })
      .def("outputs", [](const PyHostLoop& s) {
        idle(s);
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
}

}  // namespace gfn::bind
