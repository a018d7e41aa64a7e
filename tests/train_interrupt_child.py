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
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gfnet_edge

READY, GO = int(os.environ["GFNET_EDGE_TEST_READY"]), int(os.environ["GFNET_EDGE_TEST_GO"])
MOMENT = os.environ["GFNET_EDGE_TEST_PAUSE"]
calls = {"n": 0}


def pause() -> None:
    os.write(READY, b"r")
    os.read(GO, 1)


def in_training_loop() -> bool:
    return any(f.name == "loop" and "folder_stages" in f.filename for f in traceback.extract_stack())


def in_validation() -> bool:
    return any(f.name == "val_probs" for f in traceback.extract_stack())


if MOMENT in ("workers", "val-workers"):
    from torch.utils.data._utils import worker

    worker_loop = worker._worker_loop
    forking = {"paused": False, "this one": False}  # "this one": the fork to pause (the child inherits it)

    def before_fork() -> None:
        forking["this one"] = (not forking["paused"] and in_training_loop()
                               and in_validation() == (MOMENT == "val-workers"))

    def after_fork_in_parent() -> None:
        if forking["this one"]:
            forking["paused"], forking["this one"] = True, False
            pause()

    def paused_worker_loop(*args, **kwargs):
        if forking["this one"]:
            pause()
        return worker_loop(*args, **kwargs)

    worker._worker_loop = paused_worker_loop
    os.register_at_fork(before=before_fork, after_in_parent=after_fork_in_parent)
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

from gfnet_edge.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
