"""Torch-free loading of calibration / evaluation images.

:func:`load_images` reads a folder of images (ImageFolder-style class subfolders give labels,
a flat folder gives none), a single image file, or an ``.npz`` archive, and returns uint8
``(N, S, S, 3)`` frames prepared like the reference's validation pre-processing (``docs/gfnet.md``): resize the shorter
side to ``int(S / crop_pct)``, then centre-crop ``S x S``. Every problem is reported as a
``ValueError`` naming the path and the reason.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from gfnet_edge.errors import InputError
from gfnet_edge.ops.image import CropGeometry, crop_geometry, resized_hw
from gfnet_edge.variants import IMAGENET_MEAN, IMAGENET_STD

#: File name suffixes treated as images (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_INTERPOLATIONS = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}


def load_images(path: os.PathLike | str, image_size: int = 224, crop_pct: float = 0.875,
                interpolation: str = "bilinear", on_error: Optional[Callable[[str, str], None]] = None,
                *, with_files: bool = False) -> tuple:
    """Loads images for calibration or evaluation.

    Accepted inputs:

    * a folder with one subfolder per class (ImageFolder layout; classes sorted by name give
      labels 0..K-1);
    * a flat folder of images (no labels);
    * a single image file (no label);
    * an ``.npz`` with ``images`` (uint8 ``(N, H, W, 3|1)`` or float ``(N, 3|1, H, W)``) and
      optional integer ``labels`` ``(N,)``. Float images in [0, 1] are taken as is; any other
      float range is taken as ImageNet-normalised and de-normalised (an optional boolean
      ``normalized`` entry states it explicitly).

    Images whose size differs from ``image_size`` get the validation pre-processing (shorter
    side to ``int(image_size / crop_pct)``, centre crop); ``.npz`` images already
    ``image_size x image_size`` are kept as they are.

    Args:
        path: folder, image file or ``.npz`` file.
        image_size: output side S.
        crop_pct: centre-crop ratio of the validation pre-processing (0 < crop_pct <= 1).
        interpolation: Pillow resize filter: nearest, bilinear, bicubic, lanczos, box, hamming.
        on_error: for a folder, ``on_error(file, message)`` is called for each image file that
            cannot be read, which is then left out (with its label); it may raise to stop.
            Without it the first such file raises ValueError. A folder none of whose images
            can be read raises ValueError either way.
        with_files: also return which file each frame came from.

    Returns:
        ``(frames, labels)``: uint8 ``(N, S, S, 3)`` and int64 ``(N,)`` or ``None``; with
        ``with_files``, ``(frames, labels, files)``: ``files[i]`` is the path of frame ``i``'s
        file relative to the folder (``cat/img_0042.jpg``, ``/``-separated; the file's name for
        a single image file), or ``files`` is ``None`` for an ``.npz`` (its images have no files).

    Raises:
        ValueError: missing path, empty folder, unreadable image, bad ``.npz`` keys / shapes /
            dtypes, NaN or infinite values, bad arguments.
    """
    path = Path(path)
    _check_arguments(path, image_size, crop_pct, interpolation)
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    if path.is_dir():
        files, labels = _list_folder(path)
        frames, read = _load_files(files, image_size, crop_pct, interpolation, on_error)
        if not read.any():
            raise ValueError(f"{path}: none of its {len(files)} images can be read")
        if not read.all():
            frames, labels = frames[read], (labels[read] if labels is not None else None)
        names = [f.relative_to(path).as_posix() for f, ok in zip(files, read) if ok]
        return (frames, labels, names) if with_files else (frames, labels)
    if path.suffix.lower() == ".npz":
        frames, labels = _load_npz(path, image_size, crop_pct, interpolation)
        return (frames, labels, None) if with_files else (frames, labels)
    frames = _load_files([path], image_size, crop_pct, interpolation)[0]
    return (frames, None, [path.name]) if with_files else (frames, None)


def iter_image_batches(paths: Sequence[os.PathLike | str], image_size: int = 224, crop_pct: float = 0.875,
                       interpolation: str = "bilinear", batch_size: int = 32,
                       on_error: Optional[Callable[[str, str], None]] = None, placed: bool = False,
                       ) -> Iterator[tuple]:
    """The images of several inputs, ``batch_size`` at a time, each with its own name.

    Every path is checked (and folders listed) before the first batch; image files are read
    batch by batch, so memory stays bounded for large folders (an ``.npz`` archive is read
    whole when it is listed). Inputs are as for :func:`load_images` (labels are ignored). An
    input or image file reached more than once (a folder given twice, a file also inside a
    folder given) is given once, where it first comes.

    Args:
        paths: image files, folders or ``.npz`` files.
        image_size, crop_pct, interpolation: as for :func:`load_images`.
        batch_size: images per batch (>= 1).
        on_error: ``on_error(name, message)`` is called for an input or image that cannot be
            read, which is then skipped (it may raise to stop); without it the first such
            problem raises ValueError. When it raises (or without it), the images of the
            batch read before that image are yielded first.
        placed: also yield where each S x S frame lies in its source image.

    Yields:
        ``(names, frames)``: the image file paths (``FILE.npz[i]`` for archived images) and
        uint8 ``(n, S, S, 3)`` frames, ``1 <= n <= batch_size``; with ``placed``,
        ``(names, frames, geometries)``: a :class:`~gfnet_edge.ops.CropGeometry` per frame, in
        pixels of its file (of the archived image for ``.npz``; archived S x S images are taken
        as they are, so theirs is the identity). ``geometry.to_frame(boxes)`` maps patch boxes
        onto the source image.

    Raises:
        ValueError: as :func:`load_images`, for the first path or image that fails (without
            ``on_error``) or for bad arguments.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive int, got {batch_size!r}")

    def failed(name: str, exc: ValueError) -> None:
        if on_error is None:
            raise exc
        on_error(name, str(exc))

    # (name, file path) or (name, (frame already in memory, its geometry))
    items: List[Tuple[str, object]] = []
    seen = set()  # the inputs and image files listed, resolved: each is given once, where it first comes
    for raw in paths:
        path = Path(raw)
        _check_arguments(path, image_size, crop_pct, interpolation)
        key = resolved_path(path)
        if key in seen:
            continue
        seen.add(key)
        try:
            if not path.exists():
                raise ValueError(f"{path}: no such file or directory")
            if path.is_dir():
                for f in _list_folder(path)[0]:
                    file_key = key / f.relative_to(path)
                    if file_key not in seen:
                        seen.add(file_key)
                        items.append((str(f), f))
            elif path.suffix.lower() == ".npz":
                frames, _, geometries = _load_npz(path, image_size, crop_pct, interpolation, placed=True)
                items.extend((f"{path}[{i}]", (frames[i], geometries[i])) for i in range(len(frames)))
            else:
                items.append((str(path), path))
        except ValueError as exc:
            failed(str(path), exc)

    def batch(names, frames, geometries):
        return (names, np.stack(frames), geometries) if placed else (names, np.stack(frames))

    for start in range(0, len(items), batch_size):
        names, frames, geometries = [], [], []
        for name, src in items[start:start + batch_size]:
            try:
                frame, geometry = _read_image_placed(src, image_size, crop_pct, interpolation) \
                    if isinstance(src, Path) else src
                frames.append(frame)
                geometries.append(geometry)
                names.append(name)
            except ValueError as exc:
                try:
                    failed(name, exc)
                except Exception:  # the run stops here: the images read before it still go out
                    if frames:
                        yield batch(names, frames, geometries)
                    raise
        if frames:
            yield batch(names, frames, geometries)


