"""Runs ``gfnet-edge train ARGS...`` with a pause at one moment of the run, for a test that sends
a real SIGINT there (tests/test_train_folder.py).

``GFNET_EDGE_TEST_PAUSE`` names the moment:

* ``workers``: the training process in its fork handler as stage 1's first DataLoader worker
  starts, and that worker at the start of its loop;
* ``val-workers``: the same for the first worker of stage 1's first validation;
* ``mid-epoch``: the training process at the second batch of stage 1's second epoch;
* ``checkpoint``: the training process in ``torch.save`` of stage 1's first checkpoint.

Each paused process writes one byte to the descriptor ``GFNET_EDGE_TEST_READY``, then reads one
from ``GFNET_EDGE_TEST_GO``: the test sends SIGINT once every paused process has written its byte,
then writes theirs, so the signal is delivered while they wait there.

``GFNET_EDGE_TEST_START_METHOD`` (default ``fork``) is the start method of the DataLoader workers,
set with ``torch.multiprocessing.set_start_method`` as a user's script does. Under ``spawn`` and
``forkserver`` no fork handler of the training process runs: at ``workers`` and ``val-workers``
it pauses as that worker's ``Process.start`` returns (the worker has read its arguments, the
descriptors among them), and the worker before its loop, as under ``fork``.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gfnet_edge

READY, GO = int(os.environ["GFNET_EDGE_TEST_READY"]), int(os.environ["GFNET_EDGE_TEST_GO"])
MOMENT = os.environ["GFNET_EDGE_TEST_PAUSE"]
START_METHOD = os.environ.get("GFNET_EDGE_TEST_START_METHOD", "fork")
calls = {"n": 0}


def pause() -> None:
    os.write(READY, b"r")
    os.read(GO, 1)


def in_training_loop() -> bool:
    return any(f.name == "loop" and "folder_stages" in f.filename for f in traceback.extract_stack())


def in_validation() -> bool:
    return any(f.name == "val_probs" for f in traceback.extract_stack())


class Descriptors:
    """READY and GO in a worker's arguments: a forked worker inherits them, a spawned one gets
    them as its arguments are unpickled (multiprocessing passes the descriptors along)."""

    def __reduce__(self):
        from multiprocessing.reduction import DupFd

        return received, (DupFd(READY), DupFd(GO))


def received(ready, go) -> Descriptors:
    global READY, GO
    READY, GO = ready.detach(), go.detach()
    return Descriptors()


if MOMENT in ("workers", "val-workers"):
    from multiprocessing.process import BaseProcess

    from torch.utils.data._utils import worker

    worker_loop = worker._worker_loop
    start = BaseProcess.start
    state = {"paused": False, "starting": False}  # "starting": the worker to pause is being started

    def paused_start(self) -> None:
        if (self._target is not paused_worker_loop or state["paused"] or not in_training_loop()
                or in_validation() != (MOMENT == "val-workers")):
            return start(self)
        state["paused"] = state["starting"] = True
        self._kwargs = dict(self._kwargs, descriptors=Descriptors())
        try:
            start(self)  # fork: the training process pauses in its fork handler
        finally:
            state["starting"] = False
        if START_METHOD != "fork":
            pause()

    def after_fork_in_parent() -> None:
        if state["starting"]:
            pause()

    def paused_worker_loop(*args, descriptors=None, **kwargs):
        if descriptors is not None:
            pause()
        return worker_loop(*args, **kwargs)

    worker._worker_loop = paused_worker_loop
    BaseProcess.start = paused_start
    os.register_at_fork(after_in_parent=after_fork_in_parent)
elif MOMENT == "mid-epoch":
    from gfnet_edge.train import folder_stages

    normalise = folder_stages.normalise
    run = Path(sys.argv[sys.argv.index("-o") + 1])

    def paused_normalise(*args, **kwargs):
        if in_training_loop() and (run / "stage1.pt").exists():  # stage 1's first epoch is saved
            calls["n"] += 1
            if calls["n"] == 2:
                pause()
        return normalise(*args, **kwargs)

    folder_stages.normalise = paused_normalise
elif MOMENT == "checkpoint":
    import torch

    save = torch.save

    def paused_save(obj, f, *args, **kwargs):
        if calls["n"] == 0 and Path(getattr(f, "name", f)).name.startswith("stage1.pt."):
            calls["n"] = 1
            pause()
        return save(obj, f, *args, **kwargs)

    torch.save = paused_save
else:
    raise SystemExit(f"unknown GFNET_EDGE_TEST_PAUSE {MOMENT!r}")

if __name__ == "__main__":  # not in a spawned worker, which imports this file as __mp_main__
    import torch.multiprocessing

    from gfnet_edge.cli import main

    torch.multiprocessing.set_start_method(START_METHOD)
    sys.exit(main(sys.argv[1:]))
