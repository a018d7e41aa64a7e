"""Where the host loop's time outside the backbone kernels goes at batch 1, and what other ways
of calling ONNX Runtime would save.

    python bench/ort_call_overhead.py [--bundle DIR] [--threads 1] [--blocks 12] [--loop-blocks 150]

On the demo bundle (built with ``--calib-data demo`` when ``--bundle`` is not given), batch 1,
in one run:

* **gaps**: ``Runtime.predict`` with its ONNX Runtime sessions and its ``HostLoop`` wrapped in
  timers: per image, the time before the first backbone run (the call, input checks, the
  glance pre-processing), inside ``InferenceSession.run``, from a run's return to the native
  step, in the native step, from the step's return to the next run, and after the last step
  (the outputs). The wrappers' own cost (about 0.3 us a call) lands in the gaps.
* **per call**: each graph and a trivial graph of the same inputs and outputs (a Flatten and
  three Slices: ONNX Runtime's fixed cost of one call) run through ``session.run``, through
  ``run_with_ort_values``, and through an ``io_binding`` with the outputs bound to
  preallocated OrtValues (the input bound per call, or copied into a bound buffer; outputs
  copied out so that results do not alias the next call's), alternating blocks, same input;
  every variant's outputs are checked bit-equal to ``session.run``'s.
* **in the loop**: the runtime's runner with its ``session.run`` swapped for the fastest
  variants, against the unchanged runner, in alternating blocks of the same images: per image
  ms and the ratio to the unchanged runner.

Writes ``bench/results/ort_call_overhead.md`` and ``.json`` (with the 1-minute load average at
the start and end of the run).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, demo_int8_bundle, machine, table, write_report  # noqa: E402

PRECISIONS = ("int8-cpu", "fp32")
pc = time.perf_counter


def _log(msg: str) -> None:
    print(f"[ort_call_overhead] {msg}", flush=True)


# ----------------------------------------------------------------------------- gaps in the loop
def gaps(rt, frames: np.ndarray, repeats: int) -> Dict[str, float]:
    """Per-image ms of each part of a batch-1 ``predict`` (see the module docstring)."""
    events: List[tuple] = []

    class Sess:
        def __init__(self, sess):
            self.sess = sess

        def run(self, *a, **k):
            t0 = pc()
            r = self.sess.run(*a, **k)
            events.append(("run", t0, pc()))
            return r

    class Loop:
        def __init__(self, loop):
            self.loop = loop

        def begin(self, *a):
            t0 = pc()
            r = self.loop.begin(*a)
            events.append(("step", t0, pc()))
            return r

        def next(self, *a):
            t0 = pc()
            r = self.loop.next(*a)
            events.append(("step", t0, pc()))
            return r

        def __getattr__(self, name):
            return getattr(self.loop, name)

    runner, place = rt.runner, rt.driver.place
    sessions, loop = dict(runner.sessions), place.loop
    runner.sessions.update({g: Sess(s) for g, s in sessions.items()})
    place.loop = Loop(loop)
    glance = place._glance

    def timed_glance(images):
        t0 = pc()
        r = glance(images)
        events.append(("glance", t0, pc()))
        return r

    place._glance = timed_glance
    parts = dict.fromkeys(("before first run", "of which glance pre-processing", "session.run", "run -> step",
                           "native step", "step -> run", "after last step", "total"), 0.0)
    runs = images = 0
    try:
        for f in frames[:20]:
            rt.predict(f[None], cropped=True)
        for _ in range(repeats):
            for f in frames:
                events.clear()
                t0 = pc()
                rt.predict(f[None], cropped=True)
                t1 = pc()
                r = [e for e in events if e[0] == "run"]
                s = [e for e in events if e[0] == "step"]
                parts["total"] += t1 - t0
                parts["before first run"] += r[0][1] - t0
                parts["of which glance pre-processing"] += sum(e[2] - e[1] for e in events if e[0] == "glance")
                parts["after last step"] += t1 - s[-1][2]
                for a, b in zip(r, s):
                    parts["session.run"] += a[2] - a[1]
                    parts["run -> step"] += b[1] - a[2]
                    parts["native step"] += b[2] - b[1]
                for b, a in zip(s, r[1:]):
                    parts["step -> run"] += a[1] - b[2]
                runs += len(r)
                images += 1
    finally:
        runner.sessions.update(sessions)
        place.loop = loop
        del place._glance
    out = {k: v * 1e3 / images for k, v in parts.items()}
    out["runs_per_image"] = runs / images
    return out


# ------------------------------------------------------------------------------ per-call variants
def trivial_graph(sess, path: Path) -> Path:
    """A graph with ``sess``'s input and outputs (names, shapes, float32) whose kernels do
    nearly nothing: Flatten, then one Slice per output."""
    import onnx
    from onnx import TensorProto, helper

    inp = sess.get_inputs()[0]
    nodes = [helper.make_node("Flatten", [inp.name], ["flat"], axis=1)]
    inits, outs = [], []
    for i, o in enumerate(sess.get_outputs()):
        width = int(o.shape[1])
        for nm, v in ((f"s{i}", 0), (f"e{i}", width), (f"a{i}", 1)):
            inits.append(helper.make_tensor(nm, TensorProto.INT64, [1], [v]))
        nodes.append(helper.make_node("Slice", ["flat", f"s{i}", f"e{i}", f"a{i}"], [o.name]))
        outs.append(helper.make_tensor_value_info(o.name, TensorProto.FLOAT, ["batch", width]))
    g = helper.make_graph(nodes, "trivial", [helper.make_tensor_value_info(inp.name, TensorProto.FLOAT,
                                                                           ["batch"] + list(inp.shape[1:]))],
                          outs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def variants(sess, x: np.ndarray) -> Dict[str, Callable[[], Dict[str, np.ndarray]]]:
    """Ways to run ``sess`` on ``x`` that return fresh output arrays (none aliases a later call's)."""
    import onnxruntime as ort

    names = [o.name for o in sess.get_outputs()]
    name_in = sess.get_inputs()[0].name
    ref = dict(zip(names, sess.run(None, {name_in: x})))
    ro = ort.RunOptions()

    def plain():  # what OnnxRuntimeRunner._run does
        return dict(zip(names, sess.run(None, {name_in: np.ascontiguousarray(x, dtype=np.float32)})))

    def ort_values():
        outs = sess.run_with_ort_values(names, {name_in: ort.OrtValue.ortvalue_from_numpy(x)}, ro)
        return {n: o.numpy() for n, o in zip(names, outs)}

    def outputs_bound(binding):  # each output bound to a preallocated array
        arrays = {n: np.empty_like(ref[n]) for n in names}
        for n in names:
            binding.bind_ortvalue_output(n, ort.OrtValue.ortvalue_from_numpy(arrays[n]))
        return arrays

    bound = sess.io_binding()
    bufs = outputs_bound(bound)

    def binding():
        bound.bind_cpu_input(name_in, x)
        sess.run_with_iobinding(bound, ro)
        return {n: bufs[n].copy() for n in names}

    xin = np.empty_like(x)
    fixed = sess.io_binding()
    fixed.bind_ortvalue_input(name_in, ort.OrtValue.ortvalue_from_numpy(xin))
    fbufs = outputs_bound(fixed)

    def binding_fixed_input():
        np.copyto(xin, x)
        sess.run_with_iobinding(fixed, ro)
        return {n: fbufs[n].copy() for n in names}

    def binding_fixed_no_copy():  # not usable as is (results alias the next call's): the floor
        np.copyto(xin, x)
        sess.run_with_iobinding(fixed, ro)
        return fbufs

    def direct():  # the binding's C++ session: InferenceSession.run without its Python checks
        return dict(zip(names, sess._sess.run(names, {name_in: np.ascontiguousarray(x, dtype=np.float32)}, None)))

    out = {"session.run": plain, "C session.run": direct, "run_with_ort_values": ort_values, "io_binding": binding,
           "io_binding, bound input buffer": binding_fixed_input,
           "io_binding, bound input, outputs not copied": binding_fixed_no_copy}
    for k, fn in out.items():
        got = fn()
        if not all(np.array_equal(got[n], ref[n]) for n in names):
            raise AssertionError(f"{k} gives other outputs than session.run")
    return out


def per_call(fns: Dict[str, Callable[[], object]], blocks: int, per_block: int) -> Dict[str, float]:
    """Median over alternating blocks of the per-call ms of each callable."""
    ms: Dict[str, List[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(20):
            fn()
    keys = list(fns)
    for blk in range(blocks):
        for k in keys[blk % len(keys):] + keys[:blk % len(keys)]:  # each variant leads in turn
            fn = fns[k]
            t0 = pc()
            for _ in range(per_block):
                fn()
            ms[k].append((pc() - t0) * 1e3 / per_block)
    return {k: float(np.median(v)) for k, v in ms.items()}


# ---------------------------------------------------------------------------------- in the loop
def loop_runs(rt) -> Dict[str, Callable]:
    """Replacements of the runner's ``_run`` (same outputs, fresh arrays each call)."""
    import onnxruntime as ort

    runner = rt.runner
    ro = ort.RunOptions()
    state: Dict[str, tuple] = {}

    def binding(self, graph, image):
        if graph not in state:
            s = self.sessions[graph]
            b = s.io_binding()
            bufs = {}
            for o in s.get_outputs():
                bufs[o.name] = np.empty((1, int(o.shape[1])), np.float32)
                b.bind_ortvalue_output(o.name, ort.OrtValue.ortvalue_from_numpy(bufs[o.name]))
            state[graph] = (s, b, bufs)
        s, b, bufs = state[graph]
        if image.shape[0] != 1:
            return type(self)._run(self, graph, image)
        b.bind_cpu_input("image", np.ascontiguousarray(image, dtype=np.float32))
        s.run_with_iobinding(b, ro)
        return {n: v.copy() for n, v in bufs.items()}

    def direct(self, graph, image):  # the binding's C++ session, skipping InferenceSession.run's checks
        s = self.sessions[graph]
        return dict(zip(self.outputs[graph], s._sess.run(self.outputs[graph],
                                                         {"image": np.ascontiguousarray(image, dtype=np.float32)},
                                                         None)))

    return {"session.run (unchanged)": type(runner)._run, "io_binding": binding, "C session.run": direct}


def in_loop(rt, frames: np.ndarray, blocks: int, per_block: int) -> Dict[str, Dict[str, float]]:
    """Per-image ms of batch-1 predicts with each ``_run``, in alternating blocks of the same
    ``per_block`` images (short blocks, so that the machine's drifts in speed hit the variants of
    a block alike); every variant's predictions are checked equal to the unchanged runner's."""
    runner = rt.runner
    runs = loop_runs(rt)
    ms: Dict[str, List[float]] = {k: [] for k in runs}
    cpu: Dict[str, List[float]] = {k: [] for k in runs}
    ref = None
    try:
        for k, fn in runs.items():
            runner._run = types.MethodType(fn, runner)
            got = [rt.predict(f[None], cropped=True) for f in frames[:50]]
            key = [(int(p.classes[0]), float(p.confidence[0]), int(p.exit_step[0])) for p in got]
            if ref is None:
                ref = key
            elif key != ref:
                raise AssertionError(f"{k} gives other predictions than session.run")
        keys = list(runs)
        for blk in range(blocks):
            block = frames[[(blk * per_block + j) % len(frames) for j in range(per_block)]]
            for k in keys[blk % len(keys):] + keys[:blk % len(keys)]:  # each variant leads in turn
                runner._run = types.MethodType(runs[k], runner)
                t0, c0 = pc(), time.thread_time()
                for f in block:
                    rt.predict(f[None], cropped=True)
                cpu[k].append((time.thread_time() - c0) * 1e3 / per_block)
                ms[k].append((pc() - t0) * 1e3 / per_block)
    finally:
        del runner._run
    out: Dict[str, Dict[str, float]] = {k: {} for k in runs}
    for clock, res in (("", ms), ("cpu_", cpu)):
        base = np.asarray(res["session.run (unchanged)"])
        for k, v in res.items():
            v = np.asarray(v)
            out[k].update({f"{clock}ms": float(np.median(v)), f"{clock}ratio": float(np.median(v / base)),
                           f"{clock}saved_ms": float(np.median(base - v)),
                           f"{clock}saved_ms_q1": float(np.percentile(base - v, 25)),
                           f"{clock}saved_ms_q3": float(np.percentile(base - v, 75))})
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="a demo bundle with fp32 and int8-cpu graphs (default: build one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=200, help="demo test images per block")
    ap.add_argument("--blocks", type=int, default=12, help="alternating blocks per call comparison (twice this)")
    ap.add_argument("--loop-blocks", type=int, default=150, help="alternating blocks of the in-loop comparison")
    ap.add_argument("--per-block", type=int, default=20, help="images per block of the in-loop comparison")
    ap.add_argument("--out", default=str(RESULTS / "ort_call_overhead.md"))
    args = ap.parse_args(argv)

    from gfnet_edge import ops
    from gfnet_edge.data import ClutteredDigits, demo_config
    from gfnet_edge.runtime import Runtime
    from gfnet_edge.runtime.backends.onnxruntime import load_session

    ops.set_num_threads(args.threads)
    res: Dict = {"machine": machine(), "threads": args.threads, "command": command_line(__file__, argv),
                 "load": [os.getloadavg()[0]], "gaps": {}, "per_call": {}, "in_loop": {}}
    with tempfile.TemporaryDirectory(prefix="gfnet-ortcall-") as tmp:
        work = Path(tmp)
        bundle = demo_int8_bundle(work / "bundle", args.bundle, num_calib=64, log=_log)
        for prec in PRECISIONS:
            rt = Runtime(bundle, backend="onnxruntime", precision=prec, threads=args.threads)
            frames, _ = ClutteredDigits("test", config=demo_config(rt.model)).arrays(args.images)
            _log(f"{prec}: gaps")
            res["gaps"][prec] = gaps(rt, frames, repeats=max(1, args.blocks // 2))
            _log(f"{prec}: per call")
            x = np.random.default_rng(0).standard_normal((1, 3, rt.model.patch_size, rt.model.patch_size)
                                                         ).astype(np.float32)
            pcalls = {}
            for g in ("glance", "focus"):
                pcalls[g] = per_call(variants(rt.runner.sessions[g], x), 2 * args.blocks, 300)
            if prec == PRECISIONS[0]:
                s = load_session(trivial_graph(rt.runner.sessions["glance"], work / "trivial.onnx"), args.threads)
                pcalls["trivial"] = per_call(variants(s, x), 2 * args.blocks, 1000)
            res["per_call"][prec] = pcalls
            _log(f"{prec}: in the loop")
            res["in_loop"][prec] = in_loop(rt, frames, args.loop_blocks, args.per_block)
            rt.close()
    res["load"].append(os.getloadavg()[0])

    md = ["# ONNX Runtime call overhead in the batch-1 host loop", "",
          f"`{res['command']}`; {res['machine']}; {args.threads} thread(s); 1-minute load average "
          f"{res['load'][0]:.1f} -> {res['load'][1]:.1f} (start -> end); demo test images, batch 1, the bundle's "
          "default budget.", "",
          "## Per image, by part of a `predict` call (ms)", ""]
    parts = [k for k in next(iter(res["gaps"].values())) if k != "runs_per_image"]
    md.append(table(["precision", "backbone runs / image", *parts],
                    [[p, g["runs_per_image"], *(g[k] for k in parts)] for p, g in res["gaps"].items()]))
    md += ["", "## Per call (ms, median of alternating blocks; same input, outputs bit-equal)", ""]
    names = list(next(iter(next(iter(res["per_call"].values())).values())))
    rows = []
    for p, graphs in res["per_call"].items():
        for g, t in graphs.items():
            rows.append([p if g != "trivial" else "-", g, *(t[n] for n in names)])
    md.append(table(["precision", "graph", *names], rows))
    md += ["", "## In the loop (ms per image; ratio and saving against the unchanged runner: medians over "
           f"{args.loop_blocks} alternating blocks of {args.per_block} images, each block's against the same block's "
           "unchanged runner; wall clock, and the calling thread's CPU time, which other processes' preemption "
           "does not inflate -- with 1 thread ONNX Runtime runs on the calling thread)", ""]
    rows = []
    for p, r in res["in_loop"].items():
        for k, v in r.items():
            rows.append([p, k, v["ms"], v["ratio"], v["saved_ms"],
                         f"{v['saved_ms_q1']:.3f} .. {v['saved_ms_q3']:.3f}",
                         v["cpu_ms"], v["cpu_ratio"], v["cpu_saved_ms"],
                         f"{v['cpu_saved_ms_q1']:.3f} .. {v['cpu_saved_ms_q3']:.3f}"])
    md.append(table(["precision", "_run", "wall ms / image", "ratio", "saved ms", "saved ms (quartiles)",
                     "CPU ms / image", "ratio", "saved ms", "saved ms (quartiles)"], rows))
    text = "\n".join(md) + "\n"
    print(text)
    write_report(Path(args.out), text, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
