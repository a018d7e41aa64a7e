// The classifiers' argmax rule, shared by the CPU loops and the CUDA kernels: the first
// maximum, where a NaN counts as larger than any number (so the first NaN wins). This is
// numpy's argmax, and the prediction a row of logits gets wherever it is computed.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "hd.h"

namespace gfn {

/// The most classes a row of logits may have: predictions (argmax) are int32 on the CPU and
/// on the device, so a class index must fit one.
constexpr int64_t kMaxClasses = 2147483647;

/// `classes`, or std::invalid_argument unless 1 <= classes <= kMaxClasses (host code: every
/// entry point that computes an argmax checks its class count before it reads or launches
/// anything).
inline int64_t check_classes(int64_t classes) {
  if (classes < 1) throw std::invalid_argument("need at least one class, got " + std::to_string(classes));
  if (classes > kMaxClasses) {
    throw std::invalid_argument(std::to_string(classes) + " classes: predictions are int32, so at most " +
                                std::to_string(kMaxClasses) + " classes");
  }
  return classes;
}

/// NaN test that stays exact under both compilers (no <cmath> overload set on the device).
GFN_HD bool is_nan(float v) { return v != v; }

/// True when candidate `v` at index `i` replaces the best so far (`best` at `best_i`) under
/// the rule. A sequential scan offers candidates in increasing index order; a parallel
/// reduction compares any two partial results, so equal values (and two NaNs) go to the
/// lower index.
GFN_HD bool argmax_takes(float v, int64_t i, float best, int64_t best_i) {
  const bool v_nan = is_nan(v), best_nan = is_nan(best);
  if (v_nan || best_nan) return v_nan && (!best_nan || i < best_i);
  return v > best || (v == best && i < best_i);
}

}  // namespace gfn
