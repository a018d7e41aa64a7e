"""``gfnet-edge info BUNDLE``: what a bundle holds, engines first (device, target, DLA placement)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List


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
    return "; " + ", ".join(f"{g}: {c['dla'] if c['dla'] is not None else '?'} layers on DLA, "
                            f"{c['gpu'] if c['gpu'] is not None else '?'} on GPU" for g, c in row["layers"].items())


def print_bundle_info(root: str, as_json: bool = False) -> int:
    from .bundle import Bundle

    m = Bundle.load(Path(root)).manifest
    info = {"bundle": str(root), "model": m["model"].get("model_name"), "graphs": sorted(m["graphs"]),
            "engines": engine_rows(m), "budgets": sorted(m.get("budgets", {})), "default_budget": m.get("default_budget")}
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    mm = m["model"]
    print(f"bundle   {root}")
    print(f"model    {mm.get('model_name')} S={mm.get('image_size')} P={mm.get('patch_size')} T={mm.get('steps')}")
    print(f"graphs   {', '.join(info['graphs'])}")
    for r in info["engines"] or [None]:
        if r is None:
            print("engines  none (ONNX Runtime runs the graphs)")
            continue
        batch = f"batch {r['static_batch']} (static)" if r["static_batch"] else f"batches 1..{r['max_batch']}"
        print(f"engine   {r['precision']} on {r['target']}, {r['device']} (sm {r['compute_capability']}), "
              f"TensorRT {r['tensorrt']}, {batch}{_layers_text(r)}")
    print(f"budgets  {', '.join(info['budgets']) or 'none'} (default: {info['default_budget']})")
    return 0
