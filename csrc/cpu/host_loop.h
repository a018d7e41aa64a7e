// The work between two backbone runs of the host (CPU) GFNet loop, in one native call:
// classifier step, exit test, compaction of the running images' states, policy step and the
// patch crop of the next focus step. Python only runs the backbones (docs/benchmarks.md: the
// code between backbones runs cold, and each Python / numpy step there costs 3-5x its hot time).
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "heads.h"
#include "preprocess.h"

namespace gfn::cpu {

struct HostLoopModel {
  int64_t steps = 0, image_size = 0, patch_size = 0;
  bool step0_backbone = false;  ///< step-0 logits come from the glance graph
  const GruCell* actor_cell = nullptr;
  const Linear* actor_head = nullptr;  ///< Linear(H, 2)
  const GruCell* cls_cell = nullptr;   ///< GRU classifier (null: cascaded)
  const Linear* cls_head = nullptr;
  std::vector<const Linear*> cascaded;  ///< [k] takes k step features (k = 2 .. steps)
  NormalizeParams norm;                 ///< for uint8 frames
};

/// One batch through the loop. Call begin() with the glance graph's outputs, then next() with
/// each focus graph's outputs while the previous call returned patches (m > 0).
class HostLoop {
 public:
  explicit HostLoop(const HostLoopModel& model) : m_(model) {}

  /// Starts a batch of n images (uint8 (n, S, S, 3) frames or float32 (n, 3, S, S) images);
  /// feature (n, F), state (n, Hs), logits (n, C) or null; thresholds: `steps` values, or null
  /// to run every step (trace). Returns the number of patches written to `patch_buffer()`.
  int64_t begin(const void* images, bool u8, int64_t n, const float* feature, int64_t feature_dim,
                const float* state, int64_t state_dim, const float* logits, int64_t classes,
                const float* thresholds);
  /// The focus graph's outputs for the patches of the last call (m rows).
  int64_t next(const float* feature, const float* state);

  /// The buffer the patches are written to: a holder keeps it alive (a view handed out) after the loop has
  /// moved to a larger one. The loop writes each step's patches into the current buffer, and
  /// replaces it (never reallocates it) when a step needs more room.
  std::shared_ptr<const std::vector<float>> patch_buffer() const { return patches_; }
  /// Logits of the images that ran the last step (rows in the order `active()` had before the
  /// call: the exit test may have dropped some since; in trace mode nobody exits).
  const std::vector<float>& logits() const { return logits_; }
  const std::vector<int64_t>& active() const { return active_; }
  int64_t step() const { return t_; }
  int64_t classes() const { return classes_; }
  const std::vector<int64_t>& prediction() const { return prediction_; }
  const std::vector<float>& confidence() const { return confidence_; }
  const std::vector<int64_t>& exit_step() const { return exit_step_; }
  const std::vector<int32_t>& coords() const { return coords_; }  ///< (steps - 1, n, 2)

  /// Parts of the last begin() / next() call, in seconds, while profiling is on; -1 for a part
  /// the call did not run (policy and crop after the last step or when every image exited).
  enum Part { kHeads = 0, kExit, kPolicy, kCrop, kParts };
  void set_profile(bool on) { profile_ = on; }
  bool profile() const { return profile_; }
  const std::array<double, kParts>& part_seconds() const { return part_s_; }

 private:
  using Clock = std::chrono::steady_clock;
  void classify(const float* feature);
  /// Exit test, compaction, policy step and crop; `since` is the profiling lap start.
  int64_t finish_step(Clock::time_point& since);
  /// Adds the time since `since` to `part` and restarts `since` (profiling only).
  void lap(Part part, Clock::time_point& since) {
    const Clock::time_point now = Clock::now();
    part_s_[part] = std::max(part_s_[part], 0.0) + std::chrono::duration<double>(now - since).count();
    since = now;
  }

  bool profile_ = false;
  std::array<double, kParts> part_s_{};

  HostLoopModel m_;
  const void* images_ = nullptr;
  bool u8_ = false, trace_ = false;
  int64_t n_ = 0, t_ = 0, fdim_ = 0, sdim_ = 0, classes_ = 0;
  std::vector<float> thr_;
  std::vector<int64_t> active_;
  std::vector<float> state_, h_pol_, h_cls_, feats_, logits_, maxprob_, scratch_;
  std::shared_ptr<std::vector<float>> patches_ = std::make_shared<std::vector<float>>();
  std::vector<int32_t> argmax_, step_coords_;
  std::vector<int64_t> prediction_, exit_step_;
  std::vector<float> confidence_;
  std::vector<int32_t> coords_;
};

}  // namespace gfn::cpu
