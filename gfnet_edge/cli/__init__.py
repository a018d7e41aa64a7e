"""The ``gfnet-edge`` command: the parser, and how failures become exit codes.

Each subcommand is a module with ``add_parser(subparsers)`` and the function it runs
(:mod:`.info`, :mod:`.build_engine`, :mod:`.predict`; ``calibrate``, ``demo``, ``train`` and
``doctor`` register from their own packages); options several subcommands share are in
:mod:`.options`. Heavy modules (torch, the build side) are imported by the function a
subcommand runs, never while the parser is built.

Every user-facing error ends in one line ``gfnet-edge: error: ...`` and a non-zero exit:
2 for bad input (and files that cannot be read or written, standard output included:
``cannot write to standard output: No space left on device``), 3 for a missing requirement
(TensorRT, GPU, torch), 1 for an unexpected failure; 130 / 143 after SIGINT / SIGTERM (which
end the command through its cleanup, so nothing half-written stays); 141, silently, when the
reader of stdout goes away (``gfnet-edge predict ... | head``). A traceback is printed only
with ``--debug``. Under ``torchrun`` (``WORLD_SIZE`` > 1) rank 0 alone reports bad options and
bad input, which every rank meets alike; any other failure of a rank N > 0 is reported on a line
that starts ``rank N: ``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable, List, Optional, Tuple

from .. import __version__
from ..errors import GFNetEdgeError, InputError, UnavailableError, missing_build_module, needs_build_side
from ..log import setup_logging
from . import build_engine, info, predict

Register = Callable[[argparse._SubParsersAction], None]


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors (``gfnet-edge: error: ...``, exit 2); the usage is
    in ``--help``."""

    def error(self, message: str):  # type: ignore[override]
        where = "" if self.prog == "gfnet-edge" else f"{self.prog}: "  # a subcommand's (or module's) name
        _report(f"gfnet-edge: error: {where}{message} (see `{self.prog} --help`)", alike=True)
        self.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The ``gfnet-edge`` parser with every subcommand."""
    parser = _Parser(
        prog="gfnet-edge",
        description="Turn a trained GFNet checkpoint into a fast, quantized, measured deployment.",
    )
    parser.add_argument("--version", action="version", version=f"gfnet-edge {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in subcommands():
        register(sub)
    return parser


def subcommands() -> Tuple[Register, ...]:
    """The ``add_parser`` function of every subcommand, in the order ``--help`` lists them."""
    from ..calibrate.cli import add_parser as calibrate
    from ..demo import add_parser as demo
    from ..doctor import add_parser as doctor
    from ..train.cli import add_parser as train

    return (info.add_parser, build_engine.add_parser, predict.add_parser, calibrate, demo, train, doctor)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (``finally``) runs as for Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


class _Stdout:
    """``sys.stdout`` while a command runs: the same stream, which remembers a write to it that
    failed (a full disk, a closed pipe), so that the failure is reported as standard output's."""

    failure: Optional[BaseException] = None

    def __init__(self, stream) -> None:
        self._stream = stream

    def _guarded(self, call, *args):
        try:
            return call(*args)
        except OSError as exc:
            _Stdout.failure = exc
            raise

    def write(self, text):
        return self._guarded(self._stream.write, text)

    def writelines(self, lines):
        return self._guarded(self._stream.writelines, lines)

    def flush(self):
        return self._guarded(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: Optional[List[str]] = None) -> int:
    """Runs ``gfnet-edge`` with ``argv`` (default: the command line); returns the exit code."""
    stream = sys.stdout
    if stream is None:
        return _main(argv)
    sys.stdout, _Stdout.failure = _Stdout(stream), None
    try:
        return _main(argv)
    finally:
        if sys.stdout.__class__ is _Stdout:
            sys.stdout = stream


