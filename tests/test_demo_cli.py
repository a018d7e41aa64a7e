"""``gfnet-edge demo`` end to end with its smallest settings: it builds the INT8 bundle,
calibrates it, classifies demo test images with the default budget it picked and writes the
report; its printed summary agrees with an independent run of the bundle on the same images."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxsim")
pytest.importorskip("matplotlib")

NUM_TEST = 16


def _row(out: str, name: str) -> str:
    """The value of one row of the demo's closing summary table (``  name   value``)."""
    rows = [line for line in out.splitlines() if re.match(rf"^  {re.escape(name)}\s{{2,}}\S", line)]
    assert len(rows) == 1, (name, out[-3000:])
    return rows[0][len(name) + 2:].strip()


@pytest.mark.slow
def test_demo_runs_end_to_end_and_its_summary_is_right(tmp_path, monkeypatch, capsys):
    import gfnet_edge.build as build_mod
    from gfnet_edge import cli
    from gfnet_edge.bundle import Bundle
    from gfnet_edge.data import ClutteredDigits, demo_config
    from gfnet_edge.runtime import Runtime

    # Every setting of the demo's build stays as the demo chose it, except the mixed-precision
    # search's accuracy limit, raised so the search ends at once (as in tests/conftest.py's
    # INT8 bundle; tests/test_build_int8.py covers the search): it takes most of the demo's
    # time on 2 cores.
    real_config, demo_configs = build_mod.BuildConfig, []

    def build_config(**kw):
        demo_configs.append(dict(kw))
        return real_config(**{**kw, "max_accuracy_drop": 100.0})

    monkeypatch.setattr(build_mod, "BuildConfig", build_config)
    out = tmp_path / "demo"
    rc = cli.main(["demo", "-o", str(out), "--quick", "--num-test", str(NUM_TEST), "--threads", "1",
                   "--backend", "onnxruntime"])
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    assert len(demo_configs) == 1 and demo_configs[0]["precision"] == "int8"
    assert demo_configs[0]["num_calib"] == 64 and demo_configs[0]["int8_profiles"] == ("cpu",)

    bundle = Bundle.load(out / "bundle")  # verifies every artifact's hash
    assert set(bundle.manifest["graphs"]) == {"fp32", "int8-cpu"}
    report_dir = out / "report"
    assert (report_dir / "report.html").is_file() and (report_dir / "report.html").stat().st_size > 0
    report = json.loads((report_dir / "report.json").read_text())

    # the default budget: the fastest (measured mean ms) within 1 point of the full network's held-out
    # accuracy, else the cheapest calibrated budget within 1 point of the best held-out accuracy
    budgets = sorted(report["budgets"], key=lambda b: float(b["budget_ms"]))
    full = report["anytime"][f"{report['bundle']['precision']} (held-out)"][-1]
    near = [b for b in budgets if float(b["holdout"]["accuracy"]) >= full - 1.0]
    best = max(float(b["holdout"]["accuracy"]) for b in budgets)
    default = (min(near, key=lambda b: b["measured"]["mean_ms"])["name"] if near else
               next(b["name"] for b in budgets if float(b["holdout"]["accuracy"]) >= best - 1.0))
    assert bundle.manifest["default_budget"] == default
    # the demo says which rule chose it
    said = next(line for line in text.splitlines() if "default budget: " in line)
    assert f"default budget: {default} (" in said and f"within 1 point of the full network's held-out accuracy of {full:.2f} %" in said
    assert set(bundle.budgets()) >= {b["name"] for b in budgets}
    assert _row(text, "runtime") == f"onnxruntime / int8-cpu / budget {default}"
    assert _row(text, "report") == str(report_dir / "report.html")

    # an independent run of the bundle on the same demo test images (generated again, not cached)
    frames, labels = ClutteredDigits("test", config=demo_config(bundle.manifest)).arrays(
        NUM_TEST, progress=False, cache=False)
    assert len(frames) == NUM_TEST
    with Runtime(out / "bundle", backend="onnxruntime", threads=1) as rt:
        assert rt.budget == default and rt.precision == "int8-cpu"
        preds = [rt.predict(frames[i]) for i in range(NUM_TEST)]
    classes = np.array([p.classes[0] for p in preds])
    steps = np.array([p.exit_step[0] for p in preds])
    correct = int((classes == labels).sum())
    assert _row(text, "test accuracy") == f"{100.0 * correct / NUM_TEST:.2f}% on {NUM_TEST} images"
    counts = [int(n) for n in re.findall(r"step \d+: (\d+)", _row(text, "exit steps"))]
    assert len(counts) == bundle.model.steps and sum(counts) == NUM_TEST
    assert counts == [int((steps == k).sum()) for k in range(bundle.model.steps)]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "gfnet-edge-demo"
    assert summary["test_images"] == NUM_TEST and summary["exit_histogram"] == counts
    assert summary["accuracy"] == pytest.approx(100.0 * correct / NUM_TEST)


