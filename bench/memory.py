"""Peak memory and throughput of one Runtime call of 1 to 10,000 frames (demo model, CPU).

    python bench/memory.py [--bundle DIR] [--sizes 1,100,1000,10000] [--threads 2]
                           [--max-batch 32] [--one-chunk-up-to 1000] [--repeat 1]

Each measurement runs in a fresh process: the runtime is loaded (ONNX Runtime, fp32, the
bundle's default budget) and warmed up on one frame, the input is made (the first 1000 frames
of the demo test split, uint8 224 x 224, repeated to the size), the process's peak resident set (VmHWM) is reset
to its current size (``/proc/self/clear_refs``), and one ``predict`` or ``trace`` call runs
(calls of fewer than 1000 frames are repeated up to 1000 frames). Reported: the input's size,
the peak's rise above the resident set just before the call (so the input is not counted), and
images per second of wall-clock time and of the process's CPU time (all threads; steadier than
wall-clock time on a machine shared with other jobs). The same calls with
``max_batch`` set to the whole call (one chunk, as a runtime without chunking runs it) are
measured for the sizes up to ``--one-chunk-up-to`` as the reference. ``--max-batch`` may list
several chunk sizes (``8,32,128``): each is measured in turn. With ``--repeat R`` the whole set
is measured R times, the order of the calls rotating between repeats, and the table gives the
median and the range of the R runs of each row.

Prints a table and writes ``bench/results/memory.md`` and ``memory.json``. Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, command_line, machine, table, write_report  # noqa: E402

DEMO = ROOT / "gfnet_edge" / "assets" / "demo_gfnet.pth.tar"


def _status(key: str) -> int:
    """A ``/proc/self/status`` size in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def worker(args: argparse.Namespace) -> None:
    """One measurement (run in its own process); prints one JSON line."""
    import numpy as np

    from gfnet_edge.runtime import Runtime

    with Runtime(args.bundle, backend="onnxruntime", precision="fp32", threads=args.threads,
                 max_batch=args.max_batch) as rt:
        source = np.load(args.frames, mmap_mode="r")
        rt.predict(np.ascontiguousarray(source[:1]))
        x = np.empty((args.n,) + source.shape[1:], np.uint8)
        for i in range(0, args.n, len(source)):
            x[i:i + len(source)] = source[:min(len(source), args.n - i)]
        del source
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        calls = max(1, 1000 // args.n)  # small calls repeated, for a steadier throughput
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(calls):
            getattr(rt, args.call)(x)
        seconds = (time.perf_counter() - t0) / calls
        cpu_seconds = (time.process_time() - c0) / calls
        peak = _status("VmHWM")
    print(json.dumps({"n": args.n, "call": args.call, "max_batch": args.max_batch, "input": x.nbytes,
                      "before": before, "peak": peak, "seconds": seconds,
                      "cpu_seconds": cpu_seconds}))


def measure(bundle: Path, frames: Path, n: int, call: str, max_batch: int, threads: int) -> Dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--bundle", str(bundle), "--frames", str(frames), "--n", str(n),
           "--call", call, "--max-batch", str(max_batch), "--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"memory benchmark: {call} of {n} frames failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="an ONNX Runtime bundle of the demo checkpoint (default: build one)")
    p.add_argument("--sizes", default="1,100,1000,10000", help="frames per call (comma-separated)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", default="32",
                   help="the runtime's chunk (default 32, its default); a comma-separated list measures each")
    p.add_argument("--repeat", type=int, default=1, help="measure the whole set this many times (rotating order)")
    p.add_argument("--one-chunk-up-to", type=int, default=1000,
                   help="also measure calls run as one chunk for sizes up to this (default 1000)")
    p.add_argument("--out", type=Path, default=RESULTS / "memory.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--frames", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--call", choices=["predict", "trace"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.max_batch = int(args.max_batch)
        worker(args)
        return 0
    import numpy as np

    from gfnet_edge.data import ClutteredDigits, demo_config

    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from gfnet_edge.build import BuildConfig, build_bundle

            bundle = build_bundle(DEMO, Path(tmp) / "bundle", BuildConfig(precision="fp32", backend="onnxruntime"),
                                  progress=False).root
        from gfnet_edge.bundle import Bundle

        model = Bundle.load(bundle).model
        frames = Path(tmp) / "frames.npy"
        np.save(frames, ClutteredDigits("test", config=demo_config(model)).arrays(min(max(sizes), 1000))[0])
        load = os.getloadavg()[0]
        chunks = [int(c) for c in args.max_batch.split(",")]
        keys = [(n, call, chunk, chunk == n and n > max(chunks)) for n in sizes for call in ("predict", "trace")
                for chunk in chunks + ([n] if n <= args.one_chunk_up_to and n > max(chunks) else [])]
        runs: Dict[Any, List[Dict[str, Any]]] = {k: [] for k in keys}
        results = []
        for rep in range(args.repeat):
            shift = rep % len(keys)
            for key in keys[shift:] + keys[:shift]:
                n, call, chunk, _ = key
                r = measure(bundle, frames, n, call, chunk, args.threads)
                r["repeat"] = rep
                results.append(r)
                runs[key].append(r)
                print(f"{n} {call} max_batch {chunk}: peak rise {(r['peak'] - r['before']) / 2 ** 20:.0f} MiB, "
                      f"{n / r['seconds']:.0f} images/s, {n / r['cpu_seconds']:.0f} per CPU-second", flush=True)
        load_end = os.getloadavg()[0]

        def stat(values: List[float]) -> str:
            med = f"{float(np.median(values)):.0f}"
            return med if len(values) == 1 else f"{med} ({min(values):.0f}-{max(values):.0f})"

        rows = []
        for key in keys:
            n, call, chunk, whole = key
            rs = runs[key]
            rows.append([n, call, "one chunk" if whole else chunk, f"{rs[0]['input'] / 2 ** 20:.1f}",
                         stat([(r["peak"] - r["before"]) / 2 ** 20 for r in rs]),
                         stat([n / r["seconds"] for r in rs]), stat([n / r["cpu_seconds"] for r in rs])])
    md = ["# Runtime memory per call (`bench/memory.py`)", "",
          f"Machine: {machine()}; ONNX Runtime fp32, {args.threads} threads, default budget "
          f"of the bundle; 1-minute load average {load:.1f} -> {load_end:.1f} (start -> end). Command: `"
          + command_line(__file__, argv) + "`.", "",
          (f"Median (range) of {args.repeat} runs per row, the order of the calls rotating between runs." + "\n\n"
           if args.repeat > 1 else "")
          + table(["frames per call", "call", "max_batch", "input MiB", "peak rise MiB", "images/s",
                   "images per CPU-second"], rows), ""]
    text = "\n".join(md)
    print(text)
    write_report(args.out, text, {"machine": machine(), "threads": args.threads, "load": [load, load_end],
                                  "repeat": args.repeat, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
