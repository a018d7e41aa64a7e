"""Shared helpers of the benchmark scripts: machine description and markdown tables.

Importing this module also makes an uninstalled checkout importable as installed (see
:func:`use_checkout`), so the scripts run on a machine where only the extension was built
in place (``bench/gpu_session.sh``).
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def use_checkout() -> None:
    """Import ``gfnet_edge`` from this checkout when it is not installed (the package maps the
    checkout's ``calibrate/`` and ``quantize/`` itself)."""
    try:
        import gfnet_edge.calibrate  # noqa: F401
        return
    except ImportError:
        pass
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


use_checkout()


def machine() -> str:
    """One line naming the CPU (and GPU when visible) this run measured."""
    from gfnet_edge.calibrate.latency import device_description

    d = device_description()
    gpu = f", GPU {d['gpu']}" if d.get("gpu") else ""
    flags = f" ({', '.join(d['cpu_flags'])})" if d.get("cpu_flags") else ""
    return f"{d['cpu']}{flags}, {d['cores']} cores{gpu}, Python {d['python']}"


def command_line(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """The command a benchmark's report names: ``python bench/SCRIPT ARGS`` (``argv``: the
    arguments given to its ``main``; ``None``: those of this process)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"bench/{Path(script).name}", *map(str, args)])


def time_calls(fn: Callable[[], object], warmup: int = 3, repeat: int = 20, min_seconds: float = 0.0) -> np.ndarray:
    """Wall-clock seconds of ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out: List[float] = []
    t_end = time.perf_counter() + min_seconds
    while len(out) < repeat or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return np.asarray(out)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    def fmt(x: object) -> str:
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out: Path, markdown: str, results: Dict) -> Path:
    """Writes ``out`` (markdown) and the JSON of ``results`` beside it; returns the JSON path."""
    import json

    import os

    out.parent.mkdir(parents=True, exist_ok=True)
    js = out.with_suffix(".json")
    # each file whole or not at all: a run killed by its time limit mid-write must not leave a
    # truncated JSON that the next step (gpu_shapes.py --profile-from) fails to read
    for path, text in ((out, markdown), (js, json.dumps(results, indent=1, default=float) + "\n")):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return js


class ProgressiveReport:
    """A benchmark's report rewritten after every measurement (:meth:`write`), so that a run
    stopped by a time limit still leaves the figures it reached; ``render(results, command)``
    makes the markdown, and :func:`partial_note` marks an unfinished one."""

    def __init__(self, out: Path, render, results: Dict, command: str, t0: float) -> None:
        self.out, self.render, self.results, self.command = out, render, results, command
        self._t0 = t0  # time.perf_counter() at the run's start: results["minutes"] counts from it

    def write(self, done: bool = False) -> None:
        import time

        self.results["complete"] = done
        self.results["minutes"] = (time.perf_counter() - self._t0) / 60
        write_report(self.out, self.render(self.results, self.command), self.results)

    def finish(self, log: Callable[[str], None]) -> int:
        """Writes the finished report, prints it, logs where it went; returns the exit status 0."""
        self.write(done=True)
        print(self.render(self.results, self.command))
        log(f"wrote {self.out} ({self.results['minutes']:.1f} min)")
        return 0


def run_label(results: Dict) -> str:
    """The report's label sentence (``--label``), and :func:`partial_note` for an unfinished run."""
    label = f" **{results['label']}**." if results.get("label") else ""
    return label + partial_note(results)


def partial_note(results: Dict) -> str:
    """The label of a report whose run stopped before its end ('' for a finished one)."""
    if results.get("complete", True):
        return ""
    return " **Partial: the run stopped before its end; the figures below are those it reached.**"


def write_results(name: str, title: str, command: str, body: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(f"# {title}\n\nCommand: `{command}`\n\nMachine: {machine()}\n\n{body}\n", encoding="utf-8")
    return path


#: ``--input`` of the scripts scoring held-out demo images: what the runtime is given
INPUTS = ("frames", "images")
INPUT_HELP = ("frames (default): trace uint8 frames, normalised inside the runtime as Runtime.predict does; "
              "images: float images normalised beforehand")


def traced_input(kind: str, frames: np.ndarray, spec) -> np.ndarray:
    """What is traced for uint8 S x S ``frames``: the frames themselves (``kind`` ``"frames"``,
    normalised inside the runtime with ``cropped=True``, as ``Runtime.predict`` and ``build-engine``'s
    search take them), or float images normalised beforehand with the mean / std of ``spec``
    (``"images"``)."""
    from gfnet_edge import ops

    return frames if kind == "frames" else ops.normalise_frames(frames, spec.mean, spec.std)


def input_note(kind: str) -> str:
    """How the traced inputs of ``kind`` (:data:`INPUTS`) reached the graphs, for a report."""
    return ("uint8 frames, normalised inside the runtime (as `Runtime.predict` takes them)" if kind == "frames"
            else "float images normalised beforehand (`ops.normalise_frames`)")


def report_head(title: str, script: str, load0: float) -> List[str]:
    """A held-out report's first lines: title, the command (this process's arguments, JSON ones
    quoted) and the machine with the 1-minute load average at the start (``load0``) and now."""
    import os

    cmd = f"python3 bench/{Path(script).name} " + " ".join(
        f"'{v}'" if ("{" in v or v.endswith("=")) else v for v in sys.argv[1:])
    return [f"# {title}", "", f"Command: `{cmd}`", "",
            f"Machine: {machine()}; 1-minute load average {load0:.1f} -> {os.getloadavg()[0]:.1f} (start -> end).", ""]


def demo_fp32(work: Path):
    """The shipped demo GFNet with its FP32 graphs exported to ``work/fp32``.

    Returns a namespace: ``model`` (GFNet), ``desc`` (ModelDesc), ``paths`` (export_model's),
    ``fp32`` (glance / focus graph paths), ``costs`` (cumulative multiply-adds per step) and
    ``thresholds`` (the default budget's, from the checkpoint).
    """
    from types import SimpleNamespace

    from gfnet_edge.build import DEFAULT_MACS_BUDGET, _budgets_from_checkpoint
    from gfnet_edge.export import export_model, manifest_model
    from gfnet_edge.model_desc import as_desc
    from gfnet_edge.models import count_step_macs, load_checkpoint

    model = load_checkpoint(ROOT / "gfnet_edge" / "assets" / "demo_gfnet.pth.tar")
    desc = as_desc(manifest_model(model))
    paths = export_model(model, Path(work) / "fp32")
    return SimpleNamespace(model=model, desc=desc, paths=paths, fp32={g: paths[g] for g in ("glance", "focus")},
                           costs=list(count_step_macs(model).cumulative),
                           thresholds=_budgets_from_checkpoint(model.meta, desc.steps)[DEFAULT_MACS_BUDGET]["thresholds"])


def demo_int8_bundle(out: Path, given: Optional[str] = None, threads: Optional[int] = None, num_calib: int = 256,
                     progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """The bundle a benchmark runs: ``given`` (its ``--bundle``) when there is one, else the
    shipped demo GFNet built into an INT8 bundle at ``out`` for ONNX Runtime (fp32 and int8-cpu
    graphs, calibrated on ``num_calib`` demo images; ``threads`` for the export and
    quantization), which ``log`` announces; returns its folder."""
    from gfnet_edge.build import BuildConfig, build_bundle
    from gfnet_edge.demo import DEMO_CHECKPOINT

    if given:
        return Path(given)
    log("building an INT8 bundle of the demo checkpoint (fp32 + int8-cpu graphs)")
    cfg = BuildConfig(precision="int8", backend="onnxruntime", calib_data="demo", num_calib=num_calib,
                      int8_profiles=("cpu",), threads=threads)
    return build_bundle(DEMO_CHECKPOINT, Path(out), cfg, progress=progress).root


def demo_test_images(model, seed: int, n: int, cache: bool = True, as_frames: bool = False):
    """``n`` demo test images (and labels) rendered with generator ``seed``, normalised with the
    mean / std of ``model`` (a ``GFNet`` or a ``ModelDesc``) (``cache``: read / write the
    generator's cache file; ``as_frames``: the uint8 (N, S, S, 3) frames, not normalised)."""
    from dataclasses import replace

    from gfnet_edge import ops
    from gfnet_edge.data import ClutteredDigits, demo_config

    cfg = replace(demo_config(model) or ClutteredDigits("test").config, seed=seed)
    frames, labels = ClutteredDigits("test", size=n, config=cfg).arrays(n, progress=False, cache=cache)
    if as_frames:
        return frames, labels
    spec = model if hasattr(model, "mean") else model.spec  # a ModelDesc, or a GFNet
    return ops.normalise_frames(frames, spec.mean, spec.std), labels


def step_bench_args(doc: str, rounds: int, rounds_help: str, calls: int, out: str,
                    argv: Optional[Sequence[str]]):
    """The options of the step-latency benches (``bench/step_alone.py``, ``bench/step_predecessor.py``):
    ``--rounds``, ``--calls``, ``--threads``, ``--precision`` and ``--out``, parsed from ``argv``,
    the counts checked."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    ap.add_argument("--calls", type=int, default=calls, help="timed calls per step and way (or pair) in each round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    ap.add_argument("--out", default=str(RESULTS / out))
    args = ap.parse_args(argv)
    if args.rounds < 3 or args.calls < 100:
        ap.error("--rounds must be >= 3 and --calls >= 100 (a p99 of fewer calls is their slowest)")
    return args


@contextmanager
def demo_step_calls(precision: str, threads: int):
    """The demo model's bundle built in a temporary folder (``precision`` graphs), opened on ONNX
    Runtime with ``threads``, and 64 validation frames (S x S), warmed up (5 calls per step).
    Yields ``(T, call)``: ``call(k, i)`` runs frame ``i`` (cycled) as a call that stops after
    step ``k`` of the model's ``T`` and returns its ms."""
    import tempfile

    from gfnet_edge.build import BuildConfig, build_bundle
    from gfnet_edge.calibrate.latency import forced_exit_thresholds, time_predict, using_thresholds, warm_up
    from gfnet_edge.data import ClutteredDigits, demo_config
    from gfnet_edge.demo import DEMO_CHECKPOINT
    from gfnet_edge.runtime import Runtime

    with tempfile.TemporaryDirectory(prefix="gfnet-step-bench-") as work:
        bundle = build_bundle(DEMO_CHECKPOINT, Path(work) / "bundle",
                              BuildConfig(precision=precision, backend="onnxruntime"), progress=False).root
        with Runtime(bundle, backend="onnxruntime", precision=precision, threads=threads) as rt:
            T = rt.model.steps
            frames, _ = ClutteredDigits("val", config=demo_config(rt.model)).arrays(64, progress=False)
            thr = [forced_exit_thresholds(T, k) for k in range(T)]

            def call(k: int, i: int) -> float:
                with using_thresholds(rt, thr[k]):
                    return time_predict(rt, frames[i % len(frames)][None])

            warm_up(lambda i: call(i % T, i), 5 * T)
            yield T, call

