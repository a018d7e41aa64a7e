"""Helpers for the device-side tests: a Python run where the build-side modules are absent, and
labelled image folders.

A device-side install (``pip install gfnet-edge``) has numpy, ONNX Runtime, Pillow, tqdm,
fastjsonschema, Jinja2 and the extension; :data:`ABSENT` lists what it lacks.
:func:`run_without_build_side` runs Python in a subprocess with a ``sys.meta_path`` finder in front
that answers every import of those modules (and their submodules) with ``ModuleNotFoundError``, as a
Python without them would.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np

from gfnet_edge.errors import BUILD_MODULES

ROOT = Path(__file__).resolve().parents[1]

#: Modules a device-side install does not have: the build side and the report extra.
ABSENT = tuple(BUILD_MODULES) + ("matplotlib",)

_FINDER = '''
import sys


class _Absent:
    """Imports of these top-level modules fail as they do where the modules are not installed."""

    names = {absent!r}
    tried = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            _Absent.tried.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _Absent())
'''


def run_without_build_side(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh Python (cwd: the repository root) where :data:`ABSENT` cannot be
    imported; ``_Absent.tried`` lists the import attempts that were refused."""
    prog = _FINDER.format(absent=tuple(sorted(ABSENT))) + "\n" + code
    return subprocess.run([sys.executable, "-c", prog], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def cli_without_build_side(argv: Sequence[Any], timeout: float = 300) -> subprocess.CompletedProcess:
    """``gfnet-edge ARGV`` in a Python without the build side."""
    code = f"from gfnet_edge.cli import main\nsys.exit(main({json.dumps([str(a) for a in argv])}))\n"
    return run_without_build_side(code, timeout)


def write_image_folder(root: Path, frames: np.ndarray, labels: np.ndarray) -> Path:
    """Writes uint8 (N, H, W, 3) ``frames`` as PNG files in one subfolder per label (``00``, ``01``
    ...: sorted by name they give the labels back)."""
    from PIL import Image

    for i, (x, y) in enumerate(zip(frames, labels)):
        d = root / f"{int(y):02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(x, np.uint8)).save(d / f"{i:04d}.png")
    return root


def prediction_rows(stdout: str) -> Dict[str, Dict[str, Any]]:
    """``gfnet-edge predict --json`` output keyed by image name."""
    return {r["image"]: r for r in json.loads(stdout)}
