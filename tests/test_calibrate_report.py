"""The calibration report's HTML page (calibrate/report.py + calibrate/templates): text from the user
(bundle, class, budget, checkpoint and data names, paths, technology descriptions, notes) is
escaped by Jinja2 and shows as text, never as markup; a value the templates need and the context
lacks stops the rendering; the templates are installed with the package."""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import jinja2
import markupsafe
import pytest

from gfnet_edge.calibrate import report
from gfnet_edge.calibrate.gallery import GalleryCard

ROOT = Path(__file__).resolve().parents[1]
#: Markup, an ampersand and both quotes: what escaping must turn into text.
EVIL = "<script>alert(1)</script> & \"double\" 'single'"
T = 3


def _stats(ms: float) -> dict:
    return {"mean_ms": ms, "p50_ms": ms, "p95_ms": 1.2 * ms, "p99_ms": 1.5 * ms, "std_ms": 0.1, "n": 20}


def _budget(name: str, ms: float, kind: str = "mean", quantile=None, note=None) -> dict:
    dist = {"mean_ms": ms, "p50_ms": ms, "p90_ms": ms, "p95_ms": ms, "p99_ms": ms, "max_ms": 2 * ms,
            "over_budget_pct": 12.5}
    return {"name": name, "budget_ms": ms, "kind": kind, "quantile": quantile, "thresholds": [0.9, 0.8, -1e8],
            "within_tolerance": note is None, "note": note,
            "measured": {"mean_ms": ms, "p95_ms": ms, "p99_ms": ms, "statistic_ms": ms, "accuracy": 80.0 + ms,
                         "exit_fractions": [0.5, 0.3, 0.2], "distribution": dist},
            "holdout": {"expected_ms": ms, "accuracy": 80.0 + ms}, "reference_method": {"accuracy": 79.0},
            "fit": {"fit_accuracy": 81.0}}


def calibration_result(text: str = "") -> dict:
    """A complete ``report.json`` dictionary (every section of the page shown) whose user-provided
    strings end in ``text``."""
    static = "static_resnet18.pth.tar" + text
    tech = "onnxruntime cpu fp32" + text
    budgets = [_budget("ms-1.0" + text, 1.0), _budget("p95-2.0" + text, 2.0, "p95", 0.95, note="slowed down" + text)]
    stages = {str(k): {"glance": {"total_ms": 10.0, "p50_ms": 0.5, "p95_ms": 0.6, "p99_ms": 0.7, "count": 20},
                       "step": {"total_ms": 5.0 * k, "p50_ms": 0.2, "p95_ms": 0.3, "p99_ms": 0.4, "count": 20 * k},
                       "heads": {"total_ms": 1.0 * k, "p50_ms": 0.1, "p95_ms": 0.1, "p99_ms": 0.1, "count": 20 * k},
                       "per_image": {"count": 20}} for k in range(T)}
    return {
        "bundle": {"path": "/data/bundles/" + text, "model_name": "gfnet" + text, "image_size": 96, "patch_size": 48,
                   "steps": T, "backend": "onnxruntime", "precision": "fp32", "threads": 2},
        "device": {"cpu": "Test CPU" + text, "timed_on": "Test CPU" + text, "cpu_flags": ["avx2"], "cores": 2,
                   "load_average": [0.5, 0.4, 0.3], "load_average_end": [0.6, 0.5, 0.4], "platform": "Linux"},
        "data": {"source": "/data/images/" + text, "fit": 50, "holdout": 50, "skipped_unreadable": 1},
        "created": "2025-01-01T00:00:00+00:00",
        "figures_note": "figures omitted: " + text,
        "manifest": {"default_budget": None, "status": "not written" + text},
        "settings": {"tolerance": [0.1, 0.05], "clock": "wall", "batch": 1, "method": "search", "margin": 0.03},
        "budgets": budgets,
        "static": [{"name": static, "accuracy": 85.0, "latency": {"mean_ms": 3.0, "p95_ms": 3.5, "p99_ms": 4.0},
                    "macs": 2.5e8, "technology": {"precision": "fp32", "description": tech}}],
        "technology": {"gfnet": {"description": "onnxruntime cpu fp32" + text, "precision": "fp32"},
                       "static": [{"description": tech}]},
        "anytime": {"fp32 (held-out)" + text: [60.0, 80.0, 85.0]}, "full_network_accuracy": 85.0,
        "latency": {"budget_batch": {"batch": 1, "steps": [_stats(0.5 * (k + 1)) for k in range(T)],
                                     "retimed_calls": [0, 1, 0], "stages": stages},
                    "other_batch": {"batch": 4, "steps": [_stats(0.3 * (k + 1)) for k in range(T)]},
                    "history": [{"when": "start", "cost_ms": [0.5, 1.0, 1.5]},
                                {"when": "end", "cost_ms": [0.5, 1.0, 1.6]}],
                    "stability": {"spread_pct": 2.0, "warning": "the step latency changed" + text},
                    "stall_warning": "a lone stall" + text, "camera_resize_ms": 0.25},
        "deadline_sweep": {"rows": [{"deadline_ms": d, "accuracy": 70.0, "over_10pct": 1.0, "over_pct": 2.0,
                                     "stopped_pct": 10.0, "mean_steps": 2.0, "p50_ms": d / 2, "p99_ms": d, "max_ms": d,
                                     "static_miss_pct": {static: 50.0}} for d in (1.0, 2.0)],
                           "static_p50_ms": {static: 2.9}, "batch": 1, "budget": budgets[0]["name"],
                           "no_deadline_accuracy": 81.0, "planned_with": "p99 of 20 calls" + text, "margin": 0.05},
        "precisions": {"reference": "fp32" + text, "note": "precision note" + text,
                       "rows": [{"precision": p + text, "anytime_accuracy": [60.0, 80.0, 85.0],
                                 "step_agreement": [100.0, 99.0, 98.0], "cost_ms": [0.5, 1.0, 1.5],
                                 "budgets": {b["name"]: {"accuracy": 80.0, "expected_ms": 1.0, "exit_agreement": 99.0,
                                                         "prediction_agreement": 98.0} for b in budgets}}
                                for p in ("fp32", "int8-cpu")]},
        "method_notes": ["first note" + text, "second note" + text],
    }


