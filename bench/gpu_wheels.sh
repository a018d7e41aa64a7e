#!/usr/bin/env bash
# Downloads, into .whl/ (git ignores it), the wheels of the packages gfnet-edge needs that a GPU
# machine without network access may lack, for that machine's Python (PY_VERSION, default 3.12)
# on x86-64 Linux. bench/gpu_session.sh installs whatever .whl/ holds before it starts, so a run
# there carries the folder along with the checkout.
#
#   bash bench/gpu_wheels.sh                 # fastjsonschema, onnxsim, onnx2torch
#   PY_VERSION=3.11 bash bench/gpu_wheels.sh
#   bash bench/gpu_wheels.sh timm==1.0.31    # these instead
#
# Each wheel is fetched without its dependencies (the machine's own torch, onnx and numpy stay);
# the list below needs nothing else. Jinja2 (the calibration report's templates) is not in it: torch
# requires it, so a machine with torch has it (else: bash bench/gpu_wheels.sh jinja2==3.1.6 markupsafe==3.0.3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
if [ $# -gt 0 ]; then pkgs=("$@"); else pkgs=(fastjsonschema==2.22.2 onnxsim==0.8.1 onnx2torch==1.5.15); fi
mkdir -p .whl
for pkg in "${pkgs[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg"
done
ls -l .whl
