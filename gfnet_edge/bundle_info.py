"""``gfnet-edge info BUNDLE``: what a bundle holds, read from its manifest (no torch needed):
the model, graphs, engines (device, target, DLA layer placement), budgets, costs and what the
INT8 build measured.

The bundle is loaded with :meth:`Bundle.load`, so a missing or modified artifact is reported as
it would be by the runtime.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

from .bundle import Bundle


def engine_rows(manifest: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per engine entry: precision, target, device, TensorRT, batches, DLA layer counts."""
    rows = []
    for e in manifest.get("engines", []):
        core = (e.get("build_options") or {}).get("dla_core")
        row = {"precision": e.get("precision"), "target": "GPU" if core is None else f"DLA core {core}",
               "device": e.get("device_model") or e.get("gpu_name"), "compute_capability": e.get("compute_capability"),
               "tensorrt": e.get("tensorrt_version"), "static_batch": e.get("static_batch"),
               "max_batch": (e.get("build_options") or {}).get("max_batch")}
        placement = e.get("dla_placement")
        if core is not None:
            row["layers"] = {g: {"dla": p.get("dla_layers"), "gpu": p.get("gpu_layers")}
                             for g, p in (placement or {}).items()} or None
        rows.append(row)
    return rows


def _layers_text(row: Dict[str, Any]) -> str:
    if "layers" not in row:
        return ""
    if not row["layers"]:
        return "; layer placement not recorded"
    # TensorRT compiles each run of consecutive DLA layers into one DLA loadable, which its layer
    # report names once ({ForeignNode[first...last]}): the DLA count is of those subgraphs
    return "; " + ", ".join(f"{g}: {c['dla'] if c['dla'] is not None else '?'} DLA subgraph(s), "
                            f"{c['gpu'] if c['gpu'] is not None else '?'} GPU layer(s)" for g, c in row["layers"].items())


def quantization_summary(manifest: Dict[str, Any]) -> List[str]:
    """One line per INT8 graph set of a bundle manifest: the share of the backbone multiply-adds
    in INT8, which nodes stay in float and why, the held-out accuracy drop the build measured, and
    the calibration images and method (the whole report is the manifest's ``quantization``
    entry)."""
    lines = []
    for prof, rep in (manifest.get("quantization") or {}).items():
        line = f"int8-{prof}: {100.0 * float(rep.get('int8_mac_share', 1.0)):.1f}% of the backbone multiply-adds in INT8"
        guarded = len((rep.get("patch_guard") or {}).get("nodes") or [])
        searched = sum(int(e.get("members", 1)) for e in rep.get("float_nodes") or [])  # a whole graph: its nodes
        kept = [f"{n} by {who}" for n, who in ((guarded, "the patch guard"), (searched, "the accuracy search")) if n]
        if kept:
            line += f" (nodes in float: {', '.join(kept)})"
        acc = rep.get("accuracy") or {}
        if acc.get("final_drop") is not None and acc.get("labels", "true") != "true":  # no labels: agreement
            line += (f"; final-step predictions {100.0 - float(acc['final_drop']):.2f}% the same as FP32's on "
                     f"{acc.get('n')} unlabelled held-out images")
        elif acc.get("final_drop") is not None:
            line += (f"; final-step accuracy {0.0 - float(acc['final_drop']):+.2f} points against FP32 on "
                     f"{acc.get('n')} held-out images")
        elif str(rep.get("mixed_precision", "")).startswith("skipped"):
            line += "; accuracy not checked (no held-out images)"
        if str(rep.get("mixed_precision", "")).startswith("target NOT met"):
            line += " (the search's accuracy target NOT met)"
        images = (rep.get("calibration") or {}).get("images")
        if images is not None and rep.get("method"):
            line += f"; calibrated on {images} images ({rep['method']})"
        lines.append(line)
    return lines


