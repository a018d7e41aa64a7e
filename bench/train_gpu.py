"""Training throughput of ``gfnet-edge train --data`` on a synthetic image folder.

Writes a folder of JPEGs (K classes; the class is the colour of a small square at a random place),
then runs, through the real command (``gfnet-edge train``, in this process):

1. stage 1 for ``--epochs`` epochs with mixed precision, and again in float32;
2. every stage for one epoch with mixed precision (a check that each stage runs on this device);

and reports stage 1's images per second (the last epoch's, without its first step, so start-up
and autotuning are excluded; the figure includes data loading and decoding in ``--workers``
processes). The report (``OUT/train_gpu.txt``) is rewritten after every run, so a run stopped by
a time limit keeps what it measured.

    python bench/train_gpu.py --out /tmp/tg                       # ResNet-50 GFNet on the GPU
    python bench/train_gpu.py --out /tmp/tg --tiny                # CPU dry run: seconds

``--tiny`` is a dry run of the same script on a CPU: timm's ``test_resnet`` at 64 px, 40 train
images in batches of 16 (2 iterations per epoch), one epoch per run, one DataLoader worker, one
torch thread (``tests/test_train_bench.py`` runs it). The report goes to stdout and ``OUT/train_gpu.txt``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _write(args) -> None:
    path, size, colour, seed = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = rng.integers(60, 180, (size, size, 3)).astype(np.uint8)
    s = size // 10
    r, c = rng.integers(0, size - s, 2)
    img[r:r + s, c:c + s] = colour
    Image.fromarray(img).save(path, quality=90)


def make_folder(root: Path, classes: int, n_train: int, n_val: int, size: int) -> None:
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (classes, 3))
    jobs = []
    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(classes):
            d = root / split / f"c{k:02d}"
            d.mkdir(parents=True, exist_ok=True)
            seed = (0 if split == "train" else 1) * 1_000_003 + k * 10_007
            jobs += [(d / f"{i}.jpg", size, tuple(int(v) for v in colours[k]), seed + i) for i in range(n // classes)]
    with ProcessPoolExecutor(min(os.cpu_count() or 1, max(1, len(jobs) // 64))) as pool:
        list(pool.map(_write, jobs, chunksize=64))


def train(data: Path, out: Path, common, extra) -> tuple:
    """Runs ``gfnet-edge train`` in this process; ``(epoch records, seconds, log)``."""
    from gfnet_edge.cli import main as cli_main

    argv = ["--debug", "train", "--data", str(data), "-o", str(out), *common, *extra]  # a failure shows its traceback
    t = time.time()
    log, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(err):
        rc = cli_main(argv)
    if rc:
        raise SystemExit(f"failed: gfnet-edge {' '.join(argv)}\n{log.getvalue()[-3000:]}\n{err.getvalue()[-3000:]}")
    records = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    return records, time.time() - t, log.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: test_resnet at 64 px, 2 iterations per epoch")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--images", type=int, default=6400)
    ap.add_argument("--eval-max", type=int, default=512, help="validation images each evaluation uses")
    a = ap.parse_args()
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: exists and is not empty; choose a new --out folder")
    if a.tiny:
        backbone, size = "test_resnet", 64
        common = ["--image-size", "64", "--patch-size", "32", "--device", "cpu", "--threads", "1"]
        a.images, a.batch_size, a.workers, a.epochs = 40, 16, 1, 1
    else:
        backbone, size, common = "resnet50", 256, ["--threads", str(min(8, os.cpu_count() or 1))]
    common = ["--backbone", backbone, "--batch-size", str(a.batch_size), "--workers", str(a.workers), "--no-progress",
              "--set", f"eval_max={a.eval_max}", *common]
    lines: list = []

    def emit(line: str) -> None:
        """Prints a line of the report and rewrites it: a run stopped by a time limit keeps what it had."""
        print(line, flush=True)
        lines.append(line)
        (out / "train_gpu.txt").write_text("\n".join(lines) + "\n")

    t = time.time()
    make_folder(out / "data", 10, a.images, max(a.images // 8, 20), size)
    emit(f"command: python bench/train_gpu.py {' '.join(sys.argv[1:])}")
    try:
        import torch

        cuda = torch.cuda.is_available()
        emit(f"device: {torch.cuda.get_device_name(0) if cuda else 'cpu'}, torch {torch.__version__}, "
             f"{os.cpu_count()} CPUs" + ("" if cuda else " (autocast is CUDA-only: both runs are float32)"))
    except Exception as exc:  # the report still goes on
        emit(f"device: unknown ({exc})")
    emit(f"data: {a.images} train JPEGs {size}x{size}, 10 classes, written in {time.time() - t:.1f} s")
    failed = 0
    # The headline figure (stage 1, AMP against float32) first: a run cut by its time limit, or a
    # later stage that fails on this device, keeps it.
    res = {}
    for name, extra in (("amp", []), ("fp32", ["--no-amp"])):
        try:
            recs, sec, _ = train(out / "data", out / f"s1_{name}", common,
                                 ["--epochs", f"{a.epochs},0,0", "--stage", "1", *extra])
        except SystemExit as exc:
            emit(f"stage 1, {name}: FAILED: {exc}")
            failed = 1
            continue
        res[name] = steady(recs[-1])
        emit(f"stage 1, {name}: " + ", ".join(str(steady(r)) for r in recs) + f" img/s per epoch ({sec:.0f} s)")
    if len(res) == 2:
        emit(f"stage 1 last epoch, without its first step: mixed precision {res['amp']} img/s, float32 {res['fp32']} "
             "img/s (float32: cuDNN may use TF32 for convolutions, torch's default)")
    try:
        recs, sec, log = train(out / "data", out / "all", common, ["--epochs", "1"])
        emit(f"every stage, 1 epoch, mixed precision: {sec:.0f} s; " + "; ".join(
            f"{r['stage']} {steady(r)} img/s" for r in recs))
        emit("  " + next((ln for ln in log.splitlines() if "model gfnet" in ln), ""))
    except SystemExit as exc:
        emit(f"every stage, 1 epoch: FAILED: {exc}")
        failed = 1
    return failed


def steady(record: dict) -> float:
    """An epoch's images per second without its first step (DataLoader start-up, autotuning),
    or over the whole epoch when it had one step."""
    return record.get("images_per_s_steady", record["images_per_s"])


if __name__ == "__main__":
    sys.exit(main())
