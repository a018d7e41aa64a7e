"""``gfnet-edge calibrate`` end to end on a tiny random-weight bundle: report, manifest, errors,
atomic writes, and the HTML report rendered in headless Chromium."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")
try:
    from gfnet_edge import _C  # noqa: F401
except ImportError:  # pragma: no cover - the extension is part of the build
    pytest.skip("the native extension gfnet_edge._C is not built (pip install -e .)", allow_module_level=True)

from gfnet_edge import cli
from gfnet_edge.bundle import Bundle
from runner_spy import first_args
from tiny_gfnet import fp32_bundle, random_gfnet

S, P, T = 128, 64, 3
CHROMIUM = "/usr/bin/chromium"


def _main(argv):
    """Runs ``gfnet-edge`` (its parser registers ``calibrate`` from calibrate/cli.py)."""
    return cli.main(argv)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, torch_mod):
    """A random-weight S=128, P=64, T=3 bundle (fp32, ONNX Runtime) and 48 labelled images."""
    root = tmp_path_factory.mktemp("calib")
    fp32_bundle(random_gfnet("tiny_calib", S, P, T, num_classes=4, channels=(8, 16, 32, 64), policy_hidden=32), root)
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (48, 8, 8, 3)).astype(np.uint8)
    images = np.stack([np.kron(x, np.ones((S // 8, S // 8, 1), np.uint8)) for x in low])
    images = np.clip(images.astype(np.int16) + rng.integers(-20, 20, images.shape), 0, 255).astype(np.uint8)
    labels = rng.integers(0, 4, 48)
    np.savez(root / "data.npz", images=images, labels=labels)
    return root


def _fresh(tiny_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle / "bundle", dst)
    return dst


FAST = ["--repeats", "10", "--warmup", "2", "--warmup-ms", "20", "--batch-size", "4", "--threads", "1",
        "--gallery", "6", "-q"]


def _full_network_accuracy(tiny_bundle) -> float:
    """The tiny bundle's held-out accuracy with every step run, computed here: the last step's
    top class of the runtime's trace of the held-out images (calibrate's default split) against
    their labels."""
    from gfnet_edge.calibrate.data import load_calibration_data
    from gfnet_edge.runtime import Runtime

    with Runtime(tiny_bundle / "bundle", backend="onnxruntime", precision="fp32", threads=1) as rt:
        hold_x, hold_y = load_calibration_data(str(tiny_bundle / "data.npz"), rt.model).part("holdout")
        last = rt.trace(hold_x, cropped=True).probs[-1]
    return 100.0 * float(np.mean(last.argmax(axis=1) == hold_y))


@pytest.fixture(scope="module")
def calibrated(tiny_bundle, tmp_path_factory):
    """One full calibration (default budgets, --default), shared by the report tests."""
    work = tmp_path_factory.mktemp("calibrated")
    bundle = work / "bundle"
    shutil.copytree(tiny_bundle / "bundle", bundle)
    out = work / "report"
    rc = _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(out), *FAST])
    assert rc == 0
    return {"bundle": bundle, "out": out, "res": json.loads((out / "report.json").read_text())}


def test_full_run_writes_report_and_budgets(calibrated, capsys):
    res, bundle, out = calibrated["res"], calibrated["bundle"], calibrated["out"]
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]
    cost = res["latency"]["budget_batch"]["cost_ms"]
    assert len(cost) == T and all(c > 0 for c in cost)
    assert res["latency"]["other_batch"]["batch"] == 4
    assert [h["when"] for h in res["latency"]["history"]][::len(res["latency"]["history"]) - 1] == ["start", "end"]
    stab = res["latency"]["stability"]
    assert len(stab["full_model_median_ms"]) == len(res["latency"]["history"]) and stab["spread_pct"] >= 0
    assert res["settings"]["warmup_ms"] == 20.0
    stages = set(res["latency"]["budget_batch"]["stages"]["0"])  # frames normalised in the runtime's preprocess
    assert stages >= {"preprocess", "glance", "step"} and "normalise" not in stages
    assert len(res["budgets"]) == 3
    m = Bundle.load(bundle).manifest
    for b in res["budgets"]:
        assert b["name"].startswith("ms-") and len(b["thresholds"]) == T and b["thresholds"][-1] == -1e8
        assert b["fit"]["fit_expected_ms"] <= b["fit"]["target_ms"] + 1e-9
        assert b["measured"]["mean_ms"] > 0 and b["measured"]["images"] == res["data"]["holdout"]
        assert b["consistent_with_trace"], "runtime exits/classes differ from the trace-based evaluation"
        entry = m["budgets"][b["name"]]
        assert entry["thresholds"] == b["thresholds"] and entry["unit"] == "ms"
        assert entry["measured_ms"] == pytest.approx(b["measured"]["mean_ms"])
    assert len(res["anytime"]) >= 1 and len(res["reference_curve"]["ms"]) == 39
    assert res["precisions"]["rows"] == [] and "one precision" in res["precisions"]["note"]
    assert len(res["gallery"]) == 6


@pytest.mark.parametrize("on_gpu", [False, True])
def test_budgets_name_the_device_their_latency_was_measured_on(tiny_bundle, tmp_path, monkeypatch, capsys, on_gpu):
    """On a machine with a GPU the budgets, step costs and report name the GPU (and its host)
    when the runtime's loop runs there, and the CPU when it does not. The loop here runs on the
    host either way: only which device the runtime reports is switched."""
    from gfnet_edge.calibrate import pipeline
    from gfnet_edge.runtime import api

    real = pipeline.device_description
    monkeypatch.setattr(pipeline, "device_description", lambda: {**real(), "cpu": "Host CPU", "gpu": "Sim GPU"})
    monkeypatch.setattr(api.Runtime, "device_loop", property(lambda self: on_gpu))
    bundle = _fresh(tiny_bundle, tmp_path)
    out = tmp_path / "r"
    rc = _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(out), "--budget-ms", "500",
                "--no-compare", *FAST, "--gallery", "0", "--deadlines", "0"])
    assert rc == 0
    want = "Sim GPU (host Host CPU)" if on_gpu else "Host CPU"
    m = Bundle.load(bundle).manifest
    assert [b["device"] for b in m["budgets"].values()] == [want]
    assert {c["device"] for c in m["step_costs"].values()} == {want}
    assert f"on {want} " in capsys.readouterr().out
    assert f"device: {want} (" in (out / "report.html").read_text()


def test_the_report_names_the_bundles_classes(tiny_bundle, tmp_path):
    """The class names a bundle records reach report.json and the gallery's captions."""
    from gfnet_edge.bundle import Bundle

    bundle = _fresh(tiny_bundle, tmp_path)
    names = ["blue jay", "grüne Äpfel", "red car", "zebra"]
    Bundle.load(bundle).update_manifest(lambda m: m["model"].update(class_names=names))
    out = tmp_path / "report"
    assert _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(out), "--budget-ms",
                  "100", "--no-compare", "--no-write", *FAST]) == 0
    res = json.loads((out / "report.json").read_text())
    assert res["bundle"]["class_names"] == names and res["gallery"]
    page = (out / "report.html").read_text(encoding="utf-8")
    card = res["gallery"][0]
    assert f"label {card['label']} &#39;{names[card['label']]}&#39; · predicted {card['pred']} &#39;" in page


