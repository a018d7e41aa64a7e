"""``gfnet-edge predict``: classify images with a bundle, with early exit."""
from __future__ import annotations

import argparse
import collections
import sys
import textwrap

from ..argtypes import float_range, int_range
from ..bundle import json_text
from ..errors import InputError
from .options import add_runtime_options, runtime_kwargs


class _Stop(Exception):
    """``--on-error stop``: the first unreadable input ends the run."""


class _Rows:
    """Prints each image's result as soon as its batch is classified: a line of text, or an
    element of one JSON array (closed at the end, also when a later batch fails), so the first
    results show at once and memory does not grow with the number of images."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.count = 0

    def add(self, row: dict) -> None:
        if self.as_json:
            sys.stdout.write(("[\n" if self.count == 0 else ",\n") + textwrap.indent(json_text(row, indent=2), "  "))
        else:
            stopped = " (deadline)" if row.get("deadline_stopped") else ""
            label = f" {row['label']!r}" if "label" in row else ""
            sys.stdout.write(f"{row['image']}: class {row['class']}{label} ({row['confidence']:.3f}) exit at step "
                             f"{row['exit_step']}{stopped}\n")
        self.count += 1

    def close(self, complete: bool) -> None:
        """Ends the output; a JSON run that failed before any result prints nothing (no ``[]``)."""
        if self.as_json and self.count:
            sys.stdout.write("\n]\n")
        elif self.as_json and complete:
            sys.stdout.write("[]\n")
        sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    """Classifies the images and prints one line (or JSON row) per image, batch by batch."""
    from ..data.images import iter_image_batches
    from ..runtime import Runtime

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    failures = []

    def failed(name: str, message: str) -> None:
        failures.append(message)
        if args.on_error == "stop":
            raise _Stop()

    out = _Rows(args.json)
    pending = collections.deque()  # (name, geometry) of the images read and not yet printed
    score = None
    try:
        with Runtime(args.bundle, profile=args.profile, **runtime_kwargs(args)) as rt:
            m = rt.model
            score = _Score(args.images, m.class_names, m.num_classes)

            def images():  # read batch by batch, resized and centre-cropped to uint8 S x S frames as they
                # are read; the runtime only normalises them (cropped=True: no second resize / crop)
                try:
                    for batch_names, frames, batch_geometries in iter_image_batches(
                            args.images, m.image_size, m.crop_pct, m.dataset_interpolation, args.batch_size,
                            on_error=failed, placed=True):
                        pending.extend(zip(batch_names, batch_geometries))
                        yield frames
                except _Stop:  # --on-error stop: the stream ends here; what was read is classified
                    return

            try:
                for preds in rt.predict_iter(images(), batch_size=args.batch_size, deadline_ms=args.deadline_ms,
                                             deadline_margin=args.deadline_margin, cropped=True):
                    for i in range(len(preds)):
                        row = _row(*pending.popleft(), preds, i)
                        score.add(row["image"], row["class"])
                        out.add(row)
                    sys.stdout.flush()
            except ValueError as exc:
                raise InputError(str(exc)) from exc
            profile = rt.profiler.summary()
    finally:  # the output ends properly, also when a later batch failed
        out.close(sys.exc_info()[0] is None)
    if args.profile:
        print(_profile_table(profile, out.count), file=sys.stderr)
    if score is not None and score.total:
        print(score.line(), file=sys.stderr)
    if len(failures) == 1 and not out.count:
        raise InputError(failures[0])
    if failures:
        for message in failures:
            print(f"gfnet-edge: error: {message}", file=sys.stderr)
        stopped = " (stopped at the first: --on-error stop)" if args.on_error == "stop" else ""
        raise InputError(f"{len(failures)} input(s) could not be read{stopped}; {out.count} image(s) classified")
    return 0


def _folded(names) -> set:
    """Names as a near miss compares them: case and Unicode composition left out."""
    import unicodedata

    return {unicodedata.normalize("NFC", n).casefold() for n in names}


class _Score:
    """Accuracy over the images of the folders given whose class folders are the model's classes
    (named as the model names them, or, for a model without class names, one folder per class:
    labels from the sorted folder names, as ``gfnet-edge calibrate --data`` reads them). A
    folder given more than once is scored once. A folder with some of the model's class names
    among its class folders (or names that differ from them only in case), but not just those, is
    not scored, and a warning says why (once a folder)."""

    def __init__(self, inputs, class_names, num_classes: int) -> None:
        from pathlib import Path

        from ..data.images import check_class_folders, class_folders, resolved_path
        from ..log import logger

        self.named = class_names is not None
        self.folders = []  # (folder as given, the folder resolved, {class folder name: label})
        seen = set()  # folders resolved: one given again is scored, or warned of, once
        for raw in inputs:
            names = class_folders(raw)
            if not names:
                continue
            real = resolved_path(Path(raw))
            if real in seen:
                continue
            seen.add(real)
            if class_names is not None and sorted(names) == sorted(class_names):
                self.folders.append((Path(raw), real, {n: class_names.index(n) for n in names}))
            elif class_names is not None and _folded(names) & _folded(class_names):  # 'Fox' for 'fox' too
                try:
                    check_class_folders(raw, class_names, why="its images are classified, not scored")
                except InputError as exc:
                    logger.warning("%s", exc)
            elif class_names is None and len(names) == num_classes:
                self.folders.append((Path(raw), real, {n: k for k, n in enumerate(names)}))
        self.correct = self.total = 0

    def add(self, image: str, predicted: int) -> None:
        from pathlib import Path

        from ..data.images import resolved_path

        if not self.folders:
            return
        path = Path(image)
        found = self._find(path, resolved=False)
        if found is None:  # named through another spelling (a file given before the folder): resolved once
            found = self._find(resolved_path(path), resolved=True)
        if found is None:  # not under a scored folder
            return
        labels, rel = found
        label = labels.get(rel.parts[0])
        if label is not None:
            self.total += 1
            self.correct += int(predicted == label)

    def _find(self, path, resolved: bool):
        """``(labels, path relative to it)`` of the first scored folder that holds ``path``
        (compared with the folders as given, or ``resolved``), else None."""
        for folder, real, labels in self.folders:
            try:
                return labels, path.relative_to(real if resolved else folder)
            except ValueError:
                continue
        return None

    def line(self) -> str:
        where = ", ".join(str(f) for f, _, _ in self.folders)
        how = ("their folder" if self.named else "sorted folder name, the first folder class 0, as calibrate --data "
               "labels them: the bundle has no class names")
        return (f"accuracy: {100.0 * self.correct / self.total:.2f} % ({self.correct} of {self.total} images in the "
                f"class folders of {where}, labelled by {how})")


def _row(name: str, geometry, preds, i: int) -> dict:
    """One image's output row: its prediction, and its patch boxes on the image file too."""
    row = {"image": name, **preds[i], "frame_size": list(geometry.frame)}
    row["frame_boxes"] = geometry.to_frame(row["boxes"]).tolist() if row["boxes"] else []
    return row


