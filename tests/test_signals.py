"""Interrupted and killed builds leave nothing behind: SIGTERM / SIGINT end a build through its
cleanup (no staging folder, the earlier bundle untouched); staging folders of a build killed with
SIGKILL are removed by the next build to the same target."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "gfnet_edge" / "assets" / "demo_gfnet.pth.tar"


def _default_sigint() -> None:
    # as in an interactive shell: a suite started as a background job of a non-interactive shell
    # inherits SIGINT ignored, and an ignored SIGINT never reaches the build
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _build(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gfnet_edge.cli", "build-engine", str(DEMO), "-o", str(out),
                             "--precision", "fp32", "--backend", "onnxruntime", "-q", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _wait_for_staging(parent: Path, proc: subprocess.Popen) -> Path:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = [p for p in parent.iterdir() if p.name.endswith(".partial")]
        if found:
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no staging folder appeared (exit {proc.poll()})")


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_build_leaves_nothing(tmp_path, sig, code):
    out = tmp_path / "bundle"
    out.mkdir()  # an empty folder --force may replace; it must stay as it was
    proc = _build(out, "--force")
    _wait_for_staging(tmp_path, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.strip().startswith("gfnet-edge: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"] and not any(out.iterdir())


@pytest.mark.slow
def test_stale_staging_of_a_killed_build_is_cleaned(tmp_path):
    out = tmp_path / "bundle"
    proc = _build(out)
    staging = _wait_for_staging(tmp_path, proc)
    proc.kill()  # SIGKILL: no cleanup can run
    proc.wait(timeout=60)
    assert staging.exists()
    from gfnet_edge.bundle import writer_tag

    gone = "999999999-" + writer_tag().split("-", 1)[1]  # a process that is gone (this namespace and boot)
    old = tmp_path / f".bundle.old-{gone}"  # a replaced bundle of a process that is gone
    old.mkdir()
    other = tmp_path / f".bundle2.{gone}.abcdefgh.partial"  # another target's: not ours to remove
    other.mkdir()
    live = tmp_path / f".bundle.{writer_tag()}.abcdefgh.partial"  # a build still running (this process)
    live.mkdir()
    proc = _build(out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bundle", other.name, live.name])
    assert json.loads((out / "manifest.json").read_text())["format"] == "gfnet-edge-bundle"