def gallery(text: str = "") -> list:
    """Two gallery cards (one wrong); the class names (the page shows class indices) and budget end in ``text``."""
    png = b"\x89PNG\r\n\x1a\n not decoded here"
    return [GalleryCard(index=i, label=f"class {i}{text}", pred=f"class {i + ok}{text}", confidence=0.9, exit_step=1,
                        budget="ms-1.0" + text, correct=not ok, coords=[[0, 0], [8, 8]], png=png)
            for i, ok in enumerate((0, 1))]


class _Page(HTMLParser):
    """Start tags with their attributes, the text, and the contents of <script> elements."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags, self.text, self.scripts, self._in_script = [], [], [], False
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        (self.scripts if self._in_script else self.text).append(data)


def test_user_text_is_escaped_and_shows_as_text():
    res = calibration_result(EVIL)
    page = report.render_html(res, {"anytime": b"png"}, gallery(EVIL))
    assert EVIL not in page and "<script>alert" not in page and "</script> &" not in page
    parsed = _Page(page)
    # the page's own script, nothing else: no element or attribute comes from the user's text
    assert [t for t, _ in parsed.tags if t == "script"] == ["script"]
    assert not any("alert" in s for s in parsed.scripts)
    assert not any("alert" in (v or "") for _, attrs in parsed.tags for v in attrs.values())
    text = "".join(parsed.text)
    # the text shows every string as it was given, in each place the page names it
    for shown in ("gfnet", "/data/bundles/", "/data/images/", "Test CPU", "ms-1.0", "p95-2.0", "slowed down",
                  "static_resnet18.pth.tar", "onnxruntime cpu fp32", "not written", "figures omitted: ",
                  "fp32 (held-out)", "the step latency changed", "a lone stall", "p99 of 20 calls", "precision note",
                  "int8-cpu", "first note", "second note", "class 0", "class 1"):
        assert shown + EVIL in text, shown
    assert text.count(EVIL) > 40
    # table cells hold the names as text too (budgets table, static table)
    assert f"ms-1.0{EVIL}" in text and f"onnxruntime cpu fp32{EVIL}" in text


def test_gallery_cards_name_the_bundles_classes():
    """With the bundle's class names in report.json, each card says which class it is by name
    (as `gfnet-edge predict` does), escaped; without names, the index alone."""
    res = calibration_result()
    cards = [GalleryCard(index=i, label=i, pred=2, confidence=0.9, exit_step=1, budget="ms-1.0", correct=i == 2,
                         coords=[[0, 0], [8, 8]], png=b"\x89PNG\r\n\x1a\n") for i in (1, 2)]
    res["bundle"]["class_names"] = ["blue jay", "grüne Äpfel", "red car " + EVIL]
    text = "".join(_Page(report.render_html(res, {}, cards)).text)
    assert f"label 1 'grüne Äpfel' · predicted 2 'red car {EVIL}'" in " ".join(text.split())
    res["bundle"]["class_names"] = None
    text = " ".join("".join(_Page(report.render_html(res, {}, cards)).text).split())
    assert "label 1 · predicted 2 (0.90)" in text and "grüne" not in text


def test_the_page_without_user_markup_has_every_section():
    page = report.render_html(calibration_result(), {}, gallery())
    for anchor in ("choice", "suggestion", "budgets", "curve", "exits", "distribution", "deadlines", "latency",
                   "precision", "gallery", "method", "warning", "warning1", "figures-note"):
        assert f"id='{anchor}'" in page, anchor
    parsed = _Page(page)
    tables = [a["class"] for t, a in parsed.tags if t == "table"]
    assert tables == ["choice", "budgets", "static", "anytime", "distribution", "deadlines", "steps", "history",
                      "stages", "precision", "precision-budgets"]
    assert [a["class"] for t, a in parsed.tags if t == "img"] == ["card", "card"]  # no figures given
    assert [a.get("class") for t, a in parsed.tags if t == "figure"] == [None, "wrong"]
    assert "1 unreadable files left out" in page and "p95 &lt;= 2.00" in page


def test_a_value_missing_from_the_context_stops_the_rendering():
    """StrictUndefined: a context without a value the template uses raises, naming it, instead of
    rendering an empty string, at the top level and inside a section."""
    ctx = report.page_context(calibration_result(), {}, gallery())
    template = report.environment().get_template("report.html.j2")
    assert "GFNet latency / accuracy calibration: gfnet" in template.render(ctx)
    for key in ctx:
        with pytest.raises(jinja2.UndefinedError, match=key):
            template.render({k: v for k, v in ctx.items() if k != key})
    meta = {k: v for k, v in ctx["meta"].items() if k != "cores"}
    with pytest.raises(jinja2.UndefinedError, match="cores"):
        template.render(dict(ctx, meta=meta))
    with pytest.raises(jinja2.UndefinedError, match="batch"):
        template.render(dict(ctx, sweep={k: v for k, v in ctx["sweep"].items() if k != "batch"}))


def test_the_environment_escapes_and_is_strict():
    env = report.environment()
    assert env.autoescape is True and env.undefined is jinja2.StrictUndefined
    assert env.from_string("{{ x }}").render(x=EVIL) == str(markupsafe.escape(EVIL))


def test_the_templates_are_installed_with_the_package(tmp_path):
    """setup.py's package_data puts every file of calibrate/templates/ into gfnet_edge/calibrate/templates/."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md", "pyproject.toml"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("gfnet_edge", "calibrate", "quantize"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pth.tar"))
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")], cwd=src,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    want = sorted(p.name for p in report.TEMPLATES.iterdir() if p.is_file())
    assert {"report.html.j2", "macros.html.j2", "report.css"} <= set(want)
    assert sorted(p.name for p in (tmp_path / "lib" / "gfnet_edge" / "calibrate" / "templates").iterdir()) == want