def shown_name(name: str) -> str:
    """A file name as text that can be written anywhere (UTF-8 pages and JSON): the bytes of a
    name that is not UTF-8 (kept by Python as surrogates) become ``\\xNN`` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def resolved_path(path: Path) -> Path:
    """``path`` made absolute with its symbolic links followed (only made absolute where they
    cannot be), to tell when two spellings name the same file or folder."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        return path.absolute()


def resized_size(width: int, height: int, short: int) -> Tuple[int, int]:
    """``(width, height)`` after resizing the shorter side to ``short``, the longer side truncated
    as torchvision's ``Resize(int)`` computes it (docs/gfnet.md; :func:`gfnet_edge.ops.image.resized_hw`)."""
    h, w = resized_hw(height, width, short)
    return w, h


def preprocess(image: Image.Image, image_size: int = 224, crop_pct: float = 0.875,
               interpolation: str = "bilinear", offset: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Validation pre-processing of one PIL image: resize shorter side, centre crop.

    Args:
        image: any PIL image (converted to RGB).
        image_size: output side S.
        crop_pct: the shorter side is resized to ``int(S / crop_pct)``.
        interpolation: Pillow resize filter name.
        offset: ``(top, left)`` of the S x S crop inside the resized image instead of the centre
            one (training's random crops); each within ``[0, resized side - S]``.

    Returns:
        uint8 ``(S, S, 3)``.

    An image whose resized area is over 4 times ``short x short`` (``short = int(S / crop_pct)``)
    has only its crop's source box resampled: the full resize would be ``short x (aspect x
    short)`` pixels, gigabytes for a 1 x 10^7 image of a few hundred bytes. Pillow may then
    resample the two axes in the other order, which moves levels by a few steps (more on noise
    with bicubic overshoot) against the full resize.
    """
    if image.mode != "RGB":  # convert() copies even an RGB image (training calls this per item)
        image = image.convert("RGB")
    short = int(image_size / crop_pct)
    w, h = image.size
    geometry = crop_geometry(h, w, image_size, crop_pct)
    new_h, new_w = geometry.resized
    if offset is None:
        top, left = geometry.top, geometry.left
    else:
        top, left = offset
        if not (0 <= top <= new_h - image_size and 0 <= left <= new_w - image_size):
            raise ValueError(f"crop offset {offset} outside the {new_w}x{new_h} resized image")
    if new_w * new_h > 4 * short * short:
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy)
        return np.asarray(image.resize((image_size, image_size), _INTERPOLATIONS[interpolation], box=box),
                          dtype=np.uint8)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), _INTERPOLATIONS[interpolation])
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8)


def check_skip_source(source: str, generated: bool, named: str) -> None:
    """``--skip-unreadable`` needs a folder of image files: refused (ValueError) for generated
    data (the demo dataset) or an existing file; a missing path is left to the loader's error."""
    if generated or (Path(source).exists() and not Path(source).is_dir()):
        raise ValueError(f"--skip-unreadable applies to a folder of images; {named} is not one")


def unreadable_files(skip: bool, skipped: List[str]) -> Callable[[str, str], None]:
    """The ``on_error`` of :func:`load_images` behind the commands' ``--skip-unreadable``: with
    ``skip``, logs a warning for each unreadable image file and collects its name in
    ``skipped``; without, stops at the first one, saying how to leave such files out."""
    from ..log import logger

    def on_error(name: str, message: str) -> None:
        if not skip:
            raise ValueError(f"{message} (--skip-unreadable leaves such files out)")
        skipped.append(name)
        logger.warning("left out %s", message)

    return on_error


def _check_arguments(path: Path, image_size: int, crop_pct: float, interpolation: str) -> None:
    if int(image_size) != image_size or image_size < 1:
        raise ValueError(f"{path}: image_size must be a positive integer, got {image_size!r}")
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"{path}: crop_pct must be in (0, 1], got {crop_pct!r}")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"{path}: unknown interpolation {interpolation!r}; "
                         f"expected one of {sorted(_INTERPOLATIONS)}")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def class_folders(folder: os.PathLike | str) -> Optional[List[str]]:
    """The class names (sorted subfolder names, labels 0..K-1) of an image folder in the
    one-subfolder-per-class layout, or None for a flat folder or a file."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    top_files, class_dirs = _entries(folder)
    return None if top_files else [d.name for d in class_dirs]


def check_output_outside(out: os.PathLike | str, source: Optional[str], option: str) -> None:
    """Refuses ``out`` (a command's -o folder) inside the class-folder dataset ``source`` the
    command reads (``option`` names it), which the next command reading it would read with it;
    an ``out`` elsewhere, or a ``source`` that is no such folder, passes."""
    if not source or class_folders(source) is None:
        return
    o, d = Path(out).resolve(), Path(source).resolve()
    if o == d or d in o.parents:
        raise InputError(f"{out}: is inside the {option} folder {source}, one folder per class, which the next "
                         "command that reads it would read with it (as a class folder of its own); choose an -o "
                         "folder outside it")


def lookalike_names(expected: Sequence[str], found: Sequence[str], first: str = "the model's {!r}",
                    second: str = "the folder's {!r}", fix: str = "rename the folder") -> str:
    """A hint (``""`` when none) for names of ``found`` that differ from one of ``expected`` only
    in how Unicode writes them (decomposed on macOS, composed elsewhere: ``'Gro\\u0308\\xdfe'``
    and ``'Gr\\xf6\\xdfe'`` both show as Größe), which a list of the names cannot show.
    ``first`` / ``second`` word an expected and a found name, ``fix`` what to do."""
    import unicodedata

    expected_set, found_set = set(expected), set(found)
    nfc = {unicodedata.normalize("NFC", c): c for c in found if c not in expected_set}
    alike = [(e, nfc[n]) for e in expected if e not in found_set for n in [unicodedata.normalize("NFC", e)]
             if n in nfc]
    return "".join(f"; {first.format(e)} and {second.format(f)} look alike but are written with other Unicode "
                   f"characters ({ascii(e)}, {ascii(f)}): {fix}" for e, f in alike)


def _some(names: Sequence[str], shown: int = 5) -> str:
    """The first ``shown`` names, and how many more there are."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f", ... ({more} more)" if more > 0 else "")


def check_class_folders(source: str, class_names: Optional[Sequence[str]], num_classes: Optional[int] = None,
                        subject: str = "", why: str = "labels come from the sorted folder names, so they must be "
                                                      "the classes the model was trained on") -> None:
    """A class-folder data set gives labels by sorted folder name, so it must have the model's
    classes: the same names when the model records them (``class_names``), else as many folders
    as ``num_classes`` (when given). Anything that is not a folder of class folders passes.

    Raises:
        InputError: ``{subject}{source}: its class folders are not the model's classes (...); {why}``.
    """
    names = class_folders(source)
    if names is None:
        return
    if class_names is not None and list(names) != list(class_names):
        missing = sorted(set(class_names) - set(names))
        extra = sorted(set(names) - set(class_names))
        what = "; ".join(x for x in (f"missing {_some(missing)}" if missing else "",
                                     f"not the model's: {_some(extra)}" if extra else "") if x)
        splits = [n for n in names if class_folders(Path(source) / n) == list(class_names)]  # ROOT/train, ROOT/val
        held_out = Path(source) / next((n for n in splits if n != "train"), splits[0]) if splits else None
        split = (f"; {', '.join(splits)} hold the model's class folders: pass one of them, e.g. {held_out}"
                 if len(splits) > 1 else f"; {splits[0]} holds the model's class folders: pass {held_out}"
                 if splits else "")
        raise InputError(f"{subject}{source}: its class folders are not the model's classes ({what or 'another order'}"
                         f"{lookalike_names(class_names, names)}{split}); {why}")
    if num_classes is not None and len(names) != num_classes:
        raise InputError(f"{subject}{source}: {len(names)} class folders for a model with {num_classes} classes; "
                         "labels come from the sorted folder names, so the folder needs one subfolder per class "
                         "of the model")


def _entries(folder: Path) -> Tuple[List[Path], List[Path]]:
    """A folder's top-level image files and its class subfolders (not hidden), sorted by name."""
    entries = sorted(folder.iterdir())
    return [p for p in entries if _is_image(p)], [p for p in entries if p.is_dir() and not p.name.startswith(".")]


def _list_folder(folder: Path) -> Tuple[List[Path], Optional[np.ndarray]]:
    """Image files of a folder and their labels (``None`` for a flat folder)."""
    top_files, class_dirs = _entries(folder)
    # hidden entries (".ipynb_checkpoints/", "._x.jpg") are skipped at every depth, as in training
    class_files = [sorted(p for p in d.rglob("*") if _is_image(p)
                          and not any(q.startswith(".") for q in p.relative_to(d).parts)) for d in class_dirs]
    if any(class_files) and top_files:
        raise ValueError(f"{folder}: mixes images at the top level ({top_files[0].name}, ...) with "
                         "class subfolders; use either a flat folder or one subfolder per class")
    if top_files:
        return top_files, None
    if not any(class_files):
        raise ValueError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} "
                         "files at the top level and in class subfolders)")
    files: List[Path] = []
    labels: List[int] = []
    for label, members in enumerate(class_files):
        files.extend(members)
        labels.extend([label] * len(members))
    return files, np.asarray(labels, dtype=np.int64)


