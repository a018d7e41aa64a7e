"""``bench/train_gpu.py --tiny``: the GPU training benchmark's CPU dry run works end to end."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("torchvision")

REPO = Path(__file__).resolve().parent.parent


def test_tiny_dry_run_trains_two_iterations_per_epoch_and_reports(tmp_path):
    out = tmp_path / "tg"
    proc = subprocess.run([sys.executable, "bench/train_gpu.py", "--out", str(out), "--tiny"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", **_env()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 40 images of 10 classes in batches of 16, drop_last: 2 iterations per epoch
    n_train = sum(1 for _ in (out / "data" / "train").rglob("*.jpg"))
    assert n_train == 40
    for run, stages in (("all", ["stage1", "stage2", "stage3"]), ("s1_amp", ["stage1"]), ("s1_fp32", ["stage1"])):
        recs = [json.loads(line) for line in (out / run / "epochs.jsonl").read_text().splitlines()]
        assert [r["stage"] for r in recs] == stages, run
        assert all(r["iters"] == n_train // 16 and r["images_per_s"] > 0 for r in recs), run
        # two steps: the rate without the first step is measured too
        assert all(r["images_per_s_steady"] > 0 for r in recs), run
    report = (out / "train_gpu.txt").read_text()
    assert report.strip() in proc.stdout
    m = re.search(r"stage 1 last epoch, without its first step: mixed precision ([\d.]+) img/s, "
                  r"float32 ([\d.]+) img/s", report)
    assert m, report
    for run, got in (("s1_amp", m.group(1)), ("s1_fp32", m.group(2))):
        last = json.loads((out / run / "epochs.jsonl").read_text().splitlines()[-1])
        assert float(got) == last["images_per_s_steady"], run
    fp32 = json.loads((out / "s1_fp32" / "config.json").read_text())
    assert fp32["amp"] is False and fp32["backbone"] == "test_resnet"


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
