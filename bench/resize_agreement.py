"""How far the image loader's resize (Pillow, for files) and the runtime's (torchvision's uint8
tensor resize, for camera frames) are apart.

    python bench/resize_agreement.py [--images 400] [--seed 0] [--out bench/results/resize_agreement.md]

``gfnet_edge.data.load_images`` (calibration and evaluation files, training's validation split)
resizes with Pillow; ``Runtime.predict`` resizes camera frames with the extension, bit-exact with
torchvision's resize of uint8 tensors. For uniform-noise images (the worst case: every pixel an
edge) of random sizes, 20-500 px a side, ordinary aspect ratios (the resized area at most 4x the
shorter side squared, where the loader resizes the whole image), random crops of 16-200 px and
crop ratios 0.875 / 1.0, it counts the images by the largest difference in levels between the
two, per interpolation. Writes ``--out`` and a ``.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, machine, table, write_report  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400, help="images, half bilinear, half bicubic")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "resize_agreement.md"))
    args = ap.parse_args(argv)
    if args.images < 2:
        ap.error("--images must be >= 2")
    from PIL import Image

    from gfnet_edge import ops
    from gfnet_edge.data.images import preprocess, resized_size

    rng = np.random.default_rng(args.seed)
    worst = {"bilinear": [], "bicubic": []}
    n = 0
    while n < args.images:
        h, w = (int(v) for v in rng.integers(20, 501, 2))
        S = int(rng.integers(16, 201))
        crop_pct = float(rng.choice([0.875, 1.0]))
        short = int(S / crop_pct)
        new_w, new_h = resized_size(w, h, short)
        if new_w * new_h > 4 * short * short:
            continue
        interp = ("bilinear", "bicubic")[n % 2]
        n += 1
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pil = preprocess(Image.fromarray(frame), S, crop_pct, interp).astype(np.int16)
        ext = ops.resize_crop(frame[None], S, crop_pct, interp)[0].astype(np.int16)
        worst[interp].append(int(np.abs(pil - ext).max()))
    res = {"machine": machine(), "images": args.images, "seed": args.seed, "worst_level_difference": worst}
    rows = []
    for interp, w in worst.items():
        a = np.asarray(w)
        rows.append([interp, len(a), int((a == 0).sum()), int((a <= 1).sum()), int((a <= 2).sum()), int(a.max()),
                     float(np.median(a))])
    md = ["# Pillow's resize against the runtime's (`bench/resize_agreement.py`)", "",
          f"Command: `{command_line(__file__, argv)}`", "", f"Machine: {machine()}.", "",
          "Uniform-noise images, 20-500 px a side, resized area at most 4x the shorter side squared, crops "
          "16-200 px at crop_pct 0.875 / 1.0: images by the largest difference (in levels) between "
          "`gfnet_edge.data.images.preprocess` (Pillow) and `ops.resize_crop` (torchvision's uint8 resize).", "",
          table(["interpolation", "images", "equal", "within 1", "within 2", "largest", "median"], rows), ""]
    write_report(Path(args.out), "\n".join(md), res)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