def _notes(**kw):
    from gfnet_edge.calibrate.config import CalibrationConfig
    from gfnet_edge.calibrate.pipeline import _method_notes

    return _method_notes(CalibrationConfig(bundle="b", data="demo", output="o", progress=False, **kw), T)


def test_method_notes_explain_tail_budgets_only_when_the_run_has_one():
    """A run with mean budgets only has no tail-budget paragraph (whose 'timed at least 10 / (1 - q)
    times' would name the plain repeats); a run with a p95 budget has it, with 10 / 0.05 = 200 calls."""
    from gfnet_edge.calibrate.budgets import Budget

    assert not any(n.startswith("Tail budgets") for n in _notes(budgets_ms=[1.0, 2.0], repeats=15))
    tail = [n for n in _notes(budgets=[Budget.parse("p95:2.0")], repeats=15) if n.startswith("Tail budgets")]
    assert len(tail) == 1 and "(200 here)" in tail[0]


def test_method_notes_give_the_timed_calls_per_step_the_run_used():
    """With a p99 budget each step is timed 10 / 0.01 = 1000 times, not --repeats (15): the step
    latency paragraph says so."""
    from gfnet_edge.calibrate.budgets import Budget

    step = next(n for n in _notes(budgets=[Budget.parse("p99:2.0")], repeats=15) if n.startswith("Step latency"))
    assert "1000 timed calls per step" in step and "15 timed calls" not in step
    step = next(n for n in _notes(budgets_ms=[2.0], repeats=15) if n.startswith("Step latency"))
    assert "15 timed calls per step" in step


