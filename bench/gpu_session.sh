#!/usr/bin/env bash
# Every GPU check of the project in one run, for a GPU machine lent for a few minutes.
# Steps, run in this order (STEPS picks some; default: all):
#   build   the extension with CUDA (GFNET_EDGE_CUDA_ARCHS, default 90: Hopper);
#   tests   the GPU tests: CUDA kernels against the CPU ones, CUDA graphs / events / pinned memory,
#           the device loop (plain launches, CUDA graphs, conditional graph nodes) against the
#           ONNX Runtime host loop, the static baseline's CUDA runner;
#   e2e     bench/e2e_gpu.py: demo model, captured GFNet loop vs captured static network, fp32 and
#           fp16, batch 1 to 128, time outside the backbones per step;
#   train   bench/train_gpu.py: a ResNet-50 GFNet trained on a synthetic image folder, every stage
#           for one epoch with mixed precision, then stage 1's images per second, AMP vs float32;
#   shapes  bench/gpu_shapes.py: ImageNet-shaped GFNets (random weights) at the demo's exit profile;
#   proxy   a Jetson-class proxy: e2e and shapes again at batch 1 and 8 with the process limited
#           to about 8 SMs through CUDA MPS (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), when the machine
#           allows it.
# The whole run keeps within BUDGET_S seconds (default 560): each step has its own time limit,
# cut to what is left, and a step that would start with under 30 s left is skipped and listed in
# $OUT/skipped.txt, so a run always ends by itself, with its results written.
#
#   OUT=/tmp/gpu bash bench/gpu_session.sh                      # everything, results in /tmp/gpu
#   STEPS="build train proxy" OUT=/tmp/gpu2 bash bench/gpu_session.sh
#   PACK_TO=/some/dir OUT=/tmp/gpu bash bench/gpu_session.sh    # also, after every step, three files in
#                                                               # /some/dir: gpu-session.tgz (all of $OUT
#                                                               # but site/), env.txt, summary.md (every
#                                                               # report and .txt, one after the other)
#
# Results: markdown + JSON per benchmark, logs, env.txt, under $OUT (default ./gpu-results).
# Needs python3 with numpy, torch (CUDA), pytest, pybind11, cmake and nvcc, and gfnet-edge's own
# packages (fastjsonschema, Jinja2 (a requirement of torch too), onnx, onnxruntime, onnxsim, onnx2torch,
# timm, torchvision, Pillow, scikit-learn, scipy, matplotlib). A machine that cannot download gets the
# missing ones as wheels: `bash bench/gpu_wheels.sh` where pip can download puts them in .whl/, and this script
# installs whatever .whl/ holds into $OUT/site first. env.txt lists what is still missing; when
# gfnet-edge itself does not import (fastjsonschema missing) the run stops there (exit 5).
set -u -o pipefail
OUT=${OUT:-gpu-results}
STEPS=${STEPS:-build tests e2e train shapes proxy}
BUDGET_S=${BUDGET_S:-560}
PROXY_PERCENT=${PROXY_PERCENT:-6}  # of 132 SMs on an H100 / H200: 8 SMs, an Orin NX / Nano's count
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: PYTHONPATH gets $OUT/site, and the script moves to the checkout
[ -n "${PACK_TO:-}" ] && mkdir -p "$PACK_TO" && PACK_TO=$(cd "$PACK_TO" && pwd)
cd "$(dirname "$0")/.." || exit 2  # setup.py, tests/, bench/ and .whl/ are read from the checkout
export PYTHONUNBUFFERED=1
[ -d /usr/local/cuda/bin ] && export PATH="/usr/local/cuda/bin:$PATH"  # nvcc for the build
deadline=$(( $(date +%s) + BUDGET_S ))
status=0
: >"$OUT/skipped.txt"

