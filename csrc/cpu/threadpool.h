// A small persistent thread pool for the CPU kernels.
//
// The calling thread takes part in the work. Workers spin briefly after a job (the
// kernels are called back to back during inference) and then sleep on a condition
// variable, so an idle pool costs no CPU. Nested or concurrent calls run inline.
#pragma once

#include <cstdint>
#include <functional>

namespace gfn::cpu {

/// Number of threads the kernels use (default: $GFNET_EDGE_NUM_THREADS, else
/// std::thread::hardware_concurrency()).
int get_num_threads();

/// Sets the number of threads (>= 1); takes effect on the next parallel call.
void set_num_threads(int n);

/// Runs fn(task) for task in [0, ntasks) on the pool and waits for all of them.
///
/// Exceptions thrown by a task are re-thrown on the calling thread (the first one wins).
void parallel_tasks(int64_t ntasks, const std::function<void(int64_t)>& fn);

/// Splits [0, n) into chunks of at least `grain` items and runs fn(begin, end) on each.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace gfn::cpu
