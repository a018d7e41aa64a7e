// Memory-bandwidth probe for the benchmarks (the roofline of the memory-bound GRU step).
#pragma once

#include <cstddef>

namespace gfn::cpu {

/// Best time (seconds) of `reps` parallel passes that read `nbytes` once each (a sum of
/// floats over the thread pool); nbytes / time is the read bandwidth the kernels can reach.
double read_pass_seconds(size_t nbytes, int reps);

}  // namespace gfn::cpu