def _files(root: Path) -> dict:
    """Every entry under ``root``: a file's bytes, a link's target, None for a folder."""
    return {q.relative_to(root).as_posix(): (str(q.readlink()) if q.is_symlink() else q.read_bytes() if q.is_file()
                                             else None) for q in sorted(root.rglob("*"))}


def _demo_refuses(out: Path, monkeypatch, capsys) -> str:
    """Runs ``gfnet-edge demo -o out`` with the build replaced by a failure: the demo must stop in
    one line (exit 2) before it, and leave ``out`` as it was; returns the line."""
    import gfnet_edge.build as build_mod
    from gfnet_edge import cli

    def no_build(*a, **kw):
        raise AssertionError("the demo went on to build")

    monkeypatch.setattr(build_mod, "build_bundle", no_build)
    before = _files(out)
    rc = cli.main(["demo", "-o", str(out), "--quick", "--backend", "onnxruntime"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("gfnet-edge: error: "), err
    assert _files(out) == before
    return err[0]


@pytest.mark.parametrize("kind", ["json", "text", "folder", "symlink"])
def test_demo_replaces_no_summary_json_it_did_not_write(tmp_path, monkeypatch, capsys, kind):
    out = tmp_path / "demo"
    out.mkdir()
    summary = out / "summary.json"
    if kind == "json":
        summary.write_text(json.dumps({"accuracy": 99.0, "mine": True}))
    elif kind == "text":
        summary.write_text("my notes")
    elif kind == "folder":
        summary.mkdir()
        (summary / "notes.txt").write_text("mine")
    else:
        (tmp_path / "mine.json").write_text(json.dumps({"format": "gfnet-edge-demo"}))
        summary.symlink_to(tmp_path / "mine.json")
    line = _demo_refuses(out, monkeypatch, capsys)
    assert f"{summary}: exists and is not an earlier demo's summary" in line and "--force" not in line


def test_demo_replaces_an_earlier_demos_summary_json(tmp_path):
    from gfnet_edge.demo import SUMMARY_FIELDS, _check_earlier_summary

    (tmp_path / "now.json").write_text(json.dumps({"format": "gfnet-edge-demo", "accuracy": 90.0}))
    (tmp_path / "before.json").write_text(json.dumps({k: 0 for k in SUMMARY_FIELDS}))  # written before "format"
    for name in ("now.json", "before.json", "absent.json"):
        _check_earlier_summary(tmp_path / name)


def test_demo_refuses_a_report_folder_of_the_users_without_naming_force(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    (out / "report").mkdir(parents=True)
    (out / "report" / "notes.txt").write_text("mine")
    line = _demo_refuses(out, monkeypatch, capsys)
    assert "is not a calibration report" in line and "the demo replaces only a calibration report" in line
    assert "--force" not in line and "choose another -o folder" in line


def test_demo_refuses_an_earlier_demo_bundle_holding_a_users_file(tmp_path, monkeypatch, capsys):
    from gfnet_edge.demo import DEMO_CHECKPOINT

    out = tmp_path / "demo"
    out.mkdir()
    subprocess.run([sys.executable, "-m", "gfnet_edge.cli", "build-engine", str(DEMO_CHECKPOINT), "-o",
                    str(out / "bundle"), "--precision", "fp32", "--backend", "onnxruntime", "-q"], check=True,
                   stdout=subprocess.DEVNULL)
    (out / "bundle" / "notes.txt").write_text("mine")
    line = _demo_refuses(out, monkeypatch, capsys)
    assert "holds notes.txt, not part of a gfnet-edge bundle; the demo replaces only" in line
    assert "--force" not in line
