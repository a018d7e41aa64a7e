"""The calibration report: ``report.json`` (every number), ``report.html`` (self-contained) and a
terminal summary."""
from __future__ import annotations

import base64
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Sequence

import jinja2
import numpy as np

from gfnet_edge.bundle import finite_or_null
from gfnet_edge.errors import InputError

from .config import AUTO_DEFAULT

if TYPE_CHECKING:
    from .gallery import GalleryCard

#: The page's Jinja2 templates (package data): ``report.html.j2`` (the page), ``macros.html.j2``
#: (tables, figures) and ``report.css`` (inlined in the page's ``<style>``).
TEMPLATES = Path(__file__).resolve().parent / "templates"


class Cell(NamedTuple):
    """A table cell: its text and CSS classes (``l``: left-aligned; ``ok`` / ``bad``: green / red)."""

    text: str
    css: str = ""


class Table(NamedTuple):
    """A table of the page: the CSS class of its ``<table>``, its header cells and its rows."""

    cls: str
    headers: List[Cell]
    rows: List[List[Cell]]


class Image(NamedTuple):
    """A PNG inlined in the page: its ``data:`` URI, alt text and CSS class."""

    src: str
    alt: str
    cls: str


@lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    """The report's template environment. Autoescaping is on: every value the page shows (class,
    budget, checkpoint and data names, paths, technology descriptions, notes) is HTML-escaped by
    Jinja2; a variable the templates use and the context lacks raises
    :class:`jinja2.UndefinedError` (``StrictUndefined``) instead of rendering as nothing."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


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


def _img(png: bytes, alt: str, cls: str = "plot") -> Image:
    return Image("data:image/png;base64," + base64.b64encode(png).decode("ascii"), alt, cls)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str, left: int = 1) -> Table:
    """A :class:`Table` of ``str(value)`` cells; a ``(value, css class)`` tuple gives a cell its class,
    and the first ``left`` columns are left-aligned."""
    def cell(i: int, v: Any) -> Cell:
        text, css = v if isinstance(v, tuple) else (v, "")
        return Cell(str(text), " ".join(c for c in (css, "l" if i < left else "") if c))

    return Table(cls, [cell(i, h) for i, h in enumerate(headers)],
                 [[cell(i, v) for i, v in enumerate(r)] for r in rows])


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


#: The tolerance of the suggested budget: it keeps the full network's held-out accuracy (every
#: step run) to within this many points where a budget does (when no default is set).
DEFAULT_BUDGET_SLACK = 1.0


class Suggestion(NamedTuple):
    """The budget the report suggests and the rule that chose it, in words."""

    name: str
    rule: str


def mixed_kinds(budgets: Sequence[Dict[str, Any]]) -> bool:
    """Whether the budgets limit different statistics (a mean and a percentile), whose limits in ms
    do not compare."""
    return len({b.get("kind", "mean") for b in budgets}) > 1


def suggest_budget(budgets: List[Dict[str, Any]], full_accuracy: Optional[float],
                   slack: float = DEFAULT_BUDGET_SLACK) -> Suggestion:
    """The budget to suggest, and which rule chose it.

    Among the budgets whose held-out accuracy is within ``slack`` points of ``full_accuracy`` (the
    full network's), the fastest by measured mean ms per image. When none is (or the full
    network's accuracy is not known), the cheapest budget whose held-out accuracy is within
    ``slack`` points of the most accurate budget: the smallest limit, or with budgets of different
    kinds (mean, p95 ...) the smallest measured mean ms per image; the rule then says that no
    budget is within ``slack`` of the full network.
    """
    if not budgets:
        raise InputError("calibration produced no budgets")
    acc = [float(b["holdout"]["accuracy"]) for b in budgets]

    def mean_ms(b: Dict[str, Any]) -> float:  # its measured mean ms per image (its limit when not measured)
        return float(b.get("measured", {}).get("mean_ms", b["budget_ms"]))

    full = "" if full_accuracy is None else f"the full network's held-out accuracy of {full_accuracy:.2f} %"
    near = [b for b, a in zip(budgets, acc) if full and a >= full_accuracy - slack]
    if len(budgets) == 1:
        return Suggestion(str(budgets[0]["name"]), "the only budget calibrated" + (
            "" if near or not full else f"; it is not within {slack:g} point of {full}"))
    if near:
        return Suggestion(str(min(near, key=mean_ms)["name"]),
                          f"the fastest budget, by measured mean ms per image, within {slack:g} point of {full}")
    best, mixed = max(acc), mixed_kinds(budgets)
    cost = mean_ms if mixed else (lambda b: float(b["budget_ms"]))  # limits of different kinds do not compare
    name = next((str(b["name"]) for b, a in sorted(zip(budgets, acc), key=lambda ba: cost(ba[0])) if a >= best - slack),
                str(budgets[int(np.argmax(acc))]["name"]))
    rule = (("the fastest budget, by measured mean ms per image," if mixed else "the cheapest budget") +
            f" within {slack:g} point of the best budget's held-out accuracy")
    return Suggestion(name, rule if not full else f"no budget is within {slack:g} point of {full}, so {rule}")


def pick_default_budget(budgets: List[Dict[str, Any]], full_accuracy: Optional[float] = None,
                        slack: float = DEFAULT_BUDGET_SLACK) -> str:
    """The name of the budget :func:`suggest_budget` suggests (``--default auto``)."""
    return suggest_budget(budgets, full_accuracy, slack).name


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
    given = {"suggested": default, "why": "the default budget written to the manifest", "rows": rows}
    if default and res["settings"].get("default") != AUTO_DEFAULT:
        return given
    sug = suggest_budget(res["budgets"], res["full_network_accuracy"])
    if default and default != sug.name:
        return given
    return {"suggested": sug.name, "rows": rows,
            "why": sug.rule + ("; --default auto made it the manifest's default budget" if default else "")}


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


def _fig(figures: Dict[str, bytes], key: str, alt: str) -> Optional[Image]:
    """A figure of the page, or None when the report has no figures (no matplotlib)."""
    return _img(figures[key], alt) if key in figures else None


def _meta(res: Dict[str, Any]) -> Dict[str, Any]:
    """The page's header: the bundle, the device and its load, the data."""
    b, dev, data = res["bundle"], res["device"], res["data"]
    return {"path": b["path"], "image_size": b["image_size"], "patch_size": b["patch_size"], "steps": b["steps"],
            "backend": b["backend"], "precision": b["precision"], "threads": b["threads"] or "default",
            "device": str(dev.get("timed_on", dev["cpu"])),
            "cpu_flags": ", ".join(dev.get("cpu_flags") or []) or "no flags read", "cores": dev["cores"],
            "load_start": _load(dev.get("load_average")), "load_end": _load(dev.get("load_average_end")),
            "platform": dev["platform"], "data_source": data["source"], "fit": data["fit"], "holdout": data["holdout"],
            "unreadable": data.get("skipped_unreadable") or 0, "created": res["created"]}


def _choice_section(res: Dict[str, Any]) -> Dict[str, Any]:
    """Which budget to ship (a sentence), and each budget's accuracy and speed against the static baselines."""
    c = choice(res)
    names = [s["name"] for s in res["static"]]
    rows = [[(r["budget"], "ok") if r["budget"] == c["suggested"] else r["budget"], r["limit"], _f(r["ms"]),
             _f(r["accuracy"])] + [x for n in names for x in (f"{r['vs'][n]['points']:+.2f}",
                                                               f"{r['vs'][n]['speedup']:.2f}x")] for r in c["rows"]]
    hdr = ["budget", "limit", "measured ms", "accuracy %"] + [
        x for n in names for x in (f"accuracy vs {n} (points)", f"speed vs {n} (x, higher is faster)")]
    text = choice_sentence(res, c)
    return {"suggestion": text[0].upper() + text[1:], "table": _table(hdr, rows, "choice", left=2)}


def _budgets_section(res: Dict[str, Any]) -> Dict[str, Any]:
    """The budgets table, each budget's note, and the settings its note names."""
    st = res["settings"]
    tol = st["tolerance"]
    return {"table": _table(BUDGET_HEADERS, budget_rows(res), "budgets"),
            "notes": [{"budget": r["name"], "note": r["note"]} for r in res["budgets"] if r.get("note")],
            "clock": "wall-clock" if st.get("clock", "wall") == "wall" else "calling-thread CPU", "batch": st["batch"],
            "tolerance_low": f"{-100 * tol[0]:.0f}", "tolerance_high": f"{100 * tol[1]:.0f}", "method": st["method"],
            "margin": f"{100 * st['margin']:.0f}", "manifest": res["manifest"]["status"]}


#: The tail percentiles a budget can limit, as the budgets table and the static table name them.
TAIL_STATS = ("p90", "p95", "p99")


def static_percentiles(res: Dict[str, Any]) -> List[str]:
    """The percentiles the static table shows: each of :data:`TAIL_STATS` that a static baseline's
    latency records or a budget limits (the GFNet rows' percentiles, to compare with)."""
    used = {b.get("kind", "mean") for b in res["budgets"]}
    return [k for k in TAIL_STATS if k in used or any(f"{k}_ms" in s["latency"] for s in res["static"])]


def _static_section(res: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The static baselines' table and the technology line; None without a static baseline."""
    if not res["static"]:
        return None
    pct = static_percentiles(res)
    rows = [[s["name"], _f(s["latency"]["mean_ms"])] + [_f(s["latency"].get(f"{k}_ms")) for k in pct] +
            [_f(s["accuracy"]), f"{s['macs'] / 1e6:.0f}M" if s.get("macs") else "–", _technology(s)]
            for s in res["static"]]
    hdr = ["model", "mean ms"] + [f"{k} ms" for k in pct] + ["accuracy %", "MACs", "runs on"]
    return {"table": _table(hdr, rows, "static"), "technology": technology_line(res) if res.get("technology") else None}


def _curve_section(res: Dict[str, Any], figures: Dict[str, bytes]) -> Dict[str, Any]:
    """Accuracy against latency, and the anytime accuracy per step."""
    rows = [[name] + [_f(a) for a in acc] for name, acc in res["anytime"].items()]
    return {"figures": [_fig(figures, "accuracy_latency", "accuracy vs mean latency"),
                        _fig(figures, "anytime", "anytime accuracy per step")],
            "table": _table(["anytime accuracy %"] + [f"step {k}" for k in range(res["bundle"]["steps"])], rows,
                            "anytime")}


def _distribution_section(res: Dict[str, Any], figures: Dict[str, bytes]) -> Dict[str, Any]:
    """Per budget: the measured per-image latency distribution with its percentiles; which budget
    kinds (mean, tail) the page explains."""
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
    return {"figures": [_fig(figures, "latency_cdf", "latency distribution per budget (CDF)"),
                        _fig(figures, "latency_histogram", "measured latency distribution")],
            "table": _table(["budget", "limit", "mean ms", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "max ms",
                             "images over the limit"] + ["allowed over"] * tail, rows, "distribution", left=2),
            "mean_budgets": any(b.get("kind", "mean") == "mean" for b in res["budgets"]), "tail_budgets": tail}


def featured_why(res: Dict[str, Any], name: str) -> str:
    """Why the deadline sweep and the gallery show budget ``name``: the default budget, else the
    middle one of those calibrated (which need not be the one the page suggests)."""
    if name == res["manifest"].get("default_budget"):
        return "the default budget"
    return "the middle of the calibrated budgets: no default budget was set with --default"


def _sweep_section(res: Dict[str, Any], figures: Dict[str, bytes]) -> Optional[Dict[str, Any]]:
    """GFNet under per-call deadlines next to the static baselines' miss rate; None without a sweep."""
    sw = res.get("deadline_sweep")
    if not sw or not sw["rows"]:
        return None
    names = sorted({k for r in sw["rows"] for k in r["static_miss_pct"]})
    rows = [[_f(r["deadline_ms"]), _f(r["accuracy"]), f"{r['over_10pct']:.1f}%", f"{r['over_pct']:.1f}%",
             f"{r['stopped_pct']:.0f}%", _f(r["mean_steps"]), _f(r["p50_ms"]), _f(r["p99_ms"]), _f(r["max_ms"])] +
            [f"{r['static_miss_pct'][n]:.0f}%" for n in names] for r in sw["rows"]]
    return {"figures": [_fig(figures, "deadline_sweep", "accuracy and miss rate vs deadline")],
            "table": _table(["deadline ms", "GFNet accuracy %", "calls > deadline + 10 %", "calls > deadline",
                             "stopped early", "mean steps run (glance = 1)", "p50 ms", "p99 ms", "max ms"] +
                            [f"{n}: calls > deadline" for n in names], rows, "deadlines"),
            "batch": sw["batch"], "budget": sw["budget"], "budget_why": featured_why(res, sw["budget"]), "no_deadline_accuracy": _f(sw.get("no_deadline_accuracy")),
            "planned_with": sw.get("planned_with") or "the runtime's step costs", "margin": f"{sw['margin']:g}",
            "static_p50": ", ".join(f"{n} p50 {_f(v)} ms" for n, v in sw["static_p50_ms"].items())}


def _latency_section(res: Dict[str, Any], figures: Dict[str, bytes]) -> Dict[str, Any]:
    """Latency per step (each batch size), its re-measurements during the run, and per stage."""
    lat, T = res["latency"], res["bundle"]["steps"]
    rows = []
    for key in ("budget_batch", "other_batch"):
        if lat.get(key):
            alone = lat[key].get("retimed_calls") or [0] * len(lat[key]["steps"])
            for k, s in enumerate(lat[key]["steps"]):
                rows.append([f"batch {lat[key]['batch']}", f"exit at step {k}", _f(s["mean_ms"], 3), _f(s["p50_ms"], 3),
                             _f(s["p95_ms"], 3), _f(s["p99_ms"], 3), _f(s["std_ms"], 3), s["n"], alone[k]])
    steps = _table(["batch", "work", "mean ms/img", "p50 ms/img", "p95 ms/img", "p99 ms/img", "std ms/img", "calls",
                    "of them timed alone (lone stall)"], rows, "steps", left=2)
    hist = lat.get("history") or []
    history = None
    if len(hist) > 1:
        history = {"batch": res["settings"]["batch"], "spread": f"{lat['stability']['spread_pct']:.1f}",
                   "table": _table(["measurement"] + [f"cost[{k}]" for k in range(T)],
                                   [[h["when"]] + [_f(c, 3) for c in h["cost_ms"]] for h in hist], "history")}
    st_rows = []
    for k, stages in sorted(lat["budget_batch"]["stages"].items(), key=lambda kv: int(kv[0])):
        calls = max(1, stages.get("per_image", {}).get("count", 1))
        for name, s in stages.items():
            if name == "per_image":
                continue
            st_rows.append([f"exit at {k}", name, _f(s["total_ms"] / calls, 3), _f(s["p50_ms"], 3), _f(s["p95_ms"], 3),
                            _f(s["p99_ms"], 3), s["count"]])
    camera = None
    if lat.get("camera_resize_ms") is not None:
        camera = {"size": res["bundle"]["image_size"], "ms": f"{lat['camera_resize_ms']:.3f}"}
    return {"steps": steps, "history": history,
            "figures": [_fig(figures, "stage_breakdown", "latency breakdown per stage")],
            "stages": _table(["work", "stage", "mean ms per predict call", "p50 ms (per stage call)", "p95 ms", "p99 ms",
                              "stage calls"], st_rows, "stages", left=2),
            "host_loop": any("step" in st and "heads" in st for st in lat["budget_batch"]["stages"].values()),
            "camera": camera}


def _precision_section(res: Dict[str, Any]) -> Dict[str, Any]:
    """Each precision's anytime accuracy, agreement and step latency, and its budgets under the same
    thresholds; no tables when the bundle holds one precision."""
    prec, T = res["precisions"], res["bundle"]["steps"]
    if not prec.get("rows"):
        return {"tables": [], "reference": None, "note": prec.get("note", "The bundle holds one precision.")}
    hdr = ["precision"] + [f"accuracy % step {k}" for k in range(T)] + [f"agreement % step {k}" for k in range(T)] + \
          [f"ms step {k}" for k in range(T)]
    rows = [[r["precision"]] + [_f(a) for a in r["anytime_accuracy"]] + [_f(a) for a in r["step_agreement"]] +
            [_f(c, 3) for c in r["cost_ms"]] for r in prec["rows"]]
    per_step = _table(hdr, rows, "precision")
    rows = []
    for r in prec["rows"]:
        for bn in prec["rows"][0]["budgets"]:
            x = r["budgets"][bn]
            rows.append([r["precision"], bn, _f(x["accuracy"]), _f(x["expected_ms"]), _f(x["exit_agreement"]),
                         _f(x["prediction_agreement"])])
    budgets = _table(["precision", "budget (same thresholds)", "accuracy %", "expected ms",
                      f"same exit as {prec['reference']} %", f"same class as {prec['reference']} %"], rows,
                     "precision-budgets", left=2)
    return {"tables": [per_step, budgets], "reference": str(prec["reference"]), "note": prec.get("note", "")}


def _gallery_cards(gallery: Sequence[GalleryCard], names: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """The cards' captions; a class is its index followed by its name where the bundle records
    names (``2 'red car'``, as ``gfnet-edge predict`` prints it)."""
    def cls(k: int) -> str:
        return f"{k} '{names[k]}'" if names and 0 <= k < len(names) else str(k)

    return [{"image": _img(g.png, "gallery image", "card"), "wrong": not g.correct, "name": g.file or f"#{g.index}",
             "label": cls(g.label), "pred": cls(g.pred), "confidence": f"{g.confidence:.2f}",
             "exit_step": g.exit_step, "budget": g.budget}
            for g in gallery]


def page_context(res: Dict[str, Any], figures: Dict[str, bytes], gallery: Sequence[GalleryCard]) -> Dict[str, Any]:
    """What ``templates/report.html.j2`` shows: every number formatted, every table's cells and
    classes chosen, every figure encoded; strings are left unescaped (the template escapes them)."""
    return {"model_name": res["bundle"]["model_name"], "meta": _meta(res),
            "warnings": latency_warnings(res["latency"]), "figures_note": res.get("figures_note") or None,
            "choice": _choice_section(res), "budgets": _budgets_section(res), "static": _static_section(res),
            "curve": _curve_section(res, figures),
            "exits": {"figures": [_fig(figures, "exit_histogram", "exit-step histogram per budget")]},
            "distribution": _distribution_section(res, figures), "sweep": _sweep_section(res, figures),
            "latency": _latency_section(res, figures), "precision": _precision_section(res),
            "gallery": _gallery_cards(gallery, res["bundle"].get("class_names")),
            "gallery_budget": {"name": gallery[0].budget, "why": featured_why(res, gallery[0].budget)} if gallery else None,
            "method_notes": list(res["method_notes"])}


def render_html(res: Dict[str, Any], figures: Dict[str, bytes], gallery: Sequence[GalleryCard]) -> str:
    """The self-contained HTML page (figures and gallery cards inlined as base64 PNG), rendered from
    ``templates/report.html.j2`` with :func:`page_context`."""
    from gfnet_edge.data.images import shown_name

    # a path of the user's whose bytes are not UTF-8 (kept as surrogates) shows as \xNN escapes
    return shown_name(environment().get_template("report.html.j2").render(page_context(res, figures, gallery)))


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
    # GFNet and static rows show the same latency columns: the mean and each of TAIL_STATS
    first, last = ["budget", "limit", "thresholds", "expected"], ["measured", "vs", "accuracy", "reference", "exits"]
    hdr = ["budget", "limit", "thresholds", "expected ms", "mean ms"] + [f"{k} ms" for k in TAIL_STATS] + \
        ["measured ms", "vs budget", "accuracy %", "ref-method %", "exits %"]

    def latency(stats: Dict[str, Any]) -> List[str]:
        return [_f(stats.get(f"{k}_ms")) for k in ("mean",) + TAIL_STATS]

    rows = []
    for b in res["budgets"]:
        row = _budget_row(b)
        row["vs"] = row["vs"][0]
        rows.append([row[k] for k in first] + latency(b["measured"]) + [row[k] for k in last])
    if res["static"] and res.get("technology"):
        lines.append(technology_line(res))
    for s in res["static"]:
        rows.append([s["name"], "", "(static baseline)", ""] + latency(s["latency"]) + ["", "", _f(s["accuracy"]), "", ""])
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
