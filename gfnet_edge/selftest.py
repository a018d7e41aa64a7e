"""GPU self-test: every CUDA kernel checked against the CPU path, and timed.

Usage::

    python -m gfnet_edge.selftest --gpu [--quick] [--json PATH]

Each check runs a CUDA kernel on random data, compares it with the CPU kernel of
:mod:`gfnet_edge.ops` (which the CPU tests compare with torch), and times both (median of
repeated runs; GPU times are per call, measured with the stream synchronized). Without a
CUDA build or a usable GPU it prints why and exits with status 2; a failed check exits 1.
Needs only numpy and the extension (no torch).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import numpy as np

from . import ops


@dataclass
class Result:
    """One check: name, pass/fail, the largest error and the timings (milliseconds)."""

    name: str
    ok: bool
    max_err: float
    tol: float
    gpu_ms: Optional[float] = None
    cpu_ms: Optional[float] = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def _median_ms(fn: Callable[[], None], sync: Callable[[], None], reps: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def _err(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a64 - b64))) if a64.size else 0.0


class _Checker:
    def __init__(self, quick: bool) -> None:
        self.reps = 5 if quick else 30
        self.quick = quick
        self.rng = np.random.default_rng(0)
        self.stream = ops.Stream()
        self.results: List[Result] = []

    def sync(self) -> None:
        self.stream.synchronize()

    def add(self, name: str, err: float, tol: float, gpu: Callable[[], None], cpu: Callable[[], None],
            note: str = "") -> None:
        gpu_ms = _median_ms(gpu, self.sync, self.reps)
        cpu_ms = _median_ms(cpu, lambda: None, max(3, self.reps // 3))
        res = Result(name, bool(err <= tol), err, tol, gpu_ms, cpu_ms, note)
        self.results.append(res)
        _print(res)

    # ------------------------------------------------------------------- checks ----
    def preprocess(self) -> None:
        sizes = [(1080, 1920), (480, 640)] if not self.quick else [(480, 640)]
        for (h, w) in sizes:
            for interp, S, pct, P in [("bilinear", 224, 0.875, 96), ("bicubic", 300, 0.904, 144)]:
                frame = self.rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                ref, gref = ops.preprocess(frame, S, crop_pct=pct, interpolation=interp, glance_size=P)
                fbuf = ops.to_device(frame, self.stream)
                for dtype, tol, gtol in [("float32", 0.0, 1e-5), ("float16", 2e-3, 2e-3)]:
                    esz = 4 if dtype == "float32" else 2
                    out, gout = ops.DeviceBuffer(3 * S * S * esz), ops.DeviceBuffer(3 * P * P * esz)

                    def run(out=out, gout=gout, dtype=dtype, interp=interp, S=S, pct=pct, P=P):
                        ops.cuda_preprocess(fbuf, h, w, S, out, crop_pct=pct, interpolation=interp,
                                            out_dtype=dtype, glance=gout, glance_size=P, glance_dtype=dtype,
                                            stream=self.stream)

                    run()
                    npdt = np.float32 if dtype == "float32" else np.float16
                    got = ops.from_device(out, (3, S, S), npdt, self.stream)
                    gg = ops.from_device(gout, (3, P, P), npdt, self.stream)
                    err = max(_err(got, ref[0]) / (1 if dtype == "float32" else max(1.0, np.abs(ref).max())),
                              0.0)
                    self.add(f"preprocess {h}x{w} {interp} S={S} {dtype}", err, tol, run,
                             lambda: ops.preprocess(frame, S, crop_pct=pct, interpolation=interp, glance_size=P),
                             "fp32 must be bit-identical" if dtype == "float32" else "")
                    self.results.append(Result(f"  glance part P={P} {dtype}", _err(gg, gref[0]) <= gtol * 3,
                                               _err(gg, gref[0]), gtol * 3))
                    _print(self.results[-1])
        # BGR input
        frame = self.rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)
        ref = ops.preprocess(frame, 224, bgr=True)
        out = ops.DeviceBuffer(3 * 224 * 224 * 4)
        fbuf = ops.to_device(frame, self.stream)
        run = lambda: ops.cuda_preprocess(fbuf, 360, 480, 224, out, bgr=True, stream=self.stream)  # noqa: E731
        run()
        self.add("preprocess bgr", _err(ops.from_device(out, (3, 224, 224), np.float32, self.stream), ref[0]),
                 0.0, run, lambda: ops.preprocess(frame, 224, bgr=True))
        # a batch of S x S frames that need no resize, normalised in one launch (+ the glance)
        n, S, P = 8, 224, 96
        frames = self.rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)
        ref, gref = ops.preprocess(frames, S, crop_pct=1.0, glance_size=P)
        fbuf = ops.to_device(frames, self.stream)
        out, gout = ops.DeviceBuffer(n * 3 * S * S * 4), ops.DeviceBuffer(n * 3 * P * P * 4)
        run = lambda: ops.cuda_normalise_frames(fbuf, n, S, out, glance=gout, glance_size=P,  # noqa: E731
                                                stream=self.stream)
        run()
        got = ops.from_device(out, (n, 3, S, S), np.float32, self.stream)
        self.add(f"normalise_frames batch {n} S={S}", _err(got, ref), 0.0, run,
                 lambda: ops.preprocess(frames, S, crop_pct=1.0, glance_size=P), "fp32 must be bit-identical")
        gerr = _err(ops.from_device(gout, (n, 3, P, P), np.float32, self.stream), gref)
        self.results.append(Result(f"  glance part P={P} float32", gerr <= 3e-5, gerr, 3e-5))
        _print(self.results[-1])

    def glance(self) -> None:
        for S, P, mode in [(224, 96, "bicubic"), (224, 128, "bilinear"), (300, 144, "bicubic")]:
            n = 8
            images = self.rng.standard_normal((n, 3, S, S)).astype(np.float32)
            ref = ops.glance(images, P, mode)
            for dtype in ("float32", "float16"):
                npdt = np.float32 if dtype == "float32" else np.float16
                src = images.astype(npdt)
                cpu_ref = ref if dtype == "float32" else ops.glance(src.astype(np.float32), P, mode)
                ibuf, obuf = ops.to_device(src, self.stream), ops.DeviceBuffer(n * 3 * P * P * src.itemsize)
                run = lambda: ops.cuda_glance(ibuf, n, S, obuf, P, mode, dtype, dtype, stream=self.stream)  # noqa: E731
                run()
                got = ops.from_device(obuf, (n, 3, P, P), npdt, self.stream)
                tol = 1e-5 if dtype == "float32" else 1e-2
                self.add(f"glance {S}->{P} {mode} {dtype} n={n}", _err(got, cpu_ref), tol, run,
                         lambda: ops.glance(images, P, mode))

    def crop(self) -> None:
        n, S, P = 16, 224, 96
        images = self.rng.standard_normal((n, 3, S, S)).astype(np.float32)
        coords = self.rng.integers(0, S - P + 1, (n, 2)).astype(np.int32)
        ref = ops.crop_patches(images, coords, P)
        ibuf, cbuf, obuf = ops.to_device(images, self.stream), ops.to_device(coords, self.stream), ops.DeviceBuffer(ref.nbytes)
        run = lambda: ops.cuda_crop_patches(ibuf, n, S, cbuf, obuf, P, stream=self.stream)  # noqa: E731
        run()
        self.add(f"crop_patches n={n} {S}->{P}", _err(ops.from_device(obuf, ref.shape, np.float32, self.stream), ref),
                 0.0, run, lambda: ops.crop_patches(images, coords, P))
        # Out-of-range coordinates: ValueError (synchronous form) or the error flag (async form).
        bad = coords.copy()
        bad[3] = (S - P + 1, 0)
        bbuf = ops.to_device(bad, self.stream)
        raised = False
        try:
            ops.cuda_crop_patches(ibuf, n, S, bbuf, obuf, P, stream=self.stream)
        except ValueError:
            raised = True
        flag = ops.DeviceBuffer(4)
        flag.zero(self.stream)
        ops.cuda_crop_patches(ibuf, n, S, bbuf, obuf, P, error_flag=flag, stream=self.stream)
        flag_val = int(ops.from_device(flag, (1,), np.int32, self.stream)[0])
        ok = raised and flag_val == 1
        res = Result("crop_patches rejects out-of-range coords", ok, 0.0 if ok else 1.0, 0.0,
                     note=f"raised={raised} flag={flag_val}")
        self.results.append(res)
        _print(res)

    def gru(self) -> None:
        # The last two take the scalar (unvectorised) path: sizes not a multiple of 8.
        configs = [(2048, 1024, 1000, 1), (2048, 1024, 1000, 64), (256, 256, 2, 7), (100, 60, 5, 3), (36, 20, 2, 9)]
        if self.quick:
            configs = configs[::2]
        for I, H, C, B in configs:
            w = [self.rng.uniform(-1, 1, s).astype(np.float32) / np.sqrt(H) for s in
                 [(3 * H, I), (3 * H, H), (3 * H,), (3 * H,), (C, H), (C,)]]
            x = self.rng.standard_normal((B, I)).astype(np.float32)
            h = self.rng.standard_normal((B, H)).astype(np.float32)
            actor = C == 2
            for dtype in ("float32", "float16"):
                cls = ops.ActorHead if actor else ops.GRUHead
                cpu, gpu = cls(*w, weight_dtype=dtype), cls(*w, weight_dtype=dtype, device="cuda")
                xb, hb = ops.to_device(x, self.stream), ops.to_device(h, self.stream)
                hout = ops.DeviceBuffer(B * H * 4)
                tol_h = 2e-5 if dtype == "float32" else 2e-4
                if actor:
                    ref = cpu.step(x, h, 224, 96)
                    ab, cb = ops.DeviceBuffer(B * 8), ops.DeviceBuffer(B * 8)
                    run = lambda: gpu.step_device(xb, hb, hout, B, ab, cb, 224, 96, stream=self.stream)  # noqa: E731
                    run()
                    got_h = ops.from_device(hout, (B, H), np.float32, self.stream)
                    got_a = ops.from_device(ab, (B, 2), np.float32, self.stream)
                    got_c = ops.from_device(cb, (B, 2), np.int32, self.stream)
                    err = max(_err(got_h, ref[0]), _err(got_a, ref[1]), float(np.abs(got_c - ref[2]).max()) / 1e3)
                    self.add(f"actor GRU {I}->{H} B={B} {dtype}", err, tol_h, run, lambda: cpu.step(x, h, 224, 96))
                else:
                    ref = cpu.step(x, h)
                    lb, mb, amb = ops.DeviceBuffer(B * C * 4), ops.DeviceBuffer(B * 4), ops.DeviceBuffer(B * 4)
                    run = lambda: gpu.step_device(xb, hb, hout, B, lb, mb, amb, stream=self.stream)  # noqa: E731
                    run()
                    got = [ops.from_device(hout, (B, H), np.float32, self.stream),
                           ops.from_device(lb, (B, C), np.float32, self.stream),
                           ops.from_device(mb, (B,), np.float32, self.stream),
                           ops.from_device(amb, (B,), np.int32, self.stream)]
                    err = max(_err(got[0], ref[0]), _err(got[1], ref[1]) / 10, _err(got[2], ref[2]))
                    agree = float(np.mean(got[3] == ref[3]))
                    res_note = f"argmax agreement {agree:.3f}"
                    self.add(f"GRU classifier {I}->{H}->{C} B={B} {dtype}", err, tol_h, run,
                             lambda: cpu.step(x, h), res_note)
                    # zero initial state + float16 logits
                    l16 = ops.DeviceBuffer(B * C * 2)
                    gpu.step_device(xb, None, hout, B, l16, logits_dtype="float16", stream=self.stream)
                    ref0 = cpu.step(x, None)
                    e0 = max(_err(ops.from_device(hout, (B, H), np.float32, self.stream), ref0[0]),
                             _err(ops.from_device(l16, (B, C), np.float16, self.stream), ref0[1]) / 100)
                    res = Result(f"  h=None, float16 logits {dtype}", e0 <= tol_h * 5, e0, tol_h * 5)
                    self.results.append(res)
                    _print(res)

    def cascaded(self) -> None:
        T, N, Fd, C = 4, 32, 1280, 1000
        layers = [(self.rng.standard_normal((C, k * Fd)).astype(np.float32) / np.sqrt(k * Fd),
                   self.rng.standard_normal(C).astype(np.float32)) for k in range(2, T + 1)]
        feats = self.rng.standard_normal((N, T, Fd)).astype(np.float32)
        for layout in ("ntf", "tnf"):
            buf = feats if layout == "ntf" else np.ascontiguousarray(feats.transpose(1, 0, 2))
            for dtype in ("float32", "float16"):
                cpu = ops.CascadedHead(layers, weight_dtype=dtype)
                gpu = ops.CascadedHead(layers, weight_dtype=dtype, device="cuda")
                fb = ops.to_device(buf, self.stream)
                lb, mb, ab = ops.DeviceBuffer(N * C * 4), ops.DeviceBuffer(N * 4), ops.DeviceBuffer(N * 4)
                ref = cpu.step(buf, 3, layout)
                run = lambda: gpu.step_device(fb, T, N, Fd, 3, lb, mb, ab, layout=layout, stream=self.stream)  # noqa: E731
                run()
                got = ops.from_device(lb, (N, C), np.float32, self.stream)
                gm = ops.from_device(mb, (N,), np.float32, self.stream)
                err = max(_err(got, ref[0]) / 10, _err(gm, ref[1]))
                self.add(f"cascaded k=3 {layout} N={N} {dtype}", err, 1e-4 if dtype == "float32" else 1e-3, run,
                         lambda: cpu.step(buf, 3, layout))

    def linear(self) -> None:
        w = self.rng.standard_normal((2048, 18432)).astype(np.float32) / 100
        b = self.rng.standard_normal(2048).astype(np.float32)
        x = self.rng.standard_normal((4, 18432)).astype(np.float32)
        ref = ops.linear(x, w, b, relu=True)
        lin = ops.Linear(w, b, "float32", device="cuda")
        xb, ob = ops.to_device(x, self.stream), ops.DeviceBuffer(ref.nbytes)
        run = lambda: lin.forward_device(xb, ob, 4, relu=True, stream=self.stream)  # noqa: E731
        run()
        self.add("linear+relu 18432->2048 B=4 (policy encoder)", _err(ops.from_device(ob, ref.shape, np.float32,
                 self.stream), ref) / max(1.0, np.abs(ref).max()), 1e-5, run, lambda: ops.linear(x, w, b, relu=True))

        # Scalar path: an input size that is not a multiple of the vector width.
        w2 = self.rng.standard_normal((37, 1001)).astype(np.float32) / 30
        b2 = self.rng.standard_normal(37).astype(np.float32)
        x2 = self.rng.standard_normal((5, 1001)).astype(np.float32)
        for dtype in ("float32", "float16"):
            ref2 = ops.linear(x2, w2.astype(dtype).astype(np.float32), b2)  # same weights as stored
            lin2 = ops.Linear(w2, b2, dtype, device="cuda")
            xb2, ob2 = ops.to_device(x2, self.stream), ops.DeviceBuffer(ref2.nbytes)
            run2 = lambda lin2=lin2, xb2=xb2, ob2=ob2: lin2.forward_device(xb2, ob2, 5, stream=self.stream)  # noqa: E731
            run2()
            self.add(f"linear 1001->37 B=5 {dtype} weights (unvectorised)",
                     _err(ops.from_device(ob2, ref2.shape, np.float32, self.stream), ref2), 1e-5, run2,
                     lambda: ops.linear(x2, w2, b2))

    def gather(self) -> None:
        """Row gather (the device loop's batch compaction) against numpy fancy indexing."""
        # (rows, row_bytes, gathered rows, dst offset): 16-byte, 4-byte and byte-wise paths.
        cases = [(32, 3 * 224 * 224 * 4, 20, 0), (9, 4096, 9, 0), (9, 4096, 5, 4), (7, 12, 11, 0), (5, 7, 3, 1)]
        if self.quick:
            cases = cases[1:]
        for rows, row_bytes, m, off in cases:
            src = self.rng.integers(0, 256, (rows, row_bytes), dtype=np.uint8)
            idx = self.rng.integers(0, rows, m).astype(np.int32)  # repeats allowed
            ref = src[idx]
            sb, ib = ops.to_device(src, self.stream), ops.to_device(idx, self.stream)
            db = ops.DeviceBuffer(m * row_bytes + off)
            dst = db.ptr + off
            for where in ("device", "host"):
                index = ib if where == "device" else idx

                def run(index=index, dst=dst):
                    ops.cuda_gather_rows(sb, rows, index, dst, row_bytes, n=m, stream=self.stream)

                run()
                got = np.empty(m * row_bytes + off, np.uint8)
                db.copy_to_host(got, self.stream)
                err = float(np.count_nonzero(got[off:].reshape(m, row_bytes) != ref))
                self.add(f"gather_rows {m} of {rows} x {row_bytes} B, {where} idx, dst+{off}", err, 0.0, run,
                         lambda: src[idx], "must equal src[idx]")
        # Out-of-range device index: the sync form raises, the flag form zero-fills and flags.
        src = self.rng.standard_normal((4, 8)).astype(np.float32)
        sb, db = ops.to_device(src, self.stream), ops.DeviceBuffer(3 * 32)
        ib = ops.to_device(np.array([1, 4, 0], np.int32), self.stream)
        raised = False
        try:
            ops.cuda_gather_rows(sb, 4, ib, db, 32, n=3, stream=self.stream)
        except ValueError:
            raised = True
        flag = ops.DeviceBuffer(4)
        flag.zero(self.stream)
        ops.cuda_gather_rows(sb, 4, ib, db, 32, n=3, error_flag=flag, stream=self.stream)
        got = ops.from_device(db, (3, 8), np.float32, self.stream)
        flag_val = int(ops.from_device(flag, (1,), np.int32, self.stream)[0])
        ok = raised and flag_val == 1 and not got[1].any() and np.array_equal(got[[0, 2]], src[[1, 0]])
        res = Result("gather_rows rejects out-of-range indices", ok, 0.0 if ok else 1.0, 0.0,
                     note=f"raised={raised} flag={flag_val}")
        self.results.append(res)
        _print(res)

    def buffers(self) -> None:
        a = self.rng.standard_normal(1000).astype(np.float32)
        buf = ops.to_device(a, self.stream)
        back = ops.from_device(buf, a.shape, np.float32, self.stream)
        buf.zero(self.stream)
        zero = ops.from_device(buf, a.shape, np.float32, self.stream)
        ok = np.array_equal(a, back) and not zero.any()
        res = Result("DeviceBuffer / Stream round trip", ok, 0.0 if ok else 1.0, 0.0)
        self.results.append(res)
        _print(res)


def _print(r: Result) -> None:
    timing = ""
    if r.gpu_ms is not None:
        speed = f" ({r.cpu_ms / r.gpu_ms:.1f}x)" if r.gpu_ms and r.cpu_ms else ""
        timing = f"  gpu {r.gpu_ms:8.3f} ms  cpu {r.cpu_ms:8.3f} ms{speed}"
    status = "PASS" if r.ok else "FAIL"
    print(f"[{status}] {r.name:<52} err {r.max_err:9.2e} (tol {r.tol:.0e}){timing} {r.note}", flush=True)


def run_checks(quick: bool = False) -> List[Result]:
    """Runs every CUDA check; raises RuntimeError when no GPU is usable."""
    if not ops.has_cuda_build():
        raise RuntimeError("gfnet_edge._C was built without CUDA (nvcc not found or GFNET_EDGE_CUDA=0)")
    if ops.cuda_device_count() < 1:
        raise RuntimeError(f"no usable CUDA device: {ops.cuda_device_error()}")
    checker = _Checker(quick)
    for check in (checker.buffers, checker.preprocess, checker.glance, checker.crop, checker.gather, checker.gru,
                  checker.cascaded, checker.linear):
        check()
    return checker.results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gfnet_edge.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="check and time every CUDA kernel (the default)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    print(f"gfnet_edge selftest: {platform.node()} {platform.machine()}, CPU threads {ops.get_num_threads()} "
          f"({ops.simd_level()}), CUDA build {ops.has_cuda_build()} archs [{ops.cuda_archs()}]")
    try:
        if ops.cuda_device_count() > 0:
            props = ops.cuda_device_properties(0)
            print(f"device 0: {props['name']} sm_{props['major']}{props['minor']}, "
                  f"{props['total_memory'] / 2**30:.1f} GiB, {props['multiprocessors']} SMs")
        results = run_checks(args.quick)
    except RuntimeError as exc:
        print(f"selftest: cannot run the GPU checks: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump([asdict(r) for r in results], fh, indent=2, default=float)  # numpy scalars
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