class _Figures(HTMLParser):
    """The gallery's cards of a report page: (caption text, the card's PNG bytes), and every tag."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.cards, self.tags, self._src, self._caption = [], [], None, None
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "img" and a.get("alt") == "gallery image":
            self._src = a["src"]
        elif tag == "figcaption":
            self._caption = []

    def handle_endtag(self, tag):
        if tag == "figcaption":
            png = base64.b64decode(self._src.split(",", 1)[1])
            self.cards.append((" ".join("".join(self._caption).split()), png))
            self._src = self._caption = None

    def handle_data(self, data):
        if self._caption is not None:
            self._caption.append(data)


def test_gallery_names_each_cards_file_in_the_data_folder(tiny_bundle, tmp_path):
    """With a class-folder --data, each gallery card (and its report.json entry) names its image's
    file relative to the folder; names with markup characters, quotes and bytes that are not UTF-8
    show as text. Each file is one solid colour of its own: the card's glance shows the colour of
    the file it names (--num-images takes 12 of the 16 files)."""
    from PIL import Image

    data = tmp_path / "data"
    # (folder, file) as bytes, and how the report shows the path (bytes not UTF-8 as \xNN)
    folders = [(b"0 a<b>", "0 a<b>"), (b"1 c&amp;d", "1 c&amp;d"), (b"2 e\"f'", "2 e\"f'"),
               (b"3 caf\xe9", "3 caf\\xe9")]
    colour_of = {}  # shown path -> colour written
    k = 0
    for label, (folder, shown_folder) in enumerate(folders):
        for j in range(4):
            hostile = "<img src=x onerror=alert(1)>&"
            name, shown = ((hostile.encode() + b"\xff.png", hostile + "\\xff.png") if j == 0 else
                           (f"img_{j}.png".encode(), f"img_{j}.png"))
            d = os.path.join(os.fsencode(data), folder)
            os.makedirs(d, exist_ok=True)
            colour = (15 * k + 10, 240 - 14 * k, (61 * k) % 256)
            with open(os.path.join(d, name), "wb") as f:
                Image.new("RGB", (S, S), colour).save(f, format="PNG")
            colour_of[f"{shown_folder}/{shown}"] = (colour, label)
            k += 1
    bundle = _fresh(tiny_bundle, tmp_path)
    out = tmp_path / "report"
    assert _main(["calibrate", str(bundle), "--data", str(data), "-o", str(out), "--budget-ms", "100", "--no-compare",
                  "--no-write", "--deadlines", "0", "--num-images", "12", *FAST]) == 0
    res = json.loads((out / "report.json").read_text(encoding="utf-8"))
    page = (out / "report.html").read_bytes().decode("utf-8")  # strict: the page is UTF-8
    parsed = _Figures(page)
    assert len(parsed.cards) == len(res["gallery"]) == 6  # every held-out image (12 of the 16 images, half held out)
    assert "<img src=x" not in page and "a<b>" not in page and not any("onerror" in a for _, a in parsed.tags)
    assert str(tmp_path) not in " ".join(c for c, _ in parsed.cards) + json.dumps(res["gallery"])
    shown = []
    for (caption, png), entry in zip(parsed.cards, res["gallery"]):
        name = entry["file"]
        assert caption.startswith(f"{name} · label {entry['label']} ·"), caption
        colour, label = colour_of[name]
        assert entry["label"] == label
        glance = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))[112, 112]
        assert np.abs(glance.astype(int) - colour).max() <= 2, (name, glance, colour)
        shown.append(name)
    assert len(set(shown)) == 6


def test_a_data_folder_whose_path_is_not_utf8_is_reported(tiny_bundle, tmp_path, capsys):
    """A --data folder and an -o report folder whose paths hold bytes that are not UTF-8: the
    run goes to its end, the page (UTF-8) and the terminal show those bytes as \\xNN escapes,
    and report.json (strict JSON) keeps the path as given."""
    from PIL import Image

    data = os.path.join(os.fsencode(tmp_path), b"d\xe9ta")
    for label in range(4):
        d = os.path.join(data, str(label).encode())
        os.makedirs(d)
        for j in range(4):
            Image.new("RGB", (S, S), (40 * label, 10 * j, 200)).save(os.path.join(d, f"{j}.png".encode()), format="PNG")
    bundle = _fresh(tiny_bundle, tmp_path)
    out = tmp_path / os.fsdecode(b"r\xe9port")
    assert _main(["calibrate", str(bundle), "--data", os.fsdecode(data), "-o", str(out), "--budget-ms", "100",
                  "--no-compare", "--no-write", "--deadlines", "0", *FAST]) == 0, capsys.readouterr().err
    page = (out / "report.html").read_bytes().decode("utf-8")  # strict: the page is UTF-8
    res = json.loads((out / "report.json").read_bytes().decode("utf-8"))
    assert "d\\xe9ta" in page and res["data"]["source"] == os.fsdecode(data)
    assert capsys.readouterr().out.splitlines()[-1] == f"report: {os.fsencode(tmp_path).decode()}/r\\xe9port/report.html"


def test_gallery_of_data_without_files_numbers_its_images(calibrated):
    """An .npz has no file names: each card is named by its place in the held-out split."""
    page = (calibrated["out"] / "report.html").read_text(encoding="utf-8")
    cards = _Figures(page).cards
    assert len(cards) == len(calibrated["res"]["gallery"]) == 6
    for (caption, _), entry in zip(cards, calibrated["res"]["gallery"]):
        assert entry["file"] is None and caption.startswith(f"#{entry['index']} · label {entry['label']} ·")


def test_demo_images_have_no_files_and_are_numbered(tiny_bundle):
    """The demo task's generated images have no files: their gallery cards keep ``#i``."""
    from gfnet_edge.calibrate.data import load_calibration_data
    from gfnet_edge.calibrate.gallery import GalleryCard
    from gfnet_edge.calibrate.report import _gallery_cards
    from gfnet_edge.data.cluttered_digits import ClutteredDigitsConfig

    model = dict(Bundle.load(tiny_bundle / "bundle").manifest["model"], model_name="demo_tiny",
                 image_size=ClutteredDigitsConfig().image_size, num_classes=10)
    data = load_calibration_data("demo", model, 8)
    assert data.files is None and data.part_files("holdout") is None
    card = GalleryCard(index=3, label=1, pred=1, confidence=0.5, exit_step=0, budget="b", correct=True, coords=[],
                       file=None)
    assert _gallery_cards([card])[0]["name"] == "#3" and card.to_dict()["file"] is None

def test_budgets_are_selectable_by_the_runtime(calibrated):
    from gfnet_edge.runtime import Runtime

    name = calibrated["res"]["budgets"][0]["name"]
    rt = Runtime(calibrated["bundle"], backend="onnxruntime", precision="fp32", budget=name, threads=1)
    assert rt.thresholds == pytest.approx(calibrated["res"]["budgets"][0]["thresholds"])
    # the step latency calibration measured is what deadlines plan with (batch 1 and 4), from more
    # timed calls than --repeats (10) where they fit in 5 s: the glance the p99 of its calls (never
    # below their mean), each focus step the p99 of its time from one step check to the next in the
    # calls that ran every step (never below its mean)
    lat = calibrated["res"]["latency"]
    steps, incs = lat["budget_batch"]["steps"], lat["budget_batch"]["increments"]
    assert len(incs) == T and incs[0]["n"] == steps[T - 1]["n"]
    # the same calls, from the call's start inside the runtime to its end: a little less than they took
    assert 0.9 * steps[T - 1]["mean_ms"] <= sum(i["mean_ms"] for i in incs) <= steps[T - 1]["mean_ms"]
    assert rt.step_costs is not None and rt.step_costs.batch == 1 and rt.step_costs.other[0] == 4
    want = [max(steps[0]["p99_ms"], steps[0]["mean_ms"])] + [max(i["p99_ms"], i["mean_ms"]) for i in incs[1:]]
    assert rt.step_costs.step_ms == pytest.approx(want)
    calls = [s["n"] for s in lat["budget_batch"]["steps"]]
    span = str(min(calls)) if min(calls) == max(calls) else f"{min(calls)}-{max(calls)}"
    assert min(calls) > 10 and f"p99 of {span} calls" in rt.step_costs.basis
    # the manifest records each step's calls and how many of them were timed alone for a lone stall
    entry = Bundle.load(calibrated["bundle"]).manifest["step_costs"]["onnxruntime/fp32"]["batches"][0]
    assert entry["step_calls"] == calls and entry["retimed_calls"] == lat["budget_batch"]["retimed_calls"]
    assert entry["calls"] == min(calls) and len(entry["retimed_calls"]) == T


def test_a_runtime_on_other_threads_than_its_step_costs_says_so(calibrated, caplog):
    """Deadlines plan with step costs measured at the calibration's threads (1 here): a runtime
    on other threads logs a warning naming both at its first call with a deadline; on the same
    threads, or without a deadline, nothing."""
    import logging

    from gfnet_edge.runtime import Runtime

    S = calibrated["res"]["bundle"]["image_size"]
    x = np.random.default_rng(0).integers(0, 256, (2, S, S, 3), dtype=np.uint8)
    with caplog.at_level(logging.WARNING, logger="gfnet_edge"):
        with Runtime(calibrated["bundle"], backend="onnxruntime", precision="fp32", threads=1) as rt:
            rt.predict(x, deadline_ms=1000.0)
        with Runtime(calibrated["bundle"], backend="onnxruntime", precision="fp32", threads=2) as rt:
            rt.predict(x)
            assert "step costs" not in caplog.text
            rt.predict(x, deadline_ms=1000.0)
    assert "measured with threads=1, this runtime runs with threads=2" in caplog.text


def test_too_few_images_are_an_option_error_and_few_a_warning(tiny_bundle, tmp_path, capsys, caplog):
    """--num-images below calibration's minimum (4) is an argparse error (exit 2, one line, nothing
    measured or written); a fitting or held-out half under 50 images loads with a warning."""
    import logging

    from gfnet_edge.calibrate.data import load_calibration_data

    bundle = _fresh(tiny_bundle, tmp_path)
    rc = _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(tmp_path / "r"),
                "--num-images", "3", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "argument --num-images: must be in [4, " in err, err
    assert not (tmp_path / "r").exists()
    model = Bundle.load(bundle).model
    with caplog.at_level(logging.WARNING, logger="gfnet_edge"):
        data = load_calibration_data(str(tiny_bundle / "data.npz"), model, limit=5)
    assert len(data.part("fit")[1]) == 3 and len(data.part("holdout")[1]) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "calibration: 3 image(s) to fit the thresholds on and 2 held out (of 5): budgets and accuracies from fewer "
        "than 50 each are rough (better a few hundred labelled images)"]
    caplog.clear()
    many = tmp_path / "many.npz"
    with np.load(tiny_bundle / "data.npz") as z:
        np.savez(many, images=np.concatenate([z["images"]] * 3), labels=np.concatenate([z["labels"]] * 3))
    with caplog.at_level(logging.WARNING, logger="gfnet_edge"):
        load_calibration_data(str(many), model, limit=100)  # 50 and 50
    assert caplog.records == []