def _load_files(files: Sequence[Path], image_size: int, crop_pct: float, interpolation: str,
                on_error: Optional[Callable[[str, str], None]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(frames, read)``: every file's frame (zeros where unreadable) and which were read; an
    unreadable file raises unless ``on_error`` takes it."""
    frames = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
    read = np.ones(len(files), dtype=bool)
    for k, file in enumerate(files):
        try:
            frames[k] = _read_image(file, image_size, crop_pct, interpolation)
        except ValueError as exc:
            if on_error is None:
                raise
            on_error(str(file), str(exc))
            frames[k], read[k] = 0, False
    return frames, read


#: Largest image decoded at full size (pixels). Larger JPEGs are decoded at a reduced scale
#: (the format allows it); larger images of other formats are refused. 40 M pixels are at most
#: 160 MB decoded (4 bytes per pixel), however few bytes the file has.
MAX_PIXELS = 40_000_000
#: Formats read (the suffixes of :data:`IMAGE_EXTENSIONS`); the content decides, not the suffix.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "PPM", "TIFF", "WEBP", "GIF")
#: 8-bit modes Pillow converts to RGB correctly (alpha dropped, palettes expanded).
_RGB_MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV")


def _read_image(file: Path, image_size: int, crop_pct: float, interpolation: str) -> np.ndarray:
    """One image file, pre-processed to uint8 ``(S, S, 3)``; ValueError naming the file.

    Size and mode come from the header before anything is decoded: images over
    :data:`MAX_PIXELS` are refused (JPEGs decoded at a reduced scale instead), and only the
    centre crop is resampled, so memory stays bounded whatever the file's size or aspect ratio.
    """
    return _read_image_placed(file, image_size, crop_pct, interpolation)[0]


def _read_image_placed(file: Path, image_size: int, crop_pct: float,
                       interpolation: str) -> Tuple[np.ndarray, CropGeometry]:
    """:func:`_read_image` and where its S x S crop lies in the file's pixels (a JPEG decoded at a
    reduced scale included: the geometry's frame is the file's own size)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file, formats=IMAGE_FORMATS) as image:
                width, height = image.size
                decoded = _decode(file, image, int(image_size / crop_pct))
                frame = preprocess(decoded, image_size, crop_pct, interpolation)
                geometry = crop_geometry(decoded.size[1], decoded.size[0], image_size, crop_pct)
                return frame, geometry._replace(frame=(height, width))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if str(exc).startswith(str(file)):
            raise
        raise ValueError(f"{file}: cannot read image ({exc})") from exc


