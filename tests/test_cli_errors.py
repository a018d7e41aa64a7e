"""Bad input through the CLI: a clear one-line error, a non-zero exit, nothing half-written."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gfnet_edge.cli import main

DEMO = Path(__file__).resolve().parents[1] / "gfnet_edge" / "assets" / "demo_gfnet.pth.tar"


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "bundle"
    assert main(["build-engine", str(DEMO), "-o", str(out), "--precision", "fp32", "--backend", "onnxruntime", "-q"]) == 0
    return out


@pytest.fixture()
def image_dir(tmp_path):
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (240, 260, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return d


def test_predict_happy_path(bundle, image_dir, capsys):
    code, out, err = run(["predict", bundle, image_dir, "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 2 and all(0 <= r["class"] < 10 and 0 <= r["exit_step"] <= 2 for r in rows)


def test_predict_scores_class_folders_for_a_bundle_without_class_names_by_sorted_name(bundle, tmp_path, capsys):
    """The demo bundle records no class names: a folder of as many class folders as classes is
    scored with the labels calibrate --data reads from it (sorted folder names, the first class
    0), and the accuracy line says how the images were labelled."""
    from PIL import Image

    from gfnet_edge.bundle import Bundle
    from gfnet_edge.data import load_images

    m = Bundle.load(bundle).model
    assert m.class_names is None and m.num_classes == 10
    names = ["zebra", "Ant", "moth", "bee", "10", "9", "eel", "cat", "yak", "dog"]
    data, rng = tmp_path / "data", np.random.default_rng(2)
    for name in names:
        (data / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(data / name / f"{i}.png")
    code, out, err = run(["predict", bundle, data, "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    label = {"10": 0, "9": 1, "Ant": 2, "bee": 3, "cat": 4, "dog": 5, "eel": 6, "moth": 7, "yak": 8, "zebra": 9}
    truth = [label[Path(r["image"]).parent.name] for r in rows]
    assert load_images(data, m.image_size, m.crop_pct, m.dataset_interpolation)[1].tolist() == truth  # as calibrate
    right = sum(r["class"] == t for r, t in zip(rows, truth))
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"accuracy: {100 * right / 20:.2f} % ({right} of 20 images in the class folders of {data}, "), err
    assert "labelled by sorted folder name, the first folder class 0" in lines[0], err
    assert "no class names" in lines[0], err


def test_predict_warns_of_class_folders_that_differ_from_the_models_classes_only_in_case(bundle, tmp_path, capsys):
    """A folder of the model's class folders, each written in another case ('Zero' for 'zero'),
    is classified without an accuracy line: a warning names the folder and says its images are
    not scored."""
    from PIL import Image

    from gfnet_edge.bundle import Bundle

    named = tmp_path / "bundle"
    shutil.copytree(bundle, named)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    Bundle.load(named).update_manifest(lambda m: m["model"].update(class_names=names))
    data, rng = tmp_path / "data", np.random.default_rng(4)
    for name in names:
        (data / name.capitalize()).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(data / name.capitalize() / "0.png")
    code, out, err = run(["predict", named, data], capsys)
    assert code == 0 and out.count("\n") == 10, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(data) in lines[0] and "not scored" in lines[0] and "Eight" in lines[0], err


def test_predict_classifies_and_scores_each_image_once_however_often_it_is_given(bundle, tmp_path, capsys):
    """A class folder given twice (also spelled otherwise), and one of its files given before it
    by a relative path: each image is printed once, where it first comes, and the folder is
    scored once over its own images, as when each is given once."""
    from PIL import Image

    data, rng = tmp_path / "data", np.random.default_rng(3)
    for k in range(10):
        (data / f"c{k}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(data / f"c{k}" / f"{i}.png")
    code, out, want_err = run(["predict", bundle, data, "--json"], capsys)
    assert code == 0, want_err
    want = json.loads(out)
    first = Path(os.path.relpath(data / "c3" / "1.png"))
    again = tmp_path / "data" / ".." / "data"
    code, out, err = run(["predict", bundle, first, data, again, data, "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert [r["image"] for r in rows] == [str(first)] + [r["image"] for r in want if r["image"] != str(data / "c3/1.png")]
    by_name = {r["image"]: r["class"] for r in want}
    assert rows[0]["class"] == by_name[str(data / "c3/1.png")]
    assert all(r["class"] == by_name[r["image"]] for r in rows[1:])
    assert err == want_err and f"of 20 images in the class folders of {data}, labelled" in err, err


def test_predict_json_prints_nothing_when_it_fails_before_any_result(tmp_path, image_dir, capsys):
    code, out, err = run(["predict", tmp_path / "nobundle", image_dir, "--json"], capsys)
    assert code == 2 and out == "" and "bundle not found" in err


def test_predict_names_every_image_and_batches_without_changing_results(bundle, image_dir, tmp_path, capsys):
    """Folders, archives and files in one call: each image is named by its file (FILE.npz[i] in
    an archive), in order; --batch-size 2 gives the same results as one call per input set;
    --profile prints the per-stage table to stderr; the JSON on stdout stays parseable."""
    from gfnet_edge.bundle import Bundle
    from gfnet_edge.data import load_images
    from gfnet_edge.runtime import Runtime

    npz = tmp_path / "more.npz"
    rng = np.random.default_rng(1)
    np.savez(npz, images=rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8))
    single = tmp_path / "single.png"  # outside image_dir: an image also inside a folder given is classified once
    shutil.copyfile(image_dir / "0.png", single)
    code, out, err = run(["predict", bundle, image_dir, npz, single, "--json", "--batch-size", "2", "--profile"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    names = [r["image"] for r in rows]
    assert names == [str(image_dir / "0.png"), str(image_dir / "1.png"), f"{npz}[0]", f"{npz}[1]", f"{npz}[2]",
                     str(single)]
    assert "per-stage profile over 6 images" in err and "glance" in err and "per_image" in err
    # the same images through the Python API in one call
    m = Bundle.load(bundle).model
    frames = np.concatenate([load_images(p, 224, m.crop_pct, m.dataset_interpolation)[0]
                             for p in (image_dir, npz, single)])
    x = (frames.astype(np.float32) / 255.0 - np.asarray(m.mean, np.float32)) / np.asarray(m.std, np.float32)
    with Runtime(bundle, backend="onnxruntime", precision="fp32") as rt:
        want = rt.predict(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    assert [r["class"] for r in rows] == list(want.classes)
    assert [r["exit_step"] for r in rows] == list(want.exit_step)
    np.testing.assert_allclose([r["confidence"] for r in rows], want.confidence, atol=1e-6)
    code, out, err = run(["predict", bundle, image_dir, "--batch-size", "0"], capsys)
    assert code == 2 and "argument --batch-size: must be in [1," in err and out == ""


def test_predict_on_a_model_that_crops_equals_the_runtime_on_the_original_images(demo_onnx_bundle_copy, image_dir,
                                                                                  capsys):
    """A model with crop_pct 0.875: ``predict`` reads each image resized and centre-cropped to
    S x S and hands it to the runtime as cropped, so its answers are the runtime's on the
    original 240 x 260 images (which it resizes and crops itself), not those of a second crop."""
    from PIL import Image

    from gfnet_edge.runtime import Runtime

    bundle = demo_onnx_bundle_copy
    bundle.update_manifest(lambda m: m["model"].update({"crop_pct": 0.875}))
    code, out, err = run(["predict", bundle.root, image_dir, "--json", "--backend", "onnxruntime"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    originals = [np.asarray(Image.open(image_dir / f"{i}.png").convert("RGB")) for i in range(2)]
    with Runtime(bundle.root, backend="onnxruntime", precision="fp32") as rt:
        assert rt.model.crop_pct == 0.875
        want = rt.predict(originals)
    assert [r["class"] for r in rows] == list(want.classes)
    assert [r["exit_step"] for r in rows] == list(want.exit_step)
    # Pillow's resize (reading files) and the extension's differ by one level on a few pixels
    np.testing.assert_allclose([r["confidence"] for r in rows], want.confidence, atol=1e-4)


@pytest.mark.parametrize("as_json", [False, True])
def test_predict_prints_each_batch_before_reading_the_next(bundle, image_dir, monkeypatch, capsys, as_json):
    """Results go out batch by batch: with --batch-size 1 the first image's row is on stdout
    before the last image file is opened, and the output equals one printed at the end (the
    JSON a list of every row)."""
    from gfnet_edge.data import images

    (image_dir / "2.png").write_bytes((image_dir / "0.png").read_bytes())
    flags = ["--json"] if as_json else []
    code, whole, err = run(["predict", bundle, image_dir, *flags], capsys)
    assert code == 0, err
    events, real_read = [], images._read_image_placed

    def read(file, *a, **k):
        events.append((Path(file).name, sys.stdout.getvalue()))  # capsys's stdout: what was printed so far
        return real_read(file, *a, **k)

    monkeypatch.setattr(images, "_read_image_placed", read)
    code, streamed, err = run(["predict", bundle, image_dir, "--batch-size", "1", *flags], capsys)
    assert code == 0, err
    assert streamed == whole
    if as_json:
        assert [Path(r["image"]).name for r in json.loads(streamed)] == ["0.png", "1.png", "2.png"]
    assert [e[0] for e in events] == ["0.png", "1.png", "2.png"]
    printed_before_the_last_read = events[-1][1]
    assert "0.png" in printed_before_the_last_read and "2.png" not in printed_before_the_last_read


@pytest.mark.parametrize("on_error", ["stop", "skip"])
def test_predict_prints_every_image_read_before_an_unreadable_one(bundle, image_dir, tmp_path, capsys, on_error):
    """An unreadable image in the middle of a batch: with --on-error stop the images read before it
    (in the same batch) are still classified and printed, those after it are not; with skip all
    others are. Exit 2 either way, and the classes are those of a run without the bad file."""
    bad = image_dir / "1b.png"
    bad.write_bytes(b"not an image")
    code, out, err = run(["predict", bundle, image_dir, "--json", "--batch-size", "8", "--on-error", on_error], capsys)
    assert code == 2 and f"{bad}" in err
    assert [Path(r["image"]).name for r in json.loads(out)] == ["0.png", "1.png"]  # the bad file is the last
    (image_dir / "2.png").write_bytes((image_dir / "0.png").read_bytes())
    code, out, err = run(["predict", bundle, image_dir, "--json", "--batch-size", "8", "--on-error", on_error], capsys)
    rows = json.loads(out)
    assert [Path(r["image"]).name for r in rows] == (["0.png", "1.png"] if on_error == "stop"
                                                     else ["0.png", "1.png", "2.png"])
    assert code == 2 and ("stopped at the first" in err) == (on_error == "stop")
    bad.unlink()
    code, out, _ = run(["predict", bundle, image_dir, "--json"], capsys)
    assert code == 0
    clean = {r["image"]: r["class"] for r in json.loads(out)}
    assert all(clean[r["image"]] == r["class"] for r in rows)


def _garbage(p: Path, data: bytes = b"\x00garbage" * 50) -> Path:
    p.write_bytes(data)
    return p


def _truncated_demo(tmp: Path) -> Path:
    data = DEMO.read_bytes()
    return _garbage(tmp / "trunc.pth.tar", data[: len(data) // 3])


CASES = {
    # name: (argv builder, expected exit code, message fragment)
    "info_missing": (lambda t, b: ["info", t / "none.pth.tar"], 2, "not found"),
    "info_garbage": (lambda t, b: ["info", _garbage(t / "g.pth.tar")], 2, "not a readable torch checkpoint"),
    "info_truncated": (lambda t, b: ["info", _truncated_demo(t)], 2, "truncated or corrupt"),
    "info_wrong_name": (lambda t, b: ["info", DEMO, "--model-name", "resnet50"], 2, "not 'resnet50'"),
    "build_wrong_name": (lambda t, b: ["build-engine", DEMO, "-o", t / "out", "--precision", "fp32", "--backend", "onnxruntime", "--model-name", "resnet50"], 2, "not 'resnet50'"),
    "info_wrong_patch": (lambda t, b: ["info", DEMO, "--patch-size", "128"], 2, "checkpoint patch size is 96, not 128"),
    "build_wrong_patch": (lambda t, b: ["build-engine", DEMO, "-o", t / "out", "--precision", "fp32", "--backend", "onnxruntime", "--patch-size", "128"], 2, "checkpoint patch size is 96, not 128"),
    "build_missing_ckpt": (lambda t, b: ["build-engine", t / "none.pth.tar", "-o", t / "out", "--precision", "fp32", "--backend", "onnxruntime"], 2, "not found"),
    "build_corrupt_ckpt": (lambda t, b: ["build-engine", _garbage(t / "g.pth.tar"), "-o", t / "out", "--precision", "fp32", "--backend", "onnxruntime"], 2, "not a readable"),
    "build_no_output": (lambda t, b: ["build-engine", DEMO, "--precision", "fp32", "--backend", "onnxruntime"], 2, "needs -o"),
    "build_exists": (lambda t, b: ["build-engine", DEMO, "-o", b, "--precision", "fp32", "--backend", "onnxruntime"], 2, "already exists"),
    "build_fp16_cpu": (lambda t, b: ["build-engine", DEMO, "-o", t / "out", "--precision", "fp16", "--backend", "onnxruntime"], 2, "fp16 needs the TensorRT backend"),
    "build_trt_absent": (lambda t, b: ["build-engine", DEMO, "-o", t / "out", "--backend", "tensorrt"], 3, "TensorRT is not available"),
    "build_bad_opt_level": (lambda t, b: ["build-engine", DEMO, "-o", t / "out", "--opt-level", "9"], 2, "optimisation level"),
    "build_bad_batch": (lambda t, b: ["build-engine", DEMO, "-o", t / "out", "--max-batch", "0"], 2, "batch"),
    "build_bad_patch_guard": (lambda t, b: ["build-engine", DEMO, "-o", t / "out", "--patch-guard", "1.5"], 2, "--patch-guard"),
    "build_calib_test_split": (lambda t, b: ["build-engine", DEMO, "-o", t / "out", "--calib-data", "demo:test", "--backend", "onnxruntime"], 2, "demo:train, demo:val"),
    "build_bundle_wrong_backend": (lambda t, b: ["build-engine", b, "--backend", "onnxruntime"], 2, "only `--backend tensorrt`"),
    "build_bundle_trt_absent": (lambda t, b: ["build-engine", b, "--backend", "tensorrt"], 3, "TensorRT is not available"),
    "predict_missing_bundle": (lambda t, b: ["predict", t / "nobundle", t], 2, "bundle not found"),
    "predict_file_as_bundle": (lambda t, b: ["predict", DEMO, t], 2, "is a directory"),
    "predict_not_an_image": (lambda t, b: ["predict", b, _garbage(t / "x.png")], 2, "x.png"),
    "predict_missing_image": (lambda t, b: ["predict", b, t / "nothing.png"], 2, "nothing.png"),
    "predict_unknown_budget": (lambda t, b: ["predict", b, t, "--budget", "nope"], 2, "no budget named 'nope'"),
    "predict_missing_graphs": (lambda t, b: ["predict", b, t, "--precision", "int8-tensorrt", "--backend", "onnxruntime"], 2, "no 'int8-tensorrt' graphs"),
    "predict_torch_no_ckpt": (lambda t, b: ["predict", b, t, "--backend", "torch"], 2, "--include-checkpoint"),
    "predict_trt_no_engines": (lambda t, b: ["predict", b, t, "--backend", "tensorrt"], 2, "no TensorRT engines"),
    "build_output_under_a_file": (lambda t, b: ["build-engine", DEMO, "-o", _garbage(t / "x.pth.tar") / "sub" / "out",
                                                "--precision", "fp32", "--backend", "onnxruntime"], 2,
                                  "x.pth.tar is not a folder"),
    "doctor_missing_bundle": (lambda t, b: ["doctor", t / "nobundle"], 2, "bundle not found"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_bad_input(case, bundle, tmp_path, capsys):
    build, code, frag = CASES[case]
    (tmp_path / "one.png").write_bytes(b"")  # predict cases need an image argument (unused)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, err = run(build(tmp_path, bundle), capsys)
    assert rc == code, (rc, err)
    assert err.startswith("gfnet-edge: error:") and frag in err, err
    assert len(err.strip().splitlines()) == 1, err  # one clear line, no traceback
    after = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith((".pth.tar", ".png")))
    assert [p for p in after if p not in before] == []  # nothing half-written
    assert not any(p.name.startswith(".") and "partial" in p.name for p in tmp_path.iterdir())


def test_tampered_bundle(bundle, tmp_path, capsys, image_dir):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    onnx = copy / "graphs" / "focus.fp32.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    rc, _, err = run(["predict", copy, image_dir], capsys)
    assert rc == 2 and "modified or corrupted" in err


def test_truncated_graph_in_bundle(bundle, tmp_path, capsys, image_dir):
    """A truncated graph whose manifest hash was updated to match still fails with a clear error."""
    from gfnet_edge.bundle import Bundle

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    g = copy / "graphs" / "glance.fp32.onnx"
    g.write_bytes(g.read_bytes()[:1000])
    b = Bundle.load(copy, verify=False)
    b.update_manifest(lambda m: b.add_artifact(m, "graphs/glance.fp32.onnx"))
    rc, _, err = run(["predict", copy, image_dir], capsys)
    assert rc == 2 and "ONNX Runtime cannot load this graph" in err


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise ValueError(f"/data/train/cat/{i}.png: cannot read image ([Errno 2] No such file or directory)")


def test_an_error_raised_again_from_a_dataloader_worker_is_reported_by_its_own_line(capsys):
    """torch re-raises a worker's exception with the worker's whole traceback in its message; the
    CLI reports the worker's own last line (the file and the problem), nothing else."""
    from gfnet_edge.cli import _exit_code
    from gfnet_edge.errors import InputError

    with pytest.raises(ValueError) as info:
        next(iter(torch.utils.data.DataLoader(_Unreadable(), num_workers=1)))
    assert "Original Traceback" in str(info.value)  # what torch does with a worker's exception
    assert _exit_code(InputError(str(info.value))) == 2
    assert capsys.readouterr().err == ("gfnet-edge: error: /data/train/cat/0.png: cannot read image "
                                       "([Errno 2] No such file or directory)\n")
    assert _exit_code(info.value) == 1
    err = capsys.readouterr().err
    assert err.startswith("gfnet-edge: error: internal error: ValueError: /data/train/cat/0.png: cannot read")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_under_torchrun_a_rank_above_0_leaves_bad_input_to_rank_0(monkeypatch, capsys):
    """Every rank meets a bad option or bad input alike, and rank 0 reports it: rank 1 waits until
    torchrun stops it (SIGTERM, once rank 0 has ended) and exits with the same code in silence; if
    nothing stops it, the failure is its own and it reports it. Any other failure of rank 1 is
    reported at once. Each line of rank 1 names the rank."""
    import os
    import signal
    import threading
    import time

    from gfnet_edge import cli
    from gfnet_edge.errors import InputError

    def stopped_by_torchrun(call):
        def stop():  # once the process waits (its SIGTERM handler is set)
            deadline = time.monotonic() + 10
            while signal.getsignal(signal.SIGTERM) is not cli._on_sigterm:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)

        stopper = threading.Thread(target=stop, daemon=True)
        stopper.start()
        try:
            return call()
        finally:
            stopper.join(10)

    def train_module(argv):  # `python -m gfnet_edge.train.cli ...`: argparse ends it with SystemExit
        from gfnet_edge.train.cli import main as train_main

        try:
            return train_main(argv)
        except SystemExit as exc:
            return exc.code

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli, "RANK0_GRACE_S", 30.0)
    for rank, prefix in (("1", "rank 1: "), ("0", "")):
        monkeypatch.setenv("RANK", rank)
        for call, line in ((lambda: cli._exit_code(InputError("--epochs takes N or N1,N2,N3")),
                            "gfnet-edge: error: --epochs takes N or N1,N2,N3"),
                           (lambda: main(["train", "--batch-size", "0"]),
                            "gfnet-edge: error: gfnet-edge train: argument --batch-size: must be in [1, "),
                           (lambda: train_module(["--batch-size", "0"]),
                            "gfnet-edge: error: python -m gfnet_edge.train.cli: argument --batch-size: must be in [1, ")):
            if prefix:
                assert stopped_by_torchrun(call) == 2
                assert capsys.readouterr().err == ""
                monkeypatch.setattr(cli, "RANK0_GRACE_S", 0.1)  # nothing stops it: its own failure
                assert call() == 2
                monkeypatch.setattr(cli, "RANK0_GRACE_S", 30.0)
            else:
                assert call() == 2
            err = capsys.readouterr().err
            assert err.startswith(prefix + line) and len(err.splitlines()) == 1, err
        assert cli._exit_code(RuntimeError("Connection closed by peer")) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"{prefix}gfnet-edge: error: internal error: RuntimeError: Connection closed by peer")
        assert len(err.splitlines()) == 1
        assert cli._exit_code(KeyboardInterrupt()) == 130
        assert capsys.readouterr().err == f"{prefix}gfnet-edge: interrupted\n"
    assert signal.getsignal(signal.SIGTERM) == handler


