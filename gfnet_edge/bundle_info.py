"""``gfnet-edge info BUNDLE``: what a bundle holds, read from its manifest (no torch needed).

The bundle is loaded with :meth:`Bundle.load`, so a missing or modified artifact is reported as
it would be by the runtime.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

from .bundle import Bundle


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
        "model_name": model.get("model_name"),
        "family": model.get("family"),
        "backbone": model.get("backbone") or "torchvision",
        "image_size": model.get("image_size"),
        "patch_size": model.get("patch_size"),
        "steps": model.get("steps"),
        "classes": model.get("num_classes"),
        "graphs": sorted(m["graphs"]),
        "engines": [{"precision": e.get("precision"), "gpu_name": e.get("gpu_name"),
                     "compute_capability": e.get("compute_capability"), "tensorrt_version": e.get("tensorrt_version"),
                     "dla_core": (e.get("build_options") or {}).get("dla_core")} for e in m.get("engines", [])],
        "budgets": {name: [float(t) for t in b["thresholds"]] for name, b in bundle.budgets().items()},
        "default_budget": m.get("default_budget"),
        "macs": (m.get("costs") or {}).get("macs"),
        "source_checkpoint": (m.get("source_checkpoint") or {}).get("name"),
    }


def info_rows(info: Dict[str, Any], fmt_macs: Callable[[float], str]) -> List[Tuple[str, str]]:
    """``(label, text)`` rows of the table ``gfnet-edge info BUNDLE`` prints."""
    engines = [f"{e['precision']}@{e['gpu_name']} (TensorRT {e['tensorrt_version']}"
               + (f", DLA {e['dla_core']})" if e["dla_core"] is not None else ")") for e in info["engines"]]
    budgets = [f"{name}{' (default)' if name == info['default_budget'] else ''}: "
               + ", ".join(f"{t:.3f}" if t > -1e7 else "-" for t in thr) for name, thr in info["budgets"].items()]
    rows = [
        ("bundle", f"{info['bundle']} ({info['created_by']}, {info['created']})"),
        ("model", f"{info['model_name']} ({info['family']}, {info['backbone']})"),
        ("sizes", f"S={info['image_size']} P={info['patch_size']} T={info['steps']} classes={info['classes']}"),
        ("graphs", ", ".join(info["graphs"]) or "none"),
        ("engines", ", ".join(engines) or "none (ONNX Runtime runs the graphs)"),
    ]
    rows += [("budgets" if i == 0 else "", b) for i, b in enumerate(budgets or ["none"])]
    if info["macs"] and info["macs"].get("cumulative"):
        rows.append(("cumulative MACs", ", ".join(fmt_macs(c) for c in info["macs"]["cumulative"])))
    return rows