def _profile_table(summary: dict, images: int) -> str:
    """The runtime's per-stage profile as a text table (ms)."""
    head = f"{'stage':<12}{'calls':>7}{'ms/image':>10}{'mean':>9}{'p50':>9}{'p95':>9}{'p99':>9}"
    lines = [f"per-stage profile over {images} images (ms; on the host loop `step` contains heads, exit, "
             "policy and crop)", head]
    for name, st in summary.items():
        per_image = st["total_ms"] / max(images, 1) if name != "per_image" else st["mean_ms"]
        lines.append(f"{name:<12}{st['count']:>7}{per_image:>10.3f}{st['mean_ms']:>9.3f}{st['p50_ms']:>9.3f}"
                     f"{st['p95_ms']:>9.3f}{st['p99_ms']:>9.3f}")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``predict``."""
    from ..runtime.api import DEFAULT_MARGIN

    p = sub.add_parser("predict", help="classify images with a bundle (early exit)",
                       description="Classify image files (or folders, or .npz) with a bundle, with early exit. "
                                   "Each image is named by its file (FILE.npz[i] inside an archive); an image "
                                   "reached more than once (a folder given twice, a file also inside a folder "
                                   "given) is classified once, where it first comes. A folder whose class "
                                   "folders are the model's classes (for a bundle without class names: one "
                                   "folder per class, labelled by sorted name, as calibrate --data reads them) "
                                   "is also scored: the accuracy over its images goes to stderr at the end "
                                   "(a folder with only some of those class folders, others too, or them in "
                                   "another case, is not, and a warning says why).")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("images", nargs="+", help="image files, folders or .npz")
    add_runtime_options(p)
    p.add_argument("--batch-size", type=int_range(1, 1 << 16), default=32,
                   help="images per runtime call (default 32); images are read, classified and printed batch by batch")
    p.add_argument("--profile", action="store_true",
                   help="print the runtime's per-stage timing (mean, p50, p95, p99) to stderr at the end")
    p.add_argument("--deadline-ms", type=float_range(0.0, 1e9, lo_open=True), metavar="MS",
                   help="per runtime call (one --batch-size batch): images still running stop before a step "
                        "predicted to end later than MS after the call began, keeping their last answer (needs "
                        "the step latencies `gfnet-edge calibrate` records for this backend and precision)")
    p.add_argument("--deadline-margin", type=float_range(0.0, 100.0), default=DEFAULT_MARGIN, metavar="F",
                   help=f"scale the predicted step costs by 1 + F (default {DEFAULT_MARGIN})")
    p.add_argument("--on-error", choices=["skip", "stop"], default="skip",
                   help="an unreadable image or input: report it and go on (skip, default) or stop there; "
                        "either way the results so far are printed and the exit code is 2")
    p.add_argument("--json", action="store_true",
                   help="JSON output: per image its class, confidence, exit step, the (top, left, bottom, right) "
                        "box of each focus patch in the S x S resized, centre-cropped input (boxes) and on the "
                        "image file (frame_boxes, pixels of frame_size = [height, width])")
    p.set_defaults(func=run)
