"""A corpus of bad inputs through the real CLI, each case in its own process (tests/cli_fork_runner.py).

Every case asserts: the exit code, a one-line ``gfnet-edge: error: ...`` naming the problem, no
traceback, nothing created, changed or deleted where the case's files are (no partial or stale
files), and bounded memory (the process runs under an address-space ceiling) and time.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402
from json_edit import DELETE, set_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "gfnet_edge" / "assets" / "demo_gfnet.pth.tar"
MEM_MB = 1536  # address space a case may add to the imported libraries' (RLIMIT_AS in each case's process)

# ------------------------------------------------------------------ file makers ----


def _png(path: Path, w: int, h: int) -> Path:
    """A 1-bit all-black PNG: a few hundred bytes to a few kB whatever its pixel count."""
    raw = (b"\x00" + b"\x00" * ((w + 7) // 8)) * h

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return path


def _rehash(bundle: Path) -> None:
    """Records the current SHA-256 of every artifact (a consistent bundle with bad content)."""
    from gfnet_edge.bundle import sha256_file

    m = json.loads((bundle / "manifest.json").read_text())
    for rel, entry in m["artifacts"].items():
        if (bundle / rel).is_file():
            entry.update(sha256=sha256_file(bundle / rel), bytes=(bundle / rel).stat().st_size)
    (bundle / "manifest.json").write_text(json.dumps(m, indent=1))


def _edit_manifest(fn: Callable[[dict], None], raw: Callable[[str], str] = lambda s: s):
    def make(bundle: Path) -> None:
        m = json.loads((bundle / "manifest.json").read_text())
        fn(m)
        (bundle / "manifest.json").write_text(raw(json.dumps(m, indent=1)))
    return make


def _raw_manifest(old: str, new: str):
    """Replaces text in the manifest (JSON that Python's parser refuses in ways of its own)."""
    return _edit_manifest(lambda m: None, raw=lambda s: s.replace(old, new))


def _set(path: str, value) -> Callable[[dict], None]:
    def fn(m: dict) -> None:
        set_path(m, path.split("."), value)
    return fn


_DELETE = DELETE


def _heads(fn: Callable[[Dict[str, np.ndarray]], None]):
    def make(bundle: Path) -> None:
        with np.load(bundle / "heads.npz") as z:
            arrays = {k: z[k] for k in z.files}
        fn(arrays)
        np.savez(bundle / "heads.npz", **arrays)
        _rehash(bundle)
    return make


def _swap_graphs(m: dict) -> None:
    g = m["graphs"]["fp32"]
    g["glance"], g["focus"] = g["focus"], g["glance"]


def _checkpoint(tmp: Path, name: str, fn: Callable[[dict], None]) -> Path:
    ck = torch.load(DEMO, map_location="cpu", weights_only=True)
    fn(ck)
    torch.save(ck, tmp / name)
    return tmp / name


def _first_float(sd: dict) -> str:
    return next(k for k, v in sd.items() if torch.is_floating_point(v))


def _poison(section: str, value: float):
    def fn(ck: dict) -> None:
        k = _first_float(ck[section])
        ck[section][k] = ck[section][k].clone().fill_(value)
    return fn


def _config(**fields):
    """Sets fields of the checkpoint's gfnet_edge_config (the model it describes)."""
    return lambda ck: ck["gfnet_edge_config"].update(fields)


def _released(**fields):
    """A released-format checkpoint (no gfnet_edge_config) with these metadata fields."""
    return lambda ck: (ck.pop("gfnet_edge_config"), ck.update(fields))


# --------------------------------------------------------------------- the corpus ----
# Each case: (argv builder, expected exit code, fragment of the message). The builder gets the
# case's own folder `d` (which it may fill with inputs) and the shared bundle copy `b` in it.
Case = Tuple[Callable[[Path, Path], List], int, str]
PREDICT = ["predict"]
BUILD = ["build-engine", "--precision", "fp32", "--backend", "onnxruntime", "-q"]


def _img(d: Path) -> Path:
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(d / "ok.png")
    return d / "ok.png"


def _bundle_case(mutate, frag: str, code: int = 2) -> Case:
    def argv(d: Path, b: Path) -> List:
        mutate(b)
        return PREDICT + [b, _img(d)]
    return argv, code, frag


def _info_case(mutate, frag: str) -> Case:
    """A bundle given to ``info``, which reads more of the manifest than ``predict``."""
    return (lambda d, b: (mutate(b), ["info", b])[1]), 2, frag


def _image_case(make, frag: str) -> Case:
    return (lambda d, b: PREDICT + [b, make(d)]), 2, frag


def _write(name: str, data: bytes):
    def make(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name
    return make


def _pil(name: str, array: np.ndarray, mode: str = None):
    def make(d: Path) -> Path:
        Image.fromarray(array, mode=mode).save(d / name)
        return d / name
    return make


def _npz(name: str, **arrays):
    def make(d: Path) -> Path:
        np.savez(d / name, **arrays)
        return d / name
    return make


def _npz_header_only(name: str, shape) -> Callable[[Path], Path]:
    """An .npz whose 'images' header claims ``shape`` (uint8) with no data behind it: what a
    small archive expanding to gigabytes looks like before it is decompressed."""
    def make(d: Path) -> Path:
        import io
        import zipfile

        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": shape})
        with zipfile.ZipFile(d / name, "w") as zf:
            zf.writestr("images.npy", head.getvalue())
        return d / name
    return make


def _folder(d: Path) -> Path:
    (d / "empty").mkdir()
    return d / "empty"


def _ckpt_case(fn, frag: str, cmd: str = "build") -> Case:
    def argv(d: Path, b: Path) -> List:
        ck = _checkpoint(d, "bad.pth.tar", fn)
        return (BUILD + [ck, "-o", d / "out"]) if cmd == "build" else ["info", ck]
    return argv, 2, frag


def _opt(cmd: List, frag: str, code: int = 2) -> Case:
    return (lambda d, b: [a if a not in ("B", "IMG") else (b if a == "B" else _img(d)) for a in cmd]), code, frag


def _add_entry(b: Path, name: str, kind: str) -> Path:
    """``b`` with one more entry ``name``: a user's file, a calibration report or a copy of ``b``."""
    if kind == "file":
        (b / name).write_text("mine")
    elif kind == "report":
        (b / name).mkdir()
        (b / name / "report.json").write_text(json.dumps({"format": "gfnet-edge-calibration", "version": 1}))
    else:
        shutil.copytree(b, b.parent / "copy")
        (b.parent / "copy").rename(b / name)
    return b


def _user_dir(d: Path, manifest: str = None) -> Path:
    (d / "mine").mkdir()
    (d / "mine" / "thesis.txt").write_text("irreplaceable")
    if manifest is not None:
        (d / "mine" / "manifest.json").write_text(manifest)
    return d / "mine"


CASES: Dict[str, Case] = {
    # checkpoints
    "ck_missing": ((lambda d, b: BUILD + [d / "none.pth.tar", "-o", d / "out"]), 2, "not found"),
    "ck_empty": ((lambda d, b: BUILD + [_write("e.pth.tar", b"")(d), "-o", d / "out"]), 2, "empty"),
    "ck_garbage": ((lambda d, b: BUILD + [_write("g.pth.tar", b"garbage" * 50)(d), "-o", d / "out"]), 2,
                   "not a readable torch checkpoint"),
    "ck_truncated": ((lambda d, b: BUILD + [_write("t.pth.tar", DEMO.read_bytes()[:5000])(d), "-o", d / "out"]), 2,
                     "truncated or corrupt"),
    "ck_directory": ((lambda d, b: BUILD + [b / "graphs", "-o", d / "out"]), 2, "is a folder but not a bundle"),
    "ck_nan_backbone": _ckpt_case(_poison("model_state_dict", float("nan")), "NaN or infinite"),
    "ck_inf_policy": _ckpt_case(_poison("policy", float("inf")), "policy: tensor"),
    "ck_nan_fc": _ckpt_case(_poison("fc", float("nan")), "fc"),
    "ck_nan_prime_info": _ckpt_case(_poison("model_prime_state_dict", float("nan")), "NaN or infinite", "info"),
    "ck_nan_thresholds": _ckpt_case(lambda ck: ck.__setitem__("dynamic_threshold",
                                                              torch.full((39, 3), float("nan"))), "dynamic_threshold"),
    "ck_not_dict": _ckpt_case(lambda ck: ck.__setitem__("fc", [1, 2, 3]), "not a state dict"),
    "ck_config_text": _ckpt_case(_config(image_size="224"), "'image_size'", "info"),
    "ck_config_negative": _ckpt_case(_config(policy_hidden=-5), "'policy_hidden'", "info"),
    "ck_config_nan": _ckpt_case(_config(crop_pct=float("nan")), "'crop_pct'"),
    "ck_config_kwargs": _ckpt_case(_config(backbone_kwargs="wide"), "backbone_kwargs", "info"),
    "ck_config_classes_huge": _ckpt_case(_config(num_classes=1_000_000), "does not fit", "info"),
    "ck_config_channels_huge": _ckpt_case(_config(backbone_kwargs={"channels": [10 ** 5, 32, 64, 128], "stem_width": 16}),
                                          "does not fit", "info"),
    "ck_name_list": _ckpt_case(_released(model_name=["resnet50"]), "model_name", "info"),
    "ck_patch_text": _ckpt_case(_released(model_name="resnet50", patch_size="96"), "patch_size", "info"),
    "ck_wrong_name": ((lambda d, b: BUILD + [DEMO, "-o", d / "out", "--model-name", "resnet50"]), 2, "not 'resnet50'"),
    "ck_no_output": ((lambda d, b: BUILD + [DEMO]), 2, "needs -o"),
    # bundles and manifests
    "b_missing": ((lambda d, b: PREDICT + [d / "nobundle", _img(d)]), 2, "bundle not found"),
    "b_file": ((lambda d, b: PREDICT + [DEMO, _img(d)]), 2, "is a directory"),
    "b_no_manifest": _bundle_case(lambda b: (b / "manifest.json").unlink(), "no manifest.json"),
    "b_bad_json": _bundle_case(lambda b: (b / "manifest.json").write_text("{nope"), "corrupt manifest"),
    "b_list": _bundle_case(lambda b: (b / "manifest.json").write_text("[]"), "not a gfnet-edge manifest"),
    "b_binary": _bundle_case(lambda b: (b / "manifest.json").write_bytes(b"\xff\xfe\x00"), "corrupt manifest"),
    "b_version": _bundle_case(_edit_manifest(_set("format_version", 99)), "format version"),
    "b_no_model": _bundle_case(_edit_manifest(_set("model", _DELETE)), "'model' is missing"),
    "b_model_list": _bundle_case(_edit_manifest(_set("model", [])), "'model' must be an object"),
    "b_image_size_str": _bundle_case(_edit_manifest(_set("model.image_size", "224")), "'model.image_size'"),
    "b_image_size_0": _bundle_case(_edit_manifest(_set("model.image_size", 0)), "'model.image_size'"),
    "b_class_names_short": _bundle_case(_edit_manifest(_set("model.class_names", ["cat", "dog"])),
                                        "has 2 names for 10 classes"),
    "b_class_names_twice": _bundle_case(_edit_manifest(_set("model.class_names", ["x"] * 10)), "names a class twice"),
    "b_class_names_empty": _bundle_case(_edit_manifest(_set("model.class_names", [""] * 10)), "'model.class_names"),
    "b_image_size_huge": _bundle_case(_edit_manifest(_set("model.image_size", 10 ** 12)), "'model.image_size'"),
    "b_patch_neg": _bundle_case(_edit_manifest(_set("model.patch_size", -96)), "'model.patch_size'"),
    "b_patch_gt_image": _bundle_case(_edit_manifest(_set("model.patch_size", 300)), "must not exceed"),
    "b_patch_float": _bundle_case(_edit_manifest(_set("model.patch_size", 96.5)), "'model.patch_size'"),
    "b_steps_0": _bundle_case(_edit_manifest(_set("model.steps", 0)), "'model.steps'"),
    "b_steps_missing": _bundle_case(_edit_manifest(_set("model.steps", _DELETE)), "'model.steps' is missing"),
    "b_classes_bool": _bundle_case(_edit_manifest(_set("model.num_classes", True)), "'model.num_classes'"),
    "b_crop_0": _bundle_case(_edit_manifest(_set("model.crop_pct", 0)), "'model.crop_pct'"),
    "b_crop_nan": _bundle_case(_edit_manifest(_set("model.crop_pct", float("nan"))), "'model.crop_pct'"),
    "b_interp": _bundle_case(_edit_manifest(_set("model.glance_interpolation", "area")), "glance_interpolation"),
    "b_dinterp": _bundle_case(_edit_manifest(_set("model.dataset_interpolation", None)), "dataset_interpolation"),
    "b_mean_2": _bundle_case(_edit_manifest(_set("model.mean", [0.5, 0.5])), "'model.mean'"),
    "b_std_0": _bundle_case(_edit_manifest(_set("model.std", [0.2, 0.0, 0.2])), "'model.std'"),
    "b_std_str": _bundle_case(_edit_manifest(_set("model.std", ["a", "b", "c"])), "'model.std[0]'"),
    "b_classifier": _bundle_case(_edit_manifest(_set("model.classifier", "lstm")), "'model.classifier'"),
    "b_step0": _bundle_case(_edit_manifest(_set("model.step0", 1)), "'model.step0'"),
    "b_artifacts_list": _bundle_case(_edit_manifest(_set("artifacts", [])), "'artifacts'"),
    "b_sha_bad": _bundle_case(_edit_manifest(lambda m: m["artifacts"]["heads.npz"].update(sha256="xyz")),
                              "heads.npz.sha256"),
    "b_heads_unlisted": _bundle_case(_edit_manifest(_set("heads", "other.npz")), "'heads'"),
    "b_graph_no_focus": _bundle_case(_edit_manifest(lambda m: m["graphs"]["fp32"].pop("focus")),
                                     "'graphs.fp32.focus' is missing"),
    "b_graph_same": _bundle_case(_edit_manifest(lambda m: m["graphs"]["fp32"].update(
        focus=m["graphs"]["fp32"]["glance"])), "one file for both"),
    "b_graphs_str": _bundle_case(_edit_manifest(_set("graphs", "fp32")), "'graphs'"),
    "b_thr_len": _bundle_case(_edit_manifest(lambda m: m["budgets"]["macs-mid"].update(thresholds=[0.5])),
                              "thresholds' must have 3"),
    "b_thr_nan": _bundle_case(_edit_manifest(lambda m: m["budgets"]["macs-mid"].update(thresholds=[0.123456, 0.5, 0.1]),
                                             raw=lambda s: s.replace("0.123456", "NaN")), "must be finite"),
    "b_thr_inf": _bundle_case(_edit_manifest(lambda m: m["budgets"]["macs-low"].update(thresholds=[0.123456, 0.5, 0.1]),
                                             raw=lambda s: s.replace("0.123456", "-Infinity")), "must be finite"),
    "b_thr_str": _bundle_case(_edit_manifest(lambda m: m["budgets"]["macs-mid"].update(thresholds=["a", 1, 1])),
                              "thresholds[0]"),
    "b_budget_list": _bundle_case(_edit_manifest(_set("budgets", [1])), "'budgets'"),
    "b_default_unknown": _bundle_case(_edit_manifest(_set("default_budget", "nope")), "'default_budget'"),
    "b_engines_dict": _bundle_case(_edit_manifest(_set("engines", {})), "'engines'"),
    "b_engine_path": _bundle_case(_edit_manifest(_set("engines", [{"precision": "fp16", "glance": "x", "focus": "y"}])),
                                  "'engines[0].glance'"),
    "b_checkpoint_unlisted": _bundle_case(_edit_manifest(_set("checkpoint", "checkpoint.pth.tar")), "'checkpoint'"),
    "b_int_digits": _bundle_case(_raw_manifest('"steps": 3', '"steps": 3' + "0" * 5000), "corrupt manifest"),
    "b_nested_deep": _bundle_case(_raw_manifest('"costs": {', '"x": ' + "[" * 100_000 + "]" * 100_000 + ', "costs": {'),
                                  "corrupt manifest"),
    "b_costs_list": _info_case(_edit_manifest(_set("costs", [1])), "'costs'"),
    "b_macs_text": _info_case(_edit_manifest(_set("costs.macs.cumulative", ["many"])), "'costs.macs.cumulative[0]'"),
    "b_quant_list": _info_case(_edit_manifest(_set("quantization", [1])), "'quantization'"),
    "b_quant_share": _info_case(_edit_manifest(_set("quantization", {"cpu": {"int8_mac_share": "all"}})),
                                "'quantization.cpu.int8_mac_share'"),
    "b_quant_images": _info_case(_edit_manifest(_set("quantization", {"cpu": {"method": "max",
                                                                             "calibration": {"images": "all"}}})),
                                 "'quantization.cpu.calibration.images'"),
    "b_source_text": _info_case(_edit_manifest(_set("source_checkpoint", "demo_gfnet.pth.tar")), "'source_checkpoint'"),
    "b_engine_batch": _bundle_case(_edit_manifest(lambda m: m.update(engines=[dict(
        precision="fp32", static_batch="one", **m["graphs"]["fp32"])])), "'engines[0].static_batch'"),
    "b_engine_dla": _bundle_case(_edit_manifest(lambda m: m.update(engines=[dict(
        precision="fp32", build_options={"dla_core": "0"}, **m["graphs"]["fp32"])])), "'engines[0].build_options.dla_core'"),
    "b_engine_placement": _info_case(_edit_manifest(lambda m: m.update(engines=[dict(
        precision="fp32", build_options={"dla_core": 0}, dla_placement=[1], **m["graphs"]["fp32"])])),
        "'engines[0].dla_placement'"),
    "b_escape": _bundle_case(_edit_manifest(lambda m: m["artifacts"].update({"../x": {"sha256": "0" * 64}})),
                             "escapes the bundle"),
    "b_nul_path": _bundle_case(_edit_manifest(lambda m: m["artifacts"].update({"graphs/a\x00b": {"sha256": "0" * 64}})),
                               "unsafe artifact path"),
    "b_tampered": _bundle_case(lambda b: (b / "heads.npz").write_bytes(b"x"), "modified or corrupted"),
    "b_missing_graph": _bundle_case(lambda b: (b / "graphs" / "focus.fp32.onnx").unlink(), "is missing"),
    "b_garbage_graph": _bundle_case(lambda b: ((b / "graphs" / "focus.fp32.onnx").unlink(),
                                               (b / "graphs" / "focus.fp32.onnx").write_bytes(b"junk"), _rehash(b)),
                                    "ONNX Runtime cannot load"),
    "b_swapped_graphs": _bundle_case(_edit_manifest(_swap_graphs), "graph"),
    "b_torch_no_ckpt": _opt(["predict", "B", "IMG", "--backend", "torch"], "--include-checkpoint"),
    "b_unknown_budget": _opt(["predict", "B", "IMG", "--budget", "nope"], "no budget named 'nope'"),
    "b_missing_precision": _opt(["predict", "B", "IMG", "--precision", "int8-cpu", "--backend", "onnxruntime"],
                                "no 'int8-cpu' graphs"),
    # head weights
    "h_nan": _bundle_case(_heads(lambda a: a.__setitem__("pol.w_hh", a["pol.w_hh"] * np.nan)), "NaN or Inf"),
    "h_inf": _bundle_case(_heads(lambda a: a.__setitem__("cls.fc_2.b", a["cls.fc_2.b"] + np.inf)), "NaN or Inf"),
    "h_shape": _bundle_case(_heads(lambda a: a.__setitem__("pol.w_ih", a["pol.w_ih"][:, :7])), "head weights"),
    "h_transposed": _bundle_case(_heads(lambda a: a.__setitem__("pol.actor.w", a["pol.actor.w"].T.copy())),
                                 "head weights"),
    "h_missing_key": _bundle_case(_heads(lambda a: a.pop("pol.actor.b")), "pol.actor.b"),
    "h_object": _bundle_case(lambda b: (np.savez(b / "heads.npz", x=np.array([{"a": 1}], dtype=object)), _rehash(b)),
                             "head weights"),
    # images
    "i_garbage": _image_case(_write("x.png", b"not an image"), "cannot read image"),
    "i_empty": _image_case(_write("e.jpg", b""), "cannot read image"),
    "i_truncated": _image_case(lambda d: _write("t.png", (_png(d / "full.png", 300, 300).read_bytes())[:60])(d),
                               "cannot read image"),
    "i_bomb_long": _image_case(lambda d: _png(d / "long.png", 50_000_000, 1), "M pixels"),
    "i_bomb_square": _image_case(lambda d: _png(d / "big.png", 20_000, 20_000), "pixels"),
    "i_int32": _image_case(_pil("i.tif", np.full((8, 8), 7, np.int32), "I"), "no defined white level"),
    "i_float_range": _image_case(_pil("f.tif", np.full((8, 8), 3.0, np.float32), "F"), "outside [0, 1]"),
    "i_float_nan": _image_case(_pil("n.tif", np.full((8, 8), np.nan, np.float32), "F"), "NaN or infinite"),
    "i_empty_folder": _image_case(_folder, "no images found"),
    "i_npz_nan": _image_case(_npz("n.npz", images=np.full((1, 3, 8, 8), np.nan, np.float32)), "NaN or infinite"),
    "i_npz_shape": _image_case(_npz("s.npz", images=np.zeros((2, 5), np.uint8)), "must be (N, H, W, 3)"),
    "i_npz_pickle": _image_case(_npz("p.npz", images=np.array([{"a": 1}], dtype=object)), "cannot read .npz"),
    "i_npz_empty": _image_case(_npz("z.npz", images=np.zeros((0, 8, 8, 3), np.uint8)), "is empty"),
    "i_npz_flag_text": _image_case(_npz("f.npz", images=np.zeros((1, 3, 8, 8), np.float32), normalized=np.array("no")),
                                   "'normalized' must be a single boolean"),
    "i_npz_flag_two": _image_case(_npz("g.npz", images=np.zeros((1, 3, 8, 8), np.float32), normalized=np.array(2)),
                                  "'normalized' must be a single boolean"),
    "i_npz_bomb": _image_case(_npz_header_only("b.npz", (2, 8000, 8000, 3)), "more than 40 M pixels"),
    "i_npz_many": _image_case(_npz_header_only("m.npz", (200_000, 224, 224, 3)), "GiB once decompressed"),
    "i_npz_labels_huge": _image_case(_npz("l.npz", images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.zeros(10 ** 5, int)),
                                     "more values than 2"),
    "i_npz_nokey": _image_case(_npz("k.npz", pictures=np.zeros((1, 8, 8, 3), np.uint8)), "no 'images'"),
    "i_missing": _image_case(lambda d: d / "nothing.png", "no such file"),
    # options
    "o_threads_0": _opt(["predict", "B", "IMG", "--threads", "0"], "--threads"),
    "o_threads_neg": _opt(["predict", "B", "IMG", "--threads", "-3"], "--threads"),
    "o_threads_nan": _opt(["predict", "B", "IMG", "--threads", "nan"], "--threads"),
    "o_threads_huge": _opt(["predict", "B", "IMG", "--threads", "100000000"], "--threads"),
    "o_batch_0": _opt(["predict", "B", "IMG", "--batch-size", "0"], "--batch-size"),
    "o_batch_huge": _opt(["predict", "B", "IMG", "--batch-size", str(10 ** 12)], "--batch-size"),
    "o_dla_neg": _opt(["predict", "B", "IMG", "--dla-core", "-1"], "--dla-core"),
    # TensorRT missing is this machine's lack (3), as for --backend tensorrt, not a bad argument
    "o_dla_without_trt": _opt(["predict", "B", "IMG", "--dla-core", "0"], "dla_core 0 needs TensorRT engines", 3),
    "o_backend": _opt(["predict", "B", "IMG", "--backend", "cuda"], "--backend"),
    "o_head_dtype": _opt(["predict", "B", "IMG", "--head-dtype", "int8"], "--head-dtype"),
    "o_on_error": _opt(["predict", "B", "IMG", "--on-error", "ignore"], "--on-error"),
    "o_num_calib_0": _opt(BUILD + [str(DEMO), "-o", "OUT", "--num-calib", "0"], "--num-calib"),
    "o_calib_data_fp32": _opt(BUILD + [str(DEMO), "-o", "OUT", "--calib-data", "demo"], "--calib-data applies to --precision int8"),
    "o_skip_unreadable_demo": _opt(["build-engine", str(DEMO), "-o", "OUT", "--backend", "onnxruntime", "-q",
                                    "--calib-data", "demo", "--skip-unreadable"], "--skip-unreadable applies to a folder"),
    "o_skip_unreadable_default": _opt(["build-engine", str(DEMO), "-o", "OUT", "--backend", "onnxruntime", "-q",
                                       "--skip-unreadable"], "the demo model's default calibration data (demo)"),
    "o_skip_unreadable_missing": _opt(["build-engine", str(DEMO), "-o", "OUT", "--backend", "onnxruntime", "-q",
                                       "--calib-data", "OUT.nothing", "--skip-unreadable"], "no such file"),
    "o_skip_unreadable_fp32": _opt(BUILD + [str(DEMO), "-o", "OUT", "--skip-unreadable"],
                                   "--skip-unreadable applies to --precision int8"),
    "o_finetune_fp32": _opt(BUILD + [str(DEMO), "-o", "OUT", "--finetune-epochs", "2"], "--finetune-epochs applies"),
    "o_timing_cache_portable": _opt(BUILD + [str(DEMO), "-o", "OUT", "--timing-cache", "OUT.cache"],
                                    "--timing-cache applies to TensorRT engines"),
    "o_dla_portable": _opt(["build-engine", str(DEMO), "-o", "OUT", "--backend", "onnxruntime", "--precision", "fp16",
                            "--dla-core", "0"], "--dla-core applies to TensorRT engines"),
    "o_max_batch_portable": _opt(BUILD + [str(DEMO), "-o", "OUT", "--max-batch", "8"],
                                 "--max-batch applies to TensorRT engines"),
    "o_workspace_portable": _opt(BUILD + [str(DEMO), "-o", "OUT", "--workspace", "2048"],
                                 "--workspace applies to TensorRT engines"),
    "o_calib_data_bundle": _opt(["build-engine", "B", "--calib-data", "demo"], "applies when building from a checkpoint"),
    "o_num_calib_8": _opt(BUILD + [str(DEMO), "-o", "OUT", "--num-calib", "8"], "--num-calib"),
    "o_num_calib_fp32": _opt(BUILD + [str(DEMO), "-o", "OUT", "--num-calib", "64"], "--num-calib applies to --precision int8"),
    "o_calib_method_fp32": _opt(BUILD + [str(DEMO), "-o", "OUT", "--calib-method", "max"],
                                "--calib-method applies to --precision int8"),
    "o_profiles_fp32": _opt(BUILD + [str(DEMO), "-o", "OUT", "--int8-profiles", "cpu"],
                            "--int8-profiles applies to --precision int8"),
    "o_drop_fp32": _opt(BUILD + [str(DEMO), "-o", "OUT", "--max-accuracy-drop", "1"],
                        "--max-accuracy-drop applies to --precision int8"),
    "o_num_calib_bundle": _opt(["build-engine", "B", "--num-calib", "64"], "applies when building from a checkpoint"),
    "o_profiles_tensorrt_build": _opt(["build-engine", str(DEMO), "-o", "OUT", "--backend", "tensorrt",
                                       "--int8-profiles", "cpu"], "--int8-profiles applies to a portable bundle"),
    "o_patch_guard_cpu": _opt(["build-engine", str(DEMO), "-o", "OUT", "--backend", "onnxruntime", "-q",
                               "--int8-profiles", "cpu", "--patch-guard", "0.02"], "the cpu profile"),
    "o_patch_guard_over_limit": _opt(["build-engine", str(DEMO), "-o", "OUT", "--backend", "onnxruntime", "-q",
                                      "--patch-guard", "0.5"], "--patch-guard 0.5 is more than"),
    "o_profiles_empty": _opt(BUILD + [str(DEMO), "-o", "OUT", "--int8-profiles", ""], "give at least one profile"),
    "o_profiles_unknown": _opt(BUILD + [str(DEMO), "-o", "OUT", "--int8-profiles", "cpu,foo"], "unknown profile 'foo'"),
    "o_drop_nan": _opt(BUILD + [str(DEMO), "-o", "OUT", "--max-accuracy-drop", "nan"], "--max-accuracy-drop"),
    "o_drop_neg": _opt(BUILD + [str(DEMO), "-o", "OUT", "--max-accuracy-drop", "-1"], "--max-accuracy-drop"),
    "o_patch_0": _opt(BUILD + [str(DEMO), "-o", "OUT", "--patch-size", "0"], "--patch-size"),
    "o_opt_level": _opt(BUILD + [str(DEMO), "-o", "OUT", "--opt-level", "9"], "optimisation level"),
    "o_max_batch": _opt(BUILD + [str(DEMO), "-o", "OUT", "--max-batch", "0"], "--max-batch"),
    "o_cal_tol": _opt(["calibrate", "B", "--data", "demo", "-o", "OUT", "--tolerance", "nan,0.1"], "--tolerance"),
    "o_cal_tol_text": _opt(["calibrate", "B", "--data", "demo", "-o", "OUT", "--tolerance", "x"], "--tolerance"),
    "o_cal_holdout": _opt(["calibrate", "B", "--data", "demo", "-o", "OUT", "--holdout", "1.5"], "--holdout"),
    "o_cal_budget_nan": _opt(["calibrate", "B", "--data", "demo", "-o", "OUT", "--budget-ms", "nan"], "--budget-ms"),
    "o_cal_budget_neg": _opt(["calibrate", "B", "--data", "demo", "-o", "OUT", "--budget-ms", "-2"], "--budget-ms"),
    "o_cal_margin_inf": _opt(["calibrate", "B", "--data", "demo", "-o", "OUT", "--margin", "inf"], "--margin"),
    "o_cal_repeats_0": _opt(["calibrate", "B", "--data", "demo", "-o", "OUT", "--repeats", "0"], "--repeats"),
    "o_demo_num_test": _opt(["demo", "-o", "OUT", "--num-test", "0"], "--num-test"),
    "o_demo_budget_nan": _opt(["demo", "-o", "OUT", "--budget-ms", "nan"], "--budget-ms"),
    "o_info_patch": _opt(["info", str(DEMO), "--patch-size", "-5"], "--patch-size"),
    # output paths
    "p_force_user_dir": ((lambda d, b: BUILD + [DEMO, "-o", _user_dir(d), "--force"]), 2, "is not a gfnet-edge bundle"),
    "p_force_deep_json": ((lambda d, b: BUILD + [DEMO, "-o", _user_dir(d, "[" * 100_000), "--force"]), 2,
                          "is not a gfnet-edge bundle"),
    "p_force_file": ((lambda d, b: BUILD + [DEMO, "-o", _write("f.txt", b"keep")(d), "--force"]), 2,
                     "is not a directory"),
    "p_force_ckpt_dir": ((lambda d, b: BUILD + [shutil.copy(DEMO, b / "c.pth.tar") and b / "c.pth.tar", "-o", b,
                                                "--force"]), 2, "an input of this command"),
    "p_force_symlink": ((lambda d, b: BUILD + [DEMO, "-o", (os.symlink(b, d / "ln"), d / "ln")[1], "--force"]), 2,
                        "is not a directory"),
    "p_force_bundle_notes": ((lambda d, b: BUILD + [DEMO, "-o", _add_entry(b, "my_notes.txt", "file"), "--force"]), 2,
                             "holds my_notes.txt, not part of a gfnet-edge bundle"),
    "p_force_bundle_report": ((lambda d, b: BUILD + [DEMO, "-o", _add_entry(b, "report", "report"), "--force"]), 2,
                              "holds report, not part of a gfnet-edge bundle"),
    "p_force_bundle_bundle": ((lambda d, b: BUILD + [DEMO, "-o", _add_entry(b, "old", "bundle"), "--force"]), 2,
                              "holds old, not part of a gfnet-edge bundle"),
    "p_force_timing_cache_in_bundle": ((lambda d, b: ["build-engine", DEMO, "-o", b, "--backend", "tensorrt", "-q",
                                                      "--precision", "fp16", "--timing-cache",
                                                      _add_entry(b, "graphs/t.cache", "file") / "graphs/t.cache",
                                                      "--force"]), 2, "an input of this command"),
    "p_exists": ((lambda d, b: BUILD + [DEMO, "-o", b]), 2, "already exists"),
    "p_parent_file": ((lambda d, b: BUILD + [DEMO, "-o", _write("plain", b"x")(d) / "out"]), 2,
                      "plain is not a folder"),
    "p_name_too_long": ((lambda d, b: BUILD + [DEMO, "-o", d / ("n" * 300)]), 2, "n" * 20),
    "p_unwritable": ((lambda d, b: BUILD + [DEMO, "-o", "/proc/gfnet-edge-test/out"]), 2, "/proc/gfnet-edge-test"),
    "p_demo_user_bundle": ((lambda d, b: ["demo", "-o", (_edit_manifest(lambda m: m["source_checkpoint"].update(
        name="mine.pth.tar"))(b), b.rename(d / "bundle"), d)[2]]), 2,
                           "not an earlier demo's bundle"),
    "p_demo_user_file": ((lambda d, b: ["demo", "-o", (_write("bundle", b"mine")(d), d)[1]]), 2,
                         "not an earlier demo's bundle"),
    "p_demo_user_report": ((lambda d, b: ["demo", "-o", ((d / "report").mkdir(), _write("report/notes.txt", b"mine")(d),
                                                         d)[2]]), 2, "is not a calibration report"),
    "p_demo_user_summary": ((lambda d, b: ["demo", "-o", (_write("summary.json", b'{"mine": 1}')(d), d)[1]]), 2,
                            "not an earlier demo's summary"),
    "p_demo_bundle_notes": ((lambda d, b: ["demo", "-o", (_add_entry(b, "notes.txt", "file").rename(d / "bundle"),
                                                          d)[1]]),
                            2, "holds notes.txt, not part of a gfnet-edge bundle; the demo replaces only"),
    "p_calib_force_user": ((lambda d, b: ["calibrate", b, "--data", "demo", "-o", _user_dir(d), "--force"]), 2,
                           "is not a calibration report"),
    "p_calib_force_report_notes": ((lambda d, b: ["calibrate", b, "--data", "demo", "-o", _add_entry(
        _add_entry(d, "r", "report") / "r", "notes.txt", "file"), "--force"]), 2,
                                   "holds notes.txt, not part of a calibration report"),
    "p_calib_force_data_in_report": ((lambda d, b: ["calibrate", b, "--data",
                                                    _add_entry(d, "r", "report") / "r" / "val",
                                                    "-o", ((d / "r" / "val").mkdir(), d / "r")[1], "--force"]), 2,
                                     "an input of this command"),
    "p_calib_under_file": ((lambda d, b: ["calibrate", b, "--data", "demo", "-o", _write("plain", b"x")(d) / "r"]), 2,
                           "plain is not a folder"),
    "p_calib_into_bundle": ((lambda d, b: ["calibrate", b, "--data", "demo", "-o", b, "--force"]), 2,
                            "is not a calibration report"),
}


@pytest.fixture(scope="module")
def corpus_results(tmp_path_factory):
    """Builds one bundle, gives every case its own folder and copy, runs all cases (forked)."""
    root = tmp_path_factory.mktemp("corpus")
    base = root / "base"
    subprocess.run([sys.executable, "-m", "gfnet_edge.cli", "build-engine", str(DEMO), "-o", str(base),
                    "--precision", "fp32", "--backend", "onnxruntime", "-q"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    cases, snapshots = [], {}
    for cid, (make, _, _) in sorted(CASES.items()):
        d = root / cid
        d.mkdir()
        b = d / "b"
        shutil.copytree(base, b, copy_function=os.link if cid.startswith("i_") or cid.startswith("o_") else shutil.copy2)
        argv = [str(a) for a in make(d, b)]
        argv = [str(d / "out") if a == "OUT" else a for a in argv]
        snapshots[cid] = _snapshot(d)
        cases.append({"id": cid, "argv": argv, "mem_mb": MEM_MB, "timeout_s": 120})
    (root / "cases.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, str(ROOT / "tests" / "cli_fork_runner.py"), str(root / "cases.json"),
                    str(root / "results.json")], check=True, cwd=ROOT, timeout=1200)
    results = {r["id"]: r for r in json.loads((root / "results.json").read_text())}
    return root, results, snapshots


def _snapshot(d: Path) -> Dict[str, Tuple[int, int]]:
    out = {}
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(d))] = (st.st_size if not p.is_dir() else 0, st.st_mtime_ns if not p.is_dir() else 0)
    return out


def test_corpus_is_large_and_covers_every_kind():
    kinds = {cid.split("_")[0] for cid in CASES}
    assert len(CASES) >= 80 and kinds == {"ck", "b", "h", "i", "o", "p"}


@pytest.mark.slow
@pytest.mark.parametrize("cid", sorted(CASES))
def test_bad_input(cid, corpus_results):
    root, results, snapshots = corpus_results
    r = results[cid]
    _, code, frag = CASES[cid]
    err = r["stderr"]
    assert "Traceback" not in err, err
    assert r["rc"] == code, (r["rc"], err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gfnet-edge: error: "), err
    assert frag in lines[0], (frag, err)
    assert r["stdout"].strip() == "", r["stdout"]
    assert _snapshot(root / cid) == snapshots[cid]  # nothing created, changed or deleted
    assert r["seconds"] < 60
