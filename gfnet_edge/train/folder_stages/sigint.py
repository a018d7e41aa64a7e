"""Ctrl-C during training: :data:`SIGINT`, entered by ``gfnet-edge train`` (on an image folder
and in the demo trainer) while it trains, stops the run wherever the interrupt comes, and never
inside a stage checkpoint's write."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from functools import lru_cache
from typing import FrozenSet, Iterable, Iterator, Tuple


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
    * inside multiprocessing's own bookkeeping (its finalizers, which close the workers' queues
      and unlink their semaphores, and its resource tracker's calls) it is only recorded, and
      raised at the next :meth:`check`: an interrupt between a semaphore's unlink and its
      unregistration would leave the resource tracker to report it at exit;
    * one recorded and not yet raised when the block ends is raised there;
    * the processes forked meanwhile (which inherit the handler and get the terminal's Ctrl-C
      too) ignore it; DataLoader workers, forked or spawned, ignore it from their start
      (:meth:`started`, :func:`worker_ignores_sigint`): the training process stops them."""

    def __init__(self) -> None:
        self.hit = False
        self._previous = None
        self._unraisable = None
        self._pid = 0
        self._defer = 0
        self._unraised = False  # recorded and not raised yet (or raised where Python ignored it)

    def _handler(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker
            return
        self.hit = True
        if self._defer or _in_multiprocessing_bookkeeping(frame):
            self._unraised = True
            return
        raise KeyboardInterrupt

    def _unraisable_hook(self, unraisable) -> None:
        if self.hit and isinstance(unraisable.exc_value, KeyboardInterrupt):
            self._unraised = True
            return  # recorded: raised again at the next check
        self._unraisable(unraisable)

    def check(self) -> None:
        """Raises ``KeyboardInterrupt`` if SIGINT came while entered."""
        if self.hit:
            self._unraised = False
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
            self._unraised = False
            raise KeyboardInterrupt

    def started(self, loader: Iterable) -> Iterator:
        """``iter(loader)``, deferred: DataLoader workers start in it, and Python ignores what
        its fork handlers raise (an interrupt there would be reported and lost). SIGINT is
        blocked meanwhile in this thread (where the platform has ``pthread_sigmask``): a worker
        inherits the blocked signal, forked or spawned (a spawned one has none of this process's
        handlers and would report a Ctrl-C that comes while it starts), until its
        :func:`worker_ignores_sigint` ignores it; one that comes meanwhile is delivered here when
        the workers have started."""
        _start_resource_tracker(loader)
        with self.deferred(), _blocked_sigint():
            return iter(loader)

    def __enter__(self) -> "SigintLatch":
        import signal
        import threading

        self.hit = self._unraised = False
        _bookkeeping_code()  # imported now, not in the handler
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._pid = os.getpid()
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._unraisable, sys.unraisablehook = sys.unraisablehook, self._unraisable_hook
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            sys.unraisablehook = self._unraisable
            self._previous = self._unraisable = None
        unraised, self._unraised, self.hit = self._unraised, False, False
        if unraised and exc_type is None:  # no check came after it (e.g. in the export's validation)
            raise KeyboardInterrupt


def _in_multiprocessing_bookkeeping(frame) -> bool:
    """Whether ``frame`` (the one a signal interrupts) runs inside a multiprocessing finalizer
    (``util.Finalize``: a queue's close, a semaphore's unlink), a semaphore's creation or
    cleanup, or the resource tracker: code that must run whole, or leaves a resource that the
    tracker reports at exit."""
    codes, files = _bookkeeping_code()
    while frame is not None:
        if frame.f_code in codes or frame.f_code.co_filename in files:
            return True
        frame = frame.f_back
    return False


@lru_cache(maxsize=None)
def _bookkeeping_code() -> Tuple[FrozenSet, FrozenSet[str]]:
    """The code objects and files of :func:`_in_multiprocessing_bookkeeping`, looked up once
    (:meth:`SigintLatch.__enter__`), not in the signal handler. A platform without named
    semaphores (no ``sem_open``) has no ``multiprocessing.synchronize``, nor semaphores to leave
    behind."""
    from multiprocessing import util

    codes, files = {util.Finalize.__call__.__code__, util._run_finalizers.__code__}, set()
    try:
        from multiprocessing import synchronize

        codes |= {synchronize.SemLock.__init__.__code__, synchronize.SemLock._cleanup.__code__}
    except ImportError:
        pass
    try:
        from multiprocessing import resource_tracker

        files.add(resource_tracker.__file__)
    except ImportError:
        pass
    return frozenset(codes), frozenset(files)


@contextmanager
def _blocked_sigint() -> Iterator[None]:
    """SIGINT blocked in this thread (the mask processes started meanwhile inherit), where the
    platform has ``pthread_sigmask``; one that comes meanwhile is delivered at the end."""
    import signal

    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _start_resource_tracker(loader: Iterable) -> None:
    """Starts multiprocessing's resource tracker now when ``loader`` has workers that are not
    forked (``spawn``, ``forkserver``) and the platform has ``pthread_sigmask``: it would start
    with their first queue, inside :func:`_blocked_sigint`, and starting it unblocks SIGINT in
    this thread (the standard library unblocks it, whatever the mask was), so the workers would
    start without it blocked."""
    import multiprocessing
    import signal

    if not getattr(loader, "num_workers", 0) or not hasattr(signal, "pthread_sigmask"):
        return
    if (getattr(loader, "multiprocessing_context", None) or multiprocessing).get_start_method() != "fork":
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()


def worker_ignores_sigint(worker_id: int) -> None:
    """The training DataLoaders' ``worker_init_fn``: the worker ignores SIGINT (a terminal's
    Ctrl-C reaches the whole process group; the training process handles it and stops its
    workers), and unblocks it (:meth:`SigintLatch.started` starts the workers with it blocked),
    so that the processes it starts inherit the ignored signal, not the blocked one."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


#: Entered by ``gfnet-edge train`` while it trains (both trainers); checked in
#: :meth:`~gfnet_edge.train.folder_stages.FolderTrainer.loop`.
SIGINT = SigintLatch()
