"""Records the graph runs of an open Runtime: (graph, batch) for every runner call."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Tuple


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
