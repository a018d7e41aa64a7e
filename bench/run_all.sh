#!/usr/bin/env bash
# The CPU benchmarks, one after the other (they compete for the same cores, so never in
# parallel), each writing its markdown under bench/results/. Not here: bench/deadlines.py,
# bench/step_predecessor.py and the held-out INT8 studies (bench/quantize_heldout.py but for its
# --per-graph run, bench/int8_outputs.py, bench/int8_input_path.py, bench/exit_sensitivity.py)
# and bench/train_glance_cache.py, run with the commands docs/benchmarks.md, docs/quantization.md
# and docs/training.md give. GPU rows: bench/gpu_session.sh.
#
#   bash bench/run_all.sh            # one to two hours on a 2-core machine
#   (ModelOpt rows of int8_compare.py: MODELOPT_PYTHON=<python with nvidia-modelopt[onnx]>)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 bench/kernels.py --threads 1,2 --reps 100 --runs 5
python3 bench/e2e.py --threads 1 --out bench/results/e2e.md
python3 bench/e2e.py --threads 2 --out bench/results/e2e_2threads.md
python3 bench/imagenet_shapes.py --threads 2 --repeat 10
python3 bench/quantize.py --threads 2
python3 bench/int8_compare.py --threads 2
python3 bench/memory.py --threads 2
python3 bench/memory.py --sizes 256 --max-batch 8,32,128 --one-chunk-up-to 0 --repeat 3 --out bench/results/memory_chunks.md
python3 bench/head_dtype.py
python3 bench/ort_threads.py
python3 bench/ort_call_overhead.py
python3 bench/gru_zero_state.py
python3 bench/warmup.py
python3 bench/shared_runtime.py
python3 bench/demo_data.py
python3 bench/train_threads.py
python3 bench/cropped_input.py --clock cpu
python3 bench/quantize_heldout.py 'auto=' 'residual={"residual_int8": true}' --seeds 101 --n 400 --per-graph --md bench/results/quantize_per_graph.md
python3 bench/step_alone.py --rounds 9 --calls 200
python3 bench/resize_agreement.py
