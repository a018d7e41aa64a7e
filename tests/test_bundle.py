"""Bundle format: atomic writes, hashes, tampering, unsafe paths, versions (numpy only)."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from gfnet_edge.bundle import (FORMAT_VERSION, Bundle, BundleError, new_manifest, record_artifacts, safe_join,
                               staging_dir, write_json_atomic)
from gfnet_edge.errors import InputError


#: A complete ``model`` entry (what manifest_model writes for a small model).
MODEL = {"model_name": "x", "image_size": 32, "patch_size": 16, "steps": 3, "num_classes": 10, "crop_pct": 1.0,
         "dataset_interpolation": "bilinear", "glance_interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
         "std": [0.229, 0.224, 0.225], "classifier": "cascaded", "step0": "backbone"}


def _make(root, model=None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "graphs").mkdir(exist_ok=True)
    (root / "graphs" / "glance.fp32.onnx").write_bytes(b"g" * 100)
    (root / "graphs" / "focus.fp32.onnx").write_bytes(b"f" * 100)
    (root / "heads.npz").write_bytes(b"h" * 10)
    m = new_manifest(model or dict(MODEL), {"macs": {}})
    m["graphs"]["fp32"] = {"glance": "graphs/glance.fp32.onnx", "focus": "graphs/focus.fp32.onnx"}
    m["budgets"] = {"mid": {"thresholds": [0.9, 0.8, -1e8]}}
    m["default_budget"] = "mid"
    record_artifacts(root, m)
    write_json_atomic(root / "manifest.json", m)
    return m


def test_round_trip_and_accessors(tmp_path):
    _make(tmp_path / "b")
    b = Bundle.load(tmp_path / "b")
    assert set(b.graph_paths("fp32")) == {"glance", "focus"}
    assert b.thresholds(None) == [pytest.approx(0.9), pytest.approx(0.8), -1e8]
    with pytest.raises(BundleError, match="no budget named 'fast'"):
        b.thresholds("fast")
    with pytest.raises(BundleError, match="no 'int8-cpu' graphs"):
        b.graph_paths("int8-cpu")


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda r: (r / "graphs" / "focus.fp32.onnx").write_bytes(b"evil"), "modified or corrupted"),
        (lambda r: (r / "heads.npz").unlink(), "missing"),
        (lambda r: (r / "manifest.json").write_text("{not json"), "corrupt manifest"),
        (lambda r: (r / "manifest.json").unlink(), "no manifest.json"),
        (lambda r: _edit(r, format_version=FORMAT_VERSION + 1), "format version"),
        (lambda r: _edit(r, format="something-else"), "not a gfnet-edge manifest"),
        (lambda r: _edit_art(r, "../../etc/passwd"), "escapes the bundle"),
        (lambda r: _edit_art(r, "/etc/passwd"), "unsafe artifact path"),
        (lambda r: ((r / "heads.npz").unlink(), (r / "heads.npz").symlink_to("heads.npz")), "symbolic link loop"),
        (lambda r: os.truncate(r / "manifest.json", 65 << 20), "a manifest is at most 64 MiB"),  # not read whole
    ],
)
def test_bad_bundles(tmp_path, mutate, match):
    root = tmp_path / "b"
    _make(root)
    mutate(root)
    with pytest.raises(BundleError, match=match):
        Bundle.load(root)


def _edit(root, **kw):
    m = json.loads((root / "manifest.json").read_text())
    m.update(kw)
    (root / "manifest.json").write_text(json.dumps(m))


def _edit_art(root, rel):
    m = json.loads((root / "manifest.json").read_text())
    m["artifacts"][rel] = {"sha256": "0" * 64, "bytes": 1}
    (root / "manifest.json").write_text(json.dumps(m))


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        Bundle.load(tmp_path / "nope")
    f = tmp_path / "file.pth.tar"
    f.write_bytes(b"x")
    with pytest.raises(BundleError, match="is a directory"):
        Bundle.load(f)


def test_safe_join(tmp_path):
    assert safe_join(tmp_path, "a/b.onnx") == (tmp_path / "a" / "b.onnx").resolve()
    for bad in ("", "/abs", "../x", "a/../../x", "C:/x", "a\x00b"):
        with pytest.raises(BundleError):
            safe_join(tmp_path, bad)


def test_staging_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError):
        with staging_dir(out) as tmp:
            (tmp / "partial.onnx").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_staging_failure_removes_the_parent_folders_it_made(tmp_path):
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "new" / "deeper" / "bundle"
    with pytest.raises(KeyboardInterrupt):
        with staging_dir(out) as tmp:
            (tmp / "partial.onnx").write_bytes(b"x")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]
    with staging_dir(out) as tmp:
        (tmp / "done.onnx").write_bytes(b"x")
    assert (out / "done.onnx").read_bytes() == b"x"


def test_staging_refuses_existing_without_force(tmp_path):
    out = tmp_path / "bundle"
    _make(out)
    with pytest.raises(BundleError, match="already exists"):
        with staging_dir(out):
            pass
    with staging_dir(out, force=True) as tmp:
        _make(tmp, {**MODEL, "model_name": "new"})
    assert Bundle.load(out).model.model_name == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def _listing(root):
    return {q.relative_to(root).as_posix(): q.read_bytes() if q.is_file() else None for q in sorted(root.rglob("*"))}


@pytest.mark.parametrize("entry", ["my_notes.txt", "report", "old_bundle", ".hidden"])
def test_force_replaces_a_bundle_only_when_it_holds_nothing_else(tmp_path, entry):
    """--force replaces a bundle holding the entries a bundle has (and an atomic write's
    leftover temporary file); a file or folder of the user's in it stops the build in one line
    naming it, and nothing is changed."""
    out = tmp_path / "bundle"
    _make(out)
    (out / "engines" / "gpu-sm87-trt10").mkdir(parents=True)
    (out / "engines" / "gpu-sm87-trt10" / "glance.int8.engine").write_bytes(b"e")
    (out / "manifest.json.abc123.tmp").write_text("{")  # an update killed before its rename
    if entry == "report":
        (out / entry).mkdir()
        (out / entry / "report.json").write_text(json.dumps({"format": "gfnet-edge-calibration"}))
    elif entry == "old_bundle":
        _make(out / entry)
    else:
        (out / entry).write_text("mine")
    before = _listing(tmp_path)
    with pytest.raises(BundleError) as e:
        with staging_dir(out, force=True) as tmp:
            _make(tmp, {**MODEL, "model_name": "new"})
    msg = str(e.value)
    assert f"holds {entry}, not part of a gfnet-edge bundle" in msg and "--force" in msg and "\n" not in msg
    assert _listing(tmp_path) == before

    if (out / entry).is_dir():
        shutil.rmtree(out / entry)
    else:
        (out / entry).unlink()
    with staging_dir(out, force=True) as tmp:
        _make(tmp, {**MODEL, "model_name": "new"})
    assert Bundle.load(out).model.model_name == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_force_names_the_first_few_foreign_entries(tmp_path):
    from gfnet_edge.bundle import check_replace

    out = tmp_path / "bundle"
    _make(out)
    for name in ("a.txt", "b.txt", "c.txt", "d.txt", "e\nf.txt"):
        (out / name).write_text("mine")
    with pytest.raises(BundleError, match=r"holds a\.txt, b\.txt, c\.txt and 2 more, not part of") as e:
        check_replace(out, True)
    assert "\n" not in str(e.value)


def test_update_manifest_atomic(tmp_path, monkeypatch):
    import os

    _make(tmp_path / "b")
    b = Bundle.load(tmp_path / "b")
    b.update_manifest(lambda m: m["budgets"].update({"fast": {"thresholds": [0.5, 0.5, -1e8]}}))
    assert "fast" in Bundle.load(tmp_path / "b").budgets()

    # an update that fails where the new manifest is published leaves the old one in place,
    # byte for byte, and no temporary file behind
    def listing():
        return sorted(p.relative_to(b.root).as_posix() for p in b.root.rglob("*"))

    before, files = (b.root / "manifest.json").read_bytes(), listing()
    published = []

    def failing_replace(src, dst):
        published.append(os.path.basename(dst))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(InputError, match=rf"^{re.escape(str(b.root))}: cannot write the bundle's manifest \(No space left"):
        b.update_manifest(lambda m: m["budgets"].update({"slow": {"thresholds": [0.99, 0.99, -1e8]}}))
    monkeypatch.undo()
    assert published == ["manifest.json"]
    assert (b.root / "manifest.json").read_bytes() == before
    assert listing() == files
    assert "slow" not in b.budgets() and "slow" not in Bundle.load(b.root).budgets()


def test_bundle_files_get_plain_modes(tmp_path):
    """Atomic writes start from private temporaries; the published bundle is readable as usual."""
    import os
    import stat

    with staging_dir(tmp_path / "b") as d:
        (d / "x.txt").write_text("x")
        (d / "sub").mkdir()
        write_json_atomic(d / "manifest.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    root = tmp_path / "b"
    assert stat.S_IMODE(root.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((root / "manifest.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((root / "x.txt").stat().st_mode) == 0o666 & ~mask
