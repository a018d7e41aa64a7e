"""The one logger of gfnet-edge (``gfnet_edge``), configured once by the CLI."""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("gfnet_edge")


class StderrHandler(logging.StreamHandler):
    """A handler that writes each record to ``sys.stderr`` as it is when the record is logged
    (as logging's last-resort handler does), not to the stream ``sys.stderr`` was when the
    handler was made: a process that runs the CLI more than once with ``sys.stderr`` replaced
    in between (tests, a caller capturing the output) gets every warning where it now looks."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401 - the current standard error
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ / setStream: always sys.stderr
        pass


def setup_logging(verbosity: int = 0) -> None:
    """Sends gfnet_edge log records to stderr: 0 = warnings, 1 = info, 2 = debug."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    if not logger.handlers:
        h = StderrHandler()
        h.setFormatter(logging.Formatter("gfnet-edge: %(levelname)s: %(message)s"))
        logger.addHandler(h)
    logger.setLevel(level)
