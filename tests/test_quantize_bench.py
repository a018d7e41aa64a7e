"""bench/quantize.py: where each kind of run writes its report."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def _bench_quantize():
    spec = importlib.util.spec_from_file_location("bench_quantize_script", ROOT / "bench" / "quantize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_latency_only_run_leaves_the_full_runs_report_alone(tmp_path, monkeypatch, capsys):
    """`python3 bench/quantize.py --latency-only` (docs/quantization.md) writes its latency table
    to bench/results/quantize_latency.md: bench/results/quantize.md, the full run's report that
    the docs quote (accuracy, exit agreement, latency), and its quantize.json stay as they are."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    mod = _bench_quantize()
    fake_root = tmp_path / "checkout"
    results = fake_root / "bench" / "results"
    results.mkdir(parents=True)
    (results / "quantize.md").write_text("the full run's report\n")
    (results / "quantize.json").write_text("{}\n")
    monkeypatch.setattr(mod, "ROOT", fake_root)
    monkeypatch.setattr(mod, "latency_only", lambda *a, **k: "# INT8 latency\n")
    monkeypatch.setattr(sys, "argv", ["quantize.py", "--latency-only", "--checkpoint",
                                      str(ROOT / "gfnet_edge" / "assets" / "demo_gfnet.pth.tar")])
    assert mod.main() == 0
    assert (results / "quantize.md").read_text() == "the full run's report\n"
    assert (results / "quantize.json").read_text() == "{}\n"
    assert (results / "quantize_latency.md").read_text() == "# INT8 latency\n"
    assert str(results / "quantize_latency.md") in capsys.readouterr().out