def test_predict_into_a_pipe_closed_early_ends_quietly(bundle, tmp_path):
    """`gfnet-edge predict ... | head -1`: the reader goes away before the results are all
    written; the command ends as a shell command ended by SIGPIPE does (141), without an
    "internal error" or a Python message about the closed stream."""
    import subprocess
    import sys

    frames = tmp_path / "many.npz"
    np.savez(frames, images=np.random.default_rng(0).integers(0, 256, (2000, 8, 8, 3), dtype=np.uint8))
    proc = subprocess.Popen([sys.executable, "-m", "gfnet_edge.cli", "predict", str(bundle), str(frames),
                             "--batch-size", "1000", "--budget", "macs-low"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert first.startswith(f"{frames}[0]: class ".encode()), first
    assert err == "", err


def test_a_broken_pipe_other_than_stdout_is_an_internal_error():
    """A BrokenPipeError from a pipe of its own (a worker process, a subprocess's stdin) while
    stdout, a pipe here, is still read is reported like any other internal error, not ended
    silently."""
    import subprocess
    import sys

    code = ("import sys\nfrom gfnet_edge import cli\n"
            "sys.exit(cli._exit_code(BrokenPipeError(32, 'Broken pipe'), 'predict'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 1 and r.stderr.startswith("gfnet-edge: error: internal error: BrokenPipeError"), r.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("argv", [["info", "--json", DEMO], ["info", DEMO], ["predict", "{bundle}", "{images}"],
                                  ["predict", "{bundle}", "{images}", "--json"], ["--help"], ["--version"],
                                  ["train", "--tiny", "--threads", "1", "--no-progress", "-o", "{tmp}/run"]])
def test_a_full_disk_on_stdout_is_a_file_that_cannot_be_written(argv, bundle, image_dir, tmp_path):
    """`... > /dev/full`: one line naming standard output, exit 2 (a file that cannot be
    written), and no second message when Python flushes stdout at exit."""
    import subprocess
    import sys

    argv = [str(a).format(bundle=bundle, images=image_dir, tmp=tmp_path) for a in argv]
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "gfnet_edge.cli", *argv], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2, r.stderr
    assert r.stderr == "gfnet-edge: error: cannot write to standard output: No space left on device\n", r.stderr