def test_other_class_folders_are_listed_with_how_many_more(tiny_bundle, tmp_path, capsys):
    """A class folder whose classes are not the bundle's: the message names the first five of
    each list and how many more there are, in one line, before any image is read."""
    bundle = _fresh(tiny_bundle, tmp_path)
    Bundle.load(bundle).update_manifest(lambda m: m["model"].update(class_names=["a", "b", "c", "d"]))
    data = tmp_path / "data"
    for i in range(8):
        (data / str(i)).mkdir(parents=True)
    rc = _main(["calibrate", str(bundle), "--data", str(data), "-o", str(tmp_path / "r"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "(missing a, b, c, d; not the model's: 0, 1, 2, 3, 4, ... (3 more))" in err, err


def test_a_class_folder_written_with_other_unicode_characters_is_named_as_such(tiny_bundle, tmp_path, capsys):
    """A model trained where folder names are decomposed (macOS, NFD) and a copy of its val folder
    with composed names (NFC) look the same in a list: the message says which ones differ and how."""
    import unicodedata

    bundle = _fresh(tiny_bundle, tmp_path)
    names = ["a", "b", unicodedata.normalize("NFD", "grüne Äpfel"), "d"]
    Bundle.load(bundle).update_manifest(lambda m: m["model"].update(class_names=names))
    data = tmp_path / "data"
    for c in ("a", "b", unicodedata.normalize("NFC", "grüne Äpfel"), "d"):
        (data / c).mkdir(parents=True)
    rc = _main(["calibrate", str(bundle), "--data", str(data), "-o", str(tmp_path / "r"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "look alike but are written with other Unicode characters ('gru\\u0308ne A\\u0308pfel', " \
           "'gr\\xfcne \\xc4pfel'): rename the folder" in err, err
    assert not (tmp_path / "r").exists()


def test_a_report_folder_inside_the_data_folder_is_refused(tiny_bundle, tmp_path, capsys):
    """-o inside a --data folder of class folders would add a class folder to the user's data
    (the next calibrate, or train --data, would meet it): refused in one line, nothing written."""
    bundle = _fresh(tiny_bundle, tmp_path)
    Bundle.load(bundle).update_manifest(lambda m: m["model"].update(class_names=["a", "b", "c", "d"]))
    data = tmp_path / "my data"
    for c in "abcd":
        (data / c).mkdir(parents=True)
    before = sorted(p.name for p in data.iterdir())
    for out in (data / "report", data / "a" / "report"):
        rc = _main(["calibrate", str(bundle), "--data", str(data), "-o", str(out), *FAST])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and f"is inside the --data folder {data}" in err, err
        assert not out.exists()
    assert sorted(p.name for p in data.iterdir()) == before == list("abcd")


def test_default_budget_and_explicit_budgets(tiny_bundle, tmp_path, capsys):
    bundle = _fresh(tiny_bundle, tmp_path)
    before = json.loads((bundle / "manifest.json").read_text())["budgets"]
    # feasible by construction: a generous budget and the full model's latency plus room
    rc = _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(tmp_path / "r"),
                "--budget-ms", "500", "--default", "500", "--no-compare", "--clock", "cpu", *FAST])
    assert rc == 0
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["default_budget"] == "ms-500.0" and set(m["budgets"]) == set(before) | {"ms-500.0"}
    assert m["budgets"]["ms-500.0"]["clock"] == "cpu" and m["budgets"]["ms-500.0"]["threads"] == 1
    text = capsys.readouterr().out
    assert "ms-500.0" in text and "report:" in text and "step latency" in text


def test_the_report_line_names_the_report_file_of_an_output_given_with_a_trailing_slash(tiny_bundle, tmp_path, capsys):
    """`-o report/` (as docs/calibration.md writes it): the last line names report/report.html, the
    file written, with one separator."""
    bundle = _fresh(tiny_bundle, tmp_path)
    out = f"{tmp_path / 'r'}/"
    rc = _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", out,
                "--budget-ms", "500", "--no-compare", "--deadlines", "0", *FAST])
    assert rc == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == f"report: {tmp_path / 'r' / 'report.html'}"
    assert (tmp_path / "r" / "report.html").is_file()


def test_default_auto_makes_the_suggested_budget_the_default_in_manifest_and_report(tiny_bundle, tmp_path, capsys):
    """--default auto: the budget the report suggests (the fastest by measured mean ms within a point
    of the full network's held-out accuracy, else the cheapest within a point of the best budget,
    recomputed here from the report's numbers) is the manifest's default, and the report says so
    (its manifest line and its choice, with the rule that chose it)."""
    from gfnet_edge.calibrate import report as rep

    bundle = _fresh(tiny_bundle, tmp_path)
    rc = _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(tmp_path / "r"),
                "--budget-ms", "500", "400", "300", "--default", "auto", "--no-compare", "--deadlines", "0", *FAST])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "r" / "report.json").read_text())
    budgets = res["budgets"]
    full = _full_network_accuracy(tiny_bundle)
    assert res["full_network_accuracy"] == pytest.approx(full) == res["anytime"]["fp32 (held-out)"][-1]
    near = [b for b in budgets if b["holdout"]["accuracy"] >= full - rep.DEFAULT_BUDGET_SLACK]
    best = max(b["holdout"]["accuracy"] for b in budgets)
    cheapest = (min(near, key=lambda b: b["measured"]["mean_ms"]) if near else
                min((b for b in budgets if b["holdout"]["accuracy"] >= best - rep.DEFAULT_BUDGET_SLACK),
                    key=lambda b: b["budget_ms"]))["name"]
    assert json.loads((bundle / "manifest.json").read_text())["default_budget"] == cheapest
    assert res["manifest"]["default_budget"] == cheapest and f"default budget {cheapest}" in res["manifest"]["status"]
    c = rep.choice(res)
    assert c["suggested"] == cheapest and c["why"].endswith("; --default auto made it the manifest's default budget")
    assert f"of the full network's held-out accuracy of {full:.2f} %" in c["why"]


def _rejected(tiny_bundle, tmp_path, capsys, budget_args) -> str:
    """Runs calibrate with ``budget_args``, checks exit code 2 with nothing written, returns stderr."""
    bundle = _fresh(tiny_bundle, tmp_path)
    manifest = (bundle / "manifest.json").read_bytes()
    out = tmp_path / "r"
    rc = _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(out), *budget_args,
                *FAST])
    assert rc == 2
    assert not out.exists() and (bundle / "manifest.json").read_bytes() == manifest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r.")]
    return capsys.readouterr().err


def test_infeasible_budget_fails_cleanly(tiny_bundle, tmp_path, capsys):
    err = _rejected(tiny_bundle, tmp_path, capsys, ["--budget-ms", "0.001"])
    assert "cannot be met" in err and "glance alone" in err and "smallest feasible budget" in err


def test_starting_cost_falls_back_when_the_device_slowed_down():
    from gfnet_edge.calibrate.verify import Measurement, starting_cost

    hist = [Measurement("start", [1.0, 2.0, 3.0], 10), Measurement("re-measure ms-1.5", [1.2, 2.2, 3.2], 10)]
    cost, note = starting_cost(1.5, hist)  # pooled glance 1.1 ms: the median of both, no note
    assert cost.tolist() == pytest.approx([1.1, 2.1, 3.1]) and note is None
    hist.append(Measurement("re-measure ms-2.0", [4.0, 5.0, 6.0], 10))
    hist.append(Measurement("re-measure ms-2.5", [5.0, 6.0, 7.0], 10))
    cost, note = starting_cost(1.5, hist)  # pooled glance (1.2 + 4.0) / 2 = 2.6 ms > 1.5 ms
    assert cost.tolist() == [1.2, 2.2, 3.2]  # the latest measurement under which 1.5 ms can be met
    assert "slowed down" in note and "2.600 ms" in note and "'re-measure ms-1.5'" in note


def test_stability_counts_a_changed_median_not_one_slow_call():
    """The spread is taken over each measurement's median call: one slow call among 20 moves the mean
    by 45 % but is no change of the device; a shifted median is."""
    from gfnet_edge.calibrate.verify import Measurement, stability

    def meas(when, full):
        full = np.asarray(full, dtype=np.float64)
        return Measurement(when, [0.3, 0.6, float(full.mean())], len(full), [full / 3, full / 2, full])

    base = meas("start", [1.0] * 20)
    hiccup = meas("re-measure ms-1", [1.0] * 19 + [10.0])
    out = stability([base, hiccup], "wall")
    assert out["full_model_ms"] == pytest.approx([1.0, 1.45]) and out["full_model_median_ms"] == [1.0, 1.0]
    assert out["spread_pct"] == 0.0 and out["warning"] is None
    slower = meas("end", [1.2] * 20)
    out = stability([base, hiccup, slower], "wall")
    assert out["spread_pct"] == pytest.approx(20.0)
    assert "changed by 20%" in out["warning"] and "1.00 to 1.20 ms median" in out["warning"]
    assert "--clock cpu --threads 1" in out["warning"]
    assert "--clock" not in stability([base, slower], "cpu")["warning"]
    # measurements without their samples (a report read back) compare their means
    bare = [Measurement("start", [1.0], 10), Measurement("end", [1.05], 10)]
    assert stability(bare, "wall")["spread_pct"] == pytest.approx(5.0) and stability(bare, "wall")["warning"] is None


