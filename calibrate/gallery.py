"""Gallery cards: what the glance saw, where each focus patch went, and where the image exited."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

#: Colour of the box of focus step t (1-based), cycled.
STEP_COLOURS = [(255, 64, 64), (255, 170, 0), (64, 200, 255), (190, 90, 255), (80, 230, 80)]
NOT_RUN = (255, 255, 255)


def _dashed_rect(d: ImageDraw.ImageDraw, box: Tuple[int, int, int, int], colour, width: int = 2, dash: int = 6,
                 offset: int = 0) -> None:
    x0, y0, x1, y1 = box
    for (a, b, c, e) in ((x0, y0, x1, y0), (x1, y0, x1, y1), (x0, y1, x1, y1), (x0, y0, x0, y1)):
        length = max(abs(c - a), abs(e - b))
        for s in range(offset, length, 2 * dash):
            t = min(s + dash, length)
            if a == c:
                d.line([(a, b + s), (a, b + t)], fill=colour, width=width)
            else:
                d.line([(a + s, b), (a + t, b)], fill=colour, width=width)


def card(frame: np.ndarray, coords: np.ndarray, exit_step: int, patch_size: int, display: int = 224) -> bytes:
    """One PNG card: glance view (left) and the frame with the focus boxes (right).

    Args:
        frame: uint8 (S, S, 3), the network's input.
        coords: (T-1, 2) patch top-left (row, col) of every focus step, from the trace (so the
            boxes of steps after the exit are known; they are drawn dashed black and white, "not run").
        exit_step: step at which the image exited (0 = glance).
        patch_size: P.
        display: side of each panel in pixels.

    Returns:
        PNG bytes.
    """
    S = frame.shape[0]
    P = int(patch_size)
    img = Image.fromarray(frame)
    glance = img.resize((P, P), Image.BICUBIC).resize((display, display), Image.NEAREST)
    full = img.resize((display, display), Image.BILINEAR)
    d = ImageDraw.Draw(full)
    scale = display / S
    for t in range(len(coords)):
        r, c = (int(v) for v in coords[t])
        if r < 0 or c < 0:
            continue
        box = (round(c * scale), round(r * scale), round((c + P) * scale) - 1, round((r + P) * scale) - 1)
        step = t + 1
        if step <= exit_step:
            # the step's colour between two black lines, so the box shows on any image colour; the
            # number tags of boxes at the same place sit side by side
            colour = STEP_COLOURS[t % len(STEP_COLOURS)]
            d.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), outline=(0, 0, 0), width=5)
            d.rectangle(box, outline=colour, width=3)
            tag = (box[0] + 14 * t, box[1])
            d.rectangle((tag[0], tag[1], tag[0] + 12, tag[1] + 13), fill=colour, outline=(0, 0, 0))
            d.text((tag[0] + 3, tag[1] + 1), str(step), fill=(0, 0, 0))
        else:  # not run: black and white dashes, visible on any image colour
            _dashed_rect(d, box, (0, 0, 0), width=1)
            _dashed_rect(d, box, NOT_RUN, width=1, offset=6)
    gd = ImageDraw.Draw(glance)
    gd.rectangle((0, 0, display - 1, display - 1), outline=(255, 255, 255), width=3)
    label = f"glance {P}x{P}"
    gd.rectangle((0, 0, int(gd.textlength(label)) + 6, 13), fill=(255, 255, 255))
    gd.text((3, 1), label, fill=(0, 0, 0))
    out = Image.new("RGB", (2 * display + 6, display), (255, 255, 255))
    out.paste(glance, (0, 0))
    out.paste(full, (display + 6, 0))
    buf = io.BytesIO()
    out.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def pick(labels: np.ndarray, pred: np.ndarray, exit_step: np.ndarray, steps: int, n: int = 12,
         seed: int = 0) -> List[int]:
    """Indices for the gallery: a spread of exit steps, correct and wrong, reproducible."""
    rng = np.random.default_rng(seed)
    chosen: List[int] = []
    groups = [(k, ok) for k in range(steps) for ok in (True, False)]
    pools = {g: list(rng.permutation(np.flatnonzero((exit_step == g[0]) & ((pred == labels) == g[1])))) for g in groups}
    while len(chosen) < n and any(pools.values()):
        for g in groups:
            if pools[g] and len(chosen) < n:
                chosen.append(int(pools[g].pop()))
    return sorted(chosen, key=lambda i: (int(exit_step[i]), i))


@dataclass
class GalleryCard:
    """One gallery image of the report: the runtime's answer for it under one budget.

    Attributes:
        index: position in the held-out split.
        label, pred: true and predicted class.
        confidence: the top probability at the exit step.
        exit_step: where the image exited.
        budget: the budget's name.
        correct: ``pred == label``.
        coords: top-left of each focus patch (T-1, 2).
        png: the rendered card (:func:`card`).
        file: the image's file relative to the ``--data`` folder (``cat/img_0042.jpg``), or
            ``None`` for images without files (``demo``, ``.npz``).
    """

    index: int
    label: int
    pred: int
    confidence: float
    exit_step: int
    budget: str
    correct: bool
    coords: List[List[int]]
    png: bytes = field(repr=False, default=b"")
    file: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """The card's entry of ``report.json`` (the image is in the HTML page only)."""
        return {"index": self.index, "label": self.label, "pred": self.pred, "confidence": self.confidence,
                "exit_step": self.exit_step, "budget": self.budget, "correct": self.correct, "coords": self.coords,
                "file": self.file}
