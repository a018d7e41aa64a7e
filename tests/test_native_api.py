"""The native API's shape: the argmax rule (first maximum, NaN counts as the maximum) on CPU
and CUDA against numpy; the extension reached only through the public `ops` API; the
bindings and the `ops` package kept in small files by area; CUDA sources independent of the
CPU ones."""
from __future__ import annotations

import re
import shutil
import subprocess
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


def _top_level_args(text: str) -> list:
    """The comma-separated arguments of `text` up to its unmatched closing bracket or '>>>'."""
    args, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                break
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
            continue
        cur += ch
    return args + [cur.strip()]


def _kernel_bodies(src: str):
    """(name, body) of every __global__ function of a CUDA source."""
    for m in re.finditer(r"__global__\s+void\s+(\w+)\s*\(", src):
        start = src.index("{", m.end())
        depth, i = 0, start
        while True:
            depth += {"{": 1, "}": -1}.get(src[i], 0)
            if depth == 0:
                break
            i += 1
        yield m.group(1), src[start:i + 1]


def test_every_cuda_kernel_strides_over_its_elements_and_every_grid_is_capped():
    """A grid holds at most 65535 blocks along y and z and 2^31 - 1 along x: every kernel that
    indexes by blockIdx loops over its elements striding by gridDim (int64 indices), and every
    launch takes its block counts from common/grid.h's capped_blocks (directly or through a
    dim3 built from it), never a cast of its own."""
    cuda = ROOT / "csrc" / "cuda"
    sources = {p.name: p.read_text(encoding="utf-8") for p in sorted(cuda.glob("*.cu"))}
    unlooped = [f"{f}:{name}" for f, src in sources.items() for name, body in _kernel_bodies(src)
                if "blockIdx" in body and "gridDim" not in body]
    assert not unlooped, f"kernels with one block per element (no grid-stride loop): {unlooped}"
    capped = re.compile(r"^capped_blocks\(")
    bad = []
    for f, src in sources.items():
        dims = {m.group(1): _top_level_args(src[m.end():]) for m in re.finditer(r"\bdim3\s+(\w+)\(", src)}
        bad += [f"{f}: dim3 {name}({', '.join(parts)})" for name, parts in dims.items()
                if not all(capped.match(p) for p in parts)]
        for m in re.finditer(r"<<<", src):
            grid = _top_level_args(src[m.end():])[0]
            # a dim3 built above, or one passed in (`const dim3& grid`) from where it was built
            if not (capped.match(grid) or grid in dims or f"dim3& {grid}" in src):
                bad.append(f"{f}: <<<{grid}, ...>>>")
    assert not bad, f"launches whose block counts do not come from capped_blocks: {bad}"
    assert sum(src.count("<<<") for src in sources.values()) >= 10  # the scan saw the launches


def _run_cpp(tmp_path, body: str, includes: str) -> str:
    """Compiles and runs a C++ main() against the csrc/ headers; its stdout."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    prog, exe = tmp_path / "prog.cpp", tmp_path / "prog"
    prog.write_text(f"#include <cstdio>\n{includes}\nint main() {{\n{body}}}\n", encoding="utf-8")
    subprocess.run([cxx, "-std=c++17", "-I", str(ROOT / "csrc"), str(prog), "-o", str(exe)], check=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


def test_capped_blocks_fits_every_grid_dimension_for_any_element_count(tmp_path):
    """common/grid.h on the host: one block per `per_block` elements while that fits a grid
    dimension (65535), then 65535, for counts up to 2^62 (a cast of the plain quotient to 32
    bits wraps past 2^32 blocks: 2^40 elements at 256 a block would give 0)."""
    cases = [(0, 256), (1, 256), (255, 256), (256, 256), (257, 256), (65535 * 256, 256), (65535 * 256 + 1, 256),
             (2 ** 32 * 256 + 256, 256), (2 ** 39, 256), (2 ** 40, 256), (2 ** 62, 8), (65535, 1), (65536, 1),
             (2 ** 31, 1), (7, 8)]
    got = [int(v) for v in _run_cpp(tmp_path, "".join(f'  std::printf("%u\\n", gfn::capped_blocks({n}LL, {t}));\n'
                                                      for n, t in cases), '#include "common/grid.h"').split()]
    for (n, t), blocks in zip(cases, got):
        assert 1 <= blocks <= 65535, (n, t, blocks)
        needed = -(-n // t)  # blocks for one element a thread
        assert blocks == max(1, min(needed, 65535)), (n, t, blocks)


def test_scratch_while_capturing_comes_from_the_pool_or_is_refused_naming_the_rule(tmp_path):
    """cuda/scratch_rule.h on the host: a device with memory pools takes scratch from them in or
    out of a capture (cudaMallocAsync is legal while capturing); one without takes cudaMalloc
    outside a capture and is refused during one (cudaMalloc would invalidate it), with a one-line
    message that names the rule and the way out."""
    out = _run_cpp(tmp_path, "".join(
        f'  std::printf("%d\\n", static_cast<int>(gfn::cuda::scratch_source({p}, {c})));\n'
        for p, c in [("true", "false"), ("true", "true"), ("false", "false"), ("false", "true")])
        + '  std::printf("%s\\n", gfn::cuda::scratch_refusal(4096).c_str());\n',
        '#include "cuda/scratch_rule.h"')
    lines = out.splitlines()
    pool, malloc, refused = 0, 1, 2  # ScratchSource's order
    assert [int(v) for v in lines[:4]] == [pool, pool, malloc, refused]
    assert len(lines) == 5
    msg = lines[4]
    for part in ("4096 bytes", "captured into a CUDA graph", "no memory pools",
                 "cudaMalloc is not allowed during a capture", "outside the capture"):
        assert part in msg, (part, msg)
