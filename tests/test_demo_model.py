"""The shipped demo checkpoints load and reproduce their recorded accuracy; the generator is
deterministic (same seed, same bytes)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gfnet_edge.data import ClutteredDigits, demo_config, normalize
from gfnet_edge.models import load_checkpoint

ASSETS = Path(__file__).resolve().parents[1] / "gfnet_edge" / "assets"
N = 500


def test_shipped_checkpoints_are_small():
    total = sum((ASSETS / f).stat().st_size for f in ("demo_gfnet.pth.tar", "demo_static.pth.tar"))
    assert total <= 25 * 2**20


@pytest.mark.slow
def test_demo_checkpoint_reproduces_recorded_accuracy():
    results = json.loads((ASSETS / "demo_results.json").read_text())
    recorded = results["test500_anytime_accuracy"]
    torch.set_num_threads(2)
    model = load_checkpoint(ASSETS / "demo_gfnet.pth.tar")
    assert model.meta["missing_metadata"] == []
    ds = ClutteredDigits("test", config=demo_config(model))
    frames, labels = ds.arrays(N, progress=False)
    again, _ = ClutteredDigits("test", config=demo_config(model)).arrays(4, progress=False, cache=False)
    assert np.array_equal(again, frames[:4])  # deterministic generator: same seed, same bytes
    probs = []
    for i in range(0, N, 100):
        probs.append(model.trace(torch.from_numpy(normalize(frames[i:i + 100]))).probs.numpy())
    pred = np.concatenate(probs, axis=1).argmax(axis=2)
    acc = 100.0 * (pred == labels[None]).mean(axis=1)
    np.testing.assert_allclose(acc, recorded, atol=0.5)
    assert acc[-1] >= acc[0] + 15  # the focus steps matter on this task