def open_rgb(file: os.PathLike | str, short: int = 1024) -> Image.Image:
    """Opens and decodes an image file to RGB exactly as inference does (16-bit, 32-bit and
    float greys mapped to 0..255, bounded in memory; ``short``: the shorter side a huge JPEG may
    be decoded down to); ValueError naming the file. Training reads its images with it too."""
    import warnings

    file = Path(file)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file, formats=IMAGE_FORMATS) as image:
                return _decode(file, image, short)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if str(exc).startswith(str(file)):
            raise ValueError(str(exc)) from exc
        raise ValueError(f"{file}: cannot read image ({exc})") from exc


def _decode(file: Path, image: Image.Image, short: int) -> Image.Image:
    """Decodes an opened image to RGB, bounded in memory, with every mode's levels mapped to
    0..255 (8-bit modes by Pillow; 16-bit, 32-bit integer and float greys here) or refused."""
    w, h = image.size
    if w < 1 or h < 1:
        raise ValueError(f"{file}: image has an empty size {w}x{h}")
    if w * h > MAX_PIXELS and image.format == "JPEG":
        scale = min(w, h) / short  # DCT scaling: the decoder reads 1/2, 1/4 or 1/8 of the pixels
        image.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
        w, h = image.size
    if w * h > MAX_PIXELS:
        raise ValueError(f"{file}: image is {w}x{h} = {w * h / 1e6:.0f} M pixels; the limit is "
                         f"{MAX_PIXELS / 1e6:.0f} M pixels (reduce it first)")
    mode = image.mode
    if mode in _RGB_MODES:
        return image.convert("RGB")
    if mode.startswith("I;16"):
        levels, white = np.asarray(image).astype(np.uint32), 65535
    elif mode == "I" and image.format in ("PNG", "PPM"):  # 16-bit data widened by Pillow
        levels, white = np.asarray(image).astype(np.int64), 65535
    elif mode == "F":
        levels, white = np.asarray(image, dtype=np.float32), 1.0
        if not np.isfinite(levels).all():
            raise ValueError(f"{file}: floating-point image holds NaN or infinite values")
    else:
        raise ValueError(f"{file}: pixel mode {mode!r} ({image.format}) has no defined white level; "
                         "convert the image to 8 or 16 bits per channel")
    lo, hi = float(levels.min()), float(levels.max())
    if lo < 0 or hi > white:
        raise ValueError(f"{file}: {mode} pixel values span [{lo:g}, {hi:g}], outside [0, {white:g}]")
    grey = np.rint(levels.astype(np.float64) * (255.0 / white)).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _load_npz(path: Path, image_size: int, crop_pct: float, interpolation: str,
              placed: bool = False) -> tuple:
    """``(frames, labels)`` of an archive, its images resized and centre-cropped unless they are
    S x S already; with ``placed`` also each frame's :class:`~gfnet_edge.ops.CropGeometry` in
    pixels of its archived image."""
    try:
        shapes = _npz_shapes(path)
    except Exception as exc:  # zipfile / format errors all mean the same here
        raise ValueError(f"{path}: cannot read .npz archive ({exc})") from exc
    if "images" not in shapes:
        raise ValueError(f"{path}: .npz has no 'images' array (keys: {sorted(shapes) or 'none'})")
    shape, dtype = shapes["images"]
    if len(shape) == 4:  # (N, H, W, C) or (N, C, H, W); other shapes are refused by _npz_frames
        pixels = shape[1] * shape[2] if shape[3] in (1, 3) else shape[2] * shape[3]
        if pixels > MAX_PIXELS:
            raise ValueError(f"{path}: its images are {'x'.join(map(str, shape[1:]))} each, more than "
                             f"{MAX_PIXELS // 1_000_000} M pixels")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size > MAX_NPZ_BYTES:
            raise ValueError(f"{path}: its images take {size / 2 ** 30:.1f} GiB once decompressed, more than "
                             f"{MAX_NPZ_BYTES // 2 ** 30} GiB; split the archive")
    n = shape[0] if shape else 1
    for key, most in (("labels", n), ("normalized", 1)):
        if key in shapes and int(np.prod(shapes[key][0], dtype=np.int64)) > most:
            raise ValueError(f"{path}: its {key!r} array has shape {shapes[key][0]}, more values than {most}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in ("images", "labels", "normalized") if key in shapes}
    except Exception as exc:  # zipfile / pickle / format errors all mean the same here
        raise ValueError(f"{path}: cannot read .npz archive ({exc})") from exc
    normalized = _flag(path, arrays.get("normalized"))
    frames = _npz_frames(path, arrays["images"], normalized)
    labels = _npz_labels(path, arrays.get("labels"), len(frames))
    h, w = frames.shape[1:3]
    if (h, w) != (image_size, image_size):
        frames = np.stack([preprocess(Image.fromarray(f), image_size, crop_pct, interpolation) for f in frames]) \
            if len(frames) else np.zeros((0, image_size, image_size, 3), np.uint8)
        geometry = crop_geometry(h, w, image_size, crop_pct)
    else:  # taken as already cropped
        geometry = CropGeometry((h, w), (h, w), 0, 0, image_size)
    if placed:
        return np.ascontiguousarray(frames), labels, [geometry] * len(frames)
    return np.ascontiguousarray(frames), labels


#: Largest ``images`` array of an ``.npz`` read (bytes once decompressed).
MAX_NPZ_BYTES = 8 << 30


def _npz_shapes(path: Path) -> dict:
    """``{name: (shape, dtype)}`` of each array of an ``.npz`` archive, read from the array headers
    without decompressing the data (so a small archive that would expand to gigabytes is judged
    by its shapes first)."""
    import zipfile

    fmt = np.lib.format
    shapes = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                version = fmt.read_magic(f)
                read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, _, dtype = read(f)
                shapes[info.filename[:-4]] = (tuple(int(d) for d in shape), np.dtype(dtype))
    return shapes


def _flag(path: Path, value: Optional[np.ndarray]) -> Optional[bool]:
    if value is None:
        return None
    v = np.asarray(value)
    if v.size != 1 or v.dtype.kind not in "biu" or int(v.reshape(())) not in (0, 1):
        raise ValueError(f"{path}: 'normalized' must be a single boolean (True / False, or 1 / 0), got {value!r}")
    return bool(v.reshape(()))


def _npz_frames(path: Path, images: np.ndarray, normalized: Optional[bool]) -> np.ndarray:
    """Converts the ``images`` array of an archive to uint8 NHWC RGB."""
    if images.ndim >= 1 and images.shape[0] == 0:
        raise ValueError(f"{path}: 'images' is empty")
    if images.dtype == np.uint8:
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"{path}: uint8 'images' must be (N, H, W, 3) or (N, H, W, 1), got {images.shape}")
        frames = images
    elif np.issubdtype(images.dtype, np.floating):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"{path}: float 'images' must be (N, 3, H, W) or (N, 1, H, W), got {images.shape}")
        frames = _float_to_uint8(path, images.astype(np.float32), normalized)
    else:
        raise ValueError(f"{path}: 'images' must be uint8 NHWC or float NCHW, got dtype {images.dtype}")
    if frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"{path}: 'images' has an empty spatial size {frames.shape[1:3]}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return frames


