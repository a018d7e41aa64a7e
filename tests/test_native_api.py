"""The native API's shape: the argmax rule (first maximum, NaN counts as the maximum) on CPU
and CUDA against numpy; the extension reached only through the public `ops` API; the
bindings and the `ops` package kept in small files by area; CUDA sources independent of the
CPU ones."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from gfnet_edge import ops

ROOT = Path(__file__).resolve().parents[1]
HAVE_GPU = ops.has_cuda_build() and ops.cuda_device_count() > 0


def _argmax_cases() -> np.ndarray:
    """Rows where the first maximum, ties, infinities and NaNs decide the argmax."""
    nan, inf = np.nan, np.inf
    rows = [
        [1.0, 3.0, 3.0, 2.0],        # tie: the first maximum
        [nan, 1.0, nan, 2.0],        # NaN first
        [1.0, 2.0, nan, nan],        # the first NaN wins over larger numbers before it
        [-inf, -inf, -inf, -inf],    # all equal
        [inf, 5.0, inf, nan],        # NaN beats +inf
        [0.0, -0.0, 0.0, -1.0],      # signed zeros compare equal
    ]
    rng = np.random.default_rng(0)
    wide = rng.integers(-3, 3, (20, 300)).astype(np.float32)  # many ties across a CUDA block
    wide[rng.random(wide.shape) < 0.01] = np.nan
    return [np.array(rows, np.float32), wide]


def test_cpu_argmax_follows_numpy_with_ties_and_nan():
    for logits in _argmax_cases():
        _, am = ops.softmax_stats(logits)
        np.testing.assert_array_equal(am, np.argmax(logits, axis=1))


@pytest.mark.skipif(not HAVE_GPU, reason="no usable CUDA device")
def test_cuda_argmax_follows_numpy_with_ties_and_nan():
    for logits in _argmax_cases():
        n, c = logits.shape
        mp, am = ops.DeviceBuffer(4 * n), ops.DeviceBuffer(4 * n)
        ops.cuda_softmax_stats(ops.to_device(logits), n, c, mp, am)
        np.testing.assert_array_equal(ops.from_device(am, (n,), np.int32), np.argmax(logits, axis=1))


def _python_files(*dirs: str):
    for d in dirs:
        yield from (ROOT / d).rglob("*.py")


def test_extension_is_reached_only_through_ops():
    private = re.compile(r"ops[.](_C|_stream|_ptr)|[.]_cell\b")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in _python_files("gfnet_edge", "calibrate", "quantize", "bench",
                                                                    "tools", "tests")
             if "gfnet_edge/ops/" not in p.as_posix() and p.name != Path(__file__).name
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if private.search(line)]
    assert not found, f"private parts of ops used outside gfnet_edge/ops: {found}"


def test_bindings_and_ops_are_small_files_by_area():
    bindings = sorted((ROOT / "csrc" / "bindings").glob("*"))
    assert len(bindings) >= 5 and not (ROOT / "csrc" / "bindings.cpp").exists()
    long = {p.name: n for p in bindings if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, f"binding files over 400 lines: {long}"
    modules = sorted((ROOT / "gfnet_edge" / "ops").glob("*.py"))
    long = {p.name: n for p in modules if (n := len(p.read_text(encoding="utf-8").splitlines())) >= 500}
    assert len(modules) >= 5 and not long, f"ops modules of 500 lines or more: {long}"
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert all(f"csrc/bindings/{p.name}" in cmake for p in bindings if p.suffix == ".cpp")


def test_cuda_sources_include_no_cpu_header():
    include = re.compile(r'#include\s+"(?:\.\./)?cpu/')
    offenders = [p.name for p in (ROOT / "csrc" / "cuda").iterdir() if include.search(p.read_text(encoding="utf-8"))]
    assert not offenders, f"CUDA sources including CPU headers: {offenders}"


def test_every_public_name_resolves():
    missing = [name for name in ops.__all__ if not hasattr(ops, name)]
    assert not missing
    assert callable(ops.host_loop) and ops.stream_handle(None) == 0 and ops.stream_handle(7) == 7
    assert isinstance(ops.cuda_archs(), str) and isinstance(ops.read_pass_seconds(1 << 16, 2), float)
