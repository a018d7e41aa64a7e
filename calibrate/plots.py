"""Report figures (matplotlib, Agg backend), each returned as PNG bytes."""
from __future__ import annotations

import io
from typing import Any, Dict, List, Sequence

import numpy as np

from gfnet_edge.errors import installed
from gfnet_edge.runtime.profile import HOST_STEP_PARTS

STAGE_COLOURS = {"preprocess": "#8c8c8c", "glance": "#1f77b4", "policy": "#ff7f0e", "crop": "#bcbd22",
                 "focus": "#2ca02c", "heads": "#9467bd", "exit": "#d62728", "step": "#e377c2"}


#: Why a report has no figures on an install without the ``report`` extra.
MISSING_NOTE = 'figures omitted: matplotlib is not installed (pip install "gfnet-edge[report]")'


def available() -> bool:
    """Whether matplotlib is installed here (the ``report`` extra; the device side runs without it)."""
    return installed("matplotlib")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def accuracy_latency(curve: Dict[str, List[float]], budgets: List[Dict[str, Any]], anytime: Sequence[float],
                     cost: Sequence[float], static: List[Dict[str, Any]], title: str, batch: int = 1) -> bytes:
    """Held-out accuracy vs mean latency per image.

    Args:
        curve: ``{"ms": [...], "accuracy": [...]}`` of the reference p sweep (expected ms).
        budgets: ``[{name, budget_ms, expected_ms, measured_ms, accuracy}]`` chosen thresholds.
        anytime: accuracy at each fixed step.
        cost: cumulative per-step latency (ms).
        static: ``[{name, ms, accuracy}]`` baseline points.
        title: figure title.
        batch: images per call of the measurements.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    if curve.get("ms"):
        o = np.argsort(curve["ms"])
        ax.plot(np.asarray(curve["ms"])[o], np.asarray(curve["accuracy"])[o], "-", color="#7f7f7f", lw=1.2,
                label="reference sweep (p), expected ms")
    ax.plot(cost, anytime, "s", color="#1f77b4", ms=6, label="fixed step k (anytime)")
    for k, (c, a) in enumerate(zip(cost, anytime)):
        ax.annotate(f"k={k}", (c, a), textcoords="offset points", xytext=(4, -10), fontsize=8, color="#1f77b4")
    for i, b in enumerate(budgets):
        ax.axvline(b["budget_ms"], color="#d62728", ls=":", lw=0.8)
        ax.plot(b["measured_ms"], b["accuracy"], "o", color="#d62728", ms=7,
                label="chosen thresholds, measured ms" if i == 0 else None)
        ax.plot(b["expected_ms"], b["accuracy"], "o", mfc="none", color="#d62728", ms=9,
                label="chosen thresholds, expected ms" if i == 0 else None)
        ax.annotate(b["name"], (b["measured_ms"], b["accuracy"]), textcoords="offset points", xytext=(5, 5),
                    fontsize=8, color="#d62728")
    for i, s in enumerate(static):
        ax.plot(s["ms"], s["accuracy"], "*", color="#2ca02c", ms=13, label="static baseline" if i == 0 else None)
        ax.annotate(s["name"], (s["ms"], s["accuracy"]), textcoords="offset points", xytext=(6, -3), fontsize=8,
                    color="#2ca02c")
    ax.set_xlabel(f"mean latency per image (ms, batch {batch})")
    ax.set_ylabel("held-out top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)
    return _png(fig)


def _labels_inside(ax, pad_pt: float = 6.0) -> None:
    """Widens ``ax``'s data limits so that the text of every annotation anchored at a data point lies
    inside the axes' frame, ``pad_pt`` points clear of it (a label above the highest point gets
    headroom instead of touching or crossing the top edge)."""
    fig = ax.figure
    pad_px = pad_pt * fig.dpi / 72.0
    for _ in range(2):  # a second pass settles the limits when both ends of an axis moved
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        box = ax.get_window_extent(r)
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        for t in ax.texts:
            if getattr(t, "xycoords", None) != "data":
                continue
            ext = t.get_window_extent(r)
            ax_, ay = (float(v) for v in t.xy)
            px, py = ax.transData.transform((ax_, ay))
            # the share of the axes the text reaches beyond its point, on each side
            up, down = (ext.y1 - py + pad_px) / box.height, (py - ext.y0 + pad_px) / box.height
            right, left = (ext.x1 - px + pad_px) / box.width, (px - ext.x0 + pad_px) / box.width
            if 0.0 < up < 1.0:
                y1 = max(y1, (ay - up * y0) / (1.0 - up))
            if 0.0 < down < 1.0:
                y0 = min(y0, (ay - down * y1) / (1.0 - down))
            if 0.0 < right < 1.0:
                x1 = max(x1, (ax_ - right * x0) / (1.0 - right))
            if 0.0 < left < 1.0:
                x0 = min(x0, (ax_ - left * x1) / (1.0 - left))
        if (x0, x1, y0, y1) == (*ax.get_xlim(), *ax.get_ylim()):
            return
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)


def anytime(per_precision: Dict[str, Sequence[float]]) -> bytes:
    """Accuracy at each fixed step, one line per precision."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (name, acc) in enumerate(per_precision.items()):
        ax.plot(range(len(acc)), acc, "o-", label=name)
        if i == 0:  # the other lines lie within a point or two: their labels would overprint (the table has them)
            for k, a in enumerate(acc):
                ax.annotate(f"{a:.1f}", (k, a), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8,
                            color=ax.lines[-1].get_color())
    T = max(len(a) for a in per_precision.values())
    ax.set_xticks(range(T))
    ax.set_xticklabels(["glance"] + [f"focus {k}" for k in range(1, T)])
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"anytime accuracy per step (numbers: {next(iter(per_precision))})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _labels_inside(ax)
    return _png(fig)


