"""ONNX Runtime's intra-op workers on the demo model: what ``session.force_spinning_stop`` (the
project's session setting, ``runtime/backends/onnxruntime.session_options``) buys against ONNX
Runtime's default (spinning between runs) and against workers that never spin, and how the
backbones scale from 1 to 2 threads.

    python bench/ort_threads.py [--bundle B] [--threads 2] [--blocks 16]

B: an INT8 ONNX Runtime bundle of the demo checkpoint (it holds the fp32 graphs too; without
``--bundle`` one is built, ``cpu`` profile). Three
session settings: ``stop`` (spin inside a run, stop when it ends: the project's), ``spin``
(ONNX Runtime's default) and ``never`` (``session.intra_op.allow_spinning = 0``).

* **CPU after a run**: the process's CPU time in the 200 ms after one ``--threads``-thread run of
  the glance graph (median of 10), per setting.
* **In the loop**: one :class:`gfnet_edge.Runtime` (batch 1, ``--threads`` threads, the
  bundle's default budget, uint8 demo test frames); its runner's sessions swapped between the
  three settings in alternating blocks of 64 images (order rotating); median per-block ratio of
  the time per image to ``stop``'s, for the fp32 and int8-cpu graph sets.
* **Backbones**: one batch-1 run of the glance graph, the focus graph and the static baseline
  (the shipped ``demo_static.pth.tar`` exported to ONNX, fp32), ms per run and GMAC/s, at 1
  and ``--threads`` threads (``stop``) and at ``--threads`` threads ``never``, timed in
  interleaved rounds (median).

Prints the tables and writes ``bench/results/ort_threads.md`` and ``ort_threads.json``; the
1-minute load average at the start and end of the run is recorded.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ProgressiveReport, command_line, demo_int8_bundle, machine, table  # noqa: E402

SETTINGS = ("stop", "spin", "never")


def _log(msg: str) -> None:
    print(f"[ort_threads] {msg}", flush=True)


def session(path: Path, threads: int, setting: str):
    import onnxruntime as ort

    from gfnet_edge.runtime.backends.onnxruntime import session_options

    so = session_options(threads)
    if setting == "spin":
        so.add_session_config_entry("session.force_spinning_stop", "0")
    elif setting == "never":
        so.add_session_config_entry("session.force_spinning_stop", "0")
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def feed(sess) -> Dict[str, np.ndarray]:
    i = sess.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in i.shape]
    return {i.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def cpu_after_run(path: Path, threads: int, reps: int = 10) -> Dict[str, float]:
    out = {}
    for setting in SETTINGS:
        s = session(path, threads, setting)
        x = feed(s)
        s.run(None, x)
        burnt = []
        for _ in range(reps):
            s.run(None, x)
            c0 = time.process_time()
            time.sleep(0.2)
            burnt.append(time.process_time() - c0)
        out[setting] = float(np.median(burnt) * 1e3)
        del s
    return out


def in_loop(bundle: Path, precision: str, threads: int, frames: np.ndarray, blocks: int,
            per_block: int = 64) -> Dict[str, Any]:
    from gfnet_edge.runtime import Runtime

    with Runtime(bundle, backend="onnxruntime", precision=precision, threads=threads) as rt:
        runner = rt.runner
        sets = {st: {g: session(p, threads, st) for g, p in runner.graphs.items()} for st in SETTINGS}
        ms: Dict[str, List[float]] = {st: [] for st in SETTINGS}
        for st in SETTINGS:  # warm-up
            runner.sessions.update(sets[st])
            for i in range(16):
                rt.predict(frames[i:i + 1])
        n = len(frames)
        for blk in range(blocks):
            order = SETTINGS[blk % 3:] + SETTINGS[:blk % 3]
            idx = [(blk * per_block + j) % n for j in range(per_block)]
            for st in order:
                runner.sessions.update(sets[st])
                t0 = time.perf_counter()
                for i in idx:
                    rt.predict(frames[i:i + 1])
                ms[st].append((time.perf_counter() - t0) * 1e3 / per_block)
    base = np.asarray(ms["stop"])
    out: Dict[str, Any] = {"blocks": blocks, "ms": {st: float(np.median(v)) for st, v in ms.items()}}
    for st in ("spin", "never"):
        r = np.asarray(ms[st]) / base
        out[st] = {"median": float(np.median(r)), "q1": float(np.percentile(r, 25)),
                   "q3": float(np.percentile(r, 75))}
    return out


def backbones(graphs: Dict[str, Path], macs: Dict[str, int], threads: int, rounds: int = 15,
              calls: int = 10) -> List[Dict[str, Any]]:
    arms = [(1, "stop"), (threads, "stop"), (threads, "never")]
    sess = {(g, t, st): session(p, t, st) for g, p in graphs.items() for t, st in arms}
    feeds = {k: feed(s) for k, s in sess.items()}
    for k, s in sess.items():
        s.run(None, feeds[k])
    times: Dict[Any, List[float]] = {k: [] for k in sess}
    for _ in range(rounds):
        for k, s in sess.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                s.run(None, feeds[k])
            times[k].append((time.perf_counter() - t0) / calls)
    rows = []
    for (g, t, st), v in times.items():
        sec = float(np.median(v))
        rows.append({"graph": g, "threads": t, "setting": st, "ms": sec * 1e3, "gmacs": macs[g] / sec / 1e9})
    return rows


def render(res: Dict[str, Any], command: str) -> str:
    load = res["load"]
    lines = ["# ONNX Runtime's workers on the demo model (`bench/ort_threads.py`)", "", f"Command: `{command}`", "",
             f"Machine: {res['machine']}; 1-minute load average " + " -> ".join(f"{v:.1f}" for v in load)
             + " (start -> end)." + ("" if res.get("complete", True) else " **Partial run.**"), "",
             "Settings: `stop` spins inside a run and stops when it ends (`session.force_spinning_stop`, the "
             "project's), `spin` is ONNX Runtime's default, `never` sets `session.intra_op.allow_spinning = 0`.", ""]
    if "cpu_after" in res:
        c = res["cpu_after"]
        lines += [f"CPU time of the process in the 200 ms after one {res['threads']}-thread glance-graph run (median of 10): "
                  + ", ".join(f"{k} {v:.1f} ms" for k, v in c.items()) + ".", ""]
    if res.get("loop"):
        rows = []
        for prec, r in res["loop"].items():
            rows.append([prec, r["blocks"], " / ".join(f"{r['ms'][st]:.2f}" for st in SETTINGS),
                         f"**{r['never']['median']:.3f}** ({r['never']['q1']:.3f}-{r['never']['q3']:.3f})",
                         f"**{r['spin']['median']:.3f}** ({r['spin']['q1']:.3f}-{r['spin']['q3']:.3f})"])
        lines += [f"In one runtime, batch 1, {res['threads']} threads, sessions swapped between alternating blocks "
                  "of 64 images; ratios per block against `stop` (median, IQR):", "",
                  table(["graphs", "blocks", "ms/image stop / spin / never", "never / stop", "spin / stop"], rows), ""]
    if res.get("backbones"):
        rows = [[b["graph"], b["threads"], b["setting"], f"{b['ms']:.2f}", f"{b['gmacs']:.1f}"] for b in res["backbones"]]
        lines += ["One batch-1 run per graph (median of interleaved rounds):", "",
                  table(["graph", "threads", "setting", "ms per run", "GMAC/s"], rows), ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="an INT8 ONNX Runtime bundle of the demo checkpoint (default: build one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--num-test", type=int, default=256)
    ap.add_argument("--out", type=Path, default=RESULTS / "ort_threads.md")
    args = ap.parse_args(argv)
    from gfnet_edge import ops
    from gfnet_edge.bundle import Bundle
    from gfnet_edge.calibrate.static import export_static, load_static_checkpoint
    from gfnet_edge.data import ClutteredDigits, demo_config
    from gfnet_edge.demo import DEMO_CHECKPOINT, DEMO_STATIC
    from gfnet_edge.models import count_static_macs, count_step_macs, load_checkpoint

    command = command_line(__file__, argv)
    ops.set_num_threads(args.threads)
    res: Dict[str, Any] = {"machine": machine(), "threads": args.threads, "load": [os.getloadavg()[0]], "loop": {}}
    report = ProgressiveReport(args.out, render, res, command, time.perf_counter())
    with tempfile.TemporaryDirectory(prefix="gfnet-ort-threads-") as tmp:
        args.bundle = demo_int8_bundle(Path(tmp) / "bundle", args.bundle, threads=args.threads, progress=False,
                                       log=_log)
        loaded = Bundle.load(args.bundle)
        frames, _ = ClutteredDigits("test", config=demo_config(loaded.model)).arrays(args.num_test, progress=False)
        for prec in ("fp32", "int8-cpu"):
            res["loop"][prec] = in_loop(args.bundle, prec, args.threads, frames, args.blocks)
            _log(f"{prec}: never / stop {res['loop'][prec]['never']['median']:.3f}, "
                 f"spin / stop {res['loop'][prec]['spin']['median']:.3f}")
            res["load"] = res["load"][:1] + [os.getloadavg()[0]]
            report.write()
        from gfnet_edge.runtime import Runtime

        with Runtime(args.bundle, backend="onnxruntime", precision="fp32", threads=1) as rt:
            graphs = dict(rt.runner.graphs)
        res["cpu_after"] = cpu_after_run(graphs["glance"], args.threads)
        _log(f"CPU after a run: {res['cpu_after']}")
        report.write()
        static_onnx, _ = export_static(DEMO_STATIC, Path(tmp))
        net, _meta = load_static_checkpoint(DEMO_STATIC)
        model = load_checkpoint(DEMO_CHECKPOINT)
        bb = count_step_macs(model).backbone
        macs = {"glance": bb, "focus": bb, "static": count_static_macs(net, 224)}
        res["macs"] = macs
        res["backbones"] = backbones({**graphs, "static": Path(static_onnx)}, macs, args.threads)
    res["load"] = res["load"][:1] + [os.getloadavg()[0]]
    return report.finish(_log)


if __name__ == "__main__":
    sys.exit(main())
