"""Two figures behind the demo task's data (docs/demo_task.md): why the source digits are split
in contiguous blocks, and what rendering an image costs.

    python bench/demo_data.py [--folds 5] [--render 64]

* **Split.** scikit-learn's ``load_digits`` (1797 8 x 8 bitmaps, no writer ids) classified by
  1-NN and an RBF SVM (default ``SVC()``) over ``--folds`` folds, once with contiguous folds
  (``KFold`` unshuffled: train and test come from different stretches of the writers' forms)
  and once with shuffled folds (``KFold(shuffle=True, random_state=0)``); mean test accuracy.
* **Rendering.** ``--render`` demo images (the default generator config, 224 x 224, test
  split) rendered in this process, one thread, no cache; seconds per image.

Prints the tables and writes ``bench/results/demo_data.md`` and ``demo_data.json``; the
1-minute load average at the start and end of the run is recorded.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, machine, table, write_report  # noqa: E402


def split_accuracy(folds: int) -> Dict[str, Dict[str, float]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    x, y = load_digits(return_X_y=True)
    out: Dict[str, Dict[str, float]] = {}
    for name, clf in (("1-NN", KNeighborsClassifier(1)), ("RBF SVM", SVC())):
        out[name] = {}
        for split, cv in (("contiguous", KFold(folds)), ("random", KFold(folds, shuffle=True, random_state=0))):
            out[name][split] = float(100 * np.mean(cross_val_score(clf, x, y, cv=cv)))
    return out


def render_seconds(n: int) -> float:
    from gfnet_edge.data import ClutteredDigits

    ds = ClutteredDigits("test")
    ds.frames([0])  # imports, source digits
    t0 = time.perf_counter()
    ds.frames(list(range(1, n + 1)))
    return (time.perf_counter() - t0) / n


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--render", type=int, default=64, help="images to render for the timing (0: skip)")
    ap.add_argument("--out", type=Path, default=RESULTS / "demo_data.md")
    args = ap.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    command = command_line(__file__, argv)
    load = [os.getloadavg()[0]]
    acc = split_accuracy(args.folds)
    sec = render_seconds(args.render) if args.render else None
    load.append(os.getloadavg()[0])
    res: Dict[str, Any] = {"machine": machine(), "load": load, "folds": args.folds, "accuracy": acc,
                           "render_images": args.render, "render_seconds_per_image": sec}
    lines = ["# Demo data: split and rendering (`bench/demo_data.py`)", "", f"Command: `{command}`", "",
             f"Machine: {res['machine']}; 1-minute load average {load[0]:.1f} -> {load[1]:.1f} (start -> end).", "",
             f"`sklearn.datasets.load_digits`, mean test accuracy over {args.folds} folds:", "",
             table(["classifier", "contiguous folds %", "shuffled folds %"],
                   [[k, f"{v['contiguous']:.1f}", f"{v['random']:.1f}"] for k, v in acc.items()]), ""]
    if sec is not None:
        lines += [f"Rendering {args.render} demo test images (224 x 224, default config, one process, no cache): "
                  f"**{sec * 1e3:.0f} ms per image**.", ""]
    text = "\n".join(lines)
    print(text)
    write_report(args.out, text, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
