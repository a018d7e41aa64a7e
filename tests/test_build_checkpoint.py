"""``build-engine --include-checkpoint``: the checkpoint's bytes are read and hashed once, and the
one hash names both the source checkpoint and the bundle's copy of it."""
from __future__ import annotations

import hashlib

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")


def test_include_checkpoint_hashes_the_checkpoint_once(demo_checkpoint, tmp_path, monkeypatch):
    """While the bundle is built (before the final load verifies it), the checkpoint's bytes go
    through SHA-256 once; the manifest's source hash and the copy's artifact hash are both the
    hash of the checkpoint's bytes computed here, and the copy holds those bytes."""
    from gfnet_edge import build, bundle
    from gfnet_edge.build import BuildConfig, build_bundle

    data = demo_checkpoint.read_bytes()
    want = hashlib.sha256(data).hexdigest()
    out = tmp_path / "bundle"
    hashed = []  # the SHA-256 of each file hashed before the final load, and where it was
    real = bundle.sha256_file

    def spy(path, *args, **kw):
        digest = real(path, *args, **kw)
        if not (out / "manifest.json").exists():  # the staged bundle is not in place yet
            hashed.append(digest)
        return digest

    monkeypatch.setattr(bundle, "sha256_file", spy)
    monkeypatch.setattr(build, "sha256_file", spy)
    b = build_bundle(demo_checkpoint, out, BuildConfig(precision="fp32", backend="onnxruntime",
                                                       include_checkpoint=True), progress=False)
    assert hashed.count(want) == 1, f"the checkpoint was hashed {hashed.count(want)} times"
    assert b.manifest["source_checkpoint"]["sha256"] == want
    assert b.manifest["artifacts"]["checkpoint.pth.tar"] == {"sha256": want, "bytes": len(data)}
    assert (out / "checkpoint.pth.tar").read_bytes() == data
