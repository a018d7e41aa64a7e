#!/usr/bin/env python3
"""Quantization settings of the demo GFNet scored on held-out demo images from generator seeds
the build never uses: final-step and budget accuracy vs FP32, exit agreement, KL, INT8 share.

    python3 bench/quantize_heldout.py 'auto=' 'bc={"bias_correction": 64}' --seeds 101,202 --n 1000
    python3 bench/quantize_heldout.py 'build={"max_accuracy_drop": 0.5}' --search-sets val,val@512,test@11

Each positional argument is ``name=JSON`` of :class:`gfnet_edge.quantize.QuantizeOptions`
fields (profile ``tensorrt``, no mixed-precision search and no patch guard unless given:
``"patch_guard_share": 0.02`` is the profile's patch guard). Calibration and the
search's held-out set are what ``build-engine`` uses: the first ``num_calib`` (default 256)
images of the validation split (generator seed of the checkpoint) and the 256 after them (so
``num_calib`` is at most 744); with ``--calib-split train`` the calibration images are the train
split's and the search's held-out set the first 256 of the validation split. Figures: the test split rendered with each of ``--seeds``
(``ClutteredDigitsConfig.seed``), traced through the runtime on ONNX Runtime; the budget is the
bundle's default (``macs-mid``, thresholds from the checkpoint). ``--input frames`` (the default)
traces the uint8 test frames and gives the search uint8 frames, both normalised inside the
runtime as ``Runtime.predict`` and ``gfnet-edge predict`` take them and as ``build-engine``'s
search scores them; ``--input images`` traces float images normalised beforehand
(``ops.normalise_frames``), which an INT8 graph can round differently near a quantization step.

``--search-sets`` runs each variant that searches (``max_accuracy_drop``, ``max_budget_drop``
or ``min_exit_agreement`` set) once per held-out set: ``val`` (the default above), ``val@K``
(``--search-n`` validation images from index K, at or after the calibration images) or
``test@SEED`` (``--search-n`` test images of generator seed SEED, not one of ``--seeds``); a
variant that does not search is quantized once and its graphs scored on every set. A second
table then lists, per variant and set, the nodes the search kept in float and the held-out
final-step drop it saw for the all-INT8 pair and for the chosen pair, with the images FP32 got
right and INT8 wrong (lost) and the reverse (gained): a drop is (lost - gained) / n, and its
standard error about 100 * sqrt(lost + gained) / n points. Each row is one INT8 graph pair
against the FP32 pair on the same images; with ``--per-graph`` each variant also scores its
INT8 glance graph with the FP32 focus graph and the FP32 glance graph with its INT8 focus graph
(KL per step, to see which graph carries the error). ``--md FILE`` also writes the table, with
the command, the machine and the 1-minute load average at the start and end, to FILE.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", help="name=JSON of QuantizeOptions fields")
    ap.add_argument("--seeds", default="101,202", help="generator seeds of the held-out test images")
    ap.add_argument("--n", type=int, default=1000, help="images per seed")
    ap.add_argument("--calib-split", choices=("val", "train"), default="val",
                    help="demo split the calibration images come from (default val, as build-engine; train: "
                         "num_calib may exceed 744, the search's 256 held-out images are the validation split's first)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: temporary)")
    ap.add_argument("--per-graph", action="store_true",
                    help="also score each graph in INT8 alone (the other FP32): KL per step")
    ap.add_argument("--search-sets", default="val",
                    help="comma-separated held-out sets of the search: val (build-engine's), val@K (validation "
                         "images from index K), test@SEED (test images of generator seed SEED)")
    ap.add_argument("--search-n", type=int, default=256, help="images per search set (default 256, as build-engine)")
    ap.add_argument("--md", type=Path, default=None, help="also write the table (with command and machine) here")
    sys.path.insert(0, str(ROOT / "bench"))
    from common import INPUT_HELP, INPUTS, demo_fp32, demo_test_images, input_note, report_head, traced_input, \
        use_checkout

    ap.add_argument("--input", choices=INPUTS, default="frames",
                    help=INPUT_HELP + "; the search's held-out images are given the same way (frames: as "
                                      "build-engine gives them)")
    a = ap.parse_args()
    load0 = os.getloadavg()[0]

    use_checkout()
    import torch

    import gfnet_edge.quantize as gq
    from gfnet_edge.evaluate import dynamic_evaluate
    from gfnet_edge import ops
    from gfnet_edge.quantize.scoring import compare, kl_divergence, trace

    torch.set_num_threads(a.threads)
    variants = []
    for v in a.variants:
        name, sep, js = v.partition("=")
        if not sep:
            print(f"error: variant {v!r} is not name=JSON", file=sys.stderr)
            return 2
        try:
            kw = json.loads(js) if js else {}
            opts = gq.QuantizeOptions(**{"profile": "tensorrt", "max_accuracy_drop": None, "patch_guard_share": 0.0,
                                         "threads": a.threads, **kw}).validate()
        except (TypeError, ValueError) as exc:
            print(f"error: variant {name!r}: {exc}", file=sys.stderr)
            return 2
        variants.append((name, opts))
    tmp = tempfile.TemporaryDirectory(prefix="gfnet-heldout-") if a.out is None else None
    work = Path(tmp.name) if tmp else a.out
    demo = demo_fp32(work)
    model, desc, paths, fp32, costs, thr = demo.model, demo.desc, demo.paths, demo.fp32, demo.costs, demo.thresholds
    spec = model.spec

    def prepare(frames):
        return traced_input(a.input, frames, spec)

    seeds = [int(s) for s in a.seeds.split(",")]
    sets = [t.strip() for t in a.search_sets.split(",") if t.strip()]
    for tag in sets:
        kind, _, arg = tag.partition("@")
        if not (tag == "val" or (kind in ("val", "test") and arg.isdigit())) or (kind == "test" and int(arg) in seeds):
            print(f"error: search set {tag!r}: expected val, val@K or test@SEED with SEED not in --seeds",
                  file=sys.stderr)
            return 2
    # build-engine's split of the validation images: the first num_calib calibrate, the next
    # 256 are the search's held-out set
    max_cal = max(opts.num_calib for _, opts in variants)
    first_held = 0 if a.calib_split == "train" else max_cal
    n_val = max([first_held + a.search_n] + [int(t[4:]) + a.search_n for t in sets if t.startswith("val@")])
    if a.calib_split == "train":  # calibration from the train split, the search's 256 from the validation split
        cx = gq.load_calibration_images("demo", model, max_cal, split="train", as_frames=True)
        x, y = gq.load_calibration_images("demo", model, n_val, return_labels=True, as_frames=True)
        held_at = 0
    else:
        x, y = gq.load_calibration_images("demo", model, n_val, return_labels=True, as_frames=True)
        cx, held_at = x[:max_cal], None
    if len(x) < n_val:
        print(f"error: the search sets need {n_val} validation images (calibration included), the split has "
              f"{len(x)}", file=sys.stderr)
        return 2
    calib = gq.QuantCalibrationSet.from_model(model, ops.normalise_frames(cx, spec.mean, spec.std), progress=False)

    def search_set(tag, num_calib):
        """The search's held-out images and labels of ``tag`` for a variant calibrating on ``num_calib``."""
        first = num_calib if held_at is None else held_at
        if tag.startswith("test@"):
            frames, labels = demo_test_images(model, int(tag[5:]), a.search_n, as_frames=True)
            return prepare(frames), labels
        at = first if tag == "val" else int(tag[4:])
        if at < first:
            raise ValueError(f"search set {tag}: validation images before {first} calibrate")
        return prepare(x[at:at + a.search_n]), y[at:at + a.search_n]

    held = []
    for seed in seeds:
        frames, labels = demo_test_images(model, seed, a.n, as_frames=True)
        images = prepare(frames)
        held.append((seed, images, labels, trace(desc, fp32, paths["heads"], images, a.threads, 50)))
    lines = ["| settings | seed | final drop | lost / gained | budget drop | exit agreement | KL final | INT8 MACs | "
             "quantize s |", "|---|---|---|---|---|---|---|---|---|"]
    graph_lines = ["| settings | INT8 graph (other FP32) | seed | KL per step | exit agreement |", "|---|---|---|---|---|"]
    search_lines = ["| settings | search set | kept in float by the search | held-out drop all INT8 (lost / gained) | "
                    "held-out drop chosen (lost / gained) | noise (sqrt(lost + gained) / n) | INT8 MACs |",
                    "|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    ref_on = {}  # search set -> FP32 trace and labels (variants that do not search)
    scored = {}  # (variant, nodes kept in float) -> test rows
    for name, opts in variants:
        searches = any(t is not None for t in (opts.max_accuracy_drop, opts.max_budget_drop, opts.min_exit_agreement))
        r = None
        for i, tag in enumerate(sets):
            try:
                ex, ey = search_set(tag, opts.num_calib)
            except ValueError as exc:
                print(f"error: variant {name!r}: {exc}", file=sys.stderr)
                return 2
            if r is None or searches:
                t0 = time.perf_counter()
                # build-engine's calibration set: the first num_calib images (quantize_model would
                # cut a larger set to a seeded sample)
                cut = calib if calib.num_images <= opts.num_calib else calib.subset(range(opts.num_calib))
                r = gq.quantize_model(model, fp32, paths["heads"], cut, work / f"{name}-{i}", opts,
                                      eval_images=ex, eval_labels=ey, progress=False)
                secs = time.perf_counter() - t0
                before, after = r.report["accuracy_all_int8"], r.report["accuracy"]
            else:  # the same graphs scored on another set
                if tag not in ref_on:
                    ref_on[tag] = trace(desc, fp32, paths["heads"], ex, a.threads, 50)
                before = after = compare(ref_on[tag], trace(desc, r.graphs, paths["heads"], ex, a.threads, 50), ey)
            kept = tuple(f"{e['graph']} {_short(e['node'])}" for e in r.report.get("float_nodes", []))
            label = f"{name} @ {tag}" if searches and len(sets) > 1 else name
            search_lines.append(f"| {name} | {tag} | {', '.join(kept) if kept else '-'} | {_drop(before)} | "
                                f"{_drop(after)} | {after['final_flips']['drop_noise']:.2f} | "
                                f"{100 * r.report.get('int8_mac_share', 1.0):.1f}% |")
            if (name, kept) in scored:  # the same graphs: their test rows again, under this set's label
                if searches:
                    lines += [f"| {label} |" + row.split("|", 2)[2] for row in scored[(name, kept)]]
                    print("\n".join(lines[-len(held):]), flush=True)
                continue
            first_row = len(lines)
            for seed, images, labels, t32 in held:
                t8 = trace(desc, r.graphs, paths["heads"], images, a.threads, 50)
                p32, p8 = t32.probs, t8.probs
                d32, d8 = dynamic_evaluate(p32, labels, costs, thr), dynamic_evaluate(p8, labels, costs, thr)
                c = compare(t32, t8, labels)  # final-step drop, flips and KL (the exits: the bundle's budget)
                flips, final, kl = c["final_flips"], c["final_drop"], c["kl_final"]
                agree = 100.0 * float((d32.exit_step == d8.exit_step).mean())
                lines.append(f"| {label} | {seed} | {final:+.2f} | {flips['lost']} / {flips['gained']} | "
                             f"{d32.accuracy - d8.accuracy:+.2f} | {agree:.1f}% | {kl:.4f} | "
                             f"{100 * r.report.get('int8_mac_share', 1.0):.1f}% | {secs:.0f} |")
                print(lines[-1], flush=True)
                if a.per_graph:
                    for g in ("glance", "focus", "both"):
                        graphs = dict(r.graphs) if g == "both" else {**fp32, g: r.graphs[g]}
                        pg = p8 if g == "both" else trace(desc, graphs, paths["heads"], images, a.threads, 50).probs
                        dg = dynamic_evaluate(pg, labels, costs, thr)
                        agree_g = 100.0 * float((d32.exit_step == dg.exit_step).mean())
                        kls = " / ".join(f"{float(kl_divergence(p32[k], pg[k]).mean()):.4f}" for k in range(len(p32)))
                        graph_lines.append(f"| {name} | {g} | {seed} | {kls} | {agree_g:.1f}% |")
                        print(graph_lines[-1], flush=True)
            scored[(name, kept)] = lines[first_row:]
    if len(sets) > 1 or a.search_sets != "val":
        print("\n".join(search_lines))
    if a.md:
        text = "\n".join([*report_head("INT8 settings on held-out demo images (`bench/quantize_heldout.py`)", __file__,
                                       load0),
                          f"Traced inputs (test images and the search's held-out set): {input_note(a.input)}.", "",
                          "Drops are FP32 minus INT8 in points at the final step and at the default budget; lost / "
                          "gained: test images FP32 gets right and INT8 wrong at the final step, and the reverse; exit "
                          "agreement at the default budget; KL(FP32 || INT8) of the final step's probabilities.", "",
                          *lines, ""]
                         + (["The search per held-out set (final-step drops in points on that set):", "",
                             *search_lines, ""] if len(sets) > 1 or a.search_sets != "val" else [])
                         + (["One graph in INT8, the other FP32 (KL(FP32 || mixed) per step):", "",
                             *graph_lines, ""] if a.per_graph else []))
        a.md.parent.mkdir(parents=True, exist_ok=True)
        a.md.write_text(text, encoding="utf-8")
    if tmp:
        tmp.cleanup()
    return 0


def _short(node: str) -> str:
    """A weighted node's name without the exporter's scopes: ``/encoder/layer3/layer3.0/conv2/Conv``
    -> ``layer3.0.conv2``, ``/fc/Gemm`` -> ``fc``."""
    parts = [c for c in node.strip("/").split("/") if c != "encoder"]
    if len(parts) > 1:
        parts = parts[:-1]  # the op
    return ".".join(c for i, c in enumerate(parts) if i + 1 == len(parts) or not parts[i + 1].startswith(c + "."))


def _drop(r) -> str:
    """A held-out final-step drop with its lost / gained images."""
    f = r["final_flips"]
    return f"{r['final_drop']:+.2f} ({f['lost']} / {f['gained']})"


if __name__ == "__main__":
    sys.exit(main())
