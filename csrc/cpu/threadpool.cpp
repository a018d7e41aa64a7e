#include "threadpool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GFN_CPU_RELAX() _mm_pause()
#else
#define GFN_CPU_RELAX() std::this_thread::yield()
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace gfn::cpu {
namespace {

// GFNET_EDGE_NUM_THREADS, else the number of hardware threads.
int default_threads() {
  if (const char* env = std::getenv("GFNET_EDGE_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

thread_local bool tl_inside_pool = false;

// Pause instructions a worker spins for a new job before it sleeps (see worker_loop).
constexpr int kWorkerSpins = 2000;

class Pool {
 public:
  explicit Pool(int nthreads) : nthreads_(std::max(1, nthreads)) {}

  ~Pool() { stop_workers(); }

  int num_threads() const { return nthreads_; }

  void set_num_threads(int n) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    stop_workers();
    nthreads_ = std::max(1, n);
  }

  void run(int64_t ntasks, const std::function<void(int64_t)>& fn) {
    if (ntasks <= 0) return;
    std::unique_lock<std::mutex> run_lock(run_mutex_, std::try_to_lock);
    if (ntasks == 1 || nthreads_ == 1 || tl_inside_pool || !run_lock.owns_lock() ||
        ntasks >= (int64_t{1} << 31)) {
      for (int64_t t = 0; t < ntasks; ++t) fn(t);
      return;
    }
    start_workers();
    uint64_t gen;
    {
      // Close the previous generation first (task index past any job): a worker still
      // leaving the previous job's loop could otherwise read the new task count below
      // while the old generation is current, claim a task of it and run the new job's
      // task under the old generation (twice, and possibly after this call returned).
      std::lock_guard<std::mutex> lk(mutex_);
      gen = (state_.load(std::memory_order_relaxed) >> 32) + 1;
      state_.store((gen << 32) | 0xFFFFFFFFu, std::memory_order_release);
    }
    job_ = &fn;
    job_tasks_.store(ntasks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    {
      std::lock_guard<std::mutex> lk(mutex_);
      ++gen;
      state_.store(gen << 32, std::memory_order_release);  // publish: task counter 0
    }
    cv_.notify_all();
    tl_inside_pool = true;
    work(gen);
    tl_inside_pool = false;
    // Wait only for tasks that were claimed; idle workers are never waited for, so a
    // descheduled worker (busy machine) costs nothing: the caller just does its share.
    for (int spin = 0; done_.load(std::memory_order_acquire) < ntasks; ++spin) {
      if (spin < 4096) {
        GFN_CPU_RELAX();
      } else {
        std::this_thread::yield();
      }
    }
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void start_workers() {
    if (static_cast<int>(workers_.size()) == nthreads_ - 1) return;
    stop_.store(false);
    // A new worker must know the generation it starts from: had it read the counter
    // itself, it could miss a job posted before it got scheduled.
    const uint64_t gen = state_.load(std::memory_order_acquire) >> 32;
    for (int i = static_cast<int>(workers_.size()); i < nthreads_ - 1; ++i) {
      workers_.emplace_back([this, gen] { worker_loop(gen); });
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lk(mutex_);
      stop_.store(true);
      const uint64_t gen = (state_.load(std::memory_order_relaxed) >> 32) + 1;
      state_.store((gen << 32) | 0xFFFFFFFFu, std::memory_order_release);  // no tasks
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    stop_.store(false);
  }

  // Claims and runs tasks of generation `gen` until none is left. The generation and the
  // next task index share one atomic, so a late worker can never claim another job's task.
  void work(uint64_t gen) {
    for (;;) {
      uint64_t v = state_.load(std::memory_order_acquire);
      int64_t task = -1;
      while ((v >> 32) == gen) {
        const int64_t t = static_cast<int64_t>(v & 0xFFFFFFFFu);
        if (t >= job_tasks_.load(std::memory_order_relaxed)) break;
        if (state_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) {
          task = t;
          break;
        }
      }
      if (task < 0) return;
      try {
        (*job_)(task);
      } catch (...) {
        std::lock_guard<std::mutex> lk(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  void worker_loop(uint64_t seen) {
    tl_inside_pool = true;
    for (;;) {
      // Spin for a short while, then sleep. The spin covers the gap between two kernel calls
      // from Python (tens of microseconds) but not a backbone run: in the runtime loop a
      // spinning worker takes a core from ONNX Runtime's threads (kWorkerSpins and its
      // measured trade-off: docs/kernels.md, "Threads").
      uint64_t gen = state_.load(std::memory_order_acquire) >> 32;
      for (int spin = 0; gen == seen && spin < kWorkerSpins; ++spin) {
        GFN_CPU_RELAX();
        gen = state_.load(std::memory_order_acquire) >> 32;
      }
      if (gen == seen) {
        std::unique_lock<std::mutex> lk(mutex_);
        cv_.wait(lk, [&] { return (state_.load(std::memory_order_acquire) >> 32) != seen; });
        gen = state_.load(std::memory_order_acquire) >> 32;
      }
      seen = gen;
      if (stop_.load()) return;
      work(gen);
    }
  }

  int nthreads_;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_;  // one job at a time
  std::mutex mutex_;
  std::condition_variable cv_;
  std::atomic<uint64_t> state_{0};  // (generation << 32) | next task index
  std::atomic<int64_t> job_tasks_{0};
  std::atomic<int64_t> done_{0};
  const std::function<void(int64_t)>* job_ = nullptr;
  std::atomic<bool> stop_{false};
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

Pool* g_pool = nullptr;
std::once_flag g_once;

// In a forked child the worker threads do not exist: start over with a fresh pool and
// leak the old one (its std::thread objects must never be destroyed).
void after_fork_in_child() {
  if (g_pool) g_pool = new Pool(g_pool->num_threads());
}

Pool& pool() {
  std::call_once(g_once, [] {
    g_pool = new Pool(default_threads());  // intentionally leaked: lives until exit
#if defined(__unix__) || defined(__APPLE__)
    pthread_atfork(nullptr, nullptr, after_fork_in_child);
#endif
  });
  return *g_pool;
}

}  // namespace

int get_num_threads() { return pool().num_threads(); }

void set_num_threads(int n) { pool().set_num_threads(n); }

void parallel_tasks(int64_t ntasks, const std::function<void(int64_t)>& fn) { pool().run(ntasks, fn); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t nt = get_num_threads();
  // About four chunks per thread for balance, never smaller than the grain.
  int64_t chunk = std::max<int64_t>(grain, (n + 4 * nt - 1) / (4 * nt));
  const int64_t ntasks = (n + chunk - 1) / chunk;
  parallel_tasks(ntasks, [&](int64_t t) {
    const int64_t b = t * chunk;
    fn(b, std::min(n, b + chunk));
  });
}

}  // namespace gfn::cpu