def test_method_notes_do_not_describe_extended_step_timing_with_latency_calls_0():
    """--latency-calls 0 times --repeats calls only (no extension, no lone-stall retiming): the
    step latency paragraph says so instead of 'then every step up to 0 calls'."""
    step = next(n for n in _notes(budgets_ms=[2.0], latency_calls=0) if n.startswith("Step latency"))
    assert "up to 0 calls" not in step and "timed alone" not in step and "--latency-calls 0" in step
    step = next(n for n in _notes(budgets_ms=[2.0]) if n.startswith("Step latency"))
    assert "then every step up to 300 calls" in step and "The call takes the uint8" in step


def test_method_notes_describe_the_deadline_sweep_only_when_there_is_one():
    """--deadlines 0 (no sweep, no Deadline sweep section): no paragraph about '0 of them'."""
    assert not any(n.startswith("Deadline sweep") for n in _notes(budgets_ms=[2.0], deadlines=0))
    sweep = [n for n in _notes(budgets_ms=[2.0]) if n.startswith("Deadline sweep")]
    assert len(sweep) == 1 and "(6 of them)" in sweep[0]
    assert _notes(budgets_ms=[2.0], deadlines=0)[-1].startswith("Budgets are per-image")


def _text(res, figures=None, cards=()):
    return " ".join("".join(_Page(report.render_html(res, figures or {}, list(cards))).text).split())


def test_without_a_static_baseline_the_choice_note_names_no_static_columns():
    """The 'Which budget to use' table has no static columns without --static, so its note does
    not explain a static speed or accuracy points; with a baseline it does."""
    res = calibration_result()
    res["static"], res["technology"] = [], None
    text = _text(res)
    assert "pass --static to compare" in text
    assert "static baseline's speed" not in text and "Accuracy points" not in text
    assert "measured on the held-out images." in text
    text = _text(calibration_result())
    assert "the static baseline's speed is the same statistic" in text and "Accuracy points:" in text


def test_the_sweep_and_the_gallery_say_why_they_show_their_budget():
    """The deadline sweep and the gallery run one budget's thresholds: the default budget, else the
    middle one, which can differ from the budget the page suggests; the page says which applies."""
    res = calibration_result()
    res["budgets"].append(_budget("ms-3.0", 3.0))
    res["deadline_sweep"]["budget"] = "p95-2.0"  # the middle budget, no default set
    cards = [dataclasses.replace(c, budget="p95-2.0") for c in gallery()]
    text = _text(res, cards=cards)
    assert "with the thresholds of p95-2.0 (the middle of the calibrated budgets: no default budget was set with --default;" in text
    assert "Held-out images run with the thresholds of p95-2.0 (the middle of the calibrated budgets" in text
    res["manifest"]["default_budget"] = "p95-2.0"
    text = _text(res, cards=cards)
    assert "with the thresholds of p95-2.0 (the default budget;" in text
    assert "Held-out images run with the thresholds of p95-2.0 (the default budget)." in text
    assert "Held-out images run with" not in _text(res)


