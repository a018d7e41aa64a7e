"""Child interpreters for tests whose failure mode is a crash or a hang (run apart, so that it
fails the test, not the session).

``PYTHON`` is the interpreter running the tests or, where that one cannot be executed directly
(under qemu user emulation, tools/aarch64_check.sh), the command that runs it, named by
``GFNET_EDGE_TEST_PYTHON``."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

PYTHON = os.environ.get("GFNET_EDGE_TEST_PYTHON") or sys.executable


def run(script: str, timeout: float) -> subprocess.CompletedProcess:
    """Runs ``script`` in a child interpreter (output captured as text)."""
    return subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=timeout)


def refusals(setup: str, calls: Sequence[str], message: str, timeout: float) -> subprocess.CompletedProcess:
    """Runs ``setup``, then each expression of ``calls``, in a child interpreter: each must raise
    ValueError with ``message`` in it; the child prints ``refused`` when all did."""
    script = setup + "\nfor call in (" + "".join(f"lambda: {c}, " for c in calls) + "):\n" + f'''
    try:
        call()
    except ValueError as e:
        assert {message!r} in str(e), e
    else:
        raise AssertionError("accepted")
print("refused")
'''
    return run(script, timeout)
