#!/usr/bin/env bash
# Every GPU check of the project in one run, for a GPU machine lent for a few minutes
# (about 6 minutes on an H200 host):
#   1. build the extension with CUDA;
#   2. the GPU tests: CUDA kernels against the CPU ones, CUDA graphs / events / pinned memory,
#      the device loop (plain launches and CUDA graphs) against the ONNX Runtime host loop;
#   3. bench/e2e_gpu.py: demo model, captured GFNet loop vs captured static network, fp32 and
#      fp16, batch 1 to 128, time outside the backbones per step (at batch 1 on conditional
#      graph nodes where available, beside the per-step captured loop);
#   4. bench/gpu_shapes.py: ImageNet-shaped GFNets (random weights) at the demo's exit profile;
#   5. a Jetson-class proxy: 3 and 4 again at batch 1 and 8 with the process limited to about
#      8 SMs through CUDA MPS (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), when the machine allows it.
# Results (markdown + JSON per benchmark, logs) go to $OUT (default ./gpu-results).
#
#   OUT=/tmp/gpu bash bench/gpu_session.sh
#
# Needs python3 with numpy, torch (CUDA), pytest, pybind11, cmake and nvcc; the device-loop
# parity tests also use onnx, onnxruntime and timm and skip themselves, saying so, where those
# are missing. Each step has its own time limit, so one that hangs cannot eat the others' time.
set -u -o pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PROXY_PERCENT=${PROXY_PERCENT:-6}  # of 132 SMs on an H200: 8 SMs, an Orin NX / Nano's count
status=0
step() { echo "=== $1 ($(date -u +%T))"; }
{
  date -u; nvidia-smi -L || true; nvidia-smi --query-gpu=driver_version,clocks.max.sm --format=csv || true
  nvcc --version | tail -1
  python3 -c "import sys, torch, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__)"
} 2>&1 | tee "$OUT/env.txt"

step build
t0=$(date +%s)
GFNET_EDGE_CUDA_ARCHS=${GFNET_EDGE_CUDA_ARCHS:-90} CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  timeout 150 python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 3; }
echo "build: $(( $(date +%s) - t0 )) s"

step "GPU tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels_cuda.py tests/test_graphs_cuda.py \
  tests/test_device_loop.py tests/test_conditional_loop.py 2>&1 | tee "$OUT/pytest.txt" | tail -25 || status=1
timeout 60 python3 -m pytest -q -p no:cacheprovider -rs tests/test_calibrate_static.py -k "cuda or real_gpu" 2>&1 \
  | tee -a "$OUT/pytest.txt" | tail -5 || status=1

step "demo model, full GPU"
timeout 150 python3 bench/e2e_gpu.py --out "$OUT/e2e_gpu.md" >"$OUT/e2e_gpu.log" 2>&1 || { status=1; tail -20 "$OUT/e2e_gpu.log"; }
grep "^\[e2e-gpu\]" "$OUT/e2e_gpu.log" | tail -12

step "ImageNet shapes, full GPU"
timeout 130 python3 bench/gpu_shapes.py --reps 20 --profile-from "$OUT/e2e_gpu.json" --out "$OUT/gpu_shapes.md" \
  >"$OUT/gpu_shapes.log" 2>&1 || { status=1; tail -20 "$OUT/gpu_shapes.log"; }
grep "^\[gpu-shapes\]" "$OUT/gpu_shapes.log" | tail -30

step "Jetson-class proxy (CUDA MPS, ${PROXY_PERCENT}% of the SMs)"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/gfnet-mps CUDA_MPS_LOG_DIRECTORY=/tmp/gfnet-mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
if command -v nvidia-cuda-mps-control >/dev/null && timeout 10 nvidia-cuda-mps-control -d; then
  sms=$(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$PROXY_PERCENT timeout 30 python3 -c \
        "import torch; print(torch.cuda.get_device_properties(0).multi_processor_count)" 2>/dev/null || echo "?")
  label="proxy: CUDA MPS limits this process to ${PROXY_PERCENT}% of the GPU (${sms} SMs)"
  echo "$label"
  CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$PROXY_PERCENT timeout 70 python3 bench/e2e_gpu.py --batches 1,8 \
    --precisions fp16 --num-test 300 --num-val 300 --label "$label" --out "$OUT/e2e_gpu_proxy.md" >"$OUT/e2e_gpu_proxy.log" 2>&1 \
    || { status=1; tail -20 "$OUT/e2e_gpu_proxy.log"; }
  grep "^\[e2e-gpu\]" "$OUT/e2e_gpu_proxy.log" | tail -6
  CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$PROXY_PERCENT timeout 70 python3 bench/gpu_shapes.py --batches 1,8 \
    --precisions fp16 --images 64 --reps 10 --profile-from "$OUT/e2e_gpu.json" --label "$label" \
    --out "$OUT/gpu_shapes_proxy.md" >"$OUT/gpu_shapes_proxy.log" 2>&1 || { status=1; tail -20 "$OUT/gpu_shapes_proxy.log"; }
  grep "^\[gpu-shapes\]" "$OUT/gpu_shapes_proxy.log" | tail -8
  echo quit | timeout 10 nvidia-cuda-mps-control || true
else
  echo "CUDA MPS is not available on this machine: no SM-limited proxy figures" | tee "$OUT/proxy_unavailable.txt"
fi
step done
exit $status