def test_the_sweep_method_note_names_no_internal_term():
    sweep = next(n for n in _notes(budgets_ms=[2.0]) if n.startswith("Deadline sweep"))
    assert "featured" not in sweep and "of the default budget (else the middle one)" in sweep


def test_the_sweep_table_counts_steps_run_not_the_exit_step():
    """The sweep's mean_steps counts the glance as 1 (exit_step + 1) while every other table numbers
    steps from 0 ('exit at step 0'): its header says it counts steps run, the glance included."""
    t = report.page_context(calibration_result(), {}, gallery())["sweep"]["table"]
    headers = [h.text for h in t.headers]
    col = next(i for i, h in enumerate(headers) if h.startswith("mean steps"))
    assert headers[col] == "mean steps run (glance = 1)" and t.rows[0][col].text == "2.00"


def test_the_stage_table_says_its_mean_is_per_predict_call_not_per_stage_call():
    """The stage table's first figure is a stage's total time over the profiled predict calls
    (a focus stage runs once per focus step of each call), next to percentiles per stage call:
    exit at 2, 'step' ran 40 times in 20 calls for 10 ms, so 0.5 ms per predict call."""
    t = report.page_context(calibration_result(), {}, gallery())["latency"]["stages"]
    headers = [h.text for h in t.headers]
    assert headers[2] == "mean ms per predict call" and headers[3] == "p50 ms (per stage call)"
    row = next(r for r in t.rows if r[0].text == "exit at 2" and r[1].text == "step")
    assert row[2].text == "0.500" and row[-1].text == "40"


def test_the_page_spells_out_the_models_sizes_instead_of_S_P_T():
    """The header and the gallery note give the input size, patch size and steps in words and
    pixels, not the letters S, P and T that the page never defines."""
    text = _text(calibration_result(), cards=gallery())
    assert "S=96" not in text and "P=48" not in text and "T=3" not in text and "P x P" not in text
    assert "input 96x96 px, glance and focus patches 48x48 px, 3 steps (step 0: the glance)" in text
    assert "Left: the glance (the whole image at 48 x 48 px)." in text
    assert not any("S x S" in n for n in _notes(budgets_ms=[2.0]))


def test_a_single_budget_is_suggested_as_the_only_one():
    """With one budget there is no 'cheapest within 1 point of the best' to pick: the suggestion
    says it is the only budget calibrated."""
    res = calibration_result()
    res["budgets"] = res["budgets"][:1]
    res["full_network_accuracy"] = 81.5  # ms-1.0's 81 % is within a point of it
    text = _text(res)
    assert "Use ms-1.0 (the only budget calibrated): 81.00 % at 1.00 ms mean per image" in text
    assert "within 1 point of the best" not in text
    res["full_network_accuracy"] = 85.0  # and says so when it is not
    assert "Use ms-1.0 (the only budget calibrated; it is not within 1 point of the full network's held-out " \
        "accuracy of 85.00 %): 81.00 % at 1.00 ms" in _text(res)
    assert "within 1 point of the best" in _text(calibration_result())


def test_budgets_of_different_kinds_are_ranked_by_measured_mean_latency():
    """A p95 limit and a mean limit in ms do not compare: p95-2.5 measured 1.46 ms mean per image and
    ms-1.6 1.55 ms at the same accuracy, so p95-2.5 is the cheaper one to suggest (ranking by the
    limits, 1.6 < 2.5, picked the slower budget and called it the cheapest)."""
    res = calibration_result()
    tail, mean = _budget("p95-2.5", 2.5, "p95", 0.95), _budget("ms-1.6", 1.6)
    tail["measured"].update(mean_ms=1.46, p95_ms=1.71, statistic_ms=1.71, accuracy=90.0)
    mean["measured"].update(mean_ms=1.55, p95_ms=1.74, statistic_ms=1.55, accuracy=90.0)
    tail["holdout"]["accuracy"] = mean["holdout"]["accuracy"] = 90.0
    res["budgets"] = [mean, tail]
    assert report.pick_default_budget(res["budgets"]) == "p95-2.5"
    assert "Use p95-2.5 (the fastest budget, by measured mean ms per image, within 1 point" in _text(res)
    # budgets of one kind: still the smallest limit
    res["budgets"] = [_budget("ms-2.0", 2.0), _budget("ms-1.0", 1.0)]
    for b in res["budgets"]:
        b["holdout"]["accuracy"] = 90.0
    assert report.pick_default_budget(res["budgets"]) == "ms-1.0"