@pytest.mark.parametrize("count,min_ms,calls", [(3, 10.0, 5), (7, 10.0, 7), (0, 0.0, 0), (0, 1.0, 1)])
def test_warm_up_runs_a_call_count_and_a_time_floor(count, min_ms, calls):
    """warm_up makes at least ``count`` calls and goes on until ``min_ms`` have passed (each call
    here takes 2 ms of a fake clock)."""
    from gfnet_edge.calibrate.latency import warm_up

    now = [0.0]
    seen = []

    def call(i):
        seen.append(i)
        now[0] += 2e-3

    assert warm_up(call, count, min_ms, clock=lambda: now[0]) == calls
    assert seen == list(range(calls))


def test_calibration_survives_a_device_slowdown(tiny_bundle, tmp_path, monkeypatch, capsys):
    """The device slows down a hundredfold after the first step-latency measurement (as a loaded machine
    can): the small default budgets fall below the pooled glance latency, and the run still fits them,
    from the first measurement, and says so, instead of failing after the work is done."""
    from gfnet_edge.calibrate import pipeline

    real = pipeline._measure
    calls = []

    def slowing(rt, frames, batch, cfg, desc, stage_calls=20, extend=False):
        lat = real(rt, frames, batch, cfg, desc, stage_calls, extend)
        calls.append(desc)
        # steady step costs of 1, 2, 3 ms first (so the default budgets do not depend on how
        # loaded the test machine is), then a hundredfold slower
        scale = 1.0 if len(calls) == 1 else 100.0
        lat.steps = [dataclasses.replace(s, mean_ms=scale * (k + 1.0)) for k, s in enumerate(lat.steps)]
        return lat

    monkeypatch.setattr(pipeline, "_measure", slowing)
    bundle = _fresh(tiny_bundle, tmp_path)
    out = tmp_path / "r"
    # a tolerance nothing meets: every budget's verification re-measures the (now slower) step latency
    rc = _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(out), "--no-compare",
                "--tolerance", "0.0001,0.0001", "--attempts", "2", *FAST, "--batch-size", "0"])
    assert rc == 0
    res = json.loads((out / "report.json").read_text())
    start = res["latency"]["history"][0]["cost_ms"]
    notes = [b["note"] for b in res["budgets"]]
    assert len(notes) == 3 and notes[0] is None and all("slowed down" in n for n in notes[1:])
    for b in res["budgets"][1:]:
        assert b["cost_ms"] == pytest.approx(start) and b["budget_ms"] >= start[0]
    assert "slowed down" in capsys.readouterr().out and "slowed down" in (out / "report.html").read_text()


@pytest.mark.parametrize("kind", ["missing", "corrupt", "unlabelled", "wrong_labels"])
def test_unreadable_data_fails_cleanly(tiny_bundle, tmp_path, capsys, kind):
    bundle = _fresh(tiny_bundle, tmp_path)
    manifest = (bundle / "manifest.json").read_bytes()
    if kind == "missing":
        data, match = tmp_path / "nope", "no such file"
    elif kind == "corrupt":
        data, match = tmp_path / "bad.npz", "cannot read"
        data.write_bytes(b"not a zip file")
    elif kind == "unlabelled":
        data, match = tmp_path / "flat", "labelled images"
        data.mkdir()
        from PIL import Image

        Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(data / "a.png")
    else:
        data, match = tmp_path / "big.npz", "out of range"
        np.savez(data, images=np.zeros((8, S, S, 3), np.uint8), labels=np.arange(8) + 10)
    out = tmp_path / "r"
    rc = _main(["calibrate", str(bundle), "--data", str(data), "-o", str(out), *FAST])
    assert rc == 2
    assert match in capsys.readouterr().err
    assert not out.exists() and (bundle / "manifest.json").read_bytes() == manifest


def test_unreadable_files_stop_the_run_or_are_left_out_with_skip_unreadable(tiny_bundle, tmp_path, capsys, caplog):
    """A class folder with one broken file: the run stops naming it (and the option), or with
    --skip-unreadable calibrates on the other images, names the file in a warning and counts
    it in the report."""
    from PIL import Image

    with np.load(tiny_bundle / "data.npz") as z:
        images, labels = z["images"], z["labels"]
    data = tmp_path / "val"
    for k, (img, y) in enumerate(zip(images, labels)):
        (data / f"c{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(data / f"c{y}" / f"{k:02d}.png")
    bad = data / "c1" / "05_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    bundle = _fresh(tiny_bundle, tmp_path)
    manifest = (bundle / "manifest.json").read_bytes()
    out = tmp_path / "r"
    rc = _main(["calibrate", str(bundle), "--data", str(data), "-o", str(out), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(bad) in err[0] and "--skip-unreadable" in err[0]
    assert not out.exists() and (bundle / "manifest.json").read_bytes() == manifest

    with caplog.at_level("WARNING", logger="gfnet_edge"):
        rc = _main(["calibrate", str(bundle), "--data", str(data), "-o", str(out), "--skip-unreadable",
                    "--no-compare", "--budget-ms", "1000", *FAST])
    assert rc == 0 and f"left out {bad}: cannot read image" in caplog.text
    res = json.loads((out / "report.json").read_text())
    assert res["data"]["images"] == len(labels) and res["data"]["skipped_unreadable"] == 1
    assert "1 unreadable files left out" in (out / "report.html").read_text()


def test_report_is_atomic_on_failure(tiny_bundle, tmp_path, monkeypatch, capsys):
    from gfnet_edge.calibrate import pipeline

    bundle = _fresh(tiny_bundle, tmp_path)
    manifest = (bundle / "manifest.json").read_bytes()

    def broken(out_dir, res, figures, gallery):
        (out_dir / "report.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline, "write_report", broken)
    out = tmp_path / "r"
    rc = _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 1 and "gfnet-edge: error: internal error: RuntimeError: disk full" in err
    assert "rerun as `gfnet-edge --debug COMMAND ...`" in err  # where --debug goes (before the command)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging directory left behind
    assert (bundle / "manifest.json").read_bytes() == manifest


def _disk_full_after(n_bytes: int):
    """``Path.write_text`` of a disk that takes ``n_bytes`` of the text, then refuses the rest as a
    full disk does: ``OSError(ENOSPC)`` naming no file."""
    def write_text(self, data, encoding=None, errors=None, newline=None):
        with open(self, "w", encoding=encoding) as f:
            f.write(data[:n_bytes])
        raise OSError(28, "No space left on device")
    return write_text


@pytest.mark.parametrize("where", ["report", "manifest"])
def test_a_full_disk_is_one_line_naming_what_could_not_be_written(tiny_bundle, tmp_path, monkeypatch, capsys, where):
    """The report's write, or the budgets' write into the bundle's manifest, fails as on a full
    disk: one line naming the report folder or the bundle's manifest, exit 2; no report or staging
    folder left, and the bundle as it was (its manifest whole, budgets not written)."""
    from gfnet_edge import bundle as bundle_mod
    from gfnet_edge.calibrate import report

    bundle = _fresh(tiny_bundle, tmp_path)
    manifest = (bundle / "manifest.json").read_bytes()
    out = tmp_path / "r"
    if where == "report":
        monkeypatch.setattr(report.Path, "write_text", _disk_full_after(100))
        expected = f"{out}: cannot write the calibration report"
    else:
        real_fdopen = os.fdopen

        def fdopen(fd, mode, *args, **kw):  # the manifest's atomic write: its temporary file takes nothing
            f = real_fdopen(fd, mode, *args, **kw)
            f.write = lambda data: (_ for _ in ()).throw(OSError(28, "No space left on device"))
            return f

        monkeypatch.setattr(bundle_mod.os, "fdopen", fdopen)
        expected = f"{bundle}: cannot write the bundle's manifest"
    rc = _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(out), *FAST])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1, err
    assert err.endswith(f"gfnet-edge: error: {expected} (No space left on device)\n"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert (bundle / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in bundle.iterdir()) == sorted(p.name for p in (tiny_bundle / "bundle").iterdir())


@pytest.mark.parametrize("args,match", [(["--clock", "cpu", "--threads", "2"], "--threads 1"),
                                        (["--budget-ms", "3", "3"], "duplicates"),
                                        (["--default", "7"], "not one of the calibrated budgets"),
                                        (["--budget", "p42:1"], "unknown kind"),
                                        (["--budget", "mean:3", "--budget-ms", "3"], "duplicates"),
                                        (["--deadlines", "-1"], "--deadlines"),
                                        (["--warmup-ms", "-5"], "--warmup-ms"),
                                        (["--skip-unreadable"], "--skip-unreadable applies to a folder")])
def test_bad_options(tiny_bundle, tmp_path, capsys, args, match):
    bundle = _fresh(tiny_bundle, tmp_path)
    out = tmp_path / "r"
    extra = [] if "--budget-ms" in args else ["--budget-ms", "500"]
    rc = _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(out), *FAST, *args,
                *extra])
    assert rc == 2 and match in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("arg", ["--margin=0.6", "--margin=0.5", "--margin=-0.01", "--tolerance=-0.1,0.05",
                                 "--tolerance=0.1,1", "--tolerance=0.1,nan", "--tolerance=0.1", "--method=magic",
                                 "--default=7", "--default=p95:500"])
def test_bad_fit_options_stop_in_one_line_before_any_measurement(tiny_bundle, tmp_path, capsys, monkeypatch, arg):
    """A margin the fit refuses (it needs [0, 0.5)), a tolerance that is not two fractions in
    [0, 1), an unknown method or a --default that is none of the budgets asked for stop with exit
    code 2 and one line naming the option, before the
    step latency is measured; no report is written and the manifest is unchanged."""
    from gfnet_edge.calibrate import pipeline

    def no_measurement(*a, **k):
        raise AssertionError("the step latency was measured before the options were checked")

    monkeypatch.setattr(pipeline, "_measure", no_measurement)
    bundle = _fresh(tiny_bundle, tmp_path)
    manifest = (bundle / "manifest.json").read_bytes()
    out = tmp_path / "r"
    rc = _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(out), *FAST,
                "--budget-ms", "500", arg])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and arg.split("=")[0] in err, err
    assert not out.exists() and (bundle / "manifest.json").read_bytes() == manifest