def test_a_failed_write_elsewhere_is_not_blamed_on_stdout(capsys):
    """An OSError of another file, without a file name, stays an internal error."""
    from gfnet_edge import cli

    assert cli._exit_code(OSError(28, "No space left on device"), "predict") == 1
    assert "internal error: OSError" in capsys.readouterr().err


def test_warnings_go_to_stderr_as_it_is_when_they_are_logged(monkeypatch):
    """The CLI's log handler, made while one stream was stderr, writes a later warning to the
    stream stderr is then: a process that runs the CLI again after its earlier stderr was closed
    (pytest's capture between tests, a caller capturing each run) gets the warning, not logging's
    '--- Logging error ---' report of a write to a closed file."""
    import io
    import logging

    from gfnet_edge.log import logger, setup_logging

    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logger.level)
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging(0)
    logger.warning("one")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    setup_logging(0)  # configured once: the handler of the first run stays
    logger.warning("two")
    assert len(logger.handlers) == 1 and isinstance(logger.handlers[0], logging.StreamHandler)
    assert second.getvalue() == "gfnet-edge: WARNING: two\n"


def test_build_engine_summary_says_what_a_bundle_without_budgets_does(tmp_path, capsys, torch_mod):
    """A checkpoint with no exit thresholds builds a bundle without budgets: the summary says so
    and what follows (every step runs until `calibrate` fits budgets), not ``default: None``."""
    ck = torch_mod.load(DEMO, map_location="cpu", weights_only=True)
    ck.pop("dynamic_threshold", None)
    for value in ck.values():
        if isinstance(value, dict):
            value.pop("dynamic_threshold", None)
    bare = tmp_path / "bare.pth.tar"
    torch_mod.save(ck, bare)
    code, out, err = run(["build-engine", bare, "-o", tmp_path / "b", "--precision", "fp32", "--backend",
                          "onnxruntime", "-q"], capsys)
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.strip().startswith("budgets:"))
    assert "None" not in line and "every image runs every step" in line and "gfnet-edge calibrate" in line
    from gfnet_edge.bundle import Bundle

    assert Bundle.load(tmp_path / "b").manifest["budgets"] == {}


