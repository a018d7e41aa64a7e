"""Untrusted files: no pickle code runs, no path escapes, no engine host code."""
from __future__ import annotations

import ast
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gfnet_edge.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = [ROOT / "gfnet_edge", ROOT / "quantize", ROOT / "calibrate"]


class _Payload:
    """Unpickling this object creates a marker file: proof that pickle code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"model_name": "resnet50", "model_state_dict": {}, "evil": _Payload(marker)}, path)
    return path


@pytest.mark.parametrize("argv", [
    lambda ck, t: ["info", ck],
    lambda ck, t: ["build-engine", ck, "-o", t / "out", "--precision", "fp32", "--backend", "onnxruntime"],
])
def test_malicious_checkpoint_is_refused_without_running_code(tmp_path, capsys, argv):
    marker = tmp_path / "pwned"
    ck = _evil_checkpoint(tmp_path / "evil.pth.tar", marker)
    rc = main([str(a) for a in argv(ck, tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("gfnet-edge: error:"), err
    assert not marker.exists(), "unpickling ran code from the checkpoint"
    assert not (tmp_path / "out").exists()


def test_malicious_static_baseline_is_refused_without_running_code(tmp_path):
    from gfnet_edge.errors import InputError
    from gfnet_edge.calibrate.static import export_static

    marker = tmp_path / "pwned"
    ck = _evil_checkpoint(tmp_path / "static.pth.tar", marker)
    with pytest.raises(InputError):
        export_static(ck, tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("reader", ["checkpoint", "static", "weights"])
def test_every_torch_reader_refuses_a_malicious_file_in_one_line_without_unsafe_advice(tmp_path, reader):
    """The checkpoint, static-baseline and pretrained-weights readers share one refusal: one
    line naming what was refused, no code run, and none of torch's advice to load the file
    with weights_only=False."""
    from gfnet_edge.errors import InputError
    from gfnet_edge.models.checkpoint import CheckpointError, load_checkpoint
    from gfnet_edge.train.pretrained import read_weights_file
    from gfnet_edge.train.static import load_static

    marker = tmp_path / "pwned"
    ck = _evil_checkpoint(tmp_path / "evil.pth", marker)
    call = {"checkpoint": lambda: load_checkpoint(ck), "static": lambda: load_static(ck),
            "weights": lambda: read_weights_file(str(ck), "resnet18")}[reader]
    with pytest.raises((CheckpointError, InputError)) as info:
        call()
    text = str(info.value)
    assert "refuses to unpickle objects other than tensors" in text and "posix.system" in text
    assert "\n" not in text and "weights_only" not in text and "will likely succeed" not in text
    assert not marker.exists()


def test_a_training_scripts_checkpoint_holding_its_arguments_is_refused_saying_how_to_give_its_weights(tmp_path):
    """A checkpoint as timm's train.py writes it (the state_dict beside an argparse.Namespace) is
    not unpickled for --pretrained; the one-line refusal says to save the state_dict alone."""
    import argparse

    from gfnet_edge.errors import InputError
    from gfnet_edge.models.checkpoint import CheckpointError
    from gfnet_edge.train.pretrained import read_weights_file

    f = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(2, 3, 1, 1)}, "args": argparse.Namespace(lr=0.1),
                "epoch": 3}, f)
    with pytest.raises((CheckpointError, InputError)) as info:
        read_weights_file(str(f), "resnet18")
    text = str(info.value)
    assert "argparse.Namespace" in text and "save the weights alone (the state_dict of tensors)" in text, text
    assert "\n" not in text and "weights_only" not in text


def test_heads_file_with_pickled_object_is_refused(tmp_path):
    from gfnet_edge.errors import InputError
    from gfnet_edge.runtime.heads import load_head_arrays

    marker = tmp_path / "pwned"
    np.savez(tmp_path / "heads.npz", evil=np.array([_Payload(marker)], dtype=object))
    with pytest.raises(InputError, match="cannot read head weights"):
        load_head_arrays(tmp_path / "heads.npz")
    assert not marker.exists()


def _calls(tree: ast.AST, dotted: str):
    mod, _, fn = dotted.rpartition(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == fn:
            base = node.func.value
            if isinstance(base, ast.Name) and base.id == mod:
                yield node


def test_every_torch_load_in_the_package_is_weights_only():
    """A source check: each ``torch.load`` passes ``weights_only=True``; no ``pickle.load`` at all;
    each ``np.load`` leaves ``allow_pickle`` off."""
    offenders = []
    for d in PACKAGE_DIRS:
        for f in d.rglob("*.py"):
            tree = ast.parse(f.read_text(encoding="utf-8"))
            for call in _calls(tree, "torch.load"):
                kw = {k.arg: k.value for k in call.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{f.relative_to(ROOT)}:{call.lineno} torch.load without weights_only=True")
            for name in ("pickle.load", "pickle.loads"):
                for call in _calls(tree, name):
                    offenders.append(f"{f.relative_to(ROOT)}:{call.lineno} {name}")
            for call in _calls(tree, "np.load"):
                kw = {k.arg: k.value for k in call.keywords}
                if "allow_pickle" in kw and not (isinstance(kw["allow_pickle"], ast.Constant)
                                                 and kw["allow_pickle"].value is False):
                    offenders.append(f"{f.relative_to(ROOT)}:{call.lineno} np.load(allow_pickle=...)")
    assert not offenders, "\n".join(offenders)


def test_source_scan_sees_the_calls_it_checks():
    """The scan above is not vacuous: it finds the package's torch.load calls."""
    n = sum(1 for d in PACKAGE_DIRS for f in d.rglob("*.py")
            for _ in _calls(ast.parse(f.read_text(encoding="utf-8")), "torch.load"))
    assert n >= 3


def test_zip_slip_in_checkpoint_archive_is_harmless(tmp_path):
    """A torch zip whose member names try to climb out is not extracted anywhere."""
    path = tmp_path / "slip.pth.tar"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("../../escaped.txt", b"x")
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}))
    rc = main(["info", str(path)])
    assert rc == 2
    assert not (tmp_path.parent / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()


def test_engine_build_writes_nothing_through_an_engines_link_out_of_the_bundle(demo_onnx_bundle, tmp_path,
                                                                              monkeypatch, capsys):
    """A bundle whose ``engines`` folder is a symbolic link to a folder elsewhere: adding engines
    to it is refused in one line before anything is written there (stand-in TensorRT)."""
    import shutil

    from sim_device import SimMemory, sim_ops
    from trt_standin import make_trt

    from gfnet_edge.runtime.backends import tensorrt_util as trt_util

    mem = SimMemory()
    sim_ops(monkeypatch, mem, asynchronous=True)
    trt, _ = make_trt("10.3.0", mem=mem)
    monkeypatch.setattr(trt_util, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_util, "gpu_info", lambda: {"gpu_name": "Orin", "compute_capability": "8.7",
                                                       "multiprocessors": 16, "device_model": "Orin"})
    root, outside = tmp_path / "bundle", tmp_path / "outside"
    shutil.copytree(demo_onnx_bundle.root, root)
    outside.mkdir()
    (root / "engines").symlink_to(outside)
    rc = main(["build-engine", str(root), "--backend", "tensorrt", "--precision", "fp32"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "escapes the bundle directory" in err, err
    assert list(outside.iterdir()) == []
