"""Build and install gfnet-edge.

The Python packages are ``gfnet_edge`` plus ``quantize/`` and ``calibrate/``, installed as
``gfnet_edge.quantize`` and ``gfnet_edge.calibrate`` (see ``package_dir``). The native extension
``gfnet_edge._C`` is built by CMake (``CMakeLists.txt``); the CUDA kernels are compiled whenever
``nvcc`` is found (set ``GFNET_EDGE_CUDA=0`` to skip them, ``GFNET_EDGE_CUDA_ARCHS`` to choose
architectures, e.g. ``"72;87;90"``). ``GFNET_EDGE_PREBUILT_EXT=PATH`` packages an extension already
built from this source for this Python instead of compiling it (the device-side install test uses it).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = "") -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    """Configures and builds the extension with CMake into the package folder."""

    def build_extension(self, ext: CMakeExtension) -> None:
        ext_fullpath = Path.cwd() / self.get_ext_fullpath(ext.name)
        prebuilt = os.environ.get("GFNET_EDGE_PREBUILT_EXT")
        if prebuilt:  # an extension already built from this source for this Python: copied, not compiled
            src = Path(prebuilt)
            if not src.is_file() or src.name != ext_fullpath.name:
                raise SystemExit(f"GFNET_EDGE_PREBUILT_EXT={prebuilt}: not a built {ext_fullpath.name}")
            ext_fullpath.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, ext_fullpath)
            return
        import pybind11

        extdir = ext_fullpath.parent.resolve()
        cfg = os.environ.get("GFNET_EDGE_BUILD_TYPE", "Release")
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DGFNET_EDGE_EXT_NAME={ext.name.split('.')[-1]}",
        ]
        if os.environ.get("GFNET_EDGE_CUDA", "").strip() == "0":
            cmake_args.append("-DGFNET_EDGE_CUDA=OFF")
        archs = os.environ.get("GFNET_EDGE_CUDA_ARCHS")
        if archs:
            cmake_args.append(f"-DGFNET_EDGE_CUDA_ARCHS={archs}")
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp, check=True)


BUILD = ["torch==2.14.1", "torchvision==0.29.1", "timm>=1.0,<2", "onnx>=1.16", "onnxsim>=0.4.36", "scikit-learn>=1.3",
         "onnx2torch>=1.5"]
RUNTIME = ["numpy>=1.24", "onnxruntime>=1.18", "tqdm>=4.60", "pillow>=9", "fastjsonschema>=2.16", "jinja2>=3.0"]
REPORT = ["matplotlib>=3.7"]
TEST = ["pytest>=8", "hypothesis>=6.100", "scikit-learn>=1.3", "jsonschema>=4"]

setup(
    name="gfnet-edge",
    version="0.1.0",
    description="Deploy Glance-and-Focus Networks (GFNet) as quantized TensorRT / ONNX Runtime bundles",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=[
        "gfnet_edge",
        "gfnet_edge.cli",
        "gfnet_edge.models",
        "gfnet_edge.ops",
        "gfnet_edge.runtime",
        "gfnet_edge.runtime.backends",
        "gfnet_edge.data",
        "gfnet_edge.data.cluttered_digits",
        "gfnet_edge.train",
        "gfnet_edge.train.folder_stages",
        "gfnet_edge.quantize",
        "gfnet_edge.calibrate",
    ],
    package_dir={
        "gfnet_edge": "gfnet_edge",
        "gfnet_edge.quantize": "quantize",
        "gfnet_edge.calibrate": "calibrate",
    },
    package_data={"gfnet_edge": ["assets/*.pth.tar", "assets/*.json", "schemas/*.json"],
                  "gfnet_edge.calibrate": ["templates/*"]},
    ext_modules=[CMakeExtension("gfnet_edge._C", sourcedir=str(ROOT))],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=RUNTIME,
    extras_require={
        "build": BUILD,
        "report": REPORT,
        "test": TEST,
        "all": BUILD + REPORT + TEST,
        "gpu": ["cuda-python>=12"],
    },
    entry_points={"console_scripts": ["gfnet-edge=gfnet_edge.cli:main"]},
    zip_safe=False,
)