@pytest.mark.parametrize("default, ok", [("macs-mid", False), ("p95:500", False), ("ms-abc", False),
                                         ("ms-500", True), ("500", True), ("mean:500", True)])
def test_a_default_no_budget_of_the_run_can_have_stops_before_any_measurement(tiny_bundle, tmp_path, capsys,
                                                                              monkeypatch, default, ok):
    """Without --budget-ms / --budget the budgets are mean ones chosen from the measured latency:
    a --default that cannot name a mean budget stops in one line before the latency is measured;
    one that can goes on to the measurement (its name is checked once the budgets are known)."""
    from gfnet_edge.calibrate import pipeline
    from gfnet_edge.errors import InputError

    calls = []

    def measured(*a, **k):
        calls.append(a)
        raise InputError("the latency measurement began")

    monkeypatch.setattr(pipeline, "_measure", measured)
    bundle = _fresh(tiny_bundle, tmp_path)
    rc = _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(tmp_path / "r"), *FAST,
                "--default", default])
    err = capsys.readouterr().err
    assert rc == 2, err
    if ok:
        assert calls and "error: the latency measurement began" in err
    else:
        assert not calls and err.count("\n") == 1 and "can name none of the budgets" in err, err


def test_existing_report_dir_needs_force(tiny_bundle, tmp_path, capsys):
    bundle = _fresh(tiny_bundle, tmp_path)
    out = tmp_path / "r"
    out.mkdir()
    (out / "keep").write_text("x")
    rc = _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(out), *FAST])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert (out / "keep").exists()


def _tree(root: Path) -> dict:
    """Every file under ``root`` with its bytes."""
    return {q.relative_to(root).as_posix(): q.read_bytes() for q in sorted(root.rglob("*")) if q.is_file()}


