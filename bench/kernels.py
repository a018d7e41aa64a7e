"""Benchmark of the CPU kernels against their torch equivalents, same thread count, same run.

    python bench/kernels.py [--threads N[,M...]] [--reps R] [--runs K] [--out bench/results/kernels.md]

Cases: pre-process + glance of a 1920x1080 uint8 frame (bilinear S=224 -> P=96, and bicubic
EfficientNet-B3 sizes S=300 -> P=144) against the fastest torch chain found (antialiased uint8
resize, crop, normalise, bicubic align_corners glance); the GRU step 2048 -> 1024 at batch 1
against torch.nn.GRUCell (float32, and float16 weight storage), with the effective weight
bandwidth next to a measured memory read and copy bandwidth; patch crop and glance alone.
Timings interleave torch and ours in rounds (robust to background load) and report medians.
Prints a table and writes it as markdown.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# torch's OpenMP workers busy-wait after every parallel region by default; in an interleaved
# benchmark they then take a core from whatever runs next (ours), which no deployment sees.
# Set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gfnet_edge import ops  # noqa: E402

MEAN, STD = ops.IMAGENET_MEAN, ops.IMAGENET_STD


def cpu_model() -> str:
    from gfnet_edge.calibrate.latency import device_description

    return str(device_description()["cpu"])


def interleaved(fns: Dict[str, Callable[[], object]], reps: int, rounds: int = 5,
                before: Callable[[], None] = None) -> Dict[str, float]:
    """Median milliseconds of each function, measured in alternating rounds."""
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm up
        for _ in range(3):
            fn()
    per_round = max(1, reps // rounds)
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                if before is not None:
                    before()
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v) * 1e3) for k, v in samples.items()}


# ------------------------------------------------------------------------ pre-process ----
def torch_chains(frame: np.ndarray, S: int, crop_pct: float, interp: str, P: int) -> Dict[str, Callable]:
    """Candidate torch chains (the benchmark keeps the fastest)."""
    import torchvision.transforms.v2.functional as tvf

    mode = {"bilinear": tvf.InterpolationMode.BILINEAR, "bicubic": tvf.InterpolationMode.BICUBIC}[interp]
    size = int(S / crop_pct)
    h, w = frame.shape[:2]
    short, long = min(h, w), max(h, w)
    new = (size, int(size * long / short)) if h <= w else (int(size * long / short), size)
    top, left = int(round((new[0] - S) / 2.0)), int(round((new[1] - S) / 2.0))
    mean_t, std_t = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    scale_t, shift_t = 1.0 / (255.0 * std_t), mean_t / std_t

    def torchvision_chain():
        t = torch.from_numpy(frame).permute(2, 0, 1)
        r = tvf.resize(t, [size], interpolation=mode, antialias=True)
        c = tvf.center_crop(r, [S, S])
        x = tvf.normalize(c.float() / 255, list(MEAN), list(STD))
        return x, F.interpolate(x[None], size=(P, P), mode="bicubic", align_corners=True)

    def fused_chain():
        t = torch.from_numpy(frame).permute(2, 0, 1)[None]  # channels-last view: the AVX uint8 kernel
        r = F.interpolate(t, size=new, mode=interp, antialias=True)
        x = r[:, :, top:top + S, left:left + S].float().mul_(scale_t).sub_(shift_t)
        return x, F.interpolate(x, size=(P, P), mode="bicubic", align_corners=True)

    return {"torchvision": torchvision_chain, "interpolate+fused-normalise": fused_chain}


def bench_preprocess(reps: int) -> List[Tuple[str, float, float, str]]:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(1080, 1920, 3), dtype=np.uint8)
    rows = []
    for interp, S, pct, P in [("bilinear", 224, 0.875, 96), ("bicubic", 300, 0.904, 144)]:
        out = np.empty((1, 3, S, S), np.float32)
        g = np.empty((1, 3, P, P), np.float32)
        chains = torch_chains(frame, S, pct, interp, P)
        fns = {f"torch {k}": v for k, v in chains.items()}
        fns["ours"] = lambda: ops.preprocess(frame, S, crop_pct=pct, interpolation=interp, glance_size=P,
                                             out=out, glance_out=g)
        t = interleaved(fns, reps)
        best_name = min((k for k in t if k != "ours"), key=t.get)
        rows.append((f"pre-process + glance 1920x1080 {interp} S={S} P={P}", t[best_name], t["ours"],
                     f"best torch: {best_name[6:]}"))
    return rows


# ------------------------------------------------------------------------------ GRU ----
def bench_gru(reps: int) -> Tuple[List[Tuple[str, float, float, str]], Dict[str, float]]:
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(2048, 1024).eval()
    w = [p.detach().numpy() for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)]
    x, h = torch.randn(1, 2048), torch.randn(1, 1024)
    xn, hn = x.numpy(), h.numpy()
    c32, c16 = ops.GRUCell(*w), ops.GRUCell(*w, weight_dtype="float16")
    wbytes32 = sum(a.nbytes for a in w[:2])
    flush = np.ones(96 << 18, np.float32)  # 96 MiB: evicts the L3 between cold runs

    def evict():
        flush.sum()

    def torch_step():
        with torch.no_grad():
            return cell(x, h)

    rows, bw = [], {}
    for label, before in [("hot (back to back)", None), ("cold (L3 flushed before each step)", evict)]:
        t = interleaved({"torch": torch_step, "f32": lambda: c32.step(xn, hn), "f16": lambda: c16.step(xn, hn)},
                        reps, before=before)
        for key, name, nbytes in [("f32", "float32 weights", wbytes32), ("f16", "float16 weights", wbytes32 // 2)]:
            gbps = nbytes / (t[key] * 1e-3) / 1e9
            rows.append((f"GRU step 2048->1024 B=1 {name}, {label}", t["torch"], t[key],
                         f"ours {gbps:.1f} GB/s of weights, torch {wbytes32 / (t['torch'] * 1e-3) / 1e9:.1f} GB/s"))
    # Memory roofline: a parallel read of the fp32 weight size with the same threads, and a copy.
    bw["read_36MiB"] = wbytes32 / ops.read_pass_seconds(wbytes32, 30) / 1e9
    bw["read_256MiB"] = (256 << 20) / ops.read_pass_seconds(256 << 20, 5) / 1e9
    src, dst = np.ones(64 << 20, np.uint8), np.empty(64 << 20, np.uint8)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(10))
    bw["copy_64MiB"] = src.nbytes / best / 1e9
    return rows, bw


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------- crop / glance ----
def bench_crop_glance(reps: int) -> List[Tuple[str, float, float, str]]:
    rng = np.random.default_rng(0)
    rows = []
    n, S, P = 16, 224, 96
    images = rng.standard_normal((n, 3, S, S)).astype(np.float32)
    coords = rng.integers(0, S - P + 1, size=(n, 2)).astype(np.int32)
    ti, tc = torch.from_numpy(images), torch.from_numpy(coords).long()
    ar, ii = torch.arange(n), torch.arange(P)

    def torch_stack():
        return torch.stack([ti[i, :, r:r + P, c:c + P] for i, (r, c) in enumerate(coords.tolist())])

    def torch_gather():
        rows_ = (tc[:, 0, None] + ii)[:, None, :, None]
        cols_ = (tc[:, 1, None] + ii)[:, None, None, :]
        return ti[ar[:, None, None, None], torch.arange(3)[None, :, None, None], rows_, cols_]

    out = np.empty((n, 3, P, P), np.float32)
    t = interleaved({"torch stack": torch_stack, "torch gather": torch_gather,
                     "ours": lambda: ops.crop_patches(images, coords, P, out=out)}, reps)
    best = min(("torch stack", "torch gather"), key=t.get)
    rows.append((f"crop_patches N={n} {S}->{P}", t[best], t["ours"], f"best torch: {best[6:]}"))
    for N, mode in [(1, "bicubic"), (16, "bicubic"), (16, "bilinear")]:
        x = rng.standard_normal((N, 3, S, S)).astype(np.float32)
        tx = torch.from_numpy(x)
        g = np.empty((N, 3, P, P), np.float32)
        t = interleaved({"torch": lambda: F.interpolate(tx, size=(P, P), mode=mode, align_corners=True),
                         "ours": lambda: ops.glance(x, P, mode, out=g)}, reps)
        rows.append((f"glance N={N} {S}->{P} {mode}", t["torch"], t["ours"], "F.interpolate"))
    return rows


def run_once(threads: int, reps: int) -> Tuple[str, List[Tuple[str, float, float, str]], Dict[str, float]]:
    """Runs every case with `threads` threads; returns (machine line, rows, memory bandwidths)."""
    torch.set_num_threads(threads)
    ops.set_num_threads(threads)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    machine = (f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}; "
               f"threads={threads} (torch and ours); kernels: {ops.simd_level()}; "
               f"torch {torch.__version__} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}); "
               f"load average at start {load:.2f}")
    print(machine, flush=True)
    rows = bench_preprocess(reps)
    gru_rows, bw = bench_gru(reps)
    rows += gru_rows + bench_crop_glance(reps)
    for name, t_torch, t_ours, _ in rows:
        print(f"  {name}: torch {t_torch:.3f} ms, ours {t_ours:.3f} ms, {t_torch / t_ours:.2f}x", flush=True)
    return machine, rows, bw


def combine(runs: List[Tuple[str, List[Tuple[str, float, float, str]], Dict[str, float]]]) -> Tuple[str, str]:
    """Markdown table of several runs: medians of the times and of the per-run ratios, and the
    ratios' range (the machine's speed drifts between runs; each run's ratio compares torch and
    ours measured within seconds of each other)."""
    lines = ["| case | torch ms | ours ms | speed-up (median) | range over runs | notes |",
             "|---|---:|---:|---:|---|---|"]
    for i, (name, _, _, note) in enumerate(runs[0][1]):
        tt = [r[1][i][1] for r in runs]
        to = [r[1][i][2] for r in runs]
        ratios = [a / b for a, b in zip(tt, to)]
        lines.append(f"| {name} | {np.median(tt):.3f} | {np.median(to):.3f} | {np.median(ratios):.2f}x | "
                     f"{min(ratios):.2f}-{max(ratios):.2f}x | {note} |")
    bw = {k: float(np.median([r[2][k] for r in runs])) for k in runs[0][2]}
    memory = (f"Memory (medians): parallel read of 36 MiB (the float32 GRU weights) {bw['read_36MiB']:.1f} GB/s, "
              f"of 256 MiB {bw['read_256MiB']:.1f} GB/s; numpy copy of 64 MiB {bw['copy_64MiB']:.1f} GB/s "
              f"(bytes copied per second).")
    return "\n".join(lines), memory


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default=str(os.cpu_count() or 1),
                    help="thread count(s) for torch and ours, e.g. 2 or 1,2 (default: all CPUs)")
    ap.add_argument("--reps", type=int, default=100, help="timed calls per case and implementation")
    ap.add_argument("--runs", type=int, default=3,
                    help="whole runs per thread count, alternating thread counts (default 3); the table "
                         "reports medians and the range of the ratios")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kernels.md"))
    args = ap.parse_args()
    counts = [int(t) for t in str(args.threads).split(",") if t.strip()]
    results: Dict[int, list] = {t: [] for t in counts}
    for r in range(max(1, args.runs)):
        for threads in counts:
            print(f"run {r + 1}/{args.runs}, {threads} thread(s)", flush=True)
            results[threads].append(run_once(threads, args.reps))
    sections = []
    for threads in counts:
        table, memory = combine(results[threads])
        print(table + "\n" + memory)
        machines = "; ".join(sorted({m.split("; load average")[0] for m, _, _ in results[threads]}))
        loads = ", ".join(m.split("load average at start ")[1] for m, _, _ in results[threads])
        sections.append(f"## {threads} thread{'s' if threads > 1 else ''}\n\nMachine: {machines}; load average at "
                        f"the start of each run: {loads}\n\n{table}\n\n{memory}\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# Kernel benchmark\n\n"
        f"Command: `python bench/kernels.py --threads {args.threads} --reps {args.reps} --runs {args.runs}`\n\n"
        "Times are medians of interleaved rounds within a run; each figure is the median over the runs "
        "(thread counts alternate between runs), with the range of the per-run speed-ups. This VM's speed "
        "drifts by tens of percent over minutes (its second vCPU in particular), so single runs are not "
        "quoted. The load average is that of the whole machine when a run started. torch runs with "
        "OMP_WAIT_POLICY=PASSIVE unless the environment sets it: its default busy-waiting workers would "
        "otherwise steal a core from our kernels right after each torch round.\n\n" + "\n".join(sections),
        encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
