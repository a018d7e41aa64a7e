"""Writes the cluttered-digits task as an image folder (PNG), for ``gfnet-edge train --data``.

``python -m gfnet_edge.train.demo_folder ROOT --train 5000 --val 1000`` writes
``ROOT/train/<digit>/<i>.png`` from the train split and ``ROOT/val/<digit>/<i>.png`` from the
**test** split (so the trainer's val figures compare directly with the shipped demo model's test
figures), generated with the shipped demo checkpoint's pinned generator config.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from PIL import Image

from ..argtypes import int_range
from ..errors import InputError


DIGITS = 10


def export(root: Path, n_train: int, n_val: int, workers: int = 2, progress: bool = False) -> None:
    """Writes ``root`` (which must not exist) whole, or nothing: the images are written to a
    staging folder that becomes ``root`` once every one is written.

    Raises:
        InputError: a split's first images leave a digit without any (``gfnet-edge train``
            needs every class in both splits); ``root`` exists; the disk is full.
    """
    from ..bundle import staging_dir
    from ..models.checkpoint import load_checkpoint
    from .config import data_config_from_dict
    from .data import load_split
    from .demo_results import GFNET_PATH
    from .folder_stages.sigint import SIGINT

    cfg = data_config_from_dict(load_checkpoint(GFNET_PATH).meta["demo_data"]["config"])
    splits = []
    for folder, split, n, option in (("train", "train", n_train, "--train"), ("val", "test", n_val, "--val")):
        s = load_split(split, n, config=cfg, workers=workers, progress=progress)
        missing = sorted(set(range(DIGITS)) - {int(v) for v in s.labels})
        if missing:
            raise InputError(f"{option} {n}: the first {n} images of the demo's {split} split hold no "
                             f"{'digit' if len(missing) == 1 else 'digits'} {', '.join(map(str, missing))}, and "
                             f"gfnet-edge train needs every class in both splits: give a larger {option}")
        splits.append((folder, s))
    with staging_dir(root, what="demo image folder") as tmp:
        for folder, s in splits:
            for k in range(DIGITS):
                (tmp / folder / str(k)).mkdir(parents=True)
            for i, (frame, label) in enumerate(zip(s.frames, s.labels)):
                Image.fromarray(frame).save(tmp / folder / str(int(label)) / f"{i:05d}.png")
        SIGINT.check()  # a Ctrl-C recorded meanwhile (in multiprocessing's bookkeeping) stops it before ROOT is written


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gfnet_edge.train.demo_folder", description=__doc__.splitlines()[0])
    ap.add_argument("root", help="output folder (must not exist)")
    ap.add_argument("--train", type=int_range(1), default=5000, help="train images (default 5000)")
    ap.add_argument("--val", type=int_range(1), default=1000, help="val images, from the test split (default 1000)")
    ap.add_argument("--workers", type=int_range(1), default=2, help="generator processes (default 2)")
    a = ap.parse_args(argv)
    root = Path(a.root)
    if root.exists() or root.is_symlink():
        print(f"{ap.prog}: error: {root}: exists; choose a new folder", file=sys.stderr)
        return 2
    from .folder_stages.sigint import SIGINT

    try:
        with SIGINT:  # Ctrl-C: the generator's forked workers ignore it, this process stops
            export(root, a.train, a.val, a.workers, progress=sys.stderr.isatty())
    except InputError as exc:
        print(f"{ap.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{ap.prog}: interrupted; nothing was written to {root}", file=sys.stderr)
        return 130
    print(f"wrote {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