@pytest.mark.parametrize("where", ["data_npz", "data_folder", "static"])
def test_force_keeps_the_inputs_an_earlier_report_holds(tiny_bundle, tmp_path, capsys, torch_mod, where):
    """--force replaces an earlier report only when none of the run's inputs lie in it: --data
    (a file or a folder) or a --static file inside it stops the run in one line, and the report,
    the input and the manifest stay as they were."""
    bundle = _fresh(tiny_bundle, tmp_path)
    manifest = (bundle / "manifest.json").read_bytes()
    out = tmp_path / "r"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"format": "gfnet-edge-calibration", "version": 1}) + "\n")
    (out / "report.html").write_text("<html></html>\n")
    data = str(tiny_bundle / "data.npz")
    extra: list = []
    if where == "data_npz":
        data = str(shutil.copy(tiny_bundle / "data.npz", out / "data.npz"))
    elif where == "data_folder":
        from PIL import Image

        with np.load(tiny_bundle / "data.npz") as z:
            for k, (img, y) in enumerate(zip(z["images"], z["labels"])):
                (out / "val" / f"c{y}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(out / "val" / f"c{y}" / f"{k:02d}.png")
        data = str(out / "val")
    else:  # a static checkpoint the run can use (random weights)
        timm = pytest.importorskip("timm")
        from gfnet_edge.train.static import save_static

        torch_mod.manual_seed(0)
        net = timm.create_model("resnet10t", pretrained=False, num_classes=4).eval()
        save_static(out / "static.pth.tar", net, "resnet10t", {}, 4, image_size=S, half=False)
        extra = ["--static", str(out / "static.pth.tar")]
    before = _tree(out)
    rc = _main(["calibrate", str(bundle), "--data", data, "-o", str(out), *FAST, *extra, "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "an input of this command" in err[0], err
    assert _tree(out) == before and (bundle / "manifest.json").read_bytes() == manifest


def test_a_static_baseline_that_does_not_fit_the_bundle_is_refused_before_any_measurement(
        tiny_bundle, tmp_path, capsys, monkeypatch, torch_mod):
    """A --static checkpoint of another number of classes (or classes, crop, image size) is refused
    in one line before the step latency is measured, not after the whole calibration."""
    timm = pytest.importorskip("timm")
    from gfnet_edge.calibrate import pipeline
    from gfnet_edge.train.static import save_static

    def no_measurement(*a, **k):
        raise AssertionError("the step latency was measured before the baseline was checked")

    monkeypatch.setattr(pipeline, "_measure", no_measurement)
    bundle = _fresh(tiny_bundle, tmp_path)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    save_static(tmp_path / "static.pth.tar", net, "resnet10t", {}, 5, image_size=S, half=False)
    rc = _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(tmp_path / "r"), *FAST,
                "--static", str(tmp_path / "static.pth.tar")])
    errors = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert rc == 2 and len(errors) == 1 and "the baseline has 5 classes, the bundle's model 4" in errors[0], errors
    assert not (tmp_path / "r").exists()


def test_force_replaces_a_report_only_when_it_holds_nothing_else(tiny_bundle, tmp_path, capsys):
    """A file of the user's in an earlier report stops --force in one line naming it, and nothing
    changes; a report holding report.json and report.html only is replaced."""
    bundle = _fresh(tiny_bundle, tmp_path)
    out = tmp_path / "r"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"format": "gfnet-edge-calibration", "version": 1}) + "\n")
    (out / "report.html").write_text("<html></html>\n")
    (out / "notes.txt").write_text("mine")
    before, manifest = _tree(out), (bundle / "manifest.json").read_bytes()
    argv = ["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(out), *FAST, "--force"]
    rc = _main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "holds notes.txt, not part of a calibration report" in err[0], err
    assert _tree(out) == before and (bundle / "manifest.json").read_bytes() == manifest
    (out / "notes.txt").unlink()
    assert _main(argv) == 0
    assert sorted(q.name for q in out.iterdir()) == ["report.html", "report.json"]
    assert json.loads((out / "report.json").read_text())["budgets"]


def test_html_is_self_contained(calibrated):
    html = (calibrated["out"] / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 + 6  # plots + gallery cards
    for anchor in ("id='budgets'", "id='curve'", "id='exits'", "id='latency'", "id='precision'", "id='gallery'"):
        assert anchor in html
    assert "http://" not in html and "https://" not in html and "<link" not in html


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(calibrated):
    from PIL import Image

    page = (calibrated["out"] / "report.html").resolve().as_uri()
    with tempfile.TemporaryDirectory() as prof, tempfile.TemporaryDirectory() as tmp:
        flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={prof}", "--window-size=1400,3000"]
        shot = Path(tmp) / "report.png"
        subprocess.run(flags + [f"--screenshot={shot}", page], check=True, timeout=120, capture_output=True)
        dom = subprocess.run(flags + ["--dump-dom", page], check=True, timeout=120, capture_output=True, text=True).stdout
        keep = os.environ.get("GFNET_EDGE_SCREENSHOT")
        if keep:
            shutil.copyfile(shot, keep)
        img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (3000, 1400)
    # the page script counts decoded images and tables after load; the DOM dump shows its result
    decoded = int(dom.split('data-images-decoded="')[1].split('"')[0])
    total = int(dom.split('data-images-total="')[1].split('"')[0])
    tables = int(dom.split('data-tables="')[1].split('"')[0])
    assert total >= 11 and decoded == total, f"{decoded}/{total} images decoded"
    assert tables >= 4  # budgets, anytime, per-step latency, per-stage latency (+ precision / static when given)
    for cls in ("budgets", "anytime", "steps", "stages"):
        assert f'<table class="{cls}">' in dom
    # a rendered page: many distinct colours (plots), not a blank or error page
    top = img[:2000]
    assert len(np.unique(top.reshape(-1, 3), axis=0)) > 500
    assert (top < 250).any(axis=2).mean() > 0.05


def test_the_step_latency_takes_more_calls_while_they_fit_its_time_box(tiny_bundle):
    """measure_steps(extend_to=N): more timed calls per step, up to N, while the timed calls stay
    within extend_seconds (what calibrate's step costs, and the p99 deadlines plan with, come
    from); none beyond --repeats when the time box is spent."""
    from gfnet_edge.calibrate.config import CalibrationConfig
    from gfnet_edge.calibrate.latency import measure_steps
    from gfnet_edge.errors import InputError
    from gfnet_edge.runtime import Runtime

    frames = np.load(tiny_bundle / "data.npz")["images"][:8]

    def interleaved(lat):  # timed calls per step, less those of a step timed alone for a lone stall
        return [s.n - r for s, r in zip(lat.steps, lat.retimed)]

    with Runtime(tiny_bundle / "bundle", backend="onnxruntime", precision="fp32", threads=1) as rt:
        kw = dict(repeats=5, warmup=1, stage_calls=0, warmup_ms=0.0)
        assert interleaved(measure_steps(rt, frames, extend_to=40, extend_seconds=60.0, **kw)) == [40] * T
        assert [s.n for s in measure_steps(rt, frames, extend_to=40, extend_seconds=0.0, **kw).steps] == [5] * T
        assert interleaved(measure_steps(rt, frames, extend_to=3, extend_seconds=60.0, **kw)) == [5] * T
    with pytest.raises(InputError, match="--latency-calls must be >= 0"):
        CalibrationConfig(bundle="b", data="d", output="o", latency_calls=-1).validate()


def test_calibration_calls_give_the_runtime_cropped_frames(tiny_bundle):
    """Calibration frames are already S x S: the timed calls hand them to the runtime as cropped
    (normalised there, fused with the glance), which runs as the same frames normalised
    beforehand would, not as a second resize and centre crop (the model crops)."""
    from gfnet_edge.calibrate.latency import measure_calls, prepare_frames, using_thresholds
    from gfnet_edge.runtime import Runtime

    frames = np.load(tiny_bundle / "data.npz")["images"][:12]
    with Runtime(tiny_bundle / "bundle", backend="onnxruntime", precision="fp32") as rt:
        assert rt.model.crop_pct != 1.0
        x = prepare_frames(rt.model, frames)
        with using_thresholds(rt, [-1e8] * T):  # everything exits at step 0: its confidences
            conf0 = rt.predict(x).confidence
        thr = [float(np.median(conf0)), float(np.median(conf0)), -1e8]
        run = measure_calls(rt, frames, thr, batch=4)
        with using_thresholds(rt, thr):
            want, recropped = rt.predict(x), rt.predict(frames)
        with pytest.raises(ValueError, match="uint8"):
            measure_calls(rt, frames.astype(np.float32), thr)
    assert len(set(run.exit_step.tolist())) > 1  # the thresholds exercise early exit
    np.testing.assert_array_equal(run.classes, want.classes)
    np.testing.assert_array_equal(run.exit_step, want.exit_step)
    np.testing.assert_array_equal(run.coords, want.coords)
    assert not np.array_equal(recropped.coords, want.coords)  # a second crop would have run otherwise


def test_using_thresholds_lets_the_blocks_own_error_through_and_restores_what_it_can(tiny_bundle):
    """The thresholds set for a block are restored however it ends; a block that closes the
    Runtime leaves nothing to restore, and the error it raises is the one the caller sees (not
    "this Runtime is closed" from the restore)."""
    from gfnet_edge.calibrate.latency import using_thresholds
    from gfnet_edge.errors import InputError
    from gfnet_edge.runtime import Runtime

    class Boom(Exception):
        pass

    rt = Runtime(tiny_bundle / "bundle", backend="onnxruntime", precision="fp32")
    before = rt.thresholds
    with pytest.raises(Boom):
        with using_thresholds(rt, [0.5] * T):
            assert rt.thresholds == [0.5] * T
            raise Boom
    assert rt.thresholds == before
    with using_thresholds(rt, [0.25] * T):
        rt.close()
    rt = Runtime(tiny_bundle / "bundle", backend="onnxruntime", precision="fp32")
    with pytest.raises(Boom):
        with using_thresholds(rt, [0.5] * T):
            rt.close()
            raise Boom
    with pytest.raises(InputError, match="closed"):  # the block did close it
        rt.thresholds = before


def test_tail_budget_run_manifest_and_deadline_sweep(tiny_bundle, tmp_path, capsys):
    """A p95 budget next to a mean budget: named, fitted, verified (its measured p95 reported next to
    the limit), stored for the runtime, and the report's distribution and deadline-sweep sections."""
    from gfnet_edge.calibrate.sweep import SWEEP_PAD
    from gfnet_edge.runtime import Runtime

    bundle = _fresh(tiny_bundle, tmp_path)
    out = tmp_path / "r"
    # generous limits: every image may run the full model
    rc = _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(out), "--no-compare",
                "--budget", "p95:500", "mean:400", "--default", "p95:500", "--deadlines", "3", *FAST])
    assert rc == 0
    res = json.loads((out / "report.json").read_text())
    b = {x["name"]: x for x in res["budgets"]}
    assert list(b) == ["p95-500.0", "ms-400.0"]
    t = b["p95-500.0"]
    assert t["kind"] == "p95" and t["quantile"] == 0.95 and t["fit"]["fit_exceedance"] == 0.0
    # the limit does not bind: thresholds at least as accurate as "all exit at the glance" (a start of the search)
    assert t["fit"]["fit_accuracy"] >= res["anytime"]["fp32 (fit)"][0] - 1e-9 and t["consistent_with_trace"]
    d = t["measured"]["distribution"]
    assert t["measured"]["statistic_ms"] == pytest.approx(d["p95_ms"]) and d["p50_ms"] <= d["p95_ms"] <= d["max_ms"]
    assert d["over_budget_pct"] == 0.0 and b["ms-400.0"]["measured"]["statistic_ms"] == pytest.approx(
        b["ms-400.0"]["measured"]["mean_ms"])
    assert [a["statistic"] for a in t["attempts"]] == ["p95"] * len(t["attempts"])
    m = Bundle.load(bundle).manifest
    e = m["budgets"]["p95-500.0"]
    assert m["default_budget"] == "p95-500.0" and e["kind"] == "p95" and e["quantile"] == 0.95
    assert e["measured_quantile_ms"] == pytest.approx(t["measured"]["statistic_ms"])
    assert m["budgets"]["ms-400.0"]["kind"] == "mean"
    with Runtime(bundle, backend="onnxruntime", precision="fp32", threads=1) as rt:
        assert rt.budget == "p95-500.0" and rt.thresholds == pytest.approx(t["thresholds"])
    sw = res["deadline_sweep"]
    steps = res["latency"]["budget_batch"]["steps"]
    ds = [r["deadline_ms"] for r in sw["rows"]]
    assert sw["budget"] == "p95-500.0" and len(ds) == 3
    # from the glance's p50 to past the point where the runtime plans the full model for every call
    assert ds[0] == pytest.approx(steps[0]["p50_ms"])
    assert ds[-1] == pytest.approx(steps[-1]["p99_ms"] * (1 + sw["margin"]) * (1 + SWEEP_PAD))
    assert all(1.0 <= r["mean_steps"] <= T and 0 <= r["over_10pct"] <= r["over_pct"] <= 100 for r in sw["rows"])
    html = (out / "report.html").read_text()
    assert "id='distribution'" in html and "id='deadlines'" in html and '<table class="deadlines">' in html
    printed = capsys.readouterr().out.splitlines()
    at = printed.index(next(line for line in printed if line.startswith("deadline sweep (p95-500.0")))
    assert "p95 &lt;= 500.00" in html
    # one terminal line per deadline, in the sweep's order
    assert [line.split(" ms:")[0].strip() for line in printed[at + 1:at + 4]] == [f"{d:.2f}" for d in ds]


def test_infeasible_tail_budget_fails_cleanly(tiny_bundle, tmp_path, capsys):
    err = [line for line in _rejected(tiny_bundle, tmp_path, capsys, ["--budget", "p90:0.001"]).strip().splitlines()
           if not line.startswith("gfnet-edge: WARNING: ")]  # 48 images: the few-images warning
    assert len(err) == 1 and "p90:0.001 ms cannot be met" in err[0] and "smallest feasible p90 budget" in err[0]


def test_deadline_sweep_stops_where_the_deadline_says(tiny_bundle):
    """A deadline nothing fits in stops every image after the glance (accuracy = the glance's, from
    the trace); a deadline everything fits in changes nothing (accuracy = the run without one)."""
    from gfnet_edge.calibrate.latency import forced_exit_thresholds, measure_calls, prepare_frames
    from gfnet_edge.calibrate.sweep import deadline_sweep
    from gfnet_edge.runtime import Runtime
    from gfnet_edge.runtime.deadline import StepCosts

    data = np.load(tiny_bundle / "data.npz")
    x, y = data["images"][:12], data["labels"][:12]
    full = forced_exit_thresholds(T, T - 1)  # no early exit: only the deadline stops an image
    with Runtime(tiny_bundle / "bundle", backend="onnxruntime", precision="fp32", threads=1) as rt:
        rt.set_step_costs(StepCosts.from_cumulative([1.0, 2.0, 3.0]))
        glance = rt.trace(prepare_frames(rt.model, x)).probs[0].argmax(axis=1)
        free = measure_calls(rt, x, full, warmup=0)
        sw = deadline_sweep(rt, x, y, full, "all steps", [1e-3, 1e6])
    tight, loose = sw.rows
    assert tight.mean_steps == 1.0 and tight.stopped_pct == 100.0
    assert tight.accuracy == pytest.approx(100.0 * (glance == y).mean())
    assert loose.mean_steps == T and loose.stopped_pct == 0.0 and loose.over_pct == 0.0
    assert loose.accuracy == pytest.approx(100.0 * (free.classes == y).mean())


