"""tools/aarch64_parity.py, the x86 <-> aarch64 parity check (run under emulation by
tools/aarch64_check.sh), exercised on this machine: a record checks clean against itself, and a
changed kernel reference or Runtime result makes the check fail and name it."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("sklearn")

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="module")
def parity():
    sys.path.insert(0, str(TOOLS))
    try:
        yield importlib.import_module("aarch64_parity")
    finally:
        sys.path.remove(str(TOOLS))


@pytest.fixture(scope="module")
def recorded(parity, tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    parity.record(d / "ref.npz", d / "bundle", images=4, threads=2)
    return d / "ref.npz", d / "bundle"


def test_a_record_checks_clean_against_itself(parity, recorded):
    ref, bundle = recorded
    report = parity.check(ref, bundle, threads=2)
    n_cases = len(parity.kernel_cases())
    assert (report.passed, report.failed) == (n_cases + 6, 0), report.lines


def test_a_changed_reference_fails_and_is_named(parity, recorded, tmp_path):
    ref, bundle = recorded
    with np.load(ref, allow_pickle=False) as data:
        arrays = {k: data[k].copy() for k in data.files}
    arrays["kernel/glance_bicubic_224to96/ref/glance"][0, 0, 0, 0] += 2e-5  # just over the 1e-5 tolerance
    arrays["kernel/preprocess_bilinear_257x311/x86/images"][0, 1, 2, 3] += 1e-3  # an exact output
    arrays["runtime/classes"][1] = (arrays["runtime/classes"][1] + 1) % 10
    arrays["runtime/trace_probs"][0, 2, 0] += 2e-5
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    report = parity.check(bad, bundle, threads=2)
    failed = sorted(line.split(":")[0] for line in report.lines if line.startswith("FAIL"))
    assert failed == ["FAIL glance_bicubic_224to96", "FAIL preprocess_bilinear_257x311",
                      "FAIL runtime classes (4 demo test images)", "FAIL runtime trace_probs (4 demo test images)"]
    assert any("glance vs torch: 1 of" in line for line in report.lines)
    assert any("images vs x86: 1 of" in line for line in report.lines)


def test_cli_refuses_a_missing_file_and_an_existing_bundle(parity, recorded, tmp_path, capsys):
    assert parity.main(["check", str(tmp_path / "none.npz"), "--bundle", str(tmp_path)]) == 2
    assert "no reference file" in capsys.readouterr().err
    ref, bundle = recorded
    assert parity.main(["record", str(tmp_path / "r.npz"), "--bundle", str(bundle)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "r.npz").exists()
