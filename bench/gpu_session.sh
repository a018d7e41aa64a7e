#!/usr/bin/env bash
# Every GPU check of the project in one run, for a GPU machine lent for a few minutes:
#   build the extension with CUDA, run the CUDA self-test, the CUDA kernel tests, the
#   CUDA-vs-torch kernel benchmark and the end-to-end device-loop benchmark. Results (ten
#   files) go to $OUT (or ./gpu-results when unset). About 3 minutes on an H200 host.
#
#   OUT=/tmp/gpu bash bench/gpu_session.sh
#
# Needs python3 with numpy, torch (CUDA), pytest, hypothesis, pybind11, cmake and nvcc; the
# device-loop parity tests (tests/test_device_loop.py) also use onnx, onnxruntime and timm
# and skip themselves, saying so, where those are missing.
set -u -o pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
{
  date -u; nvidia-smi -L || true; nvcc --version | tail -1
  python3 -c "import sys, torch, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__)"
} 2>&1 | tee "$OUT/env.txt"
t0=$(date +%s)
GFNET_EDGE_CUDA_ARCHS=${GFNET_EDGE_CUDA_ARCHS:-90} CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 3; }
echo "build: $(( $(date +%s) - t0 )) s"; grep -m2 "gfnet-edge:" "$OUT/build.log"
python3 -m gfnet_edge.selftest --gpu --json "$OUT/selftest.json" 2>&1 | tee "$OUT/selftest.txt" || status=1
python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py tests/test_device_loop.py tests/test_kernels_errors.py tests/test_kernels.py tests/test_kernels_fuzz.py 2>&1 | tee "$OUT/pytest.txt" | tail -15 || status=1
python3 bench/kernels_gpu.py --out "$OUT/kernels_gpu.md" 2>&1 | tee "$OUT/bench.txt" || status=1
python3 bench/e2e_gpu.py --out "$OUT/e2e_gpu.md" >"$OUT/e2e_gpu.txt" 2>&1 || status=1
sed -n '/^## Summary/,/^## Every/p' "$OUT/e2e_gpu.txt"
exit $status