def test_no_compare_says_the_other_precisions_were_not_compared():
    """--no-compare on a bundle with FP32 and INT8 graphs: the precision section says the other
    precisions were not compared and why, not a bare 'comparison skipped'."""
    from types import SimpleNamespace

    from gfnet_edge.calibrate.compare import compare_precisions
    from gfnet_edge.calibrate.config import CalibrationConfig

    bundle = SimpleNamespace(manifest={"graphs": {"fp32": {}, "int8-cpu": {}}})
    cfg = CalibrationConfig(bundle="b", data="demo", output="o", compare_precisions=False, progress=False)
    prec = compare_precisions(bundle, "onnxruntime", "int8-cpu", None, None, None, None, None, {}, cfg, None)
    res = calibration_result()
    res["precisions"] = prec
    text = _text(res)
    assert "The bundle's other precisions were not compared (--no-compare)." in text
    assert "comparison skipped" not in text


def test_without_gallery_cards_the_gallery_section_explains_no_images():
    """--gallery 0: no note about the cards' left and right images, and no empty card row."""
    page = report.render_html(calibration_result(), {}, [])
    text = " ".join("".join(_Page(page).text).split())
    assert "Left: the glance" not in text and "No gallery images (--gallery 0)." in text
    assert "<div class='gallery'>" not in page
    assert "Left: the glance" in _text(calibration_result(), cards=gallery())


def test_without_figures_the_exit_section_points_to_the_table_with_its_numbers():
    """A report without matplotlib ('the tables hold the same numbers'): the exit-step section, which
    has no table of its own, is not left empty but names the column that holds the exit shares."""
    page = report.render_html(calibration_result(), {}, [])
    exits = page.split("<h2 id='exits'>")[1].split("<h2")[0]
    assert "“exits % per step” column" in exits
    page = report.render_html(calibration_result(), {"exit_histogram": b"png"}, [])
    exits = page.split("<h2 id='exits'>")[1].split("<h2")[0]
    assert "<img" in exits and "exits % per step" not in exits


def _table_of(t) -> list:
    """A page table as {header: cell text} per row."""
    return [{h.text: c.text for h, c in zip(t.headers, r)} for r in t.rows]


def test_the_static_table_shows_the_percentiles_the_budgets_are_compared_in():
    """A p99 budget is compared with the static network's p99 (the choice table's speed-up), so the
    static table shows that percentile next to the mean, with p90 and p95, each from the baseline's
    latency record; a percentile a budget limits and the record lacks shows as '–'."""
    res = calibration_result()
    res["budgets"] = [_budget("ms-1.0", 1.0), _budget("p99-2.0", 2.0, "p99", 0.99)]
    res["static"][0]["latency"] = {"mean_ms": 3.0, "p90_ms": 3.3, "p95_ms": 3.5, "p99_ms": 4.0}
    [row] = _table_of(report.page_context(res, {}, [])["static"]["table"])
    assert {k: row[k] for k in ("mean ms", "p90 ms", "p95 ms", "p99 ms")} == \
        {"mean ms": "3.00", "p90 ms": "3.30", "p95 ms": "3.50", "p99 ms": "4.00"}
    # the choice table's speed-up of p99-2.0 is the same p99: 4.0 / 2.0
    choice = _table_of(report.page_context(res, {}, [])["choice"]["table"])
    assert choice[1][f"speed vs {res['static'][0]['name']} (x, higher is faster)"] == "2.00x"
    res["budgets"].append(_budget("p90-1.5", 1.5, "p90", 0.90))
    del res["static"][0]["latency"]["p90_ms"]
    [row] = _table_of(report.page_context(res, {}, [])["static"]["table"])
    assert row["p90 ms"] == "–" and row["p99 ms"] == "4.00"


