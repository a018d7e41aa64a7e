"""The extension and the Runtime under extreme shapes, in a subprocess (tests/fuzz_native.py): a
native crash fails this test instead of killing pytest. The full run (2000 examples per
property) is ``python tests/fuzz_native.py 2000 BUNDLE``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("GFNET_FUZZ_EXAMPLES", "150"))


@pytest.mark.slow
def test_no_native_crash_under_extreme_shapes(demo_onnx_bundle):
    bundle = demo_onnx_bundle.root
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz_native.py"), str(EXAMPLES), str(bundle)],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert p.returncode == 0, f"exit {p.returncode} (negative: killed by that signal)\n{p.stdout}\n{p.stderr[-3000:]}"
    assert "0 failure(s)" in p.stdout
