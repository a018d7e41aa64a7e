// The batch-1 loop graph on CUDA conditional nodes (see loop_graph.h). Compiled in full only
// with a CUDA toolkit >= 12.4; with an older one every entry point reports that.
#include <cuda_runtime.h>

#include <mutex>
#include <stdexcept>
#include <string>

#include "../common/exit_rule.h"
#include "api.h"
#include "check.h"
#include "loop_graph.h"

#if CUDART_VERSION >= 12040
#define GFN_CONDITIONAL_NODES 1
#endif

namespace gfn::cuda {
namespace {

constexpr int kMinVersion = 12040;

std::string version_str(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

#if defined(GFN_CONDITIONAL_NODES)
/// exit(t): the step's exit test, then the condition of the IF node of step t + 1.
__global__ void loop_exit_kernel(const int32_t* stats, const float* thresholds, int32_t* result, int t,
                                 int steps, cudaGraphConditionalHandle next, int has_next) {
  const bool go = gfn::loop_exit_step(stats, thresholds, result, t, steps);
  if (has_next) cudaGraphSetConditional(next, go ? 1u : 0u);
}

__global__ void probe_set_kernel(cudaGraphConditionalHandle handle) { cudaGraphSetConditional(handle, 1u); }

__global__ void probe_body_kernel() {}

/// Adds a node of `params` to `graph` after `dep` (nullptr: no dependency).
cudaGraphNode_t add_node(cudaGraph_t graph, cudaGraphNode_t dep, cudaGraphNodeParams* params) {
  cudaGraphNode_t node = nullptr;
  const size_t n = dep != nullptr ? 1 : 0;
#if CUDART_VERSION >= 13000
  GFN_CUDA_CHECK(cudaGraphAddNode(&node, graph, dep != nullptr ? &dep : nullptr, nullptr, n, params));
#else
  GFN_CUDA_CHECK(cudaGraphAddNode(&node, graph, dep != nullptr ? &dep : nullptr, n, params));
#endif
  return node;
}

cudaGraphConditionalHandle new_handle(cudaGraph_t graph) {
  cudaGraphConditionalHandle h{};
  GFN_CUDA_CHECK(cudaGraphConditionalHandleCreate(&h, graph, 0, 0));
  return h;
}

/// Adds an IF node on `handle` to `graph` after `dep`; returns its body graph (owned by the node).
cudaGraph_t add_if(cudaGraph_t graph, cudaGraphNode_t dep, cudaGraphConditionalHandle handle) {
  cudaGraphNodeParams p{};
  p.type = cudaGraphNodeTypeConditional;
  p.conditional.handle = handle;
  p.conditional.type = cudaGraphCondTypeIf;
  p.conditional.size = 1;
  add_node(graph, dep, &p);
  return p.conditional.phGraph_out[0];
}

cudaGraphNode_t add_kernel(cudaGraph_t graph, cudaGraphNode_t dep, void* func, void** args) {
  cudaKernelNodeParams k{};
  k.func = func;
  k.gridDim = dim3(1);
  k.blockDim = dim3(1);
  k.sharedMemBytes = 0;
  k.kernelParams = args;
  cudaGraphNode_t node = nullptr;
  const size_t n = dep != nullptr ? 1 : 0;
  GFN_CUDA_CHECK(cudaGraphAddKernelNode(&node, graph, dep != nullptr ? &dep : nullptr, n, &k));
  return node;
}

/// Owns a cudaGraph_t (and its exec) until released.
struct GraphGuard {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ~GraphGuard() {
    if (exec != nullptr) (void)cudaGraphExecDestroy(exec);
    if (graph != nullptr) (void)cudaGraphDestroy(graph);
    (void)cudaGetLastError();
  }
};

/// "" when a graph with an IF node set by a kernel instantiates and runs (body taken), else the error.
std::string probe_graph() {
  cudaStream_t s = nullptr;
  try {
    GraphGuard g;
    GFN_CUDA_CHECK(cudaGraphCreate(&g.graph, 0));
    cudaGraphConditionalHandle h = new_handle(g.graph);  // before the kernel that sets it
    void* set_args[] = {&h};
    cudaGraphNode_t set = add_kernel(g.graph, nullptr, reinterpret_cast<void*>(&probe_set_kernel), set_args);
    cudaGraph_t body = add_if(g.graph, set, h);
    add_kernel(body, nullptr, reinterpret_cast<void*>(&probe_body_kernel), nullptr);
    GFN_CUDA_CHECK(cudaGraphInstantiate(&g.exec, g.graph, 0));
    // Run it once on a private stream: a configuration that instantiates conditional nodes but
    // cannot launch them must fall back here, not fail the first batch-1 call.
    GFN_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    GFN_CUDA_CHECK(cudaGraphLaunch(g.exec, s));
    GFN_CUDA_CHECK(cudaStreamSynchronize(s));
    (void)cudaStreamDestroy(s);
    return "";
  } catch (const std::exception& e) {
    if (s != nullptr) (void)cudaStreamDestroy(s);
    (void)cudaGetLastError();
    return std::string("a probe graph with a conditional node did not instantiate or run: ") + e.what();
  }
}
#endif

ConditionalSupport probe_support() {
  ConditionalSupport s;
#if defined(GFN_CONDITIONAL_NODES)
  s.compiled = true;
#endif
  if (cudaDriverGetVersion(&s.driver) != cudaSuccess) s.driver = 0;
  if (cudaRuntimeGetVersion(&s.runtime) != cudaSuccess) s.runtime = 0;
  (void)cudaGetLastError();
  if (device_count() < 1) {
    s.error = "no usable CUDA device (" + device_error() + ")";
    return s;
  }
  if (!s.compiled) {
    s.error = "the extension was built with CUDA " + version_str(CUDART_VERSION) +
              "; conditional graph nodes need 12.4 or newer";
  } else if (s.driver < kMinVersion) {
    s.error = "the driver supports CUDA " + version_str(s.driver) + "; conditional graph nodes need 12.4 or newer";
  } else if (s.runtime < kMinVersion) {
    s.error = "the CUDA runtime is " + version_str(s.runtime) + "; conditional graph nodes need 12.4 or newer";
  }
#if defined(GFN_CONDITIONAL_NODES)
  if (s.error.empty()) s.error = probe_graph();
#endif
  return s;
}

}  // namespace

ConditionalSupport conditional_support() {
  static ConditionalSupport result;
  static std::once_flag once;
  std::call_once(once, [] { result = probe_support(); });
  return result;
}

LoopGraph::LoopGraph(const std::vector<uintptr_t>& focus, uintptr_t stats, uintptr_t thresholds,
                     uintptr_t result) {
  const ConditionalSupport s = conditional_support();
  if (!s.error.empty()) throw std::runtime_error("no conditional graph nodes: " + s.error);
  for (uintptr_t g : focus) {
    if (g == 0) throw std::invalid_argument("a focus step graph is null (not captured, or not kept)");
  }
  check_device_pointer(stats, "stats", sizeof(int32_t));
  check_device_pointer(thresholds, "thresholds", sizeof(float));
  check_device_pointer(result, "result", sizeof(int32_t));
  steps_ = static_cast<int>(focus.size()) + 1;
#if defined(GFN_CONDITIONAL_NODES)
  GraphGuard g;
  GFN_CUDA_CHECK(cudaGraphCreate(&g.graph, 0));
  auto* st = reinterpret_cast<const int32_t*>(stats);
  auto* thr = reinterpret_cast<const float*>(thresholds);
  auto* res = reinterpret_cast<int32_t*>(result);
  const int T = steps_;
  cudaGraph_t graph = g.graph;
  cudaGraphNode_t prev = nullptr;
  for (int t = 0; t < T; ++t) {
    if (t > 0) {
      cudaGraphNode_t child = nullptr;
      const size_t n = prev != nullptr ? 1 : 0;
      GFN_CUDA_CHECK(cudaGraphAddChildGraphNode(&child, graph, prev != nullptr ? &prev : nullptr, n,
                                                reinterpret_cast<cudaGraph_t>(focus[t - 1])));
      prev = child;
    }
    int has_next = t + 1 < T ? 1 : 0, step = t, steps = T;
    // The IF node of step t + 1 lives in this graph; its handle exists before the kernel setting it.
    cudaGraphConditionalHandle next = has_next ? new_handle(graph) : cudaGraphConditionalHandle{};
    void* args[] = {&st, &thr, &res, &step, &steps, &next, &has_next};
    prev = add_kernel(graph, prev, reinterpret_cast<void*>(&loop_exit_kernel), args);
    if (!has_next) break;
    graph = add_if(graph, prev, next);
    prev = nullptr;
  }
  cudaGraphExec_t exec = nullptr;
  GFN_CUDA_CHECK(cudaGraphInstantiate(&exec, g.graph, 0));
  graph_ = g.graph;
  exec_ = exec;
  g.graph = nullptr;
#endif
}

LoopGraph::~LoopGraph() {
  if (exec_ != nullptr) (void)cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
  if (graph_ != nullptr) (void)cudaGraphDestroy(static_cast<cudaGraph_t>(graph_));
  (void)cudaGetLastError();
}

void LoopGraph::launch(uintptr_t stream) const {
  if (exec_ == nullptr) throw std::runtime_error("the loop graph was not built");
  GFN_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_), as_stream(stream)));
}

}  // namespace gfn::cuda