def _summary_table(text: str, n: int) -> list:
    """The ``n`` rows of the terminal summary's budgets table as {header: cell} (columns cut where
    the header's words start: the table is left-aligned, two spaces between columns)."""
    import re

    lines = text.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("budget  "))
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", lines[top])]
    cut = lambda line: [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]  # noqa: E731
    return [dict(zip(cut(lines[top]), cut(line))) for line in lines[top + 1:top + 1 + n]]


def test_the_terminal_summary_shows_the_static_row_in_the_latency_columns_of_the_gfnet_rows():
    """The static baseline's row of the terminal summary fills each latency column a GFNet row
    fills (mean, p90, p95, p99: what the HTML static table shows), each from the baseline's latency
    record, so a p99 budget's measured p99 stands next to the static network's p99."""
    res = calibration_result()
    res["budgets"] = [_budget("ms-1.0", 1.0), _budget("p99-2.0", 2.0, "p99", 0.99)]
    for b in res["budgets"]:
        b["measured"]["p90_ms"] = 0.9 * b["budget_ms"]
    res["static"][0]["latency"] = {"mean_ms": 3.0, "p90_ms": 3.3, "p95_ms": 3.5, "p99_ms": 4.0}
    rows = _summary_table(report.summary(res), 3)
    assert [r["budget"] for r in rows] == ["ms-1.0", "p99-2.0", res["static"][0]["name"]]
    *gfnet, static = rows
    filled = [h for h in rows[0] if h.endswith(" ms") and h != "expected ms" and h != "measured ms"
              and all(r[h] not in ("", "–") for r in gfnet)]
    assert filled == ["mean ms", "p90 ms", "p95 ms", "p99 ms"]
    assert {h: static[h] for h in filled} == {"mean ms": "3.00", "p90 ms": "3.30", "p95 ms": "3.50", "p99 ms": "4.00"}
    assert gfnet[1]["p99 ms"] == gfnet[1]["measured ms"] == "2.00"


def test_the_suggestion_is_the_fastest_budget_within_a_point_of_the_full_network():
    """Of ms-1.0 (88.5 %), ms-2.0 (89.4 %, 1.95 ms measured) and ms-3.0 (89.5 %, 2.9 ms), with the
    full network at 90 % held-out: ms-1.0 is within a point of the best budget but 1.5 points
    below the full network, so the page suggests ms-2.0, the fastest of the two within a point of
    the full network, and says by which rule. With the full network at 95 % none is within a
    point: the page says so and suggests the cheapest within a point of the best budget, ms-1.0."""
    res = calibration_result()
    res["budgets"] = [_budget("ms-1.0", 1.0), _budget("ms-2.0", 2.0), _budget("ms-3.0", 3.0)]
    for b, acc, ms in zip(res["budgets"], (88.5, 89.4, 89.5), (1.0, 1.95, 2.9)):
        b["holdout"]["accuracy"] = b["measured"]["accuracy"] = acc
        b["measured"]["mean_ms"] = b["measured"]["statistic_ms"] = ms
    res["full_network_accuracy"] = 90.0
    rule = "the fastest budget, by measured mean ms per image, within 1 point of the full network's held-out " \
           "accuracy of 90.00 %"
    assert f"Use ms-2.0 ({rule}): 89.40 % at 1.95 ms mean per image" in _text(res)
    assert f"suggested: use ms-2.0 ({rule})" in report.summary(res)
    # --default auto wrote that budget as the default: the page still names the rule
    res["settings"]["default"], res["manifest"]["default_budget"] = "auto", "ms-2.0"
    assert f"Use ms-2.0 ({rule}; --default auto made it the manifest's default budget)" in _text(res)
    res["settings"]["default"], res["manifest"]["default_budget"] = "ms-3.0", "ms-3.0"  # a default given by name
    assert "Use ms-3.0 (the default budget written to the manifest)" in _text(res)
    res["settings"]["default"], res["manifest"]["default_budget"] = None, None
    res["full_network_accuracy"] = 95.0
    assert "Use ms-1.0 (no budget is within 1 point of the full network's held-out accuracy of 95.00 %, so the " \
           "cheapest budget within 1 point of the best budget's held-out accuracy): 88.50 %" in _text(res)