def exit_histogram(fractions: Dict[str, Sequence[float]]) -> bytes:
    """Fraction of held-out images exiting at each step, one bar group per budget."""
    plt = _plt()
    names = list(fractions)
    T = len(next(iter(fractions.values())))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    w = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        x = np.arange(T) + (i - (len(names) - 1) / 2) * w
        ax.bar(x, 100 * np.asarray(fractions[n]), width=w, label=n)
    ax.set_xticks(range(T))
    ax.set_xticklabels([f"step {k}" for k in range(T)])
    ax.set_ylabel("images exiting (%)")
    ax.set_title("exit step per budget (held-out, measured run)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _png(fig)


def stage_breakdown(stages: Dict[int, Dict[str, Dict[str, float]]], cost: Sequence[float], batch: int = 1,
                    clock: str = "wall") -> bytes:
    """Stacked per-stage time per image of calls that exit at step k, next to the measured cost."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ks = sorted(stages)
    bottom = np.zeros(len(ks))

    def per_image(st: str) -> np.ndarray:
        return np.asarray([stages[k].get(st, {}).get("total_ms", 0.0) / batch /
                           max(1, stages[k].get("per_image", {}).get("count", 1)) for k in ks])

    # The host loop's native "step" contains heads, exit, policy and crop (timed inside it):
    # stack those and only the rest of the step (the call itself).
    parts = sum((per_image(st) for st in HOST_STEP_PARTS), np.zeros(len(ks)))
    for st, colour in STAGE_COLOURS.items():
        vals = per_image(st)
        label = st
        if st == "step" and parts.any():
            vals, label = np.maximum(vals - parts, 0.0), "step (the call itself)"
        if vals.any():
            ax.bar(ks, vals, bottom=bottom, color=colour, label=label, width=0.6)
            bottom += vals
    ax.hlines(cost, np.arange(len(cost)) - 0.3, np.arange(len(cost)) + 0.3, colors="k", lw=2,
              label=f"cost[k]: measured without profiling ({clock} clock)")
    ax.set_xticks(ks)
    ax.set_xticklabels([f"exit at {k}" for k in ks])
    ax.set_ylabel(f"ms per image (batch {batch})")
    ax.set_title("latency breakdown per stage (wall-clock, profiled pass)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def _upper_ms(samples: Dict[str, Sequence[float]]) -> float:
    """The latency axis' end: the 99.5th percentile of all samples plus 5 %, so that a few stalled
    calls (their maximum is in the distribution table) do not squeeze the rest into a corner."""
    allv = np.concatenate([np.asarray(v, dtype=np.float64) for v in samples.values()]) if samples else np.zeros(0)
    return 1.05 * float(np.percentile(allv, 99.5)) if allv.size else 1.0


def latency_histogram(samples: Dict[str, Sequence[float]], budgets: Dict[str, float]) -> bytes:
    """Distribution of measured per-image latency for each budget's verification run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    hi = _upper_ms(samples)
    bins = np.linspace(0, hi, 50)
    for name, v in samples.items():  # outlines, not filled bars: overlapping budgets stay apart
        _, _, (patch, *_) = ax.hist(np.clip(v, 0, hi), bins=bins, histtype="step", lw=1.4, label=name)
        ax.axvline(budgets[name], ls=":", color=patch.get_edgecolor(), lw=1.0)
    ax.set_xlabel("per-image latency (ms)")
    ax.set_ylabel("images")
    ax.set_title("measured latency distribution per budget (dotted: the budget, in its colour)", fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)


def latency_cdf(samples: Dict[str, Sequence[float]], budgets: Dict[str, Any]) -> bytes:
    """Empirical distribution (CDF) of measured per-image latency per budget; a tail budget's
    limit is marked at its quantile (the curve must pass at or left of the mark)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, v in samples.items():
        a = np.sort(np.asarray(v, dtype=np.float64))
        line, = ax.step(a, np.arange(1, a.size + 1) / a.size, where="post", label=name)
        b = budgets[name]
        if b.kind.quantile is not None:
            ax.plot([b.ms], [b.kind.quantile], "o", color=line.get_color(), mfc="none")
            ax.hlines(b.kind.quantile, a[0], b.ms, colors=line.get_color(), linestyles=":", lw=0.8)
        else:
            ax.axvline(b.ms, ls=":", color=line.get_color(), lw=0.8)
    hi = max(_upper_ms(samples), 1.05 * max((b.ms for b in budgets.values()), default=0.0))
    ax.set_xlim(0, hi)
    slowest = max((float(np.max(v)) for v in samples.values() if len(v)), default=0.0)
    ax.set_xlabel("per-image latency (ms)" + (f"; slowest image {slowest:.2f} ms, off the axis" if slowest > hi else ""))
    ax.set_ylabel("share of images at or below")
    ax.set_ylim(0, 1.02)
    kinds = {b.kind.quantile is not None for b in budgets.values()}
    marks = ["o: tail budget at its quantile"] * (True in kinds) + ["dotted: mean budget"] * (False in kinds)
    ax.set_title(f"latency distribution per budget ({'; '.join(marks)})", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def deadline_sweep(rows: Sequence[Dict[str, Any]], no_deadline_accuracy: float, budget: str) -> bytes:
    """GFNet's accuracy and overrun share under each deadline, and each static baseline's miss rate."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    d = [r["deadline_ms"] for r in rows]
    ax.plot(d, [r["accuracy"] for r in rows], "o-", color="C0", label=f"GFNet accuracy ({budget})")
    ax.axhline(no_deadline_accuracy, ls=":", color="C0", lw=1.2, label="GFNet accuracy without a deadline")
    ax.set_xlabel("deadline per call (ms)")
    ax.set_ylabel("accuracy (%)", color="C0")
    ax2 = ax.twinx()
    ax2.plot(d, [r["over_10pct"] for r in rows], "s--", color="C3", label="GFNet calls > deadline + 10 %")
    names = sorted({k for r in rows for k in r["static_miss_pct"]})
    for i, n in enumerate(names):  # lines that coincide (e.g. all at 100 %) stay visible: markers differ in size
        ax2.plot(d, [r["static_miss_pct"][n] for r in rows], "^v<>dp"[i % 6] + "-", color=f"C{i + 4}",
                 ms=9 - 3 * (i % 2), mfc="none" if i % 2 == 0 else None, label=f"{n}: calls > deadline")
    ax2.set_ylabel("share of calls (%)")
    ax2.set_ylim(-2, 102)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    ax.set_title("accuracy and late calls per deadline", fontsize=10)
    return _png(fig)
