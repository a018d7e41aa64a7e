"""Device-side parity between two machines: record results on x86, check them on aarch64.

``record`` (x86, with torch, torchvision and scikit-learn) writes one ``.npz`` with

* every kernel case of ``tools/aarch64_cases.py``: its inputs, its torch reference and the
  x86 extension's outputs (portable path);
* a demo bundle (fp32, ONNX Runtime), built from the shipped demo checkpoint into ``--bundle``,
  the first ``--images`` frames of the demo test split, and what ``Runtime`` predicted and
  traced for them on x86.

``check`` (the device side: numpy, ONNX Runtime and the extension; no torch) reruns all of it
on this machine and compares: each kernel output with its torch reference (the tolerances of
``tests/test_kernels.py``) and with the x86 output; ``Runtime``'s classes, exit steps and patch
coordinates must be identical to x86's, its confidences and traced probabilities within 1e-5.
When the extension has SIMD kernels here, the kernel cases also run on the portable path and
must give the same outputs: bit-identical with NEON (aarch64), whose kernels do the portable
arithmetic in the same order; with AVX2 (x86-64), whose GEMV fuses multiply-adds, floats within
1e-6. It prints one line per check and ``parity: N passed, M failed``.

    python tools/aarch64_parity.py record ref.npz --bundle demo-bundle --images 64
    python tools/aarch64_parity.py check ref.npz --bundle demo-bundle

Exit status: 0 every check passed, 1 a check failed, 2 bad arguments or an unreadable file.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aarch64_cases import EXACT, KernelCase, Tolerance, kernel_cases  # noqa: E402

#: x86 against this machine, for the same kernel on the same inputs (floats; integers: exact).
CROSS = Tolerance(atol=1e-6, rtol=1e-6)
#: SIMD kernels against the portable path on this machine, floats (integers: exact).
SIMD_TOL = {"neon": EXACT, "avx2": CROSS}
#: Runtime confidences and probabilities, x86 against this machine.
RUNTIME_TOL = Tolerance(atol=1e-5)
PRECISION = "fp32"


@dataclass
class Report:
    """Check results: one line per check, printed as they come."""

    passed: int = 0
    failed: int = 0
    lines: List[str] = field(default_factory=list)

    def add(self, ok: bool, name: str, detail: str) -> None:
        line = f"{'ok  ' if ok else 'FAIL'} {name}: {detail}"
        print(line, flush=True)
        self.lines.append(line)
        if ok:
            self.passed += 1
        else:
            self.failed += 1


def _seed(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def _compare(ours: np.ndarray, ref: np.ndarray, tol: Tolerance) -> Optional[str]:
    """None when ``ours`` matches ``ref`` within ``tol``; else what differs."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    if ours.shape != ref.shape:
        return f"shape {ours.shape} != {ref.shape}"
    if tol.exact:
        if np.array_equal(ours, ref):
            return None
        bad = int((ours != ref).sum())
    else:
        a, b = ours.astype(np.float64), ref.astype(np.float64)
        over = np.abs(a - b) > tol.atol + tol.rtol * np.abs(b)
        if not over.any():
            return None
        bad = int(over.sum())
    d = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    return f"{bad} of {ref.size} values outside {tol} (max |diff| {d.max():.3g})"


def _cross_tol(arr: np.ndarray) -> Tolerance:
    return CROSS if np.issubdtype(np.asarray(arr).dtype, np.floating) else EXACT


