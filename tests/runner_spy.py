"""Records calls in tests: the graph runs of an open Runtime ((graph, batch) for every runner
call), and the first argument of every call of a patched function or method."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, List, Tuple


def first_args(monkeypatch, owner: Any, name: str) -> List[Any]:
    """Patches ``owner.name`` (a function or method) to run as before and append its first
    argument (``self`` for a method) to the list returned."""
    calls: List[Any] = []
    real = getattr(owner, name)

    def recording(first, *args, **kwargs):
        calls.append(first)
        return real(first, *args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return calls


@contextmanager
def recorded_runs(rt) -> Iterator[List[Tuple[str, int]]]:
    """Within the block, every ``rt.runner.run(graph, images)`` call appends ``(graph, batch)``
    to the yielded list; the runner is restored afterwards."""
    calls: List[Tuple[str, int]] = []
    run = rt.runner.run

    def recording(graph, images):
        calls.append((graph, images.shape[0]))
        return run(graph, images)

    rt.runner.run = recording
    try:
        yield calls
    finally:
        rt.runner.run = run