def test_report_says_which_budget_to_use_and_what_it_costs_against_the_static_network(calibrated, tiny_bundle):
    """The page opens with the budget to ship and, per budget, its accuracy and speed against each
    static baseline, computed from report.json's measured numbers; the full network's held-out
    accuracy the suggestion compares with is the one computed here from the runtime's trace."""
    from gfnet_edge.calibrate import report

    res = calibrated["res"]
    page = (calibrated["out"] / "report.html").read_text()
    full = _full_network_accuracy(tiny_bundle)
    assert res["full_network_accuracy"] == pytest.approx(full)
    suggested = report.pick_default_budget(res["budgets"], full)  # no --default
    assert res["manifest"]["default_budget"] is None
    # the bundle's default stays the one it was built with, and the terminal and page say so
    assert Bundle.load(tiny_bundle / "bundle").manifest["default_budget"] is None  # built without one
    assert Bundle.load(calibrated["bundle"]).manifest["default_budget"] is None
    kept = "the bundle has no default budget (no early exit)"
    assert res["manifest"]["status"].endswith(f"; {kept} (--default auto makes the suggested one the default; "
                                              "predict --budget NAME picks one)")
    assert kept in page
    assert Bundle.load(calibrated["bundle"]).thresholds(None) is None  # the runtime's thresholds: no exit
    assert page.index("id='choice'") < page.index("id='budgets'")
    assert f"Use {suggested} (" in page.split("id='suggestion'")[1].split("</p>")[0]
    assert "pass --static to compare" in report.choice_sentence(res)
    # a static baseline at twice the GFNet latency and 10 points below: the report's numbers follow report.json's
    b = res["budgets"][0]
    ms, acc = b["measured"]["mean_ms"], b["measured"]["accuracy"]
    static = {"name": "static fp32", "accuracy": acc - 10.0, "technology": {"precision": "fp32", "description": "x"},
              "latency": {"mean_ms": 2 * ms, "p95_ms": 3 * ms}}
    with_static = dict(res, static=[static], manifest=dict(res["manifest"], default_budget=b["name"]),
                       budgets=[dict(b, within_tolerance=True)] + res["budgets"][1:])
    c = report.choice(with_static)
    assert c["suggested"] == b["name"] and "default budget" in c["why"]
    assert c["rows"][0]["vs"]["static fp32"] == {"points": pytest.approx(10.0), "speedup": pytest.approx(2.0)}
    assert report.choice_sentence(with_static).endswith(
        f"+10.00 accuracy points and 2.00x the speed of static fp32 ({acc - 10:.2f} % at {2 * ms:.2f} ms)")
    table = _section(report.render_html(with_static, {}, []), "choice").split("<table", 1)[1].split("</table>")[0]
    assert ">accuracy vs static fp32 (points)</th>" in table and "<td>+10.00</td>" in table
    off = dict(with_static, budgets=[dict(b, within_tolerance=False)] + res["budgets"][1:])
    assert report.choice_sentence(off).endswith(
        f"measured {100 * (b['measured']['statistic_ms'] / b['budget_ms'] - 1):+.1f}% off its budget, outside the "
        "tolerance: calibrate again on an idle device before relying on it)")


def _section(page, anchor):
    """The part of a report page from the heading ``id='anchor'`` to the next heading."""
    return page.split(f"<h2 id='{anchor}'>", 1)[1].split("<h2 ", 1)[0]


def test_the_sweep_says_in_words_which_step_costs_it_planned_with(calibrated):
    """The deadline sweep's note names the step costs the runtime planned with in words: what they
    are (the p99 of how many timed calls, at which batch size) and where they came from (the
    step latency calibrate measured and stored in the manifest), not the manifest's ``source``
    field as it is stored."""
    from html import unescape

    from gfnet_edge.runtime.deadline import STEP_COST_SOURCES

    res = calibrated["res"]
    entry = Bundle.load(calibrated["bundle"]).manifest["step_costs"]["onnxruntime/fp32"]
    words = res["deadline_sweep"]["planned_with"]
    assert words.startswith(STEP_COST_SOURCES[entry["source"]] + " (") and "measured on this device" in words
    for b in entry["batches"]:
        lo, hi = min(b["step_calls"]), max(b["step_calls"])
        assert f"p99 of {lo if lo == hi else f'{lo}-{hi}'} calls at batch {b['batch']}" in words
    note = " ".join(unescape(_section((calibrated["out"] / "report.html").read_text(), "deadlines")).split())
    assert f"planned with {words} and margin" in note and f"{entry['source']} (" not in note


def _headers(page):
    return [h.split(">", 1)[1] for h in page.split("</th>")[:-1]]


def test_report_columns_name_their_unit(calibrated, capsys):
    """Every latency column of the page's tables says ms, every accuracy / agreement column %;
    so does the terminal summary's header."""
    import html as html_mod
    import re

    from gfnet_edge.calibrate.report import summary

    page = (calibrated["out"] / "report.html").read_text()
    headers = [html_mod.unescape(h) for h in _headers(page)]
    assert len(headers) > 30
    latency = [h for h in headers if re.search(r"\b(mean|p50|p90|p95|p99|max|std|expected|measured)\b", h)
               and not re.search(r"vs|accuracy|steps", h)]
    assert latency and all("ms" in h for h in latency), [h for h in latency if "ms" not in h]
    accuracy = [h for h in headers if re.search(r"\b(acc|accuracy|agree|agreement)\b", h)]
    assert accuracy and all("%" in h or "points" in h for h in accuracy), accuracy
    top = summary(calibrated["res"]).splitlines()
    hdr = next(line for line in top if line.startswith("budget "))
    for col in ("expected ms", "mean ms", "p95 ms", "measured ms", "accuracy %"):
        assert col in hdr


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the report's plot functions draw, captured before they are closed."""
    from gfnet_edge.calibrate import plots

    return first_args(monkeypatch, plots, "_png")


def test_latency_cdf_axis_is_not_stretched_by_a_stalled_call(figures):
    """One call 50x slower than the rest leaves the curves readable: the axis ends near the 99.5th
    percentile (past every budget line), the stalled call's time is in the axis label, and the
    title explains only the marks the figure has."""
    from gfnet_edge.calibrate import plots
    from gfnet_edge.calibrate.budgets import Budget

    rng = np.random.default_rng(0)
    fast = list(rng.uniform(0.4, 1.2, 299)) + [60.0]
    plots.latency_cdf({"ms-1.0": fast, "ms-2.0": rng.uniform(0.4, 2.0, 300)},
                      {"ms-1.0": Budget.parse("1.0"), "ms-2.0": Budget.parse("2.0")})
    ax = figures[-1].axes[0]
    assert 2.0 < ax.get_xlim()[1] < 3.0
    assert "60.00 ms" in ax.get_xlabel() and "tail" not in ax.get_title() and "mean budget" in ax.get_title()
    plots.latency_cdf({"p95-1.5": fast}, {"p95-1.5": Budget.parse("p95:1.5")})
    assert "tail budget" in figures[-1].axes[0].get_title() and "mean" not in figures[-1].axes[0].get_title()


def test_distribution_section_explains_the_budget_kinds_the_report_has(calibrated):
    """Mean budgets only: no tail-budget column or explanation, and a line saying why images over
    a mean limit are expected; with a tail budget, its allowed share and explanation."""
    from gfnet_edge.calibrate import report

    res = calibrated["res"]
    mean_only = _section(report.render_html(res, {}, []), "distribution")
    assert "allowed over" not in mean_only and "tail budget (p90" not in mean_only
    assert "share of images over the limit is expected" in mean_only
    tail = dict(res["budgets"][0], kind="p95", quantile=0.95)
    both = _section(report.render_html(dict(res, budgets=[tail] + res["budgets"][1:]), {}, []), "distribution")
    assert "<th>allowed over</th>" in both and "tail budget (p90" in both and "<td>5%</td>" in both


def test_anytime_figure_labels_one_line_and_names_no_single_split(figures):
    """Lines a point apart: only the first (named in the title) carries value labels, so none
    overprint; the y label does not call the fitting split's line held-out."""
    from gfnet_edge.calibrate import plots

    plots.anytime({"int8 (held-out)": [63.7, 89.3, 91.7], "int8 (fit)": [63.0, 86.7, 89.3],
                   "fp32 (held-out)": [63.3, 89.0, 90.7]})
    ax = figures[-1].axes[0]
    assert [t.get_text() for t in ax.texts] == ["63.7", "89.3", "91.7"]
    assert "int8 (held-out)" in ax.get_title() and "held-out" not in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["int8 (held-out)", "int8 (fit)", "fp32 (held-out)"]


