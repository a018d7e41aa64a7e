"""The calibration report: ``report.json`` (every number), ``report.html`` (self-contained) and a
terminal summary."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np

from gfnet_edge.bundle import finite_or_null
from gfnet_edge.errors import InputError

if TYPE_CHECKING:
    from .gallery import GalleryCard

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1300px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:13px} table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right} th{background:#f3f3f3}
td.l,th.l{text-align:left} .ok{color:#11772b;font-weight:600} .bad{color:#b00020;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start} .plots img{border:1px solid #eee}
.gallery{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0;border:1px solid #ddd;padding:6px;background:#fafafa}
figure.wrong{border-color:#d66} figcaption{font-size:12px;color:#333;margin-top:4px}
.note{font-size:12px;color:#555;max-width:1000px}
"""


def _technology(s: Dict[str, Any]) -> str:
    t = s.get("technology")
    return t["description"] if t else "onnxruntime cpu fp32"


def format_technology_line(gfnet: str, static: Sequence[str]) -> str:
    """How both sides ran, from their technology descriptions (each static one once):
    ``GFNet: torch cuda fp16, captured; static: torch cuda fp16, captured``."""
    return f"GFNet: {gfnet}; static: {'; '.join(dict.fromkeys(static))}"


def technology_line(res: Dict[str, Any]) -> str:
    """The technology line of a report (:func:`format_technology_line` of its ``technology``)."""
    t = res["technology"]
    return format_technology_line(t["gfnet"]["description"], [x["description"] for x in t["static"]])


def _img(png: bytes, alt: str, cls: str = "plot") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "", left: int = 1) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(str(h))}</th>' for i, h in enumerate(headers))
    body = []
    for r in rows:
        tds = []
        for i, v in enumerate(r):
            if isinstance(v, tuple):  # (text, css class)
                tds.append(f'<td class="{v[1]}{" l" if i < left else ""}">{html.escape(str(v[0]))}</td>')
            else:
                tds.append(f'<td class="{"l" if i < left else ""}">{html.escape(str(v))}</td>')
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _load(values: Optional[Sequence[float]]) -> str:
    """A load average (1, 5, 15 minutes) as text: ``1.2 / 0.9 / 0.7``."""
    return "not read" if not values else " / ".join(f"{v:.2f}" for v in values)


