#!/usr/bin/env bash
# Builds the device side of gfnet-edge for aarch64 (the Jetson's CPU) on an x86-64 Debian
# machine and tests it under user-mode emulation (qemu-aarch64). No Jetson, no GPU, no torch
# on the aarch64 side.
#
#   bash tools/aarch64_check.sh            # the full check (64 demo test images)
#   bash tools/aarch64_check.sh --quick    # CI's subset (16 demo test images)
#   bash tools/aarch64_check.sh --oldest   # the oldest supported Python, numpy, ONNX Runtime
#
# --oldest (combinable with --quick) takes Debian 11's python3.9 (the oldest Python setup.py
# accepts; Debian has no 3.10), with the libraries it links from this machine's Debian release,
# and the floors of setup.py's install_requires: numpy 1.24.4 and onnxruntime 1.18.0. Its
# files go to build/aarch64-oldest.
#
# Steps (everything lands in $GFNET_AARCH64_DIR, default build/aarch64; the downloads are
# reused by the next run):
#   1. apt-get installs the cross compiler (g++-aarch64-linux-gnu) and qemu-user when missing.
#   2. An arm64 sysroot: Debian's arm64 python3.X packages and the libraries they need,
#      fetched with apt-get download through a private apt configuration (the machine's own
#      dpkg architectures and package lists are left alone) and unpacked with dpkg -x.
#   3. numpy, onnxruntime (the host's versions; with --oldest the oldest supported), pillow,
#      tqdm, fastjsonschema, Jinja2 (with MarkupSafe) and pytest as aarch64 wheels for that Python, installed with pip
#      install --target --platform (no emulated pip).
#   4. The extension's CPU kernels cross-compiled with CMakeLists.txt (GFNET_EDGE_CUDA=OFF),
#      staged with the Python packages as pip install would lay them out.
#   5. On x86 (host python3 with torch, torchvision, scikit-learn and this checkout's
#      extension): tools/aarch64_parity.py record writes the kernel cases' torch references
#      and x86 outputs, builds an fp32 demo bundle and records Runtime's results on it.
#   6. Under qemu-aarch64: pytest on the torch-free device-side tests (host loop, bundle
#      loading, kernel argument checks, NEON kernels bit-identical to the portable loops),
#      then tools/aarch64_parity.py check.
# Exit status: 0 when every step passed; non-zero otherwise (the failing step says why).
# Timings under emulation say nothing about a Jetson and are not reported.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

IMAGES=64
OLDEST=0
for arg in "$@"; do
  case "$arg" in
    --quick) IMAGES=16 ;;
    --oldest) OLDEST=1 ;;
    *) echo "usage: bash tools/aarch64_check.sh [--quick] [--oldest]" >&2; exit 2 ;;
  esac
done
# --oldest: Debian 11's Python and the floors of setup.py's install_requires (numpy, onnxruntime)
OLDEST_SUITE=bullseye OLDEST_PYVER=3.9 OLDEST_NUMPY=1.24.4 OLDEST_ORT=1.18.0
DEFAULT_DIR=build/aarch64
[ "$OLDEST" = 0 ] || DEFAULT_DIR=build/aarch64-oldest
W=$(mkdir -p "${GFNET_AARCH64_DIR:-$DEFAULT_DIR}" && cd "${GFNET_AARCH64_DIR:-$DEFAULT_DIR}" && pwd)
HOST_PY=${PYTHON:-python3}
say() { printf '\n== aarch64 [%ss]: %s\n' "$SECONDS" "$*"; }
die() { echo "aarch64 check: $*" >&2; exit 2; }

[ "$(uname -m)" = x86_64 ] || die "this script cross-builds from x86-64 (this machine is $(uname -m))"
command -v apt-get >/dev/null 2>&1 || die "needs a Debian-style system with apt-get"
command -v cmake >/dev/null 2>&1 || die "needs cmake (pip install cmake)"

# ------------------------------------------------------------------------ 1. tools ----
if ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || ! command -v qemu-aarch64 >/dev/null 2>&1; then
  say "installing g++-aarch64-linux-gnu and qemu-user"
  [ "$(id -u)" = 0 ] || die "g++-aarch64-linux-gnu and qemu-user are missing and installing them needs root"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    g++-aarch64-linux-gnu qemu-user >/dev/null
fi

# ---------------------------------------------------------------------- 2. sysroot ----
APT_DIR=$W/apt
mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
touch "$APT_DIR/status"
cat >"$APT_DIR/apt.conf" <<EOF
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
Dir::State "$APT_DIR";
Dir::State::Lists "$APT_DIR/lists";
Dir::State::status "$APT_DIR/status";
Dir::Cache "$APT_DIR/cache";
APT::Sandbox::User "root";
EOF
if [ "$OLDEST" = 1 ]; then
  # The older suite next to this machine's own (its sources.list.d): apt takes each package
  # from the newest suite that has it, so only what the newer one lacks (python3.9 and the
  # libraries of older sonames it links) comes from the older suite.
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $OLDEST_SUITE main" \
    >"$APT_DIR/oldest.list"
  echo "Dir::Etc::SourceList \"$APT_DIR/oldest.list\";" >>"$APT_DIR/apt.conf"
