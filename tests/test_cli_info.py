"""``gfnet-edge info`` end to end through the console entry point's main()."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from gfnet_edge.bundle import Bundle
from gfnet_edge.cli import main
from gfnet_edge.models import GFNet, save_checkpoint
from gfnet_edge.variants import released_spec


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "m.pth.tar"
    save_checkpoint(path, GFNet(released_spec("mobilenetv3_large_100", 96)))
    return path


def test_info_table(ckpt, capsys):
    assert main(["info", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "mobilenetv3_large_100" in out and "S=224 P=96 T=3 classes=1000" in out
    assert "41.8M" in out  # backbone multiply-adds at P=96 (docs/gfnet.md)
    assert "dynamic_threshold" in out  # listed as missing metadata


def test_info_json(ckpt, capsys):
    assert main(["info", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["steps"] == 3 and len(info["macs"]["cumulative"]) == 3
    assert "anytime_classification" in info["missing_metadata"]


def test_info_checks_the_given_sizes_against_the_checkpoint(ckpt, capsys):
    """A checkpoint with a gfnet-edge config fixes its variant and P: options that agree are
    accepted, one that does not is a one-line error (exit 2), as for released-format files."""
    assert main(["info", str(ckpt), "--model-name", "mobilenetv3_large_100", "--patch-size", "96"]) == 0
    assert "P=96" in capsys.readouterr().out
    assert main(["info", str(ckpt), "--patch-size", "128"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint patch size is 96, not 128" in err, err


@pytest.mark.parametrize("key,value", [("anytime_classification", "high"), ("anytime_classification", [None]),
                                       ("flops", 5), ("flops", torch.zeros(2, 2))])
def test_info_names_metadata_that_is_not_a_list_of_numbers(ckpt, tmp_path, capsys, key, value):
    bad = tmp_path / "bad.pth.tar"
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    ck[key] = value
    torch.save(ck, bad)
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gfnet-edge: error: {bad}: checkpoint {key} is not a list of "
                                                    "numbers ("), err


def test_info_bad_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"garbage")
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "gfnet-edge: error:" in err and "bad.pth.tar" in err


def test_info_on_a_checkpoint_lists_its_class_names_as_on_its_bundle(ckpt, tmp_path, capsys):
    """A checkpoint trained on an image folder records its class folders' names: info prints them
    (the names and order its bundle and predict will use); one without names prints none."""
    from tiny_gfnet import random_gfnet

    names = ["blue jay", "grüne Äpfel", "red car\x1b[31m"]
    model = random_gfnet("tiny_names", 64, 32, 2, num_classes=3, channels=(8, 8, 16, 16), policy_hidden=8)
    named = save_checkpoint(tmp_path / "gfnet.pth.tar", model, metadata={"classes": names})
    assert main(["info", str(named)]) == 0
    out = capsys.readouterr().out
    assert "class names       blue jay, grüne Äpfel, red car\\x1b[31m\n" in out
    assert main(["info", str(named), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_names"] == names
    assert main(["info", str(ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_names"] is None
    assert main(["info", str(ckpt)]) == 0
    assert "class names" not in capsys.readouterr().out


def test_info_says_how_a_checkpoint_was_trained_where_it_records_it(ckpt, capsys):
    """The demo checkpoint records the demo trainer's settings: info says it came from the demo
    trainer and gives them in --json; a checkpoint without them (released format) has no row."""
    from conftest import DEMO_CHECKPOINT as demo

    assert main(["info", str(demo)]) == 0
    assert "trained           by the demo trainer (the cluttered-digits task)\n" in capsys.readouterr().out
    assert main(["info", str(demo), "--json"]) == 0
    recorded = torch.load(demo, map_location="cpu", weights_only=True)["train_config"]
    assert json.loads(capsys.readouterr().out)["train_config"] == recorded
    assert main(["info", str(ckpt)]) == 0
    assert "trained" not in capsys.readouterr().out
    assert main(["info", str(ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train_config"] is None


@pytest.fixture
def static_baseline(tmp_path):
    """A static baseline as ``gfnet-edge train --data`` writes it (RUN/static.pth.tar), with
    metadata chosen here: the figures info prints are these."""
    pytest.importorskip("timm")
    import timm

    from gfnet_edge.train.static import save_static

    net = timm.create_model("test_efficientnet", num_classes=3)
    return save_static(tmp_path / "static.pth.tar", net, "test_efficientnet", {}, 3, image_size=32,
                       metadata={"macs": 123_400_000, "classes": ["a b", "é", "z\x1b[31m"], "val_accuracy": 87.5,
                                 "started_from": "timm", "crop_pct": 0.9, "dataset_interpolation": "bicubic"},
                       half=False)


def test_info_describes_a_static_baseline(static_baseline, capsys):
    """RUN/static.pth.tar (the baseline for calibrate --static) is described from its metadata:
    what it is, backbone, classes, pre-processing, MACs, accuracy, start and the command that
    uses it; --json gives the same figures."""
    assert main(["info", str(static_baseline)]) == 0
    rows = dict((line[:16].strip(), line[16:]) for line in capsys.readouterr().out.splitlines())
    assert rows["model"] == "static_test_efficientnet (static baseline: test_efficientnet on whole images)"
    assert rows["sizes"] == "S=32 classes=3"
    assert rows["class names"] == "a b, é, z\\x1b[31m"
    assert rows["pre-processing"] == ("mean 0.485, 0.456, 0.406; std 0.229, 0.224, 0.225; "
                                      "crop 0.9, bicubic resize")
    assert rows["MACs per image"] == "123.4M"
    assert rows["accuracy"] == "87.50% on val"
    assert rows["started from"] == "timm's pretrained weights"
    assert rows["use"].startswith(f"gfnet-edge calibrate BUNDLE --data DATA -o REPORT --static {static_baseline} ")
    assert main(["info", str(static_baseline), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "static_baseline" and info["backbone"] == "test_efficientnet"
    assert (info["classes"], info["class_names"], info["image_size"]) == (3, ["a b", "é", "z\x1b[31m"], 32)
    assert (info["macs"], info["val_accuracy"], info["test_accuracy"]) == (123_400_000, 87.5, None)
    assert (info["crop_pct"], info["dataset_interpolation"], info["started_from"]) == (0.9, "bicubic", "timm")


def test_info_describes_the_shipped_static_baseline_with_its_measured_figures(capsys):
    """demo_static.pth.tar: its test accuracy and MACs are the ones demo_results.json records."""
    from conftest import DEMO_CHECKPOINT

    static = Path(DEMO_CHECKPOINT).with_name("demo_static.pth.tar")
    results = json.loads(static.with_name("demo_results.json").read_text())
    assert main(["info", str(static)]) == 0
    out = capsys.readouterr().out
    assert f"accuracy        {results['static_accuracy']:.2f}% on test\n" in out
    assert f"MACs per image  {results['static_macs'] / 1e6:.1f}M\n" in out
    assert "by the demo trainer" in out and "backbone args   channels=[16, 32, 64, 128], stem_width=16\n" in out
    assert main(["info", str(static), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["macs"], info["test_accuracy"], info["classes"]) == (results["static_macs"], results["static_accuracy"], 10)


def test_info_refuses_gfnet_options_for_a_static_baseline_and_files_that_are_neither(static_baseline, tmp_path,
                                                                                      capsys):
    assert main(["info", str(static_baseline), "--patch-size", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a static baseline: --model-name and --patch-size apply to GFNet" in err, err
    other = tmp_path / "other.pth.tar"
    torch.save({"format": "something_else", "state_dict": {"w": torch.zeros(2)}}, other)
    assert main(["info", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{other}: not a GFNet checkpoint: missing" in err, err


def test_build_engine_on_a_static_baseline_points_to_the_gfnet_checkpoint(static_baseline, tmp_path, capsys):
    """build-engine needs a GFNet: given RUN/static.pth.tar it says what the file is and which
    file of the run to use, in one line, exit 2, and writes nothing."""
    build = ["build-engine", str(static_baseline), "-o", str(tmp_path / "b"), "--precision", "fp32"]
    assert main(build) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a static baseline" in err[0] and "calibrate --static" in err[0], err
    assert str(tmp_path / "gfnet.pth.tar") in err[0]
    assert not (tmp_path / "b").exists()


def test_bundle_table_prints_control_characters_as_escapes(demo_onnx_bundle, tmp_path, capsys):
    """A bundle's names may hold any character: the table shows a newline or a terminal escape
    sequence as a Python escape, one line per row, and never writes the control character."""
    assert main(["info", str(demo_onnx_bundle.root)]) == 0
    plain = capsys.readouterr().out.splitlines()
    root = tmp_path / "b"
    shutil.copytree(demo_onnx_bundle.root, root)
    Bundle.load(root).update_manifest(lambda m: (
        m["budgets"].update({"two\nlines": m["budgets"]["macs-mid"]}),
        m["model"].update(class_names=[f"\x1b[2Jc{i}" for i in range(10)])))
    assert main(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "class names      \\x1b[2Jc0, \\x1b[2Jc1" in out
    assert "two\\nlines: 0.845, 0.986, always" in out
    assert len(out.splitlines()) == len(plain) + 2  # the class names' row and the budget's


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0  # argparse's exit becomes main's return value
    assert "info" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["predict", "calibrate"])
def test_precision_help_names_the_tensorrt_engine_precisions(command, capsys):
    """``--precision`` means a graph set on ONNX Runtime and an engine precision on TensorRT
    (docs/jetson.md runs `predict --backend tensorrt --precision int8`): the help says both."""
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "int8-cpu" in text and "TensorRT: the engine precision (auto: int8 > fp16 > fp32, int8, fp16, fp32)" in text


def test_doctor_help_gives_every_exit_status(capsys):
    assert main(["doctor", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(f"{code}: " in text for code in (0, 1, 2, 3)), text


@pytest.mark.parametrize("argv, line", [
    (["nope"], "gfnet-edge: error: argument COMMAND: invalid choice: 'nope'"),
    (["--bad"], "gfnet-edge: error: unrecognized arguments: --bad (see `gfnet-edge --help`)"),
    (["info"], "gfnet-edge: error: gfnet-edge info: the following arguments are required"),
])
def test_option_errors_name_the_program_once(argv, line, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err


def test_bundle_table_marks_fields_an_entry_does_not_record(demo_onnx_bundle, tmp_path, capsys):
    """An engine entry holding only what the format requires, and a model without a name, print
    as ``?`` / ``(unnamed)`` instead of ``None`` or nothing."""
    root = tmp_path / "b"
    shutil.copytree(demo_onnx_bundle.root, root)
    graphs = demo_onnx_bundle.manifest["graphs"]["fp32"]
    Bundle.load(root).update_manifest(lambda m: (
        m["engines"].append({"precision": "fp16", "glance": graphs["glance"], "focus": graphs["focus"]}),
        m["model"].update(model_name=None)))
    assert main(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "None" not in out, out
    assert "fp16 on GPU, ? (sm ?), TensorRT ?, batches 1..?" in out
    assert next(x for x in out.splitlines() if x.startswith("model ")).split()[1] == "(unnamed)"


def test_bundle_table_names_the_checkpoint_it_was_built_from_by_its_hash(demo_onnx_bundle, demo_checkpoint, capsys):
    """The bundle records its checkpoint's SHA-256, so a bundle can be matched with the run that
    wrote the checkpoint (``sha256sum RUN/gfnet.pth.tar``)."""
    import hashlib

    digest = hashlib.sha256(Path(demo_checkpoint).read_bytes()).hexdigest()
    assert main(["info", str(demo_onnx_bundle.root)]) == 0
    out = capsys.readouterr().out
    assert f"built from       {Path(demo_checkpoint).name} (sha256 {digest})" in out.splitlines(), out
    assert main(["info", str(demo_onnx_bundle.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["source_checkpoint_sha256"] == digest