def _f(x: Optional[float], nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _thr(t: Sequence[float]) -> str:
    out = []
    for v in t:
        out.append("never" if v >= 1e7 else "always" if v <= -1e7 else f"{v:.3f}")
    return ", ".join(out)


def _exits(fr: Sequence[float]) -> str:
    return " / ".join(f"{100 * f:.0f}" for f in fr)


def _budget_row(b: Dict[str, Any]) -> Dict[str, Any]:
    """One budget's cells: name, limit, thresholds, expected / measured ms, accuracy, exits."""
    m = b["measured"]
    kind = b.get("kind", "mean")
    stat = m.get("statistic_ms", m["mean_ms"])
    ok = b["within_tolerance"]
    return {"budget": b["name"], "limit": f"{kind} <= {_f(b['budget_ms'])}", "thresholds": _thr(b["thresholds"]),
            "expected": _f(b["holdout"]["expected_ms"]), "mean": _f(m["mean_ms"]), "p95": _f(m["p95_ms"]),
            "p99": _f(m["p99_ms"]), "measured": _f(stat),
            "vs": (f"{100 * (stat / b['budget_ms'] - 1):+.1f}%", "ok" if ok else "bad"),
            "accuracy": _f(m["accuracy"]), "reference": _f(b["reference_method"]["accuracy"]),
            "fit": _f(b["fit"]["fit_accuracy"]), "exits": _exits(m["exit_fractions"])}


#: Column key -> header of the budgets table (report page).
BUDGET_COLUMNS = {"budget": "budget", "limit": "limit", "thresholds": "thresholds (per step)",
                  "expected": "expected mean ms", "mean": "measured mean ms", "p95": "p95 ms", "p99": "p99 ms",
                  "measured": "measured ms (the statistic the limit bounds)", "vs": "measured vs budget", "accuracy": "accuracy %",
                  "reference": "reference-method acc %", "fit": "fit acc %", "exits": "exits % per step"}
BUDGET_HEADERS = list(BUDGET_COLUMNS.values())


def budget_rows(res: Dict[str, Any]) -> List[List[Any]]:
    """The budgets table's rows, in :data:`BUDGET_COLUMNS` order."""
    return [[row[k] for k in BUDGET_COLUMNS] for row in map(_budget_row, res["budgets"])]


#: The suggested budget gives up at most this many points of held-out accuracy (when no default is set).
DEFAULT_BUDGET_SLACK = 1.0


def pick_default_budget(budgets: List[Dict[str, Any]], slack: float = DEFAULT_BUDGET_SLACK) -> str:
    """The cheapest calibrated budget whose held-out accuracy is within ``slack`` points of the
    most accurate one (calibration reports list budgets cheapest first)."""
    if not budgets:
        raise InputError("calibration produced no budgets")
    acc = [float(b["holdout"]["accuracy"]) for b in budgets]
    best = max(acc)
    for b, a in sorted(zip(budgets, acc), key=lambda ba: float(ba[0]["budget_ms"])):
        if a >= best - slack:
            return str(b["name"])
    return str(budgets[int(np.argmax(acc))]["name"])


def _static_ms(s: Dict[str, Any], b: Dict[str, Any]) -> float:
    """The static baseline's latency in the statistic budget ``b`` limits (its mean, or p90 / p95 /
    p99); NaN for a report that did not record that percentile."""
    kind = b.get("kind", "mean")
    return float(s["latency"].get(f"{kind}_ms", float("nan")))


def like_for_like_static(res: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The static baseline in GFNet's own precision (INT8 static for INT8 GFNet), else the first one."""
    prec = res["technology"]["gfnet"]["precision"] if res.get("technology") else None
    return next((s for s in res["static"] if (s.get("technology") or {}).get("precision") == prec),
                res["static"][0] if res["static"] else None)


def choice(res: Dict[str, Any]) -> Dict[str, Any]:
    """What each budget costs against each static baseline, and the budget to ship.

    Returns:
        ``{"suggested": name, "why": text, "rows": [{budget, limit, ms, accuracy,
        vs: {static name: {"points": accuracy - static accuracy, "speedup": static ms / GFNet ms}}}]}``;
        ms is the measured statistic the budget limits (mean, or its percentile), the static baseline's
        the same statistic of its calls.
    """
    default = res["manifest"].get("default_budget")
    rows = []
    for b in res["budgets"]:
        ms, acc = b["measured"].get("statistic_ms", b["measured"]["mean_ms"]), b["measured"]["accuracy"]
        rows.append({"budget": b["name"], "limit": f"{b.get('kind', 'mean')} <= {_f(b['budget_ms'])}", "ms": ms,
                     "accuracy": acc, "vs": {s["name"]: {"points": acc - s["accuracy"], "speedup": _static_ms(s, b) / ms}
                                             for s in res["static"]}})
    if default:
        return {"suggested": default, "why": "the default budget written to the manifest", "rows": rows}
    return {"suggested": pick_default_budget(res["budgets"]), "rows": rows,
            "why": f"the cheapest budget whose held-out accuracy is within {DEFAULT_BUDGET_SLACK:g} point of the best"}


def choice_sentence(res: Dict[str, Any], c: Optional[Dict[str, Any]] = None) -> str:
    """One line: the budget to ship, its latency and accuracy, and what it costs against the
    like-for-like static baseline (``c``: :func:`choice` of ``res`` when the caller has it)."""
    c = c or choice(res)
    r = next(x for x in c["rows"] if x["budget"] == c["suggested"])
    stat = r["limit"].split(" ")[0]
    text = f"use {r['budget']} ({c['why']}): {r['accuracy']:.2f} % at {r['ms']:.2f} ms {stat} per image"
    b = next(x for x in res["budgets"] if x["name"] == r["budget"])
    caveat = ("" if b["within_tolerance"] else
              f" (measured {100 * (r['ms'] / b['budget_ms'] - 1):+.1f}% off its budget, outside the tolerance: "
              "calibrate again on an idle device before relying on it)")
    s = like_for_like_static(res)
    if s is None:
        return text + " (pass --static to compare with a static network)" + caveat
    v = r["vs"][s["name"]]
    return (text + f", {v['points']:+.2f} accuracy points and {v['speedup']:.2f}x the speed of {s['name']} "
                   f"({s['accuracy']:.2f} % at {_static_ms(s, b):.2f} ms)" + caveat)


def _choice_section(res: Dict[str, Any]) -> List[str]:
    """Which budget to ship, and each budget's accuracy and speed against the static baselines."""
    c = choice(res)
    names = [s["name"] for s in res["static"]]
    rows = [[(r["budget"], "ok") if r["budget"] == c["suggested"] else r["budget"], r["limit"], _f(r["ms"]),
             _f(r["accuracy"])] + [x for n in names for x in (f"{r['vs'][n]['points']:+.2f}",
                                                               f"{r['vs'][n]['speedup']:.2f}x")] for r in c["rows"]]
    hdr = ["budget", "limit", "measured ms", "accuracy %"] + [
        x for n in names for x in (f"accuracy vs {n} (points)", f"speed vs {n} (x, higher is faster)")]
    text = choice_sentence(res, c)
    return ["<h2 id='choice'>Which budget to use</h2>",
            f"<p id='suggestion'><b>{html.escape(text[0].upper() + text[1:])}.</b></p>",
            _table(hdr, rows, "choice", left=2),
            "<p class='note'>measured ms: the statistic the budget limits (the mean per image, or its percentile for "
            "a tail budget), measured on the held-out images; the static baseline's speed is the same statistic of "
            "its calls, at the same batch size. Accuracy points: GFNet's held-out accuracy minus the static "
            "network's on the same images (negative: GFNet is less accurate).</p>"]


def _distribution_section(res: Dict[str, Any], figures: Dict[str, bytes]) -> List[str]:
    """Per budget: the measured per-image latency distribution with its percentiles."""
    parts = ["<h2 id='distribution'>Latency distribution per budget (held-out, measured)</h2><div class='plots'>",
             _fig(figures, "latency_cdf", "latency distribution per budget (CDF)"),
             _fig(figures, "latency_histogram", "measured latency distribution"), "</div>"]
    rows = []
    tail = any(b.get("quantile") is not None for b in res["budgets"])
    for b in res["budgets"]:
        d = b["measured"].get("distribution", {})
        if not d:
            continue
        q = b.get("quantile")
        rows.append([b["name"], f"{b.get('kind', 'mean')} <= {_f(b['budget_ms'])}", _f(d["mean_ms"], 3),
                     _f(d["p50_ms"], 3), _f(d["p90_ms"], 3), _f(d["p95_ms"], 3), _f(d["p99_ms"], 3),
                     _f(d["max_ms"], 3), f"{d['over_budget_pct']:.1f}%"] +
                    [f"{100 * (1 - q):.0f}%" if q is not None else "–"] * tail)
    parts.append(_table(["budget", "limit", "mean ms", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "max ms",
                         "images over the limit"] + ["allowed over"] * tail, rows, "distribution", left=2))
    notes = []
    if any(b.get("kind", "mean") == "mean" for b in res["budgets"]):
        notes.append("A mean budget bounds the average: images that run more steps take longer than the limit, "
                     "cheaper ones make up for them, so a share of images over the limit is expected; bound the "
                     "tail with a percentile budget (--budget p95:MS) when every image matters.")
    if tail:
        notes.append("A tail budget (p90, p95, p99) bounds that percentile of the per-image latency: at "
                     "most 10 / 5 / 1 % of the images may take longer than the limit. Its thresholds are fitted with "
                     "the share of each step's latency measurements above the limit (minus the safety margin), so "
                     "that the expected share of slower images stays within the allowed share; the table shows what "
                     "the runtime then measured on the held-out images. Its p95 is the smallest measured latency "
                     "with at most 5 % of the images slower (p90, p99 alike), the statistic the budget limits.")
    parts.append(f"<p class='note'>{' '.join(notes)}</p>")
    return parts


def _sweep_section(res: Dict[str, Any], figures: Dict[str, bytes]) -> List[str]:
    """GFNet under per-call deadlines next to the static baselines' miss rate."""
    sw = res.get("deadline_sweep")
    if not sw or not sw["rows"]:
        return []
    names = sorted({k for r in sw["rows"] for k in r["static_miss_pct"]})
    rows = [[_f(r["deadline_ms"]), _f(r["accuracy"]), f"{r['over_10pct']:.1f}%", f"{r['over_pct']:.1f}%",
             f"{r['stopped_pct']:.0f}%", _f(r["mean_steps"]), _f(r["p50_ms"]), _f(r["p99_ms"]), _f(r["max_ms"])] +
            [f"{r['static_miss_pct'][n]:.0f}%" for n in names] for r in sw["rows"]]
    static_p50 = ", ".join(f"{n} p50 {_f(v)} ms" for n, v in sw["static_p50_ms"].items())
    return ["<h2 id='deadlines'>Deadline sweep</h2><div class='plots'>",
            _fig(figures, "deadline_sweep", "accuracy and miss rate vs deadline"), "</div>",
            _table(["deadline ms", "GFNet accuracy %", "calls > deadline + 10 %", "calls > deadline", "stopped early",
                    "mean steps", "p50 ms", "p99 ms", "max ms"] + [f"{n}: calls > deadline" for n in names], rows,
                   "deadlines"),
            f"<p class='note'>Each held-out image (batch {sw['batch']} per call) runs through "
            f"<code>Runtime.predict(x, deadline_ms=D)</code> with the thresholds of {html.escape(sw['budget'])} "
            f"(accuracy without a deadline: {_f(sw.get('no_deadline_accuracy'))} %), planned with the step "
            f"latency measured above ({html.escape(sw.get('planned_with') or 'p99')}) and margin {sw['margin']:g}; "
            "the times are wall-clock per call. The glance "
            "always runs, so a deadline below its latency cannot be met. The deadlines run from the glance's p50 to "
            "past the full model's p99 with the margin (from there the runtime plans every step) and on to past the "
            "slowest static baseline's p99 call when that is later. A static network has one answer at the end: "
            "its miss rate is the share of its measured calls slower than D, on the wall clock too"
            f"{' (' + html.escape(static_p50) + ')' if static_p50 else ' (pass --static to compare)'}.</p>"]


def _fig(figures: Dict[str, bytes], key: str, alt: str) -> str:
    """A figure's ``<img>``, or nothing when the report has no figures (no matplotlib)."""
    return _img(figures[key], alt) if key in figures else ""


def render_html(res: Dict[str, Any], figures: Dict[str, bytes], gallery: Sequence[GalleryCard]) -> str:
    """The self-contained HTML page (figures and gallery cards inlined as base64 PNG)."""
    b = res["bundle"]
    dev = res["device"]
    lat = res["latency"]
    T = b["steps"]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>GFNet calibration: "
             f"{html.escape(b['model_name'])}</title><style>{CSS}</style></head><body>"]
    parts.append(f"<h1>GFNet latency / accuracy calibration: {html.escape(b['model_name'])}</h1>")
    parts.append(
        f"<div class='meta'>bundle <code>{html.escape(b['path'])}</code> · S={b['image_size']} P={b['patch_size']} "
        f"T={T} · {html.escape(b['backend'])} / {html.escape(b['precision'])} · threads {b['threads'] or 'default'}<br>"
        f"device: {html.escape(str(dev.get('timed_on', dev['cpu'])))} ({html.escape(', '.join(dev.get('cpu_flags') or []) or 'no flags read')}; "
        f"{dev['cores']} cores, load average {_load(dev.get('load_average'))} at "
        f"start, {_load(dev.get('load_average_end'))} at end) · {html.escape(dev['platform'])} · "
        f"data: {html.escape(res['data']['source'])} ({res['data']['fit']} fit / {res['data']['holdout']} held-out"
        + (f"; {res['data']['skipped_unreadable']} unreadable files left out" if res['data'].get('skipped_unreadable') else "")
        + ") · "
        f"{html.escape(res['created'])}</div>")

    for i, warn in enumerate(latency_warnings(lat)):
        parts.append(f"<p class='bad' id='warning{i or ''}'>Warning: {html.escape(warn)}.</p>")
    if res.get("figures_note"):
        parts.append(f"<p class='note' id='figures-note'>{html.escape(res['figures_note'])}; the tables hold the "
                     "same numbers.</p>")
    parts.extend(_choice_section(res))
    parts.append("<h2 id='budgets'>Budgets (held-out, measured by running the runtime)</h2>")
    parts.append(_table(BUDGET_HEADERS, budget_rows(res), "budgets"))
    for r in res["budgets"]:
        if r.get("note"):
            parts.append(f"<p class='bad'>{html.escape(r['name'])}: {html.escape(r['note'])}.</p>")
    tol = res["settings"]["tolerance"]
    clock = "wall-clock" if res["settings"].get("clock", "wall") == "wall" else "calling-thread CPU"
    parts.append(f"<p class='note'>“measured” is the {clock} time per image of <code>Runtime.predict</code> "
                 f"at batch {res['settings']['batch']} on the held-out images with the chosen thresholds: its mean "
                 "for a mean budget, its percentile for a tail budget (p95 ...); "
                 f"green when within [{-100 * tol[0]:.0f}%, +{100 * tol[1]:.0f}%] of the budget. "
                 f"Thresholds: {html.escape(res['settings']['method'])} method, fitted on the fitting split with "
                 f"the measured step latency, safety margin {100 * res['settings']['margin']:.0f}%: an image "
                 "exits at step k when its highest class probability reaches the step's threshold (“always”: "
                 "every image still running exits there; “never”: none does). “expected mean ms”: what the fit "
                 "predicts from the exit fractions and the step latency; “fit acc”: accuracy on the fitting split; "
                 "“reference-method acc”: the paper's threshold rule at the same budget, for comparison. "
                 f"Manifest: {html.escape(res['manifest']['status'])}.</p>")
    if res["static"]:
        rows = [[s["name"], _f(s["latency"]["mean_ms"]), _f(s["latency"]["p95_ms"]), _f(s["accuracy"]),
                 f"{s['macs'] / 1e6:.0f}M" if s.get("macs") else "–", _technology(s)] for s in res["static"]]
        parts.append("<h3>Static baseline</h3>" + _table(["model", "mean ms", "p95 ms", "accuracy %", "MACs", "runs on"],
                                                          rows, "static"))
        if res.get("technology"):
            parts.append(f"<p class='note'>{html.escape(technology_line(res))}.</p>")

    parts.append("<h2 id='curve'>Accuracy vs latency</h2><div class='plots'>")
    parts.append(_fig(figures, "accuracy_latency", "accuracy vs mean latency"))
    parts.append(_fig(figures, "anytime", "anytime accuracy per step"))
    parts.append("</div>")
    anyt = res["anytime"]
    rows = [[name] + [_f(a) for a in acc] for name, acc in anyt.items()]
    parts.append(_table(["anytime accuracy %"] + [f"step {k}" for k in range(T)], rows, "anytime"))

    parts.append("<h2 id='exits'>Exit steps per budget</h2><div class='plots'>")
    parts.append(_fig(figures, "exit_histogram", "exit-step histogram per budget"))
    parts.append("</div>")
    parts.extend(_distribution_section(res, figures))
    parts.extend(_sweep_section(res, figures))

    parts.append("<h2 id='latency'>Latency per step and stage</h2>")
    rows = []
    for key in ("budget_batch", "other_batch"):
        if lat.get(key):
            alone = lat[key].get("retimed_calls") or [0] * len(lat[key]["steps"])
            for k, s in enumerate(lat[key]["steps"]):
                rows.append([f"batch {lat[key]['batch']}", f"exit at step {k}", _f(s["mean_ms"], 3), _f(s["p50_ms"], 3),
                             _f(s["p95_ms"], 3), _f(s["p99_ms"], 3), _f(s["std_ms"], 3), s["n"], alone[k]])
    parts.append(_table(["batch", "work", "mean ms/img", "p50 ms/img", "p95 ms/img", "p99 ms/img", "std ms/img", "calls",
                         "of them timed alone (lone stall)"], rows, "steps", left=2))
    hist = lat.get("history") or []
    if len(hist) > 1:
        rows = [[h["when"]] + [_f(c, 3) for c in h["cost_ms"]] for h in hist]
        parts.append("<p class='note'>Step latency measured again during the run (mean ms per image at batch "
                     f"{res['settings']['batch']}); spread of the full model's median call: "
                     f"{lat['stability']['spread_pct']:.1f}%.</p>")
        parts.append(_table(["measurement"] + [f"cost[{k}]" for k in range(T)], rows, "history"))
    parts.append("<div class='plots'>" + _fig(figures, "stage_breakdown", "latency breakdown per stage") + "</div>")
    st_rows = []
    for k, stages in sorted(lat["budget_batch"]["stages"].items(), key=lambda kv: int(kv[0])):
        calls = max(1, stages.get("per_image", {}).get("count", 1))
        for name, s in stages.items():
            if name == "per_image":
                continue
            st_rows.append([f"exit at {k}", name, _f(s["total_ms"] / calls, 3), _f(s["p50_ms"], 3), _f(s["p95_ms"], 3),
                            _f(s["p99_ms"], 3), s["count"]])
    parts.append(_table(["work", "stage", "ms per call", "p50 ms (per stage call)", "p95 ms", "p99 ms", "stage calls"], st_rows,
                        "stages", left=2))
    if any("step" in st and "heads" in st for st in lat["budget_batch"]["stages"].values()):
        parts.append("<p class='note'>Host loop: <code>step</code> is the one native call between two backbone "
                     "runs; <code>heads</code>, <code>exit</code>, <code>policy</code> and <code>crop</code> are its "
                     "parts, timed inside it (the figure stacks them and only the rest of the step).</p>")
    if lat.get("camera_resize_ms") is not None:
        parts.append(f"<p class='note'>Not included above: resizing + centre-cropping a 640x480 camera frame to "
                     f"{b['image_size']}x{b['image_size']} takes {lat['camera_resize_ms']:.3f} ms more per image.</p>")

    parts.append("<h2 id='precision'>INT8 vs FP32</h2>")
    prec = res["precisions"]
    if prec.get("rows"):
        hdr = ["precision"] + [f"accuracy % step {k}" for k in range(T)] + [f"agreement % step {k}" for k in range(T)] + \
              [f"ms step {k}" for k in range(T)]
        rows = [[r["precision"]] + [_f(a) for a in r["anytime_accuracy"]] + [_f(a) for a in r["step_agreement"]] +
                [_f(c, 3) for c in r["cost_ms"]] for r in prec["rows"]]
        parts.append(_table(hdr, rows, "precision"))
        bnames = list(prec["rows"][0]["budgets"])
        rows = []
        for r in prec["rows"]:
            for bn in bnames:
                x = r["budgets"][bn]
                rows.append([r["precision"], bn, _f(x["accuracy"]), _f(x["expected_ms"]), _f(x["exit_agreement"]),
                             _f(x["prediction_agreement"])])
        parts.append(_table(["precision", "budget (same thresholds)", "accuracy %", "expected ms",
                             f"same exit as {prec['reference']} %", f"same class as {prec['reference']} %"], rows,
                            "precision-budgets", left=2))
        parts.append(f"<p class='note'>Agreement: share of held-out images whose prediction at each step equals the "
                     f"{html.escape(str(prec['reference']))} graphs'. {html.escape(prec.get('note', ''))}</p>")
    else:
        parts.append(f"<p class='note'>{html.escape(prec.get('note', 'The bundle holds one precision.'))}</p>")

    parts.append("<h2 id='gallery'>Gallery</h2><p class='note'>Left: the glance (the whole image at P x P). Right: "
                 "the full-resolution image with the focus patches in step order (solid, numbered: run; dashed "
                 "black and white: where the policy would have looked next, not run because the image exited)."
                 "</p><div class='gallery'>")
    for g in gallery:
        cls = "" if g.correct else " class='wrong'"
        parts.append(f"<figure{cls}>{_img(g.png, 'gallery image', 'card')}<figcaption>#{g.index} · label "
                     f"{g.label} · predicted {g.pred} ({g.confidence:.2f}) · exit at step {g.exit_step} "
                     f"under {html.escape(g.budget)}</figcaption></figure>")
    parts.append("</div>")
    parts.append("<h2 id='method'>How this was measured</h2><div class='note'>" + "".join(
        f"<p>{html.escape(p)}</p>" for p in res["method_notes"]) + "</div>")
    parts.append("<script>window.addEventListener('load',function(){var im=Array.prototype.slice.call(document.images);"
                 "var b=document.body.dataset;b.imagesTotal=im.length;b.imagesDecoded=im.filter(function(i){"
                 "return i.complete&&i.naturalWidth>0;}).length;b.tables=document.querySelectorAll('table').length;});"
                 "</script></body></html>")
    return "\n".join(parts)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_report(out_dir: Path, res: Dict[str, Any], figures: Dict[str, bytes], gallery: Sequence[GalleryCard]) -> None:
    """Writes ``report.json`` (strict JSON: non-finite statistics as ``null``) and ``report.html``
    into ``out_dir`` (a staging directory)."""
    text = json.dumps(finite_or_null(res), indent=2, default=_json_default, allow_nan=False)
    (out_dir / "report.json").write_text(text + "\n", encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(res, figures, gallery), encoding="utf-8")


def summary(res: Dict[str, Any]) -> str:
    """A plain-text summary table for the terminal."""
    b, lat = res["bundle"], res["latency"]
    lines = [f"calibration of {b['model_name']} on {res['device'].get('timed_on', res['device']['cpu'])} "
             f"({b['backend']} {b['precision']}, threads {b['threads'] or 'default'}, batch {res['settings']['batch']}, "
             f"{res['settings'].get('clock', 'wall')} clock)"]
    steps = ", ".join(f"k={k}: {s['mean_ms']:.3f} (p95 {s['p95_ms']:.3f})" for k, s in enumerate(lat["budget_batch"]["steps"]))
    lines.append(f"step latency, ms/image at batch {lat['budget_batch']['batch']}: {steps}")
    if lat.get("other_batch"):
        steps = ", ".join(f"k={k}: {s['mean_ms']:.3f}" for k, s in enumerate(lat["other_batch"]["steps"]))
        lines.append(f"step latency, ms/image at batch {lat['other_batch']['batch']}: {steps}")
    cols = ["budget", "limit", "thresholds", "expected", "mean", "p95", "measured", "vs", "accuracy", "reference",
            "exits"]
    hdr = ["budget", "limit", "thresholds", "expected ms", "mean ms", "p95 ms", "measured ms", "vs budget",
           "accuracy %", "ref-method %", "exits %"]
    rows = []
    for row in map(_budget_row, res["budgets"]):
        row["vs"] = row["vs"][0]
        rows.append([row[k] for k in cols])
    if res["static"] and res.get("technology"):
        lines.append(technology_line(res))
    for s in res["static"]:
        rows.append([s["name"], "", "(static baseline)", "", _f(s["latency"]["mean_ms"]), _f(s["latency"]["p95_ms"]),
                     "", "", _f(s["accuracy"]), "", ""])
    w = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
    fmt = "  ".join("{:<%d}" % n for n in w)
    lines.append(fmt.format(*hdr))
    lines.extend(fmt.format(*[str(x) for x in r]) for r in rows)
    for r in res["precisions"].get("rows", []):
        lines.append(f"{r['precision']}: anytime acc " + ", ".join(f"{a:.1f}" for a in r["anytime_accuracy"]) +
                     "; agreement with " + str(res["precisions"]["reference"]) + " " +
                     ", ".join(f"{a:.1f}%" for a in r["step_agreement"]))
    sw = res.get("deadline_sweep")
    if sw and sw["rows"]:
        lines.append(f"deadline sweep ({sw['budget']}, batch {sw['batch']}), one line per deadline:")
        lines.extend(f"  {r['deadline_ms']:.2f} ms: acc {r['accuracy']:.1f}%, over+10% {r['over_10pct']:.1f}%" +
                     "".join(f", {n} misses {v:.0f}%" for n, v in r["static_miss_pct"].items()) for r in sw["rows"])
    lines.append(f"manifest: {res['manifest']['status']}")
    lines.append(f"suggested: {choice_sentence(res)}")
    if res.get("figures_note"):
        lines.append(f"note: {res['figures_note']}")
    lines.extend(f"warning: {b['name']}: {b['note']}" for b in res["budgets"] if b.get("note"))
    lines.extend(f"warning: {w}" for w in latency_warnings(lat))
    return "\n".join(lines)


def latency_warnings(lat: Dict[str, Any]) -> List[str]:
    """The report's warnings about its latency measurements: the device changed speed during the
    run (``stability``), a step's p99 is still set by a lone stall (``stall_warning``)."""
    return [w for w in ((lat.get("stability") or {}).get("warning"), lat.get("stall_warning")) if w]