def test_anytime_figure_value_labels_stay_inside_the_frame(figures):
    """The labelled line is the highest: its last value label sits above the top point, yet its text
    stays inside the axes with room to spare (and inside the left and right edges)."""
    from gfnet_edge.calibrate import plots

    plots.anytime({"int8 (held-out)": [60.0, 85.0, 92.0], "fp32 (held-out)": [59.0, 84.0, 91.0]})
    fig = figures[-1]
    ax = fig.axes[0]
    fig.canvas.draw()
    box = ax.get_window_extent()
    clear = 4.0 * fig.dpi / 72.0  # pixels of 4 points
    for t in ax.texts:
        e = t.get_window_extent()
        assert e.y1 <= box.y1 - clear and e.y0 >= box.y0 + clear, (t.get_text(), e, box)
        assert e.x0 >= box.x0 + clear and e.x1 <= box.x1 - clear, (t.get_text(), e, box)
    top = max(ax.texts, key=lambda t: t.xy[1])
    assert top.get_text() == "92.0" and ax.get_ylim()[1] > 92.0


def test_deadline_figure_legend_is_below_the_axes_and_static_lines_stay_apart(figures):
    """The legend sits under the axes (over the data it hid the late-call line); two static
    baselines missing every deadline (the same line) differ in marker; the no-deadline accuracy
    line is in the legend."""
    from gfnet_edge.calibrate import plots

    rows = [{"deadline_ms": d, "accuracy": a, "over_10pct": o, "static_miss_pct": {"s fp32": 100.0, "s int8": 100.0}}
            for d, a, o in ((0.4, 64.0, 100.0), (0.8, 88.0, 70.0), (1.2, 88.3, 5.0))]
    plots.deadline_sweep(rows, 91.0, "ms-0.8")
    fig = figures[-1]
    ax, ax2 = fig.axes
    leg = ax.get_legend()
    fig.canvas.draw()
    assert leg.get_window_extent().y1 <= ax.get_window_extent().y0
    assert "GFNet accuracy without a deadline" in [t.get_text() for t in leg.get_texts()]
    s1, s2 = [ln for ln in ax2.lines if ln.get_label().startswith("s ")]
    assert (s1.get_marker(), s1.get_markersize()) != (s2.get_marker(), s2.get_markersize())


def test_stage_figure_cost_mark_is_a_line_its_legend_can_show(figures):
    """cost[k] is drawn as a short line per bar (a 30-point marker overprinted its legend text)."""
    from gfnet_edge.calibrate import plots

    stages = {k: {"glance": {"total_ms": 3.0}, "focus": {"total_ms": 3.0 * k}, "per_image": {"count": 10}}
              for k in range(3)}
    plots.stage_breakdown(stages, [0.35, 0.7, 1.0])
    ax = figures[-1].axes[0]
    marks = [c for c in ax.collections if c.get_label().startswith("cost[k]")]
    assert len(marks) == 1 and [seg[0][1] for seg in marks[0].get_segments()] == pytest.approx([0.35, 0.7, 1.0])
    assert not [ln for ln in ax.lines if ln.get_marker() == "_"]


def test_report_page_explains_its_budget_columns_and_prints_the_load_as_numbers(calibrated):
    import re

    page = (calibrated["out"] / "report.html").read_text()
    load = calibrated["res"]["device"]["load_average"]
    assert f"load average {' / '.join(f'{v:.2f}' for v in load)} at start" in page and "[" not in page.split(
        "load average")[1].split("at end")[0]
    note = next(par for par in page.split("<p") if "“measured” is the" in par)  # the budgets table's note
    for term in ("“always”", "“never”", "“expected mean ms”", "“fit acc”", "“reference-method acc”"):
        assert term in note, term
    assert re.search(r"threshold", note)


def test_gallery_boxes_show_on_an_image_of_their_own_colour_and_tags_do_not_overlap():
    """A red image with focus steps 1 and 2 at the same place and step 3 not run: the run boxes
    are framed in black (visible on red), their number tags sit side by side, and the not-run box
    has black and white dashes."""
    import io

    from PIL import Image

    from gfnet_edge.calibrate.gallery import STEP_COLOURS, card

    S, P, display = 224, 64, 224
    frame = np.zeros((S, S, 3), np.uint8)
    frame[...] = STEP_COLOURS[0]
    png = card(frame, np.array([[40, 40], [40, 40], [120, 120]]), exit_step=2, patch_size=P, display=display)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    right = img[:, display + 6:]
    # the box's left edge at x = 40 (scale 1): black, the last step's colour, black
    assert [tuple(right[60, x]) for x in (39, 41, 43)] == [(0, 0, 0), STEP_COLOURS[1], (0, 0, 0)]
    # the tags of steps 1 and 2 (x 40-52 and 54-66), each in its colour inside a black frame
    assert tuple(right[52, 51]) == STEP_COLOURS[0] and tuple(right[52, 65]) == STEP_COLOURS[1]
    assert tuple(right[53, 51]) == (0, 0, 0) and tuple(right[53, 65]) == (0, 0, 0)
    edge = right[120, 120:120 + P]  # top edge of the not-run box
    colours = {tuple(px) for px in edge}
    assert (0, 0, 0) in colours and (255, 255, 255) in colours


def test_latency_histogram_draws_each_budget_as_an_outline_with_its_limit_in_its_colour(figures):
    from matplotlib.colors import to_rgba

    from gfnet_edge.calibrate import plots

    rng = np.random.default_rng(1)
    plots.latency_histogram({"ms-1.0": rng.uniform(0.4, 1.1, 200), "ms-2.0": rng.uniform(0.5, 2.1, 200)},
                            {"ms-1.0": 1.0, "ms-2.0": 2.0})
    ax = figures[-1].axes[0]
    outlines = [p for p in ax.patches if p.get_label() in ("ms-1.0", "ms-2.0")]
    assert len(outlines) == 2 and all(not p.get_fill() for p in outlines)
    limits = {round(float(line.get_xdata()[0]), 6): line.get_color() for line in ax.lines}
    for p, ms in zip(outlines, (1.0, 2.0)):
        assert np.allclose(to_rgba(limits[ms]), p.get_edgecolor())


@pytest.mark.parametrize("kind", ["mean", "p90", "p95", "p99"])
def test_a_budget_is_compared_with_the_static_networks_same_statistic(kind):
    """The static baseline's per-image latency summary (``LatencyStats.per_image``, as
    ``evaluate_classifier`` records it) gives the statistic a budget of that kind limits: the mean,
    or the smallest latency with at most 10 / 5 / 1 % of the calls slower (counted here)."""
    from gfnet_edge.calibrate import report
    from gfnet_edge.calibrate.latency import LatencyStats

    ms = np.r_[np.random.default_rng(3).gamma(2.0, 1.0, 500), np.full(4, 40.0)]
    static = {"latency": LatencyStats.per_image(ms).to_dict()}
    if kind == "mean":
        want = ms.mean()
    else:
        want = min(v for v in ms if 100 * int((ms > v).sum()) <= (100 - int(kind[1:])) * ms.size)
    assert report._static_ms(static, {"kind": kind}) == pytest.approx(want)


def test_a_stall_the_time_box_left_in_the_p99_is_reported_in_one_line(tiny_bundle, tmp_path, monkeypatch, capsys):
    """The first step-latency measurement gets --latency-seconds as its time box; when a lone stall
    is still in a step's p99 after it (here: step 1's calls replaced by nine of 1 ms and one of
    5 ms), the terminal and the report say so in one line, naming the step and what to do."""
    import html

    from gfnet_edge.calibrate import pipeline
    from gfnet_edge.calibrate.latency import LatencyStats

    real = pipeline.measure_steps
    boxes = []

    def stalled(*args, **kw):
        lat = real(*args, **kw)
        boxes.append((kw["extend_to"], kw["extend_seconds"]))
        if len(boxes) == 1:
            lat.samples[1] = np.r_[np.full(9, 1.0), 5.0]
            lat.steps[1] = LatencyStats.of(lat.samples[1])
        return lat

    monkeypatch.setattr(pipeline, "measure_steps", stalled)
    bundle = _fresh(tiny_bundle, tmp_path)
    out = tmp_path / "r"
    rc = _main(["calibrate", str(bundle), "--data", str(tiny_bundle / "data.npz"), "-o", str(out), "--no-compare",
                "--latency-seconds", "2.5", "--deadlines", "0", *FAST, "--batch-size", "0", "--budget-ms", "500"])
    assert rc == 0
    assert boxes[0] == (300, 2.5) and all(seconds == 2.5 for _, seconds in boxes)  # re-measurements: extend_to 0
    res = json.loads((out / "report.json").read_text())
    assert res["settings"]["latency_seconds"] == 2.5
    warning = res["latency"]["stall_warning"]
    assert "step 1 at batch 1: 1 of 10 calls over 1.5x their median" in warning and "--latency-seconds" in warning
    assert "idle device" in warning and "\n" not in warning
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: a lone stall")]
    assert printed == [f"warning: {warning}"]
    assert f"Warning: {warning}." in html.unescape((out / "report.html").read_text())  # shown as text
    assert res["latency"]["budget_batch"]["lone_stall_steps"] == [1]