def describe_bundle(root: Path) -> Dict[str, Any]:
    """The facts ``gfnet-edge info`` prints about the bundle at ``root``.

    Raises:
        BundleError: not a bundle, unreadable manifest, missing or modified artifacts.
    """
    bundle = Bundle.load(root)
    m, model = bundle.manifest, bundle.model
    return {
        "bundle": str(root),
        "created_by": m.get("created_by"),
        "created": m.get("created"),
        "model_name": model.model_name,
        "family": model.family,
        "backbone": model.backbone or "torchvision",
        "image_size": model.image_size,
        "patch_size": model.patch_size,
        "steps": model.steps,
        "classes": model.num_classes,
        "class_names": list(model.class_names) if model.class_names is not None else None,
        "graphs": sorted(m["graphs"]),
        "engines": engine_rows(m),
        "budgets": {name: [float(t) for t in b["thresholds"]] for name, b in bundle.budgets().items()},
        "default_budget": m.get("default_budget"),
        "macs": (m.get("costs") or {}).get("macs"),
        "source_checkpoint": (m.get("source_checkpoint") or {}).get("name"),
        "source_checkpoint_sha256": (m.get("source_checkpoint") or {}).get("sha256"),
        "quantization": quantization_summary(m),
    }


def _threshold_text(t: float) -> str:
    """An exit threshold as ``info`` prints it: ``never`` above 1 (no probability reaches it),
    ``always`` at or below 0 (every probability does), else the value."""
    return "never" if t > 1.0 else "always" if t <= 0.0 else f"{t:.3f}"


def one_line(text: str) -> str:
    """``text`` with its control characters (a newline, a terminal escape) as Python escapes: a
    bundle's names may hold any character, and a row of the table stays one line of plain text."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def class_names_text(names: List[str]) -> str:
    """A model's class names as ``info`` lists them: the first 12, and how many in all."""
    return ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")


def info_rows(info: Dict[str, Any], fmt_macs: Callable[[float], str]) -> List[Tuple[str, str]]:
    """``(label, text)`` rows of the table ``gfnet-edge info BUNDLE`` prints (control characters
    of the manifest's names as escapes, :func:`one_line`)."""
    def known(value: Any) -> str:  # a field an engine entry does not record
        return "?" if value is None or value == "" else str(value)

    engines = []
    for r in info["engines"]:
        batch = f"batch {r['static_batch']} (static)" if r["static_batch"] else f"batches 1..{known(r['max_batch'])}"
        engines.append(f"{known(r['precision'])} on {r['target']}, {known(r['device'])} "
                       f"(sm {known(r['compute_capability'])}), TensorRT {known(r['tensorrt'])}, {batch}{_layers_text(r)}")
    budgets = [f"{name}{' (default)' if name == info['default_budget'] else ''}: "
               + ", ".join(_threshold_text(t) for t in thr)
               for name, thr in info["budgets"].items()]
    rows = [
        ("bundle", f"{info['bundle']} ({info['created_by']}, {info['created']})"),
        ("model", f"{info['model_name'] or '(unnamed)'} ({info['family']}, {info['backbone']})"),
        ("sizes", f"S={info['image_size']} P={info['patch_size']} T={info['steps']} classes={info['classes']}"),
    ]
    if info.get("class_names"):
        rows.append(("class names", class_names_text(info["class_names"])))
    rows += [
        ("graphs", ", ".join(info["graphs"]) or "none"),
    ]
    rows += [("engines" if i == 0 else "", e) for i, e in enumerate(engines or ["none (ONNX Runtime runs the graphs)"])]
    rows += [("budgets" if i == 0 else "", b) for i, b in enumerate(budgets or ["none"])]
    if info["macs"] and info["macs"].get("cumulative"):
        rows.append(("cumulative MACs", ", ".join(fmt_macs(c) for c in info["macs"]["cumulative"])))
    if info["source_checkpoint"]:
        sha = info["source_checkpoint_sha256"]
        rows.append(("built from", info["source_checkpoint"] + (f" (sha256 {sha})" if sha else "")))
    rows += [("quantization" if i == 0 else "", q) for i, q in enumerate(info["quantization"])]
    return [(label, one_line(text)) for label, text in rows]