fi
export APT_CONFIG=$APT_DIR/apt.conf
say "arm64 package lists"
apt-get update -qq
EXTRA_DEBS=""
PY_TEST_REQS="pytest>=8"
if [ "$OLDEST" = 1 ]; then
  PYVER=$OLDEST_PYVER NUMPY_VER=$OLDEST_NUMPY ORT_VER=$OLDEST_ORT
  # pybind11's CMake asks Python < 3.10 for its module suffix through distutils, a package
  # of its own in Debian (the older suite's, for its Python)
  EXTRA_DEBS="python3-distutils/$OLDEST_SUITE"
  # pip takes environment markers from the running (host) Python and this machine's index
  # gives no Requires-Python: name pytest's releases and dependencies for Python 3.9
  PY_TEST_REQS="pytest>=8,<8.5 iniconfig<2.3 exceptiongroup>=1 tomli>=1"
  apt-cache show "python$PYVER-minimal" >/dev/null 2>&1 || die "no arm64 python$PYVER-minimal in Debian $OLDEST_SUITE"
else
  PYVER=$(apt-cache show --no-all-versions python3-minimal | sed -n 's/^Version: \([0-9]*\.[0-9]*\).*/\1/p')
  [ -n "$PYVER" ] || die "could not find Debian's arm64 python3-minimal"
  NUMPY_VER=$("$HOST_PY" -c "import numpy; print(numpy.__version__)")
  ORT_VER=$("$HOST_PY" -c "import onnxruntime; print(onnxruntime.__version__)")