step() { echo "=== $1 ($(date -u +%T), $(( deadline - $(date +%s) )) s left)"; }
# limit WANT: WANT seconds, or what is left of the budget less a 10 s margin if that is less.
# (At least 1: `timeout 0` would mean no limit.)
limit() { local left=$(( deadline - $(date +%s) - 10 )); left=$(( left < 1 ? 1 : left )); echo $(( $1 < left ? $1 : left )); }
# wants NAME SECONDS: true when STEPS names NAME and at least 30 s of the budget are left.
wants() {
  case " $STEPS " in *" $1 "*) ;; *) return 1 ;; esac
  if [ "$(limit "$2")" -lt 30 ]; then
    echo "$1: skipped, $(( deadline - $(date +%s) )) s of the ${BUDGET_S} s budget left" | tee -a "$OUT/skipped.txt"
    status=1
    return 1
  fi
}
# pack: copies the results so far to $PACK_TO (after every step, so that a run killed from
# outside still leaves what it measured): three files only (gpu-session.tgz without the carried
# site/, env.txt, summary.md = every report and .txt one after the other), so that a results
# folder that returns a few files (a lent GPU machine's $OUT: 8 at most) gets all of them.
pack() {
  [ -n "${PACK_TO:-}" ] || return 0
  mkdir -p "$PACK_TO"
  tar czf "$PACK_TO/.gpu-session.tgz.part" --exclude=./site --exclude='./gpu-session.tgz' --exclude='./.gpu-session.tgz.part' \
    -C "$OUT" . && mv -f "$PACK_TO/.gpu-session.tgz.part" "$PACK_TO/gpu-session.tgz"
  [ "$PACK_TO" -ef "$OUT" ] && return 0
  cp "$OUT/env.txt" "$PACK_TO/" 2>/dev/null
  for f in "$OUT"/*.md "$OUT"/*.txt; do
    [ -f "$f" ] && printf '\n\n===== %s\n\n' "${f##*/}" && cat "$f"
  done >"$PACK_TO/summary.md" 2>/dev/null
  return 0
}
# C: a CUDA MPS daemon this run started is stopped whatever ends the run (it outlives the script
# otherwise, on a machine kept warm for the next command).
mps_started=0
mps_stop() {
  [ "$mps_started" = 1 ] || return 0
  echo quit | timeout 10 nvidia-cuda-mps-control >/dev/null 2>&1 || true
  mps_started=0
}
trap 'mps_stop; pack' EXIT
# run LIMIT CMD...: CMD under `timeout`, killed 10 s after its SIGTERM if it has not ended.
run() { local t=$1; shift; timeout -k 10 "$t" "$@"; }

