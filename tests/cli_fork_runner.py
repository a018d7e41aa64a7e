"""Runs many ``gfnet-edge`` command lines, each in its own forked process, and reports how each
ended (exit code or signal, stdout, stderr, seconds, peak memory).

The parent imports the CLI and its heavy dependencies once, so a case costs a fork instead of
an interpreter start; each child is still a real process with its own memory ceiling
(``RLIMIT_AS``) and time limit, so a native crash, a runaway allocation or a hang shows up as
that case's result instead of ending the run.

    python tests/cli_fork_runner.py CASES.json RESULTS.json

``CASES.json``: ``[{"id": str, "argv": [str, ...], "mem_mb": int, "timeout_s": int}, ...]``; ``mem_mb``
is the address space a case may add to what the parent's imports already map.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's gfnet_edge


def _vm_bytes() -> int:
    """This process's address-space size (VmSize)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(case: dict, out_path: str, err_path: str) -> None:
    out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    # the ceiling is on top of what the libraries imported by the parent already map
    limit = _vm_bytes() + (int(case.get("mem_mb", 2048)) << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.alarm(int(case.get("timeout_s", 60)))  # SIGALRM ends a hang (reported as signal 14)
    code = 1
    try:
        from gfnet_edge.cli import main

        code = main(case["argv"])
    except SystemExit as exc:
        code = int(exc.code or 0)
    except BaseException:  # reported as an uncaught traceback (the CLI should never get here)
        import traceback

        traceback.print_exc()
        code = 99
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(cases_path: str, results_path: str) -> int:
    import numpy  # noqa: F401  (imported once, before the forks)
    import PIL.Image  # noqa: F401
    import onnxruntime  # noqa: F401
    try:
        import torch  # noqa: F401  (no parallel work runs in the parent, so forking is safe)
    except ImportError:
        pass

    import gfnet_edge.cli  # noqa: F401

    cases = json.loads(open(cases_path, encoding="utf-8").read())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
            t0 = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                _child(case, out_path, err_path)
            _, status, usage = os.wait4(pid, 0)
            rc = os.waitstatus_to_exitcode(status)
            results.append({"id": case["id"], "rc": rc, "seconds": time.perf_counter() - t0,
                            "maxrss_mb": usage.ru_maxrss / 1024.0,
                            "stdout": open(out_path, encoding="utf-8", errors="replace").read(),
                            "stderr": open(err_path, encoding="utf-8", errors="replace").read()})
    with open(results_path, "w", encoding="utf-8") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
