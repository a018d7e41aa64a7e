"""Property-based fuzzing of the extension's public entry points with extreme shapes (zero-sized,
huge, mismatched), run as a script in its own process so that a native crash (SIGFPE, SIGSEGV)
fails the calling test instead of killing pytest.

    python tests/fuzz_native.py EXAMPLES [BUNDLE]

Every call must either return arrays of the documented shape or raise TypeError / ValueError /
MemoryError (InputError for the Runtime); anything else is printed and exits 1. With a
``BUNDLE``, ``Runtime.predict`` / ``trace`` get the same treatment. tests/test_fuzz_native.py
runs it with a small budget; the full run is ``python tests/fuzz_native.py 2000 BUNDLE``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's gfnet_edge

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gfnet_edge import ops  # noqa: E402

EXPECTED = (TypeError, ValueError, MemoryError, OverflowError)
DIM = st.one_of(st.integers(0, 3), st.integers(4, 40), st.sampled_from([2 ** 31, 2 ** 40, -1]))
SMALL = st.integers(0, 6)
DTYPES = st.sampled_from([np.float32, np.uint8, np.float64, np.int32])


def _array(shape, dtype) -> np.ndarray:
    if any(d < 0 for d in shape) or np.prod([max(d, 1) for d in shape], dtype=np.float64) > 4e6:
        return None
    return np.zeros(shape, dtype)


def _weights(*shape: int) -> np.ndarray:
    """Head weights: sizes up to 64 (and 0 or negative, which must be refused); larger ones are
    not built (the harness would only measure numpy's allocator)."""
    if any(d > 64 for d in shape):
        raise MemoryError("weights too large for the harness")
    return np.ones(shape, np.float32)


CALLS = {
    "glance": lambda a, n, c, s, p, dt: ops.glance(a, p) if dt != np.uint8 else
    ops.glance(a, p, mean=ops.IMAGENET_MEAN, std=ops.IMAGENET_STD),
    "crop": lambda a, n, c, s, p, dt: ops.crop_patches(a, np.zeros((n, 2), np.int32), p) if dt != np.uint8 else
    ops.crop_patches(a, np.zeros((n, 2), np.int32), p, mean=ops.IMAGENET_MEAN, std=ops.IMAGENET_STD),
    "preprocess": lambda a, n, c, s, p, dt: ops.preprocess(a, p),
    "resize_crop": lambda a, n, c, s, p, dt: ops.resize_crop(a, p, 1.0),
    "softmax": lambda a, n, c, s, p, dt: ops.softmax_stats(a.reshape(n, -1) if n else a.reshape(0, -1)),
    "linear": lambda a, n, c, s, p, dt: ops.linear(a.reshape(n, -1) if n else a.reshape(0, -1),
                                                  _weights(max(p, 0) % 7, c * s * s)),
    "gru": lambda a, n, c, s, p, dt: ops.GRUHead(_weights(3 * p, c), _weights(3 * p, p), None, None,
                                                 _weights(s, p), None).step(
        a.reshape(n, -1)[:, :c] if n else np.zeros((0, c), np.float32)),
    "cascaded": lambda a, n, c, s, p, dt: ops.CascadedHead([(_weights(p, 2 * c), None)]).step(
        np.ascontiguousarray(a.reshape(n, c, -1)[:, :, :1].transpose(0, 2, 1).repeat(2, axis=1)) if n else
        np.zeros((0, 2, c), np.float32), 2),
}


@st.composite
def kernel_inputs(draw):
    name = draw(st.sampled_from(sorted(CALLS)))
    n, c, s, p = draw(SMALL), draw(SMALL), draw(DIM), draw(DIM)
    dt = draw(DTYPES)
    layout = (n, s, s, c) if dt == np.uint8 else (n, c, s, s)
    return name, layout, n, c, s, p, dt


def _ceiling(extra_mb: int = 4096) -> None:
    """An address-space ceiling on top of the imports: a runaway allocation is a MemoryError."""
    import resource

    with open("/proc/self/status", encoding="ascii") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (extra_mb << 20),) * 2)


def run(examples: int, bundle: str = None) -> int:
    _ceiling()
    failures = []
    cfg = settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))

    @cfg
    @given(kernel_inputs())
    def kernels(case):
        name, layout, n, c, s, p, dt = case
        a = _array(layout, dt)
        if a is None:
            return
        try:
            CALLS[name](a, n, c, s, p, dt)
        except EXPECTED:
            pass
        except Exception as exc:  # anything else is a finding
            failures.append(f"{name} {layout} {dt.__name__} P={p}: {type(exc).__name__}: {exc}")

    kernels()
    if bundle:
        from gfnet_edge.errors import InputError
        from gfnet_edge.runtime import Runtime

        rt = Runtime(bundle, backend="onnxruntime", precision="fp32", threads=1)
        S = rt.model.image_size

        @cfg
        @given(st.integers(0, 3), st.sampled_from([0, 1, S - 1, S, S + 1]), st.sampled_from([0, 1, 3, 4]),
               DTYPES, st.booleans())
        def runtime(n, side, ch, dt, trace):
            shape = (n, ch, side, side) if dt == np.float32 else (n, side, side, ch)
            try:
                out = (rt.trace if trace else rt.predict)(np.zeros(shape, dt))
                assert len(out.coords[0]) == n or n == 0
            except (InputError, *EXPECTED):
                pass
            except Exception as exc:
                failures.append(f"runtime {shape} {dt.__name__}: {type(exc).__name__}: {exc}")

        runtime()
    for f in failures[:20]:
        print(f)
    print(f"fuzz: {examples} examples per property, {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None))
