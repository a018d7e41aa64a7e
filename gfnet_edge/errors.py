"""Errors the CLI turns into a clear message and a non-zero exit."""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator, Optional


class GFNetEdgeError(Exception):
    """Base class of user-facing errors (bad input, unmet requirement)."""


class InputError(GFNetEdgeError, ValueError):
    """Bad input: file, shape, value or option."""


class UnavailableError(GFNetEdgeError, RuntimeError):
    """A requirement is missing here (TensorRT, a GPU, torch) with a hint how to proceed."""


#: ``errno`` values of a write the file system refused for want of room or permission to grow
#: (a full disk, a quota, a file-size limit, a read-only mount): the user's to fix, not a bug.
WRITE_FAILURES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


@contextlib.contextmanager
def writing(target: "os.PathLike[str] | str", what: str) -> Iterator[None]:
    """Reports a write refused by the file system (:data:`WRITE_FAILURES`) that names no file
    (``f.write`` on a full disk says only ``No space left on device``) as an :class:`InputError`
    naming ``target``: ``"OUT: cannot write WHAT (No space left on device)"``. Other errors pass
    unchanged; cleaning up what was half-written is the caller's (``with`` blocks inside)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno not in WRITE_FAILURES:
            raise
        raise InputError(f"{os.fspath(target)}: cannot write {what} ({exc.strerror})") from exc


#: Modules only the build side installs (``pip install "gfnet-edge[build]"``); the device side
#: (``pip install gfnet-edge``: numpy, ONNX Runtime, Pillow, tqdm, fastjsonschema, Jinja2 and the extension)
#: never imports them.
BUILD_MODULES = ("torch", "torchvision", "timm", "onnx", "onnxsim", "scipy", "sklearn")

#: How to add the build side to a device-side install.
BUILD_EXTRAS_HINT = 'pip install "gfnet-edge[build]" (from a source checkout: pip install ".[build]")'


def installed(module: str) -> bool:
    """Whether the top-level ``module`` can be found here (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_build_module(exc: BaseException) -> Optional[str]:
    """The build-side module whose absence ``exc`` reports (a ``ModuleNotFoundError`` for one of
    :data:`BUILD_MODULES`, or a submodule of one, that is not installed here), else ``None``."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    return top if top in BUILD_MODULES and not installed(top) else None


def needs_build_side(what: str, module: str) -> UnavailableError:
    """The one-line error for a build-side task run on a device-side install."""
    return UnavailableError(f"{what} needs the build side, and {module} is not installed here: {BUILD_EXTRAS_HINT}")
