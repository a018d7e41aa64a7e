"""The interpreter a test starts a child process with: the one running the tests, or, where
that interpreter cannot be executed directly (under qemu user emulation,
tools/aarch64_check.sh), the command that runs it, named by ``GFNET_EDGE_TEST_PYTHON``."""
from __future__ import annotations

import os
import sys

PYTHON = os.environ.get("GFNET_EDGE_TEST_PYTHON") or sys.executable
