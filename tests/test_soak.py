"""Soak: 10,000 predictions through one Runtime, resident memory growth under 5 %, answers stable."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from gfnet_edge.errors import InputError
from gfnet_edge.runtime import Runtime

N_PREDICTIONS = 10_000


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found")


@pytest.fixture()
def demo_bundle(demo_onnx_bundle):
    """The session's fp32 demo bundle (tests/conftest.py)."""
    return demo_onnx_bundle.root


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc for RSS")
def test_10k_predictions_memory_flat_and_answers_stable(demo_bundle):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(240, 320), (224, 224), (300, 260), (500, 375)]]
    with Runtime(demo_bundle, backend="onnxruntime", precision="fp32", threads=1) as rt:
        first = [rt.predict(f) for f in frames]
        for i in range(300):  # warm-up: allocator pools, ORT arenas, plan caches
            rt.predict(frames[i % len(frames)])
        before = rss_bytes()
        for i in range(N_PREDICTIONS):
            p = rt.predict(frames[i % len(frames)])
            if i % 2500 == 0:  # the error path must not leak or break the runtime
                with pytest.raises(InputError):
                    rt.predict(np.full((1, 3, 224, 224), np.nan, np.float32))
        after = rss_bytes()
        last = [rt.predict(f) for f in frames]
    growth = (after - before) / before
    assert growth < 0.05, f"RSS grew {100 * growth:.1f}% over {N_PREDICTIONS} predictions ({before >> 20} -> {after >> 20} MiB)"
    for a, b in zip(first, last):  # deterministic: bit-identical after 10k calls
        assert np.array_equal(a.classes, b.classes) and np.array_equal(a.confidence, b.confidence)
        assert np.array_equal(a.exit_step, b.exit_step) and np.array_equal(a.coords, b.coords)
    assert isinstance(p.classes, np.ndarray)


def test_shared_runtime_from_threads_matches_one_thread(demo_bundle):
    rng = np.random.default_rng(1)
    batch = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(5)]
    with Runtime(demo_bundle, backend="onnxruntime", precision="fp32") as rt:
        ref = rt.predict(batch)
        results, errors = {}, []

        def work(k: int) -> None:
            try:
                for j in range(20):
                    results[(k, j)] = rt.predict(batch)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len(results) == 80
    for r in results.values():
        assert np.array_equal(r.classes, ref.classes) and np.array_equal(r.confidence, ref.confidence)
        assert np.array_equal(r.exit_step, ref.exit_step) and np.array_equal(r.coords, ref.coords)
