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


def export(root: Path, n_train: int, n_val: int, workers: int = 2) -> None:
    from ..models.checkpoint import load_checkpoint
    from .config import data_config_from_dict
    from .data import load_split
    from .demo_results import GFNET_PATH

    cfg = data_config_from_dict(load_checkpoint(GFNET_PATH).meta["demo_data"]["config"])
    for folder, split, n in (("train", "train", n_train), ("val", "test", n_val)):
        s = load_split(split, n, config=cfg, workers=workers, progress=False)
        for k in range(10):
            (root / folder / str(k)).mkdir(parents=True, exist_ok=True)
        for i, (frame, label) in enumerate(zip(s.frames, s.labels)):
            Image.fromarray(frame).save(root / folder / str(int(label)) / f"{i:05d}.png")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gfnet_edge.train.demo_folder", description=__doc__.splitlines()[0])
    ap.add_argument("root", help="output folder (must not exist)")
    ap.add_argument("--train", type=int, default=5000, help="train images (default 5000)")
    ap.add_argument("--val", type=int, default=1000, help="val images, from the test split (default 1000)")
    ap.add_argument("--workers", type=int, default=2, help="generator processes (default 2)")
    a = ap.parse_args(argv)
    root = Path(a.root)
    if root.exists():
        print(f"{root}: exists; choose a new folder", file=sys.stderr)
        return 2
    export(root, a.train, a.val, a.workers)
    print(f"wrote {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