# Carried wheels (WHEELS, default .whl/) go into SITE (default $OUT/site), one at a time: a wheel for
# another Python skips only itself. Without pip, pure-Python wheels are unpacked as they are.
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-$OUT/site}
: >"$OUT/wheels.txt"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  mkdir -p "$SITE"
  havepip=0; python3 -m pip --version >/dev/null 2>&1 && havepip=1
  for w in "$WHEELS"/*.whl; do
    if [ $havepip = 1 ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$w" >>"$OUT/wheels.log" 2>&1 && echo "installed $w" >>"$OUT/wheels.txt" && continue
    elif [[ $w == *-none-any.whl ]]; then
      python3 -m zipfile -e "$w" "$SITE" 2>>"$OUT/wheels.log" && echo "unpacked $w (no pip)" >>"$OUT/wheels.txt" \
        && continue
    fi
    echo "could not install the carried wheel $w (see $OUT/wheels.log)" | tee -a "$OUT/wheels.txt"
  done
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  date -u; nvidia-smi -L || true; nvidia-smi --query-gpu=driver_version,clocks.max.sm --format=csv || true
  nvcc --version | tail -1
  python3 -c "import sys, torch, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__)"
  df -h /dev/shm 2>/dev/null | tail -1 | awk '{print "/dev/shm: " $2 " (DataLoader workers pass batches through it)"}'
  echo "steps: $STEPS; budget ${BUDGET_S} s"
  cat "$OUT/wheels.txt"
  python3 - <<'PY'
import importlib.util
need = ("fastjsonschema", "jinja2", "onnx", "onnxruntime", "onnxsim", "onnx2torch", "timm", "torchvision", "PIL",
        "sklearn", "scipy", "matplotlib", "pytest")
missing = [m for m in need if importlib.util.find_spec(m) is None]
print("python packages missing:", ", ".join(missing) if missing else "none")
PY
} 2>&1 | tee "$OUT/env.txt"
if ! python3 -c "import gfnet_edge.runtime" 2>>"$OUT/env.txt"; then
  echo "gfnet_edge does not import (see $OUT/env.txt; carry the missing wheels: bench/gpu_wheels.sh): stopping" \
    | tee -a "$OUT/env.txt"
  exit 5
fi

# Without the extension (build failed: status 3; no CUDA in it or no usable device: status 4) the
# steps that need it are dropped; train (torch only) still runs.
no_ext() {
  status=$1
  echo "$2: only the steps that need no extension (train) run" | tee -a "$OUT/skipped.txt"
  case " $STEPS " in *" train "*) STEPS="train" ;; *) STEPS="" ;; esac
}
if wants build 150; then
  step build
  t0=$(date +%s)
  if GFNET_EDGE_CUDA_ARCHS=${GFNET_EDGE_CUDA_ARCHS:-90} CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    run "$(limit 150)" python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1; then
    echo "build: $(( $(date +%s) - t0 )) s"
    # Without CUDA kernels or a usable device every GPU test would skip and the run say nothing.
    python3 -c "from gfnet_edge import ops; import sys; ok = ops.has_cuda_build() and ops.cuda_device_count() > 0
print('CUDA build:', ops.has_cuda_build(), 'archs:', ops.cuda_archs(), 'devices:', ops.cuda_device_count(),
      '' if ok else ops.cuda_device_error()); sys.exit(0 if ok else 4)" 2>&1 | tee -a "$OUT/env.txt" \
      || no_ext 4 "the extension has no usable CUDA (see $OUT/build.log)"
  else
    tail -40 "$OUT/build.log"
    no_ext 3 "the build failed (see $OUT/build.log)"
  fi
  pack
fi

if wants tests 120; then
  step "GPU tests"
  # the kernels first (each against its CPU twin: a wrong kernel is named there, not only as a loop
  # that disagrees), then the conditional-node loop and the graphs, then the device loop, whose
  # fixtures export models: a cut run keeps the first ones
  run "$(limit 120)" python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels_cuda.py \
    tests/test_conditional_loop.py tests/test_graphs_cuda.py tests/test_device_loop.py 2>&1 \
    | tee "$OUT/pytest.txt" | tail -25 || status=1
  if [ "$(limit 40)" -ge 20 ]; then
    run "$(limit 40)" python3 -m pytest -q -p no:cacheprovider -rs tests/test_calibrate_static.py -k "cuda or real_gpu" 2>&1 \
      | tee -a "$OUT/pytest.txt" | tail -5 || status=1
  fi
  pack
fi

if wants e2e 180; then
  step "demo model, full GPU"
  # fp16 first: its batch-128 ratio is the figure a cut run must keep
  run "$(limit 180)" python3 bench/e2e_gpu.py --precisions fp16,fp32 --out "$OUT/e2e_gpu.md" >"$OUT/e2e_gpu.log" 2>&1 \
    || { status=1; tail -20 "$OUT/e2e_gpu.log"; }
  grep "^\[e2e-gpu\]" "$OUT/e2e_gpu.log" | tail -12
  pack
fi

# The exit profile measured by e2e above; without it, gpu_shapes.py's own default profile.
profile=(--profile-from "")
[ -f "$OUT/e2e_gpu.json" ] && profile=(--profile-from "$OUT/e2e_gpu.json")

if wants train 110; then
  step "training, ResNet-50 GFNet, synthetic image folder"
  work=$(mktemp -d /tmp/gfnet-train.XXXXXX)  # the JPEGs and checkpoints stay out of $OUT
  run "$(limit 110)" python3 bench/train_gpu.py --out "$work/run" --images 2560 --eval-max 128 --epochs 2 \
    >"$OUT/train_gpu.log" 2>&1 || { status=1; tail -20 "$OUT/train_gpu.log"; }
  cp "$work/run/train_gpu.txt" "$OUT/" 2>/dev/null && cat "$OUT/train_gpu.txt"
  for d in "$work"/run/*/; do  # each run's per-epoch records
    [ -f "$d/epochs.jsonl" ] && cp "$d/epochs.jsonl" "$OUT/train_$(basename "$d").jsonl"
  done
  rm -rf "$work"
  pack
