"""Ctrl-C during training: :data:`SIGINT`, entered by ``gfnet-edge train`` (on an image folder
and in the demo trainer) while it trains, stops the run wherever the interrupt comes, and never
inside a stage checkpoint's write."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator


class SigintLatch:
    """While entered (main thread, Python's own Ctrl-C handler in place), SIGINT stops training
    wherever it comes, without a Python report of it:

    * it raises ``KeyboardInterrupt`` as Python's handler does, and is also recorded, so that an
      interrupt raised where Python ignores exceptions (an iterator's ``__del__``) still stops
      training, at the next batch or after the epoch's checkpoint (:meth:`check`); Python's
      "Exception ignored in ..." report of such an interrupt is left out;
    * inside :meth:`deferred` (the start of the DataLoader workers, whose fork handlers Python
      runs ignoring what they raise; the write of a stage checkpoint) it is only recorded, and
      raised when the block ends;
    * the processes forked meanwhile (DataLoader workers, which inherit the handler and get the
      terminal's Ctrl-C too) ignore it: the training process stops them."""

    def __init__(self) -> None:
        self.hit = False
        self._previous = None
        self._unraisable = None
        self._pid = 0
        self._defer = 0

    def _handler(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker
            return
        self.hit = True
        if not self._defer:
            raise KeyboardInterrupt

    def _unraisable_hook(self, unraisable) -> None:
        if self.hit and isinstance(unraisable.exc_value, KeyboardInterrupt):
            return  # recorded: raised again at the next check
        self._unraisable(unraisable)

    def check(self) -> None:
        """Raises ``KeyboardInterrupt`` if SIGINT came while entered."""
        if self.hit:
            raise KeyboardInterrupt

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A block that SIGINT does not interrupt: one that comes meanwhile is raised at its end
        (one recorded before it, at the next :meth:`check`)."""
        earlier = self.hit
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
        if self.hit and not earlier and not self._defer:
            raise KeyboardInterrupt

    def started(self, loader: Iterable) -> Iterator:
        """``iter(loader)``, deferred: DataLoader workers start in it, and Python ignores what
        its fork handlers raise (an interrupt there would be reported and lost)."""
        with self.deferred():
            return iter(loader)

    def __enter__(self) -> "SigintLatch":
        import signal
        import threading

        self.hit = False
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._pid = os.getpid()
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._unraisable, sys.unraisablehook = sys.unraisablehook, self._unraisable_hook
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            sys.unraisablehook = self._unraisable
            self._previous = self._unraisable = None
        self.hit = False


#: Entered by ``gfnet-edge train`` while it trains (both trainers); checked in
#: :meth:`~gfnet_edge.train.folder_stages.FolderTrainer.loop`.
SIGINT = SigintLatch()
