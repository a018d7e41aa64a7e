// The early-exit rule and the batch-1 loop graph's exit step, shared by the CPU host loop
// (csrc/cpu/host_loop.cpp), the CUDA kernel of csrc/cuda/loop_graph.cu and the binding the tests
// compare with the Python rule.
//
// Rule: an image exits at step t when its maximum softmax probability reaches the step's
// threshold, `maxprob >= threshold` in float32. A NaN on either side never exits (every
// comparison with a NaN is false). This is ExitBook.exits in gfnet_edge/runtime/types.py and
// what the CPU host loop keeps running (`!exits_at(...)`).
#pragma once

#include <cstdint>

#include "hd.h"

namespace gfn {

GFN_HD bool exits_at(float maxprob, float threshold) { return maxprob >= threshold; }

/// Words (int32) of the batch-1 loop graph's result block.
enum LoopResultWord : int {
  kLoopExitStep = 0,    // the last step run (the exit step)
  kLoopPrediction = 1,  // argmax at that step
  kLoopConfidence = 2,  // max probability at that step (float32 bits)
  kLoopFlagStep = 3,    // first step whose error flag was set, -1 when none
  kLoopCoords = 4,      // (steps - 1) x (row, col) patch coordinates, -1 for steps not run
};

GFN_HD int loop_result_words(int steps) { return kLoopCoords + 2 * (steps - 1); }

/// Words of a step's result block at batch 1 (bucket 1): maxprob, argmax, row, col, flag.
constexpr int kStepBlockWords = 5;

/// The exit test of step `t` of a batch-1 run: records the step's result block `stats`
/// (kStepBlockWords words, maxprob as float32 bits) in `result` and returns true when step
/// t + 1 runs. Step 0 first resets the whole result block. A set error flag ends the run and
/// is recorded as kLoopFlagStep (the host raises on it).
GFN_HD bool loop_exit_step(const int32_t* stats, const float* thresholds, int32_t* result, int t, int steps) {
  if (t == 0) {
    for (int i = kLoopCoords; i < loop_result_words(steps); ++i) result[i] = -1;
    result[kLoopFlagStep] = -1;
  }
  result[kLoopExitStep] = t;
  if (stats[4] != 0) {
    result[kLoopFlagStep] = t;
    return false;
  }
  result[kLoopPrediction] = stats[1];
  result[kLoopConfidence] = stats[0];
  if (t > 0) {
    result[kLoopCoords + 2 * (t - 1)] = stats[2];
    result[kLoopCoords + 2 * (t - 1) + 1] = stats[3];
  }
  if (t + 1 >= steps) return false;
  return !exits_at(reinterpret_cast<const float*>(stats)[0], thresholds[t]);
}

}  // namespace gfn