def _main(argv: Optional[List[str]]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage and a one-line error on stderr (2), or --help (0)
        return _flushed(int(exc.code or 0), "")
    setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = int(args.func(args) or 0)
        _flush_stdout()  # a write that fails is reported here, not when Python exits
        if _Stdout.failure is not None:  # a failed write that was caught (and the output lost)
            raise _Stdout.failure
        return code
    except BaseException as exc:  # noqa: B902 - every failure becomes one line and an exit code
        if args.debug and not isinstance(exc, SystemExit):
            import traceback

            traceback.print_exc()
        return _exit_code(exc, args.command)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _flush_stdout() -> None:
    """Writes out what was printed (an ``OSError`` if that fails; a closed stdout is left alone)."""
    try:
        sys.stdout.flush()
    except ValueError:  # closed
        pass


def _flushed(code: int, command: str) -> int:
    """``code``, once what was printed has been written (else the exit code of that failure)."""
    try:
        _flush_stdout()
    except OSError as exc:  # a full disk or a closed pipe on stdout
        return _exit_code(exc, command)
    if _Stdout.failure is not None:  # argparse's --help and --version drop their failed writes
        return _exit_code(_Stdout.failure, command)
    return code


def _discard_stdout() -> None:
    """Points stdout at /dev/null, so that Python's flush at exit does not fail a second time."""
    import contextlib

    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (a broken pipe elsewhere, e.g. to a
    worker process, is an error of its own)."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll(), or stdout without a descriptor
        return False


def torchrun_rank() -> int:
    """This process's rank under ``torchrun`` (``RANK`` when ``WORLD_SIZE`` > 1), else 0."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


#: Seconds a rank > 0 waits, after a failure every rank meets alike, for ``torchrun`` to stop it.
RANK0_GRACE_S = 10.0


def _left_to_rank0() -> bool:
    """Whether rank 0 has reported the failure this rank > 0 met too (bad options or input).

    ``torchrun`` stops the other processes once one has ended, and may stop rank 0 before it has
    printed its line if this rank ends first: so this rank waits, up to :data:`RANK0_GRACE_S`,
    until ``torchrun`` stops it (SIGTERM, as rank 0 has ended), and says True then. False when
    no process ended meanwhile: the failure is this rank's own (e.g. a data folder missing on
    one machine), and this rank reports it.
    """
    import signal
    import threading
    import time

    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        time.sleep(RANK0_GRACE_S)
        return False
    except (Terminated, KeyboardInterrupt):
        return True
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report(line: str, alike: bool) -> None:
    """Prints the one-line report of a failure on stderr. Under ``torchrun`` a rank N > 0 starts
    it ``rank N: ``, and leaves a failure every rank meets alike (``alike``) to rank 0."""
    rank = torchrun_rank()
    if rank and alike and _left_to_rank0():
        return
    print(f"rank {rank}: {line}" if rank else line, file=sys.stderr)


def _exit_code(exc: BaseException, command: str = "") -> int:
    """Prints the one-line message of a failure and returns the exit code. Options and data are
    the same on every ``torchrun`` rank, so an :class:`InputError` is reported by rank 0 alone."""
    code, line = _failure(exc, command)
    if line is not None:
        _report(line, alike=isinstance(exc, InputError))
    return code


def _failure(exc: BaseException, command: str) -> Tuple[int, Optional[str]]:
    """The exit code of a failure and the line that reports it (``None``: nothing to print)."""
    if isinstance(exc, SystemExit):
        raise exc
    if isinstance(exc, ModuleNotFoundError):  # a build-side command on a device-side install
        missing = missing_build_module(exc)
        if missing is not None:
            return 3, f"gfnet-edge: error: {needs_build_side(f'`gfnet-edge {command}`', missing)}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "gfnet-edge: interrupted"
    if isinstance(exc, Terminated):
        return 143, "gfnet-edge: terminated"
    if isinstance(exc, BrokenPipeError) and _stdout_gone():  # the reader of stdout went away (`| head`)
        _discard_stdout()  # no second error when Python flushes stdout at exit
        return 141, None
    if _Stdout.failure is not None and exc.__cause__ is _Stdout.failure:  # reworded by errors.writing for its output
        exc = exc.__cause__
    if isinstance(exc, OSError) and exc is _Stdout.failure:  # e.g. `> /dev/full`: a file that cannot be written
        _discard_stdout()
        return 2, f"gfnet-edge: error: cannot write to standard output: {exc.strerror or exc}"
    code, msg = 1, None
    text = str(exc)
    if "Original Traceback" in text:  # raised again from a DataLoader worker: the worker's own last line
        text = re.sub(r"^[A-Za-z_.]+(Error|Exception): ", "", text.strip().splitlines()[-1])
    if isinstance(exc, InputError):
        code = 2
    elif isinstance(exc, UnavailableError):
        code = 3
    elif isinstance(exc, GFNetEdgeError):
        code = 1
    elif isinstance(exc, OSError) and exc.filename is not None:
        code, msg = 2, f"{exc.filename}: {exc.strerror or exc}"
    elif isinstance(exc, MemoryError):
        code, msg = 2, "out of memory (the input or a size option is too large for this machine)"
    else:
        msg = f"internal error: {type(exc).__name__}: {text} (rerun as `gfnet-edge --debug COMMAND ...` for the traceback)"
    msg = msg or text
    return code, f"gfnet-edge: error: {' '.join(msg.split()) if chr(10) in msg else msg}"