def _with_simd(enabled: bool, case: KernelCase, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    from gfnet_edge import ops

    ops.set_simd_enabled(enabled)
    try:
        return case.run(inputs)
    finally:
        ops.set_simd_enabled(True)


# -------------------------------------------------------------------------- record ----
def _runtime(bundle: Path, frames: np.ndarray, threads: int) -> Dict[str, np.ndarray]:
    from gfnet_edge.runtime import Runtime

    with Runtime(bundle, backend="onnxruntime", precision=PRECISION, threads=threads) as rt:
        pred = rt.predict(frames)
        trace = rt.trace(frames)
    return {"classes": pred.classes, "exit_step": pred.exit_step, "confidence": pred.confidence,
            "coords": pred.coords, "trace_probs": trace.probs, "trace_coords": trace.coords}


def record(out: Path, bundle: Path, images: int, threads: int) -> None:
    """Writes the kernel cases and, for ``images > 0``, the demo bundle's x86 results."""
    import onnxruntime

    from gfnet_edge import ops

    ops.set_num_threads(threads)
    arrays: Dict[str, np.ndarray] = {}
    for case in kernel_cases():
        inputs, ref = case.make(_seed(case.name))
        x86 = _with_simd(False, case, inputs)
        for kind, d in (("in", inputs), ("ref", ref), ("x86", x86)):
            arrays.update({f"kernel/{case.name}/{kind}/{k}": np.asarray(v) for k, v in d.items()})
    meta = {"machine": platform.machine(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "simd": ops.simd_level(), "threads": threads, "images": images, "precision": PRECISION}
    if images > 0:
        from gfnet_edge.build import BuildConfig, build_bundle
        from gfnet_edge.data import ClutteredDigits, demo_config
        from gfnet_edge.demo import DEMO_CHECKPOINT

        b = build_bundle(DEMO_CHECKPOINT, bundle, BuildConfig(precision=PRECISION, backend="onnxruntime"),
                         progress=False)
        frames, _ = ClutteredDigits("test", config=demo_config(b.model)).arrays(images, progress=False, cache=False)
        arrays["runtime/frames"] = frames
        arrays.update({f"runtime/{k}": v for k, v in _runtime(bundle, frames, threads).items()})
    arrays["meta"] = np.array(json.dumps(meta))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out)


# --------------------------------------------------------------------------- check ----
def _group(data, prefix: str) -> Dict[str, np.ndarray]:
    return {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}


def _check_kernels(data, report: Report) -> None:
    from gfnet_edge import ops

    simd = ops.simd_level()
    for case in kernel_cases():
        base = f"kernel/{case.name}/"
        inputs, ref, x86 = (_group(data, base + kind + "/") for kind in ("in", "ref", "x86"))
        if not inputs:
            report.add(False, case.name, "not in the reference file (recorded by another version)")
            continue
        ours = case.run(inputs)
        problems = []
        for name, tol in case.tolerance.items():
            for label, other, t in (("torch", ref, tol), ("x86", x86, _cross_tol(ours[name]))):
                err = _compare(ours[name], other[name], t)
                if err:
                    problems.append(f"{name} vs {label}: {err}")
        same = sum(np.array_equal(ours[k], x86[k]) for k in case.tolerance)
        detail = f"torch reference and x86 match ({same}/{len(case.tolerance)} outputs bit-identical to x86)"
        if simd != "generic":
            plain = _with_simd(False, case, inputs)
            simd_tol = SIMD_TOL.get(simd, CROSS)
            for name in case.tolerance:
                t = simd_tol if np.issubdtype(np.asarray(ours[name]).dtype, np.floating) else EXACT
                err = _compare(ours[name], plain[name], t)
                if err:
                    problems.append(f"{name} {simd} vs portable: {err}")
            detail += f"; {simd} {'bit-identical to' if simd_tol.exact else 'within ' + str(simd_tol) + ' of'} portable"
        report.add(not problems, case.name, "; ".join(problems) if problems else detail)


def _check_runtime(data, bundle: Path, threads: int, report: Report) -> None:
    x86 = _group(data, "runtime/")
    frames = x86.pop("frames")
    ours = _runtime(bundle, frames, threads)
    for name in ("classes", "exit_step", "coords", "trace_coords", "confidence", "trace_probs"):
        tol = RUNTIME_TOL if name in ("confidence", "trace_probs") else EXACT
        err = _compare(ours[name], x86[name], tol)
        d = np.abs(ours[name].astype(np.float64) - x86[name].astype(np.float64)).max() if err is None else 0.0
        report.add(err is None, f"runtime {name} ({len(frames)} demo test images)",
                   err or ("identical to x86" if tol.exact else f"within {tol} of x86 (max |diff| {d:.3g})"))


def check(ref: Path, bundle: Path, threads: int) -> Report:
    """Reruns the recorded cases here and compares; returns the report."""
    from gfnet_edge import ops

    ops.set_num_threads(threads)
    report = Report()
    with np.load(ref, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        print(f"reference: {meta['machine']} (simd {meta['simd']}, numpy {meta['numpy']}, onnxruntime "
              f"{meta['onnxruntime']}); here: {platform.machine()} (simd {ops.simd_level()})", flush=True)
        _check_kernels(data, report)
        if meta["images"] > 0:
            _check_runtime(data, bundle, threads, report)
    return report


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("record", "check"))
    p.add_argument("file", type=Path, help="the reference .npz (written by record, read by check)")
    p.add_argument("--bundle", type=Path, required=True, help="the demo bundle's folder (record creates it)")
    p.add_argument("--images", type=int, default=64, help="demo test images for the Runtime check (record; 0: none)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for ONNX Runtime and the extension")
    args = p.parse_args(argv)
    if args.threads < 1 or args.images < 0:
        print("error: --threads must be >= 1 and --images >= 0", file=sys.stderr)
        return 2
    if args.action == "record":
        if args.images > 0 and args.bundle.exists():
            print(f"error: {args.bundle} already exists (record writes a new bundle there)", file=sys.stderr)
            return 2
        record(args.file, args.bundle, args.images, args.threads)
        print(f"wrote {args.file}")
        return 0
    if not args.file.is_file():
        print(f"error: no reference file {args.file} (run record first)", file=sys.stderr)
        return 2
    report = check(args.file, args.bundle, args.threads)
    if "torch" in sys.modules:
        report.add(False, "device side", "torch was imported")
    print(f"parity: {report.passed} passed, {report.failed} failed")
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
