// The batch-1 loop graph: the focus steps of one run of the device loop, each in a CUDA IF
// conditional node whose condition the previous step's exit test sets on the device
// (cudaGraphSetConditional), so a run needs no device -> host read until its end. Declared
// without any CUDA header, like api.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace gfn::cuda {

/// Whether conditional graph nodes can be used here.
struct ConditionalSupport {
  bool compiled = false;  // built with a CUDA toolkit >= 12.4 (CUDART_VERSION >= 12040)
  int driver = 0;         // cudaDriverGetVersion (e.g. 12040), 0 when unknown
  int runtime = 0;        // cudaRuntimeGetVersion
  std::string error;      // why they cannot be used; "" when they can
};

/// Checks the build, the driver and runtime versions (>= 12.4) and instantiates a probe graph
/// (an IF node whose condition a kernel sets) once per process; never throws.
ConditionalSupport conditional_support();

/// One run of steps 0..T-1 at batch 1 after the glance step graph has run:
///
///   exit(0) -> IF { focus(1) -> exit(1) -> IF { focus(2) -> exit(2) -> ... } }
///
/// `focus` holds the captured focus step graphs of steps 1..T-1 (cudaGraph_t handles, each
/// added as a child graph node: cloned, so the originals may be released). exit(t) is one
/// thread of gfn::loop_exit_step (common/exit_rule.h) on the step's result block at `stats`
/// (5 words), the device thresholds (T float32) and the device result block (int32,
/// gfn::loop_result_words(T)). Thresholds are read at every launch: changing them needs no new
/// graph. Throws std::runtime_error when conditional nodes are unavailable or the graph does
/// not instantiate (naming the CUDA error).
class LoopGraph {
 public:
  LoopGraph(const std::vector<uintptr_t>& focus, uintptr_t stats, uintptr_t thresholds, uintptr_t result);
  ~LoopGraph();
  LoopGraph(const LoopGraph&) = delete;
  LoopGraph& operator=(const LoopGraph&) = delete;
  /// Enqueues one run on `stream`.
  void launch(uintptr_t stream) const;
  /// Steps of the run (focus graphs + 1).
  int steps() const { return steps_; }

 private:
  void* graph_ = nullptr;  // cudaGraph_t
  void* exec_ = nullptr;   // cudaGraphExec_t
  int steps_ = 0;
};

}  // namespace gfn::cuda
