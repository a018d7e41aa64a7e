"""The one logger of gfnet-edge (``gfnet_edge``), configured once by the CLI."""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("gfnet_edge")


def setup_logging(verbosity: int = 0) -> None:
    """Sends gfnet_edge log records to stderr: 0 = warnings, 1 = info, 2 = debug."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("gfnet-edge: %(levelname)s: %(message)s"))
        logger.addHandler(h)
    logger.setLevel(level)