def _float_to_uint8(path: Path, images: np.ndarray, normalized: Optional[bool]) -> np.ndarray:
    if not np.isfinite(images).all():
        bad = int((~np.isfinite(images)).any(axis=(1, 2, 3)).sum())
        raise ValueError(f"{path}: 'images' contains NaN or infinite values (in {bad} image(s))")
    if normalized is None:
        normalized = bool(images.min() < -1e-3 or images.max() > 1.0 + 1e-3)
    if normalized:
        channels = images.shape[1]
        mean = np.asarray(IMAGENET_MEAN, np.float32)[:channels].reshape(1, channels, 1, 1)
        std = np.asarray(IMAGENET_STD, np.float32)[:channels].reshape(1, channels, 1, 1)
        images = images * std + mean
        if images.min() < -0.05 or images.max() > 1.05:
            raise ValueError(f"{path}: float 'images' are neither in [0, 1] nor ImageNet-normalised "
                             f"(range after de-normalising: [{images.min():.3g}, {images.max():.3g}])")
    uint8 = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(uint8, 1, -1))


def _npz_labels(path: Path, labels: Optional[np.ndarray], n: int) -> Optional[np.ndarray]:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{path}: 'labels' must have shape ({n},) to match 'images', got {labels.shape}")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.isfinite(labels).all():
            raise ValueError(f"{path}: 'labels' contains NaN or infinite values")
        if (labels != np.round(labels)).any():
            raise ValueError(f"{path}: 'labels' must be integers")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: 'labels' must be integers, got dtype {labels.dtype}")
    if (labels < 0).any():
        raise ValueError(f"{path}: 'labels' must be >= 0")
    return labels.astype(np.int64)