fi

if wants shapes 120; then
  step "ImageNet shapes, full GPU"
  run "$(limit 120)" python3 bench/gpu_shapes.py --reps 20 "${profile[@]}" --out "$OUT/gpu_shapes.md" \
    >"$OUT/gpu_shapes.log" 2>&1 || { status=1; tail -20 "$OUT/gpu_shapes.log"; }
  grep "^\[gpu-shapes\]" "$OUT/gpu_shapes.log" | tail -30
  pack
fi

if wants proxy 140; then
  step "Jetson-class proxy (CUDA MPS, ${PROXY_PERCENT}% of the SMs)"
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/gfnet-mps CUDA_MPS_LOG_DIRECTORY=/tmp/gfnet-mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  echo quit | timeout 5 nvidia-cuda-mps-control >/dev/null 2>&1 || true  # a daemon a killed run left here
  rm -f "$CUDA_MPS_LOG_DIRECTORY"/*.log
  # the daemon must not keep this script's stdout / stderr (a caller waiting for them to close)
  if command -v nvidia-cuda-mps-control >/dev/null \
    && timeout "$(limit 10)" nvidia-cuda-mps-control -d </dev/null >>"$OUT/mps_start.log" 2>&1; then
    mps_started=1
    sms=$(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$PROXY_PERCENT run "$(limit 30)" python3 -c \
          "import torch; print(torch.cuda.get_device_properties(0).multi_processor_count)" 2>/dev/null || echo "?")
    # A client that cannot reach the daemon runs WITHOUT MPS, on the whole GPU: the daemon's log
    # records the clients it served (a "NEW CLIENT" line); without one the label says so.
    mps_note=""
    grep -qs "NEW CLIENT" "$CUDA_MPS_LOG_DIRECTORY/control.log" \
      || mps_note="; unconfirmed: the MPS control log names no client, the process may have had the whole GPU"
    label="proxy: CUDA MPS limits this process to ${PROXY_PERCENT}% of the GPU (${sms} SMs${mps_note})"
    echo "$label"
    if [ "$sms" = "?" ]; then  # the daemon started but a client could not use it
      echo "CUDA MPS started but a process could not run under it: no SM-limited proxy figures" \
        | tee "$OUT/proxy_unavailable.txt"
    fi
    if [ "$sms" != "?" ] && [ "$(limit 70)" -ge 20 ]; then
      CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$PROXY_PERCENT run "$(limit 70)" python3 bench/e2e_gpu.py --batches 1,8 \
        --precisions fp16 --num-test 300 --num-val 300 --label "$label" --out "$OUT/e2e_gpu_proxy.md" \
        >"$OUT/e2e_gpu_proxy.log" 2>&1 || { status=1; tail -20 "$OUT/e2e_gpu_proxy.log"; }
      grep "^\[e2e-gpu\]" "$OUT/e2e_gpu_proxy.log" | tail -6
    fi
    if [ "$sms" != "?" ] && [ "$(limit 70)" -ge 20 ]; then
      CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$PROXY_PERCENT run "$(limit 70)" python3 bench/gpu_shapes.py --batches 1,8 \
        --precisions fp16 --images 64 --reps 10 "${profile[@]}" --label "$label" \
        --out "$OUT/gpu_shapes_proxy.md" >"$OUT/gpu_shapes_proxy.log" 2>&1 || { status=1; tail -20 "$OUT/gpu_shapes_proxy.log"; }
      grep "^\[gpu-shapes\]" "$OUT/gpu_shapes_proxy.log" | tail -8
    fi
    mps_stop
    for f in "$CUDA_MPS_LOG_DIRECTORY"/*.log; do [ -f "$f" ] && cp "$f" "$OUT/mps_${f##*/}"; done
  else
    echo "CUDA MPS is not available on this machine: no SM-limited proxy figures" | tee "$OUT/proxy_unavailable.txt"
  fi
fi
step done
exit $status