fi
#: setup.py's other RUNTIME requirements (besides numpy and onnxruntime, pinned above).
RUNTIME_PKGS=("pillow>=9" "tqdm>=4.60" "fastjsonschema>=2.16" "jinja2>=3.0")
KEY="python$PYVER numpy==$NUMPY_VER onnxruntime==$ORT_VER ${RUNTIME_PKGS[*]}${EXTRA_DEBS:+ $EXTRA_DEBS}"
[ "$OLDEST" = 0 ] || KEY="$KEY $PY_TEST_REQS"
SYSROOT=$W/sysroot
SITE=$W/site
if [ "$(cat "$W/env.key" 2>/dev/null)" != "$KEY" ]; then
  rm -rf "$SYSROOT" "$SITE" "$W/debs" "$W/env.key"
  say "sysroot: Debian arm64 python$PYVER and its libraries"
  PKGS=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
           --no-replaces --no-enhances "python$PYVER-minimal" "libpython$PYVER-stdlib" libstdc++6 \
         | grep -v '^[ <]' | sort -u)
  mkdir -p "$W/debs" "$SYSROOT"
  # libpython3.X-dev: only its headers are used (no dependencies needed)
  (cd "$W/debs" && apt-get download -qq $PKGS "libpython$PYVER-dev" $EXTRA_DEBS)
  for deb in "$W"/debs/*.deb; do dpkg -x "$deb" "$SYSROOT"; done
  [ -x "$SYSROOT/usr/bin/python$PYVER" ] || die "the sysroot has no python$PYVER (apt-get download failed?)"
  rm -rf "$W/debs"

  say "aarch64 wheels: numpy $NUMPY_VER, onnxruntime $ORT_VER, ${RUNTIME_PKGS[*]}, pytest"
  PLATFORMS=""
  for p in manylinux2014 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35 manylinux_2_36; do
    PLATFORMS="$PLATFORMS --platform ${p}_aarch64"
  done
  "$HOST_PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-warn-conflicts \
    --target "$SITE" --only-binary=:all: \
    --implementation cp --python-version "$PYVER" $PLATFORMS \
    "numpy==$NUMPY_VER" "onnxruntime==$ORT_VER" "${RUNTIME_PKGS[@]}" $PY_TEST_REQS
  echo "$KEY" >"$W/env.key"
fi

# ONNX Runtime's CPU detection (cpuinfo) reads /proc/cpuinfo, which qemu-user passes through
# from the x86 host; it crashes on x86 contents. qemu looks paths up in the sysroot first, so
# an ARM /proc/cpuinfo there (Cortex-A76-like cores, as QEMU_CPU below) is what it reads.
mkdir -p "$SYSROOT/proc"
for i in $(seq 0 $(( $(nproc --all) - 1 ))); do
  printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n' "$i"
done >"$SYSROOT/proc/cpuinfo"

# The emulated interpreter. OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE name x86 cores where they are
# set; the aarch64 OpenBLAS in numpy crashes on them, so they are dropped for it only. Tests
# that start a child interpreter run this script (GFNET_EDGE_TEST_PYTHON, tests/child_python.py):
# the emulated binary itself cannot be executed directly.
STAGE=$W/stage
mkdir -p "$W/bin"
cat >"$W/bin/python3" <<EOF
#!/bin/sh
exec env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE QEMU_CPU=cortex-a76 QEMU_LD_PREFIX="$SYSROOT" \\
  PYTHONPATH="$STAGE:$SITE" GFNET_EDGE_CUDA=0 GFNET_EDGE_TEST_PYTHON="$W/bin/python3" \\
  qemu-aarch64 "$SYSROOT/usr/bin/python$PYVER" "\$@"
EOF
chmod +x "$W/bin/python3"
EMU_PY=$W/bin/python3
"$EMU_PY" -c "import platform, numpy, onnxruntime; print('emulated:', platform.machine(), 'python', platform.python_version(), 'numpy', numpy.__version__, 'onnxruntime', onnxruntime.__version__)"

# ------------------------------------------------------------------- 3. extension ----
say "cross-compiling the extension (CPU kernels)"
cat >"$W/toolchain.cmake" <<EOF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
EOF
PYBIND11_DIR=$("$HOST_PY" -c "import pybind11; print(pybind11.get_cmake_dir())")
rm -rf "$W/ext"
# a build folder configured from another checkout is started afresh
grep -qxF "CMAKE_HOME_DIRECTORY:INTERNAL=$ROOT" "$W/cmake/CMakeCache.txt" 2>/dev/null || rm -rf "$W/cmake"
# Python.h from the arm64 headers; its pyconfig.h includes <aarch64-linux-gnu/python3.X/pyconfig.h>.
cmake -S "$ROOT" -B "$W/cmake" -DCMAKE_TOOLCHAIN_FILE="$W/toolchain.cmake" \
  -DPython_EXECUTABLE="$EMU_PY" -DPython_INCLUDE_DIR="$SYSROOT/usr/include/python$PYVER" \
  -DCMAKE_CXX_FLAGS="-isystem $SYSROOT/usr/include" -Dpybind11_DIR="$PYBIND11_DIR" \
  -DGFNET_EDGE_CUDA=OFF -DCMAKE_BUILD_TYPE=Release -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$W/ext" >"$W/cmake.log"
if ! cmake --build "$W/cmake" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" >>"$W/cmake.log" 2>&1; then
  tail -n 40 "$W/cmake.log"
  die "the cross build failed (log: $W/cmake.log)"
fi
grep -iE 'warning|error' "$W/cmake.log" || echo "built without warnings"
EXT=$(ls "$W"/ext/_C.cpython-*-aarch64-linux-gnu.so 2>/dev/null) || die "the cross build made no module (see $W/cmake.log)"

# The packages as setup.py installs them (package_dir), with the aarch64 module.
rm -rf "$STAGE"
mkdir -p "$STAGE/tools"
cp -r gfnet_edge tests pyproject.toml "$STAGE/"
# a development checkout may link gfnet_edge/quantize and calibrate to the top-level folders
rm -rf "$STAGE/gfnet_edge/quantize" "$STAGE/gfnet_edge/calibrate"
cp -r quantize "$STAGE/gfnet_edge/quantize"
cp -r calibrate "$STAGE/gfnet_edge/calibrate"
cp tools/aarch64_parity.py tools/aarch64_cases.py "$STAGE/tools/"
find "$STAGE" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
cp "$EXT" "$STAGE/gfnet_edge/"

# ------------------------------------------------------------------ 4. x86 record ----
say "x86 references: kernel cases and an fp32 demo bundle ($IMAGES test images)"
rm -rf "$W/bundle" "$W/ref.npz"
# this checkout's package and extension, whatever else is installed
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$HOST_PY" -c "import gfnet_edge._C" \
  || die "this checkout has no x86 extension: build it first (pip install -e . or python3 setup.py build_ext --inplace)"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$HOST_PY" tools/aarch64_parity.py record "$W/ref.npz" \
  --bundle "$W/bundle" --images "$IMAGES"

# ------------------------------------------------------------- 5. aarch64 checks ----
say "pytest under qemu-aarch64 (torch-free device-side tests)"
(cd "$STAGE" && "$EMU_PY" -m pytest -q -p no:cacheprovider \
  tests/test_host_loop.py tests/test_bundle.py tests/test_kernels_errors.py tests/test_simd_paths.py)
say "parity with x86 under qemu-aarch64"
(cd "$STAGE" && "$EMU_PY" tools/aarch64_parity.py check "$W/ref.npz" --bundle "$W/bundle")
say "passed"