def test_a_full_disk_while_building_is_one_line_naming_the_bundle(tmp_path, monkeypatch, capsys):
    """A write of the build that fails without naming its file (``No space left on device`` from
    the graph's write) is reported in one line naming the bundle, exit 2; nothing is left."""
    import os

    real_fdopen = os.fdopen

    class _Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:1000])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _Full(real_fdopen(fd, mode)))  # the graphs' writes
    out = tmp_path / "new" / "bundle"
    code, stdout, err = run(["build-engine", DEMO, "-o", out, "--precision", "fp32", "--backend", "onnxruntime",
                             "-q"], capsys)
    assert code == 2 and stdout == "", err
    assert err == f"gfnet-edge: error: {out}: cannot write the gfnet-edge bundle (No space left on device)\n", err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("err,converted", [
    (OSError(28, "No space left on device"), True),
    (OSError(122, "Disk quota exceeded"), True),
    (OSError(30, "Read-only file system"), True),
    (OSError(27, "File too large"), True),
    (OSError(5, "Input/output error"), False),  # not a refusal to grow: a failing device, reported as it is
    (OSError(28, "No space left on device", "x/graphs/a.onnx"), False),  # names its file: the CLI says so
])
def test_only_writes_the_file_system_refuses_without_naming_a_file_become_one_line_naming_the_output(err, converted):
    from gfnet_edge.errors import InputError, writing

    with pytest.raises(InputError if converted else OSError) as info:
        with writing("out/b", "the thing"):
            raise err
    if converted:
        assert str(info.value) == f"out/b: cannot write the thing ({err.strerror})"
    else:
        assert info.value is err
